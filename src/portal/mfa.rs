//! Second factors in the portal: the step-up page (a password-only session gives a factor to
//! open an app that needs one), the confirm page (a fresh proof before factors change or a
//! command-line sign-in is approved: the second factor, or for a user with none the
//! password), the security page where users set up and remove factors, and the checks every
//! factor passes: the per-account lockout, with answers that do not tell whether an account
//! exists or is locked. Who may reach each page is declared in `routes`.

use std::net::IpAddr;

use askama::Template;
use http::{Response, StatusCode};

use super::signin::{check_password, renew_session, settle};
use super::{Call, Next, csrf_for_page, html, query_param, safe_next, with_csrf_cookie};
use crate::audit::Event;
use crate::body::Body;
use crate::config::MissingFactor;
use crate::identity::mfa::{self, Factors, Lock, PROOF_PASSWORD_ONLY, PROOF_SECOND_FACTOR};
use crate::identity::totp;
use crate::respond::{error_page, redirect};
use crate::session::{Factor, Proof, Session};
use crate::state::State;
use crate::store::Store;

#[derive(Template)]
#[template(path = "mfa.html")]
struct FactorPage<'a> {
    /// Where the forms post: `/.poort/mfa` or `/.poort/confirm`.
    action: &'a str,
    lead: &'a str,
    csrf: &'a str,
    next: &'a str,
    /// The command-line code this proof is for, if any.
    device: &'a str,
    totp: bool,
    passkey: bool,
    /// No second factor: the password proves it (confirm only).
    password: bool,
    /// A single sign-on user with no factor: sign in again at the provider.
    sign_in_again: Option<&'a str>,
    error: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "security.html")]
struct SecurityPage<'a> {
    user: &'a str,
    /// The user proved who they are within five minutes: the forms are shown.
    fresh: bool,
    passkeys: Vec<PasskeyLine>,
    ssh_keys: Vec<SshKeyLine>,
    csrf: &'a str,
    next: &'a str,
    totp: bool,
    has_factor: bool,
    recovery_left: usize,
    notice: Option<&'a str>,
    attention: Option<&'a str>,
    error: Option<&'a str>,
}

#[derive(Clone)]
struct SshKeyLine {
    fingerprint: String,
    name: String,
    algo: String,
    created: String,
    last_used: String,
}

#[derive(Clone)]
struct PasskeyLine {
    id: String,
    name: String,
    created: String,
    last_used: String,
}

#[derive(Template)]
#[template(path = "totp_enrol.html")]
struct TotpEnrolPage<'a> {
    user: &'a str,
    csrf: &'a str,
    next: &'a str,
    qr: &'a str,
    /// The key in groups of four, to read and type.
    key: &'a str,
    /// The same key as one string, to copy.
    plain: &'a str,
    error: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "recovery.html")]
struct RecoveryPage<'a> {
    user: &'a str,
    csrf: &'a str,
    codes: &'a [String],
    continue_to: &'a str,
}

/// Factors and the passkey list, for the security page.
/// What the security page shows: the factors, passkeys and SSH keys.
type SecurityData = (Factors, Vec<PasskeyLine>, Vec<SshKeyLine>);

async fn security_data(st: &State, user: &str) -> Option<SecurityData> {
    let name = user.to_string();
    let (f, list, ssh) = st
        .store
        .run(move |c| {
            Ok((mfa::factors(c, &name)?, crate::identity::passkey::list(c, &name)?, crate::ssh::keys(c, &name)?))
        })
        .await
        .ok()?;
    let when = |t: Option<i64>| t.map(crate::clock::format_minutes).unwrap_or_else(|| "never".into());
    let ssh = ssh
        .into_iter()
        .map(|k| SshKeyLine {
            fingerprint: k.fingerprint,
            name: k.name,
            algo: k.algo,
            created: crate::clock::format_minutes(k.created_at),
            last_used: when(k.last_used),
        })
        .collect();
    let lines = list
        .into_iter()
        .map(|p| PasskeyLine {
            id: p.id,
            name: p.name,
            created: crate::clock::format_minutes(p.created_at),
            last_used: p.last_used.map(crate::clock::format_minutes).unwrap_or_else(|| "never".into()),
        })
        .collect();
    Some((f, lines, ssh))
}

pub(crate) async fn factors_of(st: &State, user: &str) -> Option<Factors> {
    let name = user.to_string();
    st.store.run(move |c| mfa::factors(c, &name)).await.ok()
}

fn set_cookie(resp: &mut Response<Body>, token: &str) {
    if let Ok(v) = http::HeaderValue::from_str(&crate::session::cookie::set_session(token)) {
        resp.headers_mut().append(http::header::SET_COOKIE, v);
    }
}

/// Where a renewed session goes next, carrying its new cookie.
fn continue_with(st: &State, token: &str, next: &str) -> Response<Body> {
    let mut resp = super::go_to(st, safe_next(next, &st.cfg));
    set_cookie(&mut resp, token);
    resp
}

/// What the factor page is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `/.poort/mfa`: a password-only session adds a second factor to open an app.
    StepUp,
    /// `/.poort/confirm`: a fresh proof before factors change, or to approve a command-line
    /// sign-in (`device`).
    Confirm,
}

impl Mode {
    fn action(self) -> &'static str {
        match self {
            Mode::StepUp => "/.poort/mfa",
            Mode::Confirm => "/.poort/confirm",
        }
    }
}

/// Where a single sign-on user signs in again (a fresh proof without a password).
async fn provider_again(st: &State, user: &str, next: &str) -> Option<String> {
    let name = user.to_string();
    let source = st.store.run(move |c| Store::user_source(c, &name)).await.ok().flatten()?.0;
    let provider = source.strip_prefix("oidc:")?;
    let q = form_urlencoded::Serializer::new(String::new()).append_pair("next", next).finish();
    Some(format!("/.poort/oidc/{provider}/start?{q}"))
}

/// GET /.poort/mfa and /.poort/confirm.
pub(crate) async fn factor_form(st: &State, call: &Call, mode: Mode) -> Response<Body> {
    let s = call.session();
    let next = query_param(call, "next").unwrap_or_default();
    // Only a confirmation is for a command-line code; a step-up never is.
    let device = match mode {
        Mode::Confirm => query_param(call, "device").map(|c| super::device::normal_code(&c)).unwrap_or_default(),
        Mode::StepUp => String::new(),
    };
    if mode == Mode::StepUp && s.mfa() {
        return super::go_to(st, safe_next(&next, &st.cfg));
    }
    let Some(f) = factors_of(st, &s.identity.user).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id);
    };
    if mode == Mode::StepUp && !f.any() {
        return match st.cfg.mfa.missing {
            MissingFactor::Enrol => {
                let mut location = format!("{}/.poort/security?", st.cfg.server.external_origin);
                location.push_str(&form_urlencoded::Serializer::new(String::new()).append_pair("next", &next).finish());
                redirect(StatusCode::FOUND, &location)
            }
            MissingFactor::Refuse => error_page(StatusCode::FORBIDDEN, call.ctx.id),
        };
    }
    let next = if safe_next(&next, &st.cfg) == Next::Portal { String::new() } else { next };
    let again = if !f.any() && s.single_sign_on() { provider_again(st, &s.identity.user, &next).await } else { None };
    factor_view(call.headers(), mode, &f, &next, &device, again.as_deref(), StatusCode::OK, None)
}

#[expect(clippy::too_many_arguments, reason = "one page, every part of it")]
fn factor_view(
    headers: &http::HeaderMap,
    mode: Mode,
    f: &Factors,
    next: &str,
    device: &str,
    again: Option<&str>,
    status: StatusCode,
    error: Option<&str>,
) -> Response<Body> {
    let (csrf, new) = csrf_for_page(headers);
    let console = next.starts_with("/.poort/admin");
    let lead = match (mode, device.is_empty(), f.any()) {
        (Mode::Confirm, true, true) if console => {
            "To make changes in the admin console, give your second factor first."
        }
        (Mode::StepUp, _, _) if console => "The admin console needs a second factor as well as your password.",
        (Mode::StepUp, _, _) => "This needs a second factor as well as your password.",
        (Mode::Confirm, false, true) => "To approve the command-line sign-in, give your second factor.",
        (Mode::Confirm, false, false) => "To approve the command-line sign-in, give your password.",
        (Mode::Confirm, true, true) => "To change how you sign in, give your second factor first.",
        (Mode::Confirm, true, false) => "To change how you sign in, give your password first.",
    };
    let page = FactorPage {
        action: mode.action(),
        lead,
        csrf: &csrf,
        next,
        device,
        totp: f.totp,
        passkey: f.passkeys > 0,
        password: mode == Mode::Confirm && !f.any() && again.is_none(),
        sign_in_again: again,
        error,
    };
    with_csrf_cookie(html(status, &page), &csrf, new)
}

/// POST /.poort/mfa and /.poort/confirm: a TOTP code or a recovery code (or, to confirm, the
/// password of a user with no second factor). On success the session is replaced by one that
/// records the proof; a confirmation for a command-line code also marks that code.
pub(crate) async fn factor_submit(st: &State, call: Call, mode: Mode) -> Response<Body> {
    let (ctx, s) = (&call.ctx, call.session());
    let next = call.field("next").to_string();
    let device = match mode {
        Mode::Confirm => super::device::normal_code(call.field("device")),
        Mode::StepUp => String::new(),
    };
    let have = factors_of(st, &s.identity.user).await.unwrap_or_default();
    let fail = |status: StatusCode, error: &str| {
        factor_view(call.headers(), mode, &have, &next, &device, None, status, Some(error))
    };
    let (user, now, client) = (s.identity.user.clone(), st.clock.now(), ctx.client);
    let (code, recovery, pw) = (call.field("code"), call.field("recovery"), call.field("password"));
    let proof = if !have.any() {
        // Only a user without a second factor proves it with the password, and only to confirm.
        if mode != Mode::Confirm || pw.is_empty() || s.single_sign_on() {
            return fail(StatusCode::BAD_REQUEST, "This account has no second factor to give.");
        }
        if !check_password(st, &user, pw, client).await {
            return fail(StatusCode::UNAUTHORIZED, "That password is not right.");
        }
        Proof::Password
    } else if code.is_empty() && recovery.is_empty() {
        // A password is no proof for a user who has a second factor.
        return fail(StatusCode::BAD_REQUEST, "Give your second factor: a code, a recovery code or a passkey.");
    } else {
        let use_recovery = code.is_empty() && !recovery.is_empty();
        let (code, recovery) = (code.to_string(), recovery.to_string());
        let sealer = st.signins.sealer.clone();
        let name = user.clone();
        let checked = st
            .store
            .run(move |c| {
                if mfa::locked(c, &name, Lock::Factor, now)? {
                    return Ok((false, 0));
                }
                if use_recovery {
                    let ok = mfa::recovery_use(c, &name, &recovery, now)?;
                    Ok((ok, mfa::factors(c, &name)?.recovery_left))
                } else {
                    Ok((mfa::totp_check(c, &sealer, &name, &code, now, false)?, 0))
                }
            })
            .await;
        let (ok, remaining) = checked.unwrap_or((false, 0));
        let ok = settle(st, &user, Lock::Factor, ok, client).await;
        let factor = if use_recovery { Factor::Rc } else { Factor::Otp };
        if !ok {
            let ev = Event::MfaFailed { user: user.clone(), factor: factor.amr().into(), client };
            st.audit.note(ev).await;
            return fail(StatusCode::UNAUTHORIZED, "That code did not work. Try the current one.");
        }
        if use_recovery {
            let ev = Event::RecoveryCodeUsed { user: user.clone(), remaining, client };
            st.audit.note(ev).await;
        }
        Proof::Factor(factor)
    };
    let Some((_, token)) = renew_session(st, s, proof, ctx).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    };
    if !device.is_empty() {
        super::device::prove(st, &device, s).await;
    }
    continue_with(st, &token, &next)
}

/// A message on the security page.
enum Say<'a> {
    Nothing,
    /// Something done.
    Notice(&'a str),
    /// Something to do before going on (not a success, not a failure).
    Attention(&'a str),
    Error(&'a str),
}

#[expect(clippy::too_many_arguments, reason = "one page, every part of it")]
fn security_view(
    st: &State,
    s: &Session,
    headers: &http::HeaderMap,
    (f, passkeys, ssh_keys): &SecurityData,
    fresh: bool,
    next: &str,
    status: StatusCode,
    say: Say<'_>,
) -> Response<Body> {
    let (notice, attention, error) = match say {
        Say::Nothing => (None, None, None),
        Say::Notice(m) => (Some(m), None, None),
        Say::Attention(m) => (None, Some(m), None),
        Say::Error(m) => (None, None, Some(m)),
    };
    let (csrf, new) = csrf_for_page(headers);
    let next = if safe_next(next, &st.cfg) == Next::Portal { "" } else { next };
    let page = SecurityPage {
        passkeys: passkeys.clone(),
        ssh_keys: ssh_keys.clone(),
        user: &s.identity.user,
        fresh,
        csrf: &csrf,
        next,
        totp: f.totp,
        has_factor: f.any(),
        recovery_left: f.recovery_left,
        notice,
        attention,
        error,
    };
    with_csrf_cookie(html(status, &page), &csrf, new)
}

/// The security page after a change.
async fn security_after(st: &State, call: &Call, status: StatusCode, say: Say<'_>) -> Response<Body> {
    let s = call.session();
    let Some(data) = security_data(st, &s.identity.user).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id);
    };
    let fresh = s.fresh(st.clock.now(), data.0.any());
    security_view(st, s, call.headers(), &data, fresh, "", status, say)
}

/// GET /.poort/security
pub(crate) async fn security_page(st: &State, call: &Call) -> Response<Body> {
    let s = call.session();
    let Some(data) = security_data(st, &s.identity.user).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id);
    };
    let next = query_param(call, "next").unwrap_or_default();
    let say = if next.starts_with("/.poort/admin") && !data.0.any() {
        Say::Attention("The admin console needs a second factor. Set up an authenticator app or a passkey to continue.")
    } else if !next.is_empty() && !data.0.any() {
        Say::Attention("That app needs a second factor. Set up an authenticator app to continue.")
    } else {
        Say::Nothing
    };
    let fresh = s.fresh(st.clock.now(), data.0.any());
    security_view(st, s, call.headers(), &data, fresh, &next, StatusCode::OK, say)
}

/// The QR code for an otpauth URI as an SVG data URI (no external service, no script).
fn qr_data_uri(uri: &str) -> Option<String> {
    use base64::Engine;
    let code = qrcode::QrCode::new(uri.as_bytes()).ok()?;
    let svg = code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(200, 200).quiet_zone(true).build();
    Some(format!("data:image/svg+xml;base64,{}", base64::engine::general_purpose::STANDARD.encode(svg)))
}

fn grouped(key: &str) -> String {
    key.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(" ")
}

/// How a change was proved: a second factor, or (the first factor of a user with none) the
/// password or a fresh sign-in alone.
pub(crate) async fn proof_of(st: &State, user: &str) -> &'static str {
    if factors_of(st, user).await.is_none_or(|f| f.any()) { PROOF_SECOND_FACTOR } else { PROOF_PASSWORD_ONLY }
}

/// POST /.poort/security/totp (fresh): a new secret to enrol.
pub(crate) async fn totp_begin(st: &State, call: &Call) -> Response<Body> {
    let s = call.session();
    let (sealer, name, now) = (st.signins.sealer.clone(), s.identity.user.clone(), st.clock.now());
    match st.store.run(move |c| mfa::totp_begin(c, &sealer, &name, now)).await {
        Ok(Some(_)) => totp_enrol_view(st, s, call.headers(), call.field("next"), None).await,
        Ok(None) => {
            security_after(
                st,
                call,
                StatusCode::CONFLICT,
                Say::Error("An authenticator app is set up already. Remove it first."),
            )
            .await
        }
        Err(_) => error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id),
    }
}

/// POST /.poort/security/totp/confirm: a code from the secret `totp_begin` made. The session
/// is renewed with the factor it just proved, and a first factor comes with recovery codes.
pub(crate) async fn totp_confirm(st: &State, call: Call) -> Response<Body> {
    let (ctx, s) = (&call.ctx, call.session());
    let next = call.field("next").to_string();
    let user = s.identity.user.clone();
    let proof = proof_of(st, &user).await;
    let (sealer, name, now, code) =
        (st.signins.sealer.clone(), user.clone(), st.clock.now(), call.field("code").to_string());
    let ok = st
        .store
        .run(move |c| {
            Ok(!mfa::locked(c, &name, Lock::Factor, now)? && mfa::totp_check(c, &sealer, &name, &code, now, true)?)
        })
        .await
        .unwrap_or(false);
    let ok = settle(st, &user, Lock::Factor, ok, ctx.client).await;
    if !ok {
        let msg = "That code did not work. Check the app and try the current one.";
        return totp_enrol_view(st, s, call.headers(), &next, Some(msg)).await;
    }
    changed(st, &user, "authenticator app set up", proof, ctx.client).await;
    let Some((_, token)) = renew_session(st, s, Proof::Factor(Factor::Otp), ctx).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    };
    let recovery_left = factors_of(st, &user).await.map_or(0, |f| f.recovery_left);
    if recovery_left == 0 {
        let name = user.clone();
        if let Ok(codes) = st.store.run(move |c| mfa::recovery_new(c, &name)).await {
            changed(st, &user, "recovery codes made", PROOF_SECOND_FACTOR, ctx.client).await;
            let continue_to = match safe_next(&next, &st.cfg) {
                Next::Portal => "/.poort/security".to_string(),
                _ => format!(
                    "/.poort/login?next={}",
                    form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
                ),
            };
            let (csrf, _) = csrf_for_page(call.headers());
            let mut resp = html(
                StatusCode::OK,
                &RecoveryPage { user: &user, csrf: &csrf, codes: &codes, continue_to: &continue_to },
            );
            set_cookie(&mut resp, &token);
            return resp;
        }
    }
    if safe_next(&next, &st.cfg) == Next::Portal {
        let mut resp = redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/security", st.cfg.server.external_origin));
        set_cookie(&mut resp, &token);
        return resp;
    }
    continue_with(st, &token, &next)
}

/// POST /.poort/security/totp/remove (fresh)
pub(crate) async fn totp_remove(st: &State, call: &Call) -> Response<Body> {
    let user = call.session().identity.user.clone();
    let name = user.clone();
    let removed = st.store.run(move |c| Ok((mfa::totp_remove(c, &name)?, mfa::drop_codes_without_factor(c, &name)?)));
    let Ok((_, codes_dropped)) = removed.await else { return error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id) };
    changed(st, &user, "authenticator app removed", PROOF_SECOND_FACTOR, call.ctx.client).await;
    let notices = (
        "The authenticator app was removed.",
        "The authenticator app was removed. With no authenticator left, your recovery codes went too.",
    );
    let said = after_removal(st, call, codes_dropped, notices).await;
    security_after(st, call, StatusCode::OK, Say::Notice(said)).await
}

/// Records recovery codes that went with the last authenticator. Returns the notice to show:
/// `notices.0`, or `notices.1` when the codes went too.
async fn after_removal(
    st: &State,
    call: &Call,
    codes_dropped: bool,
    notices: (&'static str, &'static str),
) -> &'static str {
    if !codes_dropped {
        return notices.0;
    }
    let user = &call.session().identity.user;
    changed(st, user, "recovery codes removed with the last authenticator", PROOF_SECOND_FACTOR, call.ctx.client).await;
    notices.1
}

/// POST /.poort/security/passkey/remove (fresh)
pub(crate) async fn passkey_remove(st: &State, call: &Call) -> Response<Body> {
    let user = call.session().identity.user.clone();
    let (name, id) = (user.clone(), call.field("id").to_string());
    let removed = st
        .store
        .run(move |c| {
            let removed = crate::identity::passkey::remove(c, &name, &id)?;
            Ok((removed, removed && mfa::drop_codes_without_factor(c, &name)?))
        })
        .await;
    let Ok((true, codes_dropped)) = removed else {
        return security_after(st, call, StatusCode::NOT_FOUND, Say::Error("No such passkey.")).await;
    };
    changed(st, &user, "passkey removed", PROOF_SECOND_FACTOR, call.ctx.client).await;
    let notices = (
        "The passkey was removed.",
        "The passkey was removed. With no authenticator left, your recovery codes went too.",
    );
    let said = after_removal(st, call, codes_dropped, notices).await;
    security_after(st, call, StatusCode::OK, Say::Notice(said)).await
}

/// An SSH key added or removed, in the audit log: proved by the fresh confirmation the route
/// asks for (a second factor when the user has one, else a fresh sign-in).
async fn ssh_key_changed(st: &State, call: &Call, change: String) {
    let user = call.session().identity.user.clone();
    let has_factor = factors_of(st, &user).await.is_some_and(|f| f.any());
    let proof = if has_factor { PROOF_SECOND_FACTOR } else { "fresh sign-in" };
    let ev = Event::FactorChanged { user, change, proof: proof.to_string(), client: call.ctx.client };
    st.audit.note(ev).await;
}

/// POST /.poort/security/ssh/add (fresh): registers a public key for the SSH front door.
pub(crate) async fn ssh_key_add(st: &State, call: &Call) -> Response<Body> {
    let key = match crate::ssh::parse_public_key(call.field("key")) {
        Ok(k) => k,
        Err(why) => return security_after(st, call, StatusCode::BAD_REQUEST, Say::Error(why)).await,
    };
    let name = call.field("name").trim().to_string();
    // No control or direction-changing characters: a name shows as it was typed.
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
    };
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(hidden) {
        return security_after(
            st,
            call,
            StatusCode::BAD_REQUEST,
            Say::Error("Give the key a name of up to 64 characters."),
        )
        .await;
    }
    let (user, now) = (call.session().identity.user.clone(), st.clock.now());
    let k = key.clone();
    match st.store.run(move |c| crate::ssh::add_key(c, &user, &name, &k, now)).await {
        Ok(Ok(())) => {
            ssh_key_changed(st, call, format!("ssh key added {}", key.fingerprint)).await;
            security_after(st, call, StatusCode::OK, Say::Notice("The SSH key was added.")).await
        }
        Ok(Err(why)) => security_after(st, call, StatusCode::CONFLICT, Say::Error(why)).await,
        Err(_) => error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id),
    }
}

/// POST /.poort/security/ssh/remove (fresh).
pub(crate) async fn ssh_key_remove(st: &State, call: &Call) -> Response<Body> {
    let (user, fingerprint) = (call.session().identity.user.clone(), call.field("fingerprint").to_string());
    let (fp, now) = (fingerprint.clone(), st.clock.now());
    match st.store.run(move |c| crate::ssh::remove_key(c, &user, &fp, now)).await {
        Ok(true) => {
            ssh_key_changed(st, call, format!("ssh key removed {fingerprint}")).await;
            security_after(st, call, StatusCode::OK, Say::Notice("The SSH key was removed.")).await
        }
        Ok(false) => security_after(st, call, StatusCode::NOT_FOUND, Say::Error("No such SSH key.")).await,
        Err(_) => error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id),
    }
}

/// POST /.poort/security/recovery (fresh): ten new codes, the old ones void.
pub(crate) async fn recovery_codes(st: &State, call: &Call) -> Response<Body> {
    let user = call.session().identity.user.clone();
    if !factors_of(st, &user).await.is_some_and(|f| f.any()) {
        return security_after(st, call, StatusCode::CONFLICT, Say::Error("Set up a second factor first.")).await;
    }
    let name = user.clone();
    match st.store.run(move |c| mfa::recovery_new(c, &name)).await {
        Ok(codes) => {
            changed(st, &user, "recovery codes made", PROOF_SECOND_FACTOR, call.ctx.client).await;
            let (csrf, _) = csrf_for_page(call.headers());
            html(
                StatusCode::OK,
                &RecoveryPage { user: &user, csrf: &csrf, codes: &codes, continue_to: "/.poort/security" },
            )
        }
        Err(_) => error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id),
    }
}

async fn totp_enrol_view(
    st: &State,
    s: &Session,
    headers: &http::HeaderMap,
    next: &str,
    error: Option<&str>,
) -> Response<Body> {
    let (sealer, name) = (st.signins.sealer.clone(), s.identity.user.clone());
    let Ok(Some(secret)) = st.store.run(move |c| mfa::totp_pending(c, &sealer, &name)).await else {
        return redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/security", st.cfg.server.external_origin));
    };
    let uri = totp::otpauth_uri(&st.cfg.mfa.issuer, &s.identity.user, &secret);
    let qr = qr_data_uri(&uri).unwrap_or_default();
    let plain = totp::base32(&secret);
    let key = grouped(&plain);
    let (csrf, new) = csrf_for_page(headers);
    let next = if safe_next(next, &st.cfg) == Next::Portal { "" } else { next };
    let status = if error.is_some() { StatusCode::UNAUTHORIZED } else { StatusCode::OK };
    let page = TotpEnrolPage { user: &s.identity.user, csrf: &csrf, next, qr: &qr, key: &key, plain: &plain, error };
    with_csrf_cookie(html(status, &page), &csrf, new)
}

/// Audits a change to a user's factors, with how it was proved.
pub(crate) async fn changed(st: &State, user: &str, change: &str, proof: &str, client: IpAddr) {
    if proof == PROOF_PASSWORD_ONLY {
        tracing::warn!(user = %user, change, client = %client, "A first second factor was set up with the password alone");
    }
    let ev =
        Event::FactorChanged { user: user.to_string(), change: change.to_string(), proof: proof.to_string(), client };
    st.audit.note(ev).await;
}

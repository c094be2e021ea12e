//! Second factors in the portal: the step-up page (a password-only session gives a factor to
//! open an app that needs one), the confirm page (a fresh proof before factors change or a
//! command-line sign-in is approved: the second factor, or for a user with none the
//! password), the security page where users set up and remove factors, and the checks every
//! factor passes: the per-account lockout, with answers that do not tell whether an account
//! exists or is locked. Who may reach each page is declared in `routes`.

use std::net::IpAddr;

use askama::Template;
use http::{Response, StatusCode};

use super::{Call, Next, csrf_for_page, html, query_param, safe_next, with_csrf_cookie};
use crate::audit::Event;
use crate::body::Body;
use crate::config::MissingFactor;
use crate::identity::mfa::{self, Factors, Lock, PROOF_PASSWORD_ONLY, PROOF_SECOND_FACTOR};
use crate::identity::{password, totp};
use crate::names::valid_user_name;
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
    csrf: &'a str,
    next: &'a str,
    totp: bool,
    has_factor: bool,
    recovery_left: usize,
    notice: Option<&'a str>,
    error: Option<&'a str>,
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
    key: &'a str,
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

/// True if this address may make another sign-in attempt (any factor) now.
pub(crate) fn attempt_allowed(st: &State, client: IpAddr) -> bool {
    let ok = st.signins.limiter.check_key(&client).is_ok();
    if !ok {
        tracing::warn!(client = %client, "Sign-in attempts rate-limited");
    }
    ok
}

/// The outcome of a password check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PasswordCheck {
    /// Right; the user's poort name (a directory may spell it differently than typed).
    Right(String),
    /// Wrong password, unknown, locked or disabled user, or not allowed to sign in.
    Wrong,
    /// The directory that holds the user did not answer.
    DirectoryDown,
}

/// Checks a password with the lockout applied: a locked or unknown account costs the same
/// hashing work and gets the same `false` as a wrong password. Failures count towards the
/// lock; a success clears the count.
pub(crate) async fn check_password(st: &State, user: &str, pw: &str, client: IpAddr) -> bool {
    matches!(password_check(st, user, pw, client).await, PasswordCheck::Right(_))
}

/// As `check_password`, telling a directory outage apart. Local accounts are checked first
/// (by their exact name); a name poort does not know as a local account goes to the
/// directory, if one is configured, which names the account: lockouts count on that name,
/// however the user typed it.
pub(crate) async fn password_check(st: &State, user: &str, pw: &str, client: IpAddr) -> PasswordCheck {
    if !valid_user_name(user) {
        let pw = pw.to_string();
        let _ = tokio::task::spawn_blocking(move || password::verify_dummy(&pw)).await;
        return PasswordCheck::Wrong;
    }
    let now = st.clock.now();
    let name = user.to_string();
    let (locked, hash, source) = st
        .store
        .run(move |c| {
            Ok((
                mfa::locked(c, &name, Lock::Password, now)?,
                Store::password_hash(c, &name)?,
                Store::user_source(c, &name)?,
            ))
        })
        .await
        .unwrap_or((true, None, None));
    let directory_user = match &source {
        None => true,
        Some((s, _)) => s == "ldap",
    };
    let (outcome, counted_on) = match (&st.directory, hash) {
        (Some(dir), None) if directory_user => directory_check(st, dir, user, pw, client).await,
        (_, hash) => {
            let pw = pw.to_string();
            let ok = tokio::task::spawn_blocking(move || match (locked, hash) {
                (false, Some(h)) => password::verify(&pw, &h),
                _ => {
                    password::verify_dummy(&pw);
                    false
                }
            })
            .await
            .unwrap_or(false);
            let outcome = if ok { PasswordCheck::Right(user.to_string()) } else { PasswordCheck::Wrong };
            (outcome, user.to_string())
        }
    };
    // An outage is not the user's fault: it does not count towards a lock.
    if outcome != PasswordCheck::DirectoryDown {
        settle(st, &counted_on, Lock::Password, matches!(outcome, PasswordCheck::Right(_)), client).await;
    }
    outcome
}

/// Checks the password in the directory, under the lock of the name the directory gives the
/// account, and records the user as the directory sees them. Returns the outcome and the name
/// the attempt counts on.
async fn directory_check(
    st: &State,
    dir: &crate::identity::ldap::Directory,
    user: &str,
    pw: &str,
    client: IpAddr,
) -> (PasswordCheck, String) {
    use crate::identity::ldap::Refusal;
    let typed = user.to_ascii_lowercase();
    let found = match dir.lookup(user).await {
        Ok(f) => f,
        Err(Refusal::Unavailable(why)) => {
            tracing::error!(error = %why, client = %client, "The directory is unavailable; sign-in refused");
            return (PasswordCheck::DirectoryDown, typed);
        }
        Err(why) => {
            tracing::info!(user = %user, reason = %why, "Directory sign-in refused");
            let pw = pw.to_string();
            let _ = tokio::task::spawn_blocking(move || password::verify_dummy(&pw)).await;
            return (PasswordCheck::Wrong, typed);
        }
    };
    let (now, name) = (st.clock.now(), found.name.clone());
    let state =
        st.store.run(move |c| Ok((mfa::locked(c, &name, Lock::Password, now)?, Store::user_source(c, &name)?))).await;
    let usable = match state {
        Ok((false, None)) => true,
        Ok((false, Some((source, disabled)))) => source == "ldap" && !disabled,
        _ => false,
    };
    if !usable {
        let pw = pw.to_string();
        let _ = tokio::task::spawn_blocking(move || password::verify_dummy(&pw)).await;
        return (PasswordCheck::Wrong, found.name);
    }
    match dir.verify(&found, user, pw).await {
        Ok(du) => {
            let (now, synced) = (st.clock.now(), du.clone());
            let result = st
                .store
                .run(move |c| {
                    Store::sync_external(c, &synced.name, None, synced.email.as_deref(), "ldap", &synced.groups, now)
                })
                .await;
            let outcome = match result {
                Ok(crate::store::Synced::Yes(name)) => PasswordCheck::Right(name),
                Ok(refused) => {
                    tracing::warn!(user = %du.name, why = ?refused, "A directory user was refused its name");
                    PasswordCheck::Wrong
                }
                Err(e) => {
                    tracing::error!(error = %e, "Recording a directory user failed");
                    PasswordCheck::Wrong
                }
            };
            (outcome, found.name)
        }
        Err(Refusal::Unavailable(why)) => {
            tracing::error!(error = %why, client = %client, "The directory is unavailable; sign-in refused");
            (PasswordCheck::DirectoryDown, found.name)
        }
        Err(why) => {
            tracing::info!(user = %user, reason = %why, "Directory sign-in refused");
            (PasswordCheck::Wrong, found.name)
        }
    }
}

/// Records the outcome of one check of a password or a factor (`lock`) for the lockout,
/// auditing a lock.
pub(crate) async fn settle(st: &State, user: &str, lock: Lock, ok: bool, client: IpAddr) {
    let (name, now, policy) = (user.to_string(), st.clock.now(), st.cfg.login.lock);
    let result = st
        .store
        .run(move |c| {
            if ok {
                mfa::unlock(c, &name, lock).map(|_| None)
            } else {
                mfa::record_failure(c, policy, &name, lock, now)
            }
        })
        .await;
    match result {
        Ok(Some((failures, until))) => {
            tracing::warn!(user = %user, failures, lock = lock.as_str(), "Account locked");
            let ev = Event::AccountLocked {
                user: user.to_string(),
                lock: lock.as_str().into(),
                failures,
                until,
                client: client.to_string(),
            };
            st.audit.note(ev).await;
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "Recording a sign-in outcome failed"),
    }
}

/// Factors and the passkey list, for the security page.
async fn security_data(st: &State, user: &str) -> Option<(Factors, Vec<PasskeyLine>)> {
    let name = user.to_string();
    let (f, list) =
        st.store.run(move |c| Ok((mfa::factors(c, &name)?, crate::identity::passkey::list(c, &name)?))).await.ok()?;
    let lines = list
        .into_iter()
        .map(|p| PasskeyLine {
            id: p.id,
            name: p.name,
            created: crate::clock::format_minutes(p.created_at),
            last_used: p.last_used.map(crate::clock::format_minutes).unwrap_or_else(|| "never".into()),
        })
        .collect();
    Some((f, lines))
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
    let lead = match (mode, device.is_empty(), f.any()) {
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
        settle(st, &user, Lock::Factor, ok, client).await;
        let factor = if use_recovery { Factor::Rc } else { Factor::Otp };
        if !ok {
            let ev = Event::MfaFailed { user: user.clone(), factor: factor.amr().into(), client: client.to_string() };
            st.audit.note(ev).await;
            return fail(StatusCode::UNAUTHORIZED, "That code did not work. Try the current one.");
        }
        if use_recovery {
            let ev = Event::RecoveryCodeUsed { user: user.clone(), remaining, client: client.to_string() };
            st.audit.note(ev).await;
        }
        Proof::Factor(factor)
    };
    let Some((_, token)) = renew_session(st, s, proof, ctx).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    };
    if !device.is_empty() {
        st.signins.devices.prove(&device, s, st.clock.now());
    }
    continue_with(st, &token, &next)
}

/// Replaces the session with one that records `proof` and audits it; returns the new session
/// id and cookie value.
pub(crate) async fn renew_session(
    st: &State,
    s: &Session,
    proof: Proof,
    ctx: &crate::state::Ctx,
) -> Option<(String, String)> {
    let (id, token) = match st.sessions.renew(s, proof, &st.cfg.server.portal_host).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "Renewing a session failed");
            return None;
        }
    };
    let factor = match proof {
        Proof::Factor(f) => f.amr(),
        Proof::Password => Factor::Pwd.amr(),
    };
    let ev = Event::MfaSucceeded {
        user: s.identity.user.clone(),
        session: id.clone(),
        factor: factor.into(),
        client: ctx.client.to_string(),
    };
    if let Err(e) = st.audit.record(ev).await {
        tracing::error!(error = %e, "Audit unavailable; ending the new session");
        let _ = st.sessions.end(&id).await;
        return None;
    }
    Some((id, token.cookie_value))
}

/// A message on the security page.
enum Say<'a> {
    Nothing,
    Notice(&'a str),
    Error(&'a str),
}

#[expect(clippy::too_many_arguments, reason = "one page, every part of it")]
fn security_view(
    st: &State,
    s: &Session,
    headers: &http::HeaderMap,
    (f, passkeys): &(Factors, Vec<PasskeyLine>),
    fresh: bool,
    next: &str,
    status: StatusCode,
    say: Say<'_>,
) -> Response<Body> {
    let (notice, error) = match say {
        Say::Nothing => (None, None),
        Say::Notice(m) => (Some(m), None),
        Say::Error(m) => (None, Some(m)),
    };
    let (csrf, new) = csrf_for_page(headers);
    let next = if safe_next(next, &st.cfg) == Next::Portal { "" } else { next };
    let page = SecurityPage {
        passkeys: passkeys.clone(),
        user: &s.identity.user,
        fresh,
        csrf: &csrf,
        next,
        totp: f.totp,
        has_factor: f.any(),
        recovery_left: f.recovery_left,
        notice,
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
    let say = if !next.is_empty() && !data.0.any() {
        Say::Notice("That app needs a second factor. Set up an authenticator app to continue.")
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
    settle(st, &user, Lock::Factor, ok, ctx.client).await;
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
    let key = grouped(&totp::base32(&secret));
    let (csrf, new) = csrf_for_page(headers);
    let next = if safe_next(next, &st.cfg) == Next::Portal { "" } else { next };
    let status = if error.is_some() { StatusCode::UNAUTHORIZED } else { StatusCode::OK };
    let page = TotpEnrolPage { user: &s.identity.user, csrf: &csrf, next, qr: &qr, key: &key, error };
    with_csrf_cookie(html(status, &page), &csrf, new)
}

/// Audits a change to a user's factors, with how it was proved.
pub(crate) async fn changed(st: &State, user: &str, change: &str, proof: &str, client: IpAddr) {
    if proof == PROOF_PASSWORD_ONLY {
        tracing::warn!(user = %user, change, client = %client, "A first second factor was set up with the password alone");
    }
    let ev = Event::FactorChanged {
        user: user.to_string(),
        change: change.to_string(),
        proof: proof.to_string(),
        client: client.to_string(),
    };
    st.audit.note(ev).await;
}

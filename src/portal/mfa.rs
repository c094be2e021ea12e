//! Second factors in the portal: the step-up page, the security page where users set up and
//! remove their authenticator app and recovery codes, and the guards every factor passes:
//! a per-address rate limit and the per-account lockout, both with answers that do not tell
//! whether an account exists or is locked.

use std::net::IpAddr;

use askama::Template;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{Next, csrf_for_page, html, query_param, safe_next, signed_in_form, to_login, with_csrf_cookie};
use crate::audit::Event;
use crate::body::Body;
use crate::config::MissingFactor;
use crate::gateway::{Ctx, Gateway, error_page, redirect};
use crate::identity::mfa::{self, Factors};
use crate::identity::{password, totp, valid_name};
use crate::session::Session;
use crate::store::Store;

#[derive(Template)]
#[template(path = "mfa.html")]
struct MfaPage<'a> {
    csrf: &'a str,
    next: &'a str,
    totp: bool,
    passkey: bool,
    error: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "security.html")]
struct SecurityPage<'a> {
    user: &'a str,
    /// Signed in through single sign-on: no password to ask for.
    sso: bool,
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
pub(crate) fn attempt_allowed(gw: &Gateway, client: IpAddr) -> bool {
    let ok = gw.portal.limiter.check_key(&client).is_ok();
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
pub(crate) async fn check_password(gw: &Gateway, user: &str, pw: &str, client: IpAddr) -> bool {
    matches!(password_check(gw, user, pw, client).await, PasswordCheck::Right(_))
}

/// How long after a single sign-on factors can be changed without a password.
const SSO_FRESH_FOR: i64 = 300;

/// Whether the user of session `s` proved who they are just now, before a factor changes: with
/// their password (local or directory), or, for a single sign-on session, which has no
/// password to ask for, by having signed in at the provider within the last five minutes.
pub(crate) async fn reauthenticated(gw: &Gateway, s: &crate::session::Session, password: &str, client: IpAddr) -> bool {
    if s.single_sign_on() {
        return gw.clock.now() - s.created_at < SSO_FRESH_FOR;
    }
    check_password(gw, &s.identity.user, password, client).await
}

/// As `check_password`, telling a directory outage apart. Local accounts are checked first;
/// a name poort does not know as a local account goes to the directory, if one is configured.
pub(crate) async fn password_check(gw: &Gateway, user: &str, pw: &str, client: IpAddr) -> PasswordCheck {
    if !valid_name(user) {
        let pw = pw.to_string();
        let _ = tokio::task::spawn_blocking(move || password::verify_dummy(&pw)).await;
        return PasswordCheck::Wrong;
    }
    let now = gw.clock.now();
    let name = user.to_string();
    let (locked, hash, source) = gw
        .store
        .run(move |c| Ok((mfa::locked(c, &name, now)?, Store::password_hash(c, &name)?, Store::user_source(c, &name)?)))
        .await
        .unwrap_or((true, None, None));
    let directory_user = match &source {
        None => true,
        Some((s, disabled)) => s == "ldap" && !disabled,
    };
    let outcome = match (&gw.directory, hash) {
        (Some(dir), None) if directory_user && !locked => directory_check(gw, dir, user, pw, client).await,
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
            if ok { PasswordCheck::Right(user.to_string()) } else { PasswordCheck::Wrong }
        }
    };
    // An outage is not the user's fault: it does not count towards a lock.
    if outcome != PasswordCheck::DirectoryDown {
        settle(gw, user, matches!(outcome, PasswordCheck::Right(_)), client).await;
    }
    outcome
}

/// Checks the password in the directory and records the user as the directory sees them.
async fn directory_check(
    gw: &Gateway,
    dir: &crate::identity::ldap::Directory,
    user: &str,
    pw: &str,
    client: IpAddr,
) -> PasswordCheck {
    use crate::identity::ldap::Refusal;
    match dir.authenticate(user, pw).await {
        Ok(du) => {
            let (now, synced) = (gw.clock.now(), du.clone());
            let result = gw
                .store
                .run(move |c| {
                    Store::sync_external(c, &synced.name, synced.email.as_deref(), "ldap", &synced.groups, now)
                })
                .await;
            match result {
                Ok(true) => PasswordCheck::Right(du.name),
                Ok(false) => {
                    tracing::warn!(user = %du.name, "A directory user has the name of a local account; refused");
                    PasswordCheck::Wrong
                }
                Err(e) => {
                    tracing::error!(error = %e, "Recording a directory user failed");
                    PasswordCheck::Wrong
                }
            }
        }
        Err(Refusal::Unavailable(why)) => {
            tracing::error!(error = %why, client = %client, "The directory is unavailable; sign-in refused");
            PasswordCheck::DirectoryDown
        }
        Err(why) => {
            tracing::info!(user = %user, reason = %why, "Directory sign-in refused");
            PasswordCheck::Wrong
        }
    }
}

/// Records the outcome of one factor check for the lockout, auditing a lock.
pub(crate) async fn settle(gw: &Gateway, user: &str, ok: bool, client: IpAddr) {
    let (name, now, policy) = (user.to_string(), gw.clock.now(), gw.cfg.login.lock);
    let result = gw
        .store
        .run(move |c| if ok { mfa::unlock(c, &name).map(|_| None) } else { mfa::record_failure(c, policy, &name, now) })
        .await;
    match result {
        Ok(Some((failures, until))) => {
            tracing::warn!(user = %user, failures, "Account locked");
            let ev = Event::AccountLocked { user: user.to_string(), failures, until, client: client.to_string() };
            if let Err(e) = gw.audit.record(ev).await {
                tracing::error!(error = %e, "Audit write failed");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "Recording a sign-in outcome failed"),
    }
}

/// Factors and the passkey list, for the security page.
async fn security_data(gw: &Gateway, user: &str) -> Option<(Factors, Vec<PasskeyLine>)> {
    let name = user.to_string();
    let (f, list) =
        gw.store.run(move |c| Ok((mfa::factors(c, &name)?, crate::identity::passkey::list(c, &name)?))).await.ok()?;
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

async fn factors_of(gw: &Gateway, user: &str) -> Option<Factors> {
    let name = user.to_string();
    gw.store.run(move |c| mfa::factors(c, &name)).await.ok()
}

fn set_cookie(resp: &mut Response<Body>, token: &str) {
    if let Ok(v) = http::HeaderValue::from_str(&crate::session::cookie::set_session(token)) {
        resp.headers_mut().append(http::header::SET_COOKIE, v);
    }
}

/// Where a stepped-up session goes next, carrying its new cookie.
fn continue_with(gw: &Gateway, session_id: &str, token: &str, next: &str) -> Response<Body> {
    let mut resp = match safe_next(next, &gw.cfg) {
        Next::App { host, path } => super::handoff_redirect(gw, session_id, host, path),
        other => super::go_to(gw, other),
    };
    set_cookie(&mut resp, token);
    resp
}

/// GET /.poort/mfa: ask a signed-in user for a second factor.
pub(crate) async fn mfa_page(gw: &Gateway, ctx: &Ctx, req: &Request<Incoming>) -> Response<Body> {
    let Some(s) = &ctx.session else { return to_login(gw) };
    let next = query_param(ctx, "next").unwrap_or_default();
    if s.mfa() {
        return super::go_next(gw, s, safe_next(&next, &gw.cfg));
    }
    let Some(f) = factors_of(gw, &s.identity.user).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    };
    if !f.any() {
        return match gw.cfg.mfa.missing {
            MissingFactor::Enrol => {
                let mut location = format!("{}/.poort/security?", gw.cfg.server.external_origin);
                location.push_str(&form_urlencoded::Serializer::new(String::new()).append_pair("next", &next).finish());
                redirect(StatusCode::FOUND, &location)
            }
            MissingFactor::Refuse => error_page(StatusCode::FORBIDDEN, ctx.id),
        };
    }
    let (csrf, new) = csrf_for_page(req.headers());
    let next = if safe_next(&next, &gw.cfg) == Next::Portal { String::new() } else { next };
    with_csrf_cookie(
        html(StatusCode::OK, &MfaPage { csrf: &csrf, next: &next, totp: f.totp, passkey: f.passkeys > 0, error: None }),
        &csrf,
        new,
    )
}

/// POST /.poort/mfa: a TOTP code or a recovery code; on success the session is replaced by
/// one that records the factor.
pub(crate) async fn mfa_submit(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let (s, headers, form) = match signed_in_form(gw, &ctx, req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let next = field("next").to_string();
    let have = factors_of(gw, &s.identity.user).await.unwrap_or_default();
    let again = |status: StatusCode, error: &str| {
        let (csrf, new) = csrf_for_page(&headers);
        let page =
            MfaPage { csrf: &csrf, next: &next, totp: have.totp, passkey: have.passkeys > 0, error: Some(error) };
        with_csrf_cookie(html(status, &page), &csrf, new)
    };
    if !attempt_allowed(gw, ctx.client) {
        return again(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts from your address. Wait a minute and try again.",
        );
    }
    let (user, now, client) = (s.identity.user.clone(), gw.clock.now(), ctx.client);
    let (code, recovery) = (field("code").to_string(), field("recovery").to_string());
    let use_recovery = code.is_empty() && !recovery.is_empty();
    let sealer = gw.portal.sealer.clone();
    let name = user.clone();
    let checked = gw
        .store
        .run(move |c| {
            if mfa::locked(c, &name, now)? {
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
    settle(gw, &user, ok, client).await;
    let factor = if use_recovery { "rc" } else { "otp" };
    if !ok {
        let ev = Event::MfaFailed { user: user.clone(), factor: factor.into(), client: client.to_string() };
        if let Err(e) = gw.audit.record(ev).await {
            tracing::error!(error = %e, "Audit write failed");
        }
        return again(StatusCode::UNAUTHORIZED, "That code did not work. Try the current one.");
    }
    if use_recovery {
        let ev = Event::RecoveryCodeUsed { user: user.clone(), remaining, client: client.to_string() };
        if let Err(e) = gw.audit.record(ev).await {
            tracing::error!(error = %e, "Audit write failed");
        }
    }
    renew(gw, &s, factor, &ctx, &next).await
}

/// Replaces the session with one that records `factor` and audits it; returns the new
/// session id and cookie value.
pub(crate) async fn renew_session(gw: &Gateway, s: &Session, factor: &str, ctx: &Ctx) -> Option<(String, String)> {
    let (id, token) = match gw.sessions.step_up(s, factor, &gw.cfg.server.portal_host).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "Renewing a session failed");
            return None;
        }
    };
    let ev = Event::MfaSucceeded {
        user: s.identity.user.clone(),
        session: id.clone(),
        factor: factor.into(),
        client: ctx.client.to_string(),
    };
    if let Err(e) = gw.audit.record(ev).await {
        tracing::error!(error = %e, "Audit unavailable; ending the new session");
        let _ = gw.sessions.end(&id).await;
        return None;
    }
    Some((id, token.cookie_value))
}

/// Renews the session with `factor` and continues to `next`.
async fn renew(gw: &Gateway, s: &Session, factor: &str, ctx: &Ctx, next: &str) -> Response<Body> {
    match renew_session(gw, s, factor, ctx).await {
        Some((id, token)) => continue_with(gw, &id, &token, next),
        None => error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id),
    }
}

/// A message on the security page.
enum Say<'a> {
    Nothing,
    Notice(&'a str),
    Error(&'a str),
}

fn security_view(
    gw: &Gateway,
    s: &Session,
    headers: &http::HeaderMap,
    (f, passkeys): &(Factors, Vec<PasskeyLine>),
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
    let next = if safe_next(next, &gw.cfg) == Next::Portal { "" } else { next };
    let page = SecurityPage {
        passkeys: passkeys.clone(),
        user: &s.identity.user,
        sso: s.single_sign_on(),
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

/// GET /.poort/security
pub(crate) async fn security_page(gw: &Gateway, ctx: &Ctx, req: &Request<Incoming>) -> Response<Body> {
    let Some(s) = &ctx.session else { return to_login(gw) };
    let Some(data) = security_data(gw, &s.identity.user).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    };
    let next = query_param(ctx, "next").unwrap_or_default();
    let say = if !next.is_empty() && !data.0.any() {
        Say::Notice("That app needs a second factor. Set up an authenticator app to continue.")
    } else {
        Say::Nothing
    };
    security_view(gw, s, req.headers(), &data, &next, StatusCode::OK, say)
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

/// The security forms all post here with a `password`; `action` names what to change.
pub(crate) async fn security_change(gw: &Gateway, ctx: Ctx, req: Request<Incoming>, action: &str) -> Response<Body> {
    let (s, headers, form) = match signed_in_form(gw, &ctx, req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let next = field("next").to_string();
    let user = s.identity.user.clone();
    let Some(data) = security_data(gw, &user).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    };
    let f = &data.0;
    let fail =
        |status: StatusCode, error: &str| security_view(gw, &s, &headers, &data, &next, status, Say::Error(error));
    if !attempt_allowed(gw, ctx.client) {
        return fail(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts from your address. Wait a minute and try again.",
        );
    }

    if action == "totp/confirm" {
        let (sealer, name, now, code) =
            (gw.portal.sealer.clone(), user.clone(), gw.clock.now(), field("code").to_string());
        let ok = gw.store.run(move |c| mfa::totp_check(c, &sealer, &name, &code, now, true)).await.unwrap_or(false);
        settle(gw, &user, ok, ctx.client).await;
        if !ok {
            return totp_enrol_view(
                gw,
                &s,
                &headers,
                &next,
                Some("That code did not work. Check the app and try the current one."),
            )
            .await;
        }
        changed(gw, &user, "authenticator app set up", ctx.client).await;
        // The user just proved the factor: renew the session with it, and hand out
        // recovery codes if there are none yet.
        let Some((id, token)) = renew_session(gw, &s, "otp", &ctx).await else {
            return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
        };
        if f.recovery_left == 0 {
            let name = user.clone();
            if let Ok(codes) = gw.store.run(move |c| mfa::recovery_new(c, &name)).await {
                changed(gw, &user, "recovery codes made", ctx.client).await;
                let continue_to = match safe_next(&next, &gw.cfg) {
                    Next::Portal => "/.poort/security".to_string(),
                    _ => format!(
                        "/.poort/login?next={}",
                        form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
                    ),
                };
                let (csrf, _) = csrf_for_page(&headers);
                let mut resp = html(
                    StatusCode::OK,
                    &RecoveryPage { user: &user, csrf: &csrf, codes: &codes, continue_to: &continue_to },
                );
                set_cookie(&mut resp, &token);
                return resp;
            }
        }
        if safe_next(&next, &gw.cfg) == Next::Portal {
            let mut resp =
                redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/security", gw.cfg.server.external_origin));
            set_cookie(&mut resp, &token);
            return resp;
        }
        return continue_with(gw, &id, &token, &next);
    }

    if !reauthenticated(gw, &s, field("password"), ctx.client).await {
        let msg = if s.single_sign_on() {
            "Your sign-in is more than five minutes old. Sign out and in again, then change your factors."
        } else {
            "That password is not right."
        };
        return fail(StatusCode::UNAUTHORIZED, msg);
    }
    match action {
        "totp" => {
            let (sealer, name, now) = (gw.portal.sealer.clone(), user.clone(), gw.clock.now());
            match gw.store.run(move |c| mfa::totp_begin(c, &sealer, &name, now)).await {
                Ok(Some(_)) => totp_enrol_view(gw, &s, &headers, &next, None).await,
                Ok(None) => fail(StatusCode::CONFLICT, "An authenticator app is set up already. Remove it first."),
                Err(_) => error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id),
            }
        }
        "totp/remove" => {
            let name = user.clone();
            let _ = gw.store.run(move |c| mfa::totp_remove(c, &name)).await;
            changed(gw, &user, "authenticator app removed", ctx.client).await;
            let data = security_data(gw, &user).await.unwrap_or_default();
            security_view(
                gw,
                &s,
                &headers,
                &data,
                "",
                StatusCode::OK,
                Say::Notice("The authenticator app was removed."),
            )
        }
        "passkey/remove" => {
            let (name, id) = (user.clone(), field("id").to_string());
            let removed = gw.store.run(move |c| crate::identity::passkey::remove(c, &name, &id)).await.unwrap_or(false);
            if !removed {
                return fail(StatusCode::NOT_FOUND, "No such passkey.");
            }
            changed(gw, &user, "passkey removed", ctx.client).await;
            let data = security_data(gw, &user).await.unwrap_or_default();
            security_view(gw, &s, &headers, &data, "", StatusCode::OK, Say::Notice("The passkey was removed."))
        }
        "recovery" => {
            let name = user.clone();
            match gw.store.run(move |c| mfa::recovery_new(c, &name)).await {
                Ok(codes) => {
                    changed(gw, &user, "recovery codes made", ctx.client).await;
                    let (csrf, _) = csrf_for_page(&headers);
                    html(
                        StatusCode::OK,
                        &RecoveryPage { user: &user, csrf: &csrf, codes: &codes, continue_to: "/.poort/security" },
                    )
                }
                Err(_) => error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id),
            }
        }
        _ => error_page(StatusCode::NOT_FOUND, ctx.id),
    }
}

async fn totp_enrol_view(
    gw: &Gateway,
    s: &Session,
    headers: &http::HeaderMap,
    next: &str,
    error: Option<&str>,
) -> Response<Body> {
    let (sealer, name) = (gw.portal.sealer.clone(), s.identity.user.clone());
    let Ok(Some(secret)) = gw.store.run(move |c| mfa::totp_pending(c, &sealer, &name)).await else {
        return redirect(StatusCode::SEE_OTHER, &format!("{}/.poort/security", gw.cfg.server.external_origin));
    };
    let uri = totp::otpauth_uri(&gw.cfg.mfa.issuer, &s.identity.user, &secret);
    let qr = qr_data_uri(&uri).unwrap_or_default();
    let key = grouped(&totp::base32(&secret));
    let (csrf, new) = csrf_for_page(headers);
    let next = if safe_next(next, &gw.cfg) == Next::Portal { "" } else { next };
    let status = if error.is_some() { StatusCode::UNAUTHORIZED } else { StatusCode::OK };
    let page = TotpEnrolPage { user: &s.identity.user, csrf: &csrf, next, qr: &qr, key: &key, error };
    with_csrf_cookie(html(status, &page), &csrf, new)
}

pub(crate) async fn changed(gw: &Gateway, user: &str, change: &str, client: IpAddr) {
    let ev = Event::FactorChanged { user: user.to_string(), change: change.to_string(), client: client.to_string() };
    if let Err(e) = gw.audit.record(ev).await {
        tracing::error!(error = %e, "Audit write failed");
    }
}

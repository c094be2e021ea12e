//! WebAuthn ceremonies (with webauthn-rs): register a passkey or security key from the
//! security page, use one as the second factor, and sign in without a password with a
//! discoverable passkey that verified the user. The browser side is `assets/webauthn.js`;
//! these endpoints speak JSON, with the same Origin and double-submit CSRF checks as forms.
//!
//! Ceremony state stays in memory, keyed by a random single-use id, for two minutes.

use std::collections::HashMap;
use std::sync::Mutex;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use webauthn_rs::prelude::{
    DiscoverableAuthentication, PasskeyAuthentication, PasskeyRegistration, PublicKeyCredential,
    RegisterPublicKeyCredential, Url, Webauthn, WebauthnBuilder,
};

use super::{Next, mfa, safe_next};
use crate::audit::Event;
use crate::body::Body;
use crate::clock::UnixTime;
use crate::gateway::{Ctx, Gateway, page};
use crate::identity::{mfa as factors, passkey};
use crate::session::{self, cookie};

/// How long a started ceremony may take to finish.
const CEREMONY_SECS: i64 = 120;
/// Largest JSON body of a ceremony step.
const MAX_JSON: usize = 64 * 1024;

enum Ceremony {
    Register { session: String, user: String, name: String, next: String, state: PasskeyRegistration },
    Factor { session: String, user: String, next: String, state: PasskeyAuthentication },
    Passwordless { next: String, state: DiscoverableAuthentication },
}

/// The relying party and the ceremonies in flight.
pub struct Passkeys {
    webauthn: Webauthn,
    ceremonies: Mutex<HashMap<String, (UnixTime, Ceremony)>>,
}

impl std::fmt::Debug for Passkeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passkeys")
    }
}

impl Passkeys {
    /// The relying party is the portal: its host is the RP id and its origin the only origin.
    pub fn new(external_origin: &str, portal_host: &str) -> anyhow::Result<Passkeys> {
        let origin = Url::parse(external_origin)?;
        let webauthn = WebauthnBuilder::new(portal_host, &origin)?.rp_name("poort").build()?;
        Ok(Passkeys { webauthn, ceremonies: Mutex::new(HashMap::new()) })
    }

    fn put(&self, now: UnixTime, c: Ceremony) -> String {
        let id = cookie::encode_token(&session::random_bytes());
        if let Ok(mut m) = self.ceremonies.lock() {
            m.retain(|_, (t, _)| now - *t < CEREMONY_SECS);
            m.insert(id.clone(), (now, c));
        }
        id
    }

    fn take(&self, id: &str, now: UnixTime) -> Option<Ceremony> {
        let (t, c) = self.ceremonies.lock().ok()?.remove(id)?;
        (now - t < CEREMONY_SECS).then_some(c)
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    page(status, "application/json", Body::from(v.to_string()))
}

fn refuse(status: StatusCode, why: &str) -> Response<Body> {
    json(status, serde_json::json!({ "error": why }))
}

/// Reads a JSON body sent by webauthn.js: Origin and CSRF header checked, size bounded.
async fn read_json<T: for<'de> Deserialize<'de>>(
    gw: &Gateway,
    req: Request<Incoming>,
) -> Result<(HeaderMap, T), Response<Body>> {
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    let origin_ok = h.get(header::ORIGIN).is_some_and(|o| o.as_bytes() == gw.cfg.server.external_origin.as_bytes());
    let cookies = h.get_all(header::COOKIE).iter().map(|v| v.as_bytes());
    let csrf = cookie::find(cookies, cookie::CSRF_COOKIE).filter(|v| cookie::decode_token(v).is_some());
    let sent = h.get("x-poort-csrf").map(|v| v.as_bytes()).unwrap_or(b"");
    let csrf_ok = csrf.is_some_and(|c| bool::from(c.as_bytes().ct_eq(sent)));
    let json_ok = h.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(origin_ok && csrf_ok && json_ok) {
        return Err(refuse(StatusCode::FORBIDDEN, "the request did not come from a poort page"));
    }
    let bytes = Limited::new(body, MAX_JSON)
        .collect()
        .await
        .map_err(|_| refuse(StatusCode::PAYLOAD_TOO_LARGE, "too large"))?
        .to_bytes();
    let v = serde_json::from_slice(&bytes).map_err(|_| refuse(StatusCode::BAD_REQUEST, "malformed request"))?;
    Ok((parts.headers, v))
}

/// Where the browser goes after a ceremony that made a session.
fn landing_url(gw: &Gateway, session_id: &str, next: &str, fallback: &str) -> String {
    let origin = &gw.cfg.server.external_origin;
    match safe_next(next, &gw.cfg) {
        Next::Relative(p) => format!("{origin}{p}"),
        Next::App { host, path } => super::handoff_redirect(gw, session_id, host, path)
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| format!("{origin}/")),
        Next::Portal => format!("{origin}{fallback}"),
    }
}

/// The JSON answer to a ceremony that made a session, carrying its cookie.
fn landed(token: &str, v: serde_json::Value) -> Response<Body> {
    let mut resp = json(StatusCode::OK, v);
    if let Ok(h) = HeaderValue::from_str(&cookie::set_session(token)) {
        resp.headers_mut().append(header::SET_COOKIE, h);
    }
    resp
}

#[derive(Deserialize)]
struct RegisterStart {
    password: String,
    name: String,
    #[serde(default)]
    next: String,
}

/// POST /.poort/security/passkey/start: re-authenticate, then offer a registration.
pub(crate) async fn register_start(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let Some(s) = ctx.session.clone() else { return refuse(StatusCode::UNAUTHORIZED, "sign in first") };
    let (_, body): (_, RegisterStart) = match read_json(gw, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let name = body.name.trim().chars().filter(|c| !c.is_control()).take(64).collect::<String>();
    if name.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "give the passkey a name");
    }
    if !mfa::attempt_allowed(gw, ctx.client) {
        return refuse(StatusCode::TOO_MANY_REQUESTS, "too many attempts; wait a minute");
    }
    if !mfa::reauthenticated(gw, &s, &body.password, ctx.client).await {
        return refuse(StatusCode::UNAUTHORIZED, "that password is not right, or a single sign-on is too old");
    }
    let user = s.identity.user.clone();
    let existing = {
        let u = user.clone();
        gw.store.run(move |c| Ok((passkey::handle(c, &u)?, passkey::list(c, &u)?))).await
    };
    let Ok((handle, existing)) = existing else { return refuse(StatusCode::SERVICE_UNAVAILABLE, "try again later") };
    let exclude = existing.iter().map(|p| p.passkey.cred_id().clone()).collect();
    let pk = &gw.portal.passkeys;
    match pk.webauthn.start_passkey_registration(handle, &user, &user, Some(exclude)) {
        Ok((options, state)) => {
            let c = Ceremony::Register { session: s.id.clone(), user, name, next: body.next, state };
            let id = pk.put(gw.clock.now(), c);
            // webauthn-rs asks authenticators not to store the credential ("discouraged"); ask
            // them to, where they can, so that it also serves passwordless sign-in. Keys
            // without storage still register and work as a second factor.
            let mut options = serde_json::to_value(&options).unwrap_or_default();
            if let Some(sel) = options.pointer_mut("/publicKey/authenticatorSelection").and_then(|v| v.as_object_mut())
            {
                sel.insert("residentKey".into(), "preferred".into());
            }
            json(StatusCode::OK, serde_json::json!({ "ceremony": id, "options": options }))
        }
        Err(e) => {
            tracing::error!(error = %e, "Starting a passkey registration failed");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "could not start")
        }
    }
}

#[derive(Deserialize)]
struct RegisterFinish {
    ceremony: String,
    credential: RegisterPublicKeyCredential,
}

/// POST /.poort/security/passkey/finish: verify and store the new credential. The session is
/// renewed with the factor it just proved.
pub(crate) async fn register_finish(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let Some(s) = ctx.session.clone() else { return refuse(StatusCode::UNAUTHORIZED, "sign in first") };
    let (_, body): (_, RegisterFinish) = match read_json(gw, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let now = gw.clock.now();
    let Some(Ceremony::Register { session, user, name, next, state }) = gw.portal.passkeys.take(&body.ceremony, now)
    else {
        return refuse(StatusCode::BAD_REQUEST, "that registration expired; start again");
    };
    if session != s.id {
        return refuse(StatusCode::BAD_REQUEST, "that registration belongs to another session");
    }
    let pk = match gw.portal.passkeys.webauthn.finish_passkey_registration(&body.credential, &state) {
        Ok(pk) => pk,
        Err(e) => {
            tracing::info!(user = %user, error = %e, "Passkey registration refused");
            return refuse(StatusCode::BAD_REQUEST, "the passkey could not be verified");
        }
    };
    let (u, n) = (user.clone(), name.clone());
    let added = gw
        .store
        .run(move |c| {
            passkey::add(c, &u, &n, &pk, now)?;
            let f = factors::factors(c, &u)?;
            if f.recovery_left == 0 { factors::recovery_new(c, &u).map(Some) } else { Ok(None) }
        })
        .await;
    let Ok(codes) = added else { return refuse(StatusCode::CONFLICT, "that passkey is registered already") };
    mfa::changed(gw, &user, &format!("passkey added: {name}"), ctx.client).await;
    if codes.is_some() {
        mfa::changed(gw, &user, "recovery codes made", ctx.client).await;
    }
    let Some((id, token)) = mfa::renew_session(gw, &s, "hwk", &ctx).await else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "try again later");
    };
    // Recovery codes made now are shown once by the script, as after setting up an
    // authenticator app.
    let redirect = landing_url(gw, &id, &next, "/.poort/security");
    landed(&token, serde_json::json!({ "redirect": redirect, "recovery_codes": codes }))
}

#[derive(Deserialize)]
struct Start {
    #[serde(default)]
    next: String,
}

/// POST /.poort/mfa/passkey/start: a second-factor challenge for the user's credentials.
pub(crate) async fn factor_start(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let Some(s) = ctx.session.clone() else { return refuse(StatusCode::UNAUTHORIZED, "sign in first") };
    let (_, body): (_, Start) = match read_json(gw, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let u = s.identity.user.clone();
    let Ok(creds) = gw.store.run(move |c| passkey::list(c, &u)).await else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "try again later");
    };
    let creds: Vec<_> = creds.into_iter().map(|p| p.passkey).collect();
    if creds.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "no passkey is registered");
    }
    match gw.portal.passkeys.webauthn.start_passkey_authentication(&creds) {
        Ok((options, state)) => {
            let c = Ceremony::Factor { session: s.id.clone(), user: s.identity.user.clone(), next: body.next, state };
            let id = gw.portal.passkeys.put(gw.clock.now(), c);
            json(StatusCode::OK, serde_json::json!({ "ceremony": id, "options": options }))
        }
        Err(_) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "could not start"),
    }
}

#[derive(Deserialize)]
struct Finish {
    ceremony: String,
    credential: PublicKeyCredential,
}

/// Verifies an assertion against one stored credential; saves its counter on success.
async fn verify_and_touch(
    gw: &Gateway,
    user: &str,
    result: Result<webauthn_rs::prelude::AuthenticationResult, String>,
) -> bool {
    let Ok(res) = result else { return false };
    if !res.user_verified() {
        return false;
    }
    let (u, now) = (user.to_string(), gw.clock.now());
    let cred = cookie::encode_b64(res.cred_id().as_ref());
    gw.store
        .run(move |c| {
            for mut p in passkey::list(c, &u)? {
                if p.id == cred {
                    p.passkey.update_credential(&res);
                    passkey::touch(c, &p.id, &p.passkey, now)?;
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await
        .unwrap_or(false)
}

/// POST /.poort/mfa/passkey/finish
pub(crate) async fn factor_finish(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let Some(s) = ctx.session.clone() else { return refuse(StatusCode::UNAUTHORIZED, "sign in first") };
    let (_, body): (_, Finish) = match read_json(gw, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !mfa::attempt_allowed(gw, ctx.client) {
        return refuse(StatusCode::TOO_MANY_REQUESTS, "too many attempts; wait a minute");
    }
    let now = gw.clock.now();
    let Some(Ceremony::Factor { session, user, next, state }) = gw.portal.passkeys.take(&body.ceremony, now) else {
        return refuse(StatusCode::BAD_REQUEST, "that sign-in expired; start again");
    };
    if session != s.id {
        return refuse(StatusCode::BAD_REQUEST, "that sign-in belongs to another session");
    }
    let (u, n) = (user.clone(), now);
    let locked = gw.store.run(move |c| factors::locked(c, &u, n)).await.unwrap_or(true);
    let result =
        gw.portal.passkeys.webauthn.finish_passkey_authentication(&body.credential, &state).map_err(|e| e.to_string());
    let ok = !locked && verify_and_touch(gw, &user, result).await;
    mfa::settle(gw, &user, ok, ctx.client).await;
    if !ok {
        let ev = Event::MfaFailed { user: user.clone(), factor: "hwk".into(), client: ctx.client.to_string() };
        if let Err(e) = gw.audit.record(ev).await {
            tracing::error!(error = %e, "Audit write failed");
        }
        return refuse(StatusCode::UNAUTHORIZED, "the passkey was not accepted");
    }
    match mfa::renew_session(gw, &s, "hwk", &ctx).await {
        Some((id, token)) => landed(&token, serde_json::json!({ "redirect": landing_url(gw, &id, &next, "/") })),
        None => refuse(StatusCode::SERVICE_UNAVAILABLE, "try again later"),
    }
}

/// POST /.poort/login/passkey/start: a challenge for any discoverable credential.
pub(crate) async fn passwordless_start(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let (_, body): (_, Start) = match read_json(gw, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !mfa::attempt_allowed(gw, ctx.client) {
        return refuse(StatusCode::TOO_MANY_REQUESTS, "too many attempts; wait a minute");
    }
    match gw.portal.passkeys.webauthn.start_discoverable_authentication() {
        Ok((options, state)) => {
            let id = gw.portal.passkeys.put(gw.clock.now(), Ceremony::Passwordless { next: body.next, state });
            json(StatusCode::OK, serde_json::json!({ "ceremony": id, "options": options }))
        }
        Err(_) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "could not start"),
    }
}

/// POST /.poort/login/passkey/finish: the credential names its user (by handle); the
/// assertion must verify against that user's stored credential and must have verified the
/// user (PIN or biometric), which is what makes it count as two factors.
pub(crate) async fn passwordless_finish(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let (headers, body): (_, Finish) = match read_json(gw, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let now = gw.clock.now();
    let Some(Ceremony::Passwordless { next, state }) = gw.portal.passkeys.take(&body.ceremony, now) else {
        return refuse(StatusCode::BAD_REQUEST, "that sign-in expired; start again");
    };
    let wa = &gw.portal.passkeys.webauthn;
    let Ok((handle, cred_id)) = wa.identify_discoverable_authentication(&body.credential) else {
        return refuse(StatusCode::UNAUTHORIZED, "the passkey was not accepted");
    };
    let cred = cookie::encode_b64(cred_id);
    let found = gw
        .store
        .run(move |c| {
            let Some(user) = passkey::user_by_handle(c, &handle)? else { return Ok(None) };
            let locked = factors::locked(c, &user, now)?;
            let stored = passkey::list(c, &user)?.into_iter().find(|p| p.id == cred);
            Ok(stored.map(|p| (user, locked, p)))
        })
        .await
        .ok()
        .flatten();
    let Some((user, locked, stored)) = found else {
        return refuse(StatusCode::UNAUTHORIZED, "the passkey was not accepted");
    };
    if gw.mitigation.lockdown() && !super::lockdown_admin(gw, &user).await {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the gateway is closed for maintenance");
    }
    let result =
        wa.finish_discoverable_authentication_v2(&body.credential, state, &stored.passkey).map_err(|e| e.to_string());
    let ok = !locked && verify_and_touch(gw, &user, result).await;
    mfa::settle(gw, &user, ok, ctx.client).await;
    if !ok {
        let ev = Event::LoginFailed { user: user.clone(), client: ctx.client.to_string() };
        if let Err(e) = gw.audit.record(ev).await {
            tracing::error!(error = %e, "Audit write failed");
        }
        return refuse(StatusCode::UNAUTHORIZED, "the passkey was not accepted");
    }
    if let Some(old) = &ctx.session {
        let _ = gw.sessions.end(&old.id).await;
    }
    let ua = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let host = gw.cfg.server.portal_host.clone();
    let Ok((id, token)) = gw.sessions.create_with(&user, &host, ctx.client.to_string(), ua, "hwk mfa").await else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "try again later");
    };
    let ev = Event::LoginSucceeded { user: user.clone(), session: id.clone(), client: ctx.client.to_string() };
    if gw.audit.record(ev).await.is_err() {
        let _ = gw.sessions.end(&id).await;
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "try again later");
    }
    tracing::info!(user = %user, session = %id, "Passwordless login succeeded");
    landed(&token.cookie_value, serde_json::json!({ "redirect": landing_url(gw, &id, &next, "/") }))
}

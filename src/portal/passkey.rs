//! WebAuthn ceremonies (with webauthn-rs): register a passkey or security key from the
//! security page, use one as the second factor (to step up, or to confirm a change or a
//! command-line sign-in), and sign in without a password with a discoverable passkey that
//! verified the user. The browser side is `assets/webauthn.js`; these endpoints speak JSON,
//! and `routes` checks their Origin and CSRF header and who may call them.
//!
//! Ceremony state stays in memory, keyed by a random single-use id, for two minutes.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde::Deserialize;
use webauthn_rs::prelude::{PublicKeyCredential, RegisterPublicKeyCredential};

use super::{Call, mfa, safe_next, signin};
use crate::audit::Event;
use crate::body::Body;
use crate::identity::{mfa as factors, passkey};
use crate::respond::{json, json_error};
use crate::session::{Factor, Factors, Proof, cookie};
use crate::state::State;
use crate::state::pending::Ceremony;

/// The JSON body the dispatcher read, as `T`; None if it is not one (answer `malformed()`).
fn body<T: for<'de> Deserialize<'de>>(call: &Call) -> Option<T> {
    serde_json::from_slice(&call.json).ok()
}

fn malformed() -> Response<Body> {
    json_error(StatusCode::BAD_REQUEST, "malformed request")
}

/// Where the browser goes after a ceremony that made a session.
fn landing_url(st: &State, next: &str, fallback: &str) -> String {
    match safe_next(next, &st.cfg) {
        super::Next::Portal => format!("{}{fallback}", st.cfg.server.external_origin),
        other => super::next_url(st, other),
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

#[derive(askama::Template)]
#[template(path = "passkey_register.html")]
struct RegisterPage<'a> {
    user: &'a str,
    csrf: &'a str,
    next: &'a str,
    name: &'a str,
    ceremony: &'a str,
    /// The creation options, as JSON.
    options: &'a str,
}

/// POST /.poort/security/passkey/start (a fresh session, the person's own form post): a
/// page with a registration to create. A script cannot start one: it gets no such page.
pub(crate) async fn register_start(st: &State, call: Call) -> Response<Body> {
    let s = call.session().clone();
    let next = call.field("next").to_string();
    let name = call.field("name").trim().chars().filter(|c| !c.is_control()).take(64).collect::<String>();
    if name.is_empty() {
        return crate::respond::error_page(StatusCode::BAD_REQUEST, call.ctx.id);
    }
    let user = s.identity.user.clone();
    let existing = {
        let u = user.clone();
        st.store.run(move |c| Ok((passkey::handle(c, &u)?, passkey::list(c, &u)?))).await
    };
    let Ok((handle, existing)) = existing else {
        return crate::respond::error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id);
    };
    let exclude = existing.iter().map(|p| p.passkey.cred_id().clone()).collect();
    let pk = &st.signins.passkeys;
    match pk.webauthn.start_passkey_registration(handle, &user, &user, Some(exclude)) {
        Ok((options, state)) => {
            let c = Ceremony::Register {
                session: s.id.clone(),
                user: user.clone(),
                name: name.clone(),
                next: next.clone(),
                state,
            };
            let Some(id) = keep_ceremony(st, c).await else {
                return crate::respond::error_page(StatusCode::SERVICE_UNAVAILABLE, call.ctx.id);
            };
            // webauthn-rs asks authenticators not to store the credential ("discouraged"); ask
            // them to, where they can, so that it also serves passwordless sign-in. Keys
            // without storage still register and work as a second factor.
            let mut options = serde_json::to_value(&options).unwrap_or_default();
            if let Some(sel) = options.pointer_mut("/publicKey/authenticatorSelection").and_then(|v| v.as_object_mut())
            {
                sel.insert("residentKey".into(), "preferred".into());
            }
            let (csrf, new) = super::csrf_for_page(call.headers());
            let next = if safe_next(&next, &st.cfg) == super::Next::Portal { "" } else { next.as_str() };
            let options = options.to_string();
            let page = RegisterPage { user: &user, csrf: &csrf, next, name: &name, ceremony: &id, options: &options };
            super::with_csrf_cookie(super::html(StatusCode::OK, &page), &csrf, new)
        }
        Err(e) => {
            tracing::error!(error = %e, "Starting a passkey registration failed");
            crate::respond::error_page(StatusCode::INTERNAL_SERVER_ERROR, call.ctx.id)
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
pub(crate) async fn register_finish(st: &State, call: Call) -> Response<Body> {
    let (ctx, s) = (&call.ctx, call.session().clone());
    let Some(body) = body::<RegisterFinish>(&call) else { return malformed() };
    let now = st.clock.now();
    let Some(Ceremony::Register { session, user, name, next, state }) = take_ceremony(st, &body.ceremony, now).await
    else {
        return json_error(StatusCode::BAD_REQUEST, "that registration expired; start again");
    };
    if session != s.id {
        return json_error(StatusCode::BAD_REQUEST, "that registration belongs to another session");
    }
    let pk = match st.signins.passkeys.webauthn.finish_passkey_registration(&body.credential, &state) {
        Ok(pk) => pk,
        Err(e) => {
            tracing::info!(user = %user, error = %e, "Passkey registration refused");
            return json_error(StatusCode::BAD_REQUEST, "the passkey could not be verified");
        }
    };
    let proof = mfa::proof_of(st, &user).await;
    let (u, n) = (user.clone(), name.clone());
    let added = st
        .store
        .run(move |c| {
            passkey::add(c, &u, &n, &pk, now)?;
            let f = factors::factors(c, &u)?;
            if f.recovery_left == 0 { factors::recovery_new(c, &u).map(Some) } else { Ok(None) }
        })
        .await;
    let Ok(codes) = added else { return json_error(StatusCode::CONFLICT, "that passkey is registered already") };
    mfa::changed(st, &user, &format!("passkey added: {name}"), proof, ctx.client).await;
    if codes.is_some() {
        mfa::changed(st, &user, "recovery codes made", factors::PROOF_SECOND_FACTOR, ctx.client).await;
    }
    let Some((_, token)) = signin::renew_session(st, &s, Proof::Factor(Factor::Hwk), ctx).await else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "try again later");
    };
    // Recovery codes made now are shown once by the script, as after setting up an
    // authenticator app.
    let redirect = landing_url(st, &next, "/.poort/security");
    landed(&token, serde_json::json!({ "redirect": redirect, "recovery_codes": codes }))
}

#[derive(Deserialize)]
struct Start {
    #[serde(default)]
    next: String,
    /// The command-line code a confirmation is for.
    #[serde(default)]
    device: String,
}

/// POST /.poort/mfa/passkey/start: a second-factor challenge for the user's credentials.
pub(crate) async fn factor_start(st: &State, call: Call) -> Response<Body> {
    let s = call.session().clone();
    let Some(body) = body::<Start>(&call) else { return malformed() };
    let u = s.identity.user.clone();
    let Ok(creds) = st.store.run(move |c| passkey::list(c, &u)).await else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "try again later");
    };
    let creds: Vec<_> = creds.into_iter().map(|p| p.passkey).collect();
    if creds.is_empty() {
        return json_error(StatusCode::BAD_REQUEST, "no passkey is registered");
    }
    match st.signins.passkeys.webauthn.start_passkey_authentication(&creds) {
        Ok((options, state)) => {
            let device = super::device::normal_code(&body.device);
            let c = Ceremony::Factor {
                session: s.id.clone(),
                user: s.identity.user.clone(),
                next: body.next,
                device,
                state,
            };
            let Some(id) = keep_ceremony(st, c).await else {
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "could not start");
            };
            json(StatusCode::OK, serde_json::json!({ "ceremony": id, "options": options }))
        }
        Err(_) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "could not start"),
    }
}

#[derive(Deserialize)]
struct Finish {
    ceremony: String,
    credential: PublicKeyCredential,
}

/// Verifies an assertion against one stored credential; saves its counter on success.
async fn verify_and_touch(
    st: &State,
    user: &str,
    result: Result<webauthn_rs::prelude::AuthenticationResult, String>,
) -> bool {
    let Ok(res) = result else { return false };
    if !res.user_verified() {
        return false;
    }
    let (u, now) = (user.to_string(), st.clock.now());
    let cred = crate::secret::b64(res.cred_id().as_ref());
    st.store
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
pub(crate) async fn factor_finish(st: &State, call: Call) -> Response<Body> {
    let (ctx, s) = (&call.ctx, call.session().clone());
    let Some(body) = body::<Finish>(&call) else { return malformed() };
    let now = st.clock.now();
    let Some(Ceremony::Factor { session, user, next, device, state }) = take_ceremony(st, &body.ceremony, now).await
    else {
        return json_error(StatusCode::BAD_REQUEST, "that sign-in expired; start again");
    };
    if session != s.id {
        return json_error(StatusCode::BAD_REQUEST, "that sign-in belongs to another session");
    }
    let (u, n) = (user.clone(), now);
    let locked = st.store.run(move |c| factors::locked(c, &u, factors::Lock::Factor, n)).await.unwrap_or(true);
    let result =
        st.signins.passkeys.webauthn.finish_passkey_authentication(&body.credential, &state).map_err(|e| e.to_string());
    let ok = !locked && verify_and_touch(st, &user, result).await;
    let ok = signin::settle(st, &user, factors::Lock::Factor, ok, ctx.client).await;
    if !ok {
        let ev = Event::MfaFailed { user: user.clone(), factor: "hwk".into(), client: ctx.client };
        st.audit.note(ev).await;
        return json_error(StatusCode::UNAUTHORIZED, "the passkey was not accepted");
    }
    match signin::renew_session(st, &s, Proof::Factor(Factor::Hwk), ctx).await {
        Some((_, token)) => {
            if !device.is_empty() {
                super::device::prove(st, &device, &s).await;
            }
            landed(&token, serde_json::json!({ "redirect": landing_url(st, &next, "/") }))
        }
        None => json_error(StatusCode::SERVICE_UNAVAILABLE, "try again later"),
    }
}

/// POST /.poort/login/passkey/start: a challenge for any discoverable credential.
pub(crate) async fn passwordless_start(st: &State, call: Call) -> Response<Body> {
    let Some(body) = body::<Start>(&call) else { return malformed() };
    match st.signins.passkeys.webauthn.start_discoverable_authentication() {
        Ok((options, state)) => {
            let Some(id) = keep_ceremony(st, Ceremony::Passwordless { next: body.next, state }).await else {
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "could not start");
            };
            json(StatusCode::OK, serde_json::json!({ "ceremony": id, "options": options }))
        }
        Err(_) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "could not start"),
    }
}

/// POST /.poort/login/passkey/finish: the credential names its user (by handle); the
/// assertion must verify against that user's stored credential and must have verified the
/// user (PIN or biometric), which is what makes it count as two factors.
pub(crate) async fn passwordless_finish(st: &State, call: Call) -> Response<Body> {
    let (ctx, headers) = (&call.ctx, call.headers());
    let Some(body) = body::<Finish>(&call) else { return malformed() };
    let now = st.clock.now();
    let Some(Ceremony::Passwordless { next, state }) = take_ceremony(st, &body.ceremony, now).await else {
        return json_error(StatusCode::BAD_REQUEST, "that sign-in expired; start again");
    };
    let wa = &st.signins.passkeys.webauthn;
    let Ok((handle, cred_id)) = wa.identify_discoverable_authentication(&body.credential) else {
        return json_error(StatusCode::UNAUTHORIZED, "the passkey was not accepted");
    };
    let cred = crate::secret::b64(cred_id);
    let found = st
        .store
        .run(move |c| {
            let Some(user) = passkey::user_by_handle(c, &handle)? else { return Ok(None) };
            let locked = factors::locked(c, &user, factors::Lock::Factor, now)?;
            let stored = passkey::list(c, &user)?.into_iter().find(|p| p.id == cred);
            Ok(stored.map(|p| (user, locked, p)))
        })
        .await
        .ok()
        .flatten();
    let Some((user, locked, stored)) = found else {
        return json_error(StatusCode::UNAUTHORIZED, "the passkey was not accepted");
    };
    if st.mitigation.lockdown() && !super::lockdown_admin(st, &user).await {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "the gateway is closed for maintenance");
    }
    let result =
        wa.finish_discoverable_authentication_v2(&body.credential, state, &stored.passkey).map_err(|e| e.to_string());
    let ok = !locked && verify_and_touch(st, &user, result).await;
    let ok = signin::settle(st, &user, factors::Lock::Factor, ok, ctx.client).await;
    if !ok {
        let ev = Event::LoginFailed { user: user.clone(), client: ctx.client };
        st.audit.note(ev).await;
        return json_error(StatusCode::UNAUTHORIZED, "the passkey was not accepted");
    }
    let ua = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let signed_in = signin::SignedIn {
        user: &user,
        factors: Factors::of(&[Factor::Hwk, Factor::Mfa]),
        user_agent: ua,
        next: &next,
        logout_url: None,
    };
    let Some((id, token)) = signin::start_session(st, ctx, &signed_in).await else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "try again later");
    };
    tracing::info!(user = %user, session = %id, "Passwordless login succeeded");
    landed(&token.cookie_value, serde_json::json!({ "redirect": landing_url(st, &next, "/") }))
}

/// Keeps a started ceremony in the store (any node may finish it); None if the store did not
/// answer.
async fn keep_ceremony(st: &State, c: Ceremony) -> Option<String> {
    let now = st.clock.now();
    match st.store.run(move |conn| crate::state::pending::put_ceremony(conn, now, &c)).await {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::error!(error = %e, "Keeping a passkey ceremony failed");
            None
        }
    }
}

/// Takes a ceremony out of the store: it finishes once, on whichever node.
async fn take_ceremony(st: &State, id: &str, now: crate::clock::UnixTime) -> Option<Ceremony> {
    let id = id.to_string();
    st.store.run(move |conn| crate::state::pending::take_ceremony(conn, &id, now)).await.ok().flatten()
}

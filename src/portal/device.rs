//! Command-line sign-in in the manner of RFC 8628 (device authorization grant): `poort
//! login` asks for a code pair, shows the short user code and a URL, and polls; the person
//! opens the URL in a browser where they are (or become) signed in, with a second factor when
//! they have one, and approves. The command line then gets a session of its own, listed and
//! revocable like any other.

use std::collections::HashMap;
use std::sync::Mutex;

use askama::Template;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use super::{csrf_for_page, html, query_param, signed_in_form, with_csrf_cookie};
use crate::audit::Event;
use crate::body::Body;
use crate::clock::{UnixTime, format_minutes};
use crate::gateway::{Ctx, Gateway, error_page, page, redirect};
use crate::session::{self, cookie};

/// How long a code pair is good for.
const LIFETIME: i64 = 600;
/// Seconds the command line waits between polls.
const INTERVAL: i64 = 2;
/// Consonants only: no words, no look-alikes (RFC 8628 §6.1).
const USER_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";

enum State {
    Pending,
    Approved { token: String, user: String, expires_at: UnixTime },
    Denied,
}

struct Pending {
    device_code: String,
    requester: String,
    created: UnixTime,
    state: State,
}

/// Code pairs in flight, by user code.
#[derive(Default)]
pub struct Devices(Mutex<HashMap<String, Pending>>);

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Devices")
    }
}

#[derive(Template)]
#[template(path = "device.html")]
struct DevicePage<'a> {
    user: &'a str,
    csrf: &'a str,
    code: Option<&'a str>,
    requester: &'a str,
    asked: &'a str,
    done: Option<&'a str>,
    error: Option<&'a str>,
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    page(status, "application/json", Body::from(v.to_string()))
}

/// The command line marks its requests; a browser cannot add this header cross-site
/// without a preflight poort never answers.
fn from_cli(req: &Request<Incoming>) -> bool {
    req.headers().get("x-poort-client").is_some_and(|v| v.as_bytes() == b"cli")
}

fn normal_code(raw: &str) -> String {
    let c: String = raw.chars().filter(|c| c.is_ascii_alphabetic()).map(|c| c.to_ascii_uppercase()).collect();
    if c.len() == 8 { format!("{}-{}", &c[..4], &c[4..]) } else { String::new() }
}

/// POST /.poort/device/code
pub(crate) async fn code(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    if !from_cli(&req) {
        return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "invalid_request" }));
    }
    if !super::mfa::attempt_allowed(gw, ctx.client) {
        return json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({ "error": "slow_down" }));
    }
    let now = gw.clock.now();
    let device_code = cookie::encode_token(&session::random_bytes());
    let raw: [u8; 8] = session::random_bytes();
    let letters: String = raw.iter().map(|b| USER_ALPHABET[(*b as usize) % 20] as char).collect();
    let user_code = format!("{}-{}", &letters[..4], &letters[4..]);
    if let Ok(mut m) = gw.portal.devices.0.lock() {
        m.retain(|_, p| now - p.created < LIFETIME);
        if m.len() > 10_000 {
            return json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": "slow_down" }));
        }
        let pending = Pending {
            device_code: device_code.clone(),
            requester: ctx.client.to_string(),
            created: now,
            state: State::Pending,
        };
        m.insert(user_code.clone(), pending);
    }
    let uri = format!("{}/.poort/device", gw.cfg.server.external_origin);
    json(
        StatusCode::OK,
        serde_json::json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": uri,
            "verification_uri_complete": format!("{uri}?code={user_code}"),
            "expires_in": LIFETIME,
            "interval": INTERVAL,
        }),
    )
}

#[derive(Deserialize)]
struct TokenRequest {
    device_code: String,
}

/// POST /.poort/device/token: pending, refused, expired, or the new session's token (once).
pub(crate) async fn token(gw: &Gateway, req: Request<Incoming>) -> Response<Body> {
    if !from_cli(&req) {
        return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "invalid_request" }));
    }
    let body = Limited::new(req.into_body(), 4096).collect().await.map(|b| b.to_bytes());
    let Some(t) = body.ok().and_then(|b| serde_json::from_slice::<TokenRequest>(&b).ok()) else {
        return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "invalid_request" }));
    };
    let now = gw.clock.now();
    let Ok(mut m) = gw.portal.devices.0.lock() else {
        return json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": "slow_down" }));
    };
    let found = m.iter().find(|(_, p)| {
        use subtle::ConstantTimeEq;
        bool::from(p.device_code.as_bytes().ct_eq(t.device_code.as_bytes()))
    });
    let Some((user_code, p)) = found.map(|(k, p)| (k.clone(), p)) else {
        return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "expired_token" }));
    };
    if now - p.created >= LIFETIME {
        m.remove(&user_code);
        return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "expired_token" }));
    }
    match &p.state {
        State::Pending => json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "authorization_pending" })),
        State::Denied => {
            m.remove(&user_code);
            json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "access_denied" }))
        }
        State::Approved { .. } => {
            let Some(Pending { state: State::Approved { token, user, expires_at }, .. }) = m.remove(&user_code) else {
                return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "expired_token" }));
            };
            json(StatusCode::OK, serde_json::json!({ "token": token, "user": user, "expires_at": expires_at }))
        }
    }
}

/// GET /.poort/device[?code=...]: the approval page (after sign-in and, where the user has
/// one, a second factor).
pub(crate) async fn approve_page(gw: &Gateway, ctx: &Ctx, req: &Request<Incoming>) -> Response<Body> {
    let code = query_param(ctx, "code").map(|c| normal_code(&c)).unwrap_or_default();
    let here = if code.is_empty() { "/.poort/device".to_string() } else { format!("/.poort/device?code={code}") };
    let q = form_urlencoded::Serializer::new(String::new()).append_pair("next", &here).finish();
    let Some(s) = &ctx.session else {
        return redirect(StatusCode::FOUND, &format!("{}/.poort/login?{q}", gw.cfg.server.external_origin));
    };
    if !s.mfa() {
        let name = s.identity.user.clone();
        let has_factor = gw.store.run(move |c| crate::identity::mfa::factors(c, &name)).await.is_ok_and(|f| f.any());
        if has_factor {
            return redirect(StatusCode::FOUND, &format!("{}/.poort/mfa?{q}", gw.cfg.server.external_origin));
        }
    }
    let (csrf, new) = csrf_for_page(req.headers());
    let found = gw.portal.devices.0.lock().ok().and_then(|m| {
        m.get(&code).filter(|p| matches!(p.state, State::Pending)).map(|p| (p.requester.clone(), p.created))
    });
    let (requester, asked) = found.clone().map(|(r, t)| (r, format_minutes(t))).unwrap_or_default();
    let error =
        (!code.is_empty() && found.is_none()).then_some("That code is unknown or expired. Run poort login again.");
    let page = DevicePage {
        user: &s.identity.user,
        csrf: &csrf,
        code: found.as_ref().map(|_| code.as_str()),
        requester: &requester,
        asked: &asked,
        done: None,
        error,
    };
    with_csrf_cookie(html(StatusCode::OK, &page), &csrf, new)
}

/// POST /.poort/device: approve or refuse a code.
pub(crate) async fn decide(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    let (s, headers, form) = match signed_in_form(gw, &ctx, req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let code = normal_code(form.get("code").map(String::as_str).unwrap_or(""));
    let approve = form.get("decision").map(String::as_str) == Some("approve");
    let now = gw.clock.now();
    let requester = gw.portal.devices.0.lock().ok().and_then(|m| {
        m.get(&code)
            .filter(|p| matches!(p.state, State::Pending) && now - p.created < LIFETIME)
            .map(|p| p.requester.clone())
    });
    let (csrf, _) = csrf_for_page(&headers);
    let show = |done: Option<&str>, error: Option<&str>| {
        let page =
            DevicePage { user: &s.identity.user, csrf: &csrf, code: None, requester: "", asked: "", done, error };
        html(if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK }, &page)
    };
    let Some(requester) = requester else { return show(None, Some("That code is unknown or expired.")) };
    if !approve {
        if let Ok(mut m) = gw.portal.devices.0.lock() {
            if let Some(p) = m.get_mut(&code) {
                p.state = State::Denied;
            }
        }
        return show(Some("Refused. The command line was not signed in."), None);
    }
    // The command line gets a session of its own with the factors this browser proved.
    let created = gw
        .sessions
        .create_with(
            &s.identity.user,
            &gw.cfg.server.portal_host,
            requester.clone(),
            "poort command line".into(),
            &s.factors,
        )
        .await;
    let Ok((id, token)) = created else { return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id) };
    let ev = Event::DeviceLogin {
        user: s.identity.user.clone(),
        session: id.clone(),
        approved_from: ctx.client.to_string(),
        device_client: requester,
    };
    if gw.audit.record(ev).await.is_err() {
        let _ = gw.sessions.end(&id).await;
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    }
    let expires_at = now + gw.cfg.session.absolute.as_secs() as i64;
    if let Ok(mut m) = gw.portal.devices.0.lock() {
        if let Some(p) = m.get_mut(&code) {
            p.state = State::Approved { token: token.cookie_value, user: s.identity.user.clone(), expires_at };
        }
    }
    show(Some("Done. Go back to your terminal; you can close this page."), None)
}

/// POST /.poort/device/logout: the command line ends its own session.
pub(crate) async fn logout(gw: &Gateway, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
    if !from_cli(&req) {
        return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "invalid_request" }));
    }
    let Some(s) = &ctx.session else { return json(StatusCode::OK, serde_json::json!({ "ended": false })) };
    let _ = gw.sessions.end(&s.id).await;
    let ev = Event::Logout { user: s.identity.user.clone(), session: s.id.clone(), client: ctx.client.to_string() };
    if let Err(e) = gw.audit.record(ev).await {
        tracing::error!(error = %e, "Audit write failed");
    }
    json(StatusCode::OK, serde_json::json!({ "ended": true }))
}

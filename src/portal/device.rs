//! Command-line sign-in in the manner of RFC 8628 (device authorization grant): `poort
//! login` asks for a code pair, shows the short user code and a URL, and polls; the person
//! opens the URL in a browser where they are (or become) signed in and approves. The command
//! line then gets a session of its own, derived from the approving one (same expiry, same
//! proof times), listed and revocable like any other, good for tunnels only.
//!
//! A code is claimed by the first signed-in user who opens it; only they can approve or refuse
//! it. Approving needs a second factor (or, for a user with none, the password) given for this
//! very code, on the confirm page: a script that can act in the portal cannot type it.

use askama::Template;
use http::{Response, StatusCode};
use serde::Deserialize;

use super::{Call, csrf_for_page, html, query_param, with_csrf_cookie};
use crate::audit::Event;
use crate::body::Body;
use crate::clock::format_minutes;
use crate::respond::{error_page, json, redirect};
use crate::session::{Kind, Opening, cookie};
use crate::state::State;
use crate::state::pending::{DeviceState, LIFETIME, claimant, devices};

/// Seconds the command line waits between polls.
const INTERVAL: i64 = 2;
/// Consonants only: no words, no look-alikes (RFC 8628 §6.1).
const USER_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
#[derive(Template)]
#[template(path = "device.html")]
struct DevicePage<'a> {
    user: &'a str,
    csrf: &'a str,
    code: Option<&'a str>,
    requester: &'a str,
    /// What asked, if not `poort login`.
    purpose: &'a str,
    asked: &'a str,
    /// The user proved who they are for this code: the approve button is shown.
    proved: bool,
    confirm: &'a str,
    done: Option<&'a str>,
    error: Option<&'a str>,
}

/// A user code as typed (any case, with or without the dash), or "" if it is not one.
pub(crate) fn normal_code(raw: &str) -> String {
    let c: String = raw.chars().filter(|c| c.is_ascii_alphabetic()).map(|c| c.to_ascii_uppercase()).collect();
    if c.len() == 8 && c.bytes().all(|b| USER_ALPHABET.contains(&b)) {
        format!("{}-{}", &c[..4], &c[4..])
    } else {
        String::new()
    }
}

/// The owner a command line's token is sealed for while it waits in the store.
const SEAL_OWNER: &str = "device-token";

fn unavailable() -> Response<Body> {
    json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": "temporarily_unavailable" }))
}

/// A user code as the store keeps it: keyed with the gateway's secret (a user code is short
/// enough to be found from a plain hash by trying them all).
fn user_key(st: &State, code: &str) -> String {
    st.signins.sealer.keyed("device", code)
}

/// Starts a code pair for `requester` (a client address) asking for `purpose` ("" for
/// `poort login`): the user code and the device code, or the answer to give when too many are
/// in flight or the store did not answer.
pub(crate) async fn start(st: &State, requester: &str, purpose: &str) -> Result<(String, String), Response<Body>> {
    let now = st.clock.now();
    let device_code = cookie::encode_token(&crate::secret::random_bytes());
    let raw: [u8; 8] = crate::secret::random_bytes();
    let letters: String = raw.iter().map(|b| USER_ALPHABET[(*b as usize) % 20] as char).collect();
    let user_code = format!("{}-{}", &letters[..4], &letters[4..]);
    let (u, d, requester, purpose) =
        (user_key(st, &user_code), device_code.clone(), requester.to_string(), purpose.to_string());
    match st.store.run(move |c| devices::add(c, &u, &d, &requester, &purpose, now)).await {
        Ok(true) => Ok((user_code, device_code)),
        Ok(false) => Err(json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": "slow_down" }))),
        Err(_) => Err(unavailable()),
    }
}

/// Waits, polling the store, until the code pair of `device_code` is decided or `longest`
/// passed: the approved session's token, or None (refused, expired, or no answer in time).
/// For the SSH front door, which holds the connection open meanwhile.
pub(crate) async fn wait(st: &State, device_code: &str, longest: std::time::Duration) -> Option<String> {
    let until = tokio::time::Instant::now() + longest;
    while tokio::time::Instant::now() < until {
        let (d, now) = (device_code.to_string(), st.clock.now());
        match st.store.run(move |c| devices::poll(c, &d, now)).await {
            Ok(Some(p)) => match p.state {
                DeviceState::Pending => {}
                DeviceState::Denied => return None,
                DeviceState::Approved { sealed_token, .. } => {
                    return st.signins.sealer.open(SEAL_OWNER, &sealed_token).and_then(|t| String::from_utf8(t).ok());
                }
            },
            Ok(None) => return None,
            Err(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    None
}

/// POST /.poort/device/code (the command line)
pub(crate) async fn code(st: &State, call: &Call) -> Response<Body> {
    let (user_code, device_code) = match start(st, &call.ctx.client.to_string(), "").await {
        Ok(pair) => pair,
        Err(refused) => return refused,
    };
    let uri = format!("{}/.poort/device", st.cfg.server.external_origin);
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

/// POST /.poort/device/token (the command line): pending, refused, expired, or the new
/// session's token (once).
pub(crate) async fn token(st: &State, call: &Call) -> Response<Body> {
    let Ok(t) = serde_json::from_slice::<TokenRequest>(&call.json) else {
        return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "invalid_request" }));
    };
    let now = st.clock.now();
    let expired = || json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "expired_token" }));
    let p = match st.store.run(move |c| devices::poll(c, &t.device_code, now)).await {
        Ok(Some(p)) => p,
        Ok(None) => return expired(),
        Err(_) => return unavailable(),
    };
    match p.state {
        DeviceState::Pending => json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "authorization_pending" })),
        DeviceState::Denied => json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "access_denied" })),
        DeviceState::Approved { sealed_token, user, expires_at } => {
            let Some(token) = st.signins.sealer.open(SEAL_OWNER, &sealed_token).and_then(|t| String::from_utf8(t).ok())
            else {
                return expired();
            };
            json(StatusCode::OK, serde_json::json!({ "token": token, "user": user, "expires_at": expires_at }))
        }
    }
}

/// Claims `code` for the browser of session `s` (see `devices::claim`); None when it cannot
/// be claimed or the store did not answer.
async fn claim(st: &State, code: &str, s: &crate::session::Session) -> Option<(String, i64, bool, String)> {
    let (code, me, now) = (user_key(st, code), claimant(s), st.clock.now());
    st.store.run(move |c| devices::claim(c, &code, &me, now)).await.ok().flatten()
}

/// Records a proof given for `code` by the browser of session `s`.
pub(crate) async fn prove(st: &State, code: &str, s: &crate::session::Session) {
    let (code, me, now) = (user_key(st, code), claimant(s), st.clock.now());
    if let Err(e) = st.store.run(move |c| devices::prove(c, &code, &me, now)).await {
        tracing::error!(error = %e, "Recording a proof for a command-line code failed");
    }
}

/// Where the approval page sends a user to prove who they are for `code`.
fn confirm_url(code: &str) -> String {
    let here = format!("/.poort/device?code={code}");
    let q =
        form_urlencoded::Serializer::new(String::new()).append_pair("device", code).append_pair("next", &here).finish();
    format!("/.poort/confirm?{q}")
}

/// GET /.poort/device[?code=...]: the approval page. Opening a code claims it.
pub(crate) async fn approve_page(st: &State, call: &Call) -> Response<Body> {
    let s = call.session();
    let code = query_param(call, "code").map(|c| normal_code(&c)).unwrap_or_default();
    let found = if code.is_empty() { None } else { claim(st, &code, s).await };
    let (csrf, new) = csrf_for_page(call.headers());
    let (requester, asked, proved, purpose) = found
        .clone()
        .map(|(r, t, p, what)| (r, format_minutes(t), p, what))
        .unwrap_or((String::new(), String::new(), false, String::new()));
    let error =
        (!code.is_empty() && found.is_none()).then_some("That code is unknown or expired. Run poort login again.");
    let confirm = confirm_url(&code);
    let page = DevicePage {
        user: &s.identity.user,
        csrf: &csrf,
        code: found.as_ref().map(|_| code.as_str()),
        requester: &requester,
        purpose: &purpose,
        asked: &asked,
        proved,
        confirm: &confirm,
        done: None,
        error,
    };
    with_csrf_cookie(html(StatusCode::OK, &page), &csrf, new)
}

/// POST /.poort/device: approve (with a proof given for this code) or refuse a code the user
/// claimed.
pub(crate) async fn decide(st: &State, call: Call) -> Response<Body> {
    let (ctx, s) = (&call.ctx, call.session());
    let code = normal_code(call.field("code"));
    let approve = call.field("decision") == "approve";
    let now = st.clock.now();
    let claimed = claim(st, &code, s).await;
    let (csrf, _) = csrf_for_page(call.headers());
    let confirm = confirm_url(&code);
    let show = |done: Option<&str>, error: Option<&str>| {
        let page = DevicePage {
            user: &s.identity.user,
            csrf: &csrf,
            code: None,
            requester: "",
            purpose: "",
            asked: "",
            proved: false,
            confirm: &confirm,
            done,
            error,
        };
        html(if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK }, &page)
    };
    let Some((requester, _, proved, _)) = claimed else { return show(None, Some("That code is unknown or expired.")) };
    if !approve {
        let (c2, me) = (user_key(st, &code), claimant(s));
        if st.store.run(move |c| devices::decide(c, &c2, &me, DeviceState::Denied, now)).await.is_err() {
            return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
        }
        return show(Some("Refused. The command line was not signed in."), None);
    }
    if !proved {
        return redirect(StatusCode::SEE_OTHER, &format!("{}{confirm}", st.cfg.server.external_origin));
    }
    // The command line gets a session of its own, derived from this one.
    let opening = Opening {
        user: &s.identity.user,
        host: &st.cfg.server.portal_host,
        client_addr: requester.clone(),
        user_agent: "poort command line".into(),
        factors: s.factors,
        kind: Kind::Cli,
        approved_by: Some(s),
    };
    let Ok((id, token)) = st.sessions.open(opening).await else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    };
    let ev = Event::DeviceLogin {
        user: s.identity.user.clone(),
        session: id.clone(),
        approved_from: ctx.client.to_string(),
        device_client: requester,
    };
    if st.audit.record(ev).await.is_err() {
        let _ = st.sessions.end(&id).await;
        return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
    }
    let approved = DeviceState::Approved {
        sealed_token: st.signins.sealer.seal(SEAL_OWNER, token.cookie_value.as_bytes()),
        user: s.identity.user.clone(),
        expires_at: s.expires_at,
    };
    let (c2, me) = (user_key(st, &code), claimant(s));
    if !matches!(st.store.run(move |c| devices::decide(c, &c2, &me, approved, now)).await, Ok(true)) {
        // Decided meanwhile, or the store went away: the new session is not handed out.
        let _ = st.sessions.end(&id).await;
        return show(None, Some("That code is unknown or expired."));
    }
    show(Some("Done. Go back to your terminal; you can close this page."), None)
}

/// POST /.poort/device/logout: the command line ends its own session.
pub(crate) async fn logout(st: &State, call: &Call) -> Response<Body> {
    let Some(s) = &call.ctx.session else { return json(StatusCode::OK, serde_json::json!({ "ended": false })) };
    let _ = st.sessions.end(&s.id).await;
    let ev = Event::Logout { user: s.identity.user.clone(), session: s.id.clone(), client: call.ctx.client };
    st.audit.note(ev).await;
    json(StatusCode::OK, serde_json::json!({ "ended": true }))
}

//! Every response poort makes itself: its pages (with the headers that harden them), its
//! redirects, its JSON answers, and the fixed error pages. An error page says nothing but its
//! status's fixed words and the request id: it never echoes request bytes.
//!
//! A request poort refuses is a `Refusal`, and `respond` answers every one the same way: it
//! audits it as its kind is audited, logs it with the request id and its cause, and renders
//! its fixed page.

use askama::Template;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use std::net::IpAddr;

use crate::audit::Event;
use crate::body::Body;
use crate::session::Session;
use crate::state::{Ctx, RequestId, State};
use crate::upstream::Failure;

/// Headers every page poort makes carries.
fn harden(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not "no-referrer": with it browsers send `Origin: null` on form posts, and the login
    // form's Origin check needs the real origin. "same-origin" still keeps referrers from
    // leaving the portal.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    // A portal page gets a browsing context of its own: a window that a page without this
    // same policy opened loses its hold on it once a portal page loads in it, so a script
    // there cannot read what the page shows (a registration's challenge, a new
    // authenticator's secret). Apps routed by path share the origin; the proxy strips this
    // header from their answers, so that none can claim the same policy and keep its hold.
    h.insert(http::HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
}

/// A page with a terminal: the portal's policy, except that styles may also come from the
/// page's script (the terminal emulator sets its own at run time). Scripts still come only
/// from the gateway's own files, and nothing on these pages is made from markup a person sent.
pub fn terminal_page(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    let mut resp = page(status, "text/html; charset=utf-8", body);
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    resp
}

/// A page poort rendered itself.
pub fn page(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response<Body> {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    harden(&mut resp);
    resp
}

pub fn redirect(status: StatusCode, location: &str) -> Response<Body> {
    let mut resp = page(status, "text/plain; charset=utf-8", Body::empty());
    match HeaderValue::from_str(location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
    }
    resp
}

/// The page for a request an emergency rule refused: it says nothing about who is asking.
pub fn blocked_page(status: StatusCode, id: RequestId) -> Response<Body> {
    let (title, message) = if status == StatusCode::TOO_MANY_REQUESTS {
        ("Too many requests", "Wait a minute and try again.")
    } else {
        ("Blocked", "The gateway's security rules do not allow this request.")
    };
    let html = render_error(status.as_u16(), title, message, &id.to_string());
    page(status, "text/html; charset=utf-8", html)
}

/// The page everyone but administrators gets during a lockdown.
pub fn maintenance_page(id: RequestId) -> Response<Body> {
    let html = render_error(
        503,
        "Under maintenance",
        "The gateway is closed for maintenance. Only administrators can sign in right now. Try again later.",
        &id.to_string(),
    );
    page(StatusCode::SERVICE_UNAVAILABLE, "text/html; charset=utf-8", html)
}

/// The constant error page for a status: fixed words, and only our own request id.
pub fn error_page(status: StatusCode, id: RequestId) -> Response<Body> {
    let (title, message) = match status {
        StatusCode::BAD_REQUEST => ("Bad request", "The request was malformed or ambiguous, so it was refused."),
        StatusCode::UNAUTHORIZED => ("Sign-in required", "Sign in to poort to use this app."),
        StatusCode::FORBIDDEN => ("Access denied", "You are signed in, but this app is not open to you."),
        StatusCode::NOT_FOUND => ("Not found", "There is nothing at this address."),
        StatusCode::METHOD_NOT_ALLOWED => ("Method not allowed", "This address does not accept that kind of request."),
        StatusCode::TOO_MANY_REQUESTS => ("Too many requests", "Wait a minute and try again."),
        StatusCode::PAYLOAD_TOO_LARGE => ("Too large", "The request body is larger than allowed."),
        StatusCode::URI_TOO_LONG => ("Address too long", "The requested address is longer than allowed."),
        StatusCode::MISDIRECTED_REQUEST => ("Unknown site", "This gateway does not serve that host name."),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            ("Headers too large", "The request headers are larger than allowed.")
        }
        StatusCode::BAD_GATEWAY => ("App unavailable", "The app did not accept the connection. Try again later."),
        StatusCode::GATEWAY_TIMEOUT => ("App timed out", "The app did not answer in time. Try again later."),
        StatusCode::SERVICE_UNAVAILABLE => ("Unavailable", "The gateway cannot serve this request right now."),
        _ => ("Error", "The request could not be served."),
    };
    let html = render_error(status.as_u16(), title, message, &id.to_string());
    page(status, "text/html; charset=utf-8", html)
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    title: &'a str,
    message: &'a str,
    request_id: &'a str,
}

pub fn render_error(status: u16, title: &str, message: &str, request_id: &str) -> String {
    ErrorPage { status, title, message, request_id }.render().unwrap_or_else(|_| format!("{status} {title}"))
}

pub(crate) fn html(status: StatusCode, t: &impl Template) -> Response<Body> {
    match t.render() {
        Ok(s) => page(status, "text/html; charset=utf-8", s),
        Err(e) => {
            tracing::error!(error = %e, "Template rendering failed");
            page(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", Body::from_static("internal error\n"))
        }
    }
}

/// A JSON answer (the portal's script and the command line read these).
pub fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    page(status, "application/json", Body::from(v.to_string()))
}

/// A JSON refusal: `{"error": why}`.
pub fn json_error(status: StatusCode, why: &str) -> Response<Body> {
    json(status, serde_json::json!({ "error": why }))
}

/// Why poort refused a request itself.
#[derive(Debug)]
pub enum Refusal {
    /// The front door refused the head or the body: its status and reason code. The
    /// connection is closed after the answer.
    Malformed { status: StatusCode, code: &'static str },
    /// An emergency rule refused it (`throttled`: a rate rule, 429; else 403).
    Mitigated { rule: String, throttled: bool },
    /// The gateway is in lockdown and this user may not pass.
    LockedDown,
    /// Nothing answers at this address.
    NoRoute,
    /// The resource needs a signed-in user, or one with a second factor.
    Unauthenticated,
    /// A signed-in user may not have it: the app or tunnel, and why.
    Denied { resource: String, reason: String },
    /// The app failed; carries the cause for the log.
    Upstream(Failure),
    /// Something poort needs first (the audit log) is not there.
    Unavailable(&'static str),
}

/// Who was refused where: what `respond` records about a refusal.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    pub id: RequestId,
    pub client: IpAddr,
    /// What was refused, as recorded: the path, or the host for a host refusal.
    pub sample: &'a str,
    pub session: Option<&'a Session>,
}

impl Ctx {
    /// This request as a refusal records it.
    pub fn at(&self) -> At<'_> {
        At { id: self.id, client: self.client, sample: self.front.target.path(), session: self.session.as_deref() }
    }
}

/// Why a request was refused, in a word, for its access-log line.
#[derive(Debug, Clone, Copy)]
pub struct Refused(pub &'static str);

impl Refusal {
    /// The word the access log gives this refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Malformed { code, .. } => code,
            Refusal::Mitigated { throttled: true, .. } => "throttled",
            Refusal::Mitigated { .. } => "mitigated",
            Refusal::LockedDown => "lockdown",
            Refusal::NoRoute => "no_route",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Denied { .. } => "denied",
            Refusal::Upstream(Failure::Timeout) => "upstream_timeout",
            Refusal::Upstream(Failure::TooLarge) => "body_too_large",
            Refusal::Upstream(Failure::CrossOrigin) => "cross_origin_websocket",
            Refusal::Upstream(Failure::Internal(_)) => "internal",
            Refusal::Upstream(_) => "upstream_failed",
            Refusal::Unavailable(_) => "unavailable",
        }
    }
}

/// Answers a refusal: audited as its kind is, logged with the request id, its fixed page.
pub async fn respond(st: &State, at: At<'_>, refusal: Refusal) -> Response<Body> {
    let code = refusal.code();
    let mut resp = answer(st, at, refusal).await;
    resp.extensions_mut().insert(Refused(code));
    resp
}

async fn answer(st: &State, at: At<'_>, refusal: Refusal) -> Response<Body> {
    let (id, client) = (at.id, at.client);
    match refusal {
        Refusal::Malformed { status, code } => {
            tracing::info!(request = %id, client = %client, code, "Request rejected");
            let ev = Event::RequestRejected { code: code.into(), client, request_id: id.to_string() };
            st.audit.refusal("request_rejected", code, client, at.sample, ev);
            let mut resp = error_page(status, id);
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        Refusal::Mitigated { rule, throttled } => {
            let action = if throttled { "throttle" } else { "deny" };
            tracing::warn!(request = %id, client = %client, rule = %rule, action, "Mitigation rule matched");
            let ev = Event::MitigationMatched {
                rule: rule.clone(),
                action: action.into(),
                path: at.sample.chars().take(256).collect(),
                client,
                request_id: id.to_string(),
            };
            // Counted, not waited for.
            st.audit.refusal("mitigation_matched", &rule, client, at.sample, ev);
            blocked_page(if throttled { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::FORBIDDEN }, id)
        }
        Refusal::LockedDown => {
            let ev = Event::LockedDown {
                user: at.session.map(|s| s.identity.user.clone()),
                path: at.sample.chars().take(256).collect(),
                client,
            };
            st.audit.refusal("locked_down", "lockdown", client, at.sample, ev);
            maintenance_page(id)
        }
        Refusal::NoRoute => error_page(StatusCode::NOT_FOUND, id),
        Refusal::Unauthenticated => error_page(StatusCode::UNAUTHORIZED, id),
        Refusal::Denied { resource, reason } => {
            tracing::info!(request = %id, client = %client, resource = %resource, reason = %reason, "Access denied");
            let ev = Event::AccessDenied {
                user: at.session.map_or_else(|| "(anonymous)".into(), |s| s.identity.user.clone()),
                session: at.session.map_or_else(String::new, |s| s.id.clone()),
                app: resource,
                reason,
                client,
            };
            Box::pin(st.audit.note(ev)).await;
            error_page(StatusCode::FORBIDDEN, id)
        }
        Refusal::Upstream(failure) => {
            let cause = std::error::Error::source(&failure).map(ToString::to_string).unwrap_or_default();
            tracing::warn!(request = %id, failure = %failure, cause, "Upstream request failed");
            error_page(failure.status(), id)
        }
        Refusal::Unavailable(what) => {
            tracing::error!(request = %id, what, "Unavailable; refusing");
            error_page(StatusCode::SERVICE_UNAVAILABLE, id)
        }
    }
}

/// The page of a terminal: an SSH session in the browser, or a recording replayed or watched.
#[derive(Template)]
#[template(path = "terminal.html")]
pub struct TerminalPage<'a> {
    pub user: &'a str,
    pub csrf: &'a str,
    pub heading: &'a str,
    pub about: &'a str,
    /// `ssh`, `replay` or `live` (assets/terminal.js).
    pub mode: &'a str,
    /// Where an SSH session's WebSocket goes (a path with its ticket).
    pub socket: &'a str,
    /// Shown in the admin console, with its menu and its token for the end button.
    pub admin: bool,
    pub token: &'a str,
    pub end_session: Option<&'a str>,
}

/// Where a terminal page's recording goes: what comes before and after it.
pub fn terminal_parts(p: &TerminalPage<'_>) -> Option<(String, String)> {
    let text = p.render().map_err(|e| tracing::error!(error = %e, "Template rendering failed")).ok()?;
    // The last mark is the page's own: anything a person typed comes before it.
    let (before, after) = text.rsplit_once("@@CAST@@")?;
    Some((before.to_string(), after.to_string()))
}

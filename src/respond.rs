//! Every response poort makes itself: its pages (with the headers that harden them), its
//! redirects, its JSON answers, and the fixed error pages. An error page says nothing but its
//! status's fixed words and the request id: it never echoes request bytes.

use askama::Template;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::audit::Event;
use crate::body::Body;
use crate::state::{Ctx, RequestId, State};

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

/// Records a policy refusal (for an app or a tunnel).
pub async fn audit_denied(st: &State, ctx: &Ctx, resource: &str, reason: crate::policy::DenyReason) {
    let s = ctx.session.as_ref().expect("invariant: policy denies only identified users");
    let ev = Event::AccessDenied {
        user: s.identity.user.clone(),
        session: s.id.clone(),
        app: resource.to_string(),
        reason: reason.to_string(),
        client: ctx.client.to_string(),
    };
    if let Err(e) = st.audit.record(ev).await {
        tracing::error!(request = %ctx.id, error = %e, "Audit write failed");
    }
}

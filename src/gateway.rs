//! The gateway: shared state, and `handle`, the one function whose lines are the request
//! stages of docs/architecture.md. Every response poort itself makes goes through `page` or
//! `error_page`, so an error never echoes request bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::audit::{Audit, Event};
use crate::body::Body;
use crate::clock::Clock;
use crate::config::{Config, Route};
use crate::identity::seal::Sealer;
use crate::listen::Conn;
use crate::mitigate::{self, Mitigation, Verdict};
use crate::policy::{self, Decision, Subject};
use crate::portal;
use crate::proxy::{Origin, Proxy, Signer};
use crate::request::{self, Front};
use crate::route::{Found, Routes};
use crate::session::{self, Lookup, Session, Sessions};
use crate::store::Store;

/// Identifies one request in the log and on error pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

pub struct Gateway {
    pub cfg: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    pub store: Store,
    pub audit: Audit,
    pub sessions: Sessions,
    pub proxy: Proxy,
    pub routes: Routes,
    pub portal: portal::State,
    pub tunnels: Arc<crate::tunnel::Tunnels>,
    pub mitigation: Mitigation,
    /// The LDAP / Active Directory source of users, if configured.
    pub directory: Option<crate::identity::ldap::Directory>,
    /// OpenID Connect providers for single sign-on.
    pub oidc: crate::identity::oidc::Providers,
    request_ids: AtomicU64,
    /// The target of the request a connection's wrapper hands over in place of a refused
    /// head (`listen::Strict`): random per process, so no client can send it.
    marker: &'static str,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gateway")
    }
}

/// What start-up loads for a gateway besides its config and store.
pub struct Parts {
    pub signer: Arc<Signer>,
    pub sealer: Arc<Sealer>,
    pub mitigation: Mitigation,
    /// Where the demo app listens, if an app uses it.
    pub whoami: Option<String>,
}

/// Per-request facts established before routing.
#[derive(Clone)]
pub struct Ctx {
    pub id: RequestId,
    pub front: Front,
    pub client: IpAddr,
    pub session: Option<Arc<Session>>,
}

impl Gateway {
    pub fn new(
        cfg: Arc<Config>,
        clock: Arc<dyn Clock>,
        store: Store,
        audit: Audit,
        parts: Parts,
    ) -> anyhow::Result<Gateway> {
        let Parts { signer, sealer, mitigation, whoami } = parts;
        let sessions = Sessions::new(store.clone(), clock.clone(), cfg.session, cfg.apps.len())?;
        let proxy = Proxy::new(cfg.proxy, cfg.server.workers, signer, whoami);
        let routes = Routes::new(&cfg.server.portal_host, &cfg.apps);
        let portal = portal::State::new(&cfg, sealer)?;
        let directory = cfg.auth.ldap.clone().map(crate::identity::ldap::Directory::new).transpose()?;
        let oidc = crate::identity::oidc::Providers::new(&cfg.auth.oidc, &cfg.server.external_origin)?;
        // Request ids: a random start, then counting; unique per process and cheap to make.
        let start = u64::from_be_bytes(crate::secret::random_bytes());
        Ok(Gateway {
            cfg,
            clock,
            store,
            audit,
            sessions,
            proxy,
            routes,
            portal,
            tunnels: Arc::default(),
            mitigation,
            directory,
            oidc,
            request_ids: AtomicU64::new(start),
            marker: Box::leak(
                format!("/.poort/refused/{}", session::cookie::encode_token(&crate::secret::random_bytes()))
                    .into_boxed_str(),
            ),
        })
    }

    /// The marker target for `listen::Strict`.
    pub fn marker(&self) -> &'static str {
        self.marker
    }

    /// One request, start to finish. Closes an HTTP/1 connection whose request asked to
    /// switch protocols and did not: the bytes after it were never checked as HTTP.
    pub async fn handle(self: Arc<Self>, peer: SocketAddr, conn: &Conn, req: Request<Incoming>) -> Response<Body> {
        let upgrade = req.version() == http::Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
        let head = req.method() == http::Method::HEAD;
        let mut resp = shielded(self.stages(peer, conn, req)).await;
        if upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if head {
            without_body(&mut resp);
        }
        resp
    }

    async fn stages(self: Arc<Self>, peer: SocketAddr, conn: &Conn, req: Request<Incoming>) -> Response<Body> {
        let id = RequestId(self.request_ids.fetch_add(1, Ordering::Relaxed));
        let client = request::client_addr(peer.ip(), req.headers(), &self.cfg.server.trusted_proxies);
        if req.uri().path() == self.marker {
            let why = conn.refused.take().unwrap_or(request::Reject::RequestLine);
            return self.reject(why.status(), why.code(), client, "(a raw head)", id);
        }
        // request::check: one canonical target and host, bounded headers, strict framing.
        let front = match request::check(req.method(), req.uri(), req.version(), req.headers()) {
            Ok(f) => f,
            Err(r) => return self.reject(r.status(), r.code(), client, req.uri().path(), id),
        };
        // The host must be the one the TLS handshake named (RFC 9110 §7.4: 421 makes a
        // browser that reused a connection for another host open a new one).
        if conn.sni.as_ref().is_some_and(|sni| *sni != front.host) {
            return self.reject(StatusCode::MISDIRECTED_REQUEST, "host_not_sni", client, &front.host, id);
        }
        if front.content_length.is_some_and(|n| n > self.cfg.proxy.max_body_bytes) {
            return self.reject(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", client, front.target.path(), id);
        }
        // route: portal, an app, or nothing.
        let found = self.routes.find_target(&front.host, &front.target);
        if found == Found::UnknownHost {
            return self.reject(StatusCode::MISDIRECTED_REQUEST, "unknown_host", client, &front.host, id);
        }
        // mitigate::check: the operator's emergency rules, before any session work.
        let app = match found {
            Found::App(i) | Found::AddSlash(i) => Some(self.cfg.apps[i].name.as_str()),
            _ => None,
        };
        let raw_target = req.uri().path_and_query().map_or("", |p| p.as_str());
        let facts = mitigate::Facts::of(req.method().as_str(), &front.target, raw_target, req.headers(), client, app);
        match self.mitigation.check(&facts) {
            Verdict::Pass => {}
            verdict => {
                if let Some(resp) = Box::pin(self.mitigated(verdict, &front, client, id)).await {
                    return resp;
                }
            }
        }
        // session::lookup: cookie, token hash, cache, store.
        let session = self.session_for(&req, &front.host).await;
        if self.mitigation.lockdown() && !self.lockdown_allows(session.as_deref(), &found, front.target.path()) {
            let ev = Event::LockedDown {
                user: session.as_ref().map(|s| s.identity.user.clone()),
                path: front.target.path().chars().take(256).collect(),
                client: client.to_string(),
            };
            self.audit.refusal("locked_down", "lockdown", client, front.target.path(), ev);
            return maintenance_page(id);
        }
        let ctx = Ctx { id, front, client, session };
        match found {
            // Cold paths are boxed so that the future of every request stays small.
            Found::Portal { on_portal_host } => {
                Box::pin(portal::routes::dispatch(&self, ctx, on_portal_host, req)).await
            }
            Found::App(i) => self.app(i, ctx, req).await,
            Found::AddSlash(i) => match &self.cfg.apps[i].route {
                Route::Path { prefix, .. } => {
                    // The query goes along (the front door checked its bytes).
                    let query = ctx.front.target.query().map(|q| format!("?{q}")).unwrap_or_default();
                    let location = format!("{}{prefix}{query}", self.cfg.server.external_origin);
                    redirect(StatusCode::PERMANENT_REDIRECT, &location)
                }
                Route::Host(_) => error_page(StatusCode::NOT_FOUND, id),
            },
            Found::NotFound | Found::UnknownHost => error_page(StatusCode::NOT_FOUND, id),
        }
    }

    /// Acts on a matching rule: audited; a response for deny and throttle, None to go on.
    async fn mitigated(
        &self,
        verdict: Verdict,
        front: &Front,
        client: IpAddr,
        id: RequestId,
    ) -> Option<Response<Body>> {
        let (rule, action, status) = match &verdict {
            Verdict::Pass => return None,
            Verdict::Logged { rule } => (rule.clone(), "log", None),
            Verdict::Deny { rule, .. } => (rule.clone(), "deny", Some(StatusCode::FORBIDDEN)),
            Verdict::Throttled { rule, .. } => (rule.clone(), "throttle", Some(StatusCode::TOO_MANY_REQUESTS)),
        };
        tracing::warn!(request = %id, client = %client, rule = %rule, action, "Mitigation rule matched");
        let ev = Event::MitigationMatched {
            rule: rule.clone(),
            action: action.into(),
            path: front.target.path().chars().take(256).collect(),
            client: client.to_string(),
            request_id: id.to_string(),
        };
        if let Some(status) = status {
            // A refusal: counted, not waited for.
            self.audit.refusal("mitigation_matched", &rule, client, front.target.path(), ev);
            return Some(blocked_page(status, id));
        }
        if let Err(e) = self.audit.record(ev).await {
            // A rule that asks for a record lets nothing pass without one.
            tracing::error!(request = %id, error = %e, "Audit unavailable; refusing");
            return Some(error_page(StatusCode::SERVICE_UNAVAILABLE, id));
        }
        None
    }

    /// During a lockdown: admins go on; everyone else may only reach the routes the route
    /// table keeps open (the sign-in page and the fixed assets, so that an admin can sign in).
    fn lockdown_allows(&self, session: Option<&Session>, found: &Found, path: &str) -> bool {
        if session.is_some_and(|s| s.identity.groups.contains(&self.mitigation.admin_group)) {
            return true;
        }
        match found {
            Found::Portal { on_portal_host } => portal::routes::open_in_lockdown(*on_portal_host, path),
            _ => false,
        }
    }

    /// policy::evaluate, then proxy::forward with the permit.
    async fn app(&self, i: usize, mut ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
        let app = &self.cfg.apps[i];
        // A command-line session opens tunnels, nothing else.
        if ctx.session.as_ref().is_some_and(|s| s.kind != session::Kind::Browser) {
            ctx.session = None;
        }
        let who = ctx.session.as_ref().map(|s| Subject { identity: &s.identity, mfa: s.mfa() });
        match policy::evaluate(i, &app.access, app.mfa, who) {
            Decision::Allow(permit) => {
                if let Some(s) = &ctx.session {
                    if s.first_open(i) {
                        let ev = Event::AccessAllowed {
                            user: Some(s.identity.user.clone()),
                            session: Some(s.id.clone()),
                            app: app.name.clone(),
                            client: ctx.client.to_string(),
                        };
                        if let Err(e) = Box::pin(self.audit.record(ev)).await {
                            tracing::error!(request = %ctx.id, error = %e, "Audit unavailable; refusing");
                            return error_page(StatusCode::SERVICE_UNAVAILABLE, ctx.id);
                        }
                    }
                }
                let origin = Origin {
                    client: ctx.client,
                    host: &ctx.front.host,
                    port: port_of(&self.cfg.server.external_origin),
                    session: ctx.session.as_deref(),
                    now: self.clock.now(),
                };
                match self.proxy.forward(permit, app, &ctx.front.target, origin, ctx.front.content_length, req).await {
                    Ok(resp) => resp,
                    // A body that broke its framing: refused like a bad head, and audited.
                    Err(crate::proxy::Failure::BadBody) => self.reject(
                        StatusCode::BAD_REQUEST,
                        "body_malformed",
                        ctx.client,
                        ctx.front.target.path(),
                        ctx.id,
                    ),
                    Err(crate::proxy::Failure::CrossOrigin) => {
                        let ev = Event::AccessDenied {
                            user: ctx
                                .session
                                .as_ref()
                                .map_or_else(|| "(anonymous)".into(), |s| s.identity.user.clone()),
                            session: ctx.session.as_ref().map_or_else(String::new, |s| s.id.clone()),
                            app: app.name.clone(),
                            reason: "WebSocket from a page of another origin".into(),
                            client: ctx.client.to_string(),
                        };
                        if let Err(e) = Box::pin(self.audit.record(ev)).await {
                            tracing::error!(request = %ctx.id, error = %e, "Audit write failed");
                        }
                        error_page(StatusCode::FORBIDDEN, ctx.id)
                    }
                    Err(f) => {
                        tracing::warn!(request = %ctx.id, app = %app.name, failure = ?f, "Upstream request failed");
                        error_page(f.status(), ctx.id)
                    }
                }
            }
            Decision::Authenticate { step_up } => self.needs_login(&ctx, &req, step_up),
            Decision::Deny(reason) => {
                Box::pin(self.audit_denied(&ctx, &app.name, reason)).await;
                error_page(StatusCode::FORBIDDEN, ctx.id)
            }
        }
    }

    /// Records a policy refusal (for an app or a tunnel).
    pub async fn audit_denied(&self, ctx: &Ctx, resource: &str, reason: policy::DenyReason) {
        let s = ctx.session.as_ref().expect("invariant: policy denies only identified users");
        let ev = Event::AccessDenied {
            user: s.identity.user.clone(),
            session: s.id.clone(),
            app: resource.to_string(),
            reason: reason.to_string(),
            client: ctx.client.to_string(),
        };
        if let Err(e) = self.audit.record(ev).await {
            tracing::error!(request = %ctx.id, error = %e, "Audit write failed");
        }
    }

    /// A browser navigation goes to the login page (or, to step up, the second-factor page);
    /// anything else gets 401.
    fn needs_login(&self, ctx: &Ctx, req: &Request<Incoming>, step_up: bool) -> Response<Body> {
        let wants_html =
            req.headers().get_all(header::ACCEPT).iter().any(|v| v.as_bytes().windows(9).any(|w| w == b"text/html"));
        if !wants_html || !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
            return error_page(StatusCode::UNAUTHORIZED, ctx.id);
        }
        let target = ctx.front.target.forward_form(ctx.front.target.path());
        if ctx.front.host != self.cfg.server.portal_host {
            // An app on its own host: the portal hands a session over to this browser only.
            let (nonce, location) = portal::handoff_start(self, &ctx.front.host, &target, step_up);
            let mut resp = redirect(StatusCode::FOUND, &location);
            if let Ok(v) = HeaderValue::from_str(&nonce) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
            return resp;
        }
        let page = if step_up { "mfa" } else { "login" };
        let mut location = format!("{}/.poort/{page}?", self.cfg.server.external_origin);
        location.push_str(&form_urlencoded::Serializer::new(String::new()).append_pair("next", &target).finish());
        redirect(StatusCode::FOUND, &location)
    }

    /// The live session for this request's cookie, if it was issued for this host.
    async fn session_for(&self, req: &Request<Incoming>, host: &str) -> Option<Arc<Session>> {
        let cookies = req.headers().get_all(header::COOKIE).iter().map(|v| v.as_bytes());
        let value = session::cookie::find(cookies, session::SESSION_COOKIE)?;
        match self.sessions.lookup(value).await {
            Ok(s) if s.host == host => Some(s),
            Ok(_) => None,
            Err((Lookup::Expired { idle }, Some(s))) => {
                let why = if idle { "idle timeout" } else { "absolute timeout" };
                let ev =
                    Event::SessionExpired { user: s.identity.user.clone(), session: s.id.clone(), why: why.into() };
                if let Err(e) = Box::pin(self.audit.record(ev)).await {
                    tracing::error!(error = %e, "Audit write failed");
                }
                None
            }
            Err(_) => None,
        }
    }

    /// Refuses a request before routing: audited (counted, not waited for), constant page,
    /// connection closed.
    fn reject(
        &self,
        status: StatusCode,
        code: &'static str,
        client: IpAddr,
        path: &str,
        id: RequestId,
    ) -> Response<Body> {
        tracing::info!(request = %id, client = %client, code, "Request rejected");
        let ev = Event::RequestRejected { code: code.into(), client: client.to_string(), request_id: id.to_string() };
        self.audit.refusal("request_rejected", code, client, path, ev);
        let mut resp = error_page(status, id);
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    }
}

/// Runs a request's stages; a bug that panics in them costs that request a constant 500 page
/// and its connection, never a worker thread or another request.
async fn shielded(stages: impl Future<Output = Response<Body>>) -> Response<Body> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(stages).catch_unwind().await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::error!("A request's handling panicked; answered 500");
            let mut resp = error_page(StatusCode::INTERNAL_SERVER_ERROR, RequestId(0));
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    }
}

/// A response to HEAD: the headers of the answer to GET, with its length and without its body
/// (HTTP/2 refuses a body on a HEAD response).
fn without_body(resp: &mut Response<Body>) {
    if let Body::Full(Some(b)) = resp.body() {
        let len = HeaderValue::from(b.len());
        resp.headers_mut().insert(header::CONTENT_LENGTH, len);
        *resp.body_mut() = Body::empty();
    }
}

/// `:port` of an origin, or nothing for the default port.
pub fn port_of(origin: &str) -> &str {
    let rest = origin.trim_start_matches("https://");
    match rest.rfind(':') {
        Some(i) if !rest.ends_with(']') => &rest[i..],
        _ => "",
    }
}

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
    let html = portal::render_error(status.as_u16(), title, message, &id.to_string());
    page(status, "text/html; charset=utf-8", html)
}

/// The page everyone but administrators gets during a lockdown.
pub fn maintenance_page(id: RequestId) -> Response<Body> {
    let html = portal::render_error(
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
    let html = portal::render_error(status.as_u16(), title, message, &id.to_string());
    page(status, "text/html; charset=utf-8", html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_request_costs_that_request_only() {
        let resp = shielded(async { panic!("a bug in a handler") }).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers().get(header::CONNECTION).unwrap(), "close");
        let fine = shielded(async { error_page(StatusCode::NOT_FOUND, RequestId(1)) }).await;
        assert_eq!(fine.status(), StatusCode::NOT_FOUND);
    }
}

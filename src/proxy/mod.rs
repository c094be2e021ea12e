//! The reverse proxy: forwards a permitted request to its app over pooled keep-alive
//! connections, with the upstream request built by rule 5 from an allowlist: the end-to-end
//! request headers apps use, plus the app's own `forward_headers`; poort's cookies never, and
//! poort's identity headers and signed assertion added last. The gateway frames every upstream
//! request itself. Request bodies up to `[proxy] buffer_bytes` are read whole before the
//! upstream request starts (a body that breaks off never reaches an app half-sent); larger
//! ones, and responses, stream.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::Limited;
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;

use crate::body::{Body, RequestBody};
use crate::clock::UnixTime;
use crate::config::{App, ProxySettings, Route, Upstream};
use crate::identity::Identity;
use crate::policy::{Permit, Resource};
use crate::request::Target;
use crate::session::Session;
use crate::session::grant::Grants;

mod headers;
mod rewrite;

use crate::identity::assertion::{self, Signer};
use crate::request::headers::{HOP_BY_HOP, connection_named};
use crate::upstream::{self as pool, Dest, classify};
pub use crate::upstream::{Failure, PooledBody, UpstreamBody};
pub use headers::allowed_headers;
use headers::*;
use rewrite::Rewrite;

thread_local! {
    /// The worker this thread serves as, if it is one (server::start).
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Marks the calling thread as worker `i`: its requests use the worker's own upstream pool.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(Some(i)));
}

/// An assertion made for an app: for whom, as they were when it was made (a changed
/// identity, such as a group taken away, needs a new one), when, and the token.
struct Assertion {
    app: String,
    who: Identity,
    iat: UnixTime,
    jwt: HeaderValue,
}

/// What poort adds to the upstream requests of one session at one app, from one client
/// address on one host: the forwarding facts, who the user is and the signed assertion. Made
/// once and reused while its assertion may be; a change in any of what it was made from
/// makes it anew.
struct Added {
    app: String,
    who: Identity,
    factors: crate::session::Factors,
    client: IpAddr,
    host: String,
    iat: UnixTime,
    headers: Arc<[(HeaderName, HeaderValue)]>,
}

pub struct Proxy {
    pools: pool::Pools,
    settings: ProxySettings,
    signer: Arc<Signer>,
    /// Where the built-in demo app listens, when an app uses it.
    whoami: Option<String>,
    /// Assertions made for a session, reused while fresh: by session id, (app, issued at,
    /// token). Dropped once stale (`tidy`).
    assertions: RwLock<HashMap<String, Vec<Assertion>>>,
    /// The headers added for a session (`Added`), by session id; dropped once stale (`tidy`).
    added: RwLock<HashMap<String, Vec<Added>>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// What open WebSockets hold, reviewed when the config changes.
    grants: Arc<Grants>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Proxy")
    }
}

/// Who and where the request came from, as the gateway established it.
pub struct Origin<'a> {
    pub client: IpAddr,
    pub host: &'a str,
    /// `:port` of the gateway's external address, or "" for 443.
    pub port: &'a str,
    pub session: Option<&'a Session>,
    pub now: UnixTime,
    /// Where the app's answer time is counted.
    pub upstream_seconds: &'a prometheus_client::metrics::histogram::Histogram,
}

impl Proxy {
    pub fn new(
        settings: ProxySettings,
        workers: usize,
        signer: Arc<Signer>,
        whoami: Option<String>,
        metrics: Arc<crate::metrics::Metrics>,
        grants: Arc<Grants>,
    ) -> Proxy {
        let pools = pool::Pools::new(workers, settings.connect_timeout);
        Proxy {
            pools,
            settings,
            signer,
            whoami,
            assertions: RwLock::default(),
            added: RwLock::default(),
            metrics,
            grants,
        }
    }

    /// Idle pooled connections to apps, over every worker.
    pub fn idle_connections(&self) -> usize {
        self.pools.idle()
    }

    /// Forgets assertions too old to be reused (called periodically).
    pub fn tidy(&self, now: UnixTime) {
        self.assertions.write().retain(|_, list| {
            list.retain(|a| now - a.iat < assertion::REUSE_FOR);
            !list.is_empty()
        });
        self.added.write().retain(|_, list| {
            list.retain(|a| now - a.iat < assertion::REUSE_FOR);
            !list.is_empty()
        });
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    fn assertion(
        &self,
        app: &App,
        who: &Identity,
        session: Option<&Session>,
        now: UnixTime,
    ) -> Result<HeaderValue, crate::upstream::Cause> {
        let fresh =
            |a: &Assertion| a.app == app.name && a.who == *who && now - a.iat < assertion::REUSE_FOR && a.iat <= now;
        if let Some(s) = session {
            let cached =
                self.assertions.read().get(&s.id).and_then(|l| l.iter().find(|a| fresh(a)).map(|a| a.jwt.clone()));
            if let Some(jwt) = cached {
                return Ok(jwt);
            }
        }
        let amr: Vec<&str> = session.map(Session::amr).unwrap_or_default();
        // Kept as a header value, so that a reused assertion is not checked again per request.
        let jwt = HeaderValue::try_from(self.signer.sign(&app.name, who, &amr, now)?)?;
        if let Some(s) = session {
            let mut m = self.assertions.write();
            let list = m.entry(s.id.clone()).or_default();
            list.retain(|a| a.app != app.name && now - a.iat < assertion::REUSE_FOR);
            list.push(Assertion { app: app.name.clone(), who: who.clone(), iat: now, jwt: jwt.clone() });
        }
        Ok(jwt)
    }

    /// Writes who the user is into `headers` for `app`: `X-Poort-User`, `X-Poort-Email`,
    /// `X-Poort-Groups` and the signed `X-Poort-Assertion`; nothing without a session. The one
    /// place identity headers are made, for the proxy and for forward-auth answers alike.
    fn identity(
        &self,
        app: &App,
        session: Option<&Session>,
        now: UnixTime,
        headers: &mut HeaderMap,
    ) -> Result<(), crate::upstream::Cause> {
        let Some(session) = session else { return Ok(()) };
        let who = &session.identity;
        let value = |s: &str| HeaderValue::from_str(s).ok();
        if let Some(v) = value(&who.user) {
            headers.insert(X_POORT_USER, v);
        }
        if let Some(v) = who.email.as_deref().and_then(value) {
            headers.insert(X_POORT_EMAIL, v);
        }
        if let Some(v) = value(&who.groups.join(",")) {
            headers.insert(X_POORT_GROUPS, v);
        }
        headers.insert(X_POORT_ASSERTION, self.assertion(app, who, Some(session), now)?);
        Ok(())
    }

    /// The headers of a forward-auth answer that lets a request to `app` through: who the
    /// user is, for the proxy in front of the app to pass on. Takes the permit as `forward`
    /// does.
    pub fn vouch(
        &self,
        permit: Permit<'_>,
        app: &App,
        session: Option<&Session>,
        now: UnixTime,
    ) -> Result<HeaderMap, Failure> {
        if permit.resource() != Resource::App(&app.name) {
            return Err(Failure::Internal("a permit for another resource".into()));
        }
        let mut headers = HeaderMap::new();
        self.identity(app, session, now, &mut headers).map_err(Failure::Internal)?;
        // Each name is always there, empty when there is nothing to say (an anonymous user of
        // a public app, a user without an email address): a proxy that copies the headers then
        // overwrites whatever the client sent under those names. Some leave the client's in
        // place for a name the answer lacks, or put in a placeholder of their own.
        for name in [X_POORT_USER, X_POORT_EMAIL, X_POORT_GROUPS, X_POORT_ASSERTION] {
            headers.entry(name).or_insert(HeaderValue::from_static(""));
        }
        Ok(headers)
    }

    /// The headers poort adds to a request to `app` (reached at `authority`) for `origin`:
    /// for a session, made once and reused while fresh (`Added`).
    fn added(
        &self,
        app: &App,
        authority: &str,
        origin: &Origin<'_>,
    ) -> Result<Arc<[(HeaderName, HeaderValue)]>, Failure> {
        let Some(session) = origin.session else {
            return Ok(self.make_added(app, authority, origin)?.into());
        };
        let (who, factors, now) = (&session.identity, session.factors, origin.now);
        let fresh = |a: &Added| {
            a.app == app.name
                && a.who == *who
                && a.factors == factors
                && a.client == origin.client
                && a.host == origin.host
                && now - a.iat < assertion::REUSE_FOR
                && a.iat <= now
        };
        let cached =
            self.added.read().get(&session.id).and_then(|l| l.iter().find(|a| fresh(a)).map(|a| a.headers.clone()));
        if let Some(headers) = cached {
            return Ok(headers);
        }
        let headers: Arc<[(HeaderName, HeaderValue)]> = self.make_added(app, authority, origin)?.into();
        let mut m = self.added.write();
        let list = m.entry(session.id.clone()).or_default();
        list.retain(|a| a.app != app.name && now - a.iat < assertion::REUSE_FOR);
        list.push(Added {
            app: app.name.clone(),
            who: who.clone(),
            factors,
            client: origin.client,
            host: origin.host.to_string(),
            iat: now,
            headers: headers.clone(),
        });
        Ok(headers)
    }

    /// Makes what `added` returns: Host, the forwarding headers (`X-Forwarded-*` and RFC
    /// 7239's `Forwarded`), then identity and assertion (`identity`).
    fn make_added(
        &self,
        app: &App,
        authority: &str,
        origin: &Origin<'_>,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, Failure> {
        let mut out = Vec::with_capacity(10);
        let value = |s: &str| HeaderValue::from_str(s).ok();
        // The host the browser addressed, with the gateway's port unless it is 443: what an
        // app needs to make its own absolute URLs, and what it compares a WebSocket's Origin
        // with.
        let public_host = format!("{}{}", origin.host, origin.port);
        let host = if app.preserve_host { &public_host } else { authority };
        out.push((header::HOST, value(host).ok_or_else(|| Failure::Internal("the upstream is no valid Host".into()))?));
        let client = origin.client.to_string();
        if let Some(v) = value(&client) {
            out.push((X_FORWARDED_FOR, v));
        }
        out.push((X_FORWARDED_PROTO, HeaderValue::from_static("https")));
        if let Some(v) = value(&public_host) {
            out.push((X_FORWARDED_HOST, v));
        }
        // A path-routed app whose prefix poort takes off learns it, to put it back in links.
        if let Route::Path { prefix, strip: true } = &app.route
            && let Some(v) = value(prefix.trim_end_matches('/'))
        {
            out.push((X_FORWARDED_PREFIX, v));
        }
        // The same facts in RFC 7239's form; `for` and `host` are quoted, as an IPv6 address
        // and a port need to be.
        let forwarded = if origin.client.is_ipv6() {
            format!("for=\"[{client}]\";host=\"{public_host}\";proto=https")
        } else {
            format!("for=\"{client}\";host=\"{public_host}\";proto=https")
        };
        if let Some(v) = value(&forwarded) {
            out.push((header::FORWARDED, v));
        }
        let mut identity = HeaderMap::new();
        self.identity(app, origin.session, origin.now, &mut identity).map_err(Failure::Internal)?;
        out.extend(identity.into_iter().filter_map(|(name, value)| Some((name?, value))));
        Ok(out)
    }

    /// The upstream request's body and its length, if known: read whole when it is at most
    /// `buffer_bytes`, else streamed (with what was read while deciding in front).
    async fn read_body(&self, body: RequestBody, length: Option<u64>) -> Result<(UpstreamBody, Option<u64>), Failure> {
        use hyper::body::Body as _;
        let (bound, max) = (self.settings.buffer_bytes, self.settings.max_body_bytes);
        if body.is_end_stream() {
            return Ok((UpstreamBody::Full(None), length.filter(|n| *n > 0)));
        }
        if length.is_some_and(|n| n > max) {
            return Err(Failure::TooLarge);
        }
        let mut rest = Limited::new(http_body_util::combinators::BoxBody::new(body), max as usize);
        if length.is_some_and(|n| n > bound) {
            return Ok((UpstreamBody::Stream { first: None, rest }, length));
        }
        let mut buf = bytes::BytesMut::new();
        loop {
            match http_body_util::BodyExt::frame(&mut rest).await {
                None => break,
                Some(Err(e)) => {
                    return Err(if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                        Failure::TooLarge
                    } else {
                        Failure::BadBody
                    });
                }
                Some(Ok(frame)) => {
                    // Trailers are not forwarded.
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() as u64 > bound {
                        // A chunked body larger than the bound: the rest streams.
                        return Ok((UpstreamBody::Stream { first: Some(buf.freeze()), rest }, None));
                    }
                }
            }
        }
        let n = buf.len() as u64;
        if length.is_some_and(|want| want != n) {
            return Err(Failure::BadBody);
        }
        Ok((UpstreamBody::Full((n > 0).then(|| buf.freeze())), Some(n).filter(|n| *n > 0)))
    }

    /// Forwards `req` to the app the permit names. The permit is consumed: one permit, one
    /// upstream request. `length` is the body length the front door read.
    pub async fn forward(
        &self,
        permit: Permit<'_>,
        app: &App,
        target: &Target,
        origin: Origin<'_>,
        length: Option<u64>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Body>, Failure> {
        if permit.resource() != Resource::App(&app.name) {
            return Err(Failure::Internal("a permit for another resource".into()));
        }
        let websocket = is_websocket(req.version(), req.headers());
        if websocket {
            // A page of another origin may not open a WebSocket to the app in its user's name
            // (cross-site WebSocket hijacking); a client that is not a browser sends no Origin.
            if let Some(o) = req.headers().get(header::ORIGIN) {
                let own = format!("https://{}{}", origin.host, origin.port);
                let o = o.to_str().unwrap_or("").to_ascii_lowercase();
                if o != own && !app.websocket_origins.contains(&o) {
                    tracing::warn!(app = %app.name, origin = %o.chars().take(128).collect::<String>(), "WebSocket from another origin refused");
                    return Err(Failure::CrossOrigin);
                }
            }
        }
        let client_upgrade = websocket.then(|| crate::body::wire::on_upgrade(&mut req));
        let (parts, body) = req.into_parts();
        // A body on a method whose body means nothing (GET, HEAD, OPTIONS, TRACE) is refused:
        // an app that does not read it would take its bytes for the next request on the
        // connection, with identity headers poort did not write.
        let has_body = !hyper::body::Body::is_end_stream(&body) || length.is_some_and(|n| n > 0);
        if has_body && matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE) {
            return Err(Failure::BodyNotAllowed);
        }
        // Any request with a body goes on a connection of its own that closes after it, for
        // the same reason: an app that skips a body it did not expect has no next request on
        // that connection to take it for, and no other user's request comes after it there.
        let alone = has_body;

        let (authority, base, dest) = match &app.upstream {
            Upstream::Http { authority, address, base_path, tls, pool } => {
                (authority.as_str(), base_path.as_str(), Dest { key: pool, address, tls: tls.as_deref() })
            }
            Upstream::ForwardAuth => {
                return Err(Failure::Internal("an app behind forward-auth has no upstream".into()));
            }
            Upstream::Whoami => {
                let address =
                    self.whoami.as_deref().ok_or_else(|| Failure::Unreachable("the demo app is not running".into()))?;
                (address, "", Dest { key: address, address, tls: None })
            }
        };
        let path = match &app.route {
            Route::Path { prefix, strip: true } => after_segments(target.path(), prefix.matches('/').count() - 1),
            _ => target.path(),
        };
        // Origin form: the connection already goes to the upstream, and Host names it.
        let mut uri = String::with_capacity(base.len() + path.len() + target.query().map_or(0, str::len) + 16);
        uri.push_str(base);
        target.forward_form_onto(path, &mut uri);

        let mut headers = allowed_headers(&parts.headers, &app.forward_headers);
        if websocket {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        // Forwarding and identity last, so nothing above can have set them.
        for (name, value) in self.added(app, authority, &origin)?.iter() {
            headers.insert(name, value.clone());
        }

        let mut out = Request::builder().method(parts.method).uri(uri).version(Version::HTTP_11);
        if let Some(h) = out.headers_mut() {
            *h = headers;
        }
        let (body, length) = self.read_body(body, length).await?;
        if let (Some(h), Some(n)) = (out.headers_mut(), length) {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let out = out.body(body).map_err(|e| Failure::Internal(e.into()))?;
        let line = origin.session.map(Session::lifeline);
        // The origin the browser addressed, with the gateway's port unless it is 443.
        let public_origin = app.rewrite_paths.then(|| format!("https://{}{}", origin.host, origin.port));
        let answer = Answer {
            // An app routed by path is served from the portal's own origin.
            shared: matches!(app.route, Route::Path { .. }),
            rewrite: public_origin.as_deref().map(|public_origin| Rewrite {
                sent_host: if app.preserve_host { &public_origin["https://".len()..] } else { authority },
                base,
                public_origin,
                prefix: match &app.route {
                    Route::Path { prefix, strip: true } => prefix.trim_end_matches('/'),
                    _ => "",
                },
            }),
        };
        if let Some(client_upgrade) = client_upgrade {
            // A WebSocket holds a grant: it ends with the session, or when a reload takes
            // the app away from this user.
            let grant = self.grants.hold(&permit, origin.session, &app.destination());
            return Box::pin(self.upgrade(dest, out, client_upgrade, line, grant, &answer)).await;
        }
        // `alone` and `upgrade` are boxed: they are rare, and every request's future would
        // otherwise keep room for their state.
        if alone {
            return Box::pin(self.alone(dest, out, line, &answer)).await;
        }
        let worker = WORKER.with(|w| w.get());
        let sent = crate::clock::instant();
        let resp = match tokio::time::timeout(self.settings.response_timeout, self.pools.send(worker, dest, out)).await
        {
            Err(_) => return Err(Failure::Timeout),
            Ok(r) => r?,
        };
        let waited = crate::clock::instant().saturating_duration_since(sent).as_secs_f64();
        origin.upstream_seconds.observe(waited);
        let (mut parts, body) = resp.into_parts();
        answer.head(&mut parts.headers, false);
        Ok(Response::from_parts(parts, watched(Body::Upstream(body), line)))
    }

    /// A request on a connection of its own, closed after its answer.
    async fn alone(
        &self,
        dest: Dest<'_>,
        mut out: Request<UpstreamBody>,
        line: Option<crate::session::Lifeline>,
        answer: &Answer<'_>,
    ) -> Result<Response<Body>, Failure> {
        out.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        let (mut sender, conn) = pool::connect_http1(dest, self.settings.connect_timeout).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = match tokio::time::timeout(self.settings.response_timeout, sender.send_request(out)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(e)) => return Err(classify(e)),
            Ok(Ok(r)) => r,
        };
        let (mut parts, body) = resp.into_parts();
        answer.head(&mut parts.headers, false);
        Ok(Response::from_parts(parts, watched(Body::Direct(body), line)))
    }

    /// A WebSocket request: on its own connection (never pooled), spliced to the client's
    /// once the upstream agrees to switch protocols.
    async fn upgrade(
        &self,
        dest: Dest<'_>,
        out: Request<UpstreamBody>,
        client_upgrade: impl std::future::Future<Output = Result<crate::body::wire::Upgraded, ()>> + Send + 'static,
        line: Option<crate::session::Lifeline>,
        grant: crate::session::grant::Grant,
        answer: &Answer<'_>,
    ) -> Result<Response<Body>, Failure> {
        let (mut sender, conn) = pool::connect_http1(dest, self.settings.connect_timeout).await?;
        tokio::spawn(async move {
            let _ = (*std::pin::Pin::into_inner(conn)).with_upgrades().await;
        });
        let mut resp = match tokio::time::timeout(self.settings.response_timeout, sender.send_request(out)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(e)) => return Err(classify(e)),
            Ok(Ok(r)) => r,
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = resp.into_parts();
            answer.head(&mut parts.headers, false);
            return Ok(Response::from_parts(parts, watched(Body::Direct(body), line)));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let open = crate::metrics::Held::new(&self.metrics.websockets);
        tokio::spawn(async move {
            let _open = open;
            if let (Ok(a), Ok(b)) = (client_upgrade.await, upstream_upgrade.await) {
                let (mut a, mut b) = (a, TokioIo::new(b));
                let splice = tokio::io::copy_bidirectional(&mut a, &mut b);
                // The connection ends with its session or its access (both sides are dropped).
                tokio::select! {
                    _ = splice => {}
                    why = grant.ended() => tracing::info!(why, "WebSocket closed by the gateway"),
                }
            }
        });
        let (mut parts, _) = resp.into_parts();
        answer.head(&mut parts.headers, true);
        Ok(Response::from_parts(parts, Body::empty()))
    }
}

/// What an app's answer head goes through before the user gets it.
struct Answer<'a> {
    /// The app is routed by path: it shares the portal's origin.
    shared: bool,
    rewrite: Option<Rewrite<'a>>,
}

impl Answer<'_> {
    fn head(&self, headers: &mut HeaderMap, upgrade: bool) {
        clean_response_headers(headers, upgrade, self.shared);
        if let Some(r) = &self.rewrite {
            r.apply(headers);
        }
    }
}

/// `path` without its first `n` segments (from the slash after them on). Routing matched the
/// prefix on the case-folded path, which may differ from `path` in length (a letter folded to
/// ASCII, dots and spaces dropped at a segment's end) but never in its segments.
fn after_segments(path: &str, n: usize) -> &str {
    path.match_indices('/').nth(n).map_or("/", |(i, _)| &path[i..])
}

/// A response body for a session ends with the session.
fn watched(body: Body, line: Option<crate::session::Lifeline>) -> Body {
    match line {
        Some(line) => Body::watched(body, line),
        None => body,
    }
}

fn is_websocket(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Drops hop-by-hop headers from an upstream response, and any attempt by an app to set
/// poort's own cookies (an app on the portal host could otherwise fix a session).
fn clean_response_headers(headers: &mut HeaderMap, upgrade: bool, shares_portal_origin: bool) {
    if shares_portal_origin {
        // Powers over the whole origin, which an app routed by path shares with the portal: a
        // service worker for `/` would see every portal page and sign-in form; clearing the
        // site's data would sign the user out; the portal's own opener policy would let the
        // app's page keep its hold on a portal page it opened.
        headers.remove(SERVICE_WORKER_ALLOWED);
        headers.remove(CLEAR_SITE_DATA);
        headers.remove(CROSS_ORIGIN_OPENER_POLICY);
    }
    // One look at the names first: an ordinary response has nothing to remove.
    let suspicious = headers.iter().any(|(name, value)| {
        HOP_BY_HOP.contains(&name.as_str())
            || (name == header::SET_COOKIE && value.as_bytes().trim_ascii_start().starts_with(b"__Host-poort"))
    });
    if !suspicious {
        return;
    }
    let named = connection_named(headers);
    for n in named {
        if !(upgrade && n == "upgrade") {
            headers.remove(n.as_str());
        }
    }
    // Connection and Upgrade stay on a switch of protocols; below.
    for h in HOP_BY_HOP.iter().filter(|h| !matches!(**h, "connection" | "upgrade")) {
        headers.remove(*h);
    }
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    let cookies: Vec<HeaderValue> = headers.get_all(header::SET_COOKIE).iter().cloned().collect();
    if cookies.iter().any(|v| v.as_bytes().trim_ascii_start().starts_with(b"__Host-poort")) {
        headers.remove(header::SET_COOKIE);
        for v in cookies {
            if !v.as_bytes().trim_ascii_start().starts_with(b"__Host-poort") {
                headers.append(header::SET_COOKIE, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::headers::{FORWARDED, never_forwarded};
    use http::header::HeaderName;

    #[test]
    fn apps_cannot_set_poorts_cookies() {
        let mut h = HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("__Host-poort=planted; Path=/; Secure"));
        h.append(header::SET_COOKIE, HeaderValue::from_static(" __Host-poort-csrf=x; Path=/; Secure"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("app_session=1; Path=/"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-internal"));
        h.append("x-internal", HeaderValue::from_static("secret"));
        h.append("keep-alive", HeaderValue::from_static("timeout=5"));
        clean_response_headers(&mut h, false, false);
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, [HeaderValue::from_static("app_session=1; Path=/")]);
        assert!(h.get("x-internal").is_none() && h.get("keep-alive").is_none() && h.get(header::CONNECTION).is_none());
    }

    #[test]
    fn a_prefix_is_stripped_by_segments() {
        assert_eq!(after_segments("/app/x/y", 1), "/x/y");
        assert_eq!(after_segments("/app/", 1), "/");
        assert_eq!(after_segments("/a/b/c", 2), "/c");
        // Spellings that route to `/kiosk/` but are longer or shorter than it.
        assert_eq!(after_segments("/kios\u{212a}/x", 1), "/x");
        assert_eq!(after_segments("/KIOSK. /x", 1), "/x");
    }

    #[test]
    fn only_apps_on_the_portal_origin_lose_origin_wide_headers() {
        let answer = || {
            let mut h = HeaderMap::new();
            h.insert(SERVICE_WORKER_ALLOWED, HeaderValue::from_static("/"));
            h.insert(CLEAR_SITE_DATA, HeaderValue::from_static("\"cookies\""));
            h.insert(CROSS_ORIGIN_OPENER_POLICY, HeaderValue::from_static("same-origin"));
            h
        };
        let mut shared = answer();
        clean_response_headers(&mut shared, false, true);
        assert!(shared.is_empty());
        let mut own = answer();
        clean_response_headers(&mut own, false, false);
        assert_eq!(own.len(), 3, "an app on its own host keeps its origin's powers");
    }

    #[test]
    fn the_allowlist_is_sorted() {
        assert!(FORWARDED.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn only_allowed_names_are_forwarded() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("accept", "text/html"),
            ("authorization", "Bearer app-token"),
            ("x-csrftoken", "t"),
            ("x-webauth-user", "admin"),
            ("remote-user", "admin"),
            ("x-http-method-override", "DELETE"),
            ("x-middleware-subrequest", "middleware"),
            ("content-length", "5"),
            ("x-api-key", "k"),
            ("cookie", "app=1; __Host-poort=secret"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = allowed_headers(&h, &[HeaderName::from_static("x-api-key")]);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort();
        assert_eq!(names, ["accept", "authorization", "cookie", "x-api-key", "x-csrftoken"]);
        assert_eq!(out.get(header::COOKIE).unwrap(), "app=1");
        for n in ["x-poort-user", "X_Poort_User", "x_forwarded_for", "transfer_encoding", "Content_Length", "forwarded"]
        {
            assert!(never_forwarded(n), "{n}");
        }
        assert!(!never_forwarded("x-api-key"));
    }

    proptest::proptest! {
        /// Whatever names a client sends, only the allowed ones arrive.
        #[test]
        fn unknown_names_never_arrive(names in proptest::collection::vec("[a-zA-Z][a-zA-Z0-9_-]{0,24}", 1..30)) {
            let mut h = HeaderMap::new();
            for n in &names {
                if let Ok(name) = HeaderName::from_bytes(n.as_bytes()) {
                    h.append(name, HeaderValue::from_static("v"));
                }
            }
            let out = allowed_headers(&h, &[]);
            for name in out.keys() {
                proptest::prop_assert!(FORWARDED.contains(&name.as_str()) || name == header::COOKIE, "{}", name);
            }
        }
    }
}

//! The reverse proxy: forwards a permitted request to its app over pooled keep-alive
//! connections, with the upstream request built by rule 5 (client identity and control headers
//! stripped by normalised name, hop-by-hop headers dropped, poort's identity headers and signed
//! assertion added last, poort's cookies never forwarded). Bodies stream both ways.

pub mod assertion;
mod pool;

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::Body;
use crate::clock::UnixTime;
use crate::config::{App, ProxySettings, Route, Upstream};
use crate::identity::Identity;
use crate::policy::Permit;
use crate::request::Target;
use crate::session::{Session, cookie};

pub use assertion::Signer;
pub use pool::PooledBody;

type UpstreamBody = Limited<Incoming>;

/// Why a forward failed; each maps to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The upstream refused or broke the connection: 502.
    Unreachable,
    /// The upstream did not answer in time: 504.
    Timeout,
    /// The request body was larger than allowed: 413.
    TooLarge,
    /// The client's body was malformed (bad chunk framing): 400.
    BadBody,
}

impl Failure {
    pub fn status(self) -> StatusCode {
        match self {
            Failure::Unreachable => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Failure::BadBody => StatusCode::BAD_REQUEST,
        }
    }
}

thread_local! {
    /// The worker this thread serves as, if it is one (server::start).
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Marks the calling thread as worker `i`: its requests use the worker's own upstream pool.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(Some(i)));
}

pub struct Proxy {
    pools: pool::Pools,
    settings: ProxySettings,
    signer: Arc<Signer>,
    /// Where the built-in demo app listens, when an app uses it.
    whoami: Option<String>,
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
    pub session: Option<&'a Session>,
    pub now: UnixTime,
}

const X_POORT_USER: HeaderName = HeaderName::from_static("x-poort-user");
const X_POORT_EMAIL: HeaderName = HeaderName::from_static("x-poort-email");
const X_POORT_GROUPS: HeaderName = HeaderName::from_static("x-poort-groups");
const X_POORT_ASSERTION: HeaderName = HeaderName::from_static("x-poort-assertion");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that belong to one connection (RFC 9110 §7.6.1), either way.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// Hop-by-hop request headers, and those that poort sets itself.
fn is_hop_or_own(name: &str) -> bool {
    HOP_BY_HOP.contains(&name) || matches!(name, "proxy-authorization" | "host" | "http2-settings")
}

/// Headers a client could use to claim an identity, an address or a different URL. Matched
/// on the name with `_` read as `-` (HTTP names are already lower case here).
fn is_spoofable(name: &str) -> bool {
    let mut buf = [0u8; 64];
    let n = name.len().min(64);
    for (d, s) in buf[..n].iter_mut().zip(name.bytes()) {
        *d = if s == b'_' { b'-' } else { s };
    }
    let norm = std::str::from_utf8(&buf[..n]).unwrap_or("");
    const PREFIXES: [&str; 5] = ["x-poort", "x-forwarded-", "x-auth-request-", "x-remote-", "x-original-"];
    const EXACT: [&str; 11] = [
        "forwarded",
        "x-real-ip",
        "x-rewrite-url",
        "x-client-ip",
        "true-client-ip",
        "client-ip",
        "x-cluster-client-ip",
        "remote-user",
        "x-user",
        "x-email",
        "x-groups",
    ];
    name.len() > 64 || PREFIXES.iter().any(|p| norm.starts_with(p)) || EXACT.contains(&norm)
}

/// Names listed in `Connection` values: also hop-by-hop (the CVE-2022-1388 pattern).
fn connection_named(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

impl Proxy {
    pub fn new(settings: ProxySettings, workers: usize, signer: Arc<Signer>, whoami: Option<String>) -> Proxy {
        let pools = pool::Pools::new(workers, settings.connect_timeout);
        Proxy { pools, settings, signer, whoami }
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    fn assertion(
        &self,
        app: &App,
        app_index: usize,
        who: &Identity,
        session: Option<&Session>,
        now: UnixTime,
    ) -> Option<HeaderValue> {
        if let Some(s) = session {
            if let Ok(cache) = s.assertions.lock() {
                if let Some((_, _, jwt)) =
                    cache.iter().find(|(a, iat, _)| *a == app_index && now - iat < assertion::REUSE_FOR && *iat <= now)
                {
                    return Some(jwt.clone());
                }
            }
        }
        let amr: Vec<&str> = session.map(Session::amr).unwrap_or_default();
        // Kept as a header value, so that a reused assertion is not checked again per request.
        let jwt = match self.signer.sign(&app.name, who, &amr, now).map(HeaderValue::try_from) {
            Ok(Ok(j)) => j,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "A signed assertion is not a valid header value");
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "Signing an assertion failed");
                return None;
            }
        };
        if let Some(s) = session {
            if let Ok(mut cache) = s.assertions.lock() {
                cache.retain(|(a, iat, _)| *a != app_index && now - iat < assertion::REUSE_FOR);
                cache.push((app_index, now, jwt.clone()));
            }
        }
        Some(jwt)
    }

    /// Forwards `req` to the app the permit names. The permit is consumed: one permit, one
    /// upstream request.
    pub async fn forward(
        &self,
        permit: Permit,
        app: &App,
        target: &Target,
        origin: Origin<'_>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Failure> {
        let websocket = is_websocket(req.version(), req.headers());
        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();

        let (authority, base) = match &app.upstream {
            Upstream::Http { authority, base_path } => (authority.as_str(), base_path.as_str()),
            Upstream::Whoami => (self.whoami.as_deref().ok_or(Failure::Unreachable)?, ""),
        };
        let path = match &app.route {
            Route::Path { prefix, strip: true } => &target.path()[prefix.len() - 1..],
            _ => target.path(),
        };
        // Origin form: the connection already goes to the upstream, and Host names it.
        let mut uri = String::with_capacity(base.len() + path.len() + 32);
        uri.push_str(base);
        uri.push_str(&target.forward_form(path));

        let mut headers = HeaderMap::with_capacity(parts.headers.len() + 8);
        let named = connection_named(&parts.headers);
        let mut cookies: Vec<String> = Vec::new();
        for (name, value) in &parts.headers {
            let n = name.as_str();
            if is_hop_or_own(n) || is_spoofable(n) || named.iter().any(|x| x == n) {
                continue;
            }
            if name == header::COOKIE {
                cookies.extend(cookie::without_poort(value.as_bytes()));
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        if !cookies.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&cookies.join("; ")) {
                headers.insert(header::COOKIE, v);
            }
        }
        let value = |s: &str| HeaderValue::from_str(s).ok();
        headers.insert(header::HOST, value(authority).ok_or(Failure::Unreachable)?);
        if let Some(v) = value(&origin.client.to_string()) {
            headers.insert(X_FORWARDED_FOR, v);
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        if let Some(v) = value(origin.host) {
            headers.insert(X_FORWARDED_HOST, v);
        }
        if websocket {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        // Identity last, so nothing above can have set it.
        if let Some(session) = origin.session {
            let who = &session.identity;
            if let Some(v) = value(&who.user) {
                headers.insert(X_POORT_USER, v);
            }
            if let Some(v) = who.email.as_deref().and_then(value) {
                headers.insert(X_POORT_EMAIL, v);
            }
            if let Some(v) = value(&who.groups.join(",")) {
                headers.insert(X_POORT_GROUPS, v);
            }
            let jwt = self.assertion(app, permit.app(), who, Some(session), origin.now).ok_or(Failure::Unreachable)?;
            headers.insert(X_POORT_ASSERTION, jwt);
        }

        let mut out = Request::builder().method(parts.method).uri(uri).version(Version::HTTP_11);
        if let Some(h) = out.headers_mut() {
            *h = headers;
        }
        let out =
            out.body(Limited::new(body, self.settings.max_body_bytes as usize)).map_err(|_| Failure::Unreachable)?;
        if let Some(client_upgrade) = client_upgrade {
            return self.upgrade(authority, out, client_upgrade).await;
        }
        let worker = WORKER.with(|w| w.get());
        let resp =
            match tokio::time::timeout(self.settings.response_timeout, self.pools.send(worker, authority, out)).await {
                Err(_) => return Err(Failure::Timeout),
                Ok(r) => r?,
            };
        let (mut parts, body) = resp.into_parts();
        clean_response_headers(&mut parts.headers, false);
        Ok(Response::from_parts(parts, Body::Upstream(body)))
    }

    /// A WebSocket request: on its own connection (never pooled), spliced to the client's
    /// once the upstream agrees to switch protocols.
    async fn upgrade(
        &self,
        authority: &str,
        out: Request<UpstreamBody>,
        client_upgrade: hyper::upgrade::OnUpgrade,
    ) -> Result<Response<Body>, Failure> {
        let (mut sender, conn) = pool::connect(authority, self.settings.connect_timeout).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut resp = match tokio::time::timeout(self.settings.response_timeout, sender.send_request(out)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(e)) => return Err(classify(&e)),
            Ok(Ok(r)) => r,
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = resp.into_parts();
            clean_response_headers(&mut parts.headers, false);
            return Ok(Response::from_parts(parts, Body::Direct(body)));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(a), Ok(b)) = (client_upgrade.await, upstream_upgrade.await) {
                let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            }
        });
        let (mut parts, _) = resp.into_parts();
        clean_response_headers(&mut parts.headers, true);
        Ok(Response::from_parts(parts, Body::empty()))
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
fn clean_response_headers(headers: &mut HeaderMap, upgrade: bool) {
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

fn classify(e: &hyper::Error) -> Failure {
    let chain = || {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
        std::iter::from_fn(move || {
            let cur = next?;
            next = cur.source();
            Some(cur)
        })
    };
    if chain().any(|s| s.downcast_ref::<http_body_util::LengthLimitError>().is_some()) {
        return Failure::TooLarge;
    }
    // The request body stream (the client's body) failed while it was being forwarded: bad
    // chunk framing or a body cut short.
    if chain().any(|s| s.downcast_ref::<hyper::Error>().is_some_and(|e| e.is_user())) {
        return Failure::BadBody;
    }
    if chain().any(|s| s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)) {
        return Failure::Timeout;
    }
    Failure::Unreachable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_cannot_set_poorts_cookies() {
        let mut h = HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("__Host-poort=planted; Path=/; Secure"));
        h.append(header::SET_COOKIE, HeaderValue::from_static(" __Host-poort-csrf=x; Path=/; Secure"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("app_session=1; Path=/"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-internal"));
        h.append("x-internal", HeaderValue::from_static("secret"));
        h.append("keep-alive", HeaderValue::from_static("timeout=5"));
        clean_response_headers(&mut h, false);
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies, [HeaderValue::from_static("app_session=1; Path=/")]);
        assert!(h.get("x-internal").is_none() && h.get("keep-alive").is_none() && h.get(header::CONNECTION).is_none());
    }

    #[test]
    fn spoofable_names() {
        for n in [
            "x-poort-user",
            "x_poort_user",
            "x-poort_groups",
            "x-forwarded-user",
            "x_forwarded_for",
            "forwarded",
            "x-real-ip",
            "x-original-url",
            "x-rewrite-url",
            "x-auth-request-email",
            "remote-user",
            "remote_user",
        ] {
            assert!(is_spoofable(n), "{n}");
        }
        for n in ["accept", "authorization", "content-type", "x-request-id", "user-agent"] {
            assert!(!is_spoofable(n), "{n}");
        }
    }
}

//! Forward-auth: `/.poort/auth`, which a proxy in front of an app (nginx `auth_request`,
//! Traefik `forwardAuth`, Caddy `forward_auth`) asks before it lets a request through. The
//! answer applies what poort applies to the apps it proxies itself, in the same order: the
//! emergency rules on the original request, the session issued for the app's host, the app's
//! access policy and second factor. A request that may pass gets 200 with the identity
//! headers for the proxy to copy to the app; one that needs a sign-in 401 with a `Location`
//! to start it (or, with `?redirect=1`, a 302 there); one that may not pass 403.
//!
//! The original request comes from the proxy's headers, believed only from an address in
//! `[server] trusted_proxies`: any other caller is refused.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::Gateway;
use crate::body::Body;
use crate::mitigate;
use crate::policy::{self, Decision, Resource, Subject};
use crate::portal::routes::{self, Page};
use crate::request::{Target, parse_host};
use crate::respond::{At, Refusal, error_page, page, redirect};
use crate::route::Found;
use crate::session;
use crate::state::Ctx;

/// The request a proxy asks about.
#[derive(Debug, PartialEq, Eq)]
struct Original {
    host: String,
    method: String,
    /// Origin form: path and query, as the client sent them.
    uri: String,
}

/// Reads the original request from a proxy's headers: `X-Original-URL` (an absolute URL), or
/// the host from `X-Forwarded-Host` (else `Host`) and the target from `X-Forwarded-Uri` or
/// `X-Original-URI`; the method from `X-Forwarded-Method` or `X-Original-Method` (else GET).
fn original(headers: &HeaderMap, host: &str) -> Result<Original, &'static str> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    let method = get("x-forwarded-method").or_else(|| get("x-original-method")).unwrap_or("GET");
    if method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("forward_auth_method");
    }
    let (host, uri) = match get("x-original-url") {
        Some(url) => {
            let rest =
                url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).ok_or("forward_auth_url")?;
            match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            }
        }
        None => (
            get("x-forwarded-host").unwrap_or(host),
            get("x-forwarded-uri").or_else(|| get("x-original-uri")).ok_or("forward_auth_no_uri")?,
        ),
    };
    let host = parse_host(host.as_bytes()).map_err(|_| "forward_auth_host")?;
    Ok(Original { host, method: method.to_string(), uri: uri.to_string() })
}

fn malformed(code: &'static str) -> Refusal {
    Refusal::Malformed { status: StatusCode::BAD_REQUEST, code }
}

impl Gateway {
    /// GET `/.poort/auth` (route::Found::ForwardAuth).
    pub(super) async fn forward_auth(&self, ctx: Ctx, req: Request<Incoming>) -> Response<Body> {
        let st = &self.state;
        let call = match routes::admit(st, ctx, routes::row_of(Page::ForwardAuth), req).await {
            Ok(call) => call,
            Err(refused) => return refused,
        };
        let ctx = &call.ctx;
        let headers = &call.head.headers;
        if !trusted(&st.cfg.server.trusted_proxies, ctx.peer) {
            tracing::warn!(peer = %ctx.peer, "A forward-auth request from an address not in [server] trusted_proxies; refused");
            let refusal =
                Refusal::Denied { resource: "forward-auth".into(), reason: "the caller is not a trusted proxy".into() };
            return self.refuse(ctx.at(), refusal).await;
        }
        let orig = match original(headers, &ctx.front.host) {
            Ok(o) => o,
            Err(code) => return self.refuse(ctx.at(), malformed(code)).await,
        };
        // The same canonical form the front door makes of a request poort serves itself.
        let Ok(target) = Target::parse(&orig.uri) else {
            return self.refuse(ctx.at(), malformed("forward_auth_target")).await;
        };
        let app = match self.routes.find_target(&orig.host, &target) {
            Found::App(i) | Found::AddSlash(i) => &st.cfg.apps[i],
            _ => return self.refuse(ctx.at(), Refusal::NoRoute).await,
        };
        let path = target.path();
        let facts = mitigate::Facts::of(&orig.method, &target, &orig.uri, headers, ctx.client, Some(&app.name));
        if let Err(refusal) = self.rules(&facts, path, ctx.client, ctx.id).await {
            return self.refuse(At { sample: path, ..ctx.at() }, refusal).await;
        }
        // The session the browser holds for the app's host; a command-line one opens tunnels
        // only.
        let session =
            if orig.host == ctx.front.host { ctx.session.clone() } else { self.session_for(headers, &orig.host).await };
        let session = session.filter(|s| s.kind == session::Kind::Browser);
        let at = At { id: ctx.id, client: ctx.client, sample: path, session: session.as_deref() };
        let who = session.as_ref().map(|s| Subject { identity: &s.identity, mfa: s.mfa() });
        match policy::evaluate(Resource::App(&app.name), &app.access, app.mfa, who) {
            Decision::Allow(permit) => {
                if let Err(refusal) = self.first_access(session.as_deref(), &app.name, ctx.client).await {
                    return self.refuse(at, refusal).await;
                }
                match self.proxy.vouch(permit, app, session.as_deref(), st.clock.now()) {
                    Ok(identity) => {
                        let mut resp = page(StatusCode::OK, "text/plain; charset=utf-8", Body::empty());
                        resp.headers_mut().extend(identity);
                        no_store(resp)
                    }
                    Err(failure) => self.refuse(at, Refusal::Upstream(failure)).await,
                }
            }
            Decision::Authenticate { step_up } => {
                let port = crate::config::port_suffix(&st.cfg.server.external_origin);
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("next", &target.forward_form(path));
                if step_up {
                    query.append_pair("step_up", "1");
                }
                let signin = format!("https://{}{port}/.poort/signin?{}", orig.host, query.finish());
                let navigation = matches!(orig.method.as_str(), "GET" | "HEAD")
                    && headers
                        .get_all(header::ACCEPT)
                        .iter()
                        .any(|v| v.as_bytes().windows(9).any(|w| w == b"text/html"));
                let wants_redirect =
                    call.ctx.front.target.query().is_some_and(|q| {
                        form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "redirect" && v == "1")
                    });
                if wants_redirect && navigation {
                    return no_store(redirect(StatusCode::FOUND, &signin));
                }
                let mut resp = error_page(StatusCode::UNAUTHORIZED, ctx.id);
                if let Ok(v) = HeaderValue::from_str(&signin) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                no_store(resp)
            }
            Decision::Deny(reason) => {
                let denied = Refusal::Denied { resource: app.name.clone(), reason: reason.to_string() };
                self.refuse(at, denied).await
            }
        }
    }
}

fn trusted(proxies: &[ipnet::IpNet], peer: IpAddr) -> bool {
    proxies.iter().any(|n| n.contains(&peer))
}

/// A forward-auth answer is about one request: no cache may keep it.
fn no_store(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn each_proxys_way_of_telling_the_original_request_is_read() {
        let o = |host: &str, method: &str, uri: &str| Original {
            host: host.into(),
            method: method.into(),
            uri: uri.into(),
        };
        // nginx, as docs/forward-auth.md sets it up: Host is the app's.
        let nginx = headers(&[("x-original-uri", "/wiki/Page?x=1"), ("x-original-method", "POST")]);
        assert_eq!(original(&nginx, "wiki.example.com"), Ok(o("wiki.example.com", "POST", "/wiki/Page?x=1")));
        // Traefik and Caddy: X-Forwarded-*; Host may be poort's own.
        let traefik = headers(&[
            ("x-forwarded-host", "Wiki.Example.com:443"),
            ("x-forwarded-uri", "/a"),
            ("x-forwarded-method", "GET"),
        ]);
        assert_eq!(original(&traefik, "gate.example.com"), Ok(o("wiki.example.com", "GET", "/a")));
        let url = headers(&[("x-original-url", "https://wiki.example.com/b?c")]);
        assert_eq!(original(&url, "gate.example.com"), Ok(o("wiki.example.com", "GET", "/b?c")));
        // Without the target there is nothing to decide on.
        assert_eq!(original(&headers(&[]), "wiki.example.com"), Err("forward_auth_no_uri"));
        for bad in [
            headers(&[("x-original-uri", "/"), ("x-original-method", "get")]),
            headers(&[("x-original-url", "ftp://wiki.example.com/")]),
            headers(&[("x-forwarded-uri", "/"), ("x-forwarded-host", "wiki.example.com/../x")]),
        ] {
            assert!(original(&bad, "wiki.example.com").is_err(), "{bad:?}");
        }
    }
}

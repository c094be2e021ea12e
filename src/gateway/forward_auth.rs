//! Forward-auth: `/.poort/auth`, which a proxy in front of an app (nginx `auth_request`,
//! Traefik `forwardAuth`, Caddy `forward_auth`) asks before it lets a request through. The
//! answer applies what poort applies to the apps it proxies itself, in the same order: the
//! emergency rules on the original request, the session issued for the app's host, the app's
//! access policy and second factor. A request that may pass gets 200 with the identity
//! headers for the proxy to copy to the app; one that needs a sign-in 401 with a `Location`
//! to start it (or, with `redirect=1`, a 302 there); one that may not pass 403.
//!
//! What is judged comes only from what the proxy itself decides, never from a header its
//! client could have sent along:
//! - the app: `app=NAME` in the URL the proxy is configured to ask, else the `Host` of the
//!   question (which the front door checked against the TLS name); only an app declared with
//!   `forward_auth = true`;
//! - the target and method: `X-Forwarded-Uri` and `X-Forwarded-Method`, each exactly once.
//!   Every supported proxy sets both, replacing what a client sent (nginx by the
//!   `proxy_set_header` lines of docs/forward-auth.md); no other header is read.
//!
//! Only a caller in `[server] trusted_proxies` is answered.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};

use super::Gateway;
use crate::body::{Body, RequestBody};
use crate::config::{App, Route, Upstream};
use crate::mitigate;
use crate::policy::{self, Decision, Resource, Subject};
use crate::portal::routes::{self, Page};
use crate::request::Target;
use crate::respond::{At, Refusal, error_page, page, redirect};
use crate::session;
use crate::state::Ctx;

/// The one value of a header the proxy sets; an error if it is missing or sent twice.
fn single<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, &'static str> {
    let mut values = headers.get_all(name).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err("forward_auth_header");
    };
    v.to_str().map(str::trim).map_err(|_| "forward_auth_header")
}

/// The method and target the proxy asks about.
fn original(headers: &HeaderMap) -> Result<(&str, &str), &'static str> {
    // A request that asks the app to take it for another method would be judged as one and
    // served as the other; poort never passes these to apps it proxies itself.
    if ["x-http-method-override", "x-http-method", "x-method-override"].iter().any(|h| headers.contains_key(*h)) {
        return Err("forward_auth_method_override");
    }
    let method = single(headers, "x-forwarded-method")?;
    if method.is_empty() || method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("forward_auth_method");
    }
    let uri = single(headers, "x-forwarded-uri")?;
    if !uri.starts_with('/') {
        return Err("forward_auth_uri");
    }
    Ok((method, uri))
}

/// The app a question is about: named in the question's URL, else the one on its host. Only
/// apps served by a proxy that asks (`forward_auth = true`).
fn app_of<'a>(apps: &'a [App], host: &str, query: Option<&str>) -> Option<&'a App> {
    let named = query.and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "app").map(|(_, v)| v));
    let app = match named {
        Some(name) => apps.iter().find(|a| a.name == name)?,
        None => apps.iter().find(|a| a.route == Route::Host(host.to_string()))?,
    };
    (app.upstream == Upstream::ForwardAuth).then_some(app)
}

fn malformed(code: &'static str) -> Refusal {
    Refusal::Malformed { status: StatusCode::BAD_REQUEST, code }
}

impl Gateway {
    /// GET `/.poort/auth` (route::Found::ForwardAuth).
    pub(super) async fn forward_auth(&self, ctx: Ctx, req: Request<RequestBody>) -> Response<Body> {
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
        let query = ctx.front.target.query();
        let Some(app) = app_of(&st.cfg.apps, &ctx.front.host, query) else {
            return self.refuse(ctx.at(), Refusal::NoRoute).await;
        };
        let Route::Host(app_host) = &app.route else {
            return self.refuse(ctx.at(), Refusal::NoRoute).await;
        };
        let (method, uri) = match original(headers) {
            Ok(o) => o,
            Err(code) => return self.refuse(ctx.at(), malformed(code)).await,
        };
        // The same canonical form the front door makes of a request poort serves itself.
        let Ok(target) = Target::parse(uri) else {
            return self.refuse(ctx.at(), malformed("forward_auth_target")).await;
        };
        let path = target.path();
        let facts = mitigate::Facts::of(method, &target, uri, headers, ctx.client, Some(&app.name));
        if let Err(refusal) = self.rules(&facts, path, ctx.client, ctx.id).await {
            return self.refuse(At { sample: path, ..ctx.at() }, refusal).await;
        }
        // The session the browser holds for the app's host; a command-line one opens tunnels
        // only.
        let session =
            if *app_host == ctx.front.host { ctx.session.clone() } else { self.session_for(headers, app_host).await };
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
                // A path on the app's own origin, as the browser sees it through the proxy:
                // the proxy's port is not poort's to know.
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("next", &target.forward_form(path));
                if step_up {
                    query.append_pair("step_up", "1");
                }
                let signin = format!("/.poort/signin?{}", query.finish());
                let navigation = matches!(method, "GET" | "HEAD")
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
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_the_headers_proxies_set_are_read_and_each_once() {
        let ok = headers(&[("x-forwarded-uri", "/wiki/Page?x=1"), ("x-forwarded-method", "POST")]);
        assert_eq!(original(&ok), Ok(("POST", "/wiki/Page?x=1")));
        for bad in [
            // What a client could add beside them is not read: without the proxy's, nothing.
            headers(&[
                ("x-original-url", "https://pub.example/"),
                ("x-original-uri", "/"),
                ("x-original-method", "GET"),
            ]),
            headers(&[("x-forwarded-uri", "/a"), ("x-forwarded-uri", "/b"), ("x-forwarded-method", "GET")]),
            headers(&[("x-forwarded-uri", "/a"), ("x-forwarded-method", "GET"), ("x-forwarded-method", "DELETE")]),
            headers(&[("x-forwarded-uri", "/a"), ("x-forwarded-method", "get")]),
            headers(&[("x-forwarded-uri", "https://x.example/a"), ("x-forwarded-method", "GET")]),
            headers(&[("x-forwarded-uri", "/a")]),
            headers(&[("x-forwarded-uri", "/a"), ("x-forwarded-method", "POST"), ("x-http-method-override", "DELETE")]),
        ] {
            assert!(original(&bad).is_err(), "{bad:?}");
        }
    }
}

//! The headers poort itself sets on upstream requests and strips from answers, and the
//! upstream request's headers built from the client's by the allowlist (request::headers).

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

use crate::request::headers::{FORWARDED, connection_named};
use crate::session::cookie;

pub(super) const X_POORT_USER: HeaderName = HeaderName::from_static("x-poort-user");
pub(super) const X_POORT_EMAIL: HeaderName = HeaderName::from_static("x-poort-email");
pub(super) const X_POORT_GROUPS: HeaderName = HeaderName::from_static("x-poort-groups");
pub(super) const X_POORT_ASSERTION: HeaderName = HeaderName::from_static("x-poort-assertion");
pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(super) const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
pub(super) const SERVICE_WORKER_ALLOWED: HeaderName = HeaderName::from_static("service-worker-allowed");
pub(super) const CLEAR_SITE_DATA: HeaderName = HeaderName::from_static("clear-site-data");
pub(super) const CROSS_ORIGIN_OPENER_POLICY: HeaderName = HeaderName::from_static("cross-origin-opener-policy");

/// The headers of the upstream request, from the client's: only allowed names, no poort
/// cookies. Framing, Host, forwarding and identity headers are added by the caller.
pub fn allowed_headers(incoming: &HeaderMap, extra: &[HeaderName]) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(incoming.len() + 12);
    let mut cookies: Vec<String> = Vec::new();
    // Names the client's `Connection` lists belong to its connection with poort only.
    let named = if incoming.contains_key(header::CONNECTION) { connection_named(incoming) } else { Vec::new() };
    for (name, value) in incoming {
        if named.iter().any(|n| n == name.as_str()) {
            continue;
        }
        if name == header::COOKIE {
            cookies.extend(cookie::without_poort(value.as_bytes()));
        } else if FORWARDED.binary_search(&name.as_str()).is_ok() || extra.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    if !cookies.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cookies.join("; "))
    {
        out.insert(header::COOKIE, v);
    }
    out
}

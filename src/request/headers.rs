//! Which request headers may reach an app: the names every app gets, the names that belong to
//! one connection, and the names no app may ask for. Pure; config validation and the proxy
//! both read it.

use http::HeaderMap;
use http::header;

/// Headers that belong to one connection (RFC 9110 §7.6.1), either way.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// The request headers every app receives when a client sends them: the end-to-end fields of
/// RFC 9110 that browsers and API clients use (content negotiation, conditional and range
/// requests, caching, the app's own authorization and CSRF tokens, fetch metadata, tracing),
/// and the WebSocket handshake. Anything else (identity claims such as `Remote-User` or
/// `X-WEBAUTH-USER`, address claims, method overrides, server-internal headers) reaches an app
/// only if its `forward_headers` names it. Sorted, for a binary search per header.
pub const FORWARDED: &[&str] = &[
    "accept",
    "accept-encoding",
    "accept-language",
    "authorization",
    "cache-control",
    "content-encoding",
    "content-language",
    "content-type",
    "dnt",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "origin",
    "pragma",
    "priority",
    "range",
    "referer",
    "sec-ch-ua",
    "sec-ch-ua-mobile",
    "sec-ch-ua-platform",
    "sec-fetch-dest",
    "sec-fetch-mode",
    "sec-fetch-site",
    "sec-fetch-user",
    "sec-websocket-extensions",
    "sec-websocket-key",
    "sec-websocket-protocol",
    "sec-websocket-version",
    "traceparent",
    "tracestate",
    "upgrade-insecure-requests",
    "user-agent",
    "x-csrf-token",
    "x-csrftoken",
    "x-requested-with",
    "x-xsrf-token",
    "x-xsrftoken",
];

/// Names no app may ask for in `forward_headers` (compared with `_` read as `-`): framing,
/// connection control, and the identity and address headers poort itself sets or strips.
pub fn never_forwarded(name: &str) -> bool {
    let norm: String = name.bytes().map(|b| if b == b'_' { '-' } else { b.to_ascii_lowercase() as char }).collect();
    HOP_BY_HOP.contains(&norm.as_str())
        || matches!(
            norm.as_str(),
            "host" | "content-length" | "cookie" | "expect" | "forwarded" | "x-real-ip" | "proxy-authorization"
        )
        || ["x-poort", "x-forwarded-"].iter().any(|p| norm.starts_with(p))
}

/// Names listed in `Connection` values: also hop-by-hop (the CVE-2022-1388 pattern).
pub fn connection_named(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

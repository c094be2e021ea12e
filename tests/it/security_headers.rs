//! Trust taken from headers the client controls: identity, address and URL claims sent by a
//! client never reach an upstream, and never change who poort thinks the client is.

use crate::harness::Gate;

/// (header line, the name that must not arrive, what it imitates)
const SPOOFS: &[(&str, &str, &str)] = &[
    ("X-Poort-User: admin", "x-poort-user", "poort's identity header"),
    ("X_Poort_User: admin", "x_poort_user", "underscore spelling (oauth2-proxy CVE-2025-64484)"),
    ("x-POORT-user: admin", "x-poort-user", "odd case"),
    ("X-Poort_Groups: admins", "x-poort_groups", "mixed separators"),
    ("X-Poort-Assertion: eyJhbGciOiJub25lIn0.e30.", "x-poort-assertion", "an unsigned assertion"),
    ("X-Poort-Email: ceo@example.com", "x-poort-email", "email claim"),
    ("X-Forwarded-User: admin", "x-forwarded-user", "oauth2-proxy identity"),
    ("X_Forwarded_User: admin", "x_forwarded_user", "oauth2-proxy identity, underscores"),
    ("X-Forwarded-Email: ceo@example.com", "x-forwarded-email", "oauth2-proxy email"),
    ("X-Forwarded-Groups: admins", "x-forwarded-groups", "group claim"),
    ("X-Auth-Request-User: admin", "x-auth-request-user", "auth_request identity"),
    ("Remote-User: admin", "remote-user", "Authelia/CGI identity"),
    ("Remote_User: admin", "remote_user", "CGI identity, underscore"),
    ("X-Remote-User: admin", "x-remote-user", "Apache-style identity"),
    ("Forwarded: for=\"[127.0.0.1]:8888\";by=\"[127.0.0.1]:8888\"", "forwarded", "FortiOS CVE-2022-40684"),
    ("X-Real-IP: 127.0.0.1", "x-real-ip", "address claim"),
    ("True-Client-IP: 127.0.0.1", "true-client-ip", "CDN address claim"),
    ("X-Original-URL: /admin", "x-original-url", "URL rewrite header"),
    ("X-Rewrite-URL: /admin", "x-rewrite-url", "URL rewrite header"),
    ("X-Forwarded-Uri: /admin", "x-forwarded-uri", "forward-auth URL claim"),
    ("X-Forwarded-Prefix: /admin", "x-forwarded-prefix", "prefix claim"),
];

#[tokio::test]
async fn identity_address_and_url_claims_are_stripped() {
    let gate = Gate::start().await;
    let s = gate.login("bob").await;
    for (line, name, what) in SPOOFS {
        let req = format!(
            "GET /app/x HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\n{line}\r\nConnection: close\r\n\r\n"
        );
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert_eq!((status, hits), (Some(200), 1), "{what}");
        let seen = gate.upstream.last();
        let spoofed_value = line.split_once(": ").unwrap().1;
        for (k, v) in &seen.headers {
            assert!(!(k == name && v == spoofed_value), "{what}: {k}: {v} reached the upstream");
        }
        assert_eq!(seen.header("x-poort-user"), Some("bob"), "{what}");
        assert_eq!(seen.header("x-poort-groups"), Some(""), "{what}");
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"), "{what}");
    }
}

/// Anonymous requests with identity claims get no further than any anonymous request.
#[tokio::test]
async fn claims_without_a_session_open_nothing() {
    let gate = Gate::start().await;
    for (line, _, what) in SPOOFS {
        let req = format!(
            "GET /app/x HTTP/1.1\r\nHost: localhost\r\n{line}\r\nUser-Agent: Report Runner\r\nConnection: close\r\n\r\n"
        );
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert_eq!((status, hits), (Some(401), 0), "{what}");
    }
    // PAN-OS CVE-2024-0012: a header that "turns the auth check off".
    let req = b"GET /app/ HTTP/1.1\r\nHost: localhost\r\nX-PAN-AUTHCHECK: off\r\nConnection: close\r\n\r\n";
    assert_eq!(gate.hostile(req).await, (Some(401), 0));
}

/// Hop-by-hop stripping cannot be used to remove poort's own headers (F5 CVE-2022-1388).
#[tokio::test]
async fn connection_cannot_strip_poorts_headers() {
    let gate = Gate::start().await;
    let s = gate.login("bob").await;
    for named in [
        "X-Poort-User",
        "X-Poort-Assertion",
        "X-Forwarded-For",
        "Host",
        "X-Poort-User, X-Poort-Groups, X-Poort-Assertion",
    ] {
        let req = format!(
            "GET /app/x HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nConnection: keep-alive, {named}\r\nConnection: close\r\n\r\n"
        );
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert_eq!((status, hits), (Some(200), 1), "{named}");
        let seen = gate.upstream.last();
        assert_eq!(seen.header("x-poort-user"), Some("bob"), "{named}");
        assert!(seen.header("x-poort-assertion").is_some(), "{named}");
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"), "{named}");
    }
}

/// X-Forwarded-For from a peer that is not a configured proxy is not believed.
#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    // A low login limit (one attempt every 12 s), so that a slow run cannot refill it.
    let gate = Gate::start_config("", "[login]\nper_address_per_minute = 5\n").await;
    let _ = gate
        .hostile(b"GET /pub/ HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 10.9.8.7\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(gate.upstream.last().header("x-forwarded-for"), Some("127.0.0.1"));
    // ...and so cannot dodge the per-address limits: 8 logins "from" 8 addresses are one.
    let mut last = 0;
    for i in 0..8 {
        let (cookie, field) = gate.login_form().await;
        let body = format!("username=bob&password=wrong%20password%20here&csrf={field}");
        let xff = format!("10.0.0.{i}");
        let r = gate
            .request(
                "POST",
                "/.poort/login",
                &[
                    ("Origin", crate::harness::ORIGIN),
                    ("Content-Type", "application/x-www-form-urlencoded"),
                    ("Cookie", &format!("__Host-poort-csrf={cookie}")),
                    ("X-Forwarded-For", &xff),
                ],
                body.as_bytes(),
            )
            .await;
        last = r.status;
    }
    assert_eq!(last, 429, "the limit counts the real peer");
}

/// Upstream request headers come from an allowlist: identity headers of other gateways and
/// apps, address claims of CDNs, method overrides and server-internal headers never arrive,
/// from a signed-in user or, on a public app, from anyone; an app's `forward_headers` are the
/// one way in, and names spelled with `_` for framing or identity headers never pass.
#[tokio::test]
async fn only_allowed_request_headers_reach_an_app() {
    let tables = "\n[[app]]\nname = \"api\"\nupstream = \"http://{up}\"\npath = \"/api/\"\naccess = \"public\"\nforward_headers = [\"X-Api-Key\", \"X-Tenant\"]\n";
    let gate = Gate::start_config("", tables).await;
    let s = gate.login("bob").await;
    let hostile = [
        "X-WEBAUTH-USER: admin",
        "Remote-User: admin",
        "Remote-Groups: admins",
        "Remote-Email: ceo@example.com",
        "X-Authenticated-User: admin",
        "X-Auth-User: admin",
        "X-Authentik-Username: admin",
        "X-Authentik-Groups: admins",
        "X-Ms-Client-Principal-Name: admin",
        "X-Ms-Client-Principal-Id: 1",
        "Cf-Access-Authenticated-User-Email: ceo@example.com",
        "X-Amzn-Oidc-Identity: admin",
        "X-Amzn-Oidc-Data: e30",
        "X-Goog-Authenticated-User-Email: ceo@example.com",
        "X-Pomerium-Claim-Email: ceo@example.com",
        "X-Pomerium-Jwt-Assertion: e30",
        "CF-Connecting-IP: 127.0.0.1",
        "Fastly-Client-IP: 127.0.0.1",
        "X-Azure-ClientIP: 127.0.0.1",
        "X-Envoy-External-Address: 127.0.0.1",
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Method-Override: DELETE",
        "X-Middleware-Subrequest: middleware:middleware:middleware",
        "X-Accel-Redirect: /internal/secret",
        "Transfer_Encoding: chunked",
        "Content_Length: 99",
        "X_Forwarded_For: 127.0.0.1",
        "X-Unknown-To-Poort: 1",
    ];
    let all: String = hostile.iter().map(|h| format!("{h}\r\n")).collect();
    for (target, cookie) in [("/app/x", format!("Cookie: __Host-poort={s}\r\n")), ("/api/x", String::new())] {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: localhost\r\n{cookie}{all}X-Api-Key: k1\r\nX-Tenant: t1\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert_eq!((status, hits), (Some(200), 1), "{target}");
        let seen = gate.upstream.last();
        for h in hostile {
            let name = h.split(':').next().unwrap().to_ascii_lowercase();
            assert!(seen.header(&name).is_none(), "{target}: {name} reached the app");
        }
        assert_eq!(seen.header("accept"), Some("text/plain"), "{target}");
        let listed = if target == "/api/x" { Some("k1") } else { None };
        assert_eq!(seen.header("x-api-key"), listed, "{target}: only the app that lists it gets it");
    }
}

#[tokio::test]
async fn an_app_cannot_be_configured_to_receive_framing_or_identity_headers() {
    for name in
        ["X-Poort-User", "x_poort_user", "Transfer_Encoding", "Content-Length", "X-Forwarded-For", "Host", "Forwarded"]
    {
        let text = format!(
            "[server]\nexternal_url = \"https://gate.example\"\n[[app]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\npath = \"/a/\"\naccess = \"public\"\nforward_headers = [\"{name}\"]\n"
        );
        let err = poort::config::parse(&text, std::path::Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("app[a].forward_headers"), "{name}: {err}");
    }
}

/// An app routed by path shares the portal's origin: it may not widen a service worker's scope
/// to the whole origin (where it would see the portal's sign-in form), clear the site's data
/// (the user's poort cookies), or claim the portal's opener policy (and so keep its hold on a
/// portal page it opened).
#[tokio::test]
async fn a_path_routed_app_cannot_claim_the_whole_origin() {
    let up = crate::harness::canned(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/javascript\r\nService-Worker-Allowed: /\r\nClear-Site-Data: \"cookies\"\r\nCross-Origin-Opener-Policy: same-origin\r\nX-App: kept\r\nContent-Length: 2\r\nConnection: close\r\n\r\n//",
    )
    .await;
    let tables =
        format!("\n[[app]]\nname = \"sw\"\nupstream = \"http://{up}\"\npath = \"/sw/\"\naccess = \"public\"\n");
    let gate = Gate::start_config("", &tables).await;
    let r = gate.get("/sw/sw.js", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-app"), Some("kept"), "the app's other headers arrive");
    assert_eq!(r.header("service-worker-allowed"), None);
    assert_eq!(r.header("clear-site-data"), None);
    assert_eq!(r.header("cross-origin-opener-policy"), None, "the app could keep a portal window it opened");
}

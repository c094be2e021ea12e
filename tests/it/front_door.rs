//! The front door before any session: raw hostile requests are refused with a fixed status,
//! reach no upstream, and leave an audit record.

use crate::harness::Gate;

/// Sends `target` with a valid session and asserts a 400 that nobody upstream saw.
async fn refused(gate: &Gate, session: &str, target: &str, status: u16) {
    let before = gate.upstream.hits();
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={session}\r\nConnection: close\r\n\r\n"
    );
    let r = gate.raw(req.as_bytes()).await;
    assert_eq!(r.status, status, "{target}");
    assert!(!r.text().contains(target), "the error page must not echo the request: {target}");
    assert_eq!(gate.upstream.hits(), before, "{target} reached the upstream");
}

#[tokio::test]
async fn traversal_and_ambiguous_paths_are_refused() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let rejected_before = gate.audit("request_rejected").len();
    let targets = [
        "/%2e%2e/app/",
        "/app/%2e%2e/staff/",
        "/app/..;/x",
        "/app/../staff/",
        "/app/./x",
        "/app/%2fetc%2fpasswd",
        "/app/%5c..%5cx",
        "/app/%252e%252e/x",
        "/app/%c0%ae%c0%ae/x",
        "/app/x%00.html",
        "/app/x;jsessionid=1",
        "/app\\..\\staff",
        "//app/",
        "/app//x",
        "/vpn/../vpns/cfg/smb.conf",
        "/app/%2577ebui",
    ];
    for t in targets {
        refused(&gate, &s, t, 400).await;
    }
    let audited = gate.refusals("request_rejected").await - rejected_before as u64;
    assert_eq!(audited, targets.len() as u64, "every refusal is audited");
    let rejected = gate.audit("request_rejected");
    assert!(rejected.iter().any(|e| e["code"] == "target_dot_segment"));
    assert!(rejected.iter().any(|e| e["code"] == "target_encoded_delimiter"));
    // The canonical form is what the upstream gets.
    let ok = gate.get("/app/caf%c3%a9/a%20b", Some(&s)).await;
    assert_eq!(ok.status, 200);
    assert_eq!(gate.upstream.last().target, "/caf%C3%A9/a%20b");
}

#[tokio::test]
async fn hosts_sizes_framing_and_methods() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let c = format!("__Host-poort={s}");
    let send = |extra: String| {
        let c = c.clone();
        let gate = &gate;
        async move {
            let req = format!("GET /app/ HTTP/1.1\r\nCookie: {c}\r\n{extra}Connection: close\r\n\r\n");
            gate.raw(req.as_bytes()).await.status
        }
    };
    assert_eq!(send("Host: localhost\r\n".into()).await, 200);
    assert_eq!(send("Host: evil.example\r\n".into()).await, 421);
    assert_eq!(send("Host: localhost\r\nHost: evil.example\r\n".into()).await, 400);
    assert_eq!(send(String::new()).await, 400);
    assert_eq!(send(format!("Host: {}\r\n", "a".repeat(300))).await, 400);
    assert_eq!(send(format!("Host: localhost\r\nX-Big: {}\r\n", "a".repeat(40_000))).await, 431);
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(send(format!("Host: localhost\r\n{many}")).await, 431);
    let hits = gate.upstream.hits();
    let framing = [
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
    ];
    for f in framing {
        let req =
            format!("POST /app/ HTTP/1.1\r\nHost: localhost\r\nCookie: {c}\r\n{f}Connection: close\r\n\r\n0\r\n\r\n");
        assert_eq!(gate.raw(req.as_bytes()).await.status, 400, "{f:?}");
    }
    for m in ["TRACE", "CONNECT", "PROPFIND"] {
        let req = format!("{m} /app/ HTTP/1.1\r\nHost: localhost\r\nCookie: {c}\r\nConnection: close\r\n\r\n");
        let status = gate.raw(req.as_bytes()).await.status;
        assert!(status == 405 || status == 400, "{m}: {status}");
    }
    let long = format!("/app/{}", "a".repeat(9000));
    let req = format!("GET {long} HTTP/1.1\r\nHost: localhost\r\nCookie: {c}\r\nConnection: close\r\n\r\n");
    let status = gate.raw(req.as_bytes()).await.status;
    assert!(status == 414, "{status}");
    assert_eq!(gate.upstream.hits(), hits, "none of these reached the upstream");
}

/// Content-Length with Transfer-Encoding: hyper drops the length, reads chunked and closes the
/// connection afterwards (RFC 9112 §6.1), so the bytes behind the chunked body are never read
/// as a second request. The upstream gets one re-framed request and nothing smuggled.
#[tokio::test]
async fn length_and_chunked_cannot_smuggle_a_request() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    for order in
        ["Content-Length: 40\r\nTransfer-Encoding: chunked", "Transfer-Encoding: chunked\r\nContent-Length: 40"]
    {
        let before = gate.upstream.hits();
        let req = format!(
            "POST /app/a HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\n{order}\r\n\r\n0\r\n\r\nGET /app/smuggled HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\n\r\n"
        );
        let r = gate.raw(req.as_bytes()).await;
        assert!(r.status == 400 || r.status == 200, "{order}: {}", r.status);
        let seen: Vec<String> = gate.upstream.seen.lock().unwrap()[before..].iter().map(|s| s.target.clone()).collect();
        assert!(seen.len() <= 1 && !seen.iter().any(|t| t.contains("smuggled")), "{order}: {seen:?}");
        if let Some(first) = gate.upstream.seen.lock().unwrap()[before..].first() {
            assert_eq!(first.method, "POST");
            assert!(first.body.is_empty(), "{order}: the chunked body was empty");
        }
    }
}

#[tokio::test]
async fn before_login_only_the_fixed_routes_answer() {
    let gate = Gate::start().await;
    assert_eq!(gate.get("/.poort/health", None).await.status, 200);
    assert_eq!(gate.get("/.poort/jwks.json", None).await.status, 200);
    assert_eq!(gate.get("/.poort/style.css", None).await.status, 200);
    assert_eq!(gate.get("/.poort/login", None).await.status, 200);
    assert_eq!(gate.get("/", None).await.status, 302);
    assert_eq!(gate.get("/.poort/sessions", None).await.status, 302);
    assert_eq!(gate.get("/.poort/admin", None).await.status, 302, "the admin console sends to the login");
    for p in ["/.poort/", "/.poort/admin/", "/.poort/login/x", "/.poort/../etc/passwd", "/favicon.ico", "/nothing/"] {
        let status = gate.get(p, None).await.status;
        assert!(status == 404 || status == 400, "{p}: {status}");
    }
    assert_eq!(gate.upstream.hits(), 0);
}

#[tokio::test]
async fn the_plain_listener_only_redirects() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gate = Gate::start().await;
    for (target, want) in [("/app/x?y=1", "https://localhost:8443/app/x?y=1"), ("/a/../b", "https://localhost:8443/")] {
        let mut s = tokio::net::TcpStream::connect(gate.redirect_addr).await.unwrap();
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: evil.example\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 308"), "{out}");
        assert!(out.to_ascii_lowercase().contains(&format!("location: {want}\r\n")), "{out}");
    }
    assert_eq!(gate.upstream.hits(), 0);
}

/// A path app's prefix without its slash is sent to the prefix, with the query kept.
#[tokio::test]
async fn the_missing_slash_redirect_keeps_the_query() {
    let gate = Gate::start().await;
    for (target, want) in [("/app", "/app/"), ("/app?x=1&y=%2F", "/app/?x=1&y=%2F"), ("/APP?x", "/app/?x")] {
        let r = gate.get(target, None).await;
        assert_eq!(r.status, 308, "{target}");
        assert_eq!(r.header("location"), Some(format!("https://localhost:8443{want}").as_str()), "{target}");
    }
}

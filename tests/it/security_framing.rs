//! Request framing, sizes and methods: ambiguous or oversized requests are refused and never
//! reach an upstream; nothing smuggled behind a body is read as a request.

use crate::harness::Gate;

fn with_session(s: &str, head: &str, body: &str) -> String {
    format!("{head}\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\n{body}")
}

/// (raw request after the first line's method and target are set, what it tries)
#[tokio::test]
async fn ambiguous_framing_is_refused() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let cases: &[(&str, &str)] = &[
        ("Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "F5 CVE-2023-46747 double chunked"),
        ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "two TE fields"),
        ("Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "an extra coding"),
        ("Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", "a fake coding"),
        ("Transfer-Encoding: identity\r\n\r\n", "identity coding"),
        ("Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "two lengths"),
        ("Content-Length: 5, 5\r\n\r\nhello", "a list length"),
        ("Content-Length: +5\r\n\r\nhello", "signed length"),
        ("Content-Length: -1\r\n\r\n", "negative length"),
        ("Content-Length: 0x5\r\n\r\nhello", "hex length"),
        ("Content-Length: 99999999999999999999999\r\n\r\n", "overflowing length"),
        ("Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", "overflowing chunk size"),
        ("Transfer-Encoding: chunked\r\n\r\n5\r\nabc\r\n0\r\n\r\n", "a chunk shorter than declared"),
        ("X-A: b\r\n c\r\nContent-Length: 0\r\n\r\n", "obs-fold"),
        ("X-A : b\r\nContent-Length: 0\r\n\r\n", "space before the colon"),
        ("X-A: b\0c\r\nContent-Length: 0\r\n\r\n", "NUL in a value"),
        ("X-A: b\rc\r\nContent-Length: 0\r\n\r\n", "bare CR"),
        ("Content-Length: 0\r\nHost: evil.example\r\n\r\n", "a second Host"),
    ];
    for (rest, what) in cases {
        let req = with_session(&s, "POST /app/x HTTP/1.1", rest);
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert!(matches!(status, Some(400) | Some(413) | Some(501) | None), "{what}: {status:?}");
        assert_eq!(hits, 0, "{what} reached the upstream");
    }
}

#[tokio::test]
async fn nothing_is_smuggled_behind_a_body() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let smuggled = format!("GET /app/smuggled HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\n\r\n");
    for framing in [
        format!("Content-Length: 4\r\n\r\nabcd{smuggled}"),
        format!("Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n{smuggled}"),
        format!("Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
    ] {
        let before = gate.upstream.hits();
        let req = format!(
            "POST /app/a HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n{framing}"
        );
        let _ = gate.hostile(req.as_bytes()).await;
        let seen: Vec<String> = gate.upstream.seen.lock().unwrap()[before..].iter().map(|r| r.target.clone()).collect();
        assert!(!seen.iter().any(|t| t.contains("smuggled")), "{framing:?}: {seen:?}");
    }
}

#[tokio::test]
async fn sizes_are_bounded() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let long_path = format!("/app/{}", "a".repeat(9000));
    let big_header = format!("X-Big: {}\r\n", "b".repeat(70_000));
    let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    let big_cookie = format!("Cookie: c={}\r\n", "c".repeat(9000));
    let citrix_bleed_host = format!("Host: {}\r\n", "a".repeat(24_812));
    let cases: Vec<(String, &str, &[u16])> = vec![
        (
            format!("GET {long_path} HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\n\r\n"),
            "long target",
            &[414],
        ),
        (format!("GET /app/ HTTP/1.1\r\nHost: localhost\r\n{big_header}\r\n"), "huge header", &[431]),
        (format!("GET /app/ HTTP/1.1\r\nHost: localhost\r\n{many}\r\n"), "many headers", &[431]),
        (format!("GET /app/ HTTP/1.1\r\nHost: localhost\r\n{big_cookie}\r\n"), "huge cookie", &[431]),
        (format!("GET /app/ HTTP/1.1\r\n{citrix_bleed_host}\r\n"), "Citrix Bleed CVE-2023-4966 Host", &[400, 431]),
        (
            format!(
                "POST /app/ HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nContent-Length: 20000000\r\n\r\n"
            ),
            "declared body over the limit",
            &[413],
        ),
    ];
    for (req, what, want) in cases {
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert!(status.is_some_and(|st| want.contains(&st)), "{what}: {status:?}");
        assert_eq!(hits, 0, "{what}");
    }
    // A chunked body that grows past the limit is cut off before it is all forwarded.
    let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "z".repeat(1 << 20));
    let mut req = format!(
        "POST /app/big HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for _ in 0..12 {
        req.push_str(&chunk);
    }
    req.push_str("0\r\n\r\n");
    let (status, _) = gate.hostile(req.as_bytes()).await;
    assert!(matches!(status, Some(413) | Some(502) | None), "{status:?}");
    let got = gate.upstream.seen.lock().unwrap().iter().filter(|r| r.target == "/big").map(|r| r.body.len()).max();
    assert!(got.is_none_or(|n| n <= 10 * 1024 * 1024), "the upstream received {got:?} bytes");
}

#[tokio::test]
async fn only_known_methods_pass() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    for m in ["TRACE", "TRACK", "CONNECT", "PROPFIND", "DEBUG", "get", "G\u{0}ET", "X-METHOD"] {
        let req =
            format!("{m} /app/ HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n\r\n");
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert!(matches!(status, Some(400) | Some(405) | None), "{m}: {status:?}");
        assert_eq!(hits, 0, "{m}");
    }
}

#[tokio::test]
async fn unknown_and_malformed_hosts_are_refused() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    for host in [
        "evil.example",
        "localhost.evil.example",
        "127.0.0.1",
        "localhost:8443@evil",
        "local host",
        "[::1",
        "-localhost",
    ] {
        let req =
            format!("GET /app/ HTTP/1.1\r\nHost: {host}\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n\r\n");
        let (status, hits) = gate.hostile(req.as_bytes()).await;
        assert!(matches!(status, Some(400) | Some(421) | None), "{host:?}: {status:?}");
        assert_eq!(hits, 0, "{host:?}");
    }
    // An absolute-form target naming another host is not a proxy request here.
    let req = format!(
        "GET http://evil.example/app/ HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(gate.hostile(req.as_bytes()).await, (Some(400), 0));
}

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

/// Every head the gateway refuses is answered with its own status on a connection that then
/// closes, and the refusal is in the audit log with its reason; the upstream gets nothing.
/// These are refusals the HTTP library would otherwise have repaired (a duplicate length,
/// chunked over a length, a bare LF) or made on its own, unaudited (an oversized head).
#[tokio::test]
async fn the_head_is_refused_before_the_http_library_reads_it() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let cookie = format!("Cookie: __Host-poort={s}");
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!(
                "POST /app/x HTTP/1.1\r\nHost: localhost\r\n{cookie}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
            "framing_length_and_chunked",
        ),
        (
            format!(
                "POST /app/x HTTP/1.1\r\nHost: localhost\r\n{cookie}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
            ),
            400,
            "framing_length_and_chunked",
        ),
        (
            format!(
                "POST /app/x HTTP/1.1\r\nHost: localhost\r\n{cookie}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
            ),
            400,
            "framing_content_length",
        ),
        (format!("GET /app/x HTTP/1.1\nHost: localhost\n{cookie}\n\n"), 400, "framing_bare_lf"),
        (format!("GET /app/x HTTP/1.1\r\nHost: localhost\n{cookie}\r\n\r\n"), 400, "framing_bare_lf"),
        (
            format!("GET /app/x HTTP/1.1\r\nHost: localhost\r\n{cookie}\r\nX-A: 1\r\n  folded\r\n\r\n"),
            400,
            "framing_obs_fold",
        ),
        (
            format!("GET /app/x HTTP/1.1\r\nHost: localhost\r\n{cookie}\r\nX-A : 1\r\n\r\n"),
            400,
            "framing_space_before_colon",
        ),
        (format!("GET /app/x HTTP/1.1\r\nHost: localhost\r\n{cookie}\r\nX-A: 1\0\r\n\r\n"), 400, "header_bad_value"),
        (format!("GET /app/x HTTP/1.1\r\nHost: localhost\r\n{cookie}\r\nX-A: 1\r2\r\n\r\n"), 400, "framing_bare_cr"),
        (format!("GET  /app/x HTTP/1.1\r\nHost: localhost\r\n{cookie}\r\n\r\n"), 400, "request_line_malformed"),
        (format!("GET /app/x HTTP/1.2\r\nHost: localhost\r\n{cookie}\r\n\r\n"), 400, "request_line_malformed"),
        (format!("GET /{} HTTP/1.1\r\nHost: localhost\r\n\r\n", "a".repeat(9000)), 414, "target_too_long"),
        (
            format!("GET /app/x HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n", "b".repeat(70 * 1024)),
            431,
            "headers_too_large",
        ),
        (
            format!(
                "GET /app/x HTTP/1.1\r\nHost: localhost\r\n{}\r\n",
                (0..150).map(|i| format!("X-{i}: 1\r\n")).collect::<String>()
            ),
            431,
            "too_many_headers",
        ),
    ];
    let count = cases.len() as u64;
    let mut codes = Vec::new();
    for (req, want, code) in cases {
        let r = gate.raw(req.as_bytes()).await;
        assert_eq!((code, r.status), (code, want));
        assert_eq!(r.header("connection"), Some("close"), "{code}");
        assert_eq!(gate.upstream.hits(), 0, "{code} reached the upstream");
        codes.push(code);
    }
    assert_eq!(gate.refusals("request_rejected").await, count, "every refusal is audited");
    let audited = gate.audit("request_rejected");
    for code in codes {
        assert!(audited.iter().any(|e| e["code"] == code), "{code} is not in the audit log");
    }
}

/// A body that breaks its chunked framing part way never reaches an app half-sent: bodies up
/// to the buffering bound are read whole before the upstream request starts.
#[tokio::test]
async fn a_broken_chunked_body_never_reaches_the_app() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    for broken in ["5\r\nhello\r\n5\nworld\r\n0\r\n\r\n", "5\r\nhello\r\nzz\r\n", "5\r\nhelloworld\r\n0\r\n\r\n"] {
        let req = format!(
            "POST /app/upload HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nTransfer-Encoding: chunked\r\n\r\n{broken}"
        );
        let tcp = gate.hostile(req.as_bytes()).await;
        assert!(matches!(tcp.0, Some(400) | None), "{broken:?}: {tcp:?}");
        assert_eq!(tcp.1, 0, "{broken:?} reached the upstream");
        assert_eq!(gate.upstream.connections.load(std::sync::atomic::Ordering::SeqCst), 0, "{broken:?}");
    }
    // A body that stops half way: the app is not even connected to while it waits.
    let mut tls = gate.connect(&[b"http/1.1"]).await;
    let head = format!(
        "POST /app/upload HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut tls, head.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(gate.upstream.connections.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(tls);
    // A good chunked body arrives whole, with a length the gateway wrote.
    let req = format!(
        "POST /app/upload HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    );
    assert_eq!(gate.raw(req.as_bytes()).await.status, 200);
    let seen = gate.upstream.last();
    assert_eq!(seen.body, b"hello world");
    assert_eq!(seen.header("content-length"), Some("11"));
    assert_eq!(seen.header("transfer-encoding"), None);
}

/// The length the upstream reads is the one the gateway counted, written by the gateway.
#[tokio::test]
async fn every_upstream_request_is_framed_by_the_gateway() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let req = format!(
        "POST /app/x HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nContent-Length: 0005\r\nConnection: close\r\n\r\nhello"
    );
    assert_eq!(gate.raw(req.as_bytes()).await.status, 200);
    let seen = gate.upstream.last();
    assert_eq!((seen.header("content-length"), seen.body.as_slice()), (Some("5"), &b"hello"[..]));
}

/// A request on a connection made for another host name (SNI) is misdirected.
#[tokio::test]
async fn a_host_other_than_the_tls_name_gets_421() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let req = format!("GET / HTTP/1.1\r\nHost: git.localhost\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n\r\n");
    let r = gate.raw_to("localhost", req.as_bytes()).await;
    assert_eq!(r.status, 421);
    assert_eq!(gate.upstream.hits(), 0);
    crate::harness::eventually("the refusal to be audited", std::time::Duration::from_secs(2), async || {
        gate.audit("request_rejected").iter().any(|e| e["code"] == "host_not_sni")
    })
    .await;
    let req = format!("GET /app/ HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n\r\n");
    assert_eq!(gate.raw_to("git.localhost", req.as_bytes()).await.status, 421);
    assert_eq!(gate.raw_to("localhost", req.as_bytes()).await.status, 200);
}

/// Health checks use HEAD, over HTTP/2 as well: headers and length, no body.
#[tokio::test]
async fn head_over_http2_on_the_gateways_own_pages() {
    let gate = Gate::start().await;
    let mut send = gate.h2().await;
    for path in ["/.poort/health", "/.poort/login", "/.poort/style.css", "/.poort/nothing"] {
        let req = http::Request::head(format!("https://localhost{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let len: usize = resp.headers().get("content-length").unwrap().to_str().unwrap().parse().unwrap();
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        assert!(body.is_empty(), "{path}");
        assert!(len > 0, "{path}: the length of the GET answer");
        assert!(matches!(status, 200 | 404), "{path}: {status}");
    }
}

/// A flood of bad requests from one client: the audit log grows by a few records a minute
/// (the first refusal of each kind, then one count), not one per request, and sign-ins go on
/// meanwhile. Bounded: 15 seconds or 50,000 requests, whichever comes first.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_bad_requests_adds_a_few_records_and_sign_ins_go_on() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    let gate = Arc::new(Gate::start().await);
    let refusal_rows = || -> i64 {
        let conn = poort::store::open_connection(gate.db()).unwrap();
        conn.query_row("SELECT count(*) FROM audit WHERE kind IN ('request_rejected', 'refusals_counted')", (), |r| {
            r.get(0)
        })
        .unwrap()
    };
    let before = refusal_rows();
    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let mut flooders = Vec::new();
    for _ in 0..4 {
        let (gate, stop, sent) = (gate.clone(), stop.clone(), sent.clone());
        flooders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < 50_000 {
                let (status, hits) = gate.hostile(b"GET /app/%2e%2e/staff HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
                assert_eq!((status, hits), (Some(400), 0));
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut minutes = 1;
    while started.elapsed() < Duration::from_secs(15) {
        let t = Instant::now();
        let r = gate.try_login("bob", crate::harness::PASSWORD, "").await;
        assert_eq!(r.status, 303, "a sign-in during the flood failed");
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The flood spans a minute of the gateway's time every five seconds.
        if started.elapsed() > Duration::from_secs(5 * minutes) {
            gate.clock.advance(60);
            minutes += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.await.unwrap();
    }
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 1000, "the flood was only {sent} requests");
    let grown = gate.refusals("request_rejected").await;
    assert_eq!(grown, sent, "every refusal is accounted for");
    let counted = gate.audit("refusals_counted");
    assert!(
        counted.iter().all(|e| e["samples"].as_array().unwrap().iter().any(|s| s == "/app/%2e%2e/staff")),
        "each count names what was refused: {counted:?}"
    );
    let rows = refusal_rows() - before;
    assert!(rows <= 2 * (minutes as i64 + 1), "{rows} audit records for {sent} refusals over {minutes} minutes");
    assert!(slowest < Duration::from_secs(3), "a sign-in took {slowest:?} during the flood");
}

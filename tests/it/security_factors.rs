//! The logic after the front door, tried as the people who attack it: a thief with only the
//! password (against the second factor), a script running on an app's origin (against the
//! portal's own actions), a stolen command-line session, and anyone probing tunnels. Each
//! test is that person, not the legitimate user.

use poort::clock::Clock;
use poort::identity::totp;

use crate::harness::{Gate, ORIGIN, PASSWORD, enrol};

/// A form post as a script on a page of the portal's origin makes it: the right cookies,
/// Origin and CSRF field, but a script's fetch metadata (`mode`), never a person's navigation.
async fn scripted(gate: &Gate, session: &str, path: &str, fields: &[(&str, &str)], mode: &str) -> u16 {
    let metadata = [("Sec-Fetch-Site", "same-origin"), ("Sec-Fetch-Mode", mode)];
    post_with_csrf(gate, session, path, fields, &metadata).await
}

/// A form on a page of an app routed by path, which the user is tricked into submitting with a
/// click: a person's navigation from the portal's origin, but from the app's page.
async fn clicked_on_an_apps_page(gate: &Gate, session: &str, path: &str, fields: &[(&str, &str)]) -> u16 {
    let referer = format!("{ORIGIN}/app/reports");
    let metadata = [
        ("Sec-Fetch-Site", "same-origin"),
        ("Sec-Fetch-Mode", "navigate"),
        ("Sec-Fetch-User", "?1"),
        ("Referer", referer.as_str()),
    ];
    post_with_csrf(gate, session, path, fields, &metadata).await
}

async fn post_with_csrf(
    gate: &Gate,
    session: &str,
    path: &str,
    fields: &[(&str, &str)],
    metadata: &[(&str, &str)],
) -> u16 {
    let (csrf, field) = gate.login_form().await;
    let mut all = vec![("csrf", field.as_str())];
    all.extend_from_slice(fields);
    gate.post_form_from(path, &csrf, Some(session), &all, metadata).await.status
}

fn factors(gate: &Gate, user: &str) -> poort::identity::mfa::Factors {
    gate.store().with(|c| poort::identity::mfa::factors(c, user)).unwrap()
}

/// A thief holding only alice's password signs in and tries every way to end up with a second
/// factor of their own: replace her authenticator app, make recovery codes, add a passkey,
/// and the confirm page with the password. Each ends without a usable factor, and her own
/// factors are exactly as they were.
#[tokio::test]
async fn a_stolen_password_never_becomes_a_second_factor() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let (secret, _, codes) = enrol(&gate, &s).await;
    let before = factors(&gate, "alice");
    assert!(before.totp && before.recovery_left == 10);

    let thief = gate.login("alice").await;
    // Remove her app (to enrol their own), begin a new one, make codes: each needs a fresh
    // second factor, and is sent to prove one.
    for path in ["/.poort/security/totp/remove", "/.poort/security/totp", "/.poort/security/recovery"] {
        let r = gate.post(path, &thief, &[("password", PASSWORD)]).await;
        assert_eq!((path, r.status), (path, 303));
        assert!(r.header("location").unwrap().contains("/.poort/confirm"), "{path}");
        assert!(!r.text().contains("<li><code>"), "{path}: recovery codes were shown");
    }
    let r = gate.post("/.poort/security/passkey/start", &thief, &[("name", "mine"), ("password", PASSWORD)]).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(!r.text().contains("publicKey"), "a registration was offered");
    // The unfinished set-up of an authenticator app is not the thief's to finish either.
    let r = gate.post("/.poort/security/totp/confirm", &thief, &[("code", "000000")]).await;
    assert_eq!(r.status, 303);
    assert!(!r.text().contains("data:image/svg+xml") && !r.text().contains("class=\"key\""));
    // The password is no proof for a user who has a second factor.
    let r = gate.post("/.poort/confirm", &thief, &[("password", PASSWORD), ("next", "/.poort/security")]).await;
    assert_eq!(r.status, 400);
    assert!(r.cookie("__Host-poort").is_none());
    let r = gate.post("/.poort/confirm", &thief, &[("code", "123456")]).await;
    assert_eq!(r.status, 401);
    // Ten minutes later nothing has changed either.
    gate.clock.advance(600);
    let r = gate.post("/.poort/security/totp/remove", &thief, &[]).await;
    assert_eq!(r.status, 303);

    assert_eq!(factors(&gate, "alice"), before, "alice's factors changed");
    assert_eq!(gate.get("/vault/", Some(&thief)).await.status, 401, "the thief never got a second factor");
    assert!(gate.audit("factor_changed").iter().all(|e| e["change"] != "authenticator app removed"));
    // Her own recovery codes and app still work for her.
    let her = gate.login("alice").await;
    let r = gate.post("/.poort/mfa", &her, &[("recovery", &codes[0]), ("next", "/vault/")]).await;
    assert_eq!(r.status, 303);
    drop(secret);
}

/// The legitimate user changes factors right after proving one, for five minutes, and only
/// by her own action in the portal.
#[tokio::test]
async fn changing_factors_needs_a_fresh_second_factor_and_a_person() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let (secret, _, _) = enrol(&gate, &s).await;
    let s = gate.login("alice").await;
    gate.clock.advance(30);
    let code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let s = gate.confirm(&s, &[("code", &code), ("next", "/.poort/security")]).await;
    let page = gate.get("/.poort/security", Some(&s)).await.text();
    assert!(page.contains("/.poort/security/totp/remove"), "the forms are shown to a fresh session");
    // A script's request (no user activation, not a navigation) is refused even now, and so is
    // a script starting a passkey registration: with a fetch, as JSON, or as a form.
    assert_eq!(scripted(&gate, &s, "/.poort/security/recovery", &[], "cors").await, 403);
    assert_eq!(scripted(&gate, &s, "/.poort/security/passkey/start", &[("name", "evil")], "cors").await, 403);
    // Nor a click on an app's page that submits the portal's form.
    assert_eq!(clicked_on_an_apps_page(&gate, &s, "/.poort/security/passkey/start", &[("name", "evil")]).await, 403);
    assert_eq!(clicked_on_an_apps_page(&gate, &s, "/.poort/security/totp/remove", &[]).await, 403);
    // A portal page keeps an app's windows from reaching into it.
    let page = gate.get("/.poort/security", Some(&s)).await;
    assert_eq!(page.header("cross-origin-opener-policy"), Some("same-origin"));
    let r = gate.post_json("/.poort/security/passkey/start", Some(&s), &serde_json::json!({ "name": "evil" })).await;
    assert!(r.status == 400 || r.status == 403, "{}", r.status);
    assert!(!r.text().contains("publicKey"));
    let r = gate.post("/.poort/security/recovery", &s, &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("<li><code>"));
    // Five minutes after the proof, it is needed again.
    gate.clock.advance(301);
    let r = gate.post("/.poort/security/totp/remove", &s, &[]).await;
    assert_eq!(r.status, 303);
    assert!(factors(&gate, "alice").totp);
}

/// Removing the last authenticator takes the recovery codes with it: they would otherwise be a
/// factor nothing asks for, and the password alone could then set up a new authenticator.
#[tokio::test]
async fn recovery_codes_go_with_the_last_authenticator() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let (secret, _, codes) = enrol(&gate, &s).await;
    assert_eq!(factors(&gate, "alice").recovery_left, codes.len());
    let s = gate.login("alice").await;
    gate.clock.advance(30);
    let code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let s = gate.confirm(&s, &[("code", &code), ("next", "/.poort/security")]).await;
    let r = gate.post("/.poort/security/totp/remove", &s, &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("recovery codes went too"), "{}", r.text());
    let left = factors(&gate, "alice");
    assert!(!left.totp);
    assert_eq!(left.recovery_left, 0, "recovery codes outlived the last authenticator");
    let changes = gate.audit("factor_changed");
    assert!(changes.iter().any(|e| e["change"] == "recovery codes removed with the last authenticator"));
}

/// A user with no factor at all may set up a first one with the password (a fresh sign-in):
/// that is audited as such and shown on their sessions page.
#[tokio::test]
async fn a_first_factor_set_up_with_the_password_alone_is_recorded_and_shown() {
    let gate = Gate::start().await;
    let s = gate.login("bob").await;
    let (_, s, _) = enrol(&gate, &s).await;
    let changes = gate.audit("factor_changed");
    let set_up = changes.iter().find(|e| e["change"] == "authenticator app set up").unwrap();
    assert_eq!(set_up["proof"], "password only");
    assert_eq!(changes.iter().find(|e| e["change"] == "recovery codes made").unwrap()["proof"], "second factor");
    let page = gate.get("/.poort/sessions", Some(&s)).await.text();
    assert!(page.contains("authenticator app set up") && page.contains("with the password alone"), "{page}");
}

/// A command-line code is approved only with a factor given for that very code: a fresh
/// session is not enough (a script on an app's origin may run right after a sign-in), and
/// only the user who opened the code may decide on it.
#[tokio::test]
async fn approving_a_command_line_sign_in_needs_a_factor_given_for_that_code() {
    let gate = Gate::start().await;
    let cli = [("X-Poort-Client", "cli"), ("Content-Type", "application/json")];
    let new_code = async || {
        let r = gate.request("POST", "/.poort/device/code", &cli, b"{}").await;
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        (v["user_code"].as_str().unwrap().to_string(), v["device_code"].as_str().unwrap().to_string())
    };
    let s = gate.login("alice").await;
    let (secret, s, _) = enrol(&gate, &s).await; // fresh: a factor proved just now
    let (code, device) = new_code().await;
    assert_eq!(gate.get(&format!("/.poort/device?code={code}"), Some(&s)).await.status, 200);
    let r = gate.post("/.poort/device", &s, &[("code", &code), ("decision", "approve")]).await;
    assert_eq!(r.status, 303, "approved without a proof for the code");
    let body = serde_json::json!({ "device_code": device }).to_string();
    let poll = gate.request("POST", "/.poort/device/token", &cli, body.as_bytes()).await;
    assert!(poll.text().contains("authorization_pending"), "{}", poll.text());
    // Another signed-in user cannot approve or refuse a code alice opened.
    let bob = gate.login("bob").await;
    let r = gate.post("/.poort/device", &bob, &[("code", &code), ("decision", "deny")]).await;
    assert_eq!(r.status, 400);
    assert!(gate.request("POST", "/.poort/device/token", &cli, body.as_bytes()).await.text().contains("pending"));
    // A script in alice's browser: no user activation; or a click on an app's page.
    let fields = [("code", code.as_str()), ("decision", "approve")];
    assert_eq!(scripted(&gate, &s, "/.poort/device", &fields, "no-cors").await, 403);
    assert_eq!(clicked_on_an_apps_page(&gate, &s, "/.poort/device", &fields).await, 403);
    // With the factor given for this code, alice approves.
    gate.clock.advance(30);
    let totp_code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let s = gate.confirm(&s, &[("code", &totp_code), ("device", &code)]).await;
    let r = gate.post("/.poort/device", &s, &[("code", &code), ("decision", "approve")]).await;
    assert!(r.text().contains("Go back to your terminal"), "{}", r.text());
    let t = gate.request("POST", "/.poort/device/token", &cli, body.as_bytes()).await;
    assert_eq!(t.status, 200);
}

/// A command-line session is derived from the browser session that approved it: it keeps
/// that session's expiry and proof times (approving never makes a session younger), and it
/// opens tunnels only: not the portal, not apps, not another approval.
#[tokio::test]
async fn a_command_line_session_is_no_younger_and_no_stronger_than_its_browser() {
    let gate = Gate::start().await;
    let browser = gate.login("alice").await;
    let signed_in = gate.clock.now();
    for _ in 0..10 {
        gate.clock.advance(25 * 60);
        assert_eq!(gate.get("/app/", Some(&browser)).await.status, 200);
    }
    let (cli, browser) = gate.approve_cli(&browser).await;
    let rows = gate.store().list_sessions(Some("alice")).unwrap();
    let c = rows.iter().find(|r| r.kind == "cli").unwrap();
    let parent = rows.iter().find(|r| Some(&r.id) == c.parent.as_ref()).expect("the approving session is its parent");
    assert_eq!(c.expires_at, parent.expires_at, "the approval did not extend the session");
    assert_eq!(c.expires_at, signed_in + 12 * 3600, "the session still ends 12 hours after the sign-in");
    assert_eq!((c.auth_at, c.factor_at), (parent.auth_at, parent.factor_at));
    assert_eq!(gate.get("/app/", Some(&browser)).await.status, 200);
    // As a browser cookie it is nobody.
    assert_eq!(gate.get("/app/", Some(&cli)).await.status, 401);
    let r = gate.get("/.poort/security", Some(&cli)).await;
    assert_eq!(r.status, 302);
    assert!(r.header("location").unwrap().contains("/.poort/login"));
    let r = gate.post("/.poort/device", &cli, &[("code", "BCDF-GHJK"), ("decision", "approve")]).await;
    assert_eq!(r.status, 303);
    assert!(r.header("location").unwrap().ends_with("/.poort/login"));
}

#[tokio::test]
async fn signing_out_can_end_the_command_line_sessions_this_browser_approved() {
    let gate = Gate::start().await;
    let alive = |id: &str| gate.store().list_sessions(Some("alice")).unwrap().iter().any(|r| r.id == id);
    let cli_ids = || -> Vec<String> {
        gate.store()
            .list_sessions(Some("alice"))
            .unwrap()
            .into_iter()
            .filter(|r| r.kind == "cli")
            .map(|r| r.id)
            .collect()
    };
    // A plain sign-out leaves what the browser approved.
    let (_, browser) = gate.cli_session_and_browser("alice").await;
    let first = cli_ids()[0].clone();
    let page = gate.get("/.poort/sessions", Some(&browser)).await.text();
    assert!(page.contains("approved here") && page.contains("end it too"), "{page}");
    assert_eq!(gate.post("/.poort/logout", &browser, &[]).await.status, 303);
    assert!(alive(&first));
    // Signing out with "end them too" ends them.
    let (_, browser) = gate.cli_session_and_browser("alice").await;
    let second = cli_ids().into_iter().find(|id| *id != first).unwrap();
    assert_eq!(gate.post("/.poort/logout", &browser, &[("approved", "end")]).await.status, 303);
    assert!(!alive(&second), "the approved command-line session still lives");
    assert!(alive(&first), "only this browser's approvals end");
}

/// Tunnels open for the command line only: a browser's request (any Origin, any fetch
/// metadata) is refused before anything is looked up, and before login a known and an unknown
/// tunnel get the same answer.
#[tokio::test]
async fn tunnels_open_for_the_command_line_only() {
    let gate = Gate::start().await;
    let browser = gate.login("alice").await;
    let cli = gate.cli_session("alice").await;
    let upgrade = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let ask = async |session: Option<&str>, extra: &[(&str, &str)]| {
        let cookie = session.map(|s| format!("__Host-poort={s}"));
        let mut h: Vec<(&str, &str)> = upgrade.to_vec();
        h.extend_from_slice(extra);
        if let Some(c) = &cookie {
            h.push(("Cookie", c));
        }
        gate.request("GET", "/.poort/tunnel/sink", &h, b"").await
    };
    for origin in ["https://evil.example", "null", "https://git.localhost:8443", ORIGIN] {
        let r = ask(Some(&cli), &[("X-Poort-Client", "cli"), ("Origin", origin)]).await;
        assert_eq!((origin, r.status), (origin, 400));
    }
    let r = ask(Some(&cli), &[("X-Poort-Client", "cli"), ("Sec-Fetch-Site", "same-origin")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(ask(Some(&cli), &[]).await.status, 400, "without the command line's mark");
    let r = ask(Some(&browser), &[("X-Poort-Client", "cli")]).await;
    assert_eq!(r.status, 401, "a browser session opens no tunnel");
    assert_eq!(gate.sink.accepted(), 0, "the target saw nothing");
    assert!(gate.audit("tunnel_opened").is_empty());
    // Before login: the same answer for a tunnel that exists and one that does not.
    let known = gate.request("GET", "/.poort/tunnel/sink", &[("X-Poort-Client", "cli")], b"").await;
    let unknown = gate.request("GET", "/.poort/tunnel/no-such-thing", &[("X-Poort-Client", "cli")], b"").await;
    assert_eq!((known.status, known.text()), (unknown.status, unknown.text()));
    assert_eq!(known.status, 401);
    // The command line itself still gets in.
    let cookie = format!("__Host-poort={cli}");
    let ws =
        gate.websocket("localhost", "/.poort/tunnel/sink", &[("X-Poort-Client", "cli"), ("Cookie", &cookie)]).await;
    assert!(ws.is_ok());
}

/// A right password does not clear the count of wrong second-factor codes: a thief who has the
/// password cannot guess codes without end by signing in again between guesses.
#[tokio::test]
async fn the_password_never_resets_the_count_of_wrong_codes() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let (secret, _, _) = enrol(&gate, &s).await;
    for _ in 0..2 {
        let thief = gate.login("alice").await;
        for _ in 0..4 {
            assert_eq!(gate.post("/.poort/mfa", &thief, &[("code", "000000")]).await.status, 401);
        }
    }
    let thief = gate.login("alice").await;
    gate.clock.advance(30);
    let right = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let r = gate.post("/.poort/mfa", &thief, &[("code", &right), ("next", "/vault/")]).await;
    assert_eq!(r.status, 401, "the second factor is locked after eight wrong codes");
    let locks = gate.audit("account_locked");
    assert!(locks.iter().any(|e| e["user"] == "alice" && e["lock"] == "second factor"), "{locks:?}");
    // The password lock is its own: alice can still sign in with her password.
    assert_eq!(gate.try_login("alice", PASSWORD, "").await.status, 303);
}

/// A thief with alice's password opens a command-line code in their own session, then gets
/// alice to give her second factor for it (a link to the step-up or the confirm page): the
/// proof counts only in the browser that opened the code, and the thief's approval fails.
#[tokio::test]
async fn a_factor_given_in_another_browser_approves_nothing() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let (secret, _, _) = enrol(&gate, &s).await;
    let cli = [("X-Poort-Client", "cli"), ("Content-Type", "application/json")];
    let r = gate.request("POST", "/.poort/device/code", &cli, b"{}").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let (code, device) = (v["user_code"].as_str().unwrap().to_string(), v["device_code"].as_str().unwrap().to_string());
    let thief = gate.login("alice").await;
    assert_eq!(gate.get(&format!("/.poort/device?code={code}"), Some(&thief)).await.status, 200);
    // alice, in her own browser, follows the thief's links and gives her factor.
    let mut victim = gate.login("alice").await;
    for (page, mode) in [("/.poort/mfa", "step-up"), ("/.poort/confirm", "confirm")] {
        gate.clock.advance(30);
        let totp_code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
        let r = gate.post(page, &victim, &[("code", &totp_code), ("device", &code), ("next", "/")]).await;
        assert_eq!((mode, r.status), (mode, 303), "{}", r.text());
        victim = r.cookie("__Host-poort").unwrap();
        let r = gate.post("/.poort/device", &thief, &[("code", &code), ("decision", "approve")]).await;
        assert_eq!(r.status, 303, "{mode}: the thief's approval went through: {}", r.text());
        assert!(r.header("location").unwrap().contains("/.poort/confirm"));
    }
    let body = serde_json::json!({ "device_code": device }).to_string();
    let poll = gate.request("POST", "/.poort/device/token", &cli, body.as_bytes()).await;
    assert!(poll.text().contains("authorization_pending"), "{}", poll.text());
    // And alice's browser cannot decide on the code the thief opened.
    let victim = gate.login("alice").await;
    let page = gate.get(&format!("/.poort/device?code={code}"), Some(&victim)).await;
    assert!(page.text().contains("unknown or expired"), "{}", page.text());
}

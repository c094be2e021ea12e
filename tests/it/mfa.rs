//! Second factors: enrolment from the portal, step-up to apps that need one, replay and lock
//! protection, recovery codes, and the admin commands.

use poort::clock::Clock;
use poort::identity::totp;

use crate::harness::{Gate, PASSWORD, normalised};

use crate::harness::enrol;

#[tokio::test]
async fn an_mfa_app_never_sees_a_password_only_session() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let r = gate
        .request("GET", "/vault/secret", &[("Cookie", &format!("__Host-poort={s}")), ("Accept", "text/html")], b"")
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("https://localhost:8443/.poort/mfa?next=%2Fvault%2Fsecret"));
    assert_eq!(gate.get("/vault/secret", Some(&s)).await.status, 401, "non-browsers get 401");
    // Without a factor yet, the step-up page sends the user to set one up.
    let m = gate.get("/.poort/mfa?next=%2Fvault%2Fsecret", Some(&s)).await;
    assert_eq!(m.status, 302);
    assert!(m.header("location").unwrap().starts_with("https://localhost:8443/.poort/security?next="));
    assert_eq!(gate.upstream.hits(), 0);
    // The launcher still lists the app: opening it asks for the factor.
    assert!(gate.get("/", Some(&s)).await.text().contains("Vault"));

    let (_, stepped, _) = enrol(&gate, &s).await;
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 401, "the password-only token ended at the step-up");
    assert_eq!(gate.get("/vault/secret", Some(&stepped)).await.status, 200);
    let seen = gate.upstream.last();
    assert_eq!(seen.target, "/vault/secret");
    let jwt = seen.header("x-poort-assertion").unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(claims["amr"], serde_json::json!(["pwd", "otp"]));
    assert_eq!(gate.audit("mfa_succeeded").len(), 1);
    assert!(gate.audit("factor_changed").iter().any(|e| e["change"] == "authenticator app set up"));
}

#[tokio::test]
async fn codes_work_once_and_only_in_their_window() {
    let mut gate = Gate::start().await;
    let s = gate.login("alice").await;
    let (secret, _, _) = enrol(&gate, &s).await;
    let used = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));

    let s = gate.login("alice").await;
    let replay = gate.post("/.poort/mfa", &s, &[("code", &used), ("next", "/vault/")]).await;
    assert_eq!(replay.status, 401, "the code used at enrolment cannot be replayed");
    // Not across a restart either.
    gate.stop().await;
    gate.boot().await;
    let replay = gate.post("/.poort/mfa", &s, &[("code", &used), ("next", "/vault/")]).await;
    assert_eq!(replay.status, 401);

    gate.clock.advance(90);
    let stale = totp::code_at_step(&secret, totp::step_at(gate.clock.now()) - 2);
    assert_eq!(
        gate.post("/.poort/mfa", &s, &[("code", &stale), ("next", "/vault/")]).await.status,
        401,
        "two steps old"
    );
    let fresh = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let ok = gate.post("/.poort/mfa", &s, &[("code", &fresh), ("next", "/vault/")]).await;
    assert_eq!(ok.status, 303);
    assert_eq!(ok.header("location"), Some("https://localhost:8443/vault/"));
    let stepped = ok.cookie("__Host-poort").unwrap();
    assert_ne!(stepped, s);
    assert_eq!(gate.get("/vault/", Some(&stepped)).await.status, 200);
    assert_eq!(gate.get("/vault/", Some(&s)).await.status, 401, "the old token is gone");
    assert_eq!(gate.audit("mfa_failed").len(), 3);
}

#[tokio::test]
async fn recovery_codes_are_single_use_and_counted() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let (_, _, codes) = enrol(&gate, &s).await;
    let s = gate.login("alice").await;
    let r = gate.post("/.poort/mfa", &s, &[("recovery", &codes[3].to_uppercase()), ("next", "/vault/")]).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let stepped = r.cookie("__Host-poort").unwrap();
    assert_eq!(gate.get("/vault/", Some(&stepped)).await.status, 200);
    assert_eq!(gate.audit("recovery_code_used")[0]["remaining"], 9);
    let page = gate.get("/.poort/security", Some(&stepped)).await.text();
    assert!(page.contains("9 unused recovery codes left"), "{page}");
    let s = gate.login("alice").await;
    let again = gate.post("/.poort/mfa", &s, &[("recovery", &codes[3]), ("next", "/vault/")]).await;
    assert_eq!(again.status, 401, "a recovery code works once");
}

#[tokio::test]
async fn twenty_wrong_passwords_lock_without_telling() {
    let gate = Gate::start().await;
    for _ in 0..20 {
        assert_eq!(gate.try_login("bob", "wrong password 123", "").await.status, 401);
    }
    let locked = gate.try_login("bob", PASSWORD, "").await;
    assert_eq!(locked.status, 401, "the right password is refused while locked");
    assert!(locked.cookie("__Host-poort").is_none());
    let unknown = gate.try_login("nobody", PASSWORD, "").await;
    assert_eq!(normalised(&locked.text(), "bob"), normalised(&unknown.text(), "nobody"), "locked looks like unknown");
    let locks = gate.audit("account_locked");
    assert!(!locks.is_empty());
    assert_eq!(locks[0]["user"], "bob");
    assert_eq!(locks[0]["failures"], 5);

    let show = gate.cli(&["user", "mfa", "bob"]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("locked:          until"), "{show:?}");
    assert!(gate.cli(&["user", "unlock", "bob"]).status.success());
    assert_eq!(gate.try_login("bob", PASSWORD, "").await.status, 303, "unlock restores sign-in");
    assert!(gate.audit("admin").iter().any(|e| e["command"] == "user unlock"));
}

#[tokio::test]
async fn a_lock_expires_on_its_own() {
    let gate = Gate::start().await;
    for _ in 0..5 {
        gate.try_login("bob", "wrong password 123", "").await;
    }
    assert_eq!(gate.try_login("bob", PASSWORD, "").await.status, 401);
    // The sixth attempt doubled the lock to two minutes.
    gate.clock.advance(121);
    assert_eq!(gate.try_login("bob", PASSWORD, "").await.status, 303);
}

#[tokio::test]
async fn second_factor_guesses_count_towards_the_lock() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let (secret, _, _) = enrol(&gate, &s).await;
    let s = gate.login("alice").await;
    for _ in 0..5 {
        assert_eq!(gate.post("/.poort/mfa", &s, &[("code", "000000")]).await.status, 401);
    }
    gate.clock.advance(30);
    let right = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    assert_eq!(
        gate.post("/.poort/mfa", &s, &[("code", &right)]).await.status,
        401,
        "locked: even the right code fails"
    );
    assert!(!gate.audit("account_locked").is_empty());
}

#[tokio::test]
async fn admins_see_and_reset_factors() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    enrol(&gate, &s).await;
    let show = String::from_utf8_lossy(&gate.cli(&["user", "mfa", "alice"]).stdout).into_owned();
    assert!(show.contains("authenticator:   set up") && show.contains("recovery codes:  10 unused"), "{show}");
    assert!(gate.cli(&["user", "mfa-reset", "alice"]).status.success());
    let show = String::from_utf8_lossy(&gate.cli(&["user", "mfa", "alice"]).stdout).into_owned();
    assert!(show.contains("authenticator:   none") && show.contains("recovery codes:  0 unused"), "{show}");
    assert!(gate.audit("admin").iter().any(|e| e["command"] == "user mfa-reset" && e["target"] == "alice"));
    // Five minutes after signing in, a user without a factor gives the password again
    // before setting one up.
    let s = gate.login("alice").await;
    gate.clock.advance(301);
    let r = gate.post("/.poort/security/totp", &s, &[]).await;
    assert_eq!(r.status, 303);
    assert!(r.header("location").unwrap().contains("/.poort/confirm"));
    let wrong = gate.post("/.poort/confirm", &s, &[("password", "not it at all")]).await;
    assert_eq!(wrong.status, 401);
    assert!(!wrong.text().contains("data:image/svg+xml"));
    let s = gate.confirm(&s, &[("password", PASSWORD)]).await;
    let r = gate.post("/.poort/security/totp", &s, &[]).await;
    assert!(r.text().contains("data:image/svg+xml"), "{}", r.text());
}

#[tokio::test]
async fn secrets_are_sealed_at_rest() {
    let gate = Gate::start().await;
    let s = gate.login("alice").await;
    let (secret, _, codes) = enrol(&gate, &s).await;
    let raw = std::fs::read(gate.dir.0.join("poort.db")).unwrap();
    let wal = std::fs::read(gate.dir.0.join("poort.db-wal")).unwrap_or_default();
    for hay in [&raw, &wal] {
        assert!(!hay.windows(secret.len()).any(|w| w == secret.as_slice()), "the TOTP secret is stored in the clear");
        assert!(!hay.windows(11).any(|w| w == codes[0].as_bytes()), "a recovery code is stored in the clear");
    }
}

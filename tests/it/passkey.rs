//! Passkeys end to end with a software authenticator from the webauthn-rs family: real
//! registration and authentication ceremonies against the gateway's JSON endpoints.

use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};

use crate::harness::{Gate, ORIGIN, PASSWORD};

fn origin() -> Url {
    Url::parse(ORIGIN).unwrap()
}

pub(crate) fn body(r: &crate::harness::Resp) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("not JSON: {}", r.text()))
}

/// The value of `data-NAME="..."` on a page, unescaped.
fn data(page: &str, name: &str) -> String {
    let raw = page.split(&format!("data-{name}=\"")).nth(1).unwrap().split('"').next().unwrap();
    raw.replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Registers `key` for the session's user as the security page does it: the person's form
/// post starts the registration, the page's script creates and sends it. Returns the renewed
/// session and the response.
pub(crate) async fn register(
    gate: &Gate,
    session: &str,
    key: &mut SoftPasskey,
    name: &str,
) -> (String, serde_json::Value) {
    let start = gate.post("/.poort/security/passkey/start", session, &[("name", name)]).await;
    assert_eq!(start.status, 200, "{}", start.text());
    let page = start.text();
    let options: CreationChallengeResponse = serde_json::from_str(&data(&page, "options")).unwrap();
    let credential = key.do_registration(origin(), options).expect("the soft authenticator registers");
    let finish = gate
        .post_json(
            "/.poort/security/passkey/finish",
            Some(session),
            &serde_json::json!({ "ceremony": data(&page, "ceremony"), "credential": credential }),
        )
        .await;
    assert_eq!(finish.status, 200, "{}", finish.text());
    (finish.cookie("__Host-poort").expect("a renewed session"), body(&finish))
}

/// Runs the second-factor ceremony; returns the response of the finish step.
pub(crate) async fn authenticate(
    gate: &Gate,
    session: &str,
    key: &mut SoftPasskey,
    next: &str,
) -> crate::harness::Resp {
    let start = gate.post_json("/.poort/mfa/passkey/start", Some(session), &serde_json::json!({ "next": next })).await;
    assert_eq!(start.status, 200, "{}", start.text());
    let start = body(&start);
    let options: RequestChallengeResponse = serde_json::from_value(start["options"].clone()).unwrap();
    let credential = key.do_authentication(origin(), options).expect("the soft authenticator signs");
    gate.post_json(
        "/.poort/mfa/passkey/finish",
        Some(session),
        &serde_json::json!({ "ceremony": start["ceremony"], "credential": credential }),
    )
    .await
}

#[tokio::test]
pub(crate) async fn register_and_use_a_passkey_as_the_second_factor() {
    let gate = Gate::start().await;
    let mut key = SoftPasskey::new(true);
    let s = gate.login("alice").await;
    let (stepped, done) = register(&gate, &s, &mut key, "soft key").await;
    assert_eq!(done["recovery_codes"].as_array().map(Vec::len), Some(10), "first factor: recovery codes");
    assert_eq!(gate.get("/app/", Some(&s)).await.status, 401, "registration renewed the session");
    assert_eq!(gate.get("/vault/", Some(&stepped)).await.status, 200);
    let page = gate.get("/.poort/security", Some(&stepped)).await.text();
    assert!(page.contains("soft key"), "the passkey is listed by its name");
    assert!(gate.audit("factor_changed").iter().any(|e| e["change"] == "passkey added: soft key"));

    // A new password-only session steps up with the key.
    let s = gate.login("alice").await;
    let mfa_page = gate.get("/.poort/mfa?next=%2Fvault%2F", Some(&s)).await.text();
    assert!(mfa_page.contains("data-passkey-auth=\"factor\""), "the step-up page offers the passkey");
    let r = authenticate(&gate, &s, &mut key, "/vault/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(body(&r)["redirect"], "https://localhost:8443/vault/");
    let stepped = r.cookie("__Host-poort").unwrap();
    assert_eq!(gate.get("/vault/x", Some(&stepped)).await.status, 200);
    use base64::Engine;
    let jwt = gate.upstream.last().header("x-poort-assertion").unwrap().to_string();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(claims["amr"], serde_json::json!(["pwd", "hwk"]));
    assert_eq!(gate.audit("mfa_succeeded").iter().filter(|e| e["factor"] == "hwk").count(), 2);
}

#[tokio::test]
async fn forged_and_replayed_assertions_are_refused() {
    let gate = Gate::start().await;
    let mut key = SoftPasskey::new(true);
    let s = gate.login("alice").await;
    register(&gate, &s, &mut key, "soft key").await;

    let s = gate.login("alice").await;
    let start = body(&gate.post_json("/.poort/mfa/passkey/start", Some(&s), &serde_json::json!({})).await);
    let options: RequestChallengeResponse = serde_json::from_value(start["options"].clone()).unwrap();
    let credential = key.do_authentication(origin(), options).unwrap();
    let finish = |ceremony: serde_json::Value| {
        let credential = credential.clone();
        let (gate, s) = (&gate, s.clone());
        async move {
            gate.post_json(
                "/.poort/mfa/passkey/finish",
                Some(&s),
                &serde_json::json!({ "ceremony": ceremony, "credential": credential }),
            )
            .await
        }
    };
    // The assertion answers one challenge; under another ceremony it fails.
    let other = body(&gate.post_json("/.poort/mfa/passkey/start", Some(&s), &serde_json::json!({})).await);
    assert_eq!(finish(other["ceremony"].clone()).await.status, 401);
    assert_eq!(gate.audit("mfa_failed").len(), 1);
    // A key that was never registered is refused.
    let mut stranger = SoftPasskey::new(true);
    let third = body(&gate.post_json("/.poort/mfa/passkey/start", Some(&s), &serde_json::json!({})).await);
    let options: RequestChallengeResponse = serde_json::from_value(third["options"].clone()).unwrap();
    assert!(
        stranger.do_authentication(origin(), options).is_err(),
        "the stranger holds none of the allowed credentials"
    );
    // Its own ceremony works once, and not again.
    assert_eq!(finish(start["ceremony"].clone()).await.status, 200);
    // Replayed: the ceremony is gone (and the step-up already ended the session it was for).
    let replay = finish(start["ceremony"].clone()).await;
    assert!(replay.status == 400 || replay.status == 401, "{}", replay.status);
    assert!(replay.cookie("__Host-poort").is_none());
    // Without the CSRF header the endpoints do nothing.
    let s = gate.login("alice").await;
    let no_csrf = gate
        .request(
            "POST",
            "/.poort/mfa/passkey/start",
            &[("Origin", ORIGIN), ("Content-Type", "application/json"), ("Cookie", &format!("__Host-poort={s}"))],
            b"{}",
        )
        .await;
    assert_eq!(no_csrf.status, 403);
}

#[tokio::test]
async fn removing_a_passkey_needs_a_fresh_second_factor() {
    let gate = Gate::start().await;
    let mut key = SoftPasskey::new(true);
    let s = gate.login("alice").await;
    let (s, _) = register(&gate, &s, &mut key, "old key").await;
    let id = gate.store().with(|c| c.query_row("SELECT id FROM passkeys", (), |r| r.get::<String>(0))).unwrap();
    gate.clock.advance(301);
    let stale = gate.post("/.poort/security/passkey/remove", &s, &[("id", &id)]).await;
    assert_eq!(stale.status, 303, "five minutes after the last factor, confirm first");
    // The password does not stand in for a second factor the user has.
    let pw = gate.post("/.poort/confirm", &s, &[("password", PASSWORD)]).await;
    assert_eq!(pw.status, 400);
    let r = authenticate(&gate, &s, &mut key, "/.poort/security").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = r.cookie("__Host-poort").unwrap();
    let right = gate.post("/.poort/security/passkey/remove", &s, &[("id", &id)]).await;
    assert_eq!(right.status, 200);
    assert!(right.text().contains("The passkey was removed."));
    let left: i64 = gate.store().with(|c| c.query_row("SELECT count(*) FROM passkeys", (), |r| r.get(0))).unwrap();
    assert_eq!(left, 0);
    // The recovery codes made with the first passkey went with the last one.
    let codes: i64 =
        gate.store().with(|c| c.query_row("SELECT count(*) FROM recovery_codes", (), |r| r.get(0))).unwrap();
    assert_eq!(codes, 0);
}

/// A user with a passkey who began setting up an authenticator app and did not finish: a
/// thief with the password can neither see that app's secret nor finish the set-up.
#[tokio::test]
async fn an_unfinished_authenticator_set_up_is_not_a_thiefs_to_finish() {
    let gate = Gate::start().await;
    let mut key = SoftPasskey::new(true);
    let s = gate.login("alice").await;
    let (s, _) = register(&gate, &s, &mut key, "laptop").await;
    let begun = gate.post("/.poort/security/totp", &s, &[]).await;
    assert!(begun.text().contains("data:image/svg+xml"), "the set-up began: {}", begun.text());
    let thief = gate.login("alice").await;
    let r = gate.post("/.poort/security/totp/confirm", &thief, &[("code", "000000")]).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(r.header("location").unwrap().contains("/.poort/confirm"));
    assert!(!r.text().contains("data:image/svg+xml") && !r.text().contains("class=\"key\""), "the secret was shown");
    assert_eq!(gate.get("/vault/", Some(&thief)).await.status, 401);
}

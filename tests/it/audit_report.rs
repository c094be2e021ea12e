//! "Were we breached?": a scripted incident (exploit-shaped probes, a credential-stuffing
//! run, a factor change, a tunnel, an admin command) appears in `poort audit report` and on
//! the console's report page with the right counts.

use poort::clock::Clock;

use crate::harness::{Gate, enrol};

#[tokio::test]
async fn a_scripted_incident_is_in_the_report_with_the_right_counts() {
    let dir = crate::harness::TempDir::new();
    let file = dir.0.join("rules.toml");
    let rules = "[[rule]]\nid = \"vpns-path\"\nreason = \"CVE-2019-19781 target directory\"\naction = \"deny\"\npath_prefix = \"/vpns\"\n";
    std::fs::write(&file, rules).unwrap();
    let gate = Gate::start_config("", &format!("\n[mitigate]\nrules_file = \"{}\"\n", file.display())).await;

    // The exploit's probes, as scanners sent them in January 2020, and a traversal.
    for _ in 0..3 {
        assert_eq!(gate.get("/vpns/portal/scripts/newbm.pl", None).await.status, 403);
    }
    assert_eq!(gate.refusals("mitigation_matched").await, 3);
    let traversal = gate.raw(b"GET /app/..%2f..%2fetc/passwd HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(traversal.status, 400);
    // Credential stuffing against alice, then her real sign-in, then a new authenticator.
    for _ in 0..4 {
        assert_eq!(gate.try_login("alice", "Summer2026!", "").await.status, 401);
    }
    let s = gate.login("alice").await;
    let again = gate.login("alice").await;
    assert!(!again.is_empty());
    let (_, _, _) = enrol(&gate, &s).await;
    // bob's command line opens a tunnel; an operator unlocks alice.
    let cli = gate.cli_session("bob").await;
    let cookie = format!("__Host-poort={cli}");
    let ws =
        gate.websocket("localhost", "/.poort/tunnel/sink", &[("X-Poort-Client", "cli"), ("Cookie", &cookie)]).await;
    assert!(ws.is_ok());
    assert!(gate.cli(&["user", "unlock", "alice"]).status.success());
    assert!(gate.refusals("request_rejected").await >= 1, "the traversal is written");
    // Someone puts a rules file in place that the gateway refuses.
    std::fs::write(&file, "[[rule]]\nid = \"oops\"\n").unwrap();
    crate::harness::eventually("the bad rules file refused", std::time::Duration::from_secs(3), async || {
        !gate.audit("rules_refused").is_empty()
    })
    .await;
    std::fs::write(&file, rules).unwrap();
    crate::harness::eventually("the rules file loaded again", std::time::Duration::from_secs(3), async || {
        gate.audit("rules_loaded").len() >= 2
    })
    .await;

    let day = poort::clock::format_utc(gate.clock.now())[..10].to_string();
    let next = poort::clock::format_utc(gate.clock.now() + 86_400)[..10].to_string();
    let out = gate.cli(&["audit", "report", "--since", &day, "--until", &next, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["chain_intact"], true);
    assert_eq!(r["mitigation"][0]["key"], "vpns-path");
    assert_eq!(r["mitigation"][0]["cve"], "CVE-2019-19781");
    assert_eq!(r["mitigation"][0]["count"], 3);
    let refused: u64 = r["refused"].as_array().unwrap().iter().map(|c| c["count"].as_u64().unwrap()).sum();
    assert!(refused >= 1, "the traversal: {}", r["refused"]);
    let failed = r["failed_sign_ins"].as_array().unwrap();
    assert_eq!((failed.len(), &failed[0]["key"], &failed[0]["count"]), (1, &"127.0.0.1".into(), &4.into()));
    let new: Vec<&serde_json::Value> =
        r["new_addresses"].as_array().unwrap().iter().filter(|l| l["user"] == "alice").collect();
    assert_eq!(new.len(), 1, "alice's first sign-in from 127.0.0.1, and only that one: {new:?}");
    let changes = r["factor_changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|l| l["user"] == "alice" && l["what"].as_str().unwrap().contains("authenticator app set up"))
    );
    let tunnels = r["tunnels_opened"].as_array().unwrap();
    assert_eq!(tunnels.len(), 1);
    assert_eq!((&tunnels[0]["user"], &tunnels[0]["what"]), (&"bob".into(), &"tunnel sink".into()));
    let admin = r["admin_commands"].as_array().unwrap();
    assert!(admin.iter().any(|l| l["what"].as_str().unwrap().starts_with("user unlock alice")), "{admin:?}");
    let rules: Vec<&str> = r["rules_changes"].as_array().unwrap().iter().map(|l| l["what"].as_str().unwrap()).collect();
    assert!(rules.iter().any(|w| w.starts_with("applied ") && w.ends_with("(1 rules)")), "{rules:?}");
    assert!(rules.iter().any(|w| w.starts_with("REFUSED ")), "{rules:?}");
    assert_eq!((r["seals"].as_u64(), r["last_seal"].is_null()), (Some(0), true), "the log is not sealed");

    // The text report says the same for a terminal.
    let text = gate.cli(&["audit", "report", "--since", &day, "--until", &next]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("vpns-path (CVE-2019-19781)"), "{text}");
    assert!(text.contains("Seals of the audit log: none in the range"), "{text}");

    // A day that is no day is refused.
    let bad = gate.cli(&["audit", "report", "--since", "2026-02-30"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a date"));
}

//! Emergency mitigation as an operator uses it: a rule added to a running gateway's file blocks
//! within two seconds, a broken file changes nothing, throttling, `poort rules test`, signed
//! rule bundles, and lockdown.

use std::time::Duration;

use crate::harness::{Gate, eventually};

const FIRST: &str = r#"
[[rule]]
id = "vpns-path"
reason = "CVE-2019-19781 target directory"
action = "deny"
path_prefix = "/vpns"
"#;

/// A gateway with a rules file; the returned folder holds the file and must outlive the test.
async fn gate_with_rules(rules: &str, extra: &str) -> (Gate, crate::harness::TempDir) {
    let dir = crate::harness::TempDir::new();
    let file = dir.0.join("rules.toml");
    std::fs::write(&file, rules).unwrap();
    let tables = format!("\n[mitigate]\nrules_file = \"{}\"\nadmin_group = \"staff\"\n{extra}", file.display());
    (Gate::start_config("", &tables).await, dir)
}

fn rules_path(gate: &Gate) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&gate.config_path).unwrap();
    let line = text.lines().find(|l| l.starts_with("rules_file")).unwrap();
    std::path::PathBuf::from(line.split('"').nth(1).unwrap())
}

#[tokio::test]
async fn a_new_rule_blocks_within_two_seconds_and_a_broken_file_changes_nothing() {
    let (gate, _rules) = gate_with_rules(FIRST, "").await;
    let s = gate.login("alice").await;
    assert_eq!(gate.get("/vpns/portal/scripts/newbm.pl", Some(&s)).await.status, 403);
    let probe = "/app/report?lang=../../../etc/passwd";
    assert_eq!(gate.get(probe, Some(&s)).await.status, 200, "no rule for this yet");

    // An operator adds a virtual patch to the running gateway's file.
    let patched = format!(
        "{FIRST}\n[[rule]]\nid = \"lang-traversal\"\nreason = \"path in lang= (FortiOS CVE-2018-13379 pattern)\"\naction = \"deny\"\nraw = [\"dot_dot\"]\n"
    );
    std::fs::write(rules_path(&gate), patched).unwrap();
    let written = std::time::Instant::now();
    eventually("the new rule to block", Duration::from_secs(2), async || gate.get(probe, Some(&s)).await.status == 403)
        .await;
    assert!(written.elapsed() < Duration::from_secs(2));
    let hits = gate.upstream.hits();
    assert_eq!(gate.get(probe, None).await.status, 403, "applied before the session check");
    assert_eq!(gate.upstream.hits(), hits);
    let matched = gate.audit("mitigation_matched");
    assert!(matched.iter().any(|e| e["rule"] == "lang-traversal" && e["action"] == "deny"));

    // A broken file: the running rules stay, and status says why.
    std::fs::write(rules_path(&gate), "[[rule]]\nid = \"oops\"\naction = \"deny\"\npath_prefix = \"no-slash\"\n")
        .unwrap();
    eventually("the broken file to be refused", Duration::from_secs(3), async || {
        let out = gate.cli(&["rules", "status"]);
        String::from_utf8_lossy(&out.stdout).contains("REFUSED")
    })
    .await;
    let out = gate.cli(&["rules", "status"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rule[oops].path_prefix") && text.contains("2 in force"), "{text}");
    assert_eq!(gate.get(probe, Some(&s)).await.status, 403, "the old rules still apply");
    assert_eq!(gate.get("/vpns/x", Some(&s)).await.status, 403);
}

#[tokio::test]
async fn throttle_and_log_rules() {
    let rules = r#"
[[rule]]
id = "slow-pub"
action = "throttle"
rate = "2/m"
app = "pub"

[[rule]]
id = "watch-scanner"
action = "log"
header = [{ name = "user-agent", contains = "nikto" }]
"#;
    let (gate, _rules) = gate_with_rules(rules, "").await;
    assert_eq!(gate.get("/pub/a", None).await.status, 200);
    assert_eq!(gate.get("/pub/a", None).await.status, 200);
    assert_eq!(gate.get("/pub/a", None).await.status, 429, "the third in a minute is throttled");
    assert_eq!(gate.upstream.hits(), 2);
    let r = gate.request("GET", "/.poort/health", &[("User-Agent", "Nikto/2.5")], b"").await;
    assert_eq!(r.status, 200, "a log rule lets the request through");
    assert!(gate.audit("mitigation_matched").iter().any(|e| e["rule"] == "watch-scanner" && e["action"] == "log"));
}

#[tokio::test]
async fn rules_test_explains_without_a_gateway() {
    let (gate, _rules) = gate_with_rules(FIRST, "").await;
    let run = |args: &[&str]| {
        String::from_utf8_lossy(&gate.cli(&[&["rules", "test"][..], args].concat()).stdout).into_owned()
    };
    let out = run(&["--target", "/vpn/../vpns/cfg/smb.conf"]);
    assert!(out.contains("front door: refused with 400 (target_dot_segment)"), "{out}");
    let out =
        run(&["--method", "POST", "--target", "/vpns/portal/scripts/newbm.pl", "--header", "NSC_USER: ../../../x"]);
    assert!(out.contains("rule vpns-path matches: deny: 403") && out.contains("CVE-2019-19781"), "{out}");
    let out = run(&["--target", "/app/fine"]);
    assert!(out.contains("app: app") && out.contains("no rule matches"), "{out}");
    let raw = gate.dir.0.join("req.txt");
    std::fs::write(&raw, "GET /vpns/x HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let out =
        String::from_utf8_lossy(&gate.cli(&["rules", "test", "--raw", raw.to_str().unwrap()]).stdout).into_owned();
    assert!(out.contains("rule vpns-path matches"), "{out}");
}

/// Signs a rules file with the publisher's key, as the publisher would.
fn sign(key: &std::path::Path, file: &std::path::Path) -> bool {
    let bin = env!("CARGO_BIN_EXE_poort");
    std::process::Command::new(bin).args(["rules", "sign", "--key"]).arg(key).arg(file).status().unwrap().success()
}

#[tokio::test]
async fn only_signed_rule_bundles_are_applied_when_a_key_is_configured() {
    let keys = crate::harness::TempDir::new();
    let key = keys.0.join("publisher.pk8");
    let bin = env!("CARGO_BIN_EXE_poort");
    let out = std::process::Command::new(bin).args(["rules", "keygen", "--out"]).arg(&key).output().unwrap();
    let public = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().trim().to_string();
    // The first bundle, signed before the gateway starts.
    let gate_dir = crate::harness::TempDir::new();
    let file = gate_dir.0.join("rules.toml");
    std::fs::write(&file, FIRST).unwrap();
    assert!(sign(&key, &file), "poort rules sign failed");
    let verify =
        std::process::Command::new(bin).args(["rules", "verify", "--public-key", &public]).arg(&file).output().unwrap();
    assert!(String::from_utf8_lossy(&verify.stdout).contains("signature good"));
    let tables = format!(
        "\n[mitigate]\nrules_file = \"{}\"\nrequire_signature = true\npublic_key = \"{public}\"\n",
        file.display()
    );
    let gate = Gate::start_config("", &tables).await;
    assert_eq!(gate.get("/vpns/x", None).await.status, 403);

    // A changed file without a new signature is refused; the signed rules stay.
    let tampered = FIRST.replace("/vpns", "/nothing");
    std::fs::write(&file, &tampered).unwrap();
    eventually("the unsigned change to be refused", Duration::from_secs(3), async || {
        String::from_utf8_lossy(&gate.cli(&["rules", "status"]).stdout).contains("signature does not match")
    })
    .await;
    assert_eq!(gate.get("/vpns/x", None).await.status, 403);
    // Signed by the publisher, it applies.
    assert!(sign(&key, &file), "poort rules sign failed");
    eventually("the signed bundle to apply", Duration::from_secs(3), async || {
        gate.get("/vpns/x", None).await.status == 404
    })
    .await;
}

#[tokio::test]
async fn lockdown_leaves_only_admins() {
    let (gate, _rules) = gate_with_rules(FIRST, "").await;
    let alice = gate.login("alice").await; // staff: the admin group here
    let bob = gate.login("bob").await;
    assert!(gate.cli(&["lockdown", "on"]).status.success());
    eventually("the lockdown to apply", Duration::from_secs(2), async || {
        gate.get("/app/", Some(&bob)).await.status == 503
    })
    .await;
    let page = gate.get("/", Some(&bob)).await;
    assert_eq!(page.status, 503);
    assert!(page.text().contains("Under maintenance"));
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200, "admins go on");
    let r = gate.try_login("bob", crate::harness::PASSWORD, "").await;
    assert_eq!(r.status, 503, "non-admins cannot sign in");
    assert!(r.cookie("__Host-poort").is_none());
    assert_eq!(gate.try_login("alice", crate::harness::PASSWORD, "").await.status, 303);
    assert!(!gate.audit("locked_down").is_empty());
    assert!(gate.audit("admin").iter().any(|e| e["command"] == "lockdown" && e["target"] == "on"));
    assert!(gate.cli(&["lockdown", "off"]).status.success());
    eventually("the lockdown to lift", Duration::from_secs(2), async || {
        gate.get("/app/", Some(&bob)).await.status == 200
    })
    .await;
}

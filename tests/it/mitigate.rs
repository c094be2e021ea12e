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
    eventually("the refusal to be audited", Duration::from_secs(2), async || {
        gate.audit("mitigation_matched").iter().any(|e| e["rule"] == "lang-traversal" && e["action"] == "deny")
    })
    .await;

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
    assert!(text.contains("rule[oops].path_prefix") && text.contains("2 from the file"), "{text}");
    assert_eq!(gate.get(probe, Some(&s)).await.status, 403, "the old rules still apply");
    assert_eq!(gate.get("/vpns/x", Some(&s)).await.status, 403);
    assert!(text.contains("hits:      lang-traversal:"), "{text}");

    // The virtual patch is withdrawn: its hit count goes with it.
    std::fs::write(rules_path(&gate), FIRST).unwrap();
    eventually("the patch to be withdrawn", Duration::from_secs(3), async || {
        gate.get(probe, Some(&s)).await.status == 200
    })
    .await;
    let text = String::from_utf8_lossy(&gate.cli(&["rules", "status"]).stdout).into_owned();
    assert!(!text.contains("lang-traversal"), "{text}");
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
    gate.audited("mitigation_matched", |e| e["rule"] == "watch-scanner" && e["action"] == "log").await;
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
    std::fs::write(&file, format!("version = 1\n{FIRST}")).unwrap();
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
    let tampered = format!("version = 2\n{}", FIRST.replace("/vpns", "/nothing"));
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
    // A request of bob's still on its way through the proxy when the lockdown cuts his session
    // is cut too, with no answer at all: read as "not yet".
    let raw =
        format!("GET /app/ HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={bob}\r\nConnection: close\r\n\r\n");
    eventually("the lockdown to apply", Duration::from_secs(5), async || {
        gate.hostile(raw.as_bytes()).await.0 == Some(503)
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
    eventually("the lockdown refusals to be audited", Duration::from_secs(5), async || {
        !gate.audit("locked_down").is_empty()
    })
    .await;
    assert!(gate.audit("admin").iter().any(|e| e["command"] == "lockdown" && e["target"] == "on"));
    assert!(gate.cli(&["lockdown", "off"]).status.success());
    eventually("the lockdown to lift", Duration::from_secs(5), async || {
        gate.get("/app/", Some(&bob)).await.status == 200
    })
    .await;
}

#[tokio::test]
async fn a_rule_meets_every_spelling_the_front_door_accepts() {
    let rules = r#"
[[rule]]
id = "admin-panel"
action = "deny"
path_glob = "/app/admin/**"

[[rule]]
id = "secret"
action = "deny"
path_exact = "/pub/secret"

[[rule]]
id = "sqlmap"
action = "deny"
header = [{ name = "user-agent", contains = "sqlmap" }]
"#;
    let (gate, _rules) = gate_with_rules(rules, "").await;
    let s = gate.login("alice").await;
    // Each reaches the same app, and all but the last the same upstream path, as the rule's
    // spelling; none may reach the upstream.
    for target in [
        "/app/admin/panel",
        "/APP/admin/panel",
        "/App/Admin/panel",
        "/app/ADMIN/",
        "/app/admin",
        "/app/%61dmin/panel",
        "/app/%41DMIN/panel",
        "/app/adm%C4%B1n/panel",
        "/app/ADM%C4%B0N/panel",
        "/app/admin./panel",
        "/app/admin%20/panel",
        "/pub/secret/",
        "/PUB/Secret",
        "/pub/secret.",
        "/pub/secret%20",
        "/pub/secret%20.",
    ] {
        let before = gate.upstream.hits();
        let r = gate.get(target, Some(&s)).await;
        assert_eq!((target, r.status), (target, 403));
        assert_eq!(gate.upstream.hits(), before, "{target} reached the upstream");
    }
    assert_eq!(gate.get("/app/administrator", Some(&s)).await.status, 200, "a different segment is not matched");
    // The refusal says what happened, not who the client is.
    let anonymous = gate.get("/pub/secret", None).await;
    assert_eq!(anonymous.status, 403);
    assert!(
        anonymous.text().contains("security rules") && !anonymous.text().contains("signed in"),
        "{}",
        anonymous.text()
    );

    // A header value with a byte that is not UTF-8 is still read by a header rule.
    let before = gate.upstream.hits();
    let (status, reached) = gate
        .hostile(b"GET /pub/x HTTP/1.1\r\nHost: localhost\r\nUser-Agent: sqlmap\xff/1.7\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!((status, reached), (Some(403), 0));
    assert_eq!(gate.upstream.hits(), before);

    // `poort rules test` agrees, for a typed target and for a captured request with that byte.
    let out = String::from_utf8_lossy(&gate.cli(&["rules", "test", "--target", "/WHOAMI/x"]).stdout).into_owned();
    assert!(out.contains("no rule matches"), "{out}");
    let out = String::from_utf8_lossy(&gate.cli(&["rules", "test", "--target", "/APP/Admin/x"]).stdout).into_owned();
    assert!(out.contains("rule admin-panel matches"), "{out}");
    let raw = gate.dir.0.join("req.txt");
    std::fs::write(&raw, b"GET /pub/x HTTP/1.1\r\nHost: localhost\r\nUser-Agent: SQLMAP\xfe\r\n\r\n").unwrap();
    let out =
        String::from_utf8_lossy(&gate.cli(&["rules", "test", "--raw", raw.to_str().unwrap()]).stdout).into_owned();
    assert!(out.contains("rule sqlmap matches"), "{out}");
}

#[tokio::test]
async fn an_older_signed_rules_file_is_never_put_back() {
    let keys = crate::harness::TempDir::new();
    let key = keys.0.join("publisher.pk8");
    let bin = env!("CARGO_BIN_EXE_poort");
    let out = std::process::Command::new(bin).args(["rules", "keygen", "--out"]).arg(&key).output().unwrap();
    let public = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().trim().to_string();
    let dir = crate::harness::TempDir::new();
    let file = dir.0.join("rules.toml");
    let sig = crate::harness::TempDir::new();
    // Version 1, signed; kept aside as an attacker (or a careless restore) would keep it.
    std::fs::write(&file, format!("version = 1\n{FIRST}")).unwrap();
    assert!(sign(&key, &file));
    let old = (std::fs::read(&file).unwrap(), std::fs::read(dir.0.join("rules.toml.sig")).unwrap());
    // A file without a version cannot be signed.
    let unversioned = sig.0.join("plain.toml");
    std::fs::write(&unversioned, FIRST).unwrap();
    assert!(!sign(&key, &unversioned), "poort rules sign refuses a file without a version");

    let tables = format!(
        "\n[mitigate]\nrules_file = \"{}\"\nrequire_signature = true\npublic_key = \"{public}\"\n",
        file.display()
    );
    let mut gate = Gate::start_config("", &tables).await;
    let probe = "/pub/report?lang=../../etc/passwd";
    assert_eq!(gate.get(probe, None).await.status, 200);
    // Version 2 adds a rule.
    let v2 = format!("version = 2\n{FIRST}\n[[rule]]\nid = \"lang\"\naction = \"deny\"\nraw = [\"dot_dot\"]\n");
    std::fs::write(&file, &v2).unwrap();
    assert!(sign(&key, &file));
    eventually("version 2 to apply", Duration::from_secs(3), async || gate.get(probe, None).await.status == 403).await;
    let new = (std::fs::read(&file).unwrap(), std::fs::read(dir.0.join("rules.toml.sig")).unwrap());

    // Version 1 and its valid signature are copied back over version 2: refused.
    std::fs::write(&file, &old.0).unwrap();
    std::fs::write(dir.0.join("rules.toml.sig"), &old.1).unwrap();
    eventually("the older file to be refused", Duration::from_secs(3), async || {
        gate.audit("rules_refused").iter().any(|e| e["why"].as_str().unwrap().contains("version 1 does not follow"))
    })
    .await;
    assert_eq!(gate.get(probe, None).await.status, 403, "version 2's rules stay in force");
    let loaded = gate.audit("rules_loaded");
    assert!(loaded.iter().any(|e| e["version"] == 1) && loaded.iter().any(|e| e["version"] == 2), "{loaded:?}");

    // Across a restart too: the gateway remembers version 2 and will not start on version 1.
    gate.stop().await;
    let cfg = poort::config::load(&gate.config_path).unwrap();
    let err = poort::server::start(cfg, std::sync::Arc::new(gate.clock.clone())).await.unwrap_err();
    assert!(format!("{err:#}").contains("does not follow version 2"), "{err:#}");
    std::fs::write(&file, &new.0).unwrap();
    std::fs::write(dir.0.join("rules.toml.sig"), &new.1).unwrap();
    gate.boot().await;
    assert_eq!(gate.get(probe, None).await.status, 403);

    // An expired file is refused as well.
    let expired = format!("version = 3\nexpires = \"2001-01-01T00:00:00Z\"\n{FIRST}");
    std::fs::write(&file, expired).unwrap();
    assert!(sign(&key, &file));
    eventually("the expired file to be refused", Duration::from_secs(3), async || {
        gate.audit("rules_refused").iter().any(|e| e["why"].as_str().unwrap().contains("expired"))
    })
    .await;
    assert_eq!(gate.get(probe, None).await.status, 403);
}

#[tokio::test]
async fn a_file_caught_empty_mid_write_changes_nothing() {
    let (gate, _rules) = gate_with_rules(FIRST, "").await;
    assert_eq!(gate.get("/vpns/x", None).await.status, 403);
    // As an editor or scp does: truncate, then (slowly) write the new content.
    std::fs::write(rules_path(&gate), "").unwrap();
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < until {
        assert_eq!(gate.get("/vpns/x", None).await.status, 403, "the empty file replaced the rules");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let why = gate.audit("rules_refused");
    assert!(why.iter().any(|e| e["why"].as_str().unwrap().contains("rule = []")), "{why:?}");
    // A half-written file that does not parse changes nothing either.
    std::fs::write(rules_path(&gate), "[[rule]]\nid = \"vpns-path\"\naction = \"de").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gate.get("/vpns/x", None).await.status, 403);
    // Removing every rule on purpose works.
    std::fs::write(rules_path(&gate), "rule = []\n").unwrap();
    eventually("the rules to be removed", Duration::from_secs(3), async || {
        gate.get("/vpns/x", None).await.status == 404
    })
    .await;
}

#[tokio::test]
async fn a_log_rule_lets_nothing_through_unrecorded() {
    let rules = "[[rule]]\nid = \"watch\"\naction = \"log\"\npath_prefix = \"/pub\"\n";
    let (gate, _rules) = gate_with_rules(rules, "").await;
    assert_eq!(gate.get("/pub/a", None).await.status, 200);
    // The audit log stops taking records.
    let conn = poort::store::open_connection(gate.db()).unwrap();
    conn.batch("CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;").unwrap();
    let before = gate.upstream.hits();
    assert_eq!(gate.get("/pub/a", None).await.status, 503);
    assert_eq!(gate.upstream.hits(), before, "forwarded without its record");
}

#[tokio::test]
async fn lockdown_is_recorded_before_it_is_switched() {
    let (gate, _rules) = gate_with_rules(FIRST, "").await;
    let conn = poort::store::open_connection(gate.db()).unwrap();
    conn.batch("CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;").unwrap();
    assert!(!gate.cli(&["lockdown", "on"]).status.success(), "a switch that cannot be recorded fails");
    let switch: Option<String> =
        conn.query_row("SELECT value FROM settings WHERE key = 'lockdown'", (), |r| r.get(0)).ok();
    assert_ne!(switch.as_deref(), Some("on"));
}

/// A writer that pauses for a moment in the middle of a file: the first half is not applied
/// on its own (the file must stay unchanged for half a second first).
#[tokio::test]
async fn a_file_written_in_two_steps_is_read_whole() {
    let two = format!("{FIRST}\n[[rule]]\nid = \"secret\"\naction = \"deny\"\npath_prefix = \"/pub/secret\"\n");
    let (gate, _rules) = gate_with_rules(&two, "").await;
    assert_eq!(gate.get("/pub/secret", None).await.status, 403);
    std::fs::write(rules_path(&gate), FIRST).unwrap(); // the first rule only, for now
    let until = std::time::Instant::now() + Duration::from_millis(300);
    while std::time::Instant::now() < until {
        assert_eq!(gate.get("/pub/secret", None).await.status, 403, "half a file was applied");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    std::fs::write(rules_path(&gate), &two).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(gate.get("/pub/secret", None).await.status, 403);
    assert!(gate.audit("rules_loaded").iter().all(|e| e["rules"] != 1), "{:?}", gate.audit("rules_loaded"));
}

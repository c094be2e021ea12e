//! The signed mitigation feed as a fleet uses it: a publisher writes a feed file with `poort
//! rules publish`, a real nginx serves it over https, and three gateway nodes on one
//! PostgreSQL database poll it. A new version is in force on every node within the interval;
//! a rolled-back version, a file changed after signing and an expired file are each refused,
//! audited once per node, and change nothing; an unreachable feed keeps the rules, even
//! across a restart.

use std::time::{Duration, Instant};

use crate::harness::{Gate, Nginx, TempDir, TestCa, closed_port, eventually};

fn poort(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poort")).args(args).output().unwrap();
    assert!(out.status.success(), "poort {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rules denying each path in `paths` (ids feed-1, feed-2, ...).
fn rules(paths: &[&str]) -> String {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "[[rule]]\nid = \"feed-{}\"\nreason = \"feed test\"\naction = \"deny\"\npath_prefix = \"{p}\"\n",
                i + 1
            )
        })
        .collect()
}

struct Publisher {
    dir: TempDir,
}

impl Publisher {
    fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }

    /// Publishes `rules` (the feed file is kept outside the served folder); returns the file.
    fn publish(&self, rules: &str, extra: &[&str]) -> Vec<u8> {
        std::fs::write(self.dir.0.join("rules.toml"), rules).unwrap();
        let (key, out, file) = (self.path("feed.key"), self.path("poort.feed"), self.path("rules.toml"));
        let mut args = vec!["rules", "publish", "--key", &key, "--out", &out];
        args.extend_from_slice(extra);
        args.push(&file);
        poort(&args);
        std::fs::read(&out).unwrap()
    }

    /// Puts `bytes` in place of the served file, as a rename (a server never sends half).
    fn serve(&self, bytes: &[u8]) {
        std::fs::write(self.path("www/next"), bytes).unwrap();
        std::fs::rename(self.path("www/next"), self.path("www/poort.feed")).unwrap();
    }
}

/// Whether every one of the three nodes refuses `path` (connections go to the nodes in turn).
async fn all_deny(gate: &Gate, path: &str) -> bool {
    let mut denied = 0;
    for _ in 0..3 {
        denied += usize::from(gate.get(path, None).await.status == 403);
    }
    denied == 3
}

/// How many audited refusals of a file from the feed give `why`.
fn refusals(gate: &Gate, url: &str, why: &str) -> usize {
    let about = |e: &serde_json::Value| e["file"] == url && e["why"].as_str().unwrap_or_default().contains(why);
    gate.audit("rules_refused").iter().filter(|e| about(e)).count()
}

#[tokio::test]
async fn three_nodes_follow_the_signed_feed_and_refuse_rollback_tampering_and_replay() {
    let pg = crate::cluster::Postgres::start();
    let publisher = Publisher { dir: TempDir::new() };
    std::fs::create_dir(publisher.dir.0.join("www")).unwrap();
    let keygen = poort(&["rules", "keygen", "--out", &publisher.path("feed.key")]);
    let public_key = keygen.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap().to_string();
    let v1 = publisher.publish(&rules(&["/feed-v1"]), &[]);
    publisher.serve(&v1);

    let ca = TestCa::new("Feed CA");
    let cert = ca.issue(&["127.0.0.1"], "rules server");
    let site = TempDir::new();
    std::fs::write(site.0.join("cert.pem"), &cert.cert_pem).unwrap();
    std::fs::write(site.0.join("key.pem"), &cert.key_pem).unwrap();
    std::fs::write(publisher.dir.0.join("ca.pem"), ca.pem()).unwrap();
    let ca_file = publisher.path("ca.pem");
    let port = closed_port();
    let www = publisher.path("www");
    let nginx = Nginx::start_in(
        site,
        &format!(
            "  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {{dir}}/cert.pem;\n    ssl_certificate_key {{dir}}/key.pem;\n    root {www};\n  }}\n"
        ),
        port,
    );
    let url = format!("https://127.0.0.1:{port}/poort.feed");
    let tables = format!(
        "\n[mitigate]\nfeed = \"{url}\"\nfeed_public_key = \"{public_key}\"\nfeed_interval = \"1s\"\nfeed_ca_file = \"{ca_file}\"\n"
    );
    let mut gate = Gate::start_store("", "", &tables, &format!("database_url = \"{}\"", pg.database("feed"))).await;
    gate.add_node().await;
    gate.add_node().await;
    assert_ne!(gate.get("/feed-v2", None).await.status, 403, "no rule for this yet");

    eventually("version 1 on every node", Duration::from_secs(5), async || all_deny(&gate, "/feed-v1").await).await;

    // A new version is in force on every node within the interval (1 s, a tenth of it more at
    // random, and the time to fetch).
    publisher.serve(&publisher.publish(&rules(&["/feed-v1", "/feed-v2"]), &[]));
    let published = Instant::now();
    eventually("version 2 on every node", Duration::from_secs(3), async || all_deny(&gate, "/feed-v2").await).await;
    println!("version 2 in force on three nodes {:?} after it was published", published.elapsed());
    let loaded = gate.audited("rules_loaded", |e| e["file"] == url.as_str() && e["version"] == 2).await;
    assert!(!loaded.is_empty(), "the new version is audited");
    let matched = gate.audited("mitigation_matched", |e| e["rule"] == "feed:feed-2").await;
    assert!(!matched.is_empty(), "a feed rule is named apart from local rules");

    // Rollback: the publisher's server sends version 1 again. Every node refuses it once.
    publisher.serve(&v1);
    eventually("the rollback refused by every node", Duration::from_secs(5), async || {
        refusals(&gate, &url, "rollback") == 3
    })
    .await;
    assert!(all_deny(&gate, "/feed-v2").await, "version 2 stays in force");

    // A file changed after it was signed: a rule taken out of version 3.
    let v3 = publisher.publish(&rules(&["/feed-v1", "/feed-v2", "/feed-v3"]), &[]);
    let tampered = String::from_utf8(v3).unwrap().replace("/feed-v2", "/feed-vX");
    publisher.serve(tampered.as_bytes());
    eventually("the changed file refused by every node", Duration::from_secs(5), async || {
        refusals(&gate, &url, "changed after it was signed") == 3
    })
    .await;
    assert!(all_deny(&gate, "/feed-v2").await, "the rule taken out stays in force");
    assert!(!all_deny(&gate, "/feed-v3").await, "nothing of the refused file is used");
    // A server that sends another bad file at every poll does not flood the audit log: each
    // kind of refusal is reported once until a file is taken.
    for n in 0..3 {
        publisher.serve(format!("# {n}\n{tampered}").as_bytes());
        tokio::time::sleep(Duration::from_millis(1300)).await;
    }
    assert_eq!(refusals(&gate, &url, "changed after it was signed"), 3);

    // Replay of an expired file: the gateways' clock is eight days on, past a file valid for
    // seven days and an hour.
    gate.clock.advance(8 * 24 * 3600);
    publisher.serve(&publisher.publish(&rules(&["/feed-v1", "/feed-v2", "/feed-v4"]), &["--valid-for", "169h"]));
    eventually("the expired file refused by every node", Duration::from_secs(5), async || {
        refusals(&gate, &url, "expired") == 3
    })
    .await;
    assert!(!all_deny(&gate, "/feed-v4").await);

    // Each refused file is audited once per node, not at every poll.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(refusals(&gate, &url, "rollback"), 3);
    assert_eq!(refusals(&gate, &url, "expired"), 3);

    // The publisher fixes it: a new version is taken again.
    gate.clock.advance(-8 * 24 * 3600);
    publisher.serve(&publisher.publish(&rules(&["/feed-v1", "/feed-v2", "/feed-v5"]), &["--valid-for", "170h"]));
    eventually("version 5 on every node", Duration::from_secs(3), async || all_deny(&gate, "/feed-v5").await).await;
    // `rules test` on the gateway checks the feed's rules too; with --rules, a publisher checks
    // a file without any gateway.
    let tested = gate.cli(&["rules", "test", "--target", "/feed-v5/x"]);
    assert!(String::from_utf8_lossy(&tested.stdout).contains("rule feed:feed-3 matches: deny"), "{tested:?}");
    let feed_file = publisher.path("poort.feed");
    let offline =
        poort(&["rules", "test", "--rules", &feed_file, "--target", "/feed-v5/x", "--config", "/nonexistent.toml"]);
    assert!(offline.contains("rule feed-3 matches: deny"), "{offline}");
    eventually("the metrics to show version 5", Duration::from_secs(3), async || {
        gate.scrape().await.contains("poort_mitigation_feed_version 5")
    })
    .await;

    // The feed server goes away: the rules stay, and the status says so.
    drop(nginx);
    let status = gate.dir.0.join("rules-status.json");
    eventually("the feed reported unreachable", Duration::from_secs(5), async || {
        std::fs::read_to_string(&status).unwrap_or_default().contains("unreachable_since\": \"")
    })
    .await;
    assert!(all_deny(&gate, "/feed-v5").await);
    let out = gate.cli(&["rules", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("feed:      {url}")) && text.contains("version: 5"), "{text}");
    assert!(text.contains("UNREACHABLE since"), "{text}");

    // A node that starts while the feed is down applies the file in force from the database.
    gate.stop().await;
    gate.boot().await;
    assert_eq!(gate.get("/feed-v5", None).await.status, 403, "the feed's rules survive a restart");
}

//! Audit export to a SIEM: JSON lines to a file, and RFC 5424 over TLS to a real rsyslog.
//! Every record arrives once and in order with hashes that chain, also when the receiver is
//! stopped while records are made and started again, and across a restart of poort.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{Gate, Reaped, TempDir, TestCa, closed_port, eventually, wait_for_port};

/// Checks lines of exported records: sequence numbers from `first` up, each once and in
/// order, each hash computed by the published recipe over the previous one.
fn check_chain(records: &[serde_json::Value], first: i64) {
    let mut prev: Option<String> = None;
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"].as_i64().unwrap(), first + i as i64, "record {i} of {records:?}");
        let detail = r["detail"].as_str().unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(detail).unwrap(), r["event"]);
        let prev_hex = r["prev"].as_str().unwrap();
        if let Some(p) = &prev {
            assert_eq!(prev_hex, p, "record {} does not follow the one before", r["seq"]);
        }
        // SHA-256 of "poort-audit-v1" then each field with its length as 8 bytes big-endian:
        // previous hash, seq and at (8 bytes big-endian each), kind, detail.
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"poort-audit-v1");
        let prev_bytes: Vec<u8> =
            (0..prev_hex.len()).step_by(2).map(|j| u8::from_str_radix(&prev_hex[j..j + 2], 16).unwrap()).collect();
        let seq = r["seq"].as_i64().unwrap().to_be_bytes();
        let at = r["at"].as_i64().unwrap().to_be_bytes();
        for part in [&prev_bytes[..], &seq, &at, r["kind"].as_str().unwrap().as_bytes(), detail.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let hash = poort::secret::hex(ctx.finish().as_ref());
        assert_eq!(r["hash"].as_str().unwrap(), hash, "record {}", r["seq"]);
        prev = Some(hash);
    }
}

fn last_seq(gate: &Gate) -> i64 {
    gate.store().with(|c| c.query_row("SELECT MAX(seq) FROM audit", (), |r| r.get(0))).unwrap()
}

fn delivered(gate: &Gate, name: &str) -> i64 {
    let key = poort::audit::export::cursor_key(name);
    gate.store().with(|c| poort::store::Store::setting(c, &key)).unwrap().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_lines_carry_every_record_once_across_a_restart() {
    let mut gate = Gate::start_config("", "[[audit.export]]\nfile = \"audit.jsonl\"\n").await;
    let file = gate.dir.0.join("audit.jsonl");
    for _ in 0..3 {
        gate.login("alice").await;
    }
    let _ = gate.try_login("bob", "wrong", "/").await;
    eventually("every record in the file", Duration::from_secs(5), async || {
        json_lines(&file).last().and_then(|r| r["seq"].as_i64()) == Some(last_seq(&gate))
    })
    .await;
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the export file is the owner's only");

    gate.stop().await;
    gate.boot().await;
    gate.login("bob").await;
    eventually("the records after the restart", Duration::from_secs(5), async || {
        json_lines(&file).last().and_then(|r| r["seq"].as_i64()) == Some(last_seq(&gate))
    })
    .await;
    let records = json_lines(&file);
    check_chain(&records, 1);
    let kinds: Vec<&str> = records.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "gateway_started").count(), 2, "{kinds:?}");
    assert!(kinds.contains(&"login_failed"));
    // The cursor is saved just after the file is synced.
    eventually("the export's cursor to reach the last record", Duration::from_secs(5), async || {
        delivered(&gate, "file:audit.jsonl") == last_seq(&gate)
    })
    .await;

    // A receiver that found a gap has records sent again from where it asks.
    let out = gate.cli(&["audit", "resend", "--export", "file:audit.jsonl", "--from", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("the records to be sent again", Duration::from_secs(10), async || {
        let seqs: Vec<i64> = json_lines(&file).iter().map(|r| r["seq"].as_i64().unwrap()).collect();
        seqs.iter().filter(|s| **s == 3).count() == 2 && seqs.last() == Some(&last_seq(&gate))
    })
    .await;
    let again = gate.audit("admin");
    assert!(again.iter().any(|e| e["command"] == "audit resend"), "{again:?}");
}

/// An export file that is not a regular file (a FIFO no one reads, standing in for a hung
/// mount) fails and is retried with a growing wait; the gateway goes on answering.
#[tokio::test(flavor = "multi_thread")]
async fn an_export_that_cannot_be_written_never_stalls_the_gateway() {
    let mut gate = Gate::start_config("", "[[audit.export]]\nfile = \"pipe\"\n").await;
    gate.stop().await;
    let pipe = gate.dir.0.join("pipe");
    let _ = std::fs::remove_file(&pipe);
    assert!(Command::new("mkfifo").arg(&pipe).status().unwrap().success());
    gate.boot().await;
    let alice = gate.login("alice").await;
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    assert_eq!(crate::harness::admin(gate.admin_addr, "GET", "/readyz").await.status, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = gate.scrape().await;
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("poort_audit_export_failures_total{export=\"file:pipe\"} "))
        .unwrap_or_else(|| panic!("no failures counted: {metrics}"))
        .parse()
        .unwrap();
    assert!((1.0..=6.0).contains(&failures), "{failures} attempts in 3 s: the retries do not wait");
    assert!(gate.reload().await.is_ok(), "the control side answers");
}

/// A real rsyslog receiving RFC 5425 (syslog over TLS) on loopback, writing each message as
/// received to a file.
struct Rsyslog {
    dir: TempDir,
    port: u16,
    process: Option<Reaped>,
}

impl Rsyslog {
    fn start(ca: &TestCa) -> Rsyslog {
        let dir = TempDir::new();
        let issued = ca.issue(&["localhost", "127.0.0.1"], "siem");
        std::fs::write(dir.0.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.0.join("cert.pem"), &issued.cert_pem).unwrap();
        std::fs::write(dir.0.join("key.pem"), &issued.key_pem).unwrap();
        let mut r = Rsyslog { dir, port: closed_port(), process: None };
        r.restart();
        r
    }

    fn restart(&mut self) {
        let d = self.dir.0.display();
        let conf = format!(
            "global(workDirectory=\"{d}\" maxMessageSize=\"64k\" DefaultNetstreamDriver=\"gtls\" \
             DefaultNetstreamDriverCAFile=\"{d}/ca.pem\" DefaultNetstreamDriverCertFile=\"{d}/cert.pem\" \
             DefaultNetstreamDriverKeyFile=\"{d}/key.pem\")\n\
             module(load=\"imtcp\" StreamDriver.Name=\"gtls\" StreamDriver.Mode=\"1\" StreamDriver.Authmode=\"anon\")\n\
             input(type=\"imtcp\" port=\"{}\" address=\"127.0.0.1\")\n\
             template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
             action(type=\"omfile\" file=\"{d}/received.log\" template=\"raw\")\n",
            self.port
        );
        std::fs::write(self.dir.0.join("rsyslog.conf"), conf).unwrap();
        let child = Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(self.dir.0.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.0.join("rsyslog.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.0.join("rsyslog.err")).unwrap())
            .spawn()
            .expect("rsyslog is installed (scripts/test installs rsyslog and rsyslog-gnutls)");
        self.process = Some(Reaped(child));
        wait_for_port(self.port, "rsyslog", Duration::from_secs(10));
    }

    /// Stops it as an operator does (SIGTERM) and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let pid = p.0.id().to_string();
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
            let _ = p.0.wait();
        }
    }

    /// The records received so far: the JSON after the structured data of each message.
    fn received(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.0.join("received.log")).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                assert!(l.starts_with('<') && l.contains(">1 ") && l.contains(" poort "), "not RFC 5424: {l}");
                let json = &l[l.find("] {").unwrap_or_else(|| panic!("no structured data in {l}")) + 2..];
                let v: serde_json::Value = serde_json::from_str(json).unwrap();
                assert!(l.contains(&format!("[poort@32473 seq=\"{}\" ", v["seq"])), "{l}");
                v
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn syslog_over_tls_loses_nothing_while_the_receiver_is_down() {
    let ca = TestCa::new("SIEM CA");
    let mut siem = Rsyslog::start(&ca);
    let tables = format!(
        "[[audit.export]]\nname = \"siem\"\nsyslog = \"localhost:{}\"\nca_file = \"{}\"\n",
        siem.port,
        siem.dir.0.join("ca.pem").display()
    );
    let gate = Gate::start_config("", &tables).await;
    for _ in 0..3 {
        gate.login("alice").await;
    }
    eventually("the first records to be delivered", Duration::from_secs(10), async || {
        delivered(&gate, "siem") == last_seq(&gate)
    })
    .await;
    let before = siem.received().len();
    assert_eq!(before as i64, last_seq(&gate));

    // The receiver goes away; records made meanwhile wait.
    siem.stop();
    for _ in 0..5 {
        gate.login("bob").await;
    }
    let _ = gate.try_login("alice", "wrong", "/").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(delivered(&gate, "siem") < last_seq(&gate));
    let metrics = gate.scrape().await;
    assert!(!metrics.contains("poort_audit_export_pending{export=\"siem\"} 0"), "{metrics}");

    siem.restart();
    eventually("the waiting records to arrive", Duration::from_secs(20), async || {
        siem.received().len() as i64 >= last_seq(&gate)
    })
    .await;
    let records = siem.received();
    check_chain(&records, 1);
    assert_eq!(records.len() as i64, last_seq(&gate), "each record once");
    assert!(records.iter().any(|r| r["kind"] == "login_failed"));
    let log = std::fs::read_to_string(siem.dir.0.join("received.log")).unwrap();
    // authpriv.warning for a failed sign-in, authpriv.info for a successful one.
    assert!(log.lines().any(|l| l.starts_with("<84>1 ") && l.contains(" login_failed [")), "{log}");
    assert!(log.lines().any(|l| l.starts_with("<86>1 ") && l.contains(" login_succeeded [")), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_with_a_certificate_poort_does_not_trust_gets_nothing() {
    let siem = Rsyslog::start(&TestCa::new("SIEM CA"));
    let other = TestCa::new("Someone else");
    let dir = TempDir::new();
    std::fs::write(dir.0.join("other.pem"), other.pem()).unwrap();
    let tables = format!(
        "[[audit.export]]\nname = \"siem\"\nsyslog = \"localhost:{}\"\nca_file = \"{}\"\n",
        siem.port,
        dir.0.join("other.pem").display()
    );
    let gate = Gate::start_config("", &tables).await;
    gate.login("alice").await;
    eventually("the failure to be counted", Duration::from_secs(10), async || {
        gate.scrape().await.contains("poort_audit_export_failures_total{export=\"siem\"} ")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(siem.received().is_empty());
    assert_eq!(delivered(&gate, "siem"), 0);
}

/// Someone who can write the database can change a record and make every hash after it
/// again with the log's own recipe; the chain alone then looks whole. A copy of the export
/// kept elsewhere does not go along: `poort audit verify --against` finds the change, a
/// truncation and an emptied log.
#[tokio::test]
async fn the_export_kept_elsewhere_finds_a_rewritten_or_truncated_log() {
    let gate = Gate::start_config("", "[[audit.export]]\nfile = \"audit.jsonl\"\n").await;
    let file = gate.dir.0.join("audit.jsonl");
    gate.login("alice").await;
    let _ = gate.try_login("bob", "wrong password!", "").await;
    gate.login("bob").await;
    let conn = poort::store::open_connection(gate.db()).unwrap();
    let total: i64 = conn.query_row("SELECT MAX(seq) FROM audit", (), |r| r.get(0)).unwrap();
    eventually("every record is exported", Duration::from_secs(5), async || {
        std::fs::read_to_string(&file).unwrap_or_default().lines().count() as i64 >= total
    })
    .await;
    // The copy the operator's log server keeps.
    let kept = gate.dir.0.join("kept-elsewhere.jsonl");
    std::fs::copy(&file, &kept).unwrap();
    let kept = kept.to_str().unwrap();
    let verify = |extra: &[&str]| {
        let mut args = vec!["audit", "verify"];
        args.extend_from_slice(extra);
        let out = gate.cli(&args);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(verify(&["--against", kept]).0, Some(0));

    // The failed sign-in becomes someone else's, and every later hash is made again.
    let seq: i64 = conn.query_row("SELECT seq FROM audit WHERE kind = 'login_failed'", (), |r| r.get(0)).unwrap();
    let rows: Vec<(i64, i64, String, String)> = conn
        .query_map("SELECT seq, at, kind, detail FROM audit WHERE seq >= ?1 ORDER BY seq", [seq], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap();
    let mut prev: Vec<u8> = conn.query_row("SELECT prev_hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0)).unwrap();
    for (s, at, kind, detail) in rows {
        let detail = if s == seq { detail.replace("bob", "eve") } else { detail };
        let hash = poort::audit::chain_hash(&prev, s, at, &kind, &detail);
        conn.execute("UPDATE audit SET detail = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4", {
            use poort::db::IntoValue;
            vec![detail.value(), prev.value(), hash.value(), s.value()]
        })
        .unwrap();
        prev = hash;
    }
    let (code, text) = verify(&[]);
    assert_eq!(code, Some(0), "the chain alone looks whole: {text}");
    let (code, text) = verify(&["--against", kept]);
    assert_eq!(code, Some(1));
    assert!(text.contains(&format!("record {seq} differs")), "{text}");

    // Cut short: the chain that is left is whole, the export knows better.
    let cut = conn.execute("DELETE FROM audit WHERE seq >= ?1", [seq]).unwrap();
    assert!(cut > 0);
    assert_eq!(verify(&[]).0, Some(0));
    let (code, text) = verify(&["--against", kept]);
    assert_eq!(code, Some(1));
    assert!(text.contains(&format!("record {seq} was exported but is not in the log")), "{text}");

    // Emptied.
    conn.execute("DELETE FROM audit", ()).unwrap();
    assert_eq!(verify(&[]).0, Some(1));
    assert_eq!(verify(&["--against", kept]).0, Some(1));
}

//! The command line as an operator uses it: check, quickstart, users, audit verification,
//! and a clean exit on SIGTERM.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Gate, TempDir, path_of};

fn poort(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_poort")).args(args).current_dir(dir).env("POORT_LOG", "warn").output().unwrap()
}

#[test]
fn check_reports_every_problem_with_its_path() {
    let dir = TempDir::new();
    let path = dir.0.join("broken.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "localhost"
external_url = "https://gate.example/path"
trusted_proxies = ["10.0.0.0/33"]
[session]
idle_timeout = "soon"
absolute_timeout = "1h"
[[app]]
name = "wiki"
upstream = "ftp://wiki"
path = "/wiki/"
access = "authenticated"
[[app]]
name = "wiki"
upstream = "http://10.0.0.2:80"
host = "Bad Host"
access = { rules = [{ effect = "maybe", groups = ["a"] }] }
[[app]]
name = "open"
upstream = "http://10.0.0.3"
path = "/open/"
"#,
    )
    .unwrap();
    let out = poort(&["check", "--config", path_of(&path)], &dir.0);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for p in [
        "server.listen:",
        "server.external_url:",
        "server.trusted_proxies[0]:",
        "session.idle_timeout:",
        "app[wiki].upstream:",
        "app[wiki].host:",
        "app[wiki].access.rules[0].effect:",
        "app[open].access: missing",
    ] {
        assert!(err.contains(p), "{p} not reported in:\n{err}");
    }
    assert!(err.contains("8 problem(s)"), "{err}");
    assert!(err.lines().filter(|l| l.contains("(hint: ")).count() == 8, "every problem has a hint:\n{err}");

    let typo = dir.0.join("typo.toml");
    std::fs::write(&typo, "[server]\nlisten_addr = \"127.0.0.1:1\"\n").unwrap();
    let out = poort(&["check", "--config", path_of(&typo)], &dir.0);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `listen_addr`"));
    let missing = poort(&["check", "--config", "/nonexistent/poort.toml"], &dir.0);
    assert_eq!(missing.status.code(), Some(64));
    // Every command that reads the config says the same, with the same status.
    for args in [&["serve"][..], &["user", "list"][..], &["lockdown", "status"][..]] {
        let out = poort(&[args, &["--config", path_of(&typo)][..]].concat(), &dir.0);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `listen_addr`"), "{args:?}");
    }
}

#[test]
fn the_example_configs_check_out() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut found = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = poort::config::load(&path).unwrap_or_else(|p| panic!("{}:\n{p}", path.display()));
            assert!(!cfg.apps.is_empty(), "{}", path.display());
            found += 1;
        }
    }
    assert_eq!(found, 2, "examples/minimal.toml and examples/full.toml");
}

#[test]
fn quickstart_sets_up_once_and_prints_the_secret_once() {
    let dir = TempDir::new();
    let first = poort(&["quickstart", "--no-serve"], &dir.0);
    assert!(first.status.success(), "{first:?}");
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(out.contains("shown only this once"), "{out}");
    let pw = out
        .lines()
        .skip_while(|l| !l.contains("Its password, shown only this once"))
        .nth(2)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(pw.len(), 20);
    let key =
        out.lines().map(str::trim).find(|l| l.starts_with("poort-seal-1-")).expect("the audit log's verification key");
    assert!(poort::audit::seal::Verifier::parse(key).is_ok());
    let data = dir.0.join("poort-data");
    for f in ["poort.toml", "poort.db", "tls/cert.pem", "tls/key.pem"] {
        assert!(data.join(f).exists(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(data.join("tls/key.pem")).unwrap().permissions().mode() & 0o077, 0);
    assert_eq!(std::fs::metadata(data.join("poort.db")).unwrap().permissions().mode() & 0o077, 0);
    let again = poort(&["quickstart", "--no-serve"], &dir.0);
    let out2 = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success());
    assert!(!out2.contains(&pw) && !out2.contains(key) && !out2.contains("shown only this once"), "{out2}");
    let store = poort::store::Store::open(data.join("poort.db")).unwrap();
    let hash = store.with(|c| poort::store::Store::password_hash(c, "admin")).unwrap().unwrap();
    assert!(poort::identity::password::verify(&pw, &hash), "the printed password is admin's");
    let users = poort(&["user", "list", "--json"], &dir.0);
    let v: serde_json::Value = serde_json::from_slice(&users.stdout).unwrap();
    assert_eq!(v[0]["name"], "admin");
    assert_eq!(v[0]["groups"], serde_json::json!(["admins"]));
}

#[test]
fn quickstart_listens_where_it_is_told() {
    let dir = TempDir::new();
    let args =
        ["quickstart", "--no-serve", "--listen", "127.0.0.1:9443", "--external-url", "https://gate.example.com:9443/"];
    let out = poort(&args, &dir.0);
    assert!(out.status.success(), "{out:?}");
    let config = std::fs::read_to_string(dir.0.join("poort-data/poort.toml")).unwrap();
    assert!(
        config.contains("listen = \"127.0.0.1:9443\"")
            && config.contains("external_url = \"https://gate.example.com:9443\""),
        "{config}"
    );
    let cert = std::fs::read(dir.0.join("poort-data/tls/cert.pem")).unwrap();
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&cert)
        .map(|c: rustls::pki_types::CertificateDer| c.to_vec())
        .unwrap();
    assert!(String::from_utf8_lossy(&der).contains("gate.example.com"), "the certificate names the external host");
    // Only the port given: the address users type follows it.
    let other = TempDir::new();
    assert!(poort(&["quickstart", "--no-serve", "--listen", "127.0.0.1:9444"], &other.0).status.success());
    let config = std::fs::read_to_string(other.0.join("poort-data/poort.toml")).unwrap();
    assert!(config.contains("external_url = \"https://localhost:9444\""), "{config}");
    // An existing config is not rewritten, and the operator is told.
    let third = TempDir::new();
    assert!(poort(&["quickstart", "--no-serve", "--admin-listen", "off"], &third.0).status.success());
    let config = std::fs::read_to_string(third.0.join("poort-data/poort.toml")).unwrap();
    assert!(config.contains("[admin]\n# Prometheus") && config.contains("listen = \"off\""), "{config}");
    let again = poort(&["quickstart", "--no-serve", "--listen", "127.0.0.1:1"], &other.0);
    assert!(String::from_utf8_lossy(&again.stdout).contains("keeps its own listen"));
    assert!(std::fs::read_to_string(other.0.join("poort-data/poort.toml")).unwrap().contains("127.0.0.1:9444"));
}

#[test]
fn user_commands() {
    let dir = TempDir::new();
    assert!(poort(&["quickstart", "--no-serve"], &dir.0).status.success());
    let weak = Command::new(env!("CARGO_BIN_EXE_poort"))
        .args(["user", "add", "carol", "--password-stdin"])
        .current_dir(&dir.0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"password1234\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(!weak.status.success());
    assert!(String::from_utf8_lossy(&weak.stderr).contains("too weak"), "{weak:?}");
    let add =
        poort(&["user", "add", "carol", "--group", "staff", "--group", "ops", "--email", "carol@example.com"], &dir.0);
    assert!(add.status.success(), "{add:?}");
    assert!(!poort(&["user", "add", "carol"], &dir.0).status.success(), "no duplicate users");
    assert!(!poort(&["user", "add", "bad name"], &dir.0).status.success());
    assert!(poort(&["user", "groups", "carol", "--add", "dev", "--remove", "ops"], &dir.0).status.success());
    assert!(poort(&["user", "disable", "carol"], &dir.0).status.success());
    let list = String::from_utf8_lossy(&poort(&["user", "list"], &dir.0).stdout).into_owned();
    let line = list.lines().find(|l| l.starts_with("carol")).unwrap();
    assert!(line.contains("disabled") && line.contains("dev,staff"), "{line}");
    assert!(poort(&["user", "enable", "carol"], &dir.0).status.success());
    assert!(!poort(&["user", "disable", "nobody"], &dir.0).status.success());
    let tail = String::from_utf8_lossy(&poort(&["audit", "tail", "-n", "50"], &dir.0).stdout).into_owned();
    for cmd in ["user add", "user groups", "user disable", "user enable"] {
        assert!(tail.contains(cmd), "{cmd} not audited:\n{tail}");
    }
}

#[tokio::test]
async fn audit_verify_finds_an_edited_record() {
    let gate = Gate::start().await;
    gate.login("alice").await;
    let _ = gate.try_login("bob", "wrong password!", "").await;
    let ok = gate.cli(&["audit", "verify"]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("intact"));
    let conn = poort::store::open_connection(gate.db()).unwrap();
    let seq: i64 = conn.query_row("SELECT seq FROM audit WHERE kind = 'login_failed'", (), |r| r.get(0)).unwrap();
    conn.execute("UPDATE audit SET detail = replace(detail, 'bob', 'eve') WHERE seq = ?1", [seq]).unwrap();
    let bad = gate.cli(&["audit", "verify"]);
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains(&format!("record {seq}")), "{text}");
    let json = gate.cli(&["audit", "tail", "--json", "-n", "3"]);
    for line in String::from_utf8_lossy(&json.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["event"]["kind"].is_string());
    }
    // Emptied, the log is not "intact: 0 records".
    conn.execute("DELETE FROM audit", ()).unwrap();
    let empty = gate.cli(&["audit", "verify"]);
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stdout).contains("the log is empty"), "{empty:?}");
}

#[test]
fn sigterm_stops_the_gateway_cleanly() {
    let dir = TempDir::new();
    assert!(poort(&["quickstart", "--no-serve"], &dir.0).status.success());
    // Serve on a free port instead of the default.
    let cfg = dir.0.join("poort-data/poort.toml");
    let port = crate::harness::closed_port();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:9464", "127.0.0.1:0");
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_poort"))
        .args(["serve", "--config", path_of(&cfg)])
        .current_dir(&dir.0)
        .env("POORT_LOG", "warn")
        .spawn()
        .unwrap();
    crate::harness::wait_for_port(port, "the gateway", Duration::from_secs(10));
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status:?}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the gateway did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Apps routed by path share the portal's origin: `poort check` says so, names them, and
/// recommends their own host; a config of host-routed apps gets no such warning.
#[test]
fn check_warns_when_apps_share_the_portals_origin() {
    let dir = TempDir::new();
    let path = dir.0.join("poort.toml");
    let app = |route: &str| {
        format!(
            "[server]\nexternal_url = \"https://gate.example\"\n[[app]]\nname = \"wiki\"\nupstream = \"http://10.0.0.2\"\n{route}\naccess = \"authenticated\"\n"
        )
    };
    std::fs::write(&path, app("path = \"/wiki/\"")).unwrap();
    let out = poort(&["check", "--config", path_of(&path)], &dir.0);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("warning: app[wiki]: routed by path") && text.contains("own host"), "{text}");
    std::fs::write(&path, app("host = \"wiki.example\"")).unwrap();
    let out = poort(&["check", "--config", path_of(&path)], &dir.0);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("warning"));
}

/// A password reset by an administrator ends the user's sessions: whoever knew the old password
/// may hold one. `--keep-sessions` leaves them for a routine change.
#[tokio::test]
async fn a_password_reset_ends_the_users_sessions() {
    let gate = crate::harness::Gate::start().await;
    let kept = gate.login("bob").await;
    assert!(gate.cli(&["user", "passwd", "bob", "--keep-sessions"]).status.success());
    assert_eq!(gate.get("/app/", Some(&kept)).await.status, 200, "kept on request");
    let alice = gate.login("alice").await;
    let out = gate.cli(&["user", "passwd", "bob"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ended 1 session(s)"), "{out:?}");
    crate::harness::eventually("the old session to end", Duration::from_secs(2), async || {
        gate.status("/app/", Some(&kept)).await == 401
    })
    .await;
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200, "other users' sessions go on");
}

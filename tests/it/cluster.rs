//! Cluster mode: several nodes on one real PostgreSQL (Debian's, started here on loopback in a
//! temporary folder). The test client sends each new connection to the next node in turn, so
//! every flow that spans requests is started on one node and continued on another.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use poort::clock::Clock;
use poort::identity::totp;
use webauthn_authenticator_rs::softpasskey::SoftPasskey;

use crate::harness::{Gate, PASSWORD, Reaped, TempDir, closed_port, enrol, eventually, hand_off, wait_for_port};

/// A PostgreSQL server of its own, on a free loopback port; removed on drop.
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
    process: Option<Reaped>,
    tls: bool,
}

/// As root, the server runs as the `postgres` account the package made (it refuses root).
fn as_server_user(program: PathBuf) -> Command {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(false)
    }

    /// As `start`, with TLS required of every TCP client (its certificate, self-signed for
    /// 127.0.0.1, is `cert.pem` in `dir()`).
    pub fn start_tls() -> Postgres {
        Postgres::start_with(true)
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir.0
    }

    fn start_with(tls: bool) -> Postgres {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (scripts/test installs the postgresql package)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .collect();
        found.sort();
        let bin = found.pop().expect("an initdb under /usr/lib/postgresql");
        let dir = TempDir::new();
        if tls {
            let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
            std::fs::write(dir.0.join("cert.pem"), ck.cert.pem()).unwrap();
            std::fs::write(dir.0.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.0.join("key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let owner = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir.0).status();
        let _ = owner; // Only possible (and needed) as root.
        let out = as_server_user(bin.join("initdb"))
            .args(["-D"])
            .arg(dir.0.join("data"))
            .args(["-U", "poort", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        if tls {
            // Only TLS over TCP (the Unix socket stays for psql here).
            let hba =
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n";
            std::fs::write(dir.0.join("data/pg_hba.conf"), hba).unwrap();
            let conf =
                format!("ssl = on\nssl_cert_file = '{0}/cert.pem'\nssl_key_file = '{0}/key.pem'\n", dir.0.display());
            let mut text = std::fs::read_to_string(dir.0.join("data/postgresql.conf")).unwrap();
            text.push_str(&conf);
            std::fs::write(dir.0.join("data/postgresql.conf"), text).unwrap();
        }
        let mut pg = Postgres { dir, bin, port: closed_port(), process: None, tls };
        pg.run();
        pg
    }

    pub fn run(&mut self) {
        let child = as_server_user(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.0.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir.0)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.process = Some(Reaped(child));
        wait_for_port(self.port, "postgres", Duration::from_secs(20));
        // Accepting connections is not yet accepting logins: wait for a query to work.
        for _ in 0..100 {
            if self.psql("postgres", "SELECT 1").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("postgres did not accept queries");
    }

    /// Stops the server at once, as a crash would.
    pub fn stop(&mut self) {
        self.process = None;
        // The port frees once the postmaster is gone.
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Freezes the server and its backends (SIGSTOP): connections stay open, nothing answers.
    /// `thaw` lets them go on.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.process.as_ref().expect("the server runs").0.id().to_string();
        let _ = Command::new("pkill").args([sig, "-P", &pid]).status();
        let _ = Command::new("kill").args([sig, &pid]).status();
    }

    /// Stops the server at once and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        // With TLS required over TCP, psql comes through the Unix socket (as the server's account).
        let mut psql =
            if self.tls { as_server_user(self.bin.join("psql")) } else { Command::new(self.bin.join("psql")) };
        let host = if self.tls { self.dir.0.display().to_string() } else { "127.0.0.1".into() };
        let out = psql
            .args(["-X", "-q", "-t", "-A", "-h", &host, "-p", &self.port.to_string(), "-U", "poort", "-d", db])
            .args(["-c", sql])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// A new, empty database; its URL.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name}")).unwrap();
        format!("postgres://poort@127.0.0.1:{}/{name}", self.port)
    }
}

/// Requests until `n` in a row (so: on every node) give `status`, for at most `limit`. A
/// request cut with no answer (its session's streams were being ended) counts as not yet.
async fn every_node_says(gate: &Gate, n: usize, path: &str, session: &str, status: u16, limit: Duration) {
    let start = tokio::time::Instant::now();
    let mut in_a_row = 0;
    let raw = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nCookie: __Host-poort={session}\r\nConnection: close\r\n\r\n"
    );
    while in_a_row < n {
        let got = gate.hostile(raw.as_bytes()).await.0;
        in_a_row = if got == Some(status) { in_a_row + 1 } else { 0 };
        assert!(start.elapsed() < limit, "not every node answered {status} within {limit:?} (last: {got:?})");
    }
}

#[tokio::test]
async fn every_flow_started_on_one_node_finishes_on_another() {
    let pg = Postgres::start();
    let mut gate = Gate::start_on(&pg.database("flows")).await;
    gate.add_node().await;
    gate.add_node().await;

    // A sign-in (its form from one node, posted to the next), then requests on every node.
    let alice = gate.login("alice").await;
    for _ in 0..6 {
        assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    }
    // A hand-off code minted on one node and redeemed on the next.
    let git = hand_off(&gate, &alice, "git.localhost", "/").await;
    let html = [("Host", "git.localhost"), ("Cookie", &format!("__Host-poort={git}") as &str)];
    assert_eq!(gate.request("GET", "/", &html, b"").await.status, 200);
    // `poort login`: code, approval page, confirmation, decision and token, each on another node.
    let (cli, _browser) = gate.cli_session_and_browser("bob").await;
    assert_eq!(cli.len(), 43, "the command line got its token");

    // A TOTP code used on one node is a replay on every other.
    let (secret, stepped, _codes) = enrol(&gate, &alice).await;
    gate.clock.advance(30);
    let code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let s = gate.login("alice").await;
    let used = gate.post("/.poort/mfa", &s, &[("code", &code), ("next", "/vault/")]).await;
    assert_eq!(used.status, 303, "{}", used.text());
    let s2 = gate.login("alice").await;
    let again = gate.post("/.poort/mfa", &s2, &[("code", &code), ("next", "/vault/")]).await;
    assert_ne!(again.status, 303, "the same code was accepted again on another node");
    assert!(again.cookie("__Host-poort").is_none());
    drop(stepped);

    // A passkey ceremony started on one node and finished on the next, both ways.
    let bob = gate.login("bob").await;
    let mut key = SoftPasskey::new(true);
    let (bob_stepped, _) = crate::passkey::register(&gate, &bob, &mut key, "cluster key").await;
    assert_eq!(gate.get("/vault/", Some(&bob_stepped)).await.status, 200);
    let bob2 = gate.login("bob").await;
    let r = crate::passkey::authenticate(&gate, &bob2, &mut key, "/vault/").await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Signing out on one node is felt on every node within a second.
    let out = gate.post("/.poort/logout", &alice, &[]).await;
    assert!(out.status == 303 || out.status == 200, "{}", out.text());
    every_node_says(&gate, 6, "/app/", &alice, 401, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn revocation_and_lockdown_reach_every_node_and_the_audit_chain_stays_one() {
    let pg = Postgres::start();
    let mut gate = Gate::start_on(&pg.database("revoke")).await;
    gate.add_node().await;
    gate.add_node().await;
    let bob = gate.login("bob").await;
    every_node_says(&gate, 3, "/app/", &bob, 200, Duration::from_secs(2)).await;

    // Revoked from the command line (no node involved): the database notifies every node, which
    // refuse at once (well before their one-second fallback poll).
    let out = gate.cli(&["session", "revoke", "--user", "bob"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    every_node_says(&gate, 6, "/app/", &bob, 401, Duration::from_millis(400)).await;

    // Lockdown set on the database: every node turns non-admins away.
    let bob = gate.login("bob").await;
    assert!(gate.cli(&["lockdown", "on"]).status.success());
    every_node_says(&gate, 6, "/app/", &bob, 503, Duration::from_secs(2)).await;
    assert!(gate.cli(&["lockdown", "off"]).status.success());
    every_node_says(&gate, 6, "/app/", &bob, 200, Duration::from_secs(2)).await;

    // Many sign-ins at once on all nodes: one chain, in order, no fork.
    let logins: Vec<_> =
        (0..24).map(|i| gate.try_login(if i % 2 == 0 { "alice" } else { "bob" }, PASSWORD, "")).collect();
    for r in futures_util::future::join_all(logins).await {
        assert_eq!(r.status, 303);
    }
    let verify = gate.cli(&["audit", "verify"]);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success() && text.contains("intact"), "{text}{}", String::from_utf8_lossy(&verify.stderr));
    let n: usize =
        pg.psql("revoke", "SELECT count(*) FROM audit WHERE kind = 'login_succeeded'").unwrap().parse().unwrap();
    assert!(n >= 26, "every sign-in is in the one chain ({n})");
}

#[tokio::test]
async fn nodes_come_back_by_themselves_after_the_database_restarts() {
    let mut pg = Postgres::start();
    let mut gate = Gate::start_on(&pg.database("restart")).await;
    gate.add_node().await;
    let alice = gate.login("alice").await;
    pg.restart();
    // The first requests after the restart may find a dead connection; the nodes open new
    // ones by themselves, and what was signed in before is still signed in.
    eventually("a sign-in after the database restarted", Duration::from_secs(10), async || {
        gate.try_login("bob", PASSWORD, "").await.status == 303
    })
    .await;
    every_node_says(&gate, 4, "/app/", &alice, 200, Duration::from_secs(10)).await;
    let bob = gate.login("bob").await;
    every_node_says(&gate, 4, "/app/", &bob, 200, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn in_an_outage_known_sessions_last_the_grace_and_new_sign_ins_get_a_clear_refusal() {
    let mut pg = Postgres::start();
    let gate = Gate::start_on_with(&pg.database("outage"), "[session]\noutage_grace = \"3s\"\n").await;
    let alice = gate.login("alice").await;
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    pg.stop();
    let down = tokio::time::Instant::now();
    // Within the grace the session held in memory keeps working, and a new sign-in is told
    // plainly that it cannot happen now.
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    let refused = gate.try_login("bob", PASSWORD, "").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.cookie("__Host-poort").is_none());
    assert!(down.elapsed() < Duration::from_secs(2), "the checks within the grace took too long to mean anything");
    // Past it, nothing is served on the strength of memory alone.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down.elapsed()) + Duration::from_millis(300)).await;
    assert_ne!(gate.get("/app/", Some(&alice)).await.status, 200, "a session was served past the grace");
    // The database back: the node reconnects by itself and the session (in the database) works.
    pg.run();
    every_node_says(&gate, 2, "/app/", &alice, 200, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn nodes_report_themselves_and_check_live_reaches_the_database() {
    let pg = Postgres::start();
    let mut gate = Gate::start_on(&pg.database("nodes")).await;
    gate.add_node().await;
    let live = gate.cli(&["check", "--live"]);
    let text = String::from_utf8_lossy(&live.stdout);
    assert!(live.status.success(), "{text}");
    assert!(
        text.contains(&format!("store: postgres://poort@127.0.0.1:{}/nodes answered (PostgreSQL", pg.port)),
        "{text}"
    );
    // Each node reports when it starts, and every ten seconds after.
    let status = || {
        let status = gate.cli(&["cluster", "status", "--json"]);
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        serde_json::from_slice::<serde_json::Value>(&status.stdout).unwrap()
    };
    eventually("both nodes to report", Duration::from_secs(5), async || {
        status()["nodes"].as_array().unwrap().len() == 2
    })
    .await;
    let v = status();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{v}");
    assert!(
        nodes
            .iter()
            .all(|n| n["version"] == env!("CARGO_PKG_VERSION") && n["config_sha256"].as_str().unwrap().len() == 64)
    );
    assert_eq!(v["agree"], true);
    // A node on another config is pointed out, and the command says so in its exit status.
    let now = poort::clock::SystemClock.now();
    pg.psql("nodes", &format!("INSERT INTO nodes VALUES ('other 127.0.0.1:1', '0.0.0', 'abc', {now}, {now})")).unwrap();
    let status = gate.cli(&["cluster", "status"]);
    assert_eq!(status.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&status.stderr).contains("2 different configs"));
    assert!(String::from_utf8_lossy(&status.stdout).contains("other 127.0.0.1:1"));
    // A database that does not answer fails the live check, by name and without its password.
    let down = format!("postgres://poort:hunter2@127.0.0.1:{}/nodes", crate::harness::closed_port());
    gate.edit_config(|c| c.replace(&format!("postgres://poort@127.0.0.1:{}/nodes", pg.port), &down));
    let live = gate.cli(&["check", "--live"]);
    let text = String::from_utf8_lossy(&live.stdout);
    assert_eq!(live.status.code(), Some(1), "{text}");
    assert!(text.contains("store: postgres://poort:***@127.0.0.1:") && !text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn a_sqlite_store_moves_to_postgresql_with_its_sessions_factors_and_chain() {
    let pg = Postgres::start();
    let url = pg.database("moved");
    let mut gate = Gate::start().await;
    let alice = gate.login("alice").await;
    let (secret, stepped, _) = enrol(&gate, &alice).await;
    let bob = gate.login("bob").await;
    assert!(gate.cli(&["session", "revoke", "--user", "bob"]).status.success());
    let before = String::from_utf8_lossy(&gate.cli(&["audit", "verify"]).stdout).to_string();
    gate.stop().await;

    let out = gate.cli(&["store", "migrate", "--to", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("its audit log is intact"), "{text}");
    // Into a database that has a store already, nothing is copied.
    let again = gate.cli(&["store", "migrate", "--to", &url]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already has"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    gate.edit_config(|c| c.replace("data_dir = \".\"", &format!("data_dir = \".\"\ndatabase_url = \"{url}\"")));
    gate.boot().await;
    // The same chain, now on PostgreSQL, and growing from where it was.
    let after = String::from_utf8_lossy(&gate.cli(&["audit", "verify"]).stdout).to_string();
    let records = |t: &str| t.split("intact: ").nth(1).and_then(|r| r.split(' ').next()).map(str::to_string);
    assert!(records(&before).is_some() && records(&after) >= records(&before), "{before} / {after}");
    assert!(pg.psql("moved", "SELECT count(*) FROM users").unwrap() == "2");
    // Sessions, factors and revocations came along.
    assert_eq!(gate.get("/vault/", Some(&stepped)).await.status, 200, "the stepped-up session lives on");
    assert_eq!(gate.get("/app/", Some(&bob)).await.status, 401, "the revoked session stays revoked");
    gate.clock.advance(30);
    let code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let s = gate.login("alice").await;
    assert_eq!(gate.post("/.poort/mfa", &s, &[("code", &code), ("next", "/vault/")]).await.status, 303);
    let bob = gate.login("bob").await;
    assert!(gate.cli(&["session", "revoke", "--user", "bob"]).status.success());
    every_node_says(&gate, 1, "/app/", &bob, 401, Duration::from_secs(2)).await;
}

/// A node as its own `poort serve` process on the gateway's config, listening on `port`.
fn spawn_node(gate: &Gate, port: u16) -> Reaped {
    let text = std::fs::read_to_string(&gate.config_path).unwrap();
    let text = text.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""), 1);
    let config = gate.dir.0.join(format!("node-{port}.toml"));
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(gate.dir.0.join(format!("node-{port}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_poort"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let node = Reaped(child);
    wait_for_port(port, "poort", Duration::from_secs(20));
    node
}

/// A sign-in as a browser makes it; None when a node failed to answer on the way.
async fn sign_in(gate: &Gate, user: &str) -> Option<String> {
    let page = gate.try_request("GET", "/.poort/login", &[], b"").await?;
    let cookie = page.cookie("__Host-poort-csrf")?;
    let text = page.text();
    let field = text.split("name=\"csrf\" value=\"").nth(1)?.split('"').next()?.to_string();
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([("username", user), ("password", PASSWORD), ("csrf", &field), ("next", "")])
        .finish();
    let cookie = format!("__Host-poort-csrf={cookie}");
    let headers = [
        ("Origin", crate::harness::ORIGIN),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Cookie", &cookie),
    ];
    let r = gate.try_request("POST", "/.poort/login", &headers, body.as_bytes()).await?;
    (r.status == 303).then(|| r.cookie("__Host-poort")).flatten()
}

#[tokio::test]
async fn a_node_killed_under_load_loses_nothing_it_acknowledged() {
    let pg = Postgres::start();
    let mut gate = Gate::start_on_with(&pg.database("killed"), "[login]\nper_address_per_minute = 10000\n").await;
    gate.stop().await;
    let ports = [closed_port(), closed_port(), closed_port()];
    let mut nodes: Vec<Option<Reaped>> = ports.iter().map(|p| Some(spawn_node(&gate, *p))).collect();
    *gate.nodes.lock().unwrap() = ports.iter().map(|p| format!("127.0.0.1:{p}").parse().unwrap()).collect();

    // Four clients sign in and use their sessions, each on every node in turn; halfway, the
    // second node is killed (SIGKILL) while they are at it.
    let gate = &gate;
    let done = &std::sync::atomic::AtomicUsize::new(0);
    let client = |c: usize| async move {
        let mut acknowledged = Vec::new();
        let mut failed = 0;
        for i in 0..12 {
            match sign_in(gate, if (c + i).is_multiple_of(2) { "alice" } else { "bob" }).await {
                Some(s) => {
                    acknowledged.push(s);
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                None => failed += 1,
            }
            if let Some(s) = acknowledged.last() {
                let cookie = format!("__Host-poort={s}");
                let _ = gate.try_request("GET", "/app/", &[("Cookie", &cookie)], b"").await;
            }
        }
        (acknowledged, failed)
    };
    let killer = async {
        while done.load(std::sync::atomic::Ordering::Relaxed) < 16 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        nodes[1] = None; // Reaped: SIGKILL, then reaped.
        let dead: std::net::SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
        // The load balancer notices and sends no more there.
        gate.nodes.lock().unwrap().retain(|a| *a != dead);
        done.load(std::sync::atomic::Ordering::Relaxed)
    };
    let (results, at_kill) = tokio::join!(futures_util::future::join_all((0..4).map(client)), killer);
    assert!(nodes[1].is_none() && nodes[0].is_some() && nodes[2].is_some());
    let acknowledged: Vec<String> = results.iter().flat_map(|(a, _)| a.clone()).collect();
    let failed: usize = results.iter().map(|(_, f)| f).sum();
    assert!(at_kill < 32, "the node was killed while the load ran (after {at_kill} sign-ins)");
    assert!(
        acknowledged.len() >= 40,
        "the other nodes kept serving ({} signed in, {failed} failed)",
        acknowledged.len()
    );

    // Every sign-in that was answered lives on, on both surviving nodes, and is in the one
    // audit chain, which verifies.
    for s in &acknowledged {
        let cookie = format!("__Host-poort={s}");
        for _ in 0..2 {
            let r =
                gate.try_request("GET", "/app/", &[("Cookie", &cookie)], b"").await.expect("a surviving node answers");
            assert_eq!(r.status, 200, "an acknowledged sign-in was lost");
        }
    }
    let logged: usize =
        pg.psql("killed", "SELECT count(*) FROM audit WHERE kind = 'login_succeeded'").unwrap().parse().unwrap();
    assert!(logged >= acknowledged.len(), "{logged} sign-ins audited, {} acknowledged", acknowledged.len());
    let verify = gate.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

#[tokio::test]
async fn a_node_with_other_keys_refuses_to_join() {
    let pg = Postgres::start();
    let gate = Gate::start_on(&pg.database("keys")).await;
    // A second node set up on its own: its keys are its own, not the first node's.
    let other = TempDir::new();
    let config = std::fs::read_to_string(&gate.config_path).unwrap().replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{}\"", closed_port()),
        1,
    );
    std::fs::write(other.0.join("poort.toml"), &config).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(gate.dir.0.join(f), other.0.join(f)).unwrap();
    }
    let serve = |dir: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_poort"))
            .args(["serve", "--config"])
            .arg(dir.join("poort.toml"))
            .output()
            .unwrap()
    };
    let out = serve(&other.0);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("secrets.key is not the key the other gateways on this database use"), "{err}");
    // With the first node's sealing key but its own signing key, it names that one.
    std::fs::copy(gate.dir.0.join("secrets.key"), other.0.join("secrets.key")).unwrap();
    let err = String::from_utf8_lossy(&serve(&other.0).stderr).to_string();
    assert!(err.contains("assertion-key.p8 is not the key the other gateways on this database use"), "{err}");
}

/// Pins the test client to one node.
fn pin(gate: &Gate, addr: std::net::SocketAddr) {
    *gate.nodes.lock().unwrap() = vec![addr];
}

#[tokio::test]
async fn a_session_in_use_on_one_node_is_not_ended_by_another_that_saw_it_long_ago() {
    let pg = Postgres::start();
    let mut gate = Gate::start_on_with(&pg.database("idle"), "[session]\nidle_timeout = \"1m\"\n").await;
    let (a, b) = (gate.addr, gate.add_node().await);
    let alice = gate.login("alice").await;
    // Node B serves the session once; from then on the user is on node A only (a browser
    // keeps its connection to one node).
    pin(&gate, b);
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    pin(&gate, a);
    let node_a = gate.running.as_ref().unwrap().live.get();
    for _ in 0..3 {
        gate.clock.advance(25);
        assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
        node_a.state.sessions.flush().await.unwrap(); // A records its use, as every 10 s
    }
    // 75 s after B last saw it, B's idle check ran (every 100 ms) and asked the store.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    assert_eq!(
        gate.store().list_sessions(Some("alice")).unwrap().len(),
        1,
        "the session is still there to see and end"
    );
    // ...and so an administrator can still end it, on the node in use too.
    assert!(gate.cli(&["session", "revoke", "--user", "alice"]).status.success());
    every_node_says(&gate, 2, "/app/", &alice, 401, Duration::from_millis(400)).await;
    // A session idle everywhere does end, and every node drops it.
    pin(&gate, a);
    let bob = gate.login("bob").await;
    pin(&gate, b);
    assert_eq!(gate.get("/app/", Some(&bob)).await.status, 200);
    gate.clock.advance(61);
    tokio::time::sleep(Duration::from_millis(400)).await;
    pin(&gate, a);
    assert_ne!(gate.get("/app/", Some(&bob)).await.status, 200);
    assert!(gate.store().list_sessions(Some("bob")).unwrap().is_empty());
}

#[tokio::test]
async fn past_the_outage_grace_open_websockets_end_too() {
    websockets_end_past_the_grace(false).await;
}

#[tokio::test]
async fn past_the_outage_grace_open_websockets_end_when_the_database_hangs_too() {
    websockets_end_past_the_grace(true).await;
}

/// A WebSocket through a node whose database stops (or, with `hang`, stops answering while
/// its connections stay open) ends once the outage grace is over.
async fn websockets_end_past_the_grace(hang: bool) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut pg = Postgres::start();
    let gate = Gate::start_on_with(&pg.database("wsgrace"), "[session]\noutage_grace = \"3s\"\n").await;
    let cookie = format!("__Host-poort={}", gate.login("alice").await);
    let mut ws = gate.websocket("localhost", "/ws/", &[("Cookie", &cookie)]).await.unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
    let down = tokio::time::Instant::now();
    if hang {
        pg.freeze();
    } else {
        pg.stop();
    }
    // Within the grace it carries on; past it, it is ended (revocations cannot reach the node).
    ws.send(Message::text("during")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("during"));
    let ended = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the WebSocket outlived the grace");
    // The node last heard from the store up to a second (its poll) before it stopped.
    assert!(down.elapsed() >= Duration::from_secs(2), "ended before the grace was over ({:?})", down.elapsed());
    if hang {
        pg.thaw();
    }
}

#[tokio::test]
async fn the_database_holds_no_command_line_user_code() {
    let pg = Postgres::start();
    let gate = Gate::start_on(&pg.database("codes")).await;
    let cli = [("X-Poort-Client", "cli"), ("Content-Type", "application/json")];
    let r = gate.request("POST", "/.poort/device/code", &cli, b"{}").await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let (user_code, device_code) = (v["user_code"].as_str().unwrap(), v["device_code"].as_str().unwrap());
    let rows = pg.psql("codes", "SELECT kind || ' ' || id || ' ' || value FROM flows").unwrap();
    assert_eq!(rows.lines().count(), 2, "{rows}");
    for secret in [user_code, &user_code.replace('-', ""), device_code] {
        assert!(!rows.contains(secret), "{secret} is in the database: {rows}");
    }
    // A plain hash of the user code is not there either (35 bits are quickly tried).
    let plain = poort::secret::hex(&poort::secret::sha256(user_code.as_bytes()));
    assert!(!rows.contains(&plain));
}

#[tokio::test]
async fn the_database_connection_is_tls_checked_against_the_configured_ca() {
    let pg = Postgres::start_tls();
    let url = pg.database("tls");
    let ca = pg.dir().join("cert.pem");
    let store = format!("database_url = \"{url}\"\ndatabase_ca_file = \"{}\"", ca.display());
    let gate = Gate::start_store("", "", "", &store).await;
    let alice = gate.login("alice").await;
    assert_eq!(gate.get("/app/", Some(&alice)).await.status, 200);
    let encrypted = pg
        .psql("tls", "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'poort' AND s.ssl")
        .unwrap();
    assert!(encrypted.parse::<u32>().unwrap() >= 1, "no TLS connection from poort: {encrypted}");
    // Against another CA the connection is not made.
    let other = TempDir::new();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    std::fs::write(other.0.join("other.pem"), ck.cert.pem()).unwrap();
    gate.edit_config(|c| c.replace(&ca.display().to_string(), &other.0.join("other.pem").display().to_string()));
    let live = gate.cli(&["check", "--live"]);
    let text = String::from_utf8_lossy(&live.stdout);
    assert_eq!(live.status.code(), Some(1), "{text}");
    assert!(text.contains("store: postgres://poort@127.0.0.1") && text.contains("certificate"), "{text}");
    // And without TLS the server does not let anyone in.
    gate.edit_config(|c| c.replace(&format!("database_ca_file = \"{}\"", other.0.join("other.pem").display()), ""));
    let live = gate.cli(&["check", "--live"]);
    assert_eq!(live.status.code(), Some(1), "{}", String::from_utf8_lossy(&live.stdout));
}

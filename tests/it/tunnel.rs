//! TCP tunnels through the real `poort` command line: device sign-in, `connect --listen` and
//! `--stdio`, a real OpenSSH server, policy refusals, revocation and unreachable targets.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use poort::tunnel::client::Credentials;

use crate::harness::{Gate, Reaped, TempDir, eventually};

fn fingerprint(gate: &Gate) -> String {
    poort::secret::hex(ring::digest::digest(&ring::digest::SHA256, &gate.cert_der).as_ref())
}

/// A config directory for the command line, signed in with `session` (as `poort login`
/// would leave it).
fn signed_in(gate: &Gate, session: &str) -> TempDir {
    let home = TempDir::new();
    let c = Credentials {
        gateway: format!("https://localhost:{}", gate.addr.port()),
        token: session.to_string(),
        user: "alice".into(),
        expires_at: 0,
        fingerprint: Some(fingerprint(gate)),
        ca_file: None,
    };
    std::fs::create_dir_all(home.0.join("poort")).unwrap();
    std::fs::write(home.0.join("poort/credentials.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    home
}

fn poort(home: &TempDir) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_poort"));
    c.env("XDG_CONFIG_HOME", &home.0).env("POORT_LOG", "warn");
    c
}

/// Starts `poort connect NAME --listen 127.0.0.1:0`; returns the child and the bound port.
fn listen(home: &TempDir, name: &str) -> (Reaped, u16) {
    let mut child =
        poort(home).args(["connect", name, "--listen", "127.0.0.1:0"]).stderr(Stdio::piped()).spawn().unwrap();
    let seen = read_until(child.stderr.as_mut().unwrap(), "\n");
    let port = seen.split("127.0.0.1:").nth(1).and_then(|p| p.split(';').next()).and_then(|p| p.parse().ok());
    (Reaped(child), port.unwrap_or_else(|| panic!("no port in {seen:?}")))
}

/// Reads a child's output until `marker` appears (the child must still be running).
fn read_until(out: &mut impl Read, marker: &str) -> String {
    let mut seen = String::new();
    let mut byte = [0u8; 1];
    while !seen.contains(marker) {
        assert_eq!(out.read(&mut byte).unwrap(), 1, "the command exited early: {seen}");
        seen.push(byte[0] as char);
    }
    seen
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn device_sign_in_then_a_bulk_transfer_arrives_intact() {
    let gate = Gate::start().await;
    let browser = gate.login("alice").await;
    let home = TempDir::new();
    let mut login = poort(&home)
        .args([
            "login",
            "--gateway",
            &format!("https://localhost:{}", gate.addr.port()),
            "--fingerprint",
            &fingerprint(&gate),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the code the command line shows, as a person would from the terminal.
    let shown = read_until(login.stderr.as_mut().unwrap(), "Waiting");
    let code = shown.split("?code=").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    let page = gate.get(&format!("/.poort/device?code={code}"), Some(&browser)).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains(&code), "the approval page shows the code");
    // Approving asks for a proof given for this code (alice has no second factor: the password).
    let r = gate.post("/.poort/device", &browser, &[("code", &code), ("decision", "approve")]).await;
    assert_eq!(r.status, 303);
    assert!(r.header("location").unwrap().contains("/.poort/confirm?device="), "{:?}", r.header("location"));
    let browser = gate.confirm(&browser, &[("password", crate::harness::PASSWORD), ("device", &code)]).await;
    let r = gate.post("/.poort/device", &browser, &[("code", &code), ("decision", "approve")]).await;
    assert!(r.text().contains("Go back to your terminal"), "{}", r.text());
    let status = tokio::task::spawn_blocking(move || login.wait().unwrap()).await.unwrap();
    assert!(status.success());
    let creds = home.0.join("poort/credentials.json");
    assert!(poort::tunnel::client::private(&creds), "credentials are mode 0600");
    let c: Credentials = serde_json::from_slice(&std::fs::read(&creds).unwrap()).unwrap();
    assert_eq!(c.user, "alice");
    let sessions = gate.store().list_sessions(Some("alice")).unwrap();
    assert!(sessions.iter().any(|s| s.user_agent == "poort command line"), "the command line has its own session");
    assert_eq!(gate.audit("device_login").len(), 1);

    let (child, port) = listen(&home, "sink");
    let data: Vec<u8> = (0..100 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let want = sha256(&data);
    let got = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut digest = Vec::new();
        s.read_to_end(&mut digest).unwrap();
        digest
    })
    .await
    .unwrap();
    assert_eq!(got, want, "100 MiB arrived with the same SHA-256");
    drop(child);
    eventually("the tunnel to be audited", Duration::from_secs(3), async || !gate.audit("tunnel_closed").is_empty())
        .await;
    let closed = &gate.audit("tunnel_closed")[0];
    assert_eq!(closed["bytes_in"], 100 * 1024 * 1024);
    assert_eq!(closed["bytes_out"], 32);
    assert_eq!(gate.audit("tunnel_opened")[0]["tunnel"], "sink");

    let out = poort(&home).arg("logout").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!creds.exists());
    let c_session = sessions.iter().find(|s| s.user_agent == "poort command line").unwrap();
    assert!(!gate.store().list_sessions(Some("alice")).unwrap().iter().any(|s| s.id == c_session.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_refusals_are_explained_and_dial_nothing() {
    let gate = Gate::start().await;
    let s = gate.cli_session("alice").await;
    let home = signed_in(&gate, &s);
    let out = poort(&home).args(["connect", "ops", "--listen", "127.0.0.1:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no tunnel of that name is open to you"), "{err}");
    let denied = poort(&home).args(["connect", "ops", "--stdio"]).stdin(Stdio::null()).output().unwrap();
    let denied = String::from_utf8_lossy(&denied.stderr).to_string();
    assert!(denied.contains("no tunnel of that name is open to you"), "{denied}");
    assert_eq!(gate.sink.accepted(), 0, "the target saw no connection");
    assert!(gate.audit("access_denied").iter().any(|e| e["app"] == "ops"));

    // A name nobody configured gets the very same answer: the command line cannot tell the
    // tunnels it may not use from the ones that do not exist.
    let out = poort(&home).args(["connect", "nope", "--stdio"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stderr), denied.replace("ops", "nope"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("nope\""), "the name is not echoed");
    // Both refusals are recorded: the first in full, the other counted with it.
    assert_eq!(gate.refusals("access_denied").await, 2 + 1, "ops twice, nope once");
    let nobody = TempDir::new();
    let out = poort(&nobody).args(["connect", "sink", "--stdio"]).stdin(Stdio::null()).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not signed in"), "{out:?}");
    let expired = signed_in(&gate, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let out = poort(&expired).args(["connect", "sink", "--stdio"]).stdin(Stdio::null()).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("session ended"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_target_fails_cleanly_and_is_audited() {
    let gate = Gate::start().await;
    let s = gate.cli_session("alice").await;
    let home = signed_in(&gate, &s);
    let out = poort(&home).args(["connect", "nowhere", "--stdio"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("target unreachable"), "{err}");
    let failed = gate.audit("tunnel_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["tunnel"], "nowhere");
    assert!(gate.audit("tunnel_opened").is_empty());
}

/// Opens a tunnel for `user`'s command line, ends it with `end`, and checks the tunnel is cut
/// within a second and its close audited with `why`.
async fn cut_within_a_second(user: &str, end: impl FnOnce(&Gate), why: &str) {
    let gate = Gate::start().await;
    let s = gate.cli_session(user).await;
    let home = signed_in(&gate, &s);
    let (child, port) = listen(&home, "sink");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"still here").unwrap();
    eventually("the tunnel to open", Duration::from_secs(3), async || !gate.audit("tunnel_opened").is_empty()).await;
    end(&gate);
    let ended = Instant::now();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the tunnel was cut rather than answered");
    assert!(ended.elapsed() < Duration::from_secs(1), "cut after {:?}", ended.elapsed());
    eventually("the close to be audited", Duration::from_secs(3), async || {
        gate.audit("tunnel_closed").iter().any(|e| e["why"] == why)
    })
    .await;
    drop(child);
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_the_session_cuts_a_live_tunnel_within_a_second() {
    let revoke = |gate: &Gate| {
        let sessions = gate.store().list_sessions(Some("alice")).unwrap();
        let id = sessions.iter().find(|s| s.kind == "cli").unwrap().id.clone();
        assert!(gate.cli(&["session", "revoke", &id]).status.success());
    };
    cut_within_a_second("alice", revoke, "session ended").await;
}

/// A lockdown ends the tunnels of everyone but the administrators within a second.
#[tokio::test(flavor = "multi_thread")]
async fn a_lockdown_cuts_open_tunnels_of_non_admins() {
    let lockdown = |gate: &Gate| assert!(gate.cli(&["lockdown", "on"]).status.success());
    cut_within_a_second("bob", lockdown, "lockdown").await;
}

/// A user whose groups change loses what they hold open, and opens it again under what they
/// may do now (a tunnel a removed group gave would otherwise stay open).
#[tokio::test(flavor = "multi_thread")]
async fn a_group_change_cuts_open_tunnels_within_a_second() {
    let regroup = |gate: &Gate| assert!(gate.cli(&["user", "groups", "alice", "--remove", "staff"]).status.success());
    cut_within_a_second("alice", regroup, "groups changed").await;
}

/// A reload that narrows a tunnel's rule to a group the user is not in ends their open
/// tunnel within a second (`poort reload`, as an operator runs it).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_narrows_the_rule_cuts_open_tunnels_within_a_second() {
    let narrow = |gate: &Gate| {
        gate.edit_config(|t| {
            t.replacen(
                "target = \"{sink}\"\naccess = \"authenticated\""
                    .replace("{sink}", &gate.sink.addr.to_string())
                    .as_str(),
                &format!(
                    "target = \"{}\"\naccess = {{ rules = [{{ effect = \"allow\", groups = [\"staff\"] }}] }}",
                    gate.sink.addr
                ),
                1,
            )
        });
        let out = gate.cli(&["reload"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    cut_within_a_second("bob", narrow, "access withdrawn by a config change").await;
}

/// A real OpenSSH server on loopback taking one client key: its folder (with `client_key`), the
/// process and its port.
fn sshd() -> (TempDir, Reaped, u16) {
    let dir = TempDir::new();
    let mut keygen = Command::new("ssh-keygen");
    keygen.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(dir.0.join("client_key"));
    assert!(keygen.status().unwrap().success());
    std::fs::copy(dir.0.join("client_key.pub"), dir.0.join("authorized_keys")).unwrap();
    let auth = format!("AuthorizedKeysFile {}", dir.0.join("authorized_keys").display());
    let (process, port) = crate::harness::start_sshd(&dir, &auth);
    (dir, process, port)
}

/// `ssh` to the tunnel `ssh` through `poort connect ssh --stdio`, signed in from `home`,
/// running `command` remotely.
fn ssh_through_poort(home: &TempDir, sshd_dir: &TempDir, command: &[&str]) -> Command {
    let proxy = format!(
        "ProxyCommand=env XDG_CONFIG_HOME={} {} connect ssh --stdio",
        home.0.display(),
        env!("CARGO_BIN_EXE_poort")
    );
    let mut ssh = Command::new("ssh");
    ssh.args(["-F", "/dev/null", "-i"])
        .arg(sshd_dir.0.join("client_key"))
        .args(["-o", &proxy, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "root@internal-host"])
        .args(command);
    ssh
}

/// A real OpenSSH server on loopback, reached with `ssh -o ProxyCommand='poort connect ssh
/// --stdio'`.
#[tokio::test(flavor = "multi_thread")]
async fn ssh_runs_a_command_through_the_tunnel() {
    let (dir, sshd, port) = sshd();
    let tables = format!("\n[[tunnel]]\nname = \"ssh\"\ntarget = \"127.0.0.1:{port}\"\naccess = \"authenticated\"\n");
    let gate = Gate::start_config("", &tables).await;
    let s = gate.cli_session("alice").await;
    let home = signed_in(&gate, &s);
    let mut ssh = ssh_through_poort(&home, &dir, &["echo", "through-poort", "$((6*7))"]);
    let out = tokio::task::spawn_blocking(move || ssh.output().unwrap()).await.unwrap();
    drop(sshd);
    assert!(out.status.success(), "ssh failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "through-poort 42");
    eventually("the ssh tunnel to be audited", Duration::from_secs(3), async || {
        gate.audit("tunnel_closed").iter().any(|e| e["tunnel"] == "ssh")
    })
    .await;
}

/// ssh through `poort connect --stdio` ends within a second or two of the session's end, with
/// the gateway's reason, instead of hanging on a tunnel that is gone.
#[tokio::test(flavor = "multi_thread")]
async fn ssh_through_the_command_line_ends_when_the_session_is_revoked() {
    let (dir, _sshd, port) = sshd();
    let tables = format!("\n[[tunnel]]\nname = \"ssh\"\ntarget = \"127.0.0.1:{port}\"\naccess = \"authenticated\"\n");
    let gate = Gate::start_config("", &tables).await;
    let s = gate.cli_session("alice").await;
    let home = signed_in(&gate, &s);
    let mut ssh = ssh_through_poort(&home, &dir, &["sleep", "60"]);
    let child = ssh.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    eventually("the tunnel to open", Duration::from_secs(10), async || !gate.audit("tunnel_opened").is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sessions = gate.store().list_sessions(Some("alice")).unwrap();
    let id = sessions.iter().find(|s| s.kind == "cli").unwrap().id.clone();
    assert!(gate.cli(&["session", "revoke", &id]).status.success());
    let revoked = Instant::now();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert!(revoked.elapsed() < Duration::from_secs(3), "ssh ended {:?} after the revocation", revoked.elapsed());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("poort: the gateway ended the tunnel: session ended"), "{err}");
    assert!(!err.contains("docs.rs"), "{err}");
}

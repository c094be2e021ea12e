//! The SSH front door, end to end with OpenSSH on both sides: a real `ssh` client signs in to
//! poort (`PERSON+TARGET`) with a key registered in the portal or with a code approved in the
//! browser, and poort signs in to a real `sshd` that trusts only poort's CA. Who else tries:
//! a person policy does not let in, an account policy does not give, someone with another
//! person's key, a key alone where a second factor is needed, a target whose host key is not
//! the pinned one, a session revoked mid-command, a command the target does not allow.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use poort::clock::Clock;
use poort::identity::totp;

use crate::harness::{Gate, Reaped, TempDir, eventually, start_sshd};

struct Door {
    gate: Gate,
    _target: (TempDir, Reaped),
    /// The SSH front door's port.
    port: u16,
    keys: TempDir,
}

/// A gateway with the SSH front door and targets on one real sshd that trusts poort's CA:
/// `db1` (staff, as root; TOFU), `db1x` (the same, exec not allowed), `strict` (needs a second
/// factor), `pinned` (a host key that is not the target's), plus `extra` config lines.
async fn door(extra: &str) -> Door {
    door_with("", extra).await
}

/// As `door`, with more lines for the `[ssh]` table.
async fn door_with(ssh_extra: &str, extra: &str) -> Door {
    let sshd_dir = TempDir::new();
    let ca_file = sshd_dir.0.join("ca.pub");
    std::fs::write(&ca_file, "").unwrap();
    let auth = format!("TrustedUserCAKeys {}\nAuthorizedKeysFile none", ca_file.display());
    let (sshd, target_port) = start_sshd(&sshd_dir, &auth);
    let other_key = TempDir::new();
    let made =
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(other_key.0.join("k")).status();
    assert!(made.unwrap().success());
    let wrong_host_key = std::fs::read_to_string(other_key.0.join("k.pub")).unwrap();
    let staff = r#"{ rules = [{ effect = "allow", groups = ["staff"] }] }"#;
    let tables = format!(
        r#"
[ssh]
listen = "127.0.0.1:0"
{ssh_extra}

[[ssh_target]]
name = "db1"
address = "127.0.0.1:{target_port}"
access = {staff}
principals = ["root"]

[[ssh_target]]
name = "db1x"
address = "127.0.0.1:{target_port}"
access = {staff}
principals = ["root"]
allow = ["shell"]

[[ssh_target]]
name = "strict"
address = "127.0.0.1:{target_port}"
access = {staff}
principals = ["root"]
mfa = "required"

[[ssh_target]]
name = "pinned"
address = "127.0.0.1:{target_port}"
access = {staff}
principals = ["root"]
host_key = ["{}"]
{}"#,
        wrong_host_key.trim(),
        extra.replace("{target_port}", &target_port.to_string())
    );
    let gate = Gate::start_config("", &tables).await;
    let ca = gate.cli(&["ssh", "ca"]);
    assert!(ca.status.success());
    std::fs::write(&ca_file, &ca.stdout).unwrap();
    let port = gate.running.as_ref().unwrap().ssh_addr.expect("[ssh] listen is bound").port();
    Door { gate, _target: (sshd_dir, sshd), port, keys: TempDir::new() }
}

impl Door {
    /// A new key for `user`, registered in the portal; its private key's path.
    async fn key_for(&self, user: &str, name: &str) -> PathBuf {
        let path = self.new_key(name);
        let line = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        let s = self.gate.login(user).await;
        let added = self.gate.post("/.poort/security/ssh/add", &s, &[("key", line.trim()), ("name", name)]).await;
        assert_eq!(added.status, 200, "{}", added.text());
        path
    }

    /// A new key nobody registered.
    fn new_key(&self, name: &str) -> PathBuf {
        let path = self.keys.0.join(name);
        let made = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&path).status();
        assert!(made.unwrap().success());
        path
    }

    /// `ssh` to the front door as `user` with `key` (batch mode: keys only), running `command`.
    fn ssh(&self, user: &str, key: Option<&Path>, command: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]).args([
            "-o",
            "ConnectTimeout=10",
            "-p",
            &self.port.to_string(),
        ]);
        match key {
            Some(k) => {
                c.arg("-i").arg(k).args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]);
            }
            None => {
                c.args(["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=keyboard-interactive"]);
            }
        }
        c.arg(format!("{user}@127.0.0.1")).args(command).stdin(Stdio::null());
        c
    }

    /// `sftp` to the front door as `user` with `key`, running the commands in `batch`.
    fn sftp(&self, user: &str, key: &Path, batch: &Path) -> Command {
        let mut c = Command::new("sftp");
        c.args(["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-i"])
            .arg(key)
            .args(["-P", &self.port.to_string(), "-b"])
            .arg(batch)
            .arg(format!("{user}@127.0.0.1"))
            .stdin(Stdio::null());
        c
    }

    async fn run(&self, mut c: Command) -> std::process::Output {
        tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap()
    }
}

/// The headers of a page the person opened from a portal page (`referer`).
fn navigation<'a>(cookie: &'a str, referer: &'a str) -> [(&'static str, &'a str); 6] {
    [
        ("Cookie", cookie),
        ("Sec-Fetch-Site", "same-origin"),
        ("Sec-Fetch-Mode", "navigate"),
        ("Sec-Fetch-Dest", "document"),
        ("Sec-Fetch-User", "?1"),
        ("Referer", referer),
    ]
}

/// How long after `since` the `child` ended, and how, if it did within 5 s (else it is killed).
async fn ends_within(mut child: std::process::Child, since: Instant) -> Option<(Duration, std::process::ExitStatus)> {
    tokio::task::spawn_blocking(move || {
        while since.elapsed() < Duration::from_secs(5) {
            if let Some(status) = child.try_wait().unwrap() {
                return Some((since.elapsed(), status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    })
    .await
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_key_runs_a_command_on_the_target_recorded_and_audited() {
    let d = door("").await;
    let key = d.key_for("alice", "laptop").await;
    let out = d.run(d.ssh("alice+db1", Some(&key), &["echo", "through-poort;", "id", "-un"])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "through-poort\nroot\n");

    let opened = d.gate.audited("ssh_opened", |e| e["user"] == "alice" && e["target"] == "db1").await;
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0]["principal"], "root");
    assert!(opened[0]["method"].as_str().unwrap().starts_with("key SHA256:"), "{}", opened[0]);
    let session = opened[0]["session"].as_str().unwrap().to_string();
    let mut closed = Vec::new();
    eventually("the channel's record", Duration::from_secs(5), async || {
        closed = d.gate.audited("ssh_channel_closed", |e| e["session"] == session.as_str()).await;
        !closed.is_empty()
    })
    .await;
    let c = &closed[0];
    assert_eq!(c["what"], "exec echo through-poort; id -un");
    assert_eq!(c["exit_status"], 0);
    // The recording is where the record says, holds the output, and its sum is in the chain.
    let file = d.gate.dir.0.join("recordings").join(c["recording"].as_str().unwrap());
    let cast = std::fs::read_to_string(&file).unwrap();
    assert_eq!(poort::audit::recording::replay_output(&cast), "through-poort\nroot\n");
    let sum = poort::secret::hex(ring::digest::digest(&ring::digest::SHA256, cast.as_bytes()).as_ref());
    assert_eq!(c["sha256"], sum.as_str());
    // The first host key of the target was kept and audited; the connection's session ended.
    assert_eq!(d.gate.audited("ssh_host_key_kept", |e| e["target"] == "db1").await.len(), 1);
    eventually("the connection's session ends with it", Duration::from_secs(5), async || {
        !d.gate.audited("ssh_closed", |e| e["session"] == session.as_str()).await.is_empty()
    })
    .await;
    let live = d.gate.store().list_sessions(Some("alice")).unwrap();
    assert!(!live.iter().any(|r| r.id == session), "the SSH session is gone with its connection");
    // The key's last use is recorded.
    let keys = d.gate.store().with(|c| poort::ssh::keys(c, "alice")).unwrap();
    assert!(keys[0].last_used.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_accounts_keys_and_channels_policy_does_not_give_are_refused() {
    let d = door("").await;
    let alice = d.key_for("alice", "alice").await;
    let bob = d.key_for("bob", "bob").await;
    let nobody = d.new_key("nobody");
    let refused = async |user: &str, key: &Path| {
        let out = d.run(d.ssh(user, Some(key), &["echo", "in"])).await;
        assert!(!out.status.success(), "{user} got in: {out:?}");
        assert!(!text(&out.stdout).contains("in"), "{user}: {out:?}");
        text(&out.stderr)
    };
    // bob is not staff.
    assert!(refused("bob+db1", &bob).await.contains("Permission denied"));
    // alice may not be "operator" on db1; a target that does not exist looks the same.
    refused("alice+db1+operator", &alice).await;
    refused("alice+nosuch", &alice).await;
    // alice's key is not carol's, though carol may use db1 too.
    let hash = poort::identity::password::hash(crate::harness::PASSWORD).unwrap();
    let now = d.gate.clock.now();
    d.gate.store().add_user("carol", None, &hash, &["staff".into()], now).unwrap();
    refused("carol+db1", &alice).await;
    refused("bob+db1", &alice).await;
    refused("alice+db1", &nobody).await;
    // A plain user name is a jump: nothing to run there, and it says how to name a target.
    let said = refused("alice", &alice).await;
    assert!(said.contains("poort: name a target: ssh ") && said.contains(" alice+TARGET@localhost"), "{said}");
    // A key is one factor: a target that needs a second one does not take it.
    refused("alice+strict", &alice).await;
    let denied = d.gate.audited("access_denied", |e| e["app"].as_str().is_some_and(|a| a.starts_with("ssh:"))).await;
    let reasons: Vec<String> = denied.iter().map(|e| format!("{} {} {}", e["user"], e["app"], e["reason"])).collect();
    assert!(
        reasons.iter().any(|r| r.contains("bob") && r.contains("ssh:db1") && r.contains("no allow rule")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("operator")), "{reasons:?}");
    assert!(d.gate.audit("ssh_opened").iter().all(|e| e["target"] == "(jump)"), "nobody got in");
    eventually("a refusal leaves no session behind", Duration::from_secs(5), async || {
        !d.gate.store().list_sessions(None).unwrap().iter().any(|r| r.kind == "ssh")
    })
    .await;

    // A command where the target allows a shell only: the channel is refused, said and audited.
    let out = d.run(d.ssh("alice+db1x", Some(&alice), &["echo", "in"])).await;
    assert!(!out.status.success() && !text(&out.stdout).contains("in"), "{out:?}");
    let denied = d.gate.audited("access_denied", |e| e["app"] == "ssh:db1x").await;
    assert!(denied.iter().any(|e| e["reason"].as_str().unwrap().contains("exec echo in is not allowed")), "{denied:?}");

    // A target whose host key is not the pinned one: poort does not sign in to it, and says so.
    let out = d.run(d.ssh("alice+pinned", Some(&alice), &["echo", "in"])).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("its host key is not the one pinned"), "{}", text(&out.stderr));
    assert!(!d.gate.audited("ssh_failed", |e| e["target"] == "pinned").await.is_empty());

    // During a lockdown only the admin group gets in; alice is not in it.
    assert!(d.gate.cli(&["lockdown", "on"]).status.success());
    let gw = d.gate.running.as_ref().unwrap();
    eventually("the lockdown is in force", Duration::from_secs(5), async || gw.gateway().state.mitigation.lockdown())
        .await;
    refused("alice+db1", &alice).await;
    let denied = d.gate.audited("access_denied", |e| e["reason"] == "lockdown").await;
    assert!(denied.iter().any(|e| e["user"] == "alice" && e["app"] == "ssh:db1"), "{denied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_a_code_approved_in_the_browser_signs_in_with_its_factors() {
    let d = door("").await;
    let mut child = d
        .ssh("alice+strict", None, &["echo", "approved-in-the-browser"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The code is printed on the terminal: read it from ssh's standard error.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let code = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(15);
        while let Ok(line) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            if let Some(i) = line.find("/.poort/device?code=") {
                return Some(line[i + "/.poort/device?code=".len()..].trim().to_string());
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("ssh shows the URL with the code");
    // alice, signed in with a second factor, approves it.
    let s = d.gate.login("alice").await;
    let (secret, s, _) = crate::harness::enrol(&d.gate, &s).await;
    assert_eq!(d.gate.get(&format!("/.poort/device?code={code}"), Some(&s)).await.status, 200);
    let page = d.gate.get(&format!("/.poort/device?code={code}"), Some(&s)).await.text();
    assert!(page.contains("An SSH connection for alice to strict asked to sign in as"), "{page}");
    d.gate.clock.advance(30);
    let totp_code = totp::code_at_step(&secret, totp::step_at(d.gate.clock.now()));
    let s = d.gate.confirm(&s, &[("code", &totp_code), ("device", &code)]).await;
    let r = d.gate.post("/.poort/device", &s, &[("code", &code), ("decision", "approve")]).await;
    assert!(r.text().contains("Go back to your terminal"), "{}", r.text());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "approved-in-the-browser\n");
    let opened = d.gate.audited("ssh_opened", |e| e["target"] == "strict").await;
    assert_eq!(opened[0]["method"], "approved in the browser");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_ends_its_ssh_connection_within_a_second() {
    let d = door("").await;
    let key = d.key_for("alice", "laptop").await;
    let child =
        d.ssh("alice+db1", Some(&key), &["echo", "started;", "sleep", "30"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut session = String::new();
    eventually("the connection opens", Duration::from_secs(10), async || {
        let opened = d.gate.audited("ssh_opened", |e| e["user"] == "alice").await;
        session = opened.first().map(|e| e["session"].as_str().unwrap().to_string()).unwrap_or_default();
        !session.is_empty()
    })
    .await;
    // The person ends the session from the portal's list of their sessions.
    let s = d.gate.login("alice").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = d.gate.post("/.poort/sessions/end", &s, &[("id", &session)]).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let revoked = Instant::now();
    let (after, status) = ends_within(child, revoked).await.expect("the ssh client was cut off");
    assert!(!status.success());
    assert!(after < Duration::from_secs(1), "cut {after:?} after the revocation");
    let closed = d.gate.audited("ssh_closed", |e| e["session"] == session.as_str()).await;
    assert!(!closed.is_empty());
}

/// A person with a key on db1 who is not the administrator: carol, in staff.
async fn carol(d: &Door) -> PathBuf {
    let hash = poort::identity::password::hash(crate::harness::PASSWORD).unwrap();
    d.gate.store().add_user("carol", None, &hash, &["staff".into()], d.gate.clock.now()).unwrap();
    d.key_for("carol", "carol").await
}

/// Reads an answer as it streams in, until `until` says it has what it waits for (or 15 s).
async fn stream_until(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    got: &mut Vec<u8>,
    until: impl Fn(&str) -> bool,
) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 16384];
    while !until(&String::from_utf8_lossy(got)) {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_watches_a_session_live_then_replays_it() {
    use tokio::io::AsyncWriteExt;
    let d = door("").await;
    let key = carol(&d).await;
    let (admin, _) = crate::admin_console::admin(&d.gate).await;
    let command = ["echo", "'first-<line>';", "sleep", "4;", "echo", "second-line"];
    let mut child = d.ssh("carol+db1", Some(&key), &command).stdout(Stdio::piped()).spawn().unwrap();
    eventually("the channel starts", Duration::from_secs(10), async || !d.gate.audit("ssh_channel_opened").is_empty())
        .await;
    let conn = poort::store::open_connection(d.gate.db()).unwrap();
    let seq: i64 =
        conn.query_row("SELECT MAX(seq) FROM audit WHERE kind = ?1", ["ssh_channel_opened"], |r| r.get(0)).unwrap();

    // The live page: the first line arrives while the command still runs.
    let cookie = format!("__Host-poort={admin}");
    let referer = format!("{}/.poort/admin/recordings", crate::harness::ORIGIN);
    let nav = navigation(&cookie, &referer);
    let path = format!("/.poort/admin/recording?seq={seq}");
    let (sni, bytes) = Gate::request_bytes("GET", &path, &nav, b"");
    let mut tls = d.gate.try_connect_to(&sni, &[b"http/1.1"]).await.unwrap();
    tls.write_all(&bytes).await.unwrap();
    let mut got = Vec::new();
    // Output events as the page carries them (the heading names the command too).
    let (first, second) = (r#""o","first-&lt;line&gt;"#, r#""o","second-line"#);
    stream_until(&mut tls, &mut got, |t| t.contains(first)).await;
    let page = String::from_utf8_lossy(&got).to_string();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("data-mode=\"live\""), "{page}");
    assert!(page.contains(first), "the output so far is on the page: {page}");
    assert!(child.try_wait().unwrap().is_none(), "and the session is still running");
    assert!(!page.contains(second));
    assert!(page.contains("End this session"), "a live session can be ended from its page");
    // The rest comes as it happens, and the page ends with the recording.
    stream_until(&mut tls, &mut got, |t| t.contains("</html>")).await;
    let page = String::from_utf8_lossy(&got).to_string();
    assert!(page.contains(second) && page.contains("</html>"), "{page}");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(text(&out.stdout), "first-<line>\nsecond-line\n");

    // Replayed afterwards: the whole recording, on a page whose styles the emulator may set.
    let replay = crate::admin_console::open(&d.gate, &path, &admin).await;
    assert_eq!(replay.status, 200);
    assert!(replay.text().contains("data-mode=\"replay\"") && replay.text().contains(second));
    let csp = replay.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self';") && csp.contains("style-src 'self' 'unsafe-inline'"), "{csp}");
    // Both looks were audited as the administrator's.
    let looked = d.gate.audited("admin", |e| e["command"] == "console: recording replay").await;
    assert!(looked.iter().any(|e| e["command"] == "console: recording watch" && e["target"] == "carol"), "{looked:?}");
    // Not for anyone else: carol is no administrator, and a script gets nothing.
    let carol_s = d.gate.login("carol").await;
    assert_eq!(crate::admin_console::open(&d.gate, &path, &carol_s).await.status, 403);
    let scripted = d.gate.request("GET", &path, &[("Cookie", &cookie), ("Sec-Fetch-Mode", "cors")], b"").await;
    assert_eq!(scripted.status, 403);
    // A number that is not a recording's record.
    let other = crate::admin_console::open(&d.gate, "/.poort/admin/recording?seq=1", &admin).await;
    assert_eq!(other.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_terminal_runs_a_shell_for_the_page_that_holds_its_ticket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let d = door("").await;
    carol(&d).await;
    let s = d.gate.login("carol").await;
    let cookie = format!("__Host-poort={s}");
    let referer = format!("{}/", crate::harness::ORIGIN);
    let nav = navigation(&cookie, &referer);
    // The launcher shows the command and the way into the browser; not to bob, who has none.
    let home = d.gate.get("/", Some(&s)).await.text();
    assert!(home.contains("carol+db1@localhost</code>"), "{home}");
    assert!(home.contains("href=\"/.poort/ssh/db1\""), "{home}");
    let bob = d.gate.login("bob").await;
    assert!(!d.gate.get("/", Some(&bob)).await.text().contains("carol+db1"));
    assert!(!d.gate.get("/", Some(&bob)).await.text().contains("/.poort/ssh/"));
    let page = d.gate.request("GET", "/.poort/ssh/db1", &nav, b"").await;
    assert_eq!(page.status, 200, "{}", page.text());
    let socket = page.text().split("data-socket=\"").nth(1).unwrap().split('"').next().unwrap().replace("&#38;", "&");
    assert!(socket.starts_with("/.poort/ssh/db1?account=root&ticket="), "{socket}");
    // A script's request for the page gets no ticket.
    let fetched =
        d.gate.request("GET", "/.poort/ssh/db1", &[("Cookie", &cookie), ("Sec-Fetch-Mode", "cors")], b"").await;
    assert_eq!(fetched.status, 403);
    // The WebSocket: without the ticket, from another origin, or for another session: refused.
    let origin = crate::harness::ORIGIN;
    let with =
        |origin: &'static str, cookie: String| [("Origin", origin), ("Cookie", Box::leak(cookie.into_boxed_str()))];
    assert!(
        d.gate.websocket("localhost", "/.poort/ssh/db1?account=root", &with(origin, cookie.clone())).await.is_err()
    );
    assert!(d.gate.websocket("localhost", &socket, &with("https://evil.example", cookie.clone())).await.is_err());
    let other = d.gate.login("carol").await;
    assert!(d.gate.websocket("localhost", &socket, &with(origin, format!("__Host-poort={other}"))).await.is_err());
    let mut ws =
        d.gate.websocket("localhost", &socket, &with(origin, cookie.clone())).await.expect("the page's socket opens");
    ws.send(Message::Text(r#"{"cols":100,"rows":30}"#.into())).await.unwrap();
    ws.send(Message::Binary("echo from-the-$((6*7))-browser; exit\n".as_bytes().to_vec().into())).await.unwrap();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        match m {
            Message::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Message::Close(_) => break,
            _ => {}
        }
    }
    assert!(seen.contains("from-the-42-browser"), "{seen}");
    let mut closed = Vec::new();
    eventually("the channel's record", Duration::from_secs(5), async || {
        closed = d.gate.audited("ssh_channel_closed", |e| e["what"] == "shell (browser)").await;
        true
    })
    .await;
    let c = closed.iter().find(|e| e["what"] == "shell (browser)").unwrap();
    let cast = std::fs::read_to_string(d.gate.dir.0.join("recordings").join(c["recording"].as_str().unwrap())).unwrap();
    assert!(poort::audit::recording::replay_output(&cast).contains("from-the-42-browser"));
    assert!(cast.contains(r#""i","echo from-the-$((6*7))-browser; exit\n""#), "input is recorded: {cast}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_jump_through_poort_is_the_same_session_with_the_same_checks() {
    let d = door("").await;
    let key = d.key_for("alice", "laptop").await;
    // OpenSSH's ProxyJump: the jump host is poort, the target is named as the inner host.
    let config = d.keys.0.join("ssh_config");
    let lines = format!(
        "Host gate\n  HostName 127.0.0.1\n  Port {}\n  User alice\n  IdentityFile {}\n  IdentitiesOnly yes\n\
         Host *\n  BatchMode yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
        d.port,
        key.display()
    );
    std::fs::write(&config, lines).unwrap();
    let jump = |dest: &str, cmd: &str| {
        let mut c = Command::new("ssh");
        c.arg("-F").arg(&config).args(["-J", "gate", dest, cmd]).stdin(Stdio::null());
        c
    };
    let out = d.run(jump("root@db1", "echo via-the-jump")).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "via-the-jump\n");
    let opened = d.gate.audit("ssh_opened");
    assert!(opened.iter().any(|e| e["target"] == "(jump)" && e["user"] == "alice"), "{opened:?}");
    assert!(
        opened.iter().any(|e| e["target"] == "db1" && e["principal"] == "root" && e["method"] == "ssh -J"),
        "{opened:?}"
    );
    let mut closed = Vec::new();
    eventually("the channel's record", Duration::from_secs(5), async || {
        closed = d.gate.audit("ssh_channel_closed");
        !closed.is_empty()
    })
    .await;
    assert_eq!(closed[0]["what"], "exec echo via-the-jump");
    assert!(!closed[0]["recording"].as_str().unwrap().is_empty(), "recorded as any other");
    // The same checks: an account policy does not give, a target that needs a second factor,
    // a name that is not a target.
    for dest in ["operator@db1", "root@strict", "root@nosuch"] {
        let out = d.run(jump(dest, "echo in")).await;
        assert!(!out.status.success() && !text(&out.stdout).contains("in"), "{dest}: {out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_transfers_and_forwarding_go_by_the_targets_allow_list() {
    let d = door(
        r#"
[[ssh_target]]
name = "fwd"
address = "127.0.0.1:{target_port}"
access = "authenticated"
principals = ["root"]
allow = ["forward"]
"#,
    )
    .await;
    let key = d.key_for("alice", "laptop").await;
    // SFTP: allowed on db1; the audit record names what it did to which file, not the contents.
    let local = d.keys.0.join("payload");
    std::fs::write(&local, vec![7u8; 300 * 1024]).unwrap();
    let remote = format!("/tmp/poort-sftp-{}", std::process::id());
    let batch = d.keys.0.join("batch");
    std::fs::write(
        &batch,
        format!("put {} {remote}\nget {remote} {}.back\nrm {remote}\n", local.display(), local.display()),
    )
    .unwrap();
    let sftp = d.sftp("alice+db1", &key, &batch);
    let out = d.run(sftp).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&local).unwrap(), std::fs::read(d.keys.0.join("payload.back")).unwrap());
    let mut closed = Vec::new();
    eventually("the transfer's record", Duration::from_secs(5), async || {
        closed = d.gate.audit("ssh_channel_closed");
        !closed.is_empty()
    })
    .await;
    let c = &closed[0];
    assert_eq!(c["what"], "subsystem sftp");
    let files: Vec<&str> = c["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(files, [format!("write {remote}"), format!("read {remote}"), format!("remove {remote}")]);
    assert!(c["bytes_in"].as_u64().unwrap() > 300 * 1024 && c["bytes_out"].as_u64().unwrap() > 300 * 1024, "{c}");
    assert_eq!(c["recording"], "", "a transfer's contents are not recorded");

    // Where the target allows a shell only, SFTP is refused.
    let refused = d.sftp("alice+db1x", &key, &batch);
    assert!(!d.run(refused).await.status.success());

    // Forwarding (`ssh -W`, one connection as `-L` makes each): carried where the target
    // allows it (here onward to the target's own sshd, whose greeting comes back), refused
    // where it does not; and a shell is refused where only forwarding is allowed.
    let onward = d.gate.running.as_ref().unwrap().gateway().state.cfg.ssh_targets[0].address.clone();
    let forward = |user: &str| {
        let mut c = d.ssh(user, Some(&key), &[]);
        let mut args: Vec<std::ffi::OsString> = c.get_args().map(|a| a.to_os_string()).collect();
        let dest = args.pop().unwrap();
        let mut w = Command::new("ssh");
        w.args(args).args(["-W", &onward]).arg(dest).stdin(Stdio::piped()).stdout(Stdio::piped());
        c = w;
        c
    };
    let read_greeting = async |mut c: Command| {
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut child = c.spawn().unwrap();
            let mut out = child.stdout.take().unwrap();
            let mut buf = [0u8; 64];
            let n = out.read(&mut buf).unwrap_or(0);
            let _ = child.kill();
            let _ = child.wait();
            String::from_utf8_lossy(&buf[..n]).to_string()
        })
        .await
        .unwrap()
    };
    assert!(read_greeting(forward("alice+fwd")).await.starts_with("SSH-2.0-"), "forwarded where allowed");
    assert!(!read_greeting(forward("alice+db1")).await.starts_with("SSH-2.0-"), "not where not allowed");
    let out = d.run(d.ssh("alice+fwd", Some(&key), &["echo", "in"])).await;
    assert!(!out.status.success() && !text(&out.stdout).contains("in"), "{out:?}");
}

/// A russh client that takes any host key, for what OpenSSH's client does not do on request.
struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;
    async fn check_server_key(&mut self, _: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_floods_device_codes_or_the_gateways_connections_before_signing_in() {
    use russh::client::KeyboardInteractiveAuthResponse as Kbd;
    use tokio::io::AsyncReadExt;
    let d = door("").await;
    let codes = || {
        let conn = poort::store::open_connection(d.gate.db()).unwrap();
        conn.query_row("SELECT count(*) FROM flows WHERE kind = ?1", ["device"], |r| r.get::<i64>(0)).unwrap()
    };
    // A connection is shown one code.
    let config = std::sync::Arc::new(russh::client::Config::default());
    let mut h = russh::client::connect(config.clone(), ("127.0.0.1", d.port), AnyHost).await.unwrap();
    let asked = h.authenticate_keyboard_interactive_start("nobody+db1", None::<String>).await;
    assert!(
        matches!(asked, Ok(Kbd::InfoRequest { ref instructions, .. }) if instructions.contains("/.poort/device?code="))
    );
    assert_eq!(codes(), 1);
    // New connections each ask for one: the address's sign-in limit (30 a minute) stops them.
    for _ in 0..35 {
        let connected = russh::client::connect(config.clone(), ("127.0.0.1", d.port), AnyHost);
        let Ok(Ok(mut h)) = tokio::time::timeout(Duration::from_secs(5), connected).await else { continue };
        let asked = h.authenticate_keyboard_interactive_start("nobody+db1", None::<String>);
        let _ = tokio::time::timeout(Duration::from_secs(5), asked).await;
    }
    assert!(codes() <= 30, "{} codes", codes());

    // Silent connections: an address holds at most 16 before signing in; the next is closed.
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(tokio::net::TcpStream::connect(("127.0.0.1", d.port)).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(("127.0.0.1", d.port)).await.unwrap();
    let mut buf = [0u8; 64];
    let n =
        tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await.expect("closed at once").unwrap_or(0);
    assert_eq!(n, 0, "the 17th silent connection from one address gets nothing: {:?}", &buf[..n]);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_a_command_and_a_removed_key_ends_what_it_opened() {
    let d = door(
        r#"
[[ssh_target]]
name = "files"
address = "127.0.0.1:{target_port}"
access = "authenticated"
principals = ["root"]
allow = ["sftp"]

[[ssh_target]]
name = "files-and-shell"
address = "127.0.0.1:{target_port}"
access = "authenticated"
principals = ["root"]
allow = ["sftp", "shell"]
"#,
    )
    .await;
    let key = d.key_for("alice", "laptop").await;
    // Legacy scp runs as a command: where commands are not allowed, nothing that starts with
    // "scp " runs either.
    for target in ["alice+files", "alice+files-and-shell", "alice+db1x"] {
        let out = d.run(d.ssh(target, Some(&key), &["scp -f /dev/null; echo ran-anyway"])).await;
        assert!(!text(&out.stdout).contains("ran-anyway"), "{target}: {out:?}");
    }
    let denied = d.gate.audited("access_denied", |e| e["app"] == "ssh:files").await;
    assert!(denied.iter().any(|e| e["reason"].as_str().unwrap().starts_with("exec scp -f")), "{denied:?}");
    // A long command is audited in full measure: its length and digest.
    let long = format!("true{}; echo long", " ".repeat(600));
    let out = d.run(d.ssh("alice+db1", Some(&key), &[&long])).await;
    assert_eq!(text(&out.stdout), "long\n");
    let mut opened = Vec::new();
    eventually("the long command's record", Duration::from_secs(5), async || {
        opened = d.gate.audit("ssh_channel_opened");
        opened.iter().any(|e| e["what"].as_str().unwrap().contains("sha256"))
    })
    .await;
    let sum = poort::secret::hex(ring::digest::digest(&ring::digest::SHA256, long.as_bytes()).as_ref());
    assert!(
        opened.iter().any(|e| e["what"].as_str().unwrap().ends_with(&format!("({} bytes, sha256 {sum})", long.len()))),
        "{opened:?}"
    );

    // Removing the key ends the connection it opened.
    let mut child = d.ssh("alice+db1", Some(&key), &["sleep", "30"]).spawn().unwrap();
    eventually("the command runs", Duration::from_secs(10), async || {
        d.gate.audit("ssh_channel_opened").iter().any(|e| e["what"] == "exec sleep 30")
    })
    .await;
    assert!(child.try_wait().unwrap().is_none());
    let listed = Command::new("ssh-keygen").arg("-lf").arg(key.with_extension("pub")).output().unwrap();
    let fingerprint = text(&listed.stdout).split_whitespace().nth(1).unwrap().to_string();
    let s = d.gate.login("alice").await;
    let r = d.gate.post("/.poort/security/ssh/remove", &s, &[("fingerprint", &fingerprint)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let removed = Instant::now();
    assert!(ends_within(child, removed).await.is_some(), "the key's connection ended with the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_carries_nothing_ends_at_the_idle_timeout() {
    let d = door_with("idle_timeout = \"3s\"", "").await;
    let key = d.key_for("alice", "laptop").await;
    // The client's keepalives every second are no use of the connection: it still idles out.
    let mut c = d.ssh("alice+db1", Some(&key), &["sleep", "30"]);
    let args: Vec<std::ffi::OsString> = c.get_args().map(|a| a.to_os_string()).collect();
    c = Command::new("ssh");
    c.args(["-o", "ServerAliveInterval=1"]).args(args).stdin(Stdio::null());
    let start = Instant::now();
    let out = d.run(c).await;
    let took = start.elapsed();
    assert!(!out.status.success(), "{out:?}");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(15), "ended after {took:?}");
    let closed = d.gate.audited("ssh_closed", |e| e["why"] == "idle").await;
    assert!(!closed.is_empty());
}

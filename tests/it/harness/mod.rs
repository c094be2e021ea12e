//! Test harness: a real gateway on a loopback port with a clock the test moves, real
//! upstreams that record what reached them, and a raw TLS client that sends exact bytes.
//! `gate` starts and drives the gateway, `upstream` the apps behind it, `wire` reads answers.

mod gate;
mod proxies;
mod upstream;
mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use gate::*;
pub use proxies::*;
pub use upstream::*;
pub use wire::*;

pub const ORIGIN: &str = "https://localhost:8443";
pub const PASSWORD: &str = "violet-anchor-sings-47";

/// A loopback port with nothing listening, for a server a test starts (slapd, sshd, the
/// OpenID Provider) or for nothing at all. Taken below the kernel's ephemeral range
/// (32768-60999), so that no socket another test binds to port 0 can take it before the server
/// does, and each only once in this process.
pub fn closed_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Test binaries run at once (CI, a developer's second shell) start apart.
    let base = 20_000 + (std::process::id() % 30) as u16 * 400;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 400;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until something accepts connections on a loopback port (a server the test started).
pub fn wait_for_port(port: u16, what: &str, limit: Duration) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < limit, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A throwaway directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let b: [u8; 8] = poort::secret::random_bytes();
        let p = std::env::temp_dir().join(format!("poort-it-{}", poort::secret::hex(&b)));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn base32_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bits = 0u64;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        bits = (bits << 5) | ALPHABET.iter().position(|&a| a == c).unwrap() as u64;
        n += 5;
        if n >= 8 {
            out.push((bits >> (n - 8)) as u8);
            n -= 8;
        }
    }
    out
}

pub fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    text.split(start).nth(1).unwrap().split(end).next().unwrap()
}

/// A login page with its per-request parts blanked (CSRF values, the echoed user name), so
/// that two answers can be compared byte for byte.
pub fn normalised(page: &str, user: &str) -> String {
    let mut out = page.replace(&format!("value=\"{user}\""), "value=\"\"");
    for marker in ["name=\"csrf\" value=\"", "data-csrf=\""] {
        out = out.split(marker).map(|p| p.split_once('"').map_or(p, |(_, rest)| rest)).collect::<Vec<_>>().join(marker);
    }
    out
}

/// A child process that is killed and reaped when dropped, also when a test fails.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real OpenSSH `sshd` on loopback with a host key in `dir` and `auth` (its lines on how
/// clients authenticate): the process and its port.
pub fn start_sshd(dir: &TempDir, auth: &str) -> (Reaped, u16) {
    let d = &dir.0;
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("host_key"))
        .status();
    assert!(made.unwrap().success());
    let port = closed_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\n{auth}\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPidFile none\n\
         Subsystem sftp internal-sftp\n",
        d.join("host_key").display()
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = std::process::Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("OpenSSH sshd is installed (scripts/test installs it)");
    let process = Reaped(child);
    wait_for_port(port, "sshd", Duration::from_secs(10));
    (process, port)
}

/// Waits (polling, bounded) until `f` returns true.
pub async fn eventually(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within {limit:?}");
}

pub fn path_of(p: &Path) -> &str {
    p.to_str().unwrap()
}

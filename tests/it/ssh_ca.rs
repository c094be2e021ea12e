//! poort as an SSH user CA, checked by OpenSSH itself: a real `sshd` that trusts only the key
//! `poort ssh ca` prints lets in a real `ssh` with a certificate poort signed for a key of its
//! own, and refuses one for another account, one past its time, and one from another CA.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{Gate, Reaped, TempDir};

/// A real sshd on loopback that takes certificates from the CA in `ca_pub` and no plain keys.
fn sshd(ca_pub: &str) -> (TempDir, Reaped, u16) {
    let dir = TempDir::new();
    let d = &dir.0;
    let ok = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(d.join("host_key")).status();
    assert!(ok.unwrap().success());
    std::fs::write(d.join("ca.pub"), ca_pub).unwrap();
    let port = crate::harness::closed_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nTrustedUserCAKeys {}\nAuthorizedKeysFile none\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
         PermitRootLogin prohibit-password\nPidFile none\n",
        d.join("host_key").display(),
        d.join("ca.pub").display()
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stderr(Stdio::null())
        .spawn()
        .expect("OpenSSH sshd is installed (scripts/test installs it)");
    let process = Reaped(child);
    crate::harness::wait_for_port(port, "sshd", Duration::from_secs(10));
    (dir, process, port)
}

/// Signs a certificate for a new connection key and writes both where `ssh -i` finds them.
fn issue(
    ca: &poort::ssh::UserCa,
    dir: &TempDir,
    name: &str,
    principal: &str,
    window: (u64, u64),
) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let key = poort::ssh::ConnectionKey::new();
    let principals = [principal.to_string()];
    let grant = poort::ssh::Grant {
        key_id: "alice via poort",
        principals: &principals,
        valid_after: window.0,
        valid_before: window.1,
        serial: 1,
        extensions: &["permit-pty"],
    };
    let path = dir.0.join(name);
    std::fs::write(&path, key.openssh_private("poort").as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.0.join(format!("{name}-cert.pub")), ca.certify(key.public(), &grant).line() + "\n").unwrap();
    path
}

fn ssh(key: &std::path::Path, port: u16) -> std::process::Output {
    Command::new("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-p", &port.to_string(), "root@127.0.0.1"])
        .args(["echo", "signed-in-by-certificate"])
        .output()
        .unwrap()
}

#[tokio::test]
async fn openssh_takes_the_certificates_poort_signs_and_nothing_else() {
    let gate = Gate::start().await;
    let out = gate.cli(&["ssh", "ca"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ca_pub = String::from_utf8(out.stdout).unwrap();
    assert!(ca_pub.starts_with("ssh-ed25519 "), "{ca_pub}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("TrustedUserCAKeys"));
    let again = gate.cli(&["ssh", "ca"]);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), ca_pub, "one CA key, kept");
    let (_sshd_dir, _sshd, port) = sshd(&ca_pub);

    let ca = poort::ssh::UserCa::load_or_create(&gate.dir.0).unwrap();
    let keys = TempDir::new();
    let now = poort::clock::Clock::now(&poort::clock::SystemClock) as u64;
    let good = issue(&ca, &keys, "good", "root", (now - 60, now + 300));
    let out = ssh(&good, port);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "signed-in-by-certificate", "{out:?}");
    let listed = Command::new("ssh-keygen").arg("-L").arg("-f").arg(keys.0.join("good-cert.pub")).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("Key ID: \"alice via poort\"") && listed.contains("permit-pty"), "{listed}");

    // Another account than the certificate names.
    let other = issue(&ca, &keys, "other", "operator", (now - 60, now + 300));
    assert!(!ssh(&other, port).status.success(), "a certificate for another principal");
    // Past its time.
    let old = issue(&ca, &keys, "old", "root", (now - 600, now - 300));
    assert!(!ssh(&old, port).status.success(), "an expired certificate");
    // From a CA the target does not trust.
    let stranger_dir = TempDir::new();
    let stranger = poort::ssh::UserCa::load_or_create(&stranger_dir.0).unwrap();
    let forged = issue(&stranger, &keys, "forged", "root", (now - 60, now + 300));
    assert!(!ssh(&forged, port).status.success(), "a certificate from another CA");
}

/// A user registers an SSH public key in the portal (the key the SSH front door will know them
/// by): only with a fresh proof, one key for one person, bad keys refused, each change audited.
#[tokio::test]
async fn an_ssh_key_is_registered_by_its_owner_only_and_freshly() {
    let gate = Gate::start().await;
    let keys = TempDir::new();
    let mut keygen = Command::new("ssh-keygen");
    keygen.args(["-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f"]).arg(keys.0.join("id"));
    assert!(keygen.status().unwrap().success());
    let line = std::fs::read_to_string(keys.0.join("id.pub")).unwrap();
    let listed = Command::new("ssh-keygen").arg("-lf").arg(keys.0.join("id.pub")).output().unwrap();
    let fingerprint = String::from_utf8_lossy(&listed.stdout).split_whitespace().nth(1).unwrap().to_string();
    assert!(fingerprint.starts_with("SHA256:"));

    let alice = gate.login("alice").await;
    let added = gate.post("/.poort/security/ssh/add", &alice, &[("key", line.trim()), ("name", "laptop")]).await;
    assert_eq!(added.status, 200, "{}", added.text());
    assert!(added.text().contains("The SSH key was added.") && added.text().contains(&fingerprint), "{}", added.text());
    let owner = gate.store().with(|c| poort::ssh::owner(c, &poort::ssh::parse_public_key(&line).unwrap())).unwrap();
    assert_eq!(owner.as_deref(), Some("alice"));
    let audited = gate
        .audited("factor_changed", |e| e["user"] == "alice" && e["change"] == format!("ssh key added {fingerprint}"))
        .await;
    assert!(!audited.is_empty());

    // Someone else cannot take the same key, nor remove it.
    let bob = gate.login("bob").await;
    let taken = gate.post("/.poort/security/ssh/add", &bob, &[("key", line.trim()), ("name", "mine")]).await;
    assert_eq!(taken.status, 409);
    assert!(!taken.text().contains("alice"), "whose key it is stays unsaid");
    let theirs = gate.post("/.poort/security/ssh/remove", &bob, &[("fingerprint", &fingerprint)]).await;
    assert_eq!(theirs.status, 404);

    // Not a key poort takes.
    for (bad, why) in [
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "DSA keys are not taken"),
        (&line.replace("ssh-ed25519", "ssh-rsa") as &str, "do not agree"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==", "cut short"),
        ("hello", "Paste the whole public key"),
    ] {
        let r = gate.post("/.poort/security/ssh/add", &bob, &[("key", bad), ("name", "x")]).await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.text().contains(why), "{bad}: {}", r.text());
    }

    // The other kinds OpenSSH makes: ECDSA is taken, short RSA is not.
    for (kind, bits, expect) in [("ecdsa", "256", 200), ("rsa", "1024", 400)] {
        let path = keys.0.join(format!("id_{kind}"));
        let made = Command::new("ssh-keygen").args(["-q", "-t", kind, "-b", bits, "-N", "", "-f"]).arg(&path).status();
        assert!(made.unwrap().success());
        let pub_line = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        let r = gate.post("/.poort/security/ssh/add", &bob, &[("key", pub_line.trim()), ("name", kind)]).await;
        assert_eq!(r.status, expect, "{kind}: {}", r.text());
    }

    // Five minutes on, a change needs a fresh proof first.
    gate.clock.advance(301);
    let stale = gate.post("/.poort/security/ssh/remove", &alice, &[("fingerprint", &fingerprint)]).await;
    assert_eq!(stale.status, 303, "confirm first");
    let alice = gate.confirm(&alice, &[("password", crate::harness::PASSWORD)]).await;
    let removed = gate.post("/.poort/security/ssh/remove", &alice, &[("fingerprint", &fingerprint)]).await;
    assert_eq!(removed.status, 200);
    let owner = gate.store().with(|c| poort::ssh::owner(c, &poort::ssh::parse_public_key(&line).unwrap())).unwrap();
    assert_eq!(owner, None);
}

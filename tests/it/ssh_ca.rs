//! poort as an SSH user CA, checked by OpenSSH itself: a real `sshd` that trusts only the key
//! `poort ssh ca` prints lets in a real `ssh` with a certificate poort signed for a key of its
//! own, and refuses one for another account, one past its time, and one from another CA.

use std::process::Command;

use crate::harness::{Gate, Reaped, TempDir};

/// A real sshd on loopback that takes certificates from the CA in `ca_pub` and no plain keys.
fn sshd(ca_pub: &str) -> (TempDir, Reaped, u16) {
    let dir = TempDir::new();
    std::fs::write(dir.0.join("ca.pub"), ca_pub).unwrap();
    let auth = format!("TrustedUserCAKeys {}\nAuthorizedKeysFile none", dir.0.join("ca.pub").display());
    let (process, port) = crate::harness::start_sshd(&dir, &auth);
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
        force_command: None,
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

    // One key, one fingerprint, one person: no other encoding of the same key gets in.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let wire = |parts: &[&[u8]]| -> String {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(&(p.len() as u32).to_be_bytes());
            out.extend_from_slice(p);
        }
        b64.encode(out)
    };
    let raw = b64.decode(line.split_whitespace().nth(1).unwrap()).unwrap();
    let ed = &raw[raw.len() - 32..];
    let n = [&[0u8][..], &[0xc5; 256][..]].concat();
    let variants = [
        (format!("sk-ssh-ed25519@openssh.com {}", wire(&[b"sk-ssh-ed25519@openssh.com", ed, b"ssh:"])), 409),
        (format!("ssh-rsa {}", wire(&[b"ssh-rsa", &[1, 0, 1], &n])), 200),
        (format!("ssh-rsa {}", wire(&[b"ssh-rsa", &[1, 0, 1], &[&[0u8][..], &n[..]].concat()])), 400),
        (format!("ssh-rsa {}", wire(&[b"ssh-rsa", &[0, 1, 0, 1], &n])), 400),
        (format!("ssh-rsa {}", wire(&[b"ssh-rsa", &[1, 0, 1], &[0u8; 256]])), 400),
        (format!("ssh-rsa {}", wire(&[b"ssh-rsa", &[1, 0, 1], b""])), 400),
        (format!("ecdsa-sha2-nistp256 {}", wire(&[b"ecdsa-sha2-nistp256", b"p256", &[4; 65]])), 400),
        (format!("ecdsa-sha2-nistp256 {}", wire(&[b"ecdsa-sha2-nistp256", b"nistp256", &[4]])), 400),
    ];
    for (variant, expect) in variants {
        let r = gate.post("/.poort/security/ssh/add", &bob, &[("key", &variant), ("name", "variant")]).await;
        assert_eq!(r.status, expect, "{variant}: {}", r.text());
    }
    let mirrored = gate.post("/.poort/security/ssh/add", &bob, &[("key", line.trim()), ("name", "a\u{202e}b")]).await;
    assert_eq!(mirrored.status, 400, "a name that turns the text around");

    // Five minutes on, a change needs a fresh proof first.
    gate.clock.advance(301);
    let stale = gate.post("/.poort/security/ssh/remove", &alice, &[("fingerprint", &fingerprint)]).await;
    assert_eq!(stale.status, 303, "confirm first");
    let alice = gate.confirm(&alice, &[("password", crate::harness::PASSWORD)]).await;
    let removed = gate.post("/.poort/security/ssh/remove", &alice, &[("fingerprint", &fingerprint)]).await;
    assert_eq!(removed.status, 200);
    let owner = gate.store().with(|c| poort::ssh::owner(c, &poort::ssh::parse_public_key(&line).unwrap())).unwrap();
    assert_eq!(owner, None);

    // A disabled person's keys sign nobody in; a reset of their credentials takes the keys too.
    let again = gate.post("/.poort/security/ssh/add", &alice, &[("key", line.trim()), ("name", "laptop")]).await;
    assert_eq!(again.status, 200);
    let key = poort::ssh::parse_public_key(&line).unwrap();
    assert!(gate.cli(&["user", "disable", "alice"]).status.success());
    assert_eq!(gate.store().with(|c| poort::ssh::owner(c, &key)).unwrap(), None);
    assert!(gate.cli(&["user", "enable", "alice"]).status.success());
    assert_eq!(gate.store().with(|c| poort::ssh::owner(c, &key)).unwrap().as_deref(), Some("alice"));
    let listed = gate.cli(&["user", "mfa", "alice"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&fingerprint), "{listed:?}");
    assert!(gate.cli(&["user", "mfa-reset", "alice"]).status.success());
    assert_eq!(gate.store().with(|c| poort::ssh::owner(c, &key)).unwrap(), None);
}

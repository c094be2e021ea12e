//! poort as an SSH user certificate authority: targets trust poort's CA key
//! (`TrustedUserCAKeys`), and poort signs, for each connection it makes, a certificate for a
//! key of its own that lives as long as the connection, naming the principal the user may log
//! in as and valid for a few minutes. No static key is copied to any target.
//!
//! The formats are OpenSSH's (PROTOCOL.certkeys and PROTOCOL.key in its sources): an
//! `ssh-ed25519-cert-v01@openssh.com` certificate signed with Ed25519, and the
//! `openssh-key-v1` private key file, so that OpenSSH's own `ssh` and `sshd` read them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{Ed25519KeyPair, KeyPair};

const ED25519: &str = "ssh-ed25519";
const ED25519_CERT: &str = "ssh-ed25519-cert-v01@openssh.com";
/// A user certificate (a host certificate is 2).
const USER_CERT: u32 = 1;

/// The CA key file in a data directory.
pub fn ca_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ssh-user-ca.p8")
}

/// SSH wire encoding: big-endian lengths before strings.
#[derive(Default)]
struct Wire(Vec<u8>);

impl Wire {
    fn string(&mut self, s: &[u8]) -> &mut Wire {
        self.0.extend_from_slice(&(s.len() as u32).to_be_bytes());
        self.0.extend_from_slice(s);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Wire {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Wire {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// The public key blob of an Ed25519 key: its type and its 32 bytes.
fn ed25519_blob(public: &[u8]) -> Vec<u8> {
    Wire::default().string(ED25519.as_bytes()).string(public).take()
}

/// What a certificate allows.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    /// Shown in the target's log (`sshd` logs the key id): the user and the poort session.
    pub key_id: &'a str,
    /// The accounts on the target it is good for.
    pub principals: &'a [String],
    pub valid_after: u64,
    pub valid_before: u64,
    pub serial: u64,
    /// `permit-pty`, `permit-port-forwarding`, ...: what the target lets the session do.
    pub extensions: &'a [&'a str],
    /// The one command the target may run, whatever the client asks (`force-command`):
    /// `internal-sftp` where poort allows file transfer only.
    pub force_command: Option<&'a str>,
}

/// poort's SSH user CA.
pub struct UserCa {
    pair: Ed25519KeyPair,
}

impl UserCa {
    /// The CA key in `data_dir`, made there on first use.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<UserCa> {
        let path = ca_path(data_dir);
        let pkcs8 = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                    .map_err(|_| anyhow::anyhow!("generating the SSH CA key failed"))?;
                crate::secret::write_private(&path, doc.as_ref())?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| anyhow::anyhow!("{} is not an Ed25519 PKCS#8 key", path.display()))?;
        Ok(UserCa { pair })
    }

    /// The CA's public key as a line of `TrustedUserCAKeys`.
    pub fn public_line(&self) -> String {
        format!("{ED25519} {} poort-user-ca", STANDARD.encode(ed25519_blob(self.pair.public_key().as_ref())))
    }

    /// A user certificate for the Ed25519 public key `subject` (32 bytes).
    pub fn certify(&self, subject: &[u8], grant: &Grant<'_>) -> Certificate {
        let nonce: [u8; 32] = crate::secret::random_bytes();
        let mut principals = Wire::default();
        for p in grant.principals {
            principals.string(p.as_bytes());
        }
        // Extensions are sorted by name, each with empty data.
        let mut names = grant.extensions.to_vec();
        names.sort_unstable();
        names.dedup();
        let mut extensions = Wire::default();
        for name in names {
            extensions.string(name.as_bytes()).string(b"");
        }
        // Critical options, sorted by name, each with its value as a string in a string.
        let mut critical = Wire::default();
        if let Some(command) = grant.force_command {
            critical.string(b"force-command").string(&Wire::default().string(command.as_bytes()).take());
        }
        let mut w = Wire::default();
        w.string(ED25519_CERT.as_bytes())
            .string(&nonce)
            .string(subject)
            .u64(grant.serial)
            .u32(USER_CERT)
            .string(grant.key_id.as_bytes())
            .string(&principals.take())
            .u64(grant.valid_after)
            .u64(grant.valid_before)
            .string(&critical.take())
            .string(&extensions.take())
            .string(b"")
            .string(&ed25519_blob(self.pair.public_key().as_ref()));
        let signature = self.pair.sign(&w.0);
        let blob = Wire::default().string(ED25519.as_bytes()).string(signature.as_ref()).take();
        w.string(&blob);
        Certificate { blob: w.take(), key_id: grant.key_id.to_string() }
    }
}

/// A signed certificate.
pub struct Certificate {
    pub blob: Vec<u8>,
    key_id: String,
}

impl Certificate {
    /// As a line of a `-cert.pub` file.
    pub fn line(&self) -> String {
        format!("{ED25519_CERT} {} {}", STANDARD.encode(&self.blob), self.key_id)
    }
}

/// A key poort makes for one connection to a target and forgets with it.
pub struct ConnectionKey {
    seed: zeroize::Zeroizing<[u8; 32]>,
    pair: Ed25519KeyPair,
}

impl Default for ConnectionKey {
    fn default() -> Self {
        ConnectionKey::new()
    }
}

impl ConnectionKey {
    pub fn new() -> ConnectionKey {
        let seed = zeroize::Zeroizing::new(crate::secret::random_bytes::<32>());
        let pair =
            Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).expect("invariant: any 32 bytes are an Ed25519 seed");
        ConnectionKey { seed, pair }
    }

    pub fn public(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// The key as an `openssh-key-v1` file, unencrypted (for OpenSSH's `ssh -i`).
    pub fn openssh_private(&self, comment: &str) -> zeroize::Zeroizing<String> {
        let public = self.public();
        let check: [u8; 4] = crate::secret::random_bytes();
        let mut secret = zeroize::Zeroizing::new(Vec::with_capacity(64));
        secret.extend_from_slice(self.seed.as_ref());
        secret.extend_from_slice(public);
        let mut private = Wire::default();
        private
            .u32(u32::from_be_bytes(check))
            .u32(u32::from_be_bytes(check))
            .string(ED25519.as_bytes())
            .string(public)
            .string(&secret)
            .string(comment.as_bytes());
        let mut pad = 1u8;
        while private.0.len() % 8 != 0 {
            private.0.push(pad);
            pad += 1;
        }
        let mut file = Wire::default();
        file.0.extend_from_slice(b"openssh-key-v1\0");
        file.string(b"none").string(b"none").string(b"").u32(1).string(&ed25519_blob(public)).string(&private.0);
        use zeroize::Zeroize;
        private.0.zeroize();
        let encoded = zeroize::Zeroizing::new(STANDARD.encode(&file.0));
        file.0.zeroize();
        let mut out = zeroize::Zeroizing::new(String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        for chunk in encoded.as_bytes().chunks(70) {
            out.push_str(std::str::from_utf8(chunk).expect("invariant: base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END OPENSSH PRIVATE KEY-----\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_laid_out_as_openssh_reads_it() {
        let dir =
            std::env::temp_dir().join(format!("poort-ssh-{}", crate::secret::hex(&crate::secret::random_bytes::<6>())));
        let ca = UserCa::load_or_create(&dir).unwrap();
        let again = UserCa::load_or_create(&dir).unwrap();
        assert_eq!(ca.public_line(), again.public_line(), "the CA key is kept");
        let key = ConnectionKey::new();
        let principals = ["root".to_string()];
        let grant = Grant {
            key_id: "alice",
            principals: &principals,
            valid_after: 10,
            valid_before: 20,
            serial: 7,
            extensions: &["permit-pty"],
            force_command: None,
        };
        let cert = ca.certify(key.public(), &grant);
        // Type, nonce, then the subject key.
        assert_eq!(&cert.blob[4..4 + ED25519_CERT.len()], ED25519_CERT.as_bytes());
        let at = 4 + ED25519_CERT.len() + 4 + 32 + 4;
        assert_eq!(&cert.blob[at..at + 32], key.public());
        // The signature checks out with the CA key over everything before it.
        let signed = cert.blob.len() - (4 + 4 + ED25519.len() + 4 + 64);
        let sig = &cert.blob[cert.blob.len() - 64..];
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, ca.pair.public_key().as_ref())
            .verify(&cert.blob[..signed], sig)
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A user's SSH public key, as they paste it: `TYPE BASE64 [comment]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub algo: String,
    pub blob: Vec<u8>,
    /// `SHA256:...`, as `ssh-keygen -l` shows it.
    pub fingerprint: String,
    /// A digest of the key itself, the same for every type that wraps it: one key, one person.
    pub material: String,
}

/// Reads SSH wire strings off a blob.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn string(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        let (s, rest) = (rest.get(..len)?, rest.get(len..)?);
        self.0 = rest;
        Some(s)
    }
}

/// A canonical SSH `mpint` holding a positive number: no needless leading zero byte, and a
/// zero byte only where the top bit would otherwise read as a sign. Returns its magnitude.
fn positive_mpint(m: &[u8]) -> Option<&[u8]> {
    match m {
        [] | [0] => None,
        [0, next, ..] if *next >= 0x80 => Some(&m[1..]),
        [0, ..] => None,
        [first, ..] if *first >= 0x80 => None,
        _ => Some(m),
    }
}

/// The key types poort takes: Ed25519 and ECDSA (also on security keys), and RSA of 2048 bits
/// or more. Not DSA, not certificates. Every field must be in the one form OpenSSH writes, so
/// that a key has one fingerprint (the one `ssh-keygen -l` shows), and `material` names the
/// key itself whatever wraps it (a security-key type around a plain key is the same key).
pub fn parse_public_key(line: &str) -> Result<PublicKey, &'static str> {
    let mut parts = line.split_whitespace();
    let (Some(algo), Some(b64)) = (parts.next(), parts.next()) else {
        return Err("Paste the whole public key: it starts with ssh-ed25519, ecdsa-sha2-… or ssh-rsa.");
    };
    const TAKEN: &[&str] = &[
        "ssh-ed25519",
        "sk-ssh-ed25519@openssh.com",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "ssh-rsa",
    ];
    match algo {
        a if TAKEN.contains(&a) => {}
        "ssh-dss" => return Err("DSA keys are not taken: make an Ed25519 key (ssh-keygen -t ed25519)."),
        a if a.contains("-cert-") => return Err("That is a certificate: paste the public key itself."),
        _ => return Err("That key type is not taken: use Ed25519, ECDSA or RSA (2048 bits or more)."),
    }
    let blob = STANDARD.decode(b64).map_err(|_| "That is not an SSH public key: its middle part is not base64.")?;
    let mut r = Reader(&blob);
    if r.string() != Some(algo.as_bytes()) {
        return Err("That is not an SSH public key: its type and its content do not agree.");
    }
    let bad = "That is not an SSH public key: it is cut short, has extra bytes or a field out of form.";
    let application = |r: &mut Reader<'_>| r.string().is_some_and(|a| a.starts_with(b"ssh:") && a.len() <= 256);
    let point_len = |curve: &[u8]| match curve {
        b"nistp256" => Some(65),
        b"nistp384" => Some(97),
        b"nistp521" => Some(133),
        _ => None,
    };
    let mut material = Vec::new();
    match algo {
        "ssh-ed25519" | "sk-ssh-ed25519@openssh.com" => {
            let k = r.string().filter(|k| k.len() == 32).ok_or(bad)?;
            if algo.starts_with("sk-") && !application(&mut r) {
                return Err(bad);
            }
            material.extend_from_slice(b"ed25519:");
            material.extend_from_slice(k);
        }
        _ if algo.contains("ecdsa-sha2-") => {
            let curve = r.string().ok_or(bad)?;
            let wanted =
                algo.trim_start_matches("sk-").trim_start_matches("ecdsa-sha2-").trim_end_matches("@openssh.com");
            let point = r.string().ok_or(bad)?;
            if curve != wanted.as_bytes() || point_len(curve) != Some(point.len()) || point[0] != 4 {
                return Err(bad);
            }
            if algo.starts_with("sk-") && !application(&mut r) {
                return Err(bad);
            }
            material.extend_from_slice(b"ecdsa:");
            material.extend_from_slice(curve);
            material.extend_from_slice(point);
        }
        _ => {
            let e = r.string().and_then(positive_mpint).ok_or(bad)?;
            let n = r.string().and_then(positive_mpint).ok_or(bad)?;
            if e.len() > 4 || e.last().is_none_or(|b| b & 1 == 0) || e == [1] {
                return Err(bad);
            }
            let bits = n.len() * 8 - n[0].leading_zeros() as usize;
            if bits < 2048 {
                return Err("That RSA key is shorter than 2048 bits: make an Ed25519 key (ssh-keygen -t ed25519).");
            }
            if bits > 16384 {
                return Err(bad);
            }
            material.extend_from_slice(b"rsa:");
            material.extend_from_slice(n);
        }
    }
    if !r.0.is_empty() {
        return Err(bad);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &blob);
    let fingerprint = format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest.as_ref()));
    let material = crate::secret::hex(ring::digest::digest(&ring::digest::SHA256, &material).as_ref());
    Ok(PublicKey { algo: algo.to_string(), blob, fingerprint, material })
}

impl PublicKey {
    /// `TYPE BASE64`, without the comment.
    pub fn line(&self) -> String {
        format!("{} {}", self.algo, STANDARD.encode(&self.blob))
    }
}

/// A key as registered.
#[derive(Debug, Clone)]
pub struct Registered {
    pub fingerprint: String,
    pub name: String,
    pub algo: String,
    pub created_at: i64,
    pub last_used: Option<i64>,
}

/// Keys a user may register at most.
pub const MAX_KEYS: usize = 16;

/// Registers `key` for `user` as `name`; `Ok(Err)` says why not (a key is one person's).
pub fn add_key(
    conn: &crate::db::Conn,
    user: &str,
    name: &str,
    key: &PublicKey,
    now: i64,
) -> crate::db::Result<Result<(), &'static str>> {
    use crate::db::{OptionalExtension, params};
    let taken = conn
        .query_row(
            "SELECT 1 FROM ssh_keys WHERE fingerprint = ?1 OR material = ?2",
            [key.fingerprint.as_str(), key.material.as_str()],
            |r| r.get::<i64>(0),
        )
        .optional()?;
    if taken.is_some() {
        return Ok(Err("That key is registered already. A key belongs to one person: make one of your own."));
    }
    if keys(conn, user)?.len() >= MAX_KEYS {
        return Ok(Err("You have as many SSH keys as can be registered: remove one first."));
    }
    conn.execute(
        "INSERT INTO ssh_keys (fingerprint, material, \"user\", name, key, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![key.fingerprint, key.material, user, name, key.line(), now],
    )?;
    Ok(Ok(()))
}

/// A user's keys, oldest first.
pub fn keys(conn: &crate::db::Conn, user: &str) -> crate::db::Result<Vec<Registered>> {
    conn.query_map(
        "SELECT fingerprint, name, key, created_at, last_used FROM ssh_keys WHERE \"user\" = ?1 ORDER BY created_at, fingerprint",
        [user],
        |r| {
            let key: String = r.get(2)?;
            Ok(Registered {
                fingerprint: r.get(0)?,
                name: r.get(1)?,
                algo: key.split(' ').next().unwrap_or_default().to_string(),
                created_at: r.get(3)?,
                last_used: r.get(4)?,
            })
        },
    )
}

/// Removes a key, and ends the SSH sessions it opened.
pub fn remove_key(conn: &mut crate::db::Conn, user: &str, fingerprint: &str, now: i64) -> crate::db::Result<bool> {
    use crate::db::params;
    let tx = conn.transaction()?;
    let gone =
        tx.execute("DELETE FROM ssh_keys WHERE \"user\" = ?1 AND fingerprint = ?2", params![user, fingerprint])? > 0;
    if gone {
        crate::store::Store::revoke_ssh_sessions(&tx, user, Some(fingerprint), now)?;
    }
    tx.commit()?;
    Ok(gone)
}

/// Ends every SSH session of `user` (after their keys were all removed: `mfa-reset`).
pub fn end_sessions(conn: &mut crate::db::Conn, user: &str, now: i64) -> crate::db::Result<usize> {
    let tx = conn.transaction()?;
    let n = crate::store::Store::revoke_ssh_sessions(&tx, user, None, now)?;
    tx.commit()?;
    Ok(n)
}

/// A target's host key as an operator pastes it (`TYPE BASE64 [comment]`, from its
/// `ssh_host_*_key.pub`), as `TYPE BASE64`; None if it is not one.
pub fn parse_host_key(raw: &str) -> Option<String> {
    parse_public_key(raw).ok().map(|k| k.line())
}

/// Notes that `key` just signed someone in.
pub fn touch_key(conn: &crate::db::Conn, key: &PublicKey, now: i64) -> crate::db::Result<()> {
    use crate::db::params;
    conn.execute("UPDATE ssh_keys SET last_used = ?1 WHERE material = ?2", params![now, key.material])?;
    Ok(())
}

/// Whose key this is (for the SSH front door): nobody's while its owner is disabled.
pub fn owner(conn: &crate::db::Conn, key: &PublicKey) -> crate::db::Result<Option<String>> {
    use crate::db::OptionalExtension;
    conn.query_row(
        "SELECT k.\"user\" FROM ssh_keys k JOIN users u ON u.name = k.\"user\" WHERE k.material = ?1 AND u.disabled = 0",
        [key.material.as_str()],
        |r| r.get(0),
    )
    .optional()
}

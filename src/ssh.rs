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
            .string(b"")
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

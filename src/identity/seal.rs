//! Secrets at rest (TOTP keys): AES-256-GCM with a key kept in the data directory, a fresh
//! random nonce per secret, and the owner's name bound in as associated data so a sealed
//! secret cannot be moved to another account.

use std::path::Path;

use anyhow::Context;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

pub struct Sealer {
    key: LessSafeKey,
    /// Keys short codes before they are stored (`keyed`), derived from the same file.
    ids: ring::hmac::Key,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// Loads the 32-byte key from `path`, creating it (mode 0600) if missing.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Sealer> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k: [u8; 32] = crate::secret::random_bytes();
                crate::secret::write_private(path, &k)?;
                k.to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| anyhow::anyhow!("{} must hold exactly 32 bytes", path.display()))?;
        let ids = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &crate::secret::sha256(&[b"poort-keyed-ids\0".as_slice(), &bytes].concat()),
        );
        Ok(Sealer { key: LessSafeKey::new(unbound), ids })
    }

    /// A short code (a command-line user code: 35 bits) as it may be stored: keyed with this
    /// gateway's secret, so that reading the database does not give the code back by trying
    /// every possible one.
    pub fn keyed(&self, purpose: &str, code: &str) -> String {
        let tag = ring::hmac::sign(&self.ids, format!("{purpose}\0{code}").as_bytes());
        crate::secret::b64(tag.as_ref())
    }

    pub fn seal(&self, owner: &str, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = crate::secret::random_bytes();
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(owner.as_bytes()), &mut buf)
            .expect("invariant: AES-GCM sealing a short buffer succeeds");
        let mut out = nonce.to_vec();
        out.extend(buf);
        out
    }

    /// None when the data was changed, moved to another owner, or sealed with another key.
    pub fn open(&self, owner: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = rest.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(owner.as_bytes()), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_refuse_tampering() {
        let dir = std::env::temp_dir()
            .join(format!("poort-seal-{}", crate::secret::hex(&crate::secret::random_bytes::<6>())));
        let s = Sealer::load_or_create(&dir.join("k")).unwrap();
        let sealed = s.seal("alice", b"secret");
        assert_eq!(s.open("alice", &sealed).as_deref(), Some(&b"secret"[..]));
        assert_eq!(s.open("bob", &sealed), None, "bound to its owner");
        let mut bad = sealed.clone();
        bad[15] ^= 1;
        assert_eq!(s.open("alice", &bad), None);
        let again = Sealer::load_or_create(&dir.join("k")).unwrap();
        assert_eq!(again.open("alice", &sealed).as_deref(), Some(&b"secret"[..]), "the key persists");
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! The identity assertion: an ES256 JWT that tells an upstream who the user is, signed with a
//! key kept in the data directory and published as a JWKS at `/.poort/jwks.json`.

use std::path::Path;

use anyhow::Context;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::Serialize;

use crate::clock::UnixTime;
use crate::identity::Identity;
use crate::secret::b64;

/// How long an assertion is valid.
pub const LIFETIME: i64 = 60;
/// A cached assertion is reused while younger than this, so an upstream always gets one with
/// at least half its life left.
pub const REUSE_FOR: i64 = 30;

pub struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    issuer: String,
    jwks: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer(kid={})", self.kid)
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    groups: &'a [String],
    amr: &'a [&'a str],
    iat: UnixTime,
    exp: UnixTime,
}

impl Signer {
    /// The key id apps find in `/.poort/jwks.json`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Loads the PKCS#8 key from `path`, creating it (mode 0600) if missing.
    pub fn load_or_create(path: &Path, issuer: &str) -> anyhow::Result<Signer> {
        let rng = SystemRandom::new();
        let pkcs8 = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| anyhow::anyhow!("generating the assertion key failed"))?;
                crate::secret::write_private(path, doc.as_ref())?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|_| anyhow::anyhow!("{} is not a P-256 PKCS#8 key", path.display()))?;
        // Uncompressed point: 0x04 || X || Y.
        let public = key.public_key().as_ref();
        let (x, y) = (&public[1..33], &public[33..65]);
        let thumb = ring::digest::digest(&ring::digest::SHA256, public);
        let kid = b64(&thumb.as_ref()[..12]);
        let jwks = serde_json::json!({
            "keys": [{ "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid, "x": b64(x), "y": b64(y) }]
        })
        .to_string();
        Ok(Signer { key, rng, kid, issuer: issuer.to_string(), jwks })
    }

    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Signs an assertion for `who` and the app named `audience`.
    pub fn sign(&self, audience: &str, who: &Identity, amr: &[&str], now: UnixTime) -> anyhow::Result<String> {
        let header = serde_json::json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid });
        let claims = Claims {
            iss: &self.issuer,
            aud: audience,
            sub: &who.user,
            email: who.email.as_deref(),
            groups: &who.groups,
            amr,
            iat: now,
            exp: now + LIFETIME,
        };
        let mut out = b64(header.to_string().as_bytes());
        out.push('.');
        out.push_str(&b64(&serde_json::to_vec(&claims)?));
        let sig = self.key.sign(&self.rng, out.as_bytes()).map_err(|_| anyhow::anyhow!("signing failed"))?;
        out.push('.');
        out.push_str(&b64(sig.as_ref()));
        Ok(out)
    }
}

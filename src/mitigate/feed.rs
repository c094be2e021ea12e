//! The signed mitigation feed: one file a publisher writes with `poort rules publish` and
//! serves over https, which every node polls and applies like its local rules file.
//!
//! The file is TOML: `format`, `version`, `expires`, `signer`, `signature` and the rules file
//! as the string `rules`. The Ed25519 signature covers the format name, the version, the
//! expiry and the rules text together, so none of them can be changed or moved to another
//! file alone. A node takes a file only when the signature is the configured publisher's,
//! the version is higher than the one in force (or the same file again), the expiry is later
//! than now and no earlier than the one in force: an older signed file cannot be served
//! again (rollback) and an expired one cannot be replayed.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use super::rules::{self, Rules};

pub const FORMAT: &str = "poort-rules-feed-1";

/// A feed file is at most this long.
pub const MAX_SIZE: usize = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: String,
    version: u64,
    expires: String,
    signer: String,
    signature: String,
    rules: String,
}

/// What the signature covers: nothing in it can be swapped for a part of another file.
fn message(version: u64, expires: i64, rules: &str) -> Vec<u8> {
    let mut m = format!("{FORMAT}\n{version}\n{expires}\n").into_bytes();
    m.extend_from_slice(rules.as_bytes());
    m
}

/// A feed file of `rules` (a rules file's text) as `version`, valid until `expires`.
pub fn write(key: &Ed25519KeyPair, version: u64, expires: i64, rules: &str) -> String {
    let signature = key.sign(&message(version, expires, rules));
    let file = File {
        format: FORMAT.into(),
        version,
        expires: crate::clock::format_utc(expires),
        signer: STANDARD.encode(key.public_key().as_ref()),
        signature: STANDARD.encode(signature.as_ref()),
        rules: rules.to_string(),
    };
    let body = toml::to_string(&file).unwrap_or_default();
    format!(
        "# A poort mitigation feed, written by `poort rules publish`: change the rules file and publish\n# again (an edit here breaks the signature).\n{body}"
    )
}

/// A feed file whose signature is good.
#[derive(Debug, Clone)]
pub struct Opened {
    pub version: u64,
    pub expires: i64,
    pub rules: Rules,
    pub sha256: String,
}

/// The version a feed file says it is, without checking it (for `poort rules publish`, to
/// number the next one).
pub fn version_of(bytes: &[u8]) -> Option<u64> {
    toml::from_str::<File>(std::str::from_utf8(bytes).ok()?).ok().map(|f| f.version)
}

/// Checks a feed file against the publisher's key and compiles its rules; `Err` says why it
/// cannot be used.
pub fn open(bytes: &[u8], public_key: &[u8]) -> Result<Opened, String> {
    if bytes.len() > MAX_SIZE {
        return Err(format!("longer than {MAX_SIZE} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let file: File = toml::from_str(text).map_err(|e| format!("not a feed file: {}", e.message()))?;
    if file.format != FORMAT {
        return Err(format!("format {:?} is not {FORMAT:?}", file.format));
    }
    let expires = humantime::parse_rfc3339(&file.expires)
        .map_err(|_| format!("expires {:?} is not a time", file.expires))?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let trusted = STANDARD.encode(public_key);
    if file.signer.trim() != trusted {
        return Err(format!(
            "signed by {}, but this gateway takes feeds signed by {trusted} (hint: [mitigate] feed_public_key)",
            file.signer.trim()
        ));
    }
    let signature = STANDARD.decode(file.signature.trim()).map_err(|_| "the signature is not base64".to_string())?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&message(file.version, expires, &file.rules), &signature)
        .map_err(|_| "the signature does not match the file: it was changed after it was signed".to_string())?;
    let mut rules = rules::compile(&file.rules).map_err(|p| p.join("; "))?;
    // The signed header decides; a version or expiry inside the rules text is not used.
    rules.version = Some(file.version);
    rules.expires = Some(expires);
    let sha256 = crate::secret::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    Ok(Opened { version: file.version, expires, rules, sha256 })
}

/// The feed file in force, as the gateway keeps it in its database: a node that starts while
/// the feed cannot be reached applies it again, and no node goes back to an older version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub version: u64,
    pub expires: i64,
    pub sha256: String,
    pub text: String,
}

/// Whether `new` may replace the feed file `old` in force at `now`: `Ok(false)` when it is the
/// same file again.
pub fn follows(new: &Opened, old: Option<&Record>, now: i64) -> Result<bool, String> {
    if let Some(old) = old {
        if new.sha256 == old.sha256 {
            return Ok(false);
        }
        if new.version <= old.version {
            return Err(format!(
                "version {} does not follow version {} in force: an older or reused version is refused (rollback)",
                new.version, old.version
            ));
        }
        if new.expires < old.expires {
            return Err(format!(
                "it expires at {}, before the file in force ({}): an expiry never goes back",
                crate::clock::format_utc(new.expires),
                crate::clock::format_utc(old.expires)
            ));
        }
    }
    if new.expires <= now {
        return Err(format!("it expired at {} (replay of an old file)", crate::clock::format_utc(new.expires)));
    }
    Ok(true)
}

/// What one poll of the feed brought.
#[derive(Debug)]
pub enum Fetched {
    /// 304: the file with the ETag sent is still the one served.
    NotModified,
    Body {
        bytes: Vec<u8>,
        etag: Option<String>,
    },
}

/// Gets the feed, sending the ETag of the last answer; gives up after `limit`.
pub async fn fetch(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    etag: Option<&str>,
    limit: Duration,
) -> Result<Fetched, String> {
    let mut req = http::Request::get(url)
        .header(http::header::USER_AGENT, concat!("poort/", env!("CARGO_PKG_VERSION")))
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    if let Some(tag) = etag.and_then(|t| http::HeaderValue::from_str(t).ok()) {
        req.headers_mut().insert(http::header::IF_NONE_MATCH, tag);
    }
    let resp = tokio::time::timeout(limit, crate::tls_client::exchange(req, tls, MAX_SIZE))
        .await
        .map_err(|_| format!("no answer within {} s", limit.as_secs()))??;
    match resp.status() {
        http::StatusCode::NOT_MODIFIED => Ok(Fetched::NotModified),
        http::StatusCode::OK => {
            let etag = resp.headers().get(http::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
            Ok(Fetched::Body { bytes: resp.into_body(), etag })
        }
        other => Err(format!("the server answered {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap()
    }

    const RULES: &str =
        "[[rule]]\nid = \"CVE-2019-19781\"\npath_glob = \"/vpns/**\"\naction = \"deny\"\nreason = \"x\"\n";

    #[test]
    fn a_published_file_opens_with_its_key_and_no_other() {
        let (k, other) = (key(), key());
        let text = write(&k, 3, 2_000_000_000, RULES);
        let opened = open(text.as_bytes(), k.public_key().as_ref()).unwrap();
        assert_eq!((opened.version, opened.expires, opened.rules.rules.len()), (3, 2_000_000_000, 1));
        let why = open(text.as_bytes(), other.public_key().as_ref()).unwrap_err();
        assert!(why.contains("signed by"), "{why}");
    }

    #[test]
    fn no_signed_part_can_be_changed() {
        let k = key();
        let text = write(&k, 3, 2_000_000_000, RULES);
        for (from, to) in
            [("version = 3", "version = 9"), ("2033-05-18T03:33:20Z", "2099-05-18T03:33:20Z"), ("/vpns/**", "/vpnx/**")]
        {
            assert!(text.contains(from), "{from} in {text}");
            let changed = text.replace(from, to);
            let why = open(changed.as_bytes(), k.public_key().as_ref()).unwrap_err();
            assert!(why.contains("changed after it was signed"), "{from}: {why}");
        }
    }

    #[test]
    fn only_a_newer_unexpired_file_follows() {
        let k = key();
        let now = 1_900_000_000;
        let record = |v: u64, e: i64| {
            let text = write(&k, v, e, RULES);
            let o = open(text.as_bytes(), k.public_key().as_ref()).unwrap();
            (Record { version: v, expires: e, sha256: o.sha256.clone(), text }, o)
        };
        let (old, old_opened) = record(5, now + 100);
        assert_eq!(follows(&old_opened, Some(&old), now), Ok(false));
        assert!(follows(&record(6, now + 100).1, Some(&old), now).unwrap());
        assert!(follows(&record(4, now + 200).1, Some(&old), now).unwrap_err().contains("rollback"));
        assert!(follows(&record(5, now + 200).1, Some(&old), now).unwrap_err().contains("rollback"));
        assert!(follows(&record(6, now + 50).1, Some(&old), now).unwrap_err().contains("never goes back"));
        assert!(follows(&record(1, now - 1).1, None, now).unwrap_err().contains("expired"));
    }
}

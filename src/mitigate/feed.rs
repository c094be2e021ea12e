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

/// Why a feed file was refused: `class` names the kind of refusal (a node reports each kind
/// once until it takes a file), `why` says it in words, in at most a few hundred printable
/// characters whatever the file held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub class: &'static str,
    pub why: String,
}

impl Refusal {
    fn new(class: &'static str, why: impl AsRef<str>) -> Refusal {
        Refusal { class, why: printable(why.as_ref(), 300) }
    }
}

/// `s` with control characters escaped (a terminal or a log line shows them as text) and cut
/// at `max` characters.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A feed file whose signature is good.
#[derive(Debug, Clone)]
pub struct Opened {
    pub version: u64,
    pub expires: i64,
    pub rules: Rules,
    pub sha256: String,
}

/// The rules text a feed file carries, if it is one (unchecked: for `poort rules test`).
pub fn rules_text_of(text: &str) -> Option<String> {
    toml::from_str::<File>(text).ok().map(|f| f.rules)
}

/// The version and expiry a feed file says it has, without checking it (for `poort rules
/// publish`, to follow it).
pub fn header_of(bytes: &[u8]) -> Option<(u64, i64)> {
    let f = toml::from_str::<File>(std::str::from_utf8(bytes).ok()?).ok()?;
    let expires = humantime::parse_rfc3339(&f.expires).ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some((f.version, expires.as_secs() as i64))
}

/// Checks a feed file against the publisher's key and compiles its rules; `Err` says why it
/// cannot be used.
pub fn open(bytes: &[u8], public_key: &[u8]) -> Result<Opened, Refusal> {
    let format = |why: String| Refusal::new("format", why);
    if bytes.len() > MAX_SIZE {
        return Err(format(format!("longer than {MAX_SIZE} bytes")));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| format("not UTF-8".into()))?;
    let file: File = toml::from_str(text).map_err(|e| format(format!("not a feed file: {}", e.message())))?;
    if file.format != FORMAT {
        return Err(format(format!("format {:?} is not {FORMAT:?}", file.format)));
    }
    let expires = humantime::parse_rfc3339(&file.expires)
        .map_err(|_| format(format!("expires {:?} is not a time", file.expires)))?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let trusted = STANDARD.encode(public_key);
    if file.signer.trim() != trusted {
        return Err(Refusal::new(
            "signer",
            format!(
                "signed by {}, but this gateway takes feeds signed by {trusted} (hint: [mitigate] feed_public_key)",
                printable(file.signer.trim(), 60)
            ),
        ));
    }
    let bad_signature =
        || Refusal::new("signature", "the signature does not match the file: it was changed after it was signed");
    let signature = STANDARD.decode(file.signature.trim()).map_err(|_| bad_signature())?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&message(file.version, expires, &file.rules), &signature)
        .map_err(|_| bad_signature())?;
    let mut rules = rules::compile(&file.rules).map_err(|p| Refusal::new("rules", p.join("; ")))?;
    // The publisher's rules are named apart from the operator's: a feed rule with a local
    // rule's id shares neither its counts nor its throttle.
    for r in &mut rules.rules {
        r.id = format!("feed:{}", r.id);
    }
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

/// Where the gateway keeps the feed file in force.
const SETTING: &str = "rules_feed";

/// The feed file in force, as kept in the database.
pub fn kept(conn: &crate::db::Conn) -> crate::db::Result<Option<Record>> {
    Ok(crate::store::Store::setting(conn, SETTING)?.and_then(|v| serde_json::from_str(&v).ok()))
}

/// Keeps `record` as the feed file in force, unless a node kept a newer one already.
pub fn keep(conn: &crate::db::Conn, record: &Record) -> crate::db::Result<()> {
    if kept(conn)?.is_some_and(|r| r.version > record.version) {
        return Ok(());
    }
    let text = serde_json::to_string(record).map_err(|e| crate::db::Error::Value(e.to_string()))?;
    crate::store::Store::put_setting(conn, SETTING, &text)
}

/// Whether `new` may replace the feed file `old` in force at `now`: `Ok(false)` when it is the
/// same file again.
pub fn follows(new: &Opened, old: Option<&Record>, now: i64) -> Result<bool, Refusal> {
    if let Some(old) = old {
        if new.sha256 == old.sha256 {
            return Ok(false);
        }
        if new.version == old.version {
            let why = format!(
                "version {} was taken already, with other content: a version number is used once (hint: the publisher publishes again with a higher --version)",
                new.version
            );
            return Err(Refusal::new("reused", why));
        }
        if new.version < old.version {
            return Err(Refusal::new(
                "rollback",
                format!(
                    "version {} does not follow version {} in force: an older or reused version is refused (rollback)",
                    new.version, old.version
                ),
            ));
        }
        if new.expires < old.expires {
            return Err(Refusal::new(
                "expiry",
                format!(
                    "it expires at {}, before the file in force ({}): an expiry never goes back",
                    crate::clock::format_utc(new.expires),
                    crate::clock::format_utc(old.expires)
                ),
            ));
        }
    }
    if new.expires <= now {
        let why = format!("it expired at {} (replay of an old file)", crate::clock::format_utc(new.expires));
        return Err(Refusal::new("expired", why));
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
        // Only an answer to the ETag sent: a 304 to a request that named no file would keep
        // a node from ever getting one while it looks up to date.
        http::StatusCode::NOT_MODIFIED if etag.is_some() => Ok(Fetched::NotModified),
        http::StatusCode::OK => {
            let etag = resp.headers().get(http::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
            Ok(Fetched::Body { bytes: resp.into_body(), etag })
        }
        other => Err(format!(
            "the server answered {other}{}",
            if other.is_redirection() { " (redirects are not followed)" } else { "" }
        )),
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
        assert_eq!(why.class, "signer", "{why:?}");
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
            assert_eq!(why.class, "signature", "{from}: {why:?}");
        }
    }

    #[test]
    fn a_reason_is_printable_and_short_whatever_the_file_held() {
        let k = key();
        let text = write(&k, 1, 2_000_000_000, RULES)
            .replace(&STANDARD.encode(k.public_key().as_ref()), &format!("\\u001b[2K\\r{}", "A".repeat(5000)));
        let why = open(text.as_bytes(), k.public_key().as_ref()).unwrap_err();
        assert_eq!(why.class, "signer");
        assert!(!why.why.chars().any(char::is_control) && why.why.len() < 400, "{why:?}");
        let opened = open(write(&k, 1, 2_000_000_000, RULES).as_bytes(), k.public_key().as_ref()).unwrap();
        assert_eq!(opened.rules.rules[0].id, "feed:CVE-2019-19781", "named apart from local rules");
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
        let class = |v: u64, e: i64, old: Option<&Record>| follows(&record(v, e).1, old, now).unwrap_err().class;
        assert_eq!(class(4, now + 200, Some(&old)), "rollback");
        assert_eq!(class(5, now + 200, Some(&old)), "reused");
        assert_eq!(class(6, now + 50, Some(&old)), "expiry");
        assert_eq!(class(1, now - 1, None), "expired");
    }
}

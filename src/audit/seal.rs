//! Forward-secure sealing of the audit log.
//!
//! The hash chain alone proves only that the records fit together: someone who can write to
//! the database can change a record and compute every later hash again. Sealing adds a key
//! the intruder cannot have for the past. At `poort audit seal-init` the gateway draws a
//! random key K0, prints it once as the verification key (for the operator to keep off the
//! machine), and keeps only the sealing key on disk. Every `seal_interval` the gateway appends
//! a seal record: an HMAC, under the current key K(g), of the chain's head (its sequence number
//! and hash), the time and the generation g. It then replaces the key on disk by
//! K(g+1) = SHA-256(label, K(g)) and so erases K(g). Someone with root at generation g finds
//! K(g) and nothing older: the hash cannot be run backwards, so the seals already written
//! cannot be made again for a changed log.
//!
//! K0 itself never reaches the disk: the key file starts at K(1). The key is held in one place
//! in memory and wiped when it moves on; so are the buffers it passes through, and the stack
//! the MAC was computed on, so that a look at the process's memory finds only the current key.
//!
//! With K0, `poort audit verify --verification-key` derives every K(g) and checks each seal,
//! the order of the generations (a seal taken out leaves a gap) and, against the key file, that
//! no seal is missing at the end (a log cut short after its last seal). Records after the last
//! seal are reported as not yet sealed: that window, at most one interval, is what an intruder
//! can change unseen.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ring::{digest, hmac};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::Event;

const EVOLVE: &[u8] = b"poort-audit-seal-evolve-1";
const ID: &[u8] = b"poort-audit-seal-id-1";
const MAC: &[u8] = b"poort-audit-seal-1";
/// How a verification key starts, so that it cannot be taken for another key.
const PREFIX: &str = "poort-seal-1-";

/// The sealing key file in a data directory.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit-seal.key")
}

fn evolve(key: &[u8; 32]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(EVOLVE);
    ctx.update(key);
    ctx.finish().as_ref().try_into().expect("invariant: SHA-256 is 32 bytes")
}

/// The name of a key chain: a hash of K0, which tells nothing about any key.
fn id_of(k0: &[u8; 32]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(ID);
    ctx.update(k0);
    crate::secret::hex(&ctx.finish().as_ref()[..8])
}

/// The seal's MAC: every field of the seal record but the MAC itself, length-prefixed.
fn mac(key: &[u8; 32], id: &str, generation: u64, covers: i64, head: &str, at: i64) -> String {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    for part in
        [MAC, id.as_bytes(), &generation.to_be_bytes(), &covers.to_be_bytes(), head.as_bytes(), &at.to_be_bytes()]
    {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    crate::secret::hex(ctx.sign().as_ref())
}

/// The first line of the key file; then the key chain's id, the generation and the key.
const FILE_TAG: &str = "poort-audit-seal-key-1";

/// The sealing key as the gateway holds it: only the current generation, in one place on the
/// heap, wiped when it moves on and when it is dropped.
pub struct SealKey {
    path: PathBuf,
    pub id: String,
    pub generation: u64,
    key: Box<[u8; 32]>,
}

impl Drop for SealKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// Overwrites the stack below the caller, where hash and MAC states of a key were.
#[inline(never)]
fn scrub_stack() {
    let mut room = [0u8; 32 * 1024];
    room.zeroize();
    std::hint::black_box(&room);
}

fn hex_into(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

/// Writes the key file for `key` at `generation` by renaming a new file over the old one.
fn write_key(path: &Path, id: &str, generation: u64, key: &[u8; 32]) -> anyhow::Result<()> {
    let mut text = Zeroizing::new(String::with_capacity(160));
    text.push_str(&format!("{FILE_TAG}\n{id}\n{generation}\n"));
    hex_into(&mut text, key);
    text.push('\n');
    let tmp = path.with_extension("key.next");
    let _ = std::fs::remove_file(&tmp);
    crate::secret::write_private(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Creates the sealing key in `data_dir`; returns the verification key, which is shown once
/// and kept nowhere on the machine (the file starts at the next generation). Refuses to
/// replace a key: that would end the chain of keys the seals already written are checked with.
pub fn init(data_dir: &Path) -> anyhow::Result<String> {
    let path = key_path(data_dir);
    if path.exists() {
        anyhow::bail!(
            "{} exists: the audit log is sealed already (its verification key was shown when it was made)",
            path.display()
        );
    }
    let mut k0: [u8; 32] = crate::secret::random_bytes();
    let mut k1 = evolve(&k0);
    write_key(&path, &id_of(&k0), 1, &k1)?;
    let shown = format!("{PREFIX}{}", crate::secret::hex(&k0));
    k0.zeroize();
    k1.zeroize();
    Ok(shown)
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl SealKey {
    /// The key in `data_dir`, if the log is sealed.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<SealKey>> {
        let path = key_path(data_dir);
        let bytes = match crate::secret::read_regular(&path, 4096) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let damaged = || anyhow::anyhow!("{} is damaged", path.display());
        let text = std::str::from_utf8(&bytes).map_err(|_| damaged())?;
        let mut lines = text.lines();
        if lines.next() != Some(FILE_TAG) {
            return Err(damaged());
        }
        let id = lines.next().ok_or_else(damaged)?.to_string();
        let generation: u64 = lines.next().and_then(|g| g.parse().ok()).ok_or_else(damaged)?;
        let mut key = Box::new([0u8; 32]);
        let mut raw = lines.next().and_then(unhex32).ok_or_else(damaged)?;
        key.copy_from_slice(&raw);
        raw.zeroize();
        Ok(Some(SealKey { path, id, generation, key }))
    }

    /// The seal record for a chain whose last record is `covers` with hash `head`, at `at`.
    pub fn seal(&self, covers: i64, head: &[u8], at: i64) -> Event {
        let head = crate::secret::hex(head);
        let mac = mac(&self.key, &self.id, self.generation, covers, &head, at);
        scrub_stack();
        Event::AuditSealed { key: self.id.clone(), generation: self.generation, covers, head, mac }
    }

    /// Moves to the next generation and erases this one's key: in memory, where it is
    /// overwritten, and on disk, where the new file replaces the old by a rename.
    pub fn evolve(&mut self) -> anyhow::Result<()> {
        let generation = self.generation.checked_add(1).context("the sealing key's generation cannot go higher")?;
        let mut next = evolve(&self.key);
        let written = write_key(&self.path, &self.id, generation, &next);
        if written.is_ok() {
            self.key.copy_from_slice(&next);
            self.generation = generation;
        }
        next.zeroize();
        scrub_stack();
        written
    }
}

/// A verification key, given to `poort audit verify`.
#[derive(Clone)]
pub struct Verifier {
    pub id: String,
    k0: [u8; 32],
}

impl Verifier {
    pub fn parse(text: &str) -> anyhow::Result<Verifier> {
        let k0 = text
            .trim()
            .strip_prefix(PREFIX)
            .and_then(unhex32)
            .with_context(|| format!("not a verification key (it starts with {PREFIX} and has 64 hex digits)"))?;
        Ok(Verifier { id: id_of(&k0), k0 })
    }

    fn key_at(&self, generation: u64, cache: &mut (u64, [u8; 32])) -> [u8; 32] {
        if cache.0 > generation {
            *cache = (0, self.k0);
        }
        while cache.0 < generation {
            cache.1 = evolve(&cache.1);
            cache.0 += 1;
        }
        cache.1
    }
}

#[derive(Deserialize)]
struct SealFields {
    key: String,
    generation: u64,
    covers: i64,
    head: String,
    mac: String,
}

/// What the seals of one key chain prove about the log.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Sealing {
    /// The key chain's id.
    pub key: String,
    /// Good seals found.
    pub seals: u64,
    /// The last record a good seal covers, the seal's generation and time: every record up to
    /// it is as it was when sealed.
    pub sealed_through: Option<(i64, u64, i64)>,
    /// The first thing that does not hold, with the last good seal before it.
    pub problem: Option<String>,
}

/// Checks seal records one by one as the chain is walked.
pub struct Checker {
    keys: Vec<Verifier>,
    caches: HashMap<String, (u64, [u8; 32])>,
    pub found: HashMap<String, Sealing>,
    /// Seals by keys not given.
    pub others: u64,
    /// Per key: how many times its last generation sealed.
    repeats: HashMap<String, u32>,
}

impl Checker {
    pub fn new(keys: Vec<Verifier>) -> Checker {
        let found = keys.iter().map(|k| (k.id.clone(), Sealing { key: k.id.clone(), ..Sealing::default() })).collect();
        let caches = keys.iter().map(|k| (k.id.clone(), (0, k.k0))).collect();
        Checker { caches, keys, found, others: 0, repeats: HashMap::new() }
    }

    /// A record of the chain, in order, with the hash of the record before it: checks it if it
    /// is a seal.
    pub fn record(&mut self, seq: i64, at: i64, kind: &str, detail: &str, prev: &[u8]) {
        if kind != "audit_sealed" {
            return;
        }
        let Ok(f) = serde_json::from_str::<SealFields>(detail) else {
            for s in self.found.values_mut().filter(|s| s.problem.is_none()) {
                s.problem = Some(format!("record {seq} is a seal that cannot be read: it was changed"));
            }
            return;
        };
        let Some(v) = self.keys.iter().find(|k| k.id == f.key) else {
            self.others += 1;
            return;
        };
        let cache = self.caches.get_mut(&v.id).expect("invariant: a cache per key");
        let s = self.found.get_mut(&v.id).expect("invariant: a result per key");
        if s.problem.is_some() {
            return;
        }
        let since = match s.sealed_through {
            Some((through, g, _)) => format!("after record {through} (sealed by generation {g})"),
            None => "before the first seal".to_string(),
        };
        // The order first, so that no key is derived for a generation out of reach. After a
        // crash between writing a seal and moving to the next key, a generation can seal a
        // second time; more often means the key stopped moving on.
        let expected = s.sealed_through.map_or(1, |(_, g, _)| g + 1);
        let repeats = self.repeats.entry(v.id.clone()).or_default();
        if s.sealed_through.is_some() && f.generation + 1 == expected {
            *repeats += 1;
            if *repeats > 1 {
                s.problem = Some(format!(
                    "generation {} sealed again at record {seq}: the sealing key stopped moving on, so whoever holds it can rewrite what it sealed, {since}",
                    f.generation
                ));
                return;
            }
        } else if f.generation != expected {
            s.problem = Some(format!(
                "seal generations {expected} to {} are missing: records {since} up to record {seq} were removed or rewritten together with their seals",
                f.generation.saturating_sub(1)
            ));
            return;
        } else {
            *repeats = 0;
        }
        let key = v.key_at(f.generation, cache);
        if mac(&key, &f.key, f.generation, f.covers, &f.head, at) != f.mac {
            s.problem = Some(format!(
                "the seal at record {seq} is not genuine: it was made or changed without the sealing key of generation {}; the log is proven only up to what the seal before it covers, {since}",
                f.generation
            ));
            return;
        }
        if f.covers != seq - 1 || f.head != crate::secret::hex(prev) {
            s.problem = Some(format!(
                "records {since} up to record {} were changed after they were sealed (the seal at record {seq}, generation {}, was made over other records)",
                f.covers, f.generation
            ));
            return;
        }
        s.seals += 1;
        s.sealed_through = Some((f.covers, f.generation, at));
    }

    /// After the walk: the key file on this machine must be the generation after the last
    /// seal. A later one means seals (and the records before them) were cut from the end.
    /// False when the key is none of the verification keys'.
    pub fn against_key_file(&mut self, current: &SealKey) -> bool {
        let Some(v) = self.keys.iter().find(|k| k.id == current.id).cloned() else { return false };
        let s = self.found.get_mut(&v.id).expect("invariant: a result per key");
        if s.problem.is_some() {
            return true;
        }
        let last = s.sealed_through.map(|(_, g, _)| g);
        let expected = last.map_or(1, |g| g + 1);
        // Far beyond any seal: not derived (that could take for ever), and wrong anyway.
        if current.generation > expected.saturating_add(10_000_000) {
            s.problem = Some(format!(
                "the sealing key on this machine says generation {}, beyond any seal in the log: it was replaced",
                current.generation
            ));
            return true;
        }
        let mut cache = (0, v.k0);
        if v.key_at(current.generation, &mut cache) != *current.key {
            s.problem = Some(format!(
                "the sealing key on this machine is not generation {} of this verification key: it was replaced",
                current.generation
            ));
            return true;
        }
        if current.generation > expected {
            let through = s.sealed_through.map_or("the start".to_string(), |(seq, _, _)| format!("record {seq}"));
            s.problem = Some(format!(
                "the sealing key is at generation {}, but the last seal in the log is {}: seals {} to {} and the records they covered were cut from the end, after {through}",
                current.generation,
                last.map_or("none".to_string(), |g| g.to_string()),
                expected,
                current.generation - 1
            ));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_key_cannot_be_had_from_a_newer_one_but_every_key_from_the_first() {
        let k0 = [7u8; 32];
        let v = Verifier { id: id_of(&k0), k0 };
        let (k1, k2) = (evolve(&k0), evolve(&evolve(&k0)));
        let mut cache = (0, k0);
        assert_eq!(v.key_at(2, &mut cache), k2);
        assert_eq!(v.key_at(1, &mut cache), k1, "going back starts again from K0");
        assert_ne!(evolve(&k2), k1);
        assert_ne!(mac(&k1, "id", 1, 5, "h", 9), mac(&k2, "id", 1, 5, "h", 9));
        assert_ne!(mac(&k1, "id", 1, 5, "h", 9), mac(&k1, "id", 1, 6, "h", 9));
    }

    #[test]
    fn a_key_file_far_beyond_the_seals_is_refused_without_deriving_its_key() {
        let k0 = [7u8; 32];
        let mut c = Checker::new(vec![Verifier { id: id_of(&k0), k0 }]);
        let key = SealKey { path: PathBuf::new(), id: id_of(&k0), generation: u64::MAX, key: Box::new([0; 32]) };
        assert!(c.against_key_file(&key));
        assert!(c.found[&id_of(&k0)].problem.as_deref().unwrap().contains("beyond any seal"));
    }

    #[test]
    fn a_verification_key_round_trips_and_nothing_else_parses() {
        let k0 = [0xabu8; 32];
        let text = format!("{PREFIX}{}", crate::secret::hex(&k0));
        assert_eq!(Verifier::parse(&text).unwrap().id, id_of(&k0));
        assert!(Verifier::parse(&crate::secret::hex(&k0)).is_err());
        assert!(Verifier::parse(&format!("{PREFIX}zz")).is_err());
    }
}

//! Emergency mitigation: operator rules applied to every request before the session lookup
//! (deny, throttle or log), reloaded within a second when the file changes or on SIGHUP, and
//! the lockdown switch. A new rules file is checked completely (and its signature, when the
//! config requires one) before it replaces the old rules; a bad one changes nothing and says
//! why in the log and in `poort rules status`. A file is read only once it has stopped
//! changing, a signed file never goes back to a lower `version`, and a file with no rules does
//! not replace rules unless it says `rule = []`. A signed feed (`feed`) adds the rules of a
//! publisher's file, polled over https, after the local ones.

pub mod feed;
pub mod rules;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use parking_lot::{Mutex, RwLock};
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

pub use rules::{Action, Facts, Rules};

/// What the mitigation stage decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// A rule matched and said to log; the request goes on.
    Logged {
        rule: String,
    },
    Deny {
        rule: String,
        reason: String,
    },
    Throttled {
        rule: String,
        reason: String,
    },
}

/// What `poort rules status` shows, written by the gateway next to its database.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub file: Option<String>,
    pub rules: usize,
    pub loaded_at: Option<String>,
    pub sha256: Option<String>,
    #[serde(default)]
    pub version: Option<u64>,
    /// Why the newest file was refused; the rules above stay in force.
    pub last_error: Option<String>,
    pub hits: HashMap<String, u64>,
    #[serde(default)]
    pub feed: Option<FeedStatus>,
}

/// The feed's part of `poort rules status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FeedStatus {
    pub url: String,
    /// The publisher's key the gateway takes (base64).
    pub signer: String,
    pub version: Option<u64>,
    pub sha256: Option<String>,
    pub expires: Option<String>,
    pub rules: usize,
    /// When the file in force was applied.
    pub applied_at: Option<String>,
    /// The last time the feed answered (a new file or "not modified").
    pub fetched_at: Option<String>,
    pub next_check: Option<String>,
    /// Why the newest file served was refused; the file in force stays.
    pub refused: Option<String>,
    /// Why the last poll got no answer, and since when that is so.
    pub unreachable: Option<String>,
    pub unreachable_since: Option<String>,
}

/// What the gateway keeps in its database about the rules it applied: the local file's
/// version and digest, and the feed file in force.
#[derive(Debug, Clone, Default)]
pub struct Remembered {
    pub applied: Option<Applied>,
    pub feed: Option<feed::Record>,
}

/// What taking a feed file came to.
#[derive(Debug, Clone)]
pub enum FeedOutcome {
    Unchanged,
    Loaded {
        url: String,
        record: feed::Record,
        rules: usize,
    },
    /// A new file was refused; the one in force stays.
    Refused {
        url: String,
        why: String,
    },
    /// Refused for a kind of reason reported already since a file was last taken: shown in
    /// the status, not reported again.
    Ignored {
        why: String,
    },
}

/// The feed a gateway polls, and the file of it in force.
struct FeedSource {
    cfg: crate::config::Feed,
    tls: Arc<rustls::ClientConfig>,
    record: Option<feed::Record>,
    rules: Arc<Rules>,
    etag: Option<String>,
    /// The kinds of refusal reported since a file was last taken: each is reported once, so
    /// that a server sending a new bad file at every poll cannot flood the audit log.
    told: std::collections::HashSet<&'static str>,
}

/// Reads, verifies and checks a rules file: `Err` lists every problem. A signed file must
/// carry a `version`, and is refused after its `expires`.
pub fn load_file(path: &Path, public_key: Option<&[u8]>, now: i64) -> Result<(Rules, String), Vec<String>> {
    // A regular file of at most 4 MiB: a FIFO or an endless file must not stall the gateway.
    let bytes = crate::secret::read_regular(path, 4 << 20)
        .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
    if let Some(key) = public_key {
        let sig_path = signature_path(path);
        let sig = crate::secret::read_regular(&sig_path, 4096)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| vec![format!("{}: signature required but cannot be read: {e}", sig_path.display())])?;
        let sig = STANDARD.decode(sig.trim()).map_err(|_| vec![format!("{}: not base64", sig_path.display())])?;
        UnparsedPublicKey::new(&ED25519, key).verify(&bytes, &sig).map_err(|_| {
            vec![format!("{}: the signature does not match the file and the configured key", sig_path.display())]
        })?;
    }
    let text = String::from_utf8(bytes.clone()).map_err(|_| vec![format!("{}: not UTF-8", path.display())])?;
    let rules = rules::compile(&text)?;
    if public_key.is_some() && rules.version.is_none() {
        return Err(vec![format!(
            "{}: a signed rules file needs a version (hint: version = 1 at the top, one higher in every new file)",
            path.display()
        )]);
    }
    if let Some(t) = rules.expires.filter(|t| *t <= now) {
        return Err(vec![format!("{}: expired at {}", path.display(), crate::clock::format_utc(t))]);
    }
    Ok((rules, crate::secret::hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())))
}

/// The rules file in force: its version (if it gives one) and digest. The gateway keeps it in
/// its database, so that a restart does not accept a file older than the one applied before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub version: Option<u64>,
    pub sha256: String,
}

/// What a look at the rules file came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Nothing new, or the file is still being written.
    Unchanged,
    Loaded {
        file: String,
        applied: Applied,
        rules: usize,
    },
    /// The file was refused; the rules in force stay.
    Refused {
        file: String,
        why: String,
    },
}

/// Where the detached signature of a rules file lives.
pub fn signature_path(rules: &Path) -> PathBuf {
    let mut p = rules.as_os_str().to_owned();
    p.push(".sig");
    PathBuf::from(p)
}

/// How long a changed rules file must stay the same before it is read.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

pub struct Mitigation {
    file: Option<PathBuf>,
    public_key: Option<Vec<u8>>,
    status_path: PathBuf,
    /// The rules in force: the local file's, then the feed's.
    rules: RwLock<Arc<Rules>>,
    /// The local file's rules.
    local: RwLock<Arc<Rules>>,
    feed: Option<Mutex<FeedSource>>,
    /// The file in force.
    applied: Mutex<Option<Applied>>,
    /// Stamps of the rules file and its signature when last read, and a newer stamp with when
    /// it was first seen, waiting for the file to stay unchanged for `SETTLE` before it is read.
    seen: Mutex<(Stamp, Option<(Stamp, std::time::Instant)>)>,
    throttles: Mutex<HashMap<String, governor::DefaultKeyedRateLimiter<IpAddr>>>,
    status: Mutex<Status>,
    lockdown_config: bool,
    lockdown_switch: AtomicBool,
    pub admin_group: String,
    /// Whether this engine is the one in force, and so writes `rules-status.json` (one a
    /// reload prepares does not, until it is put in force).
    publishes: AtomicBool,
}

impl std::fmt::Debug for Mitigation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mitigation")
    }
}

type Stamp = [Option<(SystemTime, u64)>; 2];

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// A change to either the rules or their signature (a re-signed bundle) triggers a reload.
fn stamp(path: &Path) -> Stamp {
    [file_stamp(path), file_stamp(&signature_path(path))]
}

impl Mitigation {
    /// Loads the rules named by the config; `remembered` is what the gateway applied last
    /// (from its database), and its feed file is put in force again. At start-up a bad file is an error: poort does not start without
    /// the mitigations the operator asked for.
    pub fn start(
        cfg: &crate::config::Mitigate,
        data_dir: &Path,
        remembered: Remembered,
        now: i64,
    ) -> anyhow::Result<(Mitigation, Reload)> {
        Mitigation::prepare(cfg, data_dir, remembered, now, true)
    }

    /// As `start`, for a reload: the engine writes no status until `publish`.
    pub fn staged(
        cfg: &crate::config::Mitigate,
        data_dir: &Path,
        remembered: Remembered,
        now: i64,
    ) -> anyhow::Result<(Mitigation, Reload)> {
        Mitigation::prepare(cfg, data_dir, remembered, now, false)
    }

    /// Puts a staged engine's status in `rules-status.json`: it is the one in force now.
    pub fn publish(&self) {
        self.publishes.store(true, Ordering::Relaxed);
        self.write_status();
    }

    /// How many rules are in force.
    /// What `poort rules status` shows: the file in force, its hits, why a newer one was refused.
    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// The rules in force, in order: (id, what it does, why).
    pub fn rule_list(&self) -> Vec<(String, String, String)> {
        let rules = self.rules.read().clone();
        rules
            .rules
            .iter()
            .map(|r| {
                let action = match r.action {
                    Action::Deny => "deny".to_string(),
                    Action::Throttle { count, per_secs } => format!("throttle to {count} per {per_secs} s per address"),
                    Action::Log => "log".to_string(),
                };
                (r.id.clone(), action, r.reason.clone())
            })
            .collect()
    }

    pub fn rule_count(&self) -> usize {
        self.rules.read().rules.len()
    }

    fn prepare(
        cfg: &crate::config::Mitigate,
        data_dir: &Path,
        remembered: Remembered,
        now: i64,
        publish: bool,
    ) -> anyhow::Result<(Mitigation, Reload)> {
        let feed = match &cfg.feed {
            None => None,
            Some(f) => {
                let tls = crate::tls_client::config(&f.trust, None, &[b"http/1.1"])
                    .map_err(|e| anyhow::anyhow!("mitigate.feed_ca_file: {e:#}"))?;
                Some(Mutex::new(FeedSource {
                    cfg: f.clone(),
                    tls,
                    record: None,
                    rules: Arc::new(Rules::default()),
                    etag: None,
                    told: Default::default(),
                }))
            }
        };
        let m = Mitigation {
            file: cfg.rules_file.clone(),
            public_key: cfg.public_key.clone(),
            status_path: data_dir.join("rules-status.json"),
            rules: RwLock::new(Arc::new(Rules::default())),
            local: RwLock::new(Arc::new(Rules::default())),
            feed,
            applied: Mutex::new(remembered.applied),
            seen: Mutex::new(([None, None], None)),
            throttles: Mutex::new(HashMap::new()),
            status: Mutex::new(Status::default()),
            lockdown_config: cfg.lockdown,
            lockdown_switch: AtomicBool::new(false),
            admin_group: cfg.admin_group.clone(),
            publishes: AtomicBool::new(publish),
        };
        if let Some(record) = remembered.feed {
            m.adopt_feed(record, now);
        }
        let mut first = m.reload(now);
        // A file being written at this moment: wait for it to settle (at most five seconds).
        for _ in 0..50 {
            if m.file.is_none() || first != Reload::Unchanged {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            first = m.reload(now);
        }
        match &first {
            Reload::Refused { why, .. } => anyhow::bail!("the mitigation rules cannot be loaded: {why}"),
            Reload::Unchanged if m.file.is_some() => anyhow::bail!("the mitigation rules file does not stop changing"),
            _ => Ok((m, first)),
        }
    }

    /// Whether `rules` (with `digest`) may replace the rules in force.
    fn acceptable(&self, rules: &Rules, digest: &str) -> Result<(), String> {
        let applied = self.applied.lock().clone();
        if let (Some(new), Some(Applied { version: Some(old), sha256 })) = (rules.version, &applied)
            && (new < *old || (new == *old && digest != sha256))
        {
            return Err(format!(
                "version {new} does not follow version {old} in force (hint: a new file needs a higher version)"
            ));
        }
        if self.public_key.is_some() && rules.version.is_none() {
            return Err("a signed rules file needs a version".into());
        }
        let in_force = self.local.read().rules.len();
        if rules.rules.is_empty() && !rules.explicitly_empty && in_force > 0 {
            return Err(format!(
                "the file has no rules and would replace {in_force} (hint: write rule = [] to remove every rule on purpose; write files elsewhere and rename them into place)"
            ));
        }
        Ok(())
    }

    /// Reads the rules file now; keeps the old rules if the new file is bad.
    pub fn reload(&self, now: i64) -> Reload {
        let Some(path) = &self.file else { return Reload::Unchanged };
        let before = stamp(path);
        let result = load_file(path, self.public_key.as_deref(), now);
        if stamp(path) != before {
            // Written to while it was read: look again once it has settled.
            return Reload::Unchanged;
        }
        *self.seen.lock() = (before, None);
        let file = path.display().to_string();
        let result = result.map_err(|p| p.join("; ")).and_then(|(rules, digest)| {
            self.acceptable(&rules, &digest)?;
            Ok((rules, digest))
        });
        let mut status = self.status.lock();
        status.file = Some(file.clone());
        let outcome = match result {
            Ok((rules, digest)) => {
                tracing::info!(file = %path.display(), rules = rules.rules.len(), version = ?rules.version, "Mitigation rules loaded");
                let applied = Applied { version: rules.version, sha256: digest.clone() };
                let count = rules.rules.len();
                status.rules = count;
                status.sha256 = Some(digest);
                status.version = rules.version;
                status.loaded_at = Some(crate::clock::format_utc(now));
                status.last_error = None;
                *self.local.write() = Arc::new(rules);
                *self.applied.lock() = Some(applied.clone());
                Reload::Loaded { file, applied, rules: count }
            }
            Err(why) => {
                tracing::error!(file = %path.display(), problems = %why, "Mitigation rules refused; the previous rules stay in force");
                status.last_error = Some(why.clone());
                Reload::Refused { file, why }
            }
        };
        drop(status);
        if matches!(outcome, Reload::Loaded { .. }) {
            self.combine();
        }
        self.write_status();
        outcome
    }

    /// Puts the local rules and then the feed's in force. Counts and throttles of rules no
    /// longer there go with them.
    fn combine(&self) {
        let local = self.local.read().clone();
        let feed = self.feed.as_ref().map(|f| f.lock().rules.clone()).unwrap_or_default();
        let rules = Rules {
            rules: local.rules.iter().chain(feed.rules.iter()).cloned().collect(),
            version: local.version,
            expires: local.expires,
            explicitly_empty: local.explicitly_empty,
        };
        self.status.lock().hits.retain(|id, _| rules.rules.iter().any(|r| &r.id == id));
        *self.rules.write() = Arc::new(rules);
        self.throttles.lock().clear();
    }

    /// The feed this gateway polls: its settings, TLS client settings and the ETag of the
    /// last answer.
    pub fn feed(&self) -> Option<(crate::config::Feed, Arc<rustls::ClientConfig>, Option<String>)> {
        let f = self.feed.as_ref()?.lock();
        Some((f.cfg.clone(), f.tls.clone(), f.etag.clone()))
    }

    /// Puts in force a feed file kept in the database, if it is newer than the one in force:
    /// at start (before any poll), and when another node took a newer one. One the configured
    /// key does not open is not used (the publisher's key was changed).
    pub fn adopt_feed(&self, record: feed::Record, now: i64) -> bool {
        let Some(source) = &self.feed else { return false };
        let mut f = source.lock();
        if f.record.as_ref().is_some_and(|r| r.version >= record.version) {
            return false;
        }
        match feed::open(record.text.as_bytes(), &f.cfg.public_key) {
            Ok(opened) => {
                tracing::info!(
                    version = opened.version,
                    rules = opened.rules.rules.len(),
                    "Mitigation feed file from the database in force"
                );
                f.rules = Arc::new(opened.rules);
                f.record = Some(record);
            }
            Err(refusal) => {
                tracing::warn!(problem = %refusal.why, "The feed file kept in the database is not used");
                return false;
            }
        }
        drop(f);
        self.set_feed_status(|s| s.applied_at = Some(crate::clock::format_utc(now)));
        self.combine();
        true
    }

    /// Takes a feed file the server sent (with its ETag), if it follows the one in force.
    pub fn offer_feed(&self, bytes: &[u8], etag: Option<String>, now: i64) -> FeedOutcome {
        let Some(source) = &self.feed else { return FeedOutcome::Unchanged };
        let mut f = source.lock();
        f.etag = etag;
        let url = f.cfg.url.clone();
        let result =
            feed::open(bytes, &f.cfg.public_key).and_then(|o| Ok((feed::follows(&o, f.record.as_ref(), now)?, o)));
        let outcome = match result {
            Ok((false, _)) => FeedOutcome::Unchanged,
            Ok((true, opened)) => {
                let text = String::from_utf8_lossy(bytes).into_owned();
                let record =
                    feed::Record { version: opened.version, expires: opened.expires, sha256: opened.sha256, text };
                let rules = opened.rules.rules.len();
                tracing::info!(url = %url, version = record.version, rules, "Mitigation feed file loaded");
                f.rules = Arc::new(opened.rules);
                f.record = Some(record.clone());
                f.told.clear();
                FeedOutcome::Loaded { url, record, rules }
            }
            Err(refusal) => {
                if f.told.insert(refusal.class) {
                    tracing::error!(url = %url, problem = %refusal.why, "Mitigation feed file refused; the one in force stays");
                    FeedOutcome::Refused { url, why: refusal.why }
                } else {
                    tracing::debug!(url = %url, problem = %refusal.why, "Mitigation feed file refused again");
                    FeedOutcome::Ignored { why: refusal.why }
                }
            }
        };
        drop(f);
        self.set_feed_status(|s| {
            s.fetched_at = Some(crate::clock::format_utc(now));
            s.unreachable = None;
            s.unreachable_since = None;
            match &outcome {
                FeedOutcome::Loaded { .. } => {
                    s.applied_at = Some(crate::clock::format_utc(now));
                    s.refused = None;
                }
                FeedOutcome::Refused { why, .. } | FeedOutcome::Ignored { why } => s.refused = Some(why.clone()),
                // The file in force is the one served again.
                FeedOutcome::Unchanged => s.refused = None,
            }
        });
        if matches!(outcome, FeedOutcome::Loaded { .. }) {
            self.combine();
        }
        outcome
    }

    /// The feed answered that the file is the one it sent last.
    pub fn feed_not_modified(&self, now: i64) {
        self.set_feed_status(|s| {
            s.fetched_at = Some(crate::clock::format_utc(now));
            s.unreachable = None;
            s.unreachable_since = None;
        });
    }

    /// The feed could not be had; the file in force stays. Returns whether it was reachable
    /// until now.
    pub fn feed_unreachable(&self, why: &str, now: i64) -> bool {
        let mut was = false;
        self.set_feed_status(|s| {
            was = s.unreachable.is_none();
            s.unreachable = Some(why.to_string());
            if s.unreachable_since.is_none() {
                s.unreachable_since = Some(crate::clock::format_utc(now));
            }
        });
        was
    }

    /// When the feed is polled next.
    pub fn feed_next_check(&self, at: i64) {
        self.set_feed_status(|s| s.next_check = Some(crate::clock::format_utc(at)));
    }

    /// Brings the feed's part of the status up to date with the file in force, then `change`.
    fn set_feed_status(&self, change: impl FnOnce(&mut FeedStatus)) {
        let Some(source) = &self.feed else { return };
        let f = source.lock();
        let mut status = self.status.lock();
        let s = status.feed.get_or_insert_with(FeedStatus::default);
        s.url = f.cfg.url.clone();
        s.signer = STANDARD.encode(&f.cfg.public_key);
        s.version = f.record.as_ref().map(|r| r.version);
        s.sha256 = f.record.as_ref().map(|r| r.sha256.clone());
        s.expires = f.record.as_ref().map(|r| crate::clock::format_utc(r.expires));
        s.rules = f.rules.rules.len();
        change(s);
        drop(status);
        drop(f);
        self.write_status();
    }

    /// Reloads once the file has changed and then stayed the same for `SETTLE` (an editor or
    /// a copy that truncates and then writes is not read in between, unless it pauses longer
    /// than that; writing elsewhere and renaming the file into place is never read half-way).
    pub fn poll(&self, now: i64) -> Reload {
        let Some(path) = &self.file else { return Reload::Unchanged };
        let current = stamp(path);
        let mut seen = self.seen.lock();
        if current == seen.0 {
            seen.1 = None;
            return Reload::Unchanged;
        }
        match seen.1 {
            Some((pending, since)) if pending == current => {
                if since.elapsed() < SETTLE {
                    return Reload::Unchanged;
                }
            }
            _ => {
                seen.1 = Some((current, crate::clock::instant()));
                return Reload::Unchanged;
            }
        }
        drop(seen);
        self.reload(now)
    }

    pub fn write_status(&self) {
        if !self.publishes.load(Ordering::Relaxed) {
            return;
        }
        let status = self.status.lock().clone();
        if let Ok(json) = serde_json::to_vec_pretty(&status) {
            let tmp = self.status_path.with_extension("json.tmp");
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, &self.status_path);
            }
        }
    }

    /// The mitigation stage for one request.
    pub fn check(&self, facts: &Facts<'_>) -> Verdict {
        let rules = self.rules.read().clone();
        let Some((_, rule)) = rules.check(facts) else { return Verdict::Pass };
        *self.status.lock().hits.entry(rule.id.clone()).or_insert(0) += 1;
        match rule.action {
            Action::Deny => Verdict::Deny { rule: rule.id.clone(), reason: rule.reason.clone() },
            Action::Log => Verdict::Logged { rule: rule.id.clone() },
            Action::Throttle { count, per_secs } => {
                let mut t = self.throttles.lock();
                let limiter = t.entry(rule.id.clone()).or_insert_with(|| {
                    // `count` at once, refilled evenly over `per_secs`.
                    let burst = std::num::NonZeroU32::new(count).unwrap_or(std::num::NonZeroU32::MIN);
                    let period = std::time::Duration::from_secs(u64::from(per_secs)) / count.max(1);
                    let quota = governor::Quota::with_period(period)
                        .unwrap_or(governor::Quota::per_second(std::num::NonZeroU32::MIN))
                        .allow_burst(burst);
                    governor::RateLimiter::keyed(quota)
                });
                if limiter.check_key(&facts.client).is_ok() {
                    Verdict::Pass
                } else {
                    Verdict::Throttled { rule: rule.id.clone(), reason: rule.reason.clone() }
                }
            }
        }
    }

    /// Lockdown is on if the config says so or an operator switched it on.
    pub fn lockdown(&self) -> bool {
        self.lockdown_config || self.lockdown_switch.load(Ordering::Relaxed)
    }

    /// Whether an operator switched lockdown on (`poort lockdown on`).
    pub fn lockdown_switch(&self) -> bool {
        self.lockdown_switch.load(Ordering::Relaxed)
    }

    pub fn set_lockdown_switch(&self, on: bool) {
        if self.lockdown_switch.swap(on, Ordering::Relaxed) != on {
            tracing::warn!(lockdown = on, "Lockdown switched");
        }
    }
}

/// Reads the status a gateway wrote.
pub fn read_status(data_dir: &Path) -> Option<Status> {
    serde_json::from_slice(&std::fs::read(data_dir.join("rules-status.json")).ok()?).ok()
}

//! Emergency mitigation: operator rules applied to every request before the session lookup
//! (deny, throttle or log), reloaded within a second when the file changes or on SIGHUP, and
//! the lockdown switch. A new rules file is checked completely (and its signature, when the
//! config requires one) before it replaces the old rules; a bad one changes nothing and says
//! why in the log and in `poort rules status`.

pub mod rules;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
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
    /// Why the newest file was refused; the rules above stay in force.
    pub last_error: Option<String>,
    pub hits: HashMap<String, u64>,
}

/// Reads, verifies and checks a rules file: `Err` lists every problem.
pub fn load_file(path: &Path, public_key: Option<&[u8]>) -> Result<(Rules, String), Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
    if let Some(key) = public_key {
        let sig_path = signature_path(path);
        let sig = std::fs::read_to_string(&sig_path)
            .map_err(|e| vec![format!("{}: signature required but cannot be read: {e}", sig_path.display())])?;
        let sig = STANDARD.decode(sig.trim()).map_err(|_| vec![format!("{}: not base64", sig_path.display())])?;
        UnparsedPublicKey::new(&ED25519, key).verify(&bytes, &sig).map_err(|_| {
            vec![format!("{}: the signature does not match the file and the configured key", sig_path.display())]
        })?;
    }
    let text = String::from_utf8(bytes.clone()).map_err(|_| vec![format!("{}: not UTF-8", path.display())])?;
    let rules = rules::compile(&text)?;
    Ok((rules, crate::audit::to_hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())))
}

/// Where the detached signature of a rules file lives.
pub fn signature_path(rules: &Path) -> PathBuf {
    let mut p = rules.as_os_str().to_owned();
    p.push(".sig");
    PathBuf::from(p)
}

pub struct Mitigation {
    file: Option<PathBuf>,
    public_key: Option<Vec<u8>>,
    status_path: PathBuf,
    rules: RwLock<Arc<Rules>>,
    /// Timestamps of the rules file and its signature when last read.
    seen: Mutex<Stamp>,
    throttles: Mutex<HashMap<String, governor::DefaultKeyedRateLimiter<IpAddr>>>,
    status: Mutex<Status>,
    lockdown_config: bool,
    lockdown_switch: AtomicBool,
    pub admin_group: String,
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
    /// Loads the rules named by the config. At start-up a bad file is an error: poort does not
    /// start without the mitigations the operator asked for.
    pub fn start(cfg: &crate::config::Mitigate, data_dir: &Path) -> anyhow::Result<Mitigation> {
        let m = Mitigation {
            file: cfg.rules_file.clone(),
            public_key: cfg.public_key.clone(),
            status_path: data_dir.join("rules-status.json"),
            rules: RwLock::new(Arc::new(Rules::default())),
            seen: Mutex::new([None, None]),
            throttles: Mutex::new(HashMap::new()),
            status: Mutex::new(Status::default()),
            lockdown_config: cfg.lockdown,
            lockdown_switch: AtomicBool::new(false),
            admin_group: cfg.admin_group.clone(),
        };
        if let Some(path) = &m.file {
            if let Err(problems) = load_file(path, m.public_key.as_deref()) {
                anyhow::bail!("the mitigation rules cannot be loaded:\n  {}", problems.join("\n  "));
            }
        }
        m.reload();
        Ok(m)
    }

    /// Re-reads the rules file; keeps the old rules if the new file is bad. True if replaced.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.file else { return false };
        *self.seen.lock().expect("invariant: lock not poisoned") = stamp(path);
        let result = load_file(path, self.public_key.as_deref());
        let mut status = self.status.lock().expect("invariant: lock not poisoned");
        status.file = Some(path.display().to_string());
        let replaced = match result {
            Ok((rules, digest)) => {
                tracing::info!(file = %path.display(), rules = rules.rules.len(), "Mitigation rules loaded");
                status.rules = rules.rules.len();
                status.sha256 = Some(digest);
                status.loaded_at = Some(crate::clock::format_utc(crate::clock::Clock::now(&crate::clock::SystemClock)));
                status.last_error = None;
                *self.rules.write().expect("invariant: lock not poisoned") = Arc::new(rules);
                self.throttles.lock().expect("invariant: lock not poisoned").clear();
                true
            }
            Err(problems) => {
                let why = problems.join("; ");
                tracing::error!(file = %path.display(), problems = %why, "Mitigation rules refused; the previous rules stay in force");
                status.last_error = Some(why);
                false
            }
        };
        drop(status);
        self.write_status();
        replaced
    }

    /// Reloads if the file changed since it was last read.
    pub fn poll(&self) {
        let Some(path) = &self.file else { return };
        let now = stamp(path);
        if now != *self.seen.lock().expect("invariant: lock not poisoned") {
            self.reload();
        }
    }

    pub fn write_status(&self) {
        let status = self.status.lock().expect("invariant: lock not poisoned").clone();
        if let Ok(json) = serde_json::to_vec_pretty(&status) {
            let tmp = self.status_path.with_extension("json.tmp");
            if std::fs::write(&tmp, json).is_ok() {
                let _ = std::fs::rename(&tmp, &self.status_path);
            }
        }
    }

    /// The mitigation stage for one request.
    pub fn check(&self, facts: &Facts<'_>) -> Verdict {
        let rules = self.rules.read().expect("invariant: lock not poisoned").clone();
        let Some((_, rule)) = rules.check(facts) else { return Verdict::Pass };
        if let Ok(mut s) = self.status.lock() {
            *s.hits.entry(rule.id.clone()).or_insert(0) += 1;
        }
        match rule.action {
            Action::Deny => Verdict::Deny { rule: rule.id.clone(), reason: rule.reason.clone() },
            Action::Log => Verdict::Logged { rule: rule.id.clone() },
            Action::Throttle { count, per_secs } => {
                let mut t = self.throttles.lock().expect("invariant: lock not poisoned");
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

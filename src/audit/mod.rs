//! The audit log: typed events appended to SQLite, each record carrying the SHA-256 of the one
//! before it, so that a changed, removed or reordered record breaks the chain.
//!
//! Durability: `Audit::record` returns only after the event is committed with `synchronous =
//! FULL`. A writer thread commits every event waiting at that moment in one transaction
//! (group commit), so many concurrent requests share one disk flush. The queue to the writer
//! is bounded: a caller waits for room rather than letting it grow without end.
//!
//! Refusals (`Audit::refusal`) are not waited for and are counted rather than written one by
//! one: the first of a kind from a client in a minute is written as it is, the rest of that
//! minute become one `refusals_counted` record. A flood of bad requests adds a few records a
//! minute, and sign-ins keep their place in the queue.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::db::{self, Backend, Conn, OptionalExtension, params};
use anyhow::Context;
use ring::digest;
use serde::Serialize;

use crate::clock::{Clock, UnixTime};

pub mod export;
pub mod recording;
pub mod report;
pub mod seal;

/// Everything the audit log records. Field names are part of the log's format.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    LoginSucceeded {
        user: String,
        session: String,
        client: IpAddr,
    },
    LoginFailed {
        user: String,
        client: IpAddr,
    },
    Logout {
        user: String,
        session: String,
        client: IpAddr,
    },
    SessionEnded {
        user: String,
        session: String,
        by: String,
    },
    SessionExpired {
        user: String,
        session: String,
        why: String,
    },
    /// The first request of a session to an app (later ones go to the access log).
    AccessAllowed {
        user: Option<String>,
        session: Option<String>,
        app: String,
        client: IpAddr,
    },
    AccessDenied {
        user: String,
        session: String,
        app: String,
        reason: String,
        client: IpAddr,
    },
    /// The front door refused a request before routing.
    RequestRejected {
        code: String,
        client: IpAddr,
        request_id: String,
    },
    /// A second factor was accepted (`factor`: otp, recovery, hwk/swk) and the session renewed.
    MfaSucceeded {
        user: String,
        session: String,
        factor: String,
        client: IpAddr,
    },
    MfaFailed {
        user: String,
        factor: String,
        client: IpAddr,
    },
    /// Consecutive failures locked an account's password or its second factors (`lock`)
    /// until `until` (Unix time).
    AccountLocked {
        user: String,
        lock: String,
        failures: u32,
        until: i64,
        client: IpAddr,
    },
    /// Too many sign-in attempts from one address.
    RateLimited {
        client: IpAddr,
    },
    /// A user changed their own second factors; `proof` says how they proved who they are.
    FactorChanged {
        user: String,
        change: String,
        proof: String,
        client: IpAddr,
    },
    RecoveryCodeUsed {
        user: String,
        remaining: usize,
        client: IpAddr,
    },
    TunnelOpened {
        user: String,
        session: String,
        tunnel: String,
        client: IpAddr,
    },
    TunnelClosed {
        user: String,
        session: String,
        tunnel: String,
        bytes_in: u64,
        bytes_out: u64,
        seconds: u64,
        why: String,
    },
    /// A permitted tunnel whose target could not be reached.
    TunnelFailed {
        user: String,
        tunnel: String,
        why: String,
        client: IpAddr,
    },
    /// A person signed in at the SSH front door, for a target and an account on it.
    SshOpened {
        user: String,
        session: String,
        target: String,
        principal: String,
        /// `key SHA256:…` or `approved in the browser`.
        method: String,
        client: IpAddr,
    },
    /// A channel of an SSH connection started: what it does, and its recording if recorded.
    SshChannelOpened {
        user: String,
        session: String,
        target: String,
        principal: String,
        what: String,
        /// The recording's file name in the data folder's `recordings`; empty if not recorded.
        recording: String,
    },
    /// One channel of an SSH connection ended: what it did and where its recording is.
    SshChannelClosed {
        user: String,
        session: String,
        target: String,
        principal: String,
        /// `shell`, `exec <command>`, `sftp`, `forward host:port`.
        what: String,
        bytes_in: u64,
        bytes_out: u64,
        seconds: u64,
        /// The recording's file name in the data folder's `recordings`, if recorded.
        recording: String,
        /// SHA-256 of the recording as written, so the chain vouches for it.
        sha256: String,
        exit_status: Option<u32>,
        /// What a file transfer (SFTP) did: `read PATH`, `write PATH`, `remove PATH`, ...
        #[serde(skip_serializing_if = "Vec::is_empty")]
        files: Vec<String>,
    },
    /// An SSH connection ended.
    SshClosed {
        user: String,
        session: String,
        target: String,
        seconds: u64,
        why: String,
    },
    /// A permitted SSH connection whose target could not be reached or refused poort.
    SshFailed {
        user: String,
        target: String,
        why: String,
        client: IpAddr,
    },
    /// The first host key a target showed, kept from now on (no `host_key` in the config).
    SshHostKeyKept {
        target: String,
        key: String,
    },
    /// A signed-in user approved a command-line sign-in (device code flow).
    DeviceLogin {
        user: String,
        session: String,
        approved_from: String,
        device_client: String,
    },
    /// A browser took a portal session over to an app's own host.
    HandoffRedeemed {
        user: String,
        session: String,
        host: String,
        client: IpAddr,
    },
    /// A hand-off code was refused (unknown, expired, another host, another browser).
    HandoffRefused {
        host: String,
        why: String,
        client: IpAddr,
    },
    /// A mitigation rule matched (`action`: deny, throttle or log).
    MitigationMatched {
        rule: String,
        action: String,
        path: String,
        client: IpAddr,
        request_id: String,
    },
    /// A rules file was applied (at start, on a change, or on SIGHUP).
    RulesLoaded {
        file: String,
        version: Option<u64>,
        sha256: String,
        rules: usize,
    },
    /// A rules file was refused; the rules in force stay.
    RulesRefused {
        file: String,
        why: String,
    },
    /// Refusals of one kind from one client in one minute after the first, which was
    /// recorded on its own (`Audit::refusal`).
    RefusalsCounted {
        refusal: String,
        key: String,
        client: String,
        count: u64,
        minute_starting: i64,
        /// Up to eight of the paths (or hosts) refused, other than the first one's.
        samples: Vec<String>,
    },
    /// A request refused because the gateway is in lockdown.
    LockedDown {
        user: Option<String>,
        path: String,
        client: IpAddr,
    },
    /// An administrative command: from the command line on the gateway's machine (no `by`),
    /// or from the admin console in the portal (`by` the administrator, from `client`, in
    /// `session`).
    Admin {
        command: String,
        target: String,
        detail: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client: Option<IpAddr>,
    },
    GatewayStarted {
        version: String,
    },
    /// A changed config was put in force (on SIGHUP, a change to the file, or `poort
    /// reload`); `cut` open WebSockets and tunnels lost their access with it.
    ConfigReloaded {
        file: String,
        sha256: String,
        trigger: String,
        changed: Vec<String>,
        cut: usize,
    },
    /// A changed config was refused; the config in force stays.
    ConfigRefused {
        file: String,
        sha256: String,
        trigger: String,
        why: String,
    },
    /// A forward-secure seal over the chain up to record `covers` (whose hash is `head`), by
    /// the sealing key `key` at `generation` (`seal::Checker` checks it).
    AuditSealed {
        key: String,
        generation: u64,
        covers: i64,
        head: String,
        mac: String,
    },
}

/// Every kind of record (`Event::kind`), for choosing one in a filter.
pub const KINDS: &[&str] = &[
    "login_succeeded",
    "login_failed",
    "logout",
    "session_ended",
    "session_expired",
    "access_allowed",
    "access_denied",
    "request_rejected",
    "mfa_succeeded",
    "mfa_failed",
    "account_locked",
    "rate_limited",
    "factor_changed",
    "recovery_code_used",
    "tunnel_opened",
    "tunnel_closed",
    "tunnel_failed",
    "ssh_opened",
    "ssh_channel_opened",
    "ssh_channel_closed",
    "ssh_closed",
    "ssh_failed",
    "ssh_host_key_kept",
    "device_login",
    "handoff_redeemed",
    "handoff_refused",
    "mitigation_matched",
    "rules_loaded",
    "rules_refused",
    "refusals_counted",
    "locked_down",
    "admin",
    "gateway_started",
    "config_reloaded",
    "config_refused",
    "audit_sealed",
];

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::LoginSucceeded { .. } => "login_succeeded",
            Event::LoginFailed { .. } => "login_failed",
            Event::Logout { .. } => "logout",
            Event::SessionEnded { .. } => "session_ended",
            Event::SessionExpired { .. } => "session_expired",
            Event::AccessAllowed { .. } => "access_allowed",
            Event::AccessDenied { .. } => "access_denied",
            Event::RequestRejected { .. } => "request_rejected",
            Event::MfaSucceeded { .. } => "mfa_succeeded",
            Event::MfaFailed { .. } => "mfa_failed",
            Event::AccountLocked { .. } => "account_locked",
            Event::RateLimited { .. } => "rate_limited",
            Event::FactorChanged { .. } => "factor_changed",
            Event::RecoveryCodeUsed { .. } => "recovery_code_used",
            Event::TunnelOpened { .. } => "tunnel_opened",
            Event::TunnelClosed { .. } => "tunnel_closed",
            Event::TunnelFailed { .. } => "tunnel_failed",
            Event::SshOpened { .. } => "ssh_opened",
            Event::SshChannelOpened { .. } => "ssh_channel_opened",
            Event::SshChannelClosed { .. } => "ssh_channel_closed",
            Event::SshClosed { .. } => "ssh_closed",
            Event::SshFailed { .. } => "ssh_failed",
            Event::SshHostKeyKept { .. } => "ssh_host_key_kept",
            Event::DeviceLogin { .. } => "device_login",
            Event::HandoffRedeemed { .. } => "handoff_redeemed",
            Event::HandoffRefused { .. } => "handoff_refused",
            Event::MitigationMatched { .. } => "mitigation_matched",
            Event::RulesLoaded { .. } => "rules_loaded",
            Event::RulesRefused { .. } => "rules_refused",
            Event::RefusalsCounted { .. } => "refusals_counted",
            Event::LockedDown { .. } => "locked_down",
            Event::Admin { .. } => "admin",
            Event::GatewayStarted { .. } => "gateway_started",
            Event::ConfigReloaded { .. } => "config_reloaded",
            Event::ConfigRefused { .. } => "config_refused",
            Event::AuditSealed { .. } => "audit_sealed",
        }
    }
}

/// A field of a record's event (its JSON) as text: a string as it is, another value as JSON,
/// a missing one as "".
pub fn field(d: &serde_json::Value, k: &str) -> String {
    match d.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) if !v.is_null() => v.to_string(),
        _ => String::new(),
    }
}

/// One stored record.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub seq: i64,
    pub at: UnixTime,
    pub kind: String,
    /// The event as JSON, exactly the bytes that were hashed.
    pub detail: String,
    #[serde(serialize_with = "hex")]
    pub hash: Vec<u8>,
}

fn hex<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::secret::hex(v))
}

/// SHA-256 over the previous hash and this record's fields, each length-prefixed.
pub fn chain_hash(prev: &[u8], seq: i64, at: UnixTime, kind: &str, detail: &str) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"poort-audit-v1");
    for part in [prev, &seq.to_be_bytes(), &at.to_be_bytes(), kind.as_bytes(), detail.as_bytes()] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    ctx.finish().as_ref().to_vec()
}

/// Appends events in one transaction; returns the sequence number of the last one.
pub fn append(conn: &mut Conn, at: UnixTime, events: &[Event]) -> db::Result<i64> {
    append_sealed(conn, at, events, None)
}

/// As `append`, and then a seal by `seal` over the chain, the new records included.
pub fn append_sealed(conn: &mut Conn, at: UnixTime, events: &[Event], seal: Option<&seal::SealKey>) -> db::Result<i64> {
    let tx = conn.transaction()?;
    if tx.backend() == Backend::Postgres {
        // Nodes sharing the database take turns: each appends after the last record any of
        // them committed, so the cluster keeps one chain.
        tx.query_row("SELECT pg_advisory_xact_lock(?1)::text", [crate::store::PG_LOCK_AUDIT], |_| Ok(()))?;
    }
    let (mut seq, mut prev): (i64, Vec<u8>) = tx
        .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", (), |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, vec![0u8; 32]));
    let put = |ev: &Event, seq: &mut i64, prev: &mut Vec<u8>| -> db::Result<()> {
        *seq += 1;
        let detail = serde_json::to_string(ev).expect("invariant: audit events serialise");
        let hash = chain_hash(prev, *seq, at, ev.kind(), &detail);
        tx.execute(
            "INSERT INTO audit (seq, at, kind, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![*seq, at, ev.kind(), detail, &*prev, hash],
        )?;
        *prev = hash;
        Ok(())
    };
    for ev in events {
        put(ev, &mut seq, &mut prev)?;
    }
    // The seal covers the chain up to the record before it, known only now.
    if let Some(key) = seal {
        put(&key.seal(seq, &prev, at), &mut seq, &mut prev)?;
    }
    tx.commit()?;
    Ok(seq)
}

/// What the writer is asked to do: write an event, or seal the chain (`None`).
type Job = (Option<Event>, Option<tokio::sync::oneshot::Sender<Result<i64, String>>>);

/// Events waiting for the writer, at most.
const QUEUE: usize = 8192;
/// Distinct (kind, key, client) refusal counters per minute, at most; more are counted
/// under one "(other clients)" counter.
const MAX_COUNTERS: usize = 4096;

/// Refusals counted in the current minute.
#[derive(Default)]
struct Counted {
    minute: i64,
    /// (kind, key, client) → refusals after the first, and a few of what they were for.
    counts: std::collections::HashMap<(&'static str, String, String), (u64, Vec<String>)>,
}

/// Distinct samples kept per counter.
const SAMPLES: usize = 8;

/// Handle to the audit writer. Cloning is cheap; every clone feeds the same writer thread.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::SyncSender<Job>,
    clock: std::sync::Arc<dyn Clock>,
    counted: std::sync::Arc<parking_lot::Mutex<Counted>>,
    metrics: std::sync::Arc<Metrics>,
    /// Whether the last write succeeded (readiness).
    writing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The sequence number of the last record committed (exports wait on it).
    committed: tokio::sync::watch::Receiver<i64>,
}

use crate::metrics::Metrics;

/// Counts what a record says happened: sign-ins (the first factor as "first", second factors
/// by name), lockouts, emergency rule hits and rules-file readings.
fn count(m: &Metrics, e: &Event) {
    let factor = |f: &str| match f {
        "otp" => "otp",
        "recovery" => "recovery",
        "hwk" | "swk" => "passkey",
        _ => "other",
    };
    match e {
        Event::LoginSucceeded { .. } => m.sign_in(true, "first"),
        Event::LoginFailed { .. } => m.sign_in(false, "first"),
        Event::MfaSucceeded { factor: f, .. } => m.sign_in(true, factor(f)),
        Event::MfaFailed { factor: f, .. } => m.sign_in(false, factor(f)),
        Event::AccountLocked { .. } => {
            m.lockouts.inc();
        }
        Event::MitigationMatched { rule, action, .. } => m.rule_hit(
            rule,
            match action.as_str() {
                "deny" => "deny",
                "throttle" => "throttle",
                _ => "log",
            },
        ),
        Event::RulesLoaded { .. } => m.rules_read("loaded"),
        Event::RulesRefused { .. } => m.rules_read("refused"),
        Event::ConfigReloaded { .. } => m.config_read("loaded"),
        Event::ConfigRefused { .. } => m.config_read("refused"),
        _ => {}
    }
}

impl Audit {
    /// Starts the writer thread on its own connection to `db`. What is recorded is also
    /// counted in `metrics` (sign-ins, lockouts, rule hits), with the queue and write time.
    /// With `data_dir`, seals are made with the sealing key kept there (`seal`), once it exists.
    pub fn start(
        db: &crate::store::Database,
        clock: std::sync::Arc<dyn Clock>,
        metrics: std::sync::Arc<Metrics>,
        data_dir: Option<PathBuf>,
    ) -> anyhow::Result<Audit> {
        let database = db.clone();
        let mut conn = Some(crate::store::open_connection(db)?);
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let writer_clock = clock.clone();
        let m = metrics.clone();
        let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let wrote = writing.clone();
        let last = conn.as_ref().expect("invariant: opened just above").query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM audit",
            (),
            |r| r.get::<i64>(0),
        )?;
        let (committed_tx, committed) = tokio::sync::watch::channel(last);
        let mut key: Option<seal::SealKey> = None;
        std::thread::Builder::new()
            .name("poort-audit".into())
            .spawn(move || {
                // A writer that stops for any reason is not writing: readiness says so.
                struct Stopped(std::sync::Arc<std::sync::atomic::AtomicBool>);
                impl Drop for Stopped {
                    fn drop(&mut self) {
                        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                let _stopped = Stopped(wrote.clone());
                if let Some(dir) = &data_dir {
                    warn_unsealed(conn.as_ref(), dir);
                }
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < 1024 {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let started = crate::clock::instant();
                    let events: Vec<Event> = batch.iter().filter_map(|(e, _)| e.clone()).collect();
                    let key = match (&data_dir, batch.iter().any(|(e, _)| e.is_none())) {
                        (Some(dir), true) => seal_key(&mut key, dir),
                        _ => None,
                    };
                    let result = write(&mut conn, &database, writer_clock.now(), &events, key.as_deref());
                    if let (Ok(_), Some(k)) = (&result, key) {
                        match k.evolve() {
                            Ok(()) => {
                                m.audit_sealed.set(writer_clock.now());
                            }
                            Err(e) => tracing::error!(error = %format!("{e:#}"), "Moving the audit sealing key to its next generation failed: the key that sealed stays on disk, and poort audit verify will say so"),
                        }
                    }
                    m.audit_write_seconds
                        .observe(crate::clock::instant().saturating_duration_since(started).as_secs_f64());
                    m.audit_queue.dec_by(batch.len() as i64);
                    wrote.store(result.is_ok(), std::sync::atomic::Ordering::Relaxed);
                    match &result {
                        Ok(seq) => {
                            committed_tx.send_replace(*seq);
                        }
                        Err(e) => tracing::error!(error = %e, events = events.len(), "Audit write failed"),
                    }
                    for (_, done) in batch {
                        if let Some(done) = done {
                            let _ = done.send(result.clone());
                        }
                    }
                }
            })
            .context("starting the audit writer")?;
        Ok(Audit { tx, clock, counted: std::sync::Arc::default(), metrics, writing, committed })
    }

    /// Changes whenever records are committed; holds the last one's sequence number.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<i64> {
        self.committed.clone()
    }

    /// Whether the last write of audit records succeeded.
    pub fn writing(&self) -> bool {
        self.writing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records an event and waits until it is durable. An error means it was not recorded;
    /// callers on a request path fail closed.
    pub async fn record(&self, event: Event) -> anyhow::Result<i64> {
        count(&self.metrics, &event);
        let (done, wait) = tokio::sync::oneshot::channel();
        let mut job = (Some(event), Some(done));
        // A full queue makes the caller wait its turn, a little at a time.
        loop {
            match self.enqueue(job) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(back)) => {
                    job = back;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                Err(mpsc::TrySendError::Disconnected(_)) => anyhow::bail!("audit writer stopped"),
            }
        }
        wait.await
            .map_err(|_| anyhow::anyhow!("audit writer stopped"))?
            .map_err(|e| anyhow::anyhow!("audit write failed: {e}"))
    }

    /// Records an event for what has already happened (a sign-in failed, a session ended): a
    /// failed write is logged with the event's kind and changes nothing else. Where an action
    /// may only go ahead once recorded, callers use `record` and refuse on its error.
    pub async fn note(&self, event: Event) {
        let kind = event.kind();
        if let Err(e) = self.record(event).await {
            tracing::error!(error = %e, kind, "Audit write failed");
        }
    }

    /// Records a refusal (`event`, of kind `kind`, for `key`: a reason code or a rule, and
    /// `sample`: what was refused, a path or a host) without waiting: the first from `client`
    /// in a minute is written; later ones are counted for `flush_counted`, with a few distinct
    /// samples, so that a harmless first refusal cannot hide what follows it.
    pub fn refusal(&self, kind: &'static str, key: &str, client: std::net::IpAddr, sample: &str, event: Event) {
        count(&self.metrics, &event);
        let minute = self.clock.now().div_euclid(60) * 60;
        let first = {
            let mut c = self.counted.lock();
            if c.minute != minute && !c.counts.is_empty() {
                // A new minute before the flush ran: the old counts go out now.
                let old = std::mem::take(&mut *c);
                self.send_counts(old);
            }
            c.minute = minute;
            let full = c.counts.len() >= MAX_COUNTERS;
            let client = if full { "(other clients)".to_string() } else { client.to_string() };
            let slot = (kind, key.chars().take(64).collect::<String>(), client);
            match c.counts.get_mut(&slot) {
                Some((n, samples)) => {
                    *n += 1;
                    if samples.len() < SAMPLES && !samples.iter().any(|s| s == sample) {
                        samples.push(sample.chars().take(256).collect());
                    }
                    false
                }
                None => {
                    c.counts.insert(slot, (0, Vec::new()));
                    !full
                }
            }
        };
        if first {
            // Not waited for: a refusal is not an access that must be recorded first.
            let _ = self.enqueue((Some(event), None));
        }
    }

    /// Seals the chain as it stands (when the log has a sealing key), and waits for it.
    pub async fn seal(&self) -> anyhow::Result<i64> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.enqueue((None, Some(done))).map_err(|_| anyhow::anyhow!("the audit writer is busy or stopped"))?;
        wait.await
            .map_err(|_| anyhow::anyhow!("audit writer stopped"))?
            .map_err(|e| anyhow::anyhow!("audit write failed: {e}"))
    }

    /// Writes the counts of a minute that has ended (called every few seconds).
    pub fn flush_counted(&self) {
        let minute = self.clock.now().div_euclid(60) * 60;
        let old = {
            let mut c = self.counted.lock();
            if c.minute == minute {
                return;
            }
            std::mem::take(&mut *c)
        };
        self.send_counts(old);
    }

    /// Hands a record to the writer if it has room; counted in the queue metric until written.
    #[allow(clippy::result_large_err, reason = "it hands the record back, as try_send does")]
    fn enqueue(&self, job: Job) -> Result<(), mpsc::TrySendError<Job>> {
        // Counted first: the writer may take it off the queue before try_send returns.
        self.metrics.audit_queue.inc();
        let sent = self.tx.try_send(job);
        if sent.is_err() {
            self.metrics.audit_queue.dec();
        }
        sent
    }

    fn send_counts(&self, c: Counted) {
        for ((kind, key, client), (count, samples)) in c.counts {
            if count > 0 {
                let ev = Event::RefusalsCounted {
                    refusal: kind.into(),
                    key,
                    client,
                    count,
                    minute_starting: c.minute,
                    samples,
                };
                let _ = self.enqueue((Some(ev), None));
            }
        }
    }
}

/// Appends on the writer's connection, opening it again first when the database went away
/// (a PostgreSQL restart); a failed batch is reported to its callers, and the next one tries
/// again.
fn write(
    conn: &mut Option<Conn>,
    database: &crate::store::Database,
    at: UnixTime,
    events: &[Event],
    seal: Option<&seal::SealKey>,
) -> Result<i64, String> {
    if conn.as_ref().is_none_or(Conn::is_broken) {
        *conn = None;
        *conn = Some(crate::store::open_connection(database).map_err(|e| format!("{e:#}"))?);
    }
    let c = conn.as_mut().expect("invariant: connected just above");
    append_sealed(c, at, events, seal).map_err(|e| {
        if e.is_connection() {
            *conn = None;
        }
        e.to_string()
    })
}

/// A log that holds seals but whose sealing key is gone is sealed no more: say so at start.
fn warn_unsealed(conn: Option<&Conn>, dir: &Path) {
    if seal::key_path(dir).exists() {
        return;
    }
    let sealed = conn.and_then(|c| {
        c.query_row("SELECT seq FROM audit WHERE kind = 'audit_sealed' LIMIT 1", (), |r| r.get::<i64>(0))
            .optional()
            .ok()
    });
    if sealed.flatten().is_some() {
        tracing::error!(key = %seal::key_path(dir).display(), "The audit log was sealed, but the sealing key is gone: no seal is made, and poort audit verify will say so");
    }
}

/// The sealing key of `dir`, read when there is none in hand yet (it may be made while the
/// gateway runs); a key that cannot be read is logged, and no seal is made.
fn seal_key<'a>(held: &'a mut Option<seal::SealKey>, dir: &Path) -> Option<&'a mut seal::SealKey> {
    if held.is_none() {
        match seal::SealKey::load(dir) {
            Ok(k) => *held = k,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "The audit sealing key cannot be read; no seal is made")
            }
        }
    }
    held.as_mut()
}

/// Reads the last `n` records, oldest first.
pub fn tail(conn: &Conn, n: usize) -> db::Result<Vec<Record>> {
    let mut rows =
        conn.query_map("SELECT seq, at, kind, detail, hash FROM audit ORDER BY seq DESC LIMIT ?1", [n as i64], |r| {
            Ok(Record { seq: r.get(0)?, at: r.get(1)?, kind: r.get(2)?, detail: r.get(3)?, hash: r.get(4)? })
        })?;
    rows.reverse();
    Ok(rows)
}

/// What `verify` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The chain is whole: how many records, and the hash of the last (worth noting down
    /// elsewhere: removing records from the end leaves a whole but shorter chain).
    Intact { records: i64, head: String },
    /// The first record that does not fit, and why.
    Broken { seq: i64, why: String },
}

/// Walks the chain from the first record and reports the first one that was changed, removed
/// or moved.
pub fn verify(conn: &Conn) -> db::Result<Verdict> {
    verify_with(conn, &mut |_, _, _, _, _| {})
}

/// Shown each record of the chain: (seq, at, kind, detail, the previous record's hash).
pub type EachRecord<'a> = dyn FnMut(i64, i64, &str, &str, &[u8]) + 'a;

/// As `verify`, showing `each` every record that fits the chain, in order, with the hash of
/// the record before it: (seq, at, kind, detail, previous hash).
pub fn verify_with(conn: &Conn, each: &mut EachRecord<'_>) -> db::Result<Verdict> {
    const PAGE: i64 = 10_000;
    let mut expect_seq = 1i64;
    let mut prev = vec![0u8; 32];
    let mut after = i64::MIN;
    loop {
        // A page at a time, so a long log is not held in memory at once.
        let page = conn.query_map(
            "SELECT seq, at, kind, detail, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![after, PAGE],
            |r| {
                Ok((
                    r.get::<i64>(0)?,
                    r.get::<i64>(1)?,
                    r.get::<String>(2)?,
                    r.get::<String>(3)?,
                    r.get::<Vec<u8>>(4)?,
                    r.get::<Vec<u8>>(5)?,
                ))
            },
        )?;
        let Some(last) = page.last() else { break };
        after = last.0;
        for (seq, at, kind, detail, prev_hash, hash) in page {
            if seq != expect_seq {
                let why = format!("record {expect_seq} is missing (next is {seq})");
                return Ok(Verdict::Broken { seq: expect_seq, why });
            }
            if prev_hash != prev {
                return Ok(Verdict::Broken { seq, why: "it does not link to the record before it".into() });
            }
            if chain_hash(&prev, seq, at, &kind, &detail) != hash {
                return Ok(Verdict::Broken { seq, why: "its content does not match its hash".into() });
            }
            each(seq, at, &kind, &detail, &prev);
            prev = hash;
            expect_seq += 1;
        }
    }
    if expect_seq == 1 {
        // Every gateway start and every command writes a record before anything else: an
        // empty log was emptied, or is not a gateway's. Never "intact".
        let why = "the log is empty, but every gateway start and every command writes to it: it was emptied, or this is not the gateway's database";
        return Ok(Verdict::Broken { seq: 1, why: why.into() });
    }
    Ok(Verdict::Intact { records: expect_seq - 1, head: crate::secret::hex(&prev) })
}

/// Path of the database in a data directory, for tools that only know the directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("poort.db")
}

#[cfg(test)]
mod kind_tests {
    /// `KINDS` holds exactly the kinds `Event::kind` names.
    #[test]
    fn kinds_lists_every_kind() {
        let src = include_str!("mod.rs");
        let body =
            src.split("pub fn kind(&self)").nth(1).and_then(|s| s.split("\n    }\n}").next()).unwrap_or_default();
        let named: Vec<&str> = body.split("=> \"").skip(1).filter_map(|s| s.split('"').next()).collect();
        assert!(named.len() > 20, "the kinds were found in the source");
        assert_eq!(named, super::KINDS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile_dir::Dir, Conn) {
        let dir = tempfile_dir::Dir::new();
        let conn = crate::store::open_connection(dir.0.join("a.db")).unwrap();
        (dir, conn)
    }

    /// A throwaway directory, removed on drop.
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let mut p = std::env::temp_dir();
                let mut b = [0u8; 8];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
                p.push(format!("poort-test-{}", crate::secret::hex(&b)));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn ev(i: usize) -> Event {
        Event::LoginFailed { user: format!("u{i}"), client: IpAddr::from([127, 0, 0, 1]) }
    }

    #[test]
    fn chain_detects_edit_removal_and_reorder() {
        let (_d, mut c) = db();
        append(&mut c, 100, &[ev(1), ev(2)]).unwrap();
        append(&mut c, 101, &[ev(3), ev(4)]).unwrap();
        assert!(matches!(verify(&c).unwrap(), Verdict::Intact { records: 4, .. }));

        c.execute("UPDATE audit SET detail = replace(detail, 'u2', 'u9') WHERE seq = 2", ()).unwrap();
        assert_eq!(verify(&c).unwrap(), Verdict::Broken { seq: 2, why: "its content does not match its hash".into() });
        c.execute("UPDATE audit SET detail = replace(detail, 'u9', 'u2') WHERE seq = 2", ()).unwrap();

        c.execute("DELETE FROM audit WHERE seq = 3", ()).unwrap();
        assert!(matches!(verify(&c).unwrap(), Verdict::Broken { seq: 3, .. }));
    }

    #[test]
    fn swapped_records_break_the_chain() {
        let (_d, mut c) = db();
        append(&mut c, 100, &[ev(1), ev(2), ev(3)]).unwrap();
        // Swap the contents of records 1 and 2, hashes and all.
        c.batch(
            "UPDATE audit SET seq = -1 WHERE seq = 1; UPDATE audit SET seq = 1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = -1;",
        )
        .unwrap();
        assert!(matches!(verify(&c).unwrap(), Verdict::Broken { seq: 1, .. }));
    }
}

//! Starting and stopping a whole gateway from a resolved config: store, audit writer, signing
//! key, the demo app if used, listeners and background tasks. `poort serve`, `poort
//! quickstart` and the integration tests all start poort through `start`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::{Audit, Event};
use crate::clock::Clock;
use crate::config::{Config, Upstream};
use crate::gateway::{Gateway, Live};
use crate::identity::assertion::Signer;
use crate::identity::seal::Sealer;
use crate::store::Store;
use crate::{listen, whoami};

pub mod reload;

use reload::{Addrs, Control, FileWatch, Side};
pub use reload::{Reloaded, Trigger};

/// How often a gateway looks for revocations made by other processes.
pub const REVOCATION_POLL: Duration = Duration::from_millis(100);

/// A running gateway.
pub struct Running {
    pub addr: SocketAddr,
    pub redirect_addr: Option<SocketAddr>,
    /// Where metrics and health checks are served.
    pub admin_addr: Option<SocketAddr>,
    /// Where the SSH front door listens, if it does.
    pub ssh_addr: Option<SocketAddr>,
    /// The gateway in force.
    pub live: Arc<Live>,
    control: Arc<Control>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Running({})", self.addr)
    }
}

pub fn signing_key_path(cfg: &Config) -> std::path::PathBuf {
    cfg.data_dir.join("assertion-key.p8")
}

/// The key that seals second-factor secrets at rest.
pub fn sealing_key_path(cfg: &Config) -> std::path::PathBuf {
    cfg.data_dir.join("secrets.key")
}

/// The store's record of the keys its gateways use (`settings.node_keys`).
const NODE_KEYS: &str = "node_keys";

/// Every gateway on one database must seal second-factor secrets and sign assertions with the
/// same keys: a TOTP secret sealed by one node is opened by another, and apps check the
/// assertion of every node against one key set. The first gateway on a database records its
/// key id and a sealed probe; a gateway with other keys refuses to start and says which file
/// to copy.
fn same_keys(store: &Store, sealer: &Sealer, signer: &Signer, cfg: &Config) -> anyhow::Result<()> {
    let mine = format!("{} {}", signer.kid(), crate::secret::b64(&sealer.seal(NODE_KEYS, b"poort")));
    store.with(|c| {
        c.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            [NODE_KEYS, mine.as_str()],
        )
    })?;
    let recorded = store.with(|c| crate::store::Store::setting(c, NODE_KEYS))?.unwrap_or_default();
    let (kid, probe) = recorded.split_once(' ').unwrap_or_default();
    let opens = {
        use base64::Engine;
        let probe = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(probe).ok();
        probe.is_some_and(|p| sealer.open(NODE_KEYS, &p).is_some())
    };
    let fix = format!(
        "copy it from a gateway already serving {} into {} (if every gateway's keys were replaced on purpose, delete the record first: DELETE FROM settings WHERE key = '{NODE_KEYS}')",
        cfg.database,
        cfg.data_dir.display()
    );
    if !opens {
        anyhow::bail!(
            "{} is not the key the other gateways on this database use: {fix}",
            sealing_key_path(cfg).display()
        );
    }
    if kid != signer.kid() {
        anyhow::bail!(
            "{} is not the key the other gateways on this database use: {fix}",
            signing_key_path(cfg).display()
        );
    }
    Ok(())
}

/// Starts everything and returns once the listeners are bound.
pub async fn start(cfg: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    // With ACME, a first start has no certificate yet: poort's own serves until one arrives.
    if cfg.tls.acme.is_some() && !cfg.tls.cert_file.exists() {
        crate::certs::make_self_signed(std::slice::from_ref(&cfg.server.portal_host), &cfg.tls.files()[0])?;
    }
    let certs = Arc::new(crate::certs::Certs::load(cfg.tls.files())?);
    let challenges = cfg.tls.acme.as_ref().map(|_| Arc::new(crate::acme::Challenges::default()));
    let acme = match (&cfg.tls.acme, &challenges) {
        (Some(settings), Some(ch)) => {
            let acme = crate::acme::Acme::new(
                settings.clone(),
                crate::acme::hosts(&cfg),
                &cfg.data_dir,
                certs.clone(),
                ch.clone(),
                clock.clone(),
            );
            acme.load_existing();
            Some(acme)
        }
        _ => None,
    };
    warn_uncovered(&cfg, &certs);
    let tls = listen::tls_config(certs.clone())?;
    let store = Store::open(&cfg.database)?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let audit = Audit::start(&cfg.database, clock.clone(), metrics.clone(), Some(cfg.data_dir.clone()))?;
    let signer = Arc::new(Signer::load_or_create(&signing_key_path(&cfg), &cfg.server.external_origin)?);
    let sealer = Arc::new(Sealer::load_or_create(&sealing_key_path(&cfg))?);
    same_keys(&store, &sealer, &signer, &cfg)?;
    let remembered = remembered_rules(&store)?;
    let (mitigation, first_rules) =
        crate::mitigate::Mitigation::start(&cfg.mitigate, &cfg.data_dir, remembered, clock.now())?;
    let whoami = if cfg.apps.iter().any(|a| a.upstream == Upstream::Whoami) {
        Some(whoami::start().await?.to_string())
    } else {
        None
    };
    let gateway = Arc::new(Gateway::new(
        cfg.clone(),
        clock,
        store,
        audit.clone(),
        crate::gateway::Parts { metrics, signer, sealer, mitigation, whoami },
    )?);
    let live = Arc::new(Live::new(gateway.clone()));
    let listener = listen::bind(cfg.server.listen).await?;
    let addr = listener.local_addr()?;
    let redirect = match cfg.server.redirect_listen {
        Some(a) => Some(listen::bind(a).await?),
        None => None,
    };
    let redirect_addr = redirect.as_ref().map(|l| l.local_addr()).transpose()?;
    let admin = match cfg.admin_listen {
        Some(a) => Some(listen::bind(a).await.context("[admin] listen")?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
    let ssh = match cfg.ssh.listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| format!("[ssh] listen {a}"))?),
        None => None,
    };
    let ssh_addr = ssh.as_ref().map(|l| l.local_addr()).transpose()?;
    audit.record(Event::GatewayStarted { version: env!("CARGO_PKG_VERSION").into() }).await?;
    rules_outcome(&gateway, first_rules).await;

    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let listener = listener.into_std().context("preparing the listener for the workers")?;
    let (listening, _) = watch::channel(listen::Listening::new(listener, cfg.server.clone()));
    for worker in 0..cfg.server.workers {
        let (live, tls, stopped) = (live.clone(), tls.clone(), stopped.clone());
        let listening = listening.subscribe();
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("poort-worker-{worker}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return tracing::error!(error = %e, worker, "Starting a worker failed"),
                };
                rt.block_on(async move {
                    crate::proxy::set_worker(worker);
                    listen::serve(live, listening, tls, until_stop(stopped)).await
                });
                // Ends the worker's remaining tasks before reporting it finished.
                drop(rt);
                drop(done);
            })
            .context("starting a worker thread")?;
        tasks.push(tokio::spawn(async move {
            let _ = finished.await;
        }));
    }
    let control = Arc::new(Control {
        live: live.clone(),
        certs: certs.clone(),
        listening,
        addrs: Mutex::new(Addrs { listen: addr, redirect: redirect_addr, admin: admin_addr }),
        side: Mutex::new(Side::default()),
        challenges: challenges.clone(),
        stopped: stopped.clone(),
        one_at_a_time: tokio::sync::Mutex::new(()),
        exports: tokio::sync::Mutex::new(None),
        exporting: Mutex::new(Vec::new()),
        refused: Mutex::new(None),
    });
    control.start_exports(&gateway).await;
    if let Some(l) = redirect {
        control.start_redirect(l, cfg.server.clone());
    }
    if let Some(l) = admin {
        control.start_admin(l);
    }
    if let Some(acme) = acme {
        tasks.push(tokio::spawn(acme.run(until_stop(stopped.clone()))));
    }
    let node = crate::store::cluster::Node {
        id: node_id(addr),
        version: env!("CARGO_PKG_VERSION").into(),
        config: String::new(),
        started_at: gateway.state.clock.now(),
        seen_at: 0,
    };
    tasks.push(tokio::spawn(background(control.clone(), stopped.clone(), node)));
    tasks.push(tokio::spawn(poll_feed(live.clone(), stopped.clone())));
    tasks.push(tokio::spawn(seal_audit(live.clone(), stopped.clone())));
    tasks.push(tokio::spawn(outage_watch(live.clone(), stopped.clone())));
    if let Some(listener) = ssh {
        let current_live = live.clone();
        let current: crate::sshd::Current = Arc::new(move || {
            let now: Arc<dyn AsRef<crate::state::State> + Send + Sync> = current_live.get();
            now
        });
        let door = crate::sshd::FrontDoor::new(&cfg.data_dir, cfg.ssh.idle_timeout, current)?;
        tracing::info!(listen = ?ssh_addr, host_key = %door.host_public_line(), "SSH front door is serving");
        tasks.push(tokio::spawn(door.serve(listener, until_stop(stopped.clone()))));
    }
    tracing::info!(listen = %addr, portal = %cfg.server.external_origin, apps = cfg.apps.len(), "poort is serving");
    Ok(Running { addr, redirect_addr, admin_addr, ssh_addr, live, control, stop, tasks })
}

async fn until_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Warns about hosts no certificate names.
fn warn_uncovered(cfg: &Config, certs: &crate::certs::Certs) {
    for host in std::iter::once(&cfg.server.portal_host).chain(cfg.apps.iter().filter_map(|a| match &a.route {
        crate::config::Route::Host(h) => Some(h),
        _ => None,
    })) {
        if !certs.covers(host) {
            tracing::warn!(host = %host, "No certificate names this host: browsers will refuse the default one (add a [[tls.cert]] for it, or a name to the certificate)");
        }
    }
}

/// What the gateway applied last: the local rules file's version and the feed file in force.
fn remembered_rules(store: &Store) -> anyhow::Result<crate::mitigate::Remembered> {
    let (applied, feed) = store.with(|c| Ok((Store::setting(c, RULES_APPLIED)?, crate::mitigate::feed::kept(c)?)))?;
    Ok(crate::mitigate::Remembered { applied: applied.and_then(|v| serde_json::from_str(&v).ok()), feed })
}

/// How often a node reads revocations and settings when the database also notifies it.
const STORE_POLL: Duration = Duration::from_secs(1);

/// Reads what other processes changed in the store: revocations, the lockdown switch, a
/// `poort reload` asked for.
async fn poll_store(control: &Control, gw: &Gateway) {
    if let Err(e) = gw.state.sessions.poll_revocations().await {
        tracing::error!(error = %e, "Reading revocations failed");
    }
    // The lockdown switch (poort lockdown on|off). A lockdown also ends what is open:
    // everyone's but the administrators' tunnels, WebSockets and streams.
    let was = gw.state.mitigation.lockdown();
    match gw.state.store.run(|c| crate::store::Store::setting(c, "lockdown")).await {
        Ok(v) => gw.state.mitigation.set_lockdown_switch(v.as_deref() == Some("on")),
        Err(e) => tracing::error!(error = %e, "Reading the lockdown switch failed"),
    }
    if gw.state.mitigation.lockdown() && !was {
        lock_down(gw);
    }
    control.answer_reload_command(gw).await;
}

/// Ends every session held here once the store has been silent past the outage grace. A task
/// of its own: the background loop may itself be waiting on a store that stopped answering.
async fn outage_watch(live: Arc<Live>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if live.get().state.sessions.end_all_past_grace() {
                    tracing::warn!("The store has not answered for longer than [session] outage_grace: every session held here was ended");
                }
            }
            _ = stopped.changed() => break,
        }
    }
}

/// How a node names itself to the others: its host and where it listens.
fn node_id(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{} {addr}", if host.is_empty() { "localhost" } else { host })
}

/// Tells the other nodes (and `poort cluster status`) that this one is alive, and with what.
async fn heartbeat(gw: &Gateway, node: &mut crate::store::cluster::Node) {
    node.seen_at = gw.state.clock.now();
    node.config = gw.state.cfg.source.as_ref().map(|s| s.sha256.clone()).unwrap_or_default();
    let n = node.clone();
    if let Err(e) = gw.state.store.run(move |c| crate::store::cluster::heartbeat(c, &n)).await {
        tracing::warn!(error = %e, "Recording this node's heartbeat failed");
    }
}

/// The gateway's periodic work: revocations, the lockdown switch, expiry, the rules file,
/// certificates and the config file (every `REVOCATION_POLL`); SIGHUP; session activity.
async fn background(control: Arc<Control>, mut stopped: watch::Receiver<bool>, mut node: crate::store::cluster::Node) {
    let mut poll = tokio::time::interval(REVOCATION_POLL);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("invariant: installing a signal handler works");
    let mut flush = tokio::time::interval(Duration::from_secs(10));
    let mut watcher = control.live.get().state.cfg.source.as_ref().map(FileWatch::new);
    let changed = Arc::new(tokio::sync::Notify::new());
    let listener = match control.live.get().state.store.watch(changed.clone()) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot listen for changes on the database; polling it instead");
            None
        }
    };
    let mut polled = crate::clock::instant();
    loop {
        tokio::select! {
            _ = changed.notified(), if listener.is_some() => {
                // Another node or the command line revoked something or changed a setting.
                poll_store(&control, &control.live.get()).await;
                polled = crate::clock::instant();
            }
            _ = poll.tick() => {
                let gw = control.live.get();
                // With notifications the store is read when told, and at least every
                // STORE_POLL in case one was lost; without (SQLite), at every tick.
                if listener.is_none() || crate::clock::instant().saturating_duration_since(polled) >= STORE_POLL {
                    poll_store(&control, &gw).await;
                    polled = crate::clock::instant();
                }
                gw.state.sessions.end_expired(gw.state.clock.now()).await;
                gw.state.audit.flush_counted();
                rules_outcome(&gw, gw.state.mitigation.poll(gw.state.clock.now())).await;
                reload_certs(&control.certs);
                if watcher.as_mut().is_some_and(FileWatch::settled_change) {
                    let _ = control.reload(Trigger::FileChanged).await;
                }
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config, the mitigation rules and the certificates");
                // A reload in force has read the rules and certificates again; a refused one
                // has not, so they are read on their own.
                if control.reload(Trigger::Signal).await.is_err() {
                    let gw = control.live.get();
                    rules_outcome(&gw, gw.state.mitigation.reload(gw.state.clock.now())).await;
                    reload_certs(&control.certs);
                }
            }
            _ = flush.tick() => {
                let gw = control.live.get();
                heartbeat(&gw, &mut node).await;
                gw.tidy();
                gw.state.mitigation.write_status();
                if let Err(e) = gw.state.sessions.flush().await {
                    tracing::error!(error = %e, "Writing session activity failed");
                }
            }
            _ = stopped.changed() => break,
        }
    }
}

/// Ends everything open but the administrators': their sessions' streams and tunnels, and
/// anonymous WebSockets to public apps (which hold no session).
fn lock_down(gw: &Gateway) {
    let admins = &gw.state.mitigation.admin_group;
    gw.state.sessions.cut_all_but(admins);
    gw.state.grants.review("lockdown", |h| h.subject.as_ref().is_some_and(|(id, _)| id.groups.contains(admins)));
}

/// Serves certificate files renewed on disk to new connections; a renewal that does not
/// load is logged and the certificates in use stay.
fn reload_certs(certs: &crate::certs::Certs) {
    match certs.reload_if_changed() {
        Ok(true) => tracing::info!("Certificates changed on disk: new connections get the new ones"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Certificates changed on disk but do not load; the ones in use stay")
        }
    }
}

/// Where the gateway keeps the rules file it applied last, so that a restart cannot go back
/// to an older signed file.
const RULES_APPLIED: &str = "rules_applied";

/// Audits a look at the rules file, and remembers a file that was applied.
async fn rules_outcome(gw: &Gateway, outcome: crate::mitigate::Reload) {
    use crate::mitigate::Reload;
    let ev = match outcome {
        Reload::Unchanged => return,
        Reload::Loaded { file, applied, rules } => {
            let value = serde_json::to_string(&applied).unwrap_or_default();
            if let Err(e) = gw.state.store.run(move |c| Store::put_setting(c, RULES_APPLIED, &value)).await {
                tracing::error!(error = %e, "Recording the applied rules version failed");
            }
            Event::RulesLoaded { file, version: applied.version, sha256: applied.sha256, rules }
        }
        Reload::Refused { file, why } => Event::RulesRefused { file, why },
    };
    gw.state.audit.note(ev).await;
}

/// Records what taking a feed file came to: a file put in force is kept in the database
/// (unless a node put a newer one there already) and audited, as is a refused one.
async fn feed_outcome(gw: &Gateway, outcome: crate::mitigate::FeedOutcome) {
    use crate::mitigate::FeedOutcome;
    let ev = match outcome {
        FeedOutcome::Unchanged | FeedOutcome::Ignored { .. } => return,
        FeedOutcome::Loaded { url, record, rules } => {
            let (version, sha256) = (record.version, record.sha256.clone());
            if let Err(e) = gw.state.store.run(move |c| crate::mitigate::feed::keep(c, &record)).await {
                tracing::error!(error = %e, "Recording the feed file in force failed");
            }
            Event::RulesLoaded { file: url, version: Some(version), sha256, rules }
        }
        FeedOutcome::Refused { url, why } => Event::RulesRefused { file: url, why },
    };
    gw.state.audit.note(ev).await;
}

/// Seals the audit chain at start and every `[audit] seal_interval` (the writer does nothing
/// while the log has no sealing key). The interval is read every second, so a reload that
/// shortens it takes effect at once.
async fn seal_audit(live: Arc<Live>, mut stopped: watch::Receiver<bool>) {
    let mut last = None;
    loop {
        let gw = live.get();
        if last.is_none_or(|t: tokio::time::Instant| t.elapsed() >= gw.state.cfg.audit_seal_interval) {
            if let Err(e) = gw.state.audit.seal().await {
                tracing::error!(error = %format!("{e:#}"), "Sealing the audit log failed; the next interval tries again");
            }
            last = Some(tokio::time::Instant::now());
        }
        drop(gw);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped.changed() => return,
        }
    }
}

/// Polls the mitigation feed, if the config names one, every `feed_interval` and a tenth of
/// it more at random (so that a fleet does not ask at the same moment); the first time at once.
async fn poll_feed(live: Arc<Live>, mut stopped: watch::Receiver<bool>) {
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => return,
        }
        let gw = live.get();
        let Some((feed, tls, etag)) = gw.state.mitigation.feed() else {
            // No feed configured: look again after a reload may have named one.
            wait = Duration::from_secs(1);
            continue;
        };
        let limit = Duration::from_secs(30);
        let now = || gw.state.clock.now();
        // Another node may have taken a newer file already: no node runs below it.
        match gw.state.store.run(|c| crate::mitigate::feed::kept(c)).await {
            Ok(Some(record)) => {
                gw.state.mitigation.adopt_feed(record, now());
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "Reading the feed file in force from the database failed"),
        }
        let answered = match crate::mitigate::feed::fetch(&feed.url, tls, etag.as_deref(), limit).await {
            Ok(crate::mitigate::feed::Fetched::NotModified) => {
                gw.state.mitigation.feed_not_modified(now());
                true
            }
            Ok(crate::mitigate::feed::Fetched::Body { bytes, etag }) => {
                feed_outcome(&gw, gw.state.mitigation.offer_feed(&bytes, etag, now())).await;
                true
            }
            Err(why) => {
                if gw.state.mitigation.feed_unreachable(&why, now()) {
                    tracing::warn!(url = %feed.url, problem = %why, "The mitigation feed cannot be reached; the rules in force stay");
                }
                false
            }
        };
        let m = &gw.state.metrics;
        if answered {
            m.feed_answered.set(now());
        }
        m.feed_version.set(gw.state.mitigation.status().feed.and_then(|f| f.version).unwrap_or(0) as i64);
        let jitter = u64::from(u16::from_le_bytes(crate::secret::random_bytes::<2>()));
        wait = feed.interval + feed.interval.mul_f64(jitter as f64 / f64::from(u16::MAX) / 10.0);
        gw.state.mitigation.feed_next_check(now() + wait.as_secs() as i64);
    }
}

impl Running {
    /// The gateway in force now.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.live.get()
    }

    /// Where the listeners are bound now (a reload may move them).
    pub fn bound(&self) -> (SocketAddr, Option<SocketAddr>, Option<SocketAddr>) {
        let a = *self.control.addrs.lock();
        (a.listen, a.redirect, a.admin)
    }

    /// Reads the config file again and puts it in force if it is good (`reload` module).
    pub async fn reload(&self) -> Result<Reloaded, String> {
        self.control.reload(Trigger::Command).await
    }

    /// Stops accepting, lets in-flight requests finish (bounded by `shutdown_grace`), and
    /// writes back session activity.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let side = std::mem::take(&mut *self.control.side.lock());
        for t in side.tasks {
            let _ = t.await;
        }
        if let Some((_, tasks)) = self.control.exports.lock().await.take() {
            for t in tasks {
                let _ = t.await;
            }
        }
        if let Err(e) = self.live.get().state.sessions.flush_all().await {
            tracing::error!(error = %e, "Writing session activity at shutdown failed");
        }
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("invariant: installing a signal handler works");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

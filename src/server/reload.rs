//! Reloading the config while running: on SIGHUP, when the file changes, and on `poort
//! reload`. The new file is read and checked completely, and everything it needs is made
//! (certificates loaded, listeners bound, identity sources and rules prepared) before
//! anything changes; any problem leaves the running config as it is and says why, in the log,
//! the audit log, the metrics and to `poort reload`. A good config goes into force for the
//! requests after it: a request, WebSocket or tunnel already under way keeps the gateway it
//! started with, except that open WebSockets and tunnels the new config no longer allows are
//! cut at once (`Grants::review`).
//!
//! What a running process cannot change (where its data lives, its worker threads, its public
//! address, ACME settings, the SSH listener) takes a restart: a config that changes one of them is refused,
//! saying so.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::audit::Event;
use crate::config::{Config, Server, Upstream};
use crate::gateway::{Gateway, Live};
use crate::listen::{self, Listening};
use crate::policy::{self, Decision, Resource, Subject};
use crate::session::grant::Held;
use crate::store::Store;

/// What made the gateway read its config again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChanged,
    Command,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChanged => "file changed",
            Trigger::Command => "poort reload",
        }
    }
}

/// A reload that went into force (or found nothing to change).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reloaded {
    /// The parts of the config that changed, by table.
    pub changed: Vec<String>,
    /// Open WebSockets and tunnels cut because the new config does not allow them.
    pub cut: usize,
}

/// The listeners' addresses as bound.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub listen: SocketAddr,
    pub redirect: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// The plain-HTTP redirect and admin listeners: each a task with its own stop.
#[derive(Debug, Default)]
pub struct Side {
    redirect: Option<oneshot::Sender<()>>,
    admin: Option<oneshot::Sender<()>>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// What a running gateway needs to change its config.
pub struct Control {
    pub live: Arc<Live>,
    pub certs: Arc<crate::certs::Certs>,
    /// What the workers accept on.
    pub listening: watch::Sender<Listening>,
    pub addrs: Mutex<Addrs>,
    pub side: Mutex<Side>,
    pub challenges: Option<Arc<crate::acme::Challenges>>,
    pub stopped: watch::Receiver<bool>,
    pub one_at_a_time: tokio::sync::Mutex<()>,
    /// The text last refused (its SHA-256) and why.
    pub refused: Mutex<Option<(String, String)>>,
    /// The names of the audit exports running.
    pub exporting: Mutex<Vec<String>>,
    /// The audit exports running, and their stop.
    pub exports: tokio::sync::Mutex<Option<Exports>>,
}

/// Running audit exports: their stop, and their tasks.
pub type Exports = (oneshot::Sender<()>, Vec<JoinHandle<()>>);

/// What `poort reload` asks for and what the gateway answers, in the store's settings.
pub const RELOAD_ASKED: &str = "reload_asked";
pub const RELOAD_ANSWERED: &str = "reload_answered";

/// What `poort reload` asks: its number, and the config file it checked.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ask {
    pub n: u64,
    pub path: PathBuf,
}

/// The gateway's answer to `poort reload` number `asked`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub asked: u64,
    pub result: Result<Reloaded, String>,
}

impl Control {
    /// Reads the config file and puts it in force if it is good; says what changed or why not.
    pub async fn reload(&self, trigger: Trigger) -> Result<Reloaded, String> {
        let _one = self.one_at_a_time.lock().await;
        let old = self.live.get();
        let Some(source) = old.state.cfg.source.clone() else {
            return Err("this gateway was not started from a config file".into());
        };
        let file = source.path.display().to_string();
        let read =
            std::fs::read(&source.path).map_or_else(|_| "-".into(), |b| crate::secret::hex(&crate::secret::sha256(&b)));
        // The file watcher does not refuse the same text twice (an explicit reload does say).
        if trigger == Trigger::FileChanged
            && let Some((sha, why)) = self.refused.lock().clone()
            && sha == read
        {
            return Err(why);
        }
        let (outcome, sha256) = match crate::config::load(&source.path) {
            Err(problems) => (Err(problems.to_string().trim_end().replace('\n', "; ")), read),
            Ok(cfg) => {
                let sha = cfg.source.as_ref().map_or_else(|| "-".into(), |s| s.sha256.clone());
                (self.apply(&old, cfg, trigger).await, sha)
            }
        };
        *self.refused.lock() = outcome.as_ref().err().map(|why| (sha256.clone(), why.clone()));
        let now = self.live.get();
        match &outcome {
            Ok(r) if r.changed.is_empty() => {
                tracing::info!(trigger = trigger.as_str(), "Config read again: nothing in it changed");
            }
            Ok(r) => {
                tracing::info!(trigger = trigger.as_str(), changed = %r.changed.join(", "), cut = r.cut, "Config reloaded");
                let ev = Event::ConfigReloaded {
                    file,
                    sha256,
                    trigger: trigger.as_str().into(),
                    changed: r.changed.clone(),
                    cut: r.cut,
                };
                now.state.audit.note(ev).await;
            }
            Err(why) => {
                tracing::error!(trigger = trigger.as_str(), why = %why, "Config not reloaded; the running config stays");
                let ev = Event::ConfigRefused { file, sha256, trigger: trigger.as_str().into(), why: why.clone() };
                now.state.audit.note(ev).await;
            }
        }
        outcome
    }

    /// Prepares everything `cfg` needs, then puts it in force; an error changes nothing.
    async fn apply(&self, old: &Arc<Gateway>, cfg: Config, trigger: Trigger) -> Result<Reloaded, String> {
        let was = &old.state.cfg;
        // A file that changed back to what is in force changes nothing; SIGHUP and `poort
        // reload` make everything again (files the config names may have changed).
        if was.source.as_ref().map(|s| &s.sha256) == cfg.source.as_ref().map(|s| &s.sha256)
            && trigger == Trigger::FileChanged
        {
            return Ok(Reloaded { changed: Vec::new(), cut: 0 });
        }
        needs_no_restart(was, &cfg)?;
        let changed = changes(was, &cfg);
        // Warnings already given for the config in force are not repeated.
        let given = was.warnings();
        for w in cfg.warnings().into_iter().filter(|w| !given.contains(w)) {
            tracing::warn!("{w}");
        }
        // SIGHUP and `poort reload` read again every file the config names: a certificate or
        // rules file that does not load refuses the reload, as it would refuse a start.
        let explicit = trigger != Trigger::FileChanged;
        let certs = self.certs.stage(cfg.tls.files(), explicit).map_err(|e| format!("tls: {e:#}"))?;
        // The rules engine is made again if its settings changed, or on an explicit reload;
        // the rules file is read and checked now.
        let mitigation = if same(&was.mitigate, &cfg.mitigate) && !explicit {
            None
        } else {
            let remembered = super::remembered_rules(&old.state.store).map_err(|e| format!("mitigate: {e:#}"))?;
            let (m, first) =
                crate::mitigate::Mitigation::staged(&cfg.mitigate, &cfg.data_dir, remembered, old.state.clock.now())
                    .map_err(|e| format!("mitigate: {e:#}"))?;
            m.set_lockdown_switch(old.state.mitigation.lockdown_switch());
            Some((m, first))
        };
        if cfg.apps.iter().any(|a| a.upstream == Upstream::Whoami) && !old.has_whoami() {
            let addr = crate::whoami::start().await.map_err(|e| format!("the demo app: {e:#}"))?;
            old.set_whoami(addr.to_string());
        }
        let (mitigation, first_rules) = match mitigation {
            Some((m, first)) => (Some(m), Some(first)),
            None => (None, None),
        };
        let cfg = Arc::new(cfg);
        let gw = Arc::new(old.next(cfg.clone(), mitigation).map_err(|e| format!("{e:#}"))?);
        // Listeners last: a new address is bound before anything changes.
        let addrs = *self.addrs.lock();
        let listener = if cfg.server.listen == was.server.listen {
            None
        } else {
            let l = listen::bind(cfg.server.listen).await.map_err(|e| format!("server.listen: {e:#}"))?;
            Some(l.into_std().map_err(|e| format!("server.listen: {e}"))?)
        };
        let redirect = rebind(was.server.redirect_listen, cfg.server.redirect_listen, "server.redirect_listen").await?;
        let admin = rebind(was.admin_listen, cfg.admin_listen, "admin.listen").await?;

        // In force from here on.
        if let Some(staged) = certs {
            self.certs.use_staged(staged);
        }
        super::warn_uncovered(&cfg, &self.certs);
        self.live.set(gw.clone());
        gw.apply_shared_settings();
        let mut new_addrs = addrs;
        if let Some(l) = listener {
            new_addrs.listen = l.local_addr().unwrap_or(addrs.listen);
            self.listening.send_replace(Listening::new(l, cfg.server.clone()));
        } else if !same_connections(&was.server, &cfg.server) {
            let l = self.listening.borrow().listener.clone();
            self.listening.send_replace(Listening {
                listener: l,
                server: cfg.server.clone(),
                limits: listen::Limits::new(&cfg.server),
            });
        }
        if let Some(l) = redirect {
            new_addrs.redirect = l.as_ref().and_then(|l| l.local_addr().ok());
            self.side.lock().redirect.take().map(|s| s.send(()));
            if let Some(l) = l {
                self.start_redirect(l, cfg.server.clone());
            }
        }
        if let Some(l) = admin {
            new_addrs.admin = l.as_ref().and_then(|l| l.local_addr().ok());
            self.side.lock().admin.take().map(|s| s.send(()));
            if let Some(l) = l {
                self.start_admin(l);
            }
        }
        *self.addrs.lock() = new_addrs;
        if gw.state.mitigation.lockdown() && !old.state.mitigation.lockdown() {
            super::lock_down(&gw);
        }
        // Sessions past shortened timeouts end now, not at their next request.
        gw.state.sessions.end_expired(gw.state.clock.now()).await;
        if let Some(first) = first_rules {
            gw.state.mitigation.publish();
            let dropped = old.state.mitigation.rule_count();
            if cfg.mitigate.rules_file.is_none() && dropped > 0 {
                tracing::warn!(
                    rules = dropped,
                    "The config names no rules file any more: the emergency rules in force are dropped"
                );
            }
            super::rules_outcome(&gw, first).await;
        }
        if !same(&was.audit_export, &cfg.audit_export) {
            self.start_exports(&gw).await;
        }
        // Open WebSockets and tunnels the new config does not allow end now.
        let cut = gw.state.grants.review(crate::session::grant::ACCESS_WITHDRAWN, |h| still_allowed(&cfg, h));
        Ok(Reloaded { changed, cut })
    }

    /// Starts the audit exports of `gw`'s config, once those running have stopped (two
    /// writers of one export would repeat records).
    pub async fn start_exports(&self, gw: &Gateway) {
        let mut exports = self.exports.lock().await;
        if let Some((stop, tasks)) = exports.take() {
            let _ = stop.send(());
            for mut t in tasks {
                if tokio::time::timeout(Duration::from_secs(2), &mut t).await.is_err() {
                    t.abort();
                }
            }
        }
        // A removed export's backlog is no longer anyone's to watch.
        let names: Vec<&str> = gw.state.cfg.audit_export.iter().map(|e| e.name.as_str()).collect();
        for gone in self.exporting.lock().drain(..).filter(|n| !names.contains(&n.as_str())) {
            gw.state.metrics.audit_export_pending.remove(&crate::metrics::ExportLabels { export: gone });
        }
        self.exporting.lock().extend(names.iter().map(|n| n.to_string()));
        let (tx, rx) = oneshot::channel::<()>();
        let rx = futures_util::FutureExt::shared(async move {
            let _ = rx.await;
        });
        let mut tasks = Vec::new();
        for e in &gw.state.cfg.audit_export {
            let st = &gw.state;
            let stop = self.until_either(rx.clone());
            tasks.push(tokio::spawn(crate::audit::export::run(
                e.clone(),
                st.store.clone(),
                st.audit.committed(),
                st.metrics.clone(),
                stop,
            )));
        }
        *exports = Some((tx, tasks));
    }

    fn until_either(
        &self,
        own: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let all = super::until_stop(self.stopped.clone());
        async move {
            tokio::select! {
                () = all => {}
                () = own => {}
            }
        }
    }

    /// Serves the plain-HTTP redirect on `l` until the gateway stops or a reload replaces it.
    pub fn start_redirect(&self, l: TcpListener, server: Server) {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(listen::serve_redirect(l, server, self.challenges.clone(), self.until(rx)));
        let mut side = self.side.lock();
        side.redirect = Some(tx);
        side.tasks.push(task);
    }

    /// Serves metrics and health checks on `l` until the gateway stops or a reload replaces it.
    pub fn start_admin(&self, l: TcpListener) {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(crate::admin::serve(l, self.live.clone(), self.until(rx)));
        let mut side = self.side.lock();
        side.admin = Some(tx);
        side.tasks.push(task);
    }

    fn until(&self, own: oneshot::Receiver<()>) -> impl Future<Output = ()> + Send + 'static {
        self.until_either(async move {
            let _ = own.await;
        })
    }

    /// Answers `poort reload` if it asked since the last look.
    pub async fn answer_reload_command(&self, gw: &Gateway) {
        let asked = gw.state.store.run(|c| Store::setting(c, RELOAD_ASKED)).await;
        let Some(ask) = asked.ok().flatten().and_then(|v| serde_json::from_str::<Ask>(&v).ok()) else { return };
        let asked = ask.n;
        let answered = gw.state.store.run(|c| Store::setting(c, RELOAD_ANSWERED)).await.ok().flatten();
        if answered.and_then(|a| serde_json::from_str::<Answer>(&a).ok()).is_some_and(|a| a.asked >= asked) {
            return;
        }
        // The file asked about must be the one this gateway serves: another file would be
        // checked by the command and never read here.
        let serves = gw.state.cfg.source.as_ref().map(|s| s.path.clone());
        let same_file = serves.as_ref().is_some_and(|p| {
            std::fs::canonicalize(p).ok().is_some_and(|a| std::fs::canonicalize(&ask.path).ok() == Some(a))
        });
        let result = if same_file {
            self.reload(Trigger::Command).await
        } else {
            Err(format!(
                "this gateway serves {}, not {}: nothing was read (hint: edit the file it serves, or pass that one to poort reload)",
                serves.map_or_else(|| "no file".into(), |p| p.display().to_string()),
                ask.path.display()
            ))
        };
        let answer = serde_json::to_string(&Answer { asked, result }).unwrap_or_default();
        if let Err(e) = gw.state.store.run(move |c| Store::put_setting(c, RELOAD_ANSWERED, &answer)).await {
            tracing::error!(error = %e, "Answering poort reload failed");
        }
    }
}

use std::future::Future;

/// Binds a side listener whose address changed: None if it did not change, Some(None) if it
/// was turned off.
async fn rebind(
    was: Option<SocketAddr>,
    now: Option<SocketAddr>,
    key: &str,
) -> Result<Option<Option<TcpListener>>, String> {
    if was == now {
        return Ok(None);
    }
    match now {
        None => Ok(Some(None)),
        Some(a) => listen::bind(a).await.map(|l| Some(Some(l))).map_err(|e| format!("{key}: {e:#}")),
    }
}

/// Compares settings by what they print: every config type prints all its fields.
fn same<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// Whether connections accepted under `a` and `b` get the same treatment.
fn same_connections(a: &Server, b: &Server) -> bool {
    (
        a.handshake_timeout,
        a.header_timeout,
        a.idle_timeout,
        a.shutdown_grace,
        a.max_connections,
        a.max_connections_per_client,
    ) == (
        b.handshake_timeout,
        b.header_timeout,
        b.idle_timeout,
        b.shutdown_grace,
        b.max_connections,
        b.max_connections_per_client,
    )
}

/// Refuses a change a running process cannot make.
fn needs_no_restart(was: &Config, now: &Config) -> Result<(), String> {
    let fixed: [(&str, String, String); 8] = [
        ("store.data_dir", was.data_dir.display().to_string(), now.data_dir.display().to_string()),
        ("store.database_url", was.database.to_string(), now.database.to_string()),
        ("server.workers", was.server.workers.to_string(), now.server.workers.to_string()),
        ("server.external_url", was.server.external_origin.clone(), now.server.external_origin.clone()),
        ("tls.acme", format!("{:?}", was.tls.acme), format!("{:?}", now.tls.acme)),
        ("log.format", was.log.json.to_string(), now.log.json.to_string()),
        ("ssh.listen", format!("{:?}", was.ssh.listen), format!("{:?}", now.ssh.listen)),
        ("ssh.idle_timeout", format!("{:?}", was.ssh.idle_timeout), format!("{:?}", now.ssh.idle_timeout)),
    ];
    for (key, a, b) in fixed {
        if a != b {
            return Err(format!(
                "{key} changed: a running gateway cannot change it, so nothing was changed (hint: restart poort to use the new value, or set it back to reload the rest)"
            ));
        }
    }
    Ok(())
}

/// The tables that differ between `was` and `now`.
fn changes(was: &Config, now: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |name: &str, same: bool| {
        if !same {
            out.push(name.to_string());
        }
    };
    note("server", same(&was.server, &now.server));
    note("tls", same(&was.tls, &now.tls));
    note("session", same(&was.session, &now.session));
    note("proxy", same(&was.proxy, &now.proxy));
    note("mfa", same(&was.mfa, &now.mfa));
    note("login", same(&was.login, &now.login));
    note("app", same(&was.apps, &now.apps));
    note("tunnel", same(&(&was.tunnel, &was.tunnels), &(&now.tunnel, &now.tunnels)));
    note("mitigate", same(&was.mitigate, &now.mitigate));
    note("auth", same(&was.auth, &now.auth));
    note("log", same(&was.log, &now.log));
    note("admin", was.admin_listen == now.admin_listen);
    note("ssh", same(&(&was.ssh, &was.ssh_targets), &(&now.ssh, &now.ssh_targets)));
    note("audit", same(&was.audit_export, &now.audit_export) && was.audit_seal_interval == now.audit_seal_interval);
    out
}

/// Whether an open WebSocket or tunnel would be allowed to open under `cfg`.
fn still_allowed(cfg: &Config, h: &Held) -> bool {
    let who = h.subject.as_ref().map(|(identity, mfa)| Subject { identity, mfa: *mfa });
    let allowed = |d: Decision<'_>| matches!(d, Decision::Allow(_));
    match h.resource() {
        // The name must still lead where the connection goes: a name given to another app
        // or target is not the resource this connection was allowed.
        Resource::App(name) => cfg.apps.iter().find(|a| a.name == name).is_some_and(|a| {
            a.upstream != Upstream::ForwardAuth
                && a.destination() == h.dest
                && allowed(policy::evaluate(Resource::App(name), &a.access, a.mfa, who))
        }),
        Resource::Tunnel(name) => cfg.tunnels.iter().find(|t| t.name == name).is_some_and(|t| {
            t.target == h.dest && allowed(policy::evaluate(Resource::Tunnel(name), &t.access, t.mfa, who))
        }),
        // An SSH connection holds its target's address and the account on it: both must stay
        // allowed to this person.
        Resource::Ssh(name) => cfg.ssh_targets.iter().find(|t| t.name == name).is_some_and(|t| {
            let account = h.subject.as_ref().map(|(identity, _)| t.principals_for(identity)).unwrap_or_default();
            account.iter().any(|p| crate::sshd::destination(t, p) == h.dest)
                && allowed(policy::evaluate(Resource::Ssh(name), &t.access, t.mfa, who))
        }),
    }
}

/// Notices a changed config file, once it has stayed the same for a moment (an editor or
/// a deployment tool may write it in several steps).
pub struct FileWatch {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
    pending: Option<((SystemTime, u64), Instant)>,
}

const SETTLE: Duration = Duration::from_millis(300);

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl FileWatch {
    /// Watches the file `source` was read from, for changes since it was read.
    pub fn new(source: &crate::config::Source) -> FileWatch {
        FileWatch { path: source.path.clone(), seen: source.stamp, pending: None }
    }

    /// True once after the file changed and then stayed the same for `SETTLE`.
    pub fn settled_change(&mut self) -> bool {
        let now = stamp(&self.path);
        if now == self.seen || now.is_none() {
            self.pending = None;
            return false;
        }
        let now = now.expect("checked above");
        match self.pending {
            Some((p, since)) if p == now => {
                if since.elapsed() >= SETTLE {
                    self.seen = Some(now);
                    self.pending = None;
                    return true;
                }
                false
            }
            _ => {
                self.pending = Some((now, crate::clock::instant()));
                false
            }
        }
    }
}

//! The SSH front door (`[ssh] listen`): people run plain OpenSSH against poort,
//! `ssh -p 2222 alice+db1@gate`, and poort signs in to the target `db1` for them with a
//! certificate of its own CA (`crate::ssh`), after the same checks as for apps and tunnels.
//!
//! The user name says who and where: `PERSON+TARGET`, or `PERSON+TARGET+ACCOUNT` for an account
//! on the target other than the first one policy gives the person. Neither people's nor
//! targets' names can hold a `+`, so the name splits one way only.
//!
//! Who may get in:
//! - with a public key the person registered in the portal, only for the account the name
//!   names (a key registered by someone else signs nobody into another account). A key is one
//!   factor: a target that needs a second factor refuses it and asks for the browser instead.
//! - with keyboard-interactive: poort prints a URL and a short code; the person approves it in
//!   a browser where they are signed in (the command line's device flow, second factor
//!   included), and the connection gets a session derived from that browser's.
//!
//! No password is ever taken over SSH. Every connection is a session of its own, listed and
//! revocable like any other; a lockdown, revocation, expiry, disabling the person or a config
//! change that takes the target away ends the connection at once (`session::grant`).
//!
//! Each channel is relayed to a channel of one connection to the target; what a channel may do
//! (shell, exec, sftp, port forwarding) is the target's `allow`. Shells and commands are
//! recorded (`record`) unless the target says `record = false`; file transfers only by name
//! and size.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use russh::keys::ssh_key;
use russh::server::{Auth, Msg, Session as SshSession};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet};
use tokio::sync::mpsc;

use crate::audit::Event;
use crate::audit::recording;

mod sftp;
mod target;
pub mod terminal;
use crate::config::SshTarget;
use crate::policy::{self, Decision, Resource, Subject};
use crate::session::grant::Grant;
use crate::session::{Factors, Kind, Opening, Session};
use crate::state::State;
use crate::store::Store;
pub use target::kept_key_setting;

/// The config in force now: a new connection takes it once and keeps it.
pub type Current = Arc<dyn Fn() -> Arc<dyn AsRef<State> + Send + Sync> + Send + Sync>;

/// What a registered key proves: one factor (`swk`), whatever policy asks beyond it.
const KEY_FACTORS: Factors = Factors::SWK;

/// What a connection's tasks need of the gateway's state, owned: they outlive the request
/// or the config that started them.
#[derive(Clone)]
pub(crate) struct Parts {
    pub store: Store,
    pub audit: crate::audit::Audit,
    pub clock: Arc<dyn crate::clock::Clock>,
    pub cfg: Arc<crate::config::Config>,
}

impl Parts {
    pub fn of(st: &State) -> Parts {
        Parts { store: st.store.clone(), audit: st.audit.clone(), clock: st.clock.clone(), cfg: st.cfg.clone() }
    }
}

/// What a grant holds for an SSH connection: the target's address, the account on it, and
/// what it may do there and whether it is recorded. A reload that changes any of them for this
/// person ends the connection; the next one opens under the new settings.
pub fn destination(t: &SshTarget, principal: &str) -> String {
    let a = t.allow;
    format!(
        "{principal}@{} shell={} exec={} sftp={} forward={} record={}",
        t.address, a.shell, a.exec, a.sftp, a.forward, t.record
    )
}

/// The front door's host key file in the data folder.
pub fn host_key_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("ssh-host-ed25519.key")
}

/// The front door's own host key, made on first start (owner-only).
fn host_key(data_dir: &std::path::Path) -> anyhow::Result<ssh_key::PrivateKey> {
    use anyhow::Context;
    let path = host_key_path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => zeroize::Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let text = crate::ssh::ConnectionKey::new().openssh_private("poort host key");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            text
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    ssh_key::PrivateKey::from_openssh(text.as_bytes()).with_context(|| format!("{} is not an SSH key", path.display()))
}

/// The listener and what every connection shares.
pub struct FrontDoor {
    current: Current,
    config: Arc<russh::server::Config>,
    ca: Arc<crate::ssh::UserCa>,
    /// Open connections per person.
    open: Arc<Mutex<HashMap<String, usize>>>,
    serial: AtomicU64,
    preauth: Arc<PreAuth>,
}

impl FrontDoor {
    pub fn new(data_dir: &std::path::Path, idle: Duration, current: Current) -> anyhow::Result<Arc<FrontDoor>> {
        let ca = Arc::new(crate::ssh::UserCa::load_or_create(data_dir)?);
        let config = russh::server::Config {
            server_id: russh::SshId::Standard("SSH-2.0-poort".into()),
            methods: MethodSet::from(&[MethodKind::PublicKey, MethodKind::KeyboardInteractive][..]),
            keys: vec![host_key(data_dir)?],
            auth_rejection_time: Duration::from_millis(500),
            auth_rejection_time_initial: Some(Duration::ZERO),
            max_auth_attempts: 6,
            inactivity_timeout: Some(idle),
            keepalive_interval: Some(Duration::from_secs(30)),
            nodelay: true,
            // AES-GCM only: hardware AES makes it several times cheaper per byte than
            // ChaCha20-Poly1305, which OpenSSH's client would otherwise choose (it picks its own
            // first choice among those offered). OpenSSH 6.2+ and PuTTY 0.76+ speak it.
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(&[russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM]),
                ..Default::default()
            },
            ..Default::default()
        };
        let serial = AtomicU64::new(u64::from_be_bytes(crate::secret::random_bytes()) >> 16);
        Ok(Arc::new(FrontDoor {
            current,
            config: Arc::new(config),
            ca,
            open: Arc::default(),
            serial,
            preauth: Arc::default(),
        }))
    }

    /// The host key's public line, for people's `known_hosts`.
    pub fn host_public_line(&self) -> String {
        self.config.keys[0].public_key().to_openssh().unwrap_or_default()
    }

    /// Accepts connections until `stop` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut stop => return,
                got = listener.accept() => match got {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "Accepting an SSH connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Connections not signed in yet are bounded, in all and per address: a flood of
            // them never takes the file handles the gateway serves everyone else with.
            let Some(guard) = self.preauth.enter(peer.ip()) else {
                drop(stream);
                continue;
            };
            let door = self.clone();
            tokio::spawn(async move {
                let state = Arc::new(std::sync::atomic::AtomicU8::new(SIGNING_IN));
                let mut conn = Conn::new(door.clone(), peer);
                conn.preauth = Some(guard);
                conn.state = state.clone();
                let started =
                    tokio::time::timeout(GREETING, russh::server::run_stream(door.config.clone(), stream, conn));
                let running = match started.await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => return tracing::debug!(error = ?e, %peer, "SSH handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "SSH client sent no greeting in time"),
                };
                let watchdog = tokio::spawn(sign_in_deadline(running.handle(), state));
                if let Err(e) = running.await {
                    tracing::debug!(error = ?e, %peer, "SSH connection ended");
                }
                watchdog.abort();
            });
        }
    }
}

/// When a connection last carried bytes either way.
pub(crate) struct Activity {
    start: std::time::Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { start: crate::clock::instant(), last: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle` (keepalives do not count: they are not use).
    async fn idle(&self, idle: Duration) {
        let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::time::sleep(tick).await;
            let now = self.start.elapsed().as_millis() as u64;
            if Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed))) >= idle {
                return;
            }
        }
    }
}

/// How long a client has to send its greeting.
const GREETING: Duration = Duration::from_secs(20);
/// How long a client has to sign in (OpenSSH's `LoginGraceTime`), and how long while a code it
/// was shown waits for approval in the browser.
const SIGN_IN: Duration = Duration::from_secs(60);
const APPROVAL: Duration = Duration::from_secs(330);
/// Where a connection is in signing in.
const SIGNING_IN: u8 = 0;
const AWAITING_APPROVAL: u8 = 1;
const SIGNED_IN: u8 = 2;

/// Cuts a connection that has not signed in within its time.
async fn sign_in_deadline(handle: russh::server::Handle, state: Arc<std::sync::atomic::AtomicU8>) {
    let start = crate::clock::instant();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let limit = match state.load(Ordering::Relaxed) {
            SIGNED_IN => return,
            AWAITING_APPROVAL => APPROVAL,
            _ => SIGN_IN,
        };
        if start.elapsed() >= limit {
            let why = "poort: not signed in in time".to_string();
            let _ = handle.disconnect(russh::Disconnect::ByApplication, why, String::new()).await;
            return;
        }
    }
}

/// Connections not signed in yet: in all at most `PREAUTH_TOTAL`, from one address at most
/// `PREAUTH_PER_ADDRESS`.
const PREAUTH_TOTAL: usize = 256;
const PREAUTH_PER_ADDRESS: usize = 16;

#[derive(Default)]
struct PreAuth {
    open: Mutex<(usize, HashMap<std::net::IpAddr, usize>)>,
}

impl PreAuth {
    fn enter(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PreAuthGuard> {
        let mut o = self.open.lock();
        let here = o.1.get(&ip).copied().unwrap_or(0);
        if o.0 >= PREAUTH_TOTAL || here >= PREAUTH_PER_ADDRESS {
            return None;
        }
        o.0 += 1;
        *o.1.entry(ip).or_default() += 1;
        Some(PreAuthGuard { of: self.clone(), ip })
    }
}

/// One connection's place among those not signed in; given back on sign-in or close.
struct PreAuthGuard {
    of: Arc<PreAuth>,
    ip: std::net::IpAddr,
}

impl Drop for PreAuthGuard {
    fn drop(&mut self) {
        let mut o = self.of.open.lock();
        o.0 = o.0.saturating_sub(1);
        if let Some(n) = o.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                o.1.remove(&self.ip);
            }
        }
    }
}

/// What the SSH user name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ask {
    user: String,
    target: String,
    principal: Option<String>,
}

impl Ask {
    /// What the approval page says asks to sign in.
    fn purpose(&self) -> String {
        if self.target.is_empty() {
            return format!("An SSH connection for {} to poort (to jump to targets)", self.user);
        }
        match &self.principal {
            Some(p) => format!("An SSH connection for {} to {} (account {p})", self.user, self.target),
            None => format!("An SSH connection for {} to {}", self.user, self.target),
        }
    }

    /// `PERSON+TARGET[+ACCOUNT]`; a plain `PERSON` (target "") signs in for `ssh -J` only.
    fn parse(name: &str) -> Option<Ask> {
        if crate::names::valid_user_name(name) {
            return Some(Ask { user: name.to_string(), target: String::new(), principal: None });
        }
        let mut parts = name.split('+');
        let (user, target) = (parts.next()?, parts.next()?);
        let principal = parts.next().map(str::to_string);
        if parts.next().is_some()
            || !crate::names::valid_user_name(user)
            || !crate::names::valid_entry_name(target)
            || principal.as_deref().is_some_and(|p| p.is_empty() || p.len() > 32)
        {
            return None;
        }
        Some(Ask { user: user.to_string(), target: target.to_string(), principal })
    }
}

/// A connection that got in: its session, target, account, and the grant that ends it.
struct Link {
    session: Arc<Session>,
    target: SshTarget,
    principal: String,
    grant: Grant,
    started: std::time::Instant,
    /// The session is this connection's own and ends with it (not so for a connection
    /// through `ssh -J`, which uses the jump's session).
    owns_session: bool,
    /// The slot in the per-person count, given back when the connection ends.
    _slot: Slot,
}

struct Slot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        if let Some(n) = open.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// Why a sign-in was refused.
enum Refusal {
    /// Policy wants a second factor: the browser can give one, a key cannot.
    NeedsFactor,
    Refused,
}

/// A device-flow approval being waited for.
struct Pending {
    ask: Ask,
    device_code: String,
    user_code: String,
}

/// The connection to the target, made at the first channel, shared by the channels after it.
type TargetConn = russh::client::Handle<target::TargetCheck>;

/// One channel relayed to the target.
struct Chan {
    to: Option<Arc<russh::ChannelWriteHalf<russh::client::Msg>>>,
    /// The person's bytes, then end of input or close, in order, to a task that writes them to
    /// the target: reading the next packet from the person does not wait for the target.
    out: Option<mpsc::Sender<Out>>,
    /// Answers to the requests sent to the target, in order.
    replies: mpsc::Receiver<bool>,
    /// Why the target could not be reached, shown when the channel asks for something.
    failed: Option<String>,
    /// What it does, once it asked: `shell`, `exec ...`, `sftp`, `forward ...`.
    what: Arc<Mutex<Option<String>>>,
    recorder: Arc<Mutex<Option<recording::Recorder>>>,
    size: (u32, u32, String),
    counts: Arc<Counts>,
    /// For an SFTP channel: the files it touched.
    files: Arc<Mutex<Option<sftp::Files>>>,
}

/// What goes to the target's channel after the requests that started it.
enum Out {
    Data(bytes::Bytes),
    Eof,
    Close,
}

/// Writes what the person sent to the target's channel, in order; ends with the channel.
async fn write_out(to: Arc<russh::ChannelWriteHalf<russh::client::Msg>>, mut rx: mpsc::Receiver<Out>) {
    while let Some(o) = rx.recv().await {
        let done = match o {
            Out::Data(b) => to.data_bytes(b).await.is_err(),
            Out::Eof => to.eof().await.is_err(),
            Out::Close => {
                let _ = to.close().await;
                true
            }
        };
        if done {
            return;
        }
    }
}

#[derive(Default)]
struct Counts {
    up: AtomicU64,
    down: AtomicU64,
}

struct Conn {
    door: Arc<FrontDoor>,
    st: Arc<dyn AsRef<State> + Send + Sync>,
    peer: SocketAddr,
    pending: Option<Pending>,
    link: Option<Arc<Link>>,
    target: Option<Result<Arc<TargetConn>, String>>,
    chans: HashMap<ChannelId, Chan>,
    watch: Option<tokio::task::JoinHandle<()>>,
    /// Signed in as a person with no target: a jump host for `ssh -J` (its session).
    jump: Option<(Arc<Session>, std::time::Instant)>,
    /// A connection carried inside a jump's channel: the jump's session and the target the
    /// channel was opened to.
    jump_for: Option<(Arc<Session>, String)>,
    /// Its place among the connections not signed in yet (none once signed in).
    preauth: Option<PreAuthGuard>,
    /// Device codes this connection was given (one at most).
    codes: u32,
    /// Channels that asked to start something: numbers each one's recording.
    started: u32,
    /// When anything last moved either way, for the idle timeout.
    activity: Arc<Activity>,
    /// Why the gateway cut the connection, if it did.
    cut: Arc<Mutex<Option<&'static str>>>,
    /// Where it is in signing in, for its deadline.
    state: Arc<std::sync::atomic::AtomicU8>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.abort();
        }
        let st = self.st.clone();
        let cut = *self.cut.lock();
        if let Some((session, started)) = self.jump.take() {
            tokio::spawn(async move {
                let st = (*st).as_ref();
                let why = cut.or(session.lifeline().ended_now()).unwrap_or("connection closed");
                let _ = st.sessions.end(&session.id).await;
                let ev = Event::SshClosed {
                    user: session.identity.user.clone(),
                    session: session.id.clone(),
                    target: "(jump)".into(),
                    seconds: started.elapsed().as_secs(),
                    why: why.to_string(),
                };
                st.audit.note(ev).await;
            });
            return;
        }
        let Some(link) = self.link.take() else { return };
        tokio::spawn(async move {
            let st = (*st).as_ref();
            let why = cut.or(link.grant_ended_now()).unwrap_or("connection closed");
            // The session was this connection's own: it ends with it.
            if link.owns_session {
                let _ = st.sessions.end(&link.session.id).await;
            }
            let ev = Event::SshClosed {
                user: link.session.identity.user.clone(),
                session: link.session.id.clone(),
                target: link.target.name.clone(),
                seconds: link.started.elapsed().as_secs(),
                why: why.to_string(),
            };
            st.audit.note(ev).await;
        });
    }
}

impl Link {
    fn grant_ended_now(&self) -> Option<&'static str> {
        self.session.lifeline().ended_now()
    }
}

impl Conn {
    fn new(door: Arc<FrontDoor>, peer: SocketAddr) -> Conn {
        let st = (door.current)();
        Conn {
            door,
            st,
            peer,
            pending: None,
            link: None,
            target: None,
            chans: HashMap::new(),
            watch: None,
            jump: None,
            jump_for: None,
            preauth: None,
            codes: 0,
            started: 0,
            activity: Arc::new(Activity::new()),
            cut: Arc::default(),
            state: Arc::default(),
        }
    }

    fn st(&self) -> &State {
        (*self.st).as_ref()
    }

    /// Records a refusal the way tunnels do: counted per client and minute, no waiting.
    fn refused(&self, user: &str, target: &str, reason: &str) {
        let st = self.st();
        let ev = Event::AccessDenied {
            user: user.to_string(),
            session: String::new(),
            app: format!("ssh:{}", target.chars().take(64).collect::<String>()),
            reason: reason.to_string(),
            client: self.peer.ip(),
        };
        // Keyed by the reason, so that each kind of refusal from a client gets its first one
        // written; the one reason that holds what the client sent is keyed without it.
        let key = if reason.starts_with("account ") { "account not open to them" } else { reason };
        st.audit.refusal("access_denied", key, self.peer.ip(), target, ev);
    }

    /// The target and account `ask` names, if policy gives them to `who`; Err says why not.
    fn decide<'t>(
        &self,
        ask: &Ask,
        target: &'t SshTarget,
        who: Subject<'_>,
    ) -> Result<(policy::Permit<'t>, String), (Refusal, String)> {
        match policy::evaluate(Resource::Ssh(&target.name), &target.access, target.mfa, Some(who)) {
            Decision::Allow(p) => {
                let accounts = target.principals_for(who.identity);
                let principal = match &ask.principal {
                    Some(p) if accounts.contains(p) => p.clone(),
                    Some(p) => return Err((Refusal::Refused, format!("account {p:?} is not open to them"))),
                    None => match accounts.first() {
                        Some(p) => p.clone(),
                        None => return Err((Refusal::Refused, "no account on the target is open to them".into())),
                    },
                };
                Ok((p, principal))
            }
            Decision::Authenticate { step_up: true } => Err((Refusal::NeedsFactor, "needs a second factor".into())),
            Decision::Authenticate { step_up: false } => Err((Refusal::Refused, "not signed in".into())),
            Decision::Deny(reason) => Err((Refusal::Refused, reason.to_string())),
        }
    }

    /// Whether a lockdown keeps `user` out.
    async fn locked_out(&self, user: &str) -> bool {
        let st = self.st();
        if !st.mitigation.lockdown() {
            return false;
        }
        let (name, group) = (user.to_string(), st.mitigation.admin_group.clone());
        !st.store
            .run(move |c| Store::identity(c, &name))
            .await
            .ok()
            .flatten()
            .is_some_and(|id| id.groups.contains(&group))
    }

    /// Lets in the person `session` belongs to, for what `ask` names: the last checks (policy,
    /// account, the per-person limit), the grant, and the audit record, which must be written.
    async fn finish(&mut self, ask: &Ask, session: Arc<Session>, method: String) -> Result<(), Refusal> {
        let st = self.st();
        let Some(target) = st.cfg.ssh_targets.iter().find(|t| t.name == ask.target) else {
            self.refused(&ask.user, &ask.target, "no SSH target of that name");
            return Err(Refusal::Refused);
        };
        let who = Subject { identity: &session.identity, mfa: session.mfa() };
        let (permit, principal) = match self.decide(ask, target, who) {
            Ok(ok) => ok,
            Err((why, reason)) => {
                self.refused(&ask.user, &ask.target, &reason);
                return Err(why);
            }
        };
        let slot = {
            let mut open = self.door.open.lock();
            let n = open.entry(ask.user.clone()).or_default();
            if *n >= st.cfg.ssh.per_user {
                None
            } else {
                *n += 1;
                Some(Slot { open: self.door.open.clone(), user: ask.user.clone() })
            }
        };
        let Some(slot) = slot else {
            self.refused(&ask.user, &ask.target, "too many open SSH connections");
            return Err(Refusal::Refused);
        };
        let grant = st.grants.hold(&permit, Some(&session), &destination(target, &principal));
        let ev = Event::SshOpened {
            user: session.identity.user.clone(),
            session: session.id.clone(),
            target: target.name.clone(),
            principal: principal.clone(),
            method,
            client: self.peer.ip(),
        };
        if let Err(e) = st.audit.record(ev).await {
            tracing::error!(error = %e, "Audit unavailable; refusing the SSH connection");
            return Err(Refusal::Refused);
        }
        tracing::info!(user = %session.identity.user, target = %target.name, %principal, "SSH connection opened");
        let target = target.clone();
        self.link = Some(Arc::new(Link {
            session,
            target,
            principal,
            grant,
            started: crate::clock::instant(),
            owns_session: self.jump_for.is_none(),
            _slot: slot,
        }));
        Ok(())
    }

    /// A person signing in with a key and no target: a jump host for `ssh -J`. Each target is
    /// decided when a connection to it is carried (`channel_open_direct_tcpip`).
    async fn jump_login(&mut self, ask: &Ask, key: &crate::ssh::PublicKey) -> Result<(), Refusal> {
        let st = self.st();
        if self.locked_out(&ask.user).await {
            self.refused(&ask.user, "(jump)", "lockdown");
            return Err(Refusal::Refused);
        }
        let opening = Opening {
            user: &ask.user,
            host: &st.cfg.server.portal_host,
            client_addr: self.peer.ip().to_string(),
            user_agent: format!("ssh jump (key {})", key.fingerprint),
            factors: KEY_FACTORS,
            kind: Kind::Ssh,
            approved_by: None,
        };
        let Ok((_, token)) = st.sessions.open(opening).await else { return Err(Refusal::Refused) };
        let Ok(session) = st.sessions.lookup(&token.cookie_value).await else { return Err(Refusal::Refused) };
        let ev = Event::SshOpened {
            user: ask.user.clone(),
            session: session.id.clone(),
            target: "(jump)".into(),
            principal: String::new(),
            method: format!("key {}", key.fingerprint),
            client: self.peer.ip(),
        };
        if st.audit.record(ev).await.is_err() {
            let _ = st.sessions.end(&session.id).await;
            return Err(Refusal::Refused);
        }
        self.jump = Some((session, crate::clock::instant()));
        Ok(())
    }

    /// A registered key of the person the name names.
    async fn key_login(&mut self, ask: &Ask, key: crate::ssh::PublicKey) -> Result<(), Refusal> {
        let st = self.st();
        if ask.target.is_empty() {
            return self.jump_login(ask, &key).await;
        }
        let Some(target) = st.cfg.ssh_targets.iter().find(|t| t.name == ask.target) else {
            self.refused(&ask.user, &ask.target, "no SSH target of that name");
            return Err(Refusal::Refused);
        };
        if self.locked_out(&ask.user).await {
            self.refused(&ask.user, &ask.target, "lockdown");
            return Err(Refusal::Refused);
        }
        let name = ask.user.clone();
        let Ok(Some(identity)) = st.store.run(move |c| Store::identity(c, &name)).await else {
            return Err(Refusal::Refused);
        };
        // Decided before a session is made, so that a refusal leaves none behind.
        if let Err((why, reason)) =
            self.decide(ask, target, Subject { identity: &identity, mfa: KEY_FACTORS.second_factor() })
        {
            if matches!(why, Refusal::Refused) {
                self.refused(&ask.user, &ask.target, &reason);
            }
            return Err(why);
        }
        let opening = Opening {
            user: &ask.user,
            host: &st.cfg.server.portal_host,
            client_addr: self.peer.ip().to_string(),
            user_agent: format!("ssh to {} (key {})", ask.target, key.fingerprint),
            factors: KEY_FACTORS,
            kind: Kind::Ssh,
            approved_by: None,
        };
        let Ok((_, token)) = st.sessions.open(opening).await else { return Err(Refusal::Refused) };
        let Ok(session) = st.sessions.lookup(&token.cookie_value).await else { return Err(Refusal::Refused) };
        let now = st.clock.now();
        let (k2, fingerprint) = (key.clone(), key.fingerprint.clone());
        let _ = st.store.run(move |c| crate::ssh::touch_key(c, &k2, now)).await;
        let id = session.id.clone();
        let done = self.finish(ask, session, format!("key {fingerprint}")).await;
        if done.is_err() {
            let _ = self.st().sessions.end(&id).await;
        }
        done
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        // Only a connection carried through a jump, for the account it names: the person
        // signed in on the jump already.
        let Some((session, target)) = self.jump_for.clone() else { return Ok(Auth::reject()) };
        if self.link.is_some() || user.len() > 32 || session.ended() {
            return Ok(Auth::reject());
        }
        let ask = Ask { user: session.identity.user.clone(), target, principal: Some(user.to_string()) };
        Ok(match self.finish(&ask, session, "ssh -J".into()).await {
            Ok(()) => Auth::Accept,
            Err(_) => Auth::reject(),
        })
    }

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(&mut self, user: &str, key: &ssh_key::PublicKey) -> Result<Auth, Self::Error> {
        if self.jump_for.is_some() {
            return Ok(Auth::reject());
        }
        // Only a key registered by the person the name names is worth a signature.
        let (Some(ask), Some(key)) = (Ask::parse(user), parse_offered(key)) else { return Ok(Auth::reject()) };
        let owner = self.st().store.run(move |c| crate::ssh::owner(c, &key)).await.ok().flatten();
        Ok(if owner.as_deref() == Some(ask.user.as_str()) { Auth::Accept } else { Auth::reject() })
    }

    async fn auth_publickey(&mut self, user: &str, key: &ssh_key::PublicKey) -> Result<Auth, Self::Error> {
        if self.link.is_some() || self.jump.is_some() || self.jump_for.is_some() {
            return Ok(Auth::reject());
        }
        let (Some(ask), Some(key)) = (Ask::parse(user), parse_offered(key)) else { return Ok(Auth::reject()) };
        let k2 = key.clone();
        let owner = self.st().store.run(move |c| crate::ssh::owner(c, &k2)).await.ok().flatten();
        if owner.as_deref() != Some(ask.user.as_str()) {
            // A signed attempt with a key that is not theirs (a client that did not ask first).
            self.refused(&ask.user, &ask.target, "a key not registered to them");
            return Ok(Auth::reject());
        }
        Ok(match self.key_login(&ask, key).await {
            Ok(()) => Auth::Accept,
            Err(Refusal::NeedsFactor) => Auth::Reject {
                proceed_with_methods: Some(MethodSet::from(&[MethodKind::KeyboardInteractive][..])),
                partial_success: false,
            },
            Err(Refusal::Refused) => Auth::reject(),
        })
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        if self.link.is_some() || self.jump.is_some() || self.jump_for.is_some() {
            return Ok(Auth::reject());
        }
        let Some(ask) = Ask::parse(user) else { return Ok(Auth::reject()) };
        let pending = self.pending.take().filter(|p| p.ask == ask);
        let pending = match (pending, response.is_some()) {
            (Some(p), true) => p,
            (pending, _) => {
                // A round that shows the code: one code pair per connection (asked again, the
                // same one), and each counts against the address's sign-in limit. Whether the
                // target or the person exists is not said here: only after approval.
                let st_ref = self.st.clone();
                let st: &State = (*st_ref).as_ref();
                let (user_code, device_code) = match pending {
                    Some(p) => (p.user_code, p.device_code),
                    None if self.codes > 0 => return Ok(Auth::reject()),
                    None => {
                        if crate::portal::attempt_allowed(st, self.peer.ip()).await != Some(true) {
                            return Ok(Auth::reject());
                        }
                        let Ok(pair) =
                            crate::portal::device::start(st, &self.peer.ip().to_string(), &ask.purpose()).await
                        else {
                            return Ok(Auth::reject());
                        };
                        self.codes += 1;
                        pair
                    }
                };
                let url = format!("{}/.poort/device?code={user_code}", st.cfg.server.external_origin);
                let instructions = format!(
                    "To sign in as {}, open\n\n    {url}\n\nin a browser where you are signed in to poort, check that it shows the code {user_code}, and approve it. Waiting...\n",
                    ask.user
                );
                self.state.store(AWAITING_APPROVAL, Ordering::Relaxed);
                self.pending = Some(Pending { ask, device_code, user_code });
                return Ok(Auth::Partial {
                    name: "poort".into(),
                    instructions: instructions.into(),
                    prompts: Vec::new().into(),
                });
            }
        };
        let st = self.st();
        let token = crate::portal::device::wait(st, &pending.device_code, Duration::from_secs(300)).await;
        let Some(token) = token else { return Ok(Auth::reject()) };
        let Ok(session) = st.sessions.lookup(&token).await else { return Ok(Auth::reject()) };
        if session.identity.user != ask.user || self.locked_out(&ask.user).await {
            // Approved by someone else than the name says: the session is not theirs to use.
            let _ = st.sessions.end(&session.id).await;
            self.refused(&ask.user, &ask.target, "approved by another person than the SSH user name names");
            return Ok(Auth::reject());
        }
        let id = session.id.clone();
        if ask.target.is_empty() {
            let ev = Event::SshOpened {
                user: ask.user.clone(),
                session: id.clone(),
                target: "(jump)".into(),
                principal: String::new(),
                method: "approved in the browser".into(),
                client: self.peer.ip(),
            };
            if st.audit.record(ev).await.is_err() {
                let _ = st.sessions.end(&id).await;
                return Ok(Auth::reject());
            }
            self.jump = Some((session, crate::clock::instant()));
            return Ok(Auth::Accept);
        }
        Ok(match self.finish(&ask, session, "approved in the browser".into()).await {
            Ok(()) => Auth::Accept,
            Err(_) => {
                let _ = self.st().sessions.end(&id).await;
                Auth::reject()
            }
        })
    }

    async fn auth_succeeded(&mut self, session: &mut SshSession) -> Result<(), Self::Error> {
        self.preauth = None;
        self.state.store(SIGNED_IN, Ordering::Relaxed);
        let handle = session.handle();
        let (activity, idle, cut) = (self.activity.clone(), self.st().cfg.ssh.idle_timeout, self.cut.clone());
        if let Some((jump, _)) = &self.jump {
            let line = jump.lifeline();
            self.watch = Some(tokio::spawn(async move {
                let why = tokio::select! {
                    why = line.ended() => why,
                    _ = activity.idle(idle) => "idle",
                };
                *cut.lock() = Some(why);
                let _ =
                    handle.disconnect(russh::Disconnect::ByApplication, format!("poort: {why}"), String::new()).await;
            }));
            return Ok(());
        }
        let Some(link) = self.link.clone() else { return Err(russh::Error::NotAuthenticated) };
        // The connection lives as long as its grant: a revocation, lockdown, expiry or a
        // config change that takes the target away cuts it at once.
        self.watch = Some(tokio::spawn(async move {
            let why = tokio::select! {
                why = link.grant.ended() => why,
                _ = activity.idle(idle) => "idle",
            };
            *cut.lock() = Some(why);
            tracing::info!(user = %link.session.identity.user, target = %link.target.name, why, "SSH connection cut");
            let _ = handle.disconnect(russh::Disconnect::ByApplication, format!("poort: {why}"), String::new()).await;
        }));
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        if let Some((jump, _)) = &self.jump {
            let (replies_tx, replies) = mpsc::channel(1);
            drop(replies_tx);
            let (user, host) = (jump.identity.user.clone(), self.st().cfg.server.portal_host.clone());
            let port = self.st().cfg.ssh.listen.map_or(22, |a| a.port());
            let (p, colon) =
                if port == 22 { (String::new(), String::new()) } else { (format!("-p {port} "), format!(":{port}")) };
            let failed =
                format!("name a target: ssh {p}{user}+TARGET@{host}, or ssh -J {user}@{host}{colon} ACCOUNT@TARGET");
            let chan = Chan {
                to: None,
                out: None,
                replies,
                failed: Some(failed),
                what: Arc::default(),
                recorder: Arc::default(),
                size: (80, 24, String::new()),
                counts: Arc::default(),
                files: Arc::default(),
            };
            self.chans.insert(channel.id(), chan);
            decide_open(reply, true).await;
            return Ok(());
        }
        decide_open(reply, self.open_channel(channel.id(), session, None).await).await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        if let Some((jump, _)) = &self.jump {
            // `ssh -J person@gate ACCOUNT@TARGET`: the client speaks SSH to "TARGET" inside
            // this channel, and poort answers it as that target would, with the same checks and
            // recording as `person+TARGET+ACCOUNT`.
            let known = self.st().cfg.ssh_targets.iter().any(|t| t.name == host_to_connect);
            if !known || jump.ended() {
                self.refused(&jump.identity.user, host_to_connect, "no SSH target of that name");
                decide_open(reply, false).await;
                return Ok(());
            }
            let mut inner = Conn::new(self.door.clone(), self.peer);
            inner.st = self.st.clone();
            inner.jump_for = Some((jump.clone(), host_to_connect.to_string()));
            let config = self.door.config.clone();
            decide_open(reply, true).await;
            tokio::spawn(async move {
                match russh::server::run_stream(config, channel.into_stream(), inner).await {
                    Ok(running) => {
                        let _ = running.await;
                    }
                    Err(e) => tracing::debug!(error = ?e, "SSH through a jump failed"),
                }
            });
            return Ok(());
        }
        let allowed = self.link.as_ref().is_some_and(|l| l.target.allow.forward);
        if !allowed || host_to_connect.len() > 255 || port_to_connect > 65535 {
            decide_open(reply, false).await;
            return Ok(());
        }
        let to = (host_to_connect.to_string(), port_to_connect, originator_address.to_string(), originator_port);
        decide_open(reply, self.open_channel(channel.id(), session, Some(to)).await).await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(russh::Pty, u32)],
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        // A jump's own channel takes a terminal too, to say how to name a target.
        let allowed =
            self.jump.is_some() || self.link.as_ref().is_some_and(|l| l.target.allow.shell || l.target.allow.exec);
        let Some(c) = self.chans.get_mut(&channel) else { return Ok(()) };
        c.size = (col_width, row_height, term.chars().take(64).collect());
        let ok = allowed
            && match &c.to {
                Some(to) => {
                    to.request_pty(true, term, col_width, row_height, pix_width, pix_height, modes).await.is_ok()
                        && reply(&mut c.replies).await
                }
                None => true,
            };
        answer(session, channel, ok)
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut SshSession) -> Result<(), Self::Error> {
        self.start(channel, session, Start::Shell).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        self.start(channel, session, Start::Exec(data.to_vec())).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        self.start(channel, session, Start::Subsystem(name.to_string())).await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self.chans.get_mut(&channel) {
            c.size.0 = col_width;
            c.size.1 = row_height;
            if let Some(to) = &c.to {
                let _ = to.window_change(col_width, row_height, pix_width, pix_height).await;
            }
            if let Some(r) = c.recorder.lock().as_mut() {
                r.resize(col_width, row_height);
            }
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: russh::Sig,
        _session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        if let Some(to) = self.chans.get(&channel).and_then(|c| c.to.as_ref()) {
            let _ = to.signal(signal).await;
        }
        Ok(())
    }

    async fn data(&mut self, channel: ChannelId, data: &[u8], _session: &mut SshSession) -> Result<(), Self::Error> {
        let Some(c) = self.chans.get(&channel) else { return Ok(()) };
        // Nothing reaches the target before policy said what this channel may do.
        if c.what.lock().is_none() {
            return Ok(());
        }
        if let Some(r) = c.recorder.lock().as_mut() {
            r.input(data);
        }
        if let Some(f) = c.files.lock().as_mut() {
            f.feed(data);
        }
        c.counts.up.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.activity.touch();
        if let Some(out) = &c.out
            && out.send(Out::Data(bytes::Bytes::copy_from_slice(data))).await.is_err()
        {
            return Ok(());
        }
        if let Some(l) = &self.link {
            l.session.touch(self.st().clock.now());
        }
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, _session: &mut SshSession) -> Result<(), Self::Error> {
        if let Some(out) = self.chans.get(&channel).and_then(|c| c.out.as_ref()) {
            let _ = out.send(Out::Eof).await;
        }
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut SshSession) -> Result<(), Self::Error> {
        if let Some(c) = self.chans.remove(&channel)
            && let Some(out) = &c.out
        {
            let _ = out.send(Out::Close).await;
        }
        Ok(())
    }
}

/// Accepts or refuses a channel the client asked to open.
async fn decide_open(reply: russh::server::ChannelOpenHandle, ok: bool) {
    if ok { reply.accept().await } else { reply.reject(russh::ChannelOpenFailure::AdministrativelyProhibited).await }
}

/// A key as offered, in the form poort registers keys in; None for a type it does not take.
fn parse_offered(key: &ssh_key::PublicKey) -> Option<crate::ssh::PublicKey> {
    let line = key.to_openssh().ok()?;
    crate::ssh::parse_public_key(&line).ok()
}

/// Answers a channel request the client may be waiting on.
fn answer(session: &mut SshSession, channel: ChannelId, ok: bool) -> Result<(), russh::Error> {
    if ok { session.channel_success(channel) } else { session.channel_failure(channel) }
}

/// A command as the audit log shows it: whole up to 500 characters; a longer one cut there,
/// with its length and SHA-256, so that what ran is known exactly.
fn shown_command(cmd: &[u8]) -> String {
    let text = String::from_utf8_lossy(cmd);
    if text.chars().count() <= 500 {
        return text.into_owned();
    }
    let head: String = text.chars().take(500).collect();
    let sum = crate::secret::hex(ring::digest::digest(&ring::digest::SHA256, cmd).as_ref());
    format!("{head}… ({} bytes, sha256 {sum})", cmd.len())
}

/// Says why on the channel itself (standard error), so that the person reads it, and ends it.
fn tell(session: &mut SshSession, channel: ChannelId, why: String) -> Result<(), russh::Error> {
    answer(session, channel, true)?;
    let handle = session.handle();
    tokio::spawn(async move {
        let _ = handle.extended_data(channel, 1, format!("poort: {why}\r\n").into_bytes()).await;
        let _ = handle.exit_status_request(channel, 255).await;
        let _ = handle.eof(channel).await;
        let _ = handle.close(channel).await;
    });
    Ok(())
}

/// The target's answer to the request just sent; no answer in 10 s is a no.
async fn reply(replies: &mut mpsc::Receiver<bool>) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(10), replies.recv()).await, Ok(Some(true)))
}

/// What a session channel asks to start.
enum Start {
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
}

impl Conn {
    /// Opens the channel's twin on the target (connecting to it first, for the first channel).
    async fn open_channel(
        &mut self,
        id: ChannelId,
        session: &mut SshSession,
        forward: Option<(String, u32, String, u32)>,
    ) -> bool {
        let Some(link) = self.link.clone() else { return false };
        if link.session.ended() || self.chans.len() >= 16 {
            return false;
        }
        if self.target.is_none() {
            self.target = Some(self.connect(&link).await);
        }
        let (replies_tx, replies) = mpsc::channel(8);
        let mut chan = Chan {
            to: None,
            out: None,
            replies,
            failed: None,
            what: Arc::default(),
            recorder: Arc::default(),
            size: (80, 24, "xterm".into()),
            counts: Arc::default(),
            files: Arc::default(),
        };
        let target = match self.target.as_ref() {
            Some(Ok(t)) => t.clone(),
            Some(Err(why)) => {
                if forward.is_some() {
                    return false;
                }
                chan.failed = Some(why.clone());
                self.chans.insert(id, chan);
                return true;
            }
            None => return false,
        };
        let opened = match &forward {
            None => target.channel_open_session().await,
            Some((host, port, from, from_port)) => {
                target.channel_open_direct_tcpip(host.clone(), *port, from.clone(), *from_port).await
            }
        };
        let Ok(to) = opened else {
            if forward.is_some() {
                return false;
            }
            chan.failed = Some(format!("{} did not open a session", link.target.name));
            self.chans.insert(id, chan);
            return true;
        };
        let (read, write) = to.split();
        let write = Arc::new(write);
        let (out, rx) = mpsc::channel(64);
        tokio::spawn(write_out(write.clone(), rx));
        chan.to = Some(write);
        chan.out = Some(out);
        if let Some((host, port, _, _)) = &forward {
            *chan.what.lock() = Some(format!("forward {host}:{port}"));
        }
        let pump = Pump {
            st: self.st.clone(),
            link,
            handle: session.handle(),
            id,
            replies: replies_tx,
            what: chan.what.clone(),
            recorder: chan.recorder.clone(),
            counts: chan.counts.clone(),
            files: chan.files.clone(),
            activity: self.activity.clone(),
        };
        tokio::spawn(pump.run(read));
        self.chans.insert(id, chan);
        true
    }

    /// Connects and signs in to the target with a certificate made for this connection.
    async fn connect(&self, link: &Link) -> Result<Arc<TargetConn>, String> {
        let serial = self.door.serial.fetch_add(1, Ordering::Relaxed);
        let to = target::To {
            session: &link.session,
            target: &link.target,
            principal: &link.principal,
            client: self.peer.ip(),
        };
        target::connect(&Parts::of(self.st()), &self.door.ca, serial, &to).await.map(Arc::new)
    }

    /// Policy for what a channel asks to do, then the request to the target.
    async fn start(&mut self, channel: ChannelId, session: &mut SshSession, start: Start) -> Result<(), russh::Error> {
        let Some(link) = self.link.clone() else {
            // A jump's own session channel: it only says how to name a target.
            return match self.chans.get(&channel).and_then(|c| c.failed.clone()) {
                Some(why) => tell(session, channel, why),
                None => answer(session, channel, false),
            };
        };
        self.started += 1;
        let (st, n) = (self.st.clone(), self.started);
        let st: &State = (*st).as_ref();
        let Some(c) = self.chans.get_mut(&channel) else { return answer(session, channel, false) };
        if c.what.lock().is_some() {
            return answer(session, channel, false);
        }
        let allow = link.target.allow;
        let (what, allowed, recorded) = match &start {
            Start::Shell => ("shell".to_string(), allow.shell, true),
            // Every command is a command, whatever it starts with (legacy scp too: OpenSSH's
            // scp speaks SFTP), allowed by `exec` and recorded.
            Start::Exec(cmd) => (format!("exec {}", shown_command(cmd)), allow.exec, true),
            Start::Subsystem(name) => {
                if name == "sftp" {
                    *c.files.lock() = Some(sftp::Files::default());
                }
                (format!("subsystem {name}"), name == "sftp" && allow.sftp, false)
            }
        };
        if !allowed {
            tracing::info!(user = %link.session.identity.user, target = %link.target.name, what, "SSH channel refused by policy");
            let ev = Event::AccessDenied {
                user: link.session.identity.user.clone(),
                session: link.session.id.clone(),
                app: format!("ssh:{}", link.target.name),
                reason: format!("{what} is not allowed on this target"),
                client: self.peer.ip(),
            };
            st.audit.note(ev).await;
            return answer(session, channel, false);
        }
        if let Some(why) = c.failed.clone() {
            return tell(session, channel, why);
        }
        let size = (c.size.0, c.size.1, c.size.2.clone());
        let parts = Parts::of(st);
        let about =
            Channel1 { parts: &parts, session: &link.session, target: &link.target, principal: &link.principal, n };
        match about.open(&what, recorded && link.target.record, size).await {
            Ok(r) => *c.recorder.lock() = r,
            Err(why) => {
                tracing::error!(why, "Refusing the SSH channel");
                return answer(session, channel, false);
            }
        }
        *c.what.lock() = Some(what);
        let Some(to) = &c.to else { return answer(session, channel, false) };
        let sent = match start {
            Start::Shell => to.request_shell(true).await,
            Start::Exec(cmd) => to.exec(true, cmd).await,
            Start::Subsystem(name) => to.request_subsystem(true, name).await,
        };
        let ok = sent.is_ok() && reply(&mut c.replies).await;
        answer(session, channel, ok)
    }
}

/// A channel about to start: who, where, as whom, and its number in the connection.
pub(crate) struct Channel1<'a> {
    pub parts: &'a Parts,
    pub session: &'a Session,
    pub target: &'a SshTarget,
    pub principal: &'a str,
    pub n: u32,
}

impl Channel1<'_> {
    /// Starts the channel's recording (when `record`) and writes its audit record; a channel
    /// that cannot be recorded or audited does not start.
    pub async fn open(
        &self,
        what: &str,
        record: bool,
        size: (u32, u32, String),
    ) -> Result<Option<recording::Recorder>, &'static str> {
        let st = self.parts;
        let recorder = if record {
            let name = format!("{}-{}-{}.cast", format_stamp(st.clock.now()), self.session.id, self.n);
            let title = format!("{} on {} as {}: {what}", self.session.identity.user, self.target.name, self.principal);
            let h = recording::Header {
                width: size.0,
                height: size.1,
                timestamp: st.clock.now(),
                title: &title,
                term: &size.2,
            };
            match recording::Recorder::create(&recording::folder(&st.cfg.data_dir), &name, &h) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(error = %e, "Cannot record");
                    return Err("the recording cannot be written");
                }
            }
        } else {
            None
        };
        let ev = Event::SshChannelOpened {
            user: self.session.identity.user.clone(),
            session: self.session.id.clone(),
            target: self.target.name.clone(),
            principal: self.principal.to_string(),
            what: what.to_string(),
            recording: recorder.as_ref().map(|r| r.name().to_string()).unwrap_or_default(),
        };
        if st.audit.record(ev).await.is_err() {
            return Err("the audit log is unavailable");
        }
        Ok(recorder)
    }
}

/// `YYYYMMDDTHHMMSSZ`, for recording names that sort by time.
fn format_stamp(t: i64) -> String {
    crate::clock::format_utc(t).replace(['-', ':'], "")
}

/// Carries one channel from the target back to the person, and records it.
struct Pump {
    st: Arc<dyn AsRef<State> + Send + Sync>,
    link: Arc<Link>,
    handle: russh::server::Handle,
    id: ChannelId,
    replies: mpsc::Sender<bool>,
    what: Arc<Mutex<Option<String>>>,
    recorder: Arc<Mutex<Option<recording::Recorder>>>,
    counts: Arc<Counts>,
    files: Arc<Mutex<Option<sftp::Files>>>,
    activity: Arc<Activity>,
}

impl Pump {
    async fn run(self, mut read: russh::ChannelReadHalf) {
        let started = crate::clock::instant();
        let mut exit_status = None;
        while let Some(msg) = read.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    let full = self.seen(&data);
                    if self.handle.data(self.id, data).await.is_err() {
                        break;
                    }
                    if full {
                        self.say_full().await;
                        break;
                    }
                }
                ChannelMsg::ExtendedData { data, ext } => {
                    let full = self.seen(&data);
                    if self.handle.extended_data(self.id, ext, data).await.is_err() {
                        break;
                    }
                    if full {
                        self.say_full().await;
                        break;
                    }
                }
                ChannelMsg::Eof => {
                    let _ = self.handle.eof(self.id).await;
                }
                ChannelMsg::ExitStatus { exit_status: s } => {
                    exit_status = Some(s);
                    let _ = self.handle.exit_status_request(self.id, s).await;
                }
                ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, lang_tag } => {
                    let _ = self
                        .handle
                        .exit_signal_request(self.id, signal_name, core_dumped, error_message, lang_tag)
                        .await;
                }
                ChannelMsg::Success => {
                    let _ = self.replies.try_send(true);
                }
                ChannelMsg::Failure => {
                    let _ = self.replies.try_send(false);
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = self.handle.close(self.id).await;
        let (recording, sha256) = match self.recorder.lock().take() {
            Some(r) => r.finish(),
            None => (String::new(), String::new()),
        };
        let what = self.what.lock().take();
        let Some(what) = what else { return };
        let mut files = Vec::new();
        if let Some(f) = self.files.lock().take() {
            files = f.seen;
            if f.more > 0 {
                files.push(format!("and {} more", f.more));
            }
        }
        let l = &self.link;
        let ev = Event::SshChannelClosed {
            user: l.session.identity.user.clone(),
            session: l.session.id.clone(),
            target: l.target.name.clone(),
            principal: l.principal.clone(),
            what,
            bytes_in: self.counts.up.load(Ordering::Relaxed),
            bytes_out: self.counts.down.load(Ordering::Relaxed),
            seconds: started.elapsed().as_secs(),
            recording,
            sha256,
            exit_status,
            files,
        };
        (*self.st).as_ref().audit.note(ev).await;
    }

    /// Counts and records what the target sent; true once the recording is full.
    fn seen(&self, data: &[u8]) -> bool {
        self.counts.down.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.activity.touch();
        match self.recorder.lock().as_mut() {
            Some(r) => {
                r.output(data);
                r.full()
            }
            None => false,
        }
    }

    /// A recorded session whose recording reached its limit ends: it is never unrecorded.
    async fn say_full(&self) {
        let text = b"\r\npoort: this session's recording reached its limit; the session ends.\r\n".to_vec();
        let _ = self.handle.extended_data(self.id, 1, text).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_name_splits_one_way() {
        let a = |u: &str, t: &str, p: Option<&str>| {
            Some(Ask { user: u.into(), target: t.into(), principal: p.map(Into::into) })
        };
        assert_eq!(Ask::parse("alice+db1"), a("alice", "db1", None));
        assert_eq!(Ask::parse("alice@example.com+db1+root"), a("alice@example.com", "db1", Some("root")));
        for bad in ["alice+", "+db1", "alice+db1+", "alice+db1+root+x", "alice+DB 1", "al ice+db1", ""] {
            assert_eq!(Ask::parse(bad), None, "{bad:?}");
        }
    }
}

//! Sessions (docs/threat-model.md, rule 10): 256-bit random tokens in a `__Host-` cookie, stored only as
//! SHA-256 hashes; idle and absolute timeouts; a memory cache in front of the store so that a
//! request with a known session costs no database query; revocations from other processes
//! arrive through the store's `revocations` table.
//!
//! Each live session has a `Line`, shared by every copy of it in memory: when the session ends
//! (logout, revocation, a disabled user, expiry, a lockdown that leaves it out) the line is
//! cut, and every WebSocket, tunnel and response stream that holds a `Lifeline` to it ends.

pub mod cookie;
mod factors;
pub mod grant;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::clock::{Clock, UnixTime};
use crate::config::SessionTimeouts;
use crate::identity::Identity;
use crate::store::{Expiry, SessionRow, Store};

pub use cookie::{CSRF_COOKIE, SESSION_COOKIE};
pub use factors::{Factor, Factors};

/// The SHA-256 of a token: what the store and cache are keyed by.
pub type TokenHash = [u8; 32];

/// A fresh token: its cookie form (43 base64url characters) and its hash.
pub struct NewToken {
    pub cookie_value: String,
    pub hash: TokenHash,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewToken(..)")
    }
}

pub fn new_token() -> NewToken {
    let raw: [u8; 32] = crate::secret::random_bytes();
    NewToken { cookie_value: cookie::encode_token(&raw), hash: hash_token(&raw) }
}

/// SHA-256 of a token (a session's raw bytes, or a nonce as its cookie carries it).
pub fn hash_token(raw: &[u8]) -> TokenHash {
    crate::secret::sha256(raw)
}

/// A short public identifier for listing and revoking a session; not a credential. Never
/// starts with `-`, so that a command line does not take it for an option.
pub fn new_session_id() -> String {
    loop {
        let id = crate::secret::b64(&crate::secret::random_bytes::<9>());
        if !id.starts_with('-') {
            return id;
        }
    }
}

/// Why a line is cut when the user's groups change.
pub const GROUPS_CHANGED: &str = "groups changed";

/// How long a proof of who the user is counts as fresh: changing factors and approving a
/// command-line sign-in need one this recent ("sudo mode").
pub const FRESH_FOR: i64 = 300;

/// Where a session is used from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A browser: the portal and apps.
    Browser,
    /// The `poort` command line: tunnels and its own sign-out, nothing else.
    Cli,
    /// One connection at the SSH front door: its token never leaves the gateway.
    Ssh,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Browser => "browser",
            Kind::Cli => "cli",
            Kind::Ssh => "ssh",
        }
    }

    fn parse(s: &str) -> Kind {
        match s {
            "cli" => Kind::Cli,
            "ssh" => Kind::Ssh,
            _ => Kind::Browser,
        }
    }
}

/// What every copy of one live session in memory shares: its activity, and the switch that
/// ends its long connections.
#[derive(Debug)]
pub struct Line {
    cut: watch::Sender<Option<&'static str>>,
    /// Set once `cut` is: a cheap look for the request path.
    is_cut: std::sync::atomic::AtomicBool,
    expires_at: UnixTime,
    created_at: UnixTime,
    last_seen: AtomicI64,
    persisted_seen: AtomicI64,
    user: String,
    /// The user's groups as last loaded (a lockdown keeps only one group's lines).
    groups: Mutex<Vec<String>>,
}

impl Line {
    fn is_cut(&self) -> bool {
        self.is_cut.load(Ordering::Acquire)
    }

    fn cut(&self, why: &'static str) {
        self.cut.send_if_modified(|v| {
            let first = v.is_none();
            if first {
                *v = Some(why);
            }
            first
        });
        self.is_cut.store(true, Ordering::Release);
    }
}

/// A hold on a session's line: says whether, and waits until, the session ended.
#[derive(Debug, Clone)]
pub struct Lifeline(Arc<Line>);

impl Lifeline {
    /// Why the session ended, if it has.
    pub fn ended_now(&self) -> Option<&'static str> {
        if self.0.is_cut() { *self.0.cut.borrow() } else { None }
    }

    /// Waits until the session ends.
    pub async fn ended(self) -> &'static str {
        let mut rx = self.0.cut.subscribe();
        loop {
            if let Some(why) = *rx.borrow_and_update() {
                return why;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// A live session as the gateway holds it in memory.
#[derive(Debug)]
pub struct Session {
    pub id: String,
    pub identity: Identity,
    /// The host this token was issued for.
    pub host: String,
    pub created_at: UnixTime,
    pub expires_at: UnixTime,
    pub client_addr: String,
    pub user_agent: String,
    pub factors: Factors,
    /// When the user last gave their password or signed in at a provider.
    pub auth_at: UnixTime,
    /// When the user last proved a second factor, if ever, in this session or the one it
    /// was renewed from.
    pub factor_at: Option<UnixTime>,
    pub kind: Kind,
    /// The session that approved this one.
    pub parent: Option<String>,
    /// The first session of the sign-in this one was renewed from: the same browser through
    /// step-ups and confirmations (a command-line code is bound to it).
    pub chain: String,
    line: Arc<Line>,
}

impl Session {
    pub fn last_seen(&self) -> UnixTime {
        self.line.last_seen.load(Ordering::Relaxed)
    }

    /// Marks the session as used now (a busy tunnel keeps it from idling out).
    pub fn touch(&self, now: UnixTime) {
        self.line.last_seen.fetch_max(now, Ordering::Relaxed);
    }

    /// Whether the session has ended (its line is cut for a reason other than a change of
    /// the user's groups, which ends what the session holds open but not the session).
    pub fn ended(&self) -> bool {
        self.line.is_cut() && *self.line.cut.borrow() != Some(GROUPS_CHANGED)
    }

    /// Ends when the session ends.
    pub fn lifeline(&self) -> Lifeline {
        Lifeline(self.line.clone())
    }

    /// Whether the user proved who they are within `FRESH_FOR`: with a second factor when they
    /// have one (`has_factor`); otherwise a password or a sign-in at a provider will do.
    pub fn fresh(&self, now: UnixTime, has_factor: bool) -> bool {
        let proof = if has_factor { self.factor_at } else { Some(self.factor_at.unwrap_or(0).max(self.auth_at)) };
        proof.is_some_and(|t| t <= now && now - t < FRESH_FOR)
    }

    /// Whether the session was opened or stepped up with a second factor. `pwd` (a password)
    /// and `ext` (an identity provider that did not vouch for a second factor) are one factor.
    pub fn mfa(&self) -> bool {
        self.factors.second_factor()
    }

    /// Whether the session was opened through an identity provider (it has no password).
    pub fn single_sign_on(&self) -> bool {
        self.factors.has(Factor::Ext)
    }

    /// The factors as `amr` values for an assertion.
    pub fn amr(&self) -> Vec<&'static str> {
        self.factors.amr()
    }
}

/// Why a presented session is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No cookie, a malformed one, or an unknown token.
    None,
    /// Known, but past its idle or absolute timeout: now deleted.
    Expired { idle: bool },
    /// The store has not answered for longer than the outage grace: no session is served.
    Unavailable,
}

pub struct Sessions {
    store: Store,
    clock: Arc<dyn Clock>,
    /// Changed by a reload: applies to every session from then on.
    timeouts: RwLock<SessionTimeouts>,
    cache: RwLock<HashMap<TokenHash, Arc<Session>>>,
    last_revocation: AtomicI64,
    /// When the store last answered the revocation poll, in milliseconds since `started`.
    store_answered: AtomicU64,
    /// Set while the store has been silent past the outage grace (by `end_all_past_grace`,
    /// which a task runs four times a second), so that a request only reads a flag.
    past_grace: std::sync::atomic::AtomicBool,
    started: std::time::Instant,
    /// The line of every session in memory, by id.
    lines: Mutex<HashMap<String, Arc<Line>>>,
}

/// How a new session comes about.
#[derive(Debug)]
pub struct Opening<'a> {
    pub user: &'a str,
    pub host: &'a str,
    pub client_addr: String,
    pub user_agent: String,
    /// `amr` values, space-separated.
    pub factors: Factors,
    pub kind: Kind,
    /// A session derived from another (a command-line sign-in its browser approved) keeps
    /// that session's expiry and proof times: approving cannot make a session younger.
    pub approved_by: Option<&'a Session>,
}

/// What a renewal records.
#[derive(Debug, Clone, Copy)]
pub enum Proof {
    /// A second factor.
    Factor(Factor),
    /// The password again.
    Password,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions")
    }
}

/// Last-seen times are written back at most this often per session.
const TOUCH_EVERY: i64 = 30;

impl Sessions {
    pub fn new(store: Store, clock: Arc<dyn Clock>, timeouts: SessionTimeouts) -> anyhow::Result<Sessions> {
        let last = store.last_revocation()?;
        Ok(Sessions {
            store,
            clock,
            timeouts: RwLock::new(timeouts),
            cache: RwLock::new(HashMap::new()),
            last_revocation: AtomicI64::new(last),
            store_answered: AtomicU64::new(0),
            past_grace: std::sync::atomic::AtomicBool::new(false),
            started: crate::clock::instant(),
            lines: Mutex::new(HashMap::new()),
        })
    }

    pub fn timeouts(&self) -> SessionTimeouts {
        *self.timeouts.read()
    }

    /// Applies changed `[session]` timeouts (a reload).
    pub fn set_timeouts(&self, t: SessionTimeouts) {
        *self.timeouts.write() = t;
    }

    /// Some(idle) if a session past its expiry, or idle too long, or older than the absolute
    /// timeout in force now (a reload that shortens it reaches sessions already open).
    fn expired(&self, expires_at: UnixTime, created_at: UnixTime, last_seen: UnixTime, now: UnixTime) -> Option<bool> {
        let end = expires_at.min(created_at.saturating_add(self.timeouts().absolute.as_secs() as i64));
        if now >= end {
            Some(false)
        } else if now - last_seen >= self.timeouts().idle.as_secs() as i64 {
            Some(true)
        } else {
            None
        }
    }

    /// Finds the live session for a cookie value. Cache first; the store only on a miss.
    pub async fn lookup(&self, cookie_value: &str) -> Result<Arc<Session>, (Lookup, Option<Arc<Session>>)> {
        let Some(hash) = cookie::decode_token(cookie_value).map(|raw| hash_token(&raw)) else {
            return Err((Lookup::None, None));
        };
        let now = self.clock.now();
        // A copy whose line was cut is never served: it may have reached the cache while its
        // line was being cut (a lockdown, a logout). The store says whether the session lives.
        let cached = self.cache.read().get(&hash).cloned().filter(|s| !s.line.is_cut());
        let session = match cached {
            // Revocations cannot reach a node the store does not answer: past the grace, what
            // it holds in memory is not trusted either.
            Some(_) if self.past_grace.load(Ordering::Relaxed) => return Err((Lookup::Unavailable, None)),
            Some(s) => s,
            None => {
                let loaded = self.store.run(move |c| Store::load_session(c, &hash)).await;
                match loaded {
                    Ok(Some((row, host, identity))) => {
                        let s = Arc::new(self.session_from_row(row, host, identity));
                        self.cache.write().insert(hash, s.clone());
                        s
                    }
                    Ok(None) => return Err((Lookup::None, None)),
                    Err(e) => {
                        // Fail closed: a store we cannot read knows no sessions.
                        tracing::error!(error = %e, "Session lookup failed");
                        return Err((Lookup::None, None));
                    }
                }
            }
        };
        if let Some(idle) = self.expired(session.expires_at, session.created_at, session.last_seen(), now) {
            // Idle here is not idle everywhere: another node may be the one in use. The
            // store decides, by the last use any node recorded.
            let (id, (idle_secs, absolute_secs)) = (session.id.clone(), self.limits());
            match self.store.run(move |c| Store::expire_session(c, &id, now, idle_secs, absolute_secs)).await {
                Ok(Expiry::InUse(seen)) => session.touch(seen),
                Ok(Expiry::Ended | Expiry::Gone) => {
                    self.forget(&session.id, "session expired");
                    return Err((Lookup::Expired { idle }, Some(session)));
                }
                Err(e) => {
                    tracing::error!(error = %e, "Ending an expired session failed");
                    self.forget(&session.id, "session expired");
                    return Err((Lookup::Unavailable, None));
                }
            }
        }
        session.touch(now);
        Ok(session)
    }

    /// The line of session `id`: the one its other copies share, or a new one.
    fn line_for(&self, row: &SessionRow, identity: &Identity) -> Arc<Line> {
        let mut lines = self.lines.lock();
        if lines.get(&row.id).is_some_and(|l| l.is_cut()) {
            lines.remove(&row.id);
        }
        let line = lines.entry(row.id.clone()).or_insert_with(|| {
            Arc::new(Line {
                cut: watch::channel(None).0,
                is_cut: std::sync::atomic::AtomicBool::new(false),
                expires_at: row.expires_at,
                created_at: row.created_at,
                last_seen: AtomicI64::new(row.last_seen),
                persisted_seen: AtomicI64::new(row.last_seen),
                user: row.user.clone(),
                groups: Mutex::new(Vec::new()),
            })
        });
        line.groups.lock().clone_from(&identity.groups);
        line.last_seen.fetch_max(row.last_seen, Ordering::Relaxed);
        line.clone()
    }

    fn session_from_row(&self, row: SessionRow, host: String, identity: Identity) -> Session {
        let line = self.line_for(&row, &identity);
        Session {
            line,
            id: row.id,
            identity,
            host,
            created_at: row.created_at,
            expires_at: row.expires_at,
            client_addr: row.client_addr,
            user_agent: row.user_agent,
            factors: Factors::parse(&row.factors),
            auth_at: row.auth_at,
            factor_at: row.factor_at,
            kind: Kind::parse(&row.kind),
            parent: row.parent,
            chain: row.chain,
        }
    }

    /// Opens a session and returns its id and token. The caller sets the cookie.
    pub async fn open(&self, o: Opening<'_>) -> anyhow::Result<(String, NewToken)> {
        let now = self.clock.now();
        let (expires_at, auth_at, factor_at, parent) = match o.approved_by {
            Some(p) => (p.expires_at, p.auth_at, p.factor_at, Some(p.id.clone())),
            None => (
                now + self.timeouts().absolute.as_secs() as i64,
                now,
                o.factors.own_second_factor().then_some(now),
                None,
            ),
        };
        let id = new_session_id();
        let row = SessionRow {
            chain: id.clone(),
            id,
            user: o.user.to_string(),
            created_at: now,
            last_seen: now,
            expires_at,
            client_addr: o.client_addr,
            user_agent: o.user_agent.chars().take(256).collect(),
            factors: o.factors.to_string(),
            auth_at,
            factor_at,
            kind: o.kind.as_str().into(),
            parent,
        };
        self.insert(row, o.host, None).await
    }

    async fn insert(&self, row: SessionRow, host: &str, replaces: Option<&str>) -> anyhow::Result<(String, NewToken)> {
        let token = new_token();
        let id = row.id.clone();
        let (hash, host, replaces) = (token.hash, host.to_string(), replaces.map(str::to_string));
        self.store.run(move |c| Store::insert_session(c, &row, &hash, &host, replaces.as_deref())).await?;
        Ok((id, token))
    }

    /// Replaces `old` with a new session that records `proof` (a second factor joins its
    /// factors): a new token, the same absolute expiry, kind and parent. The old token stops
    /// working at once; sessions it approved now belong to the new one.
    pub async fn renew(&self, old: &Session, proof: Proof, host: &str) -> anyhow::Result<(String, NewToken)> {
        let now = self.clock.now();
        let mut factors = old.factors;
        let (mut auth_at, mut factor_at) = (old.auth_at, old.factor_at);
        match proof {
            Proof::Factor(f) => {
                factors = factors.with(f);
                factor_at = Some(now);
            }
            Proof::Password => auth_at = now,
        }
        let row = SessionRow {
            id: new_session_id(),
            user: old.identity.user.clone(),
            created_at: now,
            last_seen: now,
            expires_at: old.expires_at,
            client_addr: old.client_addr.clone(),
            user_agent: old.user_agent.clone(),
            factors: factors.to_string(),
            auth_at,
            factor_at,
            kind: old.kind.as_str().into(),
            parent: old.parent.clone(),
            chain: old.chain.clone(),
        };
        let renewed = self.insert(row, host, Some(&old.id)).await?;
        self.end(&old.id).await?;
        Ok(renewed)
    }

    /// Ends a session in the store and in this process's cache.
    /// The store goes first, so that a copy loaded once the line is cut finds no session.
    pub async fn end(&self, id: &str) -> anyhow::Result<bool> {
        let (owned, now) = (id.to_string(), self.clock.now());
        let store = self.store.clone();
        let ended = tokio::task::spawn_blocking(move || store.revoke_session(&owned, now)).await?;
        self.forget(id, "session ended");
        ended
    }

    /// Drops a session from the cache and cuts its line.
    fn forget(&self, id: &str, why: &'static str) {
        self.cache.write().retain(|_, s| s.id != id);
        if let Some(line) = self.lines.lock().remove(id) {
            line.cut(why);
        }
    }

    /// Sessions cached in this process.
    pub fn cached(&self) -> usize {
        self.cache.read().len()
    }

    /// Whether session `id` is held in this process (its copies, tunnels or streams).
    pub fn is_live(&self, id: &str) -> bool {
        self.lines.lock().contains_key(id)
    }

    /// Ends the sessions held here that are past their expiry or a timeout in force: their
    /// lines are cut and they are deleted from the store (so that a later, longer timeout
    /// cannot bring them back).
    pub async fn end_expired(&self, now: UnixTime) {
        let over: Vec<String> = self
            .lines
            .lock()
            .iter()
            .filter(|(_, l)| {
                self.expired(l.expires_at, l.created_at, l.last_seen.load(Ordering::Relaxed), now).is_some()
            })
            .map(|(id, _)| id.clone())
            .collect();
        if over.is_empty() {
            return;
        }
        // The store decides, by the last use any node recorded (another node may be the one
        // in use); what it cannot say about is ended here, failing closed.
        let (idle_secs, absolute_secs) = self.limits();
        let asked = over.clone();
        let found = self
            .store
            .run(move |c| {
                asked
                    .iter()
                    .map(|id| Store::expire_session(c, id, now, idle_secs, absolute_secs))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await;
        if let Err(e) = &found {
            tracing::error!(error = %e, "Ending expired sessions failed");
        }
        let found = found.unwrap_or_default();
        let mut ended = Vec::new();
        {
            let mut lines = self.lines.lock();
            for (i, id) in over.iter().enumerate() {
                match (found.get(i), lines.get(id)) {
                    (Some(Expiry::InUse(seen)), Some(l)) => {
                        l.last_seen.fetch_max(*seen, Ordering::Relaxed);
                    }
                    (_, Some(l)) => {
                        l.cut("session expired");
                        lines.remove(id);
                        ended.push(id.clone());
                    }
                    (_, None) => {}
                }
            }
        }
        self.cache.write().retain(|_, s| !ended.contains(&s.id));
    }

    /// The idle and absolute timeouts in force, in seconds.
    fn limits(&self) -> (i64, i64) {
        let t = self.timeouts();
        (t.idle.as_secs() as i64, t.absolute.as_secs() as i64)
    }

    /// Cuts every line whose user is not in `group` (a lockdown). The sessions stay; their
    /// copies leave the cache, so that after the lockdown they come back with a new line.
    pub fn cut_all_but(&self, group: &str) {
        let mut cut = Vec::new();
        self.lines.lock().retain(|id, l| {
            let keep = l.groups.lock().iter().any(|x| x == group);
            if !keep {
                l.cut("lockdown");
                cut.push(id.clone());
            }
            keep
        });
        if !cut.is_empty() {
            self.cache.write().retain(|_, s| !cut.contains(&s.id));
        }
    }

    /// The user changed (groups, password, enabled): their sessions are loaded again. If their
    /// groups are not what they were (`groups`, None for a user who is gone or disabled), what
    /// they hold open (tunnels, WebSockets, streams) is cut, so that each is asked for again
    /// under what the user may do now. The sessions themselves go on unless revoked.
    fn forget_user(&self, user: &str, groups: Option<&[String]>) {
        self.cache.write().retain(|_, s| s.identity.user != user);
        self.lines.lock().retain(|_, line| {
            let changed = line.user == user && groups.is_none_or(|g| *line.groups.lock() != g);
            if changed {
                line.cut(GROUPS_CHANGED);
            }
            !changed
        });
    }

    /// Past the outage grace, ends everything held in memory: copies, tunnels, WebSockets,
    /// streams. A node that cannot read revocations cannot tell which of them were revoked.
    /// True if it ended anything.
    pub fn end_all_past_grace(&self) -> bool {
        if self.store_silent() <= self.timeouts().outage_grace {
            return false;
        }
        self.past_grace.store(true, Ordering::Relaxed);
        let lines: Vec<Arc<Line>> = self.lines.lock().drain().map(|(_, l)| l).collect();
        for l in &lines {
            l.cut("the store does not answer");
        }
        self.cache.write().clear();
        !lines.is_empty()
    }

    /// How long the store has not answered the revocation poll.
    fn store_silent(&self) -> std::time::Duration {
        let answered = std::time::Duration::from_millis(self.store_answered.load(Ordering::Relaxed));
        crate::clock::instant().saturating_duration_since(self.started + answered)
    }

    /// Applies revocations recorded since the last poll (by this or another process).
    pub async fn poll_revocations(&self) -> anyhow::Result<usize> {
        let since = self.last_revocation.load(Ordering::Relaxed);
        let revs = self.store.run(move |c| Store::revocations_since(c, since)).await?;
        let answered = crate::clock::instant().saturating_duration_since(self.started).as_millis() as u64;
        self.store_answered.fetch_max(answered, Ordering::Relaxed);
        self.past_grace.store(false, Ordering::Relaxed);
        for r in &revs {
            if let Some(id) = &r.session_id {
                self.forget(id, "session ended");
            }
            if let Some(user) = r.user.clone() {
                // What the user may do now; a store that cannot say counts as "nothing".
                let name = user.clone();
                let now = self.store.run(move |c| Store::identity(c, &name)).await.ok().flatten();
                self.forget_user(&user, now.as_ref().map(|i| i.groups.as_slice()));
            }
            self.last_revocation.fetch_max(r.seq, Ordering::Relaxed);
        }
        Ok(revs.len())
    }

    /// Writes back last-seen times that moved on, and purges expired sessions.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let now = self.clock.now();
        let updates: Vec<(String, UnixTime)> = {
            let mut lines = self.lines.lock();
            // A line nothing holds any more (its session left the cache, no stream uses it).
            lines.retain(|_, l| Arc::strong_count(l) > 1);
            lines
                .iter()
                .filter_map(|(id, l)| {
                    let seen = l.last_seen.load(Ordering::Relaxed);
                    (seen - l.persisted_seen.load(Ordering::Relaxed) >= TOUCH_EVERY).then(|| {
                        l.persisted_seen.store(seen, Ordering::Relaxed);
                        (id.clone(), seen)
                    })
                })
                .collect()
        };
        let store = self.store.clone();
        let t = self.timeouts();
        let (idle, absolute) = (t.idle.as_secs() as i64, t.absolute.as_secs() as i64);
        tokio::task::spawn_blocking(move || {
            if !updates.is_empty() {
                store.touch_sessions(&updates)?;
            }
            store.purge_expired(now, idle, absolute)?;
            // Flows past their expiry (hand-offs, ceremonies, codes) and old attempt counts.
            store.sweep_flows(now)
        })
        .await??;
        self.cache.write().retain(|_, s| self.expired(s.expires_at, s.created_at, s.last_seen(), now).is_none());
        Ok(())
    }

    /// Writes back every last-seen time now (at shutdown).
    pub async fn flush_all(&self) -> anyhow::Result<()> {
        let updates: Vec<(String, UnixTime)> = {
            let lines = self.lines.lock();
            lines.iter().map(|(id, l)| (id.clone(), l.last_seen.load(Ordering::Relaxed))).collect()
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.touch_sessions(&updates)).await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::Duration;

    #[test]
    fn session_ids_never_look_like_options() {
        assert!((0..5000).map(|_| new_session_id()).all(|id| id.len() == 12 && !id.starts_with('-')));
    }

    #[tokio::test]
    async fn a_copy_whose_line_was_cut_is_loaded_again() {
        let dir = std::env::temp_dir().join(format!("poort-session-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(dir.join("poort.db")).unwrap();
        store.add_user("bob", None, "hash", &["staff".into()], 0).unwrap();
        let timeouts = SessionTimeouts {
            idle: Duration::from_secs(600),
            absolute: Duration::from_secs(3600),
            outage_grace: Duration::from_secs(60),
        };
        let sessions = Sessions::new(store, Arc::new(ManualClock::new(1000)), timeouts).unwrap();
        let opening = Opening {
            user: "bob",
            host: "localhost",
            client_addr: "127.0.0.1".into(),
            user_agent: String::new(),
            factors: Factors::of(&[Factor::Pwd]),
            kind: Kind::Browser,
            approved_by: None,
        };
        let (_, token) = sessions.open(opening).await.unwrap();
        let first = sessions.lookup(&token.cookie_value).await.unwrap();
        // A lockdown cuts the line while a request that loaded the session is about to cache
        // it: the cache holds a copy with a cut line.
        first.line.cut("lockdown");
        let again = sessions.lookup(&token.cookie_value).await.unwrap();
        assert_eq!(again.lifeline().ended_now(), None, "the session lives on with a new line");
        // A session that ended is not found again, whatever the cache held.
        assert!(sessions.end(&again.id).await.unwrap());
        again.line.cut("again");
        assert!(sessions.lookup(&token.cookie_value).await.is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! Sessions (SECURITY.md rule 10): 256-bit random tokens in a `__Host-` cookie, stored only as
//! SHA-256 hashes; idle and absolute timeouts; a memory cache in front of the store so that a
//! request with a known session costs no database query; revocations from other processes
//! arrive through the store's `revocations` table.

pub mod cookie;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

use crate::clock::{Clock, UnixTime};
use crate::config::SessionTimeouts;
use crate::identity::Identity;
use crate::store::{SessionRow, Store};

pub use cookie::{CSRF_COOKIE, SESSION_COOKIE};

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

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).expect("invariant: the system random source works");
    b
}

pub fn new_token() -> NewToken {
    let raw: [u8; 32] = random_bytes();
    NewToken { cookie_value: cookie::encode_token(&raw), hash: hash_token(&raw) }
}

pub fn hash_token(raw: &[u8; 32]) -> TokenHash {
    let d = digest::digest(&digest::SHA256, raw);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A short public identifier for listing and revoking a session; not a credential.
pub fn new_session_id() -> String {
    let b: [u8; 9] = random_bytes();
    cookie::encode_b64(&b)
}

/// Whether space-separated factors include a second one: anything but `pwd` (a password) and
/// `ext` (an identity provider that did not vouch for a second factor).
pub fn includes_second_factor(factors: &str) -> bool {
    factors.split(' ').any(|f| !f.is_empty() && f != "pwd" && f != "ext")
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
    pub factors: String,
    last_seen: AtomicI64,
    persisted_seen: AtomicI64,
    /// Bit i set: the first access to app i has been audited.
    opened: Box<[AtomicU64]>,
    /// Assertion JWTs per app, reused while fresh: (app, issued at, token).
    pub assertions: Mutex<Vec<(usize, UnixTime, http::HeaderValue)>>,
}

impl Session {
    pub fn last_seen(&self) -> UnixTime {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Marks the session as used now (a busy tunnel keeps it from idling out).
    pub fn touch(&self, now: UnixTime) {
        self.last_seen.fetch_max(now, Ordering::Relaxed);
    }

    /// Whether the session was opened or stepped up with a second factor. `pwd` (a password)
    /// and `ext` (an identity provider that did not vouch for a second factor) are one factor.
    pub fn mfa(&self) -> bool {
        includes_second_factor(&self.factors)
    }

    /// Whether the session was opened through an identity provider (it has no password).
    pub fn single_sign_on(&self) -> bool {
        self.factors.split(' ').any(|f| f == "ext")
    }

    /// The factors as `amr` values for an assertion.
    pub fn amr(&self) -> Vec<&str> {
        self.factors.split(' ').filter(|f| !f.is_empty()).collect()
    }

    /// True the first time it is called for `app` in this session's life in this process.
    pub fn first_open(&self, app: usize) -> bool {
        let (word, bit) = (app / 64, 1u64 << (app % 64));
        match self.opened.get(word) {
            Some(w) => w.fetch_or(bit, Ordering::Relaxed) & bit == 0,
            None => false,
        }
    }
}

/// Why a presented session is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No cookie, a malformed one, or an unknown token.
    None,
    /// Known, but past its idle or absolute timeout: now deleted.
    Expired { idle: bool },
}

pub struct Sessions {
    store: Store,
    clock: Arc<dyn Clock>,
    timeouts: SessionTimeouts,
    app_words: usize,
    cache: RwLock<HashMap<TokenHash, Arc<Session>>>,
    last_revocation: AtomicI64,
    /// Ids of sessions that ended, for tunnels to close on.
    ended: tokio::sync::broadcast::Sender<String>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions")
    }
}

/// Last-seen times are written back at most this often per session.
const TOUCH_EVERY: i64 = 30;

impl Sessions {
    pub fn new(
        store: Store,
        clock: Arc<dyn Clock>,
        timeouts: SessionTimeouts,
        apps: usize,
    ) -> anyhow::Result<Sessions> {
        let last = store.last_revocation()?;
        Ok(Sessions {
            store,
            clock,
            timeouts,
            app_words: apps.div_ceil(64).max(1),
            cache: RwLock::new(HashMap::new()),
            last_revocation: AtomicI64::new(last),
            ended: tokio::sync::broadcast::channel(1024).0,
        })
    }

    pub fn timeouts(&self) -> SessionTimeouts {
        self.timeouts
    }

    fn expired(&self, created_or_expiry: UnixTime, last_seen: UnixTime, now: UnixTime) -> Option<bool> {
        if now >= created_or_expiry {
            Some(false)
        } else if now - last_seen >= self.timeouts.idle.as_secs() as i64 {
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
        let cached = self.cache.read().ok().and_then(|c| c.get(&hash).cloned());
        let session = match cached {
            Some(s) => s,
            None => {
                let loaded = self.store.run(move |c| Store::load_session(c, &hash)).await;
                match loaded {
                    Ok(Some((row, host, identity))) => {
                        let s = Arc::new(self.session_from_row(row, host, identity));
                        if let Ok(mut c) = self.cache.write() {
                            c.insert(hash, s.clone());
                        }
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
        if let Some(idle) = self.expired(session.expires_at, session.last_seen(), now) {
            self.forget(&session.id);
            let id = session.id.clone();
            let _ = self.store.run(move |c| c.execute("DELETE FROM sessions WHERE id = ?1", [id])).await;
            return Err((Lookup::Expired { idle }, Some(session)));
        }
        session.last_seen.fetch_max(now, Ordering::Relaxed);
        Ok(session)
    }

    fn session_from_row(&self, row: SessionRow, host: String, identity: Identity) -> Session {
        Session {
            id: row.id,
            identity,
            host,
            created_at: row.created_at,
            expires_at: row.expires_at,
            client_addr: row.client_addr,
            user_agent: row.user_agent,
            factors: row.factors,
            last_seen: AtomicI64::new(row.last_seen),
            persisted_seen: AtomicI64::new(row.last_seen),
            opened: (0..self.app_words).map(|_| AtomicU64::new(0)).collect(),
            assertions: Mutex::new(Vec::new()),
        }
    }

    /// Creates a password-only session for `user` and returns its token.
    pub async fn create(
        &self,
        user: &str,
        host: &str,
        client_addr: String,
        user_agent: String,
    ) -> anyhow::Result<(String, NewToken)> {
        self.create_with(user, host, client_addr, user_agent, "pwd").await
    }

    /// Creates a session for `user` that signed in with `factors` (space-separated `amr`
    /// values) and returns its token. The caller sets the cookie.
    pub async fn create_with(
        &self,
        user: &str,
        host: &str,
        client_addr: String,
        user_agent: String,
        factors: &str,
    ) -> anyhow::Result<(String, NewToken)> {
        let now = self.clock.now();
        let token = new_token();
        let row = SessionRow {
            id: new_session_id(),
            user: user.to_string(),
            created_at: now,
            last_seen: now,
            expires_at: now + self.timeouts.absolute.as_secs() as i64,
            client_addr,
            user_agent: user_agent.chars().take(256).collect(),
            factors: factors.into(),
        };
        let id = row.id.clone();
        let (hash, host) = (token.hash, host.to_string());
        self.store.run(move |c| Store::insert_session(c, &row, &hash, &host)).await?;
        Ok((id, token))
    }

    /// Replaces `old` with a new session that also records `factor`: a new token, the same
    /// absolute expiry. The old token stops working at once.
    pub async fn step_up(&self, old: &Session, factor: &str, host: &str) -> anyhow::Result<(String, NewToken)> {
        let now = self.clock.now();
        let token = new_token();
        let mut factors = old.factors.clone();
        if !factors.split(' ').any(|f| f == factor) {
            factors.push(' ');
            factors.push_str(factor);
        }
        let row = SessionRow {
            id: new_session_id(),
            user: old.identity.user.clone(),
            created_at: now,
            last_seen: now,
            expires_at: old.expires_at,
            client_addr: old.client_addr.clone(),
            user_agent: old.user_agent.clone(),
            factors,
        };
        let id = row.id.clone();
        let (hash, host) = (token.hash, host.to_string());
        self.store.run(move |c| Store::insert_session(c, &row, &hash, &host)).await?;
        self.end(&old.id).await?;
        Ok((id, token))
    }

    /// Ends a session in the store and in this process's cache.
    pub async fn end(&self, id: &str) -> anyhow::Result<bool> {
        self.forget(id);
        let (id, now) = (id.to_string(), self.clock.now());
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.revoke_session(&id, now)).await?
    }

    fn forget(&self, id: &str) {
        if let Ok(mut c) = self.cache.write() {
            c.retain(|_, s| s.id != id);
        }
        let _ = self.ended.send(id.to_string());
    }

    /// Announces every session that ends in this process (logout, revocation, expiry).
    pub fn subscribe_ended(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.ended.subscribe()
    }

    fn forget_user(&self, user: &str) {
        if let Ok(mut c) = self.cache.write() {
            c.retain(|_, s| s.identity.user != user);
        }
    }

    /// Applies revocations recorded since the last poll (by this or another process).
    pub async fn poll_revocations(&self) -> anyhow::Result<usize> {
        let since = self.last_revocation.load(Ordering::Relaxed);
        let revs = self.store.run(move |c| Store::revocations_since(c, since)).await?;
        for r in &revs {
            if let Some(id) = &r.session_id {
                self.forget(id);
            }
            if let Some(user) = &r.user {
                self.forget_user(user);
            }
            self.last_revocation.fetch_max(r.seq, Ordering::Relaxed);
        }
        Ok(revs.len())
    }

    /// Writes back last-seen times that moved on, and purges expired sessions.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let now = self.clock.now();
        let updates: Vec<(String, UnixTime)> = match self.cache.read() {
            Ok(c) => c
                .values()
                .filter_map(|s| {
                    let seen = s.last_seen();
                    (seen - s.persisted_seen.load(Ordering::Relaxed) >= TOUCH_EVERY).then(|| {
                        s.persisted_seen.store(seen, Ordering::Relaxed);
                        (s.id.clone(), seen)
                    })
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let store = self.store.clone();
        let idle = self.timeouts.idle.as_secs() as i64;
        tokio::task::spawn_blocking(move || {
            if !updates.is_empty() {
                store.touch_sessions(&updates)?;
            }
            store.purge_expired(now, idle)
        })
        .await??;
        if let Ok(mut c) = self.cache.write() {
            c.retain(|_, s| self.expired(s.expires_at, s.last_seen(), now).is_none());
        }
        Ok(())
    }

    /// Writes back every last-seen time now (at shutdown).
    pub async fn flush_all(&self) -> anyhow::Result<()> {
        let updates: Vec<(String, UnixTime)> = match self.cache.read() {
            Ok(c) => c.values().map(|s| (s.id.clone(), s.last_seen())).collect(),
            Err(_) => Vec::new(),
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.touch_sessions(&updates)).await?
    }
}

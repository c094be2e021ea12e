//! What every handler shares: the services without behaviour of their own (config, clock,
//! store, audit, sessions, mitigation, identity sources, the signer of assertions), the
//! portal's sign-ins in flight and the open-tunnel counts; and `Ctx`, the facts the gateway
//! established about one request before it handed it on. Handlers take `(&State, Ctx)`; the
//! pipeline that makes a `Ctx` is `gateway::Gateway`.
//!
//! There is one `State` per config: a reload makes a new one, which shares (by `Arc`) every
//! part that outlives a config: sessions, sign-ins in flight, grants, counts and metrics.

pub mod pending;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::audit::Audit;
use crate::clock::Clock;
use crate::config::Config;
use crate::identity::assertion::Signer;
use crate::identity::ldap::Directory;
use crate::identity::oidc::Providers;
use crate::mitigate::Mitigation;
use crate::request::Front;
use crate::session::{Session, Sessions};
use crate::store::Store;
use parking_lot::Mutex;

pub struct State {
    pub cfg: Arc<Config>,
    pub clock: Arc<dyn Clock>,
    pub store: Store,
    pub audit: Audit,
    pub sessions: Arc<Sessions>,
    pub mitigation: Arc<Mitigation>,
    /// The LDAP / Active Directory source of users, if configured.
    pub directory: Option<Directory>,
    /// OpenID Connect providers for single sign-on.
    pub oidc: Providers,
    /// Signs the assertions apps receive; its public keys are the portal's JWKS.
    pub signer: Arc<Signer>,
    pub signins: Arc<pending::SignIns>,
    pub tunnels: Arc<Tunnels>,
    /// What Prometheus reads (`metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What open WebSockets and tunnels hold, reviewed when the config changes.
    pub grants: Arc<crate::session::grant::Grants>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State")
    }
}

/// Identifies one request in the log and on error pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Per-request facts established before a handler runs.
#[derive(Clone)]
pub struct Ctx {
    pub id: RequestId,
    pub front: Front,
    /// The client: the connection's address, or what a trusted proxy says in front of it.
    pub client: IpAddr,
    /// The connection's own address (a proxy's, when one is in front).
    pub peer: IpAddr,
    pub session: Option<Arc<Session>>,
}

/// Open-tunnel counts, for the per-session and total limits.
#[derive(Debug, Default)]
pub struct Tunnels {
    total: AtomicUsize,
    per_session: Mutex<HashMap<String, usize>>,
}

/// A held tunnel slot; dropping it frees the slot.
pub struct Slot {
    tunnels: Arc<Tunnels>,
    session: String,
}

impl Tunnels {
    pub fn take(self: &Arc<Self>, session: &str, per_session: usize, total: usize) -> Option<Slot> {
        let mut m = self.per_session.lock();
        let n = m.entry(session.to_string()).or_insert(0);
        if *n >= per_session || self.total.load(Ordering::Relaxed) >= total {
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot { tunnels: self.clone(), session: session.to_string() })
    }

    /// Tunnels open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tunnels.total.fetch_sub(1, Ordering::Relaxed);
        let mut m = self.tunnels.per_session.lock();
        if let Some(n) = m.get_mut(&self.session) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.session);
            }
        }
    }
}

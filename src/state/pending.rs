//! What the portal holds between two requests of one sign-in: host hand-offs, WebAuthn
//! ceremonies and command-line code pairs, each short-lived and single-use; and the per-address
//! sign-in rate limiter. Data and its bookkeeping only: the portal's handlers decide.

use std::collections::HashMap;

use parking_lot::Mutex;
use webauthn_rs::prelude::{
    DiscoverableAuthentication, PasskeyAuthentication, PasskeyRegistration, Url, Webauthn, WebauthnBuilder,
};

use crate::clock::UnixTime;
use crate::config::Config;
use crate::identity::seal::Sealer;
use crate::session::Session;

/// Sign-ins in flight: host hand-offs, WebAuthn ceremonies and command-line codes; the
/// sign-in rate limiter; the sealer for secrets.
pub struct SignIns {
    pub handoffs: Mutex<HashMap<String, Handoff>>,
    /// Sign-in attempts per address, with the per-minute quota it was made for.
    limiter: Mutex<(u32, std::sync::Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>)>,
    pub sealer: std::sync::Arc<Sealer>,
    pub passkeys: Passkeys,
    pub devices: Devices,
}

impl std::fmt::Debug for SignIns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignIns")
    }
}

/// A pending hand-off of a portal session to an app host.
#[derive(Debug)]
pub struct Handoff {
    pub session_id: String,
    pub user: String,
    pub host: String,
    pub path: String,
    /// SHA-256 of the nonce cookie the app host set in the browser that asked.
    pub bind: [u8; 32],
    pub expires: UnixTime,
}

impl SignIns {
    pub fn new(cfg: &Config, sealer: std::sync::Arc<Sealer>) -> anyhow::Result<SignIns> {
        Ok(SignIns {
            passkeys: Passkeys::new(&cfg.server.external_origin, &cfg.server.portal_host)?,
            handoffs: Mutex::new(HashMap::new()),
            devices: Devices::default(),
            limiter: Mutex::new(limiter(cfg.login.per_address_per_minute)),
            sealer,
        })
    }

    /// Forgets rate-limit state of addresses that have been quiet (called periodically).
    pub fn tidy(&self) {
        self.limiter.lock().1.retain_recent();
    }

    /// Whether `client` may try to sign in now (and counts the try).
    pub fn may_try(&self, client: &std::net::IpAddr) -> bool {
        let limiter = self.limiter.lock().1.clone();
        limiter.check_key(client).is_ok()
    }

    /// Applies a changed `[login] per_address_per_minute` (a reload); the counts start over.
    pub fn set_per_minute(&self, n: u32) {
        let mut l = self.limiter.lock();
        if l.0 != n {
            *l = limiter(n);
        }
    }
}

fn limiter(per_minute: u32) -> (u32, std::sync::Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>) {
    let quota = std::num::NonZeroU32::new(per_minute).unwrap_or(std::num::NonZeroU32::MIN);
    (per_minute, std::sync::Arc::new(governor::RateLimiter::keyed(governor::Quota::per_minute(quota))))
}

/// How long a started ceremony may take to finish.
const CEREMONY_SECS: i64 = 120;

pub enum Ceremony {
    Register {
        session: String,
        user: String,
        name: String,
        next: String,
        state: PasskeyRegistration,
    },
    /// A second factor: to step up, or to confirm (a command-line code when `device` is set).
    Factor {
        session: String,
        user: String,
        next: String,
        device: String,
        state: PasskeyAuthentication,
    },
    Passwordless {
        next: String,
        state: DiscoverableAuthentication,
    },
}

/// The relying party and the ceremonies in flight.
pub struct Passkeys {
    pub webauthn: Webauthn,
    ceremonies: Mutex<HashMap<String, (UnixTime, Ceremony)>>,
}

impl std::fmt::Debug for Passkeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passkeys")
    }
}

impl Passkeys {
    /// The relying party is the portal: its host is the RP id and its origin the only origin.
    pub fn new(external_origin: &str, portal_host: &str) -> anyhow::Result<Passkeys> {
        let origin = Url::parse(external_origin)?;
        let webauthn = WebauthnBuilder::new(portal_host, &origin)?.rp_name("poort").build()?;
        Ok(Passkeys { webauthn, ceremonies: Mutex::new(HashMap::new()) })
    }

    pub fn put(&self, now: UnixTime, c: Ceremony) -> String {
        let id = crate::session::cookie::encode_token(&crate::secret::random_bytes());
        {
            let mut m = self.ceremonies.lock();
            m.retain(|_, (t, _)| now - *t < CEREMONY_SECS);
            m.insert(id.clone(), (now, c));
        }
        id
    }

    pub fn take(&self, id: &str, now: UnixTime) -> Option<Ceremony> {
        let (t, c) = self.ceremonies.lock().remove(id)?;
        (now - t < CEREMONY_SECS).then_some(c)
    }
}

/// How long a code pair is good for.
pub const LIFETIME: i64 = 600;
/// How long a proof given for a code counts.
pub const PROOF_FOR: i64 = 120;
/// Code pairs in flight at most.
pub const MAX_PENDING: usize = 10_000;

pub enum DeviceState {
    Pending,
    Approved { token: String, user: String, expires_at: UnixTime },
    Denied,
}

pub struct DeviceCode {
    pub device_code: String,
    pub requester: String,
    pub created: UnixTime,
    pub state: DeviceState,
    /// The browser (the user and their session's `chain`) that opened it first: the only one
    /// that may decide.
    pub claimed_by: Option<(String, String)>,
    /// When its claimant last proved who they are for it.
    pub proved_at: Option<UnixTime>,
}

/// Code pairs in flight, by user code.
#[derive(Default)]
pub struct Devices(pub Mutex<HashMap<String, DeviceCode>>);

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Devices")
    }
}

impl Devices {
    /// Records that the browser of session `s` just proved who its user is to approve code
    /// `code` (the confirm page), if that browser is the one that opened it.
    pub fn prove(&self, code: &str, s: &Session, now: UnixTime) {
        if let Some(p) = self.0.lock().get_mut(code).filter(|p| p.claimed_by == Some(claimant(s))) {
            p.proved_at = Some(now);
        }
    }

    /// A pending, unexpired code the browser of session `s` may decide on: claimed by it now
    /// if nobody has it. Returns (requester, asked at, proved for it just now).
    pub fn claim(&self, code: &str, s: &Session, now: UnixTime) -> Option<(String, UnixTime, bool)> {
        let mut m = self.0.lock();
        let p = m.get_mut(code).filter(|p| matches!(p.state, DeviceState::Pending) && now - p.created < LIFETIME)?;
        if *p.claimed_by.get_or_insert_with(|| claimant(s)) != claimant(s) {
            return None;
        }
        let proved = p.proved_at.is_some_and(|t| t <= now && now - t < PROOF_FOR);
        Some((p.requester.clone(), p.created, proved))
    }
}

/// Who claims a code: a user in one browser (the chain of their sign-in).
fn claimant(s: &Session) -> (String, String) {
    (s.identity.user.clone(), s.chain.clone())
}

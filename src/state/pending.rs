//! What the portal holds between two requests of one sign-in: host hand-offs, WebAuthn
//! ceremonies and command-line code pairs, each short-lived and single-use; and the per-address
//! sign-in rate limiter. Data and its bookkeeping only: the portal's handlers decide.

use webauthn_rs::prelude::{
    DiscoverableAuthentication, PasskeyAuthentication, PasskeyRegistration, Url, Webauthn, WebauthnBuilder,
};

use crate::clock::UnixTime;
use crate::config::Config;
use crate::db::{self, Conn};
use crate::identity::seal::Sealer;
use crate::session::Session;
use crate::store::flows;

/// What sign-ins need between requests: the relying party for passkeys, the sealer for
/// secrets, and the per-address sign-in quota. The flows themselves (hand-offs, ceremonies,
/// command-line codes) are in the store, for any node to finish.
pub struct SignIns {
    /// Sign-in attempts allowed per address and minute.
    per_minute: std::sync::atomic::AtomicU32,
    pub sealer: std::sync::Arc<Sealer>,
    pub passkeys: Passkeys,
}

impl std::fmt::Debug for SignIns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignIns")
    }
}

/// A pending hand-off of a portal session to an app host.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
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
            per_minute: std::sync::atomic::AtomicU32::new(cfg.login.per_address_per_minute),
            sealer,
        })
    }

    /// Whether `client` may try to sign in now, counting the try: at most the quota per
    /// address and clock minute, counted in the store so that every node sees every try.
    /// None when the store did not answer (no sign-in then).
    pub async fn may_try(&self, store: &crate::store::Store, client: std::net::IpAddr, now: UnixTime) -> Option<bool> {
        let limit = i64::from(self.per_minute.load(std::sync::atomic::Ordering::Relaxed));
        let addr = client.to_string();
        store.run(move |c| crate::store::flows::attempt(c, &addr, now)).await.ok().map(|n| n <= limit)
    }

    /// Applies a changed `[login] per_address_per_minute` (a reload).
    pub fn set_per_minute(&self, n: u32) {
        self.per_minute.store(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How long a started ceremony may take to finish.
const CEREMONY_SECS: i64 = 120;

#[derive(serde::Serialize, serde::Deserialize)]
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

/// The relying party; the ceremonies in flight are in the store.
pub struct Passkeys {
    pub webauthn: Webauthn,
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
        Ok(Passkeys { webauthn })
    }
}

/// Keeps a started ceremony for whichever node gets its second half; returns its id.
pub fn put_ceremony(conn: &Conn, now: UnixTime, c: &Ceremony) -> db::Result<String> {
    let id = crate::session::cookie::encode_token(&crate::secret::random_bytes());
    flows::put(conn, flows::CEREMONY, &id, c, now + CEREMONY_SECS)?;
    Ok(id)
}

/// Takes a ceremony out (it finishes once), if it has not expired.
pub fn take_ceremony(conn: &Conn, id: &str, now: UnixTime) -> db::Result<Option<Ceremony>> {
    flows::take(conn, flows::CEREMONY, id, now)
}

/// How long a code pair is good for.
pub const LIFETIME: i64 = 600;
/// How long a proof given for a code counts.
pub const PROOF_FOR: i64 = 120;
/// Code pairs in flight at most.
pub const MAX_PENDING: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    Pending,
    /// The new session's token is kept sealed until the command line fetches it.
    Approved {
        sealed_token: Vec<u8>,
        user: String,
        expires_at: UnixTime,
    },
    Denied,
}

/// A code pair in flight, under its user code keyed with the gateway's secret
/// (`Sealer::keyed`), and found from its device code through a second flow, `DEVICE_POLL`,
/// which holds that keyed form (never the code itself).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceCode {
    pub requester: String,
    /// What asks, in words for the approval page: empty for `poort login`, else for example
    /// "an SSH connection to db1".
    #[serde(default)]
    pub purpose: String,
    pub created: UnixTime,
    pub state: DeviceState,
    /// The browser (the user and their session's `chain`) that opened it first: the only one
    /// that may decide.
    pub claimed_by: Option<(String, String)>,
    /// When its claimant last proved who they are for it.
    pub proved_at: Option<UnixTime>,
}

/// The flow that leads from a device code (the command line's secret) to its user code.
pub const DEVICE_POLL: &str = "device_poll";

/// Code pairs in flight, in the store: any node may be asked about any of them.
pub mod devices {
    use super::*;

    /// Records a new code pair; false when too many are in flight (or the user code is taken).
    pub fn add(
        conn: &Conn,
        user_code: &str,
        device_code: &str,
        requester: &str,
        purpose: &str,
        now: UnixTime,
    ) -> db::Result<bool> {
        if flows::count(conn, flows::DEVICE, now)? >= MAX_PENDING as i64 {
            return Ok(false);
        }
        let p = DeviceCode {
            requester: requester.to_string(),
            purpose: purpose.to_string(),
            created: now,
            state: DeviceState::Pending,
            claimed_by: None,
            proved_at: None,
        };
        Ok(flows::put(conn, flows::DEVICE, user_code, &p, now + LIFETIME)?
            && flows::put(conn, DEVICE_POLL, device_code, &user_code, now + LIFETIME)?)
    }

    /// What the command line polling with `device_code` learns: the code pair, removed once
    /// it is decided (an approval is handed out once).
    pub fn poll(conn: &Conn, device_code: &str, now: UnixTime) -> db::Result<Option<DeviceCode>> {
        let Some((user_code, _)) = flows::get::<String>(conn, DEVICE_POLL, device_code, now)? else { return Ok(None) };
        let Some((p, _)) = flows::get::<DeviceCode>(conn, flows::DEVICE, &user_code, now)? else { return Ok(None) };
        if p.state == DeviceState::Pending {
            return Ok(Some(p));
        }
        // Decided: whoever takes the poll flow first gets the answer, once.
        if flows::take::<String>(conn, DEVICE_POLL, device_code, now)?.is_none() {
            return Ok(None);
        }
        flows::take::<DeviceCode>(conn, flows::DEVICE, &user_code, now)
    }

    /// Records that the browser `me` just proved who its user is to approve code
    /// `code` (the confirm page), if that browser is the one that opened it.
    pub fn prove(conn: &Conn, code: &str, me: &Claimant, now: UnixTime) -> db::Result<()> {
        flows::update::<DeviceCode, ()>(conn, flows::DEVICE, code, now, |p| {
            let mine = p.claimed_by.as_ref() == Some(me);
            if mine {
                p.proved_at = Some(now);
            }
            ((), mine)
        })?;
        Ok(())
    }

    /// A pending, unexpired code the browser of session `s` may decide on: claimed by it now
    /// if nobody has it. Returns (requester, asked at, proved for it just now, purpose).
    pub fn claim(
        conn: &Conn,
        code: &str,
        me: &Claimant,
        now: UnixTime,
    ) -> db::Result<Option<(String, UnixTime, bool, String)>> {
        let got = flows::update::<DeviceCode, _>(conn, flows::DEVICE, code, now, |p| {
            if p.state != DeviceState::Pending || now - p.created >= LIFETIME {
                return (None, false);
            }
            let fresh = p.claimed_by.is_none();
            if p.claimed_by.get_or_insert_with(|| me.clone()) != me {
                return (None, false);
            }
            let proved = p.proved_at.is_some_and(|t| t <= now && now - t < PROOF_FOR);
            (Some((p.requester.clone(), p.created, proved, p.purpose.clone())), fresh)
        })?;
        Ok(got.flatten())
    }

    /// Decides a code the browser of session `s` claimed; false when it is no longer pending
    /// or not theirs.
    pub fn decide(conn: &Conn, code: &str, me: &Claimant, state: DeviceState, now: UnixTime) -> db::Result<bool> {
        let done = flows::update::<DeviceCode, _>(conn, flows::DEVICE, code, now, |p| {
            let ok = p.state == DeviceState::Pending && p.claimed_by.as_ref() == Some(me);
            if ok {
                p.state = state.clone();
            }
            (ok, ok)
        })?;
        Ok(done == Some(true))
    }
}

/// Who claims a code: a user in one browser (the chain of their sign-in).
pub type Claimant = (String, String);

pub fn claimant(s: &Session) -> Claimant {
    (s.identity.user.clone(), s.chain.clone())
}

//! Time as an input. Stages that decide take the current time from a `Clock` so that tests can
//! move it (session expiry is tested by advancing a `ManualClock`, not by sleeping).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub type UnixTime = i64;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> UnixTime;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> UnixTime {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
    }
}

/// A clock that only moves when told to; shared between a test and the gateway it drives.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start: UnixTime) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start)))
    }

    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixTime {
        self.0.load(Ordering::SeqCst)
    }
}

/// `2026-11-30T08:15:00Z` for a Unix time; for pages, the CLI and the audit log.
pub fn format_utc(t: UnixTime) -> String {
    let st = UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
    humantime::format_rfc3339_seconds(st).to_string()
}

/// `2026-11-30 08:15 UTC`: for people reading pages.
/// A date (YYYY-MM-DD, UTC) as the Unix time of its first second; None if it is no date.
pub fn parse_day(date: &str) -> Option<UnixTime> {
    if date.len() != 10 {
        return None;
    }
    let t = humantime::parse_rfc3339(&format!("{date}T00:00:00Z")).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs() as UnixTime)
}

pub fn format_minutes(t: UnixTime) -> String {
    let full = format_utc(t);
    format!("{} {} UTC", &full[..10], &full[11..16])
}

/// Monotonic time, for timeouts and durations (idle connections, pooled connections, sign-ins
/// in flight): never the wall clock, which an operator or NTP may move.
#[allow(clippy::disallowed_methods)]
pub fn instant() -> std::time::Instant {
    std::time::Instant::now()
}

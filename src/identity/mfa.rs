//! Second factors in the store: TOTP enrolment with replay protection, recovery codes, and the
//! per-account failure counter behind lockouts. SQL only; the decisions (which factor a policy
//! needs, how long a lock lasts) are made by the callers with pure functions.

use crate::db::{self, Conn, OptionalExtension, params};
use ring::digest;

use super::seal::Sealer;
use super::totp;
use crate::clock::UnixTime;

/// How a change to a user's factors was proved, in the audit log: a fresh second factor,
/// or (for the first factor of a user who had none) the password or a fresh sign-in alone.
pub const PROOF_SECOND_FACTOR: &str = "second factor";
pub const PROOF_PASSWORD_ONLY: &str = "password only";

/// What second factors a user has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Factors {
    pub totp: bool,
    pub passkeys: usize,
    pub recovery_left: usize,
}

impl Factors {
    pub fn any(&self) -> bool {
        self.totp || self.passkeys > 0
    }
}

pub fn factors(conn: &Conn, user: &str) -> db::Result<Factors> {
    let totp: bool = conn
        .query_row("SELECT confirmed FROM totp WHERE \"user\" = ?1", [user], |r| r.get(0))
        .optional()?
        .unwrap_or(false);
    let recovery_left: i64 =
        conn.query_row("SELECT count(*) FROM recovery_codes WHERE \"user\" = ?1 AND used_at IS NULL", [user], |r| {
            r.get(0)
        })?;
    let passkeys: i64 = conn.query_row("SELECT count(*) FROM passkeys WHERE \"user\" = ?1", [user], |r| r.get(0))?;
    Ok(Factors { totp, passkeys: passkeys as usize, recovery_left: recovery_left as usize })
}

/// Starts (or restarts) a TOTP enrolment with a new secret; refuses while a confirmed one
/// exists. Returns the secret, to be shown once.
pub fn totp_begin(conn: &Conn, sealer: &Sealer, user: &str, now: UnixTime) -> db::Result<Option<Vec<u8>>> {
    let confirmed: Option<bool> =
        conn.query_row("SELECT confirmed FROM totp WHERE \"user\" = ?1", [user], |r| r.get(0)).optional()?;
    if confirmed == Some(true) {
        return Ok(None);
    }
    let secret: [u8; totp::SECRET_LEN] = crate::secret::random_bytes();
    conn.execute(
        "INSERT INTO totp (\"user\", secret, confirmed, last_step, created_at) VALUES (?1, ?2, 0, 0, ?3)
         ON CONFLICT (\"user\") DO UPDATE SET secret = excluded.secret, created_at = excluded.created_at, last_step = 0",
        params![user, sealer.seal(user, &secret), now],
    )?;
    Ok(Some(secret.to_vec()))
}

/// The pending (unconfirmed) secret, for showing the QR code again.
pub fn totp_pending(conn: &Conn, sealer: &Sealer, user: &str) -> db::Result<Option<Vec<u8>>> {
    let sealed: Option<Vec<u8>> = conn
        .query_row("SELECT secret FROM totp WHERE \"user\" = ?1 AND confirmed = 0", [user], |r| r.get(0))
        .optional()?;
    Ok(sealed.and_then(|s| sealer.open(user, &s)))
}

/// Checks a code. With `confirming`, the pending secret is checked and confirmed on success;
/// otherwise only a confirmed one counts. A step is accepted at most once: the update only
/// succeeds when the step is newer than the last one used, which also holds across restarts
/// and between gateways sharing the database.
pub fn totp_check(
    conn: &Conn,
    sealer: &Sealer,
    user: &str,
    code: &str,
    now: UnixTime,
    confirming: bool,
) -> db::Result<bool> {
    let sealed: Option<Vec<u8>> = conn
        .query_row("SELECT secret FROM totp WHERE \"user\" = ?1 AND confirmed = ?2", params![user, !confirming], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(secret) = sealed.and_then(|s| sealer.open(user, &s)) else {
        return Ok(false);
    };
    let Some(step) = totp::matching_step(&secret, code, now) else {
        return Ok(false);
    };
    let n = conn.execute(
        "UPDATE totp SET last_step = ?1, confirmed = 1 WHERE \"user\" = ?2 AND last_step < ?1 AND confirmed = ?3",
        params![step, user, !confirming],
    )?;
    Ok(n == 1)
}

pub fn totp_remove(conn: &Conn, user: &str) -> db::Result<bool> {
    Ok(conn.execute("DELETE FROM totp WHERE \"user\" = ?1", [user])? > 0)
}

/// Recovery codes stand in for an authenticator: once a user has neither an authenticator app
/// nor a passkey, their codes go too. Kept, they would be a factor no page asks for, and the
/// password alone could set up a new authenticator over them. True if any went.
pub fn drop_codes_without_factor(conn: &Conn, user: &str) -> db::Result<bool> {
    let dropped = conn.execute(
        "DELETE FROM recovery_codes WHERE \"user\" = ?1
           AND NOT EXISTS (SELECT 1 FROM totp WHERE \"user\" = ?1 AND confirmed = 1)
           AND NOT EXISTS (SELECT 1 FROM passkeys WHERE \"user\" = ?1)",
        [user],
    )?;
    Ok(dropped > 0)
}

const RECOVERY_COUNT: usize = 10;

fn recovery_hash(user: &str, code: &str) -> Vec<u8> {
    let normal: String = code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect();
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"poort-recovery-v1\0");
    ctx.update(user.as_bytes());
    ctx.update(b"\0");
    ctx.update(normal.as_bytes());
    ctx.finish().as_ref().to_vec()
}

/// Replaces a user's recovery codes with ten new ones and returns them (shown once; only
/// their hashes are kept). Each has 50 random bits, written `xxxxx-xxxxx`.
pub fn recovery_new(conn: &mut Conn, user: &str) -> db::Result<Vec<String>> {
    const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let codes: Vec<String> = (0..RECOVERY_COUNT)
        .map(|_| {
            let b: [u8; 10] = crate::secret::random_bytes();
            let chars: Vec<char> = b.iter().map(|x| ALPHABET[(*x & 31) as usize] as char).collect();
            format!("{}-{}", chars[..5].iter().collect::<String>(), chars[5..].iter().collect::<String>())
        })
        .collect();
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM recovery_codes WHERE \"user\" = ?1", [user])?;
    for c in &codes {
        tx.execute(
            "INSERT INTO recovery_codes (\"user\", code_hash) VALUES (?1, ?2)",
            params![user, recovery_hash(user, c)],
        )?;
    }
    tx.commit()?;
    Ok(codes)
}

/// Uses up a recovery code. True if it was valid and unused.
pub fn recovery_use(conn: &Conn, user: &str, code: &str, now: UnixTime) -> db::Result<bool> {
    let n = conn.execute(
        "UPDATE recovery_codes SET used_at = ?1 WHERE \"user\" = ?2 AND code_hash = ?3 AND used_at IS NULL",
        params![now, user, recovery_hash(user, code)],
    )?;
    Ok(n == 1)
}

/// Removes every second factor of a user (the admin's `mfa-reset`).
pub fn reset(conn: &mut Conn, user: &str) -> db::Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM totp WHERE \"user\" = ?1", [user])?;
    tx.execute("DELETE FROM recovery_codes WHERE \"user\" = ?1", [user])?;
    tx.execute("DELETE FROM passkeys WHERE \"user\" = ?1", [user])?;
    // The SSH keys too: a reset is for an account whose credentials cannot be trusted.
    tx.execute("DELETE FROM ssh_keys WHERE \"user\" = ?1", [user])?;
    tx.commit()
}

pub use crate::config::LockPolicy;

impl LockPolicy {
    /// Seconds locked after the `failures`-th consecutive failure (0: not locked).
    pub fn lock_secs(&self, failures: u32) -> i64 {
        if failures < self.after {
            return 0;
        }
        let doublings = (failures - self.after).min(40);
        self.base_secs.saturating_mul(1i64 << doublings).min(self.max_secs)
    }
}

/// What a lock guards: the password, or the second factors. They count apart, so that a
/// right password never clears the count of wrong codes (a thief who has the password could
/// otherwise guess codes without end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    Password,
    Factor,
}

impl Lock {
    /// The key of this lock in the `lockouts` table (`/` is not in user names).
    fn key(self, user: &str) -> String {
        match self {
            Lock::Password => user.to_string(),
            Lock::Factor => format!("{user}/factor"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lock::Password => "password",
            Lock::Factor => "second factor",
        }
    }
}

/// True while `user`'s `lock` is locked.
pub fn locked(conn: &Conn, user: &str, lock: Lock, now: UnixTime) -> db::Result<bool> {
    let until: Option<i64> = conn
        .query_row("SELECT locked_until FROM lockouts WHERE \"user\" = ?1", [lock.key(user)], |r| r.get(0))
        .optional()?;
    Ok(until.is_some_and(|u| u > now))
}

/// Failures and lock end of each of `user`'s locks that has any.
pub fn lock_state(conn: &Conn, user: &str) -> db::Result<Vec<(Lock, u32, UnixTime)>> {
    let mut out = Vec::new();
    for lock in [Lock::Password, Lock::Factor] {
        let row: Option<(u32, i64)> = conn
            .query_row("SELECT failures, locked_until FROM lockouts WHERE \"user\" = ?1", [lock.key(user)], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((n, until)) = row {
            out.push((lock, n, until));
        }
    }
    Ok(out)
}

/// Counts a failure; returns (consecutive failures, locked until) when this failure locks.
pub fn record_failure(
    conn: &Conn,
    policy: LockPolicy,
    user: &str,
    lock: Lock,
    now: UnixTime,
) -> db::Result<Option<(u32, UnixTime)>> {
    let user = lock.key(user);
    let failures: u32 = conn.query_row(
        "INSERT INTO lockouts (\"user\", failures, locked_until, last_failure) VALUES (?1, 1, 0, ?2)
         ON CONFLICT (\"user\") DO UPDATE SET failures = lockouts.failures + 1, last_failure = excluded.last_failure
         RETURNING failures",
        params![user, now],
        |r| r.get(0),
    )?;
    let secs = policy.lock_secs(failures);
    if secs == 0 {
        return Ok(None);
    }
    let until = now + secs;
    conn.execute("UPDATE lockouts SET locked_until = CASE WHEN locked_until > ?1 THEN locked_until ELSE ?1 END WHERE \"user\" = ?2", params![until, user])?;
    Ok(Some((failures, until)))
}

/// Records a right password or factor: clears the count, unless a lock took hold since the
/// check began (guesses sent at once with it locked the account meanwhile). True if the
/// success stands.
pub fn succeeded(conn: &Conn, user: &str, lock: Lock, now: UnixTime) -> db::Result<bool> {
    if locked(conn, user, lock, now)? {
        return Ok(false);
    }
    unlock(conn, user, lock)?;
    Ok(true)
}

/// Clears one of `user`'s locks and its count.
pub fn unlock(conn: &Conn, user: &str, lock: Lock) -> db::Result<bool> {
    Ok(conn.execute("DELETE FROM lockouts WHERE \"user\" = ?1", [lock.key(user)])? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_grows_and_caps() {
        let p = LockPolicy { after: 5, base_secs: 60, max_secs: 1800 };
        let secs: Vec<i64> = (1..=12).map(|f| p.lock_secs(f)).collect();
        assert_eq!(secs, [0, 0, 0, 0, 60, 120, 240, 480, 960, 1800, 1800, 1800]);
        assert_eq!(p.lock_secs(u32::MAX), 1800);
    }

    #[test]
    fn recovery_codes_are_normalised() {
        assert_eq!(recovery_hash("a", "ABCDE-fghij"), recovery_hash("a", "abcde fghij"));
        assert_ne!(recovery_hash("a", "abcde-fghij"), recovery_hash("b", "abcde-fghij"));
    }
}

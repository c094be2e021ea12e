//! Short-lived state of what spans several requests: host hand-offs, WebAuthn ceremonies,
//! command-line code pairs, single sign-on logins in flight, and per-address sign-in counts.
//! It lives in the database, not in a node's memory, so that any node of a cluster finishes
//! what another started, and a restart loses nothing in flight.
//!
//! A flow is a JSON value under `(kind, id)` with an expiry. `take` removes and returns it in
//! one statement (`DELETE … RETURNING`), so a single-use value is used once even when two
//! nodes race for it; `replace` changes it only if nobody changed it since it was read.
//! Ids are bearer secrets (a hand-off code, a ceremony cookie): the table holds their SHA-256
//! only, so reading the database does not let anyone finish a flow.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Store;
use crate::clock::UnixTime;
use crate::db::{self, Conn, OptionalExtension, params};

/// The kinds of flow, one per table key prefix.
pub const HANDOFF: &str = "handoff";
pub const CEREMONY: &str = "ceremony";
pub const DEVICE: &str = "device";
pub const SSO: &str = "sso";

/// The stored form of an id.
fn key(id: &str) -> String {
    crate::secret::hex(ring::digest::digest(&ring::digest::SHA256, id.as_bytes()).as_ref())
}

fn encode<T: Serialize>(value: &T) -> db::Result<String> {
    serde_json::to_string(value).map_err(|e| db::Error::Value(e.to_string()))
}

fn decode<T: DeserializeOwned>(text: &str) -> Option<T> {
    // A value this version cannot read (written by another version) counts as gone.
    serde_json::from_str(text).ok()
}

/// Stores a new flow; false (and nothing changed) when the id is taken.
pub fn put<T: Serialize>(conn: &Conn, kind: &str, id: &str, value: &T, expires_at: UnixTime) -> db::Result<bool> {
    let n = conn.execute(
        "INSERT INTO flows (kind, id, value, expires_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
        params![kind, key(id), encode(value)?, expires_at],
    )?;
    Ok(n == 1)
}

/// Removes a flow and returns it if it had not expired. Of two takers, one gets it.
pub fn take<T: DeserializeOwned>(conn: &Conn, kind: &str, id: &str, now: UnixTime) -> db::Result<Option<T>> {
    let row: Option<(String, i64)> = conn
        .query_row(
            "DELETE FROM flows WHERE kind = ?1 AND id = ?2 RETURNING value, expires_at",
            params![kind, key(id)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(row.filter(|(_, exp)| *exp > now).and_then(|(v, _)| decode(&v)))
}

/// A live flow and the text it was read from (for `replace`).
pub fn get<T: DeserializeOwned>(conn: &Conn, kind: &str, id: &str, now: UnixTime) -> db::Result<Option<(T, String)>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT value FROM flows WHERE kind = ?1 AND id = ?2 AND expires_at > ?3",
            params![kind, key(id), now],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text.and_then(|t| decode(&t).map(|v| (v, t))))
}

/// Replaces a flow read as `old` with `new`; false when it changed or went meanwhile.
pub fn replace<T: Serialize>(conn: &Conn, kind: &str, id: &str, old: &str, new: &T) -> db::Result<bool> {
    let n = conn.execute(
        "UPDATE flows SET value = ?1 WHERE kind = ?2 AND id = ?3 AND value = ?4",
        params![encode(new)?, kind, key(id), old],
    )?;
    Ok(n == 1)
}

/// Reads a flow, changes it with `f` and writes it back, again from the start when another
/// request changed it in between. `f` returns what to answer, and whether to write.
pub fn update<T: Serialize + DeserializeOwned, R>(
    conn: &Conn,
    kind: &str,
    id: &str,
    now: UnixTime,
    mut f: impl FnMut(&mut T) -> (R, bool),
) -> db::Result<Option<R>> {
    for _ in 0..16 {
        let Some((mut value, text)) = get::<T>(conn, kind, id, now)? else { return Ok(None) };
        let (answer, write) = f(&mut value);
        if !write || replace(conn, kind, id, &text, &value)? {
            return Ok(Some(answer));
        }
    }
    Err(db::Error::Value(format!("the {kind} flow kept changing")))
}

/// How many live flows of a kind there are.
pub fn count(conn: &Conn, kind: &str, now: UnixTime) -> db::Result<i64> {
    conn.query_row("SELECT count(*) FROM flows WHERE kind = ?1 AND expires_at > ?2", params![kind, now], |r| r.get(0))
}

/// Counts a sign-in attempt from `addr` in the minute of `now`; returns the count so far.
pub fn attempt(conn: &Conn, addr: &str, now: UnixTime) -> db::Result<i64> {
    conn.query_row(
        "INSERT INTO attempts (addr, minute, n) VALUES (?1, ?2, 1)
         ON CONFLICT (addr, minute) DO UPDATE SET n = attempts.n + 1 RETURNING n",
        params![addr, now.div_euclid(60)],
        |r| r.get(0),
    )
}

impl Store {
    /// Removes expired flows and old attempt counts (called periodically).
    pub fn sweep_flows(&self, now: UnixTime) -> anyhow::Result<usize> {
        self.with(|c| {
            let flows = c.execute("DELETE FROM flows WHERE expires_at <= ?1", [now])?;
            let counts = c.execute("DELETE FROM attempts WHERE minute < ?1", [now.div_euclid(60) - 1])?;
            Ok(flows + counts)
        })
    }
}

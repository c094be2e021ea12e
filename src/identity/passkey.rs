//! Passkeys and security keys (WebAuthn) in the store: each user gets a random 16-byte handle
//! the first time they register one (the WebAuthn user id, which authenticators keep and
//! return on passwordless sign-in); each credential is kept as webauthn-rs serialises it, with
//! the name the user gave it. The ceremonies themselves are in `portal::passkey`.

use crate::db::{self, Conn, OptionalExtension, Row, params};
use webauthn_rs::prelude::{Passkey, Uuid};

use crate::clock::UnixTime;

/// A registered credential.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The credential id, base64url.
    pub id: String,
    pub user: String,
    pub name: String,
    pub passkey: Passkey,
    pub created_at: UnixTime,
    pub last_used: Option<UnixTime>,
}

/// The user's WebAuthn handle, made on first use.
pub fn handle(conn: &Conn, user: &str) -> db::Result<Uuid> {
    let existing: Option<Option<Vec<u8>>> =
        conn.query_row("SELECT handle FROM users WHERE name = ?1", [user], |r| r.get(0)).optional()?;
    if let Some(Some(h)) = existing
        && let Ok(b) = <[u8; 16]>::try_from(h.as_slice())
    {
        return Ok(Uuid::from_bytes(b));
    }
    let b: [u8; 16] = crate::secret::random_bytes();
    conn.execute("UPDATE users SET handle = ?1 WHERE name = ?2", params![&b[..], user])?;
    Ok(Uuid::from_bytes(b))
}

/// The user a handle belongs to, if they are enabled.
pub fn user_by_handle(conn: &Conn, handle: &Uuid) -> db::Result<Option<String>> {
    conn.query_row("SELECT name FROM users WHERE handle = ?1 AND disabled = 0", [&handle.as_bytes()[..]], |r| r.get(0))
        .optional()
}

fn row(r: &Row) -> db::Result<Option<Stored>> {
    let json: String = r.get(3)?;
    Ok(serde_json::from_str(&json).ok().map(|passkey| Stored {
        id: r.get(0).unwrap_or_default(),
        user: r.get(1).unwrap_or_default(),
        name: r.get(2).unwrap_or_default(),
        passkey,
        created_at: r.get(4).unwrap_or_default(),
        last_used: r.get(5).unwrap_or_default(),
    }))
}

pub fn list(conn: &Conn, user: &str) -> db::Result<Vec<Stored>> {
    let rows = conn.query_map(
        "SELECT id, \"user\", name, passkey, created_at, last_used FROM passkeys WHERE \"user\" = ?1 ORDER BY created_at, id",
        [user],
        row,
    )?;
    Ok(rows.into_iter().flatten().collect())
}

/// Adds a credential. Fails if its id is registered already (to anyone).
pub fn add(conn: &Conn, user: &str, name: &str, pk: &Passkey, now: UnixTime) -> db::Result<String> {
    let id = crate::secret::b64(pk.cred_id().as_ref());
    let json = serde_json::to_string(pk).map_err(|e| db::Error::Value(e.to_string()))?;
    conn.execute(
        "INSERT INTO passkeys (id, \"user\", name, passkey, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, user, name, json, now],
    )?;
    Ok(id)
}

/// Saves the counter and backup state after an authentication.
pub fn touch(conn: &Conn, id: &str, pk: &Passkey, now: UnixTime) -> db::Result<()> {
    let json = serde_json::to_string(pk).map_err(|e| db::Error::Value(e.to_string()))?;
    conn.execute("UPDATE passkeys SET passkey = ?1, last_used = ?2 WHERE id = ?3", params![json, now, id])?;
    Ok(())
}

pub fn remove(conn: &Conn, user: &str, id: &str) -> db::Result<bool> {
    Ok(conn.execute("DELETE FROM passkeys WHERE \"user\" = ?1 AND id = ?2", params![user, id])? > 0)
}

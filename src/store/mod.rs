//! Durable state: users, groups, sessions, revocations, sign-ins in flight and the audit
//! chain, in one SQLite file (the embedded default) or in PostgreSQL (a cluster of gateways).
//!
//! The database is synchronous to its callers (`db::Conn`); async callers go through
//! `Store::run`, which moves the work to the blocking pool. Every gateway and the `poort`
//! admin commands open the same database, so an admin action in another process, or on
//! another node, reaches a running gateway through the `revocations` table, which it polls.

pub mod cluster;
pub mod flows;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use parking_lot::Mutex;

use crate::db::{self, params};
pub use crate::db::{Backend, Conn, OptionalExtension, Row};

use crate::clock::UnixTime;
pub use crate::config::database::{Database, redact_url};
use crate::identity::Identity;

impl Database {
    pub fn backend(&self) -> Backend {
        match self {
            Database::Sqlite(_) => Backend::Sqlite,
            Database::Postgres { .. } => Backend::Postgres,
        }
    }
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    email         TEXT,
    password_hash TEXT,
    disabled      INTEGER NOT NULL DEFAULT 0,
    source        TEXT NOT NULL DEFAULT 'local',
    created_at    INTEGER NOT NULL
);
CREATE TABLE user_groups (
    user  TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    grp   TEXT NOT NULL,
    PRIMARY KEY (user, grp)
);
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    client_addr TEXT NOT NULL,
    user_agent  TEXT NOT NULL,
    factors     TEXT NOT NULL
);
CREATE INDEX sessions_user ON sessions(user);
CREATE TABLE session_tokens (
    token_hash BLOB PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    host       TEXT NOT NULL
);
CREATE INDEX session_tokens_session ON session_tokens(session_id);
CREATE TABLE revocations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT,
    user       TEXT,
    at         INTEGER NOT NULL
);
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
);
"#,
    r#"
CREATE TABLE totp (
    user       TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
    secret     BLOB NOT NULL,
    confirmed  INTEGER NOT NULL DEFAULT 0,
    last_step  INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE recovery_codes (
    user      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    code_hash BLOB NOT NULL,
    used_at   INTEGER,
    PRIMARY KEY (user, code_hash)
);
CREATE TABLE passkeys (
    id         TEXT PRIMARY KEY,
    user       TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    passkey    TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_used  INTEGER
);
CREATE INDEX passkeys_user ON passkeys(user);
CREATE TABLE lockouts (
    user         TEXT PRIMARY KEY,
    failures     INTEGER NOT NULL,
    locked_until INTEGER NOT NULL,
    last_failure INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE users ADD COLUMN handle BLOB;
CREATE UNIQUE INDEX users_handle ON users(handle);
"#,
    r#"
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE sessions ADD COLUMN logout_url TEXT;
"#,
    r#"
ALTER TABLE sessions ADD COLUMN auth_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN factor_at INTEGER;
ALTER TABLE sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'browser';
ALTER TABLE sessions ADD COLUMN parent TEXT;
ALTER TABLE sessions ADD COLUMN chain TEXT NOT NULL DEFAULT '';
UPDATE sessions SET auth_at = created_at, chain = id;
UPDATE sessions SET kind = 'cli' WHERE user_agent = 'poort command line';
ALTER TABLE users ADD COLUMN subject TEXT;
CREATE UNIQUE INDEX users_source_subject ON users(source, subject) WHERE subject IS NOT NULL;
"#,
    FLOWS_SQLITE,
    r#"
CREATE TABLE ssh_keys (
    fingerprint TEXT PRIMARY KEY,
    material    TEXT NOT NULL UNIQUE,
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    key         TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    last_used   INTEGER
);
CREATE INDEX ssh_keys_user ON ssh_keys(user);
"#,
];

/// Migration 7: what one request of a sign-in leaves for the next (on any node), the sign-in
/// counts per address, and the nodes of a cluster.
const FLOWS_SQLITE: &str = r#"
CREATE TABLE flows (
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    value      TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE TABLE attempts (
    addr   TEXT NOT NULL,
    minute INTEGER NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (addr, minute)
);
CREATE TABLE nodes (
    id         TEXT PRIMARY KEY,
    version    TEXT NOT NULL,
    config     TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    seen_at    INTEGER NOT NULL
);
"#;

/// The PostgreSQL schema, in the same shape as SQLite's after its migrations; the
/// `schema_version` table records how many of these ran.
const PG_MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    email         TEXT,
    password_hash TEXT,
    disabled      BIGINT NOT NULL DEFAULT 0,
    source        TEXT NOT NULL DEFAULT 'local',
    created_at    BIGINT NOT NULL,
    handle        BYTEA,
    subject       TEXT
);
CREATE UNIQUE INDEX users_handle ON users(handle);
CREATE UNIQUE INDEX users_source_subject ON users(source, subject) WHERE subject IS NOT NULL;
CREATE TABLE user_groups (
    "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    grp    TEXT NOT NULL,
    PRIMARY KEY ("user", grp)
);
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    "user"      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    created_at  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    client_addr TEXT NOT NULL,
    user_agent  TEXT NOT NULL,
    factors     TEXT NOT NULL,
    logout_url  TEXT,
    auth_at     BIGINT NOT NULL DEFAULT 0,
    factor_at   BIGINT,
    kind        TEXT NOT NULL DEFAULT 'browser',
    parent      TEXT,
    chain       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX sessions_user ON sessions("user");
CREATE INDEX sessions_parent ON sessions(parent);
CREATE TABLE session_tokens (
    token_hash BYTEA PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    host       TEXT NOT NULL
);
CREATE INDEX session_tokens_session ON session_tokens(session_id);
CREATE TABLE revocations (
    seq        BIGSERIAL PRIMARY KEY,
    session_id TEXT,
    "user"     TEXT,
    at         BIGINT NOT NULL
);
CREATE TABLE audit (
    seq       BIGINT PRIMARY KEY,
    at        BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash      BYTEA NOT NULL
);
CREATE TABLE totp (
    "user"     TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
    secret     BYTEA NOT NULL,
    confirmed  BIGINT NOT NULL DEFAULT 0,
    last_step  BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE recovery_codes (
    "user"    TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    code_hash BYTEA NOT NULL,
    used_at   BIGINT,
    PRIMARY KEY ("user", code_hash)
);
CREATE TABLE passkeys (
    id         TEXT PRIMARY KEY,
    "user"     TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    passkey    TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used  BIGINT
);
CREATE INDEX passkeys_user ON passkeys("user");
CREATE TABLE lockouts (
    "user"       TEXT PRIMARY KEY,
    failures     BIGINT NOT NULL,
    locked_until BIGINT NOT NULL,
    last_failure BIGINT NOT NULL
);
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE flows (
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    value      TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE TABLE attempts (
    addr   TEXT NOT NULL,
    minute BIGINT NOT NULL,
    n      BIGINT NOT NULL,
    PRIMARY KEY (addr, minute)
);
CREATE TABLE nodes (
    id         TEXT PRIMARY KEY,
    version    TEXT NOT NULL,
    config     TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL
);
"#,
    r#"
CREATE TABLE ssh_keys (
    fingerprint TEXT PRIMARY KEY,
    material    TEXT NOT NULL UNIQUE,
    "user"      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    key         TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    last_used   BIGINT
);
CREATE INDEX ssh_keys_user ON ssh_keys("user");
"#,
];

/// The advisory lock keys that serialise schema changes, audit appends and revocations across
/// nodes.
pub const PG_LOCK_SCHEMA: i64 = 0x706f_6f72_7401;
pub const PG_LOCK_AUDIT: i64 = 0x706f_6f72_7402;
pub const PG_LOCK_REVOCATIONS: i64 = 0x706f_6f72_7403;

/// Records a revocation (of a session, or of what is cached about a user), as the last
/// statement of a transaction. Nodes read revocations in order of their number, and must not
/// skip one: on PostgreSQL a number is taken when the row is written but becomes visible at
/// commit, so two writers could become visible out of order. The writers take turns under a
/// lock held to commit, which makes the order of numbers the order of commits. (A transaction
/// holding the lock takes no other lock after it, so the lock cannot close a deadlock.)
fn revoked(tx: &Conn, session: Option<&str>, user: Option<&str>, now: UnixTime) -> db::Result<()> {
    if tx.backend() == Backend::Postgres {
        tx.query_row("SELECT pg_advisory_xact_lock(?1)::text", [PG_LOCK_REVOCATIONS], |_| Ok(()))?;
    }
    tx.execute("INSERT INTO revocations (session_id, \"user\", at) VALUES (?1, ?2, ?3)", params![session, user, now])?;
    notify(tx)
}

/// Tells every node listening on PostgreSQL that revocations or settings changed (delivered
/// when the transaction commits; nothing if it does not). On SQLite nodes just poll.
fn notify(conn: &Conn) -> db::Result<()> {
    if conn.backend() == Backend::Postgres {
        conn.query_row("SELECT pg_notify(?1, '')::text", [db::CHANGES], |_| Ok(()))?;
    }
    Ok(())
}

/// The store: a few connections to the database, opened as they are needed and opened again
/// when their server went away (a PostgreSQL restart).
#[derive(Clone)]
pub struct Store {
    pool: Arc<Pool>,
}

struct Pool {
    db: Database,
    conns: Vec<Mutex<Option<Conn>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Connections a gateway keeps to PostgreSQL (SQLite has one: it writes one at a time).
const PG_CONNECTIONS: usize = 4;

/// Opens (creating if needed) a database with poort's settings and schema.
pub fn open_connection(db: impl Into<Database>) -> anyhow::Result<Conn> {
    let db = db.into();
    let conn = connect(&db)?;
    migrate(conn)
}

/// Opens a connection without looking at the schema.
fn connect(db: &Database) -> anyhow::Result<Conn> {
    match db {
        Database::Sqlite(path) => open_sqlite(path),
        Database::Postgres { url, tls } => {
            let tls = match tls {
                None => None,
                Some(trust) => Some(crate::tls_client::config(trust, None, &[])?),
            };
            let pg = db::Pg::connect(url, tls).with_context(|| format!("connecting to {db}"))?;
            Ok(Conn::Postgres(Box::new(pg)))
        }
    }
}

fn open_sqlite(path: &Path) -> anyhow::Result<Conn> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let conn = rusqlite::Connection::open(path).with_context(|| format!("opening database {}", path.display()))?;
    // Password hashes and session hashes live here: owner only. SQLite gives its -wal and
    // -shm files the same mode.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // WAL lets the admin commands read while the gateway writes; FULL makes each commit durable.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(Conn::Sqlite(conn))
}

fn migrate(mut conn: Conn) -> anyhow::Result<Conn> {
    let (migrations, backend) = match conn.backend() {
        Backend::Sqlite => (MIGRATIONS, Backend::Sqlite),
        Backend::Postgres => (PG_MIGRATIONS, Backend::Postgres),
    };
    let tx = conn.transaction()?;
    let done: i64 = match backend {
        Backend::Sqlite => tx.query_row("PRAGMA user_version", (), |r| r.get(0))?,
        Backend::Postgres => {
            // Nodes starting together take turns.
            tx.query_row("SELECT pg_advisory_xact_lock(?1)::text", [PG_LOCK_SCHEMA], |_| Ok(()))?;
            tx.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
            tx.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", (), |r| r.get(0))?
        }
    };
    let done = usize::try_from(done).unwrap_or(usize::MAX);
    if done > migrations.len() {
        anyhow::bail!("the database schema (version {done}) is newer than this poort; upgrade poort");
    }
    for (i, m) in migrations.iter().enumerate().skip(done) {
        tx.batch(m).with_context(|| format!("schema migration {}", i + 1))?;
        match backend {
            Backend::Sqlite => tx.batch(&format!("PRAGMA user_version = {}", i + 1))?,
            Backend::Postgres => {
                tx.execute("DELETE FROM schema_version", ())?;
                tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [(i + 1) as i64])?;
            }
        }
    }
    tx.commit()?;
    Ok(conn)
}

impl Store {
    /// Opens the store, creating its schema if needed.
    pub fn open(db: impl Into<Database>) -> anyhow::Result<Store> {
        let db = db.into();
        let n = match db.backend() {
            Backend::Sqlite => 1,
            Backend::Postgres => PG_CONNECTIONS,
        };
        let first = open_connection(&db)?;
        let conns = std::iter::once(Mutex::new(Some(first))).chain((1..n).map(|_| Mutex::new(None))).collect();
        Ok(Store { pool: Arc::new(Pool { db, conns, next: AtomicUsize::new(0) }) })
    }

    /// On PostgreSQL: a listener that wakes `changed` when another node or the command line
    /// revokes something or changes a setting (the lockdown switch). None on SQLite.
    pub fn watch(&self, changed: Arc<tokio::sync::Notify>) -> anyhow::Result<Option<db::Listener>> {
        match &self.pool.db {
            Database::Sqlite(_) => Ok(None),
            Database::Postgres { url, tls } => {
                let tls = match tls {
                    None => None,
                    Some(trust) => Some(crate::tls_client::config(trust, None, &[])?),
                };
                Ok(Some(db::listen(url, tls, changed)?))
            }
        }
    }

    pub fn database(&self) -> &Database {
        &self.pool.db
    }

    pub fn backend(&self) -> Backend {
        self.pool.db.backend()
    }

    /// Runs `f` with a connection on the calling thread. For the CLI and start-up.
    pub fn with<R>(&self, f: impl FnOnce(&mut Conn) -> db::Result<R>) -> anyhow::Result<R> {
        let pool = &self.pool;
        // A free connection if there is one, else the next in turn.
        let mut slot = pool.conns.iter().find_map(|m| m.try_lock()).unwrap_or_else(|| {
            let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.conns.len();
            pool.conns[i].lock()
        });
        if slot.as_ref().is_none_or(Conn::is_broken) {
            *slot = None;
            *slot = Some(connect(&pool.db)?);
        }
        let conn = slot.as_mut().expect("invariant: connected just above");
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_connection() {
                    // Opened again next time.
                    *slot = None;
                }
                Err(e.into())
            }
        }
    }

    /// Runs `f` on the blocking pool. For request handling.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> db::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.with(f)).await.context("store task failed")?
    }
}

#[derive(Debug, Clone)]
pub struct UserRow {
    pub name: String,
    pub email: Option<String>,
    pub disabled: bool,
    pub source: String,
    pub groups: Vec<String>,
    pub created_at: UnixTime,
}

/// A session as stored; the token itself is never stored, only its SHA-256.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub id: String,
    pub user: String,
    pub created_at: UnixTime,
    pub last_seen: UnixTime,
    pub expires_at: UnixTime,
    pub client_addr: String,
    pub user_agent: String,
    pub factors: String,
    /// When the user last proved who they are with a password or an identity provider.
    pub auth_at: UnixTime,
    /// When the user last proved a second factor in this session's line, if ever.
    pub factor_at: Option<UnixTime>,
    /// `browser` or `cli`.
    pub kind: String,
    /// The session that approved this one (a command-line sign-in), if any.
    pub parent: Option<String>,
    /// The id of the first session of the sign-in this one was renewed from (the same browser
    /// through step-ups and confirmations).
    pub chain: String,
}

/// The session columns `SessionRow::from_row` reads, in its order.
const SESSION_COLUMNS: &str = "s.id, s.\"user\", s.created_at, s.last_seen, s.expires_at, s.client_addr, s.user_agent, s.factors, s.auth_at, s.factor_at, s.kind, s.parent, s.chain";

impl SessionRow {
    /// Reads `SESSION_COLUMNS` from the start of a row.
    fn from_row(r: &Row) -> db::Result<SessionRow> {
        Ok(SessionRow {
            id: r.get(0)?,
            user: r.get(1)?,
            created_at: r.get(2)?,
            last_seen: r.get(3)?,
            expires_at: r.get(4)?,
            client_addr: r.get(5)?,
            user_agent: r.get(6)?,
            factors: r.get(7)?,
            auth_at: r.get(8)?,
            factor_at: r.get(9)?,
            kind: r.get(10)?,
            parent: r.get(11)?,
            chain: r.get(12)?,
        })
    }
}

/// What recording an outside user came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// Recorded, under this poort name.
    Yes(String),
    /// The name belongs to a user of another source.
    OtherSource,
    /// The name belongs to another account of the same provider.
    OtherSubject,
}

/// A change to a user's factors, as the audit log has it.
#[derive(Debug, Clone)]
pub struct FactorChange {
    pub at: UnixTime,
    pub change: String,
    pub client: String,
    pub proof: String,
}

/// What `expire_session` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Over here and in the store: ended (and revoked).
    Ended,
    /// Still in use: another node recorded this last use.
    InUse(UnixTime),
    /// Not in the store any more.
    Gone,
}

/// What a revocation poll returns: end this session, or forget cached data of this user.
#[derive(Debug, Clone)]
pub struct Revocation {
    pub seq: i64,
    pub session_id: Option<String>,
    pub user: Option<String>,
}

impl Store {
    // ---- users -------------------------------------------------------------------------

    pub fn add_user(
        &self,
        name: &str,
        email: Option<&str>,
        hash: &str,
        groups: &[String],
        now: UnixTime,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO users (name, email, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, email, hash, now],
            )?;
            for g in groups {
                tx.execute(
                    "INSERT INTO user_groups (\"user\", grp) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    params![name, g],
                )?;
            }
            tx.commit()
        })
    }

    pub fn user_exists(&self, name: &str) -> anyhow::Result<bool> {
        self.with(|c| {
            c.query_row("SELECT 1 FROM users WHERE name = ?1", [name], |_| Ok(())).optional().map(|o| o.is_some())
        })
    }

    /// Whether a user of this name exists, in any letter case: a new account may not differ
    /// from an existing one only by case (people and audit records would confuse them).
    pub fn name_taken(&self, name: &str) -> anyhow::Result<bool> {
        self.with(|c| {
            c.query_row("SELECT 1 FROM users WHERE lower(name) = lower(?1)", [name], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
        })
    }

    pub fn list_users(&self) -> anyhow::Result<Vec<UserRow>> {
        self.with(|c| {
            let mut users =
                c.query_map("SELECT name, email, disabled, source, created_at FROM users ORDER BY name", (), |r| {
                    Ok(UserRow {
                        name: r.get(0)?,
                        email: r.get(1)?,
                        disabled: r.get(2)?,
                        source: r.get(3)?,
                        created_at: r.get(4)?,
                        groups: Vec::new(),
                    })
                })?;
            let groups = c.query_map("SELECT \"user\", grp FROM user_groups ORDER BY \"user\", grp", (), |r| {
                Ok((r.get::<String>(0)?, r.get::<String>(1)?))
            })?;
            let mut by_user: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
            for (user, grp) in groups {
                by_user.entry(user).or_default().push(grp);
            }
            for u in &mut users {
                u.groups = by_user.remove(&u.name).unwrap_or_default();
            }
            Ok(users)
        })
    }

    /// The password hash of an enabled local user; None for unknown or disabled users.
    pub fn password_hash(conn: &Conn, name: &str) -> db::Result<Option<String>> {
        conn.query_row(
            "SELECT password_hash FROM users WHERE name = ?1 AND disabled = 0 AND password_hash IS NOT NULL",
            [name],
            |r| r.get(0),
        )
        .optional()
    }

    pub fn identity(conn: &Conn, name: &str) -> db::Result<Option<Identity>> {
        let email: Option<Option<String>> = conn
            .query_row("SELECT email FROM users WHERE name = ?1 AND disabled = 0", [name], |r| r.get(0))
            .optional()?;
        let Some(email) = email else { return Ok(None) };
        let groups =
            conn.query_map("SELECT grp FROM user_groups WHERE \"user\" = ?1 ORDER BY grp", [name], |r| r.get(0))?;
        Ok(Some(Identity { user: name.to_string(), email, groups }))
    }

    /// Changes a user and tells running gateways to drop what they cached about them.
    fn change_user(&self, name: &str, now: UnixTime, sql: &str, args: Vec<db::Value>) -> anyhow::Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(sql, args)?;
            if n > 0 {
                revoked(&tx, None, Some(name), now)?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    pub fn set_password(&self, name: &str, hash: &str, now: UnixTime) -> anyhow::Result<bool> {
        self.change_user(name, now, "UPDATE users SET password_hash = ?1 WHERE name = ?2", params![hash, name])
    }

    /// Disabling also ends every session of the user.
    pub fn set_disabled(&self, name: &str, disabled: bool, now: UnixTime) -> anyhow::Result<bool> {
        let changed =
            self.change_user(name, now, "UPDATE users SET disabled = ?1 WHERE name = ?2", params![disabled, name])?;
        if changed && disabled {
            self.revoke_user_sessions(name, now)?;
        }
        Ok(changed)
    }

    pub fn change_groups(&self, name: &str, add: &[String], remove: &[String], now: UnixTime) -> anyhow::Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            for g in add {
                tx.execute(
                    "INSERT INTO user_groups (\"user\", grp) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    params![name, g],
                )?;
            }
            for g in remove {
                tx.execute("DELETE FROM user_groups WHERE \"user\" = ?1 AND grp = ?2", params![name, g])?;
            }
            revoked(&tx, None, Some(name), now)?;
            tx.commit()
        })
    }

    /// Where signing out of a session also ends its identity provider session.
    pub fn set_logout_url(conn: &Conn, session: &str, url: &str) -> db::Result<()> {
        conn.execute("UPDATE sessions SET logout_url = ?1 WHERE id = ?2", params![url, session]).map(|_| ())
    }

    pub fn logout_url(conn: &Conn, session: &str) -> db::Result<Option<String>> {
        conn.query_row("SELECT logout_url FROM sessions WHERE id = ?1", [session], |r| r.get(0))
            .optional()
            .map(Option::flatten)
    }

    /// `source` and `disabled` of a user, if the user exists.
    pub fn user_source(conn: &Conn, name: &str) -> db::Result<Option<(String, bool)>> {
        conn.query_row("SELECT source, disabled FROM users WHERE name = ?1", [name], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    }

    /// The poort name of the provider account `(source, subject)`, if it has signed in before.
    pub fn user_by_subject(conn: &Conn, source: &str, subject: &str) -> db::Result<Option<String>> {
        conn.query_row("SELECT name FROM users WHERE source = ?1 AND subject = ?2", params![source, subject], |r| {
            r.get(0)
        })
        .optional()
    }

    /// Records a user who signed in through a directory or an identity provider: created on
    /// first sight, email and groups replaced with what the source says now. An identity
    /// provider's user is bound to its subject (`sub`, stable at the provider) on first sight:
    /// later the subject, not the name it chose, decides who signs in. A name that belongs to
    /// a user of another source, or to another subject, is refused, so no source can take over
    /// an account.
    pub fn sync_external(
        conn: &mut Conn,
        name: &str,
        subject: Option<&str>,
        email: Option<&str>,
        source: &str,
        groups: &[String],
        now: UnixTime,
    ) -> db::Result<Synced> {
        let tx = conn.transaction()?;
        // The subject decides first: a provider account keeps its poort name even when the
        // name it claims changes.
        let bound: Option<String> = match subject {
            Some(sub) => tx
                .query_row("SELECT name FROM users WHERE source = ?1 AND subject = ?2", params![source, sub], |r| {
                    r.get(0)
                })
                .optional()?,
            None => None,
        };
        let name = bound.clone().unwrap_or_else(|| name.to_string());
        let existing: Option<(String, Option<String>)> = tx
            .query_row("SELECT source, subject FROM users WHERE name = ?1", [&name], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match existing {
            Some((s, _)) if s != source => return Ok(Synced::OtherSource),
            Some((_, Some(held))) if subject.is_some_and(|sub| sub != held) => return Ok(Synced::OtherSubject),
            Some((_, held)) => {
                tx.execute("UPDATE users SET email = ?1 WHERE name = ?2", params![email, name])?;
                if held.is_none() && subject.is_some() {
                    // Recorded before subjects were: bound now, to the account that signs in.
                    tx.execute("UPDATE users SET subject = ?1 WHERE name = ?2", params![subject, name])?;
                }
            }
            None => {
                tx.execute(
                    "INSERT INTO users (name, email, password_hash, source, subject, created_at) VALUES (?1, ?2, NULL, ?3, ?4, ?5)",
                    params![name, email, source, subject, now],
                )?;
            }
        }
        let before: Vec<String> =
            { tx.query_map("SELECT grp FROM user_groups WHERE \"user\" = ?1 ORDER BY grp", [&name], |r| r.get(0))? };
        let mut after = groups.to_vec();
        after.sort();
        after.dedup();
        if before != after {
            tx.execute("DELETE FROM user_groups WHERE \"user\" = ?1", [&name])?;
            for g in &after {
                tx.execute("INSERT INTO user_groups (\"user\", grp) VALUES (?1, ?2)", params![name, g])?;
            }
            // Running gateways drop what they cached about the user.
            revoked(&tx, None, Some(&name), now)?;
        }
        tx.commit()?;
        Ok(Synced::Yes(name))
    }

    /// Recent changes to a user's factors, newest first, from the audit log.
    pub fn factor_changes(conn: &Conn, user: &str, limit: usize) -> db::Result<Vec<FactorChange>> {
        // Factor changes are few; the records are read here rather than by each engine's
        // own JSON functions.
        let rows =
            conn.query_map("SELECT at, detail FROM audit WHERE kind = 'factor_changed' ORDER BY seq DESC", (), |r| {
                Ok((r.get::<i64>(0)?, r.get::<String>(1)?))
            })?;
        let text = |d: &serde_json::Value, k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        Ok(rows
            .into_iter()
            .filter_map(|(at, detail)| {
                let d: serde_json::Value = serde_json::from_str(&detail).ok()?;
                (d.get("user").and_then(|u| u.as_str()) == Some(user)).then(|| FactorChange {
                    at,
                    change: text(&d, "change"),
                    client: text(&d, "client"),
                    proof: text(&d, "proof"),
                })
            })
            .take(limit)
            .collect())
    }

    // ---- sessions ----------------------------------------------------------------------

    /// Stores a new session and its first token. With `replaces`, sessions that the old one
    /// approved now name the new one as their parent (a renewal keeps the line).
    pub fn insert_session(
        conn: &mut Conn,
        s: &SessionRow,
        token_hash: &[u8],
        host: &str,
        replaces: Option<&str>,
    ) -> db::Result<()> {
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO sessions (id, \"user\", created_at, last_seen, expires_at, client_addr, user_agent, factors,
                                   auth_at, factor_at, kind, parent, chain)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                s.id,
                s.user,
                s.created_at,
                s.last_seen,
                s.expires_at,
                s.client_addr,
                s.user_agent,
                s.factors,
                s.auth_at,
                s.factor_at,
                s.kind,
                s.parent,
                s.chain
            ],
        )?;
        tx.execute(
            "INSERT INTO session_tokens (token_hash, session_id, host) VALUES (?1, ?2, ?3)",
            params![token_hash, s.id, host],
        )?;
        if let Some(old) = replaces {
            tx.execute("UPDATE sessions SET parent = ?1 WHERE parent = ?2", params![s.id, old])?;
        }
        tx.commit()
    }

    /// Adds a token for another host to a live session (the host hand-off). False when the
    /// session has ended meanwhile.
    pub fn add_token(conn: &Conn, session: &str, token_hash: &[u8], host: &str) -> db::Result<bool> {
        let added = conn.execute(
            "INSERT INTO session_tokens (token_hash, session_id, host) SELECT ?1, id, ?3 FROM sessions WHERE id = ?2",
            params![token_hash, session, host],
        )?;
        Ok(added == 1)
    }

    /// The session a token hash belongs to, with its user's identity, if both are live.
    pub fn load_session(conn: &Conn, token_hash: &[u8]) -> db::Result<Option<(SessionRow, String, Identity)>> {
        let row = conn
            .query_row(
                &format!(
                    "SELECT {SESSION_COLUMNS}, t.host
                     FROM session_tokens t JOIN sessions s ON s.id = t.session_id WHERE t.token_hash = ?1"
                ),
                [token_hash],
                |r| Ok((SessionRow::from_row(r)?, r.get::<String>(13)?)),
            )
            .optional()?;
        let Some((row, host)) = row else { return Ok(None) };
        Ok(Store::identity(conn, &row.user)?.map(|id| (row, host, id)))
    }

    pub fn touch_sessions(&self, updates: &[(String, UnixTime)]) -> anyhow::Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            for (id, seen) in updates {
                tx.execute(
                    "UPDATE sessions SET last_seen = CASE WHEN last_seen < ?1 THEN ?1 ELSE last_seen END WHERE id = ?2",
                    params![seen, id],
                )?;
            }
            tx.commit()
        })
    }

    pub fn list_sessions(&self, user: Option<&str>) -> anyhow::Result<Vec<SessionRow>> {
        self.with(|c| {
            let order = "ORDER BY s.created_at, s.id";
            match user {
                Some(u) => c.query_map(
                    &format!("SELECT {SESSION_COLUMNS} FROM sessions s WHERE s.\"user\" = ?1 {order}"),
                    [u],
                    SessionRow::from_row,
                ),
                None => {
                    c.query_map(&format!("SELECT {SESSION_COLUMNS} FROM sessions s {order}"), (), SessionRow::from_row)
                }
            }
        })
    }

    /// Deletes sessions and records their revocation in one transaction. Returns the ids.
    fn revoke_where(&self, filter: &str, arg: Option<&str>, now: UnixTime) -> anyhow::Result<Vec<String>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let ids: Vec<String> = {
                let sql = format!("SELECT id FROM sessions WHERE {filter}");
                match arg {
                    Some(a) => tx.query_map(&sql, [a], |r| r.get(0))?,
                    None => tx.query_map(&sql, (), |r| r.get(0))?,
                }
            };
            for id in &ids {
                tx.execute("DELETE FROM sessions WHERE id = ?1", [id])?;
            }
            for id in &ids {
                revoked(&tx, Some(id), None, now)?;
            }
            tx.commit()?;
            Ok(ids)
        })
    }

    /// Ends, within the transaction `tx` and as its last statements, the SSH front door's
    /// sessions of `user` that the key `fingerprint` opened (every one of theirs with None): a
    /// key taken away lets nobody stay in with it. Returns how many ended.
    pub fn revoke_ssh_sessions(tx: &Conn, user: &str, fingerprint: Option<&str>, now: UnixTime) -> db::Result<usize> {
        // A fingerprint is base64 and `SHA256:`: nothing LIKE would read as a pattern.
        let pattern = fingerprint.map_or_else(|| "%".to_string(), |fp| format!("%(key {fp})"));
        let ids: Vec<String> = tx.query_map(
            "SELECT id FROM sessions WHERE \"user\" = ?1 AND kind = 'ssh' AND user_agent LIKE ?2",
            params![user, pattern],
            |r| r.get(0),
        )?;
        for id in &ids {
            tx.execute("DELETE FROM sessions WHERE id = ?1", [id])?;
        }
        for id in &ids {
            revoked(tx, Some(id), None, now)?;
        }
        Ok(ids.len())
    }

    pub fn revoke_session(&self, id: &str, now: UnixTime) -> anyhow::Result<bool> {
        Ok(!self.revoke_where("id = ?1", Some(id), now)?.is_empty())
    }

    pub fn revoke_user_sessions(&self, user: &str, now: UnixTime) -> anyhow::Result<Vec<String>> {
        self.revoke_where("\"user\" = ?1", Some(user), now)
    }

    pub fn revoke_all_sessions(&self, now: UnixTime) -> anyhow::Result<Vec<String>> {
        self.revoke_where("1 = 1", None, now)
    }

    /// Ends the sessions that session `parent` approved (command-line sign-ins).
    pub fn revoke_children(&self, parent: &str, now: UnixTime) -> anyhow::Result<Vec<String>> {
        self.revoke_where("parent = ?1", Some(parent), now)
    }

    /// Removes sessions past their expiry, idle too long by the last use any node recorded,
    /// or older than the absolute timeout in force (`absolute_secs`, which a reload may have
    /// shortened); each is recorded as a revocation, so that a node still holding one drops
    /// it.
    pub fn purge_expired(&self, now: UnixTime, idle_secs: i64, absolute_secs: i64) -> anyhow::Result<usize> {
        self.with(|c| Ok(Store::end_expired(c, None, now, idle_secs, absolute_secs)?.len()))
    }

    /// Ends session `only` (or every session) if the store also finds it over: past its
    /// expiry, or idle by the last use recorded by any node. Returns the ids ended.
    fn end_expired(
        conn: &mut Conn,
        only: Option<&str>,
        now: UnixTime,
        idle_secs: i64,
        absolute_secs: i64,
    ) -> db::Result<Vec<String>> {
        let tx = conn.transaction()?;
        let over = "(expires_at <= ?1 OR last_seen + ?2 <= ?1 OR created_at + ?3 <= ?1)";
        let ids: Vec<String> = match only {
            Some(id) => tx.query_map(
                &format!("DELETE FROM sessions WHERE {over} AND id = ?4 RETURNING id"),
                params![now, idle_secs, absolute_secs, id],
                |r| r.get(0),
            )?,
            None => tx.query_map(
                &format!("DELETE FROM sessions WHERE {over} RETURNING id"),
                params![now, idle_secs, absolute_secs],
                |r| r.get(0),
            )?,
        };
        for id in &ids {
            revoked(&tx, Some(id), None, now)?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// A session this node finds over by what it saw itself: ended if the store agrees, or
    /// else when another node last saw it in use.
    pub fn expire_session(
        conn: &mut Conn,
        id: &str,
        now: UnixTime,
        idle_secs: i64,
        absolute_secs: i64,
    ) -> db::Result<Expiry> {
        if !Store::end_expired(conn, Some(id), now, idle_secs, absolute_secs)?.is_empty() {
            return Ok(Expiry::Ended);
        }
        let seen: Option<i64> =
            conn.query_row("SELECT last_seen FROM sessions WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        Ok(seen.map_or(Expiry::Gone, Expiry::InUse))
    }

    pub fn revocations_since(conn: &Conn, seq: i64) -> db::Result<Vec<Revocation>> {
        conn.query_map("SELECT seq, session_id, \"user\" FROM revocations WHERE seq > ?1 ORDER BY seq", [seq], |r| {
            Ok(Revocation { seq: r.get(0)?, session_id: r.get(1)?, user: r.get(2)? })
        })
    }

    pub fn setting(conn: &Conn, key: &str) -> db::Result<Option<String>> {
        conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0)).optional()
    }

    pub fn set_setting(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.with(|c| Store::put_setting(c, key, value))
    }

    pub fn put_setting(conn: &Conn, key: &str, value: &str) -> db::Result<()> {
        conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        notify(conn)
    }

    pub fn remove_setting(conn: &Conn, key: &str) -> db::Result<()> {
        conn.execute("DELETE FROM settings WHERE key = ?1", [key])?;
        notify(conn)
    }

    pub fn last_revocation(&self) -> anyhow::Result<i64> {
        self.with(|c| c.query_row("SELECT COALESCE(MAX(seq), 0) FROM revocations", (), |r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outside_source_cannot_take_over_a_name_and_its_groups_follow_the_source() {
        let dir = std::env::temp_dir().join(format!("poort-store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(dir.join("poort.db")).unwrap();
        store.add_user("admin", None, "hash", &["admins".into()], 0).unwrap();
        let groups = |name: &str| store.with(|c| Store::identity(c, name)).unwrap().unwrap().groups;
        // A directory user named like the local admin is refused, and admin stays as it was.
        let taken = store.with(|c| Store::sync_external(c, "admin", None, None, "ldap", &["staff".into()], 1)).unwrap();
        assert_eq!(taken, Synced::OtherSource);
        assert_eq!(groups("admin"), ["admins"]);
        // A new directory user is created; a later sign-in replaces the groups.
        let ok = Synced::Yes("carol".into());
        assert_eq!(
            store.with(|c| Store::sync_external(c, "carol", None, None, "ldap", &["b".into(), "a".into()], 1)).unwrap(),
            ok
        );
        assert_eq!(groups("carol"), ["a", "b"]);
        assert_eq!(store.with(|c| Store::sync_external(c, "carol", None, None, "ldap", &["c".into()], 2)).unwrap(), ok);
        assert_eq!(groups("carol"), ["c"]);
        // One provider cannot take over another's user either.
        let other = store.with(|c| Store::sync_external(c, "carol", Some("s1"), None, "oidc:x", &[], 3)).unwrap();
        assert_eq!(other, Synced::OtherSource);
        // A provider account is bound to its subject: another subject cannot take the name, and
        // the first keeps its account when the name it claims changes.
        let grace = |name: &str, sub: &str| {
            store.with(|c| Store::sync_external(c, name, Some(sub), None, "oidc:x", &[], 4)).unwrap()
        };
        assert_eq!(grace("grace", "sub-1"), Synced::Yes("grace".into()));
        assert_eq!(grace("grace", "sub-2"), Synced::OtherSubject);
        assert_eq!(grace("grace-renamed", "sub-1"), Synced::Yes("grace".into()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

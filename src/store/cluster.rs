//! What a cluster of nodes on one database knows of itself: each node's heartbeat (version and
//! config digest, for `poort cluster status`), and the copy of a store into another database
//! (`poort store migrate`, from the embedded SQLite file to PostgreSQL).

use super::{Backend, Conn, Store};
use crate::clock::UnixTime;
use crate::db::{self, Value, params};

/// One node as it last reported itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub version: String,
    /// SHA-256 of the config file it serves.
    pub config: String,
    pub started_at: UnixTime,
    pub seen_at: UnixTime,
}

/// Nodes not heard from for this long are no longer listed.
pub const NODE_SEEN_WITHIN: i64 = 60;

/// Records that `node` is alive now.
pub fn heartbeat(c: &Conn, node: &Node) -> db::Result<()> {
    c.execute(
        "INSERT INTO nodes (id, version, config, started_at, seen_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET version = excluded.version, config = excluded.config,
                                        seen_at = excluded.seen_at",
        params![node.id, node.version, node.config, node.started_at, node.seen_at],
    )?;
    // Nodes gone for a day are forgotten.
    c.execute("DELETE FROM nodes WHERE seen_at < ?1", [node.seen_at - 86_400])?;
    Ok(())
}

impl Store {
    /// The nodes seen since `since`, by id.
    pub fn nodes(&self, since: UnixTime) -> anyhow::Result<Vec<Node>> {
        self.with(|c| {
            c.query_map(
                "SELECT id, version, config, started_at, seen_at FROM nodes WHERE seen_at >= ?1 ORDER BY id",
                [since],
                |r| {
                    Ok(Node {
                        id: r.get(0)?,
                        version: r.get(1)?,
                        config: r.get(2)?,
                        started_at: r.get(3)?,
                        seen_at: r.get(4)?,
                    })
                },
            )
        })
    }
}

/// The tables a copy carries, parents before children, with their columns. Short-lived state
/// (flows, attempt counts, node heartbeats) is not carried: the gateway is stopped for a copy.
const TABLES: &[(&str, &str)] = &[
    ("users", "name, email, password_hash, disabled, source, created_at, handle, subject"),
    ("user_groups", "\"user\", grp"),
    (
        "sessions",
        "id, \"user\", created_at, last_seen, expires_at, client_addr, user_agent, factors, logout_url, auth_at, factor_at, kind, parent, chain",
    ),
    ("session_tokens", "token_hash, session_id, host"),
    ("revocations", "seq, session_id, \"user\", at"),
    ("audit", "seq, at, kind, detail, prev_hash, hash"),
    ("totp", "\"user\", secret, confirmed, last_step, created_at"),
    ("recovery_codes", "\"user\", code_hash, used_at"),
    ("passkeys", "id, \"user\", name, passkey, created_at, last_used"),
    ("ssh_keys", "fingerprint, material, \"user\", name, key, created_at, last_used"),
    ("lockouts", "\"user\", failures, locked_until, last_failure"),
    ("settings", "key, value"),
];

/// Rows copied per table, in `TABLES` order.
pub type Copied = Vec<(&'static str, usize)>;

/// Copies every table of `from` into `to`, which must hold no users and no audit records, in
/// one transaction on each side (a consistent snapshot in, all or nothing out).
pub fn copy(from: &mut Conn, to: &mut Conn) -> anyhow::Result<Copied> {
    let source = from.transaction()?;
    let target = to.transaction()?;
    // Into an empty store only: a lockdown switch, a revocation or a lock already there
    // would otherwise carry into the copy.
    for table in TABLES.iter().map(|(t, _)| *t).chain(["flows", "attempts", "nodes"]) {
        let n: i64 = target.query_row(&format!("SELECT count(*) FROM {table}"), (), |r| r.get(0))?;
        if n > 0 {
            anyhow::bail!("the target database already has {n} row(s) in {table}: copy into an empty one");
        }
    }
    let mut copied = Vec::new();
    for (table, columns) in TABLES {
        let rows: Vec<Vec<Value>> =
            source.query_map(&format!("SELECT {columns} FROM {table}"), (), |r| Ok(r.values().to_vec()))?;
        let n = columns.split(',').count();
        let places: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
        let insert = format!("INSERT INTO {table} ({columns}) VALUES ({})", places.join(", "));
        for row in &rows {
            target.execute(&insert, row.as_slice())?;
        }
        copied.push((*table, rows.len()));
    }
    if target.backend() == Backend::Postgres {
        // New revocations are numbered after the copied ones.
        target.query_row(
            "SELECT setval(pg_get_serial_sequence('revocations', 'seq'), COALESCE(MAX(seq), 0) + 1, false) FROM revocations",
            (),
            |_| Ok(()),
        )?;
    }
    target.commit()?;
    drop(source);
    Ok(copied)
}

/// Whether `conn` answers, and what it is: for `poort check --live`.
pub fn describe(conn: &Conn) -> db::Result<String> {
    match conn.backend() {
        Backend::Sqlite => {
            let v: String = conn.query_row("SELECT sqlite_version()", (), |r| r.get(0))?;
            Ok(format!("SQLite {v}"))
        }
        Backend::Postgres => {
            let v: String = conn.query_row("SHOW server_version", (), |r| r.get(0))?;
            Ok(format!("PostgreSQL {v}"))
        }
    }
}

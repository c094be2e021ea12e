//! `poort cluster status`: the nodes on this config's database; `poort store migrate`: copy
//! the store into another database (SQLite to PostgreSQL, for a cluster).

use super::*;
use crate::store::cluster::{NODE_SEEN_WITHIN, Node};

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// List the nodes seen in the last minute, with their version and config digest; exit 1
    /// when they differ (a node left on an old config or release).
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Copy this config's store (users, groups, factors, sessions, revocations, settings and
    /// the audit chain) into an empty database, then verify the chain there. Stop the
    /// gateway first; afterwards point [store] database_url at the new database.
    Migrate {
        /// The database to copy into: postgres://USER:PASSWORD@HOST:PORT/DATABASE (or
        /// sqlite://PATH).
        #[arg(long)]
        to: String,
        /// The CA that signed the PostgreSQL server's certificate (TLS is then required).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

pub(super) fn cluster(cmd: ClusterCmd) -> anyhow::Result<i32> {
    match cmd {
        ClusterCmd::Status { json, config } => {
            let cfg = load(&config.config)?;
            let now = SystemClock.now();
            let nodes = Store::open(&cfg.database)?.nodes(now - NODE_SEEN_WITHIN)?;
            let configs: std::collections::BTreeSet<&str> = nodes.iter().map(|n| n.config.as_str()).collect();
            let versions: std::collections::BTreeSet<&str> = nodes.iter().map(|n| n.version.as_str()).collect();
            let agree = configs.len() <= 1 && versions.len() <= 1;
            if json {
                let list: Vec<serde_json::Value> = nodes.iter().map(node_json).collect();
                let out = serde_json::json!({ "nodes": list, "agree": agree });
                println!("{out}");
            } else {
                print!("{}", table(&nodes, now));
                if nodes.is_empty() {
                    println!("No node has reported in the last {NODE_SEEN_WITHIN} s on {}.", cfg.database);
                }
                if configs.len() > 1 {
                    eprintln!(
                        "warning: the nodes serve {} different configs; give every node the same file",
                        configs.len()
                    );
                }
                if versions.len() > 1 {
                    eprintln!("warning: the nodes run {} different versions of poort", versions.len());
                }
            }
            Ok(if agree { 0 } else { 1 })
        }
    }
}

fn node_json(n: &Node) -> serde_json::Value {
    serde_json::json!({
        "id": n.id, "version": n.version, "config_sha256": n.config,
        "started_at": n.started_at, "seen_at": n.seen_at,
    })
}

fn table(nodes: &[Node], now: crate::clock::UnixTime) -> String {
    let mut out = format!("{:<36} {:<10} {:<14} {:<22} {}\n", "NODE", "VERSION", "CONFIG", "STARTED", "LAST SEEN");
    for n in nodes {
        let digest: String = n.config.chars().take(12).collect();
        let ago = format!("{} s ago", (now - n.seen_at).max(0));
        out.push_str(&format!(
            "{:<36} {:<10} {:<14} {:<22} {ago}\n",
            n.id,
            n.version,
            if digest.is_empty() { "-" } else { &digest },
            format_utc(n.started_at)
        ));
    }
    out
}

pub(super) fn store(cmd: StoreCmd) -> anyhow::Result<i32> {
    match cmd {
        StoreCmd::Migrate { to, ca_file, config } => {
            let cfg = load(&config.config)?;
            let here = std::env::current_dir()?;
            let target = crate::config::database::Database::parse(&to, ca_file, &here)
                .map_err(|(key, why, hint)| anyhow::anyhow!("--to: {why} (hint: {hint}; the problem is in {key})"))?;
            if target == cfg.database {
                bail!("--to names the store the config already uses");
            }
            if !cfg.database.exists() {
                bail!("no store at {}: nothing to copy", cfg.database);
            }
            let mut from = crate::store::open_connection(&cfg.database)?;
            let mut into = crate::store::open_connection(&target)?;
            let copied = crate::store::cluster::copy(&mut from, &mut into)?;
            for (table, n) in &copied {
                println!("{table}: {n} row(s)");
            }
            match crate::audit::verify(&into)? {
                Verdict::Intact { records, head } => {
                    println!(
                        "Copied {} into {target}; its audit log is intact: {records} records, head {head}.",
                        cfg.database
                    );
                    println!(
                        "Next: set [store] database_url = \"{}\" in the config of every node.",
                        crate::store::redact_url(&to)
                    );
                    Ok(0)
                }
                Verdict::Broken { seq, why } => {
                    println!("Copied, but the audit log there is BROKEN at record {seq}: {why}");
                    Ok(1)
                }
            }
        }
    }
}

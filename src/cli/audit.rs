//! `poort audit`: read and verify the audit log.

use super::*;

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Show the latest records.
    Tail {
        /// How many of the latest records.
        #[arg(short = 'n', default_value_t = 20)]
        n: usize,
        /// One JSON object per record (seq, at, event, hash).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check the hash chain; exit 1 at the first record that was changed, removed or moved.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
    },
}

pub(super) fn run(cmd: AuditCmd) -> anyhow::Result<i32> {
    match cmd {
        AuditCmd::Tail { n, json, config } => {
            let conn = crate::store::open_connection(&database(&config.config)?)?;
            for r in crate::audit::tail(&conn, n)? {
                if json {
                    let detail: serde_json::Value = serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null);
                    println!(
                        "{}",
                        serde_json::json!({"seq": r.seq, "at": format_utc(r.at), "event": detail, "hash": crate::secret::hex(&r.hash)})
                    );
                } else {
                    println!("{:>6} {} {:<17} {}", r.seq, format_utc(r.at), r.kind, r.detail);
                }
            }
            Ok(0)
        }
        AuditCmd::Verify { config } => {
            let conn = crate::store::open_connection(&database(&config.config)?)?;
            match crate::audit::verify(&conn)? {
                Verdict::Intact { records, head } => {
                    println!("audit log intact: {records} records; head {head}");
                    Ok(0)
                }
                Verdict::Broken { seq, why } => {
                    println!("audit log BROKEN at record {seq}: {why}");
                    Ok(1)
                }
            }
        }
    }
}

/// The database of the config: read from `[store]` alone if the rest of the file has problems,
/// so that the audit log stays readable while a refused config is on disk (its reason is in
/// there).
fn database(path: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    match crate::config::load(path) {
        Ok(cfg) => Ok(cfg.database),
        Err(problems) => match crate::config::store_only(path) {
            Ok(db) => {
                eprintln!(
                    "note: {} has {} problem(s) (poort check lists them); reading the audit log its [store] names",
                    path.display(),
                    problems.0.len()
                );
                Ok(db)
            }
            Err(_) => Err(super::BadConfig(problems).into()),
        },
    }
}

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
        /// Also hold the log against a copy of its export kept off this machine (the JSON
        /// lines of an `[[audit.export]]` file): every exported record must be in the log
        /// with the same hash, and the log must reach the last one. This finds a change made
        /// with every later hash recomputed, and a truncated or emptied log.
        #[arg(long, value_name = "EXPORT_FILE")]
        against: Option<std::path::PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// "Were we breached?": what matched mitigation rules and front-door refusal classes (with
    /// CVEs), sign-ins from new addresses, failed sign-ins by address, locked accounts, factor
    /// changes, recovery codes used, admin commands, sessions ended, lockdown, tunnels opened,
    /// and the state of the hash chain, for a range of days (UTC).
    Report {
        /// The first day, YYYY-MM-DD.
        #[arg(long)]
        since: String,
        /// The last day, YYYY-MM-DD (default: today).
        #[arg(long)]
        until: Option<String>,
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Have an audit export send again from a record on (a gap the receiver found in the
    /// sequence numbers); the running gateway picks it up within seconds.
    Resend {
        /// The export's name ([[audit.export]] name, or where it sends: syslog:HOST:PORT).
        #[arg(long)]
        export: String,
        /// The first record to send again.
        #[arg(long)]
        from: i64,
        #[command(flatten)]
        config: ConfigArg,
    },
}

pub(super) fn run(cmd: AuditCmd) -> anyhow::Result<i32> {
    match cmd {
        AuditCmd::Resend { export, from, config } => {
            let cfg = load(&config.config)?;
            if !cfg.audit_export.iter().any(|e| e.name == export) {
                let names: Vec<&str> = cfg.audit_export.iter().map(|e| e.name.as_str()).collect();
                bail!("no audit export is named {export:?} (the config has: {})", names.join(", "));
            }
            anyhow::ensure!(from >= 1, "records are numbered from 1");
            record_admin(&cfg, "audit resend", &export, &format!("from record {from}"))?;
            Store::open(&cfg.database)?.set_setting(&crate::audit::export::rewind_key(&export), &from.to_string())?;
            println!("Export {export} sends again from record {from} (the gateway takes this up within seconds).");
            Ok(0)
        }
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
        AuditCmd::Report { since, until, json, config } => {
            let day = |d: &str, what: &str| {
                crate::clock::parse_day(d)
                    .ok_or_else(|| anyhow::anyhow!("--{what} {d:?} is not a date: write it as YYYY-MM-DD"))
            };
            let from = day(&since, "since")?;
            let to = match until.as_deref() {
                Some(d) => day(d, "until")? + 86_400,
                None => SystemClock.now() + 1,
            };
            anyhow::ensure!(from < to, "--since is after --until");
            // The rules file in force names what each rule is about (its reason), for the CVEs.
            let reasons: std::collections::HashMap<String, String> = crate::config::load(&config.config)
                .ok()
                .and_then(|cfg| {
                    let path = cfg.mitigate.rules_file.clone()?;
                    let (rules, _) =
                        crate::mitigate::load_file(&path, cfg.mitigate.public_key.as_deref(), SystemClock.now())
                            .ok()?;
                    Some(rules.rules.into_iter().map(|r| (r.id, r.reason)).collect())
                })
                .unwrap_or_default();
            let conn = crate::store::open_connection(&database(&config.config)?)?;
            let report = crate::audit::report::build(&conn, from, to, |rule| reasons.get(rule).cloned())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(if report.chain_intact { 0 } else { 1 })
        }
        AuditCmd::Verify { against, config } => {
            let conn = crate::store::open_connection(&database(&config.config)?)?;
            if let Some(file) = against {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                match crate::audit::export::held_against(&conn, &text)? {
                    Ok(n) => println!("audit log holds all {n} records of {}", file.display()),
                    Err(why) => {
                        println!("audit log BROKEN against {}: {why}", file.display());
                        return Ok(1);
                    }
                }
            }
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
fn database(path: &std::path::Path) -> anyhow::Result<crate::store::Database> {
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

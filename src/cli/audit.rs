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
        /// Also check the seals with the verification key `poort audit seal-init` showed
        /// (repeatable: one per node of a cluster): which records are proven as they were
        /// sealed, and where a change, a removal or a cut from the end begins.
        #[arg(long, value_name = "KEY")]
        verification_key: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Make the key that seals the audit log (once): shows the verification key, which is
    /// kept nowhere on this machine.
    SealInit {
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
            use std::io::Write;
            let conn = crate::store::open_connection(&database(&config.config)?)?;
            let mut out = std::io::stdout().lock();
            for r in crate::audit::tail(&conn, n)? {
                let line = if json {
                    let detail: serde_json::Value = serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null);
                    serde_json::json!({"seq": r.seq, "at": format_utc(r.at), "event": detail, "hash": crate::secret::hex(&r.hash)})
                        .to_string()
                } else {
                    format!("{:>6} {} {:<17} {}", r.seq, format_utc(r.at), r.kind, r.detail)
                };
                // A reader that stopped (`| head`) ends the listing, not the program with a panic.
                if writeln!(out, "{line}").is_err() {
                    break;
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
            let conn = crate::store::open_connection(&database(&config.config)?)?;
            // The rules file and the feed file in force name what each rule is about (its
            // reason), for the CVEs.
            let mut reasons: std::collections::HashMap<String, String> = Default::default();
            if let Ok(cfg) = crate::config::load(&config.config) {
                let key = cfg.mitigate.public_key.as_deref();
                let local = cfg
                    .mitigate
                    .rules_file
                    .as_ref()
                    .and_then(|p| crate::mitigate::load_file(p, key, SystemClock.now()).ok());
                let feed = cfg.mitigate.feed.as_ref().and_then(|f| {
                    let record = crate::mitigate::feed::kept(&conn).ok()??;
                    crate::mitigate::feed::open(record.text.as_bytes(), &f.public_key).ok().map(|o| o.rules)
                });
                for r in local.map(|(r, _)| r).into_iter().chain(feed).flat_map(|r| r.rules) {
                    reasons.insert(r.id, r.reason);
                }
            }
            let report = crate::audit::report::build(&conn, from, to, |rule| reasons.get(rule).cloned())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(if report.chain_intact { 0 } else { 1 })
        }
        AuditCmd::SealInit { config } => {
            let cfg = load(&config.config)?;
            let key = crate::audit::seal::init(&cfg.data_dir)?;
            println!(
                "The gateway seals the audit log every [audit] seal_interval from now on (a running one at its next seal).\nThe verification key, shown only this once; keep it off this machine:\n\n    {key}\n\nCheck the log with: poort audit verify --verification-key KEY"
            );
            Ok(0)
        }
        AuditCmd::Verify { against, verification_key, config } => {
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
            let keys = verification_key
                .iter()
                .map(|k| crate::audit::seal::Verifier::parse(k))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let sealed = !keys.is_empty();
            let mut checker = crate::audit::seal::Checker::new(keys);
            let mut seals = 0u64;
            let verdict = crate::audit::verify_with(&conn, &mut |seq, at, kind, detail, prev| {
                seals += u64::from(kind == "audit_sealed");
                checker.record(seq, at, kind, detail, prev)
            })?;
            let mut bad = match verdict {
                Verdict::Intact { records, head } => {
                    println!("audit log intact: {records} records; head {head}");
                    false
                }
                Verdict::Broken { seq, why } => {
                    println!("audit log BROKEN at record {seq}: {why}");
                    true
                }
            };
            if sealed {
                bad |= print_sealing(&config.config, &conn, &mut checker)?;
            } else if seals > 0 {
                println!(
                    "the log holds {seals} seals, not checked: add --verification-key KEY (the key seal-init or quickstart showed) to prove it was not rewritten"
                );
            }
            Ok(i32::from(bad))
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

/// What the seals prove, per verification key; true when something does not hold.
fn print_sealing(
    config: &std::path::Path,
    conn: &crate::db::Conn,
    checker: &mut crate::audit::seal::Checker,
) -> anyhow::Result<bool> {
    // This machine's sealing key tells how many seals there must be.
    let mut bad = false;
    match crate::config::load(config) {
        Ok(cfg) => match crate::audit::seal::SealKey::load(&cfg.data_dir)? {
            None => {
                bad = true;
                println!("sealing: NO SEALING KEY on this machine: it was deleted, or the log was never sealed here");
            }
            Some(key) if !checker.against_key_file(&key) => {
                bad = true;
                println!(
                    "sealing: the sealing key on this machine (key {}) matches none of the verification keys given: a mistyped key, another node's, or the key was replaced",
                    key.id
                );
            }
            Some(_) => {}
        },
        Err(_) => {
            bad = true;
            println!(
                "sealing: NOT PROVEN: the config has problems (poort check lists them), so the sealing key on this machine cannot be compared and a log cut from the end would go unseen"
            );
        }
    }
    let last: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", (), |r| r.get(0))?;
    let mut found: Vec<_> = checker.found.values().cloned().collect();
    found.sort_by(|a, b| a.key.cmp(&b.key));
    for s in found {
        match (&s.problem, s.sealed_through) {
            (Some(problem), through) => {
                bad = true;
                let proven = through.map_or("no record".to_string(), |(seq, _, _)| format!("records 1 to {seq}"));
                println!("sealing (key {}) BROKEN: {problem}. Proven as sealed: {proven}.", s.key);
            }
            (None, None) => {
                bad = true;
                println!("sealing (key {}): NO SEAL by this key in the log: nothing is proven", s.key);
            }
            (None, Some((seq, generation, at))) => {
                println!(
                    "sealing (key {}): {} seals good; records 1 to {seq} are as they were sealed (generation {generation}, {}); {} records after it not sealed yet",
                    s.key,
                    s.seals,
                    crate::clock::format_utc(at),
                    (last - seq - 1).max(0)
                );
            }
        }
    }
    if checker.others > 0 {
        println!("({} seals by keys not given)", checker.others);
    }
    Ok(bad)
}

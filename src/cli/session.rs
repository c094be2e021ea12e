//! `poort session`: list and revoke sessions.

use super::*;

#[derive(Debug, Subcommand)]
pub enum SessionCmd {
    /// List live sessions.
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// End a session by id, all sessions of a user, or every session.
    Revoke {
        /// A session id as `session list` shows it (one made before ids stopped starting
        /// with `-` is still taken).
        #[arg(allow_hyphen_values = true)]
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        user: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "user"])]
        all: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

pub(super) fn run(cmd: SessionCmd) -> anyhow::Result<i32> {
    let now = SystemClock.now();
    match cmd {
        SessionCmd::List { user, json, config } => {
            let cfg = load(&config.config)?;
            let rows = Store::open(&cfg.database)?.list_sessions(user.as_deref())?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|s| serde_json::json!({"id": s.id, "user": s.user, "created_at": s.created_at, "last_seen": s.last_seen, "expires_at": s.expires_at, "client_addr": s.client_addr, "user_agent": s.user_agent}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<14} {:<16} {:<21} {:<21} {:<16} BROWSER", "ID", "USER", "CREATED", "LAST SEEN", "ADDRESS");
                for s in rows {
                    let ua: String = s.user_agent.chars().take(40).collect();
                    println!(
                        "{:<14} {:<16} {:<21} {:<21} {:<16} {}",
                        s.id,
                        s.user,
                        format_utc(s.created_at),
                        format_utc(s.last_seen),
                        s.client_addr,
                        ua
                    );
                }
            }
        }
        SessionCmd::Revoke { id, user, all, config } => {
            let cfg = load(&config.config)?;
            let store = Store::open(&cfg.database)?;
            let (ended, target) = match (id, user, all) {
                (Some(id), None, false) => (usize::from(store.revoke_session(&id, now)?), id),
                (None, Some(u), false) => (store.revoke_user_sessions(&u, now)?.len(), format!("user {u}")),
                (None, None, true) => (store.revoke_all_sessions(now)?.len(), "all".to_string()),
                _ => bail!("name a session id, --user USER, or --all"),
            };
            record_admin(&cfg, "session revoke", &target, &format!("{ended} session(s) ended"))?;
            println!("Ended {ended} session(s).");
            if ended == 0 {
                return Ok(1);
            }
        }
    }
    Ok(0)
}

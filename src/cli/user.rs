//! `poort user`: local accounts, their groups, passwords and factors.

use super::*;

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a local user. Without --password-stdin a strong password is made and printed once.
    Add {
        name: String,
        #[arg(long)]
        email: Option<String>,
        /// A group to put the user in (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List users with their groups and state.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Set a new password (printed once unless --password-stdin) and end the user's sessions
    /// (whoever knew the old password may hold one).
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
        /// Leave the user's sessions open (a routine change, not a suspected theft).
        #[arg(long)]
        keep_sessions: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Disable a user and end all their sessions.
    Disable {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Enable a disabled user.
    Enable {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show a user's second factors and lock state.
    Mfa {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove all of a user's second factors and SSH keys (a lost phone, an account taken over): they set up new ones at next use.
    MfaReset {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Clear a user's failed sign-in count and lock.
    Unlock {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Add a user to groups or remove them from groups.
    Groups {
        name: String,
        #[arg(long = "add")]
        add: Vec<String>,
        #[arg(long = "remove")]
        remove: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn new_password(stdin: bool, user: &str) -> anyhow::Result<(String, bool)> {
    if stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let pw = line.trim_end_matches(['\r', '\n']).to_string();
        if let Err(why) = password::check_strength(&pw, &[user]) {
            bail!("{why}");
        }
        Ok((pw, false))
    } else {
        Ok((random_password(), true))
    }
}

fn check_names(user: &str, groups: &[String], email: Option<&str>) -> anyhow::Result<()> {
    match crate::names::account_problem(user, groups, email) {
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

pub(super) fn run(cmd: UserCmd) -> anyhow::Result<i32> {
    let now = SystemClock.now();
    match cmd {
        UserCmd::Add { name, email, groups, password_stdin, config } => {
            let cfg = load(&config.config)?;
            check_names(&name, &groups, email.as_deref())?;
            let store = Store::open(&cfg.database)?;
            if store.name_taken(&name)? {
                bail!("user {name} exists already (names are compared without regard to case)");
            }
            let (pw, made) = new_password(password_stdin, &name)?;
            store.add_user(&name, email.as_deref(), &password::hash(&pw)?, &groups, now)?;
            record_admin(&cfg, "user add", &name, &format!("groups: {}", groups.join(",")))?;
            println!("Added user {name}.");
            if made {
                println!("Password, shown only this once: {pw}");
            }
        }
        UserCmd::List { json, config } => {
            let cfg = load(&config.config)?;
            let users = Store::open(&cfg.database)?.list_users()?;
            if json {
                let v: Vec<_> = users
                    .iter()
                    .map(|u| serde_json::json!({"name": u.name, "email": u.email, "groups": u.groups, "disabled": u.disabled, "source": u.source}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:<16} {:<9} GROUPS", "USER", "SOURCE", "STATE");
                for u in users {
                    let state = if u.disabled { "disabled" } else { "enabled" };
                    println!("{:<24} {:<16} {:<9} {}", u.name, u.source, state, u.groups.join(","));
                }
            }
        }
        UserCmd::Passwd { name, password_stdin, keep_sessions, config } => {
            let cfg = load(&config.config)?;
            let store = Store::open(&cfg.database)?;
            if !store.user_exists(&name)? {
                bail!("no user {name}");
            }
            let (pw, made) = new_password(password_stdin, &name)?;
            store.set_password(&name, &password::hash(&pw)?, now)?;
            let ended = if keep_sessions { Vec::new() } else { store.revoke_user_sessions(&name, now)? };
            let detail = format!("password changed; {} session(s) ended", ended.len());
            record_admin(&cfg, "user passwd", &name, &detail)?;
            println!("Changed the password of {name} and ended {} session(s).", ended.len());
            if made {
                println!("Password, shown only this once: {pw}");
            }
        }
        UserCmd::Disable { name, config } => {
            let cfg = load(&config.config)?;
            let store = Store::open(&cfg.database)?;
            if !store.set_disabled(&name, true, now)? {
                bail!("no user {name}");
            }
            record_admin(&cfg, "user disable", &name, "disabled; sessions ended")?;
            println!("Disabled {name} and ended their sessions.");
        }
        UserCmd::Enable { name, config } => {
            let cfg = load(&config.config)?;
            if !Store::open(&cfg.database)?.set_disabled(&name, false, now)? {
                bail!("no user {name}");
            }
            record_admin(&cfg, "user enable", &name, "enabled")?;
            println!("Enabled {name}.");
        }
        UserCmd::Mfa { name, config } => {
            let cfg = load(&config.config)?;
            let store = Store::open(&cfg.database)?;
            if !store.user_exists(&name)? {
                bail!("no user {name}");
            }
            let (f, locks, ssh) = store.with(|c| {
                Ok((
                    crate::identity::mfa::factors(c, &name)?,
                    crate::identity::mfa::lock_state(c, &name)?,
                    crate::ssh::keys(c, &name)?,
                ))
            })?;
            println!("user:            {name}");
            println!("authenticator:   {}", if f.totp { "set up" } else { "none" });
            println!("passkeys:        {}", f.passkeys);
            println!("recovery codes:  {} unused", f.recovery_left);
            println!("ssh keys:        {}", ssh.len());
            for k in &ssh {
                println!("  {} {} ({}, added {})", k.algo, k.fingerprint, k.name, format_utc(k.created_at));
            }
            if locks.is_empty() {
                println!("locked:          no");
            }
            for (lock, n, until) in locks {
                let what = lock.as_str();
                if until > SystemClock.now() {
                    println!("locked:          until {} ({n} failures: {what})", format_utc(until));
                } else {
                    println!("locked:          no ({n} recent failures: {what})");
                }
            }
        }
        UserCmd::MfaReset { name, config } => {
            let cfg = load(&config.config)?;
            let store = Store::open(&cfg.database)?;
            if !store.user_exists(&name)? {
                bail!("no user {name}");
            }
            store.with(|c| crate::identity::mfa::reset(c, &name))?;
            let now = crate::clock::SystemClock.now();
            let ended = store.with(|c| crate::ssh::end_sessions(c, &name, now))?;
            record_admin(&cfg, "user mfa-reset", &name, "all second factors and SSH keys removed")?;
            println!("Removed every second factor and SSH key of {name}, and ended {ended} SSH session(s).");
        }
        UserCmd::Unlock { name, config } => {
            let cfg = load(&config.config)?;
            let store = Store::open(&cfg.database)?;
            use crate::identity::mfa::{Lock, unlock};
            let was = store.with(|c| Ok(unlock(c, &name, Lock::Password)? | unlock(c, &name, Lock::Factor)?))?;
            record_admin(&cfg, "user unlock", &name, if was { "failures cleared" } else { "was not locked" })?;
            println!("{name} can sign in again.");
        }
        UserCmd::Groups { name, add, remove, config } => {
            let cfg = load(&config.config)?;
            check_names(&name, &add, None)?;
            let store = Store::open(&cfg.database)?;
            if !store.user_exists(&name)? {
                bail!("no user {name}");
            }
            store.change_groups(&name, &add, &remove, now)?;
            record_admin(
                &cfg,
                "user groups",
                &name,
                &format!("added: {}; removed: {}", add.join(","), remove.join(",")),
            )?;
            let u = store.list_users()?.into_iter().find(|u| u.name == name);
            println!("{name} is now in: {}", u.map(|u| u.groups.join(",")).unwrap_or_default());
        }
    }
    Ok(0)
}

//! The `poort` command line: serve, quickstart, check, and the admin commands for users,
//! sessions and the audit log. Admin commands work on the database directly and record what
//! they did in the audit log; a running gateway picks their effects up within a second.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::audit::{self, Event, Verdict};
use crate::clock::{Clock, SystemClock, format_utc};
use crate::config::{self, Config};
use crate::identity::password;
use crate::names::valid_user_name;
use crate::server;
use crate::store::Store;

/// Exit status for a config that does not check out (EX_DATAERR would be 65; sysexits'
/// EX_USAGE, 64, is what operators' scripts expect from `check`).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Parser)]
#[command(name = "poort", version, about = "A secure remote-access gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Set up a data directory (certificate, database, admin user, demo app) and serve it.
    Quickstart {
        /// Where to keep everything.
        #[arg(long, default_value = "poort-data")]
        data_dir: PathBuf,
        /// Set everything up, print the admin password, and exit without serving.
        #[arg(long)]
        no_serve: bool,
    },
    /// Serve the gateway described by a config file.
    Serve(ConfigArg),
    /// Check a config file; print every problem and exit 64 if there is any.
    Check(CheckArgs),
    /// Manage local users.
    #[command(subcommand)]
    User(UserCmd),
    /// List and end sessions.
    #[command(subcommand)]
    Session(SessionCmd),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Emergency mitigation rules: test, status, and signing.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Close the gateway to everyone but the admin group, or open it again.
    Lockdown {
        /// on, off or status
        state: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Sign the command line in to a gateway (approve in a browser) for `poort connect`.
    Login {
        /// The gateway, https://HOST[:PORT].
        #[arg(long)]
        gateway: String,
        /// Trust the gateway's certificate through this CA file (PEM).
        #[arg(long, conflicts_with = "fingerprint")]
        ca_file: Option<PathBuf>,
        /// Trust exactly the certificate with this SHA-256 fingerprint (poort quickstart prints it).
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// End the command line's session and forget it.
    Logout,
    /// Reach a TCP service through a tunnel.
    Connect {
        /// The tunnel's name (the portal lists them).
        name: String,
        /// Listen here and carry each connection through its own tunnel, e.g. 127.0.0.1:2222.
        #[arg(long, conflicts_with = "stdio", required_unless_present = "stdio")]
        listen: Option<String>,
        /// Carry standard input and output (for ssh -o ProxyCommand).
        #[arg(long)]
        stdio: bool,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The config file.
    #[arg(long, short, default_value = "poort-data/poort.toml")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Also try the sign-in sources: a service bind to the directory, discovery at each
    /// OpenID Connect provider. Exits 1 if one fails.
    #[arg(long)]
    pub live: bool,
}

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
    /// Set a new password (printed once unless --password-stdin).
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
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
    /// Remove all of a user's second factors (a lost phone): they set up new ones at next use.
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
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        user: Option<String>,
        #[arg(long, conflicts_with_all = ["id", "user"])]
        all: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum RulesCmd {
    /// Show which rule a request would meet, without a running gateway.
    Test {
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request target as sent, for example '/vpn/../vpns/cfg/smb.conf'.
        #[arg(long, required_unless_present = "raw")]
        target: Option<String>,
        /// A header, 'Name: value' (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// The client address.
        #[arg(long, default_value = "192.0.2.1")]
        client: std::net::IpAddr,
        /// A file with a raw request head (request line and headers) instead.
        #[arg(long, conflicts_with = "target")]
        raw: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// What the running gateway loaded, and why it refused the newest file if it did.
    Status {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Make an Ed25519 key pair for signing rule files; prints the public key for the config.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a rules file: writes FILE.sig.
    Sign {
        #[arg(long)]
        key: PathBuf,
        file: PathBuf,
    },
    /// Check FILE.sig against a public key.
    Verify {
        #[arg(long)]
        public_key: String,
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Show the latest records.
    Tail {
        #[arg(short = 'n', default_value_t = 20)]
        n: usize,
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

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Check(c) => {
            let code = check(&c.config.config);
            if code != 0 || !c.live {
                return Ok(code);
            }
            check_live(&load_or_exit(&c.config.config)?)
        }
        Command::Serve(c) => {
            let cfg = load_or_exit(&c.config)?;
            serve(cfg)
        }
        Command::Quickstart { data_dir, no_serve } => {
            let cfg = quickstart(&data_dir)?;
            if no_serve { Ok(0) } else { serve(cfg) }
        }
        Command::User(cmd) => user(cmd),
        Command::Session(cmd) => session_cmd(cmd),
        Command::Audit(cmd) => audit_cmd(cmd),
        Command::Rules(cmd) => rules_cmd(cmd),
        Command::Lockdown { state, config } => {
            let cfg = load_or_exit(&config.config)?;
            let store = Store::open(&cfg.database)?;
            match state.as_str() {
                "on" | "off" => {
                    // The record first: a switch that cannot be audited is not switched.
                    record_admin(
                        &cfg,
                        "lockdown",
                        &state,
                        &format!("only group {} may sign in", cfg.mitigate.admin_group),
                    )?;
                    store.set_setting("lockdown", &state)?;
                    println!(
                        "Lockdown is {state}{}.",
                        if cfg.mitigate.lockdown { " (but the config keeps it on)" } else { "" }
                    );
                }
                "status" => {
                    let switch = store.with(|c| Store::setting(c, "lockdown"))?.unwrap_or_else(|| "off".into());
                    println!("lockdown switch: {switch}; config: {}", if cfg.mitigate.lockdown { "on" } else { "off" });
                }
                other => bail!("{other:?}: say on, off or status"),
            }
            Ok(0)
        }
        Command::Login { gateway, ca_file, fingerprint } => runtime()?.block_on(async {
            let trust = crate::tunnel::client::Trust { fingerprint, ca_file };
            let c = crate::tunnel::client::login(&gateway, trust, |m| eprintln!("{m}")).await?;
            eprintln!("Signed in to {} as {}.", c.gateway, c.user);
            Ok(0)
        }),
        Command::Logout => runtime()?.block_on(async {
            let ended = crate::tunnel::client::logout().await?;
            eprintln!(
                "{}",
                if ended { "Signed out." } else { "Signed out here (the gateway had already ended the session)." }
            );
            Ok(0)
        }),
        Command::Connect { name, listen, stdio } => runtime()?.block_on(async {
            let r = match (listen, stdio) {
                (_, true) => crate::tunnel::client::connect_stdio(&name).await,
                (Some(addr), false) => {
                    crate::tunnel::client::connect_listen(&name, &addr, |a| {
                        eprintln!("Listening on {a}; each connection goes to {name} through the gateway.")
                    })
                    .await
                }
                (None, false) => Err(anyhow::anyhow!("use --listen ADDR or --stdio")),
            };
            match r {
                Ok(()) => Ok(0),
                Err(e) => {
                    eprintln!("poort: {e:#}");
                    Ok(1)
                }
            }
        }),
    }
}

/// Tries each sign-in source once and says what answered.
fn check_live(cfg: &Config) -> anyhow::Result<i32> {
    runtime()?.block_on(async {
        let mut failed = 0;
        if let Some(l) = &cfg.auth.ldap {
            let dir = crate::identity::ldap::Directory::new(l.clone())?;
            match dir.ping().await {
                Ok(()) => println!("auth.ldap: {} answered a service bind", l.url),
                Err(e) => {
                    failed += 1;
                    println!("auth.ldap: {}: {e}", l.url);
                }
            }
        }
        let providers = crate::identity::oidc::Providers::new(&cfg.auth.oidc, &cfg.server.external_origin)?;
        for (name, result) in providers.discover_all().await {
            match result {
                Ok(()) => println!("auth.oidc.{name}: discovery and signing keys fetched"),
                Err(e) => {
                    failed += 1;
                    println!("auth.oidc.{name}: {e}");
                }
            }
        }
        Ok(if failed == 0 { 0 } else { 1 })
    })
}

fn check(path: &Path) -> i32 {
    match config::load(path) {
        Ok(cfg) => {
            let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            let mut sources = vec!["local accounts".to_string()];
            if cfg.auth.ldap.is_some() {
                sources.push("a directory".into());
            }
            if !cfg.auth.oidc.is_empty() {
                sources.push(count(cfg.auth.oidc.len(), "single sign-on provider"));
            }
            println!(
                "{}: ok ({}, {}; sign-in: {})",
                path.display(),
                count(cfg.apps.len(), "app"),
                count(cfg.tunnels.len(), "tunnel"),
                sources.join(", ")
            );
            for w in cfg.warnings() {
                println!("warning: {w}");
            }
            0
        }
        Err(problems) => {
            eprint!("{problems}");
            eprintln!("{}: {} problem(s)", path.display(), problems.0.len());
            EXIT_CONFIG
        }
    }
}

fn load_or_exit(path: &Path) -> anyhow::Result<Config> {
    match config::load(path) {
        Ok(c) => Ok(c),
        Err(problems) => {
            eprint!("{problems}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")
}

fn serve(cfg: Config) -> anyhow::Result<i32> {
    runtime()?.block_on(async {
        let running = server::start(cfg, Arc::new(SystemClock)).await?;
        server::signal().await;
        tracing::info!("Shutting down");
        running.stop().await;
        Ok(0)
    })
}

/// A random password of 20 characters from an alphabet without look-alikes (~117 bits).
pub fn random_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut out = String::with_capacity(20);
    while out.len() < 20 {
        for b in crate::secret::random_bytes::<32>() {
            // Rejection sampling keeps every character equally likely.
            if (b as usize) < 256 - 256 % ALPHABET.len() && out.len() < 20 {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    out
}

const QUICKSTART_CONFIG: &str = r#"# Written by `poort quickstart`. Edit it, check it with
#   poort check --config poort-data/poort.toml
# and serve it with
#   poort serve --config poort-data/poort.toml
# Every key is described in docs/configuration.md.

[server]
# Loopback only. To serve others, listen on 0.0.0.0:443 and set external_url to the
# name users type, with a certificate for that name below.
listen = "127.0.0.1:8443"
external_url = "https://localhost:8443"

[store]
# Relative paths are taken from the folder this file is in.
data_dir = "."

[tls]
cert_file = "tls/cert.pem"
key_file = "tls/key.pem"

[[app]]
name = "whoami"
title = "Who am I"
description = "Demo app: shows the request poort forwarded, identity headers included"
upstream = "builtin:whoami"
path = "/whoami/"
strip_prefix = true
access = "authenticated"

[[app]]
name = "whoami-mfa"
title = "Who am I, with a second factor"
description = "The same demo app behind a second factor: opening it asks for one, or to set one up"
upstream = "builtin:whoami"
path = "/secure/"
strip_prefix = true
access = "authenticated"
mfa = "required"

# A TCP service (SSH, RDP, a database) reached with `poort connect` (docs/tunnels.md).
# Uncomment to reach this machine's SSH server through the gateway:
# [[tunnel]]
# name = "ssh"
# title = "This machine over SSH"
# target = "127.0.0.1:22"
# access = "authenticated"
"#;

/// Creates what is missing in `data_dir` and returns the resolved config.
pub fn quickstart(data_dir: &Path) -> anyhow::Result<Config> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let config_path = data_dir.join("poort.toml");
    if !config_path.exists() {
        std::fs::write(&config_path, QUICKSTART_CONFIG)
            .with_context(|| format!("writing {}", config_path.display()))?;
        println!("Wrote {}", config_path.display());
    }
    let cfg = match config::load(&config_path) {
        Ok(c) => c,
        Err(problems) => {
            eprint!("{problems}");
            bail!("{} has problems; fix them or move the file away to start afresh", config_path.display());
        }
    };
    if !cfg.tls.cert_file.exists() {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .context("making a self-signed certificate")?;
        crate::secret::write_private(&cfg.tls.key_file, ck.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(&cfg.tls.cert_file, ck.cert.pem())?;
        println!("Made a self-signed certificate for localhost: {}", cfg.tls.cert_file.display());
    }
    if let Ok(pem) = std::fs::read(&cfg.tls.cert_file) {
        use rustls::pki_types::pem::PemObject;
        if let Some(Ok(der)) = rustls::pki_types::CertificateDer::pem_slice_iter(&pem).next() {
            let fp = ring::digest::digest(&ring::digest::SHA256, &der);
            let hex: Vec<String> = fp.as_ref().iter().map(|b| format!("{b:02X}")).collect();
            println!("Certificate SHA-256 fingerprint: {}", hex.join(":"));
        }
    }
    let store = Store::open(&cfg.database)?;
    if store.user_exists("admin")? {
        println!("User admin exists already (reset its password with `poort user passwd admin`).");
    } else {
        let pw = random_password();
        let now = SystemClock.now();
        store.add_user("admin", None, &password::hash(&pw)?, &["admins".to_string()], now)?;
        record_admin(&cfg, "quickstart", "admin", "created user admin in group admins")?;
        println!("Created user admin (group admins). Its password, shown only this once:\n\n    {pw}\n");
    }
    println!("Open {}/ and sign in as admin.", cfg.server.external_origin);
    Ok(cfg)
}

fn record_admin(cfg: &Config, command: &str, target: &str, detail: &str) -> anyhow::Result<()> {
    let mut conn = crate::store::open_connection(&cfg.database)?;
    let ev = Event::Admin { command: command.into(), target: target.into(), detail: detail.into() };
    audit::append(&mut conn, SystemClock.now(), &[ev])?;
    Ok(())
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

fn check_names(user: &str, groups: &[String]) -> anyhow::Result<()> {
    if !valid_user_name(user) {
        bail!("{user:?} is not a valid user name: use letters, digits, and - _ . @ (at most 64)");
    }
    if let Some(g) = groups.iter().find(|g| !valid_user_name(g)) {
        bail!("{g:?} is not a valid group name: use letters, digits, and - _ . @ (at most 64)");
    }
    Ok(())
}

fn user(cmd: UserCmd) -> anyhow::Result<i32> {
    let now = SystemClock.now();
    match cmd {
        UserCmd::Add { name, email, groups, password_stdin, config } => {
            let cfg = load_or_exit(&config.config)?;
            check_names(&name, &groups)?;
            let store = Store::open(&cfg.database)?;
            if store.user_exists(&name)? {
                bail!("user {name} exists already");
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
            let cfg = load_or_exit(&config.config)?;
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
        UserCmd::Passwd { name, password_stdin, config } => {
            let cfg = load_or_exit(&config.config)?;
            let store = Store::open(&cfg.database)?;
            if !store.user_exists(&name)? {
                bail!("no user {name}");
            }
            let (pw, made) = new_password(password_stdin, &name)?;
            store.set_password(&name, &password::hash(&pw)?, now)?;
            record_admin(&cfg, "user passwd", &name, "password changed")?;
            println!("Changed the password of {name}.");
            if made {
                println!("Password, shown only this once: {pw}");
            }
        }
        UserCmd::Disable { name, config } => {
            let cfg = load_or_exit(&config.config)?;
            let store = Store::open(&cfg.database)?;
            if !store.set_disabled(&name, true, now)? {
                bail!("no user {name}");
            }
            record_admin(&cfg, "user disable", &name, "disabled; sessions ended")?;
            println!("Disabled {name} and ended their sessions.");
        }
        UserCmd::Enable { name, config } => {
            let cfg = load_or_exit(&config.config)?;
            if !Store::open(&cfg.database)?.set_disabled(&name, false, now)? {
                bail!("no user {name}");
            }
            record_admin(&cfg, "user enable", &name, "enabled")?;
            println!("Enabled {name}.");
        }
        UserCmd::Mfa { name, config } => {
            let cfg = load_or_exit(&config.config)?;
            let store = Store::open(&cfg.database)?;
            if !store.user_exists(&name)? {
                bail!("no user {name}");
            }
            let (f, locks) = store.with(|c| {
                Ok((crate::identity::mfa::factors(c, &name)?, crate::identity::mfa::lock_state(c, &name)?))
            })?;
            println!("user:            {name}");
            println!("authenticator:   {}", if f.totp { "set up" } else { "none" });
            println!("passkeys:        {}", f.passkeys);
            println!("recovery codes:  {} unused", f.recovery_left);
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
            let cfg = load_or_exit(&config.config)?;
            let store = Store::open(&cfg.database)?;
            if !store.user_exists(&name)? {
                bail!("no user {name}");
            }
            store.with(|c| crate::identity::mfa::reset(c, &name))?;
            record_admin(&cfg, "user mfa-reset", &name, "all second factors removed")?;
            println!("Removed every second factor of {name}.");
        }
        UserCmd::Unlock { name, config } => {
            let cfg = load_or_exit(&config.config)?;
            let store = Store::open(&cfg.database)?;
            use crate::identity::mfa::{Lock, unlock};
            let was = store.with(|c| Ok(unlock(c, &name, Lock::Password)? | unlock(c, &name, Lock::Factor)?))?;
            record_admin(&cfg, "user unlock", &name, if was { "failures cleared" } else { "was not locked" })?;
            println!("{name} can sign in again.");
        }
        UserCmd::Groups { name, add, remove, config } => {
            let cfg = load_or_exit(&config.config)?;
            check_names(&name, &add)?;
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

fn session_cmd(cmd: SessionCmd) -> anyhow::Result<i32> {
    let now = SystemClock.now();
    match cmd {
        SessionCmd::List { user, json, config } => {
            let cfg = load_or_exit(&config.config)?;
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
            let cfg = load_or_exit(&config.config)?;
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

fn audit_cmd(cmd: AuditCmd) -> anyhow::Result<i32> {
    match cmd {
        AuditCmd::Tail { n, json, config } => {
            let cfg = load_or_exit(&config.config)?;
            let conn = crate::store::open_connection(&cfg.database)?;
            for r in audit::tail(&conn, n)? {
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
            let cfg = load_or_exit(&config.config)?;
            let conn = crate::store::open_connection(&cfg.database)?;
            match audit::verify(&conn)? {
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

fn rules_cmd(cmd: RulesCmd) -> anyhow::Result<i32> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use ring::signature::{Ed25519KeyPair, KeyPair};
    match cmd {
        RulesCmd::Test { method, target, headers, client, raw, config } => {
            let cfg = load_or_exit(&config.config)?;
            let (method, target, headers) = match raw {
                Some(path) => {
                    parse_raw_head(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)?
                }
                None => {
                    let headers = headers.iter().map(|h| h.as_bytes().to_vec()).collect();
                    (method, target.unwrap_or_default(), headers)
                }
            };
            rules_test(&cfg, &method, &target, &headers, client)
        }
        RulesCmd::Status { config } => {
            let cfg = load_or_exit(&config.config)?;
            match crate::mitigate::read_status(&cfg.data_dir) {
                None => println!("No status yet: the gateway has not run with this data directory."),
                Some(s) => {
                    println!("file:      {}", s.file.as_deref().unwrap_or("(no rules file configured)"));
                    println!("rules:     {} in force, loaded {}", s.rules, s.loaded_at.as_deref().unwrap_or("never"));
                    println!("sha256:    {}", s.sha256.as_deref().unwrap_or("-"));
                    println!("version:   {}", s.version.map_or("-".to_string(), |v| v.to_string()));
                    match &s.last_error {
                        Some(e) => println!("REFUSED:   the newest file was not loaded: {e}"),
                        None => println!("newest file: loaded"),
                    }
                    let mut hits: Vec<_> = s.hits.iter().collect();
                    hits.sort();
                    for (rule, n) in hits {
                        println!("hits:      {rule}: {n}");
                    }
                    if s.last_error.is_some() {
                        return Ok(1);
                    }
                }
            }
            Ok(0)
        }
        RulesCmd::Keygen { out } => {
            let rng = ring::rand::SystemRandom::new();
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("key generation failed"))?;
            let pair =
                Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| anyhow::anyhow!("key generation failed"))?;
            crate::secret::write_private(&out, doc.as_ref())?;
            println!("Wrote the private key to {} (keep it away from the gateway).", out.display());
            println!(
                "Public key for the gateway's [mitigate] public_key:\n\n    {}",
                STANDARD.encode(pair.public_key().as_ref())
            );
            Ok(0)
        }
        RulesCmd::Sign { key, file } => {
            let pkcs8 = std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?;
            let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
                .map_err(|_| anyhow::anyhow!("{} is not an Ed25519 key", key.display()))?;
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            match crate::mitigate::rules::compile(&String::from_utf8_lossy(&bytes)) {
                Err(problems) => bail!("refusing to sign a rules file with problems:\n  {}", problems.join("\n  ")),
                Ok(r) if r.version.is_none() => bail!(
                    "refusing to sign a rules file without a version: gateways never go back to a lower version, so each file needs one (hint: version = 1 at the top, one higher in every new file)"
                ),
                Ok(_) => {}
            }
            let sig_path = crate::mitigate::signature_path(&file);
            std::fs::write(&sig_path, format!("{}\n", STANDARD.encode(pair.sign(&bytes).as_ref())))?;
            println!("Wrote {}", sig_path.display());
            Ok(0)
        }
        RulesCmd::Verify { public_key, file } => {
            let key = STANDARD.decode(public_key.trim()).context("the public key is not base64")?;
            match crate::mitigate::load_file(&file, Some(&key), SystemClock.now()) {
                Ok((rules, digest)) => {
                    println!("signature good; {} rules; sha256 {digest}", rules.rules.len());
                    Ok(0)
                }
                Err(problems) => {
                    println!("NOT good: {}", problems.join("; "));
                    Ok(1)
                }
            }
        }
    }
}

/// A raw request head: `METHOD TARGET HTTP/1.1`, then `Name: value` lines. Header values are
/// taken as bytes: a captured request may carry values that are not UTF-8.
fn parse_raw_head(raw: &[u8]) -> anyhow::Result<(String, String, Vec<Vec<u8>>)> {
    let mut lines = raw.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first =
        std::str::from_utf8(lines.next().context("the file is empty")?).context("the request line is not text")?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        bail!("the first line is not METHOD TARGET HTTP/1.1")
    };
    let headers = lines.take_while(|l| !l.trim_ascii().is_empty()).map(<[u8]>::to_vec).collect();
    Ok((method.to_string(), target.to_string(), headers))
}

fn rules_test(
    cfg: &Config,
    method: &str,
    target: &str,
    headers: &[Vec<u8>],
    client: std::net::IpAddr,
) -> anyhow::Result<i32> {
    let mut map = http::HeaderMap::new();
    for h in headers {
        let colon = h.iter().position(|b| *b == b':');
        let Some(colon) = colon else { bail!("{:?} is not 'Name: value'", String::from_utf8_lossy(h)) };
        let (k, v) = (h[..colon].trim_ascii(), h[colon + 1..].trim_ascii());
        map.append(http::HeaderName::from_bytes(k)?, http::HeaderValue::from_bytes(v)?);
    }
    if !map.contains_key(http::header::HOST) {
        map.insert(http::header::HOST, http::HeaderValue::from_str(&cfg.server.portal_host)?);
    }
    let method: http::Method = method.parse().context("not an HTTP method")?;
    let front = match target.parse::<http::Uri>() {
        Err(_) => {
            println!("front door: refused with 400 (the target does not parse); no rule is consulted");
            return Ok(0);
        }
        Ok(uri) => crate::request::check(&method, &uri, http::Version::HTTP_11, &map),
    };
    let front = match front {
        Ok(f) => f,
        Err(r) => {
            println!("front door: refused with {} ({}); no rule is consulted", r.status().as_u16(), r.code());
            return Ok(0);
        }
    };
    let routes = crate::route::Routes::new(&cfg.server.portal_host, &cfg.apps);
    let app = match routes.find_target(&front.host, &front.target) {
        crate::route::Found::App(i) | crate::route::Found::AddSlash(i) => Some(cfg.apps[i].name.as_str()),
        _ => None,
    };
    println!("canonical path: {}", front.target.path());
    println!("app: {}", app.unwrap_or("(none: portal or not found)"));
    let Some(file) = &cfg.mitigate.rules_file else {
        println!("no rules file is configured: the request goes on to the session check");
        return Ok(0);
    };
    let rules = match crate::mitigate::load_file(file, cfg.mitigate.public_key.as_deref(), SystemClock.now()) {
        Ok((r, _)) => r,
        Err(problems) => {
            println!("the rules file would be refused (the running rules stay):\n  {}", problems.join("\n  "));
            return Ok(1);
        }
    };
    let facts = crate::mitigate::Facts::of(method.as_str(), &front.target, target, &map, client, app);
    match rules.check(&facts) {
        None => println!("no rule matches: the request goes on to the session check"),
        Some((_, r)) => {
            let what = match r.action {
                crate::mitigate::Action::Deny => "deny: 403".to_string(),
                crate::mitigate::Action::Log => "log: audited, then the request goes on".to_string(),
                crate::mitigate::Action::Throttle { count, per_secs } => {
                    format!("throttle: 429 above {count} requests per {per_secs} s from one address")
                }
            };
            println!("rule {} matches: {what}", r.id);
            if !r.reason.is_empty() {
                println!("reason: {}", r.reason);
            }
        }
    }
    Ok(0)
}

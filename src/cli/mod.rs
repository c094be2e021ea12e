//! The `poort` command line: serve, quickstart, check, and the admin commands for users,
//! sessions and the audit log. Admin commands work on the database directly and record what
//! they did in the audit log; a running gateway picks their effects up within a second.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::audit::{Event, Verdict};
use crate::clock::{Clock, SystemClock, format_utc};
use crate::config::{self, Config};
use crate::identity::password;
use crate::server;
use crate::store::Store;

mod audit;
mod cluster;
mod quickstart;
mod rules;
mod session;
mod user;

pub use audit::AuditCmd;
pub use quickstart::{quickstart, random_password};
pub use rules::RulesCmd;
pub use session::SessionCmd;
pub use user::UserCmd;

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
pub enum SshCmd {
    /// Print the CA public key SSH targets trust (standard output), and how to set a target up
    /// (standard error). Makes the key on first use.
    Ca {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the SSH front door's own host key, as a line for people's `known_hosts`.
    HostKey {
        /// Also a line for this SSH target's name, as `ssh -J` reaches it (the key is poort's);
        /// `all` for every target.
        #[arg(long = "for", value_name = "TARGET")]
        targets: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Forget the host key poort kept for a target on first use (after the target's key was
    /// changed on purpose): the next connection keeps the key it then shows.
    ForgetHostKey {
        /// The `[[ssh_target]]` name.
        target: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to standard output.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff) to standard output: poort man | man -l -
    Man,
    /// Set up a data directory (certificate, database, admin user, demo app) and serve it.
    Quickstart {
        /// Where to keep everything.
        #[arg(long, default_value = "poort-data")]
        data_dir: PathBuf,
        /// Set everything up, print the admin password, and exit without serving.
        #[arg(long)]
        no_serve: bool,
        /// Where a new config listens (an existing config keeps its own).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// The address users type, for a new config: https://HOST[:PORT]. Default: localhost
        /// on the listening port.
        #[arg(long)]
        external_url: Option<String>,
        /// Where a new config serves metrics and health checks ("off" for nowhere); a second
        /// gateway on one machine needs its own.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin_listen: String,
    },
    /// Serve the gateway described by a config file.
    Serve(ConfigArg),
    /// Check a config file; print every problem and exit 64 if there is any.
    Check(CheckArgs),
    /// Check the config file, then have the gateway running on its data folder read it again.
    /// Exit 0: in force (or nothing changed); 1: the gateway refused it and keeps its config;
    /// 2: no gateway answered; 64: the file has problems (the gateway was not asked).
    Reload(ConfigArg),
    /// Manage local users.
    #[command(subcommand)]
    User(UserCmd),
    /// List and end sessions.
    #[command(subcommand)]
    Session(SessionCmd),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The nodes sharing this config's database.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Copy the store into another database.
    #[command(subcommand)]
    Store(cluster::StoreCmd),
    /// Emergency mitigation rules: test, status, and signing.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// SSH targets: the user CA they trust.
    #[command(subcommand)]
    Ssh(SshCmd),
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
    /// Also try what the gateway reaches: the database (a connection and a query), a
    /// service bind to the directory, discovery at each OpenID Connect provider. Exits 1 if
    /// one fails.
    #[arg(long)]
    pub live: bool,
}

/// `poort reload`: checks the file here first (its problems are printed, and the gateway is
/// not asked), then asks the gateway on the same data directory through the store and waits
/// for its answer.
fn reload(path: &std::path::Path) -> anyhow::Result<i32> {
    use crate::server::reload::{Answer, Ask, RELOAD_ANSWERED, RELOAD_ASKED};
    let cfg = load(path)?;
    if !cfg.database.exists() {
        eprintln!(
            "No store at {}: no gateway has run on this config's data folder (hint: pass the config the gateway serves; a changed [store] needs a restart)",
            cfg.database
        );
        return Ok(2);
    }
    let store = Store::open(&cfg.database)?;
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let asked = store.with(|c| {
        let tx = c.transaction()?;
        let last = Store::setting(&tx, RELOAD_ASKED)?.and_then(|v| serde_json::from_str::<Ask>(&v).ok());
        let n = last.map_or(0, |a| a.n) + 1;
        let ask = serde_json::to_string(&Ask { n, path: path.clone() }).unwrap_or_default();
        Store::put_setting(&tx, RELOAD_ASKED, &ask)?;
        tx.commit()?;
        Ok(n)
    })?;
    let deadline = crate::clock::instant() + std::time::Duration::from_secs(15);
    while crate::clock::instant() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let answer = store.with(|c| Store::setting(c, RELOAD_ANSWERED))?;
        let Some(answer) = answer.and_then(|a| serde_json::from_str::<Answer>(&a).ok()) else { continue };
        if answer.asked < asked {
            continue;
        }
        return match answer.result {
            Ok(r) if r.changed.is_empty() => {
                println!("Reloaded: nothing in the config changed (the files it names were read again).");
                Ok(0)
            }
            Ok(r) => {
                println!(
                    "Reloaded: {} changed; {} open WebSockets, tunnels and SSH connections lost their access.",
                    r.changed.join(", "),
                    r.cut
                );
                Ok(0)
            }
            Err(why) => {
                eprintln!("The gateway refused the config and keeps the one in force: {why}");
                Ok(1)
            }
        };
    }
    eprintln!(
        "No gateway answered within 15 s: is one running on {}? (hint: a gateway also reloads on SIGHUP: systemctl reload poort)",
        cfg.database
    );
    Ok(2)
}

/// A config that does not check out: its problems, each with its key and a hint.
#[derive(Debug)]
pub struct BadConfig(pub config::Problems);

impl std::fmt::Display for BadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for BadConfig {}

/// Runs a parsed command line; returns the process exit code (`EXIT_CONFIG` for a config
/// that does not check out, after saying why).
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match command(cli) {
        Err(e) => match e.downcast::<BadConfig>() {
            Ok(bad) => {
                eprint!("{bad}");
                Ok(EXIT_CONFIG)
            }
            Err(e) => Err(e),
        },
        done => done,
    }
}

fn command(cli: Cli) -> anyhow::Result<i32> {
    // Serving logs as its config says (`serve`); everything else, and anything before that,
    // as text.
    if !matches!(cli.command, Command::Serve(_) | Command::Quickstart { .. }) {
        crate::logging::init(crate::config::LogSettings::default());
    }
    match cli.command {
        Command::Check(c) => {
            let code = check(&c.config.config);
            if code != 0 || !c.live {
                return Ok(code);
            }
            check_live(&load(&c.config.config)?)
        }
        Command::Serve(c) => {
            let cfg = load(&c.config)?;
            serve(cfg)
        }
        Command::Reload(c) => reload(&c.config),
        Command::Quickstart { data_dir, no_serve, listen, external_url, admin_listen } => {
            let cfg = quickstart(&data_dir, listen, external_url.as_deref(), &admin_listen, no_serve)?;
            if no_serve { Ok(0) } else { serve(cfg) }
        }
        Command::User(cmd) => user::run(cmd),
        Command::Session(cmd) => session::run(cmd),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Rules(cmd) => rules::run(cmd),
        Command::Ssh(SshCmd::Ca { config }) => {
            let cfg = load(&config.config)?;
            let ca = crate::ssh::UserCa::load_or_create(&cfg.data_dir)?;
            println!("{}", ca.public_line());
            eprintln!(
                "\nSave the line above as poort_user_ca.pub, copy it to each SSH target, and there trust certificates poort signs (they name the account and last minutes):\n\n    sudo install -m 644 poort_user_ca.pub /etc/ssh/poort_user_ca.pub\n    echo 'TrustedUserCAKeys /etc/ssh/poort_user_ca.pub' | sudo tee /etc/ssh/sshd_config.d/poort.conf\n    sudo systemctl reload ssh    # sshd on some systems\n\n(docs/ssh.md says more, and what else a target needs.)"
            );
            Ok(0)
        }
        Command::Ssh(SshCmd::HostKey { targets, config }) => {
            let cfg = load(&config.config)?;
            let path = crate::sshd::host_key_path(&cfg.data_dir);
            let Ok(text) = std::fs::read_to_string(&path).map(zeroize::Zeroizing::new) else {
                eprintln!("No host key yet: the SSH front door makes {} when it first starts.", path.display());
                return Ok(1);
            };
            let key = russh::keys::ssh_key::PrivateKey::from_openssh(text.as_bytes())?;
            let host = cfg.server.portal_host.clone();
            let port = cfg.ssh.listen.map_or(22, |a| a.port());
            let name = if port == 22 { host } else { format!("[{host}]:{port}") };
            let line = key.public_key().to_openssh()?;
            // With --for, only the targets' lines (the front door's own is asked for without).
            if targets.is_empty() {
                println!("{name} {line}");
            }
            for t in &cfg.ssh_targets {
                if targets.iter().any(|n| n == "all" || *n == t.name) {
                    println!("{} {line}", t.name);
                }
            }
            if let Some(n) = targets.iter().find(|n| *n != "all" && !cfg.ssh_targets.iter().any(|t| t.name == **n)) {
                eprintln!("No SSH target is named {n:?}.");
                return Ok(1);
            }
            Ok(0)
        }
        Command::Ssh(SshCmd::ForgetHostKey { target, config }) => {
            let cfg = load(&config.config)?;
            let store = Store::open(&cfg.database)?;
            let key = crate::sshd::kept_key_setting(&target);
            let Some(kept) = store.with(|c| Store::setting(c, &key))? else {
                eprintln!("poort kept no host key for {target:?}.");
                return Ok(1);
            };
            record_admin(&cfg, "ssh forget-host-key", &target, &format!("was {kept}"))?;
            store.with(|c| Store::remove_setting(c, &key))?;
            println!("Forgot the host key of {target}; the next connection keeps the key it then shows.");
            Ok(0)
        }
        Command::Cluster(cmd) => cluster::cluster(cmd),
        Command::Store(cmd) => cluster::store(cmd),
        Command::Lockdown { state, config } => {
            let cfg = load(&config.config)?;
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
                    let on = switch == "on" || cfg.mitigate.lockdown;
                    println!(
                        "lockdown is {} (switch: {switch}; [mitigate] lockdown in the config: {}; either one on is on)",
                        if on { "on" } else { "off" },
                        if cfg.mitigate.lockdown { "on" } else { "off" }
                    );
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
        Command::Completions { shell } => {
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "poort", &mut text);
            print_all(&text)
        }
        Command::Man => {
            let mut text = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut text)?;
            print_all(&text)
        }
        Command::Logout => runtime()?.block_on(async {
            let ended = crate::tunnel::client::logout().await?;
            eprintln!(
                "{}",
                if ended { "Signed out." } else { "Signed out here (the gateway had already ended the session)." }
            );
            Ok(0)
        }),
        Command::Connect { name, listen, stdio } => {
            let rt = runtime()?;
            let code = rt.block_on(async {
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
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("poort: {e:#}");
                        1
                    }
                }
            });
            // Standard input is read on a thread that may wait for input forever (ssh does not
            // close it when the tunnel ends): exit without waiting for it.
            rt.shutdown_background();
            Ok(code)
        }
    }
}

/// Writes `text` to standard output; a reader that stops early (`| head`) is not an error.
fn print_all(text: &[u8]) -> anyhow::Result<i32> {
    use std::io::Write;
    match std::io::stdout().write_all(text) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(0),
    }
}

/// Tries each sign-in source once and says what answered.
fn check_live(cfg: &Config) -> anyhow::Result<i32> {
    let mut failed = 0;
    let answered = if cfg.database.exists() {
        crate::store::open_connection(&cfg.database).and_then(|c| Ok(crate::store::cluster::describe(&c)?))
    } else {
        Err(anyhow::anyhow!("no database yet (the first start creates it)"))
    };
    match answered {
        Ok(what) => println!("store: {} answered ({what})", cfg.database),
        Err(e) => {
            failed += 1;
            println!("store: {}: {e:#}", cfg.database);
        }
    }
    runtime()?.block_on(async {
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
            // The rules file is part of what a gateway needs to start (or reload) with.
            if let Some(rules) = &cfg.mitigate.rules_file
                && let Err(problems) =
                    crate::mitigate::load_file(rules, cfg.mitigate.public_key.as_deref(), SystemClock.now())
            {
                for p in &problems {
                    eprintln!("mitigate.rules_file: {p} (hint: poort rules test --help shows how to try a rules file)");
                }
                eprintln!("{}: {} problem(s)", path.display(), problems.len());
                return EXIT_CONFIG;
            }
            let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            let mut sources = vec!["local accounts".to_string()];
            if cfg.auth.ldap.is_some() {
                sources.push("a directory".into());
            }
            if !cfg.auth.oidc.is_empty() {
                sources.push(count(cfg.auth.oidc.len(), "single sign-on provider"));
            }
            let exports: Vec<&str> = cfg.audit_export.iter().map(|e| e.name.as_str()).collect();
            let ssh = match cfg.ssh.listen {
                Some(a) => format!(", {} on {a}", count(cfg.ssh_targets.len(), "SSH target")),
                None if cfg.ssh_targets.is_empty() => String::new(),
                None => format!(", {} but no [ssh] listen", count(cfg.ssh_targets.len(), "SSH target")),
            };
            println!(
                "{}: ok ({}, {}{ssh}; sign-in: {}; audit export: {})",
                path.display(),
                count(cfg.apps.len(), "app"),
                count(cfg.tunnels.len(), "tunnel"),
                sources.join(", "),
                if exports.is_empty() { "none".into() } else { exports.join(", ") }
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

/// The config at `path`, or a `BadConfig` error that says what is wrong with it.
fn load(path: &Path) -> anyhow::Result<Config> {
    config::load(path).map_err(|problems| BadConfig(problems).into())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")
}

fn serve(cfg: Config) -> anyhow::Result<i32> {
    crate::logging::init(cfg.log);
    runtime()?.block_on(async {
        let running = server::start(cfg, Arc::new(SystemClock)).await?;
        server::signal().await;
        tracing::info!("Shutting down");
        running.stop().await;
        Ok(0)
    })
}

fn record_admin(cfg: &Config, command: &str, target: &str, detail: &str) -> anyhow::Result<()> {
    let mut conn = crate::store::open_connection(&cfg.database)?;
    let ev = Event::Admin {
        command: command.into(),
        target: target.into(),
        detail: detail.into(),
        by: None,
        session: None,
        client: None,
    };
    crate::audit::append(&mut conn, SystemClock.now(), &[ev])?;
    Ok(())
}

//! Configuration in two layers: `file` holds what the operator wrote (serde, unknown keys
//! refused); `resolve` checks all of it and returns either a `Config` the rest of poort can
//! trust, or every problem found, each with its key path and a hint.

pub mod access;
pub mod auth;
pub mod database;
pub mod file;
mod resolve;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use access::Access;

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `server.listen`, `app[wiki].upstream`.
    pub path: String,
    pub message: String,
    /// What to write instead.
    pub hint: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (hint: {})", self.path, self.message, self.hint)
    }
}

/// All problems of one config file.
#[derive(Debug)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.0 {
            writeln!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub tls: Tls,
    pub data_dir: PathBuf,
    pub database: crate::config::database::Database,
    pub session: SessionTimeouts,
    pub proxy: ProxySettings,
    pub mfa: MfaSettings,
    pub login: LoginSettings,
    pub apps: Vec<App>,
    pub tunnel: TunnelSettings,
    pub tunnels: Vec<Tunnel>,
    pub mitigate: Mitigate,
    pub auth: auth::Auth,
    pub log: LogSettings,
    /// Where metrics and health checks are served (`[admin] listen`), if anywhere.
    pub admin_listen: Option<SocketAddr>,
    /// The file this config was read from, if any.
    pub source: Option<Source>,
    /// Where audit records are sent as they are committed (`[[audit.export]]`).
    pub audit_export: Vec<AuditExport>,
    /// How often the audit chain is sealed (docs/operations.md, "Sealing the audit log").
    pub audit_seal_interval: Duration,
    /// `[ssh]`: the SSH front door.
    pub ssh: SshSettings,
    pub ssh_targets: Vec<SshTarget>,
}

/// `[ssh]`.
#[derive(Debug, Clone, Copy)]
pub struct SshSettings {
    pub listen: Option<SocketAddr>,
    pub certificate_lifetime: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub per_user: usize,
}

/// What an SSH session may do on a target, each allowed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SshChannels {
    pub shell: bool,
    pub exec: bool,
    pub sftp: bool,
    pub forward: bool,
}

/// An SSH host reached through the SSH front door.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub name: String,
    pub title: String,
    pub description: String,
    /// `host:port`, checked.
    pub address: String,
    pub access: Access,
    pub mfa: bool,
    /// Accounts anyone allowed may use; `%u` stands for the person's own name.
    pub principals: Vec<String>,
    /// More accounts per group.
    pub group_principals: Vec<(String, Vec<String>)>,
    /// Pinned host keys (`type base64`); empty: trust on first use.
    pub host_keys: Vec<String>,
    pub record: bool,
    pub allow: SshChannels,
}

impl SshTarget {
    /// The accounts `who` may log in to on this target, in the order the config gives them.
    pub fn principals_for(&self, who: &crate::names::Identity) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let groups = self.group_principals.iter().filter(|(g, _)| who.groups.contains(g)).flat_map(|(_, p)| p);
        for p in self.principals.iter().chain(groups) {
            // `%u` never stands for the superuser, whatever a person is called.
            if p == "%u" && who.user == "root" {
                continue;
            }
            let p = if p == "%u" { who.user.clone() } else { p.clone() };
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// One destination of the audit log's records.
#[derive(Clone)]
pub struct AuditExport {
    /// Unique; keys how far this export has got.
    pub name: String,
    pub to: ExportTo,
    /// What the operator wrote, for comparing exports across reloads.
    pub spec: String,
}

impl fmt::Debug for AuditExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

#[derive(Clone)]
pub enum ExportTo {
    /// RFC 5424 messages over TLS to `address` (`host:port`).
    Syslog { address: String, server_name: rustls::pki_types::ServerName<'static>, tls: Arc<rustls::ClientConfig> },
    /// JSON lines appended to a file.
    File(PathBuf),
    /// JSON lines on standard output.
    Stdout,
}

/// A config file as read: where, and the SHA-256 of its text.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub sha256: String,
    /// The file's modification time and length before it was read: a change after that is
    /// a change to reload.
    pub stamp: Option<(std::time::SystemTime, u64)>,
}

/// `[log]`: how poort writes its log (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogSettings {
    pub json: bool,
    /// A line per request.
    pub access: bool,
}

#[derive(Debug, Clone)]
pub struct Mitigate {
    pub rules_file: Option<PathBuf>,
    /// Set when a signature is required: the raw 32-byte Ed25519 key.
    pub public_key: Option<Vec<u8>>,
    pub lockdown: bool,
    pub admin_group: String,
    pub feed: Option<Feed>,
}

/// `[mitigate] feed`: where the signed rules feed is, and whose signature it must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feed {
    pub url: String,
    /// The raw 32-byte Ed25519 key of the publisher.
    pub public_key: Vec<u8>,
    pub interval: Duration,
    pub trust: crate::tls_client::Trust,
}

#[derive(Debug, Clone, Copy)]
pub struct TunnelSettings {
    pub per_session: usize,
    pub total: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

/// A TCP service reached through a WebSocket tunnel.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub name: String,
    pub title: String,
    pub description: String,
    /// `host:port`, checked.
    pub target: String,
    pub access: Access,
    pub mfa: bool,
}

#[derive(Debug, Clone)]
pub struct MfaSettings {
    /// `[mfa] required`: whether apps that inherit need a second factor, and whether sign-in
    /// asks for one straight after the password.
    pub required: bool,
    pub missing: MissingFactor,
    pub issuer: String,
}

/// What happens to a user without a second factor on an app that needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingFactor {
    Enrol,
    Refuse,
}

#[derive(Debug, Clone, Copy)]
pub struct LoginSettings {
    pub lock: LockPolicy,
    pub per_address_per_minute: u32,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub redirect_listen: Option<SocketAddr>,
    /// `https://host[:port]`, no trailing slash.
    pub external_origin: String,
    /// Lower-case host of `external_origin`: where the portal and path-routed apps live.
    pub portal_host: String,
    pub trusted_proxies: Vec<IpNet>,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// Threads serving connections, each with its own event loop and upstream pool.
    pub workers: usize,
}

#[derive(Debug, Clone)]
pub struct Tls {
    /// The default certificate: for the portal's host, and any name no other one holds.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// More certificates (`[[tls.cert]]`), each served to the names it holds.
    pub more: Vec<CertFiles>,
    /// Certificates from an ACME CA, for the portal's and every app's host.
    pub acme: Option<AcmeSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    pub directory: String,
    pub email: Option<String>,
    /// Trust for the CA's own HTTPS; the system's roots without it.
    pub ca_file: Option<PathBuf>,
    pub renew_before: Duration,
}

impl Tls {
    /// Every certificate, the default first.
    pub fn files(&self) -> Vec<CertFiles> {
        let first = CertFiles { cert: self.cert_file.clone(), key: self.key_file.clone() };
        std::iter::once(first).chain(self.more.iter().cloned()).collect()
    }
}

/// One certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Lockout policy: after `after` consecutive failures the account is locked for `base`,
/// doubling with each further failure, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockPolicy {
    pub after: u32,
    pub base_secs: i64,
    pub max_secs: i64,
}

#[derive(Debug, Clone, Copy)]
pub struct SessionTimeouts {
    pub idle: Duration,
    pub absolute: Duration,
    /// While the store does not answer, sessions held in memory keep working this long, then
    /// none does until it answers again.
    pub outage_grace: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub max_body_bytes: u64,
    pub buffer_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    pub title: String,
    pub description: String,
    pub upstream: Upstream,
    pub route: Route,
    pub access: Access,
    /// Whether a second factor is needed (resolved from `mfa` and `[mfa] required`).
    pub mfa: bool,
    /// Request headers forwarded to this app besides `request::headers::FORWARDED`.
    pub forward_headers: Vec<http::HeaderName>,
    /// Origins besides the app's own that may open WebSockets to it: `https://host[:port]`.
    pub websocket_origins: Vec<String>,
    /// Send the Host the user addressed (with the gateway's port) instead of the upstream's.
    pub preserve_host: bool,
    /// Rewrite `Location` (the upstream's own URLs, and paths for an app whose prefix poort
    /// strips) and the `Path` of `Set-Cookie` into the URLs the user sees.
    pub rewrite_paths: bool,
}

impl App {
    /// Where a user opens this app: its own origin, or the portal origin plus its prefix.
    /// Where the app's requests go, as a grant remembers it: a WebSocket stays with the
    /// upstream it was opened to, whatever name that upstream has in a later config.
    pub fn destination(&self) -> String {
        match &self.upstream {
            Upstream::Http { pool, base_path, .. } => format!("{pool}{base_path}"),
            Upstream::Whoami => "whoami".into(),
            Upstream::ForwardAuth => String::new(),
        }
    }

    pub fn launch_url(&self, server: &Server) -> String {
        match &self.route {
            Route::Host(h) => format!("https://{h}{}/", port_suffix(&server.external_origin)),
            Route::Path { prefix, .. } => format!("{}{prefix}", server.external_origin),
        }
    }

    /// The exact origin a login may redirect back to (rule 12), for host-routed apps.
    pub fn origin(&self, server: &Server) -> Option<String> {
        match &self.route {
            Route::Host(h) => Some(format!("https://{h}{}", port_suffix(&server.external_origin))),
            Route::Path { .. } => None,
        }
    }
}

/// `:port` of an `https://` origin, or "" for the default port.
pub fn port_suffix(origin: &str) -> &str {
    let after_scheme = origin.trim_start_matches("https://");
    match after_scheme.rfind(':') {
        Some(i) if !after_scheme.ends_with(']') => &after_scheme[i..],
        _ => "",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// `http://authority` or `https://authority`, plus an optional base path (no trailing
    /// slash).
    Http {
        /// As written in the URL: the Host the app is sent.
        authority: String,
        /// `host:port`, with the scheme's port if the URL had none: where poort connects.
        address: String,
        base_path: String,
        /// Set for `https://`.
        tls: Option<Arc<UpstreamTls>>,
        /// The pool its connections are kept in: the address for plain HTTP; for HTTPS the app
        /// too, whose TLS settings are its own.
        pool: String,
    },
    /// The demo app built into poort: it answers with the request it received.
    Whoami,
    /// None: a proxy in front of the app (nginx, Traefik, Caddy) serves it and asks
    /// `/.poort/auth` whether each request may pass (`forward_auth = true`).
    ForwardAuth,
}

/// How poort speaks TLS to an app served over HTTPS.
pub struct UpstreamTls {
    pub trust: crate::tls_client::Trust,
    pub client_cert: Option<crate::tls_client::ClientCert>,
    /// The name sent by SNI and checked in the app's certificate.
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// Offers HTTP/2 and HTTP/1.1 by ALPN, for pooled requests.
    pub any_version: Arc<rustls::ClientConfig>,
    /// Offers HTTP/1.1 only, for WebSockets and requests on a connection of their own.
    pub http1: Arc<rustls::ClientConfig>,
}

impl UpstreamTls {
    /// Builds the TLS settings; an error names the file or setting at fault.
    pub fn new(
        trust: crate::tls_client::Trust,
        client_cert: Option<crate::tls_client::ClientCert>,
        server_name: rustls::pki_types::ServerName<'static>,
    ) -> anyhow::Result<UpstreamTls> {
        let any_version = crate::tls_client::config(&trust, client_cert.as_ref(), &[b"h2", b"http/1.1"])?;
        let http1 = crate::tls_client::config(&trust, client_cert.as_ref(), &[b"http/1.1"])?;
        Ok(UpstreamTls { trust, client_cert, server_name, any_version, http1 })
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("trust", &self.trust)
            .field("client_cert", &self.client_cert)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        (&self.trust, &self.client_cert, &self.server_name) == (&other.trust, &other.client_cert, &other.server_name)
    }
}

impl Eq for UpstreamTls {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Host(String),
    /// Segment prefix on the portal host, stored with a trailing slash.
    Path {
        prefix: String,
        strip: bool,
    },
}

impl Config {
    /// Things that are allowed but weaken the gateway, each with what to do instead.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let shared: Vec<&str> =
            self.apps.iter().filter(|a| matches!(a.route, Route::Path { .. })).map(|a| a.name.as_str()).collect();
        if !shared.is_empty() {
            out.push(format!(
                "app[{}]: routed by path, so served from the portal's own origin ({}): a script on such an app's pages acts as the portal in the user's browser (it can read portal pages and post their forms; factor changes and command-line approvals still need the user's own factor and action) (hint: give each app its own host = \"app.example.com\")",
                shared.join(", "),
                self.server.external_origin
            ));
        }
        if let Some(w) = self.database.plaintext_warning() {
            out.push(w);
        }
        if let Some(a) = self.admin_listen.filter(|a| !a.ip().is_loopback()) {
            out.push(format!(
                "admin.listen: {a} is not a loopback address: anyone who reaches it can read the gateway's metrics (apps, users' activity in counts) (hint: keep it on 127.0.0.1 and let Prometheus reach it there, or firewall it)"
            ));
        }
        for app in &self.apps {
            if let Upstream::Http { tls: Some(tls), .. } = &app.upstream
                && tls.trust == crate::tls_client::Trust::Anything
            {
                out.push(format!(
                        "app[{}]: insecure_skip_verify = true: poort accepts any certificate from this app, so anyone on the path to it can read and change its traffic, identity headers included (hint: set upstream_ca_file to the app's CA, or upstream_fingerprint to its certificate's SHA-256)",
                        app.name
                    ));
            }
        }
        out
    }
}

fn read_text(path: &Path) -> Result<String, Problems> {
    std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![Problem {
            path: path.display().to_string(),
            message: format!("cannot read the config file: {e}"),
            hint: "pass an existing file with --config".into(),
        }])
    })
}

/// Reads and resolves a config file. Relative paths in it are taken from its folder.
pub fn load(path: &Path) -> Result<Config, Problems> {
    let stamp = std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
    let text = read_text(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut cfg = parse(&text, &base)?;
    let sha256 = crate::secret::hex(&crate::secret::sha256(text.as_bytes()));
    cfg.source = Some(Source { path: path.to_path_buf(), sha256, stamp });
    Ok(cfg)
}

/// Where the store of a config file is, read from its `[store]` table alone: for commands that
/// read the audit log while the rest of the file has a problem (a reload refused it).
pub fn store_only(path: &Path) -> Result<crate::config::database::Database, Problems> {
    let text = read_text(path)?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| Problems(vec![resolve::toml_problem(&e)]))?;
    let store = table.get("store").cloned().unwrap_or(toml::Value::Table(toml::Table::new()));
    let store: file::Store = store.try_into().map_err(|e: toml::de::Error| {
        Problems(vec![Problem {
            path: "store".into(),
            message: e.message().to_string(),
            hint: "see docs/configuration.md, [store]".into(),
        }])
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    resolve::store_location(store, &base)
}

/// Parses and resolves config text; `base` anchors relative paths.
pub fn parse(text: &str, base: &Path) -> Result<Config, Problems> {
    let file: file::File = toml::from_str(text).map_err(|e| Problems(vec![resolve::toml_problem(&e)]))?;
    resolve::resolve(file, base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve() {
        let c = parse("", Path::new("/etc/poort")).unwrap();
        assert_eq!(c.server.external_origin, "https://localhost:8443");
        assert_eq!(c.database.to_string(), "/etc/poort/poort-data/poort.db");
        assert_eq!(c.session.idle, Duration::from_secs(1800));
    }

    #[test]
    fn ssh_targets_are_refused_by_key_with_the_fix() {
        let text = r#"
            [ssh]
            listen = "127.0.0.1:2222"
            certificate_lifetime = "1d"
            [[ssh_target]]
            name = "db1"
            address = "db1"
            access = "public"
            principals = ["root,daemon"]
            host_key = ["ssh-ed25519 notbase64"]
            allow = ["shell", "everything"]
            [[ssh_target]]
            name = "db2"
            address = "10.0.0.6:22"
            access = "authenticated"
        "#;
        let problems = parse(text, Path::new(".")).unwrap_err().0;
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "ssh.certificate_lifetime",
                "ssh_target[db1].address",
                "ssh_target[db1].access",
                "ssh_target[db1].principals",
                "ssh_target[db1].host_key",
                "ssh_target[db1].allow",
                "ssh_target[db2].principals",
            ]
        );
        assert!(problems.iter().all(|p| !p.hint.is_empty()), "each says how to fix it");
        let good = r#"
            [ssh]
            listen = "127.0.0.1:2222"
            [[ssh_target]]
            name = "db1"
            address = "10.0.0.5:22"
            access = "authenticated"
            principals = ["%u"]
            group_principals = { admins = ["root"] }
        "#;
        let c = parse(good, Path::new(".")).unwrap();
        let t = &c.ssh_targets[0];
        assert!(t.record && t.allow.shell && t.allow.exec && t.allow.sftp && !t.allow.forward);
        let admin = crate::names::Identity { user: "ann".into(), email: None, groups: vec!["admins".into()] };
        assert_eq!(t.principals_for(&admin), ["ann", "root"]);
        let root = crate::names::Identity { user: "root".into(), email: None, groups: vec![] };
        assert!(t.principals_for(&root).is_empty(), "%u never stands for root");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            [server]
            listen = "nope"
            external_url = "http://gate"
            [session]
            idle_timeout = "forever"
            [[app]]
            name = "wiki"
            upstream = "htp://x"
            path = "/a/../b"
            access = "everyone"
            [[app]]
            name = "Bad Name"
            upstream = "http://127.0.0.1:1"
            host = "x.example"
            access = { rules = [{ effect = "allow" }] }
        "#;
        let problems = parse(text, Path::new(".")).unwrap_err().0;
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.listen",
                "server.external_url",
                "session.idle_timeout",
                "app[wiki].upstream",
                "app[wiki].path",
                "app[wiki].access",
                "app[1].name",
                "app[#1].access.rules[0]",
            ]
        );
    }

    #[test]
    fn a_public_app_cannot_require_a_second_factor() {
        let text = "[[app]]\nname = \"p\"\nupstream = \"http://127.0.0.1:1\"\npath = \"/p/\"\naccess = \"public\"\nmfa = \"required\"\n";
        let err = parse(text, Path::new(".")).unwrap_err().0;
        assert_eq!(err[0].path, "app[p].mfa", "{err:?}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse("[server]\nlisten_on = \"x\"\n", Path::new(".")).unwrap_err().0;
        assert!(err[0].message.contains("unknown field"), "{err:?}");
    }
}

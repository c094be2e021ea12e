//! The config file as written by an operator: serde types that refuse unknown keys. Nothing
//! here is trusted yet; `resolve` turns it into a checked `Config`.

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub server: Server,
    pub tls: Option<Tls>,
    #[serde(default)]
    pub store: Store,
    #[serde(default)]
    pub session: Session,
    #[serde(default)]
    pub proxy: Proxy,
    #[serde(default)]
    pub mfa: Mfa,
    #[serde(default)]
    pub login: Login,
    /// Web apps reached through the reverse proxy.
    #[serde(default, rename = "app")]
    pub apps: Vec<App>,
    #[serde(default)]
    pub tunnels: Tunnels,
    #[serde(default)]
    pub mitigate: Mitigate,
    /// Directory and single sign-on sources of users.
    #[serde(default)]
    pub auth: super::auth::AuthFile,
    /// TCP services (SSH, RDP, databases) reached through `poort connect`.
    #[serde(default, rename = "tunnel")]
    pub tunnel_list: Vec<Tunnel>,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub audit: Audit,
    /// The SSH front door (docs/ssh.md).
    #[serde(default)]
    pub ssh: Ssh,
    /// SSH hosts reached through the SSH front door.
    #[serde(default, rename = "ssh_target")]
    pub ssh_targets: Vec<SshTarget>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Ssh {
    /// The SSH listener, `ip:port`. Default: none (no SSH front door).
    pub listen: Option<String>,
    /// How long a certificate poort signs for a target is valid. Default "5m".
    pub certificate_lifetime: Option<String>,
    /// Connecting to a target. Default "5s".
    pub connect_timeout: Option<String>,
    /// A connection with no bytes either way for this long is closed. Default "1h".
    pub idle_timeout: Option<String>,
    /// Open SSH connections per person at most. Default 16.
    pub per_user: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshTarget {
    pub name: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    /// `host:port` of the target's sshd, as poort reaches it.
    pub address: Option<String>,
    pub access: Option<toml::Value>,
    pub mfa: Option<String>,
    /// Accounts on the target everyone `access` lets in may use; `%u` is the person's name.
    pub principals: Option<Vec<String>>,
    /// More accounts, for members of a group: `{ admins = ["root"] }`.
    pub group_principals: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// The target's host public key(s), as in `/etc/ssh/ssh_host_ed25519_key.pub`. Without
    /// one, the first key the target shows is kept and audited (trust on first use).
    pub host_key: Option<Vec<String>>,
    /// Record sessions (asciicast). Default true.
    pub record: Option<bool>,
    /// What a session may do: "shell", "exec", "sftp", "forward". Default shell, exec, sftp.
    pub allow: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// Where every audit record is sent as it is committed (`[[audit.export]]`).
    #[serde(default)]
    pub export: Vec<AuditExport>,
    /// How often the chain is sealed, once `poort audit seal-init` made a sealing key.
    /// Default "15m".
    pub seal_interval: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditExport {
    /// Names the export's place in the log (default: where it sends to).
    pub name: Option<String>,
    /// `host:port` of a syslog receiver: RFC 5424 over TLS (RFC 5425), octet-counted.
    pub syslog: Option<String>,
    /// A file to append JSON lines to, or `"-"` for standard output.
    pub file: Option<String>,
    /// The receiver's CA (PEM); default: the system's trust store.
    pub ca_file: Option<String>,
    /// Or exactly the receiver's certificate, by SHA-256.
    pub fingerprint: Option<String>,
    /// The name to check in the receiver's certificate (default: the host of `syslog`).
    pub server_name: Option<String>,
    /// A client certificate and key (PEM) for receivers that ask for one.
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Where Prometheus metrics, /healthz and /readyz are served over plain HTTP. Default
    /// `127.0.0.1:9464`; `"off"` for none.
    pub listen: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `"text"` (default) or `"json"`: one JSON object per line.
    pub format: Option<String>,
    /// A line per request (request id, app, user, status, duration, refusal). Default true.
    pub access: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Mitigate {
    /// Mitigation rules (docs/mitigation.md), reloaded when the file changes.
    pub rules_file: Option<String>,
    /// Refuse a rules file without a valid `.sig` from `public_key`. Default false.
    pub require_signature: Option<bool>,
    /// Ed25519 public key (base64, as `poort rules keygen` prints it).
    pub public_key: Option<String>,
    /// Only `admin_group` may sign in or reach apps. Default false.
    pub lockdown: Option<bool>,
    /// Who may still work during a lockdown. Default "admins".
    pub admin_group: Option<String>,
    /// An https URL of a signed rules feed (`poort rules publish` writes one), polled by
    /// every node; its rules follow the local file's.
    pub feed: Option<String>,
    /// The feed publisher's Ed25519 public key (base64). Required with `feed`.
    pub feed_public_key: Option<String>,
    /// How often the feed is polled (a tenth more at random). Default "60s".
    pub feed_interval: Option<String>,
    /// The CA (PEM) of the feed server's certificate; default: the system's trust store.
    pub feed_ca_file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Tunnels {
    /// Open tunnels per session at most. Default 16.
    pub per_session: Option<usize>,
    /// Open tunnels in all at most. Default 1024.
    pub total: Option<usize>,
    /// A tunnel with no bytes either way for this long is closed. Default "1h".
    pub idle_timeout: Option<String>,
    /// Connecting to a target. Default "5s".
    pub connect_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tunnel {
    pub name: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    /// `host:port` of the service, as poort reaches it.
    pub target: Option<String>,
    pub access: Option<toml::Value>,
    pub mfa: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// HTTPS listener, `ip:port`. Default `127.0.0.1:8443`.
    pub listen: Option<String>,
    /// Optional plain-HTTP listener that only redirects to `external_url`.
    pub redirect_listen: Option<String>,
    /// The portal's URL as users reach it, for example `https://gate.example.com`.
    pub external_url: Option<String>,
    /// Peers whose `X-Forwarded-For` is believed (CIDRs). Default none.
    pub trusted_proxies: Option<Vec<String>>,
    pub handshake_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub max_connections: Option<usize>,
    /// Open connections from one client address at most. Default 256.
    pub max_connections_per_client: Option<usize>,
    /// Threads that serve connections. Default: one per CPU core.
    pub workers: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    /// More certificates, each served to the names it holds (SNI).
    pub cert: Option<Vec<CertFiles>>,
    /// Certificates for the portal and every app host from an ACME CA.
    pub acme: Option<Acme>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    /// The CA's directory URL.
    pub directory: Option<String>,
    /// A contact address the CA may write to about the certificates.
    pub email: Option<String>,
    /// Trust the CA's own HTTPS through the CAs in this PEM file (a private ACME CA).
    pub ca_file: Option<String>,
    /// Renew a certificate this long before it expires. Default "30d".
    pub renew_before: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// Directory for the SQLite database and the signing key. Default `./poort-data`.
    pub data_dir: Option<String>,
    /// `sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB`; defaults to `poort.db` in
    /// `data_dir`.
    pub database_url: Option<String>,
    /// PEM file of the CA that signed the PostgreSQL server's certificate; TLS is then required.
    pub database_ca_file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Session {
    pub idle_timeout: Option<String>,
    pub absolute_timeout: Option<String>,
    /// How long sessions already validated keep working while the database does not answer.
    pub outage_grace: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    /// Largest request body, in bytes. Default 10 MiB.
    pub max_body_bytes: Option<u64>,
    /// Request bodies up to this size are read whole before the upstream request starts.
    /// Default 64 KiB.
    pub buffer_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Mfa {
    /// Whether apps with `mfa = "inherit"` (the default) need a second factor. Default false.
    pub required: Option<bool>,
    /// A user without a second factor on an app that needs one: `"enrol"` (sent to set one
    /// up, the default) or `"refuse"`.
    pub missing: Option<String>,
    /// The name authenticator apps show. Default "poort".
    pub issuer: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// Consecutive failures (any factor) before an account is locked. Default 5.
    pub lock_after: Option<u32>,
    /// First lock; each further failure doubles it. Default "1m".
    pub lock_base: Option<String>,
    /// Longest lock. Default "30m".
    pub lock_max: Option<String>,
    /// Sign-in attempts (any factor) per client address per minute. Default 30.
    pub per_address_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub name: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    pub upstream: Option<String>,
    /// Route by host name: requests for this host go to the app.
    pub host: Option<String>,
    /// Route by path prefix on the portal host, `/wiki/`.
    pub path: Option<String>,
    /// With `path`: remove the prefix before forwarding. Default false.
    pub strip_prefix: Option<bool>,
    /// `"public"`, `"authenticated"` or `{ rules = [...] }`. Required: there is no default.
    pub access: Option<toml::Value>,
    /// `"required"` or `"inherit"` (from `[mfa] required`, the default).
    pub mfa: Option<String>,
    /// Request headers this app needs beyond the standard ones poort forwards.
    pub forward_headers: Option<Vec<String>>,
    /// Origins (`https://host[:port]`) besides the app's own whose pages may open WebSockets
    /// to it.
    pub websocket_origins: Option<Vec<String>>,
    /// Send the Host the user addressed instead of the upstream's. Default false.
    pub preserve_host: Option<bool>,
    /// Rewrite the app's own URLs in `Location` and cookie paths in `Set-Cookie` to the ones
    /// the user sees. Default false.
    pub rewrite_paths: Option<bool>,
    /// A proxy in front of the app serves it and asks poort by forward-auth; no upstream.
    pub forward_auth: Option<bool>,
    /// For an https upstream: trust certificates issued under the CAs in this PEM file
    /// (instead of the system's trust store).
    pub upstream_ca_file: Option<String>,
    /// For an https upstream: trust exactly the certificate with this SHA-256.
    pub upstream_fingerprint: Option<String>,
    /// For an https upstream: the name sent by SNI and checked in its certificate, when it
    /// is not the host of the URL.
    pub upstream_server_name: Option<String>,
    /// For an https upstream that asks for one: the client certificate (PEM) and its key.
    pub upstream_client_cert: Option<String>,
    pub upstream_client_key: Option<String>,
    /// For an https upstream: accept any certificate. Logged as a warning at every start.
    pub insecure_skip_verify: Option<bool>,
}

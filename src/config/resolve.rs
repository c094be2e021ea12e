//! From the file's words to a `Config`: every section checked, every problem collected with
//! its key and a hint, nothing applied unless all of it is right.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::access::{Access, resolve_access};
use super::database::Database;
use super::*;
use crate::tls_client::Trust;

pub(super) fn toml_problem(e: &toml::de::Error) -> Problem {
    let message = e.message().to_string();
    let hint = if message.contains("unknown field") {
        "remove the key or fix its spelling; docs/configuration.md lists every key".to_string()
    } else {
        "see docs/configuration.md for the expected type".to_string()
    };
    let path = match e.span() {
        Some(span) => format!("at byte {}", span.start),
        None => "config".into(),
    };
    Problem { path, message, hint }
}

pub(super) struct Collector(Vec<Problem>);

impl Collector {
    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>, hint: impl Into<String>) {
        self.0.push(Problem { path: path.into(), message: message.into(), hint: hint.into() });
    }

    pub(super) fn duration(&mut self, path: &str, raw: &Option<String>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.add(path, "must be longer than zero", "for example \"30s\" or \"15m\"");
                    default
                }
                Err(_) => {
                    self.add(path, format!("{s:?} is not a duration"), "for example \"30s\", \"15m\" or \"12h\"");
                    default
                }
            },
        }
    }

    /// An app's or tunnel's name; a placeholder (`#i`) keeps later problems addressable.
    pub(super) fn name(
        &mut self,
        kind: &str,
        i: usize,
        raw: Option<String>,
        invalid: &str,
        missing_hint: &str,
    ) -> String {
        match raw {
            Some(n) if crate::names::valid_entry_name(&n) => n,
            Some(n) => {
                self.add(format!("{kind}[{i}].name"), format!("{n:?} {invalid}"), "use 1-64 of a-z, 0-9, - and _");
                format!("#{i}")
            }
            None => {
                self.add(format!("{kind}[{i}].name"), "missing", missing_hint);
                format!("#{i}")
            }
        }
    }

    /// `mfa = "required" | "inherit"` (the default inherits `[mfa] required`).
    pub(super) fn mfa(&mut self, key: &str, raw: Option<&str>, default: bool) -> Option<bool> {
        match raw {
            None | Some("inherit") => Some(default),
            Some("required") => Some(true),
            Some(other) => {
                self.add(format!("{key}.mfa"), format!("{other:?} is not a choice"), "\"required\" or \"inherit\"");
                None
            }
        }
    }

    pub(super) fn socket(&mut self, path: &str, raw: &str) -> Option<SocketAddr> {
        match raw.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.add(path, format!("{raw:?} is not an ip:port address"), "for example \"0.0.0.0:443\"");
                None
            }
        }
    }
}

pub(super) fn resolve(f: file::File, base: &Path) -> Result<Config, Problems> {
    let mut c = Collector(Vec::new());
    let c = &mut c;
    let server = server(c, f.server);
    let (data_dir, database) = store(c, f.store, base);
    let tls = tls(c, f.tls, base, &data_dir);
    if tls.acme.is_some() && server.redirect_listen.is_none() {
        c.add(
            "server.redirect_listen",
            "is needed by [tls] acme: the CA checks each name over plain HTTP (HTTP-01)",
            "set redirect_listen = \"0.0.0.0:80\" (the CA connects to port 80)",
        );
    }
    let session = session(c, f.session);
    let proxy = proxy(c, f.proxy);
    let mfa = mfa(c, f.mfa);
    let login = login(c, f.login);
    let apps = apps(c, f.apps, base, &server.portal_host, mfa.required);
    let (tunnel, tunnels) = tunnels(c, f.tunnels, f.tunnel_list, &apps, mfa.required);
    let mitigate = mitigate(c, f.mitigate, base);
    let auth = auth::resolve(c, f.auth, base);
    let log = LogSettings {
        json: match f.log.format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                c.add("log.format", format!("{other:?} is not a log format"), "use \"text\" or \"json\"");
                false
            }
        },
        access: f.log.access.unwrap_or(true),
    };

    let admin_listen = match f.admin.listen.as_deref() {
        Some("off") => None,
        raw => c.socket("admin.listen", raw.unwrap_or("127.0.0.1:9464")),
    };
    // Port 0 (any free port, in tests) is never the same listener.
    if admin_listen.is_some_and(|a| a.port() != 0 && (a == server.listen || Some(a) == server.redirect_listen)) {
        c.add(
            "admin.listen",
            "is the address of a public listener",
            "metrics and health checks get a listener of their own, for example \"127.0.0.1:9464\"",
        );
    }

    let audit_seal_interval = c.duration("audit.seal_interval", &f.audit.seal_interval, Duration::from_secs(15 * 60));
    if audit_seal_interval < Duration::from_secs(1) {
        c.add("audit.seal_interval", "must be 1 s or longer", "seal_interval = \"15m\"");
    }
    let audit_export = audit_export(c, f.audit, base);
    let (ssh, ssh_targets) = ssh(c, f.ssh, f.ssh_targets, mfa.required);
    if ssh.listen.is_some_and(|a| a.port() != 0 && (a == server.listen || Some(a) == server.redirect_listen)) {
        c.add("ssh.listen", "is the address of another listener", "give SSH a port of its own, for example 2222");
    }

    if c.0.is_empty() {
        Ok(Config {
            server,
            tls,
            data_dir,
            database,
            session,
            proxy,
            mfa,
            login,
            apps,
            tunnel,
            tunnels,
            mitigate,
            auth,
            log,
            admin_listen,
            source: None,
            audit_export,
            audit_seal_interval,
            ssh,
            ssh_targets,
        })
    } else {
        Err(Problems(std::mem::take(&mut c.0)))
    }
}

/// A path from the config: relative ones are taken from the config file's folder.
/// `[[audit.export]]`: each a syslog receiver over TLS or a file of JSON lines.
fn audit_export(c: &mut Collector, f: file::Audit, base: &Path) -> Vec<crate::config::AuditExport> {
    use crate::config::{AuditExport, ExportTo};
    use crate::tls_client::ClientCert;
    let mut out: Vec<AuditExport> = Vec::new();
    for (i, e) in f.export.into_iter().enumerate() {
        let key = format!("audit.export[{i}]");
        let spec = format!("{e:?}");
        let tls_keys = [
            ("ca_file", e.ca_file.is_some()),
            ("fingerprint", e.fingerprint.is_some()),
            ("server_name", e.server_name.is_some()),
            ("client_cert", e.client_cert.is_some()),
            ("client_key", e.client_key.is_some()),
        ];
        let (to, default_name) = match (&e.syslog, &e.file) {
            (Some(_), Some(_)) | (None, None) => {
                c.add(
                    &key,
                    "needs exactly one of syslog and file",
                    "syslog = \"siem.example.com:6514\" or file = \"/var/log/poort/audit.jsonl\"",
                );
                continue;
            }
            (None, Some(path)) => {
                for (k, set) in tls_keys {
                    if set {
                        c.add(format!("{key}.{k}"), "only applies to a syslog export", "remove it");
                    }
                }
                if path == "-" {
                    (ExportTo::Stdout, "stdout".to_string())
                } else {
                    (ExportTo::File(at(base, path)), format!("file:{path}"))
                }
            }
            (Some(address), None) => {
                let Some((host, port)) =
                    address.rsplit_once(':').filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
                else {
                    c.add(
                        format!("{key}.syslog"),
                        format!("{address:?} is not host:port"),
                        "for example \"siem.example.com:6514\"",
                    );
                    continue;
                };
                let _ = port;
                let trust = match (&e.ca_file, &e.fingerprint) {
                    (Some(_), Some(_)) => {
                        c.add(
                            format!("{key}.ca_file"),
                            "ca_file and fingerprint each say how to trust the receiver",
                            "choose one of them",
                        );
                        continue;
                    }
                    (Some(p), None) => Trust::CaFile(at(base, p)),
                    (None, Some(fp)) => match crate::tls_client::parse_fingerprint(fp) {
                        Ok(d) => Trust::Pinned(d),
                        Err(err) => {
                            c.add(
                                format!("{key}.fingerprint"),
                                format!("{err}"),
                                "openssl x509 -in receiver.pem -noout -fingerprint -sha256 prints it",
                            );
                            continue;
                        }
                    },
                    (None, None) => Trust::SystemRoots,
                };
                let client = match (&e.client_cert, &e.client_key) {
                    (Some(cert), Some(k)) => Some(ClientCert { cert: at(base, cert), key: at(base, k) }),
                    (None, None) => None,
                    _ => {
                        c.add(
                            format!("{key}.client_cert"),
                            "a client certificate needs its key, and a key its certificate",
                            "set both client_cert and client_key, or neither",
                        );
                        continue;
                    }
                };
                let name = e.server_name.as_deref().unwrap_or(host);
                let server_name = match crate::tls_client::server_name(name) {
                    Ok(n) => n,
                    Err(err) => {
                        c.add(format!("{key}.server_name"), format!("{err}"), "the name in the receiver's certificate");
                        continue;
                    }
                };
                let tls = match crate::tls_client::config(&trust, client.as_ref(), &[]) {
                    Ok(t) => t,
                    Err(err) => {
                        c.add(&key, format!("{err:#}"), "check the CA, client certificate and key files");
                        continue;
                    }
                };
                (ExportTo::Syslog { address: address.clone(), server_name, tls }, format!("syslog:{address}"))
            }
        };
        let name = e.name.clone().unwrap_or(default_name);
        if !name.chars().all(|ch| ch.is_ascii_graphic()) || name.is_empty() || name.len() > 128 {
            c.add(
                format!("{key}.name"),
                format!("{name:?} is not a usable name"),
                "1-128 printable characters, no spaces",
            );
            continue;
        }
        if out.iter().any(|o| o.name == name) {
            c.add(
                format!("{key}.name"),
                format!("{name:?} is used by another export"),
                "give each export its own name",
            );
            continue;
        }
        if matches!(to, ExportTo::Stdout) && out.iter().any(|o| matches!(o.to, ExportTo::Stdout)) {
            c.add(format!("{key}.file"), "standard output is already an export", "export to standard output once");
            continue;
        }
        out.push(AuditExport { name, to, spec });
    }
    out
}

fn at(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// `[server]`.
fn server(c: &mut Collector, f: file::Server) -> Server {
    let listen = c.socket("server.listen", f.listen.as_deref().unwrap_or("127.0.0.1:8443"));
    let redirect_listen = f.redirect_listen.as_deref().and_then(|s| c.socket("server.redirect_listen", s));
    let (external_origin, portal_host) = match f.external_url.as_deref() {
        None => {
            let port = listen.map_or(8443, |a| a.port());
            let origin =
                if port == 443 { "https://localhost".to_string() } else { format!("https://localhost:{port}") };
            (origin, "localhost".to_string())
        }
        Some(raw) => match external_origin(raw) {
            Some(v) => v,
            None => {
                c.add(
                    "server.external_url",
                    format!("{raw:?} is not an https URL with a host and nothing after it"),
                    "for example \"https://gate.example.com\"",
                );
                (String::new(), String::new())
            }
        },
    };
    let mut trusted_proxies = Vec::new();
    for (i, raw) in f.trusted_proxies.iter().flatten().enumerate() {
        match raw.parse::<IpNet>().or_else(|_| raw.parse::<std::net::IpAddr>().map(IpNet::from)) {
            Ok(n) => trusted_proxies.push(n),
            Err(_) => c.add(
                format!("server.trusted_proxies[{i}]"),
                format!("{raw:?} is not an address or CIDR range"),
                "for example \"10.0.0.0/8\" or \"192.0.2.7\"",
            ),
        }
    }
    let server = Server {
        listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8443))),
        redirect_listen,
        external_origin,
        portal_host,
        trusted_proxies,
        handshake_timeout: c.duration("server.handshake_timeout", &f.handshake_timeout, Duration::from_secs(10)),
        header_timeout: c.duration("server.header_timeout", &f.header_timeout, Duration::from_secs(10)),
        idle_timeout: c.duration("server.idle_timeout", &f.idle_timeout, Duration::from_secs(75)),
        shutdown_grace: c.duration("server.shutdown_grace", &f.shutdown_grace, Duration::from_secs(10)),
        max_connections: f.max_connections.unwrap_or(20_000),
        max_connections_per_client: f.max_connections_per_client.unwrap_or(256),
        workers: f.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    };
    if server.workers == 0 || server.workers > 256 {
        c.add("server.workers", "must be between 1 and 256", "leave it out for one per CPU core");
    }
    if server.max_connections == 0 {
        c.add("server.max_connections", "must be at least 1", "leave it out for the default of 20000");
    }
    if server.max_connections_per_client == 0 {
        c.add("server.max_connections_per_client", "must be at least 1", "leave it out for the default of 256");
    }
    server
}

/// `[store]`: the data folder and the database file.
/// The database a `[store]` table names, alone (`config::store_only`).
pub(super) fn store_location(f: file::Store, base: &Path) -> Result<Database, Problems> {
    let mut c = Collector(Vec::new());
    let (_, database) = store(&mut c, f, base);
    if c.0.is_empty() { Ok(database) } else { Err(Problems(c.0)) }
}

fn store(c: &mut Collector, f: file::Store, base: &Path) -> (PathBuf, Database) {
    let data_dir = at(base, f.data_dir.as_deref().unwrap_or("poort-data"));
    let database = match f.database_url.as_deref() {
        None => Database::Sqlite(data_dir.join("poort.db")),
        Some(url) => {
            let ca = f.database_ca_file.as_deref().map(|ca| at(base, ca));
            match Database::parse(url, ca, base) {
                Ok(db) => db,
                Err((key, message, hint)) => {
                    c.add(format!("store.{key}"), message, hint);
                    Database::Sqlite(PathBuf::new())
                }
            }
        }
    };
    (data_dir, database)
}

/// `[tls]`: the certificate and key, by default in the data folder.
fn tls(c: &mut Collector, f: Option<file::Tls>, base: &Path, data_dir: &Path) -> Tls {
    let Some(f) = f else {
        return Tls {
            cert_file: data_dir.join("tls/cert.pem"),
            key_file: data_dir.join("tls/key.pem"),
            more: Vec::new(),
            acme: None,
        };
    };
    let acme = f.acme.and_then(|a| {
        let renew_before = c.duration("tls.acme.renew_before", &a.renew_before, Duration::from_secs(30 * 86400));
        let Some(directory) = a.directory.filter(|d| d.starts_with("https://")) else {
            c.add(
                "tls.acme.directory",
                "missing or not an https URL",
                "the CA's directory, for example \"https://acme-v02.api.letsencrypt.org/directory\"",
            );
            return None;
        };
        if a.email.as_deref().is_some_and(|e| !e.contains('@') || e.contains(char::is_whitespace)) {
            c.add(
                "tls.acme.email",
                "is not an email address",
                "for example email = \"ops@example.com\", or leave it out",
            );
        }
        Some(AcmeSettings {
            directory,
            email: a.email,
            ca_file: a.ca_file.as_deref().map(|p| at(base, p)),
            renew_before,
        })
    });
    let mut more = Vec::new();
    for (i, e) in f.cert.into_iter().flatten().enumerate() {
        match (e.cert_file, e.key_file) {
            (Some(cert), Some(key)) => more.push(CertFiles { cert: at(base, &cert), key: at(base, &key) }),
            (cert, _) => {
                let which = if cert.is_none() { "cert_file" } else { "key_file" };
                c.add(
                    format!("tls.cert[{i}].{which}"),
                    "missing",
                    "each [[tls.cert]] names a cert_file and a key_file",
                );
            }
        }
    }
    match (f.cert_file, f.key_file) {
        (Some(cert), Some(key)) => Tls { cert_file: at(base, &cert), key_file: at(base, &key), more, acme },
        // With ACME, the default certificate is poort's own until the first one arrives.
        (None, None) if acme.is_some() => {
            Tls { cert_file: data_dir.join("tls/cert.pem"), key_file: data_dir.join("tls/key.pem"), more, acme }
        }
        (cert, key) => {
            if cert.is_none() {
                c.add("tls.cert_file", "missing", "name the PEM certificate chain file");
            }
            if key.is_none() {
                c.add("tls.key_file", "missing", "name the PEM private key file");
            }
            Tls { cert_file: PathBuf::new(), key_file: PathBuf::new(), more, acme }
        }
    }
}

/// `[session]`.
fn session(c: &mut Collector, f: file::Session) -> SessionTimeouts {
    let session = SessionTimeouts {
        idle: c.duration("session.idle_timeout", &f.idle_timeout, Duration::from_secs(30 * 60)),
        absolute: c.duration("session.absolute_timeout", &f.absolute_timeout, Duration::from_secs(12 * 3600)),
        outage_grace: c.duration("session.outage_grace", &f.outage_grace, Duration::from_secs(60)),
    };
    if session.outage_grace < Duration::from_secs(3) {
        c.add(
            "session.outage_grace",
            "is shorter than 3s, the time a node may go between two reads of the store",
            "set \"3s\" for the least grace there can be",
        );
    }
    if session.idle > session.absolute {
        c.add(
            "session.idle_timeout",
            "is longer than session.absolute_timeout",
            "make the idle timeout the shorter one",
        );
    }
    session
}

/// `[proxy]`.
fn proxy(c: &mut Collector, f: file::Proxy) -> ProxySettings {
    let proxy = ProxySettings {
        connect_timeout: c.duration("proxy.connect_timeout", &f.connect_timeout, Duration::from_secs(5)),
        response_timeout: c.duration("proxy.response_timeout", &f.response_timeout, Duration::from_secs(60)),
        max_body_bytes: f.max_body_bytes.unwrap_or(10 * 1024 * 1024),
        buffer_bytes: f.buffer_bytes.unwrap_or(64 * 1024),
    };
    if proxy.buffer_bytes > 16 * 1024 * 1024 {
        c.add(
            "proxy.buffer_bytes",
            "is more than 16 MiB",
            "bodies above this stream anyway; keep it at 64 KiB to 1 MiB",
        );
    }
    proxy
}

/// `[mfa]`.
fn mfa(c: &mut Collector, f: file::Mfa) -> MfaSettings {
    let mfa = MfaSettings {
        required: f.required.unwrap_or(false),
        missing: match f.missing.as_deref() {
            None | Some("enrol") => MissingFactor::Enrol,
            Some("refuse") => MissingFactor::Refuse,
            Some(other) => {
                c.add("mfa.missing", format!("{other:?} is not a choice"), "\"enrol\" or \"refuse\"");
                MissingFactor::Enrol
            }
        },
        issuer: f.issuer.unwrap_or_else(|| "poort".into()),
    };
    if mfa.issuer.is_empty() || mfa.issuer.len() > 64 || mfa.issuer.contains(':') {
        c.add("mfa.issuer", "must be 1-64 characters without ':'", "for example issuer = \"Example Corp\"");
    }
    mfa
}

/// `[login]`.
fn login(c: &mut Collector, f: file::Login) -> LoginSettings {
    let lock_base = c.duration("login.lock_base", &f.lock_base, Duration::from_secs(60));
    let lock_max = c.duration("login.lock_max", &f.lock_max, Duration::from_secs(30 * 60));
    let login = LoginSettings {
        lock: LockPolicy {
            after: f.lock_after.unwrap_or(5),
            base_secs: lock_base.as_secs() as i64,
            max_secs: lock_max.as_secs() as i64,
        },
        per_address_per_minute: f.per_address_per_minute.unwrap_or(30),
    };
    if login.lock.after == 0 {
        c.add("login.lock_after", "must be at least 1", "leave it out for the default of 5");
    }
    if login.per_address_per_minute == 0 {
        c.add("login.per_address_per_minute", "must be at least 1", "leave it out for the default of 30");
    }
    login
}

/// `[[app]]`, each with a name and a route of its own.
fn apps(c: &mut Collector, list: Vec<file::App>, base: &Path, portal_host: &str, mfa_default: bool) -> Vec<App> {
    let mut apps: Vec<App> = Vec::new();
    for (i, app) in list.into_iter().enumerate() {
        if let Some(a) = resolve_app(c, i, app, base, portal_host, mfa_default) {
            let key = format!("app[{}]", a.name);
            if apps.iter().any(|b| b.name == a.name) {
                c.add(format!("{key}.name"), "is used by another app too", "give each app its own name");
            }
            if apps.iter().any(|b| b.route == a.route) {
                c.add(
                    format!("{key}.route"),
                    "another app has the same host or path",
                    "give each app its own host or path",
                );
            }
            apps.push(a);
        }
    }
    apps
}

/// `[tunnels]` and `[[tunnel]]`; a tunnel's name is not an app's.
fn tunnels(
    c: &mut Collector,
    settings: file::Tunnels,
    list: Vec<file::Tunnel>,
    apps: &[App],
    mfa_default: bool,
) -> (TunnelSettings, Vec<Tunnel>) {
    let tunnel = TunnelSettings {
        per_session: settings.per_session.unwrap_or(16),
        total: settings.total.unwrap_or(1024),
        idle_timeout: c.duration("tunnels.idle_timeout", &settings.idle_timeout, Duration::from_secs(3600)),
        connect_timeout: c.duration("tunnels.connect_timeout", &settings.connect_timeout, Duration::from_secs(5)),
    };
    if tunnel.per_session == 0 || tunnel.total == 0 {
        c.add("tunnels", "per_session and total must be at least 1", "leave them out for 16 and 1024");
    }
    let mut tunnels: Vec<Tunnel> = Vec::new();
    for (i, t) in list.into_iter().enumerate() {
        if let Some(t) = resolve_tunnel(c, i, t, mfa_default) {
            if tunnels.iter().any(|u| u.name == t.name) || apps.iter().any(|a| a.name == t.name) {
                c.add(format!("tunnel[{}].name", t.name), "is used by another app or tunnel", "give each its own name");
            }
            tunnels.push(t);
        }
    }
    (tunnel, tunnels)
}

/// `[ssh]` and `[[ssh_target]]`.
fn ssh(
    c: &mut Collector,
    f: file::Ssh,
    list: Vec<file::SshTarget>,
    mfa_default: bool,
) -> (SshSettings, Vec<SshTarget>) {
    let settings = SshSettings {
        listen: f.listen.as_deref().and_then(|raw| c.socket("ssh.listen", raw)),
        certificate_lifetime: c.duration("ssh.certificate_lifetime", &f.certificate_lifetime, Duration::from_secs(300)),
        connect_timeout: c.duration("ssh.connect_timeout", &f.connect_timeout, Duration::from_secs(5)),
        idle_timeout: c.duration("ssh.idle_timeout", &f.idle_timeout, Duration::from_secs(3600)),
        per_user: f.per_user.unwrap_or(16),
    };
    if !(Duration::from_secs(60)..=Duration::from_secs(3600)).contains(&settings.certificate_lifetime) {
        c.add("ssh.certificate_lifetime", "must be from 1m to 1h", "leave it out for 5m");
    }
    if settings.per_user == 0 {
        c.add("ssh.per_user", "must be at least 1", "leave it out for 16");
    }
    let mut targets: Vec<SshTarget> = Vec::new();
    for (i, t) in list.into_iter().enumerate() {
        if let Some(t) = resolve_ssh_target(c, i, t, mfa_default) {
            if targets.iter().any(|u| u.name == t.name) {
                c.add(
                    format!("ssh_target[{}].name", t.name),
                    "is used by another SSH target",
                    "give each its own name",
                );
            }
            targets.push(t);
        }
    }
    (settings, targets)
}

/// A host key line (`TYPE BASE64 [comment]`) as `TYPE BASE64`, if its base64 holds a key of
/// that type. (The front door reads the key itself when it compares.)
fn host_key_line(raw: &str) -> Option<String> {
    use base64::Engine;
    let mut parts = raw.split_whitespace();
    let (algo, b64) = (parts.next()?, parts.next()?);
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    (blob.get(4..4 + len)? == algo.as_bytes()).then(|| format!("{algo} {b64}"))
}

/// An account name on a target: what OpenSSH takes as a user name, or `%u`.
fn valid_principal(p: &str) -> bool {
    p == "%u"
        || (!p.is_empty()
            && p.len() <= 32
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !p.starts_with(['-', '.']))
}

fn resolve_ssh_target(c: &mut Collector, i: usize, t: file::SshTarget, mfa_default: bool) -> Option<SshTarget> {
    let name = c.name(
        "ssh_target",
        i,
        t.name,
        "is not a valid name",
        "every SSH target needs a name, for example name = \"db1\"",
    );
    let key = format!("ssh_target[{name}]");
    let address = host_port(c, &format!("{key}.address"), t.address.as_deref(), "address = \"10.0.0.5:22\"");
    let access = signed_in_access(c, &key, t.access, "an SSH target");
    let mfa = c.mfa(&key, t.mfa.as_deref(), mfa_default);
    let principals = t.principals.unwrap_or_default();
    let group_principals: Vec<(String, Vec<String>)> = t.group_principals.unwrap_or_default().into_iter().collect();
    let all = principals.iter().chain(group_principals.iter().flat_map(|(_, p)| p));
    if let Some(bad) = all.clone().find(|p| !valid_principal(p)) {
        c.add(
            format!("{key}.principals"),
            format!("{bad:?} is not an account name"),
            "letters, digits and -_. (or %u for the person's own name)",
        );
    }
    if let Some((g, _)) = group_principals.iter().find(|(g, _)| !crate::names::valid_user_name(g)) {
        c.add(
            format!("{key}.group_principals"),
            format!("{g:?} is not a group name"),
            "name a group, for example admins",
        );
    }
    if all.count() == 0 {
        c.add(
            format!("{key}.principals"),
            "no account on the target is named",
            "for example principals = [\"%u\"] (the person's own name) or [\"deploy\"]",
        );
    }
    let mut host_keys = Vec::new();
    for raw in t.host_key.unwrap_or_default() {
        match host_key_line(&raw) {
            Some(k) => host_keys.push(k),
            None => c.add(
                format!("{key}.host_key"),
                format!("{:?} is not an SSH public key", raw.chars().take(40).collect::<String>()),
                "paste the target's /etc/ssh/ssh_host_ed25519_key.pub (type and base64)",
            ),
        }
    }
    let mut allow = SshChannels::default();
    for what in t.allow.unwrap_or_else(|| vec!["shell".into(), "exec".into(), "sftp".into()]) {
        match what.as_str() {
            "shell" => allow.shell = true,
            "exec" => allow.exec = true,
            "sftp" => allow.sftp = true,
            "forward" => allow.forward = true,
            other => c.add(
                format!("{key}.allow"),
                format!("{other:?} is not something a session does"),
                "list any of \"shell\", \"exec\", \"sftp\", \"forward\"",
            ),
        }
    }
    Some(SshTarget {
        title: t.title.unwrap_or_else(|| name.clone()),
        description: t.description.unwrap_or_default(),
        name,
        address: address?,
        access: access?,
        mfa: mfa?,
        principals,
        group_principals,
        host_keys,
        record: t.record.unwrap_or(true),
        allow,
    })
}

/// `[mitigate]`.
fn mitigate(c: &mut Collector, f: file::Mitigate, base: &Path) -> Mitigate {
    let public_key = match (f.require_signature.unwrap_or(false), f.public_key.as_deref()) {
        (false, None) => None,
        (false, Some(_)) => {
            c.add(
                "mitigate.public_key",
                "is set but require_signature is not",
                "set require_signature = true, or remove the key",
            );
            None
        }
        (true, None) => {
            c.add(
                "mitigate.public_key",
                "missing",
                "require_signature needs the publisher's key (poort rules keygen prints it)",
            );
            None
        }
        (true, Some(k)) => ed25519_key(c, "mitigate.public_key", k),
    };
    let feed = feed(c, &f, base);
    let mitigate = Mitigate {
        rules_file: f.rules_file.as_deref().map(|p| at(base, p)),
        public_key,
        lockdown: f.lockdown.unwrap_or(false),
        admin_group: f.admin_group.unwrap_or_else(|| "admins".into()),
        feed,
    };
    if f.require_signature == Some(true) && mitigate.rules_file.is_none() {
        c.add("mitigate.rules_file", "missing", "require_signature applies to a rules file: name it");
    }
    mitigate
}

/// A base64 Ed25519 public key, as `poort rules keygen` prints it.
fn ed25519_key(c: &mut Collector, path: &str, raw: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    match base64::engine::general_purpose::STANDARD.decode(raw.trim()) {
        Ok(b) if b.len() == 32 => Some(b),
        _ => {
            c.add(path, "is not a base64 Ed25519 public key", "paste what poort rules keygen printed");
            None
        }
    }
}

/// `[mitigate] feed` and the settings that go with it.
fn feed(c: &mut Collector, f: &file::Mitigate, base: &Path) -> Option<crate::config::Feed> {
    let Some(url) = f.feed.as_deref() else {
        for (key, set) in [
            ("feed_public_key", f.feed_public_key.is_some()),
            ("feed_interval", f.feed_interval.is_some()),
            ("feed_ca_file", f.feed_ca_file.is_some()),
        ] {
            if set {
                c.add(format!("mitigate.{key}"), "is set but feed is not", "name the feed's URL in feed, or remove it");
            }
        }
        return None;
    };
    let parsed = url.parse::<http::Uri>().ok().filter(|u| u.scheme_str() == Some("https") && u.host().is_some());
    if parsed.is_none() {
        c.add(
            "mitigate.feed",
            format!("{url:?} is not an https URL"),
            "feed = \"https://rules.example.org/poort.feed\"",
        );
    }
    let public_key = match f.feed_public_key.as_deref() {
        Some(k) => ed25519_key(c, "mitigate.feed_public_key", k),
        None => {
            c.add(
                "mitigate.feed_public_key",
                "missing",
                "a feed is taken only with the publisher's signature: paste the key poort rules keygen printed",
            );
            None
        }
    };
    let interval = c.duration("mitigate.feed_interval", &f.feed_interval, Duration::from_secs(60));
    if interval < Duration::from_secs(1) || interval > Duration::from_secs(24 * 3600) {
        c.add("mitigate.feed_interval", "must be between 1 s and 24 h", "feed_interval = \"60s\"");
    }
    let trust = match &f.feed_ca_file {
        Some(p) => Trust::CaFile(at(base, p)),
        None => Trust::SystemRoots,
    };
    Some(crate::config::Feed { url: parsed?.to_string(), public_key: public_key?, interval, trust })
}

/// `http(s)://host[:port]`, lower case, as a browser sends it in `Origin`.
fn web_origin(raw: &str) -> Option<String> {
    let rest = raw.strip_prefix("https://").or_else(|| raw.strip_prefix("http://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    crate::request::parse_host(rest.as_bytes()).ok()?;
    Some(raw.trim_end_matches('/').to_ascii_lowercase())
}

/// `https://host[:port]` with an optional trailing slash and nothing else.
fn external_origin(raw: &str) -> Option<(String, String)> {
    let rest = raw.strip_prefix("https://")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let host = crate::request::parse_host(rest.as_bytes()).ok()?;
    Some((format!("https://{}", rest.to_ascii_lowercase()), host))
}

fn resolve_app(
    c: &mut Collector,
    i: usize,
    mut app: file::App,
    base: &Path,
    portal_host: &str,
    mfa_default: bool,
) -> Option<App> {
    let name = c.name(
        "app",
        i,
        app.name.take(),
        "is not a valid app name",
        "every app needs a name, for example name = \"wiki\"",
    );
    let key = format!("app[{name}]");
    let upstream = match app.upstream.as_deref() {
        None if app.forward_auth == Some(true) => Some(Upstream::ForwardAuth),
        Some(_) if app.forward_auth == Some(true) => {
            c.add(
                format!("{key}.upstream"),
                "is set, but the app is served by a proxy that asks poort (forward_auth = true)",
                "remove upstream, or forward_auth to have poort proxy the app itself",
            );
            None
        }
        None => {
            c.add(format!("{key}.upstream"), "missing", "for example upstream = \"http://10.0.0.5:8080\"");
            None
        }
        Some("builtin:whoami") => Some(Upstream::Whoami),
        Some(raw) => match parse_upstream(raw) {
            Ok((https, authority, address, base_path)) => {
                let tls = upstream_tls(c, &key, &app, base, https, &authority);
                // The name the app's certificate holds is also the Host it serves.
                let authority = match (&app.upstream_server_name, authority.rfind(':')) {
                    (Some(name), Some(i)) if https && !authority.ends_with(']') => format!("{name}{}", &authority[i..]),
                    (Some(name), _) if https => name.clone(),
                    _ => authority,
                };
                // An https upstream whose TLS settings are wrong is reported above.
                let pool = if https { format!("https://{address}/ for {name}") } else { address.clone() };
                (tls.is_some() == https).then(|| Upstream::Http { authority, address, base_path, tls, pool })
            }
            Err(hint) => {
                c.add(format!("{key}.upstream"), format!("{raw:?} is not an http or https URL"), hint);
                None
            }
        },
    };
    if app.upstream.as_deref() == Some("builtin:whoami") {
        upstream_tls(c, &key, &app, base, false, "");
    }
    let route = match (app.host, app.path) {
        (Some(h), None) => match crate::request::parse_host(h.as_bytes()) {
            Ok(host) if host == portal_host => {
                c.add(
                    format!("{key}.host"),
                    "is the portal's own host",
                    "route the app by path on the portal host, or give it its own host",
                );
                None
            }
            Ok(host) if !h.contains(':') => Some(Route::Host(host)),
            _ => {
                c.add(
                    format!("{key}.host"),
                    format!("{h:?} is not a host name"),
                    "for example host = \"wiki.example.com\", without scheme or port",
                );
                None
            }
        },
        (None, Some(p)) => match crate::request::Target::parse(&p) {
            Ok(t) if t.query().is_none() && p.len() > 1 && !p.starts_with("/.poort") => {
                let mut prefix = t.path().to_string();
                if !prefix.ends_with('/') {
                    prefix.push('/');
                }
                Some(Route::Path { prefix, strip: app.strip_prefix.unwrap_or(false) })
            }
            _ => {
                c.add(
                    format!("{key}.path"),
                    format!("{p:?} is not a usable path prefix"),
                    "a canonical path other than / and /.poort, for example path = \"/wiki/\"",
                );
                None
            }
        },
        (Some(_), Some(_)) => {
            c.add(format!("{key}.host"), "host and path are both set", "route an app by host or by path, not both");
            None
        }
        (None, None) => {
            c.add(
                format!("{key}.host"),
                "neither host nor path is set",
                "add host = \"wiki.example.com\" or path = \"/wiki/\"",
            );
            None
        }
    };
    if app.forward_auth == Some(true) && matches!(route, Some(Route::Path { .. })) {
        c.add(
            format!("{key}.forward_auth"),
            "needs an app on a host of its own",
            "set host = \"app.example.com\" (the host the proxy in front serves)",
        );
    }
    if app.strip_prefix.is_some() && matches!(route, Some(Route::Host(_))) {
        c.add(format!("{key}.strip_prefix"), "only applies to path-routed apps", "remove it, or route the app by path");
    }
    let access = match app.access {
        None => {
            c.add(format!("{key}.access"), "missing", "state it: \"authenticated\", \"public\" or { rules = [...] }");
            None
        }
        Some(v) => resolve_access(c, &key, v),
    };
    let mfa = c.mfa(&key, app.mfa.as_deref(), mfa_default);
    // A public app asks no one to sign in; a second factor written on it would be ignored.
    if app.mfa.as_deref() == Some("required") && matches!(access, Some(Access::Public)) {
        c.add(
            format!("{key}.mfa"),
            "\"required\" on a public app, which nobody signs in to",
            "use access = \"authenticated\" (or rules) with it, or remove mfa",
        );
    }
    let mut forward_headers = Vec::new();
    for h in app.forward_headers.unwrap_or_default() {
        match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(_) if crate::request::headers::never_forwarded(&h) => c.add(
                format!("{key}.forward_headers"),
                format!("{h:?} is a framing, connection or identity header"),
                "poort sets or removes it itself; forward only the app's own headers",
            ),
            Ok(name) => forward_headers.push(name),
            Err(_) => c.add(
                format!("{key}.forward_headers"),
                format!("{h:?} is not a header name"),
                "for example \"X-Api-Key\"",
            ),
        }
    }
    let mut websocket_origins = Vec::new();
    for o in app.websocket_origins.unwrap_or_default() {
        match web_origin(&o) {
            Some(o) => websocket_origins.push(o),
            None => c.add(
                format!("{key}.websocket_origins"),
                format!("{o:?} is not an origin"),
                "scheme, host and port only, for example \"https://tools.example.com\"",
            ),
        }
    }
    Some(App {
        forward_headers,
        websocket_origins,
        preserve_host: app.preserve_host.unwrap_or(false),
        rewrite_paths: app.rewrite_paths.unwrap_or(false),
        mfa: mfa?,
        title: app.title.unwrap_or_else(|| name.clone()),
        description: app.description.unwrap_or_default(),
        name,
        upstream: upstream?,
        route: route?,
        access: access?,
    })
}

/// A `host:port` key (`path`), lower-cased; `example` shows the key with a value.
fn host_port(c: &mut Collector, path: &str, raw: Option<&str>, example: &str) -> Option<String> {
    match raw {
        Some(raw) if valid_target(raw) => Some(raw.to_ascii_lowercase()),
        Some(raw) => {
            c.add(path, format!("{raw:?} is not host:port"), format!("for example {example}"));
            None
        }
        None => {
            c.add(path, "missing", format!("for example {example}"));
            None
        }
    }
}

/// The `access` of a tunnel or an SSH target (`what`): required, and never public.
fn signed_in_access(c: &mut Collector, key: &str, raw: Option<toml::Value>, what: &str) -> Option<Access> {
    let access = match raw {
        None => {
            c.add(format!("{key}.access"), "missing", "state it: \"authenticated\" or { rules = [...] }");
            None
        }
        Some(v) => resolve_access(c, key, v),
    };
    if access == Some(Access::Public) {
        c.add(
            format!("{key}.access"),
            format!("{what} cannot be public"),
            "use \"authenticated\" or { rules = [...] }",
        );
        return None;
    }
    access
}

fn resolve_tunnel(c: &mut Collector, i: usize, t: file::Tunnel, mfa_default: bool) -> Option<Tunnel> {
    let name =
        c.name("tunnel", i, t.name, "is not a valid name", "every tunnel needs a name, for example name = \"db\"");
    let key = format!("tunnel[{name}]");
    let target = host_port(c, &format!("{key}.target"), t.target.as_deref(), "target = \"10.0.0.9:5432\"");
    let access = signed_in_access(c, &key, t.access, "a tunnel");
    let mfa = c.mfa(&key, t.mfa.as_deref(), mfa_default);
    Some(Tunnel {
        title: t.title.unwrap_or_else(|| name.clone()),
        description: t.description.unwrap_or_default(),
        name,
        target: target?,
        access: access?,
        mfa: mfa?,
    })
}

/// `host:port` with a DNS name, IPv4 or bracketed IPv6 host and a port from 1 to 65535.
fn valid_target(raw: &str) -> bool {
    let Some(i) = raw.rfind(':') else { return false };
    let (host, port) = (&raw[..i], &raw[i + 1..]);
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0) && port.bytes().all(|b| b.is_ascii_digit());
    port_ok && !host.is_empty() && crate::request::parse_host(host.as_bytes()).is_ok()
}

/// How poort speaks TLS to an `https://` app, from the app's `upstream_*` keys; None for
/// a plain one (where those keys are refused) or when a key is wrong (reported).
fn upstream_tls(
    c: &mut Collector,
    key: &str,
    app: &file::App,
    base: &Path,
    https: bool,
    authority: &str,
) -> Option<Arc<UpstreamTls>> {
    use crate::tls_client::{ClientCert, parse_fingerprint, server_name};
    let set: Vec<&str> = [
        ("upstream_ca_file", app.upstream_ca_file.is_some()),
        ("upstream_fingerprint", app.upstream_fingerprint.is_some()),
        ("upstream_server_name", app.upstream_server_name.is_some()),
        ("upstream_client_cert", app.upstream_client_cert.is_some()),
        ("upstream_client_key", app.upstream_client_key.is_some()),
        ("insecure_skip_verify", app.insecure_skip_verify.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, on)| on.then_some(k))
    .collect();
    if !https {
        for k in set {
            c.add(
                format!("{key}.{k}"),
                "only applies to an https:// upstream",
                "remove it, or reach the app over https",
            );
        }
        return None;
    }
    let mut ok = true;
    let skip = app.insecure_skip_verify.unwrap_or(false);
    let ways = [app.upstream_ca_file.is_some(), app.upstream_fingerprint.is_some(), skip];
    if ways.iter().filter(|w| **w).count() > 1 {
        c.add(
            format!("{key}.upstream_ca_file"),
            "upstream_ca_file, upstream_fingerprint and insecure_skip_verify each say how to trust the app's certificate",
            "choose one of them",
        );
        ok = false;
    }
    let trust = if skip {
        Trust::Anything
    } else if let Some(fp) = &app.upstream_fingerprint {
        match parse_fingerprint(fp) {
            Ok(d) => Trust::Pinned(d),
            Err(e) => {
                c.add(
                    format!("{key}.upstream_fingerprint"),
                    format!("{e}"),
                    "openssl x509 -in app.pem -noout -fingerprint -sha256 prints it",
                );
                ok = false;
                Trust::Anything
            }
        }
    } else if let Some(p) = &app.upstream_ca_file {
        Trust::CaFile(at(base, p))
    } else {
        Trust::SystemRoots
    };
    let client_cert = match (&app.upstream_client_cert, &app.upstream_client_key) {
        (Some(cert), Some(k)) => Some(ClientCert { cert: at(base, cert), key: at(base, k) }),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            c.add(
                format!("{key}.upstream_client_cert"),
                "a client certificate needs its key, and a key its certificate",
                "set both upstream_client_cert and upstream_client_key, or neither",
            );
            ok = false;
            None
        }
    };
    let host = app.upstream_server_name.as_deref().unwrap_or_else(|| host_of(authority));
    let name = match server_name(host) {
        Ok(n) => n,
        Err(e) => {
            c.add(format!("{key}.upstream_server_name"), format!("{e}"), "the name in the app's certificate");
            return None;
        }
    };
    if !ok {
        return None;
    }
    match UpstreamTls::new(trust, client_cert, name) {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            let which = if app.upstream_client_cert.is_some() && format!("{e:#}").contains("client") {
                "upstream_client_cert"
            } else if app.upstream_ca_file.is_some() {
                "upstream_ca_file"
            } else {
                "upstream"
            };
            c.add(format!("{key}.{which}"), format!("{e:#}"), "check the file's path and that it is PEM");
            None
        }
    }
}

/// The host of `host[:port]`, brackets kept for IPv6.
fn host_of(authority: &str) -> &str {
    match authority.rfind(':') {
        Some(i) if !authority.ends_with(']') => &authority[..i],
        _ => authority,
    }
}

/// `http[s]://authority[/base]` to (https, authority as written, `host:port` to connect to,
/// base path).
fn parse_upstream(raw: &str) -> Result<(bool, String, String, String), &'static str> {
    let (https, rest) = match (raw.strip_prefix("https://"), raw.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        _ => return Err("write http://HOST:PORT or https://HOST:PORT, optionally with a base path"),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') || crate::request::parse_host(authority.as_bytes()).is_err() {
        return Err("write http://HOST:PORT with a plain host name or address");
    }
    let base_path = path.trim_end_matches('/');
    if !base_path.is_empty() && crate::request::Target::parse(base_path).map(|t| t.query().is_some()).unwrap_or(true) {
        return Err("the base path must be a plain canonical path without a query");
    }
    let address = if host_of(authority) == authority {
        format!("{authority}:{}", if https { 443 } else { 80 })
    } else {
        authority.to_string()
    };
    Ok((https, authority.to_string(), address, base_path.to_string()))
}

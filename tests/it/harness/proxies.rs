//! Real proxies on loopback: nginx, as an app behind poort (an HTTPS upstream) or as a proxy in
//! front of it (forward-auth), and Caddy in front of it; and a test CA to issue the
//! certificates such servers need.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Reaped, TempDir};

/// One nginx process (no master, no daemon: it dies with the test).
pub struct Nginx {
    pub dir: TempDir,
    _process: Reaped,
}

impl Nginx {
    /// Starts nginx in `dir` (where the caller may have put certificates) with `http` as the
    /// body of its `http { }` block; `{dir}` in it names that folder. Waits until `port`
    /// accepts connections.
    pub fn start_in(dir: TempDir, http: &str, port: u16) -> Nginx {
        let d = dir.0.display().to_string();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{}\n}}\n",
            http.replace("{dir}", &d)
        );
        std::fs::write(dir.0.join("nginx.conf"), conf).unwrap();
        let child = Command::new(nginx_binary())
            .args(["-e", &format!("{d}/error.log"), "-p", &d, "-c"])
            .arg(dir.0.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is installed (scripts/test installs nginx-light)");
        let process = Reaped(child);
        wait_for_port_or(port, &dir.0);
        Nginx { dir, _process: process }
    }

    /// The lines nginx logged for requests so far.
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.0.join("access.log")).unwrap_or_default().lines().map(String::from).collect()
    }
}

/// One Caddy process, with its admin endpoint off and its state in its own folder.
pub struct Caddy {
    _dir: TempDir,
    _process: Reaped,
}

impl Caddy {
    /// Starts Caddy with `caddyfile` (after a global block that turns off the admin endpoint
    /// and automatic HTTPS). Waits until `port` accepts connections.
    pub fn start(caddyfile: &str, port: u16) -> Caddy {
        let dir = TempDir::new();
        let d = &dir.0;
        let text = format!("{{\n  admin off\n  auto_https off\n}}\n{caddyfile}");
        std::fs::write(d.join("Caddyfile"), text).unwrap();
        let log = std::fs::File::create(d.join("caddy.log")).unwrap();
        let child = Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(d.join("Caddyfile"))
            .env("XDG_DATA_HOME", d)
            .env("XDG_CONFIG_HOME", d)
            .env("HOME", d)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("caddy is installed (scripts/test installs it)");
        let process = Reaped(child);
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                panic!("caddy did not start: {}", std::fs::read_to_string(d.join("caddy.log")).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Caddy { _dir: dir, _process: process }
    }
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"].iter().map(PathBuf::from).find(|p| p.exists()).unwrap_or("nginx".into())
}

fn wait_for_port_or(port: u16, dir: &std::path::Path) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            panic!("nginx did not start: {log}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A certificate authority for one test: issues server and client certificates.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Issued {
    /// The SHA-256 of the certificate, as hex.
    pub fn fingerprint(&self) -> String {
        poort::secret::hex(&poort::secret::sha256(&self.der))
    }
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        TestCa { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses), with `common_name` as subject.
    pub fn issue(&self, names: &[&str], common_name: &str) -> Issued {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }
}

//! The gateway under test: started on a loopback port with a test clock, driven as a browser
//! and as the command line drive it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use poort::clock::{Clock, ManualClock};
use poort::identity::totp;
use poort::server::Running;
use poort::store::Store;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::*;

pub struct Gate {
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub clock: ManualClock,
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub redirect_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub upstream: Upstream,
    pub sink: Sink,
    pub cert_der: Vec<u8>,
    tls: TlsConnector,
    /// More nodes on the same config and database (a cluster); with any, each new
    /// connection goes to the next node in turn, `addr` included.
    pub others: Vec<Running>,
    /// The addresses connections go to in turn (empty: `addr` alone).
    pub nodes: std::sync::Mutex<Vec<SocketAddr>>,
    turn: std::sync::atomic::AtomicUsize,
    database: poort::store::Database,
}

/// The apps every test gateway has. `{up}` and friends are filled in by `Gate::start`.
const APPS: &str = r#"
[[app]]
name = "app"
upstream = "http://{up}"
path = "/app/"
strip_prefix = true
access = "authenticated"

[[app]]
name = "staff"
title = "Staff only"
upstream = "http://{up}"
path = "/staff/"
access = { rules = [{ effect = "allow", groups = ["staff"] }] }

[[app]]
name = "vault"
title = "Vault"
upstream = "http://{up}"
path = "/vault/"
access = "authenticated"
mfa = "required"

[[app]]
name = "pub"
upstream = "http://{up}"
path = "/pub/"
access = "public"

[[app]]
name = "ws"
upstream = "http://{ws}"
path = "/ws/"
access = "authenticated"

[[app]]
name = "git"
upstream = "http://{up}"
host = "git.localhost"
access = "authenticated"

[[app]]
name = "down"
upstream = "http://127.0.0.1:{closed}"
path = "/down/"
access = "authenticated"

[[app]]
name = "slow"
upstream = "http://{silent}"
path = "/slow/"
access = "authenticated"
"#;

impl Gate {
    /// Starts a gateway with the standard apps and users `alice` (group staff) and `bob`.
    pub async fn start() -> Gate {
        Gate::start_with("").await
    }

    /// As `start`, with extra lines for the `[server]` table.
    pub async fn start_with(server_extra: &str) -> Gate {
        Gate::start_config(server_extra, "").await
    }

    /// As `start`, with extra `[server]` lines and extra tables at the end of the config.
    pub async fn start_config(server_extra: &str, tables: &str) -> Gate {
        Gate::start_full(server_extra, "", tables).await
    }

    /// As `start_config`, with extra lines for the `[proxy]` table too.
    pub async fn start_full(server_extra: &str, proxy_extra: &str, tables: &str) -> Gate {
        Gate::start_store(server_extra, proxy_extra, tables, "").await
    }

    /// As `start`, on the database at `url` (PostgreSQL) instead of a SQLite file.
    pub async fn start_on(url: &str) -> Gate {
        Gate::start_on_with(url, "").await
    }

    /// As `start_on`, with extra tables at the end of the config.
    pub async fn start_on_with(url: &str, tables: &str) -> Gate {
        Gate::start_store("", "", tables, &format!("database_url = \"{url}\"")).await
    }

    /// As `start_full`, with extra lines for the `[store]` table.
    pub async fn start_store(server_extra: &str, proxy_extra: &str, tables: &str, store_extra: &str) -> Gate {
        let dir = TempDir::new();
        // Short, so that tests of an app that never answers finish soon; a test may set its own.
        let proxy_extra = if proxy_extra.contains("response_timeout") {
            proxy_extra.to_string()
        } else {
            format!("response_timeout = \"2s\"\n{proxy_extra}")
        };
        let names = ["localhost", "git.localhost", "fwd.localhost", "jupyter.localhost", "django.localhost"];
        let ck = rcgen::generate_simple_self_signed(names.map(String::from).to_vec()).unwrap();
        std::fs::write(dir.0.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.0.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
        let upstream = Upstream::start().await;
        let sink = Sink::start().await;
        let closed = closed_port();
        let apps = APPS
            .replace("{up}", &upstream.addr.to_string())
            .replace("{ws}", &ws_echo().await.to_string())
            .replace("{silent}", &silent().await.to_string())
            .replace("{closed}", &closed_port().to_string());
        let sink_addr = sink.addr;
        // Extra tables may name the recording upstream as `{up}` too.
        let tables = tables.replace("{up}", &upstream.addr.to_string());
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
redirect_listen = "127.0.0.1:0"
external_url = "{ORIGIN}"
{server_extra}
[store]
data_dir = "."
{store_extra}
[tls]
cert_file = "cert.pem"
key_file = "key.pem"
[admin]
listen = "127.0.0.1:0"
[proxy]
{proxy_extra}
{apps}
[[tunnel]]
name = "sink"
title = "Checksum service"
target = "{sink_addr}"
access = "authenticated"

[[tunnel]]
name = "ops"
target = "{sink_addr}"
access = {{ rules = [{{ effect = "allow", groups = ["ops"] }}] }}

[[tunnel]]
name = "nowhere"
target = "127.0.0.1:{closed}"
access = "authenticated"
{tables}"#
        );
        let config_path = dir.0.join("poort.toml");
        std::fs::write(&config_path, config).unwrap();
        let cfg = poort::config::load(&config_path).unwrap();
        let store = Store::open(&cfg.database).unwrap();
        let now = poort::clock::SystemClock.now();
        let hash = poort::identity::password::hash(PASSWORD).unwrap();
        store.add_user("alice", Some("alice@example.com"), &hash, &["staff".into()], now).unwrap();
        store.add_user("bob", None, &hash, &[], now).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let clock = ManualClock::new(now);
        let mut gate = Gate {
            dir,
            config_path,
            clock,
            running: None,
            addr: "127.0.0.1:1".parse().unwrap(),
            redirect_addr: "127.0.0.1:1".parse().unwrap(),
            admin_addr: "127.0.0.1:1".parse().unwrap(),
            upstream,
            sink,
            cert_der: ck.cert.der().to_vec(),
            tls: TlsConnector::from(Arc::new(tls)),
            others: Vec::new(),
            nodes: std::sync::Mutex::new(Vec::new()),
            turn: std::sync::atomic::AtomicUsize::new(0),
            database: cfg.database.clone(),
        };
        gate.boot().await;
        gate
    }

    /// Starts (or restarts) the gateway process part on the same data directory.
    pub async fn boot(&mut self) {
        let cfg = poort::config::load(&self.config_path).unwrap();
        let running = poort::server::start(cfg, Arc::new(self.clock.clone())).await.unwrap();
        self.addr = running.addr;
        self.redirect_addr = running.redirect_addr.unwrap();
        self.admin_addr = running.admin_addr.unwrap();
        self.running = Some(running);
    }

    /// Starts one more node on this gateway's config (and so its database); from now on
    /// connections alternate between the nodes. Returns its address.
    pub async fn add_node(&mut self) -> SocketAddr {
        let cfg = poort::config::load(&self.config_path).unwrap();
        let running = poort::server::start(cfg, Arc::new(self.clock.clone())).await.unwrap();
        let addr = running.addr;
        self.others.push(running);
        let mut nodes = self.nodes.lock().unwrap();
        if nodes.is_empty() {
            nodes.push(self.addr);
        }
        nodes.push(addr);
        addr
    }

    /// The address the next connection goes to: the nodes in turn.
    pub fn next_node(&self) -> SocketAddr {
        let nodes = self.nodes.lock().unwrap();
        if nodes.is_empty() {
            return self.addr;
        }
        nodes[self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % nodes.len()]
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        for r in self.others.drain(..) {
            r.stop().await;
        }
        // A gateway booted again is one node.
        self.nodes.lock().unwrap().clear();
    }

    /// Runs the gateway as a process of its own (the `poort` binary on the same config and
    /// data, with `extra` appended to the config), so that its memory and log can be read; its
    /// standard error goes to `poort.log` in the data folder. Returns it and its process id.
    pub async fn as_process(&mut self, extra: &str) -> (Reaped, u32) {
        self.stop().await;
        let port = closed_port();
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let text = text.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""), 1);
        std::fs::write(&self.config_path, format!("{text}\n{extra}")).unwrap();
        let log = std::fs::File::create(self.dir.0.join("poort.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_poort"))
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        let process = Reaped(child);
        wait_for_port(port, "poort", Duration::from_secs(20));
        self.addr = format!("127.0.0.1:{port}").parse().unwrap();
        (process, pid)
    }

    /// The metrics as Prometheus reads them from the admin listener.
    pub async fn scrape(&self) -> String {
        admin(self.admin_addr, "GET", "/metrics").await.text()
    }

    /// Rewrites the config file with `edit` (the running gateway is not told).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let new = edit(text.clone());
        assert_ne!(new, text, "the edit changed nothing");
        std::fs::write(&self.config_path, new).unwrap();
    }

    /// Has the running gateway read its config file again, as `poort reload` does.
    pub async fn reload(&self) -> Result<poort::server::Reloaded, String> {
        self.running.as_ref().expect("the gateway runs in this process").reload().await
    }

    /// What the gateway run by `as_process` has logged.
    pub fn process_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("poort.log")).unwrap_or_default()
    }

    /// The database of this gateway's config (as it started).
    pub fn db(&self) -> poort::store::Database {
        self.database.clone()
    }

    pub fn store(&self) -> Store {
        Store::open(self.db()).unwrap()
    }

    /// Opens a TLS connection to the gateway.
    pub async fn connect(&self, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
        self.try_connect(alpn).await.unwrap()
    }

    /// Opens a TLS connection to the gateway; an error if the handshake fails.
    pub async fn try_connect(&self, alpn: &[&[u8]]) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.next_node()).await?;
        let mut cfg = (**self.tls.config()).clone();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("localhost").unwrap(), tcp).await
    }

    /// Sends exact bytes and reads the response until the gateway closes the connection.
    pub async fn raw(&self, bytes: &[u8]) -> Resp {
        self.raw_to("localhost", bytes).await
    }

    /// As `raw`, on a connection whose TLS handshake names `sni`.
    pub async fn raw_to(&self, sni: &str, bytes: &[u8]) -> Resp {
        let mut tls = self
            .tls
            .connect(
                ServerName::try_from(sni.to_string()).unwrap(),
                TcpStream::connect(self.next_node()).await.unwrap(),
            )
            .await
            .unwrap();
        tls.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
            .await
            .expect("the gateway answered in time")
            .ok();
        parse_response(&out)
    }

    /// Sends hostile bytes; returns the status (None: closed without an answer) and how many
    /// requests the upstream received meanwhile.
    pub async fn hostile(&self, bytes: &[u8]) -> (Option<u16>, usize) {
        let before = self.upstream.hits();
        let tcp = TcpStream::connect(self.next_node()).await.unwrap();
        let mut tls = self.tls.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        let _ = tls.write_all(bytes).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
        let status = std::str::from_utf8(&out)
            .ok()
            .and_then(|t| t.strip_prefix("HTTP/1.1 "))
            .and_then(|t| t.get(..3))
            .and_then(|c| c.parse().ok());
        (status, self.upstream.hits() - before)
    }

    /// A request with `Host: localhost` and `Connection: close` plus `headers`, on a connection
    /// to the host it names (as a browser makes it).
    pub async fn request(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let (sni, bytes) = Gate::request_bytes(method, target, headers, body);
        self.raw_to(&sni, &bytes).await
    }

    /// As `request`; None when the connection fails or closes without a whole answer (a node
    /// that was killed).
    pub async fn try_request(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Option<Resp> {
        let (sni, bytes) = Gate::request_bytes(method, target, headers, body);
        let mut tls = self.try_connect_to(&sni, &[b"http/1.1"]).await.ok()?;
        tls.write_all(&bytes).await.ok()?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await.ok()?.ok();
        out.windows(4).any(|w| w == b"\r\n\r\n").then(|| parse_response(&out))
    }

    pub fn request_bytes(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> (String, Vec<u8>) {
        let host = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("host")).map_or("localhost", |(_, v)| *v);
        let sni = host.split(':').next().unwrap_or(host);
        let sni = if sni.parse::<std::net::IpAddr>().is_ok() || sni.is_empty() { "localhost" } else { sni };
        let mut req = format!("{method} {target} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str("Host: localhost\r\n");
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("Connection: close\r\n\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        (sni.to_string(), bytes)
    }

    pub async fn get(&self, target: &str, session: Option<&str>) -> Resp {
        let cookie = session.map(|s| format!("__Host-poort={s}"));
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("Cookie", c.as_str())).collect();
        self.request("GET", target, &headers, b"").await
    }

    /// Fetches the login form: (csrf cookie, csrf field).
    pub async fn login_form(&self) -> (String, String) {
        let page = self.get("/.poort/login", None).await;
        assert_eq!(page.status, 200);
        let cookie = page.cookie("__Host-poort-csrf").expect("the login page sets the csrf cookie");
        let text = page.text();
        let field = text.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
        (cookie, field)
    }

    /// Posts a form as a browser on the portal would.
    pub async fn post_form(
        &self,
        path: &str,
        csrf_cookie: &str,
        session: Option<&str>,
        fields: &[(&str, &str)],
    ) -> Resp {
        // A form a person submits on a portal page: the browser adds fetch metadata and the
        // page's address.
        let referer = format!("{ORIGIN}{}", path.split('?').next().unwrap_or(path));
        let person = [
            ("Sec-Fetch-Site", "same-origin"),
            ("Sec-Fetch-Mode", "navigate"),
            ("Sec-Fetch-User", "?1"),
            ("Sec-Fetch-Dest", "document"),
            ("Referer", referer.as_str()),
        ];
        self.post_form_from(path, csrf_cookie, session, fields, &person).await
    }

    /// Posts a form with the portal's cookies and Origin, and `metadata` as the only fetch
    /// metadata and Referer: how a script, or a page other than the form's, would send it.
    pub async fn post_form_from(
        &self,
        path: &str,
        csrf_cookie: &str,
        session: Option<&str>,
        fields: &[(&str, &str)],
        metadata: &[(&str, &str)],
    ) -> Resp {
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish();
        let mut cookie = format!("__Host-poort-csrf={csrf_cookie}");
        if let Some(s) = session {
            cookie.push_str(&format!("; __Host-poort={s}"));
        }
        let mut headers = vec![
            ("Origin", ORIGIN),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Cookie", cookie.as_str()),
        ];
        headers.extend_from_slice(metadata);
        self.request("POST", path, &headers, body.as_bytes()).await
    }

    /// Submits the login form; returns the response.
    pub async fn try_login(&self, user: &str, password: &str, next: &str) -> Resp {
        let (cookie, field) = self.login_form().await;
        self.post_form(
            "/.poort/login",
            &cookie,
            None,
            &[("username", user), ("password", password), ("csrf", &field), ("next", next)],
        )
        .await
    }

    /// Logs in and returns the session cookie value.
    pub async fn login(&self, user: &str) -> String {
        let r = self.try_login(user, PASSWORD, "").await;
        assert_eq!(r.status, 303, "login failed: {}", r.text());
        r.cookie("__Host-poort").expect("login sets the session cookie")
    }

    /// Posts a form on the portal with a fresh CSRF pair and a session.
    pub async fn post(&self, path: &str, session: &str, fields: &[(&str, &str)]) -> Resp {
        let (csrf, field) = self.login_form().await;
        let mut all: Vec<(&str, &str)> = vec![("csrf", field.as_str())];
        all.extend_from_slice(fields);
        self.post_form(path, &csrf, Some(session), &all).await
    }

    /// Posts JSON as the portal's script does (Origin, CSRF header and cookie).
    pub async fn post_json(&self, path: &str, session: Option<&str>, body: &serde_json::Value) -> Resp {
        let (csrf, _) = self.login_form().await;
        let mut cookie = format!("__Host-poort-csrf={csrf}");
        if let Some(s) = session {
            cookie.push_str(&format!("; __Host-poort={s}"));
        }
        let headers = [
            ("Origin", ORIGIN),
            ("Content-Type", "application/json"),
            ("X-Poort-CSRF", csrf.as_str()),
            ("Cookie", cookie.as_str()),
            ("Sec-Fetch-Site", "same-origin"),
            ("Sec-Fetch-Mode", "cors"),
            ("Sec-Fetch-Dest", "empty"),
        ];
        self.request("POST", path, &headers, body.to_string().as_bytes()).await
    }

    /// Proves who the user of `session` is on the confirm page with `fields` (a `password`
    /// for a user without a second factor, else a `code` or `recovery`); returns the renewed
    /// session.
    pub async fn confirm(&self, session: &str, fields: &[(&str, &str)]) -> String {
        let r = self.post("/.poort/confirm", session, fields).await;
        assert_eq!(r.status, 303, "confirming failed: {}", r.text());
        r.cookie("__Host-poort").expect("confirming renews the session")
    }

    /// A command-line session for `user` (who has no second factor), made as `poort login`
    /// and a person in the browser make it: code, approval page, password, approve, token.
    pub async fn cli_session(&self, user: &str) -> String {
        self.cli_session_and_browser(user).await.0
    }

    /// As `cli_session`; also returns the browser session that approved it.
    pub async fn cli_session_and_browser(&self, user: &str) -> (String, String) {
        let browser = self.login(user).await;
        self.approve_cli(&browser).await
    }

    /// `poort login` approved by the browser session `browser` (of a user without a second
    /// factor); returns the command line's token and the browser's renewed session.
    pub async fn approve_cli(&self, browser: &str) -> (String, String) {
        let cli = [("X-Poort-Client", "cli"), ("Content-Type", "application/json")];
        let code = self.request("POST", "/.poort/device/code", &cli, b"{}").await;
        assert_eq!(code.status, 200, "{}", code.text());
        let code: serde_json::Value = serde_json::from_slice(&code.body).unwrap();
        let (user_code, device_code) = (code["user_code"].as_str().unwrap(), code["device_code"].as_str().unwrap());
        let browser = self.approve_code(browser, user_code).await;
        let body = serde_json::json!({ "device_code": device_code }).to_string();
        let t = self.request("POST", "/.poort/device/token", &cli, body.as_bytes()).await;
        assert_eq!(t.status, 200, "{}", t.text());
        let t: serde_json::Value = serde_json::from_slice(&t.body).unwrap();
        (t["token"].as_str().unwrap().to_string(), browser)
    }

    /// Approves the device code `user_code` in the browser session `browser`, with the
    /// password given for it; returns the browser's session after that proof.
    pub async fn approve_code(&self, browser: &str, user_code: &str) -> String {
        assert_eq!(self.get(&format!("/.poort/device?code={user_code}"), Some(browser)).await.status, 200);
        let browser = self.confirm(browser, &[("password", PASSWORD), ("device", user_code)]).await;
        let r = self.post("/.poort/device", &browser, &[("code", user_code), ("decision", "approve")]).await;
        assert!(r.text().contains("Go back to your terminal"), "{}", r.text());
        browser
    }

    /// Opens a WebSocket to `path` on the gateway with `headers`; the handshake's answer status
    /// on refusal.
    pub async fn websocket(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tls = self.try_connect_to(host, &[b"http/1.1"]).await.unwrap();
        let mut req = format!("wss://{host}:8443{path}").into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        match tokio_tungstenite::client_async(req, tls).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("the WebSocket handshake failed: {e}"),
        }
    }

    /// An HTTP/2 client on a new connection (ALPN h2).
    pub async fn h2(&self) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
        let stream = self.connect(&[b"h2"]).await;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        send
    }

    /// An HTTP/2 connection for requests with bodies.
    pub async fn h2_with_body(&self) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
        let stream = self.connect(&[b"h2"]).await;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        send
    }

    /// Opens a TLS connection naming `host`.
    pub async fn try_connect_to(
        &self,
        host: &str,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.next_node()).await?;
        let mut cfg = (**self.tls.config()).clone();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from(host.to_string()).unwrap(), tcp).await
    }

    /// Refusals of `kind` the audit log accounts for: records of their own, and those counted
    /// into `refusals_counted` records. Moves the clock past the current minute first and
    /// waits for its counts to be written.
    pub async fn refusals(&self, kind: &str) -> u64 {
        self.clock.advance(61);
        let total = || {
            let own = self.audit(kind).len() as u64;
            let counted: u64 = self
                .audit("refusals_counted")
                .iter()
                .filter(|e| e["refusal"] == kind)
                .map(|e| e["count"].as_u64().unwrap())
                .sum();
            own + counted
        };
        let mut last = total();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let now = total();
            if now == last {
                break;
            }
            last = now;
        }
        last
    }

    /// The status of a GET, or 0 when the connection closed without an answer (a response cut
    /// as its session ended).
    pub async fn status(&self, target: &str, session: Option<&str>) -> u16 {
        let cookie = session.map(|s| format!("Cookie: __Host-poort={s}\r\n")).unwrap_or_default();
        let req = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{cookie}Connection: close\r\n\r\n");
        self.hostile(req.as_bytes()).await.0.unwrap_or(0)
    }

    /// Audit records of one kind, as JSON details.
    pub fn audit(&self, kind: &str) -> Vec<serde_json::Value> {
        let conn = poort::store::open_connection(self.db()).unwrap();
        conn.query_map("SELECT detail FROM audit WHERE kind = ?1 ORDER BY seq", [kind], |r| r.get::<String>(0))
            .unwrap()
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    /// Waits (up to two seconds) for an audit record of `kind` that `f` accepts, and returns
    /// the records of that kind. For refusals, which the gateway writes without waiting.
    pub async fn audited(&self, kind: &str, f: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let start = tokio::time::Instant::now();
        loop {
            let records = self.audit(kind);
            if records.iter().any(&f) {
                return records;
            }
            assert!(start.elapsed() < Duration::from_secs(2), "no matching {kind} record: {records:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the poort binary against this gateway's config.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_poort"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env("POORT_LOG", "warn")
            .output()
            .unwrap()
    }
}

/// Walks a browser through the hand-off to an app's own host: a request there without a
/// session, the portal (signed in as `portal`), and back with the code. Returns the app
/// host's session cookie.
/// A plain-HTTP request to the admin listener at `addr`.
pub async fn admin(addr: SocketAddr, method: &str, path: &str) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    parse_response(&out)
}

pub async fn hand_off(gate: &Gate, portal: &str, host: &str, path: &str) -> String {
    hand_off_from(gate, portal, host, path, path).await
}

/// As `hand_off`, begun by a request for `start` on the app host, and landing on `path`.
pub async fn hand_off_from(gate: &Gate, portal: &str, host: &str, start: &str, path: &str) -> String {
    let html = [("Host", host), ("Accept", "text/html")];
    let start = gate.request("GET", start, &html, b"").await;
    assert_eq!(start.status, 302, "{}", start.text());
    let nonce = start.cookie("__Host-poort-handoff").expect("the app host sets its hand-off nonce");
    let begin = start.header("location").unwrap().trim_start_matches(ORIGIN).to_string();
    assert!(begin.starts_with("/.poort/handoff/begin?"), "{begin}");
    let r = gate.get(&begin, Some(portal)).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let code = r.header("location").unwrap().split_once("/.poort/handoff?").unwrap().1.to_string();
    let cookie = format!("__Host-poort-handoff={nonce}");
    let r = gate.request("GET", &format!("/.poort/handoff?{code}"), &[("Host", host), ("Cookie", &cookie)], b"").await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location"), Some(path));
    r.cookie("__Host-poort").expect("the hand-off sets the app host's session cookie")
}

/// Enrols alice's authenticator from the security page; returns (secret, new session, codes).
pub async fn enrol(gate: &Gate, session: &str) -> (Vec<u8>, String, Vec<String>) {
    let start = gate.post("/.poort/security/totp", session, &[]).await;
    assert_eq!(start.status, 200, "{}", start.text());
    let page = start.text();
    assert!(page.contains("src=\"data:image/svg+xml;base64,"), "a QR code is shown");
    let secret = base32_decode(between(&page, "<p class=\"key\"><code>", "</code>"));
    assert_eq!(secret.len(), 20);
    let code = totp::code_at_step(&secret, totp::step_at(gate.clock.now()));
    let done = gate.post("/.poort/security/totp/confirm", session, &[("code", &code)]).await;
    assert_eq!(done.status, 200, "{}", done.text());
    let text = done.text();
    let codes: Vec<String> =
        text.split("<li><code>").skip(1).map(|c| c.split('<').next().unwrap().to_string()).collect();
    assert_eq!(codes.len(), 10, "ten recovery codes are shown once");
    let renewed = done.cookie("__Host-poort").expect("confirming renews the session");
    (secret, renewed, codes)
}

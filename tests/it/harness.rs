//! Test harness: a real gateway on a loopback port with a clock the test moves, real
//! upstreams that record what reached them, and a raw TLS client that sends exact bytes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use poort::clock::{Clock, ManualClock};
use poort::identity::totp;
use poort::server::Running;
use poort::store::Store;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

pub const ORIGIN: &str = "https://localhost:8443";
pub const PASSWORD: &str = "violet-anchor-sings-47";

/// A request as an upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// An HTTP upstream that records every request and answers 200.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let (log, count) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            // A request whose body was cut off (poort aborts a body that turns
                            // out malformed mid-stream) never reached the app as a request.
                            let Ok(body) = body.collect().await.map(|b| b.to_bytes().to_vec()) else {
                                return Ok(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new())));
                            };
                            let headers = parts
                                .headers
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())
                                })
                                .collect();
                            log.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                headers,
                                body,
                            });
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"upstream ok"),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, seen, connections }
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("the upstream received a request")
    }
}

/// A TCP service that reads everything it is sent, then answers with its SHA-256 and
/// closes. Counts the connections it accepted.
#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => ctx.update(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(ctx.finish().as_ref()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Sink { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A WebSocket upstream that echoes every message.
pub async fn ws_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        let _ = ws.send(msg).await;
                    }
                }
            });
        }
    });
    addr
}

/// An HTTP upstream whose every response streams forever: a chunk each 100 ms (a server-sent
/// events feed, a long download).
pub async fn streamer() -> SocketAddr {
    each_request(|mut s| async move {
        let start = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        if s.write_all(start).await.is_err() {
            return;
        }
        loop {
            if s.write_all(b"6\r\ndata:1\r\n").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// A loopback HTTP upstream that reads the head of each connection's first request, then
/// leaves the connection to `answer`.
async fn each_request<F, A>(answer: F) -> SocketAddr
where
    F: Fn(TcpStream) -> A + Send + Sync + 'static,
    A: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; 8192];
                let _ = s.read(&mut head).await;
                answer(s).await;
            });
        }
    });
    addr
}

/// An HTTP upstream that answers every request with `response`, as it is, and closes.
pub async fn canned(response: &'static [u8]) -> SocketAddr {
    each_request(move |mut s| async move {
        let _ = s.write_all(response).await;
    })
    .await
}

/// An upstream that accepts connections and never answers.
pub async fn silent() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held.push(s);
        }
    });
    addr
}

/// A loopback port with nothing listening, for a server a test starts (slapd, sshd, the
/// OpenID Provider) or for nothing at all. Taken below the kernel's ephemeral range
/// (32768-60999), so that no socket another test binds to port 0 can take it before the server
/// does, and each only once in this process.
pub fn closed_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Test binaries run at once (CI, a developer's second shell) start apart.
    let base = 20_000 + (std::process::id() % 30) as u16 * 400;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 400;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until something accepts connections on a loopback port (a server the test started).
pub fn wait_for_port(port: u16, what: &str, limit: Duration) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < limit, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A throwaway directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let b: [u8; 8] = poort::secret::random_bytes();
        let p = std::env::temp_dir().join(format!("poort-it-{}", poort::secret::hex(&b)));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A parsed response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The value a `Set-Cookie` gives to cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .filter_map(|(_, v)| v.split(';').next()?.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("no complete response head in {:?}", String::from_utf8_lossy(raw));
    });
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked")) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 2 + size + 2..];
        }
        body = out;
    }
    Resp { status, headers, body }
}

pub struct Gate {
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub clock: ManualClock,
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub redirect_addr: SocketAddr,
    pub upstream: Upstream,
    pub sink: Sink,
    pub cert_der: Vec<u8>,
    tls: TlsConnector,
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
        let dir = TempDir::new();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "git.localhost".into()]).unwrap();
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
[tls]
cert_file = "cert.pem"
key_file = "key.pem"
[proxy]
response_timeout = "2s"
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
            upstream,
            sink,
            cert_der: ck.cert.der().to_vec(),
            tls: TlsConnector::from(Arc::new(tls)),
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
        self.running = Some(running);
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    pub fn db(&self) -> PathBuf {
        self.dir.0.join("poort.db")
    }

    pub fn store(&self) -> Store {
        Store::open(&self.db()).unwrap()
    }

    /// Opens a TLS connection to the gateway.
    pub async fn connect(&self, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
        self.try_connect(alpn).await.unwrap()
    }

    /// Opens a TLS connection to the gateway; an error if the handshake fails.
    pub async fn try_connect(&self, alpn: &[&[u8]]) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
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
            .connect(ServerName::try_from(sni.to_string()).unwrap(), TcpStream::connect(self.addr).await.unwrap())
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
        let tcp = TcpStream::connect(self.addr).await.unwrap();
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
        self.raw_to(sni, &bytes).await
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
        assert_eq!(self.get(&format!("/.poort/device?code={user_code}"), Some(browser)).await.status, 200);
        let browser = self.confirm(browser, &[("password", PASSWORD), ("device", user_code)]).await;
        let r = self.post("/.poort/device", &browser, &[("code", user_code), ("decision", "approve")]).await;
        assert!(r.text().contains("Go back to your terminal"), "{}", r.text());
        let body = serde_json::json!({ "device_code": device_code }).to_string();
        let t = self.request("POST", "/.poort/device/token", &cli, body.as_bytes()).await;
        assert_eq!(t.status, 200, "{}", t.text());
        let t: serde_json::Value = serde_json::from_slice(&t.body).unwrap();
        (t["token"].as_str().unwrap().to_string(), browser)
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

    /// Opens a TLS connection naming `host`.
    pub async fn try_connect_to(
        &self,
        host: &str,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
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
        let conn = poort::store::open_connection(&self.db()).unwrap();
        let mut stmt = conn.prepare("SELECT detail FROM audit WHERE kind = ?1 ORDER BY seq").unwrap();
        stmt.query_map([kind], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|d| serde_json::from_str(&d.unwrap()).unwrap())
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
pub async fn hand_off(gate: &Gate, portal: &str, host: &str, path: &str) -> String {
    let html = [("Host", host), ("Accept", "text/html")];
    let start = gate.request("GET", path, &html, b"").await;
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

pub fn base32_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bits = 0u64;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        bits = (bits << 5) | ALPHABET.iter().position(|&a| a == c).unwrap() as u64;
        n += 5;
        if n >= 8 {
            out.push((bits >> (n - 8)) as u8);
            n -= 8;
        }
    }
    out
}

pub fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    text.split(start).nth(1).unwrap().split(end).next().unwrap()
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

/// A login page with its per-request parts blanked (CSRF values, the echoed user name), so
/// that two answers can be compared byte for byte.
pub fn normalised(page: &str, user: &str) -> String {
    let mut out = page.replace(&format!("value=\"{user}\""), "value=\"\"");
    for marker in ["name=\"csrf\" value=\"", "data-csrf=\""] {
        out = out.split(marker).map(|p| p.split_once('"').map_or(p, |(_, rest)| rest)).collect::<Vec<_>>().join(marker);
    }
    out
}

/// A child process that is killed and reaped when dropped, also when a test fails.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (polling, bounded) until `f` returns true.
pub async fn eventually(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within {limit:?}");
}

pub fn path_of(p: &Path) -> &str {
    p.to_str().unwrap()
}

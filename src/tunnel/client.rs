//! The command-line side of tunnels: `poort login` (device code sign-in), `poort logout`, and
//! `poort connect`, which carries local connections (`--listen`) or standard input and output
//! (`--stdio`, for ssh's ProxyCommand) through WebSocket tunnels to the gateway.
//!
//! Trust in the gateway's certificate comes from the public roots, a CA file, or a pinned
//! SHA-256 fingerprint of its certificate (what `poort quickstart` prints).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What `poort login` keeps, in the user's config directory (mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// `https://host[:port]`
    pub gateway: String,
    pub token: String,
    pub user: String,
    pub expires_at: i64,
    #[serde(default)]
    pub fingerprint: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// How to trust the gateway's certificate.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub fingerprint: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// `$XDG_CONFIG_HOME/poort/credentials.json`, or `~/.config/poort/credentials.json`.
pub fn credentials_path() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".config"),
    };
    Ok(base.join("poort").join("credentials.json"))
}

pub fn load_credentials() -> anyhow::Result<Credentials> {
    let path = credentials_path()?;
    let text = std::fs::read(&path).map_err(|_| anyhow::anyhow!("not signed in: run poort login --gateway URL"))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is damaged: run poort login again", path.display()))
}

fn save_credentials(c: &Credentials) -> anyhow::Result<PathBuf> {
    let path = credentials_path()?;
    let _ = std::fs::remove_file(&path);
    crate::secret::write_private(&path, serde_json::to_string_pretty(c)?.as_bytes())?;
    Ok(path)
}

fn tls_config(trust: &Trust) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use crate::tls_client::{self, Trust as Check};
    let check = match (&trust.fingerprint, &trust.ca_file) {
        (Some(fp), _) => Check::Pinned(tls_client::parse_fingerprint(fp)?),
        (None, Some(path)) => Check::CaFile(path.clone()),
        (None, None) => Check::PublicRoots,
    };
    tls_client::config(&check, None, &[b"http/1.1"])
}

/// The host and port of a gateway URL.
fn authority(gateway: &str) -> anyhow::Result<(String, u16)> {
    let rest = gateway.strip_prefix("https://").context("the gateway URL must start with https://")?;
    let rest = rest.trim_end_matches('/');
    if rest.contains(['/', '?', '#', '@']) {
        bail!("the gateway URL must be https://HOST[:PORT] with nothing after it");
    }
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !rest.ends_with(']') => Ok((h.to_string(), p.parse().context("bad port")?)),
        _ => Ok((rest.to_string(), 443)),
    }
}

async fn connect_tls(gateway: &str, trust: &Trust) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let (host, port) = authority(gateway)?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| anyhow::anyhow!("the gateway {gateway} did not answer"))?
        .with_context(|| format!("cannot reach the gateway {gateway}"))?;
    let _ = tcp.set_nodelay(true);
    let name = crate::tls_client::server_name(&host)?;
    tokio_rustls::TlsConnector::from(tls_config(trust)?).connect(name, tcp).await.with_context(|| {
        format!("TLS with {gateway} failed (use --ca-file or --fingerprint for a private certificate)")
    })
}

/// One JSON request to the gateway; returns the status and the parsed body.
async fn call(
    gateway: &str,
    trust: &Trust,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let tls = connect_tls(gateway, trust).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let (host, port) = authority(gateway)?;
    let method = if body.is_some() { http::Method::POST } else { http::Method::GET };
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("x-poort-client", "cli");
    if let Some(t) = token {
        req = req.header(http::header::COOKIE, format!("{}={t}", crate::session::SESSION_COOKIE));
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let resp = send.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status().as_u16();
    let bytes =
        http_body_util::Limited::new(resp.into_body(), 1 << 20).collect().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((status, serde_json::from_slice(&bytes.to_bytes()).unwrap_or(serde_json::Value::Null)))
}

/// `poort login`: prints the code and URL, polls until the browser approves.
pub async fn login(gateway: &str, trust: Trust, mut show: impl FnMut(&str)) -> anyhow::Result<Credentials> {
    let gateway = gateway.trim_end_matches('/').to_string();
    let (status, start) = call(&gateway, &trust, "/.poort/device/code", None, Some(serde_json::json!({}))).await?;
    if status != 200 {
        bail!("the gateway refused to start a sign-in ({status}: {})", start["error"]);
    }
    let code = start["user_code"].as_str().unwrap_or_default();
    let device = start["device_code"].as_str().unwrap_or_default().to_string();
    let interval = Duration::from_secs(start["interval"].as_u64().unwrap_or(2).clamp(1, 10));
    let expires = Duration::from_secs(start["expires_in"].as_u64().unwrap_or(600));
    show(&format!(
        "To sign in, open\n\n    {}\n\nin a browser and confirm the code\n\n    {code}\n\nWaiting for approval...",
        start["verification_uri_complete"].as_str().unwrap_or_default()
    ));
    let deadline = tokio::time::Instant::now() + expires;
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() > deadline {
            bail!("the code expired before it was approved; run poort login again");
        }
        let (status, v) =
            call(&gateway, &trust, "/.poort/device/token", None, Some(serde_json::json!({ "device_code": device })))
                .await?;
        match (status, v["error"].as_str()) {
            (200, _) => {
                let c = Credentials {
                    gateway: gateway.clone(),
                    token: v["token"].as_str().unwrap_or_default().to_string(),
                    user: v["user"].as_str().unwrap_or_default().to_string(),
                    expires_at: v["expires_at"].as_i64().unwrap_or_default(),
                    fingerprint: trust.fingerprint.clone(),
                    ca_file: trust.ca_file.clone(),
                };
                save_credentials(&c)?;
                return Ok(c);
            }
            (_, Some("authorization_pending" | "slow_down")) => continue,
            (_, Some("access_denied")) => bail!("the sign-in was refused in the browser"),
            (_, Some("expired_token")) => bail!("the code expired before it was approved; run poort login again"),
            (s, e) => bail!("the gateway answered {s}: {}", e.unwrap_or("no reason")),
        }
    }
}

/// `poort logout`: ends the session at the gateway and forgets it here.
pub async fn logout() -> anyhow::Result<bool> {
    let c = load_credentials()?;
    let trust = Trust { fingerprint: c.fingerprint.clone(), ca_file: c.ca_file.clone() };
    let ended = call(&c.gateway, &trust, "/.poort/device/logout", Some(&c.token), Some(serde_json::json!({}))).await;
    std::fs::remove_file(credentials_path()?)?;
    Ok(ended.map(|(_, v)| v["ended"].as_bool().unwrap_or(false)).unwrap_or(false))
}

/// Asks whether a tunnel would be allowed now, without opening it.
pub async fn check(c: &Credentials, name: &str) -> anyhow::Result<()> {
    let trust = Trust { fingerprint: c.fingerprint.clone(), ca_file: c.ca_file.clone() };
    let (status, v) = call(&c.gateway, &trust, &format!("/.poort/tunnel/{name}"), Some(&c.token), None).await?;
    match status {
        200 => Ok(()),
        _ => bail!("{}", v["error"].as_str().unwrap_or("the gateway refused the tunnel")),
    }
}

type Tunnel = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Opens one tunnel; errors carry the gateway's reason.
pub async fn open(c: &Credentials, name: &str) -> anyhow::Result<Tunnel> {
    let trust = Trust { fingerprint: c.fingerprint.clone(), ca_file: c.ca_file.clone() };
    let tls = connect_tls(&c.gateway, &trust).await?;
    let url = format!("{}/.poort/tunnel/{name}", c.gateway.replacen("https://", "wss://", 1));
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(http::header::COOKIE, format!("{}={}", crate::session::SESSION_COOKIE, c.token).parse()?);
    // The gateway opens tunnels only for requests marked as the command line's.
    req.headers_mut().insert("x-poort-client", http::HeaderValue::from_static("cli"));
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let why = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("the gateway answered {}", resp.status()));
            bail!("{why}")
        }
        Err(e) => bail!("opening the tunnel failed: {e}"),
    }
}

/// A tunnel's transport error in a person's words: the TLS library's own text names a URL.
fn plain(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => "the gateway closed it".into(),
        Error::Io(io) => io.kind().to_string(),
        Error::ConnectionClosed | Error::AlreadyClosed => "the gateway closed it".into(),
        Error::Tls(_) => "a TLS error".into(),
        other => other.to_string(),
    }
}

/// Carries bytes between a local stream and a tunnel. When the local side stops sending, the
/// gateway is told (an empty message) and the answer still flows back until the far side
/// closes.
pub async fn carry<R, W>(ws: Tunnel, mut rd: R, mut wr: W) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let up = async {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                tx.send(Message::Binary(Bytes::new())).await?;
                // Nothing more to send; the tunnel ends when the far side closes.
                return std::future::pending::<anyhow::Result<()>>().await;
            }
            tx.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await?;
        }
    };
    let down = async {
        while let Some(msg) = rx.next().await {
            let msg = msg.map_err(|e| anyhow::anyhow!("the connection to the gateway broke ({})", plain(&e)))?;
            match msg {
                Message::Binary(b) => {
                    wr.write_all(&b).await?;
                    wr.flush().await?;
                }
                // The gateway cut the tunnel, and says why ("session ended", "idle").
                Message::Close(Some(f)) if f.code == CloseCode::Policy => {
                    let _ = wr.flush().await;
                    bail!("the gateway ended the tunnel: {}", f.reason);
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        wr.flush().await?;
        Ok::<_, anyhow::Error>(())
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// `poort connect NAME --stdio`
pub async fn connect_stdio(name: &str) -> anyhow::Result<()> {
    let c = load_credentials()?;
    let ws = open(&c, name).await?;
    carry(ws, tokio::io::stdin(), tokio::io::stdout()).await
}

/// `poort connect NAME --listen ADDR`: each accepted connection gets its own tunnel. Tells
/// `ready` the bound address once listening.
pub async fn connect_listen(name: &str, addr: &str, ready: impl FnOnce(std::net::SocketAddr)) -> anyhow::Result<()> {
    let c = Arc::new(load_credentials()?);
    // Fail early, with the gateway's reason, if this tunnel cannot be opened at all (the
    // gateway answers from policy alone; nothing is dialed).
    check(&c, name).await?;
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    ready(listener.local_addr()?);
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (c, name) = (c.clone(), name.to_string());
        tokio::spawn(async move {
            match open(&c, &name).await {
                Ok(ws) => {
                    let (rd, wr) = stream.into_split();
                    if let Err(e) = carry(ws, rd, wr).await {
                        eprintln!("poort: tunnel for {peer} ended: {e:#}");
                    }
                }
                Err(e) => eprintln!("poort: tunnel for {peer} refused: {e:#}"),
            }
        });
    }
}

/// True if `path` exists and only its owner can read it.
pub fn private(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
}

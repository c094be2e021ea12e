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
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

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

/// `AA:BB:...` or plain hex, either case, to 32 bytes.
fn parse_fingerprint(s: &str) -> anyhow::Result<[u8; 32]> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        bail!("a certificate fingerprint is 32 bytes of hex (64 digits), as poort quickstart prints it");
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).context("the fingerprint is not hex")?;
    }
    Ok(out)
}

/// Accepts exactly the certificate whose SHA-256 is pinned; signatures are still checked.
#[derive(Debug)]
struct Pinned {
    digest: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use subtle::ConstantTimeEq;
        let d = ring::digest::digest(&ring::digest::SHA256, end_entity);
        if bool::from(d.as_ref().ct_eq(&self.digest)) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("the gateway's certificate does not match the pinned fingerprint".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(trust: &Trust) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let mut cfg = if let Some(fp) = &trust.fingerprint {
        let digest = parse_fingerprint(fp)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { digest, provider }))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &trust.ca_file {
            Some(path) => {
                use rustls::pki_types::pem::PemObject;
                for c in CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))? {
                    roots.add(c.with_context(|| format!("parsing {}", path.display()))?)?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
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
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())?;
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
            match msg? {
                Message::Binary(b) => {
                    wr.write_all(&b).await?;
                    wr.flush().await?;
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

//! Accepting connections: TLS 1.2/1.3 with rustls (modern suites only, ALPN h2 and
//! http/1.1), a bound on connections, a handshake timeout, HTTP/1 and HTTP/2 with bounded
//! heads and streams, an idle cut-off, and graceful shutdown. Also the optional plain-HTTP
//! listener, which does nothing but redirect to the configured HTTPS origin.

mod h1;
mod idle;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::body::{Body, RequestBody};
use crate::config::Server;
use crate::request::Target;
use crate::respond::redirect;

pub use h1::Refused;
pub use idle::IdleIo;

/// What the gateway knows of the connection a request came on.
#[derive(Debug, Default)]
pub struct Conn {
    /// The host name the client asked for in the TLS handshake, lower case.
    pub sni: Option<String>,
    /// Why the connection's last head was refused, for the marker request (`h1`).
    pub refused: Arc<Refused>,
}

/// Open connections per client address. A slot is held for a connection's life.
#[derive(Debug, Default)]
struct PerClient(parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

struct ClientSlot {
    table: Arc<PerClient>,
    ip: std::net::IpAddr,
}

impl PerClient {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<ClientSlot> {
        let mut t = self.0.lock();
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot { table: self.clone(), ip })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut t = self.table.0.lock();
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// The TLS settings, serving the certificates of `certs` by SNI.
pub fn tls_config(certs: Arc<crate::certs::Certs>) -> anyhow::Result<Arc<ServerConfig>> {
    // ring's default suites are all AEAD with forward secrecy; no CBC, no RSA key exchange.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("choosing TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// HTTP/2 settings, and the HTTP/1 head timeout (`h1` serves HTTP/1 itself). The protocol
/// comes from ALPN: nothing guesses it from the first bytes.
struct Builders {
    /// Bounds each HTTP/1 head, and the wait for the next request on a kept-alive connection.
    header_timeout: Duration,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

fn http_builders(server: &Server) -> Builders {
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(128)
        .max_header_list_size(32 * 1024)
        .max_pending_accept_reset_streams(32)
        .max_local_error_reset_streams(256)
        .keep_alive_interval(None);
    Builders { header_timeout: server.header_timeout, h2 }
}

/// The connection limits, shared by every worker that accepts on the same address.
#[derive(Debug, Clone)]
pub struct Limits {
    slots: Arc<Semaphore>,
    per_client: Arc<PerClient>,
}

impl Limits {
    pub fn new(server: &Server) -> Limits {
        Limits { slots: Arc::new(Semaphore::new(server.max_connections)), per_client: Arc::default() }
    }
}

/// What answers the requests a listener accepts: the gateway.
pub trait Handler: Send + Sync + 'static {
    /// The target of the request `h1` hands over in place of a refused head.
    fn marker(&self) -> &'static str;

    /// A client connection was accepted; what is returned lives as long as the connection.
    fn connected(&self) -> Option<crate::metrics::Held> {
        None
    }

    /// A TLS handshake with a client ended: `ok` if it completed.
    fn handshake(&self, _ok: bool) {}

    /// One request, start to finish.
    fn handle<'a>(
        self: Arc<Self>,
        peer: SocketAddr,
        conn: &'a Conn,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Response<Body>> + Send + 'a;
}

/// What workers accept on: the listener, and the settings the connections accepted from it
/// get. A reload that changes either sends a new one; connections already open keep theirs.
#[derive(Debug, Clone)]
pub struct Listening {
    pub listener: Arc<std::net::TcpListener>,
    pub server: Server,
    pub limits: Limits,
}

impl Listening {
    pub fn new(listener: std::net::TcpListener, server: Server) -> Listening {
        let limits = Limits::new(&server);
        Listening { listener: Arc::new(listener), server, limits }
    }

    /// This worker's handle on the listener.
    fn accept_here(&self) -> std::io::Result<TcpListener> {
        let l = self.listener.try_clone()?;
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    }
}

/// Serves HTTPS on what `listening` holds (following it when it changes) until `shutdown`
/// completes, then drains for `shutdown_grace`. Several workers may serve one listener; they
/// share its limits.
pub async fn serve<H: Handler>(
    gw: Arc<H>,
    mut listening: tokio::sync::watch::Receiver<Listening>,
    tls: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut now = listening.borrow_and_update().clone();
    let mut listener = match now.accept_here() {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "A worker could not use the listener"),
    };
    let mut builders = Arc::new(http_builders(&now.server));
    // Connections in flight, and the signal that asks them to finish their requests and close.
    let mut conns = tokio::task::JoinSet::new();
    let (drain, draining) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            changed = listening.changed() => {
                if changed.is_err() {
                    // Nothing will change any more: serve until shutdown.
                    (&mut shutdown).await;
                    break;
                }
                let next = listening.borrow_and_update().clone();
                match next.accept_here() {
                    Ok(l) => {
                        listener = l;
                        builders = Arc::new(http_builders(&next.server));
                        now = next;
                    }
                    Err(e) => tracing::error!(error = %e, "A worker could not use the new listener; it keeps the old one"),
                }
                continue;
            }
            () = &mut shutdown => break,
        };
        let Listening { server, limits: Limits { slots, per_client }, .. } = &now;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(client = %peer, "Connection refused: connection limit reached");
            continue;
        };
        let Some(client_slot) = per_client.take(peer.ip(), server.max_connections_per_client) else {
            tracing::warn!(client = %peer, "Connection refused: per-client connection limit reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        while conns.try_join_next().is_some() {}
        let (gw, acceptor, builders, draining) = (gw.clone(), acceptor.clone(), builders.clone(), draining.clone());
        let (handshake, idle) = (server.handshake_timeout, server.idle_timeout);
        conns.spawn(async move {
            let _slots = (slot, client_slot, gw.connected());
            let tls = match tokio::time::timeout(handshake, acceptor.accept(IdleIo::new(stream, idle))).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    gw.handshake(false);
                    tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    gw.handshake(false);
                    tracing::debug!(client = %peer, "TLS handshake timed out");
                    return;
                }
            };
            gw.handshake(true);
            serving(gw, peer, tls, &builders, draining).await;
        });
    }
    drop(listener);
    tracing::info!(connections = conns.len(), "Draining connections");
    let _ = drain.send(true);
    let drained = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(now.server.shutdown_grace, drained).await.is_err() {
        tracing::warn!("Shutdown grace period over; closing the remaining connections");
        conns.abort_all();
    }
}

type Serving = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves one connection after its handshake: HTTP/2 or HTTP/1 as ALPN chose, each request
/// answered by `gw`; on shutdown, lets its requests finish and closes it. Made here, outside
/// the connection's task, and boxed: the task then keeps no room for the handshake's state
/// beside the connection's (an `async` block that took the connection over would also keep
/// it twice).
fn serving<H: Handler>(
    gw: Arc<H>,
    peer: SocketAddr,
    tls: tokio_rustls::server::TlsStream<IdleIo<tokio::net::TcpStream>>,
    builders: &Builders,
    mut draining: tokio::sync::watch::Receiver<bool>,
) -> Serving {
    let (_, session) = tls.get_ref();
    let h2 = session.alpn_protocol() == Some(b"h2");
    let conn = Arc::new(Conn { sni: session.server_name().map(str::to_ascii_lowercase), refused: Arc::default() });
    if !h2 {
        return Box::pin(h1::serve(gw, peer, conn, Box::new(tls), builders.header_timeout, draining));
    }
    let service = service_fn(move |req: Request<Incoming>| {
        let (gw, conn) = (gw.clone(), conn.clone());
        // Boxed, so that a connection between requests holds no request's state (the
        // library keeps room for the future of each connection's request in flight).
        Box::pin(async move { Ok::<_, Infallible>(gw.handle(peer, &conn, req.map(RequestBody::H2)).await) })
    });
    let mut conn = Box::pin(builders.h2.serve_connection(TokioIo::new(tls), service));
    Box::pin(async move {
        let ended = tokio::select! {
            r = conn.as_mut() => r,
            _ = draining.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
        }
    })
}

/// Serves HTTP/1.1 on `io`, a connection from `peer`, as an HTTPS connection after its
/// handshake is served (for benchmarks: `benches/hotpath.rs`).
pub async fn serve_http1<H: Handler>(
    gw: Arc<H>,
    peer: SocketAddr,
    io: impl crate::body::wire::Io,
    header_timeout: Duration,
) {
    let (_drain, draining) = tokio::sync::watch::channel(false);
    h1::serve(gw, peer, Arc::default(), Box::new(io), header_timeout, draining).await;
}

/// Serves the plain-HTTP listener: every request gets a redirect to the HTTPS origin with the
/// same canonical path, or to the root when the target is not canonical. Nothing else.
pub async fn serve_redirect(
    listener: TcpListener,
    server: Server,
    challenges: Option<Arc<crate::acme::Challenges>>,
    shutdown: impl Future<Output = ()>,
) {
    let origin: Arc<str> = server.external_origin.clone().into();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_timeout)
        .max_buf_size(16 * 1024)
        .keep_alive(false);
    let builder = Arc::new(builder);
    accept_until(listener, shutdown, move |stream| {
        let (origin, builder, challenges) = (origin.clone(), builder.clone(), challenges.clone());
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                // An ACME CA checking a name (HTTP-01): the answer while an order waits for it.
                let answer = challenges.as_ref().and_then(|c| {
                    let token = req.uri().path().strip_prefix(crate::acme::CHALLENGE_PATH)?;
                    c.answer(token)
                });
                if let Some(answer) = answer {
                    let resp = crate::respond::page(StatusCode::OK, "application/octet-stream", Body::from(answer));
                    return std::future::ready(Ok::<_, Infallible>(resp));
                }
                let path = req.uri().path_and_query().map(|p| p.as_str()).and_then(|t| Target::parse(t).ok());
                let location = match path {
                    Some(t) => format!("{origin}{}", t.forward_form(t.path())),
                    None => format!("{origin}/"),
                };
                std::future::ready(Ok::<_, Infallible>(redirect(StatusCode::PERMANENT_REDIRECT, &location)))
            });
            let io = IdleIo::new(stream, Duration::from_secs(30));
            let _ = builder.serve_connection(TokioIo::new(io), service).await;
        }
    })
    .await;
}

/// Accepts connections on `listener` until `shutdown` completes, each served on a task of its
/// own by what `each` makes of it.
pub async fn accept_until<F, C>(listener: TcpListener, shutdown: impl Future<Output = ()>, mut each: F)
where
    F: FnMut(tokio::net::TcpStream) -> C,
    C: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted { Ok(v) => v, Err(_) => continue },
            () = &mut shutdown => return,
        };
        tokio::spawn(each(stream));
    }
}

/// Binds a TCP listener with a useful error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))
}

//! TCP tunnels: `/.poort/tunnel/<name>` (for the command line only, with its own session:
//! `portal::routes`) accepts a WebSocket upgrade only after `policy::evaluate` allowed it,
//! dials the target with the permit, and then carries bytes both ways (binary messages one
//! way, TCP the other) with bounded buffers. A tunnel ends when either side closes, when it
//! idles, or at once when its session's line is cut (logout, revocation, expiry, lockdown).
//!
//! Half-close: an empty binary message from the client means "no more bytes from me". The
//! target's write side is shut down and its answer still flows back until it closes (a
//! WebSocket Close cannot say this: it ends both directions).
//! The command-line side (`poort login`, `poort connect`) is in `client`.

pub mod client;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::audit::Event;
use crate::body::{Body, RequestBody};
use crate::config::Tunnel;
use crate::policy::{self, Decision, Permit, Resource, Subject};
use crate::portal::routes;
use crate::respond::{json_error, page};
use crate::session::Session;
use crate::state::{Ctx, State};

/// Bytes read from the target per message.
const CHUNK: usize = 256 * 1024;

/// The `Sec-WebSocket-Accept` answer for a well-formed WebSocket upgrade request, if it is one.
pub(crate) fn websocket_key(req: &Request<RequestBody>) -> Option<HeaderValue> {
    let h = req.headers();
    let upgrade = h.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let version = h.get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v.as_bytes() == b"13");
    let key = h.get(header::SEC_WEBSOCKET_KEY)?;
    (upgrade && version && req.method() == http::Method::GET && req.version() == http::Version::HTTP_11)
        .then(|| tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()).parse().ok())
        .flatten()
}

/// Why a tunnel's target could not be reached. The command line is told the fixed words; the
/// log and the audit record also get the cause.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("target unreachable: it refused or dropped the connection")]
    Refused(#[source] std::io::Error),
    #[error("target unreachable: connect timed out")]
    TimedOut,
}

impl DialError {
    /// The words and the cause, for the log and the audit record.
    fn detail(&self) -> String {
        match self {
            DialError::Refused(e) => format!("{self} ({e})"),
            DialError::TimedOut => self.to_string(),
        }
    }
}

/// Dials the target of a permitted tunnel. Taking the permit makes policy the only way here.
async fn dial(_permit: Permit<'_>, t: &Tunnel, timeout: Duration) -> Result<TcpStream, DialError> {
    match tokio::time::timeout(timeout, TcpStream::connect(&t.target)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(DialError::Refused(e)),
        Err(_) => Err(DialError::TimedOut),
    }
}

/// GET /.poort/tunnel/<name> with a WebSocket upgrade.
pub async fn open(st: &State, ctx: Ctx, req: Request<RequestBody>) -> Response<Body> {
    let row = routes::row_of(routes::Page::Tunnel);
    let call = match routes::admit(st, ctx, row, req).await {
        Ok(call) => call,
        Err(refused) => return refused,
    };
    let name = call.rest.clone();
    let ctx = call.ctx.clone();
    let mut req = call.into_request();
    // A name that is not configured and a tunnel policy refuses get the same answer, which
    // echoes nothing: the command line cannot list the tunnels it may not use. The audit
    // record of a refusal says why.
    // Both are recorded the same way too, without waiting: counted per client and minute,
    // so that probing leaves a trace but neither a flood of records nor a difference in time.
    let closed = |reason: &str| {
        let ev = Event::AccessDenied {
            user: ctx.session.as_ref().map_or_else(|| "(anonymous)".into(), |s| s.identity.user.clone()),
            session: ctx.session.as_ref().map_or_else(String::new, |s| s.id.clone()),
            app: name.chars().take(64).collect(),
            reason: reason.to_string(),
            client: ctx.client,
        };
        st.audit.refusal("access_denied", "tunnel", ctx.client, &name, ev);
        json_error(StatusCode::FORBIDDEN, "no tunnel of that name is open to you")
    };
    let Some(index) = st.cfg.tunnels.iter().position(|t| t.name == name) else {
        return closed("no tunnel of that name");
    };
    let t = &st.cfg.tunnels[index];
    let who = ctx.session.as_ref().map(|s| Subject { identity: &s.identity, mfa: s.mfa() });
    let permit = match policy::evaluate(Resource::Tunnel(&t.name), &t.access, t.mfa, who) {
        Decision::Allow(p) => p,
        Decision::Authenticate { step_up: false } => {
            return json_error(StatusCode::UNAUTHORIZED, "not signed in, or the session ended: run poort login");
        }
        Decision::Authenticate { step_up: true } => {
            return json_error(
                StatusCode::UNAUTHORIZED,
                "this tunnel needs a second factor: run poort login and approve it with one",
            );
        }
        Decision::Deny(reason) => {
            return closed(&reason.to_string());
        }
    };
    // A plain GET asks whether the tunnel could open, without dialing anything.
    let Some(accept) = websocket_key(&req) else {
        return page(StatusCode::OK, "application/json", Body::from(serde_json::json!({ "ready": true }).to_string()));
    };
    let session = ctx.session.clone().expect("invariant: policy allows tunnels only with a session");
    let limits = st.cfg.tunnel;
    let Some(slot) = st.tunnels.take(&session.id, limits.per_session, limits.total) else {
        return json_error(StatusCode::TOO_MANY_REQUESTS, "too many open tunnels");
    };
    let client = ctx.client;
    // What the open tunnel holds: it ends with the session, or when a reload takes the
    // tunnel away from this user.
    let grant = st.grants.hold(&permit, Some(&session), &t.target);
    let tcp = match dial(permit, t, limits.connect_timeout).await {
        Ok(s) => s,
        Err(failed) => {
            let why = failed.detail();
            tracing::info!(tunnel = %t.name, user = %session.identity.user, why = %why, "Tunnel failed");
            let ev = Event::TunnelFailed { user: session.identity.user.clone(), tunnel: t.name.clone(), why, client };
            st.audit.note(ev).await;
            return json_error(StatusCode::BAD_GATEWAY, &failed.to_string());
        }
    };
    let ev = Event::TunnelOpened {
        user: session.identity.user.clone(),
        session: session.id.clone(),
        tunnel: t.name.clone(),
        client,
    };
    if let Err(e) = st.audit.record(ev).await {
        tracing::error!(error = %e, "Audit unavailable; refusing the tunnel");
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "the gateway cannot record this tunnel");
    }

    let upgrade = crate::body::wire::on_upgrade(&mut req);
    let (audit, clock) = (st.audit.clone(), st.clock.clone());
    let name = t.name.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let started = tokio::time::Instant::now();
        let Ok(upgraded) = upgrade.await else { return };
        let ws = server_socket(upgraded).await;
        let counts = Counts::default();
        let why = splice(ws, tcp, &session, grant, limits.idle_timeout, &counts, clock.as_ref()).await;
        tracing::info!(tunnel = %name, user = %session.identity.user, why, "Tunnel closed");
        let ev = Event::TunnelClosed {
            user: session.identity.user.clone(),
            session: session.id.clone(),
            tunnel: name,
            bytes_in: counts.up.load(Ordering::Relaxed),
            bytes_out: counts.down.load(Ordering::Relaxed),
            seconds: started.elapsed().as_secs(),
            why: why.to_string(),
        };
        audit.note(ev).await;
    });

    switching(accept)
}

/// The gateway's side of an upgraded connection as a WebSocket, messages at most 1 MiB.
pub(crate) async fn server_socket(
    upgraded: crate::body::wire::Upgraded,
) -> WebSocketStream<crate::body::wire::Upgraded> {
    let config = WebSocketConfig::default().max_message_size(Some(1 << 20)).max_frame_size(Some(1 << 20));
    WebSocketStream::from_raw_socket(upgraded, Role::Server, Some(config)).await
}

/// The 101 answer that accepts a WebSocket upgrade (`accept` from `websocket_key`).
pub(crate) fn switching(accept: HeaderValue) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    resp
}

/// Bytes carried each way, and when anything last moved (milliseconds since start).
#[derive(Default)]
struct Counts {
    up: AtomicU64,
    down: AtomicU64,
    last: AtomicU64,
}

/// Carries bytes until one side closes, the tunnel idles, or its session ends; says why.
async fn splice<S>(
    ws: WebSocketStream<S>,
    tcp: TcpStream,
    session: &Arc<Session>,
    ended: crate::session::grant::Grant,
    idle: Duration,
    counts: &Counts,
    clock: &dyn crate::clock::Clock,
) -> &'static str
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = tokio::time::Instant::now();
    let since = move || start.elapsed().as_millis() as u64;
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut rd, mut wr) = tcp.into_split();

    // Client to target: every binary message is written in full before the next is read.
    let up = async {
        while let Some(msg) = ws_rx.next().await {
            match msg {
                Ok(Message::Binary(b)) if b.is_empty() => {
                    let _ = wr.shutdown().await;
                }
                Ok(Message::Binary(b)) => {
                    if wr.write_all(&b).await.is_err() {
                        return "target closed";
                    }
                    counts.up.fetch_add(b.len() as u64, Ordering::Relaxed);
                    counts.last.store(since(), Ordering::Relaxed);
                }
                Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(_) => return "client connection failed",
            }
        }
        let _ = wr.shutdown().await;
        "client closed"
    };
    // Target to client: one read becomes one message, sent before the next read.
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        return "client connection failed";
                    }
                    counts.down.fetch_add(n as u64, Ordering::Relaxed);
                    counts.last.store(since(), Ordering::Relaxed);
                }
            }
        }
        let _ = ws_tx.send(Message::Close(None)).await;
        "target closed"
    };
    let cut = ended.ended();
    let watch = async {
        let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::time::sleep(tick).await;
            let quiet = Duration::from_millis(since().saturating_sub(counts.last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return "idle";
            }
            let now = clock.now();
            // Traffic counts as use of the session, so its idle timeout does not cut a busy tunnel.
            if quiet < tick {
                session.touch(now);
            }
        }
    };
    let why = tokio::select! {
        why = up => why,
        why = down => why,
        why = cut => why,
        why = watch => why,
    };
    // Cut by the gateway (the session ended, an idle timeout): the command line is told why, so
    // that it can say so and stop rather than wait on a connection that is gone.
    if !matches!(why, "target closed" | "client closed" | "client connection failed") {
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Policy,
            reason: why.into(),
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), ws_tx.send(Message::Close(Some(frame)))).await;
    }
    why
}

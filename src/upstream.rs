//! Upstream connections: HTTP/1.1 keep-alive, one pool per worker thread and upstream. A
//! connection is driven by the request that borrowed it (while waiting for the response
//! head) and then by the response body as the client reads it; it goes back to its pool when
//! the body has ended. There is no task per connection and no hand-over between threads: on a
//! request's path nothing waits for another core (bench/README.md). An app served over HTTPS
//! that offers HTTP/2 by ALPN gets one multiplexed connection per worker instead, driven by a
//! task of its own. Also the request body type an upstream is sent, and why a forward failed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use http::StatusCode;
use http_body_util::Limited;

use crate::config::UpstreamTls;

type Conn = Connection<TokioIo<Stream>, UpstreamBody>;

/// Idle connections kept per worker and upstream address at most.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed rather than reused.
const IDLE_FOR: Duration = Duration::from_secs(60);

/// Where an upstream request goes.
#[derive(Clone, Copy)]
pub struct Dest<'a> {
    /// Which pool: the address for plain HTTP; for HTTPS also the app, whose TLS settings
    /// are its own.
    pub key: &'a str,
    /// `host:port` to connect to.
    pub address: &'a str,
    pub tls: Option<&'a UpstreamTls>,
}

/// A connection to an app: plain TCP, or TLS over it.
///
/// An app may answer before it has read a request's body (a 413 for an upload it will not
/// take) and close its connection: poort's next write then fails. Such a failure is not
/// passed on: writing just stops (no more of the client's body is taken), so that the
/// connection still reads the answer the app sent, and the user gets it instead of a 502.
/// If no answer comes, reading fails or times out as it would anyway.
pub struct Stream {
    io: Io,
    /// The app stopped reading: writes wait forever.
    write_closed: bool,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    fn plain(s: TcpStream) -> Stream {
        Stream { io: Io::Plain(s), write_closed: false }
    }

    fn tls(s: tokio_rustls::client::TlsStream<TcpStream>) -> Stream {
        Stream { io: Io::Tls(Box::new(s)), write_closed: false }
    }

    fn alpn_h2(&self) -> bool {
        matches!(&self.io, Io::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2"))
    }

    /// A write's outcome, with a connection the app closed turned into a wait.
    fn wrote<T>(&mut self, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(Err(e))
                if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) =>
            {
                self.write_closed = true;
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Pending;
        }
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        this.wrote(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Pending;
        }
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        this.wrote(polled)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Pending;
        }
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        this.wrote(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One borrowed upstream connection.
struct Lease {
    sender: SendRequest<UpstreamBody>,
    conn: Pin<Box<Conn>>,
    /// Where it goes back to.
    home: Arc<Mutex<Idle>>,
    authority: Arc<str>,
}

struct Parked {
    lease: Lease,
    since: Instant,
}

/// One worker's idle connections by upstream, and its HTTP/2 connections.
#[derive(Default)]
struct Idle {
    http1: HashMap<Arc<str>, Vec<Parked>>,
    http2: HashMap<Arc<str>, http2::SendRequest<UpstreamBody>>,
}

pub struct Pools {
    /// One per worker; the last serves threads that are not workers.
    workers: Box<[Arc<Mutex<Idle>>]>,
    connect_timeout: Duration,
}

impl Pools {
    pub fn new(workers: usize, connect_timeout: Duration) -> Pools {
        Pools { workers: (0..=workers).map(|_| Arc::default()).collect(), connect_timeout }
    }

    /// Idle HTTP/1 connections kept, over every worker.
    pub fn idle(&self) -> usize {
        self.workers.iter().map(|w| w.lock().http1.values().map(Vec::len).sum::<usize>()).sum()
    }

    fn home(&self, worker: Option<usize>) -> &Arc<Mutex<Idle>> {
        let last = self.workers.len() - 1;
        &self.workers[worker.map_or(last, |i| i.min(last))]
    }

    /// Sends `req` to `dest` on a pooled connection (a new one if none is idle) and returns
    /// the response head; its body keeps the connection until it ends.
    pub async fn send(
        &self,
        worker: Option<usize>,
        dest: Dest<'_>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, Failure> {
        let home = self.home(worker);
        // A parked connection the upstream has meanwhile closed gives the request back
        // unsent; then try the next one, and finally a fresh connection.
        loop {
            let (mut lease, fresh) = match take_idle(home, dest.key) {
                Some(Pooled::Http2(h2)) => return send_http2(h2, req).await,
                Some(Pooled::Http1(l)) => (l, false),
                // Boxed: connecting is rare and its state large.
                None => match Box::pin(connect(dest, self.connect_timeout, true)).await? {
                    Connected::Http1(sender, conn) => {
                        let lease = Lease { sender, conn, home: home.clone(), authority: dest.key.into() };
                        (lease, true)
                    }
                    Connected::Http2(h2) => {
                        home.lock().http2.insert(dest.key.into(), h2.clone());
                        return send_http2(h2, req).await;
                    }
                },
            };
            match lease.send(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let body = PooledBody { body, lease: Some(lease) };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(SendError::Unsent(r)) if !fresh => req = *r,
                Err(SendError::Unsent(_)) => {
                    return Err(Failure::Unreachable("the connection closed before the request went out".into()));
                }
                Err(SendError::Failed(e)) => return Err(classify(e)),
            }
        }
    }
}

/// A new connection, and the protocol agreed on it.
pub enum Connected {
    Http1(SendRequest<UpstreamBody>, Pin<Box<Conn>>),
    /// Its connection is driven by a task of its own, which ends when the last sender is gone.
    Http2(http2::SendRequest<UpstreamBody>),
}

/// Opens a new connection to `dest`. Over TLS, HTTP/2 is offered when `any_version`, and
/// used if the app takes it.
pub async fn connect(dest: Dest<'_>, timeout: Duration, any_version: bool) -> Result<Connected, Failure> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(dest.address)).await {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(e)) => return Err(Failure::Unreachable(e.into())),
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    let stream = match dest.tls {
        None => Stream::plain(tcp),
        Some(tls) => {
            let cfg = if any_version { &tls.any_version } else { &tls.http1 };
            let handshake = tokio_rustls::TlsConnector::from(cfg.clone()).connect(tls.server_name.clone(), tcp);
            match tokio::time::timeout(timeout, handshake).await {
                Err(_) => return Err(Failure::Timeout),
                Ok(Err(e)) => {
                    tracing::warn!(upstream = dest.address, error = %e, "TLS with the app failed");
                    return Err(Failure::Unreachable(e.into()));
                }
                Ok(Ok(s)) => Stream::tls(s),
            }
        }
    };
    if stream.alpn_h2() {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::Unreachable(e.into()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(Connected::Http2(sender));
    }
    let (sender, conn) =
        http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(|e| Failure::Unreachable(e.into()))?;
    Ok(Connected::Http1(sender, Box::pin(conn)))
}

/// Opens a new HTTP/1.1 connection to `dest`, for a request that needs one of its own.
pub async fn connect_http1(
    dest: Dest<'_>,
    timeout: Duration,
) -> Result<(SendRequest<UpstreamBody>, Pin<Box<Conn>>), Failure> {
    match connect(dest, timeout, false).await? {
        Connected::Http1(sender, conn) => Ok((sender, conn)),
        Connected::Http2(_) => Err(Failure::Unreachable("the app chose HTTP/2 where only HTTP/1.1 was offered".into())),
    }
}

/// Sends a request over HTTP/2, where the authority travels in the request's URI.
async fn send_http2(
    mut h2: http2::SendRequest<UpstreamBody>,
    req: Request<UpstreamBody>,
) -> Result<Response<PooledBody>, Failure> {
    let (mut parts, body) = req.into_parts();
    let host = parts.headers.remove(http::header::HOST);
    let authority = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri =
        format!("https://{authority}{path}").parse().map_err(|e: http::uri::InvalidUri| Failure::Internal(e.into()))?;
    parts.headers.remove(http::header::CONNECTION);
    std::future::poll_fn(|cx| h2.poll_ready(cx)).await.map_err(classify)?;
    let resp = h2.send_request(Request::from_parts(parts, body)).await.map_err(classify)?;
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(parts, PooledBody { body, lease: None }))
}

/// A connection this worker keeps to an upstream.
enum Pooled {
    Http1(Lease),
    /// Shared, not taken: HTTP/2 carries many requests at once.
    Http2(http2::SendRequest<UpstreamBody>),
}

/// This worker's open HTTP/2 connection to `key`, else an idle HTTP/1 one; one lock.
fn take_idle(home: &Mutex<Idle>, key: &str) -> Option<Pooled> {
    let mut idle = home.lock();
    if let Some(h2) = idle.http2.get(key) {
        if !h2.is_closed() {
            return Some(Pooled::Http2(h2.clone()));
        }
        idle.http2.remove(key);
    }
    let list = idle.http1.get_mut(key)?;
    while let Some(mut p) = list.pop() {
        if p.since.elapsed() < IDLE_FOR && p.lease.usable() {
            return Some(Pooled::Http1(p.lease));
        }
    }
    None
}

enum SendError {
    /// The connection was closed before the request was written; here it is back.
    Unsent(Box<Request<UpstreamBody>>),
    Failed(hyper::Error),
}

impl Lease {
    /// Polls the connection once without waiting: true if it is open and ready for a request.
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.conn.as_mut().poll(&mut cx).is_ready() {
            return false;
        }
        matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    /// Writes the request and waits for the response head, driving the connection meanwhile.
    async fn send(&mut self, req: Request<UpstreamBody>) -> Result<Response<Incoming>, SendError> {
        let mut response = std::pin::pin!(self.sender.try_send_request(req));
        let mut conn_done = false;
        std::future::poll_fn(|cx| {
            if !conn_done {
                // Ends with the connection: the pending response then fails or completes.
                conn_done = self.conn.as_mut().poll(cx).is_ready();
            }
            match response.as_mut().poll(cx) {
                Poll::Ready(Ok(resp)) => Poll::Ready(Ok(resp)),
                Poll::Ready(Err(mut e)) => Poll::Ready(Err(match e.take_message() {
                    Some(req) => SendError::Unsent(Box::new(req)),
                    None => SendError::Failed(e.into_error()),
                })),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Parks the connection for the next request, if it can take one.
    fn release(mut self) {
        if !self.usable() {
            return;
        }
        let home = self.home.clone();
        let mut idle = home.lock();
        let now = crate::clock::instant();
        let list = idle.http1.entry(self.authority.clone()).or_default();
        // The oldest is first: close it if it has idled too long.
        if list.first().is_some_and(|p| now - p.since >= IDLE_FOR) {
            list.remove(0);
        }
        if list.len() < MAX_IDLE {
            list.push(Parked { lease: self, since: now });
        }
    }
}

/// An upstream response body. While it streams it also drives its connection; at its end the
/// connection goes back to the pool. Dropped early (the client went away), the connection is
/// closed, since the rest of the response is still on it.
pub struct PooledBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PooledBody")
    }
}

impl PooledBody {
    fn finish(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(lease) = &mut this.lease
            && lease.conn.as_mut().poll(cx).is_ready()
        {
            // Closed or failed: the body below reports how it ended; nothing to park.
            this.lease = None;
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body without content (HEAD, 204, 304) may never be polled.
        if self.body.is_end_stream() {
            self.finish();
        }
    }
}

/// A request body on its way to an upstream.
pub enum UpstreamBody {
    /// Read whole before the request started.
    Full(Option<Bytes>),
    /// What was read while deciding, then the rest as it comes.
    Stream { first: Option<Bytes>, rest: Limited<http_body_util::combinators::BoxBody<Bytes, Cause>> },
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::Full(b) => std::task::Poll::Ready(b.take().map(|b| Ok(hyper::body::Frame::data(b)))),
            UpstreamBody::Stream { first, rest } => match first.take() {
                Some(b) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(b)))),
                None => std::pin::Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(b) => b.is_none(),
            UpstreamBody::Stream { first, rest } => first.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            UpstreamBody::Full(b) => hyper::body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Stream { .. } => hyper::body::SizeHint::default(),
        }
    }
}

/// The error behind a failure, for the log.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why a forward failed; each maps to one status, and carries its cause for the log.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The upstream refused or broke the connection: 502.
    #[error("the app refused or broke the connection")]
    Unreachable(#[source] Cause),
    /// The upstream did not answer in time: 504.
    #[error("the app did not answer in time")]
    Timeout,
    /// The request body was larger than allowed: 413.
    #[error("the request body is larger than allowed")]
    TooLarge,
    /// The client's body was malformed (bad chunk framing): 400.
    #[error("the client's request body broke its framing")]
    BadBody,
    /// A body on a method whose body means nothing (GET, HEAD, OPTIONS, TRACE): 400.
    #[error("a body on a method that takes none")]
    BodyNotAllowed,
    /// A WebSocket from a page of another origin than the app's own: 403.
    #[error("a WebSocket from a page of another origin than the app's")]
    CrossOrigin,
    /// poort could not make the upstream request (an assertion it could not sign): 500.
    #[error("poort could not build the upstream request")]
    Internal(#[source] Cause),
}

impl Failure {
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::Unreachable(_) => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Failure::BadBody | Failure::BodyNotAllowed => StatusCode::BAD_REQUEST,
            Failure::CrossOrigin => StatusCode::FORBIDDEN,
            Failure::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

pub(crate) fn classify(e: hyper::Error) -> Failure {
    let chain = || {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        std::iter::from_fn(move || {
            let cur = next?;
            next = cur.source();
            Some(cur)
        })
    };
    if chain().any(|s| s.downcast_ref::<http_body_util::LengthLimitError>().is_some()) {
        return Failure::TooLarge;
    }
    // The request body stream (the client's body) failed while it was being forwarded: bad
    // chunk framing or a body cut short.
    if chain().any(|s| s.downcast_ref::<hyper::Error>().is_some_and(|e| e.is_user())) {
        return Failure::BadBody;
    }
    if chain().any(|s| s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)) {
        return Failure::Timeout;
    }
    Failure::Unreachable(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failure_carries_its_cause() {
        // A port nothing listens on: bound, then let go.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        let dest = Dest { key: &address, address: &address, tls: None };
        let Err(failure) = connect(dest, Duration::from_secs(2), true).await else {
            panic!("nothing listens there");
        };
        assert_eq!(failure.status(), StatusCode::BAD_GATEWAY);
        let cause = std::error::Error::source(&failure).expect("a cause for the log");
        let io = cause.downcast_ref::<std::io::Error>().expect("the connect error");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}

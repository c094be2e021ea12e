//! HTTP/1.1 connections, served by poort itself rather than by the HTTP library.
//!
//! Every request head is checked byte by byte (`request::head`) and then parsed once; a head
//! that fails is never parsed: in its place the gateway gets one fixed request whose target
//! carries this process's random marker, which it answers with the refusal (audited, 400, 414
//! or 431), and the connection closes. Bodies are read as the handler asks for them, by their
//! one framing (a length, or chunks whose framing is followed strictly); a body left unread
//! closes the connection after the answer, so its bytes are never taken for a next request.
//!
//! Why not the library's server: it keeps an 8 KiB read buffer and an 8 KiB write buffer for
//! the life of each connection, and parsed every head a second time after the check. Here an
//! idle connection holds no buffer at all (reads go through the stack and only what is left
//! over of a read is kept), an answer's head and a small body go out in one write, and a
//! request's state lives in one boxed future only while it is being answered.

use std::future::poll_fn;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Body as _;
use parking_lot::Mutex;

use super::{Conn, Handler};
use crate::body::wire::{H1Body, Io, Left, UpgradeSlot, Upgraded, Wire, next_head, send};
use crate::body::{Body, RequestBody};
use crate::request::Reject;
use crate::request::head::{Chunked, Framing};

/// A body frame at least this large is written as it is; smaller ones are copied in behind
/// the head (or the frames before them), so that a small answer leaves in one write.
const WRITE_AS_IS: usize = 8 * 1024;

/// Why the connection's last head was refused, for the marker request.
#[derive(Debug, Default)]
pub struct Refused(Mutex<Option<Reject>>);

impl Refused {
    /// The refusal behind the marker request, once.
    pub fn take(&self) -> Option<Reject> {
        self.0.lock().take()
    }
}

/// What becomes of the connection after an answer.
enum After {
    Next,
    Close,
}

/// Serves HTTP/1.1 on `io` until the client leaves, a head takes longer than
/// `header_timeout` (also the wait for a next request), an answer closes the connection, or
/// `draining` turns true between requests.
pub(super) async fn serve<H: Handler>(
    gw: Arc<H>,
    peer: SocketAddr,
    conn: Arc<Conn>,
    io: Box<dyn Io>,
    header_timeout: Duration,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let wire = Arc::new(Mutex::new(Wire::new(io)));
    let deadline = tokio::time::sleep(header_timeout);
    tokio::pin!(deadline);
    loop {
        if *draining.borrow() {
            break;
        }
        deadline.as_mut().reset(tokio::time::Instant::now() + header_timeout);
        let next = tokio::select! {
            biased;
            next = next_head(&wire) => next,
            () = &mut deadline => break,
            _ = draining.changed() => break,
        };
        let next = match next {
            Ok(Some(next)) => next,
            Ok(None) | Err(_) => break,
        };
        // Boxed: a connection waiting between requests keeps no request's state.
        match Box::pin(exchange(gw.clone(), peer, &conn, &wire, next)).await {
            Ok(After::Next) => {
                let mut w = wire.lock();
                if w.buf.is_empty() {
                    // What a read left over is kept only while it is needed.
                    w.buf = BytesMut::new();
                }
            }
            Ok(After::Close) | Err(_) => break,
        }
    }
    let io = wire.lock().io.take();
    if let Some(mut io) = io {
        let _ = tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncWriteExt::shutdown(&mut io)).await;
    }
}

/// One request: its head parsed, answered by `gw`, the answer written.
async fn exchange<H: Handler>(
    gw: Arc<H>,
    peer: SocketAddr,
    conn: &Conn,
    wire: &Arc<Mutex<Wire>>,
    next: Result<(Bytes, Framing), Reject>,
) -> io::Result<After> {
    let parsed = next.and_then(|(head, framing)| Ok((request_of(&head)?, framing)));
    let (mut req, framing) = match parsed {
        Ok(ok) => ok,
        Err(why) => {
            *conn.refused.0.lock() = Some(why);
            let mut req = Request::new(RequestBody::Empty);
            *req.uri_mut() = Uri::from_static(gw.marker());
            req.headers_mut().insert(header::HOST, HeaderValue::from_static("refused.invalid"));
            let resp = gw.handle(peer, conn, req).await;
            write_answer(wire, resp, false, true).await?;
            return Ok(After::Close);
        }
    };
    let http10 = req.version() == Version::HTTP_10;
    let mut close = http10 || has_token(req.headers(), header::CONNECTION, "close");
    let head_only = req.method() == Method::HEAD;
    let mut upgrade = None;
    match framing {
        Framing::None => {}
        Framing::Upgrade => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            req.extensions_mut().insert(UpgradeSlot(Arc::new(Mutex::new(Some(rx)))));
            upgrade = Some(tx);
        }
        Framing::Length(_) | Framing::Chunked => {
            let mut w = wire.lock();
            w.turn += 1;
            w.left = match framing {
                Framing::Length(n) => Left::Length(n),
                _ => Left::Chunked(Chunked::default()),
            };
            if !http10 && has_token(req.headers(), header::EXPECT, "100-continue") {
                w.owed_continue = Some(0);
            }
            let turn = w.turn;
            drop(w);
            *req.body_mut() = RequestBody::H1(H1Body { wire: wire.clone(), turn });
        }
    }
    let resp = gw.handle(peer, conn, req).await;
    // The bytes after a request that asked to switch protocols were never checked as HTTP:
    // if the answer does not switch, the connection closes after it.
    close |= upgrade.is_some() && resp.status() != StatusCode::SWITCHING_PROTOCOLS;
    if let Some(tx) = upgrade
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        write_answer(wire, resp, true, false).await?;
        let mut w = wire.lock();
        let early = w.buf.split().freeze();
        if let Some(io) = w.io.take() {
            let _ = tx.send(Upgraded { io, early });
        }
        return Ok(After::Close);
    }
    close |= write_answer(wire, resp, head_only, close || http10).await?;
    // A body the answer left unread (or whose 100 Continue was never sent) would be read as
    // the next request: the connection closes instead.
    let mut w = wire.lock();
    if !matches!(w.left, Left::Nothing) || w.owed_continue.is_some() {
        close = true;
    }
    // A body still held (by an upload that outlived its answer) reads nothing more.
    w.turn += 1;
    w.left = Left::Nothing;
    w.owed_continue = None;
    Ok(if close { After::Close } else { After::Next })
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
}

/// The request a checked head describes (its body comes later).
fn request_of(head: &Bytes) -> Result<Request<RequestBody>, Reject> {
    let mut fields = [httparse::EMPTY_HEADER; crate::request::MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Reject::RequestLine),
    }
    let (Some(method), Some(path), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(Reject::RequestLine);
    };
    let mut req = Request::new(RequestBody::Empty);
    *req.method_mut() = Method::from_bytes(method.as_bytes()).map_err(|_| Reject::RequestLine)?;
    *req.uri_mut() = Uri::from_maybe_shared(head.slice_ref(path.as_bytes())).map_err(|_| Reject::RequestLine)?;
    *req.version_mut() = if version == 1 { Version::HTTP_11 } else { Version::HTTP_10 };
    let headers = req.headers_mut();
    headers.reserve(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Reject::BadHeaderName)?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(field.value)).map_err(|_| Reject::BadHeaderValue)?;
        headers.append(name, value);
    }
    Ok(req)
}

/// Writes an answer: its head, then its body framed by its length when known, else in chunks
/// (or, for an HTTP/1.0 client, until the connection closes). With `head_only`, the body is
/// not sent. Returns whether the connection must close after it.
async fn write_answer(wire: &Mutex<Wire>, resp: Response<Body>, head_only: bool, close: bool) -> io::Result<bool> {
    let (parts, body) = resp.into_parts();
    let status = parts.status;
    let no_body = head_only || status.is_informational() || matches!(status.as_u16(), 204 | 304);
    let length = body.size_hint().exact();
    let close = close || has_token(&parts.headers, header::CONNECTION, "close");
    // Unknown length: chunks, except to an HTTP/1.0 client, whose answer ends with the
    // connection (`close` is set for it).
    let chunked = !no_body && length.is_none() && !close;
    let mut out = Vec::with_capacity(256 + length.filter(|n| *n < WRITE_AS_IS as u64).unwrap_or(0) as usize);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let framing_set = !no_body;
    for (name, value) in &parts.headers {
        if framing_set && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING) {
            continue;
        }
        if name == header::CONNECTION && close {
            continue;
        }
        field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if framing_set {
        match length {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                let _ = write!(out, "{n}\r\n");
            }
            None if chunked => field(&mut out, b"transfer-encoding", b"chunked"),
            None => {}
        }
    }
    if close {
        field(&mut out, b"connection", b"close");
    }
    if !parts.headers.contains_key(header::DATE) {
        put_date(&mut out);
    }
    out.extend_from_slice(b"\r\n");
    if no_body {
        send(wire, &[&out]).await?;
        return Ok(close);
    }
    let mut body = std::pin::pin!(body);
    let mut sent: u64 = 0;
    loop {
        // Take what the body has ready; write out what is collected before waiting for more.
        let ready = poll_fn(|cx| {
            Poll::Ready(match body.as_mut().poll_frame(cx) {
                Poll::Ready(f) => Some(f),
                Poll::Pending => None,
            })
        })
        .await;
        let frame = match ready {
            Some(f) => f,
            None => {
                if !out.is_empty() {
                    send(wire, &[&out]).await?;
                    out.clear();
                }
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(io::Error::other(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                // Trailers are not passed on; an empty chunk would end the body early.
                _ => continue,
            },
        };
        sent += data.len() as u64;
        if length.is_some_and(|n| sent > n) {
            return Err(io::Error::other("an answer longer than its length"));
        }
        if chunked {
            let _ = write!(out, "{:x}\r\n", data.len());
        }
        if data.len() >= WRITE_AS_IS {
            send(wire, &[&out, &data]).await?;
            out.clear();
        } else {
            out.extend_from_slice(&data);
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if length.is_some_and(|n| sent != n) {
        return Err(io::Error::other("an answer shorter than its length"));
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    send(wire, &[&out]).await?;
    Ok(close)
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The `Date` field of an answer (RFC 9110 §6.6.1), formatted once a second per thread. The
/// system's clock, not `clock::Clock`: the field informs caches and decides nothing here.
#[allow(clippy::disallowed_methods)]
fn put_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static NOW: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    NOW.with(|n| {
        let mut n = n.borrow_mut();
        if n.0 != secs || n.1.is_empty() {
            *n = (secs, httpdate::fmt_http_date(now));
        }
        field(out, b"date", n.1.as_bytes());
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::head::MAX_HEAD_BYTES;
    use http_body_util::BodyExt;
    use std::pin::Pin;
    use std::task::Context;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// Answers every request with 200 and what it read, and notes each request as
    /// `METHOD TARGET BODY` (the body as read, or `!` where reading it failed); a refused head
    /// is noted as `refused Why`.
    #[derive(Default)]
    struct Echo(Mutex<Vec<String>>);

    const MARK: &str = "/.poort/refused/MARK";

    impl Handler for Echo {
        fn marker(&self) -> &'static str {
            MARK
        }

        async fn handle(self: Arc<Self>, _: SocketAddr, conn: &Conn, req: Request<RequestBody>) -> Response<Body> {
            if req.uri().path() == MARK {
                self.0.lock().push(format!("refused {:?}", conn.refused.take()));
                let mut resp = Response::new(Body::from_static("refused"));
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                return resp;
            }
            let (parts, body) = req.into_parts();
            let body = match body.collect().await {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                Err(_) => "!".into(),
            };
            self.0.lock().push(format!("{} {} {body}", parts.method, parts.uri).trim_end().to_string());
            Response::new(Body::from(format!("read {body}")))
        }
    }

    /// A client that sends `data` in reads of the given sizes, in turn, then ends; what the
    /// server writes is kept.
    struct Pieces {
        data: Vec<u8>,
        sizes: Vec<usize>,
        at: usize,
        turn: usize,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Pieces {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let size = self.sizes[self.turn % self.sizes.len()].max(1);
            self.turn += 1;
            let n = size.min(self.data.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Pieces {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.out.lock().extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// What the handler saw of `data` sent in reads of `sizes`, and what the client got back.
    async fn served(data: &[u8], sizes: Vec<usize>) -> (Vec<String>, String) {
        let echo = Arc::new(Echo::default());
        let out = Arc::new(Mutex::new(Vec::new()));
        let io = Pieces { data: data.to_vec(), sizes, at: 0, turn: 0, out: out.clone() };
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("an address");
        let conn = Arc::new(Conn::default());
        tokio::time::timeout(
            Duration::from_secs(5),
            serve(echo.clone(), peer, conn, Box::new(io), Duration::from_secs(5), rx),
        )
        .await
        .expect("the connection ends with its client");
        let seen = echo.0.lock().clone();
        let answers = String::from_utf8_lossy(&out.lock()).into_owned();
        (seen, answers)
    }

    const STREAMS: [(&[u8], &[&str]); 6] = [
        (
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcPOST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nxyz\r\n2\r\nzz\r\n0\r\nT: v\r\n\r\nGET /z HTTP/1.1\r\nHost: a\r\n\r\n",
            &["GET /", "POST /x abc", "POST /y xyzzz", "GET /z"],
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
            &["refused Some(LengthAndChunked)"],
        ),
        (
            b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\nHost: a\n\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n",
            &["GET /a", "refused Some(BareLineFeed)"],
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyzGET /smuggled HTTP/1.1\r\n\r\n",
            &["POST /x !"],
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n",
            &["GET /ws"],
        ),
        (
            b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok",
            &["GET /a", "GET /b", "GET /c ok"],
        ),
    ];

    /// However a stream is cut into reads, the handler sees the same requests: good ones in
    /// order, a refused head and nothing after it, a body whose chunks break as a failed body
    /// and nothing after it, and nothing after an upgrade request that was not switched.
    #[tokio::test]
    async fn the_cut_of_the_reads_changes_nothing() {
        for (data, want) in STREAMS {
            for sizes in [vec![data.len()], vec![1], vec![2], vec![3, 7], vec![13], vec![29, 1], vec![5, 100, 2]] {
                let (seen, answers) = served(data, sizes.clone()).await;
                let what = format!("{:?} in reads of {sizes:?}", String::from_utf8_lossy(data));
                assert_eq!(seen, want, "{what}");
                assert_eq!(answers.matches("HTTP/1.1 ").count(), want.len(), "{what}: {answers}");
            }
        }
    }

    #[tokio::test]
    async fn answers_are_framed() {
        // A length when the body's is known, the body itself once; HEAD gets the head only.
        let (_, out) =
            served(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nHEAD /b HTTP/1.1\r\nHost: a\r\n\r\n", vec![1000]).await;
        let mut answers = out.split("HTTP/1.1 ").skip(1);
        let first = answers.next().expect("an answer");
        assert!(first.starts_with("200 OK\r\n") && first.contains("content-length: 5\r\n"), "{first}");
        assert!(first.ends_with("\r\n\r\nread "), "{first}");
        let second = answers.next().expect("an answer to HEAD");
        assert!(second.ends_with("\r\n\r\n") && second.contains("date: "), "{second}");
        // HTTP/1.0: the connection closes after the answer; nothing after it is read.
        let (seen, out) = served(b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n", vec![1000]).await;
        assert_eq!(seen, ["GET /a"]);
        assert!(out.contains("connection: close\r\n"), "{out}");
        // A client that asks to close gets its answer, then the close.
        let (seen, _) =
            served(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n", vec![1000]).await;
        assert_eq!(seen, ["GET /a"]);
    }

    #[tokio::test]
    async fn a_client_that_expects_100_continue_gets_it_when_the_body_is_read() {
        let (seen, out) =
            served(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi", vec![1000]).await;
        assert_eq!(seen, ["POST /x hi"]);
        assert!(out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), "{out}");
    }

    /// A body cut short by the end of the connection fails: the handler never takes a part
    /// for the whole.
    #[tokio::test]
    async fn a_body_cut_short_fails() {
        let (seen, _) = served(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", vec![1000]).await;
        assert_eq!(seen, ["POST /x !"]);
        let (seen, _) = served(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", vec![1000]).await;
        assert_eq!(seen, ["POST /x !"]);
    }

    #[tokio::test]
    async fn a_head_too_large_is_refused() {
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        let (seen, out) = served(huge.as_bytes(), vec![4096]).await;
        assert_eq!(seen, ["refused Some(HeadersTooLarge)"]);
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    }
}

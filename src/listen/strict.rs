//! An HTTP/1 connection as the HTTP library reads it, with every request head checked first
//! (`request::head`) and every chunked body's framing followed. A head that fails is never
//! shown to the library: in its place it reads one fixed request whose target carries this
//! process's random marker, which the gateway answers with the refusal (audited, 400, 414 or
//! 431, connection closed), and then the end of the stream. Broken chunk framing inside a body
//! ends the body with an error. After a request that asks to switch protocols the bytes pass
//! untouched; the gateway closes any such connection that did not switch.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::request::Reject;
use crate::request::head::{self, Chunked, Framing, MAX_HEAD_BYTES};

/// What the gateway learns from a connection's wrapper.
#[derive(Debug, Default)]
pub struct Refused(Mutex<Option<Reject>>);

impl Refused {
    /// The refusal behind the marker request, once.
    pub fn take(&self) -> Option<Reject> {
        self.0.lock().take()
    }
}

#[derive(Debug)]
enum State {
    Head,
    Length(u64),
    Chunked(Chunked),
    /// Bytes pass as they are (HTTP/2, or after an upgrade request).
    Through,
    /// The marker request has been handed over; nothing follows it.
    Closed,
    /// A body's framing broke; every later read fails.
    Broken,
}

pub struct Strict<T> {
    inner: T,
    state: State,
    /// Read from the peer, not yet looked at.
    pending: BytesMut,
    /// Checked, for the library to read.
    ready: BytesMut,
    /// How much of `pending` was searched for the end of a head already.
    scanned: usize,
    refused: Arc<Refused>,
    marker: &'static str,
    eof: bool,
}

impl<T> Strict<T> {
    /// Wraps an HTTP/1 connection; with `through`, nothing is checked (HTTP/2).
    pub fn new(inner: T, through: bool, refused: Arc<Refused>, marker: &'static str) -> Strict<T> {
        Strict {
            inner,
            state: if through { State::Through } else { State::Head },
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            scanned: 0,
            refused,
            marker,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Moves what can be checked from `pending` to `ready`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            if self.pending.is_empty() {
                return Ok(());
            }
            match &mut self.state {
                State::Through => {
                    let all = self.pending.split();
                    self.ready.unsplit(all);
                    return Ok(());
                }
                State::Closed => {
                    self.pending.clear();
                    return Ok(());
                }
                State::Broken => return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed request body")),
                State::Head => {
                    // Empty lines before a request line are allowed (RFC 9112 §2.2), and dropped.
                    if self.scanned == 0 {
                        while self.pending.starts_with(b"\r\n") {
                            self.pending.advance(2);
                        }
                        if self.pending.is_empty() || self.pending == b"\r"[..] {
                            return Ok(());
                        }
                    }
                    let Some(end) = head::head_end_from(&self.pending, self.scanned) else {
                        self.scanned = self.pending.len();
                        if self.pending.len() > MAX_HEAD_BYTES {
                            self.refuse(Reject::HeadersTooLarge);
                        }
                        return Ok(());
                    };
                    self.scanned = 0;
                    match head::check_head(&self.pending[..end]) {
                        Ok(framing) => {
                            let h = self.pending.split_to(end);
                            self.ready.unsplit(h);
                            self.state = match framing {
                                Framing::None => State::Head,
                                Framing::Length(n) => State::Length(n),
                                Framing::Chunked => State::Chunked(Chunked::default()),
                                Framing::Upgrade => State::Through,
                            };
                        }
                        Err(r) => self.refuse(r),
                    }
                }
                State::Length(left) => {
                    let n = (self.pending.len() as u64).min(*left) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::Head;
                    }
                    let body = self.pending.split_to(n);
                    self.ready.unsplit(body);
                }
                State::Chunked(c) => match c.feed(&self.pending) {
                    Ok(n) => {
                        if c.done() {
                            self.state = State::Head;
                        }
                        let body = self.pending.split_to(n);
                        self.ready.unsplit(body);
                    }
                    Err(_) => {
                        self.state = State::Broken;
                        self.pending.clear();
                        // What was checked before the break still reaches the library;
                        // the error comes after it.
                        if self.ready.is_empty() {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed chunked body"));
                        }
                        return Ok(());
                    }
                },
            }
        }
    }

    /// Hands the library the marker request instead of the refused head.
    fn refuse(&mut self, why: Reject) {
        *self.refused.0.lock() = Some(why);
        let marker = format!("GET {} HTTP/1.1\r\nHost: refused.invalid\r\nConnection: close\r\n\r\n", self.marker);
        self.ready.extend_from_slice(marker.as_bytes());
        self.pending.clear();
        self.state = State::Closed;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Strict<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready.split_to(n));
                if this.ready.is_empty() && this.pending.is_empty() {
                    // An idle connection keeps no buffer.
                    this.ready = BytesMut::new();
                    this.pending = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            match this.state {
                // Not the end of the stream: the library would take that for a client gone
                // and drop the answer. It closes the connection after answering the marker.
                State::Closed => return Poll::Pending,
                State::Broken => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "malformed request body")));
                }
                State::Through if this.pending.is_empty() => return Pin::new(&mut this.inner).poll_read(cx, buf),
                _ if this.eof => return Poll::Ready(Ok(())),
                _ => {}
            }
            // Read into the caller's buffer, then take the bytes back to check them first.
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let got = &buf.filled()[before..];
            if got.is_empty() {
                // The peer is done; what is left unchecked (a head cut off) is dropped.
                this.eof = true;
                continue;
            }
            this.pending.extend_from_slice(got);
            buf.set_filled(before);
            if let Err(e) = this.process() {
                return Poll::Ready(Err(e));
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Strict<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn through(input: &[u8]) -> (Vec<u8>, Option<Reject>, bool) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.unwrap();
        drop(client);
        let refused = Arc::new(Refused::default());
        let mut s = Strict::new(server, false, refused.clone(), "/.poort/refused/MARK");
        let mut out = Vec::with_capacity(1 << 20);
        // After the marker the wrapper waits (for the answer to close the connection).
        let failed = match tokio::time::timeout(std::time::Duration::from_millis(200), s.read_to_end(&mut out)).await {
            Ok(r) => r.is_err(),
            Err(_) => false,
        };
        (out, refused.take(), failed)
    }

    /// A stream that yields `data` in reads of the given sizes, in turn.
    struct Pieces {
        data: Vec<u8>,
        sizes: Vec<usize>,
        at: usize,
        turn: usize,
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

    /// What the library reads of `data` delivered in reads of `sizes`, whether reading failed,
    /// and the refusal.
    async fn in_pieces(data: &[u8], sizes: Vec<usize>) -> (Vec<u8>, bool, Option<Reject>) {
        let refused = Arc::new(Refused::default());
        let pieces = Pieces { data: data.to_vec(), sizes, at: 0, turn: 0 };
        let mut s = Strict::new(pieces, false, refused.clone(), "/.poort/refused/MARK");
        let mut out = Vec::new();
        let mut chunk = [0u8; 97];
        let failed = loop {
            match tokio::time::timeout(std::time::Duration::from_millis(50), s.read(&mut chunk)).await {
                Ok(Ok(0)) | Err(_) => break false,
                Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
                Ok(Err(_)) => break true,
            }
        };
        (out, failed, refused.take())
    }

    /// However a stream is cut into reads, the library reads the same: checking a read where
    /// it lies and checking it the long way agree, for good streams and for every refusal.
    #[tokio::test]
    async fn the_cut_of_the_reads_changes_nothing() {
        let streams: [&[u8]; 6] = [
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcPOST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\nGET /z HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\nHost: a\n\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyzGET /smuggled HTTP/1.1\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello\nnot http",
            b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok",
        ];
        for data in streams {
            let whole = in_pieces(data, vec![data.len()]).await;
            for sizes in [vec![1], vec![2], vec![3, 7], vec![13], vec![29, 1], vec![40, 64], vec![5, 100, 2]] {
                let cut = in_pieces(data, sizes.clone()).await;
                let what = format!("{:?} in reads of {sizes:?}", String::from_utf8_lossy(data));
                assert_eq!((cut.1, cut.2), (whole.1, whole.2), "{what}");
                if whole.1 {
                    // Broken framing: body bytes checked before the break may pass first, as
                    // they arrived; nothing after it does.
                    let (short, long) =
                        if cut.0.len() < whole.0.len() { (&cut.0, &whole.0) } else { (&whole.0, &cut.0) };
                    assert!(long.starts_with(short), "{what}");
                    assert!(!long.windows(9).any(|w| w == b"/smuggled"), "{what}");
                } else {
                    assert_eq!(cut.0, whole.0, "{what}");
                }
            }
        }
    }

    #[tokio::test]
    async fn good_requests_pass_unchanged() {
        let input = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcPOST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\nGET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        let (out, refused, failed) = through(input).await;
        assert_eq!(out, &input[2..]);
        assert_eq!((refused, failed), (None, false));
    }

    #[tokio::test]
    async fn a_bad_head_becomes_the_marker_and_nothing_after_it_passes() {
        let smuggle = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n";
        let (out, refused, _) = through(smuggle).await;
        assert_eq!(out, b"GET /.poort/refused/MARK HTTP/1.1\r\nHost: refused.invalid\r\nConnection: close\r\n\r\n");
        assert_eq!(refused, Some(Reject::LengthAndChunked));
        // The second request is the bad one: the first passes, then the marker.
        let second = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\nHost: a\n\n";
        let (out, refused, _) = through(second).await;
        assert!(out.starts_with(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /.poort/refused/MARK"));
        assert_eq!(refused, Some(Reject::BareLineFeed));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(through(huge.as_bytes()).await.1, Some(Reject::HeadersTooLarge));
    }

    #[tokio::test]
    async fn a_body_that_breaks_its_chunking_fails() {
        let input =
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyzGET /smuggled HTTP/1.1\r\n\r\n";
        let (out, _, failed) = through(input).await;
        assert!(failed);
        assert!(!out.windows(9).any(|w| w == b"/smuggled"));
    }

    #[tokio::test]
    async fn after_an_upgrade_bytes_pass() {
        let input =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello\nnot http";
        let (out, refused, failed) = through(input).await;
        assert_eq!(out, input);
        assert_eq!((refused, failed), (None, false));
    }
}

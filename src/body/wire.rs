//! The bytes of an HTTP/1.1 connection as `listen::h1` serves it: what was read and not yet
//! used, the current request's body (read as the handler polls it, by its one framing), and
//! the connection handed over when a request switches protocols. Shared between the loop that
//! answers requests and the body of the request being answered.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use hyper::body::{Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::request::Reject;
use crate::request::head::{self, Chunked, Framing, MAX_HEAD_BYTES};

/// The most bytes taken from the connection in one read. The bytes go through the stack, so
/// a connection waiting for its next request keeps no buffer.
const READ_SIZE: usize = 16 * 1024;

/// A connection's byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Where the current request's body is.
#[derive(Debug)]
pub(crate) enum Left {
    Nothing,
    Length(u64),
    Chunked(Chunked),
    /// The body's framing broke, or the connection ended inside it.
    Broken,
}

/// The connection, shared between the loop that answers requests and the body of the request
/// being answered.
pub(crate) struct Wire {
    /// Taken when the connection switches protocols or closes.
    pub(crate) io: Option<Box<dyn Io>>,
    /// Read and not yet used: part of a head, body bytes, or a pipelined next request.
    pub(crate) buf: BytesMut,
    pub(crate) left: Left,
    /// Bytes of `100 Continue` still to write before the body is first read.
    pub(crate) owed_continue: Option<usize>,
    eof: bool,
    /// Counts requests: a body belongs to the request of its turn only.
    pub(crate) turn: u64,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection is closed")
}

impl Wire {
    pub(crate) fn new(io: Box<dyn Io>) -> Wire {
        Wire { io: Some(io), buf: BytesMut::new(), left: Left::Nothing, owed_continue: None, eof: false, turn: 0 }
    }

    /// Reads what the peer sent onto `buf`; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.eof {
            return Poll::Ready(Ok(0));
        }
        let io = self.io.as_mut().ok_or_else(gone)?;
        let mut space = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut read = ReadBuf::uninit(&mut space);
        ready!(Pin::new(io).poll_read(cx, &mut read))?;
        let got = read.filled();
        if got.is_empty() {
            self.eof = true;
        } else {
            self.buf.extend_from_slice(got);
        }
        Poll::Ready(Ok(got.len()))
    }

    /// The next request head once `buf` holds all of it, checked; `scanned` is how much of
    /// `buf` was searched for its end already.
    fn take_head(&mut self, scanned: &mut usize) -> Option<Result<(Bytes, Framing), Reject>> {
        // Empty lines before a request line are allowed (RFC 9112 §2.2), and dropped.
        if *scanned == 0 {
            while self.buf.starts_with(b"\r\n") {
                self.buf.advance(2);
            }
            // Nothing yet, or what may be the start of another empty line.
            if self.buf.is_empty() || self.buf[..] == b"\r"[..] {
                return None;
            }
        }
        let Some(end) = head::head_end_from(&self.buf, *scanned) else {
            *scanned = self.buf.len();
            if self.buf.len() > MAX_HEAD_BYTES {
                return Some(Err(Reject::HeadersTooLarge));
            }
            return None;
        };
        *scanned = 0;
        let head = self.buf.split_to(end).freeze();
        Some(head::check_head(&head).map(|framing| (head, framing)))
    }

    /// Writes `bufs` (with `done` bytes of them written already), then flushes.
    fn poll_send(&mut self, cx: &mut Context<'_>, bufs: &[&[u8]], done: &mut usize) -> Poll<io::Result<()>> {
        let io = self.io.as_mut().ok_or_else(gone)?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        while *done < total {
            let (mut skip, mut k) = (*done, 0);
            let mut slices = [io::IoSlice::new(&[]), io::IoSlice::new(&[])];
            for b in bufs {
                if skip >= b.len() {
                    skip -= b.len();
                } else {
                    slices[k] = io::IoSlice::new(&b[skip..]);
                    (skip, k) = (0, k + 1);
                }
            }
            let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Pin::new(io).poll_flush(cx)
    }

    /// Writes the `100 Continue` the client waits for, if one is owed.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(mut done) = self.owed_continue {
            let sent = self.poll_send(cx, &[CONTINUE], &mut done);
            self.owed_continue = Some(done);
            ready!(sent)?;
            self.owed_continue = None;
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes `bufs` (at most two) whole to the connection and flushes it.
pub(crate) async fn send(wire: &Mutex<Wire>, bufs: &[&[u8]]) -> io::Result<()> {
    debug_assert!(bufs.len() <= 2);
    let mut done = 0;
    poll_fn(|cx| wire.lock().poll_send(cx, bufs, &mut done)).await
}

/// The next request head, or None when the connection ended before one began (or inside one).
pub(crate) async fn next_head(wire: &Mutex<Wire>) -> io::Result<Option<Result<(Bytes, Framing), Reject>>> {
    let mut scanned = 0;
    poll_fn(|cx| {
        let mut w = wire.lock();
        loop {
            if let Some(head) = w.take_head(&mut scanned) {
                return Poll::Ready(Ok(Some(head)));
            }
            if ready!(w.poll_fill(cx))? == 0 {
                return Poll::Ready(Ok(None));
            }
        }
    })
    .await
}

/// The body of an HTTP/1 request, read from its connection as it is polled.
pub struct H1Body {
    pub(crate) wire: Arc<Mutex<Wire>>,
    pub(crate) turn: u64,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("H1Body")
    }
}

impl hyper::body::Body for H1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let mut guard = self.wire.lock();
        let w = &mut *guard;
        if w.turn != self.turn {
            return Poll::Ready(None);
        }
        ready!(w.poll_continue(cx))?;
        loop {
            match &mut w.left {
                Left::Nothing => return Poll::Ready(None),
                Left::Broken => return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, "bad body")))),
                Left::Length(left) if !w.buf.is_empty() => {
                    let n = (w.buf.len() as u64).min(*left);
                    *left -= n;
                    if *left == 0 {
                        w.left = Left::Nothing;
                    }
                    let data = w.buf.split_to(n as usize).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Left::Chunked(c) if !w.buf.is_empty() => match c.next_data(&w.buf) {
                    Ok((used, data)) => {
                        let done = c.done();
                        let taken = w.buf.split_to(used).freeze();
                        if done {
                            w.left = Left::Nothing;
                        }
                        if !data.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(taken.slice(data)))));
                        }
                        continue;
                    }
                    Err(_) => {
                        w.left = Left::Broken;
                        continue;
                    }
                },
                Left::Length(_) | Left::Chunked(_) => {}
            }
            // The body needs more bytes than have arrived.
            if ready!(w.poll_fill(cx))? == 0 {
                w.left = Left::Broken;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let w = self.wire.lock();
        w.turn != self.turn || matches!(w.left, Left::Nothing)
    }

    fn size_hint(&self) -> SizeHint {
        let w = self.wire.lock();
        match w.left {
            _ if w.turn != self.turn => SizeHint::with_exact(0),
            Left::Nothing => SizeHint::with_exact(0),
            Left::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// The connection of a request that switched protocols, with what the client sent after
/// its head.
pub struct Upgraded {
    pub(crate) io: Box<dyn Io>,
    pub(crate) early: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Where a request that asks to switch protocols gets its connection, once its 101 is sent.
#[derive(Clone)]
pub(crate) struct UpgradeSlot(pub(crate) Arc<Mutex<Option<tokio::sync::oneshot::Receiver<Upgraded>>>>);

/// The connection of `req` once the answer to it switched protocols (an HTTP/1.1 request with
/// `Upgrade`); fails for any other request, and when the answer did not switch.
pub fn on_upgrade<B>(req: &mut Request<B>) -> impl Future<Output = Result<Upgraded, ()>> + Send + 'static {
    let rx = req.extensions_mut().remove::<UpgradeSlot>().and_then(|s| s.0.lock().take());
    async move {
        match rx {
            Some(rx) => rx.await.map_err(|_| ()),
            None => Err(()),
        }
    }
}

//! One response body type for everything poort answers: its own pages (a fixed buffer) and
//! upstream responses (streamed through untouched, without buffering). A signed-in user's
//! upstream response ends, with an error, once their session does: a long stream (a download,
//! server-sent events) does not outlive a logout, a revocation or a lockdown.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};

use crate::session::Lifeline;
use crate::upstream::PooledBody;

pub mod wire;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A request's body, as a handler reads it.
#[derive(Debug)]
pub enum RequestBody {
    Empty,
    /// An HTTP/1 request's body, read from its connection as it is polled (`listen::h1`).
    H1(wire::H1Body),
    /// An HTTP/2 stream's body.
    H2(Incoming),
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::H1(b) => b.is_end_stream(),
            RequestBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::H1(b) => b.size_hint(),
            RequestBody::H2(b) => b.size_hint(),
        }
    }
}

#[derive(Debug)]
pub enum Body {
    Full(Option<Bytes>),
    /// A pooled upstream connection's response.
    Upstream(PooledBody),
    /// A response on a connection of its own.
    Direct(Incoming),
    /// An upstream response to a session, cut when the session ends.
    Watched(Box<Watched>),
    /// Chunks made as they come (a recording watched while it is made).
    Stream(tokio::sync::mpsc::Receiver<Bytes>),
}

/// Why a response stream was cut.
#[derive(Debug, thiserror::Error)]
#[error("the stream's session ended: {0}")]
pub struct Cut(pub &'static str);

/// An upstream response body tied to a session's line.
pub struct Watched {
    inner: Body,
    line: Lifeline,
    /// Made the first time the body waits for the upstream: wakes it when the line is cut.
    wait: Option<Pin<Box<dyn Future<Output = &'static str> + Send>>>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watched")
    }
}

impl Body {
    /// An upstream response body that ends when `line` does.
    pub fn watched(inner: Body, line: Lifeline) -> Body {
        Body::Watched(Box::new(Watched { inner, line, wait: None }))
    }
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }

    pub fn from_static(s: &'static str) -> Body {
        Body::Full(Some(Bytes::from_static(s.as_bytes())))
    }
}

impl From<String> for Body {
    fn from(s: String) -> Body {
        Body::Full(Some(Bytes::from(s)))
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        Body::Full(Some(b))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Upstream(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Body::Direct(inner) => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Body::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
            Body::Watched(w) => {
                if let Some(why) = w.line.ended_now() {
                    return Poll::Ready(Some(Err(Box::new(Cut(why)))));
                }
                match Pin::new(&mut w.inner).poll_frame(cx) {
                    Poll::Pending => {
                        let line = w.line.clone();
                        let wait = w.wait.get_or_insert_with(|| Box::pin(line.ended()));
                        match wait.as_mut().poll(cx) {
                            Poll::Ready(why) => Poll::Ready(Some(Err(Box::new(Cut(why))))),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                    other => other,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_none(),
            Body::Upstream(inner) => inner.is_end_stream(),
            Body::Direct(inner) => inner.is_end_stream(),
            Body::Watched(w) => w.inner.is_end_stream(),
            Body::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(inner) => inner.size_hint(),
            Body::Direct(inner) => inner.size_hint(),
            Body::Watched(w) => w.inner.size_hint(),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

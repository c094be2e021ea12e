//! One response body type for everything poort answers: its own pages (a fixed buffer) and
//! upstream responses (streamed through untouched, without buffering).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};

use crate::proxy::PooledBody;

#[derive(Debug)]
pub enum Body {
    Full(Option<Bytes>),
    /// A pooled upstream connection's response.
    Upstream(PooledBody),
    /// A response on a connection of its own.
    Direct(Incoming),
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
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Upstream(inner) => Pin::new(inner).poll_frame(cx),
            Body::Direct(inner) => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.is_none(),
            Body::Upstream(inner) => inner.is_end_stream(),
            Body::Direct(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(inner) => inner.size_hint(),
            Body::Direct(inner) => inner.size_hint(),
        }
    }
}

//! Body plumbing: the boxed body type and bodies that hold guards until
//! they end.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::balance::Outstanding;
use crate::server::Active;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy sends or receives, boxed.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A response body holding what must live until the response has been
/// sent: the request's count on its instance (so `outstanding` and
/// draining include bodies still streaming) and on its client connection
/// (so the idle timer never closes a connection mid-response). Both are
/// released at the end of the stream, or when the body is dropped.
pub struct Guarded {
    inner: Body,
    outstanding: Option<Outstanding>,
    active: Option<Active>,
}

impl Guarded {
    pub(crate) fn new(inner: Body, outstanding: Option<Outstanding>, active: Active) -> Self {
        Guarded {
            inner,
            outstanding,
            active: Some(active),
        }
    }

    fn release(&mut self) {
        self.outstanding = None;
        self.active = None;
    }
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

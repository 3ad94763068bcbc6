//! The request body of [`GrpcRequests`](super::GrpcRequests): read whole (and
//! so sent again by a retry) or passed on as it comes (sent once).

use crate::error::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A gRPC request body that [`GrpcRequests`](super::GrpcRequests) read whole
/// (a clone sends the same bytes again) or passes on as a stream (sent once:
/// a clone of it fails at its first poll with a
/// [`ClassError`](crate::classify::ClassError) of class
/// `Permanent(DoNotRetry)` — the request carries
/// [`NoRetry`](crate::retry::NoRetry), so the retry never makes one).
///
/// Becomes tonic's body with `tonic::body::Body::from(body)` (what a
/// `tonic::transport::Channel` takes).
pub struct ReplayBody(Inner);

enum Inner {
    Whole(Option<Bytes>),
    Stream {
        head: Option<Bytes>,
        rest: UnsyncBoxBody<Bytes, BoxError>,
    },
    Gone,
}

impl ReplayBody {
    pub(crate) fn whole(bytes: Bytes) -> Self {
        ReplayBody(Inner::Whole(Some(bytes)))
    }

    pub(crate) fn stream(head: Option<Bytes>, rest: UnsyncBoxBody<Bytes, BoxError>) -> Self {
        ReplayBody(Inner::Stream { head, rest })
    }

    /// Whether a clone sends the same bytes (the body was read whole).
    pub fn is_replayable(&self) -> bool {
        matches!(self.0, Inner::Whole(_))
    }
}

impl Clone for ReplayBody {
    fn clone(&self) -> Self {
        match &self.0 {
            Inner::Whole(b) => ReplayBody(Inner::Whole(b.clone())),
            _ => ReplayBody(Inner::Gone),
        }
    }
}

impl fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Inner::Whole(b) => write!(
                f,
                "ReplayBody::Whole({} B)",
                b.as_ref().map_or(0, Bytes::len)
            ),
            Inner::Stream { .. } => f.write_str("ReplayBody::Stream"),
            Inner::Gone => f.write_str("ReplayBody::Gone"),
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Inner::Whole(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream { head, rest } => {
                if let Some(h) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(h))));
                }
                Pin::new(rest).poll_frame(cx)
            }
            Inner::Gone => {
                self.0 = Inner::Whole(None);
                Poll::Ready(Some(Err(crate::classify::ClassError::new(
                    crate::classify::Class::permanent(crate::classify::Permanent::DoNotRetry),
                    "a streamed gRPC request body cannot be sent twice",
                )
                .into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Whole(b) => b.is_none(),
            Inner::Stream { head, rest } => head.is_none() && rest.is_end_stream(),
            Inner::Gone => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Whole(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Stream { head, rest } => {
                let h = head.as_ref().map_or(0, |b| b.len() as u64);
                let r = rest.size_hint();
                let mut s = SizeHint::new();
                s.set_lower(r.lower().saturating_add(h));
                if let Some(u) = r.upper() {
                    s.set_upper(u.saturating_add(h));
                }
                s
            }
            Inner::Gone => SizeHint::new(),
        }
    }
}

impl From<ReplayBody> for tonic::body::Body {
    fn from(body: ReplayBody) -> Self {
        tonic::body::Body::new(body)
    }
}

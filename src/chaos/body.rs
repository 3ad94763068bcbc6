//! Provider-shaped refusals and faulty streams (feature `http`).

use super::{Chaos, ChaosFuture, Fault, Kind, Wrap};
use crate::classify::{Class, StreamFailed};
use crate::error::{BoxError, ConfigError};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tower_layer::Layer;
use tower_service::Service;

/// A 429 as OpenAI sends it: `retry-after` (whole seconds, rounded up),
/// `retry-after-ms`, `x-ratelimit-remaining-requests: 0`,
/// `x-ratelimit-reset-requests`, and a `rate_limit_exceeded` JSON error
/// body — what our classifier and pacer read (`Throttled` with that wait;
/// the pacer pauses for it). It is an `Ok` response: a layer reads it as a
/// failure only with a classifier that reads responses
/// (`.classify(HttpClassifier)` or `LlmClassifier`; the LLM preset's layers
/// have one), not with the default `ErrorClassifier`.
pub fn rate_limited<B: From<Bytes>>(
    retry_after: Duration,
) -> impl Fn() -> http::Response<B> + Send + Sync + 'static {
    move || {
        let ms = retry_after.as_millis();
        let secs = crate::time::ceil_secs(retry_after);
        let body = r#"{"error":{"message":"Rate limit reached for requests (injected by chaos).","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        let mut res = http::Response::new(B::from(Bytes::from_static(body.as_bytes())));
        *res.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
        let h = res.headers_mut();
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        };
        put("content-type", "application/json".into());
        put("retry-after", secs.to_string());
        put("retry-after-ms", ms.to_string());
        put("x-ratelimit-remaining-requests", "0".into());
        put("x-ratelimit-reset-requests", format!("{}ms", ms));
        res
    }
}

/// Anthropic's `529 overloaded_error` (`Overloaded`).
pub fn overloaded<B: From<Bytes>>() -> impl Fn() -> http::Response<B> + Send + Sync + 'static {
    || {
        let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded (injected by chaos)"}}"#;
        let mut res = http::Response::new(B::from(Bytes::from_static(body.as_bytes())));
        if let Ok(s) = http::StatusCode::from_u16(529) {
            *res.status_mut() = s;
        }
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        res
    }
}

/// What happens to a stream mid-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamFault {
    /// After this many data chunks, an error (a connection reset mid-stream:
    /// a [`StreamFailed`] of class `Transient`), then the end.
    Cut {
        /// Chunks passed first (at least 1).
        after_chunks: u32,
    },
    /// After this many data chunks, nothing more, ever (your idle timeout's
    /// job).
    Stall {
        /// Chunks passed first (at least 1).
        after_chunks: u32,
    },
}

impl StreamFault {
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        match self {
            StreamFault::Cut { after_chunks: 0 } | StreamFault::Stall { after_chunks: 0 } => Err(
                ConfigError::new("chaos", "after_chunks", "must be at least 1"),
            ),
            _ => Ok(()),
        }
    }
}

impl<B> Fault<http::Response<ChaosBody<B>>> {
    /// Cuts a 2xx stream with an error after `after_chunks` data chunks.
    pub fn cut_stream(after_chunks: u32) -> Self {
        Self::new(Kind::Stream(StreamFault::Cut { after_chunks }))
    }

    /// Stalls a 2xx stream for ever after `after_chunks` data chunks.
    pub fn stall_stream(after_chunks: u32) -> Self {
        Self::new(Kind::Stream(StreamFault::Stall { after_chunks }))
    }
}

/// An `http::Response`'s body wrapped in a [`ChaosBody`].
#[derive(Debug, Clone, Copy)]
pub struct Streams;

impl<B> Wrap<http::Response<B>, http::Response<ChaosBody<B>>> for Streams {
    fn wrap(inner: http::Response<B>, stream: Option<StreamFault>) -> http::Response<ChaosBody<B>> {
        let fault = stream.filter(|_| inner.status().is_success());
        inner.map(|body| ChaosBody {
            inner: Some(body),
            fault,
            chunks: 0,
        })
    }
}

impl<B> Chaos<http::Response<ChaosBody<B>>> {
    /// A layer for services answering `http::Response<B>`: their answers
    /// come out as `http::Response<ChaosBody<B>>`, so streams can be cut
    /// or stalled ([`Fault::cut_stream`], [`Fault::stall_stream`]); the
    /// other faults as with [`layer`](Chaos::layer).
    pub fn stream_layer(&self) -> ChaosStreamLayer<B> {
        ChaosStreamLayer {
            chaos: self.clone(),
        }
    }
}

/// The layer of [`Chaos::stream_layer`].
pub struct ChaosStreamLayer<B> {
    chaos: Chaos<http::Response<ChaosBody<B>>>,
}

impl<B> Clone for ChaosStreamLayer<B> {
    fn clone(&self) -> Self {
        ChaosStreamLayer {
            chaos: self.chaos.clone(),
        }
    }
}

impl<B> std::fmt::Debug for ChaosStreamLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosStreamLayer")
            .field("chaos", &self.chaos)
            .finish()
    }
}

impl<S, B> Layer<S> for ChaosStreamLayer<B> {
    type Service = ChaosStreamService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        ChaosStreamService {
            inner,
            chaos: self.chaos.clone(),
        }
    }
}

/// The service of a [`ChaosStreamLayer`].
pub struct ChaosStreamService<S, B> {
    inner: S,
    chaos: Chaos<http::Response<ChaosBody<B>>>,
}

impl<S: Clone, B> Clone for ChaosStreamService<S, B> {
    fn clone(&self) -> Self {
        ChaosStreamService {
            inner: self.inner.clone(),
            chaos: self.chaos.clone(),
        }
    }
}

impl<S: std::fmt::Debug, B> std::fmt::Debug for ChaosStreamService<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosStreamService")
            .field("inner", &self.inner)
            .field("chaos", &self.chaos)
            .finish()
    }
}

impl<S, Req, B> Service<Req> for ChaosStreamService<S, B>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ChaosBody<B>>;
    type Error = BoxError;
    type Future = ChaosFuture<S::Future, http::Response<ChaosBody<B>>, Streams>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if !self.chaos.is_enabled() {
            return ChaosFuture::pass(self.inner.call(req));
        }
        let plan = self.chaos.plan();
        ChaosFuture::new(plan, || self.inner.call(req))
    }
}

/// A body that may be cut or stalled mid-way (the body of a [`Chaos`] over
/// `http::Response<ChaosBody<B>>`); otherwise the inner body, untouched
/// (`is_end_stream` and `size_hint` included).
///
/// [`Chaos`]: super::Chaos
#[pin_project]
#[derive(Debug)]
pub struct ChaosBody<B> {
    /// `None` once cut (the inner body dropped), or for an injected answer
    /// made from bytes.
    #[pin]
    inner: Option<B>,
    fault: Option<StreamFault>,
    chunks: u32,
}

impl<B: From<Bytes>> From<Bytes> for ChaosBody<B> {
    fn from(b: Bytes) -> Self {
        ChaosBody {
            inner: Some(B::from(b)),
            fault: None,
            chunks: 0,
        }
    }
}

impl<B> Body for ChaosBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        match *this.fault {
            Some(StreamFault::Cut { after_chunks }) if *this.chunks >= after_chunks => {
                if this.inner.is_none() {
                    return Poll::Ready(None);
                }
                this.inner.set(None);
                return Poll::Ready(Some(Err(Box::new(StreamFailed {
                    class: Class::Transient,
                    data: "connection reset mid-stream (injected by chaos)".into(),
                }))));
            }
            Some(StreamFault::Stall { after_chunks }) if *this.chunks >= after_chunks => {
                return Poll::Pending;
            }
            _ => {}
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(inner.poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if f.is_data() {
                *this.chunks = this.chunks.saturating_add(1);
            }
        }
        Poll::Ready(frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        match self.fault {
            Some(StreamFault::Cut { after_chunks }) if self.chunks >= after_chunks => {
                self.inner.is_none()
            }
            Some(StreamFault::Stall { after_chunks }) if self.chunks >= after_chunks => false,
            // Before the fault: the inner body's word (a stream shorter
            // than `after_chunks` ends as it would).
            _ => self.inner.as_ref().is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, self.fault) {
            (Some(b), None) => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

crate::inner_access!([S, B] ChaosStreamService<S, B>);

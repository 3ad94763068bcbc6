//! The point of no return of a streamed answer: its first chunk
//! (feature `http`).

use crate::error::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// The most frames, and bytes, held after the first chunk while more are
/// ready at once (an error among them still fails the attempt).
const HELD_FRAMES: usize = 16;
const HELD_BYTES: usize = 64 * 1024;

/// Holds a successful (2xx) streamed answer until its first chunk of data,
/// so that a router can still fail over a stream that fails before any
/// byte reached the caller — and never after (see [`FirstChunk`]).
///
/// Put it outermost in a deployment's stack (around the LLM preset's stream
/// layer, which turns an SSE error event into a body error):
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use semaforo::route::FirstChunkLayer;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), semaforo::BoxError> {
/// let client = service_fn(|_req: ()| async {
///     Ok::<_, std::io::Error>(http::Response::new(Full::new(Bytes::from_static(b"data: hi\n\n"))))
/// });
/// let res = FirstChunkLayer::new().layer(client).oneshot(()).await?;
/// assert_eq!(res.into_body().collect().await?.to_bytes(), "data: hi\n\n");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstChunkLayer {
    _private: (),
}

impl FirstChunkLayer {
    /// The layer.
    pub fn new() -> Self {
        FirstChunkLayer { _private: () }
    }
}

impl<S> Layer<S> for FirstChunkLayer {
    type Service = FirstChunk<S>;

    fn layer(&self, inner: S) -> FirstChunk<S> {
        FirstChunk { inner }
    }
}

/// The service of [`FirstChunkLayer`]: answers a 2xx response once its body
/// gave its first non-empty data frame (or ended), with every frame that
/// was ready at once after it (up to 16 frames or 64 KiB); a body error
/// before then is the call's error (so the router classifies it — an LLM
/// stream's `StreamFailed` by the class of its error event — and may fail
/// over). Any other status is answered once its body ended (up to 64 frames
/// or 64 KiB): an error body is small, and a classifier may read it (the LLM
/// router preset classifies a context-length error by it). The body it
/// answers replays the held frames, then the rest.
///
/// Hedging over such deployments hedges a stream whose first chunk is
/// late, not only its head.
///
/// # Cancel safety
///
/// Dropping the future drops the response held (its body: a deployment's
/// layers count a dropped body as such).
#[derive(Debug, Clone)]
pub struct FirstChunk<S> {
    inner: S,
}

impl<S, Req, B> Service<Req> for FirstChunk<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<FirstChunkBody<B>>;
    type Error = BoxError;
    type Future = FirstChunkFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        FirstChunkFuture {
            head: Some(self.inner.call(req)),
            held: None,
        }
    }
}

/// The future of [`FirstChunk`].
#[pin_project]
pub struct FirstChunkFuture<F, B> {
    #[pin]
    head: Option<F>,
    held: Option<(http::response::Parts, FirstChunkBody<B>)>,
}

impl<F, B> fmt::Debug for FirstChunkFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirstChunkFuture")
            .field("waiting_for_head", &self.head.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for FirstChunkFuture<F, B>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<FirstChunkBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(head) = this.head.as_mut().as_pin_mut() {
            let res = match head.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => r.map_err(Into::into)?,
            };
            this.head.set(None);
            let (parts, body) = res.into_parts();
            let body = FirstChunkBody {
                held: VecDeque::new(),
                rest: Some(Box::pin(body)),
            };
            *this.held = Some((parts, body));
        }
        let Some((parts, body)) = this.held.as_mut() else {
            return Poll::Ready(Err(crate::error::polled_after_done("first chunk")));
        };
        // A success: until the first data, then whatever is ready at once.
        // An error answer: whole (within the same bounds), for a classifier
        // that reads error bodies.
        let success = parts.status.is_success();
        loop {
            let got_data = body
                .held
                .iter()
                .any(|f| f.data_ref().is_some_and(|d| !d.is_empty()));
            let held_bytes: usize = body
                .held
                .iter()
                .filter_map(|f| f.data_ref())
                .map(Bytes::len)
                .sum();
            if body.held.len() >= HELD_FRAMES * 4 || held_bytes >= HELD_BYTES {
                break;
            }
            if success && got_data && body.held.len() >= HELD_FRAMES {
                break;
            }
            let Some(rest) = body.rest.as_mut() else {
                break;
            };
            match rest.as_mut().poll_frame(cx) {
                Poll::Pending if success && got_data => break,
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    body.rest = None;
                    break;
                }
                Poll::Ready(Some(Err(e))) => {
                    *this.held = None;
                    return Poll::Ready(Err(e.into()));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let end = rest.is_end_stream();
                    body.held.push_back(frame);
                    if end {
                        body.rest = None;
                        break;
                    }
                }
            }
        }
        match this.held.take() {
            Some((parts, body)) => Poll::Ready(Ok(http::Response::from_parts(parts, body))),
            None => Poll::Ready(Err(crate::error::polled_after_done("first chunk"))),
        }
    }
}

/// The body [`FirstChunk`] answers: the frames it held, then the rest of
/// the inner body (boxed once, to be polled before the response is given).
pub struct FirstChunkBody<B> {
    held: VecDeque<Frame<Bytes>>,
    rest: Option<Pin<Box<B>>>,
}

impl<B> FirstChunkBody<B> {
    /// The whole body, when it was held to its end (its data frames
    /// joined).
    #[cfg_attr(not(feature = "llm"), allow(dead_code))]
    pub(crate) fn whole(&self) -> Option<Bytes> {
        if self.rest.is_some() {
            return None;
        }
        let mut out = bytes::BytesMut::new();
        for d in self.held.iter().filter_map(|f| f.data_ref()) {
            out.extend_from_slice(d);
        }
        Some(out.freeze())
    }
}

impl<B> fmt::Debug for FirstChunkBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirstChunkBody")
            .field("held", &self.held.len())
            .field("ended", &self.rest.is_none())
            .finish()
    }
}

impl<B> Body for FirstChunkBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.held.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match rest.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                self.rest = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(r)) => Poll::Ready(Some(r.map_err(Into::into))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self
            .held
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .fold(0u64, u64::saturating_add);
        match &self.rest {
            None => SizeHint::with_exact(held),
            Some(r) => {
                let inner = r.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(held));
                if let Some(upper) = inner.upper() {
                    let upper = upper.saturating_add(held);
                    if upper >= hint.lower() {
                        hint.set_upper(upper);
                    }
                }
                hint
            }
        }
    }
}
crate::inner_access!([S] FirstChunk<S>);

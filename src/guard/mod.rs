//! Keep something alive until a streamed response is really over.
//!
//! An LLM answer is finished when its last chunk arrives, not when the headers do
//! (tower's own layers stop at the headers: tower-http#447). [`Guarded`] wraps a
//! response body (`http_body::Body`, feature `http`) or a `Stream` of `Result`s
//! and holds a [`Guard`] — a bulkhead permit, an in-flight count, a reservation —
//! until the body **ends**, **errors** or is **dropped**, then tells the guard
//! which of the three happened. Every layer uses this one mechanism instead of
//! writing its own body wrapper.
//!
//! ```
//! use futures::{stream, StreamExt};
//! use semaforo::guard::{Guarded, StreamEnd};
//! use std::sync::{Arc, Mutex};
//!
//! # futures::executor::block_on(async {
//! let seen = Arc::new(Mutex::new(None));
//! let record = { let seen = seen.clone(); move |end: StreamEnd| *seen.lock().unwrap() = Some(end) };
//! let chunks = stream::iter(vec![Ok::<_, std::io::Error>("a"), Ok("b")]);
//! let mut guarded = Guarded::new(chunks, record);
//! while let Some(_chunk) = guarded.next().await {}
//! assert_eq!(*seen.lock().unwrap(), Some(StreamEnd::Completed));
//! # });
//! ```

use futures_core::Stream;
use pin_project::{pin_project, pinned_drop};
use std::pin::Pin;
use std::task::{Context, Poll};

/// How a guarded body or stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamEnd {
    /// It produced its last item or frame.
    Completed,
    /// It yielded an error (e.g. an SSE `event: error` after a `200`).
    Failed,
    /// It was dropped before the end (the client went away).
    Dropped,
}

/// Something released when a guarded stream ends; told how it ended.
///
/// Implemented for every `FnOnce(StreamEnd) + Send + 'static` and for `()`.
pub trait Guard: Send + 'static {
    /// Called exactly once, when the stream ends, fails or is dropped.
    fn finish(self, end: StreamEnd);
}

impl Guard for () {
    fn finish(self, _end: StreamEnd) {}
}

impl<F: FnOnce(StreamEnd) + Send + 'static> Guard for F {
    fn finish(self, end: StreamEnd) {
        self(end)
    }
}

impl<G: Guard> Guard for Option<G> {
    fn finish(self, end: StreamEnd) {
        if let Some(g) = self {
            g.finish(end);
        }
    }
}

impl<A: Guard, B: Guard> Guard for (A, B) {
    fn finish(self, end: StreamEnd) {
        self.0.finish(end);
        self.1.finish(end);
    }
}

/// A body or stream that holds a [`Guard`] until it ends, fails or is dropped.
#[pin_project(PinnedDrop)]
#[derive(Debug)]
pub struct Guarded<S, G: Guard> {
    #[pin]
    inner: S,
    guard: Option<G>,
}

impl<S, G: Guard> Guarded<S, G> {
    /// Wraps `inner`, holding `guard` until its end.
    pub fn new(inner: S, guard: G) -> Self {
        Guarded {
            inner,
            guard: Some(guard),
        }
    }

    /// Wraps an `http_body::Body`, holding `guard` until its end; a body that
    /// is already at its end (empty: hyper will never poll it) completes at once.
    #[cfg(feature = "http")]
    pub fn new_body(inner: S, guard: G) -> Self
    where
        S: http_body::Body,
    {
        let mut g = Guarded::new(inner, guard);
        if g.inner.is_end_stream() {
            finish(&mut g.guard, StreamEnd::Completed);
        }
        g
    }

    /// The wrapped body or stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// `true` once the guard was released.
    pub fn is_finished(&self) -> bool {
        self.guard.is_none()
    }
}

fn finish<G: Guard>(guard: &mut Option<G>, end: StreamEnd) {
    if let Some(g) = guard.take() {
        g.finish(end);
    }
}

/// Releases the guard if `item` is the end (`None`) or an error.
fn observe<T, E, G: Guard>(guard: &mut Option<G>, item: &Option<Result<T, E>>) {
    match item {
        None => finish(guard, StreamEnd::Completed),
        Some(Err(_)) => finish(guard, StreamEnd::Failed),
        Some(Ok(_)) => {}
    }
}

#[pinned_drop]
impl<S, G: Guard> PinnedDrop for Guarded<S, G> {
    fn drop(self: Pin<&mut Self>) {
        finish(self.project().guard, StreamEnd::Dropped);
    }
}

impl<S, T, E, G> Stream for Guarded<S, G>
where
    S: Stream<Item = Result<T, E>>,
    G: Guard,
{
    type Item = Result<T, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        if this.guard.is_none() {
            // Ended (or failed) before: a fused end, never poll the inner again.
            return Poll::Ready(None);
        }
        let item = std::task::ready!(this.inner.poll_next(cx));
        observe(this.guard, &item);
        Poll::Ready(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.guard.is_none() {
            (0, Some(0))
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(feature = "http")]
impl<B, G> http_body::Body for Guarded<B, G>
where
    B: http_body::Body,
    G: Guard,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if this.guard.is_none() {
            return Poll::Ready(None);
        }
        let mut inner = this.inner;
        let frame = std::task::ready!(inner.as_mut().poll_frame(cx));
        observe(this.guard, &frame);
        // hyper (and `http_body_util::BodyExt::collect`) stop polling once
        // `is_end_stream()` is true after the last frame, then drop the body:
        // a body that says it has ended has completed.
        if matches!(frame, Some(Ok(_))) && inner.is_end_stream() {
            finish(this.guard, StreamEnd::Completed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.guard.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// When a layer lets go of what it holds for a call: at the response, or at
/// the end of the streamed body. Every layer that holds something per call
/// (bulkhead permit, breaker outcome, shutdown in-flight count) takes one of
/// these modes as a type parameter.
pub trait Hold<Res>: crate::sealed::Sealed {
    /// The response type the caller sees, holding a `G`.
    type Response<G: Guard>;
    /// Attaches `guard` to `res` (or finishes it at once).
    fn hold<G: Guard>(res: Res, guard: G) -> Self::Response<G>;
}

/// Finish the guard when the response arrives (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct OnResponse;

impl crate::sealed::Sealed for OnResponse {}
impl crate::sealed::Sealed for OnStreamEnd {}
#[cfg(feature = "http")]
impl crate::sealed::Sealed for OnBodyEnd {}

impl<Res> Hold<Res> for OnResponse {
    type Response<G: Guard> = Res;

    #[inline]
    fn hold<G: Guard>(res: Res, guard: G) -> Res {
        guard.finish(StreamEnd::Completed);
        res
    }
}

/// The response is a `Stream` of `Result`s: finish the guard when it ends,
/// fails or is dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnStreamEnd;

impl<S> Hold<S> for OnStreamEnd {
    type Response<G: Guard> = Guarded<S, G>;

    fn hold<G: Guard>(res: S, guard: G) -> Guarded<S, G> {
        Guarded::new(res, guard)
    }
}

/// The response is an `http::Response<B>`: finish the guard when its body
/// ends, fails or is dropped (feature `http`).
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct OnBodyEnd;

#[cfg(feature = "http")]
impl<B: http_body::Body> Hold<http::Response<B>> for OnBodyEnd {
    type Response<G: Guard> = http::Response<Guarded<B, G>>;

    fn hold<G: Guard>(res: http::Response<B>, guard: G) -> Self::Response<G> {
        res.map(|body| Guarded::new_body(body, guard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{stream, StreamExt};
    use std::sync::{Arc, Mutex};

    fn recorder() -> (Arc<Mutex<Vec<StreamEnd>>>, impl Guard) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (seen, move |e| s.lock().unwrap().push(e))
    }

    #[tokio::test]
    async fn completed_failed_dropped_each_reported_once() {
        let (seen, g) = recorder();
        let mut s = Guarded::new(stream::iter(vec![Ok::<u8, ()>(1), Ok(2)]), g);
        assert_eq!(s.next().await, Some(Ok(1)));
        assert!(seen.lock().unwrap().is_empty(), "held while items flow");
        assert_eq!(s.next().await, Some(Ok(2)));
        assert_eq!(s.next().await, None);
        assert_eq!(s.next().await, None);
        drop(s);
        assert_eq!(*seen.lock().unwrap(), vec![StreamEnd::Completed]);

        let (seen, g) = recorder();
        let mut s = Guarded::new(stream::iter(vec![Ok::<u8, ()>(1), Err(()), Ok(3)]), g);
        assert_eq!(s.next().await, Some(Ok(1)));
        assert_eq!(s.next().await, Some(Err(())));
        assert_eq!(s.next().await, None, "fused after an error");
        drop(s);
        assert_eq!(*seen.lock().unwrap(), vec![StreamEnd::Failed]);

        let (seen, g) = recorder();
        let mut s = Guarded::new(stream::iter(vec![Ok::<u8, ()>(1), Ok(2)]), g);
        assert_eq!(s.next().await, Some(Ok(1)));
        drop(s);
        assert_eq!(*seen.lock().unwrap(), vec![StreamEnd::Dropped]);
    }

    #[cfg(feature = "http")]
    #[tokio::test]
    async fn http_body_end_is_reported() {
        use http_body::Body;
        struct TwoFrames(u8);
        impl Body for TwoFrames {
            type Data = &'static [u8];
            type Error = std::io::Error;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
                if self.0 == 0 {
                    return Poll::Ready(None);
                }
                self.0 -= 1;
                Poll::Ready(Some(Ok(http_body::Frame::data(&b"x"[..]))))
            }
        }
        let (seen, g) = recorder();
        let mut b = Guarded::new(TwoFrames(2), g);
        let mut pinned = Pin::new(&mut b);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            pinned.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(matches!(
            pinned.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(seen.lock().unwrap().is_empty());
        assert!(matches!(
            pinned.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        assert!(b.is_end_stream());
        assert_eq!(*seen.lock().unwrap(), vec![StreamEnd::Completed]);
    }
}

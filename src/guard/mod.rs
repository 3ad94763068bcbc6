//! Keep something alive until a streamed response is really over.
//!
//! An LLM answer is finished when its last chunk arrives, not when the headers do
//! (tower's own layers stop at the headers: tower-http#447). [`Tapped`] wraps a
//! response body (`http_body::Body`, feature `http`) or a `Stream` of `Result`s
//! and shows it to a [`Tap`] until the body **ends**, **errors** or is
//! **dropped**, then tells the tap which of the three happened. Every layer that
//! follows a body uses this one wrapper; each brings its own tap:
//!
//! | tap | what it does |
//! |---|---|
//! | any [`Guard`] (bulkhead permit, breaker verdict, pacer reservation, shutdown in-flight count) | holds until the end |
//! | [`timeout::Deadlines`](crate::timeout::Deadlines) | cuts the stream with a `Timeout` error at a first-chunk, idle or total deadline |
//! | `shutdown::DrainCut` (feature `http`) | cuts an SSE body with an error event at the drain deadline |
//! | `llm::SseScan` (feature `llm`) | reads the SSE events (the one SSE parser), records usage, ends with `StreamFailed` after an error event |
//!
//! ```
//! use futures::{stream, StreamExt};
//! use semaforo::guard::{StreamEnd, Tapped};
//! use std::sync::{Arc, Mutex};
//!
//! # futures::executor::block_on(async {
//! let seen = Arc::new(Mutex::new(None));
//! let record = { let seen = seen.clone(); move |end: StreamEnd| *seen.lock().unwrap() = Some(end) };
//! let chunks = stream::iter(vec![Ok::<_, std::io::Error>("a"), Ok("b")]);
//! let mut guarded = Tapped::new(chunks, record);
//! while let Some(_chunk) = guarded.next().await {}
//! assert_eq!(*seen.lock().unwrap(), Some(StreamEnd::Completed));
//! # });
//! ```

mod tap;

pub use tap::{Flow, Tap, Tapped};

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

/// Something released when a tapped stream ends; told how it ended. Every
/// guard is a [`Tap`] that only waits for the end.
///
/// Implemented for every `FnOnce(StreamEnd) + Send + 'static`, for `()`, and
/// for `Option`s and pairs of guards.
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

/// When a layer lets go of what it holds for a call: at the response, or at
/// the end of the streamed body. Every layer that holds something per call
/// (bulkhead permit, breaker outcome, shutdown in-flight count) takes one of
/// these modes as a type parameter.
pub trait Hold<Res>: crate::sealed::Sealed {
    /// The response type the caller sees, holding a `G`.
    type Response<G: Guard>;
    /// Attaches `guard` to `res` (or finishes it at once).
    fn hold<G: Guard>(res: Res, guard: G) -> Self::Response<G>;
    /// Whether the guard rides with the response's body or stream (`false`:
    /// [`hold`](Self::hold) finishes it at once).
    const STREAMS: bool = true;
    /// Where a reader of the body leaves a failure it finds in it (the
    /// response's [`BodyFailure`](crate::classify::BodyFailure) extension).
    #[inline]
    fn body_failure(_res: &Res) -> Option<crate::classify::BodyFailure> {
        None
    }
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
    const STREAMS: bool = false;

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

impl<S, T, E> Hold<S> for OnStreamEnd
where
    S: futures_core::Stream<Item = Result<T, E>>,
{
    type Response<G: Guard> = Tapped<S, G>;

    fn hold<G: Guard>(res: S, guard: G) -> Tapped<S, G> {
        Tapped::new(res, guard)
    }
}

/// The response is an `http::Response<B>`: finish the guard when its body
/// ends, fails or is dropped (feature `http`).
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct OnBodyEnd;

#[cfg(feature = "http")]
impl<B: http_body::Body> Hold<http::Response<B>> for OnBodyEnd {
    type Response<G: Guard> = http::Response<Tapped<B, G>>;

    fn hold<G: Guard>(res: http::Response<B>, guard: G) -> Self::Response<G> {
        res.map(|body| Tapped::body(body, guard))
    }

    fn body_failure(res: &http::Response<B>) -> Option<crate::classify::BodyFailure> {
        res.extensions().get().cloned()
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
        let mut s = Tapped::new(stream::iter(vec![Ok::<u8, ()>(1), Ok(2)]), g);
        assert_eq!(s.next().await, Some(Ok(1)));
        assert!(seen.lock().unwrap().is_empty(), "held while items flow");
        assert_eq!(s.next().await, Some(Ok(2)));
        assert_eq!(s.next().await, None);
        assert_eq!(s.next().await, None);
        drop(s);
        assert_eq!(*seen.lock().unwrap(), vec![StreamEnd::Completed]);

        let (seen, g) = recorder();
        let mut s = Tapped::new(stream::iter(vec![Ok::<u8, ()>(1), Err(()), Ok(3)]), g);
        assert_eq!(s.next().await, Some(Ok(1)));
        assert_eq!(s.next().await, Some(Err(())));
        assert_eq!(s.next().await, None, "fused after an error");
        drop(s);
        assert_eq!(*seen.lock().unwrap(), vec![StreamEnd::Failed]);

        let (seen, g) = recorder();
        let mut s = Tapped::new(stream::iter(vec![Ok::<u8, ()>(1), Ok(2)]), g);
        assert_eq!(s.next().await, Some(Ok(1)));
        drop(s);
        assert_eq!(*seen.lock().unwrap(), vec![StreamEnd::Dropped]);
    }

    #[cfg(feature = "http")]
    #[tokio::test]
    async fn http_body_end_is_reported() {
        use http_body::Body;
        use std::pin::Pin;
        use std::task::{Context, Poll};
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
        let mut b = Tapped::body(TwoFrames(2), g);
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

use super::Shared;
use crate::error::{BoxError, RejectKind, Rejected};
#[cfg(feature = "http")]
use crate::guard::{Flow, Tap, Tapped};
use crate::guard::{Guard, Hold, OnResponse, OnStreamEnd, StreamEnd};
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower_layer::Layer;
use tower_service::Service;

/// One admitted call, counted until its response (or stream) is over.
#[derive(Debug)]
pub struct InFlight {
    shared: Arc<Shared>,
    /// [`InFlight::CUT`], [`InFlight::ANSWERED`], [`InFlight::STREAMING`]
    /// (one byte: the guard rides in every call's future).
    flags: u8,
}

impl InFlight {
    /// Cut at the drain deadline (a call waiting for its response, a body
    /// ended with the drain event).
    const CUT: u8 = 1;
    /// Its response has arrived.
    const ANSWERED: u8 = 2;
    /// It rides with the response's body or stream (counted in
    /// `Shared::streaming`).
    const STREAMING: u8 = 4;

    /// The response arrived; the count rides with its body or stream from
    /// now on if `streams`.
    #[inline]
    fn answered(&mut self, streams: bool) {
        self.flags |= Self::ANSWERED;
        if streams {
            self.flags |= Self::STREAMING;
            self.shared.streaming.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn cut(&mut self) {
        self.flags |= Self::CUT;
    }

    fn is(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

impl Drop for InFlight {
    /// Before the trigger a call's end costs one `fetch_sub` and one load:
    /// nobody drains, nothing is reported. After it, the end is counted and
    /// the last one wakes the drain. `SeqCst` on both sides (here the
    /// decrement then the look at `triggered`; in the drain the trigger then
    /// the look at `in_flight`): either this end sees the trigger, or the
    /// drain sees this end.
    fn drop(&mut self) {
        if self.is(Self::STREAMING) {
            self.shared.streaming.fetch_sub(1, Ordering::AcqRel);
        }
        let before = self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.shared.triggered.load(Ordering::SeqCst) {
            return;
        }
        // A call still waiting for its response when the deadline passed is
        // cut, whether its future is polled again (answered `ShuttingDown`)
        // or dropped unpolled.
        let cut =
            self.is(Self::CUT) || (!self.is(Self::ANSWERED) && self.shared.cancel.is_cancelled());
        let counter = if cut {
            &self.shared.cancelled
        } else {
            &self.shared.completed
        };
        counter.fetch_add(1, Ordering::AcqRel);
        if before == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

impl Guard for InFlight {
    fn finish(self, _end: StreamEnd) {
        drop(self);
    }
}

/// The tower [`Layer`] of a [`Shutdown`](super::Shutdown).
#[must_use = "a layer does nothing until it wraps a service"]
pub struct ShutdownLayer<R = OnResponse> {
    shared: Arc<Shared>,
    _hold: PhantomData<fn() -> R>,
}

impl<R> Clone for ShutdownLayer<R> {
    fn clone(&self) -> Self {
        ShutdownLayer {
            shared: self.shared.clone(),
            _hold: PhantomData,
        }
    }
}

impl<R> fmt::Debug for ShutdownLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownLayer").finish_non_exhaustive()
    }
}

impl ShutdownLayer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        ShutdownLayer {
            shared,
            _hold: PhantomData,
        }
    }
}

impl<R> ShutdownLayer<R> {
    /// Count a call until its `Stream` response ends.
    pub fn release_on_stream_end(self) -> ShutdownLayer<OnStreamEnd> {
        ShutdownLayer {
            shared: self.shared,
            _hold: PhantomData,
        }
    }

    /// Count a call until its `http::Response` body ends (feature `http`).
    #[cfg(feature = "http")]
    pub fn release_on_body_end(self) -> ShutdownLayer<crate::guard::OnBodyEnd> {
        ShutdownLayer {
            shared: self.shared,
            _hold: PhantomData,
        }
    }

    /// Count a call until its `http::Response` body ends — and at the drain
    /// deadline end an event stream (`Content-Type: text/event-stream`) still
    /// streaming with a final SSE `event: error` (a clean end the client can
    /// read, not a connection reset). Other bodies are counted until they end,
    /// never cut. Feature `http`.
    #[cfg(feature = "http")]
    pub fn cut_bodies_at_deadline(self) -> ShutdownLayer<CutAtDeadline> {
        ShutdownLayer {
            shared: self.shared,
            _hold: PhantomData,
        }
    }
}

impl<S, R> Layer<S> for ShutdownLayer<R> {
    type Service = ShutdownService<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        ShutdownService {
            inner,
            shared: self.shared.clone(),
            stop: None,
            _hold: PhantomData,
        }
    }
}

/// The service of a [`ShutdownLayer`].
pub struct ShutdownService<S, R = OnResponse> {
    inner: S,
    shared: Arc<Shared>,
    /// The trigger, waited for while the inner service is not ready (armed
    /// the first time it is not). Asserted unwind safe (tokio's wait is
    /// not marked so): a panic leaves it a wait to poll again, no more, and
    /// the service stays as unwind safe as its inner one.
    stop: Option<AssertUnwindSafe<Pin<Box<WaitForCancellationFutureOwned>>>>,
    _hold: PhantomData<fn() -> R>,
}

impl<S: Clone, R> Clone for ShutdownService<S, R> {
    fn clone(&self) -> Self {
        ShutdownService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            stop: None,
            _hold: PhantomData,
        }
    }
}

impl<S: fmt::Debug, R> fmt::Debug for ShutdownService<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// How the shutdown layer hands a response back with its [`InFlight`] count:
/// every [`Hold`] mode of the shared guard, plus [`CutAtDeadline`].
pub trait HoldInFlight<Res>: crate::sealed::Sealed {
    /// What the caller receives.
    type Response;
    /// Whether the count rides with the response's body or stream (`false`:
    /// it ends at the response).
    const STREAMS: bool = true;
    /// Attaches the count to the response.
    fn hold(res: Res, in_flight: InFlight) -> Self::Response;
}

impl<Res, H: Hold<Res>> HoldInFlight<Res> for H {
    type Response = H::Response<InFlight>;
    const STREAMS: bool = H::STREAMS;
    fn hold(res: Res, in_flight: InFlight) -> Self::Response {
        H::hold(res, in_flight)
    }
}

/// See [`ShutdownLayer::cut_bodies_at_deadline`].
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct CutAtDeadline;

#[cfg(feature = "http")]
impl crate::sealed::Sealed for CutAtDeadline {}

#[cfg(feature = "http")]
impl<B> HoldInFlight<http::Response<B>> for CutAtDeadline
where
    B: http_body::Body<Data = bytes::Bytes>,
{
    type Response = http::Response<Tapped<B, DrainCut>>;
    fn hold(res: http::Response<B>, in_flight: InFlight) -> Self::Response {
        // Only an event stream can end with an event; any other body is
        // counted in flight to its end, never cut (a cut plain body would be
        // a truncated one the client takes for whole).
        let sse = res
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .get(..17)
                    .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
            });
        res.map(|inner| {
            Tapped::body(
                inner,
                DrainCut {
                    in_flight,
                    cancelled: None,
                    may_cut: sse,
                },
            )
        })
    }
}

/// The [`Tap`] of [`ShutdownLayer::cut_bodies_at_deadline`]
/// (`Tapped<B, DrainCut>`, feature `http`): counts a body in flight until it
/// ends; at the drain deadline, if the body is an event stream (its
/// `Content-Type` is `text/event-stream`) still waiting for its next frame and
/// has sent no trailers, ends it with [`DRAIN_EVENT`] (an SSE error event).
/// Other bodies are never cut: they stay counted until they end.
#[cfg(feature = "http")]
pub struct DrainCut {
    in_flight: InFlight,
    /// Armed the first time the body has to wait.
    cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// An event stream (`text/event-stream`) that has sent no trailers:
    /// an event may still be appended.
    may_cut: bool,
}

#[cfg(feature = "http")]
impl fmt::Debug for DrainCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainCut")
            .field("cut", &self.in_flight.is(InFlight::CUT))
            .finish_non_exhaustive()
    }
}

/// The event that ends a body cut at the drain deadline.
#[cfg(feature = "http")]
pub const DRAIN_EVENT: &str = "event: error\ndata: {\"error\":{\"type\":\"shutting_down\",\"message\":\"the server is shutting down\"}}\n\n";

#[cfg(feature = "http")]
impl<E> Tap<http_body::Frame<bytes::Bytes>, E> for DrainCut {
    type Error = E;

    #[inline]
    fn item(&mut self, frame: &http_body::Frame<bytes::Bytes>) -> Flow {
        if frame.is_trailers() {
            // Nothing may follow trailers.
            self.may_cut = false;
        }
        Flow::Continue
    }

    #[inline]
    fn error(&mut self, error: E) -> E {
        error
    }

    fn poll_waiting(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, E>>> {
        if !self.may_cut {
            return Poll::Pending;
        }
        let shared = &self.in_flight.shared;
        let wait = self
            .cancelled
            .get_or_insert_with(|| Box::pin(shared.cancel.clone().cancelled_owned()));
        ready!(wait.as_mut().poll(cx));
        // Counted as cancelled when the tap is told the end (just after).
        self.in_flight.cut();
        Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            DRAIN_EVENT.as_bytes(),
        )))))
    }
}

impl<S, R, Req> Service<Req> for ShutdownService<S, R>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    R: HoldInFlight<S::Response>,
{
    type Response = R::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, R>;

    /// The inner service's readiness until the trigger; from the trigger on,
    /// ready at once (the call is refused without touching the inner
    /// service), and a caller waiting for the inner service to be ready is
    /// woken by the trigger to be refused.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.shared.triggered.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(r) => Poll::Ready(r.map_err(Into::into)),
            Poll::Pending => {
                let shared = &self.shared;
                let stop = self.stop.get_or_insert_with(|| {
                    AssertUnwindSafe(Box::pin(shared.stop.clone().cancelled_owned()))
                });
                ready!(stop.as_mut().poll(cx));
                Poll::Ready(Ok(()))
            }
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        // A call that sees the trigger is refused without touching the count
        // (so `in_flight` never counts a call that came after a trigger it
        // could see). Otherwise count first, then look again: a call that
        // slips past a concurrent trigger is counted, and the drain waits for
        // it (or it sees the trigger now and takes its count back). The
        // refusals are built out of line: the admitted path stays small
        // enough for callers to inline.
        if self.shared.triggered.load(Ordering::Acquire) {
            return ResponseFuture::refused(&self.shared, false);
        }
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.shared.triggered.load(Ordering::SeqCst) {
            return ResponseFuture::refused(&self.shared, true);
        }
        let in_flight = InFlight {
            shared: self.shared.clone(),
            flags: 0,
        };
        ResponseFuture {
            state: State::Running {
                fut: self.inner.call(req),
                in_flight: Some(in_flight),
                cancelled: None,
            },
            _hold: PhantomData,
        }
    }
}

/// The response future of [`ShutdownService`].
#[pin_project]
pub struct ResponseFuture<F, R = OnResponse> {
    #[pin]
    state: State<F>,
    _hold: PhantomData<fn() -> R>,
}

#[pin_project(project = StateProj)]
enum State<F> {
    Running {
        #[pin]
        fut: F,
        in_flight: Option<InFlight>,
        /// Armed the first time the call has to wait.
        cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    },
    Rejected {
        rejected: Option<Box<Rejected>>,
    },
}

impl<F, R> ResponseFuture<F, R> {
    /// The answer to a call after the trigger (`counted`: see
    /// [`Shared::refuse_triggered`]).
    #[cold]
    #[inline(never)]
    fn refused(shared: &Shared, counted: bool) -> Self {
        ResponseFuture {
            state: State::Rejected {
                rejected: Some(shared.refuse_triggered(counted)),
            },
            _hold: PhantomData,
        }
    }
}

impl<F, R> fmt::Debug for ResponseFuture<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("shutdown::ResponseFuture")
            .finish_non_exhaustive()
    }
}

impl<F, R, T, E> Future for ResponseFuture<F, R>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    R: HoldInFlight<T>,
{
    type Output = Result<R::Response, BoxError>;

    /// Cut at the drain deadline, the inner future is dropped — with
    /// whatever it holds — before the call leaves the count; answered or
    /// cut, a later poll answers an error.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        match state.as_mut().project() {
            StateProj::Rejected { rejected } => {
                Poll::Ready(Err(crate::error::take_rejection(rejected, "shutdown")))
            }
            StateProj::Running {
                fut,
                in_flight,
                cancelled,
            } => {
                // The guard goes with the answer: without it, the call is
                // over (its future, answered, is not resumed).
                if in_flight.is_none() {
                    return Poll::Ready(Err(crate::error::polled_after_done("shutdown")));
                }
                if let Poll::Ready(result) = fut.poll(cx) {
                    let Some(mut guard) = in_flight.take() else {
                        return Poll::Ready(Err(crate::error::polled_after_done("shutdown")));
                    };
                    return Poll::Ready(match result {
                        Ok(res) => {
                            guard.answered(R::STREAMS);
                            Ok(R::hold(res, guard))
                        }
                        Err(e) => {
                            // The upstream's own answer: completed, even
                            // after the deadline.
                            guard.answered(false);
                            Err(e.into())
                        }
                    });
                }
                let Some(guard) = in_flight.as_mut() else {
                    return Poll::Pending;
                };
                let wait = cancelled
                    .get_or_insert_with(|| Box::pin(guard.shared.cancel.clone().cancelled_owned()));
                ready!(wait.as_mut().poll(cx));
                // The drain deadline passed: give up on the inner call, and
                // drop it now (what it holds is let go of with the answer).
                let guard = in_flight.take();
                state.set(State::Rejected { rejected: None });
                if let Some(mut g) = guard {
                    g.cut();
                }
                Poll::Ready(Err(Rejected::new("shutdown", RejectKind::ShuttingDown)
                    .with_detail("cancelled at the drain deadline")
                    .into()))
            }
        }
    }
}

crate::inner_access!([S, R] ShutdownService<S, R>);

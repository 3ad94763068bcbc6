use super::core::{Shared, Ticket};
use crate::classify::{Class, Classify};
use crate::error::{BoxError, Rejected};
use crate::guard::{Guard, Hold, OnResponse, OnStreamEnd, StreamEnd};
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

/// The tower [`Layer`] of a [`Breaker`](super::Breaker); all services it makes
/// share the breaker's state.
#[must_use = "a layer does nothing until it wraps a service"]
pub struct BreakerLayer<C = crate::classify::ErrorClassifier, R = OnResponse> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) classify: C,
    pub(crate) _hold: PhantomData<fn() -> R>,
}

impl<C: Clone, R> Clone for BreakerLayer<C, R> {
    fn clone(&self) -> Self {
        BreakerLayer {
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            _hold: PhantomData,
        }
    }
}

impl<C, R> BreakerLayer<C, R> {
    /// Replaces the classifier (default [`ErrorClassifier`](crate::classify::ErrorClassifier):
    /// every `Ok` is a success). Use [`HttpClassifier`](crate::classify) or
    /// `LlmClassifier` for HTTP responses, or a closure.
    pub fn classify<C2>(self, classify: C2) -> BreakerLayer<C2, R> {
        BreakerLayer {
            shared: self.shared,
            classify,
            _hold: PhantomData,
        }
    }

    fn hold<R2>(self) -> BreakerLayer<C, R2> {
        BreakerLayer {
            shared: self.shared,
            classify: self.classify,
            _hold: PhantomData,
        }
    }

    /// The response is a `Stream` of `Result`s: record the outcome when it ends.
    /// A stream that fails mid-way counts as a `Transient` failure even though
    /// the response itself looked fine; one that is dropped counts as nothing.
    pub fn record_on_stream_end(self) -> BreakerLayer<C, OnStreamEnd> {
        self.hold()
    }

    /// As [`record_on_stream_end`](Self::record_on_stream_end), for an
    /// `http::Response` body (feature `http`).
    #[cfg(feature = "http")]
    pub fn record_on_body_end(self) -> BreakerLayer<C, crate::guard::OnBodyEnd> {
        self.hold()
    }
}

impl<C, R> fmt::Debug for BreakerLayer<C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerLayer")
            .field("name", &self.shared.cfg.obs.name)
            .finish_non_exhaustive()
    }
}

impl<S, C: Clone, R> Layer<S> for BreakerLayer<C, R> {
    type Service = BreakerService<S, C, R>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            _hold: PhantomData,
        }
    }
}

/// The service made by [`BreakerLayer`].
pub struct BreakerService<S, C = crate::classify::ErrorClassifier, R = OnResponse> {
    inner: S,
    shared: Arc<Shared>,
    classify: C,
    _hold: PhantomData<fn() -> R>,
}

impl<S: Clone, C: Clone, R> Clone for BreakerService<S, C, R> {
    fn clone(&self) -> Self {
        BreakerService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            _hold: PhantomData,
        }
    }
}

impl<S: fmt::Debug, C, R> fmt::Debug for BreakerService<S, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerService")
            .field("inner", &self.inner)
            .field("name", &self.shared.cfg.obs.name)
            .finish_non_exhaustive()
    }
}

impl<S, C, R, Req> Service<Req> for BreakerService<S, C, R>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
    R: Hold<S::Response>,
{
    type Response = R::Response<BreakerOutcome>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C, R>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        call_through(&self.shared, &mut self.inner, &self.classify, req)
    }
}

/// Admits (or refuses) one call through `shared` and calls `inner` — the one
/// call path of the single and the keyed breaker.
#[inline]
pub(crate) fn call_through<S, C, R, Req>(
    shared: &Arc<Shared>,
    inner: &mut S,
    classify: &C,
    req: Req,
) -> ResponseFuture<S::Future, C, R>
where
    S: Service<Req>,
    C: Clone,
{
    match shared.admit() {
        Ok(ticket) => {
            let start = shared.needs_clock().then(Instant::now);
            // The ticket (a half-open probe's place) is held by `Call`
            // before the inner service is called: if that call (or the
            // classifier's clone) panics, `Call`'s drop gives it back.
            let call = Call {
                shared: shared.clone(),
                ticket,
                start,
            };
            let classify = classify.clone();
            ResponseFuture {
                state: State::Running {
                    fut: inner.call(req),
                    call: Some(call),
                    classify,
                },
                _hold: PhantomData,
            }
        }
        Err(rejected) => ResponseFuture {
            state: State::Rejected {
                rejected: Some(Box::new(rejected)),
            },
            _hold: PhantomData,
        },
    }
}

/// One admitted call, recorded once when it finishes. Dropped unfinished, it
/// counts as nothing (and gives back a half-open probe slot).
struct Call {
    shared: Arc<Shared>,
    ticket: Ticket,
    start: Option<Instant>,
}

impl Call {
    #[inline]
    fn record(mut self, class: &Class) {
        let elapsed = self.start.map(|s| s.elapsed());
        #[cfg(feature = "metrics")]
        if let Some(took) = elapsed {
            self.shared.call_seconds.record(
                "breaker",
                self.shared.cfg.obs.name.as_deref(),
                class,
                took,
            );
        }
        self.shared.record(self.ticket, class, elapsed);
        self.ticket.settle(); // recorded: nothing to give back on drop
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.ticket.is_probe() {
            self.shared.abandon_probe(self.ticket);
        }
    }
}

/// A call's outcome, recorded when the response (or its stream) is over:
/// completed → the response's class; failed mid-stream → `Transient`; dropped →
/// nothing (a probe's slot is given back).
pub struct BreakerOutcome {
    call: Option<Call>,
    class: Class,
    /// A failure a reader of the body found (see
    /// [`BodyFailure`](crate::classify::BodyFailure)).
    failure: Option<crate::classify::BodyFailure>,
}

impl fmt::Debug for BreakerOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerOutcome")
            .field("class", &self.class)
            .field("pending", &self.call.is_some())
            .finish()
    }
}

impl Guard for BreakerOutcome {
    #[inline]
    fn finish(mut self, end: StreamEnd) {
        if let Some(call) = self.call.take() {
            // A failure found in the body counts by its class, also when the
            // reader let go at it.
            if let Some(class) = self.failure.as_ref().and_then(|f| f.get()) {
                call.record(&class);
                return;
            }
            match end {
                StreamEnd::Completed => call.record(&self.class),
                StreamEnd::Failed => call.record(&Class::Transient),
                StreamEnd::Dropped => drop(call),
            }
        }
    }
}

/// The response future of [`BreakerService`].
#[pin_project]
pub struct ResponseFuture<F, C, R = OnResponse> {
    #[pin]
    state: State<F, C>,
    _hold: PhantomData<fn() -> R>,
}

#[pin_project(project = StateProj)]
enum State<F, C> {
    Running {
        #[pin]
        fut: F,
        call: Option<Call>,
        classify: C,
    },
    Rejected {
        rejected: Option<Box<Rejected>>,
    },
}

impl<F, C, R, T, E> Future for ResponseFuture<F, C, R>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
    R: Hold<T>,
{
    type Output = Result<R::Response<BreakerOutcome>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Running {
                fut,
                call,
                classify,
            } => {
                // The call is taken with the answer: without it, the future
                // has answered (its inner future is not resumed).
                if call.is_none() {
                    return Poll::Ready(Err(crate::error::polled_after_done("breaker")));
                }
                let mut result = ready!(fut.poll(cx));
                let class = classify.classify_and_carry(result.as_mut().map_err(|e| &*e));
                Poll::Ready(match result {
                    Ok(res) => {
                        // A failed response is over now; a good one may still stream.
                        let call = call.take();
                        let outcome = if class.is_success() {
                            BreakerOutcome {
                                call,
                                class,
                                failure: R::body_failure(&res),
                            }
                        } else {
                            if let Some(c) = call {
                                c.record(&class);
                            }
                            BreakerOutcome {
                                call: None,
                                class,
                                failure: None,
                            }
                        };
                        Ok(R::hold(res, outcome))
                    }
                    Err(e) => {
                        if let Some(c) = call.take() {
                            c.record(&class);
                        }
                        Err(e.into())
                    }
                })
            }
            StateProj::Rejected { rejected } => {
                Poll::Ready(Err(crate::error::take_rejection(rejected, "breaker")))
            }
        }
    }
}

impl<F, C, R> fmt::Debug for ResponseFuture<F, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("breaker::ResponseFuture")
            .finish_non_exhaustive()
    }
}

crate::inner_access!([S, C, R] BreakerService<S, C, R>);

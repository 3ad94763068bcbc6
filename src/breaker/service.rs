use super::core::{Shared, Ticket};
use crate::classify::Classify;
use crate::error::{BoxError, Rejected};
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

/// The tower [`Layer`] of a [`Breaker`](super::Breaker); all services it makes
/// share the breaker's state.
#[derive(Clone)]
pub struct BreakerLayer<C> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) classify: C,
}

impl<C> BreakerLayer<C> {
    /// Replaces the classifier (default [`ErrorClassifier`](crate::classify::ErrorClassifier):
    /// every `Ok` is a success). Use [`HttpClassifier`](crate::classify) or
    /// `LlmClassifier` for HTTP responses, or a closure.
    pub fn classify<C2>(self, classify: C2) -> BreakerLayer<C2> {
        BreakerLayer {
            shared: self.shared,
            classify,
        }
    }
}

impl<C> fmt::Debug for BreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerLayer")
            .field("name", &self.shared.cfg.name)
            .finish_non_exhaustive()
    }
}

impl<S, C: Clone> Layer<S> for BreakerLayer<C> {
    type Service = BreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            shared: self.shared.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service made by [`BreakerLayer`].
#[derive(Clone)]
pub struct BreakerService<S, C> {
    inner: S,
    shared: Arc<Shared>,
    classify: C,
}

impl<S: fmt::Debug, C> fmt::Debug for BreakerService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerService")
            .field("inner", &self.inner)
            .field("name", &self.shared.cfg.name)
            .finish_non_exhaustive()
    }
}

impl<S, C, Req> Service<Req> for BreakerService<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

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
pub(crate) fn call_through<S, C, Req>(
    shared: &Arc<Shared>,
    inner: &mut S,
    classify: &C,
    req: Req,
) -> ResponseFuture<S::Future, C>
where
    S: Service<Req>,
    C: Clone,
{
    match shared.admit() {
        Ok(ticket) => {
            let start = shared.needs_clock().then(Instant::now);
            ResponseFuture {
                state: State::Running {
                    fut: inner.call(req),
                    call: Some(Call {
                        shared: shared.clone(),
                        ticket,
                        start,
                    }),
                    classify: classify.clone(),
                },
            }
        }
        Err(rejected) => ResponseFuture {
            state: State::Rejected {
                rejected: Some(Box::new(rejected)),
            },
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

impl Drop for Call {
    fn drop(&mut self) {
        if self.ticket.probe {
            self.shared.abandon_probe(self.ticket);
        }
    }
}

/// The response future of [`BreakerService`].
#[pin_project]
pub struct ResponseFuture<F, C> {
    #[pin]
    state: State<F, C>,
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

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Running {
                fut,
                call,
                classify,
            } => {
                let result = ready!(fut.poll(cx));
                if let Some(mut c) = call.take() {
                    let class = classify.classify(result.as_ref());
                    let elapsed = c.start.map(|s| s.elapsed());
                    c.shared.record(c.ticket, &class, elapsed);
                    c.ticket.probe = false; // recorded: nothing to give back on drop
                }
                Poll::Ready(result.map_err(Into::into))
            }
            StateProj::Rejected { rejected } => Poll::Ready(Err(match rejected.take() {
                Some(r) => {
                    let boxed: BoxError = r; // unsize, do not box twice
                    boxed
                }
                None => "breaker future polled after completion".into(),
            })),
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("breaker::ResponseFuture")
            .finish_non_exhaustive()
    }
}

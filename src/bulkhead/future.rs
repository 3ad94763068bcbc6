use super::permit::BulkheadPermit;
use super::ticket::{QueueTicket, TicketStatus};
use super::waiter::Waiter;
use crate::classify::{Classify, ErrorClassifier};
use crate::error::{BoxError, Rejected};
use crate::guard::Hold;
use crate::observe::EventKind;
use pin_project::pin_project;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

/// The response future of [`BulkheadService`](super::BulkheadService).
///
/// Dropping it at any point gives back what it holds: its place in line, a
/// permit granted but not yet used, or the permit of a running call.
#[pin_project]
pub struct ResponseFuture<S: Service<Req>, Req, R, C = ErrorClassifier> {
    #[pin]
    state: State<S, Req>,
    /// Classifies a sampled call for an adaptive limit.
    classify: C,
    _release: PhantomData<fn() -> R>,
}

#[pin_project(project = StateProj)]
enum State<S: Service<Req>, Req> {
    /// In line (boxed: the slow path may allocate, the fast path's future stays small).
    Queued {
        queued: Pin<Box<Queued<S, Req>>>,
    },
    Calling {
        #[pin]
        fut: S::Future,
        permit: Option<BulkheadPermit>,
        /// When a sampled call started (adaptive limits only).
        started: Option<Instant>,
    },
    Rejected {
        rejected: Option<Box<Rejected>>,
    },
}

/// In line; after the grant, waiting for the inner service to be ready.
#[pin_project(project = QueuedProj)]
struct Queued<S, Req> {
    /// `semaforo.wait`, entered while this call waits.
    span: tracing::Span,
    waiter: Waiter,
    permit: Option<BulkheadPermit>,
    svc: S,
    req: Option<Req>,
    ticket: Option<QueueTicket>,
    enqueued_at: Instant,
    #[pin]
    timeout: Option<Sleep>,
}

impl<S: Service<Req>, Req, R, C> ResponseFuture<S, Req, R, C> {
    #[inline]
    pub(crate) fn calling(
        fut: S::Future,
        permit: BulkheadPermit,
        started: Option<Instant>,
        classify: C,
    ) -> Self {
        Self::with(
            State::Calling {
                fut,
                permit: Some(permit),
                started,
            },
            classify,
        )
    }

    pub(crate) fn queued(
        waiter: Waiter,
        svc: S,
        req: Req,
        ticket: Option<QueueTicket>,
        classify: C,
    ) -> Self {
        let timeout = waiter.deadline.map(tokio::time::sleep_until);
        let enqueued_at = waiter.enqueued_at;
        Self::with(
            State::Queued {
                queued: Box::pin(Queued {
                    span: waiter.shared().cfg.obs.span("bulkhead", "wait"),
                    waiter,
                    permit: None,
                    svc,
                    req: Some(req),
                    ticket,
                    enqueued_at,
                    timeout,
                }),
            },
            classify,
        )
    }

    pub(crate) fn rejected(rejected: Rejected, classify: C) -> Self {
        Self::with(
            State::Rejected {
                rejected: Some(Box::new(rejected)),
            },
            classify,
        )
    }

    #[inline]
    fn with(state: State<S, Req>, classify: C) -> Self {
        ResponseFuture {
            state,
            classify,
            _release: PhantomData,
        }
    }
}

impl<S, Req, R, C> Future for ResponseFuture<S, Req, R, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    R: Hold<S::Response>,
    C: Classify<S::Response, BoxError>,
{
    type Output = Result<R::Response<BulkheadPermit>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut state = this.state;
        loop {
            match state.as_mut().project() {
                StateProj::Calling {
                    fut,
                    permit,
                    started,
                } => {
                    // The permit goes with the answer: without it, the call
                    // has answered (its future is not resumed).
                    if permit.is_none() {
                        return Poll::Ready(Err(crate::error::polled_after_done("bulkhead")));
                    }
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    let Some(permit) = permit.take() else {
                        return Poll::Ready(Err(crate::error::polled_after_done("bulkhead")));
                    };
                    if let Some(t0) = started.take() {
                        permit.sample(t0, this.classify, &result);
                    }
                    return Poll::Ready(result.map(|res| R::hold(res, permit)));
                }
                StateProj::Queued { queued } => match ready!(poll_queued(queued.as_mut(), cx)) {
                    Ok((fut, permit)) => {
                        let started = permit.as_ref().and_then(BulkheadPermit::sampling);
                        state.set(State::Calling {
                            fut,
                            permit,
                            started,
                        })
                    }
                    Err(e) => {
                        // Done: the permit (if granted), the request and the
                        // ticket go now; polled again, an error and no call.
                        state.set(State::Rejected { rejected: None });
                        return Poll::Ready(Err(e));
                    }
                },
                StateProj::Rejected { rejected } => {
                    return Poll::Ready(Err(crate::error::take_rejection(rejected, "bulkhead")));
                }
            }
        }
    }
}

/// The inner call and the permit it runs under.
type Called<F> = (F, Option<BulkheadPermit>);

/// The slow path, out of line so the fast path's `poll` stays small: wait for
/// a permit (or the deadline), then for the inner service, then call it.
#[inline(never)]
fn poll_queued<S, Req>(
    queued: Pin<&mut Queued<S, Req>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Called<S::Future>, BoxError>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    let QueuedProj {
        span,
        waiter,
        permit,
        svc,
        req,
        ticket,
        enqueued_at,
        timeout,
    } = queued.project();
    let _in_span = span.enter();
    if permit.is_none() {
        let got = match waiter.poll_permit(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let expired = timeout
                    .as_pin_mut()
                    .is_some_and(|sleep| sleep.poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                waiter.expire(enqueued_at.elapsed())
            }
        };
        match got {
            Ok(p) => {
                if let Some(t) = ticket {
                    t.finished(TicketStatus::Admitted);
                }
                // From the clock read at the grant: none more here.
                let waited = p.granted_at().map_or(Duration::ZERO, |g| {
                    g.saturating_duration_since(*enqueued_at)
                });
                waiter
                    .shared()
                    .cfg
                    .obs
                    .emit_often("bulkhead", EventKind::Admitted { waited });
                *permit = Some(p);
            }
            Err(rejected) => {
                if let Some(t) = ticket {
                    t.finished(TicketStatus::Rejected(rejected.kind()));
                }
                return Poll::Ready(Err(rejected.into()));
            }
        }
    }
    if let Err(e) = ready!(svc.poll_ready(cx)) {
        return Poll::Ready(Err(e.into()));
    }
    let Some(request) = req.take() else {
        return Poll::Ready(Err(crate::error::polled_after_done("bulkhead")));
    };
    Poll::Ready(Ok((svc.call(request), permit.take())))
}

impl<S: Service<Req>, Req, R, C> std::fmt::Debug for ResponseFuture<S, Req, R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("bulkhead::ResponseFuture")
            .finish_non_exhaustive()
    }
}

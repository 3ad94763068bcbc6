use super::future::ResponseFuture;
use super::layer::RequestInfo;
use super::permit::BulkheadPermit;
use super::queue::{Acquire, Shared};
use super::ticket::TicketStatus;
use crate::classify::Classify;
use crate::error::BoxError;
use crate::guard::Hold;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_service::Service;

/// The service made by [`BulkheadLayer`](super::BulkheadLayer).
///
/// `poll_ready` only asks the inner service; it never takes a permit (a clone
/// that is polled ready and then dropped or left idle holds nothing — the
/// tower#408 trap). The permit is taken in `call`: at once when one is free,
/// otherwise in the response future, in line.
pub struct BulkheadService<
    S,
    X = super::NoInfo,
    R = crate::guard::OnResponse,
    C = crate::classify::ErrorClassifier,
> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
    pub(crate) info: X,
    pub(crate) classify: C,
    pub(crate) _release: PhantomData<fn() -> R>,
}

impl<S: Clone, X: Clone, R, C: Clone> Clone for BulkheadService<S, X, R, C> {
    fn clone(&self) -> Self {
        BulkheadService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            info: self.info.clone(),
            classify: self.classify.clone(),
            _release: PhantomData,
        }
    }
}

impl<S: fmt::Debug, X: fmt::Debug, R, C> fmt::Debug for BulkheadService<S, X, R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadService")
            .field("inner", &self.inner)
            .field("name", &self.shared.cfg.obs.name)
            .field("info", &self.info)
            .finish()
    }
}

impl<S, X, R, C: Clone> BulkheadService<S, X, R, C> {
    /// Admission under the lock, a place in line, or a refusal: out of line so
    /// the free-permit path of `call` stays small enough to inline.
    #[inline(never)]
    fn call_slow<Req>(
        &mut self,
        req: Req,
        partition: Option<u64>,
        ticket: Option<super::QueueTicket>,
    ) -> ResponseFuture<S, Req, R, C>
    where
        S: Service<Req> + Clone,
        X: RequestInfo<Req>,
    {
        let priority = self.info.priority(&req);
        match self.shared.acquire_slow(priority, partition) {
            Acquire::Admitted(permit) => {
                if let Some(t) = &ticket {
                    t.finished(TicketStatus::Admitted);
                }
                let started = permit.sampling();
                ResponseFuture::calling(
                    self.inner.call(req),
                    permit,
                    started,
                    self.classify.clone(),
                )
            }
            Acquire::Queued(waiter) => {
                if let Some(t) = &ticket {
                    t.queued(waiter.shared(), waiter.id(), waiter.node());
                }
                // A waiter must not hold the inner service's readiness (an
                // inner `Buffer` slot, a limiter's permit): the service polled
                // ready stays for the next caller, and this call carries a
                // fresh clone that it polls ready once its wait is over.
                let svc = self.inner.clone();
                ResponseFuture::queued(waiter, svc, req, ticket, self.classify.clone())
            }
            Acquire::Rejected(rejected) => {
                if let Some(t) = &ticket {
                    t.finished(TicketStatus::Rejected(rejected.kind()));
                }
                ResponseFuture::rejected(rejected, self.classify.clone())
            }
        }
    }
}

impl<S, Req, X, R, C> Service<Req> for BulkheadService<S, X, R, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    X: RequestInfo<Req>,
    R: Hold<S::Response>,
    C: Classify<S::Response, BoxError> + Clone,
{
    type Response = R::Response<BulkheadPermit>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, R, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let partition = self.info.partition(&req, &self.shared.hasher);
        let ticket = self.info.ticket(&req);
        // A call of a `min_share` class is counted: it takes the lock.
        let plain = partition.is_none()
            && (self.shared.cfg.shares.is_empty()
                || self.shared.class_of(self.info.priority(&req)).is_none());
        if plain && self.shared.try_fast() {
            // `self.inner` was polled ready by our `poll_ready`: call it now.
            let permit = BulkheadPermit::fast(self.shared.clone());
            if let Some(t) = &ticket {
                t.finished(TicketStatus::Admitted);
            }
            let started = permit.sampling();
            return ResponseFuture::calling(
                self.inner.call(req),
                permit,
                started,
                self.classify.clone(),
            );
        }
        self.call_slow(req, partition, ticket)
    }
}

crate::inner_access!([S, X, R, C] BulkheadService<S, X, R, C>);

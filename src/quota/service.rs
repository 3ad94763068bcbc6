use super::{PlanId, Shared, TokioClock};
use crate::error::{BoxError, RejectKind, Rejected};
use governor::clock::Clock;
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

/// Where a request's key and plan come from. Implemented for every
/// `Fn(&Req) -> (K, PlanId)` and for [`HeaderKey`].
pub trait QuotaKey<Req, K> {
    /// The key and plan of `req`.
    fn key(&self, req: &Req) -> (K, PlanId);
}

impl<Req, K, F: Fn(&Req) -> (K, PlanId)> QuotaKey<Req, K> for F {
    #[inline]
    fn key(&self, req: &Req) -> (K, PlanId) {
        self(req)
    }
}

/// The key is an `http::Request` header (an API key, a user id), every key on
/// one plan; requests without the header share the key `"anonymous"`.
#[cfg(feature = "http")]
#[derive(Debug, Clone)]
pub struct HeaderKey {
    header: http::HeaderName,
    plan: PlanId,
}

#[cfg(feature = "http")]
impl HeaderKey {
    /// Keys from `header` (e.g. `x-api-key`) on `plan`.
    pub fn new(header: http::HeaderName, plan: PlanId) -> Self {
        HeaderKey { header, plan }
    }
}

#[cfg(feature = "http")]
impl<B> QuotaKey<http::Request<B>, String> for HeaderKey {
    fn key(&self, req: &http::Request<B>) -> (String, PlanId) {
        let key = req
            .headers()
            .get(&self.header)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("anonymous");
        (key.to_owned(), self.plan)
    }
}

/// Every call costs 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitCost;

/// What a call costs against its quota.
pub trait QuotaCost<Req> {
    /// The cost of `req` (0 is free: admitted without a check).
    fn cost(&self, req: &Req) -> u32;
}

impl<Req> QuotaCost<Req> for UnitCost {
    #[inline]
    fn cost(&self, _: &Req) -> u32 {
        1
    }
}

impl<Req, F: Fn(&Req) -> u32> QuotaCost<Req> for F {
    fn cost(&self, req: &Req) -> u32 {
        self(req)
    }
}

/// The tower [`Layer`] of a [`Quota`](super::Quota).
pub struct QuotaLayer<K: Hash + Eq + Clone, F, W> {
    /// `None`: a pass-through (a preset with its quota switched off).
    shared: Option<Arc<Shared<K>>>,
    key: F,
    cost: W,
}

impl<K: Hash + Eq + Clone, F: Clone, W: Clone> Clone for QuotaLayer<K, F, W> {
    fn clone(&self) -> Self {
        QuotaLayer {
            shared: self.shared.clone(),
            key: self.key.clone(),
            cost: self.cost.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone, F, W> fmt::Debug for QuotaLayer<K, F, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaLayer")
            .field("name", &self.shared.as_ref().map(|s| &s.name))
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, F> QuotaLayer<K, F, UnitCost> {
    pub(crate) fn new(shared: Arc<Shared<K>>, key: F) -> Self {
        QuotaLayer {
            shared: Some(shared),
            key,
            cost: UnitCost,
        }
    }

    /// A layer that admits everything: the quota slot of a preset, switched off.
    pub fn pass_through(key: F) -> Self {
        QuotaLayer {
            shared: None,
            key,
            cost: UnitCost,
        }
    }
}

impl<K: Hash + Eq + Clone, F, W> QuotaLayer<K, F, W> {
    /// Weighs each request (e.g. tokens or items in a batch).
    pub fn cost<W2>(self, cost: W2) -> QuotaLayer<K, F, W2> {
        QuotaLayer {
            shared: self.shared,
            key: self.key,
            cost,
        }
    }
}

impl<S, K: Hash + Eq + Clone, F: Clone, W: Clone> Layer<S> for QuotaLayer<K, F, W> {
    type Service = QuotaService<S, K, F, W>;

    fn layer(&self, inner: S) -> Self::Service {
        QuotaService {
            inner,
            shared: self.shared.clone(),
            key: self.key.clone(),
            cost: self.cost.clone(),
        }
    }
}

/// The service of a [`QuotaLayer`].
pub struct QuotaService<S, K: Hash + Eq + Clone, F, W> {
    inner: S,
    shared: Option<Arc<Shared<K>>>,
    key: F,
    cost: W,
}

impl<S: Clone, K: Hash + Eq + Clone, F: Clone, W: Clone> Clone for QuotaService<S, K, F, W> {
    fn clone(&self) -> Self {
        QuotaService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            key: self.key.clone(),
            cost: self.cost.clone(),
        }
    }
}

impl<S: fmt::Debug, K: Hash + Eq + Clone, F, W> fmt::Debug for QuotaService<S, K, F, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> Shared<K> {
    /// Admits `cost` for `key` on `plan` and the global limit, or refuses.
    #[inline]
    pub(crate) fn admit(&self, key: &K, plan: PlanId, cost: u32) -> Result<(), Rejected> {
        self.tick();
        let Some(n) = NonZeroU32::new(cost) else {
            return Ok(());
        };
        let plan = self.plans.get(plan.0).unwrap_or(&self.plans[0]);
        let reject = |policy: &Arc<crate::RateLimitPolicy>| {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            Rejected::new("quota", RejectKind::QuotaExceeded)
                .with_name_opt(self.name.as_ref())
                .with_policy(policy.clone())
        };
        if cost > plan.rate.burst {
            return Err(reject(&plan.policy).with_detail(format!(
                "a cost of {cost} can never fit plan '{}' (burst {})",
                plan.name, plan.rate.burst
            )));
        }
        if let Some((policy, cell)) = &self.global {
            if let Err(wait) = cell.take(cost, Instant::now()) {
                return Err(reject(policy)
                    .with_detail("global limit")
                    .with_retry_after(wait));
            }
        }
        match plan.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                if let Some((_, cell)) = &self.global {
                    cell.give_back(cost);
                }
                let wait = not_until.wait_time_from(TokioClock.now());
                Err(reject(&plan.policy)
                    .with_detail(format!("plan '{}'", plan.name))
                    .with_retry_after(wait))
            }
            Err(_insufficient) => {
                if let Some((_, cell)) = &self.global {
                    cell.give_back(cost);
                }
                Err(reject(&plan.policy).with_detail(format!(
                    "a cost of {cost} can never fit plan '{}'",
                    plan.name
                )))
            }
        }
    }
}

impl<S, K, F, W, Req> Service<Req> for QuotaService<S, K, F, W>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone,
    F: QuotaKey<Req, K>,
    W: QuotaCost<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let Some(shared) = &self.shared else {
            return ResponseFuture::Called {
                fut: self.inner.call(req),
            };
        };
        let (key, plan) = self.key.key(&req);
        match shared.admit(&key, plan, self.cost.cost(&req)) {
            Ok(()) => ResponseFuture::Called {
                fut: self.inner.call(req),
            },
            Err(r) => ResponseFuture::Rejected {
                rejected: Some(Box::new(r)),
            },
        }
    }
}

/// The response future of [`QuotaService`].
#[pin_project(project = Proj)]
pub enum ResponseFuture<F> {
    /// Admitted: the inner call.
    Called {
        /// The inner future.
        #[pin]
        fut: F,
    },
    /// Refused at once.
    Rejected {
        /// The refusal.
        rejected: Option<Box<Rejected>>,
    },
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("quota::ResponseFuture")
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Called { fut } => fut.poll(cx).map_err(Into::into),
            Proj::Rejected { rejected } => {
                Poll::Ready(Err(crate::error::take_rejection(rejected, "quota")))
            }
        }
    }
}

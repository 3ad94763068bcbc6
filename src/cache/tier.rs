//! A second cache tier shared by a fleet ([`RemoteTier`], e.g.
//! [`redis::CacheTier`](crate::redis::CacheTier)), and the layer that reads
//! and fills it ([`TierLayer`]).

use crate::classify::{Class, Classify};
use crate::error::BoxError;
use crate::observe::{EventKind, Observer, ShareOutcome};
use crate::share::{RequestKey, Served, Share};
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

/// A boxed `Send` future.
pub type TierFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// A store shared by several instances, under their in-process caches.
///
/// Every method may fail (the store is down, slow, refusing): the
/// [`TierLayer`] then goes on as if the tier were not there — a tier never
/// fails a call.
pub trait RemoteTier: fmt::Debug + Send + Sync + 'static {
    /// How long a stored answer is served.
    fn ttl(&self) -> Duration;

    /// How long a fill lock is held at most (one call's time, with margin):
    /// the others wait for its answer at most that long.
    fn lock_for(&self) -> Duration;

    /// The largest value stored (bytes).
    fn max_value_bytes(&self) -> usize;

    /// The value under `key` and its age.
    fn get(&self, key: &[u8]) -> TierFuture<Option<(Vec<u8>, Duration)>>;

    /// Stores `value` under `key` for [`ttl`](Self::ttl); a value above
    /// [`max_value_bytes`](Self::max_value_bytes) is not stored (`Ok`).
    fn set(&self, key: &[u8], value: Vec<u8>) -> TierFuture<()>;

    /// Takes `key`'s fill lock: `Some(token)` when taken, `None` when
    /// another instance holds it.
    fn lock(&self, key: &[u8]) -> TierFuture<Option<u64>>;

    /// Gives `key`'s fill lock back if `token` still holds it.
    fn unlock(&self, key: &[u8], token: u64) -> TierFuture<()>;
}

/// How often a caller waiting for another instance's fill looks again.
const WAIT_STEP: Duration = Duration::from_millis(50);

/// The layer of a [`RemoteTier`]: a miss of the in-process cache asks the
/// tier; a tier miss takes the key's fill lock (so across the fleet only
/// the first pays), calls, stores a `Success` answer and gives the lock
/// back; an instance that finds the lock taken waits for the value (at
/// most the lock's time), then calls on its own. Answers from the tier are
/// marked [`Served::Cache`] with their age (the in-process cache above
/// keeps them for what is left of their TTL).
///
/// Needs a key with bytes ([`RequestKey::key_bytes`]) and a share that
/// encodes ([`Share::encode`]: [`WholeResponse`](crate::share::WholeResponse)
/// does); others pass through. A call dropped while it holds the fill lock
/// leaves it to expire (`lock_for`).
#[must_use = "a layer does nothing until it wraps a service"]
pub struct TierLayer<RK, Sh, C> {
    tier: Option<Arc<dyn RemoteTier>>,
    key: RK,
    share: Sh,
    classify: C,
    obs: Observer,
}

impl<RK: Clone, Sh: Clone, C: Clone> Clone for TierLayer<RK, Sh, C> {
    fn clone(&self) -> Self {
        TierLayer {
            tier: self.tier.clone(),
            key: self.key.clone(),
            share: self.share.clone(),
            classify: self.classify.clone(),
            obs: self.obs.clone(),
        }
    }
}

impl<RK, Sh, C> fmt::Debug for TierLayer<RK, Sh, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TierLayer")
            .field("tier", &self.tier.is_some())
            .finish()
    }
}

impl<RK, Sh, C> TierLayer<RK, Sh, C> {
    /// A layer over `tier` (`None`: passes every call on).
    pub fn new(tier: Option<Arc<dyn RemoteTier>>, key: RK, share: Sh, classify: C) -> Self {
        TierLayer {
            tier,
            key,
            share,
            classify,
            obs: Observer::new(None, None),
        }
    }

    #[cfg(feature = "llm")]
    pub(crate) fn observed(mut self, obs: Observer) -> Self {
        self.obs = obs;
        self
    }
}

impl<S, RK: Clone, Sh: Clone, C: Clone> Layer<S> for TierLayer<RK, Sh, C> {
    type Service = TierService<S, RK, Sh, C>;

    fn layer(&self, inner: S) -> Self::Service {
        TierService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`TierLayer`].
pub struct TierService<S, RK, Sh, C> {
    inner: S,
    layer: TierLayer<RK, Sh, C>,
}

impl<S: Clone, RK: Clone, Sh: Clone, C: Clone> Clone for TierService<S, RK, Sh, C> {
    fn clone(&self) -> Self {
        TierService {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, RK, Sh, C> fmt::Debug for TierService<S, RK, Sh, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TierService")
            .field("inner", &self.inner)
            .field("tier", &self.layer.tier.is_some())
            .finish()
    }
}

/// The future of [`TierService`]: the inner call as it is, or a boxed
/// exchange with the tier (a network round trip dwarfs the allocation).
#[pin_project(project = TierCallProj)]
pub enum TierCall<F, R, Sh: Share<R>> {
    /// No tier, or a request without a key.
    Direct {
        /// The inner call.
        #[pin]
        fut: F,
        /// How answers are passed on.
        share: Sh,
    },
    /// Through the tier.
    Remote {
        /// The exchange.
        fut: TierFuture<Sh::Output>,
    },
}

impl<F, R, Sh: Share<R>> fmt::Debug for TierCall<F, R, Sh> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TierCall::Direct { .. } => "TierCall::Direct",
            TierCall::Remote { .. } => "TierCall::Remote",
        })
    }
}

impl<F, R, E, Sh> Future for TierCall<F, R, Sh>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    Sh: Share<R>,
{
    type Output = Result<Sh::Output, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            TierCallProj::Direct { fut, share } => fut
                .poll(cx)
                .map(|r| r.map(|r| share.pass(r)).map_err(Into::into)),
            TierCallProj::Remote { fut } => fut.as_mut().poll(cx),
        }
    }
}

impl<S, Req, RK, Sh, C> Service<Req> for TierService<S, RK, Sh, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::Response: Send,
    Req: Send + 'static,
    RK: RequestKey<Req>,
    Sh: Share<S::Response>,
    Sh::Output: Send,
    C: Classify<S::Response, BoxError> + Clone + Send + Sync + 'static,
{
    type Response = Sh::Output;
    type Error = BoxError;
    type Future = TierCall<S::Future, S::Response, Sh>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let l = &self.layer;
        let key = l.tier.as_ref().and_then(|_| l.key.key(&req));
        let bytes = key
            .as_ref()
            .and_then(|k| l.key.key_bytes(k))
            .map(std::borrow::Cow::into_owned);
        let (Some(tier), Some(key), Some(kb)) = (l.tier.clone(), key, bytes) else {
            return TierCall::Direct {
                fut: self.inner.call(req),
                share: l.share.clone(),
            };
        };
        l.key.remember(&mut req, &key);
        // The ready service stays for the next call; this one may wait for
        // the tier first.
        let mut svc = self.inner.clone();
        std::mem::swap(&mut svc, &mut self.inner);
        let (share, classify, obs) = (l.share.clone(), l.classify.clone(), l.obs.clone());
        TierCall::Remote {
            fut: Box::pin(crate::error::AnswerOnce::new("tier", async move {
                let hit = |bytes: Vec<u8>, age: Duration| {
                    share.decode(&bytes).map(|kept| {
                        obs.emit(
                            "cache",
                            EventKind::Shared {
                                outcome: ShareOutcome::Hit,
                            },
                        );
                        share.give(&kept, Served::Cache { age, stale: false })
                    })
                };
                if let Ok(Some((bytes, age))) = tier.get(&kb).await {
                    if let Some(out) = hit(bytes, age) {
                        return Ok(out);
                    }
                }
                let token = match tier.lock(&kb).await {
                    Ok(Some(t)) => Some(t),
                    Ok(None) => {
                        // Another instance is filling it: wait for its value.
                        let until = crate::time::after(Instant::now(), tier.lock_for());
                        while Instant::now() < until {
                            tokio::time::sleep(WAIT_STEP).await;
                            match tier.get(&kb).await {
                                Ok(Some((bytes, age))) => {
                                    if let Some(out) = hit(bytes, age) {
                                        return Ok(out);
                                    }
                                    break;
                                }
                                Ok(None) => {}
                                Err(_) => break,
                            }
                        }
                        None
                    }
                    Err(_) => None,
                };
                // A failed readiness ends the call too: the lock is given
                // back below all the same (only a dropped call leaves it to
                // expire).
                let ready: Result<(), BoxError> = std::future::poll_fn(|cx| svc.poll_ready(cx))
                    .await
                    .map_err(Into::into);
                let res = match ready {
                    Ok(()) => svc.call(req).await.map_err(Into::into),
                    Err(e) => Err(e),
                };
                let out = match res {
                    Ok(r)
                        if share.served(&r).is_none()
                            && share.storable(&r)
                            && matches!(classify.classify(Ok(&r)), Class::Success) =>
                    {
                        let (out, kept) = share.keep(r);
                        if let Some(v) = share
                            .encode(&kept)
                            .filter(|v| v.len() <= tier.max_value_bytes())
                        {
                            let _ = tier.set(&kb, v).await;
                        }
                        Ok(out)
                    }
                    Ok(r) => Ok(share.pass(r)),
                    Err(e) => Err(e),
                };
                if let Some(t) = token {
                    let _ = tier.unlock(&kb, t).await;
                }
                out
            })),
        }
    }
}

crate::inner_access!([S, RK, Sh, C] TierService<S, RK, Sh, C>);

//! Route: one logical upstream over several deployments — two API keys, an
//! OpenAI and an Azure deployment, a primary and a secondary — chosen per
//! call by **when the call could start**, with failover by class.
//!
//! Every deployment is a service of its own (usually
//! `breaker → pace → attempt timeout` around its own client, built by you)
//! and tells the router, through its [`Pace`](crate::pace::Pace) and its [`Breaker`], when a
//! call of this cost could start there ([`Pace::start_for`](crate::pace::Pace::start_for), reserving
//! nothing) and whether it is open. For each attempt the router asks every
//! deployment whose breaker is not open, sends to the soonest (ties: smooth
//! weighted round robin, so 3:1 weights get 3 calls of 4), and only that
//! deployment reserves. No load balancer we know of routes by this: a
//! deployment cooling down after a 429, or whose token budget is spent, is
//! simply later, and the call goes where it can start now. A deployment
//! whose own layers would refuse a call coming now — its bulkhead closed or
//! its line full, or the line's known wait past the bulkhead's `max_wait`;
//! its pacer's start past the pacer's `max_wait` — goes after every
//! deployment that would take the call, however much later; when every one
//! would refuse, the soonest is tried and its refusal fails over as usual.
//! A deployment's own `Retry-After`, once it answered one in this call, is
//! part of its start — so is the `retry_after` of a refusal by its own
//! layers (a quota or rate limit inside it, its breaker open): it is not
//! asked again before then, and a wait past the deadline is not slept (the
//! refusal comes back at once).
//!
//! The router **owns the attempt loop** (a deployment must not retry by
//! itself): a result classified `Overloaded`, `Transient` or
//! `Infrastructure`, a refusal by a deployment's own layers (its breaker
//! open, its budget), and a `Throttled` answer send the next attempt to
//! another deployment at once — no backoff sleep when another can start
//! (the one that just failed loses its ties); once every deployment was
//! tried, the next attempt goes back to one after a backoff by the class
//! ([`RouterBuilder::backoff`]). A deployment whose `poll_ready` fails is
//! failed over the same way. `Success` and `Permanent` answers are returned
//! as they are. A total deadline bounds everything, the waits in a
//! deployment's line included: a call whose earliest start is beyond it is
//! refused at once with the exact `retry_after` — the time until that
//! start (a call coming back then starts at once; a pacer's own refusal
//! says less: its wait past its `max_wait`). A call whose cost no
//! deployment could ever admit (above every burst) is refused
//! `BudgetExceeded` without a `retry_after` (classified `Permanent`); when
//! every deployment's breaker is open, `CircuitOpen` with the soonest
//! reopen (none for a breaker forced open). At most 16 attempts start in one
//! poll: a deployment failing at once never holds the executor.
//!
//! A deployment whose `poll_ready` stays pending holds the call until the
//! deadline — unless hedging is on: past the hedge delay, another
//! deployment that can start the call now takes it (nothing was sent to the
//! first: the move is told as a failover, and draws on neither the retry
//! budget nor the hedge cap, since nothing is sent twice). Set a deadline.
//!
//! A `Permanent` answer can move the call to another group of deployments
//! once ([`RouterBuilder::fallback`]): a context-length error from a small
//! model to a long-context group, a content-policy refusal to another.
//!
//! Hedging ([`RouterBuilder::hedge`]): a first attempt late past a fixed
//! delay, or past its deployment's tracked percentile, gets a second
//! attempt on another deployment that can start it now; the first good
//! answer wins, within a cap on the share of hedged calls. A failed answer
//! waits for the other attempt; if both fail, one that does not fail over
//! (a `Permanent` answer) is the one that decides.
//!
//! Streams: with [`FirstChunkLayer`] outermost in a deployment (feature
//! `http`), its answer is held until the body's first chunk, so a stream
//! that fails before any byte reached the caller (an error event first, a
//! connection cut) fails over like any other attempt; once the caller has
//! the response, an error reaches the caller and is never retried.
//!
//! Observability: [`RouterBuilder::on_event`] (an
//! [`EventKind::Routed`](crate::observe::EventKind::Routed) per attempt:
//! which deployment, why; `HedgeSettled`; refusals), the metrics
//! `semaforo_routed_total{deployment, why}` and
//! `semaforo_hedges_settled_total{outcome}` (feature `metrics`), and every
//! deployment's breaker and pacer in a health report
//! ([`Router::register_health`]).
//!
//! ```
//! use semaforo::pace::{Cost, Pace};
//! use semaforo::route::{Deployment, Router};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! // Two deployments of 30,000 tokens a minute, each behind its own pacer.
//! let deployment = |name: &'static str| -> Result<_, semaforo::BoxError> {
//!     let pace = Pace::builder().tokens_per_minute(30_000).build()?;
//!     let client = service_fn(move |_tokens: u64| async move { Ok::<_, std::io::Error>(name) });
//!     let paced = pace.layer().weigh(|n: &u64| Cost::tokens(*n)).layer(client);
//!     Ok(Deployment::new(name, tower::util::BoxCloneSyncService::new(paced)).pace(pace))
//! };
//! let router = Router::builder()
//!     .deployment(deployment("a")?)
//!     .deployment(deployment("b")?)
//!     .weigh(|tokens: &u64| Cost::tokens(*tokens))
//!     .build()?;
//! // The first call of a whole minute's tokens spends one deployment; the
//! // next goes to the other, which can start it now.
//! let first = router.clone().oneshot(30_000).await?;
//! let second = router.clone().oneshot(30_000).await?;
//! assert_ne!(first, second);
//! # Ok(()) }
//! ```

#[cfg(feature = "http")]
mod first_chunk;
mod service;

#[cfg(feature = "http")]
pub use first_chunk::{FirstChunk, FirstChunkBody, FirstChunkFuture, FirstChunkLayer};
pub use service::{Hedge, RouteFuture, Router, RouterBuilder};

use crate::breaker::Breaker;

/// The group of a deployment that names none.
pub const DEFAULT_GROUP: &str = "default";
use crate::pace::KeyedPace;
use std::sync::Arc;

/// One deployment of a [`Router`]: a name (in errors), its service, and what
/// the router reads to choose — its [`Pace`](crate::pace::Pace) (when a call could start) and
/// its [`Breaker`] (whether it is open). A deployment without a pacer can
/// always start now; one without a breaker is never open.
#[derive(Debug, Clone)]
pub struct Deployment<S> {
    pub(crate) name: Arc<str>,
    pub(crate) service: S,
    pub(crate) pace: Option<KeyedPace>,
    /// The key this deployment paces every call under (else the request's).
    pub(crate) key: Option<Arc<str>>,
    pub(crate) breaker: Option<Breaker>,
    pub(crate) bulkhead: Option<crate::bulkhead::Bulkhead>,
    pub(crate) weight: u32,
    pub(crate) preference: u32,
    pub(crate) group: Arc<str>,
}

impl<S> Deployment<S> {
    /// A deployment named `name` calling `service` (its own layers inside:
    /// breaker, pacer, attempt timeout — no retry).
    pub fn new(name: impl Into<Arc<str>>, service: S) -> Self {
        Deployment {
            name: name.into(),
            service,
            pace: None,
            key: None,
            breaker: None,
            bulkhead: None,
            weight: 1,
            preference: 0,
            group: Arc::from(DEFAULT_GROUP),
        }
    }

    /// The group of deployments it belongs to (default `"default"`): calls
    /// are routed within the router's first group, and move to another only
    /// as a fallback ([`RouterBuilder::fallback`]) — a long-context model
    /// behind a small one.
    pub fn group(mut self, group: impl Into<Arc<str>>) -> Self {
        self.group = group.into();
        self
    }

    /// The pacer in front of this deployment's client (the same one its
    /// service uses): the router asks it when a call could start. A
    /// [`KeyedPace`] (one pacer per model, under an account's shared
    /// limits) is asked under the request's key
    /// ([`RouterBuilder::key`](crate::route::RouterBuilder::key)) or this
    /// deployment's own ([`key`](Self::key)); a [`Pace`](crate::pace::Pace) converts.
    pub fn pace(mut self, pace: impl Into<KeyedPace>) -> Self {
        self.pace = Some(pace.into());
        self
    }

    /// The key this deployment's pacer charges every call to, whatever the
    /// request's — e.g. the model an Azure deployment serves when the
    /// request names another.
    pub fn key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The breaker in front of this deployment's client (the same one its
    /// service uses): the router sends nothing to it while it is open.
    pub fn breaker(mut self, breaker: Breaker) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// The bulkhead in front of this deployment's client (the same one its
    /// service uses): a deployment whose permits are all taken is later by
    /// about its line's wait — the callers ahead times its service time
    /// (learned from the calls admitted from its line, else its
    /// `expected_service_time`, else 1 s) over its limit — so a call goes to
    /// one with a free permit first.
    ///
    /// The router does not know a call's priority (the bulkhead layer reads
    /// it from the request): the line's wait counts every waiter as ahead of
    /// the call, and a full line counts as refusing it. A call whose
    /// priority would put it ahead of the waiters — or, under an adaptive
    /// limit, let it take the place of the last one — can therefore be sent
    /// to a later deployment. Where priorities matter, give such a
    /// deployment no bulkhead here (the router then sees it as free, and a
    /// refusal from its line fails over like any other).
    pub fn bulkhead(mut self, bulkhead: crate::bulkhead::Bulkhead) -> Self {
        self.bulkhead = Some(bulkhead);
        self
    }

    /// Its rank among deployments that could start a call at the same time
    /// (default 0; lower first): a cheaper or nearer deployment takes every
    /// call it can start as soon as any other, the weights share the calls
    /// among deployments of one preference. A deployment that can start
    /// sooner still wins: preference only breaks ties.
    pub fn preference(mut self, rank: u32) -> Self {
        self.preference = rank;
        self
    }

    /// Its share among deployments that could start a call at the same
    /// time (default 1; at least 1, checked by
    /// [`RouterBuilder::build`]).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its service.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// The pacer the router asks, if given.
    pub fn pacer(&self) -> Option<&KeyedPace> {
        self.pace.as_ref()
    }
}

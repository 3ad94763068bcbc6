//! A pace / quota budget whose GCRA cells live in Redis.

use super::{
    in_background_until_done, may_have_run, pair, scripts, unavailable, FailurePolicy, RedisBackend,
};
use crate::error::{BoxError, ConfigError, RejectKind, Rejected};
use crate::pace::{Cost, Pace, PaceBuilder, Unit, Weigh};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower_layer::Layer;
use tower_service::Service;

/// One dimension's cell parameters.
#[derive(Debug, Clone, Copy)]
struct Dim {
    unit: Unit,
    /// µs per unit.
    per_unit_us: f64,
    /// Burst planned with, in units (the headroom taken off).
    burst: f64,
    /// The largest cost of one call (the whole burst): above `burst`, a call
    /// waits for the bucket to be full and for what it costs beyond.
    largest: f64,
    /// The longest wait for this cell (µs): its limit's own `max_wait`.
    max_wait_us: f64,
}

impl Dim {
    fn amount(&self, cost: &Cost) -> f64 {
        cost.amount(self.unit) as f64
    }

    /// The cell's name in Redis: unit and window (to the microsecond), and
    /// its place among the limits when another has the same (two limits of
    /// one unit and window must not share a cell).
    fn label(&self, per: Duration, nth: usize) -> String {
        let micros = per.as_micros();
        match nth {
            0 => format!("{}-per-{micros}us", self.unit.as_str()),
            n => format!("{}-per-{micros}us-{n}", self.unit.as_str()),
        }
    }
}

struct Inner {
    backend: RedisBackend,
    name: Arc<str>,
    dims: Vec<(Dim, String)>,
    max_wait: Option<Duration>,
    policy: FailurePolicy,
    /// The fallback of `FailurePolicy::Local`.
    local: Option<Pace>,
    /// Closed by a shutdown: calls waiting for their reserved start give up.
    closing: crate::close::Closing,
    /// Unique per process and budget: reservation markers are `{instance}:{n}`.
    instance: u64,
    /// Undos of lost replies running now (at most [`MAX_PENDING_UNDOS`]).
    pending_undos: Arc<std::sync::atomic::AtomicUsize>,
    next: AtomicU64,
    /// How long a reservation's marker outlives its start (ms): long
    /// enough for an undo sent after a timeout to find it.
    marker_ms: u64,
    /// How long a clean-up for a reservation whose wait is unknown (its
    /// reply was lost) is tried: the longest wait, then the marker's life.
    undo_for: Duration,
}

/// How many times a waiting call re-makes a reservation whose state Redis
/// lost before it starts anyway.
const MAX_REMAKES: u32 = 3;

/// The longest window, refill or `max_wait` a Redis budget takes.
const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 86_400);

/// How long (past the marker's own 10 s) the undo of a reservation whose
/// reply was lost is tried: its wait is unknown, up to `max_wait`; past
/// this, a late reserve that did run keeps its cost (the budget admits a
/// little less, never more).
const UNKNOWN_WAIT: Duration = Duration::from_secs(10);

/// Undos of lost replies in flight per budget, at most: a Redis that times
/// out on every call for long spawns no more (those past it are not
/// followed: the same "a little less, never more").
const MAX_PENDING_UNDOS: usize = 64;

/// A budget (RPM, TPM, per day…) shared by every instance using the same
/// Redis and name. Cheap to clone.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("redis::Budget")
            .field("name", &self.inner.name)
            .field("dims", &self.inner.dims.len())
            .field("policy", &self.inner.policy)
            .finish()
    }
}

/// Builder for [`Budget`].
#[derive(Debug, Clone)]
#[must_use = "call .build() to get a Budget"]
pub struct BudgetBuilder {
    backend: RedisBackend,
    name: Arc<str>,
    limits: PaceBuilder,
    policy: FailurePolicy,
}

impl BudgetBuilder {
    /// What callers get while Redis does not answer (default `FailClosed`).
    pub fn failure_policy(mut self, p: FailurePolicy) -> Self {
        self.policy = p;
        self
    }

    /// Validates (as [`PaceBuilder::build`] does) and builds.
    ///
    /// # Errors
    ///
    /// Those of [`PaceBuilder::build`], and a [`ConfigError`] on `name`
    /// (empty, or with braces), `failure_policy` (a `Local` share outside
    /// (0, 1]), `resets` (a calendar window: the Redis cells roll) or
    /// `limits` (a window, or a full burst's refill, longer than 100 years:
    /// Redis keeps TTLs in signed 64-bit milliseconds). A `max_wait` longer
    /// than 100 years (`Duration::MAX`) is no bound, as if unset.
    pub fn build(self) -> Result<Budget, ConfigError> {
        self.policy.validate("redis budget")?;
        if self.name.is_empty() || self.name.contains(['{', '}']) {
            return Err(ConfigError::new(
                "redis budget",
                "name",
                "must be non-empty, without braces",
            ));
        }
        let limits = self.limits;
        // The same validation as a local pacer.
        limits.clone().build()?;
        if limits.dims().iter().any(|l| l.resets.is_some()) {
            return Err(ConfigError::new(
                "redis budget",
                "resets",
                "a window that resets on the calendar is paced locally only; \
                 give the Redis budget a rolling window",
            ));
        }
        let mut dims: Vec<(Dim, String)> = Vec::new();
        for limit in limits.dims() {
            let d = Dim {
                unit: limit.unit,
                per_unit_us: limit.per.as_micros() as f64 / limit.n as f64,
                burst: limit.planned() as f64,
                largest: limit.capacity() as f64,
                max_wait_us: limit
                    .max_wait
                    .map_or(1e18, |w| (w.as_micros() as f64).min(1e18)),
            };
            let mut nth = 0;
            let mut label = d.label(limit.per, nth);
            while dims.iter().any(|(_, l)| *l == label) {
                nth += 1;
                label = d.label(limit.per, nth);
            }
            dims.push((d, label));
        }
        let local = match self.policy {
            // Its refusals name the budget, as the Redis path's do.
            FailurePolicy::Local { share } => {
                Some(limits.scaled(share).name(self.name.clone()).build()?)
            }
            _ => None,
        };
        // Redis keeps a TTL in ms in a signed 64-bit count: a cell, or a
        // marker, of centuries would fail every call (and open the shared
        // breaker); 100 years is far beyond any budget.
        let longest_us = dims
            .iter()
            .map(|(d, _)| d.largest * d.per_unit_us)
            .fold(0.0, f64::max);
        if longest_us > MAX_SPAN.as_micros() as f64 {
            return Err(ConfigError::new(
                "redis budget",
                "limits",
                "a window or a burst's refill longer than 100 years",
            ));
        }
        // A `max_wait` past 100 years (`Duration::MAX`: "as long as it
        // takes") is no bound: as if unset, as for the local pacer.
        let max_wait = limits.max_wait_value().filter(|w| *w <= MAX_SPAN);
        let marker_ms = 10_000;
        let undo_for = max_wait
            .unwrap_or(UNKNOWN_WAIT)
            .min(UNKNOWN_WAIT)
            .saturating_add(Duration::from_millis(marker_ms));
        Ok(Budget {
            inner: Arc::new(Inner {
                backend: self.backend,
                name: self.name,
                dims,
                max_wait,
                policy: self.policy,
                local,
                closing: crate::close::Closing::default(),
                instance: rand::Rng::random(&mut rand::rng()),
                pending_undos: Arc::default(),
                next: AtomicU64::new(0),
                marker_ms,
                undo_for,
            }),
        })
    }
}

/// What [`Budget::reserve`] granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Grant {
    /// Reserved in Redis: start after this wait.
    Redis(Duration),
    /// Redis did not answer; the policy admits the call (`FailOpen`).
    Open,
    /// Redis did not answer; the call goes through the local limiter
    /// (`FailurePolicy::Local`): the [layer](Budget::layer) passes it
    /// through [`Budget::local`]; a caller of [`Budget::reserve`] must do
    /// so itself (the grant charges nothing by itself).
    Local,
}

impl Budget {
    /// The name given to the builder (it also names the Redis keys).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A budget named `name` (instances sharing a name share the budget), with
    /// the dimensions and `max_wait` of `limits` — the same builder as a local
    /// [`Pace`](crate::pace::Pace).
    pub fn builder(
        backend: &RedisBackend,
        name: impl Into<Arc<str>>,
        limits: PaceBuilder,
    ) -> BudgetBuilder {
        BudgetBuilder {
            backend: backend.clone(),
            name: name.into(),
            limits,
            policy: FailurePolicy::FailClosed,
        }
    }

    /// The Redis key of `what` (a cell's label, a marker) in this
    /// budget, for `key`: the hash tag keeps all of a budget's (or a key's)
    /// keys on one cluster slot, so one script may touch them all.
    fn redis_key(&self, key: Option<&str>, what: &str) -> String {
        let b = &self.inner.backend;
        match key {
            Some(k) => b.key(&["budget", &self.inner.name, &format!("{{{k}}}"), what]),
            None => b.key(&["budget", &format!("{{{}}}", self.inner.name), what]),
        }
    }

    fn keys(&self, key: Option<&str>) -> Vec<String> {
        self.inner
            .dims
            .iter()
            .map(|(_, label)| self.redis_key(key, label))
            .collect()
    }

    fn refused(&self, detail: String) -> Rejected {
        Rejected::new("pace", RejectKind::BudgetExceeded)
            .with_name(self.inner.name.clone())
            .with_detail(detail)
    }

    /// Reserves `cost` (for `key`, or the whole budget with `None`) on every
    /// dimension at once: `Ok` with the wait before the call may start, or
    /// `BudgetExceeded` with the exact `retry_after` when the wait would pass
    /// `max_wait` (nothing is reserved then). A cost above a burst is refused
    /// without `retry_after`. While Redis does not answer, the failure policy
    /// decides. A caller that gives up after a `Grant::Redis` should hand the
    /// cost back with [`adjust`](Self::adjust) (`real` = zero); the
    /// [layer](Self::layer) does that by itself for calls dropped before they
    /// start.
    pub async fn reserve(&self, key: Option<&str>, cost: &Cost) -> Result<Grant, Rejected> {
        self.reserve_marked(key, cost, Duration::ZERO)
            .await
            .map(|(g, _)| g)
    }

    /// [`reserve`](Self::reserve), with the marker of a Redis grant.
    ///
    /// Each reservation carries a marker, written with the cells: when its
    /// reply does not come back (a timeout, a lost connection, the caller
    /// dropped — the script may still run, late, on a paused Redis), an
    /// undo follows it in the background until it lands: it gives the cost
    /// back if the script ran, and stops it from running if it has not yet.
    ///
    /// `waited`: how long the call has already waited (a reservation made
    /// again after Redis lost the state it was made in): `max_wait`, the
    /// budget's and each limit's, counts from the call's arrival, so what
    /// is left of them is what the script gets.
    async fn reserve_marked(
        &self,
        key: Option<&str>,
        cost: &Cost,
        waited: Duration,
    ) -> Result<(Grant, Option<Marker>), Rejected> {
        let mut args = Vec::with_capacity(2 + 4 * self.inner.dims.len());
        let waited_us = waited.as_micros() as f64;
        // No max_wait: any wait (10¹⁸ µs is 31,000 years).
        let max_wait = self.inner.max_wait.map_or(1e18, |d| {
            (d.as_micros() as f64 - waited_us).clamp(0.0, 1e18)
        });
        args.push(max_wait.to_string());
        args.push(self.inner.marker_ms.to_string());
        for (d, label) in &self.inner.dims {
            let n = d.amount(cost);
            if n > d.largest {
                return Err(self.refused(format!(
                    "a cost of {n} can never fit a burst of {} ({label})",
                    d.largest
                )));
            }
            // A limit that does not hold the call back refuses nothing (its
            // wait is 0, never above what is left).
            let own = (d.max_wait_us - waited_us).max(0.0);
            args.extend([d.per_unit_us, d.burst, n, own].map(|x| x.to_string()));
        }
        let marker = Marker(self.redis_key(
            key,
            &format!(
                "r:{:x}:{}",
                self.inner.instance,
                self.inner.next.fetch_add(1, Ordering::Relaxed)
            ),
        ));
        let mut keys = self.keys(key);
        keys.push(marker.0.clone());
        keys.push(self.redis_key(key, "pause"));
        // Dropped before the reply (the caller gave up): undone.
        let mut in_flight = InFlight {
            budget: self,
            key,
            cost,
            marker: Some(&marker),
        };
        let result = self.inner.backend.eval(&scripts::RESERVE, keys, args).await;
        in_flight.marker = None;
        drop(in_flight);
        let reply = match result {
            Ok(v) => v,
            Err(e) => {
                if may_have_run(&e) {
                    self.undo_lost_reply(key, cost, &marker);
                }
                return self.on_failure(e).map(|g| (g, None));
            }
        };
        match pair(&reply) {
            Some((1, wait_us)) => Ok((
                Grant::Redis(Duration::from_micros(wait_us.max(0) as u64)),
                Some(marker),
            )),
            Some((0, retry_us)) => {
                // The script's hint is against what was left of max_wait; a
                // call coming now has all of it.
                let wait = Duration::from_micros(retry_us.max(0) as u64)
                    .saturating_sub(waited)
                    .max(Duration::from_micros(1));
                Err(self
                    .refused(format!(
                        "would wait longer than max_wait {} (or a limit's own)",
                        crate::time::Human(self.inner.max_wait.unwrap_or_default())
                    ))
                    .with_retry_after(wait))
            }
            _ => self
                .on_failure("unexpected script reply".into())
                .map(|g| (g, None)),
        }
    }

    /// Follows a reserve whose reply was lost with its undo, within the
    /// budget's cap of pending undos.
    fn undo_lost_reply(&self, key: Option<&str>, cost: &Cost, marker: &Marker) {
        let pending = &self.inner.pending_undos;
        if pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_UNDOS {
            pending.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let slot = PendingUndo(pending.clone());
        self.undo_with(key, cost, marker, self.inner.undo_for, Some(slot));
    }

    /// Gives the reservation behind `marker` back, once (see
    /// [`scripts::UNDO`]), retried in the background until it lands or
    /// `give_up_after` of Redis being reachable has passed; `slot` (an undo
    /// of a lost reply) is held by the task and counted down when it ends.
    fn undo_with(
        &self,
        key: Option<&str>,
        cost: &Cost,
        marker: &Marker,
        give_up_after: Duration,
        slot: Option<PendingUndo>,
    ) {
        let mut keys = self.keys(key);
        keys.push(marker.0.clone());
        let mut args = vec![self.inner.undo_for.as_millis().to_string()];
        for (d, _) in &self.inner.dims {
            args.extend([d.per_unit_us, d.amount(cost)].map(|x| x.to_string()));
        }
        let budget = self.clone();
        in_background_until_done(give_up_after, move || {
            // Held by the task: the count goes down when it ends.
            let _slot = &slot;
            let (budget, keys, args) = (budget.clone(), keys.clone(), args.clone());
            async move {
                budget
                    .inner
                    .backend
                    .eval(&scripts::UNDO, keys, args)
                    .await
                    .map(|_| ())
            }
        });
    }

    /// Whether the reservation behind `marker` is gone with the state it was
    /// made in (Redis flushed, restarted empty, or a replica promoted
    /// without the write); `Err` when Redis does not answer.
    async fn state_lost(&self, marker: &Marker) -> Result<bool, BoxError> {
        let r = self
            .inner
            .backend
            .eval(&scripts::MARKER, vec![marker.0.clone()], Vec::new())
            .await?;
        Ok(matches!(r, redis::Value::Int(0)))
    }

    fn on_failure(&self, cause: BoxError) -> Result<Grant, Rejected> {
        match self.inner.policy {
            FailurePolicy::FailOpen => Ok(Grant::Open),
            FailurePolicy::FailClosed => Err(unavailable("pace", &self.inner.name, cause)),
            FailurePolicy::Local { .. } => Ok(Grant::Local),
        }
    }

    /// Moves the cells by `real − estimate` (a refund when the call used less
    /// than reserved, a debt when more): reconciliation with the real usage.
    /// Best effort: an error (Redis down) is returned and changes nothing.
    pub async fn adjust(
        &self,
        key: Option<&str>,
        estimate: &Cost,
        real: &Cost,
    ) -> Result<(), BoxError> {
        let mut args = Vec::with_capacity(2 * self.inner.dims.len());
        for (d, _) in &self.inner.dims {
            args.extend(
                [d.per_unit_us, d.amount(real) - d.amount(estimate)].map(|x| x.to_string()),
            );
        }
        self.inner
            .backend
            .eval(&scripts::ADJUST, self.keys(key), args)
            .await
            .map(|_| ())
    }

    /// Pauses the budget (`key`'s cells, or the whole budget's with `None`)
    /// for every instance sharing it: no reservation made from now on starts
    /// before `pause` has passed (by Redis's clock; a longer pause already
    /// set stays). What the upstream's `Retry-After` after a 429 asks of
    /// the whole fleet — the [layer](Self::layer) does it by itself with
    /// [`BudgetLayer::classify`]. Reservations already made keep their start;
    /// the cells are not emptied (they refill through the pause). A pause
    /// is capped at 100 years.
    ///
    /// # Errors
    ///
    /// The Redis error when the pause could not be set (nothing changed).
    pub async fn pause(&self, key: Option<&str>, pause: Duration) -> Result<(), BoxError> {
        let us = pause.min(MAX_SPAN).as_micros().max(1);
        self.inner
            .backend
            .eval(
                &scripts::PAUSE,
                vec![self.redis_key(key, "pause")],
                vec![us.to_string()],
            )
            .await
            .map(|_| ())
    }

    /// Answers every call waiting for its reserved start (through the
    /// [layer](Self::layer)) `ShuttingDown` now, giving its reservation back,
    /// and lets no call wait from now on. Returns how many were asleep for
    /// their start at that instant (a call whose reservation was in a round
    /// trip to Redis then is answered too when its reply comes — unless its
    /// start is now: it goes — and is not counted). (A
    /// [`Shutdown`](crate::shutdown::Shutdown) calls it at its trigger once
    /// given the budget with [`watch`](crate::shutdown::Shutdown::watch).)
    pub fn close(&self) -> u64 {
        self.inner.closing.close()
    }

    fn shutting_down(&self) -> Rejected {
        Rejected::new("pace", crate::RejectKind::ShuttingDown)
            .with_name(self.inner.name.clone())
            .with_detail("the budget is closed")
    }

    /// The local limiter of `FailurePolicy::Local`.
    pub fn local(&self) -> Option<&Pace> {
        self.inner.local.as_ref()
    }

    /// A layer: one shared budget, every request costing one request; set the
    /// weight with [`BudgetLayer::weigh`] and a key with [`BudgetLayer::key`].
    pub fn layer(&self) -> BudgetLayer<crate::pace::OneRequest, NoKey> {
        BudgetLayer {
            budget: self.clone(),
            weigh: crate::pace::OneRequest,
            key: NoKey,
            classify: NoPause,
        }
    }
}

/// Where a request's budget key comes from (`None`: the whole budget).
pub trait BudgetKey<Req> {
    /// The key of `req`.
    fn key(&self, req: &Req) -> Option<String>;
}

/// One budget for every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKey;

impl<Req> BudgetKey<Req> for NoKey {
    fn key(&self, _: &Req) -> Option<String> {
        None
    }
}

impl<Req, F: Fn(&Req) -> Option<String>> BudgetKey<Req> for F {
    fn key(&self, req: &Req) -> Option<String> {
        self(req)
    }
}

/// The tower layer of a [`Budget`].
#[derive(Debug, Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct BudgetLayer<W, K, C = NoPause> {
    budget: Budget,
    weigh: W,
    key: K,
    classify: C,
}

/// The classifier of a budget layer that pauses nothing (the default): it
/// calls every answer `Success`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPause;

impl<Res, Err> crate::classify::Classify<Res, Err> for NoPause {
    #[inline]
    fn classify(&self, _: Result<&Res, &Err>) -> crate::classify::Class {
        crate::classify::Class::Success
    }
}

impl<W, K, C> BudgetLayer<W, K, C> {
    /// Weighs each request (e.g. its token estimate).
    pub fn weigh<W2>(self, weigh: W2) -> BudgetLayer<W2, K, C> {
        BudgetLayer {
            budget: self.budget,
            weigh,
            key: self.key,
            classify: self.classify,
        }
    }

    /// Keys each request (a user, a tenant): each key gets the whole budget
    /// for itself — a distributed keyed quota.
    pub fn key<K2>(self, key: K2) -> BudgetLayer<W, K2, C> {
        BudgetLayer {
            budget: self.budget,
            weigh: self.weigh,
            key,
            classify: self.classify,
        }
    }

    /// Classifies each answer (e.g. [`HttpClassifier`](crate::classify::HttpClassifier),
    /// [`LlmClassifier`](crate::classify::LlmClassifier)): one classified
    /// `Throttled` (a 429) [pauses](Budget::pause) the budget — the call's
    /// key, or the whole budget — for every instance, for its `retry_after`
    /// (1 s without one, at most 60 s: the local pacer's rule), before the
    /// answer is handed on, so a retry above sees the pause. One 429 then
    /// does not become one per instance. Unlike the local
    /// [`Pace`](crate::pace::Pace), the rate is not cut and no limit is read
    /// from the answer's headers. Under [`FailurePolicy::Local`](super::FailurePolicy)
    /// the local pacer is given this classifier too.
    pub fn classify<C2>(self, classify: C2) -> BudgetLayer<W, K, C2> {
        BudgetLayer {
            budget: self.budget,
            weigh: self.weigh,
            key: self.key,
            classify,
        }
    }
}

impl<S, W: Clone, K: Clone, C: Clone> Layer<S> for BudgetLayer<W, K, C> {
    type Service = BudgetService<S, W, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        BudgetService {
            inner,
            budget: self.budget.clone(),
            weigh: self.weigh.clone(),
            key: self.key.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service of a [`BudgetLayer`].
#[derive(Debug, Clone)]
pub struct BudgetService<S, W, K, C = NoPause> {
    inner: S,
    budget: Budget,
    weigh: W,
    key: K,
    classify: C,
}

/// The pause one `Throttled` answer imposes: its `retry_after`, 1 s without
/// one, at most 60 s (the local pacer's defaults).
fn pause_for(class: &crate::classify::Class) -> Option<Duration> {
    match class {
        crate::classify::Class::Throttled { retry_after } => Some(
            retry_after
                .unwrap_or(crate::pace::state::DEFAULT_PAUSE)
                .min(crate::pace::state::DEFAULT_MAX_PAUSE),
        ),
        _ => None,
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, W, K, C, Req> Service<Req> for BudgetService<S, W, K, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
    S::Response: Send + 'static,
    W: Weigh<Req> + Clone + Send + 'static,
    K: BudgetKey<Req>,
    C: crate::classify::Classify<S::Response, S::Error> + Clone + Send + Sync + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let cost = self.weigh.weigh(&req);
        let key = self.key.key(&req);
        let budget = self.budget.clone();
        let weigh = self.weigh.clone();
        let classify = self.classify.clone();
        // A fresh clone is readied after the wait (readiness held through a
        // wait could hold an inner limiter's permit).
        let mut svc = self.inner.clone();
        Box::pin(crate::error::AnswerOnce::new("redis budget", async move {
            let mut unstarted = None;
            let mut remade = 0;
            let mut local = false;
            // Waited so far on reservations Redis then lost.
            let mut waited = Duration::ZERO;
            loop {
                match budget.reserve_marked(key.as_deref(), &cost, waited).await? {
                    (Grant::Redis(wait), marker) => {
                        // From here until the inner call starts, a drop (or
                        // a failed `poll_ready`) gives the reservation back.
                        unstarted = Some(Unstarted {
                            budget: budget.clone(),
                            key: key.clone(),
                            cost,
                            marker: marker.clone(),
                            wait,
                            spent: false,
                        });
                        if wait.is_zero() {
                            break;
                        }
                        // A close wakes the wait: the reservation goes back
                        // (the `Unstarted` drop) and the caller is answered
                        // at once.
                        if !budget.inner.closing.sleep(wait).await {
                            return Err(budget.shutting_down().into());
                        }
                        waited = waited.saturating_add(wait);
                        // Made against a state Redis has since lost: the
                        // cells now hand out a fresh burst, and this call
                        // starting on the old schedule would come on top of
                        // it. It is made again against the new state.
                        let lost = match &marker {
                            Some(m) if remade < MAX_REMAKES => budget.state_lost(m).await,
                            _ => Ok(false),
                        };
                        match lost {
                            Ok(false) => break,
                            Ok(true) => {
                                remade += 1;
                                // Nothing to give back: it went with the state.
                                if let Some(u) = unstarted.take() {
                                    u.started();
                                }
                            }
                            // Redis does not answer: whether the state is
                            // still there is unknown, so the failure policy
                            // decides, as for a new call (the reservation
                            // goes back, if its state still exists, when
                            // `unstarted` drops).
                            Err(e) => match budget.on_failure(e)? {
                                Grant::Local => {
                                    local = true;
                                    break;
                                }
                                _ => break,
                            },
                        }
                    }
                    (Grant::Open, _) => break,
                    (Grant::Local, _) => {
                        local = true;
                        break;
                    }
                }
            }
            if let (true, Some(pace)) = (local, budget.local()) {
                drop(unstarted);
                // The local pacer learns from the results as the layer's
                // classifier says (nothing, by default).
                let mut paced = pace.layer().weigh(weigh).classify(classify).layer(svc);
                std::future::poll_fn(|cx| paced.poll_ready(cx)).await?;
                return paced.call(req).await;
            }
            std::future::poll_fn(|cx| svc.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            if let Some(u) = unstarted {
                u.started();
            }
            let result = svc.call(req).await;
            if let Some(pause) = pause_for(&classify.classify(result.as_ref())) {
                // Best effort: Redis out of reach sets no pause (each
                // instance still answers its own caller the 429).
                let _ = budget.pause(key.as_deref(), pause).await;
            }
            result.map_err(Into::into)
        }))
    }
}

/// A reservation in Redis for a call that has not started: refunded (in the
/// background) when dropped, so a caller that gives up while it waits frees
/// its place for the next reservation, as with a local [`Pace`].
struct Unstarted {
    budget: Budget,
    key: Option<String>,
    cost: Cost,
    /// Its marker: the refund applies once, to the state it was made in.
    marker: Option<Marker>,
    /// Its wait: the refund is tried as long as it could matter.
    wait: Duration,
    spent: bool,
}

impl Unstarted {
    /// The call started: the reservation is spent.
    fn started(mut self) {
        self.spent = true;
    }
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if self.spent {
            return;
        }
        // Retried until it lands: a refund lost to a Redis blip would leave
        // the next callers waiting for a call that never ran.
        if let Some(marker) = self.marker.take() {
            let give_up = self
                .wait
                .saturating_add(Duration::from_millis(self.budget.inner.marker_ms));
            self.budget
                .undo_with(self.key.as_deref(), &self.cost, &marker, give_up, None);
        }
    }
}

/// One of a budget's pending undos: counted down when dropped.
struct PendingUndo(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for PendingUndo {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A reservation's marker key (see [`scripts::RESERVE`]).
#[derive(Debug, Clone)]
struct Marker(String);

/// A reserve whose reply has not come back: undone if its caller drops it.
struct InFlight<'a> {
    budget: &'a Budget,
    key: Option<&'a str>,
    cost: &'a Cost,
    marker: Option<&'a Marker>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.marker.take() {
            self.budget.undo_lost_reply(self.key, self.cost, m);
        }
    }
}

crate::inner_access!([S, W, K] BudgetService<S, W, K>);

impl crate::close::Close for Budget {
    fn close(&self) -> u64 {
        Budget::close(self)
    }
}

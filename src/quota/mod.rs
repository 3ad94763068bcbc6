//! Keyed admission quotas per user, tenant, API key or plan — fail fast,
//! before any expensive work, with the exact `retry_after`.
//!
//! Scenarios: plans per subscription tier (Free 60/min, Pro 1,000/min), a
//! per-user limit of 3 an hour beside a global 1,000/min for an endpoint.
//!
//! - A closure reads the key (and its plan) from each request. Each plan is a
//!   set of GCRA cells, one per key (the generic cell rate algorithm, as in
//!   governor: a key's theoretical arrival time `tat` moves `per / count`
//!   ahead per unit, and a call is admitted while `tat − now ≤ burst · per /
//!   count`), held in a sharded concurrent map (`dashmap`); a user whose plan
//!   changes is checked against the new plan from its next call. The map
//!   hashes with foldhash (hashbrown's default) instead of SipHash, which
//!   was a third of a hot key's check; the seed is random per map, so a
//!   client cannot tell which keys collide. The cells are ours, not
//!   governor's keyed store: governor cannot look at a key without taking
//!   from it (see the global limit below).
//! - An optional **global** limit sits beside the keyed ones: a call must pass
//!   both. It is looked at first, taking nothing, then the key's plan is
//!   taken, then the global cell — so a call refused by the global limit or
//!   by its key consumes nothing from the global limit, and one refused by
//!   the global limit's look consumes nothing from its key. Its refusal's
//!   `retry_after` is the longer of the global wait and the key's own
//!   (looked at, taking nothing), and names the limit that waits longer: a
//!   caller that comes back then is not refused by its plan instead. Never
//!   taking and giving back is deliberate: a give-back cannot know how much
//!   refill a cell it found full lost meanwhile, so it gives back too much
//!   or keeps too much. The one cost: a call whose global room another call
//!   took in the instant between its look and its take has its key's units
//!   spent — refused by the global limit in reject mode; in wait mode it
//!   waits for the global limit alone and is never charged on its key again
//!   (a line's front that loses the race at a later turn likewise).
//! - **Weighted cost** (`cost(&Req)`): a cost that can never fit a burst is a
//!   clear `QuotaExceeded` without `retry_after`, not an endless wait.
//! - Refusals are [`RejectKind::QuotaExceeded`](crate::RejectKind::QuotaExceeded)
//!   with the exact `retry_after` (to the nanosecond, from the cells'
//!   arithmetic), and the policy, so
//!   [`Rejected::http_headers`](crate::Rejected::http_headers) gives `Retry-After`,
//!   `RateLimit` and `RateLimit-Policy` for a 429 in one line.
//! - **All time from `tokio::time`**: the cells count nanoseconds of
//!   `tokio::time::Instant`, so tests run a one-hour quota on paused time in
//!   milliseconds, and a server's quotas follow the same clock as its timeouts.
//! - **Memory**: a plan's map grows with every key seen. Keys idle
//!   for longer than their refill period (the time a full burst takes to come
//!   back) are indistinguishable from new ones; a background thread of the
//!   quota sweeps them every half of the shortest refill period (at least
//!   every second, at most every 10 minutes) and after every 65,536 calls of
//!   a thread, so an idle key is gone 1× to 1.5× its refill period after its
//!   last call. A call refused on a key not seen leaves no key behind. No
//!   request pays for a sweep: a call visits no key but its own
//!   (K = 1). [`Quota::evict_idle`] sweeps at once, on the caller.
//!   (Where no thread can be started, the 65,536th call sweeps.)
//!
//! ```
//! use semaforo::quota::{Quota, Rate};
//! use semaforo::{RejectKind, Rejected};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! let quota = Quota::builder()
//!     .name("api")
//!     .plan("free", Rate::per_minute(60))
//!     .plan("pro", Rate::per_minute(1_000))
//!     .build()?;
//! let free = quota.plan_id("free").unwrap();
//! let mut api = ServiceBuilder::new()
//!     .layer(quota.layer(move |user: &&'static str| (*user, free)))
//!     .service(service_fn(|_: &'static str| async { Ok::<_, std::io::Error>("ok") }));
//! for _ in 0..60 {
//!     api.ready().await?.call("ana").await?;
//! }
//! let err = api.ready().await?.call("ana").await.unwrap_err();
//! let r = Rejected::from_box(&err).unwrap();
//! assert_eq!(r.kind(), RejectKind::QuotaExceeded);
//! assert_eq!(r.retry_after(), Some(std::time::Duration::from_secs(1)));
//! api.ready().await?.call("luis").await?; // other keys are not affected
//! # Ok(()) }
//! ```

mod cell;
mod limit;
mod service;
mod wait;

pub use limit::{RateLimit, RateLimitBuilder, RateLimitFuture, RateLimitLayer, RateLimitService};
#[cfg(feature = "http")]
pub use service::HeaderKey;
pub use service::{QuotaCost, QuotaKey, QuotaLayer, QuotaService, ResponseFuture, UnitCost};

use crate::error::{ConfigError, RateLimitPolicy};
use crate::observe::{Event, ListenerSlot, Observer};
use cell::{Cell, KeyedCells};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

thread_local! {
    /// The instant a background sweep evaluates idleness at (the tokio time of
    /// the call that asked for it: the sweeper thread has no runtime, and a
    /// paused test clock is the runtime's).
    static SWEEP_NOW: std::cell::Cell<Option<tokio::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// A rate: `count` per `per`, with a burst (default `count`).
///
/// **What a plan admits.** A rate is a GCRA (a token bucket of `burst`
/// tokens refilled at `count / per`): over any window of length `W` it admits
/// at most `count · W / per + burst`. A "60 per minute" plan (`burst` 60 by
/// default) therefore lets a caller that sends one request after another
/// through 60 at once and then one a second: the 61st at 1 s, and up to 119
/// (60 + 59 refills) within the first minute. To admit at most 60 in any
/// minute, give it a burst of 1 ([`burst`](Self::burst)): one a second, 60
/// in the minute (61 counting both ends of a closed 60 s window).
///
/// One unit's refill is kept in whole nanoseconds, rounded up: the bound
/// always holds, and a rate whose unit the rounding would slow by more
/// than 1 % is refused by the builders (count in larger units). What the
/// rounding costs: a cell kept busy runs behind the exact schedule by under
/// a nanosecond a unit, so a burst drained and refilled for *exactly* its
/// window at one instant (paused test time) may come back one short where
/// the unit is not a whole number of nanoseconds (`Rate::per_second(3)`:
/// 2, the third told to retry in a nanosecond or two). The pacer, which
/// plans rather than polices, takes a start within 1/1024 of a unit as now
/// instead (`pace`'s docs); a quota keeps the strict bound.
///
/// ```
/// use semaforo::quota::Rate;
/// let smooth = Rate::per_minute(60).burst(1);
/// assert_eq!((smooth.count, smooth.burst), (60, 1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Calls (or cost units) per window.
    pub count: u32,
    /// The window.
    pub per: Duration,
    /// How many may come at once (default `count`): what a window can admit
    /// above the rate (see the type's docs for a 60/min plan).
    pub burst: u32,
}

impl Rate {
    /// `count` per `per`, burst `count`.
    pub fn new(count: u32, per: Duration) -> Self {
        Rate {
            count,
            per,
            burst: count,
        }
    }

    /// `count` per second.
    pub fn per_second(count: u32) -> Self {
        Rate::new(count, Duration::from_secs(1))
    }

    /// `count` per minute.
    pub fn per_minute(count: u32) -> Self {
        Rate::new(count, Duration::from_secs(60))
    }

    /// `count` per hour.
    pub fn per_hour(count: u32) -> Self {
        Rate::new(count, Duration::from_secs(3600))
    }

    /// Sets the burst.
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    fn validate(&self, what: &'static str) -> Result<(), ConfigError> {
        if self.count == 0 || self.per.is_zero() || self.burst == 0 {
            return Err(ConfigError::new(
                "quota",
                what,
                format!(
                    "{} per {} with burst {} can never admit anything",
                    self.count,
                    crate::time::Human(self.per),
                    self.burst
                ),
            ));
        }
        // The GCRA counts in u64 nanoseconds (about 584 years): a refill
        // period per unit, and a burst's worth of them, must fit.
        // Kept in whole nanoseconds, rounded up (never over the rate): a
        // unit rounded by more than 1 % would hold the rate more than 1 %
        // under what was asked.
        let unit_ns = self.per.as_nanos().div_ceil(u128::from(self.count));
        let unit = Duration::from_nanos(u64::try_from(unit_ns).unwrap_or(u64::MAX));
        let exact = self.per.as_nanos() as f64 / f64::from(self.count);
        if unit.is_zero() || (unit_ns as f64 - exact) / exact > 0.01 {
            return Err(ConfigError::new(
                "quota",
                what,
                format!(
                    "{} per {} is too fine: one unit refills in {exact:.2} ns, kept in whole \
                     nanoseconds (more than 1 % off); count in larger units",
                    self.count,
                    crate::time::Human(self.per)
                ),
            ));
        }
        if unit.saturating_mul(self.burst) > MAX_PERIOD {
            return Err(ConfigError::new(
                "quota",
                what,
                format!(
                    "{} per {} with burst {}: a full burst must refill within 100 years",
                    self.count,
                    crate::time::Human(self.per),
                    self.burst
                ),
            ));
        }
        Ok(())
    }
}

/// The longest refill of a full burst a [`Rate`] may have.
const MAX_PERIOD: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A plan's handle, from [`Quota::plan_id`]: cheap to copy into a key closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanId(usize);

impl PlanId {
    /// The first plan added to a quota.
    pub const FIRST: PlanId = PlanId(0);
}

pub(crate) struct Plan<K: Hash + Eq + Clone> {
    pub(crate) name: Arc<str>,
    pub(crate) rate: Rate,
    pub(crate) policy: Arc<RateLimitPolicy>,
    pub(crate) cells: KeyedCells<K>,
}

pub(crate) struct Shared<K: Hash + Eq + Clone> {
    pub(crate) obs: Observer,
    pub(crate) plans: Vec<Plan<K>>,
    pub(crate) global: Option<(Arc<RateLimitPolicy>, Cell)>,
    /// Wait mode: how long a call over its quota may wait in its key's line.
    pub(crate) max_wait: Option<Duration>,
    pub(crate) lines: wait::Lines<K>,
    calls: crate::striped::StripedCount,
    pub(crate) rejected: AtomicU64,
    /// Calls that left a line unanswered (their future dropped).
    pub(crate) left: AtomicU64,
    sweeping: AtomicBool,
    /// Nudges the background sweeper (with the caller's tokio time).
    sweeper: Option<std::sync::mpsc::SyncSender<tokio::time::Instant>>,
    sweeps: AtomicU64,
}

impl<K: Hash + Eq + Clone> Shared<K> {
    /// Counts a call; every 65,536 calls of a thread, asks the background
    /// sweeper to sweep idle keys. Admissions are derived (`calls − rejected`):
    /// one atomic per call, on a cache line of the calling thread's own.
    #[inline]
    pub(crate) fn tick(&self) {
        if self.calls.add_one() & 0xFFFF == 0 {
            self.nudge();
        }
    }

    #[cold]
    fn nudge(&self) {
        match &self.sweeper {
            // A sweep already asked for is enough: never block the caller.
            Some(tx) => {
                let _ = tx.try_send(tokio::time::Instant::now());
            }
            None => self.sweep(),
        }
    }

    /// Drops the keys idle for longer than their refill period (one sweep at a
    /// time; a sweep asked for meanwhile is skipped).
    #[cold]
    fn sweep(&self) {
        if self.sweeping.swap(true, Ordering::Acquire) {
            return;
        }
        let now = SWEEP_NOW
            .with(std::cell::Cell::get)
            .unwrap_or_else(tokio::time::Instant::now);
        for p in &self.plans {
            p.cells.retain_recent(now);
        }
        self.sweeps.fetch_add(1, Ordering::Relaxed);
        self.sweeping.store(false, Ordering::Release);
    }
}

/// The sweeper thread of a quota: sweeps when nudged and every `every`; ends
/// when the quota is dropped (its sender with it).
fn spawn_sweeper<K>(
    shared: std::sync::Weak<Shared<K>>,
    every: Duration,
) -> Option<std::sync::mpsc::SyncSender<tokio::time::Instant>>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::sync_channel::<tokio::time::Instant>(1);
    // Timed sweeps read the clock of the runtime the quota was built in (a
    // paused test clock included); without one, only the nudges (which carry
    // their caller's time) sweep: the real clock could run ahead of a paused
    // one and drop a key whose bucket is not full yet.
    let runtime = tokio::runtime::Handle::try_current().ok();
    let wait = if runtime.is_some() {
        every
    } else {
        Duration::MAX
    };
    let spawned = std::thread::Builder::new()
        .name("semaforo-quota-sweep".into())
        .spawn(move || loop {
            let at = match rx.recv_timeout(wait) {
                Ok(at) => at,
                Err(RecvTimeoutError::Timeout) => match &runtime {
                    Some(rt) => {
                        let _in = rt.enter();
                        tokio::time::Instant::now()
                    }
                    None => continue,
                },
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let Some(shared) = shared.upgrade() else {
                return;
            };
            SWEEP_NOW.with(|n| n.set(Some(at)));
            shared.sweep();
            SWEEP_NOW.with(|n| n.set(None));
        });
    spawned.ok().map(|_| tx)
}

/// Keyed quotas. Cheap to clone; clones and layers share the state.
pub struct Quota<K: Hash + Eq + Clone> {
    shared: Arc<Shared<K>>,
}

impl<K: Hash + Eq + Clone> Clone for Quota<K> {
    fn clone(&self) -> Self {
        Quota {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for Quota<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quota")
            .field("name", &self.shared.obs.name)
            .field(
                "plans",
                &self
                    .shared
                    .plans
                    .iter()
                    .map(|p| (&p.name, p.rate))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Builder for [`Quota`]; [`build`](Self::build) validates it.
#[derive(Debug, Clone, Default)]
#[must_use = "call .build() to get a Quota"]
pub struct QuotaBuilder {
    name: Option<Arc<str>>,
    listener: ListenerSlot,
    plans: Vec<(Arc<str>, Rate)>,
    global: Option<Rate>,
    max_wait: Option<Duration>,
}

impl QuotaBuilder {
    /// Names the quota in errors (`quota 'api': quota exceeded …`) and
    /// events. The `RateLimit-Policy` header names the *plan* the caller is
    /// on (`"free";q=60;w=60`), which is what a client can act on.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` for each of this quota's events (rejected; queued and
    /// admitted in wait mode); see [`observe`](crate::observe).
    /// Listeners add up: a second `on_event` keeps the first (both are called, in order).
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// Adds a plan (the first one added is the default plan). A plan admits
    /// at most `rate · W + burst` in any window `W`: `Rate::per_minute(60)`
    /// admits up to 119 in a caller's first minute (see [`Rate`]); add
    /// `.burst(1)` for at most 60.
    pub fn plan(mut self, name: impl Into<Arc<str>>, rate: Rate) -> Self {
        self.plans.push((name.into(), rate));
        self
    }

    /// A limit for all keys together (e.g. 1000/min per endpoint): a call
    /// passes both it and its key's plan (see the [module docs](self) for
    /// the order they are checked in).
    pub fn global(mut self, rate: Rate) -> Self {
        self.global = Some(rate);
        self
    }

    /// Wait mode: a call over its quota waits, first come first served per
    /// key, for at most `max_wait`, instead of failing at once. A call whose
    /// wait would be longer is refused at arrival with the estimate as
    /// `retry_after`; one that reaches `max_wait` in line is refused then,
    /// with how long it would still have waited as `retry_after` (for the
    /// costs ahead of it and its own to fit, from the cells' state then:
    /// another key can take the global limit meanwhile, so arrival
    /// estimates are not promises).
    /// The line is per key: with a [`global`](Self::global) limit, the call at
    /// the front of one key's line and a call of another key compete for the
    /// global limit at the instant each checks. A call is woken when its cost
    /// fits, on tokio's timer: a millisecond or so after (see the
    /// [crate docs](crate)), so it may be admitted that much past `max_wait`.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }

    /// Validates and builds. Starts the quota's background sweeper thread
    /// (it ends when the last handle is dropped).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field: `plan` (no plan, a plan defined
    /// twice, a rate of 0, a zero or too fine period — a unit's refill is
    /// kept in whole nanoseconds, and one rounded by more than 1 % is refused
    /// (`Rate::per_second(300_000_000)`: 3.33 ns) —, a refill above 100
    /// years), `global` (the same for the global limit), `max_wait` (zero).
    pub fn build<K: Hash + Eq + Clone + Send + Sync + 'static>(
        self,
    ) -> Result<Quota<K>, ConfigError> {
        if self.plans.is_empty() {
            return Err(ConfigError::new("quota", "plan", "add at least one plan"));
        }
        if self.max_wait.is_some_and(|w| w.is_zero()) {
            return Err(ConfigError::new(
                "quota",
                "max_wait",
                "a max_wait of 0 never waits: leave max_wait unset to fail fast",
            ));
        }
        let mut plans = Vec::with_capacity(self.plans.len());
        let epoch = tokio::time::Instant::now();
        for (name, rate) in self.plans {
            rate.validate("plan")?;
            if plans.iter().any(|p: &Plan<K>| p.name == name) {
                return Err(ConfigError::new(
                    "quota",
                    "plan",
                    format!("plan '{name}' is defined twice"),
                ));
            }
            plans.push(Plan {
                policy: Arc::new(RateLimitPolicy {
                    name: name.clone(),
                    quota: u64::from(rate.count),
                    window: rate.per,
                }),
                name,
                rate,
                cells: KeyedCells::new(rate, epoch),
            });
        }
        let global = match self.global {
            Some(rate) => {
                rate.validate("global")?;
                let policy = RateLimitPolicy {
                    name: Arc::from("global"),
                    quota: u64::from(rate.count),
                    window: rate.per,
                };
                Some((Arc::new(policy), Cell::new(rate)))
            }
            None => None,
        };
        // Half the shortest refill period of a full burst, in [1 s, 10 min].
        let every = plans
            .iter()
            .map(|p| (p.rate.per / p.rate.count).saturating_mul(p.rate.burst) / 2)
            .min()
            .unwrap_or(Duration::MAX)
            .clamp(Duration::from_secs(1), Duration::from_secs(600));
        Ok(Quota {
            shared: Arc::new_cyclic(|weak| Shared {
                obs: Observer::new(self.name, self.listener.0),
                plans,
                global,
                max_wait: self.max_wait,
                lines: wait::Lines::new(),
                calls: crate::striped::StripedCount::default(),
                rejected: AtomicU64::new(0),
                left: AtomicU64::new(0),
                sweeping: AtomicBool::new(false),
                sweeper: spawn_sweeper(weak.clone(), every),
                sweeps: AtomicU64::new(0),
            }),
        })
    }
}

/// Counts for a health endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuotaSnapshot {
    /// Keys tracked, all plans together.
    pub keys: u64,
    /// Calls admitted so far.
    pub admitted: u64,
    /// Calls refused so far (`ShuttingDown` after [`Quota::close`] included).
    pub rejected: u64,
    /// Calls waiting in line now (wait mode).
    pub waiting: u64,
    /// Sweeps of idle keys done so far (background and `evict_idle`).
    pub sweeps: u64,
}

impl Quota<()> {
    /// Starts a builder; the key type is chosen by [`QuotaBuilder::build`]
    /// (usually inferred from the layer's key closure).
    ///
    /// ```
    /// use semaforo::quota::{Quota, Rate};
    ///
    /// // Per-user plans: Free 60/min, Pro 1000/min.
    /// let quota = Quota::builder()
    ///     .name("api")
    ///     .plan("free", Rate::per_minute(60))
    ///     .plan("pro", Rate::per_minute(1_000))
    ///     .build::<String>()?;
    /// let free = quota.plan_id("free").expect("defined above");
    /// let layer = quota.layer(move |user: &String| (user.clone(), free));
    /// # let _ = layer;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn builder() -> QuotaBuilder {
        QuotaBuilder::default()
    }
}

impl<K: Hash + Eq + Clone> Quota<K> {
    /// The name given to the builder.
    pub fn name(&self) -> Option<&str> {
        self.shared.obs.name.as_deref()
    }

    /// The id of plan `name`.
    pub fn plan_id(&self, name: &str) -> Option<PlanId> {
        self.shared
            .plans
            .iter()
            .position(|p| &*p.name == name)
            .map(PlanId)
    }

    /// A layer reading `(key, plan)` from each request, every call costing 1.
    /// `key` is any [`QuotaKey`]: a closure `|req: &Req| (key, plan)` (annotate its
    /// argument) or a [`HeaderKey`].
    pub fn layer<F>(&self, key: F) -> QuotaLayer<K, F, service::UnitCost> {
        QuotaLayer::new(self.shared.clone(), key)
    }

    /// Sweeps keys idle for longer than their refill period now.
    pub fn evict_idle(&self) {
        self.shared.sweep();
    }

    /// Closes the wait mode's lines: every caller waiting in one is answered
    /// `ShuttingDown` at once, and from now on a call over its quota is
    /// refused (`ShuttingDown`) instead of waiting; calls within their quota
    /// still pass. Returns how many waiters were released. (A
    /// [`Shutdown`](crate::shutdown::Shutdown) calls it at its trigger once
    /// given the quota with [`watch`](crate::shutdown::Shutdown::watch).)
    pub fn close(&self) -> u64 {
        self.shared.lines.close()
    }

    /// Keys tracked and admission counts.
    pub fn snapshot(&self) -> QuotaSnapshot {
        let rejected = self.shared.rejected.load(Ordering::Relaxed);
        QuotaSnapshot {
            keys: self.shared.plans.iter().map(|p| p.cells.len() as u64).sum(),
            admitted: self
                .shared
                .calls
                .sum()
                .saturating_sub(rejected)
                .saturating_sub(self.shared.left.load(Ordering::Relaxed))
                .saturating_sub(self.shared.lines.waiting() as u64),
            rejected,
            waiting: self.shared.lines.waiting() as u64,
            sweeps: self.shared.sweeps.load(Ordering::Relaxed),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> crate::close::Close for Quota<K> {
    fn close(&self) -> u64 {
        Quota::close(self)
    }
}

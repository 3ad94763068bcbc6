//! A concurrency semaphore with a fair, bounded, observable line — "El Semáforo".
//!
//! The classroom scenario: 50 teachers press "generate" at once against a provider that takes
//! 5. The fix: at most 5 calls at a time; the rest wait **in order** and see
//! their place ("Turno: 4/12").
//!
//! - At most `max_concurrent` calls run in the inner service; up to `max_queue`
//!   callers wait in line; one more gets [`RejectKind::QueueFull`] at once,
//!   without touching the inner service (fail fast before expensive work).
//!   A caller that waited `max_wait` gets [`RejectKind::QueueTimeout`] with a
//!   `retry_after` estimate. A full line's `retry_after` is the time between
//!   two admissions: the service time (measured, or
//!   [`expected_service_time`](BulkheadBuilder::expected_service_time) until
//!   measured) divided by the limit; with neither, 1 s divided by the limit
//!   (so a `Retry-After` of 1 s once rounded up to whole seconds: set
//!   `expected_service_time` for a better first answer).
//! - **Order**: FIFO. With [`BulkheadLayer::priority`], higher priorities first,
//!   FIFO within a priority. Permits are granted in that order, and a caller
//!   granted one counts as waiting until its task picks it up, so a newcomer
//!   never takes a free permit ahead of it. On a current-thread runtime calls
//!   also start in that order (when permits are released on that runtime's
//!   thread); on a multi-thread runtime, calls granted in the same instant
//!   start in the scheduler's order. **Starvation guard** (on by default,
//!   [`BulkheadBuilder::priority_aging`], 5 s per level): a caller of priority `p`
//!   is served as if it had arrived `p × aging` earlier. So a low-priority caller
//!   is only ever overtaken by callers that arrive less than `Δp × aging` after it —
//!   under constant high-priority load it still gets its turn, at most
//!   `Δp × aging` later than plain FIFO would give it. `priority_aging(None)` gives
//!   strict priority (and no such bound).
//! - **Guaranteed shares**: [`BulkheadBuilder::min_share`] keeps a priority
//!   class at least its share of the limit whenever it wants it (interactive
//!   ≥ 80 % behind an older batch backlog; a batch floor under strict
//!   priority), lending it to others while it wants less.
//! - **Partitions**: with [`BulkheadLayer::partition`], each key (tenant, user,
//!   API key) holds at most `max_per_key` permits inside the global limit, so one
//!   tenant cannot take every slot; its extra callers wait without blocking others.
//! - **Position and ETA**: a [`QueueTicket`] carried by the request reports
//!   "you are 12th of 45, about 40 s" at any time (see [`ticket`](QueueTicket)).
//! - **Never hoard**: `poll_ready` takes no permit; the permit is taken in `call`
//!   or the response future and given back when the call ends — or, with
//!   [`BulkheadLayer::release_on_stream_end`] / `release_on_body_end`, when the
//!   streamed response's last chunk has gone (or it failed or was dropped).
//! - **Run-time control**: [`Bulkhead::set_max_concurrent`] grows or shrinks the
//!   limit (running calls are never cut); [`Bulkhead::close`] answers every waiter
//!   `ShuttingDown` at once and refuses new calls while running ones finish.
//! - [`Bulkhead::snapshot`] for health endpoints.
//!
//! Cost: with a free permit and nobody waiting, admission is one CAS and release
//! one `fetch_sub` (no lock, no allocation, no clock read). Waiting, priorities,
//! partitions and tickets go through one mutex (taken to join the line and to
//! release; a granted caller picks its permit up without it); every line
//! operation is O(log n) (an order-statistic tree), also at 100,000 waiters.
//! A queued call reads the clock three times: on arrival, at its grant and
//! at its end (the service time behind ETAs and `retry_after`).
//!
//! Why not `tokio::sync::Semaphore`: it is FIFO but has no priorities, no
//! partitions, no positions, and cannot tell a caller where it stands.
//!
//! ```
//! use semaforo::bulkhead::Bulkhead;
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! let bulkhead = Bulkhead::builder(5)
//!     .name("openai")
//!
//!     .max_queue(45)
//!     .max_wait(Duration::from_secs(120))
//!     .build()?;
//!
//! let mut svc = ServiceBuilder::new()
//!     .layer(bulkhead.layer())
//!     .service(service_fn(|prompt: &'static str| async move {
//!         Ok::<_, std::io::Error>(format!("plan for {prompt}"))
//!     }));
//! let answer = svc.ready().await?.call("el ciclo del agua").await?;
//! assert_eq!(answer, "plan for el ciclo del agua");
//! assert_eq!(bulkhead.snapshot().in_flight, 0);
//! # Ok(()) }
//! ```

mod adaptive;
mod future;
mod layer;
mod order;
mod permit;
mod queue;
mod service;
mod ticket;
mod waiter;

pub use adaptive::{Aimd, Gradient2, Limit, Vegas};
pub use future::ResponseFuture;
pub use layer::{BulkheadLayer, InfoFns, NoInfo, Priority, RequestInfo};
pub use permit::BulkheadPermit;
pub use service::BulkheadService;
pub use ticket::{QueueStatus, QueueTicket, TicketStatus};

use crate::error::ConfigError;
#[cfg(doc)]
use crate::error::RejectKind;
use crate::observe::{Event, ListenerSlot, Observer};
use queue::{Config, Shared, MAX_COUNT};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

/// A bulkhead: the shared permits and line. Cheap to clone (an `Arc`); every
/// clone and every layer it makes share the same state.
#[derive(Debug, Clone)]
pub struct Bulkhead {
    shared: Arc<Shared>,
}

/// Builder for a [`Bulkhead`]; [`build`](Self::build) validates it.
#[derive(Debug, Clone)]
#[must_use = "call .build() to get a Bulkhead"]
pub struct BulkheadBuilder {
    name: Option<Arc<str>>,
    listener: ListenerSlot,
    max_concurrent: u32,
    max_queue: u32,
    max_wait: Option<Duration>,
    aging: Option<Duration>,
    max_per_key: Option<u32>,
    expected_service: Option<Duration>,
    limit: Limit,
    sample_every: u32,
    shares: Vec<queue::Share>,
}

/// The default priority aging step (see the module docs).
pub const DEFAULT_PRIORITY_AGING: Duration = Duration::from_secs(5);

impl BulkheadBuilder {
    /// Names this bulkhead in errors ("bulkhead 'openai': queue full (45/45 waiting)").
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` for each of this bulkhead's events (queued, admitted after a
    /// wait, rejected); see [`observe`](crate::observe).
    /// Listeners add up: a second `on_event` keeps the first (both are called, in order).
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// Callers allowed to wait (default 0: no line, reject when full).
    pub fn max_queue(mut self, n: u32) -> Self {
        self.max_queue = n;
        self
    }

    /// The longest a caller waits in line before `QueueTimeout` (default: no
    /// limit) — on tokio's timer, which fires a millisecond or so after (see
    /// the [crate docs](crate)).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = Some(d);
        self
    }

    /// The starvation guard: each priority level counts as arriving this much
    /// earlier (default [`DEFAULT_PRIORITY_AGING`]); `None` for strict priority.
    pub fn priority_aging(mut self, step: Option<Duration>) -> Self {
        self.aging = step;
        self
    }

    /// Permits one partition key may hold (used with [`BulkheadLayer::partition`];
    /// default: no per-key cap).
    pub fn max_per_key(mut self, n: u32) -> Self {
        self.max_per_key = Some(n);
        self
    }

    /// How long a call usually takes: seeds the ETA until calls admitted from
    /// the line have been measured.
    pub fn expected_service_time(mut self, d: Duration) -> Self {
        self.expected_service = Some(d);
        self
    }

    /// How the limit is set: [`Limit::Fixed`] (default: `max_concurrent`), or
    /// moved by a controller from the calls' latencies and drops —
    /// [`Aimd`], [`Vegas`], [`Gradient2`] — between its `min` and
    /// `max_concurrent` (the builder's argument is then the maximum, and the
    /// start unless the strategy's `initial` says otherwise). A call's result
    /// is classified by the layer's [`classify`](BulkheadLayer::classify):
    /// `Overloaded` and `Transient` are drops; `Throttled` (a rate limit is
    /// the pacer's business), `Permanent` and this crate's own refusals are
    /// not samples. When the limit falls, the line shrinks with it (it holds
    /// at most `max_queue × limit / max_concurrent`), shedding its
    /// lowest-ranked waiters first (`QueueFull`, with a `retry_after`); a
    /// newcomer that outranks the last waiter of a full line takes its
    /// place — unless its partition is at its `max_per_key` cap (it could
    /// not run sooner than the one it would displace).
    ///
    /// ```
    /// use semaforo::bulkhead::{Bulkhead, Vegas};
    ///
    /// // At most 500 at once, found by Vegas from the calls' latencies.
    /// let bulkhead = Bulkhead::builder(500).limit(Vegas::new().min(5)).max_queue(1_000).build()?;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn limit(mut self, limit: impl Into<Limit>) -> Self {
        self.limit = limit.into();
        self
    }

    /// An adaptive limit samples 1 call in `n` (default 8, counted per
    /// thread): a sample costs two clock reads and a short lock (measured,
    /// `benches/bulkhead.rs`, median of 3: a free-permit call 21.1 ns with
    /// a fixed limit, 34.3 ns sampling 1 in 8, 108 ns sampling every call). The controller moves once per window
    /// of `max(10, limit / n)` samples: with little traffic, a smaller `n`
    /// moves it sooner.
    pub fn sample_every(mut self, n: u32) -> Self {
        self.sample_every = n;
        self
    }

    /// A guaranteed minimum share of the limit for one priority class: the
    /// calls whose priority is in `priorities` (e.g. `5..`, `3..=4`, `..=2`)
    /// get at least `⌊share × limit⌋` permits (at least 1) whenever they
    /// want them, whatever the line's order says. Work-conserving: while the
    /// class wants less, others use its share; running calls are never cut,
    /// so a class that arrives to a full bulkhead reaches its share as
    /// permits come back. The share follows the current limit (an adaptive
    /// one too). Several classes may be given; they must not overlap and
    /// their shares add up to at most 1. While a class is under its share,
    /// its first waiter goes ahead of the line's order; among several such
    /// classes, the one whose first waiter ranks best. (Positions and ETAs
    /// on [`QueueTicket`]s follow the line's order and do not see this
    /// jump.)
    ///
    /// Scenario: interactive requests (priority 1) keep 80 % of the
    /// upstream while a batch backlog that arrived first (priority 0) waits,
    /// and the batch keeps 20 % under strict priority instead of starving:
    ///
    /// ```
    /// use semaforo::bulkhead::Bulkhead;
    ///
    /// let bulkhead = Bulkhead::builder(50)
    ///     .max_queue(10_000)
    ///     .min_share(1.., 0.8) // interactive
    ///     .min_share(..=0, 0.2) // batch
    ///     .build()?;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    ///
    /// Cost: a call of a class always takes the lock (its permits are
    /// counted): 54.2 ns for a free permit against 29.8 ns for a call
    /// outside every class, which keeps the lock-free path
    /// (`benches/bulkhead.rs`, median of 3).
    pub fn min_share(mut self, priorities: impl std::ops::RangeBounds<i32>, share: f64) -> Self {
        use std::ops::Bound;
        let lo = match priorities.start_bound() {
            Bound::Included(&p) => i64::from(p),
            Bound::Excluded(&p) => i64::from(p) + 1,
            Bound::Unbounded => i64::from(i32::MIN),
        };
        let hi = match priorities.end_bound() {
            Bound::Included(&p) => i64::from(p),
            Bound::Excluded(&p) => i64::from(p) - 1,
            Bound::Unbounded => i64::from(i32::MAX),
        };
        self.shares.push(queue::Share { lo, hi, share });
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field: `max_concurrent` 0 or above
    /// 2³¹−1, `max_queue` above 2³¹−1, `max_wait` zero, `max_per_key` 0,
    /// `min_share` with an empty range, a share not in (0, 1], overlapping
    /// ranges, shares adding up to more than 1, or more than 16 classes.
    pub fn build(self) -> Result<Bulkhead, ConfigError> {
        let err = |field, reason: String| Err(ConfigError::new("bulkhead", field, reason));
        if self.max_concurrent == 0 || self.max_concurrent > MAX_COUNT {
            return err(
                "max_concurrent",
                format!(
                    "must be between 1 and {MAX_COUNT}, got {}",
                    self.max_concurrent
                ),
            );
        }
        if self.max_queue > MAX_COUNT {
            return err(
                "max_queue",
                format!("must be at most {MAX_COUNT}, got {}", self.max_queue),
            );
        }
        if self.max_wait == Some(Duration::ZERO) {
            return err(
                "max_wait",
                "must be above zero (use max_queue(0) for no waiting)".into(),
            );
        }
        if self.max_per_key == Some(0) {
            return err("max_per_key", "must be at least 1".into());
        }
        if self.sample_every == 0 {
            return err("sample_every", "must be at least 1".into());
        }
        adaptive::validate(&self.limit, self.max_concurrent)?;
        queue::Share::validate(&self.shares)?;
        let cfg = Config {
            obs: Observer::new(self.name, self.listener.0),
            max_queue: self.max_queue,
            max_wait: self.max_wait,
            aging: self.aging,
            max_per_key: self.max_per_key,
            expected_service: self.expected_service,
            shares: self.shares.into_boxed_slice(),
        };
        let controller = adaptive::Controller::new(&self.limit, self.max_concurrent);
        let start = controller
            .as_ref()
            .map_or(self.max_concurrent, |c| c.limit());
        let mut shared = Shared::new(cfg, start);
        shared.adaptive = controller.map(|c| queue::Adaptive {
            nominal: std::sync::atomic::AtomicU32::new(c.nominal()),
            ctrl: std::sync::Mutex::new(c),
            untold: crate::observe::InOrder::default(),
            every: self.sample_every,
            max: self.max_concurrent,
        });
        Ok(Bulkhead {
            shared: Arc::new(shared),
        })
    }
}

impl Bulkhead {
    /// Starts a builder for a bulkhead letting `max_concurrent` calls into the
    /// inner service at once (1 ..= 2³¹−1, checked by
    /// [`build`](BulkheadBuilder::build)).
    ///
    /// ```
    /// use semaforo::bulkhead::Bulkhead;
    /// use std::time::Duration;
    ///
    /// // 5 at once, 45 more waiting at most 30 s each, the rest refused.
    /// let bulkhead = Bulkhead::builder(5)
    ///     .name("openai")
    ///     .max_queue(45)
    ///     .max_wait(Duration::from_secs(30))
    ///     .build()?;
    /// assert_eq!(bulkhead.snapshot().limit, 5);
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn builder(max_concurrent: u32) -> BulkheadBuilder {
        BulkheadBuilder {
            listener: ListenerSlot::default(),
            name: None,
            max_concurrent,
            max_queue: 0,
            max_wait: None,
            aging: Some(DEFAULT_PRIORITY_AGING),
            max_per_key: None,
            expected_service: None,
            limit: Limit::Fixed,
            sample_every: 8,
            shares: Vec::new(),
        }
    }

    crate::closure::call_method!("bulkhead");

    /// A tower layer sharing this bulkhead. Add priorities, partitions, tickets
    /// and streamed release on it.
    pub fn layer(&self) -> BulkheadLayer {
        BulkheadLayer {
            shared: self.shared.clone(),
            info: NoInfo,
            classify: crate::classify::ErrorClassifier,
            _release: PhantomData,
        }
    }

    /// Changes the limit at run time. Growing admits waiters at once; shrinking
    /// cuts no running call, it only admits fewer until in-flight is below the new
    /// limit. `0` pauses admissions. With an adaptive limit it sets the
    /// maximum the controller moves under (at least 1).
    pub fn set_max_concurrent(&self, n: u32) {
        self.shared.set_max(n);
    }

    /// Lets `source` (a layer below that decides when admitted calls really
    /// start, such as a [`Pace`](crate::pace::Pace)) estimate the waits shown
    /// on [`QueueTicket`]s: a waiter is admitted when a permit frees, i.e.
    /// `expected_service_time` (or the smoothed hold time) after the call
    /// ahead of it starts at the source. `None` goes back to this bulkhead's
    /// own estimate. The LLM preset wires its pacer here.
    pub fn set_eta_source(&self, source: Option<Arc<dyn crate::eta::EtaSource>>) {
        if let Some(s) = &source {
            s.watch();
        }
        self.shared.set_eta_source(source);
    }

    /// Answers every waiting caller `ShuttingDown` at once and refuses new calls;
    /// running calls finish. Returns how many waiters were released. (A
    /// [`Shutdown`](crate::shutdown::Shutdown) calls it at its trigger once
    /// given the bulkhead with [`watch`](crate::shutdown::Shutdown::watch).)
    pub fn close(&self) -> u64 {
        self.shared.close() as u64
    }

    /// Takes a slot now without a call (released when the permit drops), or
    /// refuses with `QueueFull` when none is free or callers are waiting (they
    /// come first: in line, or granted a permit their task has not picked up
    /// yet — [`snapshot`](Self::snapshot)'s `waiting` counts only the
    /// former), with a `retry_after`: the time between two admissions
    /// (1 s a round before any service time is known), as a full line's.
    ///
    /// # Errors
    /// [`Rejected`](crate::Rejected) `QueueFull` as above.
    /// A permit taken this way has priority 0 (it counts in the
    /// [`min_share`](BulkheadBuilder::min_share) class holding 0, if any).
    pub fn try_permit(&self) -> Result<BulkheadPermit, crate::Rejected> {
        if let Some(class) = self.shared.class_of(0) {
            return self.shared.try_class(class);
        }
        if self.shared.try_fast() {
            Ok(BulkheadPermit::fast(self.shared.clone()))
        } else {
            Err(self.shared.refuse_no_permit())
        }
    }

    /// Counts for a health endpoint (one short lock).
    pub fn snapshot(&self) -> BulkheadSnapshot {
        self.shared.snapshot()
    }

    /// Whether a call could take a permit now (one atomic load): a permit
    /// is free and nobody waits.
    pub(crate) fn free_now(&self) -> bool {
        self.shared.free_now()
    }

    /// About how long a call arriving now would wait for a permit (the
    /// callers ahead of it times the service time — smoothed, or the
    /// configured expected one, else 1 s — over the limit), and whether it
    /// would be refused (closed, the line full, or its known ETA past
    /// `max_wait`).
    pub(crate) fn outlook(&self) -> (Duration, bool) {
        self.shared.outlook()
    }

    /// The name given to the builder.
    pub fn name(&self) -> Option<&str> {
        self.shared.cfg.obs.name.as_deref()
    }
}

/// A bulkhead's state at one instant (counts are `u64`, as in every snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BulkheadSnapshot {
    /// Permits held (calls running, or streams not finished).
    pub in_flight: u64,
    /// Callers waiting in line.
    pub waiting: u64,
    /// The current `max_concurrent`.
    pub limit: u64,
    /// The configured `max_queue`.
    pub max_queue: u64,
    /// How many may wait now: `max_queue`, or under an adaptive limit
    /// `max_queue × limit / max` (the line shrinks with the limit).
    pub line_bound: u64,
    /// Partition keys with running or waiting calls.
    pub partitions: u64,
    /// Calls refused because the line was full.
    pub rejected_queue_full: u64,
    /// Of those, waiters shed from a line that shrank with an adaptive
    /// limit (or displaced by a newcomer that outranked them).
    pub shed: u64,
    /// Callers that waited `max_wait` and gave up.
    pub rejected_queue_timeout: u64,
    /// Calls refused (or waiters released) because the bulkhead was closed.
    pub rejected_shutting_down: u64,
    /// `true` after [`Bulkhead::close`].
    pub closed: bool,
    /// The service time the ETA uses.
    pub service_time: Option<Duration>,
    /// An adaptive limit outside its baseline probes (`limit` reads the
    /// probe's pinned value while one runs); `None` for a fixed limit.
    pub adaptive_limit: Option<u64>,
    /// Permits held by each [`min_share`](BulkheadBuilder::min_share)
    /// class, in the order given to the builder (up to 16; the rest 0).
    pub class_in_flight: [u64; 16],
}

impl crate::close::Close for Bulkhead {
    fn close(&self) -> u64 {
        Bulkhead::close(self)
    }
}

//! A circuit breaker that understands error classes.
//!
//! A common production policy: 5 failures in a row → open for 5 minutes, then probe. The
//! trap they fell into: counting `429 Too Many Requests` as a failure opens the
//! breaker exactly when the caller should merely slow down. Here results are
//! [classified](crate::classify) first, and by default only `Overloaded`,
//! `Transient` and `Infrastructure` count (timeouts are `Transient`); `Throttled`
//! and `Permanent` never trip it. [`BreakerBuilder::counts`] changes that.
//!
//! - **Trip policies**, any combination: consecutive failures; failure rate over
//!   a sliding window (last N calls, or the last T split in buckets) once it
//!   holds `min_calls`; slow-call rate (calls longer than a threshold). The
//!   rates are looked at when a failure or a slow call is recorded, never on
//!   a success (as Polly's advanced breaker; Resilience4j looks after every
//!   call): a window whose `min_calls`-th call is a success stays closed at
//!   the threshold, and its next failure opens it — the latest answer was
//!   good.
//! - **Open**: calls fail at once with [`RejectKind::CircuitOpen`] and a
//!   `retry_after` = time until half-open; no inner call. The open time can grow
//!   on consecutive re-opens (capped) and take jitter so a fleet of instances does
//!   not probe in lockstep.
//! - **Half-open**: exactly `probes` calls are let through, the others refused;
//!   `probes` successes close it, one failure re-opens it. A probe whose future is
//!   dropped frees its slot and counts as nothing.
//! - **Manual**: [`Breaker::force_open`], [`Breaker::disable`] (always closed,
//!   records nothing), [`Breaker::metrics_only`] (runs the state machine, never
//!   refuses — a shadow mode for tuning), [`Breaker::reset`].
//! - **Events**: [`BreakerBuilder::on_event`] hears every transition
//!   ([`EventKind::BreakerTransition`](crate::observe::EventKind::BreakerTransition),
//!   told after the breaker's lock is released, in order: a listener may call
//!   back into the breaker) and every refusal. The transitions form one
//!   chain (each starts where the last ended): of the state machine in
//!   normal and metrics-only modes (a metrics-only breaker's shadow
//!   transitions are told), of the state callers meet while forced open or
//!   disabled; a mode change that moves the state followed is told with
//!   [`TransitionReason::Manual`](crate::observe::TransitionReason::Manual).
//!   [`Breaker::subscribe`] (a `tokio::sync::watch` of the state callers
//!   meet);
//!   [`Breaker::snapshot`] for deep health checks.
//!
//! Cost: admission in the closed state is one atomic load; a success is one more
//! load (a store only when it ends a failure run); no lock, no allocation, no
//! clock read unless a slow-call policy or a time window asks for one.
//!
//! ```
//! use semaforo::breaker::{Breaker, BreakerState};
//! use semaforo::classify::{Class, Classify};
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! // 5 consecutive failures → open for 5 minutes.
//! let breaker = Breaker::builder()
//!     .name("payments")
//!     .consecutive_failures(5)
//!     .open_for(Duration::from_secs(300))
//!     .build()?;
//! let mut svc = ServiceBuilder::new()
//!     .layer(breaker.layer())
//!     .service(service_fn(|_: ()| async { Err::<(), _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) }));
//! for _ in 0..5 {
//!     let _ = svc.ready().await?.call(()).await;
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//! let err = svc.ready().await?.call(()).await.unwrap_err();
//! assert!(err.to_string().starts_with("breaker 'payments': circuit open"));
//! # Ok(()) }
//! ```

mod core;
mod keyed;
mod service;
mod window;

pub use keyed::{KeyedBreaker, KeyedBreakerLayer, KeyedBreakerService};
pub use service::{BreakerLayer, BreakerOutcome, BreakerService, ResponseFuture};

use self::core::{Config, Shared};
use self::window::Window;
use crate::classify::{Class, ErrorClassifier};
use crate::error::ConfigError;
#[cfg(doc)]
use crate::error::RejectKind;
use crate::observe::{Event, ListenerSlot, Observer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The breaker's state (defined with the event model, which reports it;
/// the same type).
pub use crate::observe::BreakerState;

/// A manual override of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// The state machine decides.
    Normal,
    /// Every call is refused.
    ForcedOpen,
    /// Every call passes; nothing is recorded.
    Disabled,
    /// The state machine runs and reports, but no call is ever refused.
    MetricsOnly,
}

/// A state change, queued under the breaker's lock and told to the
/// listeners once it is released (as an [`EventKind::BreakerTransition`](crate::observe::EventKind::BreakerTransition)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transition {
    /// The state left.
    pub(crate) from: BreakerState,
    /// The state entered.
    pub(crate) to: BreakerState,
    /// Why.
    pub(crate) reason: crate::observe::TransitionReason,
}

/// A breaker's state and counts at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BreakerSnapshot {
    /// Current state.
    pub state: BreakerState,
    /// Manual mode.
    pub mode: Mode,
    /// The current run of failures (consecutive policy).
    pub consecutive_failures: u32,
    /// Calls in the sliding window.
    pub calls_in_window: u64,
    /// Failures in the sliding window.
    pub failures_in_window: u64,
    /// Slow calls in the sliding window.
    pub slow_in_window: u64,
    /// Failures ÷ calls in the window.
    pub failure_rate: f64,
    /// Slow calls ÷ calls in the window.
    pub slow_rate: f64,
    /// Calls refused so far.
    pub rejected: u64,
    /// Time since the last transition.
    pub time_in_state: Duration,
    /// Time until half-open, when open.
    pub retry_after: Option<Duration>,
}

impl BreakerSnapshot {
    /// The state as a caller meets it: `Open` while forced open, `Closed`
    /// while disabled or metrics-only, else [`state`](Self::state) (what
    /// [`Health`](crate::health::Health) reports).
    pub fn effective_state(&self) -> BreakerState {
        effective(self.mode, self.state)
    }
}

/// The one rule of the state callers meet, for a mode and a state machine's state.
pub(crate) fn effective(mode: Mode, state: BreakerState) -> BreakerState {
    match mode {
        Mode::Normal => state,
        Mode::ForcedOpen => BreakerState::Open,
        Mode::Disabled | Mode::MetricsOnly => BreakerState::Closed,
    }
}

/// `min_calls` when not set.
const DEFAULT_MIN_CALLS: u64 = 10;

/// A circuit breaker. Cheap to clone; clones and layers share its state.
#[derive(Debug, Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

#[derive(Debug, Clone, Copy)]
enum WindowKind {
    Count(u32),
    Time(Duration, u32),
}

/// Builder for a [`Breaker`]; [`build`](Self::build) validates it.
#[derive(Clone)]
#[must_use = "call .build() to get a Breaker"]
pub struct BreakerBuilder {
    name: Option<Arc<str>>,
    on_event: ListenerSlot,
    consecutive: Option<u32>,
    failure_rate: Option<f64>,
    slow: Option<(Duration, f64)>,
    window: Option<WindowKind>,
    min_calls: Option<u64>,
    open_for: Duration,
    open_growth: f64,
    open_cap: Option<Duration>,
    open_jitter: f64,
    probes: u32,
    counts: Option<self::core::CountsFn>,
    seed: Option<u64>,
}

impl std::fmt::Debug for BreakerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerBuilder")
            .field("name", &self.name)
            .field("consecutive", &self.consecutive)
            .field("failure_rate", &self.failure_rate)
            .field("slow", &self.slow)
            .field("window", &self.window)
            .field("open_for", &self.open_for)
            .finish_non_exhaustive()
    }
}

impl BreakerBuilder {
    /// Names the breaker in errors and events.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` for each of this breaker's events (transitions, refusals
    /// while open); see [`observe`](crate::observe).
    /// Listeners add up: a second `on_event` keeps the first (both are called, in order).
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.on_event.set(f);
        self
    }

    /// Open after `n` failures in a row (default 5).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive = Some(n);
        self
    }

    /// Turn the consecutive-failures policy off (use a rate policy instead).
    pub fn no_consecutive_failures(mut self) -> Self {
        self.consecutive = None;
        self
    }

    /// Open when failures ÷ calls in the window reach `rate` (0 < rate ≤ 1),
    /// looked at when a failure is recorded (never on a success).
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = Some(rate);
        self
    }

    /// Open when calls taking `threshold` or longer reach `rate` of the window.
    /// A slow probe counts as a failed probe.
    pub fn slow_calls(mut self, threshold: Duration, rate: f64) -> Self {
        self.slow = Some((threshold, rate));
        self
    }

    /// Rates over the last `n` calls (default window: 100 calls).
    pub fn window_calls(mut self, n: u32) -> Self {
        self.window = Some(WindowKind::Count(n));
        self
    }

    /// Rates over the last `len`, kept in `buckets` buckets of `len / buckets`.
    pub fn window_time(mut self, len: Duration, buckets: u32) -> Self {
        self.window = Some(WindowKind::Time(len, buckets));
        self
    }

    /// Calls the window must hold before a rate can trip (default 10, or the
    /// window's size when a [`window_calls`](Self::window_calls) window is
    /// smaller). Set above a count window's size, `build()` refuses it: such a
    /// breaker could never trip on a rate.
    pub fn min_calls(mut self, n: u64) -> Self {
        self.min_calls = Some(n);
        self
    }

    /// How long it stays open before probing (default 5 minutes).
    pub fn open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }

    /// Each consecutive re-open (a failed probe) multiplies the open time by
    /// `factor`, up to `cap` (default: no growth).
    pub fn open_growth(mut self, factor: f64, cap: Duration) -> Self {
        self.open_growth = factor;
        self.open_cap = Some(cap);
        self
    }

    /// Adds a random `[0, fraction]` of the open time, so instances do not probe
    /// in lockstep (default 0).
    pub fn open_jitter(mut self, fraction: f64) -> Self {
        self.open_jitter = fraction;
        self
    }

    /// Probe calls let through when half-open; that many successes close it
    /// (default 1). A probe still running `open_for` after it was let through
    /// is taken as a hung upstream: the next call re-opens the breaker
    /// (counted as a failed probe; no more probes are sent behind it), and
    /// half-open starts again with fresh probes after the open time. A probe whose future is dropped frees its place and counts
    /// nothing. Calls refused while the probes run carry a `retry_after`
    /// (when the oldest running probe's time is up).
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.probes = n;
        self
    }

    /// Which classes count as failures (default [`Class::is_upstream_failure`]:
    /// `Overloaded`, `Transient`, `Infrastructure`).
    pub fn counts(mut self, f: impl Fn(&Class) -> bool + Send + Sync + 'static) -> Self {
        self.counts = Some(Arc::new(f));
        self
    }

    /// Seeds the open-time jitter (tests).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// One breaker per key (upstream host, model name), each configured like
    /// this one, at most `max_keys` of them (see [`KeyedBreaker`]).
    pub fn keyed<K>(self, max_keys: usize) -> Result<KeyedBreaker<K>, ConfigError>
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    {
        KeyedBreaker::new(self, max_keys)
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field: `consecutive_failures` 0,
    /// `failure_rate` or the `slow_calls` rate outside (0, 1], `policy` (no
    /// trip policy left), `window_calls` outside 1..=1,000,000, `window_time`
    /// (zero length, or buckets outside 1..=3600), `min_calls` 0 or above a
    /// count window's size, `open_for` zero, `open_growth` (factor below 1,
    /// cap below `open_for`), `open_jitter` outside [0, 1],
    /// `half_open_probes` 0.
    pub fn build(self) -> Result<Breaker, ConfigError> {
        self.validate()?;
        Ok(self.assemble())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: String| Err(ConfigError::new("breaker", field, reason));
        let rate_ok = |r: f64| r.is_finite() && r > 0.0 && r <= 1.0;
        if self.consecutive == Some(0) {
            return err("consecutive_failures", "must be at least 1".into());
        }
        if let Some(r) = self.failure_rate {
            if !rate_ok(r) {
                return err("failure_rate", format!("must be in (0, 1], got {r}"));
            }
        }
        if let Some((_, r)) = self.slow {
            if !rate_ok(r) {
                return err("slow_calls", format!("rate must be in (0, 1], got {r}"));
            }
        }
        if self.consecutive.is_none() && self.failure_rate.is_none() && self.slow.is_none() {
            return err(
                "policy",
                "no trip policy: set consecutive_failures, failure_rate or slow_calls".into(),
            );
        }
        match self.window {
            Some(WindowKind::Count(n)) if n == 0 || n > 1_000_000 => {
                return err("window_calls", format!("must be in 1..=1000000, got {n}"))
            }
            Some(WindowKind::Time(len, b)) if len.is_zero() || b == 0 || b > 3600 => {
                return err(
                    "window_time",
                    format!(
                        "needs a length above zero and 1..=3600 buckets, got {} / {b}",
                        crate::time::Human(len)
                    ),
                )
            }
            _ => {}
        }
        match (self.min_calls, self.window) {
            (Some(0), _) => return err("min_calls", "must be at least 1".into()),
            (Some(m), Some(WindowKind::Count(n))) if m > u64::from(n) => {
                return err(
                    "min_calls",
                    format!("{m} is more than the window holds ({n} calls): it could never trip"),
                )
            }
            _ => {}
        }
        if self.open_for.is_zero() {
            return err("open_for", "must be above zero".into());
        }
        if !self.open_growth.is_finite() || self.open_growth < 1.0 {
            return err(
                "open_growth",
                format!("factor must be >= 1, got {}", self.open_growth),
            );
        }
        let open_cap = self.open_cap.unwrap_or(self.open_for);
        if open_cap < self.open_for {
            return err(
                "open_growth",
                format!(
                    "cap {} is below open_for {}",
                    crate::time::Human(open_cap),
                    crate::time::Human(self.open_for)
                ),
            );
        }
        if !self.open_jitter.is_finite() || !(0.0..=1.0).contains(&self.open_jitter) {
            return err(
                "open_jitter",
                format!("must be in [0, 1], got {}", self.open_jitter),
            );
        }
        if self.probes == 0 {
            return err("half_open_probes", "must be at least 1".into());
        }
        Ok(())
    }

    /// Builds a validated configuration (infallible).
    fn assemble(self) -> Breaker {
        let open_cap = self.open_cap.unwrap_or(self.open_for);
        let needs_window = self.failure_rate.is_some() || self.slow.is_some();
        let window = needs_window.then(|| match self.window.unwrap_or(WindowKind::Count(100)) {
            WindowKind::Count(n) => Window::count(n),
            WindowKind::Time(len, b) => Window::time(len, b, Instant::now()),
        });
        // With jitter, the cap leaves room for it.
        let open_cap =
            Duration::try_from_secs_f64(open_cap.as_secs_f64() * (1.0 + self.open_jitter))
                .unwrap_or(open_cap);
        let cfg = Config {
            obs: Observer::new(self.name, self.on_event.0),
            consecutive: self.consecutive,
            failure_rate: self.failure_rate,
            slow: self.slow,
            min_calls: self.min_calls.unwrap_or(match self.window {
                Some(WindowKind::Count(n)) => DEFAULT_MIN_CALLS.min(u64::from(n)),
                _ => DEFAULT_MIN_CALLS,
            }),
            open_for: self.open_for,
            open_growth: self.open_growth,
            open_cap,
            open_jitter: self.open_jitter,
            probes: self.probes,
            counts: self.counts,
        };
        Breaker {
            shared: Arc::new(Shared::new(cfg, window, self.seed)),
        }
    }
}

impl Breaker {
    /// The name given to the builder.
    pub fn name(&self) -> Option<&str> {
        self.shared.cfg.obs.name.as_deref()
    }

    /// Starts a builder with common production defaults: 5 consecutive failures, open 5 minutes, 1 probe.
    ///
    /// ```
    /// use semaforo::breaker::{Breaker, BreakerState};
    /// use std::time::Duration;
    ///
    /// let breaker = Breaker::builder()
    ///     .name("payments")
    ///     .consecutive_failures(5)
    ///     .failure_rate(0.5)
    ///     .window_calls(100)
    ///     .open_for(Duration::from_secs(30))
    ///     .build()?;
    /// assert_eq!(breaker.state(), BreakerState::Closed);
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn builder() -> BreakerBuilder {
        BreakerBuilder {
            name: None,
            on_event: ListenerSlot::default(),
            consecutive: Some(5),
            failure_rate: None,
            slow: None,
            window: None,
            min_calls: None,
            open_for: Duration::from_secs(300),
            open_growth: 1.0,
            open_cap: None,
            open_jitter: 0.0,
            probes: 1,
            counts: None,
            seed: None,
        }
    }

    crate::closure::call_method!("breaker");

    /// A tower layer sharing this breaker, classifying with [`ErrorClassifier`]
    /// (any `Ok` is a success); change it with [`BreakerLayer::classify`].
    pub fn layer(&self) -> BreakerLayer<ErrorClassifier> {
        BreakerLayer {
            shared: self.shared.clone(),
            classify: ErrorClassifier,
            _hold: std::marker::PhantomData,
        }
    }

    /// The state machine's state. A breaker in a manual mode
    /// ([`force_open`](Self::force_open), [`disable`](Self::disable),
    /// [`metrics_only`](Self::metrics_only)) keeps its state but refuses or
    /// passes by its mode: read [`snapshot`](Self::snapshot)'s `mode` too.
    pub fn state(&self) -> BreakerState {
        self.shared.state()
    }

    /// The state as a caller meets it: `Open` while forced open, `Closed`
    /// while disabled or metrics-only, else [`state`](Self::state) (what the
    /// router and health read).
    pub(crate) fn effective_state(&self) -> BreakerState {
        self.shared.effective_state()
    }

    /// Half-open with every probe place taken: a call now is refused.
    pub(crate) fn probes_full(&self) -> bool {
        self.shared.probes_full()
    }

    /// In normal mode (no `force_open`, `disable` or `metrics_only`).
    pub(crate) fn is_normal(&self) -> bool {
        self.shared.is_normal()
    }

    /// A `watch` receiver of the state as callers meet it
    /// ([`BreakerSnapshot::effective_state`]): every transition, and a manual
    /// mode that changes it (`force_open` shows `Open`). A metrics-only
    /// breaker's shadow transitions are told to listeners only.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.shared.subscribe()
    }

    /// Refuse every call until [`reset`](Self::reset) or another mode.
    pub fn force_open(&self) {
        self.shared.set_mode(Mode::ForcedOpen);
    }

    /// Let every call through and record nothing.
    pub fn disable(&self) {
        self.shared.set_mode(Mode::Disabled);
    }

    /// Run the state machine but never refuse (shadow mode).
    pub fn metrics_only(&self) {
        self.shared.set_mode(Mode::MetricsOnly);
    }

    /// Back to normal mode and closed, with empty counts.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// State and counts for a health check.
    pub fn snapshot(&self) -> BreakerSnapshot {
        self.shared.snapshot()
    }
}

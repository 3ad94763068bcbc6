//! One event model for every layer, delivered three ways: a `tracing` event, an
//! optional listener callback, and (feature `metrics`) the `metrics` facade.
//!
//! Events happen at **transitions** — a call queued, admitted after a wait,
//! refused, retried; a breaker changing state; a pacer pausing after a 429 or
//! resuming; shutdown phases — never for a call that simply passes. A call that
//! passes every layer at once costs nothing here, whatever is listening.
//!
//! # tracing
//!
//! Target `semaforo`, fields `layer` (`"bulkhead"`, `"quota"`, …), `name` (the
//! instance's [`name`](crate::bulkhead::BulkheadBuilder::name), empty when
//! unnamed) and the event's own fields. Levels: what can happen once per call
//! (queued, admitted after a wait, rejected, retried) is `DEBUG`; a breaker
//! opening and a pacer pausing are `WARN`; recoveries and shutdown phases are
//! `INFO`. So `INFO` never logs per call. A call that waits in a line or retries
//! runs inside a `DEBUG` span `semaforo.wait` / `semaforo.retry` with the same
//! `layer` and `name` fields, so the inner service's own events nest under it.
//!
//! # Listener
//!
//! Every builder takes `.on_event(|e: &Event| …)`; the LLM preset passes one
//! listener to all its layers. The listener runs inline, on the thread that
//! caused the event: keep it short (push to a channel if it must do more).
//! A listener that panics is caught (the panic is logged at `ERROR` under the
//! `semaforo` target) and the call goes on: an observer never breaks the
//! traffic it observes, nor leaves a layer half-way (a caller in a line, a
//! breaker probe taken).
//!
//! # Metrics (feature `metrics`)
//!
//! Recorded through the [`metrics`](https://docs.rs/metrics) facade, so any
//! exporter works (Prometheus, StatsD, …). Labels: `layer`, `name`, plus the
//! ones listed.
//!
//! | name | type | extra labels | from |
//! |---|---|---|---|
//! | `semaforo_rejected_total` | counter | `kind` (`queue_full`, `quota_exceeded`, …) | every refusal |
//! | `semaforo_queued_total` | counter | | calls that had to wait |
//! | `semaforo_wait_seconds` | histogram | | wait of each call admitted after waiting |
//! | `semaforo_retries_total` | counter | `class` (`throttled`, `overloaded`, …) | every retry decided (before its backoff) |
//! | `semaforo_breaker_transitions_total` | counter | `to` (`open`, `half_open`, `closed`) | breaker |
//! | `semaforo_pace_pauses_total` | counter | `reason` | pacer paused by the upstream (or a pause made longer) |
//! | `semaforo_shutdown_phase` | gauge | | 0 serving, 1 draining, 2 drained |
//! | `semaforo_call_seconds` | histogram | `class` (`success`, `throttled`, …) | latency of each call the breaker classified |
//! | `semaforo_limit_changes_total` | counter | `reason` (`probe`, `grew`, `dropped`, `slower`, `max`) | an adaptive bulkhead limit moved |
//! | `semaforo_adaptive_limit` | gauge | | the adaptive limit after each move |
//! | `semaforo_routed_total` | counter | `deployment`, `why` (`first`, `failed_over`, `fell_back`, `hedge`) | every attempt a router sends |
//! | `semaforo_hedges_settled_total` | counter | `outcome` (`hedge_won`, `hedge_lost`) | hedged calls answered |
//! | `semaforo_shared_total` | counter | `outcome` (`hit`, `miss`, `stale_served`, `bypassed`, `evicted`, `coalesced`, `took_over`) | cache and coalesce |
//! | `semaforo_fallbacks_total` | counter | `class`, `outcome` (`answered`, `failed`) | a fallback asked |
//! | `semaforo_level_changes_total` | counter | `to`, `reason` | a degradation switch moved |
//! | `semaforo_faults_injected_total` | counter | `fault` | chaos injected a fault |
//!
//! ## Histograms that add up across a fleet
//!
//! Whether the facade's histograms come out as Prometheus summaries
//! (quantiles per instance, which cannot be added across instances) or as
//! histograms (buckets, which can) is the exporter's setting. Give it
//! [`LATENCY_BUCKETS`] — 10 ms to 10 min, the span of an LLM call from a
//! cached answer to a long generation — for the `_seconds` series:
//!
//! ```text
//! PrometheusBuilder::new()
//!     .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), semaforo::observe::LATENCY_BUCKETS)?
//! ```
//!
//! (as `examples/prometheus.rs` does). `dashboards/semaforo.json` is a Grafana
//! dashboard for these series (import it, pick the Prometheus data source).
//!
//! ## OpenTelemetry
//!
//! - Metrics: install the `metrics-exporter-otel` crate's
//!   `OpenTelemetryRecorder` (over an `opentelemetry_sdk` meter provider with
//!   an `opentelemetry-otlp` exporter) as the facade's recorder, and give it
//!   the same bounds (`set_histogram_bounds`); or keep the Prometheus
//!   endpoint and let the OpenTelemetry Collector's `prometheus` receiver
//!   scrape it.
//! - Traces: the events and the `semaforo.wait` / `semaforo.retry` spans are
//!   `tracing`'s: the `tracing-opentelemetry` layer turns them into
//!   OpenTelemetry spans and span events, exported with
//!   `opentelemetry-otlp`. A call that waited or retried shows its wait as a
//!   child span of the caller's.
//!
//! Levels — in flight, queue depth, breaker state, pace capacity, quota keys —
//! are sampled rather than counted per call: register the layers with a
//! [`Health`](crate::health::Health) and call
//! `Health::record_metrics` (or `Health::spawn_metrics`, both with the
//! feature), which sets
//! `semaforo_<kind>_<detail>` gauges labelled `name`, e.g.
//! `semaforo_bulkhead_in_flight`, `semaforo_bulkhead_waiting`,
//! `semaforo_breaker_open`, `semaforo_breaker_failure_rate`,
//! `semaforo_pace_available_tokens`, `semaforo_pace_available_requests`,
//! `semaforo_pace_waiting`, `semaforo_quota_keys`, and `semaforo_in_flight`,
//! `semaforo_ready` for the shutdown layer.
//!
//! ```
//! use semaforo::breaker::Breaker;
//! use semaforo::observe::{Event, EventKind};
//! use std::sync::{Arc, Mutex};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = seen.clone();
//! let breaker = Breaker::builder()
//!     .name("payments")
//!     .consecutive_failures(1)
//!     .on_event(move |e: &Event| log.lock().unwrap().push((e.layer, e.kind.clone())))
//!     .build()?;
//! let svc = breaker.layer().layer(service_fn(|_: ()| async {
//!     Err::<(), _>(std::io::Error::from(std::io::ErrorKind::TimedOut))
//! }));
//! let _ = svc.clone().oneshot(()).await; // fails: the breaker opens
//! let _ = svc.oneshot(()).await; // refused
//! let seen = seen.lock().unwrap();
//! assert!(matches!(seen[0], ("breaker", EventKind::BreakerTransition { .. })));
//! assert!(matches!(seen[1], ("breaker", EventKind::Rejected { .. })));
//! # Ok(()) }
//! ```

/// Histogram bounds for latencies and waits, in seconds, from 10 ms to
/// 10 min (16 buckets): what an LLM call spans, from a cache hit to a long
/// generation. Give them to the exporter for the `*_seconds` series
/// (see [Histograms that add up across a fleet](self#histograms-that-add-up-across-a-fleet)).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The histograms the crate records (the series `LATENCY_BUCKETS` are for).
pub const HISTOGRAMS: &[&str] = &["semaforo_call_seconds", "semaforo_wait_seconds"];

mod in_order;
use crate::classify::Class;
use crate::error::{RejectKind, Rejected};
pub(crate) use in_order::InOrder;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EventKind {
    /// A call had to wait (bulkhead line, quota wait mode, pacer reservation);
    /// `position` is its place in line at arrival (0 = next).
    Queued {
        /// Callers ahead of it.
        position: usize,
    },
    /// A call that waited was let through.
    Admitted {
        /// How long it waited.
        waited: Duration,
    },
    /// A call was refused without reaching the inner service.
    Rejected {
        /// Why.
        kind: RejectKind,
        /// When to come back, if known.
        retry_after: Option<Duration>,
    },
    /// A failed attempt will be retried.
    Retried {
        /// How the attempt failed.
        class: Class,
        /// The attempt that failed (1 = the first).
        attempt: u32,
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// A breaker changed state.
    BreakerTransition {
        /// The state left.
        from: BreakerState,
        /// The state entered.
        to: BreakerState,
        /// Why.
        reason: TransitionReason,
    },
    /// A pacer stopped dispatching — or, during a pause, a later 429 made
    /// it longer (told again, with the time it now lasts). A pause that
    /// ends is told as [`PaceResumed`](Self::PaceResumed) before the next
    /// one.
    PacePaused {
        /// For how long, from now.
        pause: Duration,
        /// Why.
        reason: PauseReason,
    },
    /// A pacer dispatches again after a pause.
    PaceResumed,
    /// A shutdown phase began.
    Shutdown {
        /// Which one.
        phase: ShutdownPhase,
    },
    /// A router sent an attempt to a deployment.
    Routed {
        /// The deployment's name.
        deployment: Arc<str>,
        /// The attempt (1 = the first; a hedge counts as one).
        attempt: u32,
        /// Why this attempt.
        why: RouteReason,
    },
    /// An adaptive bulkhead limit moved. Told in the order the limit moved,
    /// one at a time (two changes on two threads included): each `from` is
    /// the `to` before it, and the last `to` told is the limit in force.
    LimitChanged {
        /// The limit before.
        from: u64,
        /// The limit now.
        to: u64,
        /// Why.
        reason: LimitReason,
    },
    /// A hedged call got its answer, from the hedge or from the attempt it
    /// hedged; the other attempt was dropped.
    HedgeSettled {
        /// The deployment that answered.
        winner: Arc<str>,
        /// Whether the hedge answered first.
        hedge_won: bool,
    },
    /// A cache or a coalescing layer answered a call (or did not).
    Shared {
        /// What happened.
        outcome: ShareOutcome,
    },
    /// A fallback layer answered a failure from its source (`answered`), or
    /// its source failed too and the caller got the original result.
    Fallback {
        /// The class of the inner result.
        class: Class,
        /// Whether the fallback answered.
        answered: bool,
    },
    /// A chaos layer injected a fault into a call.
    Injected {
        /// `"latency"`, `"error"`, `"response"`, `"hang"`, `"cut_stream"`,
        /// `"stall_stream"`.
        fault: &'static str,
    },
    /// A degradation switch changed level.
    LevelChanged {
        /// The level before.
        from: crate::degrade::Level,
        /// The level now.
        to: crate::degrade::Level,
        /// Why.
        reason: crate::degrade::LevelReason,
    },
}

/// What a cache or a coalescing layer did with a call (in
/// [`EventKind::Shared`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShareOutcome {
    /// Answered from the cache.
    Hit,
    /// Not in the cache (or expired): the call went on.
    Miss,
    /// Served a stale answer kept for errors.
    StaleServed,
    /// The request asked not to be cached or coalesced, or has no key.
    Bypassed,
    /// An entry left the cache (size bound or expiry).
    Evicted,
    /// Waited for an identical call in flight and got its answer.
    Coalesced,
    /// The call it waited for left no answer this one could take (it was
    /// dropped, ended with a refusal or error of its own caller's, or is a
    /// stream already under way that cannot be joined from its start): this
    /// one went on instead, leading a flight of its own.
    TookOver,
}

impl ShareOutcome {
    /// A stable snake-case label.
    pub fn as_str(self) -> &'static str {
        match self {
            ShareOutcome::Hit => "hit",
            ShareOutcome::Miss => "miss",
            ShareOutcome::StaleServed => "stale_served",
            ShareOutcome::Bypassed => "bypassed",
            ShareOutcome::Evicted => "evicted",
            ShareOutcome::Coalesced => "coalesced",
            ShareOutcome::TookOver => "took_over",
        }
    }
}

/// Why an adaptive limit moved (in [`EventKind::LimitChanged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitReason {
    /// Measuring the upstream's unloaded latency (pinned low), or back
    /// from it.
    Probe,
    /// Room to grow: no drop, latency within bounds.
    Grew,
    /// A call was dropped (`Overloaded`, `Transient`).
    Dropped,
    /// The latency rose.
    Slower,
    /// `set_max_concurrent` moved the ceiling under it.
    Max,
}

impl LimitReason {
    /// A stable snake-case label.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitReason::Probe => "probe",
            LimitReason::Grew => "grew",
            LimitReason::Dropped => "dropped",
            LimitReason::Slower => "slower",
            LimitReason::Max => "max",
        }
    }
}

/// Why a router sent an attempt where it did (in [`EventKind::Routed`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RouteReason {
    /// A call's first attempt: to the deployment that could start it
    /// soonest.
    First,
    /// The previous attempt failed with a class that fails over.
    FailedOver {
        /// The deployment that failed.
        from: Arc<str>,
        /// How.
        class: Class,
    },
    /// The previous attempt answered a `Permanent` reason with a fallback
    /// group.
    FellBack {
        /// The deployment that answered.
        from: Arc<str>,
        /// The reason.
        reason: crate::classify::Permanent,
    },
    /// A hedge of a late attempt.
    Hedge {
        /// The deployment of the late attempt.
        from: Arc<str>,
    },
}

impl RouteReason {
    /// A stable snake-case label: `first`, `failed_over`, `fell_back`,
    /// `hedge`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RouteReason::First => "first",
            RouteReason::FailedOver { .. } => "failed_over",
            RouteReason::FellBack { .. } => "fell_back",
            RouteReason::Hedge { .. } => "hedge",
        }
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls pass; outcomes are recorded.
    Closed,
    /// Calls are refused until the open time ends.
    Open,
    /// A few probe calls pass to test the upstream.
    HalfOpen,
}

/// Why a breaker changed state. `Display` / [`as_str`](Self::as_str) give the
/// words used in logs and metrics ("consecutive failures", …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransitionReason {
    /// Closed → open: a run of failures reached `consecutive_failures`.
    ConsecutiveFailures,
    /// Closed → open: the window's failure rate reached `failure_rate`.
    FailureRate,
    /// Closed → open: the window's slow-call rate reached its threshold.
    SlowCallRate,
    /// Open → half-open: the open time is over.
    OpenElapsed,
    /// Half-open → open: a probe failed.
    ProbeFailed,
    /// Half-open → open: the probes outlived `open_for` (a hung upstream).
    ProbeTimedOut,
    /// Half-open → closed: enough probes succeeded.
    ProbesSucceeded,
    /// `Breaker::reset`.
    Reset,
    /// `Breaker::force_open`, `disable` or `metrics_only` (or leaving one)
    /// changed the state listeners follow: what callers meet while forced
    /// open or disabled, the state machine's in normal and metrics-only
    /// modes (entering metrics-only from `Open` tells nothing: the shadow
    /// state machine stays open; the breaker's snapshot gives the mode).
    Manual,
}

impl TransitionReason {
    /// The words for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionReason::ConsecutiveFailures => "consecutive failures",
            TransitionReason::FailureRate => "failure rate",
            TransitionReason::SlowCallRate => "slow-call rate",
            TransitionReason::OpenElapsed => "open duration elapsed",
            TransitionReason::ProbeFailed => "probe failed",
            TransitionReason::ProbeTimedOut => "probe timed out",
            TransitionReason::ProbesSucceeded => "probes succeeded",
            TransitionReason::Reset => "reset",
            TransitionReason::Manual => "manual mode",
        }
    }
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a pacer stopped dispatching. `Display` / [`as_str`](Self::as_str)
/// give the words used in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PauseReason {
    /// The upstream answered 429 (with or without a `retry_after`).
    Throttled,
}

impl PauseReason {
    /// The words for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Throttled => "throttled by the upstream",
        }
    }
}

impl fmt::Display for PauseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The phases of a graceful shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShutdownPhase {
    /// Triggered: new calls are refused, calls in flight go on.
    Draining,
    /// Every call in flight finished before the deadline.
    Drained,
    /// The deadline came first: the calls still running were cut.
    Cut,
}

/// One event, as given to listeners.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event<'a> {
    /// The layer: `"bulkhead"`, `"quota"`, `"pace"`, `"retry"`, `"breaker"`,
    /// `"timeout"`, `"shutdown"`, `"route"`.
    pub layer: &'static str,
    /// The instance's name, if it was given one.
    pub name: Option<&'a str>,
    /// What happened.
    pub kind: EventKind,
}

/// A listener: called inline for every event of the layers it was given to.
pub type Listener = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// A builder's listener slot (`Debug` without showing the closure).
#[derive(Clone, Default)]
pub(crate) struct ListenerSlot(pub(crate) Option<Listener>);

impl fmt::Debug for ListenerSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(listener)"
        } else {
            "None"
        })
    }
}

impl ListenerSlot {
    /// Adds `f`: listeners are additive, each called in the order given (a
    /// second `.on_event(…)` never silences the first).
    pub(crate) fn set(&mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) {
        self.0 = Some(match self.0.take() {
            None => Arc::new(f),
            Some(before) => Arc::new(move |e: &Event<'_>| {
                before(e);
                f(e);
            }),
        });
    }
}

/// A layer instance's name and listener: what every layer emits through.
/// Built by the layers' builders from `.name(…)` and `.on_event(…)`.
#[derive(Clone, Default)]
pub struct Observer {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) listener: Option<Listener>,
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("name", &self.name)
            .field("listener", &self.listener.is_some())
            .finish()
    }
}

impl Observer {
    pub(crate) fn new(name: Option<Arc<str>>, listener: Option<Listener>) -> Self {
        Observer { name, listener }
    }

    /// [`emit`](Self::emit) for an event of the fast path (a cache hit, a
    /// coalesced answer): skipped without a function call when nothing would
    /// see it (no listener, no `metrics` feature, `semaforo` tracing below
    /// `DEBUG`).
    #[inline]
    pub(crate) fn emit_often(&self, layer: &'static str, kind: EventKind) {
        if self.listening() {
            self.emit(layer, kind);
        }
    }

    /// Someone takes the frequent (`DEBUG`) events: a listener, metrics or a
    /// `tracing` subscriber. Lets a caller skip what only an event needs.
    #[inline]
    pub(crate) fn listening(&self) -> bool {
        self.listener.is_some()
            || cfg!(feature = "metrics")
            || tracing::enabled!(target: "semaforo", tracing::Level::DEBUG)
    }

    /// Emits `kind` from `layer`: tracing, metrics, then the listener.
    #[cold]
    #[inline(never)]
    pub(crate) fn emit(&self, layer: &'static str, kind: EventKind) {
        let event = Event {
            layer,
            name: self.name.as_deref(),
            kind,
        };
        trace(&event);
        #[cfg(feature = "metrics")]
        metrics_out::record(&event);
        if let Some(listener) = &self.listener {
            // A listener that panics must not leave the layer half-way
            // (a caller in a line with no future to take it out, a flag
            // never cleared): the panic is caught and reported, the call
            // goes on.
            let heard = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener(&event)));
            if let Err(panic) = heard {
                let what = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("a non-string payload");
                tracing::error!(
                    target: "semaforo",
                    layer,
                    name = self.name.as_deref().unwrap_or(""),
                    "an on_event listener panicked (caught; the call goes on): {what}"
                );
            }
        }
    }

    /// Emits the refusal `r`.
    #[inline]
    pub(crate) fn rejected(&self, r: &Rejected) {
        self.emit(
            r.layer(),
            EventKind::Rejected {
                kind: r.kind(),
                retry_after: r.retry_after(),
            },
        );
    }

    /// The span a waiting or retrying call runs in.
    pub(crate) fn span(&self, layer: &'static str, what: &'static str) -> tracing::Span {
        let name = self.name.as_deref().unwrap_or("");
        match what {
            "retry" => tracing::debug_span!(target: "semaforo", "semaforo.retry", layer, name),
            _ => tracing::debug_span!(target: "semaforo", "semaforo.wait", layer, name),
        }
    }
}

/// A stable snake-case label for a rejection kind.
pub fn reject_label(kind: RejectKind) -> &'static str {
    match kind {
        RejectKind::QueueFull => "queue_full",
        RejectKind::QueueTimeout => "queue_timeout",
        RejectKind::QuotaExceeded => "quota_exceeded",
        RejectKind::BudgetExceeded => "budget_exceeded",
        RejectKind::CircuitOpen => "circuit_open",
        RejectKind::RetryBudgetExhausted => "retry_budget_exhausted",
        RejectKind::ShuttingDown => "shutting_down",
        RejectKind::Timeout => "timeout",
        RejectKind::BackendUnavailable => "backend_unavailable",
    }
}

/// A stable snake-case label for a breaker state.
pub fn state_label(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half_open",
    }
}

fn trace(e: &Event<'_>) {
    let (layer, name) = (e.layer, e.name.unwrap_or(""));
    match &e.kind {
        EventKind::Queued { position } => {
            tracing::debug!(target: "semaforo", layer, name, position, "queued")
        }
        EventKind::Admitted { waited } => {
            tracing::debug!(target: "semaforo", layer, name, ?waited, "admitted after waiting")
        }
        EventKind::Rejected { kind, retry_after } => tracing::debug!(
            target: "semaforo",
            layer,
            name,
            kind = reject_label(*kind),
            ?retry_after,
            "rejected"
        ),
        EventKind::Retried {
            class,
            attempt,
            delay,
        } => tracing::debug!(
            target: "semaforo",
            layer,
            name,
            class = class.as_str(),
            attempt,
            ?delay,
            "retrying"
        ),
        EventKind::BreakerTransition { from, to, reason } => {
            let (from, to) = (state_label(*from), state_label(*to));
            if to == "open" {
                tracing::warn!(target: "semaforo", layer, name, from, to, reason = reason.as_str(), "breaker opened")
            } else {
                tracing::info!(target: "semaforo", layer, name, from, to, reason = reason.as_str(), "breaker state")
            }
        }
        EventKind::PacePaused { pause, reason } => {
            tracing::warn!(target: "semaforo", layer, name, ?pause, reason = reason.as_str(), "pacer paused")
        }
        EventKind::PaceResumed => tracing::info!(target: "semaforo", layer, name, "pacer resumed"),
        EventKind::Shutdown { phase } => {
            tracing::info!(target: "semaforo", layer, name, phase = ?phase, "shutdown")
        }
        EventKind::Routed {
            deployment,
            attempt,
            why,
        } => match why {
            RouteReason::First => {
                tracing::trace!(target: "semaforo", layer, name, deployment = &**deployment, attempt, "routed")
            }
            RouteReason::FailedOver { from, class } => tracing::info!(
                target: "semaforo",
                layer,
                name,
                deployment = &**deployment,
                attempt,
                from = &**from,
                class = class.as_str(),
                "failed over"
            ),
            RouteReason::FellBack { from, reason } => tracing::info!(
                target: "semaforo",
                layer,
                name,
                deployment = &**deployment,
                attempt,
                from = &**from,
                reason = reason.as_str(),
                "fell back"
            ),
            RouteReason::Hedge { from } => tracing::debug!(
                target: "semaforo",
                layer,
                name,
                deployment = &**deployment,
                attempt,
                from = &**from,
                "hedged"
            ),
        },
        EventKind::LimitChanged { from, to, reason } => tracing::debug!(
            target: "semaforo",
            layer,
            name,
            from,
            to,
            reason = reason.as_str(),
            "limit changed"
        ),
        EventKind::Fallback { class, answered } => tracing::debug!(
            target: "semaforo",
            layer,
            name,
            class = class.as_str(),
            answered,
            "fallback"
        ),
        EventKind::LevelChanged { from, to, reason } => tracing::info!(
            target: "semaforo",
            layer,
            name,
            from = from.as_str(),
            to = to.as_str(),
            reason = reason.as_str(),
            "degradation level changed"
        ),
        EventKind::Injected { fault } => {
            tracing::trace!(target: "semaforo", layer, name, fault, "fault injected")
        }
        EventKind::Shared { outcome } => tracing::trace!(
            target: "semaforo",
            layer,
            name,
            outcome = outcome.as_str(),
            "shared"
        ),
        EventKind::HedgeSettled { winner, hedge_won } => tracing::debug!(
            target: "semaforo",
            layer,
            name,
            winner = &**winner,
            hedge_won,
            "hedge settled"
        ),
    }
}

#[cfg(feature = "metrics")]
mod metrics_out {
    use super::{reject_label, state_label, Event, EventKind, ShutdownPhase};

    pub(super) fn record(e: &Event<'_>) {
        let (layer, name) = (e.layer, e.name.unwrap_or("").to_owned());
        match &e.kind {
            EventKind::Queued { .. } => {
                metrics::counter!("semaforo_queued_total", "layer" => layer, "name" => name)
                    .increment(1)
            }
            EventKind::Admitted { waited } => {
                metrics::histogram!("semaforo_wait_seconds", "layer" => layer, "name" => name)
                    .record(waited.as_secs_f64())
            }
            EventKind::Rejected { kind, .. } => metrics::counter!(
                "semaforo_rejected_total",
                "layer" => layer,
                "name" => name,
                "kind" => reject_label(*kind)
            )
            .increment(1),
            EventKind::Retried { class, .. } => metrics::counter!(
                "semaforo_retries_total",
                "layer" => layer,
                "name" => name,
                "class" => class.as_str()
            )
            .increment(1),
            EventKind::BreakerTransition { to, .. } => metrics::counter!(
                "semaforo_breaker_transitions_total",
                "layer" => layer,
                "name" => name,
                "to" => state_label(*to)
            )
            .increment(1),
            EventKind::PacePaused { reason, .. } => metrics::counter!(
                "semaforo_pace_pauses_total",
                "layer" => layer,
                "name" => name,
                "reason" => reason.as_str()
            )
            .increment(1),
            EventKind::PaceResumed => {}
            EventKind::Shutdown { phase } => {
                let v = match phase {
                    ShutdownPhase::Draining => 1.0,
                    ShutdownPhase::Drained | ShutdownPhase::Cut => 2.0,
                };
                metrics::gauge!("semaforo_shutdown_phase", "layer" => layer, "name" => name).set(v)
            }
            EventKind::Routed {
                deployment, why, ..
            } => metrics::counter!(
                "semaforo_routed_total",
                "layer" => layer,
                "name" => name,
                "deployment" => deployment.to_string(),
                "why" => why.as_str()
            )
            .increment(1),
            EventKind::LimitChanged { to, reason, .. } => {
                metrics::counter!(
                    "semaforo_limit_changes_total",
                    "layer" => layer,
                    "name" => name.clone(),
                    "reason" => reason.as_str()
                )
                .increment(1);
                metrics::gauge!("semaforo_adaptive_limit", "layer" => layer, "name" => name)
                    .set(*to as f64)
            }
            EventKind::Fallback { class, answered } => metrics::counter!(
                "semaforo_fallbacks_total",
                "layer" => layer,
                "name" => name,
                "class" => class.as_str(),
                "outcome" => if *answered { "answered" } else { "failed" }
            )
            .increment(1),
            // The level itself: the `semaforo_degrade_level` gauge of `Health::degrade`.
            EventKind::LevelChanged { to, reason, .. } => metrics::counter!(
                "semaforo_level_changes_total",
                "layer" => layer,
                "name" => name,
                "to" => to.as_str(),
                "reason" => reason.as_str()
            )
            .increment(1),
            EventKind::Injected { fault } => metrics::counter!(
                "semaforo_faults_injected_total",
                "layer" => layer,
                "name" => name,
                "fault" => *fault
            )
            .increment(1),
            EventKind::Shared { outcome } => metrics::counter!(
                "semaforo_shared_total",
                "layer" => layer,
                "name" => name,
                "outcome" => outcome.as_str()
            )
            .increment(1),
            EventKind::HedgeSettled { hedge_won, .. } => metrics::counter!(
                "semaforo_hedges_settled_total",
                "layer" => layer,
                "name" => name,
                "outcome" => if *hedge_won { "hedge_won" } else { "hedge_lost" }
            )
            .increment(1),
        }
    }
}

/// `semaforo_call_seconds` by class for one layer instance. The handles are
/// made at the first call and kept (no allocation per call afterwards), so the
/// recorder must be installed before the first call.
#[cfg(feature = "metrics")]
#[derive(Default)]
pub(crate) struct CallSeconds(std::sync::OnceLock<Vec<metrics::Histogram>>);

#[cfg(feature = "metrics")]
impl fmt::Debug for CallSeconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallSeconds")
    }
}

#[cfg(feature = "metrics")]
impl CallSeconds {
    const CLASSES: [Class; 6] = [
        Class::Success,
        Class::Throttled { retry_after: None },
        Class::Overloaded { retry_after: None },
        Class::Transient,
        Class::Infrastructure,
        Class::permanent(crate::classify::Permanent::Other),
    ];

    pub(crate) fn record(
        &self,
        layer: &'static str,
        name: Option<&str>,
        class: &Class,
        took: Duration,
    ) {
        let handles = self.0.get_or_init(|| {
            Self::CLASSES
                .iter()
                .map(|c| {
                    metrics::histogram!(
                        "semaforo_call_seconds",
                        "layer" => layer,
                        "name" => name.unwrap_or("").to_owned(),
                        "class" => c.as_str()
                    )
                })
                .collect()
        });
        let i = Self::CLASSES
            .iter()
            .position(|c| c.as_str() == class.as_str())
            .unwrap_or(0);
        if let Some(h) = handles.get(i) {
            h.record(took.as_secs_f64());
        }
    }
}

//! Health checks: a shallow readiness (is this instance taking traffic?) and a
//! deep report of every registered guard (breakers, bulkheads, quotas, pacers),
//! serialisable to JSON with the `serde` feature.
//!
//! A production service needs both: the shallow one for the load balancer (it turns
//! not-ready the moment shutdown is triggered, so traffic leaves before the
//! drain), the deep one for people and dashboards.
//!
//! ```
//! use semaforo::breaker::Breaker;
//! use semaforo::bulkhead::Bulkhead;
//! use semaforo::health::{Health, Status};
//! use semaforo::shutdown::Shutdown;
//!
//! let shutdown = Shutdown::new();
//! let breaker = Breaker::builder().name("payments").build()?;
//! let health = Health::new(&shutdown)
//!     .breaker("payments", &breaker)
//!     .bulkhead("backend", &Bulkhead::builder(50).build()?);
//! let report = health.report();
//! assert!(report.ready);
//! assert_eq!(report.status, Status::Ok);
//! breaker.force_open();
//! assert_eq!(health.report().status, Status::Degraded);
//! shutdown.trigger();
//! assert!(!health.is_ready());
//! # Ok::<(), semaforo::ConfigError>(())
//! ```

use crate::breaker::{Breaker, BreakerState, Mode};
use crate::bulkhead::Bulkhead;
use crate::pace::{KeyedPace, Pace};
use crate::quota::Quota;
use crate::shutdown::Shutdown;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

/// Overall or per-component status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
#[non_exhaustive]
pub enum Status {
    /// Working normally.
    Ok,
    /// Working, but protecting itself (a breaker open, a line full, a pacer paused).
    Degraded,
    /// Not taking traffic (shutting down).
    Down,
}

/// One component's state.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Component {
    /// The name it was registered under.
    pub name: String,
    /// `"breaker"`, `"bulkhead"`, `"quota"`, `"pace"`, `"degrade"` or `"cache"`.
    pub kind: &'static str,
    /// Its status.
    pub status: Status,
    /// Its numbers, as `(label, value)` pairs (serialized as a JSON object
    /// of named fields, every value a JSON number with a fraction:
    /// `{"in_flight": 3.0, "waiting": 0.0, …}`; read counts with `as_f64`).
    #[cfg_attr(feature = "serde", serde(serialize_with = "details_as_object"))]
    pub details: Vec<(&'static str, f64)>,
}

/// The health label of a pacer dimension: `available_{unit}` for a minute
/// (the window providers announce), with `_per_second`, `_per_10s`,
/// `_per_hour`, `_per_day` or `_other_window` for the others.
fn available_label(unit: crate::pace::Unit, per: std::time::Duration) -> &'static str {
    use crate::pace::Unit;
    const LABELS: [[&str; 6]; 6] = [
        [
            "available_requests",
            "available_requests_per_second",
            "available_requests_per_10s",
            "available_requests_per_hour",
            "available_requests_per_day",
            "available_requests_other_window",
        ],
        [
            "available_tokens",
            "available_tokens_per_second",
            "available_tokens_per_10s",
            "available_tokens_per_hour",
            "available_tokens_per_day",
            "available_tokens_other_window",
        ],
        [
            "available_input_tokens",
            "available_input_tokens_per_second",
            "available_input_tokens_per_10s",
            "available_input_tokens_per_hour",
            "available_input_tokens_per_day",
            "available_input_tokens_other_window",
        ],
        [
            "available_output_tokens",
            "available_output_tokens_per_second",
            "available_output_tokens_per_10s",
            "available_output_tokens_per_hour",
            "available_output_tokens_per_day",
            "available_output_tokens_other_window",
        ],
        [
            "available_prompt_tokens",
            "available_prompt_tokens_per_second",
            "available_prompt_tokens_per_10s",
            "available_prompt_tokens_per_hour",
            "available_prompt_tokens_per_day",
            "available_prompt_tokens_other_window",
        ],
        [
            "available_spend_micro_dollars",
            "available_spend_micro_dollars_per_second",
            "available_spend_micro_dollars_per_10s",
            "available_spend_micro_dollars_per_hour",
            "available_spend_micro_dollars_per_day",
            "available_spend_micro_dollars_other_window",
        ],
    ];
    let row = match unit {
        Unit::Requests => 0,
        Unit::Tokens => 1,
        Unit::InputTokens => 2,
        Unit::OutputTokens => 3,
        Unit::PromptTokens => 4,
        Unit::Spend => 5,
    };
    let col = match per.as_millis() {
        60_000 => 0,
        1_000 => 1,
        10_000 => 2,
        3_600_000 => 3,
        86_400_000 => 4,
        _ => 5,
    };
    LABELS[row][col]
}

/// `[("in_flight", 3.0), …]` as `{"in_flight": 3.0, …}`.
#[cfg(feature = "serde")]
fn details_as_object<S: serde::Serializer>(
    details: &[(&'static str, f64)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(details.len()))?;
    for (name, value) in details {
        map.serialize_entry(name, value)?;
    }
    map.end()
}

/// A pacer as a component: degraded while paused after a 429.
fn pace_component(name: String, p: &Pace) -> Component {
    let s = p.snapshot();
    let mut details = vec![
        ("waiting", s.waiting as f64),
        ("rate_factor", s.rate_factor),
        ("throttled", s.throttled as f64),
    ];
    for d in &s.dims {
        let label = available_label(d.unit, d.per);
        // Two windows of one label (two "other" windows): the binding one,
        // the smaller, is what a reader needs.
        match details.iter_mut().find(|(l, _)| *l == label) {
            Some((_, v)) => *v = v.min(d.available),
            None => details.push((label, d.available)),
        }
    }
    Component {
        name,
        kind: "pace",
        status: if s.paused_until.is_some() {
            Status::Degraded
        } else {
            Status::Ok
        },
        details,
    }
}

/// The deep health report.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HealthReport {
    /// The worst component status (or `Down` when shutting down).
    pub status: Status,
    /// The shallow readiness.
    pub ready: bool,
    /// Calls in flight through the shutdown layer.
    pub in_flight: u64,
    /// Every registered component.
    pub components: Vec<Component>,
}

/// Adds its components to a report.
type Probe = Arc<dyn Fn(&mut Vec<Component>) + Send + Sync>;

/// Aggregates registered guards into one report.
#[derive(Clone)]
pub struct Health {
    shutdown: Shutdown,
    probes: Vec<Probe>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("components", &self.probes.len())
            .finish()
    }
}

impl Health {
    /// Health of an instance that drains with `shutdown`.
    pub fn new(shutdown: &Shutdown) -> Self {
        Health {
            shutdown: shutdown.clone(),
            probes: Vec::new(),
        }
    }

    fn with(mut self, probe: impl Fn() -> Component + Send + Sync + 'static) -> Self {
        self.probes
            .push(Arc::new(move |out: &mut Vec<Component>| out.push(probe())));
        self
    }

    /// Reports a breaker: degraded while it refuses or probes (open,
    /// half-open, forced open) — not while disabled or metrics-only, which
    /// refuse nothing whatever the state machine's state (the `mode` detail
    /// shows them: 0 normal, 1 forced open, 2 disabled, 3 metrics-only).
    pub fn breaker(self, name: &str, breaker: &Breaker) -> Self {
        let (name, b) = (name.to_owned(), breaker.clone());
        self.with(move || {
            let s = b.snapshot();
            let effective = s.effective_state();
            let degraded = effective != BreakerState::Closed;
            Component {
                name: name.clone(),
                kind: "breaker",
                status: if degraded {
                    Status::Degraded
                } else {
                    Status::Ok
                },
                details: vec![
                    // As callers meet it: forced open refuses every call
                    // as an open breaker does (its state machine stays
                    // `Closed`); disabled or metrics-only refuses none.
                    ("open", f64::from(u8::from(effective == BreakerState::Open))),
                    (
                        "mode",
                        match s.mode {
                            Mode::ForcedOpen => 1.0,
                            Mode::Disabled => 2.0,
                            Mode::MetricsOnly => 3.0,
                            _ => 0.0,
                        },
                    ),
                    ("failure_rate", s.failure_rate),
                    ("consecutive_failures", f64::from(s.consecutive_failures)),
                    ("rejected", s.rejected as f64),
                ],
            }
        })
    }

    /// Reports a bulkhead: degraded while it would refuse the next call
    /// `QueueFull` — every permit taken and its line full (under an adaptive
    /// limit, the line as the limit has shrunk it: `line_bound`; a bulkhead
    /// without a line, once its permits are taken) —, while its admissions
    /// are paused (`set_max_concurrent(0)`), or once it is closed.
    pub fn bulkhead(self, name: &str, bulkhead: &Bulkhead) -> Self {
        let (name, b) = (name.to_owned(), bulkhead.clone());
        self.with(move || {
            let s = b.snapshot();
            // The next call would be refused `QueueFull`: every permit
            // taken and the line (if any) full — a bulkhead without a line
            // is full once its permits are.
            let full = s.in_flight >= s.limit && s.waiting >= s.line_bound;
            Component {
                name: name.clone(),
                kind: "bulkhead",
                // Admissions paused (`set_max_concurrent(0)`) too.
                status: if full || s.closed || s.limit == 0 {
                    Status::Degraded
                } else {
                    Status::Ok
                },
                details: vec![
                    ("in_flight", s.in_flight as f64),
                    ("limit", s.limit as f64),
                    ("waiting", s.waiting as f64),
                    ("rejected_queue_full", s.rejected_queue_full as f64),
                    ("rejected_queue_timeout", s.rejected_queue_timeout as f64),
                    ("shed", s.shed as f64),
                ],
            }
        })
    }

    /// Reports a degradation switch: degraded while its level is not
    /// `Normal`; details `level` (0 normal, 1 reduced, 2 minimal, also the
    /// `semaforo_degrade_level` gauge with `record_metrics`) and `manual`
    /// (1 while a manual override is in force).
    pub fn degrade(self, name: &str, degrade: &crate::degrade::Degrade) -> Self {
        let (name, d) = (name.to_owned(), degrade.clone());
        self.with(move || {
            let level = d.level();
            Component {
                name: name.clone(),
                kind: "degrade",
                status: if level == crate::degrade::Level::Normal {
                    Status::Ok
                } else {
                    Status::Degraded
                },
                details: vec![
                    ("level", f64::from(level.as_u8())),
                    ("manual", f64::from(u8::from(d.manual().is_some()))),
                ],
            }
        })
    }

    /// Reports a response cache (always `Ok`): entries and bytes held
    /// (`semaforo_cache_bytes` with `record_metrics`), hits, misses, stores,
    /// bypasses, stale answers served, evictions.
    #[cfg(feature = "cache")]
    pub fn cache<K, V>(self, name: &str, cache: &crate::cache::Cache<K, V>) -> Self
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let (name, c) = (name.to_owned(), cache.clone());
        self.with(move || {
            let s = c.snapshot();
            Component {
                name: name.clone(),
                kind: "cache",
                status: Status::Ok,
                details: vec![
                    ("entries", s.entries as f64),
                    ("bytes", s.bytes as f64),
                    ("hits", s.hits as f64),
                    ("misses", s.misses as f64),
                    ("stores", s.stores as f64),
                    ("bypassed", s.bypassed as f64),
                    ("stale_served", s.stale_served as f64),
                    ("evicted", s.evicted as f64),
                ],
            }
        })
    }

    /// Reports a quota's keys and counts (always `Ok`: refusing over-quota
    /// callers is its job, not a fault).
    pub fn quota<K: Hash + Eq + Clone + Send + Sync + 'static>(
        self,
        name: &str,
        quota: &Quota<K>,
    ) -> Self {
        let (name, q) = (name.to_owned(), quota.clone());
        self.with(move || {
            let s = q.snapshot();
            Component {
                name: name.clone(),
                kind: "quota",
                status: Status::Ok,
                details: vec![
                    ("keys", s.keys as f64),
                    ("admitted", s.admitted as f64),
                    ("rejected", s.rejected as f64),
                ],
            }
        })
    }

    /// Reports a pacer: degraded while paused after a 429.
    pub fn pace(self, name: &str, pace: &Pace) -> Self {
        let (name, p) = (name.to_owned(), pace.clone());
        self.with(move || pace_component(name.clone(), &p))
    }

    /// Reports a keyed pacer (one per model): one `pace` component per key
    /// that has a pacer when the report is made, named `name/key`, then the
    /// overflow pacer as `name#overflow` and the shared limits as
    /// `name#shared` (never the name of a key), each as
    /// [`pace`](Self::pace) reports it.
    pub fn keyed_pace(mut self, name: &str, pace: &KeyedPace) -> Self {
        let (name, p) = (name.to_owned(), pace.clone());
        self.probes.push(Arc::new(move |out: &mut Vec<Component>| {
            for (key, pace) in p.pacers() {
                out.push(pace_component(format!("{name}/{key}"), &pace));
            }
            out.push(pace_component(format!("{name}#overflow"), p.overflow()));
            if let Some(shared) = p.shared() {
                out.push(pace_component(format!("{name}#shared"), shared));
            }
        }));
        self
    }

    /// The shallow check: `false` from the moment shutdown is triggered.
    pub fn is_ready(&self) -> bool {
        self.shutdown.is_ready()
    }

    /// Sets the gauges of every registered component from one report:
    /// `semaforo_<kind>_<detail>{name}` (e.g. `semaforo_bulkhead_in_flight`,
    /// `semaforo_breaker_open`, `semaforo_pace_available_tokens`), plus
    /// `semaforo_in_flight` and `semaforo_ready` of the shutdown layer. See
    /// [`observe`](crate::observe) for the counters and histograms.
    #[cfg(feature = "metrics")]
    pub fn record_metrics(&self) {
        let report = self.report();
        metrics::gauge!("semaforo_in_flight").set(report.in_flight as f64);
        metrics::gauge!("semaforo_ready").set(f64::from(u8::from(report.ready)));
        for c in &report.components {
            for (detail, value) in &c.details {
                metrics::gauge!(format!("semaforo_{}_{detail}", c.kind), "name" => c.name.clone())
                    .set(*value);
            }
        }
    }

    /// Calls [`record_metrics`](Self::record_metrics) every `every` on the
    /// current tokio runtime, until the returned handle is aborted or dropped
    /// with the runtime. Outside a tokio runtime it returns the error instead.
    #[cfg(feature = "metrics")]
    pub fn spawn_metrics(
        &self,
        every: std::time::Duration,
    ) -> Result<tokio::task::JoinHandle<()>, tokio::runtime::TryCurrentError> {
        let runtime = tokio::runtime::Handle::try_current()?;
        let health = self.clone();
        let every = every.max(std::time::Duration::from_millis(1));
        Ok(runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                health.record_metrics();
            }
        }))
    }

    /// The deep report.
    pub fn report(&self) -> HealthReport {
        let mut components: Vec<Component> = Vec::with_capacity(self.probes.len());
        for p in &self.probes {
            p(&mut components);
        }
        let ready = self.shutdown.is_ready();
        let worst = components
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Ok);
        HealthReport {
            status: if ready { worst } else { Status::Down },
            ready,
            in_flight: self.shutdown.in_flight(),
            components,
        }
    }
}

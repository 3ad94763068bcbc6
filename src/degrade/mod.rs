//! A shared degradation level — `Normal`, `Reduced`, `Minimal` — that
//! handlers and layers read, flipped by hand or by rules over our own
//! signals.
//!
//! Under pressure a service that answers less (a shorter prompt, no
//! suggestions, a cached page) beats one that answers nothing. A
//! [`Degrade`] is the switch: cheap to read on every request
//! ([`Degrade::level`] is one atomic load), shared by clones.
//!
//! - **Rules** ([`Rule`]): "`Reduced` when the breaker has been open for
//!   5 s", "`Minimal` when the bulkhead's line has been above 80 % for
//!   10 s". A rule becomes active once its [`Signal`] has held at every
//!   evaluation for [`after`](Rule::after), and inactive once it has failed
//!   at every evaluation for [`recover_after`](Rule::recover_after) — the
//!   hysteresis: a signal oscillating around its threshold faster than
//!   either delay moves nothing. The level of the rules is the highest
//!   level among the active ones. Signals are sampled, so a change is seen
//!   at the first evaluation after it: a rule turns active between `after`
//!   and `after + every` after its condition starts (and inactive likewise);
//!   in tests, evaluate by hand or use a small `every`.
//! - **Signals** over our own layers: [`breaker_open`], [`line_above`],
//!   [`pace_wait_above`], [`limit_below`]; any `Fn() -> bool` is a signal.
//! - **Evaluation**: every [`every`](DegradeBuilder::every) (default 1 s)
//!   in a task started by [`Degrade::spawn`] (it ends when the last
//!   `Degrade` clone is dropped), or when you call [`Degrade::evaluate`].
//!   Signals are read outside the switch's lock and events are told after
//!   it is released, in the order of the changes, so a signal or a listener
//!   may read or set the switch — through a [`WeakDegrade`]
//!   ([`Degrade::downgrade`]): a `Degrade` held inside its own listener or
//!   signal would keep it alive for ever.
//! - **By hand**: [`Degrade::set`] / [`Degrade::set_for`] (an override with
//!   an expiry) win over the rules until [`Degrade::release`] or the expiry.
//! - **Seen**: [`EventKind::LevelChanged`] on every change (tracing at
//!   `INFO`, listeners, the counter `semaforo_level_changes_total{to, reason}`),
//!   [`Health::degrade`](crate::health::Health::degrade) (and its gauge
//!   `semaforo_degrade_level` with `Health::record_metrics`),
//!   and with feature `http` [`DegradeLayer`]: the level in each request's
//!   extensions and, when not `Normal`, an `x-degrade-level` header on each
//!   response.
//!
//! ```
//! use semaforo::breaker::Breaker;
//! use semaforo::degrade::{self, Degrade, Level, Rule};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let breaker = Breaker::builder().build().unwrap();
//! let switch = Degrade::builder()
//!     .rule(
//!         Rule::new(Level::Reduced, degrade::breaker_open(&breaker))
//!             .after(Duration::from_secs(3))
//!             .recover_after(Duration::from_secs(10)),
//!     )
//!     .build()
//!     .unwrap();
//! assert_eq!(switch.level(), Level::Normal);
//! switch.set_for(Level::Minimal, Duration::from_secs(60)); // a drill, by hand
//! assert_eq!(switch.level(), Level::Minimal);
//! tokio::time::sleep(Duration::from_secs(60)).await;
//! assert_eq!(switch.level(), Level::Normal); // the override expired
//! # }
//! ```

use crate::breaker::{Breaker, BreakerState};
use crate::bulkhead::Bulkhead;
use crate::error::ConfigError;
use crate::observe::{Event, EventKind, ListenerSlot, Observer};
use crate::pace::{Outlook, Pace};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::time::Instant;

#[cfg(feature = "http")]
mod layer;
#[cfg(feature = "http")]
pub use layer::{DegradeFuture, DegradeLayer, DegradeService, LEVEL_HEADER};

/// A degradation level; higher is more degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
pub enum Level {
    /// Full service.
    #[default]
    Normal,
    /// Simplified answers: the expensive extras off.
    Reduced,
    /// The bare minimum: cached or static answers.
    Minimal,
}

impl Level {
    /// `"normal"`, `"reduced"`, `"minimal"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Reduced => "reduced",
            Level::Minimal => "minimal",
        }
    }

    /// 0, 1, 2 (the metrics gauge's value).
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Normal,
            1 => Level::Reduced,
            _ => Level::Minimal,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a [`Degrade`] changed level (in [`EventKind::LevelChanged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LevelReason {
    /// The rules' level moved.
    Rules,
    /// Set by hand.
    Manual,
    /// A manual override's expiry passed.
    OverrideExpired,
    /// A manual override was released.
    Released,
}

impl LevelReason {
    /// `"rules"`, `"manual"`, `"override_expired"`, `"released"`.
    pub fn as_str(self) -> &'static str {
        match self {
            LevelReason::Rules => "rules",
            LevelReason::Manual => "manual",
            LevelReason::OverrideExpired => "override_expired",
            LevelReason::Released => "released",
        }
    }
}

/// A condition a [`Rule`] watches. Closures `Fn() -> bool` are signals.
pub trait Signal: Send + Sync + 'static {
    /// Whether the condition holds now.
    fn holds(&self) -> bool;
}

impl<F: Fn() -> bool + Send + Sync + 'static> Signal for F {
    fn holds(&self) -> bool {
        self()
    }
}

/// Holds while `breaker` refuses or probes: open, half-open, or forced
/// open ([`Breaker::force_open`], which refuses whatever the state machine's
/// state) — not while it is disabled or metrics-only (it refuses nothing
/// then, whatever its state machine's state).
pub fn breaker_open(breaker: &Breaker) -> impl Signal {
    let b = breaker.clone();
    move || b.effective_state() != BreakerState::Closed
}

/// Holds while more than `fraction` (0.0–1.0) of `bulkhead`'s line is
/// taken — the line as an adaptive limit has shrunk it (`line_bound`), so a
/// line shrunk to nothing is taken whole (a NaN fraction never holds; a
/// bulkhead without a line never holds).
pub fn line_above(bulkhead: &Bulkhead, fraction: f64) -> impl Signal {
    let b = bulkhead.clone();
    move || {
        let s = b.snapshot();
        s.max_queue > 0
            && !fraction.is_nan()
            && (s.line_bound == 0
                || crate::num::exceeds(s.waiting as f64, fraction * s.line_bound as f64))
    }
}

/// Holds while a call of the typical (smoothed) cost given to `pace` now
/// would wait longer than `wait` — behind its line, behind the debt of its
/// cells at a rate cut after 429s, or a pause — or would be refused (past
/// the pacer's `max_wait`, a budget spent, the pacer closed). Before any call, the typical cost is
/// one request. For a keyed pacer (the LLM preset's, one per model), give it
/// the model's: `pace_wait_above(&stack.pace().get(Some("gpt-4o-mini")), wait)`.
pub fn pace_wait_above(pace: &Pace, wait: Duration) -> impl Signal {
    let p = pace.clone();
    move || {
        let now = Instant::now();
        match p.typical_outlook_at(now) {
            Outlook::At(t) => t.saturating_duration_since(now) > wait,
            Outlook::Never | Outlook::Late(_) | Outlook::Refused(_) => true,
        }
    }
}

/// Holds while `bulkhead`'s limit (its adaptive limit, if it has one) is
/// below `limit`.
pub fn limit_below(bulkhead: &Bulkhead, limit: u64) -> impl Signal {
    let b = bulkhead.clone();
    move || {
        let s = b.snapshot();
        s.adaptive_limit.unwrap_or(s.limit) < limit
    }
}

/// A level to go to while a [`Signal`] holds, with its hysteresis.
pub struct Rule {
    level: Level,
    signal: Box<dyn Signal>,
    after: Duration,
    recover_after: Duration,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("level", &self.level)
            .field("after", &self.after)
            .field("recover_after", &self.recover_after)
            .finish_non_exhaustive()
    }
}

impl Rule {
    /// `level` while `signal` holds; active at the first evaluation that
    /// sees it (`after` 0), inactive after 30 s without it.
    pub fn new(level: Level, signal: impl Signal) -> Self {
        Rule {
            level,
            signal: Box::new(signal),
            after: Duration::ZERO,
            recover_after: Duration::from_secs(30),
        }
    }

    /// How long the signal must hold, at every evaluation, before the rule
    /// is active (default 0).
    pub fn after(mut self, d: Duration) -> Self {
        self.after = d;
        self
    }

    /// How long the signal must be absent, at every evaluation, before the
    /// rule is inactive again (default 30 s).
    pub fn recover_after(mut self, d: Duration) -> Self {
        self.recover_after = d;
        self
    }
}

/// Builds a [`Degrade`].
#[derive(Debug, Default)]
#[must_use = "a builder does nothing until `build()`"]
pub struct DegradeBuilder {
    rules: Vec<Rule>,
    every: Option<Duration>,
    name: Option<Arc<str>>,
    listener: ListenerSlot,
}

impl DegradeBuilder {
    /// Adds a rule.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// How often [`Degrade::spawn`]'s task evaluates the rules (default
    /// 1 s; at least 1 ms).
    pub fn every(mut self, d: Duration) -> Self {
        self.every = Some(d);
        self
    }

    /// The name in events, metrics and health.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` for each [`EventKind::LevelChanged`]. Listeners add up.
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// The switch, at `Normal`.
    ///
    /// # Errors
    /// [`ConfigError`] when `every` is below 1 ms.
    pub fn build(self) -> Result<Degrade, ConfigError> {
        let every = self.every.unwrap_or(Duration::from_secs(1));
        if every < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "degrade",
                "every",
                "must be at least 1 ms",
            ));
        }
        let (signals, rules) = self
            .rules
            .into_iter()
            .map(|r| {
                let state = RuleState {
                    level: r.level,
                    after: r.after,
                    recover_after: r.recover_after,
                    active: false,
                    since: None,
                };
                (r.signal, state)
            })
            .unzip();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        Ok(Degrade {
            inner: Arc::new(Inner {
                level: AtomicU8::new(Level::Normal.as_u8()),
                expiring: AtomicBool::new(false),
                state: Mutex::new(State {
                    rules,
                    rules_level: Level::Normal,
                    manual: None,
                }),
                signals,
                every,
                obs: Observer::new(self.name, self.listener.0),
                pending: crate::observe::InOrder::default(),
                _stop: stop,
                stopped: Mutex::new(Some(stopped)),
            }),
        })
    }
}

struct RuleState {
    level: Level,
    after: Duration,
    recover_after: Duration,
    active: bool,
    /// Since when the signal has been seen in the state that would flip
    /// `active` (held while inactive, absent while active).
    since: Option<Instant>,
}

struct State {
    rules: Vec<RuleState>,
    rules_level: Level,
    /// A manual override and its expiry.
    manual: Option<(Level, Option<Instant>)>,
}

struct Inner {
    /// The level in force (what `level()` reads).
    level: AtomicU8,
    /// A manual override with an expiry is set (`level()` checks it).
    expiring: AtomicBool,
    state: Mutex<State>,
    /// Each rule's signal (read outside the lock: a signal may read this
    /// switch).
    signals: Vec<Box<dyn Signal>>,
    every: Duration,
    obs: Observer,
    /// Changes to tell, in the order they were made (queued under the
    /// state's lock, told after it is released: a listener may change the
    /// switch, and its change is told after the one it heard).
    pending: crate::observe::InOrder<(Level, Level, LevelReason)>,
    /// Dropped with the last handle: ends a spawned task at once.
    _stop: tokio::sync::oneshot::Sender<()>,
    stopped: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

/// A change to tell once the lock is released (a listener may read the
/// switch).
type Change = Option<(Level, Level, LevelReason)>;

/// A handle that does not keep the switch alive: what a listener or a
/// signal reading its own switch should hold (a [`Degrade`] inside one of
/// them would keep the switch, and its spawned task, alive for ever).
#[derive(Clone, Debug)]
pub struct WeakDegrade {
    inner: Weak<Inner>,
}

impl WeakDegrade {
    /// The switch, while some [`Degrade`] still holds it.
    pub fn upgrade(&self) -> Option<Degrade> {
        self.inner.upgrade().map(|inner| Degrade { inner })
    }
}

/// The shared degradation switch (see the [module docs](self)). Cheap to
/// clone; every clone is the same switch.
#[derive(Clone)]
pub struct Degrade {
    inner: Arc<Inner>,
}

impl fmt::Debug for Degrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Degrade")
            .field("level", &self.level())
            .field("manual", &self.manual())
            .finish_non_exhaustive()
    }
}

impl Degrade {
    /// A builder: no rules, evaluated every second once spawned.
    pub fn builder() -> DegradeBuilder {
        DegradeBuilder::default()
    }

    /// The level in force: one atomic load (and, while a manual override
    /// with an expiry is set, a clock read).
    pub fn level(&self) -> Level {
        if self.inner.expiring.load(Ordering::Acquire) {
            self.locked(|_, _| LevelReason::OverrideExpired);
        }
        Level::from_u8(self.inner.level.load(Ordering::Acquire))
    }

    /// The manual override in force, if any, with its expiry.
    pub fn manual(&self) -> Option<(Level, Option<Instant>)> {
        // An expired one is settled (and told) first.
        self.locked(|_, _| LevelReason::OverrideExpired);
        self.state().manual
    }

    /// Sets `level` by hand until [`release`](Self::release); it wins over
    /// the rules.
    pub fn set(&self, level: Level) {
        self.locked(|st, _| {
            st.manual = Some((level, None));
            LevelReason::Manual
        });
    }

    /// Sets `level` by hand for `d`, then back to the rules.
    pub fn set_for(&self, level: Level, d: Duration) {
        self.locked(|st, now| {
            st.manual = Some((level, Some(crate::time::after(now, d))));
            LevelReason::Manual
        });
    }

    /// Ends a manual override: the rules decide again.
    pub fn release(&self) {
        self.locked(|st, _| {
            st.manual = None;
            LevelReason::Released
        });
    }

    /// The level the rules alone give (what is in force without an
    /// override).
    pub fn rules_level(&self) -> Level {
        self.state().rules_level
    }

    /// Evaluates every rule now and returns the level in force. The
    /// signals are read before the switch's lock is taken.
    pub fn evaluate(&self) -> Level {
        let holds: Vec<bool> = self.inner.signals.iter().map(|s| s.holds()).collect();
        self.locked(|st, now| {
            let mut level = Level::Normal;
            for (r, &holds) in st.rules.iter_mut().zip(&holds) {
                if holds == r.active {
                    // Nothing pulls it the other way.
                    r.since = None;
                } else {
                    let since = *r.since.get_or_insert(now);
                    let wait = if r.active { r.recover_after } else { r.after };
                    if now.saturating_duration_since(since) >= wait {
                        r.active = holds;
                        r.since = None;
                    }
                }
                if r.active {
                    level = level.max(r.level);
                }
            }
            st.rules_level = level;
            LevelReason::Rules
        })
    }

    /// Runs `f` on the state under the lock, puts the level in force in the
    /// atomic, and tells a change once the lock is released.
    fn locked(&self, f: impl FnOnce(&mut State, Instant) -> LevelReason) -> Level {
        let now = Instant::now();
        let to = {
            let mut st = self.state();
            let reason = f(&mut st, now);
            let (to, change) = self.settle(&mut st, now, reason);
            if let Some(c) = change {
                self.inner.pending.push(c);
            }
            to
        };
        self.tell();
        to
    }

    /// Tells the queued changes in order, unless someone (maybe a listener
    /// up this very stack) is already telling them.
    fn tell(&self) {
        self.inner.pending.tell(|(from, to, reason)| {
            self.inner
                .obs
                .emit("degrade", EventKind::LevelChanged { from, to, reason });
        });
    }

    /// A handle that does not keep the switch alive (for a listener or a
    /// signal that reads it).
    pub fn downgrade(&self) -> WeakDegrade {
        WeakDegrade {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Starts a task on the current tokio runtime that evaluates the rules
    /// every [`every`](DegradeBuilder::every) (the first at once); it ends
    /// when every clone of this switch is dropped.
    ///
    /// # Errors
    /// Outside a tokio runtime, tokio's error (nothing is started).
    pub fn spawn(&self) -> Result<tokio::task::JoinHandle<()>, tokio::runtime::TryCurrentError> {
        let runtime = tokio::runtime::Handle::try_current()?;
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let every = self.inner.every;
        // The first task takes the receiver; later ones end with the
        // switch too (they find it gone at their next tick).
        let mut stopped = lock(&self.inner.stopped).take();
        Ok(runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let ticked = std::future::poll_fn(|cx| {
                    if let Some(rx) = stopped.as_mut() {
                        if std::pin::Pin::new(rx).poll(cx).is_ready() {
                            return std::task::Poll::Ready(false);
                        }
                    }
                    tick.poll_tick(cx).map(|_| true)
                })
                .await;
                if !ticked {
                    return;
                }
                let Some(inner) = weak.upgrade() else { return };
                // A signal that panics (the caller's code) must not end the
                // evaluator: the level would stay where it is for good. The
                // panic is reported; the next tick evaluates again.
                let d = Degrade { inner };
                let evaluated =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.evaluate()));
                if evaluated.is_err() {
                    tracing::error!(
                        target: "semaforo",
                        layer = "degrade",
                        "a signal panicked while the rules were evaluated (caught; evaluated again at the next tick)"
                    );
                }
            }
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Puts the level in force in the atomic; the change to tell.
    fn settle(&self, st: &mut State, now: Instant, reason: LevelReason) -> (Level, Change) {
        let mut reason = reason;
        if let Some((_, Some(until))) = st.manual {
            if now >= until {
                st.manual = None;
                reason = LevelReason::OverrideExpired;
            }
        }
        let expiring = matches!(st.manual, Some((_, Some(_))));
        self.inner.expiring.store(expiring, Ordering::Release);
        let to = st.manual.map_or(st.rules_level, |(l, _)| l);
        let from = Level::from_u8(self.inner.level.swap(to.as_u8(), Ordering::AcqRel));
        (to, (from != to).then_some((from, to, reason)))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

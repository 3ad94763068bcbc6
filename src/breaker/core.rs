//! The breaker's state machine.
//!
//! One `AtomicU32` packs the state (bits 0–1), the manual mode (bits 2–3) and a
//! generation (bits 4–31) bumped at every transition. The closed-state admission
//! is one load of it; a success in the closed state is at most one more load (and
//! a store only when it ends a run of failures). Transitions, the open deadline and
//! half-open probe accounting live under a mutex that the healthy path never takes.
//! A result carries the generation it was admitted in, so a slow call that started
//! before a transition cannot count in the next state.

use super::window::{Counts, Window};
use super::{BreakerSnapshot, BreakerState, Mode, Transition};
use crate::classify::Class;
use crate::error::{RejectKind, Rejected};
use crate::observe::{EventKind, Observer, TransitionReason};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

const STATE_MASK: u32 = 0b11;
const MODE_SHIFT: u32 = 2;
const MODE_MASK: u32 = 0b11 << MODE_SHIFT;

const CLOSED: u32 = 0;
const OPEN: u32 = 1;
const HALF_OPEN: u32 = 2;

fn state_of(w: u32) -> BreakerState {
    match w & STATE_MASK {
        CLOSED => BreakerState::Closed,
        OPEN => BreakerState::Open,
        _ => BreakerState::HalfOpen,
    }
}

fn mode_of(w: u32) -> Mode {
    match (w & MODE_MASK) >> MODE_SHIFT {
        0 => Mode::Normal,
        1 => Mode::ForcedOpen,
        2 => Mode::Disabled,
        _ => Mode::MetricsOnly,
    }
}

/// The state machine runs (normal or metrics-only mode): results move it.
fn runs(w: u32) -> bool {
    matches!(mode_of(w), Mode::Normal | Mode::MetricsOnly)
}

/// The state as a caller meets it: open while forced open, closed while
/// disabled or metrics-only, else the state machine's.
fn effective_of(w: u32) -> BreakerState {
    super::effective(mode_of(w), state_of(w))
}

/// The state listeners follow: what callers meet while forced open or
/// disabled (the state machine stands still), else the state machine's (a
/// metrics-only breaker's shadow transitions are told to them).
fn heard_of(w: u32) -> BreakerState {
    match mode_of(w) {
        Mode::ForcedOpen | Mode::Disabled => effective_of(w),
        Mode::Normal | Mode::MetricsOnly => state_of(w),
    }
}

fn mode_bits(m: Mode) -> u32 {
    (match m {
        Mode::Normal => 0,
        Mode::ForcedOpen => 1,
        Mode::Disabled => 2,
        Mode::MetricsOnly => 3,
    }) << MODE_SHIFT
}

fn gen_of(w: u32) -> u32 {
    w >> 4
}

pub(crate) type CountsFn = Arc<dyn Fn(&Class) -> bool + Send + Sync>;

pub(crate) struct Config {
    pub(crate) obs: Observer,
    pub(crate) consecutive: Option<u32>,
    pub(crate) failure_rate: Option<f64>,
    pub(crate) slow: Option<(Duration, f64)>,
    pub(crate) min_calls: u64,
    pub(crate) open_for: Duration,
    pub(crate) open_growth: f64,
    pub(crate) open_cap: Duration,
    pub(crate) open_jitter: f64,
    pub(crate) probes: u32,
    pub(crate) counts: Option<CountsFn>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("name", &self.obs.name)
            .field("consecutive", &self.consecutive)
            .field("failure_rate", &self.failure_rate)
            .field("slow", &self.slow)
            .field("min_calls", &self.min_calls)
            .field("open_for", &self.open_for)
            .field("probes", &self.probes)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Inner {
    open_until: Instant,
    reopens: u32,
    /// The probes running: their number and when each was let through,
    /// oldest first.
    probes: Vec<(u32, Instant)>,
    /// The number of the next probe.
    next_probe: u32,
    probe_successes: u32,
    since: Instant,
    rng: SmallRng,
}

#[derive(Debug)]
pub(crate) struct Shared {
    word: AtomicU32,
    consecutive: AtomicU32,
    window: Option<Window>,
    inner: Mutex<Inner>,
    rejected: AtomicU64,
    /// Transitions made, not yet told to the listeners: queued under the
    /// lock, told in order outside it ([`InOrder`](crate::observe::InOrder)).
    announcements: crate::observe::InOrder<Transition>,
    pub(crate) cfg: Config,
    watch: watch::Sender<BreakerState>,
    /// Latency by class (feature `metrics`).
    #[cfg(feature = "metrics")]
    pub(crate) call_seconds: crate::observe::CallSeconds,
}

/// A locked section's promise to [`Shared::announce`] the transitions it made
/// once the lock is released.
#[derive(Default)]
#[must_use = "announce the transitions once the lock is released"]
struct Announce(());

/// What admission decided for one call: the generation it was admitted in,
/// and what it is — one word, so every call's future stays as small as it
/// was with two flags.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    pub(crate) gen: u32,
    /// [`Ticket::PLAIN`], [`Ticket::UNRECORDED`], or a probe's number + 1
    /// (its entry in `Inner::probes`).
    kind: u32,
}

impl Ticket {
    /// A call whose outcome is recorded (not a probe).
    const PLAIN: u32 = 0;
    /// A call whose outcome is not recorded (the breaker is disabled).
    const UNRECORDED: u32 = u32::MAX;

    fn plain(gen: u32) -> Self {
        Ticket {
            gen,
            kind: Self::PLAIN,
        }
    }

    fn unrecorded(gen: u32) -> Self {
        Ticket {
            gen,
            kind: Self::UNRECORDED,
        }
    }

    /// Probe number `no` (below `u32::MAX - 1`: probe numbers wrap there).
    fn probe(gen: u32, no: u32) -> Self {
        Ticket { gen, kind: no + 1 }
    }

    /// A half-open probe holding a place.
    pub(crate) fn is_probe(&self) -> bool {
        self.kind != Self::PLAIN && self.kind != Self::UNRECORDED
    }

    /// The probe's number (meaningful for a probe only).
    fn probe_no(&self) -> u32 {
        self.kind.wrapping_sub(1)
    }

    /// Its outcome is recorded.
    fn records(&self) -> bool {
        self.kind != Self::UNRECORDED
    }

    /// Recorded already: no place to give back when its future is dropped.
    pub(crate) fn settle(&mut self) {
        if self.is_probe() {
            self.kind = Self::PLAIN;
        }
    }
}

/// Probe places taken: running probes and probes that succeeded.
fn probes_taken(inner: &Inner) -> u32 {
    u32::try_from(inner.probes.len())
        .unwrap_or(u32::MAX)
        .saturating_add(inner.probe_successes)
}

impl Shared {
    pub(crate) fn new(cfg: Config, window: Option<Window>, seed: Option<u64>) -> Self {
        let now = Instant::now();
        let rng = match seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::from_rng(&mut rand::rng()),
        };
        Shared {
            word: AtomicU32::new(CLOSED),
            consecutive: AtomicU32::new(0),
            window,
            inner: Mutex::new(Inner {
                open_until: now,
                reopens: 0,
                probes: Vec::new(),
                next_probe: 0,
                probe_successes: 0,
                since: now,
                rng,
            }),
            rejected: AtomicU64::new(0),
            announcements: crate::observe::InOrder::default(),
            cfg,
            watch: watch::Sender::new(BreakerState::Closed),
            #[cfg(feature = "metrics")]
            call_seconds: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn needs_clock(&self) -> bool {
        // With `metrics`, every call's latency is recorded by class.
        cfg!(feature = "metrics")
            || self.cfg.slow.is_some()
            || self.window.as_ref().is_some_and(Window::needs_clock)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.watch.subscribe()
    }

    fn rejection(&self, retry_after: Option<Duration>) -> Rejected {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let r = Rejected::new("breaker", RejectKind::CircuitOpen)
            .with_name_opt(self.cfg.obs.name.as_ref());
        let r = match retry_after {
            Some(d) => r.with_retry_after(d),
            None => r,
        };
        self.cfg.obs.rejected(&r);
        r
    }

    /// Admits a call or refuses it. The closed path is one atomic load.
    #[inline]
    pub(crate) fn admit(&self) -> Result<Ticket, Rejected> {
        let w = self.word.load(Ordering::Acquire);
        if w & (STATE_MASK | MODE_MASK) == CLOSED {
            return Ok(Ticket::plain(gen_of(w)));
        }
        self.admit_slow(w)
    }

    #[cold]
    fn admit_slow(&self, w: u32) -> Result<Ticket, Rejected> {
        let mut w = w;
        loop {
            match self.admit_in_mode(w) {
                Ok(decided) => return decided,
                // The mode changed before the lock was taken: decided again
                // in the new one (modes change only under the lock).
                Err(now) => w = now,
            }
        }
    }

    /// [`admit_slow`](Self::admit_slow) in the mode of `w`; `Err(word)` when
    /// the mode is another by the time the lock is held.
    fn admit_in_mode(&self, w: u32) -> Result<Result<Ticket, Rejected>, u32> {
        let mode = mode_of(w);
        match mode {
            Mode::Disabled => return Ok(Ok(Ticket::unrecorded(gen_of(w)))),
            Mode::ForcedOpen => {
                return Ok(Err(self.rejection(None).with_detail("forced open")));
            }
            Mode::Normal | Mode::MetricsOnly => {}
        }
        let pass = mode == Mode::MetricsOnly;
        if pass && w & STATE_MASK == CLOSED {
            return Ok(Ok(Ticket::plain(gen_of(w))));
        }
        let mut inner = self.lock();
        let w = self.word.load(Ordering::Acquire);
        if mode_of(w) != mode {
            return Err(w);
        }
        let now = Instant::now();
        let mut news = Announce::default();
        let decision = match w & STATE_MASK {
            CLOSED => Ok(Ticket::plain(gen_of(w))),
            OPEN if now < inner.open_until => {
                if pass {
                    Ok(Ticket::plain(gen_of(w)))
                } else {
                    Err(Some(inner.open_until - now))
                }
            }
            _ => {
                let w = if w & STATE_MASK == OPEN {
                    inner.probes.clear();
                    inner.probe_successes = 0;
                    self.transition(
                        &mut inner,
                        w,
                        HALF_OPEN,
                        now,
                        TransitionReason::OpenElapsed,
                        &mut news,
                    )
                } else {
                    w
                };
                // Past the oldest running probe's due time the upstream is
                // taken as hung, free places or not (new probes would only
                // hang behind it).
                let probes_due = self.probes_due(&inner);
                let hung = probes_due.is_some_and(|due| now >= due);
                if !hung && probes_taken(&inner) < self.cfg.probes {
                    let no = inner.next_probe;
                    inner.next_probe = (no + 1) % (u32::MAX - 1);
                    inner.probes.push((no, now));
                    Ok(Ticket::probe(gen_of(w), no))
                } else if hung {
                    // A probe outlived `open_for`: a hung upstream. Count it
                    // as a failed probe and open again, so that recovery goes on
                    // (their late results belong to an old generation). In
                    // metrics-only mode the state machine moves the same and
                    // the call passes.
                    inner.reopens = inner.reopens.saturating_add(1);
                    self.open(
                        &mut inner,
                        w,
                        now,
                        TransitionReason::ProbeTimedOut,
                        &mut news,
                    );
                    if pass {
                        Ok(Ticket::plain(gen_of(w)))
                    } else {
                        Err(Some(inner.open_until.saturating_duration_since(now)))
                    }
                } else if pass {
                    Ok(Ticket::plain(gen_of(w)))
                } else {
                    Err(probes_due.map(|due| due.saturating_duration_since(now)))
                }
            }
        };
        drop(inner);
        self.announce(news);
        Ok(decision.map_err(|retry_after| self.rejection(retry_after)))
    }

    /// Tells the listeners of the transitions made under the lock, once it is
    /// released (a listener may call back into the breaker), in the order they
    /// were made: transitions are queued under the lock, and one thread at a
    /// time delivers the queue (a transition made meanwhile, by another thread
    /// or by a listener itself, is delivered by the thread already delivering,
    /// after the current one).
    fn announce(&self, _news: Announce) {
        self.announcements.tell(|t| {
            self.cfg.obs.emit(
                "breaker",
                EventKind::BreakerTransition {
                    from: t.from,
                    to: t.to,
                    reason: t.reason,
                },
            );
        });
    }

    /// Moves to `to` (a new generation); caller holds the lock, and
    /// [`announce`](Self::announce)s `news` once it has released it.
    fn transition(
        &self,
        inner: &mut Inner,
        from_word: u32,
        to: u32,
        now: Instant,
        reason: TransitionReason,
        news: &mut Announce,
    ) -> u32 {
        let told = Some((state_of(from_word), reason));
        self.transition_as(inner, from_word, to, now, told, news)
    }

    /// [`transition`](Self::transition), told to the listeners as leaving
    /// the state they last heard (`None`: not told, nothing they heard
    /// changes) — decided before it is queued, so that no thread delivering
    /// the queue meanwhile tells another.
    fn transition_as(
        &self,
        inner: &mut Inner,
        from_word: u32,
        to: u32,
        now: Instant,
        told: Option<(BreakerState, TransitionReason)>,
        news: &mut Announce,
    ) -> u32 {
        let next = ((gen_of(from_word).wrapping_add(1)) << 4) | (from_word & MODE_MASK) | to;
        self.word.store(next, Ordering::Release);
        inner.since = now;
        self.tell_watch(next, news);
        if let Some((from, reason)) = told {
            self.announcements.push(Transition {
                from,
                to: state_of(next),
                reason,
            });
        }
        next
    }

    fn open_duration(&self, inner: &mut Inner) -> Duration {
        let cfg = &self.cfg;
        let base = cfg.open_for.as_secs_f64()
            * cfg
                .open_growth
                .powi(i32::try_from(inner.reopens).unwrap_or(i32::MAX));
        let base = base.min(cfg.open_cap.as_secs_f64());
        let jittered = if cfg.open_jitter > 0.0 {
            base * (1.0 + cfg.open_jitter * inner.rng.random::<f64>())
        } else {
            base
        };
        crate::time::secs_f64(jittered).min(cfg.open_cap.max(cfg.open_for))
    }

    fn open(
        &self,
        inner: &mut Inner,
        w: u32,
        now: Instant,
        reason: TransitionReason,
        news: &mut Announce,
    ) {
        let d = self.open_duration(inner);
        inner.open_until = crate::time::after(now, d);
        self.consecutive.store(0, Ordering::Relaxed);
        if let Some(win) = &self.window {
            win.reset();
        }
        self.transition(inner, w, OPEN, now, reason, news);
    }

    /// Whether `class` (and slowness) count as a failure.
    fn is_failure(&self, class: &Class) -> bool {
        match &self.cfg.counts {
            Some(f) => f(class),
            None => class.is_upstream_failure(),
        }
    }

    pub(crate) fn is_slow(&self, elapsed: Option<Duration>) -> bool {
        match (self.cfg.slow, elapsed) {
            (Some((threshold, _)), Some(e)) => e >= threshold,
            _ => false,
        }
    }

    /// Records one outcome. The closed-state success with no window configured
    /// is one load (and a store only if it ends a failure run).
    #[inline]
    pub(crate) fn record(&self, t: Ticket, class: &Class, elapsed: Option<Duration>) {
        if !t.records() {
            return;
        }
        let failed = self.is_failure(class);
        let slow = self.is_slow(elapsed);
        if t.is_probe() {
            return self.record_probe(t, failed || slow);
        }
        let w = self.word.load(Ordering::Acquire);
        if gen_of(w) != t.gen || w & STATE_MASK != CLOSED {
            return; // admitted in an earlier state: it says nothing about this one
        }
        let mut trip: Option<TransitionReason> = None;
        if let Some(n) = self.cfg.consecutive {
            if failed {
                if self.consecutive.fetch_add(1, Ordering::AcqRel) + 1 >= n {
                    trip = Some(TransitionReason::ConsecutiveFailures);
                }
            } else if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
        }
        if let Some(win) = &self.window {
            let now = win.needs_clock().then(Instant::now);
            win.record(failed, slow, now);
            // The rates are looked at after a failure or a slow call only:
            // a success never opens the breaker.
            if trip.is_none() && (failed || slow) {
                trip = self.rate_trip(win.counts(now));
            }
        }
        if let Some(reason) = trip {
            self.trip(t.gen, reason);
        }
    }

    fn rate_trip(&self, c: Counts) -> Option<TransitionReason> {
        if c.total < self.cfg.min_calls {
            return None;
        }
        if self.cfg.failure_rate.is_some_and(|r| c.failure_rate() >= r) {
            return Some(TransitionReason::FailureRate);
        }
        if self.cfg.slow.is_some_and(|(_, r)| c.slow_rate() >= r) {
            return Some(TransitionReason::SlowCallRate);
        }
        None
    }

    #[cold]
    fn trip(&self, gen: u32, reason: TransitionReason) {
        let mut inner = self.lock();
        let w = self.word.load(Ordering::Acquire);
        let mut news = Announce::default();
        // A call admitted before `disable` or `force_open` moves nothing:
        // the state machine runs only in normal and metrics-only modes.
        if gen_of(w) == gen && w & STATE_MASK == CLOSED && runs(w) {
            inner.reopens = 0;
            self.open(&mut inner, w, Instant::now(), reason, &mut news);
        }
        drop(inner);
        self.announce(news);
    }

    #[cold]
    fn record_probe(&self, t: Ticket, failed: bool) {
        let mut inner = self.lock();
        let w = self.word.load(Ordering::Acquire);
        if gen_of(w) != t.gen || w & STATE_MASK != HALF_OPEN {
            return;
        }
        inner.probes.retain(|(no, _)| *no != t.probe_no());
        // A probe admitted before `disable` or `force_open`: its place
        // freed, nothing moved.
        if !runs(w) {
            return;
        }
        let now = Instant::now();
        let mut news = Announce::default();
        if failed {
            inner.reopens = inner.reopens.saturating_add(1);
            self.open(&mut inner, w, now, TransitionReason::ProbeFailed, &mut news);
        } else {
            inner.probe_successes = inner.probe_successes.saturating_add(1);
            if inner.probe_successes >= self.cfg.probes {
                inner.reopens = 0;
                self.consecutive.store(0, Ordering::Relaxed);
                if let Some(win) = &self.window {
                    win.reset();
                }
                self.transition(
                    &mut inner,
                    w,
                    CLOSED,
                    now,
                    TransitionReason::ProbesSucceeded,
                    &mut news,
                );
            }
        }
        drop(inner);
        self.announce(news);
    }

    /// A probe's future was dropped before it finished: free its slot, count nothing.
    #[cold]
    pub(crate) fn abandon_probe(&self, t: Ticket) {
        let mut inner = self.lock();
        let w = self.word.load(Ordering::Acquire);
        if gen_of(w) == t.gen && w & STATE_MASK == HALF_OPEN {
            inner.probes.retain(|(no, _)| *no != t.probe_no());
        }
    }

    /// Sets the manual mode. A change of the state listeners follow (see
    /// [`heard_of`]) is told to them as a transition (reason
    /// [`TransitionReason::Manual`]); a change of the state callers meet goes
    /// on the `watch`.
    pub(crate) fn set_mode(&self, mode: Mode) {
        let mut inner = self.lock();
        let w = self.word.load(Ordering::Acquire);
        let next = (w & !MODE_MASK) | mode_bits(mode);
        self.word.store(next, Ordering::Release);
        let mut news = Announce::default();
        if effective_of(w) != effective_of(next) {
            inner.since = Instant::now();
            self.tell_watch(next, &mut news);
        }
        let (from, to) = (heard_of(w), heard_of(next));
        if from != to {
            self.announcements.push(Transition {
                from,
                to,
                reason: TransitionReason::Manual,
            });
        }
        drop(inner);
        self.announce(news);
    }

    /// Puts the state callers meet on the `watch` (a shadow transition of a
    /// metrics-only breaker changes nothing there; listeners hear it).
    fn tell_watch(&self, word: u32, _news: &mut Announce) {
        let now = effective_of(word);
        self.watch.send_if_modified(|seen| {
            let changed = *seen != now;
            *seen = now;
            changed
        });
    }

    pub(crate) fn reset(&self) {
        let mut inner = self.lock();
        let w = self.word.load(Ordering::Acquire);
        inner.reopens = 0;
        inner.probes.clear();
        inner.probe_successes = 0;
        self.consecutive.store(0, Ordering::Relaxed);
        if let Some(win) = &self.window {
            win.reset();
        }
        // Told from the state listeners last heard.
        let was = heard_of(w);
        // Closed as heard and closed: back to normal mode, untold (a
        // listener that resets on `Closed` must not loop for ever).
        if was == BreakerState::Closed && w & STATE_MASK == CLOSED {
            self.word.store(w & !MODE_MASK, Ordering::Release);
            return;
        }
        let w = w & !MODE_MASK; // back to Normal
        self.word.store(w, Ordering::Release);
        let mut news = Announce::default();
        // A disabled breaker's state machine closed: a new generation,
        // nothing anyone heard changes, nothing told.
        let told = (was != BreakerState::Closed).then_some((was, TransitionReason::Reset));
        self.transition_as(&mut inner, w, CLOSED, Instant::now(), told, &mut news);
        drop(inner);
        self.announce(news);
    }

    pub(crate) fn state(&self) -> BreakerState {
        state_of(self.word.load(Ordering::Acquire))
    }

    /// A half-open breaker (normal mode) that would refuse a call now:
    /// every probe place taken, or a probe running past `open_for` (the
    /// call would re-open it). One lock, only for a half-open breaker.
    pub(crate) fn probes_full(&self) -> bool {
        let w = self.word.load(Ordering::Acquire);
        if w & (STATE_MASK | MODE_MASK) != HALF_OPEN {
            return false;
        }
        let inner = self.lock();
        probes_taken(&inner) >= self.cfg.probes
            || self
                .probes_due(&inner)
                .is_some_and(|due| Instant::now() >= due)
    }

    /// When the oldest running probe has had its `open_for` (past it: a hung
    /// upstream); `None` with no probe running.
    fn probes_due(&self, inner: &Inner) -> Option<Instant> {
        inner
            .probes
            .first()
            .map(|(_, at)| crate::time::after(*at, self.cfg.open_for))
    }

    pub(crate) fn is_normal(&self) -> bool {
        mode_of(self.word.load(Ordering::Acquire)) == Mode::Normal
    }

    /// The state as a caller meets it (one load): open while forced open,
    /// closed while disabled or in metrics-only mode, else the state
    /// machine's.
    pub(crate) fn effective_state(&self) -> BreakerState {
        effective_of(self.word.load(Ordering::Acquire))
    }

    pub(crate) fn snapshot(&self) -> BreakerSnapshot {
        let inner = self.lock();
        let w = self.word.load(Ordering::Acquire);
        let now = Instant::now();
        let counts = self
            .window
            .as_ref()
            .map(|win| win.counts(win.needs_clock().then_some(now)))
            .unwrap_or_default();
        BreakerSnapshot {
            state: state_of(w),
            mode: mode_of(w),
            consecutive_failures: self.consecutive.load(Ordering::Relaxed),
            calls_in_window: counts.total,
            failures_in_window: counts.failures,
            slow_in_window: counts.slow,
            failure_rate: counts.failure_rate(),
            slow_rate: counts.slow_rate(),
            rejected: self.rejected.load(Ordering::Relaxed),
            time_in_state: now.saturating_duration_since(inner.since),
            retry_after: (w & STATE_MASK == OPEN && now < inner.open_until)
                .then(|| inner.open_until - now),
        }
    }
}

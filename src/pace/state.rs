//! The pacer's state: one GCRA cell per dimension and a FIFO line of waiters.
//!
//! Each dimension (requests/min, tokens/min, tokens/day…) is a GCRA cell: a
//! "theoretical arrival time" `tat` at which its bucket would be full again, with
//! capacity `C` and `T` ticks per unit (times are whole ticks of 1/16 ns since
//! the pacer's epoch: exact sums, see [`super::tick`]). A cost `n` fits at
//! `tat − (C − n)·T`; reserving it moves `tat` to `max(tat, start) + n·T`. A call's
//! cost is reserved on every dimension at once, at the latest of their start
//! times, so no dimension is ever overdrawn.
//!
//! Waiting callers stand in one FIFO line and reserve only when they reach its
//! head and their cost fits: a caller that leaves the line (dropped, timed out)
//! never held anything, and everyone behind it moves up. The head sleeps until
//! its start instant; the others sleep until the one before them leaves.

use super::tick;
use super::{Cost, DimSnapshot, PaceSnapshot, Unit};
use crate::classify::RateLimitInfo;
use slab::Slab;
use std::collections::BTreeMap;
use std::task::Waker;
use std::time::Duration;
use tokio::time::Instant;

/// AIMD after a 429: the effective rate is multiplied by this...
pub(crate) const DECREASE: f64 = 0.75;
/// ...never below this share of the configured rate...
pub(crate) const FLOOR: f64 = 0.25;
/// ...and recovers by this much per successful response.
pub(crate) const INCREASE: f64 = 0.02;
/// The pause after a 429 that gave no `retry_after`.
pub(crate) const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause one 429 can impose on every caller, by default.
pub(crate) const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(60);
/// The window upstreams' `x-ratelimit-limit-*` counts refer to, by default.
pub(crate) const DEFAULT_HEADER_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub(crate) struct Dim {
    pub(crate) unit: Unit,
    pub(crate) per: Duration,
    /// Capacity (burst), in units (a whole number as configured; a learned
    /// limit scales it).
    pub(crate) capacity: f64,
    /// The configured capacity as the whole number it is.
    pub(crate) burst: u64,
    /// Ticks per unit at the rate in force: the configured one, or slower
    /// when the upstream announced a lower limit.
    pub(crate) ticks_per_unit: u64,
    /// Whether `ticks_per_unit` is exact (the window a whole number of ticks
    /// a unit): then a start has no slack at that rate.
    pub(crate) exact: bool,
    /// As configured (what a higher announced limit brings back).
    pub(crate) configured_capacity: f64,
    pub(crate) configured_tpu: u64,
    pub(crate) configured_exact: bool,
    /// The largest cost one call may have: the whole configured burst,
    /// headroom included (above the planned capacity, a call waits for a
    /// full bucket and leaves a debt).
    pub(crate) largest_cost: u64,
    /// A window that resets on the calendar (its cell counts what was used
    /// since the window began) instead of a rolling GCRA cell.
    pub(crate) calendar: Option<super::calendar::Calendar>,
    /// A call that would wait longer than this (ticks) for this limit is
    /// refused, whatever the pacer's `max_wait`.
    pub(crate) max_wait: Option<u64>,
}

impl Dim {
    #[inline]
    pub(crate) fn amount(&self, cost: &Cost) -> u64 {
        cost.amount(self.unit)
    }

    /// The burst's time at `t` ticks a unit: capacity × `t` (the
    /// configured burst exactly, a whole number beyond 2⁵³ too).
    #[inline]
    pub(crate) fn tau(&self, t: u64) -> u64 {
        if self.capacity == self.configured_capacity {
            tick::times(self.burst, t)
        } else {
            tick::units(self.capacity, t)
        }
    }

    /// How early a start on this cell at `t` ticks a unit may be taken
    /// ([`tick::slack`]; none at an exact unit time — a cut rate's is not).
    #[inline]
    pub(crate) fn slack(&self, t: u64) -> u64 {
        if self.exact && t == self.ticks_per_unit {
            0
        } else {
            tick::slack(t)
        }
    }

    /// The earliest start (ticks since the epoch) of `n` units on this
    /// cell, not before `now`, after `ahead` units already in line. A
    /// rolling cell: the GCRA rule (`tat` its theoretical arrival time, `t`
    /// ticks per unit). A calendar cell: `tat` is what was used in the
    /// window ending at `end`; a cost that does not fit waits for the window
    /// that has room (the next ones assumed of their nominal length).
    fn start(&self, tat: u64, end: u64, t: u64, n: u64, now: u64, ahead: u64) -> u64 {
        match &self.calendar {
            None => {
                // `full − tau + min(n·t, tau)`, at least 0, in `u128`:
                // exact even with a `tat` kept at the clock's last tick.
                let tau = u128::from(self.tau(t));
                let full =
                    u128::from(tat.max(now)).saturating_add(u128::from(ahead) * u128::from(t));
                let s = full
                    .saturating_add((u128::from(n) * u128::from(t)).min(tau))
                    .saturating_sub(tau);
                if s > u128::from(now) + u128::from(self.slack(t)) {
                    u64::try_from(s).unwrap_or(u64::MAX)
                } else {
                    now
                }
            }
            Some(cal) => {
                let (used, end) = if now >= end {
                    (0, cal.next_end(now))
                } else {
                    (tat, end)
                };
                let n = (n as f64).min(self.capacity);
                let need = used as f64 + ahead as f64 + n;
                if need <= self.capacity {
                    return now;
                }
                // Whole windows the overflow spills over, the first being
                // the one starting at `end`.
                let spill = ((need - self.capacity) / self.capacity).ceil().max(1.0);
                end.saturating_add(tick::scale(cal.nominal(), spill - 1.0))
                    .min(tick::LAST)
            }
        }
    }

    /// Reserves `n` units on the cell from `start`.
    fn take(&self, tat: &mut u64, end: &mut u64, t: u64, n: u64, start: u64) {
        match &self.calendar {
            None => {
                *tat = (*tat)
                    .max(start)
                    .saturating_add(tick::times(n, t))
                    .min(tick::LAST)
            }
            Some(cal) => {
                if start >= *end {
                    *tat = 0;
                    *end = cal.next_end(start);
                }
                *tat = tat.saturating_add(n);
            }
        }
    }

    /// Units available at `now`.
    fn available(&self, tat: u64, end: u64, t: u64, now: u64) -> f64 {
        match &self.calendar {
            None => (self.capacity - tat.saturating_sub(now) as f64 / t as f64).max(0.0),
            Some(_) if now >= end => self.capacity,
            Some(_) => (self.capacity - tat as f64).max(0.0),
        }
    }

    /// When the cell is full again (ticks since the epoch).
    fn full_at(&self, tat: u64, end: u64, now: u64) -> u64 {
        match &self.calendar {
            None => tat.max(now),
            Some(_) if now >= end || tat == 0 => now,
            Some(_) => end,
        }
    }
}

#[derive(Debug)]
struct Waiting {
    seq: u64,
    cost: Cost,
    waker: Option<Waker>,
    /// Its place in the parent's line (a keyed pacer's shared cells), taken
    /// once it is the head here and its own cells have room.
    parent_ticket: Option<(u32, u64)>,
    /// When the call arrived: a limit's `max_wait` counts from here, the
    /// wait in line included.
    arrived: Instant,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) dims: Vec<Dim>,
    /// Per dimension, ticks since `epoch` (a calendar window's: units
    /// used in the window ending at `ends[d]`).
    tat: Vec<u64>,
    /// Per calendar dimension, the end of its current window (ticks
    /// since `epoch`); 0 for the others.
    ends: Vec<u64>,
    line: BTreeMap<u64, u32>,
    waiting: Slab<Waiting>,
    queued: Vec<u64>,
    /// The parts (requests, input, cached input, output, spend) of every
    /// cost in line: what the line will take from a parent's cells.
    queued_parts: [u64; PARTS],
    next_seq: u64,
    paused_until: Option<Instant>,
    /// AIMD share of the configured rate, in [FLOOR, 1].
    factor: f64,
    /// Ticks per unit now (`ticks_per_unit / factor`), per dimension:
    /// recomputed when the factor changes, not on every reservation.
    spu: Vec<u64>,
    epoch: Instant,
    pub(crate) throttled: u64,
    /// Closed by a shutdown: waiters are answered `ShuttingDown`, new calls refused.
    pub(crate) closed: bool,
    /// The longest pause one 429 imposes.
    pub(crate) max_pause: Duration,
    /// The window of the limits upstreams announce.
    pub(crate) header_window: Duration,
    /// Every cell is a rolling GCRA one (no calendar window): the one-pass
    /// fast path applies.
    rolling_only: bool,
    /// When the most recent calls started and a typical call's cost, for
    /// projections (shared with the lock-free path, see [`super::fast`]).
    pub(crate) stats: Arc<Stats>,
    /// The lock-free word's bits when the state took the `tat`s out of it,
    /// until it hands them back (see `Fast::hand_over`).
    handed: Option<u128>,
}

use super::stats::{Stats, PARTS};
use std::sync::Arc;

/// The most cells the one-pass healthy path takes (RPM, TPM, ITPM, OTPM,
/// a daily cap… a pacer with more goes the general way).
const FAST_CELLS: usize = 8;
/// How many calls of its line a projection copies (the bulkhead simulates
/// at most 10,000 positions).
const PROJECTED: usize = 10_000;

/// A call refused by a limit with a `max_wait` of its own (a budget).
#[derive(Debug)]
pub(crate) struct Refusal {
    /// How long until it would be admitted (its wait less the bound).
    pub(crate) late: Duration,
    /// The limit is the parent's (a keyed pacer's shared cells).
    pub(crate) parent: bool,
    pub(crate) detail: String,
}

impl Refusal {
    /// `late` rounded up to the microsecond, at least 1 µs.
    pub(crate) fn retry_after(&self) -> Duration {
        let micros = self.late.as_nanos().div_ceil(1_000).clamp(1, 1 << 60);
        Duration::from_micros(micros as u64)
    }
}

/// A waiter's turn not come: when to look again (`None`: when woken), or
/// refused at the head of the line by a budget.
pub(crate) enum Turn {
    Wait(Option<Instant>),
    Refused(Refusal),
}

/// What a call coming now would meet, reserving nothing.
pub(crate) enum Peek {
    /// Its cost can never be paid.
    Never,
    /// Refused now, for about this long (a budget; `Duration::MAX`: closed).
    RefusedFor(Duration),
    /// It would start then.
    At(Instant),
}

/// When a reservation can start, and which dimension decides it.
pub(crate) enum Fit {
    Now,
    At(Instant),
}

/// How many of `unit` costs adding up to `parts` count.
fn amount_of_parts(unit: Unit, [r, i, c, o, m]: &[u64; PARTS]) -> u64 {
    match unit {
        Unit::Requests => *r,
        Unit::Tokens => i.saturating_add(*c).saturating_add(*o),
        Unit::InputTokens => *i,
        Unit::PromptTokens => i.saturating_add(*c),
        Unit::OutputTokens => *o,
        Unit::Spend => *m,
    }
}

/// `t` in ticks since `epoch` (0 before it).
pub(crate) fn ticks(epoch: Instant, t: Instant) -> u64 {
    tick::of(t.saturating_duration_since(epoch))
}

/// `s` ticks after `epoch`, rounded up to the next nanosecond: never
/// start early.
fn instant_at(epoch: Instant, s: u64) -> Instant {
    crate::time::after(epoch, tick::duration(s))
}

/// The instant of a start `s` found for a caller at `now` (`n` ticks since
/// `epoch`): `now` itself when `s` is not after `n` (a start within a
/// cell's slack is `n`), else [`instant_at`].
fn start_instant(epoch: Instant, s: u64, n: u64, now: Instant) -> Instant {
    if s <= n {
        now
    } else {
        instant_at(epoch, s)
    }
}

/// A cost's parts as whole numbers (requests, input, cached input, output,
/// spend).
fn whole_parts(c: &Cost) -> [u64; PARTS] {
    [
        u64::from(c.requests),
        c.input_tokens,
        c.cached_input_tokens,
        c.output_tokens,
        c.spend,
    ]
}

/// The GCRA rule, for the pacer and its projections alike: the earliest
/// start (ticks since the epoch) of `cost` on cells `tat` at `spu` ticks
/// per unit, not before `now` nor a pause, after `extra[d]` units already in
/// line. A cost above a burst (a lower limit the upstream announced) starts
/// once the bucket is full, and leaves a debt.
#[allow(clippy::too_many_arguments)]
fn earliest(
    dims: &[Dim],
    tat: &[u64],
    ends: &[u64],
    spu: &[u64],
    cost: &Cost,
    now: u64,
    paused: Option<u64>,
    extra: Option<&[u64]>,
) -> u64 {
    let mut start = now.max(paused.unwrap_or(0));
    for (d, dim) in dims.iter().enumerate() {
        let ahead = extra.map_or(0, |e| e[d]);
        start = start.max(dim.start(tat[d], ends[d], spu[d], dim.amount(cost), now, ahead));
    }
    start
}

/// Reserves `cost` on every cell from `start`.
fn reserve(dims: &[Dim], tat: &mut [u64], ends: &mut [u64], spu: &[u64], cost: &Cost, start: u64) {
    for (d, dim) in dims.iter().enumerate() {
        dim.take(&mut tat[d], &mut ends[d], spu[d], dim.amount(cost), start);
    }
}

impl State {
    pub(crate) fn new(dims: Vec<Dim>) -> Self {
        let n = dims.len();
        let spu = dims.iter().map(|d| d.ticks_per_unit).collect();
        State {
            rolling_only: dims.iter().all(|d| d.calendar.is_none()),
            spu,
            dims,
            tat: vec![0; n],
            // A calendar window's first end is found at its first use.
            ends: vec![0; n],
            line: BTreeMap::new(),
            waiting: Slab::new(),
            queued: vec![0; n],
            queued_parts: [0; PARTS],
            next_seq: 0,
            paused_until: None,
            factor: 1.0,
            epoch: Instant::now(),
            throttled: 0,
            closed: false,
            max_pause: DEFAULT_MAX_PAUSE,
            header_window: DEFAULT_HEADER_WINDOW,
            stats: Arc::default(),
            handed: None,
        }
    }

    /// A call of `cost` started at `now`.
    fn started(&self, cost: &Cost, now: Instant) {
        self.stats
            .started(cost, now.saturating_duration_since(self.epoch));
    }

    /// A typical call's cost (smoothed), or one request before any call.
    pub(crate) fn typical_cost(&self) -> Cost {
        self.stats
            .typical()
            .map_or(Cost::requests(1), |[r, i, c, o, m]| Cost {
                requests: r.round() as u32,
                input_tokens: i.round() as u64,
                cached_input_tokens: c.round() as u64,
                output_tokens: o.round() as u64,
                spend: m.round() as u64,
            })
    }

    /// A copy of the state to play forward (see [`crate::eta`]). From the
    /// first one on, the pacer records its starts (see [`super::stats`]).
    pub(crate) fn projection(&self, now: Instant) -> Projection {
        self.stats.watch();
        // The calls a projection can be asked about (see `eta`): the first
        // ones in line are copied, the rest counted.
        let queued = self
            .line
            .values()
            .take(PROJECTED)
            .filter_map(|slot| self.waiting.get(*slot as usize).map(|w| w.cost))
            .collect();
        let typical = self.stats.typical().map(|_| self.typical_cost());
        let n = ticks(self.epoch, now);
        Projection {
            dims: self.dims.clone(),
            tat: self
                .tat
                .iter()
                .zip(&self.dims)
                .map(|(t, d)| {
                    if d.calendar.is_some() {
                        *t
                    } else {
                        (*t).max(n)
                    }
                })
                .collect(),
            ends: self.ends.clone(),
            spu: self.spu.clone(),
            paused: self.paused_until.map(|p| ticks(self.epoch, p)),
            epoch: self.epoch,
            queued,
            waiting: self.line.len(),
            typical,
            recent: self
                .stats
                .recent()
                .into_iter()
                .map(|s| crate::time::after(self.epoch, s))
                .collect(),
        }
    }

    /// The instant the cells count from (fixed when the pacer is built).
    pub(crate) fn epoch(&self) -> Instant {
        self.epoch
    }

    fn spu(&self, d: usize) -> u64 {
        self.spu[d]
    }

    /// The AIMD share of the rate, on the rolling cells that pace an
    /// upstream (a spend budget and a calendar window are ours: not cut).
    /// What each cell owes (units not refilled yet) stays owed: a cut rate
    /// makes it refill slower, never frees units at once.
    fn set_factor(&mut self, factor: f64, now: Instant) {
        let n = ticks(self.epoch, now);
        self.factor = factor;
        for (d, dim) in self.dims.iter().enumerate() {
            let exempt = dim.calendar.is_some() || dim.unit == Unit::Spend;
            // At the full rate, the unit time itself (a float round trip
            // could lose a tick of a long one); a cut one never faster.
            let spu = if exempt || factor >= 1.0 {
                dim.ticks_per_unit
            } else {
                tick::scale(dim.ticks_per_unit, 1.0 / factor).max(dim.ticks_per_unit)
            };
            if spu != self.spu[d] && dim.calendar.is_none() && self.tat[d] > n {
                // Owed time rescaled, rounded up: what is owed stays owed.
                let owed = tick::scale(self.tat[d] - n, spu as f64 / self.spu[d] as f64);
                self.tat[d] = n.saturating_add(owed).min(tick::LAST);
            }
            self.spu[d] = spu;
        }
    }

    /// A start `s` is due at `now` (`n` ticks since the epoch). Exact:
    /// the instant a waiter sleeps until, `instant(s)`, is `s` rounded up
    /// to the nanosecond, so once it has come `n ≥ s`.
    fn due(s: u64, n: u64) -> bool {
        s <= n
    }

    fn instant(&self, s: u64) -> Instant {
        instant_at(self.epoch, s)
    }

    /// [`start_instant`] on this state's epoch.
    fn start_at(&self, s: u64, n: u64, now: Instant) -> Instant {
        start_instant(self.epoch, s, n, now)
    }

    /// Earliest start for `cost` after everything in `extra` (per dimension)
    /// has been reserved, in ticks since the epoch.
    fn start_ticks(&self, cost: &Cost, extra: Option<&[u64]>, now: u64) -> u64 {
        let paused = self.paused_until.map(|p| ticks(self.epoch, p));
        earliest(
            &self.dims, &self.tat, &self.ends, &self.spu, cost, now, paused, extra,
        )
    }

    fn reserve_at(&mut self, cost: &Cost, start: u64) {
        reserve(
            &self.dims,
            &mut self.tat,
            &mut self.ends,
            &self.spu,
            cost,
            start,
        );
    }

    /// The limits with a `max_wait` of their own (budgets) that `cost` would
    /// wait longer for after `ahead(d, dim)` units already promised: the
    /// one that would keep it longest past its bound.
    pub(crate) fn budget_refusal(
        &self,
        cost: &Cost,
        now: Instant,
        arrived: Instant,
        ahead: impl Fn(usize, &Dim) -> u64,
    ) -> Option<Refusal> {
        let n = ticks(self.epoch, now);
        // A limit that still holds the call back counts from the call's
        // arrival: at the head of the line it has waited already (the
        // admission's estimate packs a calendar line as a fluid; the head's
        // start is exact). A limit that lets it go now refuses nothing,
        // however long other limits kept it in line.
        let waited = n - ticks(self.epoch, arrived.min(now));
        let mut worst: Option<Refusal> = None;
        for (d, dim) in self.dims.iter().enumerate() {
            let Some(max) = dim.max_wait else { continue };
            let s = dim.start(
                self.tat[d],
                self.ends[d],
                self.spu[d],
                dim.amount(cost),
                n,
                ahead(d, dim),
            );
            if s <= n {
                continue;
            }
            let wait = (s - n).saturating_add(waited);
            if wait <= max {
                continue;
            }
            // The hint is for a call coming now: its wait is what is left.
            let late = tick::duration((s - n).saturating_sub(max));
            if worst.as_ref().is_some_and(|w| w.late >= late) {
                continue;
            }
            let window = if dim.calendar.is_some() {
                "calendar window".to_owned()
            } else {
                crate::time::Human(dim.per).to_string()
            };
            worst = Some(Refusal {
                late,
                parent: false,
                detail: format!(
                    "a cost of {} {} does not fit the limit of {} per {} for {}",
                    dim.amount(cost),
                    dim.unit.as_str(),
                    dim.configured_capacity,
                    window,
                    crate::time::Human(tick::duration(wait)),
                ),
            });
        }
        worst
    }

    /// [`budget_refusal`](Self::budget_refusal) of a call joining this
    /// line now, here and on `parent`'s cells (after its line, and this
    /// line's demand on them).
    pub(crate) fn budget_refusal_with(
        &self,
        cost: &Cost,
        now: Instant,
        parent: Option<&State>,
    ) -> Option<Refusal> {
        let own = self.budget_refusal(cost, now, now, |d, _| self.queued[d]);
        let theirs = parent.and_then(|p| {
            p.budget_refusal(cost, now, now, |d, dim| {
                p.queued[d].saturating_add(amount_of_parts(dim.unit, &self.queued_parts))
            })
            .map(|mut r| {
                r.parent = true;
                r
            })
        });
        match (own, theirs) {
            (Some(a), Some(b)) => Some(if b.late > a.late { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// When `cost` would start if it came now (reserving nothing): at once
    /// when nobody waits and it fits, else after everyone in line, here and
    /// on the parent's cells. `None` when it could never be paid or a
    /// budget would refuse it.
    pub(crate) fn peek_start(
        &self,
        cost: &Cost,
        now: Instant,
        parent: Option<&State>,
    ) -> Option<Instant> {
        match self.peek(cost, now, parent) {
            Peek::At(at) => Some(at),
            Peek::Never | Peek::RefusedFor(_) => None,
        }
    }

    /// [`peek_start`](Self::peek_start), telling a cost that never fits
    /// from a refusal for now: the pacer closed (for good, but not for the
    /// call's cost: `Duration::MAX`), a budget (for its `retry_after`).
    pub(crate) fn peek(&self, cost: &Cost, now: Instant, parent: Option<&State>) -> Peek {
        if self.never_fits(cost).is_some() || parent.is_some_and(|p| p.never_fits(cost).is_some()) {
            return Peek::Never;
        }
        if self.closed {
            return Peek::RefusedFor(Duration::MAX);
        }
        if let Some(r) = self.budget_refusal_with(cost, now, parent) {
            return Peek::RefusedFor(r.retry_after());
        }
        let n = ticks(self.epoch, now);
        let s = self.start_ticks(cost, Some(&self.queued), n);
        let at = self.start_at(s, n, now).max(now);
        Peek::At(match parent {
            Some(p) => at.max(p.start_after(cost, &self.queued_parts, now)),
            None => at,
        })
    }

    /// The healthy path in one pass over the cells: nobody waits, no pause,
    /// every cell a rolling one (no calendar window), and `cost` fits every
    /// cell now, within its largest cost. Then it is reserved and `true`
    /// comes back — exactly what [`try_fast`](Self::try_fast) would do (the
    /// same GCRA expressions, the start being `now`). `false` decides nothing:
    /// the caller goes on with the general path.
    /// `n` is `now` in ticks since the epoch ([`ticks`]), computed by the
    /// caller before it took the lock.
    #[inline]
    pub(crate) fn try_rolling(&mut self, cost: &Cost, now: Instant, n: u64) -> bool {
        if !self.rolling_only || !self.line.is_empty() || self.paused_until.is_some() {
            return false;
        }
        // The new `tat` of each cell, kept until every cell has said yes
        // (a pacer of more cells than this goes the general way).
        let mut next = [0u64; FAST_CELLS];
        if self.dims.len() > FAST_CELLS {
            return false;
        }
        for (((dim, tat), t), next) in self
            .dims
            .iter()
            .zip(&self.tat)
            .zip(&self.spu)
            .zip(&mut next)
        {
            // `Dim::start` with nothing ahead: fits now when the start is not after `n`.
            match super::fast::rolling_take(
                *tat,
                dim.tau(*t),
                dim.largest_cost,
                *t,
                dim.slack(*t),
                dim.amount(cost),
                n,
            ) {
                Some(x) => *next = x,
                None => return false,
            }
        }
        for (tat, next) in self.tat.iter_mut().zip(next) {
            *tat = next;
        }
        self.started(cost, now);
        true
    }

    /// Under the lock: the cells' `tat`s taken back from the lock-free path
    /// (see [`super::fast`]), if it had them.
    pub(crate) fn take_back(&mut self, fast: &super::fast::Fast) {
        if let Some(w) = fast.take_back(&mut self.tat) {
            self.handed = Some(w);
        }
    }

    /// Nobody waits, nothing is paused, the pacer is open: calls may be
    /// reserved without the lock.
    pub(crate) fn is_free(&self) -> bool {
        self.line.is_empty() && self.paused_until.is_none() && !self.closed
    }

    /// Before the lock is let go: the `tat`s handed back to the lock-free
    /// path when the pacer is free (else the state keeps them, across as
    /// many locks as it takes, and remembers the word it took them from).
    pub(crate) fn hand_over(&mut self, fast: &super::fast::Fast) {
        let epoch = self.epoch;
        self.hand_over_with(fast, || ticks(epoch, Instant::now()));
    }

    /// [`hand_over`](Self::hand_over), `now` giving the ticks since the
    /// epoch.
    fn hand_over_with(&mut self, fast: &super::fast::Fast, now: impl FnOnce() -> u64) {
        if self.is_free() {
            let taken = self.handed.take();
            if !fast.hand_over(&self.dims, &self.spu, &self.tat, taken, now) {
                self.handed = taken;
            }
        }
    }

    /// [`hand_over`](Self::hand_over) at `n` ticks since the epoch.
    #[cfg(test)]
    fn hand_over_at(&mut self, fast: &super::fast::Fast, n: u64) {
        self.hand_over_with(fast, || n);
    }

    /// Reserve now if nobody waits and it fits — here and on the cells of
    /// `parent` (a pacer shared below keyed ones), together.
    /// The fast path: when nobody waits here (nor on the parent's cells)
    /// and `cost` fits now, it is reserved and `true` comes back. Such a
    /// call can never be refused by a budget's `max_wait` (it waits for
    /// nothing), so the pacer tries this first.
    pub(crate) fn try_fast(
        &mut self,
        cost: &Cost,
        now: Instant,
        parent: Option<&mut State>,
    ) -> bool {
        if !self.line.is_empty() {
            return false;
        }
        let n = ticks(self.epoch, now);
        let s = self.start_ticks(cost, None, n);
        // The parent's cells are free for it when nobody waits for them.
        let parent_free = parent
            .as_deref()
            .is_none_or(|p| p.line.is_empty() && p.cells_due(cost, now).0);
        if Self::due(s, n) && parent_free {
            self.reserve_at(cost, n);
            if let Some(p) = parent {
                p.reserve_cells(cost, now);
            }
            self.started(cost, now);
            return true;
        }
        false
    }

    pub(crate) fn try_now(&mut self, cost: &Cost, now: Instant, parent: Option<&mut State>) -> Fit {
        let mut parent = parent;
        if self.try_fast(cost, now, parent.as_deref_mut()) {
            return Fit::Now;
        }
        let n = ticks(self.epoch, now);
        // Where it would start after everyone in line — and, on the
        // parent's cells, after everyone in the parent's line and in ours.
        let s = self.start_ticks(cost, Some(&self.queued), n);
        let at = self.start_at(s, n, now);
        Fit::At(match parent {
            Some(p) => at.max(p.start_after(cost, &self.queued_parts, now)),
            None => at,
        })
    }

    /// For a parent: when `cost` could start on its cells after its line and
    /// a line of a key whose costs add up to `parts`.
    fn start_after(&self, cost: &Cost, parts: &[u64; PARTS], now: Instant) -> Instant {
        let n = ticks(self.epoch, now);
        let extra: Vec<u64> = self
            .dims
            .iter()
            .zip(&self.queued)
            .map(|(dim, q)| q.saturating_add(amount_of_parts(dim.unit, parts)))
            .collect();
        self.start_at(self.start_ticks(cost, Some(&extra), n), n, now)
    }

    /// For a parent: whether `cost` fits its cells now (its line is not
    /// looked at: a parent has no callers of its own), and when it will.
    pub(crate) fn cells_due(&self, cost: &Cost, now: Instant) -> (bool, Instant) {
        let n = ticks(self.epoch, now);
        let s = self.start_ticks(cost, None, n);
        (Self::due(s, n), self.start_at(s, n, now))
    }

    /// For a parent: reserves `cost` on its cells now.
    pub(crate) fn reserve_cells(&mut self, cost: &Cost, now: Instant) {
        let n = ticks(self.epoch, now);
        self.reserve_at(cost, n);
        self.started(cost, now);
    }

    /// A cost above one of the cells' largest: it can never be paid.
    pub(crate) fn never_fits(&self, cost: &Cost) -> Option<(u64, &Dim)> {
        self.dims.iter().find_map(|dim| {
            let n = dim.amount(cost);
            (n > dim.largest_cost).then_some((n, dim))
        })
    }

    /// Nothing to remember: no one in line, every cell full, no pause, no
    /// learned limit or cut rate — a pacer like a new one.
    pub(crate) fn is_idle(&self, now: Instant) -> bool {
        let n = ticks(self.epoch, now);
        self.line.is_empty()
            && self.paused_until.is_none_or(|p| p <= now)
            && self.factor >= 1.0
            && self.dims.iter().enumerate().all(|(d, dim)| {
                dim.ticks_per_unit == dim.configured_tpu
                    && dim.available(self.tat[d], self.ends[d], self.spu[d], n) >= dim.capacity
            })
    }

    /// Starts these cells (the same limits) as spent as `other`'s are at
    /// `now`, its line's demand included: a key that got a pacer of its own
    /// may have spent part of the overflow pacer's budget before, or wait
    /// in its line.
    pub(crate) fn spend_like(&mut self, other: &State, now: Instant) {
        let n = ticks(self.epoch, now);
        let on = ticks(other.epoch, now);
        for d in 0..self.dims.len().min(other.dims.len()) {
            let dim = &self.dims[d];
            let left = other.dims[d].available(other.tat[d], other.ends[d], other.spu[d], on);
            // What its line will take counts too: the key may be waiting
            // there.
            let spent = (dim.capacity - left).max(0.0) + other.queued[d] as f64;
            match dim.calendar {
                None => {
                    let owed = n.saturating_add(tick::units(spent, self.spu[d]));
                    self.tat[d] = self.tat[d].max(owed.min(tick::LAST));
                }
                Some(_) if on < other.ends[d] => {
                    self.tat[d] = tick::units(spent.ceil(), 1);
                    self.ends[d] = ticks(self.epoch, other.instant(other.ends[d]));
                }
                Some(_) => {}
            }
        }
    }

    /// Calls in line now.
    pub(crate) fn line_len(&self) -> usize {
        self.line.len()
    }

    /// Ends a pause that has run out; `true` once, when it does.
    pub(crate) fn resume_if_due(&mut self, now: Instant) -> bool {
        match self.paused_until {
            Some(p) if p <= now => {
                self.paused_until = None;
                true
            }
            _ => false,
        }
    }

    /// Puts a call of `cost` that arrived at `arrived` at the end of the line.
    pub(crate) fn enqueue(&mut self, cost: Cost, arrived: Instant) -> (u32, u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = self.waiting.insert(Waiting {
            seq,
            cost,
            waker: None,
            parent_ticket: None,
            arrived,
        }) as u32;
        self.line.insert(seq, slot);
        for (d, dim) in self.dims.iter().enumerate() {
            self.queued[d] = self.queued[d].saturating_add(dim.amount(&cost));
        }
        for (q, x) in self.queued_parts.iter_mut().zip(whole_parts(&cost)) {
            *q = q.saturating_add(x);
        }
        (slot, seq)
    }

    fn unqueue(&mut self, slot: u32, seq: u64) -> bool {
        match self.waiting.get(slot as usize) {
            Some(w) if w.seq == seq => {}
            _ => return false,
        }
        let w = self.waiting.remove(slot as usize);
        self.line.remove(&seq);
        for (d, dim) in self.dims.iter().enumerate() {
            self.queued[d] = self.queued[d].saturating_sub(dim.amount(&w.cost));
        }
        for (q, x) in self.queued_parts.iter_mut().zip(whole_parts(&w.cost)) {
            *q = q.saturating_sub(x);
        }
        true
    }

    /// The head of the line, if any.
    fn head(&self) -> Option<u64> {
        self.line.first_key_value().map(|(s, _)| *s)
    }

    /// For a parent: the waker of a ticket in its line.
    fn set_waker(&mut self, slot: u32, seq: u64, waker: &Waker) {
        if let Some(w) = self.waiting.get_mut(slot as usize).filter(|w| w.seq == seq) {
            match &mut w.waker {
                Some(existing) if existing.will_wake(waker) => {}
                other => *other = Some(waker.clone()),
            }
        }
    }

    fn wake_head(&mut self) {
        if let Some((_, slot)) = self.line.first_key_value() {
            if let Some(w) = self
                .waiting
                .get_mut(*slot as usize)
                .and_then(|w| w.waker.take())
            {
                w.wake();
            }
        }
    }

    /// Closes the line: every waiter is woken to leave with `ShuttingDown`.
    pub(crate) fn close(&mut self) -> usize {
        if self.closed {
            // Its waiters were counted by the first close (they leave the
            // line when they next wake).
            return 0;
        }
        self.closed = true;
        let waiting = self.line.len();
        for (_, w) in self.waiting.iter_mut() {
            if let Some(waker) = w.waker.take() {
                waker.wake();
            }
        }
        waiting
    }

    /// A waiter's turn: `Ok(())` once reserved, else when to look again
    /// (`None`: not at the head; wait to be woken) — or refused at the head
    /// by a budget (a limit with a `max_wait` of its own) that could not
    /// take it soon enough (a debt came in while it waited): it has left
    /// the line then.
    pub(crate) fn poll_turn(
        &mut self,
        slot: u32,
        seq: u64,
        waker: &Waker,
        now: Instant,
        parent: Option<&mut State>,
    ) -> Result<(), Turn> {
        let head = self.line.first_key_value().map(|(s, _)| *s);
        let Some(w) = self.waiting.get_mut(slot as usize).filter(|w| w.seq == seq) else {
            return Ok(()); // not in line any more (closed): let the caller through
        };
        if head != Some(seq) {
            match &mut w.waker {
                Some(existing) if existing.will_wake(waker) => {}
                other => *other = Some(waker.clone()),
            }
            return Err(Turn::Wait(None));
        }
        let cost = w.cost;
        let ticket = w.parent_ticket;
        let arrived = w.arrived;
        if let Some(r) = self.budget_refusal(&cost, now, arrived, |_, _| 0) {
            self.leave(slot, seq, parent);
            return Err(Turn::Refused(r));
        }
        let n = ticks(self.epoch, now);
        let s = self.start_ticks(&cost, None, n);
        let own_due = Self::due(s, n);
        let Some(p) = parent else {
            if own_due {
                self.unqueue(slot, seq);
                self.reserve_at(&cost, n);
                self.started(&cost, now);
                self.wake_head();
                return Ok(());
            }
            self.keep_waker(slot, waker);
            return Err(Turn::Wait(Some(self.start_at(s, n, now))));
        };
        if !own_due {
            // Its own cells first: in the parent's line it would hold back
            // every other key while it waits for them.
            if let Some((ps, pq)) = ticket {
                p.leave(ps, pq, None);
                if let Some(w) = self.waiting.get_mut(slot as usize) {
                    w.parent_ticket = None;
                }
            }
            self.keep_waker(slot, waker);
            return Err(Turn::Wait(Some(self.start_at(s, n, now))));
        }
        // Own cells have room: its turn on the parent's cells comes in the
        // parent's line, first come first served across keys.
        let (ps, pq) = match ticket {
            Some(t) => t,
            None => {
                let t = p.enqueue(cost, arrived);
                if let Some(w) = self.waiting.get_mut(slot as usize) {
                    w.parent_ticket = Some(t);
                }
                t
            }
        };
        // Woken by either: the parent's line moving, or a close here.
        p.set_waker(ps, pq, waker);
        if p.head() != Some(pq) {
            self.keep_waker(slot, waker);
            return Err(Turn::Wait(None));
        }
        if let Some(mut r) = p.budget_refusal(&cost, now, arrived, |_, _| 0) {
            r.parent = true;
            self.leave(slot, seq, Some(p));
            return Err(Turn::Refused(r));
        }
        let (due, at) = p.cells_due(&cost, now);
        if !due {
            self.keep_waker(slot, waker);
            return Err(Turn::Wait(Some(at)));
        }
        p.unqueue(ps, pq);
        p.reserve_cells(&cost, now);
        p.wake_head();
        self.unqueue(slot, seq);
        self.reserve_at(&cost, n);
        self.started(&cost, now);
        self.wake_head();
        Ok(())
    }

    fn keep_waker(&mut self, slot: u32, waker: &Waker) {
        if let Some(w) = self.waiting.get_mut(slot as usize) {
            match &mut w.waker {
                Some(existing) if existing.will_wake(waker) => {}
                other => *other = Some(waker.clone()),
            }
        }
    }

    /// A waiter left the line without reserving (and the parent's line, if
    /// it had a place there).
    pub(crate) fn leave(&mut self, slot: u32, seq: u64, parent: Option<&mut State>) {
        let ticket = self
            .waiting
            .get(slot as usize)
            .filter(|w| w.seq == seq)
            .and_then(|w| w.parent_ticket);
        if let (Some((ps, pq)), Some(p)) = (ticket, parent) {
            p.leave(ps, pq, None);
        }
        let was_head = self.head() == Some(seq);
        if self.unqueue(slot, seq) && was_head {
            self.wake_head();
        }
    }

    /// Replaces an estimate by the real cost: refund or debt on every cell.
    /// A debt (a server-reported usage above the estimate) can at most empty
    /// a cell: a usage of `u64::MAX` tokens does not stall the pacer for ages.
    pub(crate) fn reconcile(
        &mut self,
        estimate: &Cost,
        real: &Cost,
        now: Instant,
        charged: Instant,
    ) {
        let n = ticks(self.epoch, now);
        for d in 0..self.dims.len() {
            let (was, is) = (self.dims[d].amount(estimate), self.dims[d].amount(real));
            if was == is {
                continue;
            }
            // Money is owed in full: a spend debt is not capped at a cell.
            let spend = self.dims[d].unit == Unit::Spend;
            if let Some(cal) = &self.dims[d].calendar {
                // Only in the window the call was charged to: once that one
                // is over, the next started afresh either way.
                let at = ticks(self.epoch, charged);
                if n < self.ends[d] && cal.next_end(at) == self.ends[d] {
                    let used = self.tat[d];
                    self.tat[d] = if is > was {
                        let cap = if spend {
                            u64::MAX
                        } else {
                            tick::units(self.dims[d].capacity, 1).max(used)
                        };
                        used.saturating_add(is - was).min(cap)
                    } else {
                        used.saturating_sub(was - is)
                    };
                }
                continue;
            }
            let t = self.spu(d);
            let tat = self.tat[d];
            self.tat[d] = if is > was {
                let moved = tat.saturating_add(tick::times(is - was, t));
                if spend {
                    moved
                } else {
                    // A debt can at most empty the cell.
                    let empty = n.saturating_add(self.dims[d].tau(t));
                    moved.min(empty.max(tat))
                }
            } else {
                let moved = tat.saturating_sub(tick::times(was - is, t));
                if spend {
                    // A refund cannot make the cell fuller than full.
                    moved.max(n.min(tat))
                } else {
                    moved
                }
            }
            .min(tick::LAST);
        }
        self.wake_head();
    }

    /// The upstream said 429 for a call of `cost`. Returns the pause when this
    /// starts one (not when it only extends a running one).
    ///
    /// The upstream did not count the refused call: its reservation is given
    /// back. A 429 its rate-limit headers explain (a window with less left
    /// than the call needs) is a fact about the upstream's bucket, synced by
    /// [`learn`](Self::learn): pause for the `retry_after` it gave, keep the
    /// rate. Only a 429 the headers do not explain cuts the rate (AIMD).
    /// No pause is longer than `max_pause`.
    pub(crate) fn throttled(
        &mut self,
        retry_after: Option<Duration>,
        cost: &Cost,
        info: Option<&RateLimitInfo>,
        now: Instant,
        charged: Instant,
    ) -> (bool, Option<Duration>) {
        self.throttled += 1;
        // Tokens back; the request itself stays counted (OpenAI: "unsuccessful
        // requests contribute to your per-minute limit").
        let counted = Cost::requests(cost.requests);
        self.reconcile(cost, &counted, now, charged);
        let explained = info.is_some_and(|i| self.explains(i, cost));
        let pause = match (retry_after, explained) {
            (Some(ra), _) => ra,
            (None, true) => Duration::ZERO,
            (None, false) => DEFAULT_PAUSE,
        }
        .min(self.max_pause);
        if !explained {
            self.set_factor((self.factor * DECREASE).max(FLOOR), now);
        }
        // A pause over but not yet told as over: over now, before any new one.
        let resumed = self.resume_if_due(now);
        if pause.is_zero() {
            return (resumed, None);
        }
        let until = crate::time::after(now, pause);
        // A new pause, or one made longer: told (with the time it lasts
        // from now); one this 429 does not lengthen is not.
        if self.paused_until.is_none_or(|p| p < until) {
            self.paused_until = Some(until);
            return (resumed, Some(pause));
        }
        (resumed, None)
    }

    /// The headers show a window we pace with less left than `cost` needs.
    fn explains(&self, info: &RateLimitInfo, cost: &Cost) -> bool {
        self.dims.iter().any(|dim| {
            dim.unit
                .window(info)
                .and_then(|w| w.remaining)
                .is_some_and(|left| left < dim.amount(cost).max(1))
        })
    }

    pub(crate) fn is_slowed(&self) -> bool {
        self.factor < 1.0
    }

    pub(crate) fn succeeded(&mut self, now: Instant) {
        if self.factor < 1.0 {
            self.set_factor((self.factor + INCREASE).min(1.0), now);
        }
    }

    /// Never more optimistic than the upstream: a limit it announces below
    /// ours lowers ours (rate and burst in proportion, for that dimension,
    /// until it announces otherwise — never above what was configured); if
    /// it reports fewer units left than we think, take its word. Its
    /// `remaining` is what it had when the call arrived (`sent`, the moment
    /// providers count a request), refilled at the rate since then.
    pub(crate) fn learn(&mut self, info: &RateLimitInfo, now: Instant, sent: Instant) {
        let n = ticks(self.epoch, now);
        let since = tick::of(now.saturating_duration_since(sent));
        let mut changed = false;
        for d in 0..self.dims.len() {
            let window = self.dims[d].unit.window(info);
            // Only the per-minute windows are reported by providers.
            if self.dims[d].per > Duration::from_secs(60) || self.dims[d].calendar.is_some() {
                continue;
            }
            if let Some(limit) = window.and_then(|w| w.limit).filter(|l| *l > 0) {
                let dim = &mut self.dims[d];
                let (announced, exact) = tick::per_unit(self.header_window, limit);
                let (spu, exact) = if announced > dim.configured_tpu {
                    (announced, exact)
                } else {
                    (dim.configured_tpu, dim.configured_exact)
                };
                if spu != dim.ticks_per_unit {
                    dim.exact = exact;
                    // What is owed (units not yet refilled) is kept in units:
                    // at the new rate it refills in the new time
                    // (`set_factor` moves the cell).
                    dim.ticks_per_unit = spu;
                    dim.capacity =
                        (dim.configured_capacity * dim.configured_tpu as f64 / spu as f64).max(1.0);
                    changed = true;
                }
            }
            let Some(remaining) = window.and_then(|w| w.remaining) else {
                continue;
            };
            if changed {
                self.set_factor(self.factor, now);
                changed = false;
            }
            let t = self.spu(d);
            let capacity = self.dims[d].capacity;
            let ours = capacity - self.tat[d].saturating_sub(n) as f64 / t as f64;
            let theirs = (remaining as f64 + since as f64 / t as f64).min(capacity);
            if theirs < ours {
                let owed = tick::units(capacity - theirs, t);
                self.tat[d] = n.saturating_add(owed).min(tick::LAST);
            }
        }
        if changed {
            self.set_factor(self.factor, now);
        }
    }

    pub(crate) fn snapshot(&self, now: Instant) -> PaceSnapshot {
        let n = ticks(self.epoch, now);
        let dims = self
            .dims
            .iter()
            .enumerate()
            .map(|(d, dim)| {
                let t = self.spu(d);
                DimSnapshot {
                    unit: dim.unit,
                    per: dim.per,
                    capacity: dim.capacity,
                    available: dim.available(self.tat[d], self.ends[d], t, n),
                    full_at: self.start_at(dim.full_at(self.tat[d], self.ends[d], n), n, now),
                }
            })
            .collect();
        let next_start = self.line.first_key_value().and_then(|(_, slot)| {
            self.waiting
                .get(*slot as usize)
                .map(|w| self.start_at(self.start_ticks(&w.cost, None, n), n, now))
        });
        PaceSnapshot {
            dims,
            waiting: self.line.len() as u64,
            next_start,
            paused_until: self.paused_until.filter(|p| *p > now),
            rate_factor: self.factor,
            throttled: self.throttled,
        }
    }
}

/// The pacer's state played forward for an ETA: the calls in its line, then
/// calls of the typical cost, each reserved on a copy of the cells.
#[derive(Debug)]
pub(crate) struct Projection {
    dims: Vec<Dim>,
    tat: Vec<u64>,
    ends: Vec<u64>,
    spu: Vec<u64>,
    paused: Option<u64>,
    epoch: Instant,
    queued: std::collections::VecDeque<Cost>,
    waiting: usize,
    typical: Option<Cost>,
    recent: Vec<Instant>,
}

impl crate::eta::Projection for Projection {
    fn started(&self) -> &[Instant] {
        &self.recent
    }

    fn waiting(&self) -> usize {
        self.waiting
    }

    fn next_start(&mut self, not_before: Instant) -> Option<Instant> {
        let cost = self.pop_cost()?;
        let start = self.start_at(&cost, not_before)?;
        self.reserve_from(&cost, start);
        Some(start)
    }
}

impl Projection {
    /// The next call's cost: the next one in line, then typical ones.
    pub(crate) fn pop_cost(&mut self) -> Option<Cost> {
        match self.queued.pop_front() {
            Some(c) => Some(c),
            None => self.typical,
        }
    }

    /// When `cost` could start on these cells, not before `not_before`
    /// (`None`: it never fits).
    pub(crate) fn start_at(&self, cost: &Cost, not_before: Instant) -> Option<Instant> {
        if self
            .dims
            .iter()
            .any(|dim| dim.amount(cost) > dim.largest_cost)
        {
            return None;
        }
        let n = ticks(self.epoch, not_before);
        let start = earliest(
            &self.dims,
            &self.tat,
            &self.ends,
            &self.spu,
            cost,
            n,
            self.paused,
            None,
        );
        Some(start_instant(self.epoch, start, n, not_before))
    }

    /// Reserves `cost` on the copy of the cells from `start`.
    pub(crate) fn reserve_from(&mut self, cost: &Cost, start: Instant) {
        let s = ticks(self.epoch, start);
        reserve(
            &self.dims,
            &mut self.tat,
            &mut self.ends,
            &self.spu,
            cost,
            s,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A rolling cell of `capacity` units at `spu` (a whole number of
    /// nanoseconds) a unit.
    fn dim(unit: Unit, capacity: u64, spu: Duration, largest: u64) -> Dim {
        let t = tick::of(spu);
        Dim {
            unit,
            per: Duration::from_secs(60),
            capacity: capacity as f64,
            burst: capacity,
            ticks_per_unit: t,
            exact: true,
            configured_capacity: capacity as f64,
            configured_tpu: t,
            configured_exact: true,
            largest_cost: largest,
            calendar: None,
            max_wait: None,
        }
    }

    /// Cells drawn by a proptest: (tokens or requests, capacity, ms per
    /// unit, largest cost in % of the capacity).
    fn random_dims(cells: &[(bool, u32, u32, u32)]) -> Vec<Dim> {
        cells
            .iter()
            .map(|&(tokens, cap, spu_ms, largest_pct)| {
                let unit = if tokens { Unit::Tokens } else { Unit::Requests };
                let cap = u64::from(cap);
                dim(
                    unit,
                    cap,
                    Duration::from_millis(u64::from(spu_ms)),
                    cap * u64::from(largest_pct) / 100,
                )
            })
            .collect()
    }

    proptest! {
        /// The one-pass healthy path decides exactly as the general one: the
        /// same calls admitted, the cells left with the same ticks.
        #[test]
        fn one_pass_path_is_the_general_path(
            cells in proptest::collection::vec((any::<bool>(), 1u32..200, 1u32..2_000, 100u32..150), 1..4),
            calls in proptest::collection::vec((0u64..3_000, 0u32..3, 0u64..300), 1..200),
        ) {
            let dims = random_dims(&cells);
            let mut fast = State::new(dims.clone());
            let mut general = State::new(dims);
            general.epoch = fast.epoch;
            let mut now = fast.epoch;
            for (ms, requests, tokens) in calls {
                now += Duration::from_millis(ms);
                let cost = Cost { requests, input_tokens: tokens, ..Cost::default() };
                let a = fast.try_rolling(&cost, now, ticks(fast.epoch, now))
                    || (fast.never_fits(&cost).is_none() && fast.try_fast(&cost, now, None));
                let b = general.never_fits(&cost).is_none() && general.try_fast(&cost, now, None);
                prop_assert_eq!(a, b);
                prop_assert_eq!(&fast.tat, &general.tat);
            }
        }

        /// The lock-free path (one or two cells) decides exactly as the
        /// general one, its `tat`s going back and forth between the word and
        /// the locked state as a pacer's do (taken back under the lock when
        /// it fails, handed back after), also across cuts and recoveries of
        /// the rate (`set_factor`, what a 429 or a learned limit does): the
        /// same calls admitted, the same cells. "The same": equal ticks, but
        /// for an idle cell the handover may have moved one tick (see
        /// `Fast::hand_over`), so cells are compared as the GCRA reads them,
        /// `max(tat, now)`.
        #[test]
        fn lock_free_path_is_the_general_path(
            cells in proptest::collection::vec((any::<bool>(), 1u32..200, 1u32..2_000, 100u32..150), 1..=2),
            calls in proptest::collection::vec((0u64..3_000, 0u32..3, 0u64..300, 0u8..8), 1..200),
        ) {
            let dims = random_dims(&cells);
            let Some(lock_free) = super::super::fast::Fast::new(&dims) else {
                return Err(TestCaseError::fail("one or two rolling cells have a fast path"));
            };
            let mut locked = State::new(dims.clone());
            let mut general = State::new(dims);
            general.epoch = locked.epoch;
            let mut now = locked.epoch;
            for (ms, requests, tokens, factor) in calls {
                now += Duration::from_millis(ms);
                let n = ticks(locked.epoch, now);
                let cost = Cost { requests, input_tokens: tokens, ..Cost::default() };
                // A cut or a recovery of the rate now and then, under the lock.
                if factor < 3 {
                    let f = [FLOOR, DECREASE, 1.0][usize::from(factor)];
                    locked.take_back(&lock_free);
                    locked.set_factor(f, now);
                    locked.hand_over_at(&lock_free, n);
                    general.set_factor(f, now);
                }
                let a = lock_free.try_take(&cost, n) || {
                    locked.take_back(&lock_free);
                    let admitted = locked.never_fits(&cost).is_none() && locked.try_fast(&cost, now, None);
                    locked.hand_over_at(&lock_free, n);
                    admitted
                };
                let b = general.never_fits(&cost).is_none() && general.try_fast(&cost, now, None);
                prop_assert_eq!(a, b);
                locked.take_back(&lock_free);
                let read = |s: &State| s.tat.iter().map(|t| (*t).max(n)).collect::<Vec<_>>();
                prop_assert_eq!(read(&locked), read(&general));
                locked.hand_over_at(&lock_free, n);
            }
        }
    }

    /// A caller that read the lock-free word before the state took it, and
    /// swaps after the state gave it back, must fail when an idle cell's
    /// rate changed in between (else it is reserved at the old rate) — also
    /// when the state kept the `tat`s across several locks (a waiter in line
    /// meanwhile) and the rate changed under a later one (found by an
    /// outside trial: the guard only looked at the lock that took the word).
    #[test]
    fn a_rate_change_on_idle_cells_under_a_later_lock_still_changes_the_word() {
        let dims = vec![
            dim(Unit::Requests, 10, Duration::from_millis(100), 10),
            dim(Unit::Tokens, 1_000, Duration::from_millis(1), 1_000),
        ];
        let Some(lock_free) = super::super::fast::Fast::new(&dims) else {
            panic!("two rolling cells have a fast path");
        };
        let mut st = State::new(dims);
        let now = st.epoch + Duration::from_secs(5);
        let n = ticks(st.epoch, now);
        let before = lock_free.bits();
        // Lock 1: takes the word; a pause keeps the state owning it.
        st.take_back(&lock_free);
        st.paused_until = Some(now + Duration::from_secs(1));
        st.hand_over_at(&lock_free, n);
        // Lock 2: the rate is cut on idle cells (nothing moves); still paused.
        st.take_back(&lock_free);
        st.set_factor(DECREASE, now);
        st.hand_over_at(&lock_free, n);
        // Lock 3: the pause ends; the word is handed back.
        st.take_back(&lock_free);
        st.paused_until = None;
        st.hand_over_at(&lock_free, n);
        assert_ne!(lock_free.bits(), before, "a stale swap would succeed");
        // Nothing changed: the same bits come back (no needless move).
        let again = lock_free.bits();
        st.take_back(&lock_free);
        st.hand_over_at(&lock_free, n);
        assert_eq!(lock_free.bits(), again);
    }

    /// At the epoch itself an idle cell's `tat` (0) has no tick to move to
    /// that stays idle: after a rate change there, the state keeps the
    /// `tat`s (the word stays owned, nothing is lost) and hands them over,
    /// moved, at a later instant.
    #[test]
    fn a_rate_change_at_the_epoch_keeps_the_word_until_a_later_instant() {
        let dims = vec![dim(Unit::Requests, 10, Duration::from_millis(100), 10)];
        let Some(lock_free) = super::super::fast::Fast::new(&dims) else {
            panic!("a rolling cell has a fast path");
        };
        let mut st = State::new(dims);
        let before = lock_free.bits();
        st.take_back(&lock_free);
        st.set_factor(DECREASE, st.epoch);
        st.hand_over_at(&lock_free, 0);
        assert_eq!(lock_free.bits(), u128::MAX, "kept by the state");
        // A call at the epoch goes the locked way and sees the new rate.
        assert!(!lock_free.try_take(&Cost::requests(1), 0));
        st.take_back(&lock_free);
        st.hand_over_at(&lock_free, 5);
        let after = lock_free.bits();
        assert_ne!(after, u128::MAX);
        assert_ne!(after, before, "a stale swap would succeed");
        // Still idle: 10 calls fit at once, an eleventh does not.
        let fits = (0..11)
            .filter(|_| lock_free.try_take(&Cost::requests(1), 5))
            .count();
        assert_eq!(fits, 10);
    }
}

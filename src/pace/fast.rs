//! The pacer's lock-free healthy path: when nobody waits, nothing is paused
//! and every cell is a rolling GCRA one, a call of a pacer of one or two cells
//! (RPM + TPM, the common shape) is reserved by one compare-and-swap of a
//! 128-bit word that holds both cells' `tat`s — no mutex.
//!
//! **Ownership.** The `tat`s live either in the word (the pacer is *free*:
//! fast callers take from it) or in the locked [`State`](super::state::State)
//! (the word holds [`OWNED`]). Whoever takes the state's lock first takes the
//! `tat`s back out of the word ([`Fast::take_back`], one swap), so every
//! locked path — the line, pauses, learned limits, refunds, snapshots — works
//! on the state alone, as before; when it lets go of the lock and the pacer is
//! free again (nobody in line, no pause, not closed) it hands them back
//! ([`Fast::hand_over`]). A fast caller that finds [`OWNED`] goes the locked
//! way. Both cells move in one compare-and-swap, so a call is reserved on both
//! or on none — never the roll-back of one cell that another call may have
//! seen (a GCRA give-back can over-admit), and the order of calls is the order
//! of their swaps; a caller that finds the line non-empty joins its end.
//!
//! The rule each cell applies is [`rolling_take`], the same function the
//! locked one-pass path uses: the two paths cannot drift apart.
//!
//! Why 128 bits through `portable-atomic`: two `tat`s of 64 bits (ticks,
//! see [`super::tick`]) in one word need a double-width compare-and-swap
//! (`cmpxchg16b` on x86-64, `casp` on AArch64); std has no stable 128-bit
//! atomic. Where the CPU lacks one, `portable-atomic` falls back to a lock
//! of its own (still correct).

use super::state::Dim;
use super::tick;
use super::{Cost, Unit};
use portable_atomic::AtomicU128;
use std::sync::atomic::{AtomicU64, Ordering};

/// The most cells the word holds.
pub(crate) const CELLS: usize = 2;

/// The word while the locked state owns the `tat`s: all ones in both halves,
/// which no pair of `tat`s is (a `tat` is at most [`tick::LAST`]).
const OWNED: u128 = u128::MAX;

/// The GCRA rule of a rolling cell on the healthy path: `a` units at `n`
/// (ticks since the epoch) fit when the bucket, full at `tat`, has room for
/// them now and `a` is within the cell's largest cost; then the new `tat`.
/// `tau` is the burst's time (capacity × `t`, the ticks a unit takes), so a
/// start is `max(tat, n) − tau + min(a·t, tau)`, and it fits when that is
/// not after `n` by more than `slack` ([`tick::slack`]).
/// (GCRA, "virtual scheduling" form: ATM Forum TM 4.0, I.371.)
#[inline(always)]
pub(crate) fn rolling_take(
    tat: u64,
    tau: u64,
    largest: u64,
    t: u64,
    slack: u64,
    a: u64,
    n: u64,
) -> Option<u64> {
    let full = tat.max(n);
    let add = tick::times(a, t);
    // `full + min(add, tau) − tau ≤ n + slack`, exactly (in `u128`: a `tat`
    // kept at the clock's last tick must still refuse).
    let start = u128::from(full) + u128::from(add.min(tau));
    if a > largest || start > u128::from(n) + u128::from(tau) + u128::from(slack) {
        return None;
    }
    Some(full.saturating_add(add).min(tick::LAST))
}

/// One cell's parameters as the fast path reads them. They change only under
/// the state's lock (a learned limit, the AIMD factor) and are written before
/// the `tat`s are handed back, so a fast caller that loaded the word with
/// `Acquire` sees the ones that go with it.
#[derive(Debug)]
struct Params {
    unit: Unit,
    tau: AtomicU64,
    largest: AtomicU64,
    t: AtomicU64,
    slack: AtomicU64,
}

impl Params {
    #[inline(always)]
    fn take(&self, tat: u64, cost: &Cost, n: u64) -> Option<u64> {
        let f = |a: &AtomicU64| a.load(Ordering::Relaxed);
        rolling_take(
            tat,
            f(&self.tau),
            f(&self.largest),
            f(&self.t),
            f(&self.slack),
            cost.amount(self.unit),
            n,
        )
    }

    /// The values of a cell at `t` ticks a unit, in field order.
    fn values(d: &Dim, t: u64) -> [u64; 4] {
        [d.tau(t), d.largest_cost, t, d.slack(t)]
    }

    fn fields(&self) -> [&AtomicU64; 4] {
        [&self.tau, &self.largest, &self.t, &self.slack]
    }
}

/// The lock-free cells of a pacer of at most [`CELLS`] rolling cells and no
/// parent.
#[derive(Debug)]
pub(crate) struct Fast {
    word: Padded<AtomicU128>,
    params: Box<[Params]>,
}

/// A value alone on its cache lines (128 bytes: a line and the one the
/// adjacent-line prefetcher pairs with it), so that swaps of it do not evict
/// what other threads read next to it.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[inline(always)]
fn encode(tat: [u64; CELLS]) -> u128 {
    (u128::from(tat[0]) << 64) | u128::from(tat[1])
}

#[inline(always)]
fn decode(w: u128) -> [u64; CELLS] {
    [(w >> 64) as u64, w as u64]
}

impl Fast {
    /// The fast cells of a pacer with these cells, when it can have them:
    /// one or two cells, every one rolling. Free at first, with the `tat`s
    /// of a new state (0: every bucket full).
    pub(crate) fn new(dims: &[Dim]) -> Option<Fast> {
        if dims.is_empty() || dims.len() > CELLS || dims.iter().any(|d| d.calendar.is_some()) {
            return None;
        }
        Some(Fast {
            word: Padded(AtomicU128::new(encode([0; CELLS]))),
            params: dims
                .iter()
                .map(|d| {
                    let [tau, largest, t, slack] = Params::values(d, d.ticks_per_unit);
                    Params {
                        unit: d.unit,
                        tau: AtomicU64::new(tau),
                        largest: AtomicU64::new(largest),
                        t: AtomicU64::new(t),
                        slack: AtomicU64::new(slack),
                    }
                })
                .collect(),
        })
    }

    /// Reserves `cost` at `n` ticks since the epoch if the pacer is free and
    /// it fits every cell now; `false` decides nothing (go the locked way).
    /// Lock-free: a failed swap means another call was reserved.
    #[inline]
    pub(crate) fn try_take(&self, cost: &Cost, n: u64) -> bool {
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            if w == OWNED {
                return false;
            }
            let tat = decode(w);
            let mut next = tat;
            for ((p, t), next) in self.params.iter().zip(tat).zip(&mut next) {
                match p.take(t, cost, n) {
                    Some(x) => *next = x,
                    None => return false,
                }
            }
            match self.word.compare_exchange_weak(
                w,
                encode(next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => w = now,
            }
        }
    }

    /// The word's bits (tests).
    #[cfg(test)]
    pub(crate) fn bits(&self) -> u128 {
        self.word.load(Ordering::Relaxed)
    }

    /// Under the state's lock: the `tat`s out of the word (which now says
    /// [`OWNED`]) into `tat`; nothing when the state owns them already.
    /// Returns the word taken (for [`hand_over`](Self::hand_over)).
    pub(crate) fn take_back(&self, tat: &mut [u64]) -> Option<u128> {
        let w = self.word.swap(OWNED, Ordering::Acquire);
        if w == OWNED {
            return None;
        }
        for (t, x) in tat.iter_mut().zip(decode(w)) {
            *t = x;
        }
        Some(w)
    }

    /// Under the state's lock, when the pacer is free again: the cells'
    /// parameters, then the `tat`s back into the word. `taken` is the word
    /// [`take_back`](Self::take_back) took them from (perhaps several locks
    /// ago); `now` gives the ticks since the epoch, read only in the rare
    /// case below. Returns whether they were handed over (else the state
    /// keeps them, and `taken`).
    ///
    /// A fast caller who read the word before the lock was taken and swaps
    /// after it is let go succeeds only if the word is back to the very same
    /// bits. That is harmless when the parameters did not change since the
    /// word was taken (they are compared with the ones last handed over), and when
    /// a busy cell's rate changed (`set_factor` moved its `tat`, so the bits
    /// differ; a learned capacity alone does not move a `tat`, and a call
    /// just before it would have left the same cells). It is not when an idle
    /// cell's rate changed (nothing moved): the call would be reserved at the
    /// old rate. Then the idle cell's `tat` is moved by one tick, staying at
    /// or before `now` — invisible, as an idle cell counts from `now`
    /// (`max(tat, now)`) — so the stale swap fails and the caller reads the
    /// new parameters. At the epoch itself (`tat` and `now` both 0) there is
    /// no such tick: the state keeps the `tat`s until a later lock.
    pub(crate) fn hand_over(
        &self,
        dims: &[Dim],
        spu: &[u64],
        tat: &[u64],
        taken: Option<u128>,
        now: impl FnOnce() -> u64,
    ) -> bool {
        let changed = self.params.iter().zip(dims).zip(spu).any(|((p, d), t)| {
            p.fields()
                .into_iter()
                .zip(Params::values(d, *t))
                .any(|(a, x)| a.load(Ordering::Relaxed) != x)
        });
        let mut cells = [0; CELLS];
        for (c, t) in cells.iter_mut().zip(tat) {
            *c = *t;
        }
        if changed && taken == Some(encode(cells)) {
            let n = now();
            for c in cells.iter_mut().take(self.params.len()) {
                if *c <= n {
                    if *c > 0 {
                        *c -= 1;
                    } else if n > 0 {
                        *c = 1;
                    } else {
                        // Nothing stored: the next hand-over sees the
                        // change again.
                        return false;
                    }
                }
            }
        }
        if changed {
            for ((p, d), t) in self.params.iter().zip(dims).zip(spu) {
                for (a, x) in p.fields().into_iter().zip(Params::values(d, *t)) {
                    a.store(x, Ordering::Relaxed);
                }
            }
        }
        self.word.store(encode(cells), Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pace::service::Admit;
    use crate::pace::{Limit, Pace};
    use std::sync::atomic::AtomicU64;
    use std::sync::Barrier;
    use tokio::time::Instant;

    const TOKENS: u64 = 50_000;
    const REQUESTS: u64 = 8_000;

    /// How many calls of `a` units [`rolling_take`] admits at the one
    /// instant `n` on a cell of `capacity` units at `t` ticks a unit (with
    /// no slack when `t` is `exact`, as `Dim::slack`), whose `tat` is `tat`
    /// (stops one past the burst).
    fn burst_from(tat: u64, capacity: u64, (t, exact): (u64, bool), a: u64, n: u64) -> u64 {
        let tau = tick::units(capacity as f64, t);
        let slack = if exact { 0 } else { tick::slack(t) };
        let mut tat = tat;
        let mut k = 0;
        while let Some(next) = rolling_take(tat, tau, capacity, t, slack, a, n) {
            tat = next;
            k += 1;
            if k * a > capacity {
                break;
            }
        }
        k
    }

    fn per_minute(n: u64) -> (u64, bool) {
        tick::per_unit(std::time::Duration::from_secs(60), n)
    }

    proptest::proptest! {
        /// The whole burst at one instant, at any instant up to 36 years
        /// after the epoch (whole seconds, milliseconds or nanoseconds), for
        /// any rate up to ten million a minute and bursts up to 100,000:
        /// exactly `capacity / a` calls, never one less nor one more. Then,
        /// a burst's refill time later, the whole burst again.
        #[test]
        fn a_whole_burst_fits_at_one_instant_and_again_once_refilled(
            capacity in 1u64..=100_000,
            rate in 1u64..=10_000_000,
            a in 1u64..=8,
            now_ns in 0u64..=36 * 365 * 86_400 * 1_000_000_000,
            grain in 0usize..3,
        ) {
            let now_ns = [now_ns / 1_000_000_000 * 1_000_000_000, now_ns / 1_000_000 * 1_000_000, now_ns][grain];
            let n = tick::of(std::time::Duration::from_nanos(now_ns));
            let unit = per_minute(rate);
            let (t, exact) = unit;
            proptest::prop_assert_eq!(burst_from(0, capacity, unit, a, n), capacity / a);
            // Drained to the last unit: the refill of the exact (not the
            // rounded) unit time later, the burst fits again — within the
            // slack's reach (a unit time that is a whole tick, or a burst
            // whose rounding the slack covers).
            let mut tat = n;
            for _ in 0..capacity {
                tat = rolling_take(tat, tick::units(capacity as f64, t), capacity, t, 0, 1, n)
                    .ok_or_else(|| proptest::test_runner::TestCaseError::fail("drain"))?;
            }
            let refill_ns = u128::from(capacity) * 60_000_000_000 / u128::from(rate);
            if (exact || capacity <= tick::slack(t)) && refill_ns < 1 << 62 {
                let later = n + tick::of(std::time::Duration::from_nanos(refill_ns as u64 + 1));
                proptest::prop_assert_eq!(burst_from(tat, capacity, unit, a, later), capacity / a);
            }
        }
    }

    /// The faults of `f64` seconds this clock removes, as an outside trial
    /// measured them (see [`super::super::tick`]): after 30 days and a year,
    /// 999,999 a minute admits exactly 999,999 at one instant, and the last
    /// call of 60,000 and 10,000 a minute's bursts goes at once.
    #[test]
    fn weeks_and_years_in_a_burst_is_exact() {
        for days in [30, 365] {
            let n = tick::of(
                std::time::Duration::from_secs(days * 86_400)
                    + std::time::Duration::from_nanos(123_456_789),
            );
            for rate in [999_999, 60_000, 10_000] {
                assert_eq!(
                    burst_from(0, rate, per_minute(rate), 1, n),
                    rate,
                    "{rate}/min at {days} d"
                );
            }
        }
    }

    /// The slack is what lets a refilled burst fit when a unit's time is
    /// not a whole tick (7 a minute: 8,571,428,571.43 ns, rounded up): 7 at
    /// once, then exactly a minute later 7 again — without it, 6.
    #[test]
    fn the_slack_is_what_makes_a_refilled_burst_fit() {
        let unit = per_minute(7);
        let (t, exact) = unit;
        assert!(!exact);
        let tau = tick::units(7.0, t);
        let n = tick::of(std::time::Duration::from_secs(1_000));
        let later = n + tick::of(std::time::Duration::from_secs(60));
        let drained = (0..7).try_fold(n, |tat, _| rolling_take(tat, tau, 7, t, 0, 1, n));
        let Some(drained) = drained else {
            panic!("7 fit at once")
        };
        let strict = (0..7)
            .scan(drained, |tat, _| {
                *tat = rolling_take(*tat, tau, 7, t, 0, 1, later)?;
                Some(())
            })
            .count();
        assert_eq!(strict, 6, "the check has no teeth");
        assert_eq!(burst_from(drained, 7, unit, 1, later), 7);
        // And the slack never lets an eighth through.
        assert!(tick::slack(t) < t / 1_000);
    }

    fn rpm_tpm() -> Pace {
        Pace::builder()
            .limit(Limit::requests_per_minute(REQUESTS))
            .limit(Limit::tokens_per_minute(TOKENS))
            .max_wait(std::time::Duration::ZERO)
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Calls of `costs` (in turn) admitted at one frozen instant: how many,
    /// their tokens, the tokens left.
    fn sequential(costs: &[u64]) -> (u64, u64, f64) {
        let pace = rpm_tpm();
        let now = Instant::now();
        let (mut calls, mut tokens) = (0, 0);
        for i in 0..60_000 {
            let c = costs[i % costs.len()];
            if let Admit::Now = pace.shared.admit(&Cost::tokens(c), now) {
                calls += 1;
                tokens += c;
            }
        }
        let left = pace.shared.lock().snapshot(now).dims[1].available;
        (calls, tokens, left)
    }

    /// The same from three threads at once, while a fourth keeps taking the
    /// `tat`s back and handing them over (the lock taken and let go, as a
    /// snapshot or a refund does) when `lockers`.
    fn hammer(costs: &[u64], lockers: bool) -> (u64, u64, f64) {
        let pace = rpm_tpm();
        assert!(
            pace.shared.fast.is_some(),
            "RPM + TPM has the lock-free path"
        );
        let now = Instant::now();
        let (calls, tokens) = (AtomicU64::new(0), AtomicU64::new(0));
        let start = Barrier::new(4);
        let finished = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..3 {
                let (pace, calls, tokens, start, finished) =
                    (&pace, &calls, &tokens, &start, &finished);
                s.spawn(move || {
                    start.wait();
                    for i in 0..20_000 {
                        let c = costs[(i * 3 + t) % costs.len()];
                        if let Admit::Now = pace.shared.admit(&Cost::tokens(c), now) {
                            calls.fetch_add(1, Ordering::Relaxed);
                            tokens.fetch_add(c, Ordering::Relaxed);
                        }
                    }
                    finished.fetch_add(1, Ordering::Relaxed);
                });
            }
            start.wait();
            while lockers && finished.load(Ordering::Relaxed) < 3 {
                drop(pace.shared.lock());
            }
        });
        let left = pace.shared.lock().snapshot(now).dims[1].available;
        (calls.into_inner(), tokens.into_inner(), left)
    }

    /// Threads reserving at one instant (no refill) admit what one thread
    /// would: never more (two calls through one room), never less by a call
    /// (a swap lost, a reservation dropped in a handover).
    #[test]
    fn threads_at_one_instant_take_what_one_thread_would() {
        // Tokens bind (⌊50,000 / 7⌋ = 7,142 calls), then requests (8,000 calls of 1).
        let tokens_bind = sequential(&[7]);
        assert_eq!((tokens_bind.0, tokens_bind.1), (7_142, 49_994));
        let requests_bind = sequential(&[1]);
        assert_eq!(requests_bind.0, REQUESTS, "{requests_bind:?}");
        // Exact ticks: the units left are the same number.
        let same = |a: (u64, u64, f64), b: (u64, u64, f64)| a == b;
        for lockers in [false, true] {
            let got = hammer(&[7], lockers);
            assert!(
                same(got, tokens_bind),
                "lockers {lockers}: {got:?}, one thread {tokens_bind:?}"
            );
            let got = hammer(&[1], lockers);
            assert!(
                same(got, requests_bind),
                "lockers {lockers}: {got:?}, one thread {requests_bind:?}"
            );
            // Mixed costs, in any order: never above the burst, and calls of
            // one token kept coming, so less than one token is left.
            let (_, tokens, left) = hammer(&[1, 9, 40, 3, 17], lockers);
            assert!(
                tokens <= TOKENS,
                "{tokens} tokens through a burst of {TOKENS}"
            );
            assert!(left < 1.0, "{left} tokens left unused (lockers {lockers})");
        }
    }

    #[test]
    fn the_owned_word_is_no_pair_of_tats() {
        assert!(decode(OWNED).iter().all(|t| *t > tick::LAST));
        assert_ne!(encode([tick::LAST, tick::LAST]), OWNED);
        // A `tat` saturates at `LAST`, never at all ones.
        assert_eq!(
            rolling_take(
                tick::LAST,
                u64::MAX,
                u64::MAX,
                u64::MAX,
                0,
                u64::MAX,
                tick::LAST
            ),
            Some(tick::LAST)
        );
    }
}

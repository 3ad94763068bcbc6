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
//! Why 128 bits through `portable-atomic`: two `f64`s in one word need a
//! double-width compare-and-swap (`cmpxchg16b` on x86-64, `casp` on AArch64);
//! std has no stable 128-bit atomic. Where the CPU lacks one,
//! `portable-atomic` falls back to a lock of its own (still correct).

use super::state::Dim;
use super::{Cost, Unit};
use portable_atomic::AtomicU128;
use std::sync::atomic::{AtomicU64, Ordering};

/// The most cells the word holds.
pub(crate) const CELLS: usize = 2;

/// The word while the locked state owns the `tat`s: all ones in both halves,
/// a NaN no arithmetic produces (a `tat` is always finite).
const OWNED: u128 = u128::MAX;

/// The GCRA rule of a rolling cell on the healthy path: `a` units at `n`
/// (seconds since the epoch) fit when the bucket, full at `tat`, has room for
/// them now and `a` is within the cell's largest cost; then the new `tat`.
/// (GCRA, "virtual scheduling" form: ATM Forum TM 4.0, I.371.)
#[inline(always)]
pub(crate) fn rolling_take(
    tat: f64,
    capacity: f64,
    largest: f64,
    spu: f64,
    a: f64,
    n: f64,
) -> Option<f64> {
    let full = tat.max(n);
    if a > largest
        || late(
            full - (capacity - a.min(capacity)) * spu,
            full,
            n,
            spu,
            capacity,
        )
    {
        return None;
    }
    Some(full + a * spu)
}

/// Whether a start `s` (seconds since the epoch), computed by the GCRA
/// arithmetic of a cell of `capacity` units at `spu` seconds a unit from
/// `full` (the later of its `tat` and now, plus whatever is ahead in line),
/// is after `n`, rounding aside. A `tat` is a sum of `f64`s — one addition a
/// call — each rounded by up to half a step of its magnitude, so the last
/// call of a burst that fits exactly (500 calls at one instant against 500 a
/// minute) could land a few `f64` steps late and be refused, or wait under a
/// microsecond; without this, 499 of 500 fitted at about a third of the
/// instants of the first hour. A start counts as `n` within the smaller of
/// the rounding a burst's additions can accumulate (`capacity + 2` steps of
/// `full`'s size, 2⁻⁵² each: at most one addition a unit) and 2⁻¹⁰ of a
/// unit's time — so it never lets a whole extra unit through: at most a
/// thousandth of a unit ahead of the exact schedule.
///
/// Where the sum's rounding is larger than that thousandth — a pacer running
/// for weeks at tens of thousands of units a minute (60,000 a minute after 30
/// days: 10 µs on a unit of 1 ms) — it stays: the last unit of a burst taken
/// at one frozen instant may wait that long, and a cell that never idles may
/// run that far ahead of the exact schedule (at 999,999 a minute after a
/// year, 8 calls in a burst of a million). Exact time (integer nanoseconds)
/// would remove both; it is not done. Every fit test of a rolling cell goes
/// through here ([`rolling_take`] and the locked path's `Dim::start`, which
/// the budgets' refusals and the projections use).
#[inline(always)]
pub(crate) fn late(s: f64, full: f64, n: f64, spu: f64, capacity: f64) -> bool {
    s - n > (full * f64::EPSILON * (capacity + 2.0)).min(spu * UNIT_SLACK)
}

/// See [`late`]: the most of a unit's time a start may be taken early by.
const UNIT_SLACK: f64 = 1.0 / 1024.0;

/// One cell's parameters as the fast path reads them. They change only under
/// the state's lock (a learned limit, the AIMD factor) and are written before
/// the `tat`s are handed back, so a fast caller that loaded the word with
/// `Acquire` sees the ones that go with it.
#[derive(Debug)]
struct Params {
    unit: Unit,
    capacity: AtomicU64,
    largest: AtomicU64,
    spu: AtomicU64,
}

impl Params {
    #[inline(always)]
    fn take(&self, tat: f64, cost: &Cost, n: f64) -> Option<f64> {
        let f = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        rolling_take(
            tat,
            f(&self.capacity),
            f(&self.largest),
            f(&self.spu),
            self.unit.amount(cost),
            n,
        )
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
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[inline(always)]
fn encode(tat: [f64; CELLS]) -> u128 {
    (u128::from(tat[0].to_bits()) << 64) | u128::from(tat[1].to_bits())
}

#[inline(always)]
fn decode(w: u128) -> [f64; CELLS] {
    [f64::from_bits((w >> 64) as u64), f64::from_bits(w as u64)]
}

/// The next `f64` below `x` (a finite one): `f64::next_down`, which needs
/// Rust 1.86.
fn next_down(x: f64) -> f64 {
    if x == 0.0 {
        -f64::from_bits(1)
    } else if x > 0.0 {
        f64::from_bits(x.to_bits() - 1)
    } else {
        f64::from_bits(x.to_bits() + 1)
    }
}

impl Fast {
    /// The fast cells of a pacer with these cells, when it can have them:
    /// one or two cells, every one rolling. Free at first, with the `tat`s
    /// of a new state (0: every bucket full).
    pub(crate) fn new(dims: &[Dim]) -> Option<Fast> {
        if dims.is_empty() || dims.len() > CELLS || dims.iter().any(|d| d.calendar.is_some()) {
            return None;
        }
        let bits = |x: f64| AtomicU64::new(x.to_bits());
        Some(Fast {
            word: Padded(AtomicU128::new(encode([0.0; CELLS]))),
            params: dims
                .iter()
                .map(|d| Params {
                    unit: d.unit,
                    capacity: bits(d.capacity),
                    largest: bits(d.largest_cost),
                    spu: bits(d.secs_per_unit),
                })
                .collect(),
        })
    }

    /// Reserves `cost` at `n` seconds since the epoch if the pacer is free and
    /// it fits every cell now; `false` decides nothing (go the locked way).
    /// Lock-free: a failed swap means another call was reserved.
    #[inline]
    pub(crate) fn try_take(&self, cost: &Cost, n: f64) -> bool {
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
    pub(crate) fn take_back(&self, tat: &mut [f64]) -> Option<u128> {
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
    /// ago); `now` gives the seconds since the epoch, read only in the rare
    /// case below.
    ///
    /// A fast caller who read the word before the lock was taken and swaps
    /// after it is let go succeeds only if the word is back to the very same
    /// bits. That is harmless when the parameters did not change since the
    /// word was taken (they are compared with the ones last handed over), and when
    /// a busy cell's rate changed (`set_factor` moved its `tat`, so the bits
    /// differ; a learned capacity alone does not move a `tat`, and a call
    /// just before it would have left the same cells). It is not when an idle
    /// cell's rate changed (nothing moved): the call would be reserved at the
    /// old rate. Then the idle cell's `tat` is moved down by one `f64` step —
    /// invisible, as an idle cell counts from `now` (`max(tat, now)`) — so the
    /// stale swap fails and the caller reads the new parameters.
    pub(crate) fn hand_over(
        &self,
        dims: &[Dim],
        spu: &[f64],
        tat: &[f64],
        taken: Option<u128>,
        now: impl FnOnce() -> f64,
    ) {
        let mut changed = false;
        for ((p, d), s) in self.params.iter().zip(dims).zip(spu) {
            for (a, x) in [
                (&p.capacity, d.capacity),
                (&p.largest, d.largest_cost),
                (&p.spu, *s),
            ] {
                if a.load(Ordering::Relaxed) != x.to_bits() {
                    a.store(x.to_bits(), Ordering::Relaxed);
                    changed = true;
                }
            }
        }
        let mut cells = [0.0; CELLS];
        for (c, t) in cells.iter_mut().zip(tat) {
            *c = *t;
        }
        if changed && taken == Some(encode(cells)) {
            let n = now();
            for c in cells.iter_mut().take(self.params.len()) {
                if *c <= n {
                    *c = next_down(*c);
                }
            }
        }
        self.word.store(encode(cells), Ordering::Release);
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
    /// instant `n`, from an idle cell (stops one past the burst).
    fn burst_at(capacity: u64, spu: f64, a: u64, n: f64) -> u64 {
        let (cap, a_f) = (capacity as f64, a as f64);
        let mut tat = 0.0;
        let mut k = 0;
        while let Some(next) = rolling_take(tat, cap, cap, spu, a_f, n) {
            tat = next;
            k += 1;
            if k * a > capacity {
                break;
            }
        }
        k
    }

    proptest::proptest! {
        /// The whole burst at one instant, at any instant up to 30 days
        /// after the epoch (whole seconds, milliseconds or nanoseconds),
        /// for bursts up to 10,000 calls on cells of at least 10 ms a unit:
        /// exactly `capacity / a` calls, never one less (the `f64`
        /// rounding of `tat`, without [`late`]'s allowance) nor one more.
        #[test]
        fn a_whole_burst_fits_at_one_instant(
            capacity in 1u64..=10_000,
            ms_per_unit in 10u64..=3_600_000,
            a in 1u64..=8,
            now_ns in 0u64..=30 * 86_400 * 1_000_000_000,
            grain in 0usize..3,
        ) {
            let now_ns = [now_ns / 1_000_000_000 * 1_000_000_000, now_ns / 1_000_000 * 1_000_000, now_ns][grain];
            let n = std::time::Duration::from_nanos(now_ns).as_secs_f64();
            let spu = std::time::Duration::from_millis(ms_per_unit).as_secs_f64();
            proptest::prop_assert_eq!(burst_at(capacity, spu, a, n), capacity / a);
        }
    }

    /// Without the allowance, 500 a minute at one instant left the last call
    /// out at about a third of the instants of the first hour; with it, at
    /// none (and what the allowance lets through early is under 1/1024 of a
    /// unit: one more call never fits).
    #[test]
    fn the_allowance_is_what_makes_the_burst_fit() {
        let spu = 60.0 / 500.0;
        let strict = |n: f64| {
            let mut tat: f64 = 0.0;
            let mut k = 0;
            loop {
                let full = tat.max(n);
                if full - 499.0 * spu > n {
                    return k;
                }
                tat = full + spu;
                k += 1;
            }
        };
        let instants = (0..300).map(|i| f64::from(i) * 12.003_7);
        let missed = instants.clone().filter(|&n| strict(n) < 500).count();
        assert!(missed > 30, "{missed} of 300: the check above has no teeth");
        for n in instants {
            assert_eq!(burst_at(500, spu, 1, n), 500, "at {n} s");
        }
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
        assert!(
            requests_bind.0 <= REQUESTS && requests_bind.0 + 1 >= REQUESTS,
            "{requests_bind:?}"
        );
        // The units left differ by float noise with the instant's distance
        // from the epoch: compared to a millionth of a token.
        let same = |a: (u64, u64, f64), b: (u64, u64, f64)| {
            (a.0, a.1) == (b.0, b.1) && (a.2 - b.2).abs() < 1e-6
        };
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
    fn next_down_moves_every_finite_value_down() {
        for x in [0.0, -0.0, 1.0, -1.0, 1e9, -1e-9, f64::MIN_POSITIVE] {
            let y = next_down(x);
            assert!(y < x, "{x} → {y}");
        }
    }

    #[test]
    fn the_owned_word_is_no_pair_of_finite_tats() {
        assert!(decode(OWNED).iter().all(|t| t.is_nan()));
        assert_ne!(encode([0.0, 0.0]), OWNED);
    }
}

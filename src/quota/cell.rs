//! A lock-free GCRA cell that can give tokens back (governor's cannot): the
//! global limit, taken before the keyed check and returned if that refuses.

use super::Rate;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Cell {
    /// Theoretical arrival time, in nanoseconds since `epoch`.
    tat: AtomicU64,
    /// Nanoseconds of `tat` given back or being given back (added before a
    /// give-back moves `tat`), and those given back (added after): see
    /// [`give_back`](Self::give_back).
    giving: AtomicU64,
    given: AtomicU64,
    unit_ns: u64,
    tau_ns: u64,
    epoch: Instant,
}

impl Cell {
    pub(crate) fn new(rate: Rate) -> Self {
        let unit_ns = u64::try_from((rate.per.as_nanos() / u128::from(rate.count)).max(1))
            .unwrap_or(u64::MAX);
        Cell {
            tat: AtomicU64::new(0),
            giving: AtomicU64::new(0),
            given: AtomicU64::new(0),
            unit_ns,
            tau_ns: unit_ns.saturating_mul(u64::from(rate.burst)),
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds from the epoch to `at` (saturating both ways).
    #[inline]
    fn ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes `n` units now that may be given back, or says how long until
    /// they fit.
    #[inline]
    pub(crate) fn take_undoable(&self, n: u32, now: Instant) -> Result<Taken, Duration> {
        // Before the take: every give-back counted here moved `tat` before it.
        let given = self.given.load(Ordering::SeqCst);
        let after = self.take(n, now)?;
        Ok(Taken { n, after, given })
    }

    /// Takes `n` units now, or says how long until they fit. `Ok` holds the
    /// cell's theoretical arrival time right after this take.
    #[inline]
    pub(crate) fn take(&self, n: u32, now: Instant) -> Result<u64, Duration> {
        let now_ns = self.ns(now);
        let cost = self.unit_ns.saturating_mul(u64::from(n));
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new = tat.max(now_ns).saturating_add(cost);
            let ahead = new - now_ns;
            if ahead > self.tau_ns {
                return Err(Duration::from_nanos(ahead - self.tau_ns));
            }
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => return Ok(new),
                Err(actual) => tat = actual,
            }
        }
    }

    /// The time one unit takes to refill.
    pub(crate) fn unit(&self) -> Duration {
        Duration::from_nanos(self.unit_ns)
    }

    /// Whether `n` units can ever be taken at once (within the burst).
    pub(crate) fn fits(&self, n: u32) -> bool {
        self.unit_ns.saturating_mul(u64::from(n)) <= self.tau_ns
    }

    /// Gives back a take whose call was refused elsewhere (the keyed check
    /// after the global one), as far as that is safe: never more than the
    /// cell would hold had the take not happened. `now` is the clock, read
    /// after each load of the cell.
    ///
    /// Subtracting the whole cost is not safe: a take that found the cell
    /// full (its theoretical arrival time `tat` before now) started from
    /// `now`, not from `tat`; a later take may then have found the cell
    /// full in the world without it, where the refill of that time was
    /// lost. Each take does `tat ← max(tat, tᵢ) + cᵢ` (GCRA, the Generic
    /// Cell Rate Algorithm of ITU-T I.371), so after later takes the cell
    /// holds `min(cost, minᵢ max(0, tatᵢ − tᵢ))` more than without ours,
    /// where `tatᵢ` is the cell before take `i` and `tᵢ ≤ now` its clock
    /// (read before its compare-and-swap, which came before our load).
    /// `tatᵢ` is at least our take's `after` less what other give-backs
    /// moved since, which is at most `giving` now less `given` before our
    /// take. So `min(cost, after − moved − now)` is always safe to give
    /// back, and it is the whole cost when the cell was not full at the take
    /// and has not run dry since. (The `quota::cell` proptests compare the
    /// cell with one that never saw the given-back takes.)
    pub(crate) fn give_back(&self, taken: Taken, now: impl Fn() -> Instant) {
        let cost = self.unit_ns.saturating_mul(u64::from(taken.n));
        let mut tat = self.tat.load(Ordering::SeqCst);
        loop {
            let moved = self.giving.load(Ordering::SeqCst).wrapping_sub(taken.given);
            let floor = taken.after.saturating_sub(moved);
            let back = cost.min(floor.saturating_sub(self.ns(now())));
            if back == 0 {
                return;
            }
            self.giving.fetch_add(back, Ordering::SeqCst);
            let done = self.tat.compare_exchange_weak(
                tat,
                tat.saturating_sub(back),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            // Counted as given even when the swap failed: the sums only
            // ever make other give-backs more careful.
            self.given.fetch_add(back, Ordering::SeqCst);
            match done {
                Ok(_) => return,
                Err(actual) => tat = actual,
            }
        }
    }
}

/// A take of `n` units that left the cell's `tat` at `after` (ns since the
/// epoch), made when `given` ns had been given back: what
/// [`Cell::give_back`] needs to give it back safely.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Taken {
    n: u32,
    after: u64,
    given: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The cell as seen at `now`: its `tat`, or `now` when it is full.
    fn seen(cell: &Cell, now: Instant) -> u64 {
        cell.tat.load(Ordering::Acquire).max(cell.ns(now))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4_000))]

        /// Takes at random times, some given back after other takes:
        /// compared with a cell that never saw the given-back takes (and
        /// made the same other takes at the same times), the cell is never
        /// emptier-looking — never more permissive — at any instant; a take
        /// given back at once, with no take between, leaves it as if it had
        /// not happened.
        #[test]
        fn give_back_never_owes_more_than_the_take(
            count in 1u32..10_000,
            burst in 1u32..50,
            ops in prop::collection::vec((0u64..2_000_000, 1u32..5, any::<bool>(), 0usize..4), 1..60),
        ) {
            let base = Instant::now();
            let rate = Rate::new(count, Duration::from_secs(1)).burst(burst);
            let real = Cell { epoch: base, ..Cell::new(rate) };
            let model = Cell { epoch: base, ..Cell::new(rate) };
            let mut at = base;
            // takes to give back later: (taken, how many more ops first)
            let mut pending: Vec<(Taken, usize)> = Vec::new();
            for (gap_ns, n, back, delay) in ops {
                at += Duration::from_nanos(gap_ns);
                let now = at;
                if let Ok(t) = real.take_undoable(n, now) {
                    if back {
                        pending.push((t, delay));
                    } else {
                        // Kept: the model makes it too (it admits whatever
                        // the real cell admits while it is never fuller).
                        prop_assert!(model.take(n, now).is_ok());
                    }
                }
                let mut keep = Vec::new();
                for (t, d) in pending.drain(..) {
                    if d == 0 {
                        real.give_back(t, || now);
                    } else {
                        keep.push((t, d - 1));
                    }
                }
                pending = keep;
                prop_assert!(
                    seen(&real, now) >= seen(&model, now),
                    "real {} < model {} at {:?}",
                    seen(&real, now), seen(&model, now), now - base
                );
            }
        }

        /// A take given back before any other take, at the same instant,
        /// leaves the cell as if it had not happened.
        #[test]
        fn give_back_at_once_is_exact(
            count in 1u32..10_000,
            burst in 2u32..50,
            warm in prop::collection::vec((0u64..2_000_000, 1u32..3), 0..20),
            n in 1u32..3,
        ) {
            let base = Instant::now();
            let rate = Rate::new(count, Duration::from_secs(1)).burst(burst);
            let real = Cell { epoch: base, ..Cell::new(rate) };
            let mut at = base;
            for (gap, k) in warm {
                at += Duration::from_nanos(gap);
                let _ = real.take(k, at);
            }
            let before = seen(&real, at);
            if let Ok(t) = real.take_undoable(n, at) {
                real.give_back(t, || at);
                prop_assert_eq!(seen(&real, at), before);
            }
        }
    }
}

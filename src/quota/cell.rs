//! A lock-free GCRA cell with a look that takes nothing (governor's has
//! none): the global limit, looked at before the keyed check and taken after
//! it, so a call its key refuses never touches the global limit.

use super::Rate;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Cell {
    /// Theoretical arrival time, in nanoseconds since `epoch`.
    tat: AtomicU64,
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
            unit_ns,
            tau_ns: unit_ns.saturating_mul(u64::from(rate.burst)),
            epoch: Instant::now(),
        }
    }

    /// Nanoseconds from the epoch to `at` (saturating both ways; in `u64`
    /// arithmetic, not `as_nanos`'s `u128`).
    #[inline]
    fn ns(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.epoch);
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    }

    /// The cell's `tat` after `n` more units at `now_ns` from `tat`, or how
    /// long until they fit (GCRA: admitted while `tat − now ≤ τ`).
    #[inline]
    fn after(&self, tat: u64, now_ns: u64, n: u32) -> Result<u64, Duration> {
        let new = tat
            .max(now_ns)
            .saturating_add(self.unit_ns.saturating_mul(u64::from(n)));
        let ahead = new - now_ns;
        if ahead > self.tau_ns {
            return Err(Duration::from_nanos(ahead - self.tau_ns));
        }
        Ok(new)
    }

    /// Whether `n` units fit now, taking nothing: `Err` with how long until
    /// they fit. A later [`take`](Self::take) at the same `now` may still
    /// refuse (another call took the room between), never the other way.
    #[inline]
    pub(crate) fn look(&self, n: u32, now: Instant) -> Result<(), Duration> {
        self.after(self.tat.load(Ordering::Acquire), self.ns(now), n)
            .map(|_| ())
    }

    /// Takes `n` units now, or says how long until they fit.
    #[inline]
    pub(crate) fn take(&self, n: u32, now: Instant) -> Result<(), Duration> {
        let now_ns = self.ns(now);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new = self.after(tat, now_ns, n)?;
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Looks and takes at random times: a look changes nothing, and says
        /// yes exactly when a take at the same instant succeeds, with the
        /// same wait when it says no.
        #[test]
        fn a_look_is_a_take_that_takes_nothing(
            count in 1u32..10_000,
            burst in 1u32..50,
            ops in prop::collection::vec((0u64..2_000_000, 1u32..60, any::<bool>()), 1..80),
        ) {
            let base = Instant::now();
            let rate = Rate::new(count, Duration::from_secs(1)).burst(burst);
            let cell = Cell { epoch: base, ..Cell::new(rate) };
            let mut at = base;
            for (gap_ns, n, take) in ops {
                at += Duration::from_nanos(gap_ns);
                let before = cell.tat.load(Ordering::Acquire);
                let looked = cell.look(n, at);
                prop_assert_eq!(cell.tat.load(Ordering::Acquire), before);
                if take {
                    prop_assert_eq!(cell.take(n, at), looked);
                    if looked.is_err() {
                        prop_assert_eq!(cell.tat.load(Ordering::Acquire), before);
                    }
                }
            }
        }
    }
}

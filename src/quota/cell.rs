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

    /// Takes `n` units now, or says how long until they fit.
    #[inline]
    pub(crate) fn take(&self, n: u32, now: Instant) -> Result<(), Duration> {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
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

    /// Gives back `n` units taken by a call that was refused elsewhere.
    pub(crate) fn give_back(&self, n: u32) {
        let cost = self.unit_ns.saturating_mul(u64::from(n));
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(cost))
            });
    }
}

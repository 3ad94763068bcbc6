//! Lock-free GCRA cells with a look that takes nothing (governor's have
//! none): the global limit, looked at before the keyed check and taken after
//! it, so a call its key refuses never touches the global limit; and the
//! keyed cells of a plan, one `tat` per key, looked at too when the global
//! limit refuses a call (its `retry_after` is the longer of the two waits).
//!
//! Our own rather than governor's keyed store: governor cannot look at a
//! key without taking from it, so a refusal by the global limit could not
//! say how long the key's plan would make the caller wait.

use super::Rate;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The GCRA rule of a rate: one unit every `unit_ns`, admitted while the
/// theoretical arrival time `tat` (nanoseconds since `epoch`) after the
/// call is at most `tau_ns` ahead of now (a burst of `tau_ns / unit_ns`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gcra {
    unit_ns: u64,
    tau_ns: u64,
    epoch: Instant,
}

impl Gcra {
    pub(crate) fn new(rate: Rate, epoch: Instant) -> Self {
        // Rounded up: a rate is never exceeded (the builders refuse one a
        // whole nanosecond per unit would make more than 1 % stricter).
        let unit_ns = u64::try_from(
            rate.per
                .as_nanos()
                .div_ceil(u128::from(rate.count.max(1)))
                .max(1),
        )
        .unwrap_or(u64::MAX);
        Gcra {
            unit_ns,
            tau_ns: unit_ns.saturating_mul(u64::from(rate.burst)),
            epoch,
        }
    }

    /// Nanoseconds from the epoch to `at` (saturating both ways; in `u64`
    /// arithmetic, not `as_nanos`'s `u128`).
    #[inline]
    pub(crate) fn ns(&self, at: Instant) -> u64 {
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

    /// Whether `n` units fit now in `tat`, taking nothing: `Err` with how
    /// long until they fit. A later [`take`](Self::take) at the same `now`
    /// may still refuse (another call took the room between), never the
    /// other way.
    #[inline]
    fn look(&self, tat: &AtomicU64, n: u32, now_ns: u64) -> Result<(), Duration> {
        self.after(tat.load(Ordering::Acquire), now_ns, n)
            .map(|_| ())
    }

    /// Takes `n` units from `tat` now, or says how long until they fit.
    #[inline]
    fn take(&self, tat: &AtomicU64, n: u32, now_ns: u64) -> Result<(), Duration> {
        let mut seen = tat.load(Ordering::Acquire);
        loop {
            let new = self.after(seen, now_ns, n)?;
            match tat.compare_exchange_weak(seen, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(actual) => seen = actual,
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

/// One GCRA cell shared by every call (the quota's global limit, a
/// [`RateLimit`](super::RateLimit)).
#[derive(Debug)]
pub(crate) struct Cell {
    /// Theoretical arrival time, in nanoseconds since the epoch.
    tat: AtomicU64,
    gcra: Gcra,
}

impl Cell {
    pub(crate) fn new(rate: Rate) -> Self {
        Cell {
            tat: AtomicU64::new(0),
            gcra: Gcra::new(rate, Instant::now()),
        }
    }

    /// Whether `n` units fit now, taking nothing (see [`Gcra::look`]).
    #[inline]
    pub(crate) fn look(&self, n: u32, now: Instant) -> Result<(), Duration> {
        self.gcra.look(&self.tat, n, self.gcra.ns(now))
    }

    /// Takes `n` units now, or says how long until they fit.
    #[inline]
    pub(crate) fn take(&self, n: u32, now: Instant) -> Result<(), Duration> {
        self.gcra.take(&self.tat, n, self.gcra.ns(now))
    }

    /// The time one unit takes to refill.
    pub(crate) fn unit(&self) -> Duration {
        self.gcra.unit()
    }

    /// Whether `n` units can ever be taken at once (within the burst).
    pub(crate) fn fits(&self, n: u32) -> bool {
        self.gcra.fits(n)
    }
}

/// A plan's cells, one per key, in a concurrent map hashed with
/// [`crate::hashing`]'s foldhash (a hot key's check reads its shard under a
/// shared lock and moves its `tat` with one compare-and-swap). A key whose
/// bucket is full again is indistinguishable from a new one: a sweep drops
/// it.
///
/// A caller reads the clock **after** it found its key's cell (or found
/// none), and holds the cell (a shared lock on its shard) until its
/// compare-and-swap: a sweep that drops the key before the lookup read its
/// own clock before it, so the key it dropped was full at the caller's
/// `now` too; a sweep after the lookup waits for the cell to be let go.
/// (A caller that read the clock first, then lost its key to a sweep with
/// a later clock, would start a fresh cell while the old one still counted:
/// over-admission, seen under load in `tests/race_attack.rs`.)
pub(crate) struct KeyedCells<K> {
    gcra: Gcra,
    map: dashmap::DashMap<K, AtomicU64, crate::hashing::RandomState>,
}

/// A key's cell, held: its shard is read-locked until it is dropped.
pub(crate) type Held<'a, K> = dashmap::mapref::one::Ref<'a, K, AtomicU64>;

impl<K: Hash + Eq + Clone> KeyedCells<K> {
    pub(crate) fn new(rate: Rate, epoch: Instant) -> Self {
        KeyedCells {
            gcra: Gcra::new(rate, epoch),
            map: dashmap::DashMap::with_hasher(crate::hashing::RandomState::default()),
        }
    }

    /// `key`'s cell, if it has one (read the clock after this).
    #[inline]
    pub(crate) fn cell(&self, key: &K) -> Option<Held<'_, K>> {
        self.map.get(key)
    }

    /// `key`'s cell, made (as a full bucket) if it has none. The clock must
    /// be read after this for a take from it.
    #[cold]
    pub(crate) fn cell_or_new(&self, key: &K) -> Held<'_, K> {
        self.map
            .entry(key.clone())
            .or_insert_with(|| AtomicU64::new(0))
            .downgrade()
    }

    /// Takes `n` units from a held cell at `now`, or says how long until
    /// they fit.
    #[inline]
    pub(crate) fn take(&self, cell: &Held<'_, K>, n: u32, now: Instant) -> Result<(), Duration> {
        self.gcra.take(cell, n, self.gcra.ns(now))
    }

    /// Whether `n` units fit a held cell (`None`: a key without one, a
    /// full bucket) at `now`, taking nothing.
    pub(crate) fn look(
        &self,
        cell: Option<&Held<'_, K>>,
        n: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        let now_ns = self.gcra.ns(now);
        match cell {
            Some(tat) => self.gcra.look(tat, n, now_ns),
            None => self.gcra.after(0, now_ns, n).map(|_| ()),
        }
    }

    /// Drops the keys whose bucket is full again at `now`.
    pub(crate) fn retain_recent(&self, now: Instant) {
        let now_ns = self.gcra.ns(now);
        self.map
            .retain(|_, tat| tat.load(Ordering::Acquire) > now_ns);
        self.map.shrink_to_fit();
    }

    /// Keys held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
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
            let cell = Cell { tat: AtomicU64::new(0), gcra: Gcra::new(rate, base) };
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

        /// A plan's keyed cells against one plain cell per key that is
        /// never swept: looks, takes and sweeps at random times give the
        /// same answers (a swept key is indistinguishable from the one it
        /// was), keys never affect each other, and a look takes nothing.
        #[test]
        fn keyed_cells_are_independent_cells_whatever_the_sweeps(
            count in 1u32..10_000,
            burst in 1u32..20,
            ops in prop::collection::vec((0u8..3, 0u64..3_000_000, 1u32..25, 0u8..3), 1..120),
        ) {
            let base = Instant::now();
            let rate = Rate::new(count, Duration::from_secs(1)).burst(burst);
            let keyed = KeyedCells::<u8>::new(rate, base);
            let model: Vec<Cell> = (0..3)
                .map(|_| Cell { tat: AtomicU64::new(0), gcra: Gcra::new(rate, base) })
                .collect();
            let mut at = base;
            for (key, gap_ns, n, op) in ops {
                at += Duration::from_nanos(gap_ns);
                let m = &model[usize::from(key)];
                match op {
                    0 => {
                        let held = keyed.cell(&key);
                        prop_assert_eq!(keyed.look(held.as_ref(), n, at), m.look(n, at));
                    }
                    1 => {
                        let got = match keyed.cell(&key) {
                            Some(held) => keyed.take(&held, n, at),
                            None => keyed.take(&keyed.cell_or_new(&key), n, at),
                        };
                        prop_assert_eq!(got, m.take(n, at));
                    }
                    _ => {
                        keyed.retain_recent(at);
                        // Only keys whose bucket is not full are kept.
                        let busy = model
                            .iter()
                            .filter(|c| c.gcra.ns(at) < c.tat.load(Ordering::Acquire))
                            .count();
                        prop_assert!(keyed.len() <= busy);
                    }
                }
            }
        }
    }
}

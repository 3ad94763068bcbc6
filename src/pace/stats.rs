//! What the pacer remembers of the calls it let through, for projections
//! (ETAs of the lines above it, a router's outlook): when the most recent ones
//! started, and a typical call's cost (smoothed).
//!
//! Written by every admitted call — by the lock-free healthy path
//! ([`super::fast`]) as well as under the state's lock — so it is kept in
//! atomics of its own, not in the locked state. Both are estimates: two calls
//! starting at once may land in the ring out of order, and two smoothings at
//! once may lose one sample (each part is read, moved and stored, not
//! compare-and-swapped); a projection never needs more.
//!
//! The starts are recorded only once the pacer is *watched* — set as a
//! line's ETA source ([`EtaSource::watch`](crate::eta::EtaSource::watch)) or
//! asked for a projection: the ring's count is one more cache line every
//! call moves from core to core, which nobody reads otherwise (it cost a
//! pacer a tenth of its calls a second under 256 tasks). The pacers of a
//! [`KeyedPace`](super::KeyedPace) share one flag.

use super::fast::Padded;
use super::Cost;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How many recent starts the pacer remembers for projections.
const RECENT: usize = 256;

/// A ring slot no start was written to.
const UNWRITTEN: u64 = u64::MAX;

/// The parts of a cost: requests, input, cached input, output, spend.
pub(crate) const PARTS: usize = 5;

/// The weight of the newest cost in the smoothed typical one.
const SMOOTHING: f64 = 0.2;

#[derive(Debug)]
pub(crate) struct Stats {
    /// The last [`RECENT`] starts (nanoseconds since the pacer's epoch), in a
    /// ring: a write a call, no shifting. Allocated at the first call (a
    /// keyed pacer builds one pacer a key; many keys see few calls).
    recent: OnceLock<Box<[AtomicU64]>>,
    /// How many starts were recorded (the ring's next slot is this modulo
    /// [`RECENT`]); alone on its lines, as every call moves it.
    count: Padded<AtomicUsize>,
    /// A typical call's cost per part (`f64` bits), once `seen`.
    typical: [AtomicU64; PARTS],
    seen: AtomicBool,
    /// Starts are recorded (see the module docs); shared by a keyed
    /// pacer's pacers.
    watched: Arc<AtomicBool>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::watched_by(Arc::default())
    }
}

pub(crate) fn parts(c: &Cost) -> [f64; PARTS] {
    [
        f64::from(c.requests),
        to_f64(c.input_tokens),
        to_f64(c.cached_input_tokens),
        to_f64(c.output_tokens),
        to_f64(c.spend),
    ]
}

/// `x as f64`, by the one-instruction signed conversion below 2^63 (the
/// same value: both round to nearest).
#[inline(always)]
fn to_f64(x: u64) -> f64 {
    match i64::try_from(x) {
        Ok(i) => i as f64,
        Err(_) => x as f64,
    }
}

impl Stats {
    /// Stats recording starts while `watched` is set.
    pub(crate) fn watched_by(watched: Arc<AtomicBool>) -> Self {
        Stats {
            recent: OnceLock::new(),
            count: Padded(AtomicUsize::new(0)),
            typical: Default::default(),
            seen: AtomicBool::new(false),
            watched,
        }
    }

    /// The flag (to share it with other pacers).
    pub(crate) fn watched_flag(&self) -> Arc<AtomicBool> {
        self.watched.clone()
    }

    /// From now on, starts are recorded.
    pub(crate) fn watch(&self) {
        if !self.watched.load(Relaxed) {
            self.watched.store(true, Relaxed);
        }
    }

    /// A call of `cost` started `since` the pacer's epoch.
    #[inline]
    pub(crate) fn started(&self, cost: &Cost, since: Duration) {
        if self.watched.load(Relaxed) {
            let i = self.count.fetch_add(1, Relaxed);
            let ring = self
                .recent
                .get_or_init(|| (0..RECENT).map(|_| AtomicU64::new(UNWRITTEN)).collect());
            if let Some(slot) = ring.get(i % RECENT) {
                // [`UNWRITTEN`] is no start (584 years after the epoch).
                let ns = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
                slot.store(ns.min(UNWRITTEN - 1), Relaxed);
            }
        }
        let x = parts(cost);
        // A call of the typical cost itself changes nothing (the smoothing
        // of `x` into `x` is `x`): checked first, nothing is written — a
        // pacer whose calls all cost the same stops here.
        if self.seen.load(Relaxed)
            && self
                .typical
                .iter()
                .zip(x)
                .all(|(t, x)| t.load(Relaxed) == x.to_bits())
        {
            return;
        }
        self.smooth(x);
    }

    /// Moves the typical cost towards `x` (or starts it at `x`).
    #[inline(never)]
    fn smooth(&self, x: [f64; PARTS]) {
        if !self.seen.load(Relaxed) {
            for (t, x) in self.typical.iter().zip(x) {
                t.store(x.to_bits(), Relaxed);
            }
            self.seen.store(true, Relaxed);
            return;
        }
        // A part the smoothing leaves as it was is not written again.
        for (t, x) in self.typical.iter().zip(x) {
            let old = f64::from_bits(t.load(Relaxed));
            let new = old + SMOOTHING * (x - old);
            if new.to_bits() != old.to_bits() {
                t.store(new.to_bits(), Relaxed);
            }
        }
    }

    /// The typical cost's parts, before any call `None`.
    pub(crate) fn typical(&self) -> Option<[f64; PARTS]> {
        self.seen.load(Relaxed).then(|| {
            self.typical
                .each_ref()
                .map(|t| f64::from_bits(t.load(Relaxed)))
        })
    }

    /// The recorded starts (since the epoch), oldest first. A slot a call
    /// has counted but not written yet is left out (it read as the epoch on
    /// the ring's first lap — a start before the pacer's first call, found
    /// by `tests/watch_attack.rs`).
    pub(crate) fn recent(&self) -> Vec<Duration> {
        let Some(ring) = self.recent.get() else {
            return Vec::new();
        };
        let count = self.count.load(Relaxed);
        let len = count.min(RECENT);
        (count - len..count)
            .filter_map(|i| ring.get(i % RECENT))
            .map(|s| s.load(Relaxed))
            .filter(|&ns| ns != UNWRITTEN)
            .map(Duration::from_nanos)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_starts_oldest_first() {
        let s = Stats::default();
        assert!(s.recent().is_empty());
        assert_eq!(s.typical(), None);
        s.started(&Cost::requests(1), Duration::from_millis(1));
        assert!(s.recent().is_empty(), "not watched: nothing recorded");
        assert!(
            s.typical().is_some(),
            "the typical cost is kept all the same"
        );
        s.watch();
        for k in 0..(RECENT + 3) {
            s.started(&Cost::requests(1), Duration::from_millis(k as u64));
        }
        let r = s.recent();
        assert_eq!(r.len(), RECENT);
        assert_eq!(r.first(), Some(&Duration::from_millis(3)));
        assert_eq!(r.last(), Some(&Duration::from_millis(RECENT as u64 + 2)));
    }

    /// A call counted but not written yet (another thread between the
    /// count and the store) is left out, not read as the epoch; a start at
    /// the epoch itself is kept.
    #[test]
    fn a_slot_counted_but_not_written_is_left_out() {
        let s = Stats::default();
        s.watch();
        s.started(&Cost::requests(1), Duration::ZERO);
        s.started(&Cost::requests(1), Duration::from_millis(5));
        s.count.fetch_add(1, Relaxed);
        assert_eq!(s.recent(), [Duration::ZERO, Duration::from_millis(5)]);
    }

    #[test]
    fn the_conversion_is_the_plain_one_at_every_edge() {
        for x in [
            0,
            1,
            (1 << 53) + 1,
            i64::MAX as u64,
            1 << 63,
            (1 << 63) + 1,
            u64::MAX,
        ] {
            assert_eq!(to_f64(x).to_bits(), (x as f64).to_bits(), "{x}");
        }
    }

    proptest::proptest! {
        /// The check that skips a call of the typical cost leaves the
        /// typical cost exactly where the smoothing of every call puts it.
        #[test]
        fn skipping_the_typical_cost_changes_nothing(
            costs in proptest::collection::vec(
                (0u32..3, proptest::prop_oneof![0u64..4, proptest::num::u64::ANY]),
                1..40,
            )
        ) {
            let s = Stats::default();
            let mut model: Option<[f64; PARTS]> = None;
            for (r, t) in costs {
                let cost = Cost { requests: r, input_tokens: t, ..Cost::default() };
                s.started(&cost, Duration::ZERO);
                let x = [f64::from(r), t as f64, 0.0, 0.0, 0.0];
                model = Some(match model {
                    None => x,
                    Some(old) => std::array::from_fn(|i| old[i] + SMOOTHING * (x[i] - old[i])),
                });
                let bits = |a: [f64; PARTS]| a.map(f64::to_bits);
                proptest::prop_assert_eq!(s.typical().map(bits), model.map(bits));
            }
        }
    }

    #[test]
    fn the_typical_cost_is_smoothed_from_the_first_one() {
        let s = Stats::default();
        s.started(&Cost::tokens(100), Duration::ZERO);
        assert_eq!(s.typical().map(|t| t[1]), Some(100.0));
        s.started(&Cost::tokens(200), Duration::ZERO);
        // 100 + 0.2 · (200 − 100)
        assert_eq!(s.typical().map(|t| t[1]), Some(120.0));
    }
}

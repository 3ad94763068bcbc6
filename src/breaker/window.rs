//! Sliding windows of call outcomes, recorded without a lock.
//!
//! Count-based: the last `n` outcomes in a ring of atomic slots; each record swaps
//! one slot and adjusts the counters by the difference. Time-based: `buckets`
//! buckets of `len / buckets` each, stamped with their bucket number; a record in
//! a bucket whose stamp is stale resets it first.
//!
//! Under concurrent recording the counts are exact per slot but a reset racing a
//! record may lose that one record — the usual trade of lock-free windows
//! (Resilience4j's are the same). Counters are read clamped to `[0, total]`.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const PRESENT: u8 = 1;
const FAILED: u8 = 2;
const SLOW: u8 = 4;

/// Outcome counts over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) total: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

impl Counts {
    pub(crate) fn failure_rate(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.failures as f64 / self.total as f64
        }
    }

    pub(crate) fn slow_rate(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.slow as f64 / self.total as f64
        }
    }
}

#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(crate) fn count(n: u32) -> Self {
        Window::Count(CountWindow {
            slots: (0..n).map(|_| AtomicU8::new(0)).collect(),
            head: AtomicU64::new(0),
            total: AtomicI64::new(0),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        })
    }

    pub(crate) fn time(len: Duration, buckets: u32, epoch: Instant) -> Self {
        Window::Time(TimeWindow {
            bucket_nanos: u64::try_from((len.as_nanos() / u128::from(buckets)).max(1))
                .unwrap_or(u64::MAX),
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            epoch,
        })
    }

    /// Whether recording needs the current time.
    pub(crate) fn needs_clock(&self) -> bool {
        matches!(self, Window::Time(_))
    }

    pub(crate) fn record(&self, failed: bool, slow: bool, now: Option<Instant>) {
        let code = PRESENT | if failed { FAILED } else { 0 } | if slow { SLOW } else { 0 };
        match self {
            Window::Count(w) => w.record(code),
            Window::Time(w) => {
                if let Some(now) = now {
                    w.record(code, now)
                }
            }
        }
    }

    pub(crate) fn counts(&self, now: Option<Instant>) -> Counts {
        match self {
            Window::Count(w) => w.counts(),
            Window::Time(w) => now.map_or_else(Counts::default, |n| w.counts(n)),
        }
    }

    pub(crate) fn reset(&self) {
        match self {
            Window::Count(w) => w.reset(),
            Window::Time(w) => w.reset(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    head: AtomicU64,
    total: AtomicI64,
    failures: AtomicI64,
    slow: AtomicI64,
}

fn bit(code: u8, b: u8) -> i64 {
    i64::from(code & b != 0)
}

impl CountWindow {
    fn record(&self, code: u8) {
        let i = self.head.fetch_add(1, Ordering::Relaxed) % self.slots.len() as u64;
        let old = self.slots[i as usize].swap(code, Ordering::AcqRel);
        if old == code {
            return; // same outcome replaced: counts unchanged, no write
        }
        let d = |b| bit(code, b) - bit(old, b);
        if d(PRESENT) != 0 {
            self.total.fetch_add(d(PRESENT), Ordering::Relaxed);
        }
        if d(FAILED) != 0 {
            self.failures.fetch_add(d(FAILED), Ordering::Relaxed);
        }
        if d(SLOW) != 0 {
            self.slow.fetch_add(d(SLOW), Ordering::Relaxed);
        }
    }

    fn counts(&self) -> Counts {
        let total = self.total.load(Ordering::Relaxed).max(0) as u64;
        let clamp = |v: i64| (v.max(0) as u64).min(total);
        Counts {
            total,
            failures: clamp(self.failures.load(Ordering::Relaxed)),
            slow: clamp(self.slow.load(Ordering::Relaxed)),
        }
    }

    fn reset(&self) {
        for s in self.slots.iter() {
            s.store(0, Ordering::Relaxed);
        }
        self.head.store(0, Ordering::Relaxed);
        self.total.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.slow.store(0, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Bucket {
    /// Bucket number + 1 (0 = empty).
    stamp: AtomicU64,
    total: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct TimeWindow {
    bucket_nanos: u64,
    buckets: Box<[Bucket]>,
    epoch: Instant,
}

impl TimeWindow {
    fn bucket_no(&self, now: Instant) -> u64 {
        u64::try_from(
            now.saturating_duration_since(self.epoch).as_nanos() / u128::from(self.bucket_nanos),
        )
        .unwrap_or(u64::MAX)
    }

    fn record(&self, code: u8, now: Instant) {
        let no = self.bucket_no(now);
        let b = &self.buckets[(no % self.buckets.len() as u64) as usize];
        let stamp = no + 1;
        let old = b.stamp.load(Ordering::Acquire);
        if old != stamp
            && b.stamp
                .compare_exchange(old, stamp, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.total.store(0, Ordering::Relaxed);
            b.failures.store(0, Ordering::Relaxed);
            b.slow.store(0, Ordering::Relaxed);
        }
        b.total.fetch_add(1, Ordering::Relaxed);
        if code & FAILED != 0 {
            b.failures.fetch_add(1, Ordering::Relaxed);
        }
        if code & SLOW != 0 {
            b.slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counts(&self, now: Instant) -> Counts {
        let no = self.bucket_no(now);
        let oldest = (no + 1).saturating_sub(self.buckets.len() as u64);
        let mut c = Counts::default();
        for b in self.buckets.iter() {
            let stamp = b.stamp.load(Ordering::Acquire);
            if stamp == 0 || stamp - 1 < oldest || stamp - 1 > no {
                continue;
            }
            c.total += b.total.load(Ordering::Relaxed);
            c.failures += b.failures.load(Ordering::Relaxed);
            c.slow += b.slow.load(Ordering::Relaxed);
        }
        c.failures = c.failures.min(c.total);
        c.slow = c.slow.min(c.total);
        c
    }

    fn reset(&self) {
        for b in self.buckets.iter() {
            b.stamp.store(0, Ordering::Relaxed);
            b.total.store(0, Ordering::Relaxed);
            b.failures.store(0, Ordering::Relaxed);
            b.slow.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_keeps_the_last_n() {
        let w = Window::count(4);
        for f in [true, true, false, false] {
            w.record(f, false, None);
        }
        assert_eq!(
            w.counts(None),
            Counts {
                total: 4,
                failures: 2,
                slow: 0
            }
        );
        w.record(false, true, None); // replaces the 1st (failed)
        w.record(false, false, None); // replaces the 2nd (failed)
        assert_eq!(
            w.counts(None),
            Counts {
                total: 4,
                failures: 0,
                slow: 1
            }
        );
        w.reset();
        assert_eq!(w.counts(None), Counts::default());
    }

    #[tokio::test(start_paused = true)]
    async fn time_window_forgets_old_buckets() {
        let t0 = Instant::now();
        let w = Window::time(Duration::from_secs(10), 10, t0);
        w.record(true, false, Some(t0));
        tokio::time::advance(Duration::from_secs(5)).await;
        w.record(false, false, Some(Instant::now()));
        assert_eq!(
            w.counts(Some(Instant::now())),
            Counts {
                total: 2,
                failures: 1,
                slow: 0
            }
        );
        tokio::time::advance(Duration::from_secs(5)).await; // t = 10: the t=0 bucket left
        assert_eq!(
            w.counts(Some(Instant::now())),
            Counts {
                total: 1,
                failures: 0,
                slow: 0
            }
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(w.counts(Some(Instant::now())), Counts::default());
    }
}

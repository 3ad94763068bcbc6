//! Counts bumped by every call on every thread and read seldom (the quota's
//! call count, the retry budget's requests). One atomic for all cores would
//! move its cache line from core to core on every call (two threads on two
//! quota keys each paid 128 ns a call instead of 73 alone, where governor's
//! keyed check scales); each thread adds to a stripe of its own instead, and a
//! reader sums the stripes.
//!
//! A stripe belongs to one thread at a time (claimed at the thread's first
//! count, given back when it exits), so its owner adds with a plain load and
//! store — no locked read-modify-write, which was a tenth of a quota's hot-key
//! check. A thread that finds every stripe taken (more than [`STRIPES`]
//! counting threads alive at once) adds to a shared overflow count with an
//! atomic add. The hand-over is a release/acquire pair on the stripe's claim,
//! so the next owner continues from the last value: nothing is lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const STRIPES: usize = 16;

/// One stripe per 128 bytes (CPUs prefetch cache lines in pairs).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Stripe(AtomicU64);

/// A count many threads add to at once.
#[derive(Debug, Default)]
pub(crate) struct StripedCount {
    stripes: [Stripe; STRIPES],
    /// Counts of threads that own no stripe.
    overflow: Stripe,
}

impl StripedCount {
    /// Adds one; returns the new count of this thread's stripe (a per-thread
    /// tick for periodic work).
    #[inline]
    pub(crate) fn add_one(&self) -> u64 {
        match own_stripe() {
            Some(i) => {
                let s = &self.stripes[i].0;
                // Only this thread writes this stripe while it owns it.
                let n = s.load(Ordering::Relaxed).wrapping_add(1);
                s.store(n, Ordering::Relaxed);
                n
            }
            None => self
                .overflow
                .0
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1),
        }
    }

    /// The count, all stripes together.
    pub(crate) fn sum(&self) -> u64 {
        self.stripes
            .iter()
            .chain(std::iter::once(&self.overflow))
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// Which stripes a living thread owns.
static CLAIMED: [AtomicBool; STRIPES] = [const { AtomicBool::new(false) }; STRIPES];

/// No stripe: every one was taken when this thread first counted.
const NONE: usize = usize::MAX;
/// Not asked yet.
const UNCLAIMED: usize = usize::MAX - 1;

/// This thread's claim on a stripe, given back when the thread exits.
struct Claim(Cell<usize>);

impl Drop for Claim {
    fn drop(&mut self) {
        let i = self.0.get();
        if i < STRIPES {
            // Release: the next owner sees every count this thread stored.
            CLAIMED[i].store(false, Ordering::Release);
        }
    }
}

/// The stripe this thread owns, claimed at its first count; `None` when all
/// are owned by other threads (or this thread is exiting).
#[inline]
fn own_stripe() -> Option<usize> {
    thread_local! {
        static CLAIM: Claim = const { Claim(Cell::new(UNCLAIMED)) };
    }
    CLAIM
        .try_with(|c| match c.0.get() {
            UNCLAIMED => {
                let i = CLAIMED
                    .iter()
                    .position(|f| {
                        f.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                            .is_ok()
                    })
                    .unwrap_or(NONE);
                c.0.set(i);
                (i < STRIPES).then_some(i)
            }
            i => (i < STRIPES).then_some(i),
        })
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn threads_on_their_own_stripes_add_up_exactly() {
        let count = Arc::new(StripedCount::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let count = count.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        count.add_one();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(count.sum(), 80_000);
        // One thread's ticks count its own calls.
        let first = count.add_one();
        assert_eq!(count.add_one(), first + 1);
    }

    #[test]
    fn more_threads_than_stripes_and_threads_that_come_and_go_lose_nothing() {
        let count = Arc::new(StripedCount::default());
        // 40 at once: 16 own a stripe, the others share the overflow count.
        let wide: Vec<_> = (0..40)
            .map(|_| {
                let count = count.clone();
                std::thread::spawn(move || {
                    for _ in 0..5_000 {
                        count.add_one();
                    }
                })
            })
            .collect();
        for t in wide {
            t.join().unwrap();
        }
        assert_eq!(count.sum(), 200_000);
        // 200 short-lived threads, 4 at a time: stripes change hands.
        for _ in 0..50 {
            let wave: Vec<_> = (0..4)
                .map(|_| {
                    let count = count.clone();
                    std::thread::spawn(move || {
                        for _ in 0..1_000 {
                            count.add_one();
                        }
                    })
                })
                .collect();
            for t in wave {
                t.join().unwrap();
            }
        }
        assert_eq!(count.sum(), 400_000);
    }
}

//! A retry budget: retries may add at most `ratio` of the recent request rate,
//! plus a floor per second, so a fleet of clients cannot triple the load on an
//! upstream that is already failing.
//!
//! Why not tower's `TpsBudget`: it keeps deposits as integers scaled by
//! `1 / ratio`, so a small ratio truncates (tower#857) — 0.01 behaves like 0 or
//! like "unlimited" depending on traffic. Here the arithmetic is in `f64`.
//!
//! Cost: every request is one add on a counter stripe of its thread's own
//! (cores do not share it); the clock is read and the lock taken when a retry
//! asks to withdraw, and at one request in 64 of a thread (a sample of the
//! count, skipped if the lock is busy).
//!
//! How many requests the window holds is read from samples of the count:
//! exact between two samples, and between the newest sample before the
//! window and the first one in it, the requests are taken as spread evenly
//! over that span. The samples at a thread's 1st, 65th, 129th … request keep
//! that span short once traffic comes back after a quiet spell (without
//! them, 100 requests after a quiet 100 s read as 10 in a 10 s window; with
//! them, 100 if the thread's count sat at a sample, and at worst a thread's
//! requests since its last sample — at most 63 — may still be read as
//! spread over the quiet spell: 43.3 of those 100).

use crate::striped::StripedCount;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

const BUCKETS: usize = 10;

/// A thread samples the request count at its 1st request of every this many.
const SAMPLE_EVERY: u64 = 64;

/// A retry budget shared by every clone of a retry layer (and, if you pass the
/// same `Arc<RetryBudget>` to several layers, by all of them).
///
/// ```
/// use semaforo::retry::RetryBudget;
/// use std::time::Duration;
///
/// // Retries may add 20 % of the requests of the last 10 s, plus 1 per second.
/// let budget = RetryBudget::new(0.2, 1.0, Duration::from_secs(10))?;
/// # Ok::<(), semaforo::ConfigError>(())
/// ```
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor_per_sec: f64,
    window: Duration,
    requests: StripedCount,
    state: Mutex<State>,
    exhausted: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// `(when, requests counter then)`, oldest first; the first one anchors the window.
    samples: Vec<(Instant, u64)>,
    /// Retries per bucket: `(bucket number, count)`.
    retries: [(u64, u64); BUCKETS],
    epoch: Instant,
}

impl RetryBudget {
    /// `ratio` of the requests seen over `window` (e.g. 0.2 = 20 %), plus
    /// `floor_per_sec` retries per second, may be retried.
    pub fn new(
        ratio: f64,
        floor_per_sec: f64,
        window: Duration,
    ) -> Result<Self, crate::ConfigError> {
        let err =
            |field, reason: String| Err(crate::ConfigError::new("retry budget", field, reason));
        if !ratio.is_finite() || ratio < 0.0 {
            return err(
                "ratio",
                format!("must be a finite number >= 0, got {ratio}"),
            );
        }
        if !floor_per_sec.is_finite() || floor_per_sec < 0.0 {
            return err(
                "floor_per_sec",
                format!("must be a finite number >= 0, got {floor_per_sec}"),
            );
        }
        if window < Duration::from_millis(BUCKETS as u64) {
            return err(
                "window",
                format!(
                    "must be at least {BUCKETS} ms, got {}",
                    crate::time::Human(window)
                ),
            );
        }
        let now = Instant::now();
        Ok(RetryBudget {
            ratio,
            floor_per_sec,
            window,
            requests: StripedCount::default(),
            state: Mutex::new(State {
                samples: vec![(now, 0)],
                retries: [(0, 0); BUCKETS],
                epoch: now,
            }),
            exhausted: AtomicU64::new(0),
        })
    }

    /// Counts one original request (not a retry).
    #[inline]
    pub fn deposit(&self) {
        if self.requests.add_one() % SAMPLE_EVERY == 1 {
            self.sample();
        }
    }

    /// Samples the count as it was before the request that asks (skipped if
    /// another thread holds the lock: a sample is a hint, never waited for).
    #[cold]
    #[inline(never)]
    fn sample(&self) {
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let before = self.requests.sum().saturating_sub(1);
        self.record(&mut st, Instant::now(), before);
    }

    /// Forgets the samples no window ending `now` needs (all but the newest
    /// one at least `window` old: the anchor of the window's count).
    fn trim(&self, st: &mut State, now: Instant) {
        let horizon = now.checked_sub(self.window);
        let keep_from = st
            .samples
            .iter()
            .rposition(|(t, _)| horizon.is_none_or(|h| *t <= h))
            .unwrap_or(0);
        st.samples.drain(..keep_from);
    }

    /// [`trim`](Self::trim)s, and keeps `(now, count)` if the newest sample
    /// is a bucket old.
    fn record(&self, st: &mut State, now: Instant, count: u64) {
        self.trim(st, now);
        let bucket_len = self.window / BUCKETS as u32;
        if st
            .samples
            .last()
            .is_none_or(|(t, _)| now.saturating_duration_since(*t) >= bucket_len)
        {
            st.samples.push((now, count));
        }
    }

    /// Requests in the window ending `now` (see the module docs): exact
    /// after the first sample in it, spread evenly before that.
    fn recent(&self, st: &State, now: Instant, total: u64) -> f64 {
        let Some(&(t0, c0)) = st.samples.first() else {
            return total as f64;
        };
        let horizon = now.checked_sub(self.window);
        let after = total.saturating_sub(c0) as f64;
        let span = now.saturating_duration_since(t0);
        if span <= self.window {
            return after;
        }
        // The first sample in the window: what came after it is in it; of
        // what came between `t0` and it, the share of that span in the window.
        match (st.samples.get(1), horizon) {
            (Some(&(t1, c1)), Some(h)) if t1 > h => {
                let inside = total.saturating_sub(c1) as f64;
                let between = c1.saturating_sub(c0) as f64;
                let share = t1.saturating_duration_since(h).as_secs_f64()
                    / t1.saturating_duration_since(t0).as_secs_f64();
                inside + between * share
            }
            _ => after * self.window.as_secs_f64() / span.as_secs_f64(),
        }
    }

    /// Asks for one retry; `false` when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        let total = self.requests.sum();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let bucket_len = self.window / BUCKETS as u32;
        let bucket = (now.saturating_duration_since(st.epoch).as_nanos()
            / bucket_len.as_nanos().max(1)) as u64;
        // Samples before the window dropped first, then the estimate, then
        // this sample.
        self.trim(&mut st, now);
        let recent = self.recent(&st, now, total);
        self.record(&mut st, now, total);

        let oldest_bucket = (bucket + 1).saturating_sub(BUCKETS as u64);
        let spent: u64 = st
            .retries
            .iter()
            .filter(|(b, _)| *b >= oldest_bucket && *b <= bucket)
            .map(|(_, n)| n)
            .sum();
        let allowed = self.ratio * recent + self.floor_per_sec * self.window.as_secs_f64();
        if crate::num::exceeds((spent + 1) as f64, allowed) {
            drop(st);
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let slot = &mut st.retries[(bucket % BUCKETS as u64) as usize];
        if slot.0 != bucket {
            *slot = (bucket, 0);
        }
        slot.1 += 1;
        true
    }

    /// Retries refused so far because the budget was spent.
    pub fn exhausted(&self) -> u64 {
        self.exhausted.load(Ordering::Relaxed)
    }

    /// Original requests counted so far.
    pub fn requests(&self) -> u64 {
        self.requests.sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn small_ratios_are_not_truncated() {
        let b = RetryBudget::new(0.01, 0.0, Duration::from_secs(10)).unwrap();
        for _ in 0..1000 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 10, "1 % of 1,000");
        assert_eq!(b.exhausted(), 90);
    }

    #[tokio::test(start_paused = true)]
    async fn floor_allows_retries_at_low_traffic_and_the_window_slides() {
        let b = RetryBudget::new(0.2, 1.0, Duration::from_secs(10)).unwrap();
        b.deposit();
        let granted = (0..50).filter(|_| b.try_withdraw()).count();
        assert_eq!(
            granted, 10,
            "floor: 1/s over 10 s (0.2 of 1 request adds nothing whole)"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.try_withdraw(), "old retries left the window");
    }

    #[tokio::test(start_paused = true)]
    async fn old_requests_stop_counting() {
        let b = RetryBudget::new(0.5, 0.0, Duration::from_secs(10)).unwrap();
        for _ in 0..100 {
            b.deposit();
        }
        assert!(b.try_withdraw());
        tokio::time::advance(Duration::from_secs(100)).await;
        // 100 requests over 100 s → 10 in a 10 s window → 5 retries.
        let granted = (0..50).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 5);
    }

    /// The case an outside trial found: 100 requests after a quiet 100 s
    /// are 100 in the 10 s window (20 retries at 20 %), not 10.
    #[tokio::test(start_paused = true)]
    async fn requests_after_a_quiet_spell_count_whole() {
        let b = RetryBudget::new(0.2, 0.0, Duration::from_secs(10)).unwrap();
        tokio::time::advance(Duration::from_secs(100)).await;
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 20);
    }

    /// Samples stay a window's worth, however long nobody withdraws.
    #[tokio::test(start_paused = true)]
    async fn samples_stay_bounded_without_withdrawals() {
        let b = RetryBudget::new(0.2, 0.0, Duration::from_secs(10)).unwrap();
        for _ in 0..10_000 {
            for _ in 0..SAMPLE_EVERY {
                b.deposit();
            }
            tokio::time::advance(Duration::from_millis(50)).await;
        }
        let n = b.state.lock().unwrap().samples.len();
        assert!(n <= BUCKETS + 2, "{n} samples");
        // SAMPLE_EVERY requests every 50 ms: 200 × that in a 10 s window,
        // a fifth of it retries (give or take one block at the window's edge).
        let expected = (SAMPLE_EVERY * 200 / 5) as usize;
        let granted = (0..2 * expected).filter(|_| b.try_withdraw()).count();
        let slack = SAMPLE_EVERY as usize / 5 + 1;
        assert!(
            (expected - slack..=expected).contains(&granted),
            "{granted} of {expected}"
        );
    }

    #[test]
    fn bad_configuration() {
        assert!(RetryBudget::new(-0.1, 0.0, Duration::from_secs(1)).is_err());
        assert!(RetryBudget::new(0.1, f64::NAN, Duration::from_secs(1)).is_err());
        assert!(RetryBudget::new(0.1, 1.0, Duration::ZERO).is_err());
    }
}

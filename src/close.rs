//! Closing a waiting line: the one thing a shutdown asks of every layer that
//! holds callers in line (bulkhead, pacer, quota wait mode, the Redis
//! semaphore and budget). Shutdown knows this trait, not the layers.

#[cfg(feature = "redis")]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(feature = "redis")]
use std::time::Duration;

/// A layer's waiting line, closed by a [`Shutdown`](crate::shutdown::Shutdown)
/// at its trigger ([`Shutdown::watch`](crate::shutdown::Shutdown::watch)).
///
/// Implemented by [`Bulkhead`](crate::bulkhead::Bulkhead),
/// [`Pace`](crate::pace::Pace), [`Quota`](crate::quota::Quota) and (feature
/// `redis`) `redis::Semaphore` and `redis::Budget`. Implement it for a layer
/// of your own that makes callers wait, and a shutdown releases its line too.
pub trait Close: Send + Sync {
    /// Answers every caller waiting in line now with
    /// [`RejectKind::ShuttingDown`](crate::RejectKind::ShuttingDown), and lets
    /// no caller wait from now on; returns how many waiters it released.
    /// Idempotent: a second call releases nobody (and returns 0). Never blocks
    /// on a caller; never panics.
    fn close(&self) -> u64;
}

/// A closed flag that wakes the callers sleeping on it (for lines that wait by
/// sleeping rather than in a queue: the Redis semaphore and budget).
#[cfg(feature = "redis")]
#[derive(Debug, Default)]
pub(crate) struct Closing {
    closed: AtomicBool,
    sleeping: AtomicU64,
    notify: tokio::sync::Notify,
}

#[cfg(feature = "redis")]
impl Closing {
    /// Closes; returns how many callers were sleeping on it (0 if it was
    /// closed already).
    pub(crate) fn close(&self) -> u64 {
        if self.closed.swap(true, Ordering::AcqRel) {
            return 0;
        }
        self.notify.notify_waiters();
        self.sleeping.load(Ordering::Acquire)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sleeps `d`, or until closed: `true` when the time passed with the line
    /// still open. Cancel safe (a drop leaves nothing behind).
    pub(crate) async fn sleep(&self, d: Duration) -> bool {
        let mut notified = std::pin::pin!(self.notify.notified());
        // Registered before the flag is read: a close in between still wakes us.
        notified.as_mut().enable();
        if self.is_closed() {
            return false;
        }
        self.sleeping.fetch_add(1, Ordering::AcqRel);
        let _awake = Awake(&self.sleeping);
        let timed_out = tokio::time::timeout(d, notified).await.is_err();
        timed_out && !self.is_closed()
    }
}

/// Counts a sleeper out when its sleep ends or is dropped.
#[cfg(feature = "redis")]
struct Awake<'a>(&'a AtomicU64);

#[cfg(feature = "redis")]
impl Drop for Awake<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_close_wakes_every_sleeper_and_counts_them() {
        let c = Arc::new(Closing::default());
        let sleepers: Vec<_> = (0..3)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.sleep(Duration::from_secs(3600)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(c.close(), 3);
        assert_eq!(c.close(), 0, "idempotent");
        for s in sleepers {
            assert!(!s.await.unwrap(), "woken by the close, not the timer");
        }
        assert!(!c.sleep(Duration::from_secs(1)).await, "closed: no sleep");
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_line_sleeps_its_time() {
        let c = Closing::default();
        let t0 = tokio::time::Instant::now();
        assert!(c.sleep(Duration::from_secs(5)).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
    }
}

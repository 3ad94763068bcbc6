//! Wait mode: a call over its quota waits in its key's line, up to `max_wait`,
//! instead of failing at once.
//!
//! Each key with waiters has a FIFO line; only the call at the front checks the
//! key's cell (sleeping until the cell says its cost fits), so later calls of the
//! same key cannot overtake it. A call that arrives while its key has a line
//! joins the back even if a token is free this instant: the front was promised
//! that token. Keys without waiters never touch the lines (one atomic load).

use super::service::{Refusal, Units};
use super::{PlanId, Shared};
use crate::error::Rejected;
use crate::hashing::HashMap;
use crate::observe::EventKind;
use std::collections::VecDeque;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Waker;
use std::time::Duration;

/// One waiting call.
#[derive(Debug)]
struct Entry {
    id: u64,
    cost: u32,
    /// Its key's units are taken already ([`Refusal::Paid`]): at the front
    /// it takes from the global limit alone.
    paid: bool,
    waker: Option<Waker>,
}

#[derive(Debug)]
struct Inner<K> {
    next_id: u64,
    lines: HashMap<K, VecDeque<Entry>>,
    /// Closed by a shutdown: nobody waits any more.
    closed: bool,
}

/// The lines of every key with waiters.
#[derive(Debug)]
pub(crate) struct Lines<K> {
    /// Waiting calls, all keys: 0 lets a call skip the lock.
    waiting: AtomicUsize,
    inner: Mutex<Inner<K>>,
}

/// Where a call stands after [`Lines::poll_front`].
pub(crate) enum Turn {
    /// Admitted: it left the line.
    Admitted,
    /// At the front, its cost fits in this long (`true`: held by the global limit).
    Sleep(Duration, bool),
    /// Behind others; woken when it reaches the front.
    Behind,
    /// Refused (it left the line).
    Refused(Rejected),
}

impl<K: Hash + Eq + Clone> Lines<K> {
    pub(crate) fn new() -> Self {
        Lines {
            waiting: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                next_id: 0,
                lines: HashMap::default(),
                closed: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        // Every critical section leaves the map consistent, so a poisoned lock
        // (a panic in a user's `Waker`) is safe to keep using.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls waiting now, all keys.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Admits `cost` at once, or puts the call in `key`'s line if its wait fits
    /// `max_wait` (`Ok(Some(id))`), or refuses.
    pub(crate) fn admit_or_join(
        &self,
        shared: &Shared<K>,
        key: &K,
        plan: PlanId,
        cost: u32,
        max_wait: Duration,
    ) -> Result<Option<u64>, Rejected> {
        // Free: admitted without a check, line or not.
        if cost == 0 {
            return Ok(None);
        }
        // A cost no wait makes fit is refused at once, line or not.
        shared.fits_ever(plan, cost).map_err(|never| match never {
            Refusal::Never(r) => r,
            Refusal::Wait(wait, global) => shared.refusal(plan, global, wait, ""),
            Refusal::Paid(wait) => shared.refusal(plan, true, wait, ""),
        })?;
        // A call whose key's units were taken before the global limit
        // refused it ([`Refusal::Paid`]) is never charged on its key again.
        let mut paid = false;
        if self.waiting.load(Ordering::Acquire) == 0 {
            match shared.check(key, plan, cost) {
                Ok(()) => return Ok(None),
                Err(Refusal::Never(never)) => return Err(never),
                Err(Refusal::Wait(..)) => {}
                Err(Refusal::Paid(_)) => paid = true,
            }
        }
        let mut inner = self.lock();
        let check = || shared.check_paid(key, plan, cost, paid);
        if inner.closed {
            // Nobody waits any more; a call within its quota still passes.
            return match check() {
                Ok(()) => Ok(None),
                Err(Refusal::Never(never)) => Err(never),
                Err(Refusal::Wait(..) | Refusal::Paid(_)) => Err(shutting_down(shared)),
            };
        }
        let ahead = match inner.lines.get(key) {
            Some(line) if !line.is_empty() => line
                .iter()
                .fold(Units::default(), |n, e| n.and(e.cost, e.paid)),
            _ => {
                // No line for this key: check again under the lock (a line may
                // just have emptied).
                let (wait, global) = match check() {
                    Ok(()) => return Ok(None),
                    Err(Refusal::Never(never)) => return Err(never),
                    Err(Refusal::Wait(wait, global)) => (wait, global),
                    Err(Refusal::Paid(wait)) => {
                        paid = true;
                        (wait, true)
                    }
                };
                if wait > max_wait {
                    return Err(shared.refusal(
                        plan,
                        global,
                        wait,
                        "waiting would exceed max_wait",
                    ));
                }
                Units::default()
            }
        };
        if ahead != Units::default() {
            // Those ahead take their cost first: ours fits once all of it
            // does (the key's cell and the global one, from their state now).
            let estimate = shared.wait_for(key, plan, ahead.and(cost, paid));
            if estimate > max_wait {
                return Err(shared.refusal(plan, false, estimate, "waiting would exceed max_wait"));
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let line = inner.lines.entry(key.clone()).or_default();
        let position = line.len();
        line.push_back(Entry {
            id,
            cost,
            paid,
            waker: None,
        });
        self.waiting.fetch_add(1, Ordering::AcqRel);
        drop(inner);
        shared.obs.emit("quota", EventKind::Queued { position });
        Ok(Some(id))
    }

    /// The call `id` of `key`'s line: if it is at the front, checks the limiter.
    pub(crate) fn poll_front(
        &self,
        shared: &Shared<K>,
        key: &K,
        plan: PlanId,
        id: u64,
        waker: &Waker,
    ) -> Turn {
        let mut inner = self.lock();
        if inner.closed {
            self.remove(&mut inner, key, id);
            return Turn::Refused(shutting_down(shared));
        }
        let Some(line) = inner.lines.get_mut(key) else {
            return Turn::Refused(shared.refusal(plan, false, Duration::ZERO, "left the line"));
        };
        let at_front = line.front().is_some_and(|front| front.id == id);
        // Every waiter leaves its waker (the front one too: a close wakes it
        // from its sleep).
        if let Some(e) = line.iter_mut().find(|e| e.id == id) {
            match &e.waker {
                Some(w) if w.will_wake(waker) => {}
                _ => e.waker = Some(waker.clone()),
            }
        }
        if !at_front {
            return Turn::Behind;
        }
        let (cost, paid) = line.front().map_or((0, false), |e| (e.cost, e.paid));
        match shared.check_paid(key, plan, cost, paid) {
            Ok(()) => {
                self.remove(&mut inner, key, id);
                Turn::Admitted
            }
            Err(Refusal::Wait(wait, global)) => Turn::Sleep(wait, global),
            Err(Refusal::Paid(wait)) => {
                if let Some(front) = line.front_mut() {
                    front.paid = true;
                }
                Turn::Sleep(wait, true)
            }
            Err(Refusal::Never(never)) => {
                self.remove(&mut inner, key, id);
                Turn::Refused(never)
            }
        }
    }

    /// Closes every line: each waiter is woken and refused `ShuttingDown`,
    /// and no call waits from now on. Returns how many were waiting (0 when
    /// closed already).
    pub(crate) fn close(&self) -> u64 {
        let mut inner = self.lock();
        if inner.closed {
            return 0;
        }
        inner.closed = true;
        let wakers: Vec<Waker> = inner
            .lines
            .values_mut()
            .flat_map(|line| line.iter_mut().filter_map(|e| e.waker.take()))
            .collect();
        let waiting = inner.lines.values().map(|l| l.len() as u64).sum();
        drop(inner);
        // Woken outside the lock: a waker may run the task inline.
        for w in wakers {
            w.wake();
        }
        waiting
    }

    /// Takes the call `id` out of `key`'s line (admitted, timed out or dropped)
    /// and wakes the new front.
    /// Takes the call `id` out of `key`'s line when its `max_wait` ran out
    /// behind others, answering how long it would still have waited: until
    /// the costs ahead of it and its own all fit, from the cells' state now
    /// (the estimate a call arriving behind them gets). `None`: it was not
    /// in the line.
    pub(crate) fn leave_behind(
        &self,
        shared: &Shared<K>,
        key: &K,
        plan: PlanId,
        id: u64,
    ) -> Option<Duration> {
        let mut inner = self.lock();
        let units = inner.lines.get(key).and_then(|line| {
            let at = line.iter().position(|e| e.id == id)?;
            Some(
                line.iter()
                    .take(at.saturating_add(1))
                    .fold(Units::default(), |n, e| n.and(e.cost, e.paid)),
            )
        });
        self.remove(&mut inner, key, id);
        drop(inner);
        units.map(|n| shared.wait_for(key, plan, n))
    }

    pub(crate) fn leave(&self, key: &K, id: u64) {
        let mut inner = self.lock();
        self.remove(&mut inner, key, id);
    }

    fn remove(&self, inner: &mut Inner<K>, key: &K, id: u64) {
        let Some(line) = inner.lines.get_mut(key) else {
            return;
        };
        let Some(at) = line.iter().position(|e| e.id == id) else {
            return;
        };
        line.remove(at);
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        if at == 0 {
            if let Some(w) = line.front_mut().and_then(|e| e.waker.take()) {
                w.wake();
            }
        }
        if line.is_empty() {
            inner.lines.remove(key);
        }
    }
}

/// The refusal of a call that would wait in a closed line.
fn shutting_down<K: Hash + Eq + Clone>(shared: &Shared<K>) -> Rejected {
    shared
        .rejected
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Rejected::new("quota", crate::RejectKind::ShuttingDown)
        .with_name_opt(shared.obs.name.as_ref())
        .with_detail("the quota's lines are closed")
}

#[cfg(test)]
mod tests {
    //! A waiter refused at its `max_wait` while still behind another (its
    //! deadline's timer and the front's wake-up at one instant, or the
    //! front's task late on a loaded runtime) is told how long it would
    //! still have waited — the estimate a call arriving behind the same
    //! line gets — not one unit's refill, as before.
    use super::*;
    use crate::quota::{Quota, Rate};

    #[tokio::test(start_paused = true)]
    async fn a_waiter_left_behind_is_told_its_wait_for_everything_ahead_and_its_own() {
        // The global limit: one unit a second, a burst of 2; the plan is wide.
        let quota: Quota<u32> = Quota::builder()
            .plan("p", Rate::per_second(1_000).burst(1_000))
            .global(Rate::per_second(1).burst(2))
            .max_wait(Duration::from_secs(10))
            .build()
            .unwrap();
        let p = quota.plan_id("p").unwrap();
        let shared = &quota.shared;
        let max_wait = Duration::from_secs(10);
        // The burst taken; then a call of 2 units at the front, one of 1
        // behind it.
        assert!(shared.check(&1, p, 2).is_ok());
        let front = shared
            .lines
            .admit_or_join(shared, &1, p, 2, max_wait)
            .unwrap();
        let behind = shared
            .lines
            .admit_or_join(shared, &1, p, 1, max_wait)
            .unwrap();
        let (Some(front), Some(behind)) = (front, behind) else {
            panic!("both wait: {front:?} {behind:?}");
        };
        assert_eq!(shared.lines.waiting.load(Ordering::Acquire), 2);
        // 1.5 s later: the front goes at 2 s (its 2 units), the other at 3 s
        // (its unit): 1.5 s from now, not one unit's 1 s.
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(
            shared.lines.leave_behind(shared, &1, p, behind),
            Some(Duration::from_millis(1_500))
        );
        assert_eq!(shared.lines.waiting.load(Ordering::Acquire), 1);
        // Gone already: nothing to tell; the front stays.
        assert_eq!(shared.lines.leave_behind(shared, &1, p, behind), None);
        assert_eq!(shared.lines.waiting.load(Ordering::Acquire), 1);
        // The front alone: its own 2 units, at 2 s.
        assert_eq!(
            shared.lines.leave_behind(shared, &1, p, front),
            Some(Duration::from_millis(500))
        );
        assert_eq!(shared.lines.waiting.load(Ordering::Acquire), 0);
    }

    /// A key's plan refilling a unit in 6 s under a global limit of one a
    /// second, burst 1; wait mode.
    fn racing() -> (Quota<u32>, PlanId) {
        let quota: Quota<u32> = Quota::builder()
            .plan("p", Rate::per_minute(10).burst(10))
            .global(Rate::per_second(1).burst(1))
            .max_wait(Duration::from_secs(10))
            .build()
            .unwrap();
        let p = quota.plan_id("p").unwrap();
        (quota, p)
    }

    /// The next check of this thread loses the global race: key 2 takes the
    /// global unit between its look and its take.
    fn key_2_takes_the_global_unit_next(quota: &Quota<u32>, p: PlanId) {
        let other = quota.shared.clone();
        super::super::service::BETWEEN_LOOK_AND_TAKE.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                assert!(other.check(&2, p, 1).is_ok(), "key 2 takes the global unit");
            }))
        });
    }

    /// Units of `key`'s plan (the first one) free at `now`: the largest
    /// count its cell would take, looked at (taking nothing).
    fn key_room(quota: &Quota<u32>, key: u32) -> u32 {
        let cells = &quota.shared.plans[0].cells;
        let now = tokio::time::Instant::now();
        let held = cells.cell(&key);
        (0..=1_000u32)
            .take_while(|&n| n == 0 || cells.look(held.as_ref(), n, now).is_ok())
            .last()
            .unwrap_or(0)
    }

    /// The race the quota's module docs describe: another call takes the
    /// global room between a call's look at the global limit and its take,
    /// after its key's units were taken. In wait mode the call then waits
    /// for the global limit alone: admitted a second later (its key's plan
    /// refills a unit in 6 s), its key has paid for it once — 9 of 10 units
    /// left, not 8 (before, it was charged again at its admission).
    #[tokio::test(start_paused = true)]
    async fn a_call_that_lost_the_global_race_is_charged_on_its_key_once() {
        let (quota, p) = racing();
        let shared = quota.shared.clone();
        key_2_takes_the_global_unit_next(&quota, p);
        let id = shared
            .lines
            .admit_or_join(&shared, &1, p, 1, Duration::from_secs(10))
            .unwrap()
            .expect("waits for the global limit");
        assert_eq!(key_room(&quota, 1), 9, "key 1 paid once");
        let waker = futures::task::noop_waker();
        assert!(matches!(
            shared.lines.poll_front(&shared, &1, p, id, &waker),
            Turn::Sleep(_, true)
        ));
        assert_eq!(
            key_room(&quota, 1),
            9,
            "a refused front is not charged again"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            shared.lines.poll_front(&shared, &1, p, id, &waker),
            Turn::Admitted
        ));
        assert_eq!(key_room(&quota, 1), 9, "admitted: still charged once");
        assert!(shared.check(&3, p, 1).is_err(), "the global unit is taken");
        assert_eq!(shared.lines.waiting(), 0);
    }

    /// The same race met by the front of a line at a later turn: marked
    /// paid, it is admitted by the global limit alone.
    #[tokio::test(start_paused = true)]
    async fn a_front_that_lost_the_global_race_is_charged_on_its_key_once() {
        let (quota, p) = racing();
        let shared = quota.shared.clone();
        assert!(shared.check(&3, p, 1).is_ok(), "the global unit taken");
        let id = shared
            .lines
            .admit_or_join(&shared, &1, p, 1, Duration::from_secs(10))
            .unwrap()
            .expect("waits for the global limit");
        assert_eq!(
            key_room(&quota, 1),
            10,
            "refused by the look: nothing taken"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        key_2_takes_the_global_unit_next(&quota, p);
        let waker = futures::task::noop_waker();
        assert!(matches!(
            shared.lines.poll_front(&shared, &1, p, id, &waker),
            Turn::Sleep(_, true)
        ));
        assert_eq!(key_room(&quota, 1), 9);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            shared.lines.poll_front(&shared, &1, p, id, &waker),
            Turn::Admitted
        ));
        assert_eq!(key_room(&quota, 1), 9, "admitted: charged once");
    }

    /// A paid call ahead in its key's line counts for the global limit, not
    /// again for the key: a newcomer behind it is told the global limit's
    /// 2 s (its key has the unit it needs now), not the 6 s the key would
    /// take to fit both calls' units — which would have refused it at a
    /// `max_wait` of 3 s.
    #[tokio::test(start_paused = true)]
    async fn a_paid_call_ahead_counts_for_the_global_limit_only() {
        let quota: Quota<u32> = Quota::builder()
            .plan("p", Rate::per_minute(10).burst(2))
            .global(Rate::per_second(1).burst(2))
            .max_wait(Duration::from_secs(3))
            .build()
            .unwrap();
        let p = quota.plan_id("p").unwrap();
        let shared = quota.shared.clone();
        let max_wait = Duration::from_secs(3);
        assert!(shared.check(&3, p, 1).is_ok(), "one global unit left");
        key_2_takes_the_global_unit_next(&quota, p);
        let paid = shared.lines.admit_or_join(&shared, &1, p, 1, max_wait);
        assert!(
            matches!(paid, Ok(Some(_))),
            "paid, waits for the global limit"
        );
        assert_eq!(key_room(&quota, 1), 1);
        let behind = shared
            .lines
            .admit_or_join(&shared, &1, p, 1, max_wait)
            .expect("its wait is the global limit's 2 s")
            .expect("behind the paid call");
        assert_eq!(
            shared.lines.leave_behind(&shared, &1, p, behind),
            Some(Duration::from_secs(2))
        );
    }
}

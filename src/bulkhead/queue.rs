//! The shared state of one bulkhead: permits, the waiting line, partitions.
//!
//! **Fast path.** One `AtomicU64` packs `in_flight` (bits 0–31), the number of
//! *eligible* waiters (bits 32–62) and a `closed` flag (bit 63). A call with no
//! partition key is admitted by one compare-and-swap when nobody waits and a
//! permit is free; its release is one `fetch_sub` that takes the lock only if
//! someone waits. No allocation, no lock, no clock read.
//!
//! **Slow path.** Everything else happens under one `Mutex<Queue>`: the waiting
//! line (an [`OrderTree`] keyed by `(rank, seq)`), per-partition counters and
//! parked waiters, waiter slots. The waiter bits of the atomic change only under
//! that lock, so a release that sees "no waiters" can never miss one: a caller
//! that enqueues registers itself with a CAS on the same word.

use super::order::OrderTree;
use super::permit::BulkheadPermit;
use super::waiter::Waiter;

use crate::error::{RejectKind, Rejected};
use crate::observe::{EventKind, Observer};
use slab::Slab;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

pub(super) const IN_FLIGHT_MASK: u64 = 0xFFFF_FFFF;
pub(super) const WAITER: u64 = 1 << 32;
pub(super) const WAITERS_MASK: u64 = 0x7FFF_FFFF << 32;
pub(super) const CLOSED: u64 = 1 << 63;

/// The furthest position an ETA from a source is simulated for (further
/// back, the bulkhead's own estimate): a look costs O(position).
pub(super) const ETA_STEPS: u32 = 10_000;

/// The largest `max_concurrent` / `max_queue` the packed state word can count.
pub(crate) const MAX_COUNT: u32 = 0x7FFF_FFFF;

#[inline]
pub(super) fn in_flight(s: u64) -> u32 {
    (s & IN_FLIGHT_MASK) as u32
}

#[inline]
pub(super) fn waiters(s: u64) -> u32 {
    ((s & WAITERS_MASK) >> 32) as u32
}

/// Sort key of a waiter: `(rank, seq, slot)`. Lower rank is served first; `seq`
/// keeps FIFO order among equal ranks; `slot` finds the waiter.
pub(super) type LineKey = (i128, u64, u32);

#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) obs: Observer,
    pub(crate) max_queue: u32,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) aging: Option<Duration>,
    pub(crate) max_per_key: Option<u32>,
    pub(crate) expected_service: Option<Duration>,
    /// Guaranteed minimum shares of the limit per priority class.
    pub(crate) shares: Box<[Share]>,
}

/// The most `min_share` classes one bulkhead takes.
pub(crate) const MAX_CLASSES: usize = 16;

/// A priority class (`lo ..= hi`) and its guaranteed share of the limit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Share {
    pub(crate) lo: i64,
    pub(crate) hi: i64,
    pub(crate) share: f64,
}

impl Share {
    pub(crate) fn validate(shares: &[Share]) -> Result<(), crate::ConfigError> {
        let err = |reason: String| Err(crate::ConfigError::new("bulkhead", "min_share", reason));
        if shares.len() > MAX_CLASSES {
            return err(format!(
                "at most {MAX_CLASSES} classes, got {}",
                shares.len()
            ));
        }
        let mut total = 0.0;
        for (i, c) in shares.iter().enumerate() {
            if c.lo > c.hi {
                return err(format!("class {i}: the priority range is empty"));
            }
            if !(c.share > 0.0 && c.share <= 1.0) {
                return err(format!(
                    "class {i}: the share must be in (0, 1], got {}",
                    c.share
                ));
            }
            total += c.share;
            if let Some(j) = shares[..i]
                .iter()
                .position(|d| c.lo <= d.hi && d.lo <= c.hi)
            {
                return err(format!(
                    "classes {j} and {i} overlap ({}..={} and {}..={})",
                    shares[j].lo, shares[j].hi, c.lo, c.hi
                ));
            }
        }
        if total > 1.0 + 1e-9 {
            return err(format!("the shares add up to {total}, above 1"));
        }
        Ok(())
    }

    /// Permits this class is guaranteed under `limit`: `⌊share × limit⌋`,
    /// at least 1 (0 when the limit is 0).
    #[inline]
    fn guaranteed(&self, limit: u32) -> u32 {
        if limit == 0 {
            return 0;
        }
        // share ∈ (0, 1]: the product is in [0, limit], the cast saturates.
        (crate::num::floor_of(self.share, f64::from(limit)) as u32).clamp(1, limit)
    }
}

/// Whose a permit is: its partition and `min_share` class (counted while
/// it is held).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) partition: Option<u64>,
    pub(crate) class: Option<u8>,
}

impl Holder {
    #[inline]
    pub(crate) fn is_plain(self) -> bool {
        self.partition.is_none() && self.class.is_none()
    }
}

impl Queue {
    /// Puts `key` in the line (and in its class's line).
    fn enter_line(&mut self, key: LineKey) {
        self.line.insert(key);
        if let Some(c) = self.slots.get(key.2 as usize).and_then(|s| s.class) {
            if let Some(cl) = self.classes.get_mut(usize::from(c)) {
                cl.line.insert(key);
            }
        }
    }

    /// Takes `key` out of the line (and out of its class's line).
    fn exit_line(&mut self, key: &LineKey) {
        self.line.remove(key);
        if let Some(c) = self.slots.get(key.2 as usize).and_then(|s| s.class) {
            if let Some(cl) = self.classes.get_mut(usize::from(c)) {
                cl.line.remove(key);
            }
        }
    }

    /// Counts a permit granted to `class`.
    #[inline]
    fn class_took(&mut self, class: Option<u8>) {
        if let Some(cl) = class.and_then(|c| self.classes.get_mut(usize::from(c))) {
            cl.in_flight += 1;
        }
    }

    /// Counts a permit `class` gave back.
    #[inline]
    fn class_gave(&mut self, class: Option<u8>) {
        if let Some(cl) = class.and_then(|c| self.classes.get_mut(usize::from(c))) {
            cl.in_flight = cl.in_flight.saturating_sub(1);
        }
    }
}

/// One `min_share` class's permits and waiters in the line.
#[derive(Debug, Default)]
pub(super) struct ClassLine {
    pub(super) in_flight: u32,
    pub(super) line: std::collections::BTreeSet<LineKey>,
}

#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) queue_full: AtomicU64,
    pub(super) queue_timeout: AtomicU64,
    pub(super) shutting_down: AtomicU64,
    pub(super) shed: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotState {
    /// In line or parked. A granted waiter has no slot any more: its grant
    /// is in its [`Node`].
    Waiting,
    Rejected(RejectKind),
    /// Shed from a line that shrank with an adaptive limit (`QueueFull`).
    Shed,
}

/// An adaptive limit's controller and sampling.
#[derive(Debug)]
pub(crate) struct Adaptive {
    pub(crate) ctrl: Mutex<super::adaptive::Controller>,
    /// One call in `every` is a sample.
    pub(crate) every: u32,
    /// The builder's `max_concurrent`, which `max_queue` was sized for:
    /// the line holds `max_queue × nominal / max` (never above
    /// `max_queue`, also when `set_max_concurrent` raised the ceiling).
    pub(crate) max: u32,
    /// The limit outside a probe: a probe pins the limit low for a moment
    /// and must not shrink the line.
    pub(crate) nominal: AtomicU32,
    /// Limit changes, queued under the controller's lock and told in its
    /// order outside every lock (see [`InOrder`](crate::observe::InOrder)):
    /// a listener sees each change's `from` equal to the `to` before it,
    /// and the last `to` it sees is the limit in force.
    pub(crate) untold: crate::observe::InOrder<(u32, u32, crate::observe::LimitReason)>,
}

std::thread_local! {
    /// Calls seen on this thread, for 1-in-N sampling without a shared
    /// counter.
    static TICK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) seq: u64,
    pub(super) rank: i128,
    pub(super) partition: Option<u64>,
    /// Its `min_share` class.
    pub(super) class: Option<u8>,
    /// In the global line (eligible) rather than parked behind its partition's cap.
    pub(super) promoted: bool,
    pub(super) state: SlotState,
    /// What the waiter reads without the lock.
    pub(super) node: Arc<Node>,
}

/// A waiter's grant, shared with the line: the waiter learns it was granted
/// and takes its permit without the line's lock (the lock is what queued
/// callers contend on). Every other state change is read under the lock.
#[derive(Debug, Default)]
pub(crate) struct Node {
    /// `NODE_*`: written under the lock, except `NODE_PICKED` (by the
    /// waiter, once granted).
    pub(super) state: std::sync::atomic::AtomicU8,
    pub(super) waker: atomic_waker::AtomicWaker,
}

/// In line or parked.
pub(super) const NODE_WAITING: u8 = 0;
/// Granted a permit, not picked up yet: its slot is gone from the line's
/// slab (the waiter holds what it needs: its `Holder`).
pub(super) const NODE_GRANTED: u8 = 1;
/// The waiter took its permit.
pub(super) const NODE_PICKED: u8 = 2;
/// Rejected or shed: the waiter reads why under the lock.
pub(super) const NODE_SETTLED: u8 = 3;

impl Node {
    /// Sets the state (under the lock) and wakes the waiter.
    #[inline]
    pub(super) fn settle(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.waker.wake();
    }
}

#[derive(Debug, Default)]
pub(super) struct Partition {
    pub(super) in_flight: u32,
    pub(super) promoted: u32,
    pub(super) parked: BTreeMap<(i128, u64), u32>,
}

impl Partition {
    pub(super) fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.promoted == 0 && self.parked.is_empty()
    }
}

#[derive(Debug)]
pub(super) struct Queue {
    pub(super) slots: Slab<Slot>,
    pub(super) line: OrderTree<LineKey>,
    /// The `min_share` classes (empty without any).
    pub(super) classes: Vec<ClassLine>,
    pub(super) partitions: HashMap<u64, Partition>,
    pub(super) parked_total: u32,
    pub(super) next_seq: u64,
    /// Smoothed duration of calls admitted from the line (seconds).
    pub(super) service_ewma: Option<f64>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(super) state: OwnLine,
    pub(super) limit: AtomicU32,
    pub(super) queue: Mutex<Queue>,
    pub(super) stats: Stats,
    pub(crate) cfg: Config,
    pub(crate) hasher: RandomState,
    pub(super) epoch: Instant,
    /// What decides when admitted calls really start (the preset's pacer).
    pub(super) eta_source: std::sync::RwLock<Option<Arc<dyn crate::eta::EtaSource>>>,
    /// The controller of an adaptive limit.
    pub(crate) adaptive: Option<Adaptive>,
}

/// The permit count on a cache line of its own (128 bytes: CPUs prefetch
/// lines in pairs): every call changes it, and the `Arc`'s counts and the
/// configuration every call reads stay off the line the cores pass around.
#[repr(align(128))]
#[derive(Debug)]
pub(super) struct OwnLine(AtomicU64);

impl std::ops::Deref for OwnLine {
    type Target = AtomicU64;
    #[inline]
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

/// What `acquire` decided.
pub(crate) enum Acquire {
    Admitted(BulkheadPermit),
    Queued(Waiter),
    Rejected(Rejected),
}

impl Shared {
    pub(crate) fn new(cfg: Config, limit: u32) -> Self {
        let classes = cfg.shares.iter().map(|_| ClassLine::default()).collect();
        Shared {
            state: OwnLine(AtomicU64::new(0)),
            limit: AtomicU32::new(limit),
            queue: Mutex::new(Queue {
                slots: Slab::new(),
                line: OrderTree::new(),
                classes,
                partitions: HashMap::new(),
                parked_total: 0,
                next_seq: 0,
                service_ewma: None,
            }),
            stats: Stats::default(),
            cfg,
            hasher: RandomState::new(),
            epoch: Instant::now(),
            eta_source: std::sync::RwLock::new(None),
            adaptive: None,
        }
    }

    /// When a call admitted now starts, if it is a sample of an adaptive
    /// limit (1 in `every`, counted per thread).
    #[inline]
    pub(crate) fn sampling(&self) -> Option<Instant> {
        let a = self.adaptive.as_ref()?;
        // While a probe pins the limit (it differs from the nominal one),
        // every call is a sample: the probe ends sooner.
        let take = a.every <= 1
            || self.limit() != a.nominal.load(Ordering::Relaxed)
            || TICK.with(|t| {
                let n = t.get().wrapping_add(1);
                t.set(n);
                n % a.every == 0
            });
        take.then(Instant::now)
    }

    /// A sampled call ended: its latency and class go to the controller,
    /// which may move the limit.
    #[cold]
    pub(crate) fn sample(&self, started: Instant, class: Option<&crate::classify::Class>) {
        use crate::classify::Class;
        let Some(a) = &self.adaptive else { return };
        // Throttled, Permanent and our own refusals are not samples.
        let dropped = match class {
            None => return,
            Some(Class::Success) => false,
            Some(Class::Overloaded { .. } | Class::Transient | Class::Infrastructure) => true,
            Some(_) => return,
        };
        let now = Instant::now();
        let sample = super::adaptive::Sample {
            rtt: now.saturating_duration_since(started),
            dropped,
            // The sampled call still holds its permit: it is counted.
            in_flight: in_flight(self.state.load(Ordering::Relaxed)),
            at: now,
        };
        // The limit is set under the controller's lock, so two samples
        // ending together set it in the controller's order (and each event's
        // `from` is the limit the one before set); the line follows after.
        let changed = {
            let mut c = a.ctrl.lock().unwrap_or_else(|e| e.into_inner());
            let from = self.limit();
            let to = c.sample(sample, a.every);
            a.nominal.store(c.nominal(), Ordering::Relaxed);
            self.store_limit(to);
            if from != to {
                a.untold.push((from, to, c.reason()));
            }
            from != to
        };
        if changed {
            self.apply_limit();
            self.tell_changes(a);
        }
    }

    /// Tells the queued limit changes, in order.
    #[cold]
    fn tell_changes(&self, a: &Adaptive) {
        a.untold.tell(|(from, to, reason)| {
            self.cfg.obs.emit(
                "bulkhead",
                EventKind::LimitChanged {
                    from: u64::from(from),
                    to: u64::from(to),
                    reason,
                },
            );
        });
    }

    fn store_limit(&self, limit: u32) {
        self.limit.store(limit.min(MAX_COUNT), Ordering::Relaxed);
    }

    /// Follows the limit set: under an adaptive one, sheds the line's
    /// lowest-ranked waiters beyond its bound (which follows the nominal
    /// limit: it falls with it even while a probe pins the limit), and
    /// admits whom the limit lets in.
    fn apply_limit(&self) {
        let mut q = self.lock();
        let bound = self.line_bound();
        while q.line.len() as u32 + q.parked_total > bound {
            if !self.shed_last(&mut q) {
                break;
            }
        }
        self.dispatch(&mut q);
    }

    /// How many may wait: `max_queue`, or under an adaptive limit
    /// `max_queue × nominal limit / max` (never above `max_queue`).
    #[inline]
    pub(super) fn line_bound(&self) -> u32 {
        match &self.adaptive {
            None => self.cfg.max_queue,
            Some(a) => {
                Self::queue_bound(self.cfg.max_queue, a.nominal.load(Ordering::Relaxed), a.max)
            }
        }
    }

    /// `max_queue × limit / max`, at most `max_queue`.
    #[inline]
    fn queue_bound(max_queue: u32, limit: u32, max: u32) -> u32 {
        let b = u64::from(max_queue) * u64::from(limit) / u64::from(max.max(1));
        u32::try_from(b.min(u64::from(max_queue))).unwrap_or(max_queue)
    }

    /// The lowest-ranked waiter, in the line or parked behind its
    /// partition's cap: `(rank, seq, parked in)`.
    fn worst(q: &Queue) -> Option<(i128, u64, Option<u64>)> {
        let in_line = q.line.last().map(|(r, s, _)| (r, s, None));
        let parked = q
            .partitions
            .iter()
            .filter_map(|(k, p)| {
                p.parked
                    .last_key_value()
                    .map(|(&(r, s), _)| (r, s, Some(*k)))
            })
            .max_by_key(|&(r, s, _)| (r, s));
        match (in_line, parked) {
            (Some(a), Some(b)) => Some(if (b.0, b.1) > (a.0, a.1) { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Refuses the lowest-ranked waiter — in the line or parked behind its
    /// partition's cap: `false` when nobody waits.
    /// Counted as `QueueFull` and as shed.
    pub(super) fn shed_last(&self, q: &mut Queue) -> bool {
        let Some((rank, seq, parked_in)) = Self::worst(q) else {
            return false;
        };
        match parked_in {
            Some(k) => {
                let Some(p) = q.partitions.get_mut(&k) else {
                    return false;
                };
                let Some(slot) = p.parked.remove(&(rank, seq)) else {
                    return false;
                };
                q.parked_total = q.parked_total.saturating_sub(1);
                if let Some(sl) = q.slots.get_mut(slot as usize) {
                    sl.state = SlotState::Shed;
                    sl.node.settle(NODE_SETTLED);
                }
            }
            None => {
                let Some(key) = q.line.last() else {
                    return false;
                };
                self.state.fetch_sub(WAITER, Ordering::AcqRel);
                let partition = Self::leave_line(q, key, SlotState::Shed);
                if let Some(k) = partition {
                    if let Some(p) = q.partitions.get_mut(&k) {
                        p.promoted = p.promoted.saturating_sub(1);
                    }
                    self.promote(q, k);
                }
            }
        }
        self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
        self.stats.shed.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A new maximum: the limit itself, or an adaptive limit's ceiling.
    pub(crate) fn set_max(&self, n: u32) {
        match &self.adaptive {
            None => self.set_limit(n),
            Some(a) => {
                let changed = {
                    let mut c = a.ctrl.lock().unwrap_or_else(|e| e.into_inner());
                    let from = self.limit();
                    c.set_max(n);
                    a.nominal.store(c.nominal(), Ordering::Relaxed);
                    let to = c.limit();
                    self.store_limit(to);
                    if from != to {
                        a.untold.push((from, to, crate::observe::LimitReason::Max));
                    }
                    from != to
                };
                self.apply_limit();
                if changed {
                    self.tell_changes(a);
                }
            }
        }
    }

    pub(crate) fn set_eta_source(&self, source: Option<Arc<dyn crate::eta::EtaSource>>) {
        *self
            .eta_source
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = source;
    }

    #[inline]
    pub(super) fn lock(&self) -> MutexGuard<'_, Queue> {
        // No code panics while holding this lock; if a user's waker did, the
        // queue is still consistent, so recover instead of propagating poison.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock-free admission: free permit, nobody waiting, not closed.
    #[inline]
    pub(crate) fn try_fast(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & (CLOSED | WAITERS_MASK) != 0 || in_flight(s) >= limit {
                return false;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => s = actual,
            }
        }
    }

    #[inline]
    pub(super) fn rejection(&self, kind: RejectKind) -> Rejected {
        Rejected::new("bulkhead", kind).with_name_opt(self.cfg.obs.name.as_ref())
    }

    /// The refusal of a waiter shed by a falling adaptive limit: come back
    /// when the line has drained a place (the time between two admissions;
    /// 1 s a round when no service time is known yet, as in
    /// [`wait_estimate`](Self::wait_estimate)).
    pub(super) fn shed_rejection(&self, q: &Queue) -> Rejected {
        self.rejection(RejectKind::QueueFull)
            .with_detail("shed: the adaptive limit fell".to_owned())
            .with_retry_after(Self::retry_hint(q, &self.cfg, self.limit()))
    }

    /// When a refused caller may find a place: the time between two
    /// admissions (1 s a round before any service time is known).
    pub(super) fn retry_hint(q: &Queue, cfg: &Config, limit: u32) -> Duration {
        Self::drain_interval(q, cfg, limit).unwrap_or_else(|| Duration::from_secs(1) / limit.max(1))
    }

    /// A `try_permit` without a free permit: counted, with when one may be
    /// (the time between two admissions), told to the observers. Takes the
    /// line's lock: call it without holding it.
    pub(crate) fn refuse_no_permit(&self) -> Rejected {
        // Closed: no permit will ever be free.
        if self.state.load(Ordering::Acquire) & CLOSED != 0 {
            self.stats.shutting_down.fetch_add(1, Ordering::Relaxed);
            return self.refuse(self.rejection(RejectKind::ShuttingDown));
        }
        let retry_after = Self::retry_hint(&self.lock(), &self.cfg, self.limit());
        self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
        self.refuse(
            self.rejection(RejectKind::QueueFull)
                .with_detail("no permit free".to_owned())
                .with_retry_after(retry_after),
        )
    }

    /// Hands `r` out, telling the observers.
    #[inline]
    pub(super) fn refuse(&self, r: Rejected) -> Rejected {
        self.cfg.obs.rejected(&r);
        r
    }

    #[inline]
    pub(super) fn rank(&self, priority: i32, now: Instant) -> i128 {
        match self.cfg.aging {
            // Strict priority: higher first, FIFO (by seq) within a priority.
            None => -i128::from(priority),
            // Aging: served in order of "virtual arrival" = arrival − priority × step,
            // so a waiter is overtaken only by callers that arrived less than
            // Δpriority × step after it. Independent of "now": a static sort key.
            Some(step) => {
                let arrival = now.saturating_duration_since(self.epoch).as_nanos() as i128;
                arrival - i128::from(priority) * step.as_nanos() as i128
            }
        }
    }

    /// Admission under the lock: direct if possible, else a place in line.
    #[cold]
    pub(crate) fn acquire_slow(self: &Arc<Self>, priority: i32, partition: Option<u64>) -> Acquire {
        let class = self.class_of(priority);
        // Read and allocated before the lock: the lock is what queued
        // callers contend on (the node is dropped unused by a call that
        // finds a permit after all).
        let now = Instant::now();
        let node = Arc::new(Node::default());
        let mut q = self.lock();
        let limit = self.limit.load(Ordering::Relaxed);
        let cap = self.cfg.max_per_key.unwrap_or(u32::MAX);
        let key_has_room = match partition {
            None => true,
            Some(k) => q
                .partitions
                .get(&k)
                .is_none_or(|p| p.in_flight.saturating_add(p.promoted) < cap),
        };
        if key_has_room {
            let mut s = self.state.load(Ordering::Acquire);
            loop {
                if s & CLOSED != 0 {
                    drop(q);
                    self.stats.shutting_down.fetch_add(1, Ordering::Relaxed);
                    return Acquire::Rejected(
                        self.refuse(self.rejection(RejectKind::ShuttingDown)),
                    );
                }
                if waiters(s) != 0 || in_flight(s) >= limit {
                    break;
                }
                match self.state.compare_exchange_weak(
                    s,
                    s + 1,
                    Ordering::Acquire,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        if let Some(k) = partition {
                            q.partitions.entry(k).or_default().in_flight += 1;
                        }
                        q.class_took(class);
                        return Acquire::Admitted(BulkheadPermit::new(
                            self.clone(),
                            Holder { partition, class },
                            None,
                        ));
                    }
                    Err(actual) => s = actual,
                }
            }
        } else if self.state.load(Ordering::Acquire) & CLOSED != 0 {
            drop(q);
            self.stats.shutting_down.fetch_add(1, Ordering::Relaxed);
            return Acquire::Rejected(self.refuse(self.rejection(RejectKind::ShuttingDown)));
        }

        let waiting = q.line.len() as u32 + q.parked_total;
        let bound = self.line_bound();
        // Under an adaptive limit, a newcomer that outranks the last waiter
        // of a full line takes its place (the last one is shed).
        let rank = self.rank(priority, now);
        let displaced = waiting >= bound
            && key_has_room
            && self.adaptive.is_some()
            && Self::worst(&q).is_some_and(|(r, _, _)| rank < r)
            && self.shed_last(&mut q);
        if waiting >= bound && !displaced {
            let retry_after = Self::retry_hint(&q, &self.cfg, limit);
            drop(q);
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            let r = self
                .rejection(RejectKind::QueueFull)
                .with_detail(if bound == 0 {
                    format!("{limit} of {limit} running, no line")
                } else {
                    format!("{waiting}/{bound} waiting")
                })
                .with_retry_after(retry_after);
            return Acquire::Rejected(self.refuse(r));
        }

        // Waiters granted a permit but not yet polled: if the dispatch
        // below grants this newcomer at once, on a current-thread runtime
        // it yields once so that they start first (they were woken earlier,
        // so they run first — when they were woken on the runtime's own
        // thread: a wake from another thread is picked up later). On a multi-thread runtime the start of calls
        // granted in one instant is the scheduler's order whatever we do,
        // and a yield there would only cost throughput. It is never a wait
        // for them: an earlier call's future may never be polled again
        // before this one is awaited.
        let defer = key_has_room
            && waiters(self.state.load(Ordering::Acquire)) as usize > q.line.len()
            && tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        let seq = q.next_seq;
        q.next_seq += 1;
        let slot = q.slots.insert(Slot {
            seq,
            rank,
            partition,
            class,
            promoted: key_has_room,
            state: SlotState::Waiting,
            node: node.clone(),
        }) as u32;
        if key_has_room {
            q.enter_line((rank, seq, slot));
            self.state.fetch_add(WAITER, Ordering::AcqRel);
            if let Some(k) = partition {
                q.partitions.entry(k).or_default().promoted += 1;
            }
        } else if let Some(k) = partition {
            q.partitions
                .entry(k)
                .or_default()
                .parked
                .insert((rank, seq), slot);
            q.parked_total += 1;
        }
        // Only an event reads it (a rank in the order tree: under the lock).
        let listening = self.cfg.obs.listening();
        let position = if !listening {
            0
        } else if key_has_room {
            q.line.rank(&(rank, seq, slot))
        } else {
            waiting as usize
        };
        // A release may have freed a permit between our check and the enqueue
        // (it will dispatch too, but do not make it wait for us).
        self.dispatch(&mut q);
        drop(q);
        if listening {
            self.cfg
                .obs
                .emit("bulkhead", EventKind::Queued { position });
        }
        // Only a newcomer granted at once yields: one granted later is woken
        // in line order with the others.
        let defer = defer && node.state.load(Ordering::Acquire) == NODE_GRANTED;
        Acquire::Queued(Waiter {
            shared: self.clone(),
            slot,
            seq,
            done: false,
            defer,
            node,
            holder: Holder { partition, class },
            deadline: self.cfg.max_wait.map(|w| crate::time::after(now, w)),
            enqueued_at: now,
        })
    }

    /// Hands free permits to the first eligible waiters. Caller holds the lock.
    pub(super) fn dispatch(&self, q: &mut Queue) {
        let limit = self.limit.load(Ordering::Relaxed);
        loop {
            let s = self.state.load(Ordering::Acquire);
            if s & CLOSED != 0 || waiters(s) == 0 || in_flight(s) >= limit {
                return;
            }
            let Some(key) = self.next_in_line(q, limit) else {
                return; // the waiters left are granted, not yet picked up
            };
            // The waiter stays counted under WAITER until it picks its
            // permit up (`Waiter::poll_permit`), so a newcomer in the same
            // instant queues behind it instead of taking a free permit
            // through the fast path and starting first.
            if self
                .state
                .compare_exchange(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let class = q.slots.get(key.2 as usize).and_then(|s| s.class);
            let partition = Self::grant(q, key);
            if let Some(k) = partition {
                if let Some(p) = q.partitions.get_mut(&k) {
                    p.promoted -= 1;
                    p.in_flight += 1;
                }
            }
            q.class_took(class);
        }
    }

    /// Who gets the next free permit: the first waiter of a `min_share`
    /// class under its share (the best-ranked such one), else the line's
    /// first.
    #[inline]
    fn next_in_line(&self, q: &Queue, limit: u32) -> Option<LineKey> {
        let mut best: Option<LineKey> = None;
        for (cl, share) in q.classes.iter().zip(self.cfg.shares.iter()) {
            if cl.in_flight < share.guaranteed(limit) {
                if let Some(&k) = cl.line.first() {
                    if best.is_none_or(|b| k < b) {
                        best = Some(k);
                    }
                }
            }
        }
        best.or_else(|| q.line.first())
    }

    /// The `min_share` class of `priority`, if any.
    #[inline]
    pub(crate) fn class_of(&self, priority: i32) -> Option<u8> {
        if self.cfg.shares.is_empty() {
            return None;
        }
        let p = i64::from(priority);
        self.cfg
            .shares
            .iter()
            .position(|c| c.lo <= p && p <= c.hi)
            .and_then(|i| u8::try_from(i).ok())
    }

    /// `try_permit` for a call of a `min_share` class: its permit is
    /// counted under the lock.
    pub(crate) fn try_class(self: &Arc<Self>, class: u8) -> Result<BulkheadPermit, Rejected> {
        let mut q = self.lock();
        if !self.try_fast() {
            drop(q);
            return Err(self.refuse_no_permit());
        }
        q.class_took(Some(class));
        drop(q);
        Ok(BulkheadPermit::new(
            self.clone(),
            Holder {
                partition: None,
                class: Some(class),
            },
            None,
        ))
    }

    /// Grants `key`'s waiter a permit: out of the line, its slot freed (it
    /// takes its permit without the lock, from its node), woken; returns its
    /// partition. The caller counts the permit.
    fn grant(q: &mut Queue, key: LineKey) -> Option<u64> {
        q.exit_line(&key);
        let slot = q.slots.remove(key.2 as usize);
        slot.node.settle(NODE_GRANTED);
        slot.partition
    }

    /// Takes `key`'s waiter out of the line into `state` (refused) and wakes
    /// it; returns its partition. The caller counts the waiter bits.
    fn leave_line(q: &mut Queue, key: LineKey, state: SlotState) -> Option<u64> {
        q.exit_line(&key);
        let slot = &mut q.slots[key.2 as usize];
        slot.state = state;
        slot.promoted = false;
        slot.node.settle(NODE_SETTLED);
        slot.partition
    }

    /// Moves parked waiters of partition `k` into the line while it has room.
    pub(super) fn promote(&self, q: &mut Queue, k: u64) {
        let cap = self.cfg.max_per_key.unwrap_or(u32::MAX);
        loop {
            let Some(p) = q.partitions.get_mut(&k) else {
                return;
            };
            if p.in_flight.saturating_add(p.promoted) >= cap {
                return;
            }
            let Some(((rank, seq), slot)) = p.parked.pop_first() else {
                if p.is_idle() {
                    q.partitions.remove(&k);
                }
                return;
            };
            p.promoted += 1;
            q.parked_total -= 1;
            q.slots[slot as usize].promoted = true;
            q.enter_line((rank, seq, slot));
            self.state.fetch_add(WAITER, Ordering::AcqRel);
        }
    }

    /// Gives back a fast-path permit: one `fetch_sub` unless someone waits.
    #[inline]
    pub(super) fn release(&self) {
        let prev = self.state.fetch_sub(1, Ordering::Release);
        if waiters(prev) != 0 {
            self.dispatch_locked();
        }
    }

    #[cold]
    pub(super) fn dispatch_locked(&self) {
        let mut q = self.lock();
        self.dispatch(&mut q);
    }

    #[cold]
    pub(super) fn release_slow(&self, holder: Holder, granted_at: Option<Instant>) {
        let secs = granted_at.map(|t| t.elapsed().as_secs_f64());
        let mut q = self.lock();
        if let Some(secs) = secs {
            q.service_ewma = Some(match q.service_ewma {
                None => secs,
                Some(avg) => avg + 0.2 * (secs - avg),
            });
        }
        self.release_locked(&mut q, holder);
    }

    /// Gives back one permit; the caller holds the lock.
    pub(super) fn release_locked(&self, q: &mut Queue, holder: Holder) {
        self.state.fetch_sub(1, Ordering::AcqRel);
        q.class_gave(holder.class);
        if let Some(k) = holder.partition {
            if let Some(p) = q.partitions.get_mut(&k) {
                p.in_flight = p.in_flight.saturating_sub(1);
            }
            self.promote(q, k);
        }
        self.dispatch(q);
    }

    /// Removes a waiter that is leaving the line (dropped or timed out).
    /// Returns its state before removal and its partition. A granted waiter
    /// has no slot any more (see `grant`): its permit is settled by the
    /// waiter.
    pub(super) fn remove_waiter(
        &self,
        q: &mut Queue,
        slot_id: u32,
        seq: u64,
    ) -> Option<(SlotState, Holder)> {
        let slot = q.slots.get(slot_id as usize).filter(|s| s.seq == seq)?;
        let (state, promoted, rank, partition, class) = (
            slot.state,
            slot.promoted,
            slot.rank,
            slot.partition,
            slot.class,
        );
        if state == SlotState::Waiting && promoted {
            q.exit_line(&(rank, seq, slot_id));
        }
        q.slots.remove(slot_id as usize);
        match state {
            SlotState::Waiting if promoted => {
                self.state.fetch_sub(WAITER, Ordering::AcqRel);
                if let Some(k) = partition {
                    if let Some(p) = q.partitions.get_mut(&k) {
                        p.promoted -= 1;
                    }
                    self.promote(q, k);
                }
            }
            SlotState::Waiting => {
                if let Some(k) = partition {
                    if let Some(p) = q.partitions.get_mut(&k) {
                        p.parked.remove(&(rank, seq));
                        q.parked_total -= 1;
                        if p.is_idle() {
                            q.partitions.remove(&k);
                        }
                    }
                }
            }
            // A granted waiter's slot is gone (see `grant`): the
            // waiter settles it (`Waiter::take_granted`).
            SlotState::Rejected(_) | SlotState::Shed => {}
        }
        Some((state, Holder { partition, class }))
    }

    pub(crate) fn set_limit(&self, limit: u32) {
        self.limit.store(limit.min(MAX_COUNT), Ordering::Relaxed);
        let mut q = self.lock();
        self.dispatch(&mut q);
    }

    /// A permit is free and nobody waits (one atomic load).
    #[inline]
    pub(crate) fn free_now(&self) -> bool {
        let s = self.state.load(Ordering::Relaxed);
        s & (CLOSED | WAITERS_MASK) == 0 && in_flight(s) < self.limit()
    }

    #[inline]
    pub(crate) fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Rejects every waiter with `ShuttingDown` and refuses new calls.
    pub(crate) fn close(&self) -> usize {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let mut q = self.lock();
        let mut released = 0;
        for (_, slot) in q.slots.iter_mut() {
            if slot.state == SlotState::Waiting {
                slot.state = SlotState::Rejected(RejectKind::ShuttingDown);
                slot.promoted = false;
                released += 1;
                slot.node.settle(NODE_SETTLED);
            }
        }
        let in_line = q.line.len() as u64;
        q.line.clear();
        for cl in &mut q.classes {
            cl.line.clear();
        }
        self.state.fetch_sub(in_line * WAITER, Ordering::AcqRel);
        q.parked_total = 0;
        q.partitions.retain(|_, p| {
            p.parked.clear();
            p.promoted = 0;
            p.in_flight > 0
        });
        self.stats
            .shutting_down
            .fetch_add(released as u64, Ordering::Relaxed);
        released
    }

    pub(crate) fn snapshot(&self) -> super::BulkheadSnapshot {
        let q = self.lock();
        let s = self.state.load(Ordering::Acquire);
        super::BulkheadSnapshot {
            in_flight: u64::from(in_flight(s)),
            waiting: q.line.len() as u64 + u64::from(q.parked_total),
            limit: u64::from(self.limit.load(Ordering::Relaxed)),
            max_queue: u64::from(self.cfg.max_queue),
            line_bound: u64::from(self.line_bound()),
            partitions: q.partitions.len() as u64,
            rejected_queue_full: self.stats.queue_full.load(Ordering::Relaxed),
            shed: self.stats.shed.load(Ordering::Relaxed),
            rejected_queue_timeout: self.stats.queue_timeout.load(Ordering::Relaxed),
            rejected_shutting_down: self.stats.shutting_down.load(Ordering::Relaxed),
            closed: s & CLOSED != 0,
            service_time: q
                .service_ewma
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .or(self.cfg.expected_service),
            adaptive_limit: self
                .adaptive
                .as_ref()
                .map(|a| u64::from(a.nominal.load(Ordering::Relaxed))),
            class_in_flight: {
                let mut out = [0u64; MAX_CLASSES];
                for (o, cl) in out.iter_mut().zip(&q.classes) {
                    *o = u64::from(cl.in_flight);
                }
                out
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Share;

    #[test]
    fn a_share_of_a_whole_number_of_permits_is_that_number() {
        let g = |share: f64, limit: u32| {
            Share {
                lo: 0,
                hi: 0,
                share,
            }
            .guaranteed(limit)
        };
        // 0.57 × 100 is 56.99999999999999 in `f64`: 57 permits, not 56.
        assert_eq!(g(0.57, 100), 57);
        assert_eq!(g(0.29, 100), 29);
        assert_eq!(g(0.5, 3), 1);
        assert_eq!(g(0.01, 10), 1, "at least one");
        assert_eq!(g(1.0, 7), 7);
        assert_eq!(g(0.3, 0), 0);
    }
}

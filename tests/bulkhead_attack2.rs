//! Outside attack on the bulkhead line's grant / pick-up changes (granted
//! waiters counted as waiters until picked up, lock-free pick-up through a
//! per-waiter node, the newcomer's one yield on a current-thread runtime,
//! clock reads moved). Public API only.

use futures::future::BoxFuture;
use futures::FutureExt;
use semaforo::bulkhead::{Aimd, Bulkhead, QueueTicket, TicketStatus};
use semaforo::{BoxError, RejectKind, Rejected};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn kind(err: &BoxError) -> RejectKind {
    Rejected::from_box(err)
        .unwrap_or_else(|| panic!("not a semaforo rejection: {err}"))
        .kind()
}

/// A request: an id, an optional gate the call waits on, some work, a
/// tenant, a priority and a ticket.
struct Req {
    id: u32,
    gate: Option<oneshot::Receiver<()>>,
    work: Duration,
    tenant: u32,
    priority: i32,
    ticket: Option<QueueTicket>,
}

impl Req {
    fn new(id: u32) -> Self {
        Req {
            id,
            gate: None,
            work: Duration::ZERO,
            tenant: 0,
            priority: 0,
            ticket: None,
        }
    }
    fn gate(mut self, g: oneshot::Receiver<()>) -> Self {
        self.gate = Some(g);
        self
    }
    fn work(mut self, d: Duration) -> Self {
        self.work = d;
        self
    }
    fn tenant(mut self, t: u32) -> Self {
        self.tenant = t;
        self
    }
    fn priority(mut self, p: i32) -> Self {
        self.priority = p;
        self
    }
    fn ticket(mut self, t: &QueueTicket) -> Self {
        self.ticket = Some(t.clone());
        self
    }
}

/// What the inner service saw.
#[derive(Default)]
struct Seen {
    /// Ids in the order the inner service was called ("started").
    starts: Vec<u32>,
    running: usize,
    max_running: usize,
    per_tenant: HashMap<u32, usize>,
    max_per_tenant: usize,
}

/// The inner service: records starts and concurrency; its `poll_ready` can
/// be held pending (`ready = false`).
#[derive(Clone)]
struct Inner {
    seen: Arc<Mutex<Seen>>,
    ready: Arc<AtomicBool>,
    wakers: Arc<Mutex<Vec<Waker>>>,
}

impl Inner {
    fn new() -> Self {
        Inner {
            seen: Arc::default(),
            ready: Arc::new(AtomicBool::new(true)),
            wakers: Arc::default(),
        }
    }
    fn starts(&self) -> Vec<u32> {
        self.seen.lock().unwrap().starts.clone()
    }
    fn max_running(&self) -> usize {
        self.seen.lock().unwrap().max_running
    }
    fn set_ready(&self, r: bool) {
        self.ready.store(r, Ordering::SeqCst);
        if r {
            for w in self.wakers.lock().unwrap().drain(..) {
                w.wake();
            }
        }
    }
}

struct Leave(Arc<Mutex<Seen>>, u32);
impl Drop for Leave {
    fn drop(&mut self) {
        let mut s = self.0.lock().unwrap();
        s.running -= 1;
        *s.per_tenant.get_mut(&self.1).unwrap() -= 1;
    }
}

impl Service<Req> for Inner {
    type Response = u32;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<u32, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.ready.load(Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            self.wakers.lock().unwrap().push(cx.waker().clone());
            Poll::Pending
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        {
            let mut s = self.seen.lock().unwrap();
            s.starts.push(req.id);
            s.running += 1;
            s.max_running = s.max_running.max(s.running);
            let t = s.per_tenant.entry(req.tenant).or_default();
            *t += 1;
            let t = *t;
            s.max_per_tenant = s.max_per_tenant.max(t);
        }
        let leave = Leave(self.seen.clone(), req.tenant);
        async move {
            let _leave = leave;
            if let Some(g) = req.gate {
                let _ = g.await;
            }
            if !req.work.is_zero() {
                tokio::time::sleep(req.work).await;
            }
            Ok(req.id)
        }
        .boxed()
    }
}

type Fut = Pin<Box<dyn std::future::Future<Output = Result<u32, BoxError>> + Send>>;

/// Calls `svc` now (the place in line is taken in `call`), not polled.
async fn send<S>(svc: &mut S, req: Req) -> Fut
where
    S: Service<Req, Response = u32, Error = BoxError>,
    S::Future: Send + 'static,
{
    Box::pin(svc.ready().await.expect("ready").call(req))
}

/// The bulkhead is back to rest: nothing held, nobody waiting, and a
/// permit is taken at once (`try_permit` takes the lock-free path: it fails
/// if any waiter is still counted in the state word).
fn at_rest(b: &Bulkhead, what: &str) {
    let s = b.snapshot();
    assert_eq!((s.in_flight, s.waiting), (0, 0), "{what}: not drained");
    let p = b.try_permit();
    assert!(p.is_ok(), "{what}: no permit at once: {:?}", p.err());
}

// ---------------------------------------------------------------------------
// Drops at every await point
// ---------------------------------------------------------------------------

/// The response future dropped: before its first poll (waiting), while
/// queued, granted before its first poll, granted after a poll but before
/// pick-up, picked up but before the inner call (inner not ready). Every
/// time everything comes back and the next call takes a permit at once.
#[tokio::test(start_paused = true)]
async fn dropped_at_every_await_point_gives_everything_back() {
    for stage in 0..5 {
        let b = Bulkhead::builder(1).max_queue(4).build().unwrap();
        let inner = Inner::new();
        let mut svc = b
            .layer()
            .ticket(|r: &Req| r.ticket.clone())
            .layer(inner.clone());
        let (open, gate) = oneshot::channel();
        let mut open = Some(open);
        let mut holder = send(&mut svc, Req::new(0).gate(gate)).await;
        assert!(futures::poll!(&mut holder).is_pending());
        let t = QueueTicket::new();
        let mut w = send(&mut svc, Req::new(1).ticket(&t)).await;
        match stage {
            0 => drop(w),
            1 => {
                assert!(futures::poll!(&mut w).is_pending());
                assert!(matches!(t.status(), TicketStatus::Waiting(_)));
                drop(w);
            }
            2 | 3 => {
                if stage == 3 {
                    assert!(futures::poll!(&mut w).is_pending());
                }
                open.take().unwrap().send(()).unwrap();
                holder.await.unwrap();
                assert_eq!(b.snapshot().in_flight, 1, "stage {stage}: granted");
                drop(w);
                holder = Box::pin(async { Ok::<u32, BoxError>(0) });
            }
            _ => {
                assert!(futures::poll!(&mut w).is_pending());
                inner.set_ready(false);
                open.take().unwrap().send(()).unwrap();
                holder.await.unwrap();
                assert!(futures::poll!(&mut w).is_pending(), "inner not ready");
                assert_eq!(b.snapshot().in_flight, 1, "picked up, not called");
                assert_eq!(inner.starts(), vec![0]);
                drop(w);
                inner.set_ready(true);
                holder = Box::pin(async { Ok::<u32, BoxError>(0) });
            }
        }
        if let Some(open) = open {
            let _ = open.send(());
            holder.await.unwrap();
        }
        at_rest(&b, &format!("stage {stage}"));
        let mut next = send(&mut svc, Req::new(2)).await;
        assert!(
            matches!(futures::poll!(&mut next), Poll::Ready(Ok(2))),
            "stage {stage}: the next call runs at once"
        );
        assert!(
            !inner.starts().contains(&1),
            "stage {stage}: dropped call ran"
        );
        at_rest(&b, &format!("stage {stage} after"));
    }
}

/// The ticket of a caller that went away while granted but before it took
/// its permit: its call never ran. `TicketStatus::Cancelled` is "the caller
/// went away while waiting"; `Admitted` is "holding a permit (the call is
/// running or ran)". Before the lock-free pick-up it read `Cancelled`.
#[tokio::test(start_paused = true)]
async fn ticket_of_a_caller_dropped_after_its_grant_is_not_admitted() {
    let b = Bulkhead::builder(1).max_queue(4).build().unwrap();
    let inner = Inner::new();
    let mut svc = b
        .layer()
        .ticket(|r: &Req| r.ticket.clone())
        .layer(inner.clone());
    let (open, gate) = oneshot::channel();
    let mut holder = send(&mut svc, Req::new(0).gate(gate)).await;
    assert!(futures::poll!(&mut holder).is_pending());
    // Control: dropped while waiting reads Cancelled.
    let t0 = QueueTicket::new();
    let mut w0 = send(&mut svc, Req::new(1).ticket(&t0)).await;
    assert!(futures::poll!(&mut w0).is_pending());
    drop(w0);
    assert_eq!(t0.status(), TicketStatus::Cancelled);
    // Granted, then dropped before pick-up.
    let t = QueueTicket::new();
    let mut w = send(&mut svc, Req::new(2).ticket(&t)).await;
    assert!(futures::poll!(&mut w).is_pending());
    open.send(()).unwrap();
    holder.await.unwrap();
    assert_eq!(t.status(), TicketStatus::Admitted, "granted");
    drop(w);
    at_rest(&b, "after the drop");
    assert!(!inner.starts().contains(&2));
    assert_eq!(
        t.status(),
        TicketStatus::Cancelled,
        "the call never ran and holds no permit"
    );
}

// ---------------------------------------------------------------------------
// Granted-but-unpicked waiters seen by the other entry points
// ---------------------------------------------------------------------------

/// A permit is free and nobody is in line (snapshot: in_flight 1 of 2,
/// waiting 0), but a granted caller has not picked its permit up: it comes
/// first, so `try_permit` refuses (as documented); once it has, a free
/// permit is taken.
#[tokio::test(start_paused = true)]
async fn try_permit_while_a_granted_caller_has_not_picked_up() {
    let b = Bulkhead::builder(2).max_queue(4).build().unwrap();
    let inner = Inner::new();
    let mut svc = b.layer().layer(inner.clone());
    let p1 = b.try_permit().unwrap();
    let p2 = b.try_permit().unwrap();
    let mut c = send(&mut svc, Req::new(1)).await;
    assert!(futures::poll!(&mut c).is_pending());
    drop(p1); // C is granted (its task has not run yet)
    drop(p2); // one permit free
    let s = b.snapshot();
    assert_eq!((s.in_flight, s.waiting, s.limit), (1, 0, 2));
    let e = b
        .try_permit()
        .expect_err("refused while C has not picked up");
    assert_eq!(e.kind(), RejectKind::QueueFull);
    // C picks its permit up (and answers): the free permit is taken.
    assert_eq!(c.await.unwrap(), 1);
    let p = b.try_permit().expect("a permit is free and nobody waits");
    drop(p);
    at_rest(&b, "end");
}

// ---------------------------------------------------------------------------
// max_wait and grants in the same instant
// ---------------------------------------------------------------------------

/// The holder's work ends at the very instant the waiter's `max_wait` does
/// (paused clock: both timers fire in one tick), in both spawn orders. The
/// waiter either runs (then it was admitted) or gets `QueueTimeout` (then it
/// never ran); either way everything drains and the counters agree.
#[tokio::test(start_paused = true)]
async fn max_wait_ending_in_the_instant_of_the_grant() {
    for order in 0..2 {
        let b = Bulkhead::builder(1)
            .max_queue(4)
            .max_wait(secs(5))
            .build()
            .unwrap();
        let inner = Inner::new();
        let mut svc = b
            .layer()
            .ticket(|r: &Req| r.ticket.clone())
            .layer(inner.clone());
        let t = QueueTicket::new();
        let holder = send(&mut svc, Req::new(0).work(secs(5))).await;
        let waiter = send(&mut svc, Req::new(1).ticket(&t)).await;
        let (h, w) = if order == 0 {
            let h = tokio::spawn(holder);
            (h, tokio::spawn(waiter))
        } else {
            let w = tokio::spawn(waiter);
            (tokio::spawn(holder), w)
        };
        let start = Instant::now();
        assert_eq!(h.await.unwrap().unwrap(), 0);
        let r = w.await.unwrap();
        assert_eq!(start.elapsed(), secs(5), "order {order}");
        match r {
            Ok(1) => {
                assert_eq!(inner.starts(), vec![0, 1]);
                assert_eq!(t.status(), TicketStatus::Admitted);
                assert_eq!(b.snapshot().rejected_queue_timeout, 0);
            }
            Ok(other) => panic!("order {order}: answered {other}"),
            Err(e) => {
                assert_eq!(kind(&e), RejectKind::QueueTimeout, "order {order}");
                assert_eq!(inner.starts(), vec![0], "order {order}: timed out but ran");
                assert_eq!(t.status(), TicketStatus::Rejected(RejectKind::QueueTimeout));
                assert_eq!(b.snapshot().rejected_queue_timeout, 1);
            }
        }
        assert!(inner.max_running() <= 1);
        at_rest(&b, &format!("order {order}"));
    }
}

/// Granted well before its deadline but first polled after it: the grant
/// wins (the permit was its before `max_wait` ran out), including a
/// newcomer granted at once that owes one yield to an unpicked grant.
#[tokio::test(start_paused = true)]
async fn granted_before_the_deadline_polled_after_it_runs() {
    let b = Bulkhead::builder(2)
        .max_queue(4)
        .max_wait(secs(5))
        .build()
        .unwrap();
    let inner = Inner::new();
    let mut svc = b.layer().layer(inner.clone());
    let p1 = b.try_permit().unwrap();
    let p2 = b.try_permit().unwrap();
    let mut c = send(&mut svc, Req::new(1)).await;
    assert!(futures::poll!(&mut c).is_pending());
    tokio::time::advance(secs(1)).await;
    drop(p1); // C granted at t=1
    drop(p2);
    // D granted at once, behind the unpicked C: it owes a yield.
    let d = send(&mut svc, Req::new(2)).await;
    tokio::time::advance(secs(10)).await; // both deadlines long gone
    assert_eq!(d.await.expect("D was granted at once").to_owned(), 2);
    assert_eq!(c.await.expect("C was granted at t=1"), 1);
    assert_eq!(b.snapshot().rejected_queue_timeout, 0);
    at_rest(&b, "end");
}

// ---------------------------------------------------------------------------
// close / set_max_concurrent / adaptive limits with grants pending
// ---------------------------------------------------------------------------

/// `close()` while one waiter is granted and not picked up and another waits:
/// the waiting one gets `ShuttingDown` (and is the only one counted), the
/// granted one keeps its permit; new calls are refused; all drains.
#[tokio::test(start_paused = true)]
async fn close_with_a_granted_unpicked_waiter() {
    for drop_granted in [false, true] {
        let b = Bulkhead::builder(1).max_queue(4).build().unwrap();
        let inner = Inner::new();
        let mut svc = b.layer().layer(inner.clone());
        let (open, gate) = oneshot::channel();
        let mut holder = send(&mut svc, Req::new(0).gate(gate)).await;
        assert!(futures::poll!(&mut holder).is_pending());
        let mut c = send(&mut svc, Req::new(1)).await;
        let mut d = send(&mut svc, Req::new(2)).await;
        assert!(futures::poll!(&mut c).is_pending());
        assert!(futures::poll!(&mut d).is_pending());
        open.send(()).unwrap();
        holder.await.unwrap(); // C granted, D still waiting
        assert_eq!(b.close(), 1, "only D was waiting");
        let e = d.await.unwrap_err();
        assert_eq!(kind(&e), RejectKind::ShuttingDown);
        let e = send(&mut svc, Req::new(3)).await.await.unwrap_err();
        assert_eq!(kind(&e), RejectKind::ShuttingDown);
        if drop_granted {
            drop(c);
        } else {
            match c.await {
                Ok(v) => assert_eq!(v, 1),
                Err(e) => assert_eq!(kind(&e), RejectKind::ShuttingDown),
            }
        }
        let s = b.snapshot();
        assert!(s.closed);
        assert_eq!(
            (s.in_flight, s.waiting),
            (0, 0),
            "drop_granted {drop_granted}"
        );
        assert!(!inner.starts().contains(&2) && !inner.starts().contains(&3));
    }
}

/// The limit shrinks (to 1, then 0) while a grant is pending: the grant
/// keeps its permit, and nobody else starts until in-flight is below the
/// new limit; dropping the unpicked grant under a limit of 0 admits no one.
#[tokio::test(start_paused = true)]
async fn shrinking_the_limit_with_grants_pending() {
    let b = Bulkhead::builder(2).max_queue(8).build().unwrap();
    let inner = Inner::new();
    let mut svc = b.layer().layer(inner.clone());
    let p1 = b.try_permit().unwrap();
    let p2 = b.try_permit().unwrap();
    let mut c = send(&mut svc, Req::new(1)).await;
    let mut d = send(&mut svc, Req::new(2)).await;
    let mut e = send(&mut svc, Req::new(3)).await;
    for f in [&mut c, &mut d, &mut e] {
        assert!(futures::poll!(f).is_pending());
    }
    drop(p1); // C granted
    b.set_max_concurrent(1);
    drop(p2); // in flight: C only = limit 1: D waits
    assert!(futures::poll!(&mut d).is_pending(), "D over the new limit");
    assert_eq!(b.snapshot().waiting, 2);
    b.set_max_concurrent(0);
    drop(c); // the unpicked grant given back under a limit of 0
    assert!(futures::poll!(&mut d).is_pending(), "paused");
    let s = b.snapshot();
    assert_eq!((s.in_flight, s.waiting), (0, 2));
    b.set_max_concurrent(1);
    assert_eq!(d.await.unwrap(), 2);
    assert_eq!(e.await.unwrap(), 3);
    assert_eq!(inner.starts(), vec![2, 3]);
    b.set_max_concurrent(2);
    at_rest(&b, "end");
}

/// An adaptive limit's ceiling falls while grants are pending: the line
/// sheds its lowest waiter, the grants keep their permits, everyone else
/// waits for in-flight to fall under the new limit; all drains.
#[tokio::test(start_paused = true)]
async fn adaptive_ceiling_falls_with_grants_pending() {
    let b = Bulkhead::builder(4)
        .limit(Aimd::new().min(1))
        .max_queue(4)
        .build()
        .unwrap();
    let inner = Inner::new();
    let mut svc = b.layer().layer(inner.clone());
    let mut held: Vec<_> = (0..4).map(|_| b.try_permit().unwrap()).collect();
    let mut w: Vec<Fut> = Vec::new();
    for id in 1..=4 {
        let mut f = send(&mut svc, Req::new(id)).await;
        assert!(futures::poll!(&mut f).is_pending());
        w.push(f);
    }
    held.pop();
    held.pop(); // 1 and 2 granted, 3 and 4 wait
    b.set_max_concurrent(1); // the line holds 4 × 1 / 4 = 1: 4 is shed
    assert_eq!(b.snapshot().limit, 1);
    let w4 = w.pop().unwrap();
    let e = w4.await.unwrap_err();
    assert_eq!(kind(&e), RejectKind::QueueFull);
    let mut w3 = w.pop().unwrap();
    assert!(futures::poll!(&mut w3).is_pending());
    let w2 = w.pop().unwrap();
    let w1 = w.pop().unwrap();
    assert_eq!(w1.await.unwrap(), 1, "granted before the fall");
    assert_eq!(w2.await.unwrap(), 2, "granted before the fall");
    assert!(futures::poll!(&mut w3).is_pending(), "2 permits still held");
    held.clear();
    assert_eq!(w3.await.unwrap(), 3);
    assert_eq!(inner.starts(), vec![1, 2, 3]);
    let s = b.snapshot();
    assert_eq!((s.in_flight, s.waiting), (0, 0));
    assert!(b.try_permit().is_ok());
}

// ---------------------------------------------------------------------------
// Partitions and min_share classes with grants pending
// ---------------------------------------------------------------------------

/// `max_per_key(1)`: a tenant's granted-unpicked waiter counts against its
/// cap; dropping it promotes the tenant's next parked waiter; all drains
/// (partitions forgotten, the fast path back).
#[tokio::test(start_paused = true)]
async fn partitions_with_a_granted_unpicked_waiter() {
    let b = Bulkhead::builder(2)
        .max_per_key(1)
        .max_queue(8)
        .build()
        .unwrap();
    let inner = Inner::new();
    let mut svc = b.layer().partition(|r: &Req| r.tenant).layer(inner.clone());
    let (open_a, gate_a) = oneshot::channel();
    let (open_b, gate_b) = oneshot::channel();
    let mut a = send(&mut svc, Req::new(0).tenant(1).gate(gate_a)).await;
    let mut bb = send(&mut svc, Req::new(10).tenant(2).gate(gate_b)).await;
    assert!(futures::poll!(&mut a).is_pending());
    assert!(futures::poll!(&mut bb).is_pending());
    let mut x2 = send(&mut svc, Req::new(2).tenant(1)).await;
    let mut x3 = send(&mut svc, Req::new(3).tenant(1)).await;
    let mut y2 = send(&mut svc, Req::new(12).tenant(2)).await;
    for f in [&mut x2, &mut x3, &mut y2] {
        assert!(futures::poll!(f).is_pending());
    }
    open_a.send(()).unwrap();
    a.await.unwrap(); // X2 granted, not picked up
    let s = b.snapshot();
    assert_eq!((s.in_flight, s.waiting), (2, 2));
    let mut x4 = send(&mut svc, Req::new(4).tenant(1)).await;
    assert!(futures::poll!(&mut x4).is_pending(), "tenant 1 at its cap");
    assert!(futures::poll!(&mut x3).is_pending(), "tenant 1 at its cap");
    drop(x2);
    assert_eq!(x3.await.unwrap(), 3);
    assert_eq!(x4.await.unwrap(), 4);
    open_b.send(()).unwrap();
    bb.await.unwrap();
    assert_eq!(y2.await.unwrap(), 12);
    assert_eq!(inner.starts(), vec![0, 10, 3, 4, 12]);
    assert!(inner.seen.lock().unwrap().max_per_tenant <= 1);
    let s = b.snapshot();
    assert_eq!(s.partitions, 0);
    at_rest(&b, "end");
}

/// `min_share(1.., 0.5)` under strict priority: a granted-unpicked class
/// waiter counts in its class; dropping it gives the class's permit back
/// and the class's next waiter gets it; class counts drain to 0.
#[tokio::test(start_paused = true)]
async fn min_share_with_a_granted_unpicked_waiter() {
    let b = Bulkhead::builder(2)
        .min_share(1.., 0.5)
        .priority_aging(None)
        .max_queue(8)
        .build()
        .unwrap();
    let inner = Inner::new();
    let mut svc = b
        .layer()
        .priority(|r: &Req| r.priority)
        .layer(inner.clone());
    let (open1, g1) = oneshot::channel();
    let (open2, g2) = oneshot::channel();
    let mut l1 = send(&mut svc, Req::new(0).gate(g1)).await;
    let mut l2 = send(&mut svc, Req::new(1).gate(g2)).await;
    assert!(futures::poll!(&mut l1).is_pending());
    assert!(futures::poll!(&mut l2).is_pending());
    let mut i1 = send(&mut svc, Req::new(10).priority(1)).await;
    let mut l3 = send(&mut svc, Req::new(2)).await;
    let mut i2 = send(&mut svc, Req::new(11).priority(1)).await;
    for f in [&mut i1, &mut l3, &mut i2] {
        assert!(futures::poll!(f).is_pending());
    }
    open1.send(()).unwrap();
    l1.await.unwrap(); // I1 granted (class under its share)
    assert_eq!(b.snapshot().class_in_flight[0], 1);
    drop(i1);
    assert_eq!(b.snapshot().class_in_flight[0], 1, "I2 granted instead");
    assert_eq!(i2.await.unwrap(), 11);
    assert_eq!(b.snapshot().class_in_flight[0], 0);
    open2.send(()).unwrap();
    l2.await.unwrap();
    assert_eq!(l3.await.unwrap(), 2);
    assert_eq!(inner.starts(), vec![0, 1, 11, 2]);
    let s = b.snapshot();
    assert_eq!(s.class_in_flight, [0; 16]);
    at_rest(&b, "end");
}

// ---------------------------------------------------------------------------
// QueueTicket across grant → pick-up → finish
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn ticket_across_grant_pickup_and_finish() {
    let b = Bulkhead::builder(1)
        .max_queue(4)
        .expected_service_time(secs(2))
        .build()
        .unwrap();
    let inner = Inner::new();
    let mut svc = b
        .layer()
        .ticket(|r: &Req| r.ticket.clone())
        .layer(inner.clone());
    let (open, gate) = oneshot::channel();
    let (open_c, gate_c) = oneshot::channel();
    let mut holder = send(&mut svc, Req::new(0).gate(gate)).await;
    assert!(futures::poll!(&mut holder).is_pending());
    let tc = QueueTicket::new();
    let td = QueueTicket::new();
    let mut c = send(&mut svc, Req::new(1).ticket(&tc).gate(gate_c)).await;
    let mut d = send(&mut svc, Req::new(2).ticket(&td)).await;
    assert!(futures::poll!(&mut c).is_pending());
    assert!(futures::poll!(&mut d).is_pending());
    assert_eq!(
        tc.queue_status().map(|s| (s.position, s.waiting)),
        Some((1, 2))
    );
    assert_eq!(
        td.queue_status().map(|s| (s.position, s.waiting)),
        Some((2, 2))
    );
    open.send(()).unwrap();
    holder.await.unwrap();
    // C granted, not picked up: Admitted; D moves up to 1st of 1.
    assert_eq!(tc.status(), TicketStatus::Admitted);
    assert_eq!(
        td.queue_status().map(|s| (s.position, s.waiting)),
        Some((1, 1))
    );
    assert!(futures::poll!(&mut c).is_pending(), "picked up, running");
    assert_eq!(tc.status(), TicketStatus::Admitted);
    assert_eq!(inner.starts(), vec![0, 1]);
    open_c.send(()).unwrap();
    assert_eq!(c.await.unwrap(), 1);
    assert_eq!(tc.status(), TicketStatus::Admitted);
    assert_eq!(td.status(), TicketStatus::Admitted, "granted at C's end");
    assert_eq!(d.await.unwrap(), 2);
    assert_eq!(td.status(), TicketStatus::Admitted);
    at_rest(&b, "end");
}

// ---------------------------------------------------------------------------
// FIFO on a current-thread runtime
// ---------------------------------------------------------------------------

/// Calls of one priority start in arrival order: arrivals (spawned tasks)
/// land on the very instants permits come back (whole seconds) and the
/// limit moves at some of them, so newcomers meet unpicked grants.
#[tokio::test(start_paused = true)]
async fn fifo_with_arrivals_in_the_instants_of_grants() {
    let b = Bulkhead::builder(3).max_queue(10_000).build().unwrap();
    let inner = Inner::new();
    let svc = b.layer().layer(inner.clone());
    let arrivals = Arc::new(Mutex::new(Vec::<u32>::new()));
    let mut handles = Vec::new();
    let mut id = 0u32;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for tick in 0..40u64 {
        match tick {
            7 => b.set_max_concurrent(5),
            15 => b.set_max_concurrent(2),
            23 => b.set_max_concurrent(6),
            31 => b.set_max_concurrent(3),
            _ => {}
        }
        let n = next() % 5;
        for _ in 0..n {
            let work = secs(1 + next() % 3);
            let mut s = svc.clone();
            let arr = arrivals.clone();
            let my = id;
            id += 1;
            handles.push(tokio::spawn(async move {
                let s = s.ready().await.unwrap();
                let f = s.call(Req::new(my).work(work));
                arr.lock().unwrap().push(my);
                f.await
            }));
        }
        tokio::time::sleep(secs(1)).await;
    }
    tokio::time::timeout(secs(3600), async {
        for h in handles {
            h.await.unwrap().unwrap();
        }
    })
    .await
    .expect("drained");
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(inner.starts(), arrivals, "start order is not arrival order");
    at_rest(&b, "end");
}

/// Same instant: the held permits come back, C (queued) is granted, and
/// newcomers whose tasks were woken *before* C's (so they run first) call
/// with permits to spare. They must not start before C: the newcomer's one
/// yield. Repeated over spare-permit counts.
#[tokio::test(start_paused = true)]
async fn fifo_newcomers_woken_before_the_granted_waiter() {
    for spare in 1..=3u32 {
        let b = Bulkhead::builder(1 + spare).max_queue(16).build().unwrap();
        let inner = Inner::new();
        let svc = b.layer().layer(inner.clone());
        let mut held: Vec<_> = (0..=spare).map(|_| b.try_permit().unwrap()).collect();
        let mut s = svc.clone();
        let c = tokio::spawn(async move { s.ready().await.unwrap().call(Req::new(100)).await });
        while b.snapshot().waiting < 1 {
            tokio::task::yield_now().await;
        }
        let mut news = Vec::new();
        let mut go = Vec::new();
        for k in 0..spare {
            let mut s = svc.clone();
            let (tx, rx) = oneshot::channel::<()>();
            go.push(tx);
            news.push(tokio::spawn(async move {
                let _ = rx.await;
                s.ready().await.unwrap().call(Req::new(k)).await
            }));
        }
        tokio::task::yield_now().await; // the newcomers wait on their gates
        for tx in go {
            tx.send(()).unwrap(); // newcomers woken first
        }
        held.clear(); // C granted (woken after them), `spare` permits free
        assert_eq!(c.await.unwrap().unwrap(), 100);
        for n in news {
            n.await.unwrap().unwrap();
        }
        let starts = inner.starts();
        assert_eq!(
            starts[0], 100,
            "spare {spare}: a newcomer started first: {starts:?}"
        );
        at_rest(&b, &format!("spare {spare}"));
    }
}

/// W arrives while an earlier grant (C) is unpicked, but gets no permit at
/// once: it waits in line. N arrives later (no unpicked grant then) behind
/// it. Both are granted in one dispatch (the limit grows) and woken W then
/// N. W must start first: its `defer` was meant for "granted at once".
#[tokio::test(start_paused = true)]
async fn fifo_a_waiter_queued_behind_an_unpicked_grant_keeps_its_turn() {
    let b = Bulkhead::builder(1).max_queue(8).build().unwrap();
    let inner = Inner::new();
    let mut svc = b.layer().layer(inner.clone());
    let p1 = b.try_permit().unwrap();
    let (open_c, gate_c) = oneshot::channel();
    let mut c = send(&mut svc, Req::new(0).gate(gate_c)).await;
    assert!(futures::poll!(&mut c).is_pending());
    drop(p1); // C granted, not picked up
    let mut s = svc.clone();
    let w = tokio::spawn(async move { s.ready().await.unwrap().call(Req::new(1)).await });
    while b.snapshot().waiting < 1 {
        tokio::task::yield_now().await;
    }
    assert!(futures::poll!(&mut c).is_pending(), "C picked up, running");
    let mut s = svc.clone();
    let n = tokio::spawn(async move { s.ready().await.unwrap().call(Req::new(2)).await });
    while b.snapshot().waiting < 2 {
        tokio::task::yield_now().await;
    }
    b.set_max_concurrent(3); // W and N granted, in that order
    assert_eq!(w.await.unwrap().unwrap(), 1);
    assert_eq!(n.await.unwrap().unwrap(), 2);
    open_c.send(()).unwrap();
    c.await.unwrap();
    assert_eq!(inner.starts(), vec![0, 1, 2], "N started before W");
    at_rest(&b, "end");
}

/// On a current-thread runtime the grant's wake may come from another
/// thread (a permit dropped in `spawn_blocking`, a bulkhead shared by
/// per-core runtimes): the newcomer's single yield does not order the
/// starts then (documented), but nothing hangs or runs twice.
#[tokio::test]
async fn fifo_when_the_grant_is_made_from_another_thread() {
    for round in 0..8 {
        let b = Bulkhead::builder(2).max_queue(4).build().unwrap();
        let inner = Inner::new();
        let svc = b.layer().layer(inner.clone());
        let p1 = b.try_permit().unwrap();
        let p2 = b.try_permit().unwrap();
        let mut s = svc.clone();
        let c = tokio::spawn(async move { s.ready().await.unwrap().call(Req::new(1)).await });
        while b.snapshot().waiting < 1 {
            tokio::task::yield_now().await;
        }
        std::thread::spawn(move || drop(p1)).join().unwrap(); // C granted
        drop(p2); // one permit free
        let mut s = svc.clone();
        let d = tokio::spawn(async move { s.ready().await.unwrap().call(Req::new(2)).await });
        let both = tokio::time::timeout(Duration::from_secs(10), async {
            (c.await.unwrap().unwrap(), d.await.unwrap().unwrap())
        })
        .await
        .expect("no hang");
        assert_eq!(both, (1, 2));
        // Both ran, once each; their order is not promised here (the
        // bulkhead's docs: start order follows grants on a current-thread
        // runtime when permits are released on its own thread).
        let mut starts = inner.starts();
        starts.sort_unstable();
        assert_eq!(starts, vec![1, 2], "round {round}");
        at_rest(&b, "end");
    }
}

// ---------------------------------------------------------------------------
// Multi-thread stress
// ---------------------------------------------------------------------------

/// 2 workers, 3,000 calls, limit 4: random drops (before the first poll,
/// after one poll, by `timeout`, by `select!` against a yield), random
/// `max_wait` expiries. The inner service never sees more than 4 at once,
/// the snapshot never shows more, and everything drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_two_workers_random_drops() {
    let b = Bulkhead::builder(4)
        .max_queue(100_000)
        .max_wait(Duration::from_millis(30))
        .build()
        .unwrap();
    let inner = Inner::new();
    let svc = b
        .layer()
        .ticket(|r: &Req| r.ticket.clone())
        .layer(inner.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let over = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (b, stop, over) = (b.clone(), stop.clone(), over.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if b.snapshot().in_flight > 4 {
                    over.fetch_add(1, Ordering::Relaxed);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let tickets: Vec<QueueTicket> = (0..3000).map(|_| QueueTicket::new()).collect();
    let run = async {
        let mut hs = Vec::new();
        for (i, t) in tickets.iter().enumerate() {
            let mut s = svc.clone();
            let t = t.clone();
            let mode = (i * 7919) % 6;
            let work_us = ((i * 104_729) % 700) as u64;
            hs.push(tokio::spawn(async move {
                let req = Req::new(i as u32)
                    .ticket(&t)
                    .work(Duration::from_micros(work_us));
                let s = s.ready().await.unwrap();
                let mut f = Box::pin(s.call(req));
                match mode {
                    0 => drop(f),
                    1 => {
                        let _ = futures::poll!(&mut f);
                        drop(f);
                    }
                    2 => {
                        let _ = tokio::time::timeout(Duration::from_micros(work_us), f).await;
                    }
                    3 => {
                        tokio::select! {
                            _ = &mut f => {}
                            _ = tokio::task::yield_now() => {}
                        }
                    }
                    _ => {
                        let _ = f.await;
                    }
                }
            }));
            if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        for h in hs {
            h.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("stress run hung");
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    assert!(
        inner.max_running() <= 4,
        "inner saw {}",
        inner.max_running()
    );
    assert_eq!(over.load(Ordering::Relaxed), 0, "snapshot above the limit");
    for (i, t) in tickets.iter().enumerate() {
        assert!(
            !matches!(t.status(), TicketStatus::Waiting(_) | TicketStatus::Idle),
            "ticket {i}: {:?}",
            t.status()
        );
    }
    at_rest(&b, "stress");
}

/// 2 workers with partitions (`max_per_key` 2, 5 tenants), priorities with
/// a `min_share` class and the limit moved up and down meanwhile; random
/// drops. Per-tenant cap held, never above the highest limit set, drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_partitions_shares_and_moving_limit() {
    let b = Bulkhead::builder(4)
        .max_per_key(2)
        .min_share(1.., 0.5)
        .max_queue(100_000)
        .max_wait(Duration::from_millis(40))
        .build()
        .unwrap();
    let inner = Inner::new();
    let svc = b
        .layer()
        .priority(|r: &Req| r.priority)
        .partition(|r: &Req| r.tenant)
        .layer(inner.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let mover = {
        let (b, stop) = (b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                b.set_max_concurrent([1, 6, 3, 0, 5, 2][(k % 6) as usize]);
                k += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let run = async {
        let mut hs = Vec::new();
        for i in 0..3000usize {
            let mut s = svc.clone();
            let mode = (i * 31) % 5;
            let work_us = ((i * 7717) % 500) as u64;
            hs.push(tokio::spawn(async move {
                let req = Req::new(i as u32)
                    .tenant((i % 5) as u32)
                    .priority((i % 3) as i32)
                    .work(Duration::from_micros(work_us));
                let s = s.ready().await.unwrap();
                let mut f = Box::pin(s.call(req));
                match mode {
                    0 => drop(f),
                    1 => {
                        let _ = futures::poll!(&mut f);
                        tokio::task::yield_now().await;
                        drop(f);
                    }
                    2 => {
                        let _ = tokio::time::timeout(Duration::from_micros(work_us), f).await;
                    }
                    _ => {
                        let _ = f.await;
                    }
                }
            }));
            if i % 32 == 0 {
                tokio::task::yield_now().await;
            }
        }
        for h in hs {
            h.await.unwrap();
        }
    };
    let r = tokio::time::timeout(Duration::from_secs(120), run).await;
    stop.store(true, Ordering::Relaxed);
    mover.await.unwrap();
    r.expect("stress run hung");
    b.set_max_concurrent(4);
    let seen = inner.seen.lock().unwrap();
    assert!(
        seen.max_per_tenant <= 2,
        "tenant held {}",
        seen.max_per_tenant
    );
    assert!(seen.max_running <= 6, "inner saw {}", seen.max_running);
    drop(seen);
    let s = b.snapshot();
    assert_eq!(s.class_in_flight, [0; 16]);
    assert_eq!(s.partitions, 0);
    at_rest(&b, "stress 2");
}

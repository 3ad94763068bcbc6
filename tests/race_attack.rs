//! Race attacks: real parallelism (multi-thread runtimes, 2 workers) against
//! ONE layer instance and its clones, with callers cancelled at random points.
//! Every scenario is seeded (`RACE_SEED=<n>` replays from that base seed;
//! `RACE_ITERS=<n>` changes the number of iterations) and asserts only
//! invariants the public docs promise, never wall-clock speed.
#![cfg(feature = "cache")]

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{service_fn, Layer, Service, ServiceExt};

use semaforo::{BoxError, RejectKind, Rejected};

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

fn base_seed() -> u64 {
    std::env::var("RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0000)
}

/// A multi-thread runtime; `RACE_WORKERS` workers (default 2; more than the
/// cores means preemption at arbitrary points).
fn rt() -> tokio::runtime::Runtime {
    let workers = std::env::var("RACE_WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

static CURRENT: Mutex<String> = Mutex::new(String::new());

/// Runs a test on [`rt`] with a watchdog thread that does not depend on the
/// runtime's timers (workers stuck in a loop or a lock stop those): past
/// 240 s it prints the scenario and seed running and aborts: a HANG.
fn run_test<F: Future<Output = ()>>(name: &'static str, f: F) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            rx.recv_timeout(Duration::from_secs(240))
        {
            eprintln!("HANG: test {name}, running {}", CURRENT.lock().unwrap());
            std::process::abort();
        }
    });
    rt().block_on(f);
    let _ = tx.send(());
    let _ = watchdog.join();
}

fn iters(default: u64) -> u64 {
    std::env::var("RACE_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `scenario` for `iters(n)` seeds from the base seed, each under
/// [`guarded`] (named `what` in its failure).
async fn each_seed<F: Future<Output = ()>>(what: &str, n: u64, scenario: impl Fn(u64) -> F) {
    let base = base_seed();
    for i in 0..iters(n) {
        let seed = base + i;
        guarded(what, seed, scenario(seed)).await;
    }
}

/// Runs one scenario body under a 60 s real-time guard: hitting it is a HANG.
async fn guarded<F: Future<Output = ()>>(what: &str, seed: u64, f: F) {
    *CURRENT.lock().unwrap() = format!("{what} seed={seed}");
    if tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .is_err()
    {
        panic!("HANG: {what} seed={seed} did not finish within 60 s");
    }
}

/// Polls the inner future at most `polls` times, then drops it (returns
/// `None`). With `self_wake`, every Pending wakes itself again, so the
/// future is dropped after exactly `polls` polls (spurious polls included).
struct CancelAfter<F> {
    fut: Option<Pin<Box<F>>>,
    polls: u32,
    self_wake: bool,
}

impl<F: Future> Future for CancelAfter<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.polls == 0 {
            self.fut = None;
            return Poll::Ready(None);
        }
        self.polls -= 1;
        let out = self
            .fut
            .as_mut()
            .expect("polled after done")
            .as_mut()
            .poll(cx);
        match out {
            Poll::Ready(v) => {
                self.fut = None;
                Poll::Ready(Some(v))
            }
            Poll::Pending => {
                if self.self_wake {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }
}

fn cancel_after<F: Future>(fut: F, polls: u32, self_wake: bool) -> CancelAfter<F> {
    CancelAfter {
        fut: Some(Box::pin(fut)),
        polls,
        self_wake,
    }
}

/// How a caller may be cancelled.
#[derive(Clone, Copy, Debug)]
enum Cancel {
    Never,
    AfterPolls(u32, bool),
    TimeoutMicros(u64),
}

fn pick_cancel(rng: &mut SmallRng, share: f64) -> Cancel {
    if !rng.random_bool(share) {
        return Cancel::Never;
    }
    match rng.random_range(0..3) {
        0 => Cancel::AfterPolls(rng.random_range(0..4), rng.random_bool(0.5)),
        1 => Cancel::AfterPolls(rng.random_range(1..20), true),
        _ => Cancel::TimeoutMicros(rng.random_range(1..300)),
    }
}

/// Runs `fut` under `cancel`; `None` when it was cancelled.
async fn run_cancel<F: Future>(fut: F, cancel: Cancel) -> Option<F::Output> {
    match cancel {
        Cancel::Never => Some(fut.await),
        Cancel::AfterPolls(n, w) => cancel_after(fut, n, w).await,
        Cancel::TimeoutMicros(us) => tokio::time::timeout(Duration::from_micros(us), fut)
            .await
            .ok(),
    }
}

/// Counts calls inside an inner service: entry bumps, drop (end or cancel)
/// decrements; the highest level seen is kept.
#[derive(Clone, Default)]
struct Gauge {
    now: Arc<AtomicU64>,
    max: Arc<AtomicU64>,
    entered: Arc<AtomicU64>,
}

struct GaugeGuard(Arc<AtomicU64>);
impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Gauge {
    fn enter(&self) -> GaugeGuard {
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
        self.entered.fetch_add(1, SeqCst);
        GaugeGuard(self.now.clone())
    }
    fn now(&self) -> u64 {
        self.now.load(SeqCst)
    }
    fn max(&self) -> u64 {
        self.max.load(SeqCst)
    }
    fn entered(&self) -> u64 {
        self.entered.load(SeqCst)
    }
}

/// Some real work inside an inner service: yields and, now and then, a
/// short real sleep.
async fn busy(work: u32) {
    for _ in 0..(work % 8) {
        tokio::task::yield_now().await;
    }
    if work % 5 == 0 {
        tokio::time::sleep(Duration::from_micros(u64::from(work) * 7)).await;
    }
}

fn reject_of(e: &BoxError) -> Option<&Rejected> {
    Rejected::from_box(e).or_else(|| Rejected::find(e.as_ref()))
}

#[derive(Clone, Debug)]
struct Req {
    key: u32,
    prio: i32,
    work: u32,
}

async fn drive<S>(mut svc: S, req: Req, cancel: Cancel) -> Option<Result<S::Response, BoxError>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    let fut = async move {
        svc.ready().await.map_err(Into::into)?;
        svc.call(req).await.map_err(Into::into)
    };
    run_cancel(fut, cancel).await
}

// ---------------------------------------------------------------------------
// Bulkhead
// ---------------------------------------------------------------------------

/// Many tasks, one bulkhead, random cancellation: never more than
/// `max_concurrent` inside, every permit and place back at the end, refusal
/// kinds and counts as documented.
async fn bulkhead_scenario(seed: u64) {
    use semaforo::bulkhead::Bulkhead;
    let mut rng = SmallRng::seed_from_u64(seed);
    let k: u32 = rng.random_range(1..6);
    let q: u32 = rng.random_range(0..60);
    let use_wait = rng.random_bool(0.5);
    let mut b = Bulkhead::builder(k).max_queue(q);
    if use_wait {
        b = b.max_wait(Duration::from_micros(rng.random_range(50..3_000)));
    }
    let bulkhead = b.build().unwrap();
    let gauge = Gauge::default();
    let g2 = gauge.clone();
    let svc = bulkhead.layer().layer(service_fn(move |r: Req| {
        let g = g2.clone();
        async move {
            let _in = g.enter();
            busy(r.work).await;
            Ok::<_, std::io::Error>(r.work)
        }
    }));
    let full = Arc::new(AtomicU64::new(0));
    let timed_out = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let tasks = rng.random_range(50..300);
    let mut handles = Vec::new();
    let mut aborts = Vec::new();
    for t in 0..tasks {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t as u64).wrapping_mul(0x9E37_79B9));
        let svc = svc.clone();
        let (full, timed_out, bad) = (full.clone(), timed_out.clone(), bad.clone());
        let bh = bulkhead.clone();
        let gauge = gauge.clone();
        let abort_it = trng.random_bool(0.1);
        let h = tokio::spawn(async move {
            for _ in 0..trng.random_range(1..6) {
                if trng.random_bool(0.05) {
                    // a permit taken without a call counts as in flight too
                    if let Ok(p) = bh.try_permit() {
                        let inside = gauge.enter();
                        busy(trng.random_range(0..20)).await;
                        // Out of the gauge before the permit goes back (as
                        // an inner call is, its future ending before the
                        // bulkhead releases): the other way round, a caller
                        // granted the freed permit could enter first.
                        drop(inside);
                        drop(p);
                    }
                    continue;
                }
                let req = Req {
                    key: 0,
                    prio: 0,
                    work: trng.random_range(0..40),
                };
                let cancel = pick_cancel(&mut trng, 0.3);
                match drive(svc.clone(), req.clone(), cancel).await {
                    None => {}
                    Some(Ok(w)) if w != req.work => bad
                        .lock()
                        .unwrap()
                        .push(format!("answer {w} for work {}", req.work)),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => match reject_of(&e) {
                        Some(r) if r.kind() == RejectKind::QueueFull => {
                            full.fetch_add(1, SeqCst);
                            match r.retry_after() {
                                Some(d) if d > Duration::ZERO => {}
                                other => bad
                                    .lock()
                                    .unwrap()
                                    .push(format!("QueueFull retry_after {other:?}")),
                            }
                        }
                        Some(r) if r.kind() == RejectKind::QueueTimeout && use_wait => {
                            timed_out.fetch_add(1, SeqCst);
                        }
                        _ => bad.lock().unwrap().push(format!("unexpected error {e}")),
                    },
                }
            }
        });
        if abort_it {
            aborts.push(h.abort_handle());
        }
        handles.push(h);
    }
    // abort some tasks at random moments
    for a in aborts {
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..200))).await;
        a.abort();
    }
    for h in handles {
        let _ = h.await;
    }
    let s = bulkhead.snapshot();
    let bad = bad.lock().unwrap().clone();
    assert!(bad.is_empty(), "seed={seed}: {bad:?}");
    assert!(
        gauge.max() <= u64::from(k),
        "seed={seed}: {} calls inside at once, max_concurrent {k}",
        gauge.max()
    );
    assert_eq!(gauge.now(), 0, "seed={seed}");
    assert_eq!(
        (s.in_flight, s.waiting, s.partitions),
        (0, 0, 0),
        "seed={seed}: leak after all tasks ended: {s:?}"
    );
    // every permit is really back: k free permits, then none
    let permits: Vec<_> = (0..k)
        .map(|i| {
            bulkhead
                .try_permit()
                .unwrap_or_else(|e| panic!("seed={seed}: permit {i}/{k} missing: {e} {s:?}"))
        })
        .collect();
    assert!(
        bulkhead.try_permit().is_err(),
        "seed={seed}: more than {k} permits"
    );
    drop(permits);
    // aborted tasks may have seen refusals we did not count; counted ones are a lower bound
    assert!(
        s.rejected_queue_full >= full.load(SeqCst),
        "seed={seed}: {s:?} vs {} seen",
        full.load(SeqCst)
    );
    assert!(
        s.rejected_queue_timeout >= timed_out.load(SeqCst),
        "seed={seed}: {s:?} vs {} seen",
        timed_out.load(SeqCst)
    );
    // one call still goes through
    let out = svc
        .clone()
        .oneshot(Req {
            key: 0,
            prio: 0,
            work: 1,
        })
        .await;
    assert!(out.is_ok(), "seed={seed}: {out:?}");
}

#[test]
fn bulkhead_limit_and_no_leak_under_cancellation() {
    run_test(
        "bulkhead_limit_and_no_leak_under_cancellation",
        each_seed("bulkhead_limit_and_no_leak", 60, bulkhead_scenario),
    );
}

/// FIFO (and strict priority): callers join the line one after another
/// (each polled once before the next is made), some leave at random while
/// the line drains on two worker threads; a limit of 1 grants one permit at
/// a time, so the calls must reach the inner service in line order.
async fn bulkhead_fifo_scenario(seed: u64, with_prio: bool) {
    use semaforo::bulkhead::Bulkhead;
    let mut rng = SmallRng::seed_from_u64(seed);
    let bulkhead = Bulkhead::builder(1)
        .max_queue(10_000)
        .priority_aging(None)
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::<(i32, u32)>::new()));
    let o2 = order.clone();
    let gauge = Gauge::default();
    let g2 = gauge.clone();
    let layer = bulkhead.layer().priority(|r: &Req| r.prio);
    let svc = layer.layer(service_fn(move |r: Req| {
        let o = o2.clone();
        let g = g2.clone();
        async move {
            let _in = g.enter();
            o.lock().unwrap().push((r.prio, r.key));
            busy(r.work).await;
            Ok::<_, std::io::Error>(())
        }
    }));
    let holder = bulkhead.try_permit().unwrap();
    let n = rng.random_range(20..200);
    let mut handles = Vec::new();
    for i in 0..n {
        let prio = if with_prio { rng.random_range(0..3) } else { 0 };
        let req = Req {
            key: i,
            prio,
            work: rng.random_range(0..30),
        };
        let mut s = svc.clone();
        let mut fut = Box::pin(async move {
            s.ready().await.unwrap();
            s.call(req).await
        });
        // join the line now, with this task's waker; the task spawned below
        // polls it next with its own.
        assert!(
            futures::poll!(fut.as_mut()).is_pending(),
            "seed={seed}: admitted past a held permit"
        );
        let cancel = pick_cancel(&mut rng, 0.2);
        handles.push(tokio::spawn(async move { run_cancel(fut, cancel).await }));
    }
    assert!(bulkhead.snapshot().waiting <= u64::from(n), "seed={seed}");
    drop(holder);
    for h in handles {
        let r = h.await.unwrap();
        if let Some(Err(e)) = r {
            panic!("seed={seed}: {e}");
        }
    }
    let order = order.lock().unwrap().clone();
    // expected: by priority (higher first), then arrival
    for w in order.windows(2) {
        let ((p0, k0), (p1, k1)) = (w[0], w[1]);
        let ok = if with_prio {
            p0 > p1 || (p0 == p1 && k0 < k1)
        } else {
            k0 < k1
        };
        assert!(
            ok,
            "seed={seed}: out of order: {:?} then {:?} in {:?}",
            w[0], w[1], order
        );
    }
    assert!(gauge.max() <= 1, "seed={seed}");
    let s = bulkhead.snapshot();
    assert_eq!((s.in_flight, s.waiting), (0, 0), "seed={seed}: {s:?}");
}

#[test]
fn bulkhead_fifo_and_priority_order_across_threads() {
    run_test(
        "bulkhead_fifo_and_priority_order_across_threads",
        bulkhead_fifo_and_priority_order_across_threads_body(),
    );
}

async fn bulkhead_fifo_and_priority_order_across_threads_body() {
    let base = base_seed();
    for i in 0..iters(60) {
        let seed = base + i;
        guarded("bulkhead_fifo", seed, bulkhead_fifo_scenario(seed, false)).await;
        guarded("bulkhead_prio", seed, bulkhead_fifo_scenario(seed, true)).await;
    }
}

/// Partitions, priorities with aging, min shares: per-key caps and the
/// global limit hold, and every class / partition count is back to 0.
async fn bulkhead_partition_scenario(seed: u64) {
    use semaforo::bulkhead::Bulkhead;
    let mut rng = SmallRng::seed_from_u64(seed);
    let k: u32 = rng.random_range(2..8);
    let per_key: u32 = rng.random_range(1..=k);
    let keys: u32 = rng.random_range(1..6);
    let mut b = Bulkhead::builder(k)
        .max_queue(rng.random_range(0..100))
        .max_per_key(per_key)
        .priority_aging(Some(Duration::from_micros(rng.random_range(1..500))));
    let shares = rng.random_bool(0.5);
    if shares {
        b = b.min_share(1.., 0.5).min_share(..=0, 0.25);
    }
    if rng.random_bool(0.5) {
        b = b.max_wait(Duration::from_micros(rng.random_range(100..5_000)));
    }
    let bulkhead = b.build().unwrap();
    let gauge = Gauge::default();
    let per: Arc<Vec<Gauge>> = Arc::new((0..keys).map(|_| Gauge::default()).collect());
    let (g2, p2) = (gauge.clone(), per.clone());
    let layer = bulkhead
        .layer()
        .priority(|r: &Req| r.prio)
        .partition(|r: &Req| r.key);
    let svc = layer.layer(service_fn(move |r: Req| {
        let g = g2.clone();
        let p = p2.clone();
        async move {
            let _a = g.enter();
            let _b = p[r.key as usize].enter();
            busy(r.work).await;
            Ok::<_, std::io::Error>(())
        }
    }));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(50..250) {
        let mut trng = SmallRng::seed_from_u64(seed.rotate_left(7) ^ t);
        let svc = svc.clone();
        let bad = bad.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..trng.random_range(1..5) {
                let req = Req {
                    key: trng.random_range(0..keys),
                    prio: trng.random_range(-1..3),
                    work: trng.random_range(0..40),
                };
                let cancel = pick_cancel(&mut trng, 0.3);
                if let Some(Err(e)) = drive(svc.clone(), req, cancel).await {
                    match reject_of(&e).map(|r| r.kind()) {
                        Some(RejectKind::QueueFull | RejectKind::QueueTimeout) => {}
                        _ => bad.lock().unwrap().push(format!("{e}")),
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(bad.is_empty(), "seed={seed}: {bad:?}");
    assert!(
        gauge.max() <= u64::from(k),
        "seed={seed}: {} inside, limit {k}",
        gauge.max()
    );
    for (i, g) in per.iter().enumerate() {
        assert!(
            g.max() <= u64::from(per_key),
            "seed={seed}: key {i} had {} inside, max_per_key {per_key}",
            g.max()
        );
    }
    let s = bulkhead.snapshot();
    assert_eq!(
        (s.in_flight, s.waiting, s.partitions),
        (0, 0, 0),
        "seed={seed}: {s:?}"
    );
    assert_eq!(s.class_in_flight, [0; 16], "seed={seed}: {s:?}");
    let permits: Vec<_> = (0..k)
        .map(|i| {
            bulkhead
                .try_permit()
                .unwrap_or_else(|e| panic!("seed={seed}: permit {i}/{k}: {e} {s:?}"))
        })
        .collect();
    drop(permits);
    // each key can still get max_per_key calls in at once
    for key in 0..keys {
        let hold = Arc::new(tokio::sync::Barrier::new(per_key as usize + 1));
        let mut hs = Vec::new();
        for _ in 0..per_key {
            let hold = hold.clone();
            let b2 = bulkhead.clone();
            let gate = service_fn(move |_r: Req| {
                let hold = hold.clone();
                async move {
                    hold.wait().await;
                    Ok::<_, std::io::Error>(())
                }
            });
            let svc = b2.layer().partition(|r: &Req| r.key).layer(gate);
            hs.push(tokio::spawn(svc.oneshot(Req {
                key,
                prio: 0,
                work: 0,
            })));
        }
        hold.wait().await; // all per_key calls of this key are inside at once
        for h in hs {
            h.await.unwrap().unwrap();
        }
    }
}

#[test]
fn bulkhead_partitions_priorities_shares() {
    run_test(
        "bulkhead_partitions_priorities_shares",
        each_seed("bulkhead_partitions", 60, bulkhead_partition_scenario),
    );
}

/// The limit moved at run time while calls run and leave; then close()
/// while callers wait: every waiter is answered, none enters after close()
/// returned, nothing leaks, nothing hangs.
async fn bulkhead_resize_close_scenario(seed: u64) {
    use semaforo::bulkhead::{Aimd, Bulkhead, Gradient2, Vegas};
    let mut rng = SmallRng::seed_from_u64(seed);
    let k: u32 = rng.random_range(2..10);
    let mut b = Bulkhead::builder(k)
        .max_queue(rng.random_range(1..200))
        .sample_every(1);
    match rng.random_range(0..4) {
        0 => {}
        1 => {
            b = b.limit(
                Aimd::new()
                    .min(1)
                    .latency_threshold(Duration::from_micros(300)),
            )
        }
        2 => b = b.limit(Vegas::new().min(1)),
        _ => b = b.limit(Gradient2::new().min(1)),
    }
    let bulkhead = b.build().unwrap();
    let closed_at = Arc::new(AtomicBool::new(false));
    let after_close = Arc::new(AtomicU64::new(0));
    let gauge = Gauge::default();
    let (g2, c2, a2) = (gauge.clone(), closed_at.clone(), after_close.clone());
    let svc = bulkhead.layer().layer(service_fn(move |r: Req| {
        let g = g2.clone();
        let closed = c2.load(SeqCst);
        if closed {
            a2.fetch_add(1, SeqCst);
        }
        async move {
            let _in = g.enter();
            busy(r.work).await;
            if r.work % 11 == 0 {
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "drop",
                ))
            } else {
                Ok::<_, std::io::Error>(())
            }
        }
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(50..200) {
        let mut trng = SmallRng::seed_from_u64(seed.wrapping_mul(31) ^ t);
        let (svc, stop, bad, closed_at) =
            (svc.clone(), stop.clone(), bad.clone(), closed_at.clone());
        handles.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                let was_closed = closed_at.load(SeqCst);
                let req = Req {
                    key: 0,
                    prio: 0,
                    work: trng.random_range(0..40),
                };
                let cancel = pick_cancel(&mut trng, 0.25);
                match drive(svc.clone(), req, cancel).await {
                    Some(Err(e)) => match reject_of(&e).map(|r| r.kind()) {
                        Some(RejectKind::ShuttingDown) => {}
                        Some(RejectKind::QueueFull | RejectKind::QueueTimeout) if !was_closed => {}
                        None if e.to_string().contains("drop") => {}
                        other => bad
                            .lock()
                            .unwrap()
                            .push(format!("{other:?}: {e} (closed before call: {was_closed})")),
                    },
                    Some(Ok(())) if was_closed => bad
                        .lock()
                        .unwrap()
                        .push("a call made after close() succeeded".into()),
                    _ => {}
                }
                if was_closed {
                    break;
                }
                // a refusal is Ready at once: let the worker run others (and the timers)
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut max_set = k;
    for _ in 0..rng.random_range(5..40) {
        tokio::time::sleep(Duration::from_micros(rng.random_range(10..400))).await;
        let n = rng.random_range(0..=k + 2);
        max_set = max_set.max(n);
        bulkhead.set_max_concurrent(n);
    }
    bulkhead.set_max_concurrent(k);
    tokio::time::sleep(Duration::from_micros(rng.random_range(10..2_000))).await;
    let inside_before = gauge.entered();
    bulkhead.close();
    closed_at.store(true, SeqCst);
    stop.store(true, SeqCst);
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(bad.is_empty(), "seed={seed}: {bad:?}");
    assert!(
        gauge.max() <= u64::from(max_set),
        "seed={seed}: {} inside, highest limit set {max_set}",
        gauge.max()
    );
    // (a call admitted before close() may reach the inner service after it:
    // not asserted; the callers' side checks that no call made after close() succeeds)
    let _ = (after_close.load(SeqCst), inside_before);
    let s = bulkhead.snapshot();
    assert!(s.closed);
    assert_eq!((s.in_flight, s.waiting), (0, 0), "seed={seed}: {s:?}");
}

#[test]
fn bulkhead_resize_adaptive_and_close() {
    run_test(
        "bulkhead_resize_adaptive_and_close",
        each_seed("bulkhead_resize_close", 40, bulkhead_resize_close_scenario),
    );
}

// ---------------------------------------------------------------------------
// Rate limits: RateLimit (one GCRA cell) and keyed Quota (+ global, wait mode)
// ---------------------------------------------------------------------------

/// An admission seen by a caller: the instant before it asked and the
/// instant after it was told yes (the real admission lies in between), and
/// its weight.
#[derive(Clone, Copy, Debug)]
struct Adm {
    before: tokio::time::Instant,
    after: tokio::time::Instant,
    n: u64,
}

/// Checks "over any window of length W at most count·W/per + burst" from
/// the callers' side, without false positives: an admission certainly in
/// [T0, T] is one with `before ≥ T0` and `after ≤ T`. Windows start at
/// every `before` (sampled) and end at every `after`. Also the cumulative
/// bound from `start` (the cell was full then). Returns a violation.
fn check_rate(
    adms: &[Adm],
    start: tokio::time::Instant,
    count: u64,
    per: Duration,
    burst: u64,
) -> Option<String> {
    let rate = count as f64 / per.as_secs_f64();
    let slack = 1e-6; // nanosecond rounding of the refill
                      // cumulative from start, by `after`
    let mut by_after: Vec<Adm> = adms.to_vec();
    by_after.sort_by_key(|a| a.after);
    let mut sum = 0u64;
    for a in &by_after {
        sum += a.n;
        let allowed = burst as f64 + rate * (a.after - start).as_secs_f64() + slack;
        if sum as f64 > allowed.floor() + 0.0 && sum as f64 > allowed {
            return Some(format!("{sum} units admitted by {:?} after start; at most {allowed:.3} (burst {burst}, {count}/{per:?})", a.after - start));
        }
    }
    let mut by_before: Vec<Adm> = adms.to_vec();
    by_before.sort_by_key(|a| a.before);
    let step = (by_before.len() / 64).max(1);
    for i in (0..by_before.len()).step_by(step) {
        let t0 = by_before[i].before;
        let mut ends: Vec<Adm> = by_before[i..].to_vec();
        ends.sort_by_key(|a| a.after);
        let mut s = 0u64;
        for a in &ends {
            s += a.n;
            let allowed = burst as f64 + rate * (a.after - t0).as_secs_f64() + slack;
            if s as f64 > allowed {
                return Some(format!("{s} units admitted within a window of {:?}; at most {allowed:.3} (burst {burst}, {count}/{per:?})", a.after - t0));
            }
        }
    }
    None
}

async fn rate_limit_scenario(seed: u64) {
    use semaforo::quota::{Rate, RateLimit};
    let mut rng = SmallRng::seed_from_u64(seed);
    let count: u32 = rng.random_range(100..5_000);
    let burst: u32 = rng.random_range(1..20);
    let per = Duration::from_secs(1);
    let start = tokio::time::Instant::now();
    let limit = RateLimit::builder(Rate::new(count, per).burst(burst))
        .build()
        .unwrap();
    let svc = limit.layer().layer(service_fn(|r: Req| async move {
        Ok::<_, std::io::Error>(r.work)
    }));
    let adms = Arc::new(Mutex::new(Vec::<Adm>::new()));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let run_for = Duration::from_millis(rng.random_range(20..60));
    let max_excess = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(4..32) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 20));
        let (limit, svc, adms, bad, max_excess) = (
            limit.clone(),
            svc.clone(),
            adms.clone(),
            bad.clone(),
            max_excess.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while start.elapsed() < run_for {
                let before = tokio::time::Instant::now();
                let (res, n) = match trng.random_range(0..3) {
                    0 => (limit.try_take(), 1),
                    1 => {
                        let n = trng.random_range(1..=burst + 1);
                        (limit.try_take_n(n), u64::from(n))
                    }
                    _ => {
                        let r = drive(svc.clone(), Req { key: 0, prio: 0, work: 1 }, Cancel::Never).await.unwrap();
                        (r.map(|_| ()).map_err(|e| reject_of(&e).cloned().unwrap_or_else(|| panic!("{e}"))), 1)
                    }
                };
                let after = tokio::time::Instant::now();
                match res {
                    Ok(()) => mine.push(Adm { before, after, n }),
                    Err(r) => {
                        if r.kind() != RejectKind::QuotaExceeded {
                            bad.lock().unwrap().push(format!("kind {:?}", r.kind()));
                        }
                        match r.retry_after() {
                            Some(d) if n <= u64::from(burst) && d > Duration::ZERO => {
                                // At most the refill of n units, counted from the limit's own
                                // clock read, somewhere in [before, after]: an admission by
                                // another thread up to `after` may have filled the cell since
                                // (tat − τ ≤ its instant ≤ after), so the sound bound is the
                                // refill plus after − before (and 1 µs of rounding).
                                let most = per.mul_f64(n as f64 / f64::from(count));
                                let excess = d.saturating_sub(most);
                                max_excess.fetch_max(excess.as_nanos() as u64, SeqCst);
                                if excess > (after - before) + Duration::from_micros(1) {
                                    bad.lock().unwrap().push(format!("weight {n}: retry_after {d:?}, refill of {n} units is {most:?}"));
                                }
                            }
                            None if n > u64::from(burst) => {}
                            other => bad.lock().unwrap().push(format!("weight {n} burst {burst}: retry_after {other:?}")),
                        }
                    }
                }
                if trng.random_bool(0.3) {
                    tokio::task::yield_now().await;
                }
            }
            adms.lock().unwrap().extend(mine);
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {:?}",
        &bad[..bad.len().min(5)]
    );
    let ex = max_excess.load(SeqCst);
    if ex > 0 {
        eprintln!("rate_limit seed={seed}: retry_after exceeded the refill time by up to {:?} ({count}/s, burst {burst})", Duration::from_nanos(ex));
    }
    let adms = adms.lock().unwrap().clone();
    assert!(!adms.is_empty(), "seed={seed}: nothing admitted");
    if let Some(v) = check_rate(&adms, start, u64::from(count), per, u64::from(burst)) {
        panic!("seed={seed}: RateLimit over-admitted: {v}");
    }
}

#[test]
fn rate_limit_never_over_admits() {
    run_test(
        "rate_limit_never_over_admits",
        each_seed("rate_limit", 30, rate_limit_scenario),
    );
}

async fn quota_scenario(seed: u64) {
    use semaforo::quota::{PlanId, Quota, Rate};
    let mut rng = SmallRng::seed_from_u64(seed);
    let per = Duration::from_secs(1);
    let (kc, kb): (u32, u32) = (rng.random_range(200..3_000), rng.random_range(3..8));
    let (gc, gb): (u32, u32) = (rng.random_range(500..8_000), rng.random_range(3..20));
    let keys: u32 = rng.random_range(1..6);
    let wait_mode = rng.random_bool(0.5);
    let weighted = rng.random_bool(0.5);
    let start = tokio::time::Instant::now();
    let mut b = Quota::builder()
        .plan("p", Rate::new(kc, per).burst(kb))
        .global(Rate::new(gc, per).burst(gb));
    if wait_mode {
        b = b.max_wait(Duration::from_millis(rng.random_range(1..10)));
    }
    let quota = b.build::<u32>().unwrap();
    // admissions as the inner service sees them: (key, before, entered, weight)
    let adms = Arc::new(Mutex::new(Vec::<(
        u32,
        tokio::time::Instant,
        tokio::time::Instant,
        u64,
    )>::new()));
    let a2 = adms.clone();
    let inner = service_fn(move |r: (Req, tokio::time::Instant)| {
        let a = a2.clone();
        async move {
            let w = if weighted {
                u64::from(r.0.work % 3 + 1)
            } else {
                1
            };
            a.lock()
                .unwrap()
                .push((r.0.key, r.1, tokio::time::Instant::now(), w));
            Ok::<_, std::io::Error>(())
        }
    });
    let layer = quota.layer(|r: &(Req, tokio::time::Instant)| (r.0.key, PlanId::FIRST));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let made = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_millis(rng.random_range(20..60));
    let mut handles = Vec::new();
    macro_rules! hammer {
        ($svc:expr) => {
            for t in 0..rng.random_range(4..64) {
                let mut trng = SmallRng::seed_from_u64(seed ^ (t << 24));
                let (svc, bad, made) = ($svc.clone(), bad.clone(), made.clone());
                handles.push(tokio::spawn(async move {
                    while start.elapsed() < run_for {
                        let req = Req {
                            key: trng.random_range(0..keys),
                            prio: 0,
                            work: trng.random_range(0..99),
                        };
                        let cancel = pick_cancel(&mut trng, if wait_mode { 0.3 } else { 0.0 });
                        made.fetch_add(1, SeqCst);
                        let now = tokio::time::Instant::now();
                        let mut s = svc.clone();
                        let fut = async move {
                            s.ready().await?;
                            s.call((req, now)).await
                        };
                        if let Some(Err(e)) = run_cancel(fut, cancel).await {
                            match reject_of(&e) {
                                Some(r) if r.kind() == RejectKind::QuotaExceeded => {
                                    if r.retry_after().is_none() {
                                        bad.lock()
                                            .unwrap()
                                            .push("QuotaExceeded without retry_after".to_string());
                                    }
                                }
                                _ => bad.lock().unwrap().push(format!("{e}")),
                            }
                        }
                        if trng.random_bool(0.3) {
                            tokio::task::yield_now().await;
                        }
                    }
                }));
            }
        };
    }
    if weighted {
        let svc = layer
            .cost(|r: &(Req, tokio::time::Instant)| r.0.work % 3 + 1)
            .layer(inner);
        hammer!(svc);
    } else {
        let svc = layer.layer(inner);
        hammer!(svc);
    }
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed} wait={wait_mode}: {:?}",
        &bad[..bad.len().min(5)]
    );
    let adms = adms.lock().unwrap().clone();
    let all: Vec<Adm> = adms
        .iter()
        .map(|&(_, before, after, n)| Adm { before, after, n })
        .collect();
    if let Some(v) = check_rate(&all, start, u64::from(gc), per, u64::from(gb)) {
        panic!("seed={seed} wait={wait_mode} weighted={weighted}: global limit over-admitted: {v}");
    }
    for key in 0..keys {
        let mine: Vec<Adm> = adms
            .iter()
            .filter(|a| a.0 == key)
            .map(|&(_, before, after, n)| Adm { before, after, n })
            .collect();
        if let Some(v) = check_rate(&mine, start, u64::from(kc), per, u64::from(kb)) {
            panic!(
                "seed={seed} wait={wait_mode} weighted={weighted}: key {key} over-admitted: {v}"
            );
        }
    }
    let s = quota.snapshot();
    assert_eq!(s.waiting, 0, "seed={seed}: {s:?}");
    assert!(
        s.admitted >= adms.len() as u64,
        "seed={seed}: snapshot admitted {} < {} seen inside",
        s.admitted,
        adms.len()
    );
    assert!(
        s.admitted + s.rejected <= made.load(SeqCst),
        "seed={seed}: {s:?} vs {} calls made",
        made.load(SeqCst)
    );
}

#[test]
fn quota_keyed_global_wait_never_over_admit() {
    run_test(
        "quota_keyed_global_wait_never_over_admit",
        each_seed("quota", 30, quota_scenario),
    );
}

// ---------------------------------------------------------------------------
// Pace: one pacer, a keyed pacer with shared limits
// ---------------------------------------------------------------------------

async fn pace_scenario(seed: u64) {
    use semaforo::pace::{Cost, Limit, Pace, Unit};
    let mut rng = SmallRng::seed_from_u64(seed);
    let per = Duration::from_secs(1);
    let (rn, rb): (u64, u64) = (rng.random_range(200..3_000), rng.random_range(1..10));
    let (tn, tb): (u64, u64) = (rng.random_range(2_000..50_000), rng.random_range(50..500));
    let start = tokio::time::Instant::now();
    let mut b = Pace::builder()
        .limit(Limit::new(Unit::Requests, rn, per).burst(rb))
        .limit(Limit::new(Unit::Tokens, tn, per).burst(tb));
    let max_wait = rng.random_bool(0.5);
    if max_wait {
        b = b.max_wait(Duration::from_millis(rng.random_range(1..20)));
    }
    let pace = b.build().unwrap();
    let adms = Arc::new(Mutex::new(Vec::<(
        tokio::time::Instant,
        tokio::time::Instant,
        u64,
    )>::new()));
    let a2 = adms.clone();
    let inner = service_fn(move |r: (Req, tokio::time::Instant)| {
        let a = a2.clone();
        async move {
            a.lock()
                .unwrap()
                .push((r.1, tokio::time::Instant::now(), u64::from(r.0.work)));
            busy(r.0.work).await;
            Ok::<_, std::io::Error>(())
        }
    });
    let svc = pace
        .layer()
        .weigh(|r: &(Req, tokio::time::Instant)| Cost::tokens(u64::from(r.0.work)))
        .layer(inner);
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let run_for = Duration::from_millis(rng.random_range(20..80));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(4..100) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 28));
        let (svc, bad) = (svc.clone(), bad.clone());
        let tb32 = tb as u32;
        handles.push(tokio::spawn(async move {
            while start.elapsed() < run_for {
                // now and then a cost above the token burst: refused at once, no retry_after
                let work = if trng.random_bool(0.02) {
                    tb32 + 1
                } else {
                    trng.random_range(1..=tb32)
                };
                let req = Req {
                    key: 0,
                    prio: 0,
                    work,
                };
                let cancel = pick_cancel(&mut trng, 0.3);
                let now = tokio::time::Instant::now();
                let mut s = svc.clone();
                let fut = async move {
                    s.ready().await?;
                    s.call((req, now)).await
                };
                if let Some(Err(e)) = run_cancel(fut, cancel).await {
                    match reject_of(&e) {
                        Some(r) if r.kind() == RejectKind::BudgetExceeded => {
                            let ok = if work > tb32 {
                                r.retry_after().is_none()
                            } else {
                                max_wait && r.retry_after().is_some_and(|d| d > Duration::ZERO)
                            };
                            if !ok {
                                bad.lock().unwrap().push(format!(
                                    "work {work}: {r} retry_after {:?}",
                                    r.retry_after()
                                ));
                            }
                        }
                        _ => bad.lock().unwrap().push(format!("work {work}: {e}")),
                    }
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {:?}",
        &bad[..bad.len().min(5)]
    );
    let adms = adms.lock().unwrap().clone();
    let reqs: Vec<Adm> = adms
        .iter()
        .map(|&(before, after, _)| Adm {
            before,
            after,
            n: 1,
        })
        .collect();
    let toks: Vec<Adm> = adms
        .iter()
        .map(|&(before, after, n)| Adm { before, after, n })
        .collect();
    if let Some(v) = check_rate(&reqs, start, rn, per, rb) {
        panic!("seed={seed}: pacer over-admitted requests: {v}");
    }
    if let Some(v) = check_rate(&toks, start, tn, per, tb) {
        panic!("seed={seed}: pacer over-admitted tokens: {v}");
    }
    let s = pace.snapshot();
    assert_eq!(s.waiting, 0, "seed={seed}: {s:?}");
}

#[test]
fn pace_never_over_admits_under_cancellation() {
    run_test(
        "pace_never_over_admits_under_cancellation",
        each_seed("pace", 30, pace_scenario),
    );
}

/// The pacer's line is FIFO: a big call at the head holds back smaller ones
/// behind it. Callers join one after another (polled once each), some
/// leave; slots are several ms apart, so the calls that go must reach the
/// inner service in arrival order.
async fn pace_fifo_scenario(seed: u64) {
    use semaforo::pace::{Cost, Limit, Pace, Unit};
    let mut rng = SmallRng::seed_from_u64(seed);
    // 200 tokens a second, burst 10: a call of w tokens waits w × 5 ms.
    let pace = Pace::builder()
        .limit(Limit::new(Unit::Tokens, 200, Duration::from_secs(1)).burst(10))
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::<u32>::new()));
    let o2 = order.clone();
    let svc = pace
        .layer()
        .weigh(|r: &Req| Cost::tokens(u64::from(r.work)))
        .layer(service_fn(move |r: Req| {
            o2.lock().unwrap().push(r.key);
            async { Ok::<_, std::io::Error>(()) }
        }));
    // spend the burst so that everyone waits
    svc.clone()
        .oneshot(Req {
            key: u32::MAX,
            prio: 0,
            work: 10,
        })
        .await
        .unwrap();
    order.lock().unwrap().clear();
    let n = rng.random_range(5..25);
    let mut handles = Vec::new();
    for i in 0..n {
        let req = Req {
            key: i,
            prio: 0,
            work: rng.random_range(1..=3),
        };
        let mut s = svc.clone();
        let mut fut = Box::pin(async move {
            s.ready().await.unwrap();
            s.call(req).await
        });
        assert!(
            futures::poll!(fut.as_mut()).is_pending(),
            "seed={seed}: went past a spent budget"
        );
        let cancel = if rng.random_bool(0.2) {
            Cancel::TimeoutMicros(rng.random_range(1..20_000))
        } else {
            Cancel::Never
        };
        handles.push(tokio::spawn(async move { run_cancel(fut, cancel).await }));
    }
    for h in handles {
        if let Some(Err(e)) = h.await.unwrap() {
            panic!("seed={seed}: {e}");
        }
    }
    let order = order.lock().unwrap().clone();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "seed={seed}: pacer line out of order: {order:?}"
    );
    assert_eq!(pace.snapshot().waiting, 0, "seed={seed}");
}

#[test]
fn pace_fifo_line_across_threads() {
    run_test(
        "pace_fifo_line_across_threads",
        each_seed("pace_fifo", 8, pace_fifo_scenario),
    );
}

/// A keyed pacer with shared limits and few places (idle keys give their
/// place): each key's own limit and the shared one hold over the run.
async fn keyed_pace_scenario(seed: u64, run_for: Duration) {
    use semaforo::pace::{Cost, KeyedPace, Limit, Pace, Unit};
    let mut rng = SmallRng::seed_from_u64(seed);
    let per = Duration::from_secs(1);
    let (kn, kb): (u64, u64) = (rng.random_range(50..800), rng.random_range(1..6));
    let (sn, sb): (u64, u64) = (rng.random_range(200..3_000), rng.random_range(2..12));
    let keys: u32 = rng.random_range(2..7);
    let max_keys: usize = rng.random_range(1..4);
    let start = tokio::time::Instant::now();
    let kp =
        KeyedPace::builder(Pace::builder().limit(Limit::new(Unit::Requests, kn, per).burst(kb)))
            .shared(Pace::builder().limit(Limit::new(Unit::Requests, sn, per).burst(sb)))
            .max_keys(max_keys)
            .build()
            .unwrap();
    let adms = Arc::new(Mutex::new(Vec::<(
        u32,
        tokio::time::Instant,
        tokio::time::Instant,
    )>::new()));
    let a2 = adms.clone();
    let inner = service_fn(move |r: (Req, tokio::time::Instant)| {
        let a = a2.clone();
        async move {
            a.lock()
                .unwrap()
                .push((r.0.key, r.1, tokio::time::Instant::now()));
            busy(r.0.work).await;
            Ok::<_, std::io::Error>(())
        }
    });
    let svc = kp
        .layer()
        .key(|r: &(Req, tokio::time::Instant)| Some(format!("k{}", r.0.key)))
        .weigh(|_: &(Req, tokio::time::Instant)| Cost::requests(1))
        .layer(inner);
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(4..60) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 33));
        let (svc, bad) = (svc.clone(), bad.clone());
        handles.push(tokio::spawn(async move {
            while start.elapsed() < run_for {
                // bursts of calls on one key, then quiet stretches (so keys go idle)
                let req = Req {
                    key: trng.random_range(0..keys),
                    prio: 0,
                    work: trng.random_range(0..30),
                };
                let cancel = pick_cancel(&mut trng, 0.3);
                let now = tokio::time::Instant::now();
                let mut s = svc.clone();
                let fut = async move {
                    s.ready().await?;
                    s.call((req, now)).await
                };
                if let Some(Err(e)) = run_cancel(fut, cancel).await {
                    bad.lock().unwrap().push(format!("{e}"));
                }
                tokio::task::yield_now().await;
                if trng.random_bool(0.05) {
                    tokio::time::sleep(Duration::from_millis(trng.random_range(1..30))).await;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {:?}",
        &bad[..bad.len().min(5)]
    );
    let adms = adms.lock().unwrap().clone();
    let all: Vec<Adm> = adms
        .iter()
        .map(|&(_, before, after)| Adm {
            before,
            after,
            n: 1,
        })
        .collect();
    if let Some(v) = check_rate(&all, start, sn, per, sb) {
        panic!("seed={seed}: shared limit over-admitted: {v}");
    }
    for key in 0..keys {
        let mine: Vec<Adm> = adms
            .iter()
            .filter(|a| a.0 == key)
            .map(|&(_, before, after)| Adm {
                before,
                after,
                n: 1,
            })
            .collect();
        if let Some(v) = check_rate(&mine, start, kn, per, kb) {
            panic!("seed={seed} (max_keys {max_keys}, {keys} keys): key k{key} over-admitted: {v}");
        }
    }
}

#[test]
fn keyed_pace_shared_and_per_key_limits_hold() {
    run_test(
        "keyed_pace_shared_and_per_key_limits_hold",
        keyed_pace_shared_and_per_key_limits_hold_body(),
    );
}

async fn keyed_pace_shared_and_per_key_limits_hold_body() {
    let base = base_seed();
    for i in 0..iters(20) {
        let seed = base + i;
        guarded(
            "keyed_pace",
            seed,
            keyed_pace_scenario(seed, Duration::from_millis(60)),
        )
        .await;
    }
    // long enough for idle keys to give their place (looked for once a second)
    for i in 0..(iters(20) / 10).max(1) {
        let seed = base + 1_000 + i;
        guarded(
            "keyed_pace_long",
            seed,
            keyed_pace_scenario(seed, Duration::from_millis(2_500)),
        )
        .await;
    }
}

// ---------------------------------------------------------------------------
// Breaker
// ---------------------------------------------------------------------------

type Transitions = Arc<
    Mutex<
        Vec<(
            semaforo::breaker::BreakerState,
            semaforo::breaker::BreakerState,
            String,
        )>,
    >,
>;

fn transition_listener(
    log: &Transitions,
) -> impl Fn(&semaforo::observe::Event<'_>) + Send + Sync + 'static {
    let log = log.clone();
    move |e: &semaforo::observe::Event<'_>| {
        if let semaforo::observe::EventKind::BreakerTransition { from, to, reason } = &e.kind {
            log.lock()
                .unwrap()
                .push((*from, *to, reason.as_str().to_string()));
        }
    }
}

fn check_chain(
    seed: u64,
    log: &[(
        semaforo::breaker::BreakerState,
        semaforo::breaker::BreakerState,
        String,
    )],
) {
    use semaforo::breaker::BreakerState as St;
    let mut cur = St::Closed;
    for (i, (from, to, why)) in log.iter().enumerate() {
        assert_eq!(*from, cur, "seed={seed}: transition {i} ({from:?}→{to:?}, {why}) does not start where the last ended; chain {log:?}");
        assert_ne!(
            from, to,
            "seed={seed}: transition {i} to the same state: {log:?}"
        );
        cur = *to;
    }
}

/// An upstream that always fails: after the first trip every admitted call
/// is a probe, so at most `probes` are inside at once; the transitions form
/// one chain and never close.
async fn breaker_probe_scenario(seed: u64) {
    use semaforo::breaker::{Breaker, BreakerState as St};
    let mut rng = SmallRng::seed_from_u64(seed);
    let probes: u32 = rng.random_range(1..4);
    let open_for = Duration::from_millis(rng.random_range(5..20));
    let log: Transitions = Arc::default();
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(open_for)
        .half_open_probes(probes)
        .on_event(transition_listener(&log))
        .build()
        .unwrap();
    let gauge = Gauge::default();
    let longest = Arc::new(AtomicU64::new(0));
    let g2 = gauge.clone();
    let inner = breaker.layer().layer(service_fn(move |r: Req| {
        let g = g2.clone();
        async move {
            let _in = g.enter();
            busy(r.work).await;
            Err::<(), _>(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "down",
            ))
        }
    }));
    // Timed from before the breaker admits the call (a probe's time counts
    // from its admission: one preempted before it reaches the upstream still
    // outlives `open_for`, and the breaker rightly reopens past it).
    let l2 = longest.clone();
    let svc = service_fn(move |r: Req| {
        let (inner, l) = (inner.clone(), l2.clone());
        async move {
            let t = tokio::time::Instant::now();
            let out = inner.oneshot(r).await;
            l.fetch_max(t.elapsed().as_micros() as u64, SeqCst);
            out
        }
    });
    let _ = svc
        .clone()
        .oneshot(Req {
            key: 0,
            prio: 0,
            work: 1,
        })
        .await;
    assert_eq!(breaker.state(), St::Open, "seed={seed}");
    let phase2 = Gauge::default();
    let start = tokio::time::Instant::now();
    let run_for = Duration::from_millis(rng.random_range(40..120));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(4..64) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 40));
        let (svc, bad) = (svc.clone(), bad.clone());
        handles.push(tokio::spawn(async move {
            while start.elapsed() < run_for {
                let cancel = pick_cancel(&mut trng, 0.3);
                match drive(
                    svc.clone(),
                    Req {
                        key: 0,
                        prio: 0,
                        work: trng.random_range(0..30),
                    },
                    cancel,
                )
                .await
                {
                    Some(Ok(())) => bad
                        .lock()
                        .unwrap()
                        .push("a success from an upstream that always fails".into()),
                    Some(Err(e)) => match reject_of(&e) {
                        // A half-open breaker whose probes are out refuses
                        // with or without a `retry_after`: both are right.
                        Some(r) if r.kind() == RejectKind::CircuitOpen => {}
                        Some(r) => bad.lock().unwrap().push(format!("kind {:?}", r.kind())),
                        None => {}
                    },
                    None => {}
                }
                tokio::task::yield_now().await;
                if trng.random_bool(0.05) {
                    tokio::time::sleep(Duration::from_micros(trng.random_range(1..2_000))).await;
                }
            }
        }));
    }
    let _ = phase2;
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {:?}",
        &bad[..bad.len().min(5)]
    );
    let log = log.lock().unwrap().clone();
    check_chain(seed, &log);
    assert!(
        log.iter().all(|(_, to, _)| *to != St::Closed),
        "seed={seed}: closed with no success: {log:?}"
    );
    let longest = Duration::from_micros(longest.load(SeqCst));
    if longest < open_for {
        assert!(
            gauge.max() <= u64::from(probes),
            "seed={seed}: {} calls inside a breaker with {probes} probes (open_for {open_for:?}, longest call {longest:?}); transitions: {}",
            gauge.max(),
            log.len()
        );
    } else {
        eprintln!("seed={seed}: a probe took {longest:?} ≥ open_for {open_for:?}: concurrency bound not checked");
    }
    let last = log.last().map(|l| l.1).unwrap_or(St::Closed);
    let snap = breaker.snapshot();
    assert_eq!(
        snap.state, last,
        "seed={seed}: snapshot {snap:?} vs last transition told {last:?}"
    );
}

#[test]
fn breaker_half_open_admits_at_most_probes() {
    run_test(
        "breaker_half_open_admits_at_most_probes",
        each_seed("breaker_probes", 25, breaker_probe_scenario),
    );
}

/// Random outcomes, rate and consecutive policies, manual resets and
/// forced opens from another task: the transitions told form one chain,
/// end where the breaker is, and the window's counts add up.
async fn breaker_mixed_scenario(seed: u64) {
    use semaforo::breaker::{Breaker, Mode};
    let mut rng = SmallRng::seed_from_u64(seed);
    let window: u32 = rng.random_range(5..50);
    let log: Transitions = Arc::default();
    let fail_p = rng.random_range(0.1..0.9);
    let breaker = Breaker::builder()
        .consecutive_failures(rng.random_range(1..6))
        .failure_rate(rng.random_range(0.2..1.0))
        .window_calls(window)
        .min_calls(u64::from(rng.random_range(1..=window)))
        .open_for(Duration::from_micros(rng.random_range(200..5_000)))
        .open_growth(2.0, Duration::from_millis(20))
        .open_jitter(0.5)
        .seed(seed)
        .half_open_probes(rng.random_range(1..4))
        .on_event(transition_listener(&log))
        .build()
        .unwrap();
    let mut watch = breaker.subscribe();
    let svc = breaker.layer().layer(service_fn(move |r: Req| async move {
        busy(r.work).await;
        if f64::from(r.work) / 100.0 < fail_p {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "down",
            ))
        } else {
            Ok::<_, std::io::Error>(())
        }
    }));
    let start = tokio::time::Instant::now();
    let run_for = Duration::from_millis(rng.random_range(30..100));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(4..64) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 44));
        let svc = svc.clone();
        handles.push(tokio::spawn(async move {
            while start.elapsed() < run_for {
                let cancel = pick_cancel(&mut trng, 0.2);
                let _ = drive(
                    svc.clone(),
                    Req {
                        key: 0,
                        prio: 0,
                        work: trng.random_range(0..100),
                    },
                    cancel,
                )
                .await;
                tokio::task::yield_now().await;
            }
        }));
    }
    let b2 = breaker.clone();
    let mut crng = SmallRng::seed_from_u64(!seed);
    let ctl = tokio::spawn(async move {
        while start.elapsed() < run_for {
            tokio::time::sleep(Duration::from_micros(crng.random_range(100..5_000))).await;
            match crng.random_range(0..6) {
                0 => b2.force_open(),
                1 | 2 => b2.reset(),
                3 => b2.disable(),
                _ => {}
            }
        }
        b2.reset();
    });
    ctl.await.unwrap();
    for h in handles {
        h.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    check_chain(seed, &log);
    let snap = breaker.snapshot();
    assert_eq!(snap.mode, Mode::Normal);
    let last = log
        .last()
        .map(|l| l.1)
        .unwrap_or(semaforo::breaker::BreakerState::Closed);
    assert_eq!(
        snap.state,
        last,
        "seed={seed}: snapshot {snap:?} vs last transition told {last:?} (log tail {:?})",
        &log[log.len().saturating_sub(4)..]
    );
    assert!(
        snap.calls_in_window <= u64::from(window),
        "seed={seed}: {snap:?}"
    );
    assert!(
        snap.failures_in_window <= snap.calls_in_window,
        "seed={seed}: {snap:?}"
    );
    let seen = *watch.borrow_and_update();
    assert_eq!(
        seen,
        snap.effective_state(),
        "seed={seed}: watch says {seen:?}, snapshot {snap:?}"
    );
}

#[test]
fn breaker_transitions_form_one_chain() {
    run_test(
        "breaker_transitions_form_one_chain",
        each_seed("breaker_mixed", 25, breaker_mixed_scenario),
    );
}

// ---------------------------------------------------------------------------
// Coalesce and cache
// ---------------------------------------------------------------------------

/// An upstream that answers "key:n" (n = its n-th call for that key), fails
/// now and then, and counts calls inside per key.
#[derive(Clone)]
struct KeyedUpstream {
    calls: Arc<Vec<AtomicU64>>,
    inside: Arc<Vec<Gauge>>,
    fail_every: u64,
}

impl KeyedUpstream {
    fn new(keys: u32, fail_every: u64) -> Self {
        Self {
            calls: Arc::new((0..keys).map(|_| AtomicU64::new(0)).collect()),
            inside: Arc::new((0..keys).map(|_| Gauge::default()).collect()),
            fail_every,
        }
    }
    fn service(
        &self,
    ) -> impl Service<
        Req,
        Response = String,
        Error = std::io::Error,
        Future = impl Future<Output = Result<String, std::io::Error>> + Send,
    > + Clone
           + Send {
        let me = self.clone();
        service_fn(move |r: Req| {
            let me = me.clone();
            async move {
                let k = r.key as usize;
                let _in = me.inside[k].enter();
                let n = me.calls[k].fetch_add(1, SeqCst) + 1;
                busy(r.work).await;
                if me.fail_every > 0 && n % me.fail_every == 0 {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        format!("fail {}:{n}", r.key),
                    ))
                } else {
                    Ok(format!("{}:{n}", r.key))
                }
            }
        })
    }
    fn total(&self) -> u64 {
        self.calls.iter().map(|c| c.load(SeqCst)).sum()
    }
}

async fn coalesce_scenario(seed: u64) {
    use semaforo::coalesce::CoalesceLayer;
    let mut rng = SmallRng::seed_from_u64(seed);
    let keys: u32 = rng.random_range(1..5);
    let up = KeyedUpstream::new(keys, rng.random_range(0..6));
    let layer = CoalesceLayer::new(|r: &Req| Some(r.key));
    let svc = layer.layer(up.service());
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    let mut aborts = Vec::new();
    for t in 0..rng.random_range(20..300) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 12));
        let (svc, bad) = (svc.clone(), bad.clone());
        let abort_it = trng.random_bool(0.1);
        let h = tokio::spawn(async move {
            for _ in 0..trng.random_range(1..5) {
                let req = Req {
                    key: trng.random_range(0..keys),
                    prio: 0,
                    work: trng.random_range(0..40),
                };
                let cancel = pick_cancel(&mut trng, 0.35);
                match drive(svc.clone(), req.clone(), cancel).await {
                    Some(Ok(a)) if !a.starts_with(&format!("{}:", req.key)) => bad
                        .lock()
                        .unwrap()
                        .push(format!("key {} got answer {a}", req.key)),
                    Some(Err(e)) if !e.to_string().starts_with(&format!("fail {}:", req.key)) => {
                        bad.lock()
                            .unwrap()
                            .push(format!("key {} got error {e}", req.key))
                    }
                    _ => {}
                }
            }
        });
        if abort_it {
            aborts.push(h.abort_handle());
        }
        handles.push(h);
    }
    for a in aborts {
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..300))).await;
        a.abort();
    }
    for h in handles {
        let _ = h.await;
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {:?}",
        &bad[..bad.len().min(5)]
    );
    assert_eq!(
        layer.in_flight(),
        0,
        "seed={seed}: calls left in flight after every caller ended"
    );
    for (k, g) in up.inside.iter().enumerate() {
        assert_eq!(g.now(), 0, "seed={seed}");
        assert!(
            g.max() <= 1,
            "seed={seed}: {} upstream calls of key {k} at once through a singleflight",
            g.max()
        );
    }
    // the layer still works: one call per key answers
    for k in 0..keys {
        let r = svc
            .clone()
            .oneshot(Req {
                key: k,
                prio: 0,
                work: 1,
            })
            .await;
        if let Ok(a) = &r {
            assert!(a.starts_with(&format!("{k}:")), "seed={seed}: {a}");
        }
    }
    assert_eq!(layer.in_flight(), 0, "seed={seed}");
}

#[test]
fn coalesce_answers_right_key_and_empties() {
    run_test(
        "coalesce_answers_right_key_and_empties",
        each_seed("coalesce", 60, coalesce_scenario),
    );
}

/// The cache's promise (module docs): a cache outside a coalescing layer
/// sends identical calls upstream once however they interleave ("64 tasks ×
/// 100 calls on 16 keys, 4 workers: 16 upstream calls"). Here on 2 workers,
/// then with cancellations (answers still for the right key, nothing left
/// in flight).
async fn cache_coalesce_scenario(seed: u64, cancel_share: f64) {
    use semaforo::cache::Cache;
    use semaforo::coalesce::CoalesceLayer;
    let keys: u32 = 16;
    let up = KeyedUpstream::new(keys, 0);
    let cache: Cache<u32, String> = Cache::builder()
        .ttl(Duration::from_secs(3_600))
        .build()
        .unwrap();
    let co = CoalesceLayer::new(|r: &Req| Some(r.key));
    let svc = cache
        .layer(|r: &Req| Some(r.key))
        .layer(co.layer(up.service()));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..64u64 {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 16));
        let (svc, bad, done) = (svc.clone(), bad.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            for _ in 0..100 {
                let req = Req {
                    key: trng.random_range(0..keys),
                    prio: 0,
                    work: trng.random_range(0..20),
                };
                let cancel = pick_cancel(&mut trng, cancel_share);
                match drive(svc.clone(), req.clone(), cancel).await {
                    Some(Ok(a)) => {
                        done.fetch_add(1, SeqCst);
                        if !a.starts_with(&format!("{}:", req.key)) {
                            bad.lock().unwrap().push(format!("key {} got {a}", req.key));
                        }
                    }
                    Some(Err(e)) => bad.lock().unwrap().push(format!("{e}")),
                    None => {}
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {:?}",
        &bad[..bad.len().min(5)]
    );
    assert_eq!(co.in_flight(), 0, "seed={seed}");
    cache.run_pending_tasks();
    let s = cache.snapshot();
    if cancel_share == 0.0 {
        let per_key: Vec<u64> = up.calls.iter().map(|c| c.load(SeqCst)).collect();
        assert_eq!(
            up.total(),
            u64::from(keys),
            "seed={seed}: upstream calls per key {per_key:?} (cache {s:?})"
        );
        assert_eq!(s.hits + s.misses, 6_400, "seed={seed}: {s:?}");
    }
    for (k, g) in up.inside.iter().enumerate() {
        assert!(
            g.max() <= 1,
            "seed={seed}: key {k}: {} upstream calls at once",
            g.max()
        );
    }
    // (`stores` counts every caller's store, the coalesced ones too: not compared)
}

#[test]
fn cache_over_coalesce_one_upstream_call_per_key() {
    run_test(
        "cache_over_coalesce_one_upstream_call_per_key",
        cache_over_coalesce_one_upstream_call_per_key_body(),
    );
}

async fn cache_over_coalesce_one_upstream_call_per_key_body() {
    let base = base_seed();
    for i in 0..iters(30) {
        let seed = base + i;
        guarded("cache_coalesce", seed, cache_coalesce_scenario(seed, 0.0)).await;
        guarded(
            "cache_coalesce_cancel",
            seed,
            cache_coalesce_scenario(seed, 0.3),
        )
        .await;
    }
}

// ---------------------------------------------------------------------------
// Shutdown and drain
// ---------------------------------------------------------------------------

/// Calls stream in from many tasks (some cancelled) while the trigger and
/// the drain come: when drain() returns nothing is in flight, no inner call
/// runs, none starts later, and every call made after the trigger returned
/// is refused `ShuttingDown`. With a watched bulkhead below, its waiters are
/// released and nothing leaks.
async fn shutdown_scenario(seed: u64) {
    use semaforo::bulkhead::Bulkhead;
    use semaforo::shutdown::Shutdown;
    let mut rng = SmallRng::seed_from_u64(seed);
    let shutdown = Shutdown::new();
    let with_bulkhead = rng.random_bool(0.5);
    let bulkhead = if with_bulkhead {
        Bulkhead::builder(rng.random_range(1..4))
            .max_queue(rng.random_range(0..50))
            .build()
            .unwrap()
    } else {
        Bulkhead::builder(100_000).build().unwrap()
    };
    if with_bulkhead {
        shutdown.watch(bulkhead.clone());
    }
    let gauge = Gauge::default();
    let drained = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicU64::new(0));
    let (g2, d2, l2) = (gauge.clone(), drained.clone(), late.clone());
    let inner = service_fn(move |r: Req| {
        let g = g2.clone();
        if d2.load(SeqCst) {
            l2.fetch_add(1, SeqCst);
        }
        async move {
            let _in = g.enter();
            busy(r.work).await;
            Ok::<_, std::io::Error>(())
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(shutdown.layer())
        .layer(bulkhead.layer())
        .service(inner);
    let triggered = Arc::new(AtomicBool::new(false));
    // Calls that may have begun before the trigger and have not returned:
    // counted before the look at `triggered` (so every call that saw it
    // unset is counted before the trigger is set), taken back when the call
    // returns or when it saw the trigger.
    let racing = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(10..200) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 50));
        let (svc, bad, triggered, drained, racing) = (
            svc.clone(),
            bad.clone(),
            triggered.clone(),
            drained.clone(),
            racing.clone(),
        );
        handles.push(tokio::spawn(async move {
            loop {
                racing.fetch_add(1, SeqCst);
                let after = triggered.load(SeqCst);
                if after {
                    racing.fetch_sub(1, SeqCst);
                }
                let req = Req {
                    key: 0,
                    prio: 0,
                    work: trng.random_range(0..40),
                };
                let cancel = pick_cancel(&mut trng, 0.25);
                let out = drive(svc.clone(), req, cancel).await;
                if !after {
                    racing.fetch_sub(1, SeqCst);
                }
                match out {
                    Some(Ok(())) if after => bad
                        .lock()
                        .unwrap()
                        .push("a call made after the trigger succeeded".into()),
                    Some(Err(e)) => match reject_of(&e).map(|r| r.kind()) {
                        Some(RejectKind::ShuttingDown) => {}
                        Some(RejectKind::QueueFull) if with_bulkhead && !after => {}
                        other => bad
                            .lock()
                            .unwrap()
                            .push(format!("{other:?}: {e} (after trigger: {after})")),
                    },
                    _ => {}
                }
                if drained.load(SeqCst) || (after && trng.random_bool(0.2)) {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_micros(rng.random_range(0..3_000))).await;
    shutdown.trigger();
    triggered.store(true, SeqCst);
    let report = shutdown.drain(Duration::from_secs(20)).await;
    let inside_at_return = gauge.now();
    let racing_at_return = racing.load(SeqCst);
    let in_flight_at_return = shutdown.in_flight();
    drained.store(true, SeqCst);
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {:?}",
        &bad[..bad.len().min(5)]
    );
    assert_eq!(inside_at_return, 0, "seed={seed}: drain returned with {inside_at_return} inner calls running; report {report:?}");
    // `Shutdown::in_flight` may count, for an instant, a call that arrived
    // as the trigger came and is being refused (its doc): only calls begun
    // before the trigger can be such; none that saw the trigger is counted.
    assert!(
        in_flight_at_return <= racing_at_return,
        "seed={seed}: drain returned with in_flight {in_flight_at_return}, \
         {racing_at_return} calls begun before the trigger; report {report:?}"
    );
    assert_eq!(
        late.load(SeqCst),
        0,
        "seed={seed}: inner called after drain returned; report {report:?}"
    );
    assert_eq!(
        (report.cancelled, report.still_streaming),
        (0, 0),
        "seed={seed}: {report:?}"
    );
    assert_eq!(shutdown.in_flight(), 0, "seed={seed}");
    if with_bulkhead {
        let s = bulkhead.snapshot();
        assert!(s.closed, "seed={seed}");
        assert_eq!((s.in_flight, s.waiting), (0, 0), "seed={seed}: {s:?}");
    }
}

#[test]
fn shutdown_drain_waits_for_everything_and_refuses_after() {
    run_test(
        "shutdown_drain_waits_for_everything_and_refuses_after",
        each_seed("shutdown", 60, shutdown_scenario),
    );
}

/// (Not a race: the smallest replay of a chain break seen under
/// `breaker_transitions_form_one_chain` with `metrics_only`.) A listener
/// hears the manual mode's `Open → Closed` and then the shadow state
/// machine's `Open → HalfOpen`: the transitions told do not form a chain.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn breaker_metrics_only_events_form_one_chain() {
    use semaforo::breaker::Breaker;
    let log: Transitions = Arc::default();
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(1))
        .on_event(transition_listener(&log))
        .build()
        .unwrap();
    let svc = breaker.layer().layer(service_fn(|_: ()| async {
        Err::<(), _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "down",
        ))
    }));
    let _ = svc.clone().oneshot(()).await; // Closed → Open
    breaker.metrics_only();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = svc.clone().oneshot(()).await; // a shadow probe
    let log = log.lock().unwrap().clone();
    eprintln!("transitions told: {log:?}");
    check_chain(0, &log);
}

/// Queue tickets under parallelism: a watcher thread polls every ticket
/// while callers come, wait, run, time out and leave. A waiting ticket's
/// position is within 1..=waiting; once its caller's future has ended the
/// ticket never says Waiting, an answered call's says Admitted, a refused
/// one's Rejected with the same kind.
async fn ticket_scenario(seed: u64) {
    use semaforo::bulkhead::{Bulkhead, QueueTicket, TicketStatus};
    let mut rng = SmallRng::seed_from_u64(seed);
    let k: u32 = rng.random_range(1..4);
    let mut b = Bulkhead::builder(k)
        .max_queue(rng.random_range(1..80))
        .expected_service_time(Duration::from_micros(100));
    if rng.random_bool(0.5) {
        b = b.max_wait(Duration::from_micros(rng.random_range(100..3_000)));
    }
    let bulkhead = b.build().unwrap();
    let tickets: Arc<Mutex<Vec<QueueTicket>>> = Arc::default();
    let svc = bulkhead
        .layer()
        .ticket(|r: &(Req, QueueTicket)| Some(r.1.clone()))
        .layer(service_fn(|r: (Req, QueueTicket)| async move {
            busy(r.0.work).await;
            Ok::<_, std::io::Error>(())
        }));
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (tickets, stop, bad) = (tickets.clone(), stop.clone(), bad.clone());
        tokio::spawn(async move {
            while !stop.load(SeqCst) {
                let ts = tickets.lock().unwrap().clone();
                for t in ts {
                    if let TicketStatus::Waiting(q) = t.status() {
                        if q.position == 0 || q.position > q.waiting {
                            bad.lock().unwrap().push(format!("waiting ticket at {q:?}"));
                        }
                    }
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let mut handles = Vec::new();
    for t in 0..rng.random_range(20..200) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 9));
        let (svc, bad, tickets) = (svc.clone(), bad.clone(), tickets.clone());
        handles.push(tokio::spawn(async move {
            for _ in 0..trng.random_range(1..4) {
                let ticket = QueueTicket::new();
                tickets.lock().unwrap().push(ticket.clone());
                let req = (
                    Req {
                        key: 0,
                        prio: 0,
                        work: trng.random_range(0..30),
                    },
                    ticket.clone(),
                );
                let cancel = pick_cancel(&mut trng, 0.4);
                let mut s = svc.clone();
                let fut = async move {
                    s.ready().await?;
                    s.call(req).await
                };
                let out = run_cancel(fut, cancel).await;
                let st = ticket.status();
                let ok = match (&out, st) {
                    (_, TicketStatus::Waiting(_)) => false,
                    (Some(Ok(())), TicketStatus::Admitted) => true,
                    (Some(Err(e)), TicketStatus::Rejected(kind)) => {
                        reject_of(e).map(|r| r.kind()) == Some(kind)
                    }
                    (Some(_), _) => false,
                    (None, _) => true,
                };
                if !ok {
                    bad.lock().unwrap().push(format!(
                        "after the call ended ({:?}) the ticket says {st:?}",
                        out.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string()))
                    ));
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    stop.store(true, SeqCst);
    watcher.await.unwrap();
    for t in tickets.lock().unwrap().iter() {
        if let TicketStatus::Waiting(q) = t.status() {
            bad.lock().unwrap().push(format!(
                "a ticket still Waiting ({q:?}) after every caller ended"
            ));
        }
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {} problems, first: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    let s = bulkhead.snapshot();
    assert_eq!((s.in_flight, s.waiting), (0, 0), "seed={seed}: {s:?}");
}

#[test]
fn bulkhead_tickets_tell_the_truth() {
    run_test(
        "bulkhead_tickets_tell_the_truth",
        each_seed("tickets", 40, ticket_scenario),
    );
}

/// close() on a pacer and on a quota's wait mode while callers wait and
/// leave: every waiter is answered at once, nothing hangs, no call made
/// after close() returned waits or succeeds past its budget.
async fn pace_quota_close_scenario(seed: u64) {
    use semaforo::pace::{Cost, Limit, Pace, Unit};
    use semaforo::quota::{PlanId, Quota, Rate};
    let mut rng = SmallRng::seed_from_u64(seed);
    let pace = Pace::builder()
        .limit(
            Limit::new(
                Unit::Requests,
                rng.random_range(50..500),
                Duration::from_secs(1),
            )
            .burst(rng.random_range(1..4)),
        )
        .build()
        .unwrap();
    let quota = Quota::builder()
        .plan(
            "p",
            Rate::new(rng.random_range(50..500), Duration::from_secs(1))
                .burst(rng.random_range(1..4)),
        )
        .max_wait(Duration::from_secs(30))
        .build::<u32>()
        .unwrap();
    let gauge = Gauge::default();
    let g2 = gauge.clone();
    let inner = service_fn(move |r: Req| {
        let g = g2.clone();
        async move {
            let _in = g.enter();
            busy(r.work).await;
            Ok::<_, std::io::Error>(())
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(quota.layer(|r: &Req| (r.key, PlanId::FIRST)))
        .layer(pace.layer().weigh(|_: &Req| Cost::requests(1)))
        .service(inner);
    let closed = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(10..150) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 5));
        let (svc, bad, closed) = (svc.clone(), bad.clone(), closed.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let after = closed.load(SeqCst);
                let req = Req {
                    key: trng.random_range(0..3),
                    prio: 0,
                    work: trng.random_range(0..20),
                };
                let cancel = pick_cancel(&mut trng, 0.2);
                if let Some(Err(e)) = drive(svc.clone(), req, cancel).await {
                    match reject_of(&e).map(|r| r.kind()) {
                        Some(RejectKind::ShuttingDown) => {}
                        other => bad.lock().unwrap().push(format!("{other:?}: {e}")),
                    }
                }
                if after {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_micros(rng.random_range(100..20_000))).await;
    let (a, b) = if rng.random_bool(0.5) {
        (quota.close(), pace.close())
    } else {
        let p = pace.close();
        (quota.close(), p)
    };
    closed.store(true, SeqCst);
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {:?}",
        &bad[..bad.len().min(5)]
    );
    assert_eq!(quota.snapshot().waiting, 0, "seed={seed}: released {a}");
    assert_eq!(pace.snapshot().waiting, 0, "seed={seed}: released {b}");
    assert_eq!(gauge.now(), 0);
}

#[test]
fn pace_and_quota_close_release_every_waiter() {
    run_test(
        "pace_and_quota_close_release_every_waiter",
        each_seed("pace_quota_close", 30, pace_quota_close_scenario),
    );
}

/// Idle-key sweeps (`evict_idle`, called in a loop from another task, and
/// the quota's own sweeper) racing with callers of the same keys: "keys
/// idle for longer than their refill period are indistinguishable from
/// new ones", so a sweep must never hand a key a fresh burst while its
/// last admissions still count. Each key's bound holds over the run.
async fn quota_sweep_scenario(seed: u64) {
    use semaforo::quota::{PlanId, Quota, Rate};
    let mut rng = SmallRng::seed_from_u64(seed);
    let per = Duration::from_secs(1);
    // refill period (burst / rate) of a few ms, so keys go idle all the time
    let (kc, kb): (u32, u32) = (rng.random_range(500..4_000), rng.random_range(1..6));
    let keys: u32 = rng.random_range(1..8);
    let start = tokio::time::Instant::now();
    let quota = Quota::builder()
        .plan("p", Rate::new(kc, per).burst(kb))
        .build::<u32>()
        .unwrap();
    let adms = Arc::new(Mutex::new(Vec::<(
        u32,
        tokio::time::Instant,
        tokio::time::Instant,
    )>::new()));
    let a2 = adms.clone();
    let inner = service_fn(move |r: (Req, tokio::time::Instant)| {
        a2.lock()
            .unwrap()
            .push((r.0.key, r.1, tokio::time::Instant::now()));
        async { Ok::<_, std::io::Error>(()) }
    });
    let svc = quota
        .layer(|r: &(Req, tokio::time::Instant)| (r.0.key, PlanId::FIRST))
        .layer(inner);
    let run_for = Duration::from_millis(rng.random_range(30..120));
    let sweeper = {
        let quota = quota.clone();
        tokio::spawn(async move {
            while start.elapsed() < run_for {
                quota.evict_idle();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut handles = Vec::new();
    for t in 0..rng.random_range(2..24) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 18));
        let svc = svc.clone();
        handles.push(tokio::spawn(async move {
            while start.elapsed() < run_for {
                let req = Req {
                    key: trng.random_range(0..keys),
                    prio: 0,
                    work: 0,
                };
                let now = tokio::time::Instant::now();
                let _ = svc.clone().oneshot((req, now)).await;
                if trng.random_bool(0.2) {
                    // let keys go idle now and then
                    tokio::time::sleep(Duration::from_micros(trng.random_range(100..5_000))).await;
                } else {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    sweeper.await.unwrap();
    let adms = adms.lock().unwrap().clone();
    for key in 0..keys {
        let mine: Vec<Adm> = adms
            .iter()
            .filter(|a| a.0 == key)
            .map(|&(_, before, after)| Adm {
                before,
                after,
                n: 1,
            })
            .collect();
        if let Some(v) = check_rate(&mine, start, u64::from(kc), per, u64::from(kb)) {
            panic!(
                "seed={seed}: key {key} over-admitted with idle sweeps racing: {v} (sweeps {})",
                quota.snapshot().sweeps
            );
        }
    }
}

#[test]
fn quota_idle_sweeps_never_grant_a_second_burst() {
    run_test(
        "quota_idle_sweeps_never_grant_a_second_burst",
        each_seed("quota_sweep", 30, quota_sweep_scenario),
    );
}

// ---------------------------------------------------------------------------
// Streams: permits and in-flight counts held to the last chunk
// ---------------------------------------------------------------------------

/// FINDING (2 workers, fails within a few seeds): drain() returns while a
/// stream the client dropped is still being dropped — `shutdown.in_flight()`
/// is already 0, the inner stream's state not yet gone (gone 1 ms later).
///
/// shutdown(release_on_stream_end) → bulkhead(release_on_stream_end) →
/// a service answering streams. Callers read some chunks on another task
/// (another thread) and drop the rest. Streams alive + calls running never
/// exceed the bulkhead's limit; drain() returns only when every stream has
/// ended; nothing leaks.
async fn stream_scenario(seed: u64) {
    use futures::stream::{self, BoxStream, StreamExt};
    use semaforo::bulkhead::Bulkhead;
    use semaforo::shutdown::Shutdown;
    let mut rng = SmallRng::seed_from_u64(seed);
    let k: u32 = rng.random_range(1..5);
    let bulkhead = Bulkhead::builder(k)
        .max_queue(rng.random_range(0..60))
        .build()
        .unwrap();
    let shutdown = Shutdown::new();
    shutdown.watch(bulkhead.clone());
    let gauge = Gauge::default();
    let g2 = gauge.clone();
    let inner = service_fn(move |r: Req| {
        let g = g2.clone();
        async move {
            let guard = g.enter();
            busy(r.work).await;
            let chunks = r.work % 6;
            // the gauge's guard lives in the stream's state: dropped when the
            // stream ends (returns None) or is dropped — the docs' "ends, fails or
            // is dropped", not when the caller lets go of an ended stream
            let s: BoxStream<'static, Result<u32, std::io::Error>> =
                stream::unfold((0u32, guard), move |(i, guard)| async move {
                    if i >= chunks {
                        drop(guard);
                        return None;
                    }
                    if i % 2 == 0 {
                        tokio::task::yield_now().await;
                    }
                    Some((Ok(i), (i + 1, guard)))
                })
                .boxed();
            Ok::<_, std::io::Error>(s)
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(shutdown.layer().release_on_stream_end())
        .layer(bulkhead.layer().release_on_stream_end())
        .service(inner);
    let bad = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(10..120) {
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 11));
        let (svc, bad, stop) = (svc.clone(), bad.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                let req = Req {
                    key: 0,
                    prio: 0,
                    work: trng.random_range(0..40),
                };
                let cancel = pick_cancel(&mut trng, 0.2);
                match drive(svc.clone(), req, cancel).await {
                    Some(Ok(mut s)) => {
                        let take = trng.random_range(0..5);
                        let hold = trng.random_bool(0.3);
                        // read on another task, maybe on the other thread
                        let reader = tokio::spawn(async move {
                            for _ in 0..take {
                                if s.next().await.is_none() {
                                    break;
                                }
                            }
                            if hold {
                                // a slow client: keeps the (unfinished) stream a while
                                tokio::time::sleep(Duration::from_millis(3)).await;
                            }
                            drop(s);
                        });
                        let _ = reader.await;
                    }
                    Some(Err(e)) => match reject_of(&e).map(|r| r.kind()) {
                        Some(RejectKind::QueueFull | RejectKind::ShuttingDown) => {}
                        other => bad.lock().unwrap().push(format!("{other:?}: {e}")),
                    },
                    None => {}
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_micros(rng.random_range(100..10_000))).await;
    let report = shutdown.drain(Duration::from_secs(20)).await;
    let alive_at_return = gauge.now();
    let in_flight_at_return = shutdown.in_flight();
    // tell a drop in progress (µs) from a stream really alive (a slow
    // client holds one for 3 ms): look again 1 ms later, on this thread
    std::thread::sleep(Duration::from_millis(1));
    let alive_1ms_later = gauge.now();
    stop.store(true, SeqCst);
    for h in handles {
        h.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "seed={seed}: {:?}",
        &bad[..bad.len().min(5)]
    );
    assert!(
        gauge.max() <= u64::from(k),
        "seed={seed}: {} calls or streams alive at once, limit {k}",
        gauge.max()
    );
    assert_eq!(
        alive_at_return, 0,
        "seed={seed}: drain returned with {alive_at_return} calls or streams alive ({alive_1ms_later} still 1 ms later; shutdown.in_flight() {in_flight_at_return}); {report:?}"
    );
    assert_eq!(
        (report.cancelled, report.still_streaming),
        (0, 0),
        "seed={seed}: {report:?}"
    );
    let s = bulkhead.snapshot();
    assert_eq!((s.in_flight, s.waiting), (0, 0), "seed={seed}: {s:?}");
    assert_eq!(shutdown.in_flight(), 0, "seed={seed}");
}

#[test]
fn streams_hold_permits_and_drain_waits_for_them() {
    run_test(
        "streams_hold_permits_and_drain_waits_for_them",
        each_seed("streams", 40, stream_scenario),
    );
}

// ---------------------------------------------------------------------------
// Retry budget
// ---------------------------------------------------------------------------

/// Deposits and withdrawals from many threads within one window: the
/// retries granted stay within `ratio × requests + floor × window`, and the
/// counters add up exactly.
fn retry_budget_scenario(seed: u64) {
    use semaforo::retry::RetryBudget;
    let mut rng = SmallRng::seed_from_u64(seed);
    let ratio = rng.random_range(0.01..0.5);
    let floor = 0.1;
    let window = Duration::from_secs(10);
    let budget = Arc::new(RetryBudget::new(ratio, floor, window).unwrap());
    let threads = rng.random_range(2..8);
    let granted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deposits = Arc::new(AtomicU64::new(0));
    let per_thread: u64 = rng.random_range(1_000..20_000);
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (budget, granted, refused, deposits) = (
                budget.clone(),
                granted.clone(),
                refused.clone(),
                deposits.clone(),
            );
            let mut trng = SmallRng::seed_from_u64(seed ^ (t << 30));
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    if trng.random_bool(0.5) {
                        budget.deposit();
                        deposits.fetch_add(1, SeqCst);
                    } else if budget.try_withdraw() {
                        granted.fetch_add(1, SeqCst);
                    } else {
                        refused.fetch_add(1, SeqCst);
                    }
                }
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    for h in hs {
        h.join().unwrap();
    }
    let took = t0.elapsed();
    let (g, r, d) = (
        granted.load(SeqCst),
        refused.load(SeqCst),
        deposits.load(SeqCst),
    );
    assert_eq!(budget.requests(), d, "seed={seed}: requests() vs deposits");
    assert_eq!(
        budget.exhausted(),
        r,
        "seed={seed}: exhausted() vs refusals seen"
    );
    if took < window {
        let bound = ratio * d as f64 + floor * window.as_secs_f64() + 1.0;
        assert!(g as f64 <= bound, "seed={seed}: {g} retries granted for {d} requests within {took:?} (ratio {ratio:.3}, floor {floor}/s over {window:?}: at most {bound:.1})");
    }
}

#[test]
fn retry_budget_counts_add_up_across_threads() {
    // needs a tokio clock? RetryBudget may read tokio::time: run inside a runtime
    run_test("retry_budget_counts_add_up_across_threads", async {
        let base = base_seed();
        for i in 0..iters(30) {
            let seed = base + i;
            *CURRENT.lock().unwrap() = format!("retry_budget seed={seed}");
            tokio::task::spawn_blocking(move || retry_budget_scenario(seed))
                .await
                .unwrap();
        }
    });
}

/// Smaller replay of the chain break: an upstream that always fails, a
/// short open time, consecutive failures only; one task calls `reset()`,
/// `force_open()` and `disable()` (never `metrics_only`) while callers trip,
/// probe and re-open the breaker: every transition told must start where the
/// previous one ended, and the last one told must be the breaker's state.
async fn breaker_reset_race_scenario(seed: u64) {
    use semaforo::breaker::Breaker;
    let mut rng = SmallRng::seed_from_u64(seed);
    let log: Transitions = Arc::default();
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_micros(rng.random_range(50..500)))
        .half_open_probes(rng.random_range(1..4))
        .on_event(transition_listener(&log))
        .build()
        .unwrap();
    let svc = breaker.layer().layer(service_fn(|r: Req| async move {
        busy(r.work).await;
        Err::<(), _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "down",
        ))
    }));
    let start = tokio::time::Instant::now();
    let run_for = Duration::from_millis(rng.random_range(20..60));
    let mut handles = Vec::new();
    for t in 0..rng.random_range(2..16) {
        let svc = svc.clone();
        let mut trng = SmallRng::seed_from_u64(seed ^ (t << 3));
        handles.push(tokio::spawn(async move {
            while start.elapsed() < run_for {
                let _ = svc
                    .clone()
                    .oneshot(Req {
                        key: 0,
                        prio: 0,
                        work: trng.random_range(0..20),
                    })
                    .await;
                tokio::task::yield_now().await;
            }
        }));
    }
    let b2 = breaker.clone();
    // `RACE_BREAKER_MANUAL`: `all` (default), `reset`, `disable` (+ reset), `force_open` (+ reset)
    let manual = std::env::var("RACE_BREAKER_MANUAL").unwrap_or_else(|_| "all".into());
    handles.push(tokio::spawn(async move {
        let mut crng = SmallRng::seed_from_u64(!seed);
        while start.elapsed() < run_for {
            match (manual.as_str(), crng.random_range(0..3)) {
                ("all", 1) => b2.force_open(),
                ("all" | "disable", 2) => b2.disable(),
                ("force_open", 2) => b2.force_open(),
                _ => b2.reset(),
            }
            tokio::time::sleep(Duration::from_micros(crng.random_range(1..1_000))).await;
        }
        b2.reset();
    }));
    for h in handles {
        h.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    for (i, w) in log.windows(2).enumerate() {
        assert_eq!(
            w[1].0, w[0].1,
            "seed={seed}: transition {} {:?} does not start where transition {i} {:?} ended ({} transitions told)",
            i + 1, w[1], w[0], log.len()
        );
    }
    let last = log
        .last()
        .map(|l| l.1)
        .unwrap_or(semaforo::breaker::BreakerState::Closed);
    assert_eq!(
        breaker.state(),
        last,
        "seed={seed}: the breaker is {:?}, the last transition told ended in {last:?}",
        breaker.state()
    );
}

#[test]
fn breaker_reset_racing_transitions_keeps_one_chain() {
    run_test("breaker_reset_racing_transitions_keeps_one_chain", async {
        let base = base_seed();
        for i in 0..iters(40) {
            let seed = base + i;
            guarded(
                "breaker_reset_race",
                seed,
                breaker_reset_race_scenario(seed),
            )
            .await;
        }
    });
}

/// Deterministic check of the suspect path: a probe running (HalfOpen),
/// then `reset()` / `disable()` / `force_open()`: the transition told must
/// start from HalfOpen.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn breaker_manual_change_while_probe_runs_starts_from_half_open() {
    use semaforo::breaker::{Breaker, BreakerState as St};
    for action in ["reset", "disable", "force_open"] {
        eprintln!("-- {action}");
        let log: Transitions = Arc::default();
        let breaker = Breaker::builder()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(1))
            .on_event(transition_listener(&log))
            .build()
            .unwrap();
        let fail = Arc::new(AtomicBool::new(true));
        let f2 = fail.clone();
        let svc = breaker.layer().layer(service_fn(move |_: ()| {
            let fail = f2.load(SeqCst);
            async move {
                if fail {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "down",
                    ))
                } else {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Ok(())
                }
            }
        }));
        let _ = svc.clone().oneshot(()).await;
        fail.store(false, SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut probe = Box::pin(svc.clone().oneshot(()));
        assert!(futures::poll!(probe.as_mut()).is_pending());
        assert_eq!(breaker.state(), St::HalfOpen);
        match action {
            "reset" => breaker.reset(),
            "disable" => breaker.disable(),
            _ => breaker.force_open(),
        }
        // the probe that was running ends (a success) while the manual mode holds
        let out = probe.await;
        let log = log.lock().unwrap().clone();
        eprintln!(
            "{action}: probe {:?}; transitions told: {log:?}",
            out.map_err(|e| e.to_string())
        );
        check_chain(0, &log);
    }
}

/// (Not a race: the deterministic replay of the chain breaks seen with 6
/// workers.) Forced open while the state machine is Open: after the open
/// time a call is refused, yet the listener may hear the shadow
/// `Open → HalfOpen`; then `reset()` tells `Open → Closed`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn breaker_force_open_then_reset_events_form_one_chain() {
    use semaforo::breaker::Breaker;
    let log: Transitions = Arc::default();
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(1))
        .on_event(transition_listener(&log))
        .build()
        .unwrap();
    let svc = breaker.layer().layer(service_fn(|_: ()| async {
        Err::<(), _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "down",
        ))
    }));
    let _ = svc.clone().oneshot(()).await; // Closed → Open
    breaker.force_open(); // already Open: nothing to tell
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = svc.clone().oneshot(()).await; // refused (forced open)
    let snap = breaker.snapshot();
    breaker.reset();
    let log = log.lock().unwrap().clone();
    eprintln!(
        "call while forced open: {:?}; state then {:?}; transitions told: {log:?}",
        r.map_err(|e| e.to_string()),
        snap.state
    );
    check_chain(0, &log);
}

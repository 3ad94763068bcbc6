//! Adaptive bulkhead limits against a simulated upstream of hidden capacity
//! (tokio time, paused): latency 100 ms while at most `C` calls are in
//! flight, 100 ms × in-flight / C beyond; calls above 2C fail `Overloaded`
//! after that latency. 1,000 callers, each calling again as soon as it
//! has its answer (or, refused, after the `retry_after`, at least 1 s).

use semaforo::bulkhead::{Aimd, Bulkhead, Gradient2, Limit, Vegas};
use semaforo::classify::{Class, Classify};
use semaforo::{BoxError, Rejected};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

#[derive(Debug)]
struct Overloaded;

impl std::fmt::Display for Overloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("overloaded")
    }
}

impl std::error::Error for Overloaded {}

/// The upstream: its capacity, calls in flight, and what it answered.
#[derive(Default)]
struct Upstream {
    capacity: AtomicU32,
    in_flight: AtomicU32,
    ok: AtomicU64,
    overloaded: AtomicU64,
    /// (end, latency) of each success.
    latencies: Mutex<Vec<(Duration, Duration)>>,
}

/// `Ok` is a success, the upstream's error an overload.
#[derive(Clone, Copy)]
struct OkOrOverloaded;

impl Classify<(), BoxError> for OkOrOverloaded {
    fn classify(&self, r: Result<&(), &BoxError>) -> Class {
        match r {
            Ok(()) => Class::Success,
            Err(_) => Class::Overloaded { retry_after: None },
        }
    }
}

/// Runs 1,000 callers for `secs` simulated seconds through a bulkhead of
/// `limit`, starting at 500; the capacity is 50, 20 from 60 s, 50 again from
/// 120 s. Returns the limit each second and the upstream.
async fn run(limit: Limit, secs: u64, phases: bool) -> (Vec<u64>, Arc<Upstream>) {
    let up = Arc::new(Upstream::default());
    up.capacity.store(50, Ordering::SeqCst);
    let bulkhead = Bulkhead::builder(500)
        .limit(limit)
        .max_queue(10_000)
        .build()
        .unwrap();
    let t0 = Instant::now();
    let upstream = {
        let up = up.clone();
        tower::service_fn(move |_: ()| {
            let up = up.clone();
            async move {
                let n = up.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                let c = up.capacity.load(Ordering::SeqCst);
                let latency =
                    Duration::from_millis(100).mul_f64((f64::from(n) / f64::from(c)).max(1.0));
                tokio::time::sleep(latency).await;
                up.in_flight.fetch_sub(1, Ordering::SeqCst);
                if n > 2 * c {
                    up.overloaded.fetch_add(1, Ordering::SeqCst);
                    return Err::<(), Overloaded>(Overloaded);
                }
                up.ok.fetch_add(1, Ordering::SeqCst);
                up.latencies.lock().unwrap().push((t0.elapsed(), latency));
                Ok(())
            }
        })
    };
    let svc = bulkhead.layer().classify(OkOrOverloaded).layer(upstream);
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..1_000 {
        let (svc, stop) = (svc.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let call = svc.clone().oneshot(());
                if let Err(e) = call.await {
                    let wait = Rejected::from_box(&e)
                        .and_then(|r| r.retry_after())
                        .unwrap_or(Duration::from_secs(1));
                    // A refused caller comes back no sooner than in 1 s.
                    tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
                }
            }
        }));
    }
    let mut limits = Vec::new();
    for s in 0..secs {
        if phases && s == 60 {
            up.capacity.store(20, Ordering::SeqCst);
        }
        if phases && s == 120 {
            up.capacity.store(50, Ordering::SeqCst);
        }
        tokio::time::sleep_until(t0 + Duration::from_secs(s + 1)).await;
        limits.push(bulkhead.snapshot().limit);
    }
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.abort();
    }
    (limits, up)
}

/// The first second from which the limit stays in `[lo, hi]` through
/// `until` (exclusive), looking from `from`.
fn settled(limits: &[u64], from: usize, until: usize, lo: u64, hi: u64) -> Option<usize> {
    (from..until).find(|&s| limits[s..until].iter().all(|l| (lo..=hi).contains(l)))
}

fn strategies() -> Vec<(&'static str, Limit)> {
    vec![
        (
            "aimd",
            Aimd::new()
                .min(2)
                .latency_threshold(Duration::from_millis(120))
                .into(),
        ),
        ("vegas", Vegas::new().min(2).queue(2.0, 4.0).into()),
        (
            "gradient2",
            Gradient2::new().min(2).tolerance(1.15).queue_size(2).into(),
        ),
    ]
}

#[tokio::test(start_paused = true)]
async fn each_strategy_finds_the_capacity_and_follows_it() {
    let mut report = Vec::new();
    for (name, limit) in strategies() {
        let (limits, up) = run(limit, 180, true).await;
        let first = settled(&limits, 0, 60, 40, 65);
        let drop = settled(&limits, 60, 120, 16, 26);
        let rise = settled(&limits, 120, 180, 40, 65);
        // Goodput and p99 while settled at C = 50 (30 s to 60 s).
        let lat = up.latencies.lock().unwrap().clone();
        let window: Vec<Duration> = lat
            .iter()
            .filter(|(at, _)| *at >= Duration::from_secs(30) && *at < Duration::from_secs(60))
            .map(|(_, l)| *l)
            .collect();
        let goodput = window.len() as f64 / 30.0;
        let mut sorted = window.clone();
        sorted.sort();
        let p99 = sorted
            .get(sorted.len() * 99 / 100)
            .copied()
            .unwrap_or_default();
        report.push(format!(
            "{name}: settled at {first:?} s (C=50), {:?} s after C→20, {:?} s after C→50; \
             goodput {goodput:.0}/s (perfect 500/s), p99 {p99:?}; limits at 59/119/179 s: {}/{}/{}",
            drop.map(|s| s - 60),
            rise.map(|s| s - 120),
            limits[58],
            limits[118],
            limits[178]
        ));
        println!("{}", report.last().unwrap());
        assert!(first.is_some_and(|s| s <= 30), "{}", report.last().unwrap());
        assert!(
            drop.is_some_and(|s| s - 60 <= 20),
            "{}",
            report.last().unwrap()
        );
        assert!(
            rise.is_some_and(|s| s - 120 <= 30),
            "{}",
            report.last().unwrap()
        );
        assert!(goodput >= 450.0, "{}", report.last().unwrap());
        assert!(
            p99 <= Duration::from_millis(200),
            "{}",
            report.last().unwrap()
        );
    }
}

/// 30 % of the calls answered `Throttled` (a rate limit), capacity
/// unchanged and ample: the limit does not fall. Then 10 idle minutes:
/// the limit does not drift.
#[tokio::test(start_paused = true)]
async fn throttled_answers_and_idle_time_leave_the_limit_alone() {
    #[derive(Clone, Copy)]
    struct ThirtyPercentThrottled;
    impl Classify<u32, BoxError> for ThirtyPercentThrottled {
        fn classify(&self, r: Result<&u32, &BoxError>) -> Class {
            match r {
                Ok(n) if n % 10 < 3 => Class::Throttled {
                    retry_after: Some(Duration::from_secs(1)),
                },
                Ok(_) => Class::Success,
                Err(_) => Class::Transient,
            }
        }
    }
    for (name, limit) in strategies() {
        let bulkhead = Bulkhead::builder(100)
            .limit(limit)
            .max_queue(1_000)
            .build()
            .unwrap();
        let counter = Arc::new(AtomicU32::new(0));
        let upstream = {
            let counter = counter.clone();
            tower::service_fn(move |_: ()| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<u32, std::io::Error>(n)
                }
            })
        };
        let svc = bulkhead
            .layer()
            .classify(ThirtyPercentThrottled)
            .layer(upstream);
        // 80 callers for 60 s: in use ≥ half of any limit ≤ 160, never slow.
        let mut tasks = Vec::new();
        let t0 = Instant::now();
        for _ in 0..80 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                while t0.elapsed() < Duration::from_secs(60) {
                    if svc.clone().oneshot(()).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let after_load = bulkhead.snapshot().limit;
        assert!(
            after_load >= 95,
            "{name}: the limit fell to {after_load} under 30 % 429s"
        );
        tokio::time::sleep(Duration::from_secs(600)).await;
        // Calls after the idle time (Vegas and Gradient2 measure their
        // baseline again first: pinned to 3 until 10 calls were sampled — the
        // 429s are no samples, and sampling is 1 in 8 until the probe starts):
        // back where it was.
        for _ in 0..40 {
            svc.clone().oneshot(()).await.unwrap();
        }
        let after_idle = bulkhead.snapshot().limit;
        println!("{name}: {after_load} after the 429s, {after_idle} after 10 idle minutes");
        assert!(
            after_idle >= after_load.min(95),
            "{name}: drifted to {after_idle}"
        );
    }
}

/// 100 low- and 100 high-priority waiters behind a limit that falls from
/// 100 to 20: every waiter shed is low priority while any low one waits,
/// and the line keeps its share (200 × 20 / 100 = 40).
#[tokio::test(start_paused = true)]
async fn a_falling_limit_sheds_the_lowest_priority_first() {
    let bulkhead = Bulkhead::builder(100)
        .limit(Aimd::new().min(1))
        .max_queue(200)
        .build()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::<(i32, bool)>::new()));
    let upstream = tower::service_fn(move |_: i32| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<(), std::io::Error>(())
    });
    let svc = bulkhead.layer().priority(|p: &i32| *p).layer(upstream);
    // 100 running, then 100 low and 100 high wait (aging 5 s per level:
    // priority 10 counts as 50 s earlier).
    let mut tasks = Vec::new();
    for p in std::iter::repeat_n(0, 200).chain(std::iter::repeat_n(10, 100)) {
        let (svc, order) = (svc.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let r = svc.oneshot(p).await;
            order.lock().unwrap().push((p, r.is_ok()));
        }));
        tokio::task::yield_now().await;
    }
    assert_eq!(bulkhead.snapshot().waiting, 200);
    assert_eq!(bulkhead.snapshot().adaptive_limit, Some(100));
    // The limit falls to 20 (as a controller would after overloads).
    bulkhead.set_max_concurrent(20);
    assert_eq!(bulkhead.snapshot().adaptive_limit, Some(20));
    tokio::task::yield_now().await;
    assert_eq!(
        bulkhead.snapshot().waiting,
        40,
        "the line shrank with the limit"
    );
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let shed: Vec<i32> = order
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(p, _)| *p)
        .collect();
    println!(
        "{} shed: {} low, {} high",
        shed.len(),
        shed.iter().filter(|p| **p == 0).count(),
        shed.iter().filter(|p| **p == 10).count()
    );
    assert_eq!(shed.len(), 160);
    assert_eq!(
        shed.iter().filter(|p| **p == 0).count(),
        100,
        "every low one first"
    );
    let r = bulkhead.snapshot();
    assert_eq!((r.rejected_queue_full, r.shed), (160, 160));
}

/// Waiters parked behind their partition's cap count in the line and are
/// shed like the others when the limit falls: 2 tenants of at most 5 calls
/// each, 190 parked; the limit falls from 100 to 20, so the line keeps
/// 200 × 20 / 100 = 40 — the 150 latest arrivals are refused.
#[tokio::test(start_paused = true)]
async fn a_falling_limit_sheds_parked_waiters_too() {
    let bulkhead = Bulkhead::builder(100)
        .limit(Aimd::new().min(1))
        .max_queue(200)
        .max_per_key(5)
        .build()
        .unwrap();
    let upstream = tower::service_fn(move |_: usize| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<(), std::io::Error>(())
    });
    let svc = bulkhead
        .layer()
        .partition(|id: &usize| id % 2)
        .layer(upstream);
    let refused = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for id in 0..200usize {
        let (svc, refused) = (svc.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = svc.oneshot(id).await {
                let r = Rejected::from_box(&e).unwrap();
                assert!(r.retry_after().is_some(), "{r}");
                refused.lock().unwrap().push(id);
            }
        }));
        tokio::task::yield_now().await;
    }
    let snap = bulkhead.snapshot();
    assert_eq!((snap.in_flight, snap.waiting), (10, 190));
    bulkhead.set_max_concurrent(20);
    tokio::task::yield_now().await;
    assert_eq!(bulkhead.snapshot().waiting, 40);
    for t in tasks {
        t.await.unwrap();
    }
    let mut refused = refused.lock().unwrap().clone();
    refused.sort_unstable();
    assert_eq!(refused, (50..200).collect::<Vec<_>>(), "the latest first");
    let snap = bulkhead.snapshot();
    assert_eq!((snap.rejected_queue_full, snap.shed), (150, 150));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]

    /// Whatever the latencies, drops and limit changes: a call is admitted
    /// only when the calls in flight (itself included) fit the limit of
    /// that moment, the limit stays within [min, max], and calls of one
    /// priority are admitted in arrival order.
    #[test]
    fn admissions_fit_the_limit_and_keep_arrival_order(
        calls in proptest::collection::vec((0u64..50, 1u64..400, proptest::bool::ANY), 1..120),
        maxes in proptest::collection::vec((0u64..3_000, 1u32..40), 0..5),
        strategy in 0usize..3,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let (_, limit) = strategies().swap_remove(strategy);
            // Every limit in effect, and when: a call granted a permit is
            // called by its task a moment later (same instant, paused
            // time), when a sample may have moved the limit already.
            let changes = Arc::new(Mutex::new(Vec::<(Instant, u64)>::new()));
            let bulkhead = Bulkhead::builder(30)
                .limit(limit)
                .max_queue(10_000)
                .sample_every(1)
                .on_event({
                    let changes = changes.clone();
                    move |e| {
                        if let semaforo::observe::EventKind::LimitChanged { from, to, .. } = e.kind {
                            let now = Instant::now();
                            changes.lock().unwrap().extend([(now, from), (now, to)]);
                        }
                    }
                })
                .build()
                .unwrap();
            let in_flight = Arc::new(AtomicU32::new(0));
            let admitted = Arc::new(Mutex::new(Vec::<(usize, Instant)>::new()));
            let violations = Arc::new(Mutex::new(Vec::<String>::new()));
            let upstream = {
                let (in_flight, admitted, violations, bulkhead, changes) = (
                    in_flight.clone(),
                    admitted.clone(),
                    violations.clone(),
                    bulkhead.clone(),
                    changes.clone(),
                );
                tower::service_fn(move |(id, ms, fail): (usize, u64, bool)| {
                    let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    let now = Instant::now();
                    let limit = bulkhead.snapshot().limit;
                    let allowed = changes
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|(at, _)| *at == now)
                        .map(|(_, l)| *l)
                        .fold(limit, u64::max);
                    if u64::from(n) > allowed || !(2..=40).contains(&limit) {
                        violations
                            .lock()
                            .unwrap()
                            .push(format!("{n} in flight, limit {limit} (allowed {allowed})"));
                    }
                    admitted.lock().unwrap().push((id, now));
                    let in_flight = in_flight.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        if fail {
                            Err(Overloaded)
                        } else {
                            Ok(())
                        }
                    }
                })
            };
            let svc = bulkhead.layer().classify(AnyOverloaded).layer(upstream);
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            let mut arrivals = calls.clone();
            arrivals.sort_by_key(|c| c.0);
            for (id, (at, ms, fail)) in arrivals.iter().copied().enumerate() {
                tokio::time::sleep_until(t0 + Duration::from_millis(at * 10)).await;
                for (when, max) in &maxes {
                    if *when / 10 == at {
                        bulkhead.set_max_concurrent(*max);
                    }
                }
                let call = svc.clone().oneshot((id, ms, fail));
                tasks.push(tokio::spawn(call));
                tokio::task::yield_now().await;
            }
            for t in tasks {
                let _ = t.await.unwrap();
            }
            let v = violations.lock().unwrap().clone();
            proptest::prop_assert!(v.is_empty(), "{v:?}");
            // One priority: admitted in arrival order (ids were given in
            // arrival order) — calls granted at one instant reach the
            // upstream in whatever order their tasks run.
            let mut by_id = admitted.lock().unwrap().clone();
            by_id.sort_by_key(|(id, _)| *id);
            let late = by_id.windows(2).find(|w| w[1].1 < w[0].1);
            proptest::prop_assert!(late.is_none(), "{late:?} admitted out of arrival order");
            Ok(())
        })?;
    }
}

/// Any error is an overload (the proptest's upstream).
#[derive(Clone, Copy)]
struct AnyOverloaded;

impl Classify<(), BoxError> for AnyOverloaded {
    fn classify(&self, r: Result<&(), &BoxError>) -> Class {
        match r {
            Ok(()) => Class::Success,
            Err(_) => Class::Overloaded { retry_after: None },
        }
    }
}

/// A sampled call dropped at each await point — in line, granted but not
/// yet polled, running — holds nothing afterwards, and the controller
/// still moves for the calls that end.
#[tokio::test(start_paused = true)]
async fn a_sampled_call_dropped_at_every_await_leaves_nothing() {
    let bulkhead = Bulkhead::builder(2)
        .limit(Aimd::new().min(1).latency_threshold(Duration::MAX))
        .sample_every(1)
        .max_queue(10)
        .build()
        .unwrap();
    let upstream = tower::service_fn(|ms: u64| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<(), Overloaded>(())
    });
    let svc = bulkhead.layer().classify(AnyOverloaded).layer(upstream);
    // Running: two calls hold both permits; drop one mid-call.
    let mut a = Box::pin(svc.clone().oneshot(1_000));
    let mut b = Box::pin(svc.clone().oneshot(1_000));
    assert!(futures::poll!(a.as_mut()).is_pending());
    assert!(futures::poll!(b.as_mut()).is_pending());
    // In line: drop it there.
    let mut c = Box::pin(svc.clone().oneshot(10));
    assert!(futures::poll!(c.as_mut()).is_pending());
    assert_eq!(bulkhead.snapshot().waiting, 1);
    drop(c);
    assert_eq!(bulkhead.snapshot().waiting, 0);
    // Granted but never polled again: queued, then a permit frees.
    let mut d = Box::pin(svc.clone().oneshot(10));
    assert!(futures::poll!(d.as_mut()).is_pending());
    drop(a);
    assert_eq!(bulkhead.snapshot().in_flight, 2, "the permit went to d");
    drop(d);
    assert_eq!(bulkhead.snapshot().in_flight, 1);
    b.await.unwrap();
    let s = bulkhead.snapshot();
    assert_eq!((s.in_flight, s.waiting), (0, 0));
    assert!((1..=2).contains(&s.limit));
    // Extreme settings build and run: u32::MAX sampling, Duration::MAX.
    let huge = Bulkhead::builder(u32::MAX >> 1)
        .limit(Vegas::new())
        .sample_every(u32::MAX)
        .build()
        .unwrap();
    let svc = huge
        .layer()
        .classify(AnyOverloaded)
        .layer(tower::service_fn(|_: u64| async {
            Ok::<(), Overloaded>(())
        }));
    svc.oneshot(0).await.unwrap();
}

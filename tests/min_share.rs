//! A guaranteed minimum share of the bulkhead's limit per priority class
//! (the planning-service scenario: interactive requests keep most of the
//! upstream while a batch backlog waits, and the batch is not starved).

use proptest::prelude::*;
use semaforo::bulkhead::{Aimd, Bulkhead};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const BATCH: i32 = 0;
const INTERACTIVE: i32 = 1;

/// Calls of one priority class taking `work` each; counts them in flight.
#[derive(Clone, Default)]
struct Counts {
    running: [Arc<AtomicU32>; 2],
    started: [Arc<AtomicU32>; 2],
}

impl Counts {
    fn get(&self, priority: i32) -> u32 {
        self.running[usize::from(priority == INTERACTIVE)].load(Ordering::SeqCst)
    }

    fn started(&self, priority: i32) -> u32 {
        self.started[usize::from(priority == INTERACTIVE)].load(Ordering::SeqCst)
    }
}

fn upstream(
    counts: &Counts,
    work: Duration,
) -> impl Service<i32, Response = (), Error = std::io::Error, Future = impl Send> + Clone {
    let counts = counts.clone();
    tower::service_fn(move |p: i32| {
        let c = counts.running[usize::from(p == INTERACTIVE)].clone();
        counts.started[usize::from(p == INTERACTIVE)].fetch_add(1, Ordering::SeqCst);
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(work).await;
            c.fetch_sub(1, Ordering::SeqCst);
            Ok::<(), std::io::Error>(())
        }
    })
}

/// 200 batch calls arrive at t = 0, 200 interactive ones at t = 0.5 s; a
/// limit of 10, calls of 1 s. Returns the interactive calls in flight at
/// each 100 ms from t = 1.05 s while both classes still wait, and when the
/// first interactive call started.
async fn batch_then_interactive(bulkhead: &Bulkhead) -> (Vec<u32>, Duration) {
    let counts = Counts::default();
    let svc = bulkhead
        .layer()
        .priority(|p: &i32| *p)
        .layer(upstream(&counts, Duration::from_secs(1)));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..400 {
        if i == 200 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let p = if i < 200 { BATCH } else { INTERACTIVE };
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move { svc.oneshot(p).await.is_ok() }));
        tokio::task::yield_now().await;
    }
    let mut first = None;
    let mut samples = Vec::new();
    tokio::time::sleep_until(t0 + Duration::from_millis(1_050)).await;
    loop {
        let snap = bulkhead.snapshot();
        let inter = counts.get(INTERACTIVE);
        if inter > 0 && first.is_none() {
            first = Some(t0.elapsed());
        }
        if snap.waiting == 0 {
            break;
        }
        // Both classes still have callers waiting.
        if counts.started(BATCH) < 200 && counts.started(INTERACTIVE) < 200 {
            assert_eq!(counts.get(BATCH) + inter, 10);
            samples.push(inter);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        assert!(t.await.unwrap(), "no call is refused (the line holds all)");
    }
    (samples, first.unwrap_or(Duration::MAX))
}

/// Aging of 100 ms per level: interactive calls 0.5 s late rank behind
/// the whole batch backlog. With `min_share(1.., 0.8)` they hold 8 of the
/// 10 permits from the first releases on; without it, none until the
/// backlog (20 s of work) is gone.
#[tokio::test(start_paused = true)]
async fn interactive_keeps_its_share_behind_an_older_batch_backlog() {
    let with = Bulkhead::builder(10)
        .max_queue(1_000)
        .priority_aging(Some(Duration::from_millis(100)))
        .min_share(INTERACTIVE.., 0.8)
        .build()
        .unwrap();
    let (samples, first) = batch_then_interactive(&with).await;
    println!(
        "with min_share: first interactive at {first:?}, in flight {:?}",
        &samples[..samples.len().min(30)]
    );
    assert!(samples.len() >= 100, "both classes waited for 10 s+");
    // By 1.05 s the 10 batch calls of t = 0 have ended: their permits went
    // to the interactive class, up to its 8.
    assert_eq!(first, Duration::from_millis(1_050));
    assert!(
        samples.iter().all(|&n| n == 8),
        "interactive holds exactly its 8 while both want more: {samples:?}"
    );
    assert!(with.snapshot().class_in_flight.iter().all(|&n| n == 0));

    let without = Bulkhead::builder(10)
        .max_queue(1_000)
        .priority_aging(Some(Duration::from_millis(100)))
        .build()
        .unwrap();
    let (samples, first) = batch_then_interactive(&without).await;
    println!("without: first interactive at {first:?}");
    assert!(samples.iter().take(150).all(|&n| n == 0));
    assert!(first >= Duration::from_secs(20), "{first:?}");
}

/// Strict priority (no aging): an interactive flood would starve the
/// batch forever; `min_share(..=0, 0.2)` keeps it 2 of 10 permits.
#[tokio::test(start_paused = true)]
async fn a_batch_floor_survives_strict_priority() {
    for floor in [true, false] {
        let mut b = Bulkhead::builder(10).max_queue(2_000).priority_aging(None);
        if floor {
            b = b.min_share(..=BATCH, 0.2);
        }
        let bulkhead = b.build().unwrap();
        let counts = Counts::default();
        let svc = bulkhead
            .layer()
            .priority(|p: &i32| *p)
            .layer(upstream(&counts, Duration::from_secs(1)));
        let mut tasks = Vec::new();
        // 100 interactive first (they fill the permits), then 50 batch,
        // then 500 more interactive.
        for p in std::iter::repeat_n(INTERACTIVE, 100)
            .chain(std::iter::repeat_n(BATCH, 50))
            .chain(std::iter::repeat_n(INTERACTIVE, 500))
        {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move { svc.oneshot(p).await.is_ok() }));
            tokio::task::yield_now().await;
        }
        let mut batch_running = Vec::new();
        // Sampled between releases (calls end on whole seconds).
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            batch_running.push(counts.get(BATCH));
        }
        println!("floor {floor}: batch in flight each second {batch_running:?}");
        if floor {
            // 50 batch calls at 2 at a time: 25 s, so it runs all along.
            assert!(batch_running.iter().all(|&n| n == 2), "{batch_running:?}");
        } else {
            assert!(batch_running.iter().all(|&n| n == 0), "{batch_running:?}");
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
    }
}

/// Work-conserving: a class that wants nothing leaves its share to the
/// others, and a class that arrives to a full bulkhead cuts no running
/// call; the share follows a limit changed at run time.
#[tokio::test(start_paused = true)]
async fn the_share_is_lent_when_unused_and_follows_the_limit() {
    let bulkhead = Bulkhead::builder(10)
        .max_queue(1_000)
        .priority_aging(None)
        .min_share(INTERACTIVE.., 0.5)
        .build()
        .unwrap();
    let counts = Counts::default();
    let svc = bulkhead
        .layer()
        .priority(|p: &i32| *p)
        .layer(upstream(&counts, Duration::from_secs(1)));
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(
            async move { svc.oneshot(BATCH).await.is_ok() },
        ));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(counts.get(BATCH), 10, "the unused share is lent");
    for _ in 0..300 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            svc.oneshot(INTERACTIVE).await.is_ok()
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(counts.get(INTERACTIVE), 0, "no running call is cut");
    assert_eq!(bulkhead.snapshot().class_in_flight[0], 0);
    // Strict priority: interactive takes every permit that frees.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counts.get(INTERACTIVE), 10);
    // The limit grows to 40: the interactive class takes the new permits
    // too (it outranks), the batch waits.
    bulkhead.set_max_concurrent(40);
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(counts.get(INTERACTIVE), 40);
    assert_eq!(bulkhead.snapshot().class_in_flight[0], 40);
    for t in tasks {
        assert!(t.await.unwrap());
    }
    let snap = bulkhead.snapshot();
    assert_eq!((snap.in_flight, snap.waiting), (0, 0));
    assert_eq!(snap.class_in_flight, [0; 16]);
}

/// The share is of the current limit: under an adaptive limit that falls
/// from 40 to 10, interactive keeps ⌊0.8 × 10⌋ = 8 against an older batch.
#[tokio::test(start_paused = true)]
async fn the_share_follows_an_adaptive_limit() {
    let bulkhead = Bulkhead::builder(40)
        .limit(Aimd::new().min(1))
        .max_queue(20_000)
        .priority_aging(Some(Duration::from_millis(1)))
        .min_share(INTERACTIVE.., 0.8)
        .build()
        .unwrap();
    let counts = Counts::default();
    let svc = bulkhead
        .layer()
        .priority(|p: &i32| *p)
        .layer(upstream(&counts, Duration::from_secs(1)));
    let mut tasks = Vec::new();
    // The batch arrives 10 ms earlier: it outranks (aging 1 ms per level).
    for (i, p) in std::iter::repeat_n(BATCH, 1_000)
        .chain(std::iter::repeat_n(INTERACTIVE, 1_000))
        .enumerate()
    {
        if i == 1_000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move { svc.oneshot(p).await }));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1_490)).await;
    assert_eq!(counts.get(INTERACTIVE), 32, "⌊0.8 × 40⌋");
    bulkhead.set_max_concurrent(10);
    // Running calls end within 1 s; the next permits honour the new share.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(counts.get(INTERACTIVE) + counts.get(BATCH), 10);
    assert_eq!(counts.get(INTERACTIVE), 8, "⌊0.8 × 10⌋");
    bulkhead.close();
    for t in tasks {
        let _ = t.await.unwrap();
    }
    assert_eq!(bulkhead.snapshot().class_in_flight, [0; 16]);
}

#[test]
fn bad_shares_are_refused_with_the_reason() {
    let cases: Vec<(semaforo::bulkhead::BulkheadBuilder, &str)> = vec![
        (Bulkhead::builder(10).min_share(1.., 0.0), "(0, 1]"),
        (Bulkhead::builder(10).min_share(1.., -0.5), "(0, 1]"),
        (Bulkhead::builder(10).min_share(1.., 1.5), "(0, 1]"),
        (Bulkhead::builder(10).min_share(1.., f64::NAN), "(0, 1]"),
        (
            Bulkhead::builder(10).min_share(1.., f64::INFINITY),
            "(0, 1]",
        ),
        (Bulkhead::builder(10).min_share(5..5, 0.5), "empty"),
        #[allow(clippy::reversed_empty_ranges)]
        (Bulkhead::builder(10).min_share(5..=4, 0.5), "empty"),
        (
            Bulkhead::builder(10)
                .min_share(1..=5, 0.5)
                .min_share(5.., 0.1),
            "overlap",
        ),
        (
            Bulkhead::builder(10)
                .min_share(1.., 0.6)
                .min_share(..=0, 0.6),
            "add up",
        ),
        (
            (0..17).fold(Bulkhead::builder(10), |b, p| b.min_share(p..=p, 0.01)),
            "at most 16",
        ),
    ];
    for (b, want) in cases {
        let e = b.build().unwrap_err();
        assert_eq!(e.field, "min_share");
        assert!(e.to_string().contains(want), "{e} lacks {want}");
    }
    // The extremes are fine.
    Bulkhead::builder(1)
        .min_share(i32::MIN..=i32::MAX, 1.0)
        .build()
        .unwrap();
    Bulkhead::builder(10)
        .min_share(..0, 0.5)
        .min_share(0.., 0.5)
        .build()
        .unwrap();
}

/// `try_permit` has priority 0: counted in the class that holds 0.
#[tokio::test]
async fn try_permit_counts_in_its_class() {
    let bulkhead = Bulkhead::builder(2).min_share(..=0, 0.5).build().unwrap();
    let a = bulkhead.try_permit().unwrap();
    let b = bulkhead.try_permit().unwrap();
    assert_eq!(bulkhead.snapshot().class_in_flight[0], 2);
    let refused = bulkhead.try_permit().unwrap_err();
    // 1 s a round over a limit of 2 before any service time is known.
    assert_eq!(
        refused.retry_after(),
        Some(std::time::Duration::from_millis(500))
    );
    drop((a, b));
    assert_eq!(bulkhead.snapshot().class_in_flight[0], 0);
    assert_eq!(bulkhead.snapshot().in_flight, 0);
}

/// A class waiter granted a permit and dropped before taking it, and one
/// dropped while waiting: the class's count and the permits come back.
#[tokio::test(start_paused = true)]
async fn dropped_class_waiters_give_their_count_back() {
    let bulkhead = Bulkhead::builder(1)
        .max_queue(10)
        .min_share(1.., 1.0)
        .build()
        .unwrap();
    let counts = Counts::default();
    let mut svc = bulkhead
        .layer()
        .priority(|p: &i32| *p)
        .layer(upstream(&counts, Duration::from_secs(1)));
    let running = svc.ready().await.unwrap().call(INTERACTIVE);
    let mut waiting = Box::pin(svc.ready().await.unwrap().call(INTERACTIVE));
    let mut parked = Box::pin(svc.ready().await.unwrap().call(BATCH));
    let waker = futures_task_noop();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(waiting.as_mut().poll(&mut cx).is_pending());
    assert!(parked.as_mut().poll(&mut cx).is_pending());
    // The running call ends: the permit is granted to `waiting`, which is
    // dropped before it polls again.
    let mut running = std::pin::pin!(running);
    assert!(running.as_mut().poll(&mut cx).is_pending());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(running.as_mut().poll(&mut cx).is_ready());
    assert_eq!(bulkhead.snapshot().class_in_flight[0], 1, "granted");
    drop(waiting);
    // Its permit went on to the batch caller.
    assert_eq!(bulkhead.snapshot().class_in_flight[0], 0);
    assert_eq!(bulkhead.snapshot().in_flight, 1);
    drop(parked);
    let snap = bulkhead.snapshot();
    assert_eq!((snap.in_flight, snap.waiting), (0, 0));
}

fn futures_task_noop() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

use std::future::Future;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Calls of one length `d`, random arrivals of both classes, a random
    /// share and aging: whenever the class has had a waiter for longer
    /// than `d` without a break (so every permit now held was granted
    /// while it waited), it holds at least its guaranteed
    /// `max(1, ⌊share × limit⌋)` permits; FIFO within each class.
    #[test]
    fn a_waiting_class_reaches_its_share(
        limit in 1u32..12,
        share in 0.05f64..1.0,
        aging_ms in prop::option::of(0u64..2_000),
        arrivals in prop::collection::vec((0u64..3_000, any::<bool>()), 1..120),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let bulkhead = Bulkhead::builder(limit)
                .max_queue(10_000)
                .priority_aging(aging_ms.map(Duration::from_millis))
                .min_share(INTERACTIVE.., share)
                .build()
                .unwrap();
            let guaranteed = ((share * f64::from(limit)).floor() as u32).clamp(1, limit);
            let work = Duration::from_millis(100);
            let started = Arc::new(std::sync::Mutex::new(Vec::<(i32, usize)>::new()));
            let log = started.clone();
            let svc = bulkhead.layer().priority(|c: &(i32, usize)| c.0).layer(
                tower::service_fn(move |c: (i32, usize)| {
                    log.lock().unwrap().push(c);
                    async move {
                        tokio::time::sleep(work).await;
                        Ok::<(), std::io::Error>(())
                    }
                }),
            );
            let mut arrivals = arrivals;
            arrivals.sort_by_key(|a| a.0);
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            let mut next = 0;
            // Interactive calls waiting (arrived, not started) since when,
            // without a break: when every call that had arrived by the
            // last look has started, the class may have run out of
            // waiters for an instant (and lent a permit), so it counts
            // as a new start.
            let mut waiting_since: Option<Instant> = None;
            let mut arrived = [0usize; 2];
            let mut arrived_before = 0usize;
            for ms in 0..6_000u64 {
                let now = t0 + Duration::from_millis(ms);
                tokio::time::sleep_until(now).await;
                while next < arrivals.len() && arrivals[next].0 <= ms {
                    let p = if arrivals[next].1 { INTERACTIVE } else { BATCH };
                    let id = arrived[usize::from(p == INTERACTIVE)];
                    arrived[usize::from(p == INTERACTIVE)] += 1;
                    let svc = svc.clone();
                    tasks.push(tokio::spawn(async move { svc.oneshot((p, id)).await }));
                    next += 1;
                }
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                }
                let snap = bulkhead.snapshot();
                let started_inter = started
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|c| c.0 == INTERACTIVE)
                    .count();
                let inter_waiting = arrived[1] > started_inter;
                waiting_since = match (inter_waiting, waiting_since) {
                    (false, _) => None,
                    (true, Some(t)) if started_inter < arrived_before => Some(t),
                    (true, _) => Some(now),
                };
                arrived_before = arrived[1];
                if let Some(t) = waiting_since {
                    if now.duration_since(t) > work {
                        prop_assert!(
                            snap.class_in_flight[0] >= u64::from(guaranteed),
                            "at {ms} ms the class holds {} < {guaranteed} of {limit}",
                            snap.class_in_flight[0]
                        );
                    }
                }
                prop_assert!(snap.in_flight <= u64::from(limit));
                if next == arrivals.len() && snap.in_flight == 0 && snap.waiting == 0 {
                    break;
                }
            }
            for t in tasks {
                prop_assert!(t.await.unwrap().is_ok());
            }
            let log = started.lock().unwrap().clone();
            for p in [BATCH, INTERACTIVE] {
                let ids: Vec<usize> = log.iter().filter(|c| c.0 == p).map(|c| c.1).collect();
                prop_assert!(ids.windows(2).all(|w| w[0] < w[1]), "FIFO in {p}: {ids:?}");
            }
            prop_assert_eq!(bulkhead.snapshot().class_in_flight, [0; 16]);
            Ok(())
        })?;
    }
}

/// The LLM preset reads `Priority` from request extensions: interactive
/// requests keep 8 of 10 permits behind an older batch backlog.
#[cfg(feature = "llm")]
#[tokio::test(start_paused = true)]
async fn the_llm_preset_keeps_the_interactive_share() {
    use bytes::Bytes;
    use semaforo::bulkhead::Priority;
    use semaforo::llm::{LlmStack, Tier};
    let bulkhead = Bulkhead::builder(10)
        .max_queue(1_000)
        .priority_aging(Some(Duration::from_millis(100)))
        .min_share(INTERACTIVE.., 0.8)
        .build()
        .unwrap();
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 1_000_000,
        tokens_per_minute: 100_000_000,
    })
    .bulkhead(bulkhead.clone())
    .build()
    .unwrap();
    let counts = Counts::default();
    let c = counts.clone();
    let client = tower::service_fn(move |req: http::Request<Bytes>| {
        let p = *req.extensions().get::<Priority>().unwrap();
        let c = c.running[usize::from(p.0 == INTERACTIVE)].clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(200)
                    .body(Bytes::from_static(
                        br#"{"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#,
                    ))
                    .unwrap(),
            )
        }
    });
    let llm = stack.layer().layer(client);
    let mut tasks = Vec::new();
    for i in 0..200 {
        if i == 100 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let p = if i < 100 { BATCH } else { INTERACTIVE };
        let mut req = http::Request::post("/v1/chat/completions")
            .body(Bytes::from_static(
                br#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[]}"#,
            ))
            .unwrap();
        req.extensions_mut().insert(Priority(p));
        let llm = llm.clone();
        tasks.push(tokio::spawn(async move { llm.oneshot(req).await.is_ok() }));
        tokio::task::yield_now().await;
    }
    let mut seen = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        seen.push(counts.get(INTERACTIVE));
    }
    println!("interactive in flight each second: {seen:?}");
    assert_eq!(seen, vec![8; 5]);
    for t in tasks {
        assert!(t.await.unwrap());
    }
}

/// A `try_permit` refused for want of a free permit says when to come back,
/// as a full line does (the time between two admissions).
#[tokio::test(start_paused = true)]
async fn a_refused_try_permit_has_a_retry_after() {
    let bulkhead = Bulkhead::builder(4)
        .expected_service_time(std::time::Duration::from_secs(2))
        .build()
        .unwrap();
    let held: Vec<_> = (0..4).map(|_| bulkhead.try_permit().unwrap()).collect();
    let r = bulkhead.try_permit().unwrap_err();
    assert_eq!(r.kind(), semaforo::RejectKind::QueueFull);
    assert_eq!(
        r.retry_after(),
        Some(std::time::Duration::from_millis(500)),
        "2 s / 4"
    );
    assert_eq!(bulkhead.snapshot().rejected_queue_full, 1);
    drop(held);
    assert!(bulkhead.try_permit().is_ok());
}

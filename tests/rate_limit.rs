//! `quota::RateLimit`: one GCRA cell for every call, on paused time.

use proptest::prelude::*;
use semaforo::quota::{Rate, RateLimit};
use semaforo::{RejectKind, Rejected};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{service_fn, ServiceBuilder, ServiceExt};

fn limit(per_second: u32, burst: u32) -> RateLimit {
    RateLimit::builder(Rate::per_second(per_second).burst(burst))
        .name("api")
        .build()
        .unwrap()
}

/// A burst, then one call per 1/R; each refusal's `retry_after` is exact:
/// waiting it out admits the next call, a nanosecond less does not.
#[tokio::test(start_paused = true)]
async fn burst_then_rate_with_exact_retry_after() {
    let l = limit(10, 3);
    for _ in 0..3 {
        l.try_take().unwrap();
    }
    let r = l.try_take().unwrap_err();
    assert_eq!(r.kind(), RejectKind::QuotaExceeded);
    assert_eq!(r.retry_after(), Some(Duration::from_millis(100)));
    assert_eq!(r.policy().map(|p| p.quota), Some(10));
    tokio::time::advance(Duration::from_millis(100) - Duration::from_nanos(1)).await;
    assert!(l.try_take().is_err(), "a nanosecond early");
    tokio::time::advance(Duration::from_nanos(1)).await;
    l.try_take().unwrap();
    // A weight above the burst can never fit: no retry_after.
    let r = l.try_take_n(4).unwrap_err();
    assert_eq!(r.retry_after(), None);
    // The layer: refused calls never reach the inner service.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(limit(1, 1).layer())
        .service(service_fn(move |_: ()| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::io::Error>(()) }
        }));
    svc.clone().oneshot(()).await.unwrap();
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert_eq!(
        Rejected::from_box(&err).map(|r| r.kind()),
        Some(RejectKind::QuotaExceeded)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Two threads at once on one cell: together exactly the burst (one call
/// an hour refills nothing during the test, on a real clock).
#[test]
fn two_threads_share_one_burst() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = RateLimit::builder(Rate::per_hour(1).burst(1_000))
            .build()
            .unwrap();
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move { (0..5_000).filter(|_| l.try_take().is_ok()).count() })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        assert_eq!(total, 1_000);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Over any window W the admitted calls are at most R·W + B, whatever
    /// the arrivals (the GCRA bound).
    #[test]
    fn never_more_than_rate_times_window_plus_burst(
        gaps in proptest::collection::vec(0u64..50_000, 1..400),
        per_second in 1u32..200,
        burst in 1u32..20,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let admitted = rt.block_on(async {
            let l = limit(per_second, burst);
            let mut admitted = Vec::new();
            for g in gaps {
                tokio::time::advance(Duration::from_micros(g)).await;
                if l.try_take().is_ok() {
                    admitted.push(Instant::now());
                }
            }
            admitted
        });
        let unit = 1.0 / f64::from(per_second);
        for i in 0..admitted.len() {
            for j in i..admitted.len() {
                let w = (admitted[j] - admitted[i]).as_secs_f64();
                let n = (j - i + 1) as f64;
                prop_assert!(
                    n <= w / unit + f64::from(burst) + 1e-6,
                    "{n} admitted in {w} s at {per_second}/s burst {burst}"
                );
            }
        }
    }
}

/// The cost of keeping a unit's refill in whole nanoseconds rounded up (the
/// Rate docs): a burst drained and refilled for exactly its window, at one
/// instant, comes back whole where the unit is exact and at most one short
/// where it is not — the short call told to retry within nanoseconds
/// (a microsecond at most here), never a whole unit. Never over.
#[tokio::test(start_paused = true)]
async fn an_exact_refill_is_at_most_one_short_and_told_nanoseconds() {
    let mut fails = Vec::new();
    for (rate, exact) in [
        (Rate::per_second(3), false),
        (Rate::per_minute(7), false),
        (Rate::per_second(10), true),
        (Rate::per_minute(600), true),
    ] {
        let l = RateLimit::builder(rate).build().unwrap();
        tokio::time::advance(Duration::new(3_600, 1)).await;
        let mut short = 0;
        for round in 0..10 {
            let mut admitted = 0;
            let refused = loop {
                match l.try_take() {
                    Ok(()) if admitted <= rate.burst => admitted += 1,
                    Ok(()) => break None,
                    Err(r) => break Some(r),
                }
            };
            let Some(refused) = refused else {
                fails.push(format!("{rate:?} round {round}: over the burst"));
                break;
            };
            if admitted < rate.burst {
                short += 1;
                let told = refused.retry_after().unwrap_or(Duration::MAX);
                if exact || admitted + 1 < rate.burst || told > Duration::from_micros(1) {
                    fails.push(format!("{rate:?} round {round}: {admitted}, told {told:?}"));
                }
            }
            tokio::time::advance(rate.per).await;
        }
        if !exact && short == 0 {
            fails.push(format!("{rate:?}: never short — the docs are out of date"));
        }
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

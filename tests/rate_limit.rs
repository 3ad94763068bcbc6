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

/// A burst drained and refilled for exactly its window fits whole again,
/// also when a unit's refill is not a whole number of nanoseconds (3 a
/// second: 2 of 3 came back, the last refused for a nanosecond; 7 a minute:
/// 6 of 7) — and a call a nanosecond before an exact refill is still
/// refused (no slack where nothing was rounded).
#[tokio::test(start_paused = true)]
async fn a_burst_refilled_for_exactly_its_window_fits_whole_again() {
    let mut fails = Vec::new();
    for rate in [
        Rate::per_second(3),
        Rate::per_minute(7),
        Rate::per_minute(7_000),
        Rate::per_second(10),
    ] {
        let l = RateLimit::builder(rate).build().unwrap();
        tokio::time::advance(Duration::new(3_600, 1)).await;
        for round in 0..10 {
            let mut admitted = 0;
            while admitted <= rate.burst && l.try_take().is_ok() {
                admitted += 1;
            }
            if admitted != rate.burst {
                fails.push(format!("{rate:?} round {round}: {admitted}"));
            }
            tokio::time::advance(rate.per).await;
        }
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
    // Exact: 10 a second, one 100 ms; a nanosecond early is refused.
    let l = RateLimit::builder(Rate::per_second(10).burst(1))
        .build()
        .unwrap();
    l.try_take().unwrap();
    tokio::time::advance(Duration::from_millis(100) - Duration::from_nanos(1)).await;
    assert!(l.try_take().is_err());
    tokio::time::advance(Duration::from_nanos(1)).await;
    l.try_take().unwrap();
}

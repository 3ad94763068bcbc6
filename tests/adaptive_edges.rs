//! Edges of an adaptive line found by an outside attack: its bound after
//! the ceiling moved, during a probe, and the refusals' `retry_after`.

use semaforo::bulkhead::{Aimd, Bulkhead, Vegas};
use semaforo::{RejectKind, Rejected};
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

#[derive(Clone, Copy, Debug)]
struct R {
    ms: u64,
}

fn inner() -> impl Service<R, Response = (), Error = std::io::Error, Future = impl Send> + Clone {
    tower::service_fn(move |r: R| async move {
        tokio::time::sleep(Duration::from_millis(r.ms)).await;
        Ok::<(), std::io::Error>(())
    })
}

fn rej(e: &semaforo::BoxError) -> Rejected {
    Rejected::from_box(e)
        .cloned()
        .unwrap_or_else(|| panic!("not a rejection: {e}"))
}
/// After set_max_concurrent above the builder's maximum, an adaptive limit
/// that grows past it lets the line grow past max_queue.
#[tokio::test(start_paused = true)]
async fn adaptive_line_never_exceeds_max_queue() {
    let bh = Bulkhead::builder(10)
        .limit(Aimd::new().min(1))
        .sample_every(1)
        .max_queue(10)
        .build()
        .unwrap();
    let svc = bh.layer().layer(inner());
    bh.set_max_concurrent(40);
    // Grow the limit: successful short calls with the bulkhead at least half busy.
    for _ in 0..40 {
        let lim = bh.snapshot().limit as usize;
        let mut ts = Vec::new();
        for _ in 0..lim {
            let s = svc.clone();
            ts.push(tokio::spawn(async move { s.oneshot(R { ms: 10 }).await }));
        }
        for t in ts {
            let _ = t.await;
        }
    }
    let lim = bh.snapshot().limit;
    println!("limit grew to {lim}");
    // Saturate, then fill the line.
    let mut ts = Vec::new();
    for _ in 0..(lim as usize + 100) {
        let s = svc.clone();
        ts.push(tokio::spawn(
            async move { s.oneshot(R { ms: 10_000 }).await },
        ));
        tokio::task::yield_now().await;
    }
    tokio::task::yield_now().await;
    let s = bh.snapshot();
    println!("{s:?}");
    assert!(
        s.waiting <= s.max_queue,
        "line {} > max_queue {}",
        s.waiting,
        s.max_queue
    );
    bh.close();
    for t in ts {
        let _ = t.await;
    }
}

/// Refusals a hostile caller must be able to back off on: a newcomer
/// refused at a full line under an adaptive limit (the line shrank).
#[tokio::test(start_paused = true)]
async fn adaptive_full_line_refusal_has_retry_after() {
    let bh = Bulkhead::builder(10)
        .limit(Aimd::new().min(1))
        .max_queue(10)
        .build()
        .unwrap();
    let svc = bh.layer().layer(inner());
    let mut ts = Vec::new();
    for _ in 0..20 {
        let s = svc.clone();
        ts.push(tokio::spawn(async move { s.oneshot(R { ms: 1000 }).await }));
        tokio::task::yield_now().await;
    }
    bh.set_max_concurrent(1); // bound 1
    tokio::task::yield_now().await;
    let e = svc.clone().oneshot(R { ms: 1 }).await.unwrap_err();
    let r = rej(&e);
    println!("newcomer: {r} retry_after {:?}", r.retry_after());
    let mut shed_ra = None;
    for t in ts {
        if let Err(e) = t.await.unwrap() {
            shed_ra = rej(&e).retry_after();
        }
    }
    println!("shed retry_after {shed_ra:?}");
    assert_eq!(r.kind(), RejectKind::QueueFull);
    assert!(
        r.retry_after().is_some(),
        "newcomer refused by the shrunken line has no retry_after (shed ones get {shed_ra:?})"
    );
}

/// nominal limit: the line must shrink to max_queue × nominal / max.
#[tokio::test(start_paused = true)]
async fn vegas_probe_set_max_sheds_to_bound() {
    let bh = Bulkhead::builder(100)
        .limit(Vegas::new().min(1))
        .max_queue(100)
        .build()
        .unwrap();
    let svc = bh.layer().layer(inner());
    let mut ts = Vec::new();
    for _ in 0..103 {
        let s = svc.clone();
        ts.push(tokio::spawn(
            async move { s.oneshot(R { ms: 10_000 }).await },
        ));
        tokio::task::yield_now().await;
    }
    let s = bh.snapshot();
    println!(
        "before: limit {} nominal {:?} waiting {}",
        s.limit, s.adaptive_limit, s.waiting
    );
    bh.set_max_concurrent(10);
    tokio::task::yield_now().await;
    let s = bh.snapshot();
    println!(
        "after: limit {} nominal {:?} waiting {} shed {}",
        s.limit, s.adaptive_limit, s.waiting, s.shed
    );
    bh.close();
    for t in ts {
        let _ = t.await;
    }
    assert!(s.waiting <= 10, "line {} > bound 100×10/100", s.waiting);
}

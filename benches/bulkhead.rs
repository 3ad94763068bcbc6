//! Bulkhead cost next to what people use today, in the same run:
//! the bare service, a bare `tokio::sync::Semaphore`, tower's `ConcurrencyLimit` and
//! tower-resilience's `Bulkhead`; then the line's cost against its length (0 → 100,000).
//!
//! Every call goes through `ready()` then `call()`; everything completes at once,
//! so futures are driven with `now_or_never` and only the layer's own work is timed.

mod common;
use common::{bare, once};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use futures::FutureExt;
use semaforo::bulkhead::{Bulkhead, QueueTicket};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

fn tower_resilience_bulkhead() -> tower_resilience::bulkhead::BulkheadLayer {
    tower_resilience::bulkhead::BulkheadLayer::builder()
        .max_concurrent_calls(1000)
        .build()
        .unwrap()
}

fn uncontended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("bulkhead/uncontended");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let mut s = bare();
    g.bench_function("bare service", |b| b.iter(|| once(&mut s, black_box(1))));

    let sem = Arc::new(tokio::sync::Semaphore::new(1000));
    let mut s = bare();
    g.bench_function("tokio Semaphore (acquire+call+release)", |b| {
        b.iter(|| {
            let permit = sem.clone().try_acquire_owned().expect("free permit");
            let r = once(&mut s, black_box(1));
            drop(permit);
            r
        })
    });

    let mut s = ServiceBuilder::new()
        .concurrency_limit(1000)
        .service(bare());
    g.bench_function("tower ConcurrencyLimit", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    let mut s = ServiceBuilder::new()
        .layer(tower_resilience_bulkhead())
        .service(bare());
    g.bench_function("tower-resilience Bulkhead", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    let bh = Bulkhead::builder(1000).max_queue(1000).build().unwrap();
    let mut s = ServiceBuilder::new().layer(bh.layer()).service(bare());
    g.bench_function("semaforo Bulkhead", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    // Adaptive limits: every call sampled (two clock reads, a windowed
    // controller update under a lock), and 1 in 8.
    for (label, every) in [
        ("semaforo Bulkhead, Vegas limit (every call sampled)", 1),
        ("semaforo Bulkhead, Vegas limit (1 in 8 sampled)", 8),
    ] {
        let adaptive = Bulkhead::builder(1000)
            .max_queue(1000)
            .limit(semaforo::bulkhead::Vegas::new().initial(1000))
            .sample_every(every)
            .build()
            .unwrap();
        let mut s = ServiceBuilder::new()
            .layer(adaptive.layer())
            .service(bare());
        g.bench_function(label, |b| b.iter(|| once(&mut s, black_box(1))));
    }

    // A call of a `min_share` class is counted under the lock; one outside
    // every class keeps the lock-free path.
    let shared = Bulkhead::builder(1000)
        .max_queue(1000)
        .min_share(1.., 0.8)
        .build()
        .unwrap();
    for (label, p) in [
        ("semaforo Bulkhead, min_share, call in the class", 1),
        ("semaforo Bulkhead, min_share, call outside every class", 0),
    ] {
        let mut s = ServiceBuilder::new()
            .layer(shared.layer().priority(move |_: &u64| p))
            .service(bare());
        g.bench_function(label, |b| b.iter(|| once(&mut s, black_box(1))));
    }

    // Same, with the request-reading closures configured (priority + ticket, no partition).
    let mut s = ServiceBuilder::new()
        .layer(bh.layer().priority(|x: &u64| (*x % 3) as i32))
        .service(bare());
    g.bench_function("semaforo Bulkhead + priority fn", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    g.finish();
}

/// Two threads hammering clones of one limiter (the machine has 2 cores).
fn contended(c: &mut Criterion) {
    fn run<S>(svc: S, iters: u64) -> Duration
    where
        S: Service<u64, Response = u64> + Clone + Send + 'static,
        S::Error: std::fmt::Debug,
    {
        let start = Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let mut s = svc.clone();
                std::thread::spawn(move || {
                    for i in 0..iters / 2 {
                        black_box(once(&mut s, i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        start.elapsed()
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("bulkhead/contended_2_threads");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("tower ConcurrencyLimit", |b| {
        b.iter_custom(|iters| {
            let s = ServiceBuilder::new()
                .concurrency_limit(1000)
                .service(bare());
            run(tower::util::BoxCloneSyncService::new(s), iters)
        })
    });
    g.bench_function("tower-resilience Bulkhead", |b| {
        b.iter_custom(|iters| {
            let s = ServiceBuilder::new()
                .layer(tower_resilience_bulkhead())
                .service(bare());
            run(tower::util::BoxCloneSyncService::new(s), iters)
        })
    });
    g.bench_function("semaforo Bulkhead", |b| {
        b.iter_custom(|iters| {
            let bh = Bulkhead::builder(1000).build().unwrap();
            let s = ServiceBuilder::new().layer(bh.layer()).service(bare());
            run(tower::util::BoxCloneSyncService::new(s), iters)
        })
    });
    g.finish();
}

/// Joining and leaving the line, and asking a ticket for its position, with
/// `n` callers already waiting: O(log n), so 100,000 waiters cost little more than 1,000.
fn line_operations(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("bulkhead/line");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for n in [0usize, 1_000, 100_000] {
        let bh = Bulkhead::builder(1).max_queue(200_000).build().unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(bh.layer().ticket(|t: &QueueTicket| Some(t.clone())))
            .service(service_fn(|_t: QueueTicket| {
                std::future::pending::<Result<(), Infallible>>()
            }));
        let holder = svc
            .ready()
            .now_or_never()
            .unwrap()
            .unwrap()
            .call(QueueTicket::new());
        let mut waiting = Vec::with_capacity(n);
        let middle = QueueTicket::new();
        for i in 0..n {
            let t = if i == n / 2 {
                middle.clone()
            } else {
                QueueTicket::new()
            };
            waiting.push(svc.ready().now_or_never().unwrap().unwrap().call(t));
        }
        g.bench_with_input(BenchmarkId::new("join and leave", n), &n, |b, _| {
            b.iter(|| {
                let f = svc
                    .ready()
                    .now_or_never()
                    .unwrap()
                    .unwrap()
                    .call(QueueTicket::new());
                drop(black_box(f));
            })
        });
        if n > 0 {
            g.bench_with_input(
                BenchmarkId::new("position of the middle waiter", n),
                &n,
                |b, _| b.iter(|| black_box(middle.status())),
            );
        }
        drop(waiting);
        drop(holder);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = uncontended, contended, line_operations
}
criterion_main!(benches);

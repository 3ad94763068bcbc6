//! Closed-breaker cost next to the peers doing the same job, in the same run:
//! tower-resilience's `CircuitBreaker` (a tower layer) and failsafe's futures
//! `CircuitBreaker` (wrapping the same bare service future).

mod common;
use common::{bare, once, two_threads};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use failsafe::futures::CircuitBreaker as _;
use futures::FutureExt;
use semaforo::breaker::Breaker;
use std::time::Duration;
use tower::{Service, ServiceBuilder, ServiceExt};

fn semaforo_consecutive() -> Breaker {
    Breaker::builder().consecutive_failures(5).build().unwrap()
}

fn semaforo_rate() -> Breaker {
    Breaker::builder()
        .consecutive_failures(5)
        .failure_rate(0.5)
        .window_calls(100)
        .build()
        .unwrap()
}

fn tower_resilience_layer() -> tower_resilience::circuitbreaker::CircuitBreakerLayer<
    tower_resilience::circuitbreaker::DefaultClassifier,
> {
    tower_resilience_window(100)
}

fn tower_resilience_window(
    n: usize,
) -> tower_resilience::circuitbreaker::CircuitBreakerLayer<
    tower_resilience::circuitbreaker::DefaultClassifier,
> {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(n)
        .build()
        .unwrap()
}

/// The closed path's cost against the failure-rate window's size.
fn window_size(c: &mut Criterion) {
    let rt = common::runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("breaker/window_size");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for n in [10usize, 100, 1_000, 10_000] {
        let br = Breaker::builder()
            .consecutive_failures(5)
            .failure_rate(0.5)
            .window_calls(n as u32)
            .build()
            .unwrap();
        let mut s = ServiceBuilder::new().layer(br.layer()).service(bare());
        g.bench_with_input(BenchmarkId::new("semaforo Breaker", n), &n, |b, _| {
            b.iter(|| once(&mut s, black_box(1)))
        });
        let mut s = ServiceBuilder::new()
            .layer(tower_resilience_window(n))
            .service(bare());
        g.bench_with_input(
            BenchmarkId::new("tower-resilience CircuitBreaker", n),
            &n,
            |b, _| b.iter(|| once(&mut s, black_box(1))),
        );
    }
    g.finish();
}

fn closed(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("breaker/closed_uncontended");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let mut s = bare();
    g.bench_function("bare service", |b| b.iter(|| once(&mut s, black_box(1))));

    let br = semaforo_consecutive();
    let mut s = ServiceBuilder::new().layer(br.layer()).service(bare());
    g.bench_function("semaforo Breaker (consecutive)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    let br = semaforo_rate();
    let mut s = ServiceBuilder::new().layer(br.layer()).service(bare());
    g.bench_function("semaforo Breaker (consecutive + rate window 100)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    let mut s = ServiceBuilder::new()
        .layer(tower_resilience_layer())
        .service(bare());
    g.bench_function("tower-resilience CircuitBreaker", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    let cb = failsafe::Config::new().build();
    let mut s = bare();
    g.bench_function("failsafe CircuitBreaker", |b| {
        b.iter(|| {
            let svc = s.ready().now_or_never().unwrap().unwrap();
            let fut = svc.call(black_box(1));
            cb.call(fut).now_or_never().unwrap().unwrap()
        })
    });
    g.finish();
}

fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker/closed_contended_2_threads");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("semaforo Breaker (consecutive)", |b| {
        b.iter_custom(|iters| {
            let br = semaforo_consecutive();
            two_threads(
                ServiceBuilder::new().layer(br.layer()).service(bare()),
                iters,
            )
        })
    });
    g.bench_function("semaforo Breaker (consecutive + rate window 100)", |b| {
        b.iter_custom(|iters| {
            let br = semaforo_rate();
            two_threads(
                ServiceBuilder::new().layer(br.layer()).service(bare()),
                iters,
            )
        })
    });
    g.bench_function("tower-resilience CircuitBreaker", |b| {
        b.iter_custom(|iters| {
            two_threads(
                ServiceBuilder::new()
                    .layer(tower_resilience_layer())
                    .service(bare()),
                iters,
            )
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = closed, window_size, contended
}
criterion_main!(benches);

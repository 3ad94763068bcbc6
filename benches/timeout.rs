//! A per-attempt timeout on a call that answers at once, next to tower's
//! `Timeout` and tower-resilience's `TimeLimiter`, in the same run. semaforo arms
//! its timer only if the inner future is still pending at the first poll, so a
//! call that answers at once reads no clock and registers no timer.

mod common;
use common::{bare, once};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use semaforo::timeout::Timeout;
use std::time::Duration;
use tower::ServiceBuilder;

fn attempt(c: &mut Criterion) {
    let rt = common::runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("timeout/attempt");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut s = bare();
    g.bench_function("bare service", |b| b.iter(|| once(&mut s, black_box(1))));
    let mut s = ServiceBuilder::new()
        .timeout(Duration::from_secs(30))
        .service(bare());
    g.bench_function("tower Timeout", |b| b.iter(|| once(&mut s, black_box(1))));
    let mut s = ServiceBuilder::new()
        .layer(
            tower_resilience::timelimiter::TimeLimiterLayer::builder()
                .timeout_duration(Duration::from_secs(30))
                .cancel_running_future(true)
                .build(),
        )
        .service(bare());
    g.bench_function("tower-resilience TimeLimiter", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    let t = Timeout::builder()
        .attempt(Duration::from_secs(30))
        .build()
        .expect("valid timeout");
    let mut s = ServiceBuilder::new().layer(t.layer()).service(bare());
    g.bench_function("semaforo Timeout (attempt)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    g.finish();
}

/// Two threads calling clones of one service (each its own timer, nothing
/// shared but the runtime's timer wheel, which a call that answers at once
/// never reaches in semaforo).
fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("timeout/contended_2_threads");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let s = ServiceBuilder::new()
        .timeout(Duration::from_secs(30))
        .service(bare());
    common::on_two_threads(&mut g, "tower Timeout", s);
    let t = Timeout::builder()
        .attempt(Duration::from_secs(30))
        .build()
        .expect("valid timeout");
    let s = ServiceBuilder::new().layer(t.layer()).service(bare());
    common::on_two_threads(&mut g, "semaforo Timeout (attempt)", s);
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = attempt, contended
}
criterion_main!(benches);

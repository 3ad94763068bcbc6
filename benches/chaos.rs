//! What fault injection costs when it is off (it must cost nothing
//! measurable), next to the bare service in the same run; and the other
//! degradation pieces on their healthy path: a fallback layer whose inner
//! call succeeds, and a degradation switch's `level()` read.

mod common;
use common::{bare, once};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use semaforo::chaos::{Chaos, Fault, Latency};
use semaforo::classify::Class;
use semaforo::degrade::Degrade;
use semaforo::fallback::{self, FallbackLayer};
use std::time::Duration;
use tower::Layer;

fn degradation(c: &mut Criterion) {
    let rt = common::runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("degradation");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let mut s = bare();
    g.bench_function("bare service", |b| b.iter(|| once(&mut s, black_box(7))));

    // The floor of any layer that answers `BoxError` (as tower layers do):
    // a future of its own, moved through memory, and an error type to map.
    let mut s =
        tower::util::MapErrLayer::new(|e: std::convert::Infallible| -> semaforo::BoxError {
            match e {}
        })
        .layer(bare());
    g.bench_function("tower MapErr into BoxError (a wrapper's floor)", |b| {
        b.iter(|| once(&mut s, black_box(7)))
    });

    let chaos: Chaos<u64> = Chaos::builder()
        .fault(Fault::latency(Latency::Fixed(Duration::from_secs(1))))
        .fault(Fault::error(Class::Overloaded { retry_after: None }).rate(0.5))
        .build()
        .unwrap();
    let mut s = chaos.layer().layer(bare());
    g.bench_function("semaforo Chaos, disabled (2 faults configured)", |b| {
        b.iter(|| once(&mut s, black_box(7)))
    });

    let mut s = FallbackLayer::new(fallback::value(0u64)).layer(bare());
    g.bench_function("semaforo Fallback, inner call succeeds", |b| {
        b.iter(|| once(&mut s, black_box(7)))
    });

    let switch = Degrade::builder().build().unwrap();
    g.bench_function("semaforo Degrade::level", |b| b.iter(|| switch.level()));
    g.finish();
}

criterion_group!(benches, degradation);
criterion_main!(benches);

//! The routing decision: semaforo's router (asks every deployment's pacer
//! when a call could start, skips open breakers, weighted ties) next to
//! tower's power-of-two-choices balancer over the same number of ready
//! services, in the same run; a call included in both.

mod common;
use common::{bare, once};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use semaforo::breaker::Breaker;
use semaforo::pace::{Cost, Pace};
use semaforo::route::{Deployment, Router};
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::Constant;

fn route(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("route/decide");
    for n in [2usize, 8, 64] {
        let mut b = Router::builder();
        for i in 0..n {
            let pace = Pace::builder()
                .requests_per_minute(u32::MAX as u64 * 60)
                .tokens_per_minute(u32::MAX as u64 * 60)
                .build()
                .unwrap();
            let breaker = Breaker::builder().build().unwrap();
            b = b.deployment(
                Deployment::new(format!("d{i}"), bare())
                    .pace(pace)
                    .breaker(breaker),
            );
        }
        let mut router = b.weigh(|_: &u64| Cost::tokens(7)).build().unwrap();
        g.bench_with_input(
            BenchmarkId::new("semaforo Router (pacer + breaker each)", n),
            &n,
            |bch, _| bch.iter(|| once(&mut router, black_box(1))),
        );
        let services: Vec<_> = (0..n).map(|_| Constant::new(bare(), 1)).collect();
        let mut p2c = Balance::new(ServiceList::new(services));
        g.bench_with_input(
            BenchmarkId::new("tower balance::p2c (ready services)", n),
            &n,
            |bch, _| bch.iter(|| once(&mut p2c, black_box(1))),
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = route
}
criterion_main!(benches);

//! Quota admission next to governor's own keyed `check_key` in the same run:
//! a hot key, a new key each call, and a hot key with 1,000,000 keys present.

mod common;
use common::try_once;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use governor::{Quota as GQuota, RateLimiter};
use semaforo::quota::{PlanId, Quota, Rate};
use std::convert::Infallible;
use std::num::NonZeroU32;
use std::time::Duration;
use tower::{service_fn, ServiceBuilder};

fn admission(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("quota");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let big = NonZeroU32::new(u32::MAX).unwrap();

    let gov = RateLimiter::keyed(GQuota::per_second(big));
    g.bench_function("hot key/governor keyed check_key", |b| {
        b.iter(|| black_box(gov.check_key(&7u64)))
    });

    let quota = Quota::builder()
        .plan("p", Rate::new(u32::MAX, Duration::from_secs(60)))
        .build::<u64>()
        .unwrap();
    let plan = quota.plan_id("p").unwrap();
    let mut s = ServiceBuilder::new()
        .layer(quota.layer(move |_: &u64| (7u64, plan)))
        .service(service_fn(|x: u64| {
            std::future::ready(Ok::<_, Infallible>(x))
        }));
    g.bench_function("hot key/semaforo Quota layer (call included)", |b| {
        b.iter(|| black_box(try_once(&mut s, 1).is_ok()))
    });

    let gov = RateLimiter::keyed(GQuota::per_second(big));
    let mut k = 0u64;
    g.bench_function("new key/governor keyed check_key", |b| {
        b.iter(|| {
            k += 1;
            black_box(gov.check_key(&k))
        })
    });
    let quota = Quota::builder()
        .plan("p", Rate::new(u32::MAX, Duration::from_secs(60)))
        .build::<u64>()
        .unwrap();
    let mut s = ServiceBuilder::new()
        .layer(quota.layer(move |x: &u64| (*x, PlanId::clone(&plan))))
        .service(service_fn(|x: u64| {
            std::future::ready(Ok::<_, Infallible>(x))
        }));
    let mut k = 0u64;
    g.bench_function("new key/semaforo Quota layer (call included)", |b| {
        b.iter(|| {
            k += 1;
            black_box(try_once(&mut s, k).is_ok())
        })
    });

    let gov = RateLimiter::keyed(GQuota::per_second(big));
    let quota = Quota::builder()
        .plan("p", Rate::new(u32::MAX, Duration::from_secs(60)))
        .build::<u64>()
        .unwrap();
    let mut s = ServiceBuilder::new()
        .layer(quota.layer(move |x: &u64| (*x, plan)))
        .service(service_fn(|x: u64| {
            std::future::ready(Ok::<_, Infallible>(x))
        }));
    for k in 0..1_000_000u64 {
        let _ = gov.check_key(&k);
        let _ = try_once(&mut s, k);
    }
    g.bench_function("1M keys, hot key/governor keyed check_key", |b| {
        b.iter(|| black_box(gov.check_key(&500_000u64)))
    });
    g.bench_function(
        "1M keys, hot key/semaforo Quota layer (call included)",
        |b| {
            b.iter_batched(
                || 500_000u64,
                |k| black_box(try_once(&mut s, k).is_ok()),
                BatchSize::SmallInput,
            )
        },
    );
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = admission
}
criterion_main!(benches);

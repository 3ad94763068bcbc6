//! Quota admission next to governor's own keyed `check_key` in the same run: a
//! hot key, a new key each call, and the hot key's cost against the number of
//! keys present (1 → 1,000,000). governor runs twice: with its default clock
//! (quanta, a TSC read) and with the tokio clock our layer must use so quotas
//! follow paused time in tests; the difference is the price of that clock.
//! Two threads on their own hot keys show what the layer shares between cores.
//! Then one global limit: tower's `RateLimit`, tower-resilience's
//! `RateLimiter`, governor direct (its clock and the tokio clock), a one-key
//! semaforo quota and semaforo's unkeyed `RateLimit` (one atomic GCRA cell).

mod common;
use common::{bare, once, try_once};

use common::TokioClock;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use governor::{Quota as GQuota, RateLimiter};
use semaforo::quota::{PlanId, Quota, Rate};
use std::num::NonZeroU32;
use std::time::Duration;
use tower::ServiceBuilder;

fn big() -> NonZeroU32 {
    NonZeroU32::new(u32::MAX).expect("non-zero")
}

fn quota() -> (Quota<u64>, PlanId) {
    let quota = Quota::builder()
        .plan("p", Rate::new(3_000_000_000, Duration::from_secs(60)))
        .build::<u64>()
        .expect("valid quota");
    let plan = quota.plan_id("p").expect("plan p");
    (quota, plan)
}

/// A quota layer keyed by the request itself.
fn keyed_by_request(
    quota: &Quota<u64>,
    plan: PlanId,
) -> impl tower::Service<u64, Response = u64, Error = semaforo::BoxError> {
    ServiceBuilder::new()
        .layer(quota.layer(move |x: &u64| (*x, plan)))
        .service(bare())
}

fn admission(c: &mut Criterion) {
    let rt = common::runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("quota/hot_key");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let gov = RateLimiter::keyed(GQuota::per_second(big()));
    g.bench_function("governor keyed check_key", |b| {
        b.iter(|| black_box(gov.check_key(&7u64)))
    });
    let gov = common::governor_tokio_keyed();
    g.bench_function("governor keyed check_key (tokio clock)", |b| {
        b.iter(|| black_box(gov.check_key(&7u64)))
    });
    let (q, plan) = quota();
    let mut s = keyed_by_request(&q, plan);
    g.bench_function("semaforo Quota layer (call included)", |b| {
        b.iter(|| once(&mut s, black_box(7)))
    });
    g.finish();

    let mut g = c.benchmark_group("quota/new_key");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let gov = RateLimiter::keyed(GQuota::per_second(big()));
    let mut k = 0u64;
    g.bench_function("governor keyed check_key", |b| {
        b.iter(|| {
            k += 1;
            black_box(gov.check_key(&k))
        })
    });
    let (q, plan) = quota();
    let mut s = keyed_by_request(&q, plan);
    let mut k = 0u64;
    g.bench_function("semaforo Quota layer (call included)", |b| {
        b.iter(|| {
            k += 1;
            black_box(try_once(&mut s, k).is_ok())
        })
    });
    g.finish();

    // The hot key's cost as the store grows.
    let mut g = c.benchmark_group("quota/keys_present");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for n in [1u64, 1_000, 100_000, 1_000_000] {
        let gov = RateLimiter::keyed(GQuota::per_second(big()));
        let (q, plan) = quota();
        let mut s = keyed_by_request(&q, plan);
        for k in 0..n {
            let _ = gov.check_key(&k);
            let _ = try_once(&mut s, k);
        }
        let hot = n / 2;
        g.bench_with_input(
            BenchmarkId::new("governor keyed check_key", n),
            &hot,
            |b, hot| b.iter(|| black_box(gov.check_key(hot))),
        );
        g.bench_with_input(
            BenchmarkId::new("semaforo Quota layer (call included)", n),
            &hot,
            |b, hot| b.iter(|| once(&mut s, black_box(*hot))),
        );
    }
    g.finish();
}

/// One limit for all calls: what tower and tower-resilience offer.
fn one_limit(c: &mut Criterion) {
    let rt = common::runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("rate_limit/one_limit");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let gov = RateLimiter::direct(GQuota::per_second(big()));
    g.bench_function("governor direct check", |b| {
        b.iter(|| black_box(gov.check()))
    });
    // The same check on the clock our layers must read (tokio's, pausable).
    let gov = RateLimiter::direct_with_clock(GQuota::per_second(big()), TokioClock::new());
    g.bench_function("governor direct check (tokio clock)", |b| {
        b.iter(|| black_box(gov.check()))
    });
    let mut s = ServiceBuilder::new()
        .rate_limit(u64::MAX / 4, Duration::from_secs(1))
        .service(bare());
    g.bench_function("tower RateLimit", |b| b.iter(|| once(&mut s, black_box(1))));
    let mut s = ServiceBuilder::new()
        .layer(common::tower_resilience_rate_limiter())
        .service(bare());
    g.bench_function("tower-resilience RateLimiter", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    let (q, plan) = quota();
    let mut s = ServiceBuilder::new()
        .layer(q.layer(move |_: &u64| (0u64, plan)))
        .service(bare());
    g.bench_function("semaforo Quota layer, one key", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    // One atomic GCRA cell: no key, no map.
    let mut s = ServiceBuilder::new()
        .layer(common::semaforo_rate_limit())
        .service(bare());
    g.bench_function("semaforo RateLimit", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    g.finish();
}

/// Keys each thread of [`contended`] goes round: with one key each, the
/// two keys share a shard of the key map (its lock word, its table's
/// lines) or not as the map's random seed falls, and a run measured that
/// (×1 or ×4 between runs, for governor's map and ours alike); with 32
/// each, both threads meet in every shard, every run.
const OWN_KEYS: u64 = 32;

/// The `n`-th call's key of the thread numbered `thread` (1 or 2): its own
/// keys, disjoint from the other thread's, in turn.
fn own_key(thread: u64, n: u64) -> u64 {
    thread * 1_000 + n % OWN_KEYS
}

/// Two threads, each calling its own caller from `make` with its own keys
/// ([`own_key`]) in turn.
fn two_keyed<F: FnMut(u64) + Send + 'static>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    make: impl Fn() -> F,
) {
    common::on_two_callers(g, name, || {
        let mut call = make();
        let mut n = 0u64;
        move |k| {
            n = n.wrapping_add(1);
            call(own_key(k, n));
        }
    });
}

fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("quota/two_threads_own_keys");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // governor on its own clock, then on the clock our layers must read
    // (tokio's, pausable): each thread checks its own keys.
    let gov = std::sync::Arc::new(RateLimiter::keyed(GQuota::per_second(big())));
    two_keyed(&mut g, "governor keyed check_key", || {
        let gov = gov.clone();
        move |k| {
            black_box(gov.check_key(&k).is_ok());
        }
    });
    let gov = std::sync::Arc::new(common::governor_tokio_keyed());
    two_keyed(&mut g, "governor keyed check_key (tokio clock)", || {
        let gov = gov.clone();
        move |k| {
            black_box(gov.check_key(&k).is_ok());
        }
    });
    let (q, plan) = quota();
    two_keyed(&mut g, "semaforo Quota layer (call included)", || {
        let mut s = keyed_by_request(&q, plan);
        move |k| {
            once(&mut s, k);
        }
    });
    g.finish();
    // One limit shared by both threads: every call of either passes through
    // the same cell (tower's RateLimit is not `Clone`: nothing to share).
    let mut g = c.benchmark_group("rate_limit/contended_2_threads");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let gov = std::sync::Arc::new(RateLimiter::direct(GQuota::per_second(big())));
    common::on_two_callers(&mut g, "governor direct check", || {
        let gov = gov.clone();
        move |_| {
            black_box(gov.check().is_ok());
        }
    });
    let gov = std::sync::Arc::new(RateLimiter::direct_with_clock(
        GQuota::per_second(big()),
        TokioClock::new(),
    ));
    common::on_two_callers(&mut g, "governor direct check (tokio clock)", || {
        let gov = gov.clone();
        move |_| {
            black_box(gov.check().is_ok());
        }
    });
    let s = ServiceBuilder::new()
        .layer(common::tower_resilience_rate_limiter())
        .service(bare());
    common::on_two_threads(&mut g, "tower-resilience RateLimiter", s);
    let s = ServiceBuilder::new()
        .layer(common::semaforo_rate_limit())
        .service(bare());
    common::on_two_threads(&mut g, "semaforo RateLimit", s);
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = admission, one_limit, contended
}
criterion_main!(benches);

//! The whole client stack next to the bare service and to an equivalent stack
//! built from peers, in the same run, uncontended and with 2 threads; then
//! throughput (calls per second) through each layer and the whole stack with
//! 1, 16 and 256 concurrent tasks on a 2-worker runtime, peers beside (the
//! pacer's and the quota's on the tokio clock, the one they must read).
//!
//! semaforo: shutdown → bulkhead → retry (budget) → breaker → pace (RPM + TPM) →
//! attempt timeout. Peers: tower's ConcurrencyLimit → tower RateLimit → tower
//! Retry → tower-resilience CircuitBreaker → tower Timeout. tower's `RateLimit` is not `Clone`, so
//! the peer stack shared by two threads uses tower-resilience's `RateLimiter`
//! in its place (a `Buffer` would measure the buffer).

mod common;
use common::{bare, once, semaforo_stack, two_threads};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::pace::{Cost, Pace};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tower::{Service, ServiceBuilder};

#[derive(Clone)]
struct Attempts(u32);

impl<Res, E> tower::retry::Policy<u64, Res, E> for Attempts {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;
    fn retry(&mut self, _req: &mut u64, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Err(_) if self.0 > 1 => {
                self.0 -= 1;
                Some(Box::pin(tokio::time::sleep(Duration::from_millis(500))))
            }
            _ => None,
        }
    }
    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

/// Not `Clone` (tower's `RateLimit` is not): measured uncontended only.
fn peer_stack() -> impl Service<u64, Response = u64, Error = impl std::fmt::Debug> {
    let breaker = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .build()
        .unwrap();
    // tower's Retry needs a `Clone` inner service and `RateLimit` is not one,
    // so the rate limit sits outside the retry here.
    ServiceBuilder::new()
        .concurrency_limit(1_000)
        .rate_limit(u64::MAX / 4, Duration::from_secs(1))
        .layer(tower::retry::RetryLayer::new(Attempts(3)))
        .layer(breaker)
        .timeout(Duration::from_secs(30))
        .service(bare())
}

/// The same, with tower-resilience's `RateLimiter` (which is `Clone`) in
/// place of tower's `RateLimit`, so two threads can share it.
fn peer_stack_clone() -> impl Service<
    u64,
    Response = u64,
    Error = impl std::fmt::Debug + Send,
    Future = impl Future + Send,
> + Clone
       + Send
       + 'static {
    let breaker = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .build()
        .unwrap();
    let rate = common::tower_resilience_rate_limiter();
    ServiceBuilder::new()
        .concurrency_limit(1_000)
        .layer(tower::retry::RetryLayer::new(Attempts(3)))
        .layer(breaker)
        .layer(rate)
        .timeout(Duration::from_secs(30))
        .service(bare())
}

fn stacks(c: &mut Criterion) {
    let rt = common::runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("stack/uncontended");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut s = bare();
    g.bench_function("bare service", |b| b.iter(|| once(&mut s, black_box(1))));
    let mut s = semaforo_stack();
    g.bench_function("semaforo (6 layers)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    let mut s = peer_stack();
    g.bench_function("tower + tower-resilience (5 layers)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    let mut s = peer_stack_clone();
    g.bench_function("tower + tower-resilience (5 layers, Clone)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });
    g.finish();

    let mut g = c.benchmark_group("stack/contended_2_threads");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("semaforo (6 layers)", |b| {
        b.iter_custom(|iters| two_threads(semaforo_stack(), iters))
    });
    g.bench_function("tower + tower-resilience (5 layers, Clone)", |b| {
        b.iter_custom(|iters| two_threads(peer_stack_clone(), iters))
    });
    g.finish();
}

/// `iters` calls split over `tasks` tokio tasks on a 2-worker runtime, each
/// driving clones of `svc` (`ready` then `call`); the wall time.
fn on_tasks<S>(rt: &tokio::runtime::Runtime, svc: &S, tasks: u64, iters: u64) -> Duration
where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
{
    use tower::ServiceExt;
    rt.block_on(async {
        let t0 = std::time::Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|i| {
                let mut s = svc.clone();
                let n = iters / tasks + u64::from(i < iters % tasks);
                tokio::spawn(async move {
                    for k in 0..n {
                        black_box(s.ready().await.expect("ready").call(k).await.expect("ok"));
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.expect("a task");
        }
        t0.elapsed()
    })
}

/// One throughput row: `svc` under `tasks` concurrent tasks.
fn per_second<S>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    tasks: u64,
    name: &str,
    svc: &S,
) where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
{
    g.bench_function(name, |b| {
        b.iter_custom(|iters| on_tasks(rt, svc, tasks, iters))
    });
}

/// Calls per second (1 / time per call) through each layer and through the
/// whole stack, with 1, 16 and 256 concurrent tasks on a 2-worker runtime,
/// next to the peers in the same run.
fn throughput(c: &mut Criterion) {
    let rt = common::two_workers();
    let _guard = rt.enter();
    let big = u32::MAX as u64 * 60;
    for tasks in [1u64, 16, 256] {
        let mut g = c.benchmark_group(format!("throughput/{tasks}_tasks"));
        g.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .throughput(criterion::Throughput::Elements(1));
        // Bulkhead vs tower's ConcurrencyLimit (room for every task).
        let s = ServiceBuilder::new()
            .layer(Bulkhead::builder(1_000).build().unwrap().layer())
            .service(bare());
        per_second(&mut g, &rt, tasks, "semaforo Bulkhead", &s);
        let s = ServiceBuilder::new()
            .concurrency_limit(1_000)
            .service(bare());
        per_second(&mut g, &rt, tasks, "tower ConcurrencyLimit", &s);
        // Breaker vs tower-resilience's.
        let s = ServiceBuilder::new()
            .layer(Breaker::builder().build().unwrap().layer())
            .service(bare());
        per_second(&mut g, &rt, tasks, "semaforo Breaker", &s);
        let s = ServiceBuilder::new()
            .layer(
                tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
                    .failure_rate_threshold(0.5)
                    .build()
                    .unwrap(),
            )
            .service(bare());
        per_second(&mut g, &rt, tasks, "tower-resilience CircuitBreaker", &s);
        // One rate limit shared by every task (tower's RateLimit is not
        // Clone: tower-resilience's RateLimiter is the shared peer).
        let s = ServiceBuilder::new()
            .layer(common::semaforo_rate_limit())
            .service(bare());
        per_second(&mut g, &rt, tasks, "semaforo RateLimit", &s);
        let s = ServiceBuilder::new()
            .layer(common::tower_resilience_rate_limiter())
            .service(bare());
        per_second(&mut g, &rt, tasks, "tower-resilience RateLimiter", &s);
        // The pacer (RPM + TPM).
        let s = ServiceBuilder::new()
            .layer(
                Pace::builder()
                    .requests_per_minute(big)
                    .tokens_per_minute(big)
                    .build()
                    .unwrap()
                    .layer()
                    .weigh(|_: &u64| Cost::tokens(7)),
            )
            .service(bare());
        per_second(&mut g, &rt, tasks, "semaforo Pace (RPM + TPM)", &s);
        // The pacer's peer: two governor cells (RPM + TPM) on the tokio
        // clock, checked before the call.
        let clock = common::TokioClock::new();
        let cell = || {
            std::sync::Arc::new(governor::RateLimiter::direct_with_clock(
                governor::Quota::per_second(std::num::NonZeroU32::MAX),
                clock,
            ))
        };
        let (requests, tokens) = (cell(), cell());
        let seven = std::num::NonZeroU32::new(7).expect("non-zero");
        let s = tower::service_fn(move |x: u64| {
            let admitted = requests.check().is_ok() && tokens.check_n(seven).is_ok();
            std::future::ready(if admitted { Ok(x + 1) } else { Err("limited") })
        });
        per_second(
            &mut g,
            &rt,
            tasks,
            "governor ×2 cells (RPM + TPM, tokio clock)",
            &s,
        );
        // A quota's hot key (every task on one key) vs governor's keyed
        // check on the same clock.
        let q = semaforo::quota::Quota::builder()
            .plan(
                "p",
                semaforo::quota::Rate::new(3_000_000_000, Duration::from_secs(60)),
            )
            .build::<u64>()
            .unwrap();
        let plan = q.plan_id("p").unwrap();
        let s = ServiceBuilder::new()
            .layer(q.layer(move |_: &u64| (0u64, plan)))
            .service(bare());
        per_second(&mut g, &rt, tasks, "semaforo Quota (one hot key)", &s);
        let keyed = common::governor_tokio_keyed();
        let keyed = std::sync::Arc::new(keyed);
        let s = tower::service_fn(move |x: u64| {
            let admitted = keyed.check_key(&0).is_ok();
            std::future::ready(if admitted { Ok(x + 1) } else { Err("limited") })
        });
        per_second(
            &mut g,
            &rt,
            tasks,
            "governor keyed check_key (one hot key, tokio clock)",
            &s,
        );
        // Retry without a budget vs a tower policy sharing its config.
        let s = ServiceBuilder::new()
            .layer(
                semaforo::retry::Retry::builder()
                    .max_attempts(3)
                    .no_budget()
                    .build()
                    .unwrap()
                    .layer(),
            )
            .service(bare());
        per_second(&mut g, &rt, tasks, "semaforo Retry (no budget)", &s);
        let s = ServiceBuilder::new()
            .layer(tower::retry::RetryLayer::new(common::SharedAttempts {
                config: std::sync::Arc::new(common::AttemptsConfig {
                    first_delay: Duration::from_millis(500),
                    retries: std::sync::atomic::AtomicU64::new(0),
                }),
                left: 3,
            }))
            .service(bare());
        per_second(&mut g, &rt, tasks, "tower Retry (shared config)", &s);
        // The attempt timeout vs tower's.
        let s = ServiceBuilder::new()
            .layer(
                semaforo::timeout::Timeout::builder()
                    .attempt(Duration::from_secs(30))
                    .build()
                    .unwrap()
                    .layer(),
            )
            .service(bare());
        per_second(&mut g, &rt, tasks, "semaforo Timeout", &s);
        let s = ServiceBuilder::new()
            .timeout(Duration::from_secs(30))
            .service(bare());
        per_second(&mut g, &rt, tasks, "tower Timeout", &s);
        // The whole stacks.
        let s = semaforo_stack();
        per_second(&mut g, &rt, tasks, "semaforo stack (6 layers)", &s);
        let s = peer_stack_clone();
        per_second(
            &mut g,
            &rt,
            tasks,
            "tower + tower-resilience (5 layers, Clone)",
            &s,
        );
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = stacks, throughput
}
criterion_main!(benches);

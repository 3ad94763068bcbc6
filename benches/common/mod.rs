//! What every bench shares: the bare service and one uncontended call through
//! `ready()` + `call()`, driven with `now_or_never` (everything completes at once,
//! so only the layers' own work is timed).
#![allow(dead_code)]

use futures::FutureExt;
use std::convert::Infallible;
use tower::{service_fn, Service, ServiceExt};

/// A service that answers at once.
pub fn bare() -> impl Service<
    u64,
    Response = u64,
    Error = Infallible,
    Future = std::future::Ready<Result<u64, Infallible>>,
> + Clone {
    service_fn(|x: u64| std::future::ready(Ok::<_, Infallible>(x + 1)))
}

/// One call, expected to succeed.
pub fn once<S: Service<u64>>(svc: &mut S, x: u64) -> S::Response
where
    S::Error: std::fmt::Debug,
{
    try_once(svc, x).expect("ok")
}

/// One call, success or not.
pub fn try_once<S: Service<u64>>(svc: &mut S, x: u64) -> Result<S::Response, S::Error>
where
    S::Error: std::fmt::Debug,
{
    let svc = svc
        .ready()
        .now_or_never()
        .expect("ready at once")
        .expect("no error");
    svc.call(x).now_or_never().expect("completes at once")
}

/// tower-resilience's rate limiter set never to limit in a bench
/// (`usize::MAX / 4` calls a second).
pub fn tower_resilience_rate_limiter() -> tower_resilience::ratelimiter::RateLimiterLayer {
    tower_resilience::ratelimiter::RateLimiterLayer::builder()
        .limit_for_period(usize::MAX / 4)
        .refresh_period(std::time::Duration::from_secs(1))
        .build()
        .expect("valid rate limiter")
}

/// Our one shared GCRA cell at 10⁹ calls a second (never limits in a bench).
pub fn semaforo_rate_limit() -> semaforo::quota::RateLimitLayer {
    semaforo::quota::RateLimit::builder(semaforo::quota::Rate::new(
        1_000_000_000,
        std::time::Duration::from_secs(1),
    ))
    .build()
    .expect("valid limit")
    .layer()
}

/// A current-thread runtime (entered by the caller) for layers that need tokio's clock.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// A multi-thread runtime of 2 workers (the machine's 2 cores), for the
/// throughput and line benchmarks.
pub fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// `iters` calls split over 2 threads hammering clones of `svc` (the machine
/// has 2 cores). Every call is driven by `block_on`: a peer's lock may make a
/// call wait under contention, so everyone gets the same executor.
pub fn two_threads<S>(svc: S, iters: u64) -> std::time::Duration
where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
{
    let start = std::time::Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let mut s = svc.clone();
            std::thread::spawn(move || {
                let rt = runtime();
                let _g = rt.enter();
                for i in 0..iters / 2 {
                    std::hint::black_box(futures::executor::block_on(async {
                        s.ready().await.expect("ready").call(i).await.expect("ok")
                    }));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a bench thread");
    }
    start.elapsed()
}

/// A benchmark timed with [`two_callers`]: each thread calls its own caller
/// from `make`.
pub fn on_two_callers<F: FnMut(u64) + Send + 'static>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    make: impl Fn() -> F,
) {
    g.bench_function(name, |b| b.iter_custom(|iters| two_callers(iters, &make)));
}

/// A benchmark of two threads calling their own clones of `svc` on its
/// healthy path (`once`: it answers at once), timed with [`two_callers`].
pub fn on_two_threads<S>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    svc: S,
) where
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
{
    on_two_callers(g, name, || {
        let mut s = svc.clone();
        move |k| {
            std::hint::black_box(once(&mut s, k));
        }
    });
}

/// `iters` calls split over 2 threads, each thread calling its own caller
/// from `make` with its own number (1 or 2: a hot key of its own, say): what
/// stays shared between them is the limiter's state.
pub fn two_callers<F: FnMut(u64) + Send + 'static>(
    iters: u64,
    make: impl Fn() -> F,
) -> std::time::Duration {
    let callers: Vec<F> = (0..2).map(|_| make()).collect();
    let start = std::time::Instant::now();
    let threads: Vec<_> = callers
        .into_iter()
        .zip(1u64..)
        .map(|(mut call, key)| {
            std::thread::spawn(move || {
                let rt = runtime();
                let _g = rt.enter();
                for _ in 0..iters / 2 {
                    call(std::hint::black_box(key));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a bench thread");
    }
    start.elapsed()
}

/// governor's clock read from `tokio::time`, as semaforo's quota reads it (so
/// the peer is timed on the same clock; semaforo's own is internal).
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    epoch: tokio::time::Instant,
}

impl TokioClock {
    /// A clock starting now.
    pub fn new() -> Self {
        TokioClock {
            epoch: tokio::time::Instant::now(),
        }
    }
}

impl governor::clock::Clock for TokioClock {
    type Instant = governor::nanos::Nanos;

    fn now(&self) -> governor::nanos::Nanos {
        governor::nanos::Nanos::from(
            tokio::time::Instant::now().saturating_duration_since(self.epoch),
        )
    }
}

/// The whole semaforo stack of the benchmarks: shutdown → bulkhead → retry
/// (budget) → breaker → pace (RPM + TPM) → attempt timeout, over [`bare`].
pub fn semaforo_stack() -> impl Service<
    u64,
    Response = u64,
    Error = semaforo::BoxError,
    Future = impl std::future::Future + Send,
> + Clone
       + Send
       + 'static {
    let big = u32::MAX as u64 * 60;
    tower::ServiceBuilder::new()
        .layer(semaforo::shutdown::Shutdown::new().layer())
        .layer(
            semaforo::bulkhead::Bulkhead::builder(1_000)
                .max_queue(1_000)
                .build()
                .unwrap()
                .layer(),
        )
        .layer(
            semaforo::retry::Retry::builder()
                .max_attempts(3)
                .build()
                .unwrap()
                .layer(),
        )
        .layer(
            semaforo::breaker::Breaker::builder()
                .build()
                .unwrap()
                .layer(),
        )
        .layer(
            semaforo::pace::Pace::builder()
                .requests_per_minute(big)
                .tokens_per_minute(big)
                .build()
                .unwrap()
                .layer()
                .weigh(|_: &u64| semaforo::pace::Cost::tokens(7)),
        )
        .layer(
            semaforo::timeout::Timeout::builder()
                .attempt(std::time::Duration::from_secs(30))
                .build()
                .unwrap()
                .layer(),
        )
        .service(bare())
}

/// tower's equivalent with the same reach as ours without a budget: its
/// configuration and its count of retries are shared by every clone (ours:
/// `Retry::retries()`), so the policy holds them in an `Arc`, as a tower policy
/// that is configured once and observed from outside does.
#[derive(Clone)]
pub struct SharedAttempts {
    pub config: std::sync::Arc<AttemptsConfig>,
    pub left: u32,
}

pub struct AttemptsConfig {
    pub first_delay: std::time::Duration,
    pub retries: std::sync::atomic::AtomicU64,
}

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for SharedAttempts {
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => None,
            Err(_) if self.left > 1 => {
                self.left -= 1;
                let n = self
                    .config
                    .retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let d = self.config.first_delay * 2u32.saturating_pow(n as u32 % 8);
                Some(Box::pin(tokio::time::sleep(d)))
            }
            Err(_) => None,
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// governor's keyed limiter on the tokio clock ([`TokioClock`]).
pub type TokioKeyed = governor::RateLimiter<
    u64,
    governor::state::keyed::DefaultKeyedStateStore<u64>,
    TokioClock,
    governor::middleware::NoOpMiddleware<governor::nanos::Nanos>,
>;

/// A keyed governor limiter that never limits, on the tokio clock.
pub fn governor_tokio_keyed() -> TokioKeyed {
    governor::RateLimiter::new(
        governor::Quota::per_second(std::num::NonZeroU32::MAX),
        governor::state::keyed::DefaultKeyedStateStore::default(),
        TokioClock::new(),
    )
}

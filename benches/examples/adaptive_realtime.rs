//! Adaptive concurrency, semaforo's bulkhead next to tower-resilience's
//! `AdaptiveLimiterLayer`, on the real clock (theirs times calls with
//! `std::time::Instant`, so it cannot run under tokio's paused time).
//! Report only: a 2-core shared machine's scheduler is part of what it
//! measures.
//!
//! ```text
//! cargo run --release -p semaforo-benches --example adaptive_realtime [-- --secs 20]
//! ```
//!
//! The upstream has a hidden capacity C = 20: a call takes 50 ms while at
//! most C are in flight and 50 ms × in-flight / C beyond; above 2C it fails
//! (overloaded) after that latency. 200 callers call in a loop (after a
//! refusal, they wait 10 ms). Both limiters start at 200 (10 × C) with a
//! floor of 1, AIMD with a 60 ms latency threshold, Vegas with its
//! defaults. Printed per run: when the limit entered [0.8 C, 1.3 C] for good
//! (sampled every 100 ms, "never" if it left it again), goodput
//! (successes a second; over the run and over its second half), the p99
//! latency of successes in the second half, and the overloaded answers.

use semaforo::bulkhead::{Aimd, Bulkhead, Limit, Vegas};
use semaforo::classify::{Class, Classify};
use semaforo::BoxError;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower::{Layer, Service, ServiceExt};

const CAPACITY: u32 = 20;
const BASE: Duration = Duration::from_millis(50);
const CALLERS: usize = 200;
const START: u32 = 200;

#[derive(Debug)]
struct Overloaded;

impl std::fmt::Display for Overloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("overloaded")
    }
}

impl std::error::Error for Overloaded {}

#[derive(Default)]
struct Upstream {
    in_flight: AtomicU32,
    ok: AtomicU64,
    overloaded: AtomicU64,
    /// (since the start, latency) of each success.
    latencies: Mutex<Vec<(Duration, Duration)>>,
}

impl Upstream {
    fn service(
        self: &Arc<Self>,
        t0: Instant,
    ) -> impl Service<(), Response = (), Error = Overloaded, Future = impl Send> + Clone + Send
    {
        let up = self.clone();
        tower::service_fn(move |()| {
            let up = up.clone();
            async move {
                let started = Instant::now();
                let n = up.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                let latency = BASE.mul_f64(f64::from(n.max(CAPACITY)) / f64::from(CAPACITY));
                tokio::time::sleep(latency).await;
                up.in_flight.fetch_sub(1, Ordering::SeqCst);
                if n > 2 * CAPACITY {
                    up.overloaded.fetch_add(1, Ordering::Relaxed);
                    return Err(Overloaded);
                }
                up.ok.fetch_add(1, Ordering::Relaxed);
                up.latencies
                    .lock()
                    .unwrap()
                    .push((started - t0, started.elapsed()));
                Ok(())
            }
        })
    }
}

/// The upstream's error is an overload.
#[derive(Clone, Copy)]
struct OkOrOverloaded;

impl Classify<(), BoxError> for OkOrOverloaded {
    fn classify(&self, r: Result<&(), &BoxError>) -> Class {
        match r {
            Ok(()) => Class::Success,
            Err(_) => Class::Overloaded { retry_after: None },
        }
    }
}

struct Report {
    settled: Option<Duration>,
    goodput: f64,
    goodput_late: f64,
    p99: Duration,
    overloaded: u64,
    last_limit: u32,
}

/// Runs the callers against `svc` for `secs`, sampling `limit()` every
/// 100 ms.
async fn drive<S>(
    svc: S,
    limit: impl Fn() -> u32 + Send + 'static,
    up: Arc<Upstream>,
    t0: Instant,
    secs: u64,
) -> Report
where
    S: Service<()> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let (mut svc, stop) = (svc.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = match svc.ready().await {
                    Ok(s) => s.call(()).await,
                    Err(e) => Err(e),
                };
                if r.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    let mut limits = Vec::new();
    let end = t0 + Duration::from_secs(secs);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        limits.push((t0.elapsed(), limit()));
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let lo = CAPACITY * 8 / 10;
    let hi = CAPACITY * 13 / 10;
    let settled = (0..limits.len())
        .find(|&i| limits[i..].iter().all(|(_, l)| (lo..=hi).contains(l)))
        .map(|i| limits[i].0);
    let half = Duration::from_secs(secs) / 2;
    let mut late: Vec<Duration> = up
        .latencies
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at >= half)
        .map(|(_, l)| *l)
        .collect();
    let goodput_late = late.len() as f64 / (secs as f64 / 2.0);
    late.sort_unstable();
    let p99 = late
        .get((late.len() * 99 / 100).min(late.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    Report {
        settled,
        goodput: up.ok.load(Ordering::Relaxed) as f64 / secs as f64,
        goodput_late,
        p99,
        overloaded: up.overloaded.load(Ordering::Relaxed),
        last_limit: limits.last().map_or(0, |l| l.1),
    }
}

async fn semaforo(limit: Limit, secs: u64) -> Report {
    let up = Arc::new(Upstream::default());
    let t0 = Instant::now();
    let bulkhead = Bulkhead::builder(START)
        .limit(limit)
        .max_queue(10_000)
        .build()
        .expect("valid bulkhead");
    let svc = bulkhead
        .layer()
        .classify(OkOrOverloaded)
        .layer(up.service(t0));
    let b = bulkhead.clone();
    drive(
        svc,
        move || u32::try_from(b.snapshot().limit).unwrap_or(u32::MAX),
        up,
        t0,
        secs,
    )
    .await
}

async fn theirs<A>(algorithm: A, secs: u64) -> Report
where
    A: tower_resilience::adaptive::ConcurrencyAlgorithm + Send + Sync + 'static,
{
    let up = Arc::new(Upstream::default());
    let t0 = Instant::now();
    let svc =
        tower_resilience::adaptive::AdaptiveLimiterLayer::new(algorithm).layer(up.service(t0));
    let probe = svc.clone();
    drive(
        svc,
        move || u32::try_from(probe.limit()).unwrap_or(u32::MAX),
        up,
        t0,
        secs,
    )
    .await
}

fn print(name: &str, r: &Report) {
    println!(
        "| {name} | {} | {:.0}/s | {:.0}/s | {:.0} ms | {} | {} |",
        r.settled
            .map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
        r.goodput,
        r.goodput_late,
        r.p99.as_secs_f64() * 1e3,
        r.overloaded,
        r.last_limit,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20u64);
    println!(
        "capacity {CAPACITY}, {CALLERS} callers, start {START}, {secs} s a run; \
         a perfect fixed limit of {CAPACITY} gives {:.0}/s at {} ms",
        f64::from(CAPACITY) / BASE.as_secs_f64(),
        BASE.as_millis()
    );
    println!(
        "| limiter | in [0.8 C, 1.3 C] from | goodput | goodput (2nd half) | p99 (2nd half) | overloaded | last limit |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let r = semaforo(
        Aimd::new()
            .min(1)
            .latency_threshold(Duration::from_millis(60))
            .into(),
        secs,
    )
    .await;
    print("semaforo AIMD", &r);
    let r = theirs(
        tower_resilience::adaptive::Aimd::builder()
            .initial_limit(START as usize)
            .min_limit(1)
            .max_limit(START as usize)
            .latency_threshold(Duration::from_millis(60))
            .build()
            .expect("valid AIMD"),
        secs,
    )
    .await;
    print("tower-resilience AIMD", &r);
    let r = semaforo(Vegas::new().min(1).into(), secs).await;
    print("semaforo Vegas", &r);
    let r = theirs(
        tower_resilience::adaptive::Vegas::builder()
            .initial_limit(START as usize)
            .min_limit(1)
            .max_limit(START as usize)
            .build()
            .expect("valid Vegas"),
        secs,
    )
    .await;
    print("tower-resilience Vegas", &r);
}

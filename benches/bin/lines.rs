//! What criterion cannot show: the lines under load, and a scenario's makespan
//! against its bound. Prints Markdown for `BENCHMARKS.md` (`scripts/bench-table`
//! runs it); each figure is the median of `runs` runs.
//!
//! ```text
//! lines [runs]      (default 3; ONLY=<name prefix> runs one row)
//! ```
//!
//! - **Lines under 256 tasks**: 256 tasks on a 2-worker runtime, 100 calls
//!   each, through a bulkhead of 16 permits (a line of up to 256) around a
//!   service that yields once, next to tower's `ConcurrencyLimit` (tokio's
//!   fair semaphore); and through a pacer of 10,000 requests/s with a burst
//!   of 50 (its calls/s is its rate: 25,600 calls take 2.56 s at best; the
//!   burst is above what accrues in one tick of tokio's 1 ms timer, so a
//!   late wake-up loses nothing). Per call: the time from `ready()` to the answer (p50, p99, max),
//!   and FIFO: for each call, how many calls that arrived after it were
//!   admitted before it ("overtaken by"; arrival is the moment the caller
//!   took its number, just before `ready()`: on two threads a caller can take
//!   a number and be overtaken by the other thread before it reaches the
//!   line, so a strict line shows 0 or a few, never hundreds).
//! - **The Sunday-night scenario** (the design's first post-mortem): 50 jobs
//!   of 100 ms through a bulkhead of 5 permits and a line of 45, on the real
//!   clock at 1/100 scale (the bound: 10 rounds of 100 ms = 1.000 s). Real,
//!   not paused, time: tokio's `test-util`, which pauses the clock, would be
//!   unified into every benchmark of this workspace and slow each clock read
//!   the peers are timed on.

#[path = "../common/mod.rs"]
mod common;

use semaforo::bulkhead::Bulkhead;
use semaforo::pace::{Limit, Pace};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

const TASKS: u64 = 256;
const CALLS: u64 = 100;

/// Arrival and admission numbers, and each call's time.
#[derive(Default)]
struct Record {
    arrivals: AtomicU64,
    admissions: AtomicU64,
    /// (arrival, admission, nanoseconds from `ready()` to the answer)
    calls: Mutex<Vec<(u64, u64, u64)>>,
}

/// A service that notes its admission number and yields once (holding the
/// permit across a scheduling point, so lines form).
fn upstream(
    rec: Arc<Record>,
) -> impl Service<u64, Response = u64, Error = Infallible, Future: Send> + Clone + Send + 'static {
    service_fn(move |_arrival: u64| {
        let admitted = rec.admissions.fetch_add(1, Ordering::Relaxed);
        async move {
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(admitted)
        }
    })
}

struct Figures {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// The most later arrivals admitted before one call.
    overtaken: u64,
    calls_per_sec: f64,
}

fn figures(calls: &[(u64, u64, u64)], elapsed: Duration) -> Figures {
    let mut lat: Vec<u64> = calls.iter().map(|c| c.2).collect();
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1e3;
    // In admission order, for each call: the calls admitted before it that
    // arrived after it (a Fenwick tree over arrival numbers).
    let mut by_admission: Vec<(u64, u64)> = calls.iter().map(|c| (c.1, c.0)).collect();
    by_admission.sort_unstable();
    let n = calls.len();
    let mut tree = vec![0u64; n + 1];
    let mut overtaken = 0;
    for (seen, &(_, arrival)) in by_admission.iter().enumerate() {
        let a = arrival as usize + 1;
        let (mut i, mut earlier) = (a, 0);
        while i > 0 {
            earlier += tree[i];
            i &= i - 1;
        }
        overtaken = overtaken.max(seen as u64 - earlier);
        let mut i = a;
        while i <= n {
            tree[i] += 1;
            i += i & i.wrapping_neg();
        }
    }
    Figures {
        p50_us: q(0.50),
        p99_us: q(0.99),
        max_us: q(1.0),
        overtaken,
        calls_per_sec: n as f64 / elapsed.as_secs_f64(),
    }
}

/// 256 tasks × 100 calls through `layered(upstream)`.
fn lines<S, F>(rt: &tokio::runtime::Runtime, layered: F) -> Figures
where
    F: FnOnce(Arc<Record>) -> S,
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
{
    let rec = Arc::new(Record::default());
    let svc = layered(rec.clone());
    let t0 = Instant::now();
    rt.block_on(async {
        let handles: Vec<_> = (0..TASKS)
            .map(|_| {
                let mut s = svc.clone();
                let rec = rec.clone();
                tokio::spawn(async move {
                    let mut mine = Vec::with_capacity(CALLS as usize);
                    for _ in 0..CALLS {
                        let arrival = rec.arrivals.fetch_add(1, Ordering::Relaxed);
                        let start = Instant::now();
                        let admitted = s
                            .ready()
                            .await
                            .expect("ready")
                            .call(arrival)
                            .await
                            .expect("answered");
                        mine.push((arrival, admitted, start.elapsed().as_nanos() as u64));
                    }
                    rec.calls.lock().expect("record").extend(mine);
                })
            })
            .collect();
        for h in handles {
            h.await.expect("a task");
        }
    });
    let elapsed = t0.elapsed();
    let calls = std::mem::take(&mut *rec.calls.lock().expect("record"));
    figures(&calls, elapsed)
}

/// The Sunday-night scenario at 1/100 scale: the makespan in seconds.
fn sunday_night(rt: &tokio::runtime::Runtime) -> f64 {
    let bulkhead = Bulkhead::builder(5)
        .max_queue(45)
        .build()
        .expect("bulkhead");
    let svc = ServiceBuilder::new()
        .layer(bulkhead.layer())
        .service(service_fn(|_: u64| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, Infallible>(0u64)
        }));
    rt.block_on(async {
        let t0 = tokio::time::Instant::now();
        let mut calls = Vec::new();
        for job in 0..50 {
            let mut s = svc.clone();
            let ready = s.ready().await.expect("ready");
            calls.push(tokio::spawn(ready.call(job)));
        }
        for c in calls {
            c.await.expect("a job").expect("answered");
        }
        t0.elapsed().as_secs_f64()
    })
}

/// One row: the median of each figure over `runs` runs.
fn report(name: &str, runs: usize, run: impl Fn() -> Figures) {
    if std::env::var("ONLY").is_ok_and(|only| !name.starts_with(&only)) {
        return;
    }
    let all: Vec<Figures> = (0..runs).map(|_| run()).collect();
    let m = |f: fn(&Figures) -> f64| median(all.iter().map(f).collect());
    println!(
        "| {name} | {:.0} | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} |",
        m(|f| f.calls_per_sec),
        m(|f| f.p50_us),
        m(|f| f.p99_us),
        m(|f| f.max_us),
        m(|f| f.overtaken as f64),
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(3)
        .max(1);
    let rt = common::two_workers();
    let _guard = rt.enter();
    println!("**Lines under {TASKS} tasks** (2 workers, {CALLS} calls each; median of {runs} runs; time from `ready()` to the answer)");
    println!();
    println!("| | calls/s | p50 | p99 | max | overtaken by (at most) |");
    println!("|---|---:|---:|---:|---:|---:|");
    report("semaforo Bulkhead (16 permits, line 256)", runs, || {
        lines(&rt, |rec| {
            ServiceBuilder::new()
                .layer(
                    Bulkhead::builder(16)
                        .max_queue(256)
                        .build()
                        .expect("bulkhead")
                        .layer(),
                )
                .service(upstream(rec))
        })
    });
    report("tower ConcurrencyLimit (16)", runs, || {
        lines(&rt, |rec| {
            ServiceBuilder::new()
                .concurrency_limit(16)
                .service(upstream(rec))
        })
    });
    report("semaforo Pace (10,000 requests/s, burst 50)", runs, || {
        lines(&rt, |rec| {
            let pace = Pace::builder()
                .limit(Limit::requests_per_minute(600_000).burst(50))
                .build()
                .expect("pace");
            ServiceBuilder::new()
                .layer(pace.layer())
                .service(upstream(rec))
        })
    });
    println!();
    let makespan = median((0..runs).map(|_| sunday_night(&rt)).collect());
    println!("**The Sunday-night scenario** (50 jobs of 100 ms, 5 at a time, a line of 45; real clock at 1/100 scale; median of {runs} runs)");
    println!();
    println!("| makespan | bound | ÷ bound |");
    println!("|---:|---:|---:|");
    println!("| {makespan:.3} s | 1.000 s | ×{makespan:.3} |");
}

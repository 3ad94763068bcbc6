//! The Redis backend on highly available Redis, started here from the same
//! `redis-server` binary (see `tests/support/redis_ha.rs`): a primary, its
//! replica and a Sentinel, with passwords, the primary killed mid-run; a
//! 3-primary Redis Cluster shared by 4 instances, the budget's slot moved
//! to another node mid-run (`ASK`, then `MOVED`). Real time, windows of
//! seconds.
#![cfg(feature = "redis")]

#[path = "support/redis_ha.rs"]
mod redis_ha;

use redis_ha::{Cluster, SentinelSet};
use semaforo::pace::{Cost, Limit, Pace, Unit};
use semaforo::redis::{Budget, Grant, RedisBackend};
use semaforo::{BoxError, Rejected};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower::{service_fn, Layer, ServiceExt};

/// One HA test at a time (each starts several servers).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const R: f64 = 10.0;
const B: f64 = 10.0;

fn ten_per_second() -> semaforo::pace::PaceBuilder {
    Pace::builder()
        .limit(Limit::new(Unit::Requests, 10, Duration::from_secs(1)))
        .max_wait(Duration::from_secs(3))
}

/// max over every window [tᵢ, tⱼ] of (admitted in it − R·(tⱼ − tᵢ + 1 s)):
/// a start may come up to 1 s after the time Redis reserved for it on a
/// loaded machine, which crowds a window with calls reserved up to 1 s
/// before it; the budget's bound on reservations (R·W + B) holds here as
/// R·(W + 1 s) + B.
fn worst_excess(starts: &mut [Instant]) -> f64 {
    starts.sort();
    let mut worst = 0.0f64;
    for i in 0..starts.len() {
        for j in i..starts.len() {
            let w = (starts[j] - starts[i]).as_secs_f64();
            worst = worst.max((j - i + 1) as f64 - R * (w + 1.0));
        }
    }
    worst
}

type Call = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// `instances` × `tasks` callers through their own backend's budget
/// `name`, until `run_for` has passed; `during(t0)` runs meanwhile (the
/// fault). Returns every admission's instant.
async fn fleet<F>(
    backends: Vec<RedisBackend>,
    tasks: usize,
    run_for: Duration,
    during: F,
) -> (Vec<Instant>, Instant)
where
    F: FnOnce(Instant) + Send + 'static,
{
    let starts = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let end = t0 + run_for;
    let mut handles = Vec::new();
    for redis in backends {
        let budget = Budget::builder(&redis, "fleet", ten_per_second())
            .build()
            .unwrap();
        let seen = starts.clone();
        let svc = budget.layer().layer(service_fn(move |_: ()| {
            seen.lock().unwrap().push(Instant::now());
            async { Ok::<_, BoxError>(()) }
        }));
        for _ in 0..tasks {
            let svc = svc.clone();
            handles.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let call: Call = Box::pin(svc.clone().oneshot(()));
                    if let Err(e) = call.await {
                        let wait = Rejected::from_box(&e)
                            .and_then(|r| r.retry_after())
                            .unwrap_or(Duration::from_millis(50))
                            .min(Duration::from_millis(500));
                        tokio::time::sleep(wait).await;
                    }
                }
            }));
        }
    }
    let fault = tokio::task::spawn_blocking(move || during(t0));
    for h in handles {
        h.await.unwrap();
    }
    fault.await.unwrap();
    let s = starts.lock().unwrap().clone();
    (s, t0)
}

/// The primary is killed 2 s into a run of 4 instances × 8 tasks; the
/// sentinel promotes the replica; every instance finds it by itself (no
/// restart), within seconds; the budget held across it (the replica had
/// the cells, or — replication being asynchronous — nearly: at most one
/// more burst, as for a state loss). Passwords on the servers and on the
/// sentinel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_followed_without_a_restart() {
    let _serial = SERIAL.lock().await;
    if !redis_ha::available() {
        return;
    }
    let set = SentinelSet::start(Some("s3cret"));
    let old = set.primary.port;
    assert_eq!(set.primary_port(), Some(old));
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(
            RedisBackend::sentinel([set.sentinel_url()], "mymaster")
                .node_auth(None, "s3cret")
                .breaker(3, Duration::from_millis(300))
                .connect()
                .await
                .expect("connects through the sentinel"),
        );
    }
    let killed_at = Arc::new(Mutex::new(None));
    let k = killed_at.clone();
    // The set moves into the fault thread (it kills the primary there) and
    // back out, so its servers live to the end of the test.
    let set = Arc::new(Mutex::new(set));
    let s2 = set.clone();
    let (mut starts, _t0) = fleet(backends, 8, Duration::from_secs(12), move |t0| {
        std::thread::sleep((t0 + Duration::from_secs(2)).saturating_duration_since(Instant::now()));
        s2.lock().unwrap().primary.kill();
        *k.lock().unwrap() = Some(Instant::now());
    })
    .await;
    let killed = killed_at.lock().unwrap().expect("killed");
    let set = set.lock().unwrap();
    let new = set.primary_port();
    assert_eq!(
        new,
        Some(set.replica.port),
        "the sentinel promoted the replica"
    );
    let after: Vec<_> = starts.iter().filter(|t| **t > killed).copied().collect();
    let first = after
        .iter()
        .min()
        .copied()
        .expect("admissions after the failover");
    let recovered = first - killed;
    println!(
        "sentinel failover: {} admitted, {} after the kill; first admission {:?} after it",
        starts.len(),
        after.len(),
        recovered
    );
    assert!(
        recovered < Duration::from_secs(8),
        "recovered after {recovered:?}"
    );
    // The budget ran on the new primary for the rest of the run.
    assert!(
        after.len() as f64 >= R * 3.0,
        "only {} after the failover",
        after.len()
    );
    let worst = worst_excess(&mut starts);
    println!(
        "worst window excess over R·(W + 1 s): {worst:.1} (bound 2B = {})",
        2.0 * B
    );
    assert!(worst <= 2.0 * B, "{worst}");
}

/// A 3-primary cluster shared by 4 instances × 8 tasks; 2 s in, the
/// budget's slot is moved to another node key by key (`ASK` while it moves,
/// `MOVED` after); the fleet stays within R·W + B (the keys move with
/// their state), and keeps admitting after the move. Keyed budgets land on
/// different slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_shares_the_budget_while_its_slot_moves() {
    let _serial = SERIAL.lock().await;
    if !redis_ha::available() {
        return;
    }
    let cluster = Arc::new(Cluster::start());
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(
            RedisBackend::cluster(cluster.seeds())
                .breaker(3, Duration::from_millis(300))
                .connect()
                .await
                .expect("connects to the cluster"),
        );
    }
    // Keyed budgets spread over the slots (each key its own hash tag).
    let keyed = Budget::builder(&backends[0], "users", ten_per_second())
        .build()
        .unwrap();
    for user in ["ana", "luis", "marta"] {
        assert_eq!(
            keyed.reserve(Some(user), &Cost::tokens(0)).await.unwrap(),
            Grant::Redis(Duration::ZERO)
        );
    }
    let slots: std::collections::BTreeSet<_> = ["ana", "luis", "marta"]
        .iter()
        .map(|u| cluster.slot(&format!("{{{u}}}")))
        .collect();
    assert_eq!(slots.len(), 3, "three keys, three slots");
    let slot = cluster.slot("{fleet}");
    let before = cluster.owner(slot);
    let moved = Arc::new(Mutex::new(None));
    let (m, c) = (moved.clone(), cluster.clone());
    let (mut starts, _t0) = fleet(backends, 8, Duration::from_secs(8), move |t0| {
        std::thread::sleep((t0 + Duration::from_secs(2)).saturating_duration_since(Instant::now()));
        let t = Instant::now();
        let (src, dst) = c.move_slot(slot, Duration::from_millis(10));
        *m.lock().unwrap() = Some((src, dst, t, Instant::now()));
    })
    .await;
    let (src, dst, from, to) = moved.lock().unwrap().expect("moved");
    assert_eq!(src, before);
    assert_eq!(cluster.owner(slot), dst, "the slot moved");
    let after: Vec<_> = starts.iter().filter(|t| **t > to).copied().collect();
    println!(
        "cluster: {} admitted; slot {slot} moved {src} → {dst} in {:?}; {} admitted after",
        starts.len(),
        to - from,
        after.len()
    );
    assert!(
        after.len() as f64 >= R * 2.0,
        "only {} after the move",
        after.len()
    );
    let worst = worst_excess(&mut starts);
    println!("worst window excess over R·(W + 1 s): {worst:.1} (bound B = {B})");
    assert!(worst <= B, "{worst}");
}

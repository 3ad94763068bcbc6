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
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One HA test at a time (each starts several servers).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const R: f64 = 10.0;
const B: f64 = 10.0;

fn ten_per_second() -> semaforo::pace::PaceBuilder {
    Pace::builder()
        .limit(Limit::new(Unit::Requests, 10, Duration::from_secs(1)))
        .max_wait(Duration::from_secs(3))
}

/// When Redis reserved each admitted call's start: not before `lo`, not
/// after `hi` (the reservation's wait added to the instants the request was
/// sent and its answer came back; a local grant is "now", somewhere in
/// between).
#[derive(Clone, Copy, Debug)]
struct Reserved {
    lo: Instant,
    hi: Instant,
}

/// max over every window [x, y] of (starts certainly reserved in it − R·(y − x)):
/// only the calls whose whole interval lies in the window count, so a call
/// answered late on a loaded machine never crowds a window it was not
/// reserved in; the budget's bound on its reservations is R·W + B.
fn worst_excess(starts: &[Reserved]) -> f64 {
    let mut worst = 0.0f64;
    for x in starts.iter().map(|s| s.lo) {
        for y in starts.iter().map(|s| s.hi).filter(|y| *y >= x) {
            let inside = starts.iter().filter(|s| s.lo >= x && s.hi <= y).count();
            worst = worst.max(inside as f64 - R * (y - x).as_secs_f64());
        }
    }
    worst
}

/// `instances` × `tasks` callers reserving one request each from their own
/// backend's budget "fleet" (and waiting the reserved time, as the layer
/// does), until `run_for` has passed; `during(t0)` runs meanwhile (the
/// fault). Returns when each admitted call was reserved to start.
async fn fleet<F>(
    backends: Vec<RedisBackend>,
    tasks: usize,
    run_for: Duration,
    during: F,
) -> (Vec<Reserved>, Instant)
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
        for _ in 0..tasks {
            let (budget, seen) = (budget.clone(), starts.clone());
            handles.push(tokio::spawn(async move {
                let one = Cost::requests(1);
                while Instant::now() < end {
                    let sent = Instant::now();
                    let grant: Pin<Box<dyn Future<Output = _> + Send>> =
                        Box::pin(budget.reserve(None, &one));
                    match grant.await {
                        Ok(Grant::Redis(wait)) => {
                            let at = Reserved {
                                lo: sent + wait,
                                hi: Instant::now() + wait,
                            };
                            tokio::time::sleep(wait).await;
                            seen.lock().unwrap().push(at);
                        }
                        Ok(_) => {
                            let at = Reserved {
                                lo: sent,
                                hi: Instant::now(),
                            };
                            seen.lock().unwrap().push(at);
                        }
                        Err(r) => {
                            let wait = r
                                .retry_after()
                                .unwrap_or(Duration::from_millis(50))
                                .min(Duration::from_millis(500));
                            tokio::time::sleep(wait).await;
                        }
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
    let (starts, _t0) = fleet(backends, 8, Duration::from_secs(12), move |t0| {
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
    let after: Vec<_> = starts
        .iter()
        .map(|s| s.lo)
        .filter(|t| *t > killed)
        .collect();
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
    let worst = worst_excess(&starts);
    println!(
        "worst window excess over R·W: {worst:.1} (bound 2B = {})",
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
    let (starts, _t0) = fleet(backends, 8, Duration::from_secs(8), move |t0| {
        std::thread::sleep((t0 + Duration::from_secs(2)).saturating_duration_since(Instant::now()));
        let t = Instant::now();
        let (src, dst) = c.move_slot(slot, Duration::from_millis(10));
        *m.lock().unwrap() = Some((src, dst, t, Instant::now()));
    })
    .await;
    let (src, dst, from, to) = moved.lock().unwrap().expect("moved");
    assert_eq!(src, before);
    assert_eq!(cluster.owner(slot), dst, "the slot moved");
    let after: Vec<_> = starts.iter().map(|s| s.lo).filter(|t| *t > to).collect();
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
    let worst = worst_excess(&starts);
    println!("worst window excess over R·W: {worst:.1} (bound B = {B})");
    assert!(worst <= B, "{worst}");
}

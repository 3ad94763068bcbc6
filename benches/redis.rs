//! Distributed acquires per second against a throwaway local `redis-server`
//! (unix socket), with 1, 16 and 128 concurrent tasks: `Budget::reserve`
//! (timeout + breaker + one `EVALSHA`) next to a bare `EVALSHA` of the same
//! script over the same connection — the physical limit here. Each criterion
//! "iteration" is one acquire; acquires/s = 1 / time per iteration.
//! Skipped (with one line) when `redis-server` is not installed. The
//! `redis-cluster` group does the same at 128 tasks on a 3-primary Redis
//! Cluster started here (needs `redis-cli` too).

#[path = "../tests/support/redis_ha.rs"]
mod redis_ha;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use semaforo::pace::{Cost, Pace};
use semaforo::redis::{Budget, Grant, RedisBackend, RESERVE_LUA};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `iters` operations split over `tasks` tasks; returns the wall time.
fn split<F, Fut>(rt: &tokio::runtime::Runtime, tasks: u64, iters: u64, op: F) -> Duration
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    rt.block_on(async move {
        let t0 = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|i| {
                let op = op.clone();
                let n = iters / tasks + u64::from(i < iters % tasks);
                tokio::spawn(async move {
                    for _ in 0..n {
                        op().await;
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.expect("task");
        }
        t0.elapsed()
    })
}

/// One bare `EVALSHA` of the reserve script, with the keys and arguments
/// `Budget::reserve` sends (one cell, then its marker).
async fn bare<C: redis::aio::ConnectionLike>(
    script: &redis::Script,
    conn: &mut C,
    per: &str,
    burst: &str,
    name: &str,
) {
    let _: redis::Value = script
        .key(format!(
            "semaforo:budget:{{{name}}}:requests-per-60000000us"
        ))
        .key(format!("semaforo:budget:{{{name}}}:r:bare"))
        .arg("1e18")
        // The marker's life (ms).
        .arg(10_000)
        .arg(per)
        .arg(burst)
        .arg(1)
        // The cell's own longest wait: none.
        .arg("1e18")
        .invoke_async(conn)
        .await
        .expect("EVALSHA");
}

fn acquires(c: &mut Criterion) {
    let Some(server) = redis_server::RedisServer::start() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let redis = rt
        .block_on(RedisBackend::connect(server.url()))
        .expect("connects");
    let budget = Budget::builder(
        &redis,
        "bench",
        Pace::builder().requests_per_minute(u32::MAX as u64 * 60),
    )
    .build()
    .expect("valid budget");
    // The bare path: the same script and arguments, straight over one
    // multiplexed connection (concurrent calls are pipelined on it).
    let conn = rt
        .block_on(server.client().get_connection_manager())
        .expect("connects");
    let script = Arc::new(redis::Script::new(RESERVE_LUA));
    let per_unit_us = (60e6 / (u32::MAX as f64 * 60.0)).to_string();
    let burst = (u32::MAX as u64 * 60).to_string();

    let mut g = c.benchmark_group("redis/acquire");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    for tasks in [1u64, 16, 128] {
        let (conn, script, per, burst) = (
            conn.clone(),
            script.clone(),
            per_unit_us.clone(),
            burst.clone(),
        );
        g.bench_function(BenchmarkId::new("bare EVALSHA", tasks), |b| {
            b.iter_custom(|iters| {
                let (conn, script, per, burst) =
                    (conn.clone(), script.clone(), per.clone(), burst.clone());
                split(&rt, tasks, iters, move || {
                    let (mut conn, script, per, burst) =
                        (conn.clone(), script.clone(), per.clone(), burst.clone());
                    async move { bare(&script, &mut conn, &per, &burst, "bench-bare").await }
                })
            })
        });
        let budget = budget.clone();
        g.bench_function(BenchmarkId::new("semaforo Budget::reserve", tasks), |b| {
            b.iter_custom(|iters| {
                let budget = budget.clone();
                split(&rt, tasks, iters, move || {
                    let budget = budget.clone();
                    async move {
                        let g = budget.reserve(None, &Cost::tokens(0)).await;
                        assert!(matches!(g, Ok(Grant::Redis(_))), "{g:?}");
                    }
                })
            })
        });
    }
    g.finish();
}

/// The same at 128 tasks on a 3-primary Redis Cluster (started here; the
/// budget's keys on one slot, so one node): `Budget::reserve` next to a bare
/// `EVALSHA` over the same cluster connection.
fn cluster_acquires(c: &mut Criterion) {
    if !redis_ha::available() {
        return;
    }
    let cluster = redis_ha::Cluster::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let redis = rt
        .block_on(RedisBackend::cluster(cluster.seeds()).connect())
        .expect("connects");
    let budget = Budget::builder(
        &redis,
        "bench",
        Pace::builder().requests_per_minute(u32::MAX as u64 * 60),
    )
    .build()
    .expect("valid budget");
    let conn = rt
        .block_on(async {
            redis::cluster::ClusterClient::new(cluster.seeds())?
                .get_async_connection()
                .await
        })
        .expect("connects");
    let script = Arc::new(redis::Script::new(RESERVE_LUA));
    let per_unit_us = (60e6 / (u32::MAX as f64 * 60.0)).to_string();
    let burst = (u32::MAX as u64 * 60).to_string();
    let mut g = c.benchmark_group("redis-cluster/acquire");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    let tasks = 128;
    g.bench_function(BenchmarkId::new("bare EVALSHA", tasks), |b| {
        b.iter_custom(|iters| {
            let (conn, script, per, burst) = (
                conn.clone(),
                script.clone(),
                per_unit_us.clone(),
                burst.clone(),
            );
            split(&rt, tasks, iters, move || {
                let (mut conn, script, per, burst) =
                    (conn.clone(), script.clone(), per.clone(), burst.clone());
                async move { bare(&script, &mut conn, &per, &burst, "bench-bare").await }
            })
        })
    });
    g.bench_function(BenchmarkId::new("semaforo Budget::reserve", tasks), |b| {
        b.iter_custom(|iters| {
            let budget = budget.clone();
            split(&rt, tasks, iters, move || {
                let budget = budget.clone();
                async move {
                    let g = budget.reserve(None, &Cost::tokens(0)).await;
                    assert!(matches!(g, Ok(Grant::Redis(_))), "{g:?}");
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, acquires, cluster_acquires);
criterion_main!(benches);

//! At the edges (from an outside attack): the Redis budget with spend limits (real time:
//! Redis TIME is the clock; no sleeps).
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;

use redis_server::RedisServer;
use semaforo::pace::{Cost, Limit, Pace, Unit};
use semaforo::redis::{Budget, Grant, RedisBackend};
use std::time::Duration;
use tower::{Layer, ServiceExt};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn setup() -> Option<(
    tokio::sync::MutexGuard<'static, ()>,
    RedisServer,
    RedisBackend,
)> {
    let turn = SERIAL.lock().await;
    let server = RedisServer::start()?;
    let backend = RedisBackend::connect(server.url()).await.expect("connects");
    Some((turn, server, backend))
}

fn limits() -> semaforo::pace::PaceBuilder {
    Pace::builder()
        .limit(Limit::spend_per_day(1_000_000))
        .limit(Limit::new(Unit::Tokens, 1_000, Duration::from_secs(60)))
}

/// A spend limit's max_wait of zero becomes the whole Redis budget's: a
/// call that fits the dollar budget but must wait 30 s for the TPM is
/// refused, where the same limits in a local Pace queue it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_limit_forbids_waiting_for_the_tpm() {
    let Some((_s, _server, backend)) = setup().await else {
        return;
    };
    let budget = Budget::builder(&backend, "mixed", limits())
        .build()
        .unwrap();
    let call = |tokens| Cost::tokens(tokens).with_spend(1);
    assert!(matches!(budget.reserve(None, &call(1_000)).await, Ok(Grant::Redis(w)) if w.is_zero()));
    let redis = budget.reserve(None, &call(500)).await;
    eprintln!("redis: {redis:?}");

    // The same limits, locally, under a paused clock.
    let local = tokio::task::spawn_blocking(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let pace = limits().build().unwrap();
            let svc = pace
                .layer()
                .weigh(|t: &u64| Cost::tokens(*t).with_spend(1))
                .layer(tower::service_fn(|t: u64| async move {
                    Ok::<_, std::io::Error>(t)
                }));
            svc.clone().oneshot(1_000).await.unwrap();
            let t = tokio::time::Instant::now();
            svc.oneshot(500)
                .await
                .map(|_| t.elapsed())
                .map_err(|e| e.to_string())
        })
    })
    .await
    .unwrap();
    eprintln!("local: {local:?}");
    assert!(
        redis.is_ok() == local.is_ok(),
        "Redis {redis:?} vs local {local:?} for the same limits"
    );
}

/// Two limits of one unit whose windows have the same whole seconds share
/// one Redis key (`requests-per-1s`): the 2-per-second limit is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_with_the_same_label_share_a_key() {
    let Some((_s, _server, backend)) = setup().await else {
        return;
    };
    let b = Pace::builder()
        .limit(Limit::new(Unit::Requests, 2, Duration::from_secs(1)))
        .limit(Limit::new(
            Unit::Requests,
            1_000,
            Duration::from_millis(1_900),
        ))
        .max_wait(Duration::ZERO);
    let budget = Budget::builder(&backend, "label", b).build().unwrap();
    let mut granted = 0;
    for _ in 0..10 {
        if budget.reserve(None, &Cost::requests(1)).await.is_ok() {
            granted += 1;
        }
    }
    assert!(
        granted <= 3,
        "{granted} of 10 immediate calls granted under 2 per second"
    );
}

/// Spend retry_after through the Redis layer: exact to Redis time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_spend_retry_after() {
    let Some((_s, _server, backend)) = setup().await else {
        return;
    };
    let budget = Budget::builder(
        &backend,
        "dollar",
        Pace::builder()
            .limit(Limit::spend_per_month(3_000_000))
            .max_wait(Duration::from_secs(3_600)),
    )
    .build()
    .unwrap();
    let svc = budget
        .layer()
        .weigh(|n: &u64| Cost::requests(1).with_spend(*n))
        .layer(tower::service_fn(|n: u64| async move {
            Ok::<_, std::io::Error>(n)
        }));
    svc.clone().oneshot(3_000_000).await.unwrap();
    let e = svc.clone().oneshot(1_000_000).await.unwrap_err();
    let r = semaforo::Rejected::from_box(&e).unwrap();
    let ra = r.retry_after().unwrap().as_secs_f64();
    // $1 of $3 a 30-day month: 10 days.
    assert!((ra - 864_000.0).abs() < 1.0, "{ra}");
}

/// A reservation made again after Redis lost the state it was made in
/// (`FLUSHALL`) keeps `max_wait` counted from the call's arrival: B waits
/// 4 s of its 6 s, finds its reservation gone, and would wait 5 s more in the
/// new state (two calls came meanwhile) — it is refused, not started 9 s
/// after it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remade_reservation_counts_max_wait_from_arrival() {
    let Some((_s, server, backend)) = setup().await else {
        return;
    };
    let budget = Budget::builder(
        &backend,
        "remade",
        Pace::builder()
            .limit(Limit::new(Unit::Requests, 1, Duration::from_secs(4)))
            .max_wait(Duration::from_secs(6)),
    )
    .build()
    .unwrap();
    let svc = budget.layer().layer(tower::service_fn(|_: ()| async {
        Ok::<_, semaforo::BoxError>(())
    }));
    let t0 = std::time::Instant::now();
    svc.clone().oneshot(()).await.unwrap(); // A: the burst
    let b = tokio::spawn(svc.clone().oneshot(())); // B: 4 s in line
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut conn = server.connection().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    // The new state: C at once, D 4 s later (its start at ~5 s).
    svc.clone().oneshot(()).await.unwrap();
    let d = tokio::spawn(svc.clone().oneshot(()));
    let err = b.await.unwrap().unwrap_err();
    let r = semaforo::Rejected::from_box(&err).unwrap_or_else(|| panic!("{err}"));
    assert_eq!(r.kind(), semaforo::RejectKind::BudgetExceeded, "{err}");
    let at = t0.elapsed();
    assert!(at < Duration::from_secs(5), "refused at {at:?}");
    // A call coming now would wait 5 s, within max_wait: the hint is 1 µs.
    assert_eq!(r.retry_after(), Some(Duration::from_micros(1)), "{r:?}");
    d.await.unwrap().unwrap();
}

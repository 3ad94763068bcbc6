//! A 429 through a Redis budget's layer pauses the whole fleet (real time:
//! Redis `TIME` is the clock; no test sleeps, each reads the next grant's
//! wait).
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;

use redis_server::RedisServer;
use semaforo::classify::{Class, ClassError, ErrorClassifier};
use semaforo::pace::{Cost, Pace};
use semaforo::redis::{Budget, Grant, RedisBackend};
use semaforo::{BoxError, RejectKind};
use std::time::Duration;
use tower::{service_fn, Layer, ServiceExt};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A throwaway server and two instances (two backends, two budgets of one
/// name): what one pauses, the other meets.
async fn setup(
    name: &str,
    max_wait: Option<Duration>,
) -> Option<(
    tokio::sync::MutexGuard<'static, ()>,
    RedisServer,
    Budget,
    Budget,
)> {
    let turn = SERIAL.lock().await;
    let server = RedisServer::start()?;
    let mut budgets = Vec::new();
    for _ in 0..2 {
        let backend = RedisBackend::connect(server.url()).await.expect("connects");
        let mut limits = Pace::builder().requests_per_minute(6_000);
        if let Some(w) = max_wait {
            limits = limits.max_wait(w);
        }
        budgets.push(
            Budget::builder(&backend, name, limits)
                .build()
                .expect("a budget"),
        );
    }
    let b = budgets.pop()?;
    let a = budgets.pop()?;
    Some((turn, server, a, b))
}

/// An upstream answering `Throttled` with `retry_after` (a 429).
fn throttling(
    retry_after: Option<Duration>,
) -> impl tower::Service<u64, Response = u64, Error = BoxError, Future = impl Send> + Clone + Send {
    service_fn(move |_: u64| async move {
        Err::<u64, BoxError>(ClassError::new(Class::Throttled { retry_after }, "429").into())
    })
}

async fn next_wait(budget: &Budget, key: Option<&str>) -> Duration {
    match budget.reserve(key, &Cost::requests(1)).await {
        Ok(Grant::Redis(w)) => w,
        other => panic!("expected a Redis grant, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_through_one_instance_pauses_every_instance() {
    let Some((_t, _server, a, b)) = setup("pause-fleet", None).await else {
        return;
    };
    let svc = a
        .layer()
        .classify(ErrorClassifier)
        .layer(throttling(Some(Duration::from_secs(30))));
    let err = svc.oneshot(1).await.unwrap_err();
    assert!(
        err.to_string().contains("429"),
        "the answer is handed on: {err}"
    );
    // The other instance's next call starts after the 30 s (less the few
    // ms this test took since).
    let w = next_wait(&b, None).await;
    assert!(
        (Duration::from_secs(29)..=Duration::from_secs(30)).contains(&w),
        "waits {w:?}"
    );
    // So does the first instance's.
    let w = next_wait(&a, None).await;
    assert!(w >= Duration::from_secs(29), "waits {w:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_classifier_nothing_is_paused() {
    let Some((_t, _server, a, b)) = setup("pause-none", None).await else {
        return;
    };
    let svc = a.layer().layer(throttling(Some(Duration::from_secs(30))));
    assert!(svc.oneshot(1).await.is_err());
    assert_eq!(next_wait(&b, None).await, Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pause_is_the_local_pacers_one_second_to_sixty() {
    let Some((_t, _server, a, b)) = setup("pause-bounds", None).await else {
        return;
    };
    // No retry_after: 1 s.
    let svc = a.layer().classify(ErrorClassifier).layer(throttling(None));
    assert!(svc.oneshot(1).await.is_err());
    let w = next_wait(&b, None).await;
    assert!(
        (Duration::from_millis(900)..=Duration::from_secs(1)).contains(&w),
        "waits {w:?}"
    );
    // Ten minutes asked: 60 s at most.
    let svc = a
        .layer()
        .classify(ErrorClassifier)
        .layer(throttling(Some(Duration::from_secs(600))));
    assert!(svc.oneshot(1).await.is_err());
    let w = next_wait(&b, None).await;
    assert!(
        (Duration::from_secs(59)..=Duration::from_secs(60)).contains(&w),
        "waits {w:?}"
    );
    // A shorter pause after it leaves the longer one in place.
    a.pause(None, Duration::from_secs(5)).await.unwrap();
    assert!(next_wait(&b, None).await >= Duration::from_secs(59));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_budget_pauses_the_calls_key_only() {
    let Some((_t, _server, a, b)) = setup("pause-keyed", None).await else {
        return;
    };
    let svc = a
        .layer()
        .key(|n: &u64| Some(format!("tenant-{n}")))
        .classify(ErrorClassifier)
        .layer(throttling(Some(Duration::from_secs(20))));
    assert!(svc.oneshot(7).await.is_err());
    assert!(next_wait(&b, Some("tenant-7")).await >= Duration::from_secs(19));
    assert_eq!(next_wait(&b, Some("tenant-8")).await, Duration::ZERO);
    assert_eq!(next_wait(&b, None).await, Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_past_max_wait_is_refused_with_its_retry_after() {
    let Some((_t, _server, a, b)) = setup("pause-max-wait", Some(Duration::from_secs(5))).await
    else {
        return;
    };
    a.pause(None, Duration::from_secs(30)).await.unwrap();
    let r = b.reserve(None, &Cost::requests(1)).await.unwrap_err();
    assert_eq!(r.kind(), RejectKind::BudgetExceeded);
    // 30 s of pause less the 5 s it may wait.
    let ra = r.retry_after().expect("a retry_after");
    assert!(
        (Duration::from_secs(24)..=Duration::from_secs(25)).contains(&ra),
        "{r} ({ra:?})"
    );
}

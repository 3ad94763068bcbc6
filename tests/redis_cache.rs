//! The cache's Redis tier against a throwaway `redis-server`: two instances
//! of the LLM preset (each its own in-process cache and connection) share
//! answers; 2 × 25 identical requests at once are one upstream call; with
//! Redis killed both keep serving. Real time (Redis is a real server).
#![cfg(all(feature = "redis", feature = "llm"))]

#[path = "support/redis_server.rs"]
mod redis_server;

use bytes::Bytes;
use redis_server::RedisServer;
use semaforo::cache::Cache;
use semaforo::llm::{LlmCache, LlmStack, Tier};
use semaforo::redis::{CacheTier, RedisBackend};
use semaforo::share::Served;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn provider(
    calls: &Arc<AtomicUsize>,
    work: Duration,
) -> impl Service<
    http::Request<Bytes>,
    Response = http::Response<Bytes>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let calls = calls.clone();
    tower::service_fn(move |_req: http::Request<Bytes>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(work).await;
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(200)
                    .header("x-call", n)
                    .body(Bytes::from(format!(
                        r#"{{"id":"call-{n}","usage":{{"prompt_tokens":10,"completion_tokens":10,"total_tokens":20}}}}"#
                    )))
                    .unwrap(),
            )
        }
    })
}

fn chat(topic: &str) -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-1")
        .body(Bytes::from(format!(
            r#"{{"model":"gpt-4o-mini","temperature":0,"max_tokens":10,"messages":[{{"role":"user","content":"{topic}"}}]}}"#
        )))
        .unwrap()
}

/// One instance: its own in-process cache and connection, the shared tier.
async fn instance(
    server: &RedisServer,
    calls: &Arc<AtomicUsize>,
) -> (
    impl Service<
            http::Request<Bytes>,
            Response = http::Response<Bytes>,
            Error = semaforo::BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    LlmCache,
) {
    let redis = RedisBackend::builder(server.url())
        .timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let tier = CacheTier::builder(&redis, "plans")
        .ttl(Duration::from_secs(60))
        .lock_for(Duration::from_secs(10))
        .build()
        .unwrap();
    let cache: LlmCache = Cache::builder()
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 10_000,
        tokens_per_minute: 10_000_000,
    })
    .cache(cache.clone())
    .coalesce(true)
    .cache_tier(tier)
    .build()
    .unwrap();
    (
        stack
            .layer()
            .layer(provider(calls, Duration::from_millis(500))),
        cache,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_is_served_from_redis() {
    let _turn = SERIAL.lock().await;
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, _) = instance(&server, &calls).await;
    let (b, b_cache) = instance(&server, &calls).await;
    let first = a.clone().oneshot(chat("el ciclo del agua")).await.unwrap();
    assert!(first.extensions().get::<Served>().is_none());
    let from_redis = b.clone().oneshot(chat("el ciclo del agua")).await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the second instance did not call"
    );
    assert_eq!(from_redis.body(), first.body());
    assert_eq!(from_redis.headers()["x-call"], "0");
    assert!(matches!(
        from_redis.extensions().get::<Served>(),
        Some(Served::Cache { stale: false, .. })
    ));
    // Now also in B's own cache.
    let again = b.clone().oneshot(chat("el ciclo del agua")).await.unwrap();
    assert_eq!(again.body(), first.body());
    assert_eq!(b_cache.snapshot().hits, 1);
    // A different request is a different entry.
    b.clone().oneshot(chat("otro tema")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// 2 instances × 25 identical requests at once: one upstream call (each
/// instance coalesces; across them, the fill lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_requests_on_two_instances_make_one_call() {
    let _turn = SERIAL.lock().await;
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, _) = instance(&server, &calls).await;
    let (b, _) = instance(&server, &calls).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        let call = svc.oneshot(chat("el ciclo del agua"));
        tasks.push(tokio::spawn(call));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.push(t.await.unwrap().unwrap().into_body());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(bodies.iter().all(|b| b == &bodies[0]));
}

/// Redis killed: both instances keep answering (from their own caches,
/// and upstream for new requests); no call fails because of Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_no_call() {
    let _turn = SERIAL.lock().await;
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, _) = instance(&server, &calls).await;
    let (b, _) = instance(&server, &calls).await;
    a.clone().oneshot(chat("antes")).await.unwrap();
    b.clone().oneshot(chat("antes")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    server.stop();
    for i in 0..10 {
        for svc in [&a, &b] {
            let r = svc.clone().oneshot(chat("antes")).await.unwrap();
            assert_eq!(r.status(), 200);
            let r = svc
                .clone()
                .oneshot(chat(&format!("nuevo {i}")))
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // "antes" from each instance's own cache; each new request upstream.
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 20);
}

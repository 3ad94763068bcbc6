//! The LLM preset with its cache and coalescing: the classroom scenario
//! with identical prompts.

use bytes::Bytes;
use semaforo::cache::Cache;
use semaforo::llm::{LlmCache, LlmKey, LlmStack, Tier};
use semaforo::pace::Unit;
use semaforo::share::{RequestKey, Served};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

const TIER: Tier = Tier {
    requests_per_minute: 500,
    tokens_per_minute: 30_000,
};

/// A provider answering each call after 5 s with a body naming the call.
fn provider(
    calls: &Arc<AtomicUsize>,
) -> impl Service<
    http::Request<Bytes>,
    Response = http::Response<Bytes>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    let calls = calls.clone();
    tower::service_fn(move |_req: http::Request<Bytes>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let body = format!(
                r#"{{"id":"call-{n}","choices":[{{"message":{{"content":"El agua se evapora..."}}}}],"usage":{{"prompt_tokens":1500,"completion_tokens":500,"total_tokens":2000}}}}"#
            );
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Bytes::from(body))
                    .unwrap(),
            )
        }
    })
}

fn chat(topic: &str, key: &str) -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .body(Bytes::from(format!(
            r#"{{"model":"gpt-4o-mini","temperature":0,"max_tokens":500,"messages":[{{"role":"user","content":"Plan de clase: {topic}"}}]}}"#
        )))
        .unwrap()
}

/// Requests charged to the model's pacer (its requests dimension's
/// capacity minus what is available; no time passes in these checks).
fn requests_charged(stack: &LlmStack) -> f64 {
    let pace = stack.pace().peek("gpt-4o-mini").unwrap();
    let d = pace
        .snapshot()
        .dims
        .into_iter()
        .find(|d| d.unit == Unit::Requests)
        .unwrap();
    d.capacity - d.available
}

/// 50 teachers ask for the same plan at once: one upstream call, one
/// request charged to the pacer, 50 identical answers; the next 50 come
/// from the cache (no call); 50 different plans are 50 calls.
#[tokio::test(start_paused = true)]
async fn fifty_identical_prompts_pay_once() {
    let cache: LlmCache = Cache::builder()
        .ttl(Duration::from_secs(3_600))
        .build()
        .unwrap();
    let stack = LlmStack::openai(TIER)
        .cache(cache.clone())
        .coalesce(true)
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let llm = stack.layer().layer(provider(&calls));
    let tasks: Vec<_> = (0..50)
        .map(|_| tokio::spawn(llm.clone().oneshot(chat("el ciclo del agua", "sk-1"))))
        .collect();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(requests_charged(&stack), 1.0, "one request charged");
    let mut bodies = Vec::new();
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        bodies.push(res.into_body());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(bodies.iter().all(|b| b == &bodies[0]));
    assert!(std::str::from_utf8(&bodies[0]).unwrap().contains("call-0"));

    // Within the TTL: from the cache, marked.
    for _ in 0..50 {
        let res = llm
            .clone()
            .oneshot(chat("el ciclo del agua", "sk-1"))
            .await
            .unwrap();
        assert!(matches!(
            res.extensions().get::<Served>(),
            Some(Served::Cache { stale: false, .. })
        ));
        assert_eq!(res.body(), &bodies[0]);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let s = cache.snapshot();
    assert_eq!((s.hits, s.stores), (50, 1));

    // 50 different plans: 50 calls, no false sharing.
    let answers = futures::future::join_all(
        (0..50).map(|i| llm.clone().oneshot(chat(&format!("tema {i}"), "sk-1"))),
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 51);
    let mut ids: Vec<String> = answers
        .into_iter()
        .map(|a| String::from_utf8(a.unwrap().into_body().to_vec()).unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50);
}

/// Two API keys asking the same thing do not share an answer (by
/// default); `cache-control: no-store` bypasses both layers.
#[tokio::test(start_paused = true)]
async fn credentials_and_no_store_keep_answers_apart() {
    let cache: LlmCache = Cache::builder().build().unwrap();
    let stack = LlmStack::openai(TIER)
        .cache(cache)
        .coalesce(true)
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let llm = stack.layer().layer(provider(&calls));
    let (a, b) = tokio::join!(
        llm.clone().oneshot(chat("x", "sk-1")),
        llm.clone().oneshot(chat("x", "sk-2"))
    );
    assert_ne!(a.unwrap().body(), b.unwrap().body());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let mut req = chat("x", "sk-1");
    req.headers_mut()
        .insert("cache-control", http::HeaderValue::from_static("no-store"));
    llm.clone().oneshot(req).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Shared across credentials when asked.
    let stack = LlmStack::openai(TIER)
        .cache(Cache::builder().build().unwrap())
        .cache_key(LlmKey::new().across_credentials(true))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let llm = stack.layer().layer(provider(&calls));
    llm.clone().oneshot(chat("x", "sk-1")).await.unwrap();
    llm.clone().oneshot(chat("x", "sk-2")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Without `temperature: 0` a request is sampled: not shared, unless the
/// key says so (the test opts in for the classroom case).
#[tokio::test(start_paused = true)]
async fn sampled_requests_share_only_when_asked() {
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hola"}]}"#;
    let req = || {
        http::Request::post("/v1/chat/completions")
            .body(Bytes::from_static(body.as_bytes()))
            .unwrap()
    };
    for (key, want) in [
        (LlmKey::new(), 10),
        (LlmKey::new().nondeterministic(true), 1),
    ] {
        let stack = LlmStack::openai(TIER)
            .coalesce(true)
            .cache_key(key)
            .build()
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let llm = stack.layer().layer(provider(&calls));
        futures::future::join_all((0..10).map(|_| llm.clone().oneshot(req()))).await;
        assert_eq!(calls.load(Ordering::SeqCst), want);
    }
}

/// The canonical key: field order and whitespace do not matter, numbers
/// have one form; a different temperature, message, model or path is
/// another key; `user` and `metadata` are left out unless kept.
#[test]
fn the_canonical_key() {
    let key = LlmKey::new().nondeterministic(true);
    let k = |path: &str, body: &str| {
        key.key(
            &http::Request::post(path)
                .header("authorization", "Bearer sk-1")
                .body(Bytes::from(body.to_owned()))
                .unwrap(),
        )
    };
    let base = k(
        "/v1/chat/completions",
        r#"{"model":"m","temperature":0,"max_tokens":10,"messages":[{"role":"user","content":"a"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"b":1,"a":2}}}]}"#,
    )
    .unwrap();
    let same = k(
        "/v1/chat/completions",
        "{\n  \"tools\": [ { \"function\": { \"parameters\": {\"a\": 2.0, \"b\": 1e0}, \"name\": \"f\" }, \"type\": \"function\" } ],\n  \"messages\": [{\"content\": \"a\", \"role\": \"user\"}],\n  \"max_tokens\": 10, \"temperature\": 0.0, \"model\": \"m\", \"user\": \"teacher-7\", \"metadata\": {\"x\": 1}\n}",
    )
    .unwrap();
    assert_eq!(base, same);
    for other in [
        r#"{"model":"m","temperature":0.7,"max_tokens":10,"messages":[{"role":"user","content":"a"}]}"#,
        r#"{"model":"m","temperature":0,"max_tokens":11,"messages":[{"role":"user","content":"a"}]}"#,
        r#"{"model":"m2","temperature":0,"max_tokens":10,"messages":[{"role":"user","content":"a"}]}"#,
        r#"{"model":"m","temperature":0,"max_tokens":10,"messages":[{"role":"user","content":"b"}]}"#,
        r#"{"model":"m","temperature":0,"max_tokens":10,"stream":true,"messages":[{"role":"user","content":"a"}]}"#,
    ] {
        assert_ne!(
            Some(&base),
            k("/v1/chat/completions", other).as_ref(),
            "{other}"
        );
    }
    let body = r#"{"model":"m","temperature":0,"max_tokens":10,"messages":[{"role":"user","content":"a"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"b":1,"a":2}}}]}"#;
    assert_ne!(Some(&base), k("/v1/responses", body).as_ref());
    // `user` back in the key: teachers no longer share.
    let key = LlmKey::new().keep("user");
    let with_user = |u: &str| {
        key.key(
            &http::Request::post("/v1/chat/completions")
                .body(Bytes::from(format!(
                    r#"{{"model":"m","temperature":0,"user":"{u}","messages":[]}}"#
                )))
                .unwrap(),
        )
    };
    assert_ne!(with_user("a"), with_user("b"));
    // Not JSON, too deep, or a JSON array: no key.
    assert!(k("/", "not json").is_none());
    assert!(k("/", "[1,2]").is_none());
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    assert!(k("/", &format!(r#"{{"model":"m","x":{deep}}}"#)).is_none());
}

//! A newcomer's second pass: the wave-2 capabilities the README lists, each
//! written from the README and the module docs alone.
#![cfg(all(feature = "llm", feature = "chaos"))]

use bytes::Bytes;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};

fn ok_body(text: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"choices":[{{"message":{{"content":"{text}"}}}}],"usage":{{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}}}"#
    ))
}

fn chat(body: &'static str) -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Bytes::from_static(body.as_bytes()))
        .unwrap()
}

// ---------------------------------------------------------------------------
// route: the generic Router, failover by class.
// ---------------------------------------------------------------------------

/// Module docs: "a result classified `Overloaded`, `Transient` or
/// `Infrastructure` ... send the next attempt to another deployment at once".
#[tokio::test(start_paused = true)]
async fn route_fails_over_on_connection_reset() -> Result<(), semaforo::BoxError> {
    use semaforo::observe::{EventKind, RouteReason};
    use semaforo::route::{Deployment, Router};

    let a_calls = Arc::new(AtomicU32::new(0));
    let a = {
        let a_calls = a_calls.clone();
        service_fn(move |_: u64| {
            a_calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<&'static str, _>(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
            }
        })
    };
    let b = service_fn(|_: u64| async { Ok::<_, std::io::Error>("b") });
    let routed = Arc::new(Mutex::new(Vec::new()));
    let log = routed.clone();
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            tower::util::BoxCloneSyncService::new(a),
        ))
        .deployment(Deployment::new(
            "b",
            tower::util::BoxCloneSyncService::new(b),
        ))
        .on_event(move |e| {
            if let EventKind::Routed {
                deployment, why, ..
            } = &e.kind
            {
                log.lock()
                    .unwrap()
                    .push((deployment.to_string(), why.clone()));
            }
        })
        .build()?;
    // Call several times: every call must end at "b".
    for _ in 0..4 {
        assert_eq!(router.clone().oneshot(1).await?, "b");
    }
    let routed = routed.lock().unwrap();
    eprintln!("routed: {routed:?}");
    assert!(routed
        .iter()
        .any(|(d, why)| d == "b" && matches!(why, RouteReason::FailedOver { .. })));
    Ok(())
}

/// Module docs: "when every deployment's breaker is open, `CircuitOpen` with
/// the soonest reopen".
#[tokio::test(start_paused = true)]
async fn route_all_breakers_open_is_circuit_open() -> Result<(), semaforo::BoxError> {
    use semaforo::breaker::Breaker;
    use semaforo::route::{Deployment, Router};
    let mk = |name: &'static str| -> Result<_, semaforo::BoxError> {
        let breaker = Breaker::builder().name(name).build()?;
        let svc = breaker
            .layer()
            .layer(service_fn(|_: ()| async { Ok::<_, std::io::Error>(()) }));
        breaker.force_open();
        Ok(Deployment::new(name, tower::util::BoxCloneSyncService::new(svc)).breaker(breaker))
    };
    let router = Router::builder()
        .deployment(mk("a")?)
        .deployment(mk("b")?)
        .build()?;
    let e = router.oneshot(()).await.unwrap_err();
    let r = semaforo::Rejected::from_box(&e).expect("a Rejected");
    eprintln!(
        "all open: {e} / kind {:?} retry_after {:?}",
        r.kind(),
        r.retry_after()
    );
    assert_eq!(r.kind(), semaforo::RejectKind::CircuitOpen);
    Ok(())
}

/// Hedging with a fixed delay: the first deployment hangs, the hedge answers.
#[tokio::test(start_paused = true)]
async fn route_hedge_fixed_delay() -> Result<(), semaforo::BoxError> {
    use semaforo::route::{Deployment, Hedge, Router};
    let slow = service_fn(|_: ()| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok::<_, std::io::Error>("slow")
    });
    let fast = service_fn(|_: ()| async { Ok::<_, std::io::Error>("fast") });
    let router = Router::builder()
        .deployment(
            Deployment::new("slow", tower::util::BoxCloneSyncService::new(slow)).preference(0),
        )
        .deployment(
            Deployment::new("fast", tower::util::BoxCloneSyncService::new(fast)).preference(1),
        )
        .hedge(Hedge::After(Duration::from_millis(500)), 1.0)
        .build()?;
    let t = tokio::time::Instant::now();
    let got = router.oneshot(()).await?;
    eprintln!("hedge: got {got} after {:?}", t.elapsed());
    assert_eq!(got, "fast");
    assert_eq!(t.elapsed(), Duration::from_millis(500));
    Ok(())
}

// ---------------------------------------------------------------------------
// llm router: 529 fails over; context-length falls back to a renamed model.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn llm_router_529_fails_over_and_context_length_falls_back() -> Result<(), semaforo::BoxError>
{
    use semaforo::classify::Permanent;
    use semaforo::llm::{LlmDeployment, LlmStack, Tier};

    let primary = service_fn(|_req: http::Request<Bytes>| async {
        let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        Ok::<_, std::io::Error>(
            http::Response::builder()
                .status(529)
                .body(Bytes::from_static(body.as_bytes()))
                .unwrap(),
        )
    });
    let secondary = service_fn(|req: http::Request<Bytes>| async move {
        let body = std::str::from_utf8(req.body()).unwrap().to_owned();
        if body.contains("LONG") {
            let e = r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
            return Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(400)
                    .body(Bytes::from_static(e.as_bytes()))
                    .unwrap(),
            );
        }
        Ok(http::Response::new(ok_body("from secondary")))
    });
    let seen_model = Arc::new(Mutex::new(String::new()));
    let seen = seen_model.clone();
    let long = service_fn(move |req: http::Request<Bytes>| {
        *seen.lock().unwrap() = String::from_utf8(req.body().to_vec()).unwrap();
        async { Ok::<_, std::io::Error>(http::Response::new(ok_body("from long"))) }
    });
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    };
    let router = LlmStack::router()
        .deployment(LlmDeployment::new("primary", LlmStack::openai(tier), primary).preference(0))
        .deployment(
            LlmDeployment::new("secondary", LlmStack::openai(tier), secondary).preference(1),
        )
        .deployment(
            LlmDeployment::new("long", LlmStack::openai(tier), long)
                .group("long-context")
                .model("gpt-4.1"),
        )
        .fallback(Permanent::ContextLengthExceeded, "long-context")
        .build()?;

    let res = router
        .clone()
        .oneshot(chat(r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hola"}]}"#))
        .await?;
    assert_eq!(res.status(), 200);
    assert!(std::str::from_utf8(res.body())?.contains("from secondary"));

    let res = router
        .oneshot(chat(r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"LONG"}]}"#))
        .await?;
    assert_eq!(res.status(), 200, "body: {:?}", res.body());
    assert!(std::str::from_utf8(res.body())?.contains("from long"));
    let sent = seen_model.lock().unwrap().clone();
    eprintln!("long deployment got: {sent}");
    assert!(sent.contains(r#""model":"gpt-4.1""#));
    Ok(())
}

// ---------------------------------------------------------------------------
// adaptive concurrency
// ---------------------------------------------------------------------------

/// `Aimd` with a latency threshold: an upstream slower than the threshold
/// under load brings the limit down.
#[tokio::test(start_paused = true)]
async fn adaptive_aimd_limit_falls_under_slow_upstream() -> Result<(), semaforo::BoxError> {
    use semaforo::bulkhead::{Aimd, Bulkhead};
    let bulkhead = Bulkhead::builder(100)
        .limit(
            Aimd::new()
                .min(5)
                .latency_threshold(Duration::from_millis(200)),
        )
        .max_queue(1_000)
        .sample_every(1)
        .build()?;
    let in_flight = Arc::new(AtomicU32::new(0));
    let upstream = {
        let in_flight = in_flight.clone();
        service_fn(move |_: ()| {
            let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            let in_flight = in_flight.clone();
            async move {
                // capacity 20: 100 ms up to it, proportional above.
                let ms = 100 * u64::from(n.max(20)) / 20;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            }
        })
    };
    let svc = bulkhead.layer().layer(upstream);
    let start = bulkhead.snapshot();
    eprintln!(
        "adaptive start: limit {} adaptive {:?}",
        start.limit, start.adaptive_limit
    );
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..30 {
                let _ = svc.clone().oneshot(()).await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let end = bulkhead.snapshot();
    eprintln!(
        "adaptive end: limit {} adaptive {:?}",
        end.limit, end.adaptive_limit
    );
    let limit = end
        .adaptive_limit
        .expect("an adaptive limit in the snapshot");
    assert!(limit < 60, "limit {limit}");
    Ok(())
}

/// README: "one builder call in the LLM preset (`adaptive_limit`, priorities
/// from the `Priority` request extension)".
#[tokio::test(start_paused = true)]
async fn adaptive_in_llm_preset() -> Result<(), semaforo::BoxError> {
    use semaforo::bulkhead::{Priority, Vegas};
    use semaforo::llm::{LlmStack, Tier};
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 5_000,
        tokens_per_minute: 10_000_000,
    })
    .adaptive_limit(64, Vegas::new().min(4))
    .build()?;
    let client = service_fn(|_req: http::Request<Bytes>| async {
        Ok::<_, std::io::Error>(http::Response::new(ok_body("hi")))
    });
    let llm = stack.layer().layer(client);
    let mut req = chat(r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[]}"#);
    req.extensions_mut().insert(Priority(5));
    let res = llm.oneshot(req).await?;
    assert_eq!(res.status(), 200);
    let s = stack.bulkhead().snapshot();
    eprintln!(
        "preset adaptive snapshot: limit {} adaptive {:?}",
        s.limit, s.adaptive_limit
    );
    assert!(s.adaptive_limit.is_some());
    Ok(())
}

// ---------------------------------------------------------------------------
// coalescing and caching in the LLM preset
// ---------------------------------------------------------------------------

/// README: "`--same-prompt` ... adds the answer cache and coalescing: one call
/// upstream for the 50, and a later ask answered from the cache".
#[tokio::test(start_paused = true)]
async fn llm_cache_and_coalesce_50_identical() -> Result<(), semaforo::BoxError> {
    use semaforo::cache::Cache;
    use semaforo::llm::{LlmCache, LlmStack, Tier};
    use semaforo::share::Served;

    let calls = Arc::new(AtomicU32::new(0));
    let client = {
        let calls = calls.clone();
        service_fn(move |_req: http::Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, std::io::Error>(http::Response::new(ok_body("el ciclo del agua")))
            }
        })
    };
    let cache: LlmCache = Cache::builder().ttl(Duration::from_secs(3_600)).build()?;
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .cache(cache)
    .coalesce(true)
    .build()?;
    let llm = stack.layer().layer(client);
    let body = r#"{"model":"gpt-4o-mini","temperature":0,"max_tokens":100,"messages":[{"role":"user","content":"plan"}]}"#;
    let answers = futures::future::join_all((0..50).map(|_| llm.clone().oneshot(chat(body)))).await;
    let mut coalesced = 0;
    for a in &answers {
        let a = a.as_ref().map_err(|e| e.to_string())?;
        assert_eq!(a.status(), 200);
        if matches!(a.extensions().get::<Served>(), Some(Served::Coalesced)) {
            coalesced += 1;
        }
    }
    eprintln!(
        "coalesced marks: {coalesced}, upstream calls {}",
        calls.load(Ordering::SeqCst)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let later = llm.clone().oneshot(chat(body)).await?;
    eprintln!(
        "later: served {:?} age {:?}",
        later.extensions().get::<Served>(),
        later.headers().get("age")
    );
    assert!(matches!(
        later.extensions().get::<Served>(),
        Some(Served::Cache { .. })
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Without temperature 0 (a newcomer's first request), nothing is shared.
    let sampled =
        r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"plan"}]}"#;
    let _ = futures::future::join_all((0..3).map(|_| llm.clone().oneshot(chat(sampled)))).await;
    eprintln!(
        "after 3 sampled: upstream calls {}",
        calls.load(Ordering::SeqCst)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let snap = stack.cache().unwrap().snapshot();
    eprintln!("cache snapshot: {snap:?}");
    Ok(())
}

/// The plain cache's stale answer for a fallback: `Cache::stale` after the TTL.
#[tokio::test(start_paused = true)]
async fn cache_stale_after_ttl() -> Result<(), semaforo::BoxError> {
    use semaforo::cache::Cache;
    let cache: Cache<String, String> = Cache::builder()
        .ttl(Duration::from_secs(10))
        .stale_for(Duration::from_secs(60))
        .build()?;
    let svc = cache
        .layer(|t: &String| Some(t.clone()))
        .layer(service_fn(|t: String| async move {
            Ok::<_, std::io::Error>(format!("plan: {t}"))
        }));
    svc.clone().oneshot("agua".into()).await?;
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(cache.get(&"agua".to_string()), None);
    let (v, age) = cache.stale(&"agua".to_string()).expect("stale kept");
    assert_eq!(v, "plan: agua");
    assert_eq!(age, Duration::from_secs(11));
    Ok(())
}

// ---------------------------------------------------------------------------
// degrade
// ---------------------------------------------------------------------------

/// README "When the provider goes down": `Reduced` once the breaker has been
/// open for 5 s; back 30 s after it closes; `switch.spawn()` evaluates every
/// second.
#[tokio::test(start_paused = true)]
async fn degrade_readme_outage_flow() -> Result<(), semaforo::BoxError> {
    use semaforo::degrade::{self, Degrade, Level, Rule};
    use semaforo::llm::{LlmStack, Tier};
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()?;
    let switch = Degrade::builder()
        .rule(
            Rule::new(Level::Reduced, degrade::breaker_open(stack.breaker()))
                .after(Duration::from_secs(5))
                .recover_after(Duration::from_secs(30)),
        )
        .build()?;
    let _task = switch.spawn()?;
    stack.breaker().force_open();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(switch.level(), Level::Normal);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(switch.level(), Level::Reduced);
    stack.breaker().reset();
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(switch.level(), Level::Reduced);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(switch.level(), Level::Normal);
    Ok(())
}

/// `DegradeLayer` (feature `http`): the level on requests, an
/// `x-degrade-level` header on responses when not `Normal`.
#[tokio::test(start_paused = true)]
async fn degrade_layer_header() -> Result<(), semaforo::BoxError> {
    use semaforo::degrade::{Degrade, DegradeLayer, Level};
    let switch = Degrade::builder().build()?;
    let svc = DegradeLayer::new(&switch).layer(service_fn(|req: http::Request<()>| async move {
        let level = req.extensions().get::<Level>().copied();
        Ok::<_, std::io::Error>(http::Response::new(format!("{level:?}")))
    }));
    let res = svc.clone().oneshot(http::Request::new(())).await?;
    assert!(res.headers().get("x-degrade-level").is_none());
    switch.set(Level::Minimal);
    let res = svc.oneshot(http::Request::new(())).await?;
    eprintln!(
        "degrade header {:?}, body {}",
        res.headers().get("x-degrade-level"),
        res.body()
    );
    assert_eq!(res.headers()["x-degrade-level"], "minimal");
    Ok(())
}

// ---------------------------------------------------------------------------
// chaos
// ---------------------------------------------------------------------------

/// README: "429s with `Retry-After` + `x-ratelimit-*`" — put
/// `chaos::rate_limited` under the LLM preset; the preset's retry honours it.
#[tokio::test(start_paused = true)]
async fn chaos_rate_limited_under_llm_preset() -> Result<(), semaforo::BoxError> {
    use semaforo::chaos::{self, Chaos, Fault};
    use semaforo::llm::{LlmStack, Tier};
    let chaos: Chaos<http::Response<Bytes>> = Chaos::builder()
        .seed(1)
        .fault(Fault::respond(chaos::rate_limited(Duration::from_secs(2))).rate(0.5))
        .build()?;
    chaos.enable();
    let client = service_fn(|_req: http::Request<Bytes>| async {
        Ok::<_, std::io::Error>(http::Response::new(ok_body("hi")))
    });
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 300_000,
    })
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .layer(chaos.layer())
        .service(client);
    let mut ok = 0;
    for _ in 0..10 {
        let res = llm
            .clone()
            .oneshot(chat(
                r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[]}"#,
            ))
            .await?;
        if res.status() == 200 {
            ok += 1;
        } else {
            eprintln!("chaos: status {}", res.status());
        }
    }
    eprintln!("chaos: {ok}/10 ok, {} calls seen by chaos", chaos.calls());
    assert_eq!(ok, 10);
    Ok(())
}

/// A hung call is the timeout's job.
#[tokio::test(start_paused = true)]
async fn chaos_hang_meets_timeout() -> Result<(), semaforo::BoxError> {
    use semaforo::chaos::{Chaos, Fault};
    use semaforo::timeout::Timeout;
    let chaos: Chaos<u32> = Chaos::builder().fault(Fault::hang()).build()?;
    chaos.enable();
    let timeout = Timeout::builder().attempt(Duration::from_secs(3)).build()?;
    let svc = ServiceBuilder::new()
        .layer(timeout.layer())
        .layer(chaos.layer())
        .service(service_fn(
            |x: u32| async move { Ok::<_, std::io::Error>(x) },
        ));
    let t = tokio::time::Instant::now();
    let e = svc.oneshot(1).await.unwrap_err();
    eprintln!("hang: {e} after {:?}", t.elapsed());
    assert_eq!(t.elapsed(), Duration::from_secs(3));
    Ok(())
}

// ---------------------------------------------------------------------------
// health / observability
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn health_report_serializes_with_llm_stack() -> Result<(), semaforo::BoxError> {
    use semaforo::health::{Health, Status};
    use semaforo::llm::{LlmStack, Tier};
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()?;
    let health = stack.register_health(Health::new(stack.shutdown()), "openai");
    let report = health.report();
    assert!(report.ready);
    assert_eq!(report.status, Status::Ok);
    #[cfg(feature = "serde")]
    {
        let json = serde_json::to_string(&report)?;
        eprintln!("health json: {json}");
        assert!(json.contains(r#""status":"ok""#));
    }
    stack.breaker().force_open();
    assert_eq!(health.report().status, Status::Degraded);
    stack.shutdown().trigger();
    assert!(!health.is_ready());
    assert_eq!(health.report().status, Status::Down);
    Ok(())
}

/// README: "Every layer's builder takes a `.name("openai")` and an
/// `.on_event(|e| …)` listener".
#[tokio::test(start_paused = true)]
async fn every_builder_has_name_and_on_event() -> Result<(), semaforo::BoxError> {
    use semaforo::observe::Event;
    let f = |_: &Event<'_>| {};
    let _ = semaforo::bulkhead::Bulkhead::builder(1)
        .name("x")
        .on_event(f)
        .build()?;
    let _ = semaforo::breaker::Breaker::builder()
        .name("x")
        .on_event(f)
        .build()?;
    let _ = semaforo::retry::Retry::builder()
        .name("x")
        .on_event(f)
        .build()?;
    let _ = semaforo::timeout::Timeout::builder()
        .name("x")
        .on_event(f)
        .attempt(Duration::from_secs(1))
        .build()?;
    let _ = semaforo::pace::Pace::builder()
        .requests_per_minute(1)
        .name("x")
        .on_event(f)
        .build()?;
    let _ = semaforo::quota::Quota::builder()
        .name("x")
        .on_event(f)
        .plan("free", semaforo::quota::Rate::per_minute(1))
        .build::<String>()?;
    let _ = semaforo::cache::Cache::builder()
        .name("x")
        .on_event(f)
        .build::<String, String>()?;
    let _ = semaforo::degrade::Degrade::builder()
        .name("x")
        .on_event(f)
        .build()?;
    let _ = semaforo::chaos::Chaos::<u32>::builder()
        .name("x")
        .on_event(f)
        .build()?;
    let _ = semaforo::coalesce::CoalesceLayer::new(|s: &String| Some(s.clone()))
        .name("x")
        .on_event(f);
    Ok(())
}

// ---------------------------------------------------------------------------
// Redis fleet features (real time: Redis `TIME` is the clock; no sleeps).
// ---------------------------------------------------------------------------

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

/// README: "`redis::Budget` ... so 4 instances share one 30k TPM account".
/// Two instances (two backends) on one budget: the second sees what the first
/// spent.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_budget_shared_by_two_instances() -> Result<(), semaforo::BoxError> {
    use semaforo::pace::{Cost, Pace};
    use semaforo::redis::{Budget, Grant, RedisBackend};
    let Some(server) = redis_server::RedisServer::start() else {
        return Ok(());
    };
    let a = RedisBackend::connect(server.url()).await?;
    let b = RedisBackend::connect(server.url()).await?;
    let limits = || {
        Pace::builder()
            .tokens_per_minute(30_000)
            .max_wait(Duration::from_secs(1))
    };
    let ba = Budget::builder(&a, "openai", limits()).build()?;
    let bb = Budget::builder(&b, "openai", limits()).build()?;
    // The first instance spends the whole burst.
    let g = ba.reserve(None, &Cost::tokens(30_000)).await?;
    eprintln!("redis budget: first grant {g:?}");
    assert_eq!(g, Grant::Redis(Duration::ZERO));
    // The second is refused (a wait of ~4 s is past its 1 s max_wait).
    let r = bb.reserve(None, &Cost::tokens(2_000)).await.unwrap_err();
    eprintln!(
        "redis budget: second instance {r} / retry_after {:?}",
        r.retry_after()
    );
    assert_eq!(r.kind(), semaforo::RejectKind::BudgetExceeded);
    let ra = r.retry_after().expect("an exact retry_after");
    assert!(
        ra > Duration::from_millis(2_500) && ra <= Duration::from_secs(4),
        "{ra:?}"
    );
    Ok(())
}

/// A semaphore of 2 slots across two instances; the third acquire is refused
/// at once (default max_wait 0), a dropped lease gives its slot back.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_semaphore_two_slots() -> Result<(), semaforo::BoxError> {
    use semaforo::redis::{RedisBackend, Semaphore};
    let Some(server) = redis_server::RedisServer::start() else {
        return Ok(());
    };
    let a = RedisBackend::connect(server.url()).await?;
    let b = RedisBackend::connect(server.url()).await?;
    let sa = Semaphore::builder(&a, "gpu", 2).build()?;
    let sb = Semaphore::builder(&b, "gpu", 2).build()?;
    let l1 = sa.acquire().await?;
    let _l2 = sb.acquire().await?;
    let r = sa.acquire().await.unwrap_err();
    eprintln!(
        "redis semaphore full: {r} / {:?} retry_after {:?}",
        r.kind(),
        r.retry_after()
    );
    assert_eq!(r.kind(), semaforo::RejectKind::QueueFull);
    assert_eq!(sa.holders().await?, 2);
    drop(l1);
    // Released in the background: poll holders until it lands (bounded).
    let mut n = 2;
    for _ in 0..200 {
        n = sa.holders().await?;
        if n == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    eprintln!("redis semaphore after drop: {n} holders");
    let _l3 = sb.acquire().await?;
    Ok(())
}

/// README: "while Redis is away a `FailurePolicy` answers (`FailOpen`,
/// `FailClosed`, or `Local { share }`)".
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_failure_policies_when_redis_is_gone() -> Result<(), semaforo::BoxError> {
    use semaforo::pace::{Cost, Pace};
    use semaforo::redis::{Budget, FailurePolicy, Grant, RedisBackend};
    let Some(mut server) = redis_server::RedisServer::start() else {
        return Ok(());
    };
    let redis = RedisBackend::connect(server.url()).await?;
    let limits = || Pace::builder().requests_per_minute(60);
    let closed = Budget::builder(&redis, "closed", limits()).build()?;
    let open = Budget::builder(&redis, "open", limits())
        .failure_policy(FailurePolicy::FailOpen)
        .build()?;
    let local = Budget::builder(&redis, "local", limits())
        .failure_policy(FailurePolicy::Local { share: 0.5 })
        .build()?;
    assert_eq!(
        closed.reserve(None, &Cost::requests(1)).await?,
        Grant::Redis(Duration::ZERO)
    );
    server.stop();
    let t = std::time::Instant::now();
    let r = closed.reserve(None, &Cost::requests(1)).await.unwrap_err();
    eprintln!("FailClosed: {r} ({:?}) after {:?}", r.kind(), t.elapsed());
    assert_eq!(r.kind(), semaforo::RejectKind::BackendUnavailable);
    assert_eq!(open.reserve(None, &Cost::requests(1)).await?, Grant::Open);
    // Local: 30/min at share 0.5 — a burst of 30, then refused.
    let mut granted = 0;
    for _ in 0..40 {
        match local.reserve(None, &Cost::requests(1)).await {
            Ok(Grant::Local) => granted += 1,
            Ok(g) => panic!("unexpected {g:?}"),
            Err(e) => {
                eprintln!("Local refused after {granted}: {e}");
                break;
            }
        }
    }
    eprintln!("Local granted {granted}, total time {:?}", t.elapsed());
    Ok(())
}

/// README: "a shared tier in Redis (`redis::CacheTier`: the fleet pays once
/// through a fill lock; Redis trouble is a miss, never a failure)".
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_cache_tier_two_instances_pay_once() -> Result<(), semaforo::BoxError> {
    use semaforo::cache::Cache;
    use semaforo::llm::{LlmCache, LlmStack, Tier};
    use semaforo::redis::{CacheTier, RedisBackend};
    let Some(mut server) = redis_server::RedisServer::start() else {
        return Ok(());
    };
    let calls = Arc::new(AtomicU32::new(0));
    let client = {
        let calls = calls.clone();
        service_fn(move |_req: http::Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::io::Error>(http::Response::new(ok_body("plan"))) }
        })
    };
    let mut instances = Vec::new();
    for _ in 0..2 {
        let redis = RedisBackend::connect(server.url()).await?;
        let tier = CacheTier::builder(&redis, "plans")
            .ttl(Duration::from_secs(3_600))
            .build()?;
        let cache: LlmCache = Cache::builder().ttl(Duration::from_secs(600)).build()?;
        let stack = LlmStack::openai(Tier {
            requests_per_minute: 500,
            tokens_per_minute: 30_000,
        })
        .cache(cache)
        .cache_tier(tier)
        .build()?;
        instances.push(stack.layer().layer(client.clone()));
    }
    let body = r#"{"model":"gpt-4o-mini","temperature":0,"max_tokens":10,"messages":[{"role":"user","content":"agua"}]}"#;
    let r1 = instances[0].clone().oneshot(chat(body)).await?;
    let r2 = instances[1].clone().oneshot(chat(body)).await?;
    eprintln!(
        "tier: upstream calls {}, r2 served {:?} age {:?}",
        calls.load(Ordering::SeqCst),
        r2.extensions().get::<semaforo::share::Served>(),
        r2.headers().get("age")
    );
    assert_eq!(r1.status(), 200);
    assert_eq!(r2.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Redis gone: a miss, never a failure.
    server.stop();
    let other = r#"{"model":"gpt-4o-mini","temperature":0,"max_tokens":10,"messages":[{"role":"user","content":"fuego"}]}"#;
    let t = std::time::Instant::now();
    let r3 = instances[1].clone().oneshot(chat(other)).await?;
    eprintln!("tier down: status {} after {:?}", r3.status(), t.elapsed());
    assert_eq!(r3.status(), 200);
    Ok(())
}

/// The same `Local { share }` through the budget's layer (what the module
/// docs show): the local limiter holds `share` of the budget.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_local_policy_through_the_layer() -> Result<(), semaforo::BoxError> {
    use semaforo::pace::Pace;
    use semaforo::redis::{Budget, FailurePolicy, RedisBackend};
    let Some(mut server) = redis_server::RedisServer::start() else {
        return Ok(());
    };
    let redis = RedisBackend::connect(server.url()).await?;
    let budget = Budget::builder(
        &redis,
        "local-layer",
        Pace::builder()
            .requests_per_minute(60)
            .max_wait(Duration::from_millis(500)),
    )
    .failure_policy(FailurePolicy::Local { share: 0.5 })
    .build()?;
    let svc = budget
        .layer()
        .layer(service_fn(|_: ()| async { Ok::<_, std::io::Error>(()) }));
    server.stop();
    let mut ok = 0;
    let mut refused = None;
    for _ in 0..40 {
        match svc.clone().oneshot(()).await {
            Ok(()) => ok += 1,
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    eprintln!("layer Local: {ok} admitted, then {refused:?}");
    assert!(ok <= 31, "{ok}");
    Ok(())
}

/// Route module docs: "A call whose earliest start is beyond [the deadline]
/// is refused at once (`BudgetExceeded` with the exact `retry_after`)".
#[tokio::test(start_paused = true)]
async fn route_deadline_refuses_at_once_with_retry_after() -> Result<(), semaforo::BoxError> {
    use semaforo::pace::{Cost, Pace};
    use semaforo::route::{Deployment, Router};
    let d = |name: &'static str| -> Result<_, semaforo::BoxError> {
        let pace = Pace::builder().tokens_per_minute(30_000).build()?;
        let client = service_fn(move |_: u64| async move { Ok::<_, std::io::Error>(name) });
        let paced = pace.layer().weigh(|n: &u64| Cost::tokens(*n)).layer(client);
        Ok(Deployment::new(name, tower::util::BoxCloneSyncService::new(paced)).pace(pace))
    };
    let router = Router::builder()
        .deployment(d("a")?)
        .deployment(d("b")?)
        .weigh(|n: &u64| Cost::tokens(*n))
        .deadline(Duration::from_secs(10))
        .build()?;
    router.clone().oneshot(30_000).await?;
    router.clone().oneshot(30_000).await?;
    let t = tokio::time::Instant::now();
    let e = router.clone().oneshot(15_000).await.unwrap_err();
    let r = semaforo::Rejected::from_box(&e).expect("Rejected");
    eprintln!(
        "deadline: {e} after {:?}; retry_after {:?}",
        t.elapsed(),
        r.retry_after()
    );
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(r.kind(), semaforo::RejectKind::BudgetExceeded);
    // 15,000 tokens at 500/s: 30 s; minus the 10 s deadline → 20 s?
    assert!(r.retry_after().is_some());
    Ok(())
}

/// README: degradation "by rules over our own signals (breaker open, line
/// above X %, pacer wait above Y, adaptive limit below Z)" — wired to the LLM
/// preset's parts.
#[tokio::test(start_paused = true)]
async fn degrade_signals_from_llm_preset() -> Result<(), semaforo::BoxError> {
    use semaforo::degrade::{self, Degrade, Level, Rule};
    use semaforo::llm::{LlmStack, Tier};
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()?;
    // The pacer of one model: `stack.pace()` is a KeyedPace; `pace_wait_above`
    // takes a `Pace`.
    let model_pace = stack.pace().get(Some("gpt-4o-mini"));
    let switch = Degrade::builder()
        .rule(Rule::new(
            Level::Reduced,
            degrade::pace_wait_above(&model_pace, Duration::from_secs(10)),
        ))
        .rule(Rule::new(
            Level::Minimal,
            degrade::line_above(stack.bulkhead(), 0.8),
        ))
        .build()?;
    assert_eq!(switch.evaluate(), Level::Normal);
    // Spend the model's tokens through the stack.
    let client = service_fn(|_req: http::Request<Bytes>| async {
        let body = r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":9000,"total_tokens":9010}}"#;
        Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(body.as_bytes())))
    });
    let llm = stack.layer().layer(client);
    for _ in 0..3 {
        let _ = llm
            .clone()
            .oneshot(chat(r#"{"model":"gpt-4o-mini","max_tokens":9000,"messages":[{"role":"user","content":"x"}]}"#))
            .await?;
    }
    let lvl = switch.evaluate();
    eprintln!(
        "degrade from pacer: {lvl:?}; model pacer snapshot {:?}",
        model_pace.snapshot()
    );
    assert_eq!(lvl, Level::Reduced);
    Ok(())
}

/// Coalesce docs: errors are shared; `Rejected::find` / classifiers see
/// through `SharedError`.
#[tokio::test(start_paused = true)]
async fn coalesce_shares_errors_and_classifier_sees_through() -> Result<(), semaforo::BoxError> {
    use semaforo::classify::{classify_error, Class};
    use semaforo::coalesce::CoalesceLayer;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let svc =
        CoalesceLayer::new(|t: &String| Some(t.clone())).layer(service_fn(move |_: String| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Err::<String, _>(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
            }
        }));
    let out = futures::future::join_all((0..5).map(|_| svc.clone().oneshot("x".to_string()))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    for o in out {
        let e = o.unwrap_err();
        let class = classify_error(&*e);
        assert!(matches!(class, Class::Infrastructure), "{class:?} for {e}");
    }
    Ok(())
}

/// The LLM router's health: `Router::register_health` on an `LlmRouter`.
#[tokio::test(start_paused = true)]
async fn llm_router_health() -> Result<(), semaforo::BoxError> {
    use semaforo::health::Health;
    use semaforo::llm::{LlmDeployment, LlmStack, Tier};
    use semaforo::shutdown::Shutdown;
    let client = service_fn(|_req: http::Request<Bytes>| async {
        Ok::<_, std::io::Error>(http::Response::new(ok_body("hi")))
    });
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    };
    let shutdown = Shutdown::new();
    let router = LlmStack::router()
        .shutdown(shutdown.clone())
        .deployment(LlmDeployment::new("a", LlmStack::openai(tier), client))
        .deployment(LlmDeployment::new("b", LlmStack::openai(tier), client))
        .build()?;
    let health = router.register_health(Health::new(&shutdown), "llm");
    let names: Vec<(String, &str)> = health
        .report()
        .components
        .into_iter()
        .map(|c| (c.name, c.kind))
        .collect();
    eprintln!("router health: {names:?}");
    assert!(names.iter().any(|(n, _)| n.starts_with("llm/a")));
    Ok(())
}

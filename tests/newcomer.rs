//! A newcomer's first use of fallback, degrade and chaos, from the docs only.

use bytes::Bytes;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

// ---------------------------------------------------------------------------
// Task 1: LLM preset + cache + stale_if_error; upstream 529 after a success.
// ---------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn llm_stale_if_error_serves_last_good_answer() -> Result<(), semaforo::BoxError> {
    use semaforo::cache::Cache;
    use semaforo::fallback::FellBack;
    use semaforo::llm::{LlmCache, LlmStack, Tier};

    let calls = Arc::new(AtomicU32::new(0));
    let client = service_fn({
        let calls = calls.clone();
        move |_req: http::Request<Bytes>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    let body = r#"{"choices":[{"message":{"content":"the good answer"}}],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#;
                    Ok::<_, std::io::Error>(
                        http::Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(Bytes::from_static(body.as_bytes()))
                            .unwrap(),
                    )
                } else {
                    let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
                    Ok(http::Response::builder()
                        .status(529)
                        .header("content-type", "application/json")
                        .body(Bytes::from_static(body.as_bytes()))
                        .unwrap())
                }
            }
        }
    });

    let cache: LlmCache = Cache::builder()
        .ttl(Duration::from_secs(5))
        .stale_for(Duration::from_secs(86_400))
        .build()?;
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .cache(cache)
    .stale_if_error(true)
    .build()?;
    let mut llm = ServiceBuilder::new().layer(stack.layer()).service(client);

    let req = || {
        http::Request::post("/v1/chat/completions")
            .body(Bytes::from_static(
                br#"{"model":"gpt-4o-mini","temperature":0,"max_tokens":100,"messages":[{"role":"user","content":"hola"}]}"#,
            ))
            .unwrap()
    };

    let first = llm.ready().await?.call(req()).await?;
    assert_eq!(first.status(), 200);
    assert!(first.extensions().get::<FellBack>().is_none());
    let good = first.body().clone();

    // Past the TTL, so the cache does not answer fresh.
    tokio::time::sleep(Duration::from_secs(10)).await;

    let t = tokio::time::Instant::now();
    let second = llm.ready().await?.call(req()).await?;
    eprintln!(
        "stale answer after {:?}, {} upstream calls, extensions: {:?}, headers: {:?}",
        t.elapsed(),
        calls.load(Ordering::SeqCst),
        second.extensions(),
        second.headers()
    );
    assert_eq!(
        second.status(),
        200,
        "expected the stale answer, got {second:?}"
    );
    assert_eq!(second.body(), &good);
    let fell = second
        .extensions()
        .get::<FellBack>()
        .expect("marked as a fallback");
    assert!(
        matches!(fell.class, semaforo::classify::Class::Overloaded { .. }),
        "{:?}",
        fell.class
    );
    assert!(matches!(
        second.extensions().get::<semaforo::share::Served>(),
        Some(semaforo::share::Served::Cache { stale: true, .. })
    ));
    assert!(second.headers().contains_key("age"));
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the upstream was asked again"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Task 2: an axum handler reading the degradation level; breaker open 5 s.
// ---------------------------------------------------------------------------
async fn lesson(axum::Extension(level): axum::Extension<semaforo::degrade::Level>) -> &'static str {
    use semaforo::degrade::Level;
    match level {
        Level::Normal => "full lesson plan with exercises",
        Level::Reduced | Level::Minimal => "short lesson plan",
    }
}

#[tokio::test(start_paused = true)]
async fn degrade_reduced_after_breaker_open_for_5s() -> Result<(), semaforo::BoxError> {
    use semaforo::breaker::Breaker;
    use semaforo::degrade::{self, Degrade, DegradeLayer, Level, Rule};

    let breaker = Breaker::builder().build()?;
    let t0 = tokio::time::Instant::now();
    let switch = Degrade::builder()
        .on_event(move |e| eprintln!("t={:?} {:?}", t0.elapsed(), e.kind))
        .rule(
            Rule::new(Level::Reduced, degrade::breaker_open(&breaker))
                .after(Duration::from_secs(5)),
        )
        .build()?;
    let _task = switch.spawn()?;

    let app = axum::Router::new()
        .route("/lesson", axum::routing::get(lesson))
        .layer(DegradeLayer::new(&switch));

    let get = |app: axum::Router| async move {
        let res = app
            .oneshot(
                http::Request::get("/lesson")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let header = res
            .headers()
            .get("x-degrade-level")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (String::from_utf8(body.to_vec()).unwrap(), header)
    };

    assert_eq!(get(app.clone()).await.0, "full lesson plan with exercises");

    // Open it the real way: 5 consecutive upstream failures (the default
    // policy); `force_open()` works too (see the last test).
    let mut upstream = breaker.layer().layer(service_fn(|_: ()| async {
        Err::<(), _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }));
    for _ in 0..5 {
        let _ = upstream.ready().await?.call(()).await;
    }
    assert_eq!(breaker.state(), semaforo::observe::BreakerState::Open);
    eprintln!("t={:?} breaker open", t0.elapsed());
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    assert_eq!(switch.level(), Level::Normal, "not yet 5 s");
    assert_eq!(get(app.clone()).await.0, "full lesson plan with exercises");

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(switch.level(), Level::Reduced);
    let (body, header) = get(app.clone()).await;
    assert_eq!(body, "short lesson plan");
    assert_eq!(header.as_deref(), Some("reduced"));
    Ok(())
}

// ---------------------------------------------------------------------------
// Task 3: chaos injects 10 % 429s with Retry-After; retry makes every call succeed.
// ---------------------------------------------------------------------------
#[tokio::test(start_paused = true)]
async fn chaos_429s_are_retried() -> Result<(), semaforo::BoxError> {
    use semaforo::chaos::{rate_limited, Chaos, Fault};
    use semaforo::retry::Retry;

    let chaos = Chaos::builder()
        .seed(42)
        .fault(Fault::respond(rate_limited::<Bytes>(Duration::from_secs(2))).rate(0.1))
        .build()?;
    // 5 attempts: with 10 % 429s, 5 in a row is 1 call in 100,000 (3, the
    // default, is 1 in 1,000: over 200 calls a seed may meet it).
    let retry = Retry::builder().max_attempts(5).build()?;
    let retry_layer = retry.layer().classify(semaforo::classify::HttpClassifier);

    let upstream = service_fn(|_req: &'static str| async {
        Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(b"ok")))
    });
    let mut svc = ServiceBuilder::new()
        .layer(retry_layer)
        .layer(chaos.layer())
        .service(upstream);

    chaos.enable();
    let t = tokio::time::Instant::now();
    for i in 0..200 {
        let res = svc.ready().await?.call("hi").await?;
        assert_eq!(res.status(), 200, "call {i}");
    }
    assert!(chaos.calls() > 200, "some 429s were injected");
    assert!(retry.retries() > 0);
    eprintln!(
        "{} chaos calls, {} retries, {:?} elapsed",
        chaos.calls(),
        retry.retries(),
        t.elapsed()
    );
    // Each retry waited at least the injected Retry-After (2 s).
    assert!(t.elapsed() >= Duration::from_secs(2) * retry.retries() as u32);
    Ok(())
}

// ---------------------------------------------------------------------------
// Task 4: a plain (non-http) fallback to a fixed string.
// ---------------------------------------------------------------------------
#[tokio::test]
async fn plain_fallback_to_fixed_string() {
    use semaforo::fallback::{self, FallbackLayer};

    let upstream = service_fn(|_: String| async {
        Err::<String, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    });
    let svc = FallbackLayer::new(fallback::value("sorry, try later".to_string())).layer(upstream);
    assert_eq!(
        svc.oneshot("hello".to_string()).await.unwrap(),
        "sorry, try later"
    );
}

/// `degrade::breaker_open` holds for a forced-open breaker (a newcomer's
/// finding: it did not, as `Breaker::state()` reports the state machine's
/// `Closed` while `force_open()` refuses every call).
#[tokio::test(start_paused = true)]
async fn forced_open_breaker_flips_the_level() -> Result<(), semaforo::BoxError> {
    use semaforo::breaker::Breaker;
    use semaforo::degrade::{self, Degrade, Level, Rule};
    let breaker = Breaker::builder().build()?;
    let switch = Degrade::builder()
        .rule(Rule::new(Level::Reduced, degrade::breaker_open(&breaker)))
        .build()?;
    breaker.force_open();
    let mut svc = breaker
        .layer()
        .layer(service_fn(|_: ()| async { Ok::<_, std::io::Error>(()) }));
    assert!(
        svc.ready().await?.call(()).await.is_err(),
        "forced open refuses"
    );
    // `state()` is the state machine's (documented); the mode says forced.
    assert_eq!(breaker.snapshot().mode, semaforo::breaker::Mode::ForcedOpen);
    assert_eq!(switch.evaluate(), Level::Reduced);
    Ok(())
}

#[tokio::test]
async fn plain_fallback_variants() {
    use semaforo::fallback::{self, FallbackLayer, FellBack};

    let upstream = service_fn(|_: String| async {
        Err::<String, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    });
    let svc = FallbackLayer::new(fallback::from_fn(|f| {
        Ok(format!("fallback after {:?}", f.class()))
    }))
    .when(|f: &fallback::Failure<'_>| f.class().is_upstream_failure())
    .mark(|res: &mut String, _f: &FellBack| res.push_str(" [fallback]"))
    .layer(upstream);
    let out = svc.oneshot("hello".to_string()).await.unwrap();
    eprintln!("{out}");
    assert!(out.ends_with("[fallback]"));
}

//! The LLM router preset (`LlmStack::router` / `stream_router`) on paused
//! time: streams fail over until their first chunk and never after, a
//! context-length error falls back once to a renamed long-context model,
//! a deployment that starts answering 529 is left within its breaker's
//! threshold and gets its traffic back within `open_for`, and every
//! attempt is told as an event.
#![cfg(feature = "llm")]

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use semaforo::classify::Permanent;
use semaforo::health::Health;
use semaforo::llm::{LlmDeployment, LlmStack, Tier};
use semaforo::observe::{EventKind, RouteReason};
use semaforo::shutdown::Shutdown;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{service_fn, ServiceExt};

const TIER: Tier = Tier {
    requests_per_minute: 500,
    tokens_per_minute: 30_000,
};

const OVERLOADED: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
const OK: &str =
    r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#;

fn chat(stream: bool) -> http::Request<Bytes> {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"max_tokens":100,"messages":[{{"role":"user","content":"hola"}}]}}"#
    );
    http::Request::post("/v1/chat/completions")
        .body(Bytes::from(body))
        .expect("a request")
}

type Frames = futures::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, Infallible>>;

/// A streaming client: the events given, one per 100 ms (the first at once).
fn streaming(
    events: Vec<&'static str>,
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    http::Request<Bytes>,
    Response = http::Response<StreamBody<Frames>>,
    Error = std::io::Error,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: http::Request<Bytes>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let events = events.clone();
        async move {
            let frames = futures::stream::iter(events.into_iter().enumerate())
                .then(|(i, e)| async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(e.as_bytes())))
                })
                .boxed();
            Ok::<_, std::io::Error>(http::Response::new(StreamBody::new(frames)))
        }
    })
}

/// A stream whose first event is an error (Anthropic's `overloaded_error`
/// after its 200) fails over: the caller reads the other deployment's
/// stream, whole. A stream that fails after its first chunk reaches the
/// caller with its error, and is never retried.
#[tokio::test(start_paused = true)]
async fn a_stream_fails_over_until_its_first_chunk_and_never_after() {
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let error_first = vec!["event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"];
    let good = vec![
        "data: {\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"la\"}}]}\n\n",
        "data: [DONE]\n\n",
    ];
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let router = LlmStack::stream_router()
        .on_event({
            let events = events.clone();
            move |e| {
                if let EventKind::Routed {
                    why: RouteReason::FailedOver { from, class },
                    ..
                } = &e.kind
                {
                    events
                        .lock()
                        .unwrap()
                        .push(format!("{from} {}", class.as_str()));
                }
            }
        })
        .deployment(LlmDeployment::streaming(
            "a",
            LlmStack::openai(TIER),
            streaming(error_first, a_calls.clone()),
        ))
        .deployment(
            LlmDeployment::streaming(
                "b",
                LlmStack::openai(TIER),
                streaming(good.clone(), b_calls.clone()),
            )
            .weight(1),
        )
        .build()
        .unwrap();
    // Ties go by weight; A (the first, same weight) is tried first at least
    // once in two calls: call until A has been tried.
    let mut texts = Vec::new();
    for _ in 0..2 {
        let res = router.clone().oneshot(chat(true)).await.unwrap();
        assert_eq!(res.status(), 200);
        texts.push(res.into_body().collect().await.unwrap().to_bytes());
    }
    let whole: Bytes = good.concat().into();
    assert_eq!(texts, [whole.clone(), whole]);
    let (a, b) = (
        a_calls.load(Ordering::SeqCst),
        b_calls.load(Ordering::SeqCst),
    );
    assert!(a >= 1, "A was tried");
    assert_eq!(b, 2, "B answered both");
    // Each of A's error events failed the attempt over, as overloaded.
    let failed_over = events.lock().unwrap().clone();
    assert_eq!(failed_over.len(), a, "{failed_over:?}");
    assert!(
        failed_over.iter().all(|w| w == "a overloaded"),
        "{failed_over:?}"
    );

    // After the first chunk: the error reaches the caller, one call only.
    let calls = Arc::new(AtomicUsize::new(0));
    let late_error = vec![
        "data: {\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\n",
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    ];
    let other = Arc::new(AtomicUsize::new(0));
    let router = LlmStack::stream_router()
        .deployment(LlmDeployment::streaming(
            "late",
            LlmStack::openai(TIER),
            streaming(late_error, calls.clone()),
        ))
        .deployment(
            LlmDeployment::streaming(
                "other",
                LlmStack::openai(TIER),
                streaming(good, other.clone()),
            )
            .group("elsewhere"),
        )
        .build()
        .unwrap();
    let res = router.clone().oneshot(chat(true)).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {\"choices\""));
    // hyper's way: stop at is_end_stream, else read on.
    let mut failed = None;
    while !http_body::Body::is_end_stream(&body) {
        match body.frame().await {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                failed = Some(e);
                break;
            }
            None => break,
        }
    }
    let e = failed.expect("the stream's error reached the caller");
    assert!(e.to_string().contains("overloaded"), "{e}");
    assert_eq!(
        (calls.load(Ordering::SeqCst), other.load(Ordering::SeqCst)),
        (1, 0)
    );
}

/// A 529 status before any chunk fails over like a whole answer.
#[tokio::test(start_paused = true)]
async fn a_stream_answered_529_fails_over() {
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = {
        let calls = a_calls.clone();
        service_fn(move |_req: http::Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let frames: Frames = futures::stream::iter([Ok(http_body::Frame::data(
                    Bytes::from_static(OVERLOADED.as_bytes()),
                ))])
                .boxed();
                Ok::<_, std::io::Error>(
                    http::Response::builder()
                        .status(529)
                        .body(StreamBody::new(frames))
                        .unwrap(),
                )
            }
        })
    };
    let router = LlmStack::stream_router()
        .deployment(LlmDeployment::streaming("a", LlmStack::openai(TIER), a).weight(1_000))
        .deployment(LlmDeployment::streaming(
            "b",
            LlmStack::openai(TIER),
            streaming(vec!["data: [DONE]\n\n"], b_calls.clone()),
        ))
        .build()
        .unwrap();
    let res = router.oneshot(chat(true)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "data: [DONE]\n\n"
    );
    assert_eq!(
        (
            a_calls.load(Ordering::SeqCst),
            b_calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
}

/// A context-length 400 from the small model: exactly one more call, to
/// the long-context group, whose deployment serves another model name (the
/// body it receives says so); the events tell both attempts and why.
#[tokio::test(start_paused = true)]
async fn a_context_length_error_falls_back_to_a_renamed_long_context_model() {
    let too_long = r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    let small_calls = Arc::new(AtomicUsize::new(0));
    let small = {
        let calls = small_calls.clone();
        service_fn(move |_req: http::Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, std::io::Error>(
                    http::Response::builder()
                        .status(400)
                        .body(Bytes::from_static(too_long.as_bytes()))
                        .unwrap(),
                )
            }
        })
    };
    let seen = Arc::new(Mutex::new(Vec::<(String, Option<String>)>::new()));
    let long = {
        let seen = seen.clone();
        service_fn(move |req: http::Request<Bytes>| {
            let v: serde_json::Value = serde_json::from_slice(req.body()).unwrap();
            let key = req
                .headers()
                .get("api-key")
                .map(|v| v.to_str().unwrap().to_owned());
            seen.lock()
                .unwrap()
                .push((v["model"].as_str().unwrap().to_owned(), key));
            async move {
                Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(OK.as_bytes())))
            }
        })
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let router = LlmStack::router()
        .name("chat")
        .deployment(LlmDeployment::new("small", LlmStack::openai(TIER), small))
        .deployment(
            LlmDeployment::new("long", LlmStack::azure_openai(60_000), long)
                .group("long-context")
                .model("gpt-4.1")
                .map_request(|req| {
                    req.headers_mut()
                        .insert("api-key", http::HeaderValue::from_static("k2"));
                }),
        )
        .fallback(Permanent::ContextLengthExceeded, "long-context")
        .on_event({
            let events = events.clone();
            move |e| {
                if let EventKind::Routed {
                    deployment,
                    attempt,
                    why,
                } = &e.kind
                {
                    events
                        .lock()
                        .unwrap()
                        .push((deployment.to_string(), *attempt, why.as_str()));
                }
            }
        })
        .build()
        .unwrap();
    let res = router.clone().oneshot(chat(false)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(small_calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        *seen.lock().unwrap(),
        [("gpt-4.1".to_owned(), Some("k2".to_owned()))]
    );
    assert_eq!(
        *events.lock().unwrap(),
        [
            ("small".to_owned(), 1, "first"),
            ("long".to_owned(), 2, "fell_back")
        ]
    );
    // The long deployment's pacer charged the renamed model.
    let keys = router.deployments()[1].pacer().unwrap().keys();
    assert_eq!(keys, ["gpt-4.1"]);
    // Both deployments in a health report, by name.
    let health = router.register_health(Health::new(&Shutdown::new()), "chat");
    let names: Vec<String> = health
        .report()
        .components
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(names.contains(&"chat/small".to_owned()), "{names:?}");
    assert!(names.contains(&"chat/long/gpt-4.1".to_owned()), "{names:?}");
}

/// A answers 529 from t = 10 s to t = 40 s, B always 200; one call a
/// second for 2 minutes. Every call succeeds; the failures that reach A
/// are exactly its breaker's threshold (5, calls one at a time), each
/// failed over to B; once A answers again, traffic returns to it within
/// `open_for` (30 s) plus its jitter (10 %) of the trip.
#[tokio::test(start_paused = true)]
async fn a_deployment_that_overloads_is_left_then_gets_its_traffic_back() {
    let t0 = Instant::now();
    let a_log = Arc::new(Mutex::new(Vec::<(Duration, u16)>::new()));
    let a = {
        let log = a_log.clone();
        service_fn(move |_req: http::Request<Bytes>| {
            let at = t0.elapsed();
            let down = at >= Duration::from_secs(10) && at < Duration::from_secs(40);
            let status = if down { 529 } else { 200 };
            log.lock().unwrap().push((at, status));
            async move {
                let body = if down { OVERLOADED } else { OK };
                Ok::<_, std::io::Error>(
                    http::Response::builder()
                        .status(status)
                        .body(Bytes::from_static(body.as_bytes()))
                        .unwrap(),
                )
            }
        })
    };
    let b_calls = Arc::new(AtomicUsize::new(0));
    let b = {
        let calls = b_calls.clone();
        service_fn(move |_req: http::Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(OK.as_bytes())))
            }
        })
    };
    let router = LlmStack::router()
        .deployment(LlmDeployment::new("a", LlmStack::openai(TIER), a))
        .deployment(LlmDeployment::new("b", LlmStack::openai(TIER), b))
        .build()
        .unwrap();
    for _ in 0..120 {
        let res = router.clone().oneshot(chat(false)).await.unwrap();
        assert_eq!(res.status(), 200);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let log = a_log.lock().unwrap().clone();
    let failures: Vec<Duration> = log
        .iter()
        .filter(|(_, s)| *s == 529)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(failures.len(), 5, "the breaker's threshold: {failures:?}");
    let trip = *failures.last().unwrap();
    let back = log
        .iter()
        .find(|(t, s)| *t > trip && *s == 200)
        .map(|(t, _)| *t)
        .expect("traffic returned to A");
    println!(
        "A tripped at {trip:?}, back at {back:?}; B answered {}",
        b_calls.load(Ordering::SeqCst)
    );
    // Open for 30 s ± 10 %, then the next call (one a second) probes it;
    // A answers 200 again from t = 40 s.
    let latest =
        (trip + Duration::from_secs(33)).max(Duration::from_secs(40)) + Duration::from_secs(1);
    assert!(back <= latest, "back at {back:?}, later than {latest:?}");
    // After that, A takes calls again (about half of the rest).
    let after = log.iter().filter(|(t, _)| *t > back).count();
    assert!(after >= 30, "A got {after} calls after it recovered");
}

/// A streamed request too long for the small model: its 400 (a JSON error
/// body, not a stream) is read whole and classified by its body, so the
/// call falls back once to the long-context deployment, renamed.
#[tokio::test(start_paused = true)]
async fn a_streamed_context_length_error_falls_back() {
    let too_long = r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    let small_calls = Arc::new(AtomicUsize::new(0));
    let small = {
        let calls = small_calls.clone();
        service_fn(move |_req: http::Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let frames: Frames = futures::stream::iter([Ok(http_body::Frame::data(
                    Bytes::from_static(too_long.as_bytes()),
                ))])
                .boxed();
                Ok::<_, std::io::Error>(
                    http::Response::builder()
                        .status(400)
                        .body(StreamBody::new(frames))
                        .unwrap(),
                )
            }
        })
    };
    let long_calls = Arc::new(AtomicUsize::new(0));
    let router = LlmStack::stream_router()
        .deployment(LlmDeployment::streaming(
            "small",
            LlmStack::openai(TIER),
            small,
        ))
        .deployment(
            LlmDeployment::streaming(
                "long",
                LlmStack::openai(TIER),
                streaming(vec!["data: [DONE]\n\n"], long_calls.clone()),
            )
            .group("long-context")
            .model("gpt-4.1"),
        )
        .fallback(Permanent::ContextLengthExceeded, "long-context")
        .build()
        .unwrap();
    let res = router.oneshot(chat(true)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "data: [DONE]\n\n"
    );
    assert_eq!(
        (
            small_calls.load(Ordering::SeqCst),
            long_calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
}

/// Each preset deployment's bulkhead counts: A (weight 1,000) answers in
/// 20 s, B in 1 s, both with 2 permits; 20 calls at once. Once A's permits
/// are taken, calls go to B's line while its wait (callers ahead × 1 s / 2)
/// is shorter than A's (× 20 s / 2): A gets 2, B 18, and every call on B
/// ends within 9 s.
#[tokio::test(start_paused = true)]
async fn a_full_bulkhead_makes_a_deployment_later() {
    use semaforo::bulkhead::Bulkhead;
    let answer_after = |secs: u64, calls: Arc<AtomicUsize>| {
        service_fn(move |_req: http::Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(OK.as_bytes())))
            }
        })
    };
    // Each bulkhead's service time as configured (a bulkhead also learns
    // it from the calls admitted from its line).
    let two = |name: &str, secs: u64| {
        Bulkhead::builder(2)
            .name(name)
            .max_queue(100)
            .expected_service_time(Duration::from_secs(secs))
            .build()
            .unwrap()
    };
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let router = LlmStack::router()
        .deployment(
            LlmDeployment::new(
                "a",
                LlmStack::openai(TIER).bulkhead(two("a", 20)),
                answer_after(20, a_calls.clone()),
            )
            .weight(1_000),
        )
        .deployment(LlmDeployment::new(
            "b",
            LlmStack::openai(TIER).bulkhead(two("b", 1)),
            answer_after(1, b_calls.clone()),
        ))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let call = router.clone().oneshot(chat(false));
        tasks.push(tokio::spawn(call));
        tokio::task::yield_now().await;
    }
    let mut slowest_b = Duration::ZERO;
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        if t0.elapsed() < Duration::from_secs(20) {
            slowest_b = slowest_b.max(t0.elapsed());
        }
    }
    assert_eq!(
        (
            a_calls.load(Ordering::SeqCst),
            b_calls.load(Ordering::SeqCst)
        ),
        (2, 18)
    );
    assert!(slowest_b <= Duration::from_secs(9), "{slowest_b:?}");
}

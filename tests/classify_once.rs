//! Classify once: a result is classified by the innermost classifying layer and
//! its class carried outward; retry, breaker and pacer never parse an error
//! body a second time.

use bytes::Bytes;
use semaforo::breaker::Breaker;
use semaforo::classify::{Class, Classified, Classify, LlmClassifier, Permanent};
use semaforo::llm::{LlmStack, Tier};
use semaforo::pace::Pace;
use semaforo::retry::Retry;
use semaforo::BoxError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::{service_fn, ServiceBuilder, ServiceExt};

/// [`LlmClassifier`], counting the results it classifies from scratch
/// (`parsed`) and the ones it reads back from an inner layer (`carried`).
#[derive(Clone, Default)]
struct Counting {
    parsed: Arc<AtomicUsize>,
    carried: Arc<AtomicUsize>,
}

impl Classify<http::Response<Bytes>, BoxError> for Counting {
    fn classify(&self, result: Result<&http::Response<Bytes>, &BoxError>) -> Class {
        self.parsed.fetch_add(1, Ordering::Relaxed);
        LlmClassifier::new().classify(result)
    }

    fn classify_and_carry(&self, result: Result<&mut http::Response<Bytes>, &BoxError>) -> Class {
        match &result {
            Ok(res) if Classified::of(res).is_some() => &self.carried,
            _ => &self.parsed,
        }
        .fetch_add(1, Ordering::Relaxed);
        LlmClassifier::new().classify_and_carry(result)
    }
}

const OVERLOADED: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

fn answering(status: u16, body: &'static str) -> impl Fn(http::Request<Bytes>) -> ResFut + Clone {
    move |_req| {
        Box::pin(async move {
            Ok(http::Response::builder()
                .status(status)
                .body(Bytes::from_static(body.as_bytes()))?)
        })
    }
}

type ResFut = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<http::Response<Bytes>, BoxError>> + Send>,
>;

#[tokio::test(start_paused = true)]
async fn a_failed_call_is_parsed_once_per_attempt_through_retry_breaker_and_pacer() {
    let counting = Counting::default();
    let retry = Retry::builder().max_attempts(3).build().unwrap();
    let breaker = Breaker::builder()
        .consecutive_failures(100)
        .build()
        .unwrap();
    let pace = Pace::builder().requests_per_minute(6_000).build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(retry.layer().classify(counting.clone()))
        .layer(breaker.layer().classify(counting.clone()))
        .layer(pace.layer().classify(counting.clone()))
        .service(service_fn(answering(529, OVERLOADED)));
    let res = svc.oneshot(http::Request::new(Bytes::new())).await.unwrap();
    assert_eq!(res.status(), 529);
    // 3 attempts: the pacer parses each one; the breaker and retry read it.
    assert_eq!(counting.parsed.load(Ordering::Relaxed), 3);
    assert_eq!(counting.carried.load(Ordering::Relaxed), 6);
    assert_eq!(
        Classified::of(&res),
        Some(Class::Overloaded { retry_after: None })
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_is_not_recorded() {
    let counting = Counting::default();
    let retry = Retry::builder().max_attempts(3).build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(retry.layer().classify(counting.clone()))
        .service(service_fn(answering(200, "{}")));
    let res = svc.oneshot(http::Request::new(Bytes::new())).await.unwrap();
    assert_eq!(Classified::of(&res), None);
    assert!(res.extensions().is_empty(), "nothing allocated on success");
}

/// A success the body-reading classifier had to scan for an `error` key is
/// scanned once when the response already carries extensions (as the LLM
/// preset's do): the layers outside read its record.
#[tokio::test(start_paused = true)]
async fn a_scanned_success_is_carried_when_extensions_are_there() {
    let counting = Counting::default();
    let retry = Retry::builder().max_attempts(3).build().unwrap();
    let breaker = Breaker::builder().consecutive_failures(1).build().unwrap();
    let pace = Pace::builder().requests_per_minute(6_000).build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(retry.layer().classify(counting.clone()))
        .layer(breaker.layer().classify(counting.clone()))
        .layer(pace.layer().classify(counting.clone()))
        .service(service_fn(|_req: http::Request<Bytes>| async {
            let mut res = http::Response::new(Bytes::from_static(br#"{"error":null,"id":"1"}"#));
            res.extensions_mut().insert(7u8);
            Ok::<_, BoxError>(res)
        }));
    let res = svc.oneshot(http::Request::new(Bytes::new())).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(counting.parsed.load(Ordering::Relaxed), 1);
    assert_eq!(counting.carried.load(Ordering::Relaxed), 2);
    assert_eq!(Classified::of(&res), Some(Class::Success));
}

#[tokio::test(start_paused = true)]
async fn a_different_classifier_outside_classifies_on_its_own() {
    // The pacer's status-only classifier records a 400 as a bad request; the
    // breaker's body-reading classifier must not take that for its own: the
    // body says the upstream is overloaded, an upstream failure.
    let breaker = Breaker::builder().consecutive_failures(1).build().unwrap();
    let pace = Pace::builder().requests_per_minute(6_000).build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(breaker.layer().classify(LlmClassifier::new()))
        .layer(pace.layer().classify(semaforo::classify::HttpClassifier))
        .service(service_fn(answering(400, OVERLOADED)));
    let res = svc.oneshot(http::Request::new(Bytes::new())).await.unwrap();
    // The breaker classified on its own, and its class replaced the pacer's.
    assert_eq!(
        Classified::of(&res),
        Some(Class::Overloaded { retry_after: None })
    );
    assert_eq!(
        breaker.snapshot().state,
        semaforo::breaker::BreakerState::Open
    );
}

#[tokio::test(start_paused = true)]
async fn the_preset_hands_the_caller_the_class_with_its_reason() {
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()
    .unwrap();
    let context = r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let client = service_fn(move |_req: http::Request<Bytes>| {
        seen.fetch_add(1, Ordering::Relaxed);
        async move {
            Ok::<_, BoxError>(
                http::Response::builder()
                    .status(400)
                    .body(Bytes::from_static(context.as_bytes()))?,
            )
        }
    });
    let llm = ServiceBuilder::new().layer(stack.layer()).service(client);
    let req = http::Request::post("/v1/chat/completions")
        .body(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[]}"#,
        ))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(1), llm.oneshot(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 1, "permanent: never retried");
    assert_eq!(
        Classified::of(&res),
        Some(Class::Permanent {
            reason: Permanent::ContextLengthExceeded
        })
    );
}

/// A layer in between that rewrites the status (a fallback answering 200 for
/// a 503) makes the inner record stale: the outer layer classifies the
/// response it sees (found by an outside attacker).
#[tokio::test(start_paused = true)]
async fn a_rewritten_status_is_classified_again() {
    use semaforo::breaker::BreakerState;
    use semaforo::classify::HttpClassifier;
    let outer = Breaker::builder().consecutive_failures(1).build().unwrap();
    let inner = Breaker::builder()
        .consecutive_failures(100)
        .build()
        .unwrap();
    let upstream = service_fn(|_: ()| async {
        Ok::<_, std::io::Error>(http::Response::builder().status(503).body(()).unwrap())
    });
    let svc = ServiceBuilder::new()
        .layer(outer.layer().classify(HttpClassifier))
        .map_response(|mut r: http::Response<()>| {
            *r.status_mut() = http::StatusCode::OK;
            r
        })
        .layer(inner.layer().classify(HttpClassifier))
        .service(upstream);
    let res = svc.oneshot(()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(outer.state(), BreakerState::Closed, "a 200 is a success");
    assert_eq!(Classified::of(&res), None, "the 503's record is stale");
    // And a 500 turned into a 400 is read as the 400 it is now.
    let mut res = http::Response::builder().status(500).body(()).unwrap();
    HttpClassifier.classify_and_carry(Ok::<_, &std::io::Error>(&mut res));
    *res.status_mut() = http::StatusCode::BAD_REQUEST;
    assert_eq!(
        HttpClassifier.classify_and_carry(Ok::<_, &std::io::Error>(&mut res)),
        Class::Permanent {
            reason: Permanent::InvalidRequest
        }
    );
}

//! The streaming preset over real HTTP against the mock's SSE answers: the
//! bulkhead slot is held until the last chunk, the pacer is reconciled with the
//! stream's `usage`, and a failure mid-stream reaches the breaker.

#[path = "../examples/common/http_client.rs"]
mod http_client;
#[path = "../examples/common/mock_provider.rs"]
mod mock_provider;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_client::{HttpClient, StreamingClient};
use mock_provider::{MockConfig, MockProvider, Stats};
use semaforo::bulkhead::Bulkhead;
use semaforo::llm::{LlmStack, Tier};
use semaforo::pace::Pace;
use tower::{Service, ServiceBuilder, ServiceExt};

const SCALE: f64 = 20.0;

fn streamed(teacher: usize) -> http::Request<Bytes> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "max_tokens": 2_000,
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": format!("Plan de clase {teacher}: el ciclo del agua.")}],
    });
    http::Request::post("/v1/chat/completions")
        .body(Bytes::from(body.to_string()))
        .unwrap()
}

async fn provider(midstream: f64) -> MockProvider {
    MockProvider::start(MockConfig {
        time_scale: SCALE,
        completion_share: 0.5, // answers use half their max_tokens: the estimate is 2× too high
        midstream_error_rate: midstream,
        seed: 3,
        ..MockConfig::default()
    })
    .await
    .unwrap()
}

fn stack(pace: Pace) -> LlmStack {
    LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .time_scale(SCALE)
    .pace(pace)
    .bulkhead(Bulkhead::builder(3).max_queue(100).build().unwrap())
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_held_to_the_last_chunk_and_usage_reconciles_within_1_percent() {
    let mock = provider(0.0).await;
    // A per-day budget refills ~12 tokens/s: what it lost is what it was charged.
    let pace = Pace::builder().tokens_per_day(1_000_000).build().unwrap();
    let stack = stack(pace.clone());
    let svc = ServiceBuilder::new()
        .layer(stack.stream_layer())
        .service(StreamingClient(HttpClient::new(&mock.base_url(), None)));

    // One stream alone: the headers are in, the permit is still held.
    let mut one = svc.clone();
    let res = one.ready().await.unwrap().call(streamed(0)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        stack.bulkhead().snapshot().in_flight,
        1,
        "held after the headers"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(
        stack.bulkhead().snapshot().in_flight,
        0,
        "released at the last chunk"
    );

    // Ten more, three at a time.
    let tasks: Vec<_> = (1..=10)
        .map(|i| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let res = svc.ready().await?.call(streamed(i)).await?;
                let body = res.into_body().collect().await?.to_bytes();
                Ok::<_, semaforo::BoxError>(body.len())
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap() > 0);
    }
    assert_eq!(Stats::get(&mock.stats.completed), 11);
    let billed = Stats::get(&mock.stats.tokens) as f64;
    let dim = pace.snapshot().dims[0];
    let charged = dim.capacity - dim.available;
    let error = (charged - billed).abs() / billed;
    assert!(
        error <= 0.01,
        "pacer charged {charged:.0} tokens, the provider billed {billed:.0} ({:.2} %)",
        error * 100.0
    );
    assert!(
        billed < 11.0 * 2_000.0 * 0.6,
        "the estimates were 2× too high: {billed}"
    );
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_mid_stream_reaches_the_breaker() {
    let mock = provider(1.0).await;
    let stack = stack(Pace::builder().tokens_per_minute(300_000).build().unwrap());
    let mut svc = ServiceBuilder::new()
        .layer(stack.stream_layer())
        .service(StreamingClient(HttpClient::new(&mock.base_url(), None)));
    let res = svc.ready().await.unwrap().call(streamed(1)).await.unwrap();
    assert_eq!(res.status(), 200, "the headers said all is well");
    assert_eq!(stack.breaker().snapshot().consecutive_failures, 0);
    let mut body = res.into_body();
    let mut seen = Vec::new();
    let err = loop {
        match body.frame().await {
            Some(Ok(f)) => seen.extend_from_slice(f.data_ref().map(|d| &d[..]).unwrap_or_default()),
            Some(Err(e)) => break e,
            None => panic!("the stream ended without its error"),
        }
    };
    assert!(
        std::str::from_utf8(&seen).unwrap().contains("event: error"),
        "the event's bytes were handed over"
    );
    assert!(
        err.to_string().contains("the stream failed mid-way"),
        "{err}"
    );
    drop(body);
    assert_eq!(
        stack.breaker().snapshot().consecutive_failures,
        1,
        "the failure reached the breaker"
    );
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
    assert_eq!(Stats::get(&mock.stats.midstream_errors), 1);
}

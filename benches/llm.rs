//! The LLM preset (`LlmStack::layer`) around a client that answers at once:
//! a success (`usage` read from the body) and a failed call (a 400 whose error
//! body says the context is too long: classified by the pacer, the breaker and
//! retry — parsed once since 1.0, three times before); and a streamed answer
//! (`LlmStack::stream_layer`, 100 SSE events with usage at the end) read to
//! its end, every event through the preset's body taps (SSE reader, chunk
//! deadlines, pacer reconciliation, breaker, bulkhead, shutdown).

mod common;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use futures::FutureExt;
use semaforo::llm::{LlmStack, Tier};
use std::convert::Infallible;
use tower::{service_fn, Service, ServiceExt};

const REQUEST: &[u8] =
    br#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hola, que tal?"}]}"#;
const SUCCESS: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Bien, gracias."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
const CONTEXT: &[u8] = br#"{"error":{"message":"This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;

fn client(
    status: u16,
    body: &'static [u8],
) -> impl Service<
    http::Request<Bytes>,
    Response = http::Response<Bytes>,
    Error = Infallible,
    Future = std::future::Ready<Result<http::Response<Bytes>, Infallible>>,
> + Clone {
    service_fn(move |_req: http::Request<Bytes>| {
        let mut res = http::Response::new(Bytes::from_static(body));
        *res.status_mut() = http::StatusCode::from_u16(status).expect("a status");
        std::future::ready(Ok::<_, Infallible>(res))
    })
}

fn call<S>(svc: &mut S) -> u16
where
    S: Service<http::Request<Bytes>, Response = http::Response<Bytes>>,
    S::Error: std::fmt::Debug,
{
    call_with(svc, Bytes::from_static(REQUEST))
}

fn call_with<S>(svc: &mut S, body: Bytes) -> u16
where
    S: Service<http::Request<Bytes>, Response = http::Response<Bytes>>,
    S::Error: std::fmt::Debug,
{
    let req = http::Request::post("/v1/chat/completions")
        .body(body)
        .expect("a request");
    let svc = svc
        .ready()
        .now_or_never()
        .expect("ready at once")
        .expect("no error");
    let res = svc
        .call(req)
        .now_or_never()
        .expect("completes at once")
        .expect("an answer");
    res.status().as_u16()
}

fn preset(c: &mut Criterion) {
    let rt = common::runtime();
    let _rt = rt.enter();
    // Limits far above what a benchmark sends: the pacer never waits.
    let tier = Tier {
        requests_per_minute: 1 << 40,
        tokens_per_minute: 1 << 50,
    };
    let mut g = c.benchmark_group("llm/preset");
    let stack = LlmStack::openai(tier).build().expect("a stack");
    let mut ok = tower::ServiceBuilder::new()
        .layer(stack.layer())
        .service(client(200, SUCCESS));
    g.bench_function("success", |b| b.iter(|| black_box(call(&mut ok))));
    let stack = LlmStack::openai(tier).build().expect("a stack");
    let mut failed = tower::ServiceBuilder::new()
        .layer(stack.layer())
        .service(client(400, CONTEXT));
    g.bench_function("failed call (400, error body)", |b| {
        b.iter(|| black_box(call(&mut failed)))
    });
    // The model read from a 2 KB request body (a per-model pacer's key).
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}],"max_tokens":100,"model":"gpt-4o-mini"}}"#,
        "a".repeat(2_000)
    );
    // The whole preset on that 2 KB request: the body read once for its
    // cost, its model and its key.
    let stack = LlmStack::openai(tier).build().expect("a stack");
    let mut big = tower::ServiceBuilder::new()
        .layer(stack.layer())
        .service(client(200, SUCCESS));
    let big_body = Bytes::from(body.clone());
    g.bench_function("success, 2 KB request", |b| {
        b.iter(|| black_box(call_with(&mut big, big_body.clone())))
    });
    // One typed parse of the same body (serde_json into the fields a
    // client reads), for scale.
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Chat<'a> {
        model: &'a str,
        max_tokens: Option<u64>,
        #[serde(borrow)]
        messages: Vec<Message<'a>>,
    }
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Message<'a> {
        role: &'a str,
        #[serde(borrow)]
        content: std::borrow::Cow<'a, str>,
    }
    g.bench_function("one typed parse of the 2 KB body (serde_json)", |b| {
        b.iter(|| {
            let c: Chat<'_> = serde_json::from_slice(black_box(body.as_bytes())).expect("json");
            black_box(c.messages.len())
        })
    });
    g.bench_function("model read from a 2 KB body (ModelField)", |b| {
        b.iter(|| black_box(semaforo::llm::ModelField::read(black_box(body.as_bytes())).is_some()))
    });
    g.finish();

    let mut g = c.benchmark_group("llm/stream");
    let stack = LlmStack::openai(tier).build().expect("a stack");
    let mut streamed = tower::ServiceBuilder::new()
        .layer(stack.stream_layer())
        .service(service_fn(|_req: http::Request<Bytes>| {
            std::future::ready(Ok::<_, Infallible>(http::Response::new(sse_body())))
        }));
    g.throughput(criterion::Throughput::Elements(EVENTS as u64));
    g.bench_function("100 events, read to the end", |b| {
        b.iter(|| black_box(read_stream(&mut streamed)))
    });
    g.finish();
}

const EVENTS: usize = 100;

type Frames =
    futures::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>;

/// A streamed completion: one frame per event, usage in the last one.
fn sse_body() -> http_body_util::StreamBody<Frames> {
    let mut frames: Vec<_> = (0..EVENTS - 1)
        .map(|_| {
            Ok(http_body::Frame::data(Bytes::from_static(
                br#"data: {"choices":[{"index":0,"delta":{"content":"hola"}}]}

"#,
            )))
        })
        .collect();
    frames.push(Ok(http_body::Frame::data(Bytes::from_static(
        br#"data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":99,"total_tokens":111}}

data: [DONE]

"#,
    ))));
    http_body_util::StreamBody::new(futures::stream::iter(frames))
}

fn read_stream<S, B>(svc: &mut S) -> usize
where
    S: Service<http::Request<Bytes>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Unpin,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    let req = http::Request::post("/v1/chat/completions")
        .body(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"hola"}]}"#,
        ))
        .expect("a request");
    let svc = svc
        .ready()
        .now_or_never()
        .expect("ready at once")
        .expect("no error");
    let mut body = svc
        .call(req)
        .now_or_never()
        .expect("completes at once")
        .expect("an answer")
        .into_body();
    let mut frames = 0;
    while let Some(frame) = body.frame().now_or_never().expect("a frame at once") {
        frame.expect("no error");
        frames += 1;
    }
    frames
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = preset
}
criterion_main!(benches);

//! `SemaforoMiddleware`: a semaforo stack inside a reqwest-middleware client,
//! over real HTTP on 127.0.0.1 (reqwest has no in-memory transport: these
//! run in real time, with bounds that hold on a loaded machine).

#[path = "../examples/common/http_client.rs"]
mod http_client;
#[path = "../examples/common/mock_provider.rs"]
mod mock_provider;

use bytes::Bytes;
use http_client::chat_request;
use mock_provider::{MockConfig, MockProvider, Stats};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use semaforo::bulkhead::Bulkhead;
use semaforo::classify::HttpClassifier;
use semaforo::llm::{LlmStack, Tier};
use semaforo::reqwest::SemaforoMiddleware;
use semaforo::retry::{HttpRequests, Retry};
use semaforo::{RejectKind, Rejected};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TIER: Tier = Tier {
    requests_per_minute: 500,
    tokens_per_minute: 30_000,
};

/// The tier's bound for 50 × 2,000 tokens, plus one plan's 5 s, in simulated
/// time (the same scenario as `tests/llm_stack.rs`).
const BOUND: Duration = Duration::from_secs(145);

/// A reqwest request from the tower test's `chat_request`.
fn send(
    client: &ClientWithMiddleware,
    base: &str,
    req: http::Request<Bytes>,
) -> reqwest_middleware::RequestBuilder {
    client
        .post(format!("{base}{}", req.uri().path()))
        .header("content-type", "application/json")
        .body(req.into_body())
}

/// The Sunday-night scenario (50 teachers at once against a 500 RPM /
/// 30,000 TPM tier) through reqwest-middleware with the LLM preset: the same
/// result as the tower client — 50/50, zero 429s at the provider, a makespan
/// within 5 % of the tier's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sunday_night_scenario_through_the_middleware_sees_zero_429s_near_the_bound() {
    let scale = 20.0;
    let provider = MockProvider::start(MockConfig {
        time_scale: scale,
        seed: 7,
        ..MockConfig::default()
    })
    .await
    .expect("mock provider starts");
    let stack = LlmStack::openai(TIER).time_scale(scale).build().unwrap();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::whole(stack.layer()))
        .build();
    let base = provider.base_url();
    let t0 = Instant::now();
    let tasks: Vec<_> = (1..=50)
        .map(|i| {
            let call = send(&client, &base, chat_request("gpt-4o-mini", 2_000, i, None));
            tokio::spawn(async move {
                let res = call.send().await?;
                Ok::<_, reqwest_middleware::Error>((res.status().as_u16(), res.text().await?))
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok((200, body)) if body.contains("choices") => ok += 1,
            other => eprintln!("failed: {other:?}"),
        }
    }
    let makespan = t0.elapsed().mul_f64(scale);
    println!("through reqwest-middleware: {ok}/50, makespan {makespan:?}, bound {BOUND:?}");
    assert_eq!(ok, 50);
    assert_eq!(Stats::get(&provider.stats.throttled), 0, "zero 429s");
    assert!(
        makespan <= BOUND.mul_f64(1.05),
        "makespan {makespan:?} vs bound {BOUND:?}"
    );
}

/// A tiny server: answers each request with what `answer` returns for the
/// request's ordinal (0-based), and records when each arrived.
async fn server<F>(answer: F) -> (String, Arc<Mutex<Vec<Instant>>>)
where
    F: Fn(usize) -> axum::response::Response + Send + Sync + 'static,
{
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let answer = Arc::new(answer);
    let app = axum::Router::new().fallback(move || {
        let seen = seen.clone();
        let answer = answer.clone();
        async move {
            let n = {
                let mut s = seen.lock().unwrap();
                s.push(Instant::now());
                s.len() - 1
            };
            answer(n)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), arrivals)
}

fn status(
    code: u16,
    headers: &[(&'static str, &str)],
    body: &'static str,
) -> axum::response::Response {
    let mut res = http::Response::builder().status(code);
    for (k, v) in headers {
        res = res.header(*k, *v);
    }
    res.body(axum::body::Body::from(body)).unwrap()
}

fn retrying_client() -> ClientWithMiddleware {
    let retry = Retry::builder()
        .max_attempts(3)
        .no_budget()
        .build()
        .unwrap();
    let layer = retry
        .layer()
        .classify(HttpClassifier)
        .requests(HttpRequests::default());
    ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::whole(layer))
        .build()
}

/// A 429 with `Retry-After: 2` is retried no sooner than 2 s later (and not
/// much later: the retry waits max(retry-after, backoff), backoff < 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_2_is_retried_no_sooner_than_2_s() {
    let (base, arrivals) = server(|n| match n {
        0 => status(429, &[("retry-after", "2")], "slow down"),
        _ => status(200, &[], "fine"),
    })
    .await;
    let res = retrying_client()
        .get(format!("{base}/report"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "fine");
    let at = arrivals.lock().unwrap().clone();
    assert_eq!(at.len(), 2, "one retry");
    let gap = at[1] - at[0];
    println!("retried after {gap:?}");
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(10), "retried after {gap:?}");
}

/// `url()`, the status, headers and body come back; the middleware
/// extensions reach the layers; a non-idempotent POST is not retried by the
/// default HTTP policy, and a streamed request body never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_headers_and_extensions_survive_and_streamed_bodies_are_sent_once() {
    let (base, arrivals) = server(|_| status(503, &[("x-upstream", "a")], "down")).await;
    let client = retrying_client();
    // A GET is retried: 3 attempts, the last answer returned with its url.
    let url = format!("{base}/items?page=2");
    let res = client.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.url().as_str(), url);
    assert_eq!(res.headers()["x-upstream"], "a");
    assert_eq!(res.text().await.unwrap(), "down");
    assert_eq!(arrivals.lock().unwrap().len(), 3);

    // A GET whose body is a stream is sent once.
    arrivals.lock().unwrap().clear();
    let chunks = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from_static(b"x"))]);
    let res = client
        .get(format!("{base}/stream"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        arrivals.lock().unwrap().len(),
        1,
        "a streamed body is sent once"
    );

    // The middleware extensions are seen by the layers below.
    #[derive(Clone)]
    struct Tag(&'static str);
    let saw = Arc::new(Mutex::new(None));
    let layer = {
        let saw = saw.clone();
        tower::layer::layer_fn(
            move |inner: semaforo::reqwest::Upstream<semaforo::reqwest::Whole>| {
                let saw = saw.clone();
                let inner = inner.clone();
                tower::service_fn(move |req: http::Request<Bytes>| {
                    *saw.lock().unwrap() = req.extensions().get::<Tag>().map(|t| t.0);
                    tower::ServiceExt::oneshot(inner.clone(), req)
                })
            },
        )
    };
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::whole(layer))
        .build();
    let res = client
        .get(format!("{base}/x"))
        .with_extension(Tag("teacher-7"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(*saw.lock().unwrap(), Some("teacher-7"));
}

/// A refusal by a layer comes back as a middleware error around the
/// `Rejected` itself; the request never reached the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_a_middleware_error_around_the_rejected() {
    let (base, arrivals) = server(|_| status(200, &[], "ok")).await;
    let bulkhead = Bulkhead::builder(1).max_queue(0).build().unwrap();
    let held = bulkhead.try_permit().unwrap();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::new(bulkhead.layer()))
        .build();
    let err = client.get(format!("{base}/x")).send().await.unwrap_err();
    let r = semaforo::reqwest::rejected(&err).expect("a refusal");
    assert_eq!(r.kind(), RejectKind::QueueFull);
    match &err {
        reqwest_middleware::Error::Middleware(e) => {
            assert!(e.downcast_ref::<Rejected>().is_some())
        }
        other => panic!("{other:?}"),
    }
    assert!(arrivals.lock().unwrap().is_empty());
    drop(held);
    let res = client.get(format!("{base}/x")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

/// A streamed answer holds its bulkhead permit until its last chunk: a
/// second call waits in line while the first body is still arriving, and
/// goes as soon as it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_holds_its_bulkhead_permit_until_the_last_chunk() {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(Mutex::new(Some(rx)));
    let (base, arrivals) = server(move |n| {
        if n == 0 {
            let rx = rx.lock().unwrap().take().unwrap();
            let chunks = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
            });
            http::Response::new(axum::body::Body::from_stream(chunks))
        } else {
            status(200, &[], "second")
        }
    })
    .await;
    let bulkhead = Bulkhead::builder(1).max_queue(4).build().unwrap();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::new(
            bulkhead.layer().release_on_body_end(),
        ))
        .build();
    let first = client.get(format!("{base}/first")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(
        bulkhead.snapshot().in_flight,
        1,
        "the headers came, the body did not"
    );

    let second = {
        let client = client.clone();
        let base = base.clone();
        tokio::spawn(async move { client.get(format!("{base}/second")).send().await })
    };
    // The second call reaches the line (an event, not a guess at timing).
    let t0 = Instant::now();
    while bulkhead.snapshot().waiting < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the second call never queued"
        );
        tokio::task::yield_now().await;
    }
    let mut first = first.bytes_stream();
    use futures::StreamExt as _;
    for i in 0..3u8 {
        tx.send(Bytes::from(vec![b'a' + i])).unwrap();
        let chunk = first.next().await.unwrap().unwrap();
        assert_eq!(chunk.as_ref(), [b'a' + i]);
        // Still in line: one arrival at the server, one permit out.
        let s = bulkhead.snapshot();
        assert_eq!((s.in_flight, s.waiting), (1, 1), "after chunk {i}");
        assert_eq!(arrivals.lock().unwrap().len(), 1, "after chunk {i}");
    }
    drop(tx);
    assert!(first.next().await.is_none(), "the body ended");
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second call went once the first body ended")
        .unwrap()
        .unwrap();
    assert_eq!(second.text().await.unwrap(), "second");
    assert_eq!(arrivals.lock().unwrap().len(), 2);
}

/// The LLM preset's classifier reads the provider's error body through the
/// middleware, and the caller still gets it whole: a 429 whose body says
/// `insufficient_quota` (the billing quota, not a rate limit) is not
/// retried; a 429 `rate_limit_exceeded` with `retry-after-ms: 300` is,
/// 300 ms later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preset_reads_error_bodies_through_the_middleware_and_the_caller_gets_them() {
    const QUOTA: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    const RATE: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o-mini","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    let (base, arrivals) = server(|n| match n {
        0 => status(429, &[("content-type", "application/json")], QUOTA),
        1 => status(
            429,
            &[
                ("content-type", "application/json"),
                ("retry-after-ms", "300"),
            ],
            RATE,
        ),
        _ => status(
            200,
            &[("content-type", "application/json")],
            r#"{"choices":[],"usage":{"total_tokens":12}}"#,
        ),
    })
    .await;
    let stack = LlmStack::openai(TIER).build().unwrap();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(SemaforoMiddleware::whole(stack.layer()))
        .build();
    let body =
        r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hola"}]}"#;
    let res = client
        .post(format!("{base}/v1/chat/completions"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        res.text().await.unwrap(),
        QUOTA,
        "the caller gets the body whole"
    );
    assert_eq!(
        arrivals.lock().unwrap().len(),
        1,
        "insufficient_quota is not retried"
    );

    let res = client
        .post(format!("{base}/v1/chat/completions"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let at = arrivals.lock().unwrap().clone();
    assert_eq!(at.len(), 3, "the rate limit was retried once");
    let gap = at[2] - at[1];
    assert!(gap >= Duration::from_millis(300), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(5), "retried after {gap:?}");
}

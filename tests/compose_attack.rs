//! An outside trial of composition and seams: stacks built as the docs
//! recommend, cancellation at every await point, drains with calls in every
//! state, refusals through outer layers, extreme configurations.
#![cfg(all(feature = "llm", feature = "chaos"))]

use bytes::Bytes;
use semaforo::backoff::{Backoff, Jitter};
use semaforo::bulkhead::Bulkhead;
use semaforo::llm::{LlmStack, Tier};
use semaforo::retry::Retry;
use semaforo::{BoxError, RejectKind, Rejected};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

#[path = "support/llm_stack.rs"]
mod llm_stack;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn kind(e: &BoxError) -> Option<RejectKind> {
    Rejected::from_box(e).map(|r| r.kind())
}

/// What the mock provider does with its n-th call (0-based).
#[derive(Clone, Copy, Debug)]
enum Act {
    /// 200 with usage after the delay.
    Ok(Duration),
    /// That status with an OpenAI error body, at once.
    Status(u16),
    /// 429 with `retry-after` seconds.
    TooMany(u64),
}

type Script = Arc<dyn Fn(u32) -> Act + Send + Sync>;

/// The mock provider: counts calls, records their start instants.
#[derive(Clone)]
struct Provider {
    calls: Arc<AtomicU32>,
    starts: Arc<Mutex<Vec<Instant>>>,
    script: Script,
}

impl Provider {
    fn new(script: impl Fn(u32) -> Act + Send + Sync + 'static) -> Self {
        Provider {
            calls: Arc::new(AtomicU32::new(0)),
            starts: Arc::new(Mutex::new(Vec::new())),
            script: Arc::new(script),
        }
    }
    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
    fn starts(&self) -> Vec<Instant> {
        self.starts.lock().unwrap().clone()
    }
    fn service(
        &self,
    ) -> impl Service<
        http::Request<Bytes>,
        Response = http::Response<Bytes>,
        Error = std::io::Error,
        Future = impl Future<Output = Result<http::Response<Bytes>, std::io::Error>> + Send,
    > + Clone
           + Send
           + 'static {
        let p = self.clone();
        service_fn(move |_req: http::Request<Bytes>| {
            let n = p.calls.fetch_add(1, Ordering::SeqCst);
            p.starts.lock().unwrap().push(Instant::now());
            let act = (p.script)(n);
            async move {
                match act {
                    Act::Ok(d) => {
                        tokio::time::sleep(d).await;
                        let body = r#"{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":10,"completion_tokens":10,"total_tokens":20}}"#;
                        Ok(http::Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(Bytes::from_static(body.as_bytes()))
                            .unwrap())
                    }
                    Act::Status(s) => {
                        let body = r#"{"error":{"message":"boom","type":"server_error"}}"#;
                        Ok(http::Response::builder()
                            .status(s)
                            .header("content-type", "application/json")
                            .body(Bytes::from_static(body.as_bytes()))
                            .unwrap())
                    }
                    Act::TooMany(ra) => {
                        let body = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
                        Ok(http::Response::builder()
                            .status(429)
                            .header("content-type", "application/json")
                            .header("retry-after", ra.to_string())
                            .body(Bytes::from_static(body.as_bytes()))
                            .unwrap())
                    }
                }
            }
        })
    }
}

fn chat(content: &str) -> http::Request<Bytes> {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","temperature":0,"max_tokens":10,"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-test")
        .body(Bytes::from(body))
        .unwrap()
}

/// Lets spawned tasks run (paused clock: no time passes).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Polls a future once (or until it is ready), returning it if still pending.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    Pin::new(f).poll(&mut cx)
}

fn retry_no_jitter(attempts: u32, base: Duration) -> Retry {
    Retry::builder()
        .max_attempts(attempts)
        .backoff(
            Backoff::exponential(base)
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// 1. A drain of the LLM preset with calls in every state.
// ---------------------------------------------------------------------------

/// One call upstream (hung), one in a retry backoff, one waiting for the
/// pacer, two waiting in the bulkhead's line; trigger, one refused, drain.
/// The shutdown docs: "Every call in flight when the trigger came … is in
/// exactly one of `completed`, `cancelled` and `still_streaming`"; lines
/// closed at the trigger answer `ShuttingDown` at once (`queued_released`).
#[tokio::test(start_paused = true)]
async fn llm_drain_with_calls_in_every_state() -> Result<(), BoxError> {
    let provider = Provider::new(|n| match n {
        0 => Act::Ok(secs(1_000)),
        1 => Act::Status(500),
        _ => Act::Ok(Duration::ZERO),
    });
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 2,
        tokens_per_minute: 1_000_000,
    })
    .bulkhead(
        Bulkhead::builder(3)
            .max_queue(10)
            .max_wait(secs(600))
            .build()?,
    )
    .retry(retry_no_jitter(3, secs(50)))
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());

    let mut tasks = Vec::new();
    for i in 0..5 {
        let fut = llm.clone().oneshot(chat(&format!("q{i}")));
        tasks.push(tokio::spawn(fut));
        settle().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The states the test means to set up.
    let bh = stack.bulkhead().snapshot();
    assert_eq!((bh.in_flight, bh.waiting), (3, 2), "{bh:?}");
    let pace = stack.pace().peek("gpt-4o-mini").expect("the model's pacer");
    assert_eq!(pace.snapshot().waiting, 1, "one call waits for the pacer");
    assert_eq!(provider.calls(), 2);
    assert_eq!(stack.shutdown().in_flight(), 5);

    let t0 = Instant::now();
    stack.shutdown().trigger();
    let refused = llm.clone().oneshot(chat("late")).await.unwrap_err();
    assert_eq!(kind(&refused), Some(RejectKind::ShuttingDown));
    let report = stack.shutdown().drain(secs(30)).await;
    eprintln!("drain took {:?}: {report:?}", t0.elapsed());

    let mut kinds = Vec::new();
    for t in tasks {
        kinds.push(t.await?.map(|_| ()).map_err(|e| kind(&e)));
    }
    eprintln!("callers got {kinds:?}");
    assert!(
        kinds
            .iter()
            .all(|k| *k == Err(Some(RejectKind::ShuttingDown))),
        "every caller answered ShuttingDown: {kinds:?}"
    );
    assert_eq!(report.rejected, 1);
    assert_eq!(
        report.queued_released, 3,
        "2 in the bulkhead's line + 1 in the pacer's"
    );
    assert_eq!(
        report.completed + report.cancelled + report.still_streaming,
        5,
        "each call in flight at the trigger counted once: {report:?}"
    );
    assert_eq!(
        report.cancelled, 2,
        "the hung call and the one in backoff: {report:?}"
    );
    let bh = stack.bulkhead().snapshot();
    assert_eq!((bh.in_flight, bh.waiting), (0, 0), "{bh:?}");
    assert_eq!(pace.snapshot().waiting, 0);
    assert_eq!(stack.shutdown().in_flight(), 0);
    assert_eq!(
        provider.calls(),
        2,
        "nothing reached the provider after the trigger"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Cancellation at each await point of the LLM preset.
// ---------------------------------------------------------------------------

/// Bulkhead of 1, 1 request a minute. A caller dropped in the bulkhead's
/// line, one dropped upstream, one dropped in the pacer's line, one dropped
/// in its retry backoff: nothing held afterwards, and the next call starts
/// when the budget says — the pacer docs: "A caller that leaves the line
/// held nothing and everyone behind it moves up."
#[tokio::test(start_paused = true)]
async fn llm_cancel_at_every_await_point() -> Result<(), BoxError> {
    let provider = Provider::new(|n| match n {
        0 => Act::Ok(secs(1_000)),
        1 => Act::Ok(Duration::ZERO),
        2 => Act::Status(500),
        _ => Act::Ok(Duration::ZERO),
    });
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 1,
        tokens_per_minute: 1_000_000,
    })
    .bulkhead(
        Bulkhead::builder(1)
            .max_queue(10)
            .max_wait(secs(600))
            .build()?,
    )
    .retry(retry_no_jitter(3, secs(5)))
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let t0 = Instant::now();

    // A: upstream, hung.
    let a = tokio::spawn(llm.clone().oneshot(chat("a")));
    settle().await;
    assert_eq!(provider.calls(), 1);
    // B: in the bulkhead's line, polled a few times, dropped.
    let mut b = Box::pin(llm.clone().oneshot(chat("b")));
    for _ in 0..3 {
        assert!(poll_once(&mut b).is_pending());
        settle().await;
    }
    assert_eq!(stack.bulkhead().snapshot().waiting, 1);
    drop(b);
    assert_eq!(stack.bulkhead().snapshot().waiting, 0);
    // A dropped upstream.
    a.abort();
    let _ = a.await;
    settle().await;
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
    assert_eq!(stack.shutdown().in_flight(), 0);

    // C: past the bulkhead, waiting for the pacer (A spent the minute's request).
    let mut c = Box::pin(llm.clone().oneshot(chat("c")));
    for _ in 0..3 {
        assert!(poll_once(&mut c).is_pending());
        settle().await;
    }
    let pace = stack.pace().peek("gpt-4o-mini").expect("the model's pacer");
    assert_eq!(pace.snapshot().waiting, 1, "C waits for the pacer");
    assert_eq!(stack.bulkhead().snapshot().in_flight, 1);
    tokio::time::sleep(secs(10)).await;
    drop(c);
    assert_eq!(pace.snapshot().waiting, 0);
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);

    // D: starts when A's request leaves the window: 60 s after A, not later.
    llm.clone().oneshot(chat("d")).await?;
    let starts = provider.starts();
    assert_eq!(starts.len(), 2);
    assert_eq!(
        starts[1] - t0,
        secs(60),
        "D started at {:?}",
        starts[1] - t0
    );

    // E: the provider answers 500, E waits in its backoff; dropped there.
    let mut e = Box::pin(llm.clone().oneshot(chat("e")));
    let mut spins = 0;
    while provider.calls() < 3 {
        assert!(poll_once(&mut e).is_pending());
        tokio::time::sleep(secs(1)).await;
        spins += 1;
        assert!(spins < 200);
    }
    settle().await;
    assert!(poll_once(&mut e).is_pending(), "in backoff");
    assert_eq!(stack.bulkhead().snapshot().in_flight, 1);
    drop(e);
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
    assert_eq!(stack.shutdown().in_flight(), 0);
    assert_eq!(pace.snapshot().waiting, 0);
    // And the next call passes.
    llm.clone().oneshot(chat("f")).await?;
    assert_eq!(provider.calls(), 4);
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Refusals keep their kind and retry_after through the outer layers.
// ---------------------------------------------------------------------------

/// The preset with cache, coalescing and stale-if-error; the pacer (1 RPM,
/// `max_wait` 5 s) refuses. Three identical callers coalesced: each gets
/// `BudgetExceeded` with the same `retry_after`; a request the cache kept
/// is answered stale (`FellBack`) — "a spent budget with a time".
#[tokio::test(start_paused = true)]
async fn llm_pacer_refusal_through_coalesce_cache_and_fallback() -> Result<(), BoxError> {
    use semaforo::cache::Cache;
    use semaforo::fallback::FellBack;
    use semaforo::llm::LlmCache;
    use semaforo::pace::Pace;

    let provider = Provider::new(|_| Act::Ok(secs(1)));
    let cache: LlmCache = Cache::builder()
        .ttl(secs(10))
        .stale_for(secs(3_600))
        .build()?;
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    })
    .pace(
        Pace::builder()
            .requests_per_minute(1)
            .max_wait(secs(5))
            .build()?,
    )
    .retry(Retry::builder().max_attempts(1).build()?)
    .cache(cache)
    .coalesce(true)
    .stale_if_error(true)
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());

    let first = llm.clone().oneshot(chat("x")).await?;
    assert_eq!(first.status(), 200);
    tokio::time::sleep(secs(20)).await; // x is stale now; the pacer's next start: t = 60

    let t = Instant::now();
    let three = futures::future::join_all((0..3).map(|_| llm.clone().oneshot(chat("y")))).await;
    assert_eq!(t.elapsed(), Duration::ZERO, "refused at once");
    let mut seen = Vec::new();
    for r in &three {
        let e = r.as_ref().expect_err("refused");
        let rej = Rejected::from_box(e).unwrap_or_else(|| panic!("no Rejected in {e}"));
        seen.push((rej.kind(), rej.retry_after()));
    }
    eprintln!("coalesced refusals: {seen:?}");
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    assert_eq!(seen[0].0, RejectKind::BudgetExceeded);
    // The call would start at 60 s (39 s from now); back at 55 s it waits
    // its max_wait of 5 s.
    assert_eq!(seen[0].1, Some(secs(34)));
    assert_eq!(provider.calls(), 1);

    // The kept answer, stale, for the same refusal.
    let stale = llm.clone().oneshot(chat("x")).await?;
    assert_eq!(stale.status(), 200);
    assert!(stale.extensions().get::<FellBack>().is_some());
    assert_eq!(provider.calls(), 1);
    let snap = stack.cache().unwrap().snapshot();
    eprintln!("cache {snap:?}");
    // 5 calls reached the cache: x (miss, stored), y ×3, x again (stale).
    assert_eq!(snap.hits, 0, "{snap:?}");
    assert_eq!(snap.stores, 1, "{snap:?}");
    assert_eq!(snap.stale_served, 1, "{snap:?}");
    assert_eq!(snap.hits + snap.misses + snap.bypassed, 5, "{snap:?}");
    Ok(())
}

/// Quota inside coalescing: "A quota's refusal (QuotaExceeded) is not
/// shared: it is a verdict on the caller it refused … a waiting caller then
/// goes on with its own request." User A (quota spent) leads, user B
/// (quota left) follows the identical request: A refused, B answered.
#[tokio::test(start_paused = true)]
async fn llm_quota_refusal_of_the_leader_is_not_shared() -> Result<(), BoxError> {
    use semaforo::quota::{HeaderKey, PlanId, Quota, Rate};

    let provider = Provider::new(|_| Act::Ok(secs(1)));
    let quota: Quota<String> = Quota::builder()
        .plan("free", Rate::per_minute(1).burst(1))
        .build()?;
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    })
    .quota(
        quota.clone(),
        HeaderKey::new(http::HeaderName::from_static("x-user"), PlanId::FIRST),
    )
    .coalesce(true)
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let as_user = |user: &str, content: &str| {
        let mut r = chat(content);
        r.headers_mut()
            .insert("x-user", http::HeaderValue::from_str(user).unwrap());
        r
    };
    // A spends their quota.
    llm.clone().oneshot(as_user("ana", "warmup")).await?;
    assert_eq!(provider.calls(), 1);

    let a = llm.clone().oneshot(as_user("ana", "same"));
    let b = llm.clone().oneshot(as_user("bea", "same"));
    let (a, b) = tokio::join!(a, b);
    let a_err = a.expect_err("ana is over her quota");
    assert_eq!(kind(&a_err), Some(RejectKind::QuotaExceeded), "{a_err}");
    let b = b.unwrap_or_else(|e| panic!("bea has quota left, got {e}"));
    assert_eq!(b.status(), 200);
    assert_eq!(provider.calls(), 2);
    let snap = quota.snapshot();
    eprintln!("quota {snap:?}");
    assert_eq!((snap.admitted, snap.rejected), (2, 1), "{snap:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Streamed answers through the preset, read the way hyper reads them.
// ---------------------------------------------------------------------------

type Chunks =
    Pin<Box<dyn futures::Stream<Item = Result<http_body::Frame<Bytes>, std::io::Error>> + Send>>;

const SSE_EVENTS: [&str; 5] = [
    "data: {\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"la\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"!\"}}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n",
    "data: [DONE]\n\n",
];

/// A streaming provider: the SSE events above, each `gap` apart; or, for
/// `hold`, never ending after the first event.
#[derive(Clone)]
struct StreamProvider {
    calls: Arc<AtomicU32>,
    gap: Duration,
    hold: bool,
}

impl StreamProvider {
    /// One `data:` event, then a stream that stays open (never ends).
    fn held() -> Self {
        StreamProvider {
            calls: Arc::new(AtomicU32::new(0)),
            gap: Duration::ZERO,
            hold: true,
        }
    }

    fn service(
        &self,
    ) -> impl Service<
        http::Request<Bytes>,
        Response = http::Response<http_body_util::StreamBody<Chunks>>,
        Error = std::io::Error,
        Future = impl Future<
            Output = Result<http::Response<http_body_util::StreamBody<Chunks>>, std::io::Error>,
        > + Send,
    > + Clone
           + Send
           + 'static {
        let p = self.clone();
        service_fn(move |_req: http::Request<Bytes>| {
            p.calls.fetch_add(1, Ordering::SeqCst);
            let (gap, hold) = (p.gap, p.hold);
            async move {
                let chunks: Chunks =
                    Box::pin(futures::stream::unfold(0usize, move |i| async move {
                        if i == SSE_EVENTS.len() {
                            return None;
                        }
                        if i > 0 {
                            if hold {
                                std::future::pending::<()>().await;
                            }
                            if !gap.is_zero() {
                                tokio::time::sleep(gap).await;
                            }
                        }
                        Some((
                            Ok(http_body::Frame::data(Bytes::from_static(
                                SSE_EVENTS[i].as_bytes(),
                            ))),
                            i + 1,
                        ))
                    }));
                Ok(http::Response::builder()
                    .status(200)
                    .header("content-type", "text/event-stream")
                    .body(http_body_util::StreamBody::new(chunks))
                    .unwrap())
            }
        })
    }
}

fn stream_chat(content: &str, max_tokens: u64) -> http::Request<Bytes> {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","stream":true,"temperature":0,"max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-test")
        .body(Bytes::from(body))
        .unwrap()
}

/// Reads a body the way hyper does (frames until `is_end_stream()`); the
/// error as text.
async fn read_hyper<B>(body: B) -> (Vec<u8>, Option<String>)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (out, err) = llm_stack::read_like_hyper(body).await;
    (out, err.map(|e| e.to_string()))
}

fn tokens_available(p: &semaforo::pace::Pace) -> f64 {
    p.snapshot()
        .dims
        .iter()
        .find(|d| d.unit == semaforo::pace::Unit::Tokens)
        .expect("a tokens dimension")
        .available
}

fn counting_breaker() -> semaforo::breaker::Breaker {
    semaforo::breaker::Breaker::builder()
        .failure_rate(0.5)
        .window_calls(100)
        .min_calls(100)
        .build()
        .unwrap()
}

/// The stream docs' own recipe: `CoalesceLayer(LlmKey).share(FanOut)`
/// around `stream_layer`. Three identical streamed requests; the leader drops
/// its body after the first chunk, the others read hyper's way. One call
/// upstream, the pacer reconciled once with the stream's usage (12 tokens),
/// one success for the breaker, every permit back.
#[tokio::test(start_paused = true)]
async fn llm_stream_fanout_settles_once() -> Result<(), BoxError> {
    use semaforo::coalesce::CoalesceLayer;
    use semaforo::llm::LlmKey;
    use semaforo::share::FanOut;
    use tower::Layer;

    let provider = StreamProvider {
        calls: Arc::new(AtomicU32::new(0)),
        gap: Duration::ZERO,
        hold: false,
    };
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 60_000,
    })
    .breaker(counting_breaker())
    .build()?;
    let llm = CoalesceLayer::new(LlmKey::new())
        .share(FanOut::default())
        .layer(stack.stream_layer().layer(provider.service()));

    let mut responses = Vec::new();
    let futs: Vec<_> = (0..3)
        .map(|_| llm.clone().oneshot(stream_chat("hola", 5_000)))
        .collect();
    for r in futures::future::join_all(futs).await {
        responses.push(r?);
    }
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    let pace = stack.pace().peek("gpt-4o-mini").expect("pacer");
    let capacity = pace
        .snapshot()
        .dims
        .iter()
        .find(|d| d.unit == semaforo::pace::Unit::Tokens)
        .unwrap()
        .capacity;
    let reserved = capacity - tokens_available(&pace);
    eprintln!("reserved {reserved} tokens for the stream");
    assert!(reserved >= 5_000.0);

    let mut it = responses.into_iter();
    let mut leader = Box::pin(it.next().unwrap().into_body());
    {
        use http_body_util::BodyExt;
        let f = leader.frame().await.expect("a frame")?;
        assert!(f.is_data());
    }
    drop(leader);
    for r in it {
        let (bytes, err) = read_hyper(r.into_body()).await;
        assert_eq!(err, None);
        assert!(
            bytes.ends_with(b"data: [DONE]\n\n"),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
    }
    settle().await;
    let bh = stack.bulkhead().snapshot();
    assert_eq!((bh.in_flight, bh.waiting), (0, 0), "{bh:?}");
    assert_eq!(stack.shutdown().in_flight(), 0);
    let used = capacity - tokens_available(&pace);
    assert!(
        (used - 12.0).abs() < 1e-6,
        "reconciled with usage once: {used} tokens used"
    );
    let br = stack.breaker().snapshot();
    assert_eq!(
        (br.calls_in_window, br.failures_in_window),
        (1, 0),
        "{br:?}"
    );
    Ok(())
}

/// A streamed answer dropped after its first chunk: permits back at once,
/// the pacer keeps the estimate (neither refunded nor charged twice).
#[tokio::test(start_paused = true)]
async fn llm_stream_dropped_midway_releases_once() -> Result<(), BoxError> {
    let provider = StreamProvider::held();
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 60_000,
    })
    .breaker(counting_breaker())
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.stream_layer())
        .service(provider.service());
    let res = llm.clone().oneshot(stream_chat("hola", 5_000)).await?;
    let pace = stack.pace().peek("gpt-4o-mini").expect("pacer");
    let after_headers = tokens_available(&pace);
    assert_eq!(stack.bulkhead().snapshot().in_flight, 1);
    assert_eq!(stack.shutdown().in_flight(), 1);
    let mut body = Box::pin(res.into_body());
    {
        use http_body_util::BodyExt;
        let _ = body.frame().await.expect("a frame")?;
    }
    drop(body);
    settle().await;
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
    assert_eq!(stack.shutdown().in_flight(), 0);
    assert!((tokens_available(&pace) - after_headers).abs() < 1e-6);
    let br = stack.breaker().snapshot();
    eprintln!("breaker after a dropped stream: {br:?}");
    assert!(br.calls_in_window <= 1);
    // Two more dropped the same way: nothing accumulates.
    for _ in 0..2 {
        let res = llm.clone().oneshot(stream_chat("hola", 5_000)).await?;
        drop(res);
    }
    settle().await;
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
    assert_eq!(stack.shutdown().in_flight(), 0);
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Retry above the pacer: a 429's wait is waited once, not twice.
// ---------------------------------------------------------------------------

/// The provider answers 429 with `retry-after: 10`, then 200. The retry
/// waits `max(retry_after, backoff)` = 10 s and the pacer pauses "every
/// dispatch until its retry_after": the two waits overlap, the answer
/// comes at 10 s. The pacer's rate is cut ×0.75 and a success gives back 2 %.
#[tokio::test(start_paused = true)]
async fn llm_429_is_waited_once_through_retry_and_pacer() -> Result<(), BoxError> {
    let provider = Provider::new(|n| match n {
        0 => Act::TooMany(10),
        _ => Act::Ok(Duration::ZERO),
    });
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    })
    .retry(retry_no_jitter(3, secs(1)))
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let t0 = Instant::now();
    let res = llm.clone().oneshot(chat("q")).await?;
    assert_eq!(res.status(), 200);
    let starts: Vec<_> = provider.starts().iter().map(|s| *s - t0).collect();
    eprintln!("attempts at {starts:?}");
    assert_eq!(starts, vec![Duration::ZERO, secs(10)]);
    assert_eq!(stack.retry().retries(), 1);
    let snap = stack.pace().peek("gpt-4o-mini").unwrap().snapshot();
    eprintln!("pace after: {snap:?}");
    assert_eq!(snap.throttled, 1);
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. Shutdown with coalesced followers whose leader is in a retry backoff.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn llm_drain_with_coalesced_followers_in_backoff() -> Result<(), BoxError> {
    let provider = Provider::new(|_| Act::Status(500));
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    })
    .retry(retry_no_jitter(3, secs(50)))
    .coalesce(true)
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(llm.clone().oneshot(chat("same"))))
        .collect();
    tokio::time::sleep(secs(1)).await;
    assert_eq!(provider.calls(), 1, "one call for the three");
    assert_eq!(stack.shutdown().in_flight(), 3);
    let t0 = Instant::now();
    let report = stack.shutdown().drain(secs(5)).await;
    eprintln!("drain after {:?}: {report:?}", t0.elapsed());
    assert!(t0.elapsed() <= secs(6));
    assert_eq!(
        report.completed + report.cancelled + report.still_streaming,
        3,
        "{report:?}"
    );
    for t in tasks {
        let r = tokio::time::timeout(secs(1), t).await.expect("answered")?;
        let e = r.map(|r| r.status()).expect_err("no answer for anyone");
        eprintln!("caller got {e}");
        assert_eq!(kind(&e), Some(RejectKind::ShuttingDown), "{e}");
    }
    assert_eq!(provider.calls(), 1, "nothing sent after the trigger");
    assert_eq!(stack.shutdown().in_flight(), 0);
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. The LLM router with one shutdown for its deployments.
// ---------------------------------------------------------------------------

/// Two deployments answering 500; the router's call waits in its backoff
/// when the shutdown (shared by every deployment's stack) is triggered.
/// Nothing reaches a provider after the trigger, the call ends
/// `ShuttingDown`, and a call made after the trigger is refused at once
/// with `ShuttingDown`.
#[tokio::test(start_paused = true)]
async fn llm_router_shutdown_with_a_call_in_backoff() -> Result<(), BoxError> {
    use semaforo::llm::LlmDeployment;
    use semaforo::shutdown::Shutdown;

    let a = Provider::new(|_| Act::Status(500));
    let b = Provider::new(|_| Act::Status(500));
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    };
    let shutdown = Shutdown::new();
    let router = LlmStack::router()
        .deployment(LlmDeployment::new("a", LlmStack::openai(tier), a.service()))
        .deployment(LlmDeployment::new("b", LlmStack::openai(tier), b.service()))
        .shutdown(shutdown.clone())
        .max_attempts(4)
        .backoff(Some(
            Backoff::exponential(secs(20))
                .jitter(Jitter::None)
                .build()?,
        ))
        .build()?;
    let call = tokio::spawn(router.clone().oneshot(chat("q")));
    tokio::time::sleep(secs(1)).await;
    let sent = a.calls() + b.calls();
    eprintln!("sent before the trigger: {sent}");
    assert!(sent >= 1);
    shutdown.trigger();
    let t = Instant::now();
    let late = router
        .clone()
        .oneshot(chat("late"))
        .await
        .map(|r| r.status());
    eprintln!("late call after {:?}: {late:?}", t.elapsed());
    let late = late.expect_err("refused");
    assert_eq!(kind(&late), Some(RejectKind::ShuttingDown), "{late}");
    assert_eq!(t.elapsed(), Duration::ZERO);
    let report = shutdown.drain(secs(30)).await;
    eprintln!("{report:?}");
    let r = tokio::time::timeout(secs(120), call)
        .await
        .expect("the call ends")?;
    eprintln!(
        "the call in backoff got {:?}",
        r.as_ref().map(|r| r.status())
    );
    assert_eq!(
        a.calls() + b.calls(),
        sent,
        "nothing sent after the trigger"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 8. Random drops at random await points through the whole preset.
// ---------------------------------------------------------------------------

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn fuzz_whole_preset(seed: u64) -> Result<(), BoxError> {
    use semaforo::cache::Cache;
    use semaforo::llm::LlmCache;
    use semaforo::quota::{HeaderKey, PlanId, Quota, Rate};
    use std::sync::atomic::AtomicBool;

    let healthy = Arc::new(AtomicBool::new(false));
    let acts: Arc<Vec<Act>> = Arc::new({
        let mut r = SplitMix(seed ^ 0xabcdef);
        (0..10_000)
            .map(|_| match r.below(10) {
                0 => Act::Status(500),
                1 => Act::Status(529),
                2 => Act::TooMany(1 + r.below(20)),
                3 => Act::Ok(secs(1_000)),
                _ => Act::Ok(Duration::from_millis(r.below(5_000))),
            })
            .collect()
    });
    let provider = Provider::new({
        let healthy = healthy.clone();
        let acts = acts.clone();
        move |n| {
            if healthy.load(Ordering::SeqCst) {
                Act::Ok(Duration::from_millis(100))
            } else {
                acts[n as usize % acts.len()]
            }
        }
    });
    let cache: LlmCache = Cache::builder()
        .ttl(secs(30))
        .stale_for(secs(3_600))
        .build()?;
    let quota: Quota<String> = Quota::builder()
        .plan("free", Rate::per_minute(20))
        .max_wait(secs(5))
        .build()?;
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 30,
        tokens_per_minute: 20_000,
    })
    .bulkhead(
        Bulkhead::builder(3)
            .max_queue(5)
            .max_wait(secs(60))
            .build()?,
    )
    .cache(cache)
    .coalesce(true)
    .stale_if_error(true)
    .quota(
        quota.clone(),
        HeaderKey::new(http::HeaderName::from_static("x-user"), PlanId::FIRST),
    )
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());

    let mut r = SplitMix(seed);
    let mut tasks = Vec::new();
    let mut t = Duration::ZERO;
    for i in 0..150 {
        t += Duration::from_millis(r.below(3_000));
        let content = match r.below(5) {
            0 => "a".to_string(),
            1 => "b".to_string(),
            2 => "c".to_string(),
            _ => format!("unique {i}"),
        };
        let user = if r.below(2) == 0 { "u1" } else { "u2" };
        let drop_after = match r.below(3) {
            0 => None,
            _ => Some(Duration::from_millis(r.below(120_000))),
        };
        let llm = llm.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(t).await;
            let mut req = chat(&content);
            req.headers_mut()
                .insert("x-user", http::HeaderValue::from_static(user));
            let fut = llm.oneshot(req);
            match drop_after {
                None => {
                    let _ = fut.await;
                }
                Some(d) => {
                    let _ = tokio::time::timeout(d, fut).await;
                }
            }
        }));
    }
    // Let everything run out: the longest wait is a hung upstream (120 s
    // attempt timeout) × 4 attempts + backoffs, and the lines' 600 s.
    tokio::time::sleep(secs(3 * 3_600)).await;
    for (i, t) in tasks.into_iter().enumerate() {
        assert!(
            t.is_finished(),
            "seed {seed}: task {i} still running after 3 h"
        );
        t.await?;
    }
    let bh = stack.bulkhead().snapshot();
    assert_eq!((bh.in_flight, bh.waiting), (0, 0), "seed {seed}: {bh:?}");
    for (k, p) in stack.pace().pacers() {
        assert_eq!(p.snapshot().waiting, 0, "seed {seed}: pacer {k}");
    }
    assert_eq!(quota.snapshot().waiting, 0, "seed {seed}");
    assert_eq!(stack.shutdown().in_flight(), 0, "seed {seed}");

    eprintln!(
        "seed {seed}: {} upstream calls, cache {:?}, quota {:?}, breaker {:?}, retries {}",
        provider.calls(),
        stack.cache().unwrap().snapshot(),
        quota.snapshot(),
        stack.breaker().snapshot().state,
        stack.retry().retries()
    );
    // The provider is healthy again: a new call goes through at once.
    healthy.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let mut req = chat("after the storm");
    req.headers_mut()
        .insert("x-user", http::HeaderValue::from_static("u3"));
    let res = llm.clone().oneshot(req).await?;
    assert_eq!(res.status(), 200, "seed {seed}");
    assert!(
        t0.elapsed() <= Duration::from_millis(100),
        "seed {seed}: took {:?}",
        t0.elapsed()
    );
    let report = stack.shutdown().drain(secs(1)).await;
    assert_eq!(
        report.completed + report.cancelled + report.still_streaming,
        0,
        "seed {seed}: {report:?}"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn llm_random_drops_leave_nothing_behind() -> Result<(), BoxError> {
    for seed in 1..=40 {
        fuzz_whole_preset(seed).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 9. A per-user budget around the stream layer, bodies read hyper's way.
// ---------------------------------------------------------------------------

/// A body of given frames whose `is_end_stream` is true as soon as the last
/// one is out (as `Full` and hyper's own bodies do).
struct Frames(std::collections::VecDeque<Bytes>);
impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn spend_available(p: &semaforo::pace::Pace) -> f64 {
    p.snapshot()
        .dims
        .iter()
        .find(|d| d.unit == semaforo::pace::Unit::Spend)
        .expect("a spend dimension")
        .available
}

/// "`stream_budget_layer`: a streamed answer is reconciled when its body
/// ends whole." Usage 5 in + 7 out at $1 / $2 per million: 19 µ$, whatever
/// `max_tokens` reserved; the stack's own pacer reconciled to 12 tokens.
#[tokio::test(start_paused = true)]
async fn llm_stream_budget_reconciles_when_read_hyper_style() -> Result<(), BoxError> {
    use semaforo::llm::{Price, PriceTable};
    use semaforo::pace::{KeyedPace, Limit, Pace};

    for one_frame in [true, false] {
        let stack = LlmStack::openai(Tier {
            requests_per_minute: 500,
            tokens_per_minute: 60_000,
        })
        .prices(PriceTable::new().price("gpt-4o-mini", Price::per_million_tokens(1.0, 0.5, 2.0)))
        .breaker(counting_breaker())
        .build()?;
        let users = KeyedPace::builder(Pace::builder().limit(Limit::spend_per_day(1_000_000)))
            .max_keys(100)
            .build()?;
        let client = service_fn(move |_req: http::Request<Bytes>| async move {
            let frames: std::collections::VecDeque<Bytes> = if one_frame {
                [Bytes::from(SSE_EVENTS.concat())].into()
            } else {
                SSE_EVENTS
                    .iter()
                    .map(|e| Bytes::from_static(e.as_bytes()))
                    .collect()
            };
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(200)
                    .header("content-type", "text/event-stream")
                    .body(Frames(frames))
                    .unwrap(),
            )
        });
        let llm = ServiceBuilder::new()
            .layer(stack.stream_budget_layer(&users, http::HeaderName::from_static("x-user-id")))
            .layer(stack.stream_layer())
            .service(client);
        let mut req = stream_chat("hola", 5_000);
        req.headers_mut()
            .insert("x-user-id", http::HeaderValue::from_static("ana"));
        let res = llm.clone().oneshot(req).await?;
        let ana = users.peek("ana").expect("ana's budget");
        let cap = 1_000_000.0;
        eprintln!(
            "one_frame={one_frame}: reserved {} µ$ at the headers",
            cap - spend_available(&ana)
        );
        let (bytes, err) = read_hyper(res.into_body()).await;
        assert_eq!(err, None);
        assert!(bytes.ends_with(b"data: [DONE]\n\n"));
        settle().await;
        let spent = cap - spend_available(&ana);
        let pace = stack.pace().peek("gpt-4o-mini").unwrap();
        let tcap = pace
            .snapshot()
            .dims
            .iter()
            .find(|d| d.unit == semaforo::pace::Unit::Tokens)
            .unwrap()
            .capacity;
        let used = tcap - tokens_available(&pace);
        let br = stack.breaker().snapshot();
        eprintln!(
            "one_frame={one_frame}: spent {spent} µ$, {used} tokens, breaker {} calls",
            br.calls_in_window
        );
        assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
        assert!(
            (used - 12.0).abs() < 1e-6,
            "one_frame={one_frame}: the pacer reconciled: {used}"
        );
        assert_eq!(
            br.calls_in_window, 1,
            "one_frame={one_frame}: one success for the breaker"
        );
        assert!(
            (spent - 19.0).abs() < 1e-6,
            "one_frame={one_frame}: the budget reconciled: {spent} µ$"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 10. Numbers the docs give for composed behaviour.
// ---------------------------------------------------------------------------

/// Retry docs: "A RetryBudget … caps retries at a ratio of recent requests
/// (default 20 % over 10 s) plus a floor (default 1/s): a failing upstream
/// sees at most ~1.2× its normal load, not 3×." The preset, breaker
/// disabled, a provider answering 500 to everything, 10 calls a second for
/// 100 s: at most 1,000 × 1.2 + 100 (floor) + a window's slack upstream.
#[tokio::test(start_paused = true)]
async fn llm_retry_budget_bounds_load_on_a_failing_upstream() -> Result<(), BoxError> {
    let provider = Provider::new(|_| Act::Status(500));
    let breaker = semaforo::breaker::Breaker::builder().build()?;
    breaker.disable();
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 1_000_000,
        tokens_per_minute: 1_000_000_000,
    })
    .bulkhead(Bulkhead::builder(10_000).max_queue(10).build()?)
    .breaker(breaker)
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let mut tasks = Vec::new();
    for i in 0..1_000u64 {
        let llm = llm.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100 * i)).await;
            let _ = llm.oneshot(chat(&format!("q{i}"))).await;
        }));
    }
    for t in tasks {
        t.await?;
    }
    let calls = provider.calls();
    eprintln!(
        "{calls} upstream calls for 1,000 requests; retries {}, gave up on budget {}",
        stack.retry().retries(),
        stack.retry().gave_up_on_budget()
    );
    assert!(calls >= 1_000);
    assert!(calls <= 1_000 + 200 + 100 + 30, "{calls} upstream calls");
    Ok(())
}

/// Coalesce docs: "Put a retry layer inside this one (the LLM preset does)
/// and the waiting callers ride along on the retries too — one retried call
/// for all of them." 10 identical callers, 500, 500, then 200: 3 upstream
/// calls, 10 answers of 200.
#[tokio::test(start_paused = true)]
async fn llm_coalesced_callers_ride_along_on_retries() -> Result<(), BoxError> {
    let provider = Provider::new(|n| match n {
        0 | 1 => Act::Status(500),
        _ => Act::Ok(secs(1)),
    });
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    })
    .retry(retry_no_jitter(4, secs(1)))
    .coalesce(true)
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let answers =
        futures::future::join_all((0..10).map(|_| llm.clone().oneshot(chat("same")))).await;
    let statuses: Vec<_> = answers
        .iter()
        .map(|a| {
            a.as_ref()
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        })
        .collect();
    eprintln!("{statuses:?}");
    assert!(statuses.iter().all(|s| *s == Ok(200)), "{statuses:?}");
    assert_eq!(provider.calls(), 3);
    Ok(())
}

/// `stale_if_error`: "with this on, the preset's own retry caps it at 5 s
/// instead of 60 s (a caller gets the stale answer now rather than a fresh
/// one in 30 s)". The breaker open (30 s): a request the cache kept is
/// answered stale at once, not after 30 s.
#[tokio::test(start_paused = true)]
async fn llm_open_breaker_is_answered_stale_at_once() -> Result<(), BoxError> {
    use semaforo::cache::Cache;
    use semaforo::fallback::FellBack;
    use semaforo::llm::LlmCache;

    let provider = Provider::new(|n| match n {
        0 => Act::Ok(Duration::ZERO),
        _ => Act::Status(503),
    });
    let cache: LlmCache = Cache::builder()
        .ttl(secs(10))
        .stale_for(secs(3_600))
        .build()?;
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    })
    .cache(cache)
    .stale_if_error(true)
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    llm.clone().oneshot(chat("kept")).await?;
    tokio::time::sleep(secs(20)).await;
    // Trip the breaker with other requests (5 consecutive failures).
    let mut n = 0;
    while stack.breaker().state() != semaforo::breaker::BreakerState::Open {
        let _ = llm.clone().oneshot(chat(&format!("other {n}"))).await;
        n += 1;
        assert!(n < 10);
    }
    let t0 = Instant::now();
    let res = llm.clone().oneshot(chat("kept")).await?;
    eprintln!(
        "answered after {:?}, {:?}",
        t0.elapsed(),
        res.extensions().get::<FellBack>()
    );
    assert!(res.extensions().get::<FellBack>().is_some());
    assert_eq!(t0.elapsed(), Duration::ZERO);
    Ok(())
}

/// The preset's documented defaults, read back: "8 concurrent calls and a
/// line of 1,000 …; a breaker opening after 5 consecutive upstream failures
/// for 30 s; … 120 s per attempt" — and with `time_scale(10)` ten times
/// faster.
#[tokio::test(start_paused = true)]
async fn llm_defaults_and_time_scale() -> Result<(), BoxError> {
    for scale in [1.0, 10.0] {
        let provider = Provider::new(|_| Act::Ok(secs(100_000)));
        let stack = LlmStack::openai(Tier {
            requests_per_minute: 500,
            tokens_per_minute: 1_000_000,
        })
        .time_scale(scale)
        .retry(Retry::builder().max_attempts(1).build()?)
        .build()?;
        let bh = stack.bulkhead().snapshot();
        assert_eq!((bh.limit, bh.max_queue), (8, 1_000));
        let llm = ServiceBuilder::new()
            .layer(stack.layer())
            .service(provider.service());
        let t0 = Instant::now();
        let e = llm.clone().oneshot(chat("q")).await.unwrap_err();
        let took = t0.elapsed();
        eprintln!("scale {scale}: hung attempt ended after {took:?}: {e}");
        assert_eq!(kind(&e), Some(RejectKind::Timeout));
        assert_eq!(took, Duration::from_secs_f64(120.0 / scale));
        // (The pacer's snapshot reports the simulated window: `per` 60 s.)
        // Five consecutive upstream failures open the breaker for 30 s ± 10 %.
        let failing = Provider::new(|_| Act::Status(500));
        let llm = ServiceBuilder::new()
            .layer(stack.layer())
            .service(failing.service());
        stack.breaker().reset(); // the timed-out attempt was one failure
        for i in 0..5 {
            assert_eq!(
                stack.breaker().state(),
                semaforo::breaker::BreakerState::Closed
            );
            let _ = llm.clone().oneshot(chat(&format!("f{i}"))).await;
        }
        let br = stack.breaker().snapshot();
        assert_eq!(br.state, semaforo::breaker::BreakerState::Open, "{br:?}");
        let ra = br.retry_after.unwrap().as_secs_f64() * scale;
        assert!((27.0..=33.0).contains(&ra), "open for {ra} (simulated) s");
    }
    Ok(())
}

/// `time_scale`: "The limits then count per simulated minute: 60 RPM at a
/// factor of 10 is 10 requests a real second." 120 calls at once to a
/// 60 RPM tier at factor 10: the burst is one (simulated) minute's 60, the
/// 120th starts 6 real seconds later — not 60.
#[tokio::test(start_paused = true)]
async fn llm_time_scale_scales_the_limits() -> Result<(), BoxError> {
    let provider = Provider::new(|_| Act::Ok(Duration::ZERO));
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 60,
        tokens_per_minute: 1_000_000,
    })
    .time_scale(10.0)
    .bulkhead(Bulkhead::builder(1_000).max_queue(1_000).build()?)
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let t0 = Instant::now();
    let answers =
        futures::future::join_all((0..120).map(|i| llm.clone().oneshot(chat(&format!("q{i}")))))
            .await;
    assert!(answers.iter().all(|a| a.is_ok()));
    let starts = provider.starts();
    let last = *starts.iter().max().unwrap() - t0;
    let p = stack.pace().peek("gpt-4o-mini").unwrap().snapshot();
    eprintln!("120th call started at {last:?}; pacer dims {:?}", p.dims);
    assert!(last <= secs(7), "the 120th call started at {last:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// 11. Shutdown seams: a drain dropped half-way, the router's count, quota line.
// ---------------------------------------------------------------------------

/// A drain future dropped after 5 s (a supervisor's own timeout around it),
/// then a second drain: it still waits for the hung call and cancels it at
/// its own deadline; the caller is answered `ShuttingDown`, nothing held.
#[tokio::test(start_paused = true)]
async fn llm_drain_dropped_half_way_then_drained_again() -> Result<(), BoxError> {
    let provider = Provider::new(|_| Act::Ok(secs(1_000)));
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    })
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let call = tokio::spawn(llm.clone().oneshot(chat("q")));
    settle().await;
    assert_eq!(stack.shutdown().in_flight(), 1);
    let first = tokio::time::timeout(secs(5), stack.shutdown().drain(secs(30))).await;
    assert!(first.is_err(), "the first drain was cut by its caller");
    assert!(!call.is_finished());
    let t0 = Instant::now();
    let report = stack.shutdown().drain(secs(10)).await;
    eprintln!("second drain after {:?}: {report:?}", t0.elapsed());
    let r = tokio::time::timeout(secs(5), call)
        .await
        .expect("the call ended")?;
    let e = r.map(|r| r.status()).expect_err("cancelled");
    assert_eq!(kind(&e), Some(RejectKind::ShuttingDown), "{e}");
    assert_eq!(report.cancelled, 1, "{report:?}");
    assert!(t0.elapsed() <= secs(11));
    assert_eq!(stack.shutdown().in_flight(), 0);
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
    Ok(())
}

/// `DrainReport::rejected`: "Calls refused after the trigger." One call to
/// an LLM router whose deployments share the shutdown, made after the
/// trigger (`LlmRouterBuilder::shutdown`: "refused once per deployment it
/// tries"): refused, and counted once per deployment, none reached.
#[tokio::test(start_paused = true)]
async fn llm_router_call_after_the_trigger_is_refused_by_each_deployment() -> Result<(), BoxError> {
    use semaforo::llm::LlmDeployment;
    use semaforo::shutdown::Shutdown;

    let a = Provider::new(|_| Act::Ok(Duration::ZERO));
    let b = Provider::new(|_| Act::Ok(Duration::ZERO));
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    };
    let shutdown = Shutdown::new();
    let router = LlmStack::router()
        .deployment(LlmDeployment::new("a", LlmStack::openai(tier), a.service()))
        .deployment(LlmDeployment::new("b", LlmStack::openai(tier), b.service()))
        .shutdown(shutdown.clone())
        .build()?;
    shutdown.trigger();
    let e = router
        .clone()
        .oneshot(chat("late"))
        .await
        .map(|r| r.status())
        .unwrap_err();
    assert_eq!(kind(&e), Some(RejectKind::ShuttingDown));
    let report = shutdown.drain(secs(1)).await;
    eprintln!("{report:?}");
    assert_eq!(report.rejected, 2, "refused by each deployment: {report:?}");
    assert_eq!(a.calls() + b.calls(), 0);
    Ok(())
}

/// The preset's build "wires" the shutdown to "the bulkhead's, the
/// pacer's and the quota's lines": a caller waiting in the quota's line
/// (wait mode) is answered `ShuttingDown` at the trigger, counted in
/// `queued_released`, and the health report says `Down`.
#[tokio::test(start_paused = true)]
async fn llm_drain_releases_the_quota_line() -> Result<(), BoxError> {
    use semaforo::health::{Health, Status};
    use semaforo::quota::{HeaderKey, PlanId, Quota, Rate};

    let provider = Provider::new(|_| Act::Ok(Duration::ZERO));
    let quota: Quota<String> = Quota::builder()
        .plan("free", Rate::per_minute(1).burst(1))
        .max_wait(secs(120))
        .build()?;
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    })
    .quota(
        quota.clone(),
        HeaderKey::new(http::HeaderName::from_static("x-user"), PlanId::FIRST),
    )
    .build()?;
    let health = stack.register_health(Health::new(stack.shutdown()), "openai");
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let as_ana = |c: &str| {
        let mut r = chat(c);
        r.headers_mut()
            .insert("x-user", http::HeaderValue::from_static("ana"));
        r
    };
    llm.clone().oneshot(as_ana("1")).await?;
    let waiting = tokio::spawn(llm.clone().oneshot(as_ana("2")));
    settle().await;
    tokio::time::sleep(secs(1)).await;
    assert_eq!(quota.snapshot().waiting, 1);
    let before = health.report();
    assert_eq!(before.in_flight, 1);
    assert_eq!(before.status, Status::Ok, "{before:?}");
    stack.shutdown().trigger();
    settle().await;
    assert!(waiting.is_finished(), "released at the trigger");
    let e = waiting.await?.map(|r| r.status()).unwrap_err();
    assert_eq!(kind(&e), Some(RejectKind::ShuttingDown), "{e}");
    let report = stack.shutdown().drain(secs(1)).await;
    eprintln!("{report:?}");
    assert_eq!(report.queued_released, 1, "{report:?}");
    assert_eq!(report.completed, 1, "{report:?}");
    assert_eq!(health.report().status, Status::Down);
    assert_eq!(quota.snapshot().waiting, 0);
    Ok(())
}

// ---------------------------------------------------------------------------
// 12. Extreme configurations of the presets: an error or a working stack.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn llm_preset_and_router_builders_at_the_extremes() -> Result<(), BoxError> {
    use semaforo::cache::Cache;
    use semaforo::llm::{LlmCache, LlmDeployment};
    use semaforo::route::Hedge;

    // time_scale outside [0.001, 1,000,000] or not finite: an error.
    for bad in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        0.0,
        -1.0,
        0.000_999,
        1_000_001.0,
    ] {
        let r = LlmStack::openai(Tier {
            requests_per_minute: 1,
            tokens_per_minute: 1,
        })
        .time_scale(bad)
        .build();
        assert!(r.is_err(), "time_scale({bad}) built");
    }
    // A tier of 0: an error.
    for (rpm, tpm) in [(0, 1), (1, 0), (0, 0)] {
        assert!(LlmStack::openai(Tier {
            requests_per_minute: rpm,
            tokens_per_minute: tpm
        })
        .build()
        .is_err());
    }
    assert!(LlmStack::anthropic(1, 0, 1).build().is_err());
    assert!(LlmStack::gemini(1, 1, 0).build().is_err());
    assert!(LlmStack::azure_openai(0).build().is_err());
    // stale_if_error without a cache that keeps answers past their TTL.
    assert!(LlmStack::openai(Tier {
        requests_per_minute: 1,
        tokens_per_minute: 1
    })
    .stale_if_error(true)
    .build()
    .is_err());
    let no_stale: LlmCache = Cache::builder().ttl(secs(10)).build()?;
    assert!(LlmStack::openai(Tier {
        requests_per_minute: 1,
        tokens_per_minute: 1
    })
    .cache(no_stale)
    .stale_if_error(true)
    .build()
    .is_err());

    // Working stacks at the extremes answer (or refuse) without panicking.
    for scale in [0.001, 1.0, 1_000_000.0] {
        for (rpm, tpm) in [(1, 1), (u64::MAX, u64::MAX), (1, u64::MAX), (u64::MAX, 1)] {
            let cache: LlmCache = Cache::builder()
                .ttl(Duration::MAX)
                .stale_for(Duration::MAX)
                .build()?;
            let stack = LlmStack::openai(Tier {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
            })
            .time_scale(scale)
            .cache(cache)
            .coalesce(true)
            .stale_if_error(true)
            .build()?;
            let provider = Provider::new(|_| Act::Ok(Duration::ZERO));
            let llm = ServiceBuilder::new()
                .layer(stack.layer())
                .service(provider.service());
            for i in 0..3 {
                let r = tokio::time::timeout(
                    secs(24 * 3_600),
                    llm.clone().oneshot(chat(&format!("q{}", i % 2))),
                )
                .await
                .unwrap_or_else(|_| panic!("scale {scale}, tier ({rpm}, {tpm}): call {i} hangs"));
                if let Err(e) = &r {
                    eprintln!("scale {scale}, tier ({rpm}, {tpm}): call {i}: {e}");
                }
            }
        }
    }

    // The router: no deployment, hedge shares outside (0, 1], a bad quantile.
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    };
    let p = Provider::new(|_| Act::Ok(Duration::ZERO));
    assert!(LlmStack::router().build().is_err());
    for (share, q) in [
        (0.0, 0.5),
        (1.5, 0.5),
        (f64::NAN, 0.5),
        (0.1, f64::NAN),
        (0.1, 1.5),
        (0.1, -0.1),
    ] {
        let r = LlmStack::router()
            .deployment(LlmDeployment::new("a", LlmStack::openai(tier), p.service()))
            .hedge(
                Hedge::Percentile {
                    quantile: q,
                    warm_up: 1,
                },
                share,
            )
            .build();
        assert!(r.is_err(), "hedge share {share}, quantile {q} built");
    }
    assert!(LlmStack::router()
        .deployment(LlmDeployment::new("a", LlmStack::openai(tier), p.service()).weight(0))
        .build()
        .is_err());
    assert!(LlmStack::router()
        .deployment(LlmDeployment::new("a", LlmStack::openai(tier), p.service()))
        .max_attempts(0)
        .build()
        .is_err());
    // Deadlines of 0 and Duration::MAX, hedging at once and after MAX.
    for deadline in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
        for hedge in [Hedge::After(Duration::ZERO), Hedge::After(Duration::MAX)] {
            let router = LlmStack::router()
                .deployment(LlmDeployment::new("a", LlmStack::openai(tier), p.service()))
                .deployment(LlmDeployment::new("b", LlmStack::openai(tier), p.service()))
                .deadline(deadline)
                .hedge(hedge, 1.0)
                .build()?;
            let r = tokio::time::timeout(secs(3_600), router.oneshot(chat("q")))
                .await
                .unwrap_or_else(|_| panic!("deadline {deadline:?}: hangs"));
            eprintln!(
                "router deadline {deadline:?}, {hedge:?}: {:?}",
                r.map(|r| r.status())
            );
        }
    }
    Ok(())
}

/// README, graceful shutdown: "drain with a deadline, cancel the rest
/// (streamed bodies end with an SSE error event)". The LLM preset's own
/// streams (SSE) at the drain deadline: ended with an `event: error`, the
/// bulkhead's permit back — not left open past the deadline.
#[tokio::test(start_paused = true)]
async fn llm_stream_open_at_the_drain_deadline_is_ended() -> Result<(), BoxError> {
    let provider = StreamProvider::held();
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 60_000,
    })
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.stream_layer())
        .service(provider.service());
    let res = llm.clone().oneshot(stream_chat("hola", 100)).await?;
    assert_eq!(
        res.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/event-stream"[..])
    );
    let reader = tokio::spawn(read_hyper(res.into_body()));
    settle().await;
    let report = stack.shutdown().drain(secs(5)).await;
    eprintln!(
        "{report:?}; bulkhead in flight after the drain: {}",
        stack.bulkhead().snapshot().in_flight
    );
    settle().await;
    assert!(
        reader.is_finished(),
        "the stream is still open after the drain: {report:?}"
    );
    let (bytes, err) = reader.await?;
    eprintln!("read {:?}, {err:?}", String::from_utf8_lossy(&bytes));
    assert_eq!(report.still_streaming, 0, "{report:?}");
    assert_eq!(report.cancelled, 1, "{report:?}");
    assert_eq!(report.completed, 0, "counted once: {report:?}");
    assert_eq!(stack.shutdown().in_flight(), 0);
    // Ended with the drain's SSE error event, after what the provider sent.
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.ends_with(semaforo::shutdown::DRAIN_EVENT), "{text:?}");
    assert!(
        text.len() > semaforo::shutdown::DRAIN_EVENT.len(),
        "{text:?}"
    );
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
    Ok(())
}

/// A request naming its model whose cost can never fit: which pacer
/// refused it? ("Every other model gets a pacer of its own … the rest, and
/// requests without a model, share one more.")
#[tokio::test(start_paused = true)]
async fn llm_never_fitting_cost_is_refused_by_the_models_pacer() -> Result<(), BoxError> {
    let provider = Provider::new(|_| Act::Ok(Duration::ZERO));
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let big = http::Request::post("/v1/chat/completions")
        .body(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","max_tokens":10000000,"messages":[{"role":"user","content":"hola"}]}"#,
        ))
        .unwrap();
    let e = llm
        .clone()
        .oneshot(big)
        .await
        .map(|r| r.status())
        .unwrap_err();
    let r = Rejected::from_box(&e).unwrap();
    eprintln!("{e}; name {:?}; pacers {:?}", r.name(), stack.pace().keys());
    assert_eq!(r.kind(), RejectKind::BudgetExceeded);
    assert_eq!(r.retry_after(), None);
    assert!(!e.to_string().contains("overflow"), "{e}");
    assert!(
        r.name().is_some_and(|n| n.ends_with("gpt-4o-mini")),
        "{:?}",
        r.name()
    );
    // Refused by a pacer built for it and not kept: no place taken.
    assert!(stack.pace().keys().is_empty(), "{:?}", stack.pace().keys());
    Ok(())
}

/// A model given its own (larger) profile: a request that fits that
/// profile's burst but not the stack's goes through its model's pacer.
#[tokio::test(start_paused = true)]
async fn llm_given_model_with_a_larger_burst_admits_what_fits_it() -> Result<(), BoxError> {
    use semaforo::llm::Profile;
    let provider = Provider::new(|_| Act::Ok(Duration::ZERO));
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .model(
        "big",
        Profile::openai(Tier {
            requests_per_minute: 500,
            tokens_per_minute: 20_000_000,
        }),
    )
    .build()?;
    let llm = ServiceBuilder::new()
        .layer(stack.layer())
        .service(provider.service());
    let req = http::Request::post("/v1/chat/completions")
        .body(Bytes::from_static(
            br#"{"model":"big","max_tokens":1000000,"messages":[{"role":"user","content":"hola"}]}"#,
        ))
        .unwrap();
    let r = llm.clone().oneshot(req).await.map(|r| r.status());
    eprintln!("{r:?}");
    assert_eq!(r.map_err(|e| e.to_string())?, 200);
    Ok(())
}

/// The stream router over two deployments sharing one shutdown: "a"
/// fails before its first chunk (an `event: error`), "b" streams; the
/// caller reads hyper's way. Afterwards nothing is held anywhere, "a"'s
/// breaker saw one failure and "b"'s one success.
#[tokio::test(start_paused = true)]
async fn llm_stream_router_fails_over_and_settles() -> Result<(), BoxError> {
    use semaforo::llm::LlmDeployment;
    use semaforo::shutdown::Shutdown;

    let client = |fail: bool| {
        service_fn(move |_req: http::Request<Bytes>| async move {
            let frames: std::collections::VecDeque<Bytes> = if fail {
                [Bytes::from_static(
                    b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
                )]
                .into()
            } else {
                SSE_EVENTS
                    .iter()
                    .map(|e| Bytes::from_static(e.as_bytes()))
                    .collect()
            };
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(200)
                    .header("content-type", "text/event-stream")
                    .body(Frames(frames))
                    .unwrap(),
            )
        })
    };
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 60_000,
    };
    let shutdown = Shutdown::new();
    let a_stack = LlmStack::openai(tier).breaker(counting_breaker());
    let b_stack = LlmStack::openai(tier).breaker(counting_breaker());
    let router = LlmStack::stream_router()
        .deployment(LlmDeployment::streaming("a", a_stack, client(true)).preference(0))
        .deployment(LlmDeployment::streaming("b", b_stack, client(false)).preference(1))
        .shutdown(shutdown.clone())
        .build()?;
    let res = router.clone().oneshot(stream_chat("hola", 100)).await?;
    let (bytes, err) = read_hyper(res.into_body()).await;
    assert_eq!(err, None);
    assert!(
        bytes.ends_with(b"data: [DONE]\n\n"),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    settle().await;
    assert_eq!(shutdown.in_flight(), 0);
    let report = shutdown.drain(secs(1)).await;
    assert_eq!(
        report.completed + report.cancelled + report.still_streaming,
        0,
        "{report:?}"
    );
    Ok(())
}

/// The same count for calls in flight (`LlmRouterBuilder::shutdown`: "a call
/// hedged to two deployments is two calls in flight (and two in the drain
/// report)"), and the drain waits for both.
#[tokio::test(start_paused = true)]
async fn llm_router_hedged_call_counts_once_per_deployment() -> Result<(), BoxError> {
    use semaforo::llm::LlmDeployment;
    use semaforo::route::Hedge;
    use semaforo::shutdown::Shutdown;

    let a = Provider::new(|_| Act::Ok(secs(10)));
    let b = Provider::new(|_| Act::Ok(secs(10)));
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 1_000_000,
    };
    let shutdown = Shutdown::new();
    let router = LlmStack::router()
        .deployment(LlmDeployment::new("a", LlmStack::openai(tier), a.service()))
        .deployment(LlmDeployment::new("b", LlmStack::openai(tier), b.service()))
        .hedge(Hedge::After(secs(1)), 1.0)
        .shutdown(shutdown.clone())
        .build()?;
    let call = tokio::spawn(router.clone().oneshot(chat("q")));
    tokio::time::sleep(secs(2)).await;
    assert_eq!(a.calls() + b.calls(), 2, "hedged");
    let n = shutdown.in_flight();
    let report = shutdown.drain(secs(30)).await;
    eprintln!("in flight {n}; {report:?}");
    call.await??;
    assert_eq!(n, 2, "one call in flight per deployment");
    assert_eq!(
        report.completed + report.cancelled + report.still_streaming,
        2,
        "{report:?}"
    );
    Ok(())
}

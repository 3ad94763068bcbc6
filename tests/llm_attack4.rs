//! An outside tester's attack (round 4) on the LLM side: chaos through the
//! preset, degrade, stale-if-error, cache-control, canonical keys, budgets,
//! Gemini paths, streamed bodies read as hyper reads them, the stream router
//! and cancellation at every poll. Learned from README, rustdoc and examples.
#![cfg(all(feature = "llm", feature = "chaos"))]
#![allow(clippy::type_complexity)]

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use semaforo::cache::Cache;
use semaforo::chaos::{Chaos, ChaosBody, Fault};
use semaforo::classify::{Class, Permanent};
use semaforo::degrade::{Degrade, DegradeLayer, Level, Rule};
use semaforo::fallback::FellBack;
use semaforo::llm::{
    LlmCache, LlmDeployment, LlmKey, LlmStack, Price, PriceTable, Profile, Prompt, StreamFailed,
};
use semaforo::pace::{Cost, KeyedPace, Limit, Pace, Unit, Weigh};
use semaforo::share::{RequestKey, Served};
use semaforo::shutdown::Shutdown;
use semaforo::{BoxError, RejectKind, Rejected};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

// ---------------------------------------------------------------- helpers

#[path = "support/llm_http.rs"]
mod llm_http;
#[path = "support/llm_stack.rs"]
mod llm_stack;
use llm_http::{chat, ok, req, status, Res, USAGE_10};
use llm_stack::{assert_idle, big_tier, charged, no_retry, noop_poll, read_like_hyper};
type Answer = Arc<dyn Fn(usize, &http::Request<Bytes>) -> Res + Send + Sync>;

#[derive(Clone)]
struct Mock {
    calls: Arc<AtomicUsize>,
    f: Answer,
}

impl Mock {
    fn new(f: impl Fn(usize, &http::Request<Bytes>) -> Res + Send + Sync + 'static) -> Self {
        Mock {
            calls: Arc::new(AtomicUsize::new(0)),
            f: Arc::new(f),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<http::Request<Bytes>> for Mock {
    type Response = Res;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Res, std::io::Error>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<Bytes>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok((self.f)(n, &req)))
    }
}

/// A future that is pending `n` times (waking itself) before it is ready.
struct YieldN(usize);
impl Future for YieldN {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            Poll::Ready(())
        } else {
            self.0 -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// A whole-answer client whose answers take `yields` polls.
#[derive(Clone)]
struct Slow {
    calls: Arc<AtomicUsize>,
    yields: usize,
}

impl Service<http::Request<Bytes>> for Slow {
    type Response = Res;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Res, std::io::Error>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: http::Request<Bytes>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let y = self.yields;
        Box::pin(async move {
            YieldN(y).await;
            Ok(ok(USAGE_10))
        })
    }
}

/// A deterministic request (`temperature: 0`): cached and coalesced.
fn det(content: &str) -> http::Request<Bytes> {
    req(serde_json::json!({
        "model": "m", "max_tokens": 10, "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    })
    .to_string())
}

/// A streamed body of given frames (data, trailers or errors);
/// `is_end_stream` once all are out, as hyper's `Incoming` after the last
/// frame of a sized body.
struct Frames {
    q: VecDeque<Result<Frame<Bytes>, BoxError>>,
}

impl Frames {
    fn new(chunks: Vec<Bytes>) -> Self {
        Frames {
            q: chunks.into_iter().map(|c| Ok(Frame::data(c))).collect(),
        }
    }
    fn of(items: Vec<Result<Frame<Bytes>, BoxError>>) -> Self {
        Frames { q: items.into() }
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.q.pop_front())
    }
    fn is_end_stream(&self) -> bool {
        self.q.is_empty()
    }
}

type StreamAnswer = Arc<dyn Fn(usize) -> http::Response<Frames> + Send + Sync>;

#[derive(Clone)]
struct StreamMock {
    calls: Arc<AtomicUsize>,
    f: StreamAnswer,
}

impl StreamMock {
    fn new(f: impl Fn(usize) -> http::Response<Frames> + Send + Sync + 'static) -> Self {
        StreamMock {
            calls: Arc::new(AtomicUsize::new(0)),
            f: Arc::new(f),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<http::Request<Bytes>> for StreamMock {
    type Response = http::Response<Frames>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<http::Response<Frames>, std::io::Error>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: http::Request<Bytes>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok((self.f)(n)))
    }
}

fn sse(body: Frames) -> http::Response<Frames> {
    http::Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

fn stream_of(chunks: Vec<Bytes>) -> http::Response<Frames> {
    sse(Frames::new(chunks))
}

fn streamed_chat(model: &str, max_tokens: u64) -> http::Request<Bytes> {
    req(serde_json::json!({
        "model": model, "max_tokens": max_tokens, "stream": true, "temperature": 0,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "abcdefgh"}],
    })
    .to_string())
}

const CHUNK1: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\n";
const USAGE_CHUNK: &[u8] =
    b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n";
const DONE: &[u8] = b"data: [DONE]\n\n";

fn stream_failed(e: &BoxError) -> Option<&StreamFailed> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&**e);
    while let Some(x) = cur {
        if let Some(s) = x.downcast_ref::<StreamFailed>() {
            return Some(s);
        }
        cur = x.source();
    }
    None
}

// ------------------------------------------------------ 1. chaos in the stack

/// chaos docs: "[`rate_limited`], a 429 with `Retry-After` and
/// `x-ratelimit-*` headers ... what our classifier and pacer read
/// (`Throttled` with that wait; the pacer pauses for it)"; LlmStack::openai:
/// "Retry-After honoured up to 60 s"; pace: "a 429 gives back everything".
#[tokio::test(start_paused = true)]
async fn chaos_429_in_the_stack_is_retried_after_its_wait_and_refunded() {
    let stack = LlmStack::openai(big_tier()).build().unwrap();
    let chaos: Chaos<Res> = Chaos::builder()
        .fault(
            Fault::respond(semaforo::chaos::rate_limited(Duration::from_millis(1_500)))
                .between(Duration::ZERO, Duration::from_millis(1)),
        )
        .build()
        .unwrap();
    chaos.enable();
    let mock = Mock::new(|_, _| ok(USAGE_10));
    let svc = stack.layer().layer(chaos.layer().layer(mock.clone()));
    let t0 = Instant::now();
    let res = svc.oneshot(chat("m", 100, "abcd")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        t0.elapsed() >= Duration::from_millis(1_500),
        "retried after {:?}, before the 1.5 s asked",
        t0.elapsed()
    );
    assert_eq!(chaos.calls(), 2);
    assert_eq!(
        charged(&stack.pace().peek("m").unwrap(), Unit::Tokens),
        10.0,
        "only the usage of the answer that succeeded"
    );
    assert_idle(&stack);
}

/// chaos::rate_limited: "`retry-after` (whole seconds, rounded up),
/// `retry-after-ms`" — for any wait a user may give, no panic.
// Found: `as_secs() + 1` overflowed for Duration::MAX (fixed: `time::ceil_secs` saturates).
#[test]
fn chaos_rate_limited_with_extreme_waits_never_panics() {
    let waits = [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_millis(1_500),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ];
    let mut failures = Vec::new();
    for d in waits {
        let r = std::panic::catch_unwind(|| semaforo::chaos::rate_limited::<Bytes>(d)());
        match r {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("rate_limited({d:?}) panicked: {msg}"));
            }
            Ok(res) => {
                assert_eq!(res.status(), 429);
                let ra: u128 = res.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                // Whole seconds rounded up, saturating at u64::MAX.
                let want = (d.as_secs() as u128 + u128::from(d.subsec_nanos() > 0))
                    .min(u128::from(u64::MAX));
                if ra != want {
                    failures.push(format!(
                        "rate_limited({d:?}): retry-after {ra}, want {want}"
                    ));
                }
                assert!(res.headers().contains_key("retry-after-ms"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// chaos body docs: `cut_stream`: "After this many data chunks, an error (a
/// connection reset mid-stream: a [`StreamFailed`] of class `Transient`),
/// then the end"; preset: "the breaker's verdict until the body's last chunk
/// (a failure mid-stream counts as one)"; stream_budget_layer: "cut short,
/// its estimate stands".
#[tokio::test(start_paused = true)]
async fn chaos_cut_stream_through_the_preset_is_a_transient_stream_failure() {
    let stack = LlmStack::openai(big_tier()).build().unwrap();
    let chaos: Chaos<http::Response<ChaosBody<Frames>>> = Chaos::builder()
        .fault(Fault::cut_stream(1))
        .build()
        .unwrap();
    chaos.enable();
    let mock = StreamMock::new(|_| {
        stream_of(vec![
            Bytes::from_static(CHUNK1),
            Bytes::from_static(USAGE_CHUNK),
            Bytes::from_static(DONE),
        ])
    });
    let r = streamed_chat("m", 1_000);
    let est = stack.estimate().weigh(&r).total_tokens();
    let res = stack
        .stream_layer()
        .layer(chaos.stream_layer().layer(mock))
        .oneshot(r)
        .await
        .unwrap();
    let (out, err) = read_like_hyper(res.into_body()).await;
    assert_eq!(out, CHUNK1);
    let err = err.expect("the cut must reach the reader as an error");
    let sf = stream_failed(&err).unwrap_or_else(|| panic!("not a StreamFailed: {err}"));
    assert_eq!(sf.class, Class::Transient, "{sf:?}");
    assert_eq!(stack.breaker().snapshot().consecutive_failures, 1);
    assert_eq!(
        charged(&stack.pace().peek("m").unwrap(), Unit::Tokens),
        est as f64
    );
    assert_idle(&stack);
}

/// `stall_stream`: "nothing more, ever (your idle timeout's job)"; the
/// preset's stream timeout: "between chunks" (default 30 s).
#[tokio::test(start_paused = true)]
async fn chaos_stalled_stream_is_ended_by_the_idle_timeout_and_released() {
    let stack = LlmStack::openai(big_tier()).build().unwrap();
    let chaos: Chaos<http::Response<ChaosBody<Frames>>> = Chaos::builder()
        .fault(Fault::stall_stream(1))
        .build()
        .unwrap();
    chaos.enable();
    let mock = StreamMock::new(|_| {
        stream_of(vec![
            Bytes::from_static(CHUNK1),
            Bytes::from_static(USAGE_CHUNK),
            Bytes::from_static(DONE),
        ])
    });
    let res = stack
        .stream_layer()
        .layer(chaos.stream_layer().layer(mock))
        .oneshot(streamed_chat("m", 1_000))
        .await
        .unwrap();
    let t0 = Instant::now();
    let (out, err) =
        tokio::time::timeout(Duration::from_secs(600), read_like_hyper(res.into_body()))
            .await
            .expect("a stalled stream hung past 600 s");
    assert_eq!(out, CHUNK1);
    assert!(err.is_some(), "a stalled stream must end with an error");
    assert!(
        t0.elapsed() >= Duration::from_secs(30) && t0.elapsed() <= Duration::from_secs(31),
        "idle timeout fired after {:?}",
        t0.elapsed()
    );
    assert_idle(&stack);
}

/// `Fault::hang`: "Calls that never answer (your timeout's job)"; the
/// preset: "120 s per attempt", 4 attempts.
#[tokio::test(start_paused = true)]
async fn chaos_hang_is_cut_by_the_attempt_timeout_and_retried() {
    let stack = LlmStack::openai(big_tier()).build().unwrap();
    let chaos: Chaos<Res> = Chaos::builder()
        .fault(Fault::hang().between(Duration::ZERO, Duration::from_secs(1)))
        .build()
        .unwrap();
    chaos.enable();
    let mock = Mock::new(|_, _| ok(USAGE_10));
    let svc = stack.layer().layer(chaos.layer().layer(mock));
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(1_000), svc.oneshot(chat("m", 10, "x")))
        .await
        .expect("hung")
        .unwrap();
    assert_eq!(res.status(), 200);
    let e = t0.elapsed();
    assert!(
        e >= Duration::from_secs(120) && e <= Duration::from_secs(160),
        "{e:?}"
    );
    assert_idle(&stack);
}

// ------------------------------------------------------------- 2. degrade

/// degrade docs: "[`Degrade::set`] / [`Degrade::set_for`] (an override with
/// an expiry) win over the rules"; rules with `after` / `recover_after`;
/// `spawn`: "it ends when the last `Degrade` clone is dropped". A user may
/// say "for ever" with `Duration::MAX`: no panic anywhere.
#[tokio::test(start_paused = true)]
async fn degrade_with_duration_max_never_panics() {
    let sw = Degrade::builder()
        .rule(
            Rule::new(Level::Reduced, || true)
                .after(Duration::MAX)
                .recover_after(Duration::MAX),
        )
        .build()
        .unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sw.evaluate();
        sw.set_for(Level::Minimal, Duration::MAX);
        sw.level()
    }));
    assert!(r.is_ok(), "set_for(Duration::MAX) / evaluate panicked");
    assert_eq!(sw.level(), Level::Minimal);
    tokio::time::sleep(Duration::from_secs(86_400 * 365)).await;
    assert_eq!(
        sw.level(),
        Level::Minimal,
        "a Duration::MAX override expired"
    );
    sw.release();
    // `after(Duration::MAX)`: the rule never turns active.
    sw.evaluate();
    assert_eq!(sw.level(), Level::Normal);

    let sw2 = Degrade::builder()
        .every(Duration::MAX)
        .rule(Rule::new(Level::Reduced, || false))
        .build();
    if let Ok(sw2) = sw2 {
        let h = sw2.spawn().unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            !h.is_finished(),
            "the evaluation task ended while the switch is alive"
        );
        drop(sw2);
        let _ = h.await; // ends (not a panic)
    }
}

/// DegradeLayer: "the level in each request's extensions and, when not
/// `Normal`, an `x-degrade-level` header on each response".
#[tokio::test(start_paused = true)]
async fn degrade_layer_marks_requests_and_responses_around_the_preset() {
    let stack = LlmStack::openai(big_tier()).build().unwrap();
    let sw = Degrade::builder().build().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let mock = Mock::new(move |_, r| {
        s2.lock()
            .unwrap()
            .push(r.extensions().get::<Level>().copied());
        ok(USAGE_10)
    });
    let svc = ServiceBuilder::new()
        .layer(DegradeLayer::new(&sw))
        .layer(stack.layer())
        .service(mock);
    let res = svc.clone().oneshot(chat("m", 10, "x")).await.unwrap();
    assert!(res.headers().get("x-degrade-level").is_none());
    sw.set(Level::Reduced);
    let res = svc.clone().oneshot(chat("m", 10, "x")).await.unwrap();
    assert_eq!(res.headers()["x-degrade-level"], "reduced");
    // Also on a refusal turned into a response? At least on failures answered.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, vec![Some(Level::Normal), Some(Level::Reduced)]);
}

// ------------------------------------------------- 3. stale-if-error, cache

fn stale_stack(mock_mode: Arc<AtomicUsize>) -> (LlmStack, Mock, LlmCache) {
    let cache: LlmCache = Cache::builder()
        .ttl(Duration::from_secs(10))
        .stale_for(Duration::from_secs(86_400))
        .build()
        .unwrap();
    let stack = LlmStack::openai(big_tier())
        .cache(cache.clone())
        .stale_if_error(true)
        .build()
        .unwrap();
    let mock = Mock::new(move |_, _| match mock_mode.load(Ordering::SeqCst) {
        0 => ok(
            r#"{"choices":[{"message":{"content":"good"}}],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
        ),
        1 => status(
            529,
            &[],
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ),
        2 => status(
            400,
            &[],
            r#"{"error":{"message":"maximum context length","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
        ),
        3 => status(
            429,
            &[],
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
        ),
        _ => status(
            500,
            &[],
            r#"{"error":{"message":"boom","type":"server_error"}}"#,
        ),
    });
    (stack, mock, cache)
}

/// stale_if_error: "`Overloaded`, `Infrastructure`, `Transient` — a 5xx, a
/// timeout — an open breaker ...; never a `Permanent` answer nor a quota's
/// refusal ... The answer carries [`FellBack`] and [`Served::Cache`] (its
/// age, `stale`) in its extensions, and an `age` header; it is never cached
/// again".
#[tokio::test(start_paused = true)]
async fn stale_if_error_serves_overloads_and_5xx_never_permanent_answers() {
    let mode = Arc::new(AtomicUsize::new(0));
    let (stack, mock, cache) = stale_stack(mode.clone());
    let svc = stack.layer().layer(mock.clone());
    let fresh = svc.clone().oneshot(det("hola")).await.unwrap();
    assert_eq!(fresh.status(), 200);
    cache.run_pending_tasks();
    let stores = cache.snapshot().stores;
    assert_eq!(stores, 1);
    tokio::time::sleep(Duration::from_secs(20)).await;

    for (m, want_stale) in [(1, true), (2, false), (3, false), (4, true)] {
        mode.store(m, Ordering::SeqCst);
        let r = svc.clone().oneshot(det("hola")).await;
        match r {
            Ok(res) => {
                let fell = res.extensions().get::<FellBack>().is_some();
                assert_eq!(
                    fell,
                    want_stale,
                    "mode {m}: status {} fell back: {fell}",
                    res.status()
                );
                if want_stale {
                    assert_eq!(res.status(), 200);
                    match res.extensions().get::<Served>() {
                        Some(Served::Cache { stale: true, age }) => {
                            assert!(*age >= Duration::from_secs(20), "{age:?}")
                        }
                        other => panic!("mode {m}: served {other:?}"),
                    }
                    assert!(res.headers().contains_key("age"), "mode {m}: no age header");
                } else {
                    assert_ne!(
                        res.status(),
                        200,
                        "mode {m}: a permanent failure answered 200"
                    );
                }
            }
            Err(e) => assert!(!want_stale, "mode {m}: not answered stale: {e}"),
        }
        cache.run_pending_tasks();
        assert_eq!(
            cache.snapshot().stores,
            stores,
            "mode {m}: a fallback was cached"
        );
    }
}

/// cache docs: "[`http_cache_control`] honours the caller's `Cache-Control:
/// no-store` (bypass)"; directives are read "trimmed and lowercased";
/// LlmKey: "a request with `cache-control: no-store` has no key (it is
/// neither cached nor coalesced)".
#[tokio::test(start_paused = true)]
async fn a_request_cache_control_no_store_in_any_spelling_bypasses_the_cache() {
    for cc in [
        "no-store",
        "NO-STORE",
        " no-store ",
        "no-cache, no-store",
        "max-age=0, no-store",
        "private, no-store",
    ] {
        let cache: LlmCache = Cache::builder()
            .ttl(Duration::from_secs(600))
            .build()
            .unwrap();
        let stack = LlmStack::openai(big_tier())
            .cache(cache.clone())
            .coalesce(true)
            .build()
            .unwrap();
        let mock = Mock::new(|_, _| ok(USAGE_10));
        let svc = stack.layer().layer(mock.clone());
        for _ in 0..2 {
            let mut r = det("hola");
            r.headers_mut().insert("cache-control", cc.parse().unwrap());
            assert!(
                LlmKey::new().key(&r).is_none(),
                "{cc:?}: LlmKey gave a key to a no-store request"
            );
            svc.clone().oneshot(r).await.unwrap();
        }
        cache.run_pending_tasks();
        assert_eq!(mock.calls(), 2, "{cc:?}: answered from the cache");
        assert_eq!(cache.snapshot().stores, 0, "{cc:?}: stored");
    }
}

/// cache docs: "[`WholeResponse`]: 2xx without `Cache-Control: no-store` or
/// `private`" is kept.
#[tokio::test(start_paused = true)]
async fn an_answer_marked_no_store_or_private_in_any_spelling_is_not_kept() {
    let shapes: Vec<Vec<&str>> = vec![
        vec!["no-store"],
        vec!["No-Store"],
        vec!["max-age=60, private"],
        vec!["PRIVATE"],
        vec!["max-age=60", "no-store"],
    ];
    for ccs in shapes {
        let cache: LlmCache = Cache::builder()
            .ttl(Duration::from_secs(600))
            .build()
            .unwrap();
        let stack = LlmStack::openai(big_tier())
            .cache(cache.clone())
            .build()
            .unwrap();
        let c2 = ccs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mock = Mock::new(move |_, _| {
            let mut b = http::Response::builder();
            for c in &c2 {
                b = b.header("cache-control", c.as_str());
            }
            b.body(Bytes::from_static(USAGE_10.as_bytes())).unwrap()
        });
        let svc = stack.layer().layer(mock.clone());
        svc.clone().oneshot(det("hola")).await.unwrap();
        svc.clone().oneshot(det("hola")).await.unwrap();
        cache.run_pending_tasks();
        assert_eq!(mock.calls(), 2, "{ccs:?}: answered from the cache");
        assert_eq!(cache.snapshot().stores, 0, "{ccs:?}");
    }
}

// ------------------------------------------------------------- 4. LlmKey

fn keyed(body: &str) -> Option<semaforo::llm::LlmRequestKey> {
    let r = http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-1")
        .body(Bytes::from(body.to_owned()))
        .unwrap();
    LlmKey::new().key(&r)
}

/// LlmKey: "A body that is not a JSON object, a number whose digits were
/// lost in parsing (an integer beyond `i64`/`u64`, or one written as a float
/// — `9007199254740993.0` — past 2^53; integers within `i64`/`u64` are kept
/// exactly) ... has no key (it is neither cached nor coalesced)".
#[test]
fn numbers_whose_digits_were_lost_have_no_key_the_others_are_exact() {
    let body = |n: &str| format!(r#"{{"model":"m","temperature":0,"seed":{n},"messages":[]}}"#);
    for lost in [
        "18446744073709551616",
        "-9223372036854775809",
        "9007199254740993.0",
    ] {
        assert!(keyed(&body(lost)).is_none(), "seed {lost} has a key");
    }
    for (a, b) in [
        ("9007199254740993", "9007199254740992"),
        ("-9007199254740993", "-9007199254740992"),
        ("18446744073709551615", "18446744073709551614"),
    ] {
        let (ka, kb) = (keyed(&body(a)), keyed(&body(b)));
        assert!(ka.is_some() && kb.is_some(), "{a} / {b} keyed");
        assert_ne!(ka, kb, "{a} and {b} are different requests");
    }
}

/// LlmKey: "object fields in sorted order, no whitespace, numbers in one
/// form (`0`, `0.0` and `0e0` are one number), so the same request written
/// another way is one key".
#[test]
fn the_same_request_written_another_way_is_one_key() {
    let pairs = [
        (
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hola"}]}"#,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"\u0068ola"}]}"#,
        ),
        (
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"é"}]}"#,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"\u00e9"}]}"#,
        ),
        (
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"a/b"}]}"#,
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"a\/b"}]}"#,
        ),
        (
            r#"{"model":"m","temperature":0,"max_tokens":100,"messages":[]}"#,
            r#"{"model":"m","temperature":0,"max_tokens":1e2,"messages":[]}"#,
        ),
        (
            r#"{"model":"m","temperature":0,"max_tokens":100,"messages":[]}"#,
            r#"{"model":"m","temperature":0,"max_tokens":100.0,"messages":[]}"#,
        ),
        (
            r#"{"model":"m","temperature":0,"top_p":0.5,"messages":[]}"#,
            r#"{"model":"m","temperature":0,"top_p":5e-1,"messages":[]}"#,
        ),
        (
            r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"x"}]}"#,
            "{\n  \"messages\" : [ { \"content\" : \"x\" ,\t\"role\" : \"user\" } ] ,\r\n  \"temperature\" : 0E0 , \"model\" : \"m\"\n}",
        ),
    ];
    let mut bad = Vec::new();
    for (a, b) in pairs {
        let ka = keyed(a);
        let kb = keyed(b);
        if ka.is_none() || ka != kb {
            bad.push(format!(
                "{a}  vs  {b}: {:?} / {:?}",
                ka.is_some(),
                kb.is_some()
            ));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// LlmKey: "a whole number past 2^53 (its digits were lost in parsing),
/// nesting deeper than 128 ... has no key"; Gemini's
/// `generationConfig.temperature` counts.
#[test]
fn keys_at_the_documented_edges() {
    assert!(
        keyed(r#"{"model":"m","temperature":0,"seed":9007199254740992,"messages":[]}"#).is_some()
    );
    for past in [
        "9007199254740993",
        "-9007199254740993",
        "18446744073709551615",
        "123456789012345678901234567890",
    ] {
        let b = format!(r#"{{"model":"m","temperature":0,"seed":{past},"messages":[]}}"#);
        // Two such requests, differing only past 2^53, must never share.
        let b2 = b.replace(past, &format!("{past}0"));
        assert!(keyed(&b).is_none() || keyed(&b) != keyed(&b2), "{past}");
    }
    assert!(keyed(
        r#"{"contents":[{"parts":[{"text":"hola"}]}],"generationConfig":{"temperature":0}}"#
    )
    .is_some());
    let nest = |d: usize| {
        format!(
            r#"{{"model":"m","temperature":0,"x":{}1{}}}"#,
            "[".repeat(d),
            "]".repeat(d)
        )
    };
    assert!(keyed(&nest(100)).is_some(), "100 deep");
    assert!(keyed(&nest(200)).is_none(), "200 deep");
    assert!(keyed(&nest(1_000_000)).is_none(), "1,000,000 deep");
    // Different credentials, different keys.
    let with = |h: &str, v: &str| {
        let r = http::Request::post("/v1/chat/completions")
            .header(h, v)
            .body(Bytes::from_static(
                br#"{"model":"m","temperature":0,"messages":[]}"#,
            ))
            .unwrap();
        LlmKey::new().key(&r)
    };
    assert_ne!(
        with("authorization", "Bearer a"),
        with("authorization", "Bearer b")
    );
    assert_ne!(with("x-api-key", "a"), with("x-api-key", "b"));
}

// -------------------------------------------- 5. odd requests in the stack

/// Preset: "A body that is not such JSON is all text"; keys: "nesting deeper
/// than 128 ... has no key"; every call completes, never a panic, never a
/// hang; a refusal is at once.
#[tokio::test(start_paused = true)]
async fn hostile_request_bodies_through_cache_and_coalescing_never_panic() {
    let deep = format!(
        r#"{{"model":"m","temperature":0,"messages":{}{}}}"#,
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    let deep_obj = format!(
        r#"{{"model":"m","temperature":0,"messages":[{{"role":"user","content":{}"x"{}}}]}}"#,
        r#"{"a":"#.repeat(100_000),
        "}".repeat(100_000)
    );
    let long_model = format!(
        r#"{{"model":"{}","temperature":0,"max_tokens":5,"messages":[]}}"#,
        "m".repeat(100_000)
    );
    let mut bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"[".repeat(500_000),
        b"{".repeat(500_000),
        deep.into_bytes(),
        deep_obj.into_bytes(),
        long_model.into_bytes(),
        br#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"\ud800"}]}"#.to_vec(),
        br#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"\udc00\ud800x"}]}"#.to_vec(),
        br#"{"model":"m\u0000","temperature":0,"messages":[]}"#.to_vec(),
        br#"{"model":"\ud83d\ude00","temperature":0,"max_tokens":5,"messages":[]}"#.to_vec(),
        b"{\"model\":\"m\",\"temperature\":0,\"messages\":[{\"role\":\"user\",\"content\":\"a\xff\xfeb\"}]}".to_vec(),
        br#"{"model":"m","temperature":0,"max_tokens":1e400,"messages":[]}"#.to_vec(),
        br#"{"model":"m","temperature":1e400,"messages":[]}"#.to_vec(),
        br#"{"model":"a","model":"b","temperature":0,"temperature":1,"messages":[]}"#.to_vec(),
        br#"{"model":"m","max_tokens":-1,"n":-3,"messages":[]}"#.to_vec(),
        br#"{"model":"m","max_tokens":"12","n":"2","messages":[]}"#.to_vec(),
        br#"{"model":"m","max_tokens":null,"n":null,"temperature":null,"messages":null}"#.to_vec(),
        br#"{"model":123,"max_tokens":{},"messages":"hola"}"#.to_vec(),
        b"\xef\xbb\xbf{\"model\":\"m\",\"temperature\":0,\"messages\":[]}".to_vec(),
        b"{\"model\":\"m\",\"temperature\":0,\"messages\":[]} trailing".to_vec(),
        b"{\"model\":\"m\",\"temperature\":0,\"messages\":[]}{\"model\":\"m\"}".to_vec(),
    ];
    bodies.push(vec![0u8; 10_000]);
    bodies.push((0..=255u8).cycle().take(100_000).collect());
    let cache: LlmCache = Cache::builder()
        .ttl(Duration::from_secs(600))
        .build()
        .unwrap();
    let stack = LlmStack::openai(big_tier())
        .cache(cache)
        .coalesce(true)
        .cache_key(LlmKey::new().nondeterministic(true))
        .build()
        .unwrap();
    let mock = Mock::new(|_, _| ok(USAGE_10));
    let svc = stack.layer().layer(mock.clone());
    for (i, b) in bodies.into_iter().enumerate() {
        let show = String::from_utf8_lossy(&b[..b.len().min(60)]).into_owned();
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(700), svc.clone().oneshot(req(b)))
            .await
            .unwrap_or_else(|_| panic!("#{i} {show:?}: hung"));
        match r {
            Ok(res) => assert_eq!(res.status(), 200, "#{i} {show:?}"),
            Err(e) => {
                assert!(Rejected::from_box(&e).is_some(), "#{i} {show:?}: {e}");
                assert_eq!(t0.elapsed(), Duration::ZERO, "#{i} {show:?}: refused late");
            }
        }
        assert_idle(&stack);
    }
}

/// cost docs: "every number is added with saturating arithmetic (a
/// `max_tokens` of `u64::MAX` is a cost of `u64::MAX`, which no budget
/// admits — never a wrapped tiny cost)"; `n` choices multiply the output.
#[tokio::test(start_paused = true)]
async fn a_huge_n_is_a_huge_cost_refused_at_once_never_a_wrapped_small_one() {
    let stack = LlmStack::openai(big_tier()).build().unwrap();
    let mock = Mock::new(|_, _| ok(USAGE_10));
    let svc = stack.layer().layer(mock.clone());
    for body in [
        r#"{"model":"m","max_tokens":4294967296,"n":4294967296,"messages":[]}"#,
        r#"{"model":"m","max_tokens":18446744073709551615,"n":2,"messages":[]}"#,
        r#"{"model":"m","max_tokens":1000,"n":1e30,"messages":[]}"#,
        r#"{"model":"m","max_tokens":1000,"n":"1e30","messages":[]}"#,
    ] {
        let p = Prompt::read(Bytes::from_static(body.as_bytes()));
        let est = stack.estimate().weigh(&req(body));
        assert!(
            est.total_tokens() > 1_000_000,
            "{body}: estimated {} tokens (max_output {:?}, choices {})",
            est.total_tokens(),
            p.max_output(),
            p.choices()
        );
        let t0 = Instant::now();
        let e = svc.clone().oneshot(req(body)).await.unwrap_err();
        let r = Rejected::from_box(&e).unwrap_or_else(|| panic!("{body}: {e}"));
        assert_eq!(r.kind(), RejectKind::BudgetExceeded, "{body}");
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }
    assert_eq!(mock.calls(), 0);
    assert_idle(&stack);
}

// ------------------------------------------------ 6. odd answers, classes

/// LlmClassifier: "A 2xx is a `Success` unless its body ... has a top-level
/// `error` that is not `null` ... an overloaded model answered `200` is not
/// kept by a cache, and is retried".
#[tokio::test(start_paused = true)]
async fn a_200_error_body_is_retried_and_a_nested_error_key_is_not() {
    let cases: [(&str, usize); 5] = [
        (
            r#"{"error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            2,
        ),
        (r#"{ "error" : "boom" }"#, 2),
        (
            r#"{"error":null,"choices":[],"usage":{"total_tokens":3}}"#,
            1,
        ),
        (
            r#"{"choices":[{"message":{"content":"x"},"error":{"code":1}}],"usage":{"total_tokens":3}}"#,
            1,
        ),
        (
            r#"{"choices":[{"message":{"content":"say \"error\": {}"}}]}"#,
            1,
        ),
    ];
    for (first, want_calls) in cases {
        let stack = LlmStack::openai(big_tier()).build().unwrap();
        let f = first.to_owned();
        let mock = Mock::new(move |n, _| if n == 0 { ok(&f) } else { ok(USAGE_10) });
        let res = stack
            .layer()
            .layer(mock.clone())
            .oneshot(chat("m", 10, "x"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(mock.calls(), want_calls, "{first}");
        assert_idle(&stack);
    }
}

/// usage: "negatives as 0, floats rounded up and saturated, `null` as
/// absent"; whatever the answer says, nothing panics and the next call is
/// answered or refused at once (never hangs).
#[tokio::test(start_paused = true)]
async fn odd_usage_in_answers_never_panics_nor_wedges_the_next_call() {
    let usages = [
        r#"{"usage":{"prompt_tokens":-5,"completion_tokens":-5,"total_tokens":-10}}"#,
        r#"{"usage":{"prompt_tokens":"7","completion_tokens":"3"}}"#,
        r#"{"usage":{"prompt_tokens":null,"completion_tokens":null,"total_tokens":null}}"#,
        r#"{"usage":null}"#,
        r#"{"usage":[]}"#,
        r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":2.5}}"#,
        r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615}}"#,
        r#"{"usage":{"prompt_tokens":1e30,"completion_tokens":1}}"#,
        r#"{"usage":{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":99}}}"#,
        r#"{"usage":{"input_tokens":5,"cache_read_input_tokens":-4,"cache_creation_input_tokens":1e300,"output_tokens":1}}"#,
        r#"{"usageMetadata":{"promptTokenCount":10,"cachedContentTokenCount":50,"candidatesTokenCount":1}}"#,
        r#"{"usage":{"total_tokens":5,"prompt_tokens":100,"completion_tokens":100}}"#,
    ];
    for u in usages {
        let stack = LlmStack::openai(big_tier()).build().unwrap();
        let u2 = u.to_owned();
        let mock = Mock::new(move |n, _| if n == 0 { ok(&u2) } else { ok(USAGE_10) });
        let svc = stack.layer().layer(mock);
        svc.clone().oneshot(chat("m", 10, "abcd")).await.unwrap();
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(700),
            svc.clone().oneshot(chat("m", 10, "abcd")),
        )
        .await
        .unwrap_or_else(|_| panic!("{u}: the next call hung"));
        if let Err(e) = r {
            assert_eq!(t0.elapsed(), Duration::ZERO, "{u}: refused late: {e}");
        }
        assert_idle(&stack);
    }
}

/// A negative usage is 0: the estimate is given back whole.
#[tokio::test(start_paused = true)]
async fn a_negative_usage_is_reconciled_to_zero() {
    let stack = LlmStack::openai(big_tier()).build().unwrap();
    let mock = Mock::new(|_, _| ok(r#"{"usage":{"prompt_tokens":-5,"completion_tokens":-5}}"#));
    stack
        .layer()
        .layer(mock)
        .oneshot(chat("m", 100, "abcd"))
        .await
        .unwrap();
    assert_eq!(charged(&stack.pace().peek("m").unwrap(), Unit::Tokens), 0.0);
}

// --------------------------------------------- 7. streams read like hyper

/// sse: "an error event ends the body with a [`StreamFailed`] error after
/// the frame that carried it" — also when that frame is the body's last
/// (hyper stops reading at `is_end_stream`).
#[tokio::test(start_paused = true)]
async fn an_error_event_in_the_last_frame_reaches_a_hyper_style_reader() {
    let shapes: Vec<Vec<&'static [u8]>> = vec![
        vec![CHUNK1, b"event: error\ndata: {\"error\":{\"type\":\"overloaded_error\",\"message\":\"o\"}}\n\n"],
        vec![b"data: {\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\nevent: error\ndata: {\"error\":{\"type\":\"api_error\",\"message\":\"x\"}}\n\n"],
        vec![CHUNK1, b"data: {\"error\":{\"message\":\"boom\",\"code\":500}}\n\n"],
    ];
    for chunks in shapes {
        let stack = LlmStack::openai(big_tier()).build().unwrap();
        let c2: Vec<Bytes> = chunks.iter().map(|c| Bytes::from_static(c)).collect();
        let mock = StreamMock::new(move |_| stream_of(c2.clone()));
        let res = stack
            .stream_layer()
            .layer(mock)
            .oneshot(streamed_chat("m", 100))
            .await
            .unwrap();
        let (out, err) = read_like_hyper(res.into_body()).await;
        let all: Vec<u8> = chunks.concat();
        assert_eq!(out, all, "every byte handed over");
        assert!(
            err.as_ref().and_then(stream_failed).is_some(),
            "{:?}: the reader never saw the failure ({:?})",
            String::from_utf8_lossy(&all),
            err.map(|e| e.to_string())
        );
        assert_eq!(
            stack.breaker().snapshot().consecutive_failures,
            1,
            "{:?}",
            String::from_utf8_lossy(&all)
        );
        assert_idle(&stack);
    }
}

/// A stream whose usage is in its last frame, read like hyper, is reconciled
/// ("reconciles the pacer with the stream's usage").
#[tokio::test(start_paused = true)]
async fn usage_in_the_last_frame_read_like_hyper_is_reconciled() {
    for chunks in [
        vec![CHUNK1, USAGE_CHUNK],
        vec![CHUNK1, USAGE_CHUNK, DONE],
        vec![b"data: {\"choices\":[{\"delta\":{\"content\":\"ho\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n" as &[u8]],
    ] {
        let stack = LlmStack::openai(big_tier()).build().unwrap();
        let c2: Vec<Bytes> = chunks.iter().map(|c| Bytes::from_static(c)).collect();
        let mock = StreamMock::new(move |_| stream_of(c2.clone()));
        let res = stack
            .stream_layer()
            .layer(mock)
            .oneshot(streamed_chat("m", 1_000))
            .await
            .unwrap();
        let body = res.into_body();
        let (_, err) = read_like_hyper(body).await;
        assert!(err.is_none());
        assert_eq!(
            charged(&stack.pace().peek("m").unwrap(), Unit::Tokens),
            7.0,
            "{} frames",
            chunks.len()
        );
        assert_idle(&stack);
    }
}

/// StreamFailed's class: `classify_error_body` rules ("Anthropic
/// `overloaded_error` → `Overloaded`, `rate_limit_error` → `Throttled`,
/// `api_error` → `Transient`; Gemini `RESOURCE_EXHAUSTED` → `Throttled`");
/// the breaker "reads the class (429s never trip it)".
#[tokio::test(start_paused = true)]
async fn mid_stream_errors_have_their_class_and_throttles_do_not_trip_the_breaker() {
    let cases: [(&str, fn(&Class) -> bool, u32); 5] = [
        (
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
            |c| matches!(c, Class::Overloaded { .. }),
            1,
        ),
        (
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"slow down\"}}\n\n",
            |c| matches!(c, Class::Throttled { .. }),
            0,
        ),
        (
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"x\"}}\n\n",
            |c| matches!(c, Class::Transient),
            1,
        ),
        (
            "data: {\"error\":{\"code\":429,\"message\":\"q\",\"status\":\"RESOURCE_EXHAUSTED\"}}\n\n",
            |c| matches!(c, Class::Throttled { .. }),
            0,
        ),
        (
            "data: {\"error\":{\"message\":\"ctx\",\"type\":\"invalid_request_error\",\"code\":\"context_length_exceeded\"}}\n\n",
            |c| {
                matches!(
                    c,
                    Class::Permanent {
                        reason: Permanent::ContextLengthExceeded
                    }
                )
            },
            0,
        ),
    ];
    let mut bad = Vec::new();
    for (ev, want, breaker_failures) in cases {
        let stack = LlmStack::openai(big_tier()).build().unwrap();
        let chunks = vec![
            Bytes::from_static(CHUNK1),
            Bytes::from(ev),
            Bytes::from_static(DONE),
        ];
        let mock = StreamMock::new(move |_| stream_of(chunks.clone()));
        let res = stack
            .stream_layer()
            .layer(mock)
            .oneshot(streamed_chat("m", 100))
            .await
            .unwrap();
        let (_, err) = read_like_hyper(res.into_body()).await;
        let err = err.expect("error event");
        let sf = stream_failed(&err).expect("StreamFailed");
        if !want(&sf.class) {
            bad.push(format!("{ev:?}: class {:?}", sf.class));
        }
        let f = stack.breaker().snapshot().consecutive_failures;
        if f != breaker_failures {
            bad.push(format!(
                "{ev:?}: breaker counted {f} failures, want {breaker_failures}"
            ));
        }
        assert_idle(&stack);
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// LlmStreamBody: "the client's body `B`, frame for frame" — trailers too.
#[tokio::test(start_paused = true)]
async fn trailers_of_a_stream_reach_the_caller() {
    let stack = LlmStack::openai(big_tier()).build().unwrap();
    let mock = StreamMock::new(|_| {
        let mut t = http::HeaderMap::new();
        t.insert("x-trailer", "1".parse().unwrap());
        sse(Frames::of(vec![
            Ok(Frame::data(Bytes::from_static(CHUNK1))),
            Ok(Frame::data(Bytes::from_static(USAGE_CHUNK))),
            Ok(Frame::trailers(t)),
        ]))
    });
    let res = stack
        .stream_layer()
        .layer(mock)
        .oneshot(streamed_chat("m", 100))
        .await
        .unwrap();
    let c = res.into_body().collect().await.unwrap();
    assert_eq!(
        c.trailers().map(|t| t["x-trailer"].clone()),
        Some("1".parse().unwrap())
    );
    assert_idle(&stack);
}

// ------------------------------------------------------- 8. stream router

/// LlmStreamRouter: "a stream fails over until its first chunk, never
/// after"; FirstChunk: "a stream failing before any byte reached the caller
/// fails over".
#[tokio::test(start_paused = true)]
async fn the_stream_router_fails_over_before_the_first_chunk_never_after() {
    // a: the body fails before any byte.
    let a = StreamMock::new(|_| {
        sse(Frames::of(vec![Err(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )) as BoxError)]))
    });
    let b = StreamMock::new(|_| {
        stream_of(vec![
            Bytes::from_static(CHUNK1),
            Bytes::from_static(USAGE_CHUNK),
            Bytes::from_static(DONE),
        ])
    });
    let router = LlmStack::stream_router()
        .deployment(LlmDeployment::streaming(
            "a",
            LlmStack::openai(big_tier()),
            a.clone(),
        ))
        .deployment(LlmDeployment::streaming(
            "b",
            LlmStack::openai(big_tier()),
            b.clone(),
        ))
        .build()
        .unwrap();
    let res = router
        .clone()
        .oneshot(streamed_chat("m", 100))
        .await
        .unwrap();
    let (out, err) = read_like_hyper(res.into_body()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(out, [CHUNK1, USAGE_CHUNK, DONE].concat());
    assert_eq!((a.calls(), b.calls()), (1, 1));

    // c: one chunk, then (a moment later) a failure: never failed over.
    #[derive(Clone)]
    struct C(Arc<AtomicUsize>);
    impl Service<http::Request<Bytes>> for C {
        type Response = http::Response<PendOnce>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<Self::Response, std::io::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _r: http::Request<Bytes>) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            let items: VecDeque<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(CHUNK1))),
                Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "reset",
                )) as BoxError),
            ]
            .into();
            std::future::ready(Ok(http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(PendOnce { items, pend: false })
                .unwrap()))
        }
    }
    let cc = Arc::new(AtomicUsize::new(0));
    let d = StreamMock::new(|_| stream_of(vec![Bytes::from_static(b"data: {}\n\n")]));
    let router = LlmStack::stream_router()
        .deployment(LlmDeployment::streaming(
            "c",
            LlmStack::openai(big_tier()),
            C(cc.clone()),
        ))
        .deployment(LlmDeployment::streaming(
            "d",
            LlmStack::openai(big_tier()),
            d.clone(),
        ))
        .build()
        .unwrap();
    let res = router.oneshot(streamed_chat("m", 100)).await.unwrap();
    let (out, err) = read_like_hyper(res.into_body()).await;
    assert_eq!(out, CHUNK1);
    assert!(err.is_some());
    assert_eq!((cc.load(Ordering::SeqCst), d.calls()), (1, 0));
}

/// FirstChunk: "answers a 2xx response once its body gave its first
/// non-empty data frame ..., with every frame that was ready at once after it
/// (up to 16 frames or 64 KiB); a body error before then is the call's error
/// (so the router ... may fail over)" — an error ready with the first chunk
/// fails over, and the caller sees only the other deployment's bytes.
#[tokio::test(start_paused = true)]
async fn the_stream_router_fails_over_an_error_ready_with_the_first_chunk() {
    let c = StreamMock::new(|_| {
        sse(Frames::of(vec![
            Ok(Frame::data(Bytes::from_static(CHUNK1))),
            Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset",
            )) as BoxError),
        ]))
    });
    let d = StreamMock::new(|_| stream_of(vec![Bytes::from_static(b"data: {}\n\n")]));
    let router = LlmStack::stream_router()
        .deployment(LlmDeployment::streaming(
            "c",
            LlmStack::openai(big_tier()),
            c.clone(),
        ))
        .deployment(LlmDeployment::streaming(
            "d",
            LlmStack::openai(big_tier()),
            d.clone(),
        ))
        .build()
        .unwrap();
    let res = router.oneshot(streamed_chat("m", 100)).await.unwrap();
    let (out, err) = read_like_hyper(res.into_body()).await;
    assert_eq!((c.calls(), d.calls()), (1, 1));
    assert_eq!(out, b"data: {}\n\n");
    assert!(err.is_none());
}

/// LlmFuture: "Dropping it at any point releases what the call held (its
/// place in line, permit, reservation)" — through the router, whole and
/// streamed, polled 1..N times with a noop waker and dropped.
#[tokio::test(start_paused = true)]
async fn router_futures_dropped_after_any_poll_hold_nothing() {
    let shutdown = Shutdown::new();
    let ba = semaforo::bulkhead::Bulkhead::builder(2)
        .max_queue(10)
        .build()
        .unwrap();
    let bb = semaforo::bulkhead::Bulkhead::builder(2)
        .max_queue(10)
        .build()
        .unwrap();
    let slow = Slow {
        calls: Arc::new(AtomicUsize::new(0)),
        yields: 5,
    };
    let fail = Mock::new(|_, _| status(503, &[], r#"{"error":{"message":"x"}}"#));
    let router = LlmStack::router()
        .deployment(LlmDeployment::new(
            "a",
            LlmStack::openai(big_tier()).bulkhead(ba.clone()),
            fail,
        ))
        .deployment(LlmDeployment::new(
            "b",
            LlmStack::openai(big_tier()).bulkhead(bb.clone()),
            slow.clone(),
        ))
        .shutdown(shutdown.clone())
        .build()
        .unwrap();
    for n in 1..=30 {
        let mut f = Box::pin(router.clone().oneshot(chat("m", 10, "x")));
        for _ in 0..n {
            if noop_poll(f.as_mut()).is_ready() {
                break;
            }
        }
        drop(f);
        let (sa, sb) = (ba.snapshot(), bb.snapshot());
        assert_eq!((sa.in_flight, sa.waiting), (0, 0), "n={n}: a held");
        assert_eq!((sb.in_flight, sb.waiting), (0, 0), "n={n}: b held");
        assert_eq!(shutdown.in_flight(), 0, "n={n}");
    }
    // Still usable.
    let res = tokio::time::timeout(Duration::from_secs(600), router.oneshot(chat("m", 10, "x")))
        .await
        .expect("hung");
    assert!(res.is_ok(), "{:?}", res.err().map(|e| e.to_string()));
}

// ------------------------------------------- 9. cancellation, coalescing

/// LlmFuture: "Dropping it at any point releases what the call held" —
/// with the cache and coalescing on, a leader dropped at any poll hands over
/// to the follower ("a dropped caller hands over to a waiting one").
#[tokio::test(start_paused = true)]
async fn coalesced_calls_dropped_at_any_poll_hand_over_and_hold_nothing() {
    let cache: LlmCache = Cache::builder()
        .ttl(Duration::from_secs(600))
        .build()
        .unwrap();
    let stack = LlmStack::openai(big_tier())
        .cache(cache.clone())
        .coalesce(true)
        .build()
        .unwrap();
    let slow = Slow {
        calls: Arc::new(AtomicUsize::new(0)),
        yields: 8,
    };
    let svc = stack.layer().layer(slow.clone());
    for n in 1..=25 {
        let content = format!("q{n}");
        let mut lead = Box::pin(svc.clone().oneshot(det(&content)));
        let mut follow = Box::pin(svc.clone().oneshot(det(&content)));
        let mut done = false;
        for _ in 0..n {
            if noop_poll(lead.as_mut()).is_ready() {
                done = true;
                break;
            }
            let _ = noop_poll(follow.as_mut());
        }
        drop(lead);
        let r = tokio::time::timeout(Duration::from_secs(60), follow)
            .await
            .unwrap_or_else(|_| panic!("n={n} (leader done: {done}): the follower hung"));
        assert_eq!(r.unwrap().status(), 200, "n={n}");
        assert_idle(&stack);
        assert_eq!(
            stack.pace().peek("m").map(|p| p.snapshot().waiting),
            Some(0)
        );
    }
    // Every drop at every poll, alone.
    for n in 1..=25 {
        let mut f = Box::pin(svc.clone().oneshot(det(&format!("solo{n}"))));
        for _ in 0..n {
            if noop_poll(f.as_mut()).is_ready() {
                break;
            }
        }
        drop(f);
        assert_idle(&stack);
        let again = tokio::time::timeout(
            Duration::from_secs(60),
            svc.clone().oneshot(det(&format!("solo{n}"))),
        )
        .await
        .unwrap_or_else(|_| panic!("n={n}: the same request after a drop hung"));
        assert_eq!(again.unwrap().status(), 200);
    }
}

/// Coalescing streams: "put a [`CoalesceLayer`] sharing with [`FanOut`]
/// around the [`stream_layer`] — identical streamed requests are then one
/// call through the bulkhead, the pacer and the provider, and every caller
/// reads the same chunks"; "a dropped caller hands over".
#[tokio::test(start_paused = true)]
async fn coalesced_streams_one_call_same_bytes_one_charge_and_early_drops() {
    use semaforo::coalesce::CoalesceLayer;
    use semaforo::share::FanOut;
    let stack = LlmStack::openai(big_tier()).build().unwrap();
    let mock = StreamMock::new(|_| {
        stream_of(vec![
            Bytes::from_static(CHUNK1),
            Bytes::from_static(CHUNK1),
            Bytes::from_static(USAGE_CHUNK),
            Bytes::from_static(DONE),
        ])
    });
    let llm = CoalesceLayer::new(LlmKey::new())
        .share(FanOut::default())
        .layer(stack.stream_layer().layer(mock.clone()));
    let (r1, r2, r3) = tokio::join!(
        llm.clone().oneshot(streamed_chat("m", 1_000)),
        llm.clone().oneshot(streamed_chat("m", 1_000)),
        llm.clone().oneshot(streamed_chat("m", 1_000)),
    );
    let (r1, r2, r3) = (r1.unwrap(), r2.unwrap(), r3.unwrap());
    assert_eq!(mock.calls(), 1);
    // The first reader drops after one frame.
    let mut b1 = Box::pin(r1.into_body());
    let _ = b1.frame().await;
    drop(b1);
    let (o2, e2) = read_like_hyper(r2.into_body()).await;
    let (o3, e3) = read_like_hyper(r3.into_body()).await;
    assert!(e2.is_none() && e3.is_none());
    let all = [CHUNK1, CHUNK1, USAGE_CHUNK, DONE].concat();
    assert_eq!(o2, all);
    assert_eq!(o3, all);
    assert_eq!(charged(&stack.pace().peek("m").unwrap(), Unit::Tokens), 7.0);
    assert_idle(&stack);
}

// ------------------------------------------------------- 10. spend budgets

fn m_prices() -> PriceTable {
    PriceTable::new().price("m", Price::per_million_tokens(1.0, 0.5, 2.0))
}

/// budget_layer: "each call reserves its estimate on the pacer of its key
/// and is reconciled with its priced usage; a call that failed is billed
/// nothing (a 429 gives back everything)".
#[tokio::test(start_paused = true)]
async fn a_user_budget_bills_failed_calls_nothing_and_successes_their_usage() {
    let stack = LlmStack::openai(big_tier())
        .retry(no_retry())
        .prices(m_prices())
        .build()
        .unwrap();
    let users = KeyedPace::builder(
        Pace::builder().limit(Limit::spend_per_day(1_000_000).resets_daily("UTC")),
    )
    .max_keys(100)
    .build()
    .unwrap();
    let usage = r#""usage":{"prompt_tokens":1000,"completion_tokens":500}"#;
    let answers: Vec<(Res, f64)> = vec![
        (
            status(
                500,
                &[],
                &format!(r#"{{"error":{{"message":"x","type":"server_error"}},{usage}}}"#),
            ),
            0.0,
        ),
        (
            status(
                400,
                &[],
                &format!(
                    r#"{{"error":{{"message":"bad","type":"invalid_request_error"}},{usage}}}"#
                ),
            ),
            0.0,
        ),
        (
            status(
                429,
                &[("retry-after", "1")],
                &format!(r#"{{"error":{{"code":"rate_limit_exceeded","message":"x"}},{usage}}}"#),
            ),
            0.0,
        ),
        (
            status(
                200,
                &[],
                &format!(r#"{{"error":{{"type":"overloaded_error","message":"o"}},{usage}}}"#),
            ),
            0.0,
        ),
        (
            status(200, &[], &format!(r#"{{"choices":[],{usage}}}"#)),
            2_000.0,
        ),
    ];
    for (i, (answer, want)) in answers.into_iter().enumerate() {
        let users_i = KeyedPace::builder(
            Pace::builder().limit(Limit::spend_per_day(1_000_000).resets_daily("UTC")),
        )
        .max_keys(100)
        .build()
        .unwrap();
        let _ = &users;
        let a = Arc::new(Mutex::new(Some(answer)));
        let mock = Mock::new(move |_, _| a.lock().unwrap().take().unwrap_or_else(|| ok("{}")));
        let svc = ServiceBuilder::new()
            .layer(stack.budget_layer(&users_i, http::HeaderName::from_static("x-user-id")))
            .layer(stack.layer())
            .service(mock);
        let mut r = chat("m", 20_000, "abcd");
        r.headers_mut().insert("x-user-id", "ana".parse().unwrap());
        let _ = svc.oneshot(r).await;
        let p = users_i.peek("ana").expect("ana's pacer");
        assert_eq!(charged(&p, Unit::Spend), want, "answer #{i}");
    }
}

/// stream_budget_layer: "a streamed answer is reconciled when its body ends
/// whole (cut short, its estimate stands)".
#[tokio::test(start_paused = true)]
async fn a_user_stream_budget_is_reconciled_whole_and_kept_when_cut() {
    let stack = LlmStack::openai(big_tier())
        .prices(m_prices())
        .build()
        .unwrap();
    let usage_chunk = Bytes::from_static(
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1000,\"completion_tokens\":500}}\n\n",
    );
    for cut in [false, true] {
        let users = KeyedPace::builder(
            Pace::builder().limit(Limit::spend_per_day(1_000_000).resets_daily("UTC")),
        )
        .max_keys(100)
        .build()
        .unwrap();
        let uc = usage_chunk.clone();
        let mock = StreamMock::new(move |_| {
            stream_of(vec![
                Bytes::from_static(CHUNK1),
                uc.clone(),
                Bytes::from_static(DONE),
            ])
        });
        let svc = ServiceBuilder::new()
            .layer(stack.stream_budget_layer(&users, http::HeaderName::from_static("x-user-id")))
            .layer(stack.stream_layer())
            .service(mock);
        let mut r = streamed_chat("m", 20_000);
        r.headers_mut().insert("x-user-id", "ana".parse().unwrap());
        let est = stack.estimate().weigh(&r).amount(Unit::Spend);
        let res = svc.oneshot(r).await.unwrap();
        let mut body = Box::pin(res.into_body());
        if cut {
            let _ = body.frame().await;
            drop(body);
        } else {
            while let Some(f) = body.frame().await {
                f.unwrap();
            }
            drop(body);
        }
        let want = if cut { est as f64 } else { 2_000.0 };
        assert_eq!(
            charged(&users.peek("ana").unwrap(), Unit::Spend),
            want,
            "cut: {cut}"
        );
    }
}

/// Gemini: the model is read from the path ("a body without a `model` takes
/// it from the path as Gemini's API puts it there"), priced from the
/// defaults (`gemini-2.5-flash`: 0.30 / 0.03 / 2.50), usage from
/// `usageMetadata`.
#[tokio::test(start_paused = true)]
async fn gemini_path_models_are_paced_and_priced_as_that_model() {
    let stack = LlmStack::with_profile(
        Profile::gemini(1_000, 1_000_000, 10_000).limit(Limit::spend_per_day(100_000_000)),
    )
    .build()
    .unwrap();
    let mock = Mock::new(|_, _| {
        ok(
            r#"{"candidates":[],"usageMetadata":{"promptTokenCount":1000,"candidatesTokenCount":1000,"totalTokenCount":2000}}"#,
        )
    });
    let svc = stack.layer().layer(mock);
    for path in [
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "/v1beta/models/gemini-2.5-flash:generateContent?key=abc",
        "/v1/models/gemini-2.5-flash:generateContent?alt=json&key=abc",
    ] {
        let r = http::Request::post(path)
            .body(Bytes::from_static(
                br#"{"contents":[{"role":"user","parts":[{"text":"hola"}]}],"generationConfig":{"maxOutputTokens":100}}"#,
            ))
            .unwrap();
        svc.clone().oneshot(r).await.unwrap();
    }
    let keys = stack.pace().keys();
    assert_eq!(keys, ["gemini-2.5-flash"], "pacers: {keys:?}");
    // 3 × (1,000 × 0.30 + 1,000 × 2.50) = 8,400 µ$.
    assert_eq!(
        charged(&stack.pace().peek("gemini-2.5-flash").unwrap(), Unit::Spend),
        8_400.0
    );
}

/// Price: "From dollars per million tokens ... (each rounded to the nearest
/// micro-dollar; negative or not finite: 0)"; `of`: "rounded up,
/// saturating".
#[test]
fn prices_at_the_extremes() {
    let zero = Price::per_million_tokens(f64::INFINITY, f64::NAN, -3.0);
    assert_eq!(
        zero.of(&Cost::split(1_000_000, 1_000_000).with_cached_input(5)),
        0
    );
    let huge = Price::per_million_tokens(1e300, 1e300, 1e300);
    assert_eq!(
        huge.of(&Cost::split(u64::MAX, u64::MAX).with_cached_input(u64::MAX)),
        u64::MAX
    );
    let p = Price::per_million_tokens(0.15, 0.075, 0.60);
    assert_eq!(p.of(&Cost::split(1, 0)), 1, "0.15 µ$ rounded up");
    assert_eq!(p.of(&Cost::split(0, 0)), 0);
    // A Gemini `models/` prefix and dated snapshots.
    let t = PriceTable::defaults();
    assert_eq!(t.get("models/gemini-2.5-flash"), t.get("gemini-2.5-flash"));
    assert!(t.get("gemini-2.5-flash").is_some());
    assert_eq!(t.get("gpt-4o-2024-08-06"), t.get("gpt-4o"));
    assert_eq!(t.get("gpt-4o-20240806"), t.get("gpt-4o"));
    assert_ne!(t.get("gpt-4o-2024-05-13"), t.get("gpt-4o"));
    assert_eq!(t.get(""), None);
    assert_eq!(t.get("-2024-08-06"), None);
}

// ---------------------------------------------------- 11. retry-after forms

/// PriceTable::get: "as a dated snapshot of a listed model (the name
/// followed by `-YYYY-MM-DD` or `-YYYYMMDD`)" — month 13, day 45 is no date.
// Found: `is_date` checked digits only (fixed: a day of the calendar).
#[test]
fn doc_a_snapshot_suffix_that_is_no_date_is_another_model() {
    let t = PriceTable::defaults();
    assert_eq!(t.get("gpt-4o-2024-13-45"), None, "gpt-4o-2024-13-45");
    assert_eq!(t.get("gpt-4o-99999999"), None, "gpt-4o-99999999");
}

/// `Retry-After` "in either form: delta-seconds or an HTTP-date"; the
/// preset: "Retry-After honoured up to 60 s"; retry: "A `Retry-After`
/// longer than this is returned at once".
#[tokio::test(start_paused = true)]
async fn http_date_retry_afters_through_the_preset() {
    let future = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(10));
    let far = "Fri, 31 Dec 9999 23:59:59 GMT".to_owned();
    let past = "Sun, 06 Nov 1994 08:49:37 GMT".to_owned();
    for (ra, at_once, bound) in [
        (future, false, Duration::from_secs(12)),
        (past, false, Duration::from_secs(31)),
        (far, true, Duration::ZERO),
    ] {
        let stack = LlmStack::openai(big_tier()).build().unwrap();
        let ra2 = ra.clone();
        let mock = Mock::new(move |n, _| {
            if n == 0 {
                status(
                    429,
                    &[("retry-after", ra2.as_str())],
                    r#"{"error":{"code":"rate_limit_exceeded","message":"x"}}"#,
                )
            } else {
                ok(USAGE_10)
            }
        });
        let svc = stack.layer().layer(mock.clone());
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(700),
            svc.clone().oneshot(chat("m", 10, "x")),
        )
        .await
        .unwrap_or_else(|_| panic!("{ra}: hung"));
        if at_once {
            assert_eq!(t0.elapsed(), Duration::ZERO, "{ra}");
            let not_ok = match &r {
                Ok(res) => res.status() == 429,
                Err(_) => true,
            };
            assert!(not_ok, "{ra}: a wait past the ceiling was waited");
            // The next call is not held for the year 9999.
            let t1 = Instant::now();
            let r2 = tokio::time::timeout(
                Duration::from_secs(700),
                svc.clone().oneshot(chat("m", 10, "x")),
            )
            .await;
            assert!(r2.is_ok(), "{ra}: the next call hung 700 s");
            assert!(
                t1.elapsed() <= Duration::from_secs(61),
                "{ra}: next call waited {:?}",
                t1.elapsed()
            );
        } else {
            let res = r.unwrap();
            assert_eq!(res.status(), 200, "{ra}");
            assert!(t0.elapsed() <= bound, "{ra}: waited {:?}", t0.elapsed());
        }
        assert_idle(&stack);
    }
}

/// A body that is pending once (waking itself) before each frame, as a
/// network body whose frames arrive apart.
struct PendOnce {
    items: VecDeque<Result<Frame<Bytes>, BoxError>>,
    pend: bool,
}
impl Body for PendOnce {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.pend {
            self.pend = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pend = true;
        Poll::Ready(self.items.pop_front())
    }
    fn is_end_stream(&self) -> bool {
        self.items.is_empty()
    }
}

// ------------------------------------------------------ 12. shutdown, misc

/// stream_layer: "A drain waits for it; at the drain's deadline an event
/// stream (`text/event-stream`) still open ends with [`DRAIN_EVENT`], an SSE
/// error event, and is counted `cancelled`".
#[tokio::test(start_paused = true)]
async fn a_stalled_llm_stream_is_cut_with_the_drain_event_at_the_deadline() {
    let stack = LlmStack::openai(big_tier())
        .stream_timeout(
            semaforo::timeout::Timeout::builder()
                .first_chunk(Duration::from_secs(3_600))
                .idle(Duration::from_secs(3_600))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let chaos: Chaos<http::Response<ChaosBody<Frames>>> = Chaos::builder()
        .fault(Fault::stall_stream(1))
        .build()
        .unwrap();
    chaos.enable();
    let mock = StreamMock::new(|_| {
        stream_of(vec![
            Bytes::from_static(CHUNK1),
            Bytes::from_static(USAGE_CHUNK),
        ])
    });
    let res = stack
        .stream_layer()
        .layer(chaos.stream_layer().layer(mock))
        .oneshot(streamed_chat("m", 100))
        .await
        .unwrap();
    let body = res.into_body();
    let sd = stack.shutdown().clone();
    sd.trigger();
    let t0 = Instant::now();
    let (report, (out, err)) = tokio::join!(sd.drain(Duration::from_secs(5)), async {
        tokio::time::timeout(Duration::from_secs(600), read_like_hyper(body))
            .await
            .expect("the body was never cut")
    });
    assert!(t0.elapsed() <= Duration::from_secs(6), "{:?}", t0.elapsed());
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        text.ends_with(semaforo::shutdown::DRAIN_EVENT),
        "body: {text:?}, err: {:?}",
        err.map(|e| e.to_string())
    );
    assert_eq!(report.cancelled, 1, "{report:?}");
    assert_idle(&stack);
    // After the trigger: refused at once, whole and streamed.
    let e = stack
        .layer()
        .layer(Mock::new(|_, _| ok(USAGE_10)))
        .oneshot(chat("m", 10, "x"))
        .await
        .unwrap_err();
    assert_eq!(
        Rejected::from_box(&e).map(|r| r.kind()),
        Some(RejectKind::ShuttingDown)
    );
}

/// Prompt::chars: "Characters (Unicode scalar values) of the prompt's text;
/// of the whole body when it is not JSON (its bytes when not UTF-8 either)".
#[test]
fn prompt_chars_of_odd_bodies() {
    assert_eq!(Prompt::read(Bytes::from_static(b"\xff\xfeabc")).chars(), 5);
    assert_eq!(
        Prompt::read(Bytes::from_static("ñandú".as_bytes())).chars(),
        5
    );
    let bad_json = b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"a\xffb\"}]}";
    assert_eq!(
        Prompt::read(Bytes::from_static(bad_json)).chars(),
        bad_json.len() as u64
    );
    assert_eq!(Prompt::read(Bytes::new()).chars(), 0);
    assert_eq!(Prompt::read(Bytes::new()).choices(), 1);
    // Escapes count as the characters they stand for.
    let esc = br#"{"messages":[{"role":"user","content":"\u00f1\ud83d\ude00\n"}]}"#;
    assert_eq!(Prompt::read(Bytes::from_static(esc)).chars(), 3);
}

/// cache: "no larger than [`max_entry_bytes`]" is kept; the answer "still
/// reaches the caller whole".
#[tokio::test(start_paused = true)]
async fn an_answer_over_the_entry_cap_is_answered_whole_and_not_kept() {
    let cache: LlmCache = Cache::builder()
        .ttl(Duration::from_secs(600))
        .max_entry_bytes(1_000)
        .build()
        .unwrap();
    let stack = LlmStack::openai(big_tier())
        .cache(cache.clone())
        .build()
        .unwrap();
    let big = format!(
        r#"{{"choices":[{{"message":{{"content":"{}"}}}}],"usage":{{"total_tokens":3}}}}"#,
        "x".repeat(5_000)
    );
    let b2 = big.clone();
    let mock = Mock::new(move |_, _| ok(&b2));
    let svc = stack.layer().layer(mock.clone());
    for _ in 0..2 {
        let res = svc.clone().oneshot(det("hola")).await.unwrap();
        assert_eq!(res.body().len(), big.len());
    }
    cache.run_pending_tasks();
    assert_eq!(mock.calls(), 2);
    assert_eq!(cache.snapshot().stores, 0);
}

/// chaos in a router deployment: a connection reset ("`Infrastructure`")
/// fails over to the other deployment at once.
#[tokio::test(start_paused = true)]
async fn a_chaos_connection_reset_in_one_deployment_fails_over() {
    let chaos: Chaos<Res> = Chaos::builder()
        .fault(Fault::connection_reset())
        .build()
        .unwrap();
    chaos.enable();
    let a = Mock::new(|_, _| ok(USAGE_10));
    let b = Mock::new(|_, _| ok(USAGE_10));
    let router = LlmStack::router()
        .deployment(
            LlmDeployment::new(
                "a",
                LlmStack::openai(big_tier()),
                chaos.layer().layer(a.clone()),
            )
            .preference(0),
        )
        .deployment(LlmDeployment::new("b", LlmStack::openai(big_tier()), b.clone()).preference(1))
        .build()
        .unwrap();
    let t0 = Instant::now();
    for _ in 0..3 {
        let res = router.clone().oneshot(chat("m", 10, "x")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(t0.elapsed(), Duration::ZERO, "failover is at once");
    assert_eq!(b.calls(), 3);
    assert_eq!(a.calls(), 0, "chaos answered instead of a");
}

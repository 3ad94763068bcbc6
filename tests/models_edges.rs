//! The per-model LLM preset at its edges (from an outside attack): odd
//! bodies and usage, custom pacers and estimators, ETAs with shared limits,
//! cancellation, shutdown, bounds.
#![cfg(feature = "llm")]

use bytes::Bytes;
use semaforo::bulkhead::{Bulkhead, QueueTicket};
use semaforo::health::Health;
use semaforo::llm::{CharsPerToken, LlmStack, ModelField, Profile, Prompt, Tier, TokenEstimator};
use semaforo::pace::{KeyedPace, Limit, Pace, Unit};
use semaforo::retry::Retry;
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

fn tier(rpm: u64, tpm: u64) -> Tier {
    Tier {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
    }
}

fn req(body: impl Into<Bytes>) -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .body(body.into())
        .unwrap()
}

fn chat(model: &str, content: &str, max_tokens: Option<u64>) -> http::Request<Bytes> {
    let max = max_tokens.map_or(String::new(), |m| format!(r#""max_tokens":{m},"#));
    req(format!(
        r#"{{"model":"{model}",{max}"messages":[{{"role":"user","content":"{content}"}}]}}"#
    ))
}

fn available(p: &Pace, unit: Unit) -> f64 {
    p.snapshot()
        .dims
        .iter()
        .find(|d| d.unit == unit)
        .map(|d| d.available)
        .unwrap()
}

/// A client answering `body` after `service`.
fn client(
    body: &'static str,
    service: Duration,
) -> impl Service<
    http::Request<Bytes>,
    Response = http::Response<Bytes>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |_r: http::Request<Bytes>| async move {
        tokio::time::sleep(service).await;
        Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(body.as_bytes())))
    })
}

fn kind(e: &BoxError) -> Option<RejectKind> {
    Rejected::find(&**e).map(|r| r.kind())
}

// ---------------------------------------------------------------------------
// 1. One badly typed field makes the whole body "not JSON": the model is lost
//    (ModelField still finds it), and the call goes to the overflow pacer.
// ---------------------------------------------------------------------------

#[test]
fn a_badly_typed_field_loses_the_model() {
    let bodies: &[&str] = &[
        r#"{"model":"a","max_tokens":true,"messages":[]}"#,
        r#"{"model":"a","n":"two","messages":[]}"#,
        r#"{"model":"a","max_tokens":[100],"messages":[]}"#,
        r#"{"model":"a","max_tokens":1e999,"messages":[]}"#,
        // A lone surrogate, as JSON.stringify emits for a string cut mid-emoji.
        r#"{"model":"a","messages":[{"role":"user","content":"hi \ud83d"}]}"#,
    ];
    let mut lost = Vec::new();
    for b in bodies {
        let p = Prompt::read(Bytes::from_static(b.as_bytes()));
        let field = ModelField::read(b.as_bytes());
        println!(
            "{b}\n  Prompt::model = {:?}, ModelField = {:?}, chars = {}",
            p.model(),
            field,
            p.chars()
        );
        if p.model() != Some("a") {
            lost.push(*b);
        }
    }
    assert!(lost.is_empty(), "model lost for {lost:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_badly_typed_field_bypasses_the_models_own_pacer() {
    let stack = LlmStack::openai(tier(10_000, 1_000_000))
        .model("a", Profile::openai(tier(10_000, 20_000)))
        .build()
        .unwrap();
    let svc = stack
        .layer()
        .layer(client(r#"{"choices":[]}"#, Duration::ZERO));
    let a = stack.pace().peek("a").unwrap();
    let before = available(&a, Unit::Tokens);
    svc.oneshot(req(r#"{"model":"a","max_tokens":true,"messages":[]}"#))
        .await
        .unwrap();
    let after = available(&a, Unit::Tokens);
    assert!(
        after < before,
        "model a's pacer was not charged ({before} -> {after})"
    );
}

// ---------------------------------------------------------------------------
// 2. An answer reporting only a total teaches the estimator the total
//    (input + output) as the prompt's tokens.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_total_alone_is_learned_as_the_prompt() {
    let stack = LlmStack::openai(tier(100_000, 10_000_000)).build().unwrap();
    // 4,000 chars = 1,000 prompt tokens at 4.0; 3,000 output tokens.
    let prompt = "a".repeat(4_000);
    let svc = stack.layer().layer(client(
        r#"{"choices":[],"usage":{"total_tokens":4000}}"#,
        Duration::ZERO,
    ));
    for _ in 0..20 {
        svc.clone()
            .oneshot(chat("m", &prompt, Some(3_000)))
            .await
            .unwrap();
    }
    let est = stack
        .estimator()
        .text_tokens(&Prompt::read(chat("m", &prompt, Some(3_000)).into_body()));
    println!("estimate after 20 total-only answers: {est} (prompt really 1,000 at most)");
    assert!(est <= 1_000, "the output was learned as prompt: {est}");
}

// ---------------------------------------------------------------------------
// 3. "Every model starts at 4.0": an unseen model is estimated with the
//    shared `other` ratio, then jumps to 4.0-based on its first sample.
// ---------------------------------------------------------------------------

#[test]
fn an_unseen_model_does_not_start_at_the_start_ratio() {
    let est = CharsPerToken::new();
    let no_model = Prompt::read(Bytes::from("x".repeat(2_000)));
    for _ in 0..30 {
        est.learn(&no_model, 1_000); // 2.0 chars per token
    }
    let fresh = est.ratio(Some("fresh"));
    println!("ratio(None) = {}, ratio(fresh) = {fresh}", est.ratio(None));
    let p = Prompt::read(Bytes::from(format!(
        r#"{{"model":"fresh","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(2_000)
    )));
    est.learn(&p, 1_000); // a sample of 2.0
    println!(
        "after one sample of 2.0: ratio(fresh) = {}",
        est.ratio(Some("fresh"))
    );
    assert_eq!(fresh, 4.0, "an unseen model should start at 4.0");
}

// ---------------------------------------------------------------------------
// 4. A KeyedPace given with `.pace()` whose key has a smaller burst than the
//    template: a call without max_tokens reserves above that burst and is
//    refused for good (the cap is the overflow's, not the key's).
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn custom_keyed_pace_key_smaller_than_template_refuses_unset_max_tokens() {
    let keyed = KeyedPace::builder(Pace::builder().tokens_per_minute(1_000_000))
        .key("small", Pace::builder().tokens_per_minute(10_000))
        .build()
        .unwrap();
    let stack = LlmStack::openai(tier(10_000, 1_000_000))
        .pace(keyed)
        .build()
        .unwrap();
    let svc = stack
        .layer()
        .layer(client(r#"{"choices":[]}"#, Duration::ZERO));
    let res = svc.oneshot(chat("small", "hi", None)).await;
    let via_model = LlmStack::openai(tier(10_000, 1_000_000))
        .model("small", Profile::openai(tier(10_000, 10_000)))
        .build()
        .unwrap();
    let ok = via_model
        .layer()
        .layer(client(r#"{"choices":[]}"#, Duration::ZERO))
        .oneshot(chat("small", "hi", None))
        .await;
    println!(
        "via .pace(): {:?}\nvia .model(): {:?}",
        res.as_ref().map(|r| r.status()),
        ok.as_ref().map(|r| r.status())
    );
    assert!(ok.is_ok());
    assert!(res.is_ok(), "refused: {:?}", res.err());
}

// ---------------------------------------------------------------------------
// 5. shared_limit() and model() are silently dropped when .pace() is given.
// ---------------------------------------------------------------------------

#[test]
fn shared_limit_with_pace_is_silently_ignored() {
    let stack = LlmStack::openai(tier(500, 30_000))
        .shared_limit(Limit::tokens_per_minute(600_000))
        .pace(Pace::builder().tokens_per_minute(30_000).build().unwrap())
        .build();
    match stack {
        Ok(s) => assert!(
            s.pace().shared().is_some(),
            "shared_limit accepted by build() but not enforced"
        ),
        Err(e) => println!("refused (fine): {e}"),
    }
}

// ---------------------------------------------------------------------------
// 6. Health names collide with a model named "*" or "shared".
// ---------------------------------------------------------------------------

#[test]
fn health_component_names_collide_with_models_named_star_or_shared() {
    let stack = LlmStack::openai(tier(500, 30_000))
        .model("*", Profile::openai(tier(5, 300)))
        .model("shared", Profile::openai(tier(5, 300)))
        .shared_limit(Limit::tokens_per_minute(600_000))
        .build()
        .unwrap();
    let health = Health::new(stack.shutdown()).keyed_pace("llm", stack.pace());
    let names: Vec<String> = health
        .report()
        .components
        .iter()
        .map(|c| c.name.clone())
        .collect();
    println!("{names:?}");
    let mut dedup = names.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        names.len(),
        "duplicate component names: {names:?}"
    );
}

// ---------------------------------------------------------------------------
// 7. The ETA a QueueTicket reports ignores the shared limits.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn eta_ignores_a_binding_shared_limit() {
    let service = Duration::from_secs(1);
    let stack = LlmStack::openai(tier(100_000, 10_000_000))
        .shared_limit(Limit::tokens_per_minute(10_000))
        .bulkhead(
            Bulkhead::builder(1)
                .max_queue(10)
                .expected_service_time(service)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let svc = stack.layer().layer(client(
        r#"{"usage":{"prompt_tokens":0,"completion_tokens":9000,"total_tokens":9000}}"#,
        service,
    ));
    let t0 = Instant::now();
    let started = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut tickets = Vec::new();
    for i in 0..3 {
        let mut r = chat("a", "", Some(9_000));
        let t = QueueTicket::new();
        r.extensions_mut().insert(t.clone());
        tickets.push(t);
        let svc = svc.clone();
        let started = started.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(r).await;
            started.lock().unwrap().push((i, t0.elapsed()));
            res.map(|_| ())
        }));
        tokio::task::yield_now().await;
    }
    // Call 1 runs until 1 s; call 2 then holds the permit waiting ~48 s on
    // the shared cells; call 3 waits in the bulkhead.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let eta = tickets[2].queue_status().and_then(|s| s.eta);
    let at = t0.elapsed();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let done = started.lock().unwrap().clone();
    let third_done = done.iter().find(|(i, _)| *i == 2).unwrap().1;
    // Call 3 gets its permit when call 2 ends.
    let second_done = done.iter().find(|(i, _)| *i == 1).unwrap().1;
    println!("at {at:?}: ticket 3 eta {eta:?}; call 2 ended at {second_done:?}, call 3 at {third_done:?}");
    let eta = eta.expect("an eta");
    let real = second_done - at;
    // Within 10 % of when the permit really freed (47.5 s here).
    assert!(
        (eta.as_secs_f64() - real.as_secs_f64()).abs() <= 0.1 * real.as_secs_f64(),
        "ETA {eta:?} but the permit freed after {real:?}"
    );
}

// ---------------------------------------------------------------------------
// 8. Retries reuse the parsed prompt; learn never gets 0; extremes of a
//    custom estimator.
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Spy {
    prompts: Mutex<Vec<usize>>,
    learned: Mutex<Vec<u64>>,
    answer: u64,
}

#[derive(Debug, Clone)]
struct SpyH(Arc<Spy>);

impl TokenEstimator for SpyH {
    /// Records where the parsed prompt's facts live (its model string, in
    /// the `Arc` every clone of the prompt shares): one address when the
    /// body was read once. (Not the `Prompt`'s own address: a retry clones
    /// the request and its extensions, so each attempt's `Prompt` is a new
    /// box — one that the allocator often, not always, puts where the last
    /// one was: the old check failed now and then under load.)
    fn text_tokens(&self, prompt: &Prompt) -> u64 {
        self.0
            .prompts
            .lock()
            .unwrap()
            .push(prompt.model().map_or(0, |m| m.as_ptr() as usize));
        self.0.answer
    }
    fn learn(&self, _prompt: &Prompt, text_tokens: u64) {
        self.0.learned.lock().unwrap().push(text_tokens);
    }
}

#[tokio::test(start_paused = true)]
async fn retries_reuse_the_prompt_and_learn_once() {
    let spy = Arc::new(Spy {
        answer: 10,
        ..Spy::default()
    });
    let stack = LlmStack::openai(tier(10_000, 1_000_000))
        .estimator(SpyH(spy.clone()))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let flaky = tower::service_fn(move |_r: http::Request<Bytes>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let res = if n < 2 {
                http::Response::builder()
                    .status(500)
                    .body(Bytes::from_static(
                        br#"{"error":{"type":"server_error"},"usage":{"prompt_tokens":7}}"#,
                    ))
                    .unwrap()
            } else {
                http::Response::new(Bytes::from_static(
                    br#"{"usage":{"prompt_tokens":800,"completion_tokens":5}}"#,
                ))
            };
            Ok::<_, std::io::Error>(res)
        }
    });
    let res = stack
        .layer()
        .layer(flaky)
        .oneshot(chat("m", "hello", Some(10)))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let prompts = spy.prompts.lock().unwrap().clone();
    let learned = spy.learned.lock().unwrap().clone();
    println!(
        "attempts {}, text_tokens calls {}, distinct prompts {}, learned {learned:?}",
        calls.load(Ordering::SeqCst),
        prompts.len(),
        {
            let mut p = prompts.clone();
            p.sort();
            p.dedup();
            p.len()
        }
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let mut distinct = prompts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 1, "the prompt was read more than once");
    assert_eq!(learned, vec![800]);
}

#[tokio::test(start_paused = true)]
async fn an_estimator_answering_u64_max_or_zero() {
    for answer in [u64::MAX, 0] {
        let spy = Arc::new(Spy {
            answer,
            ..Spy::default()
        });
        let stack = LlmStack::openai(tier(10_000, 1_000_000))
            .estimator(SpyH(spy.clone()))
            .build()
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let svc = tower::service_fn(move |_r: http::Request<Bytes>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(b"{}"))) }
        });
        let t0 = Instant::now();
        let res = stack
            .layer()
            .layer(svc)
            .oneshot(chat("m", "x", Some(10)))
            .await;
        println!(
            "answer {answer}: {:?} after {:?}, upstream calls {}",
            res.as_ref().map(|r| r.status()).map_err(kind),
            t0.elapsed(),
            calls.load(Ordering::SeqCst)
        );
        if answer == 0 {
            assert!(res.is_ok());
        } else {
            assert_eq!(
                res.map(|_| ()).map_err(|e| kind(&e)),
                Err(Some(RejectKind::BudgetExceeded))
            );
            assert_eq!(t0.elapsed(), Duration::ZERO);
            assert_eq!(calls.load(Ordering::SeqCst), 0);
        }
    }
}

// ---------------------------------------------------------------------------
// 9. Thousands of models: bounded pacers and ratios.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn thousands_of_models_stay_bounded() {
    let stack = LlmStack::openai(tier(1_000_000, 100_000_000))
        .bulkhead(Bulkhead::builder(10_000).build().unwrap())
        .build()
        .unwrap();
    let svc = stack.layer().layer(client(
        r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        Duration::ZERO,
    ));
    for i in 0..3_000 {
        svc.clone()
            .oneshot(chat(&format!("m{i}"), "abcd", Some(1)))
            .await
            .unwrap();
    }
    assert_eq!(stack.pace().keys().len(), 1_024);
    assert_eq!(stack.pace().pacers().len(), 1_024);
    let est = stack.estimator();
    let p = |m: &str| Prompt::read(chat(m, &"a".repeat(400), Some(1)).into_body());
    println!(
        "m0 {} m2999 {} none {}",
        est.text_tokens(&p("m0")),
        est.text_tokens(&p("m2999")),
        est.text_tokens(&Prompt::read(Bytes::from("a".repeat(400))))
    );
}

#[test]
fn concurrent_learning_is_bounded() {
    let est = Arc::new(CharsPerToken::new().max_models(64));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let est = est.clone();
            std::thread::spawn(move || {
                for i in 0..2_000 {
                    let p = Prompt::read(Bytes::from(format!(
                        r#"{{"model":"m{}","messages":["{}"]}}"#,
                        (i * 8 + t) % 500,
                        "a".repeat(100)
                    )));
                    est.learn(&p, 1 + (i as u64 % 300));
                    let _ = est.text_tokens(&p);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let dbg = format!("{est:?}");
    let n = dbg.matches("\"m").count();
    println!("{n} models learned");
    assert!(n <= 64);
    for i in 0..500 {
        let r = est.ratio(Some(&format!("m{i}")));
        assert!((0.5..=16.0).contains(&r), "{r}");
    }
}

// ---------------------------------------------------------------------------
// 10. Shutdown while many models wait: every waiter answered.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn shutdown_answers_every_waiter_of_every_model() {
    let stack = LlmStack::openai(tier(10_000, 100_000))
        .model("b", Profile::openai(tier(10, 2_000)))
        .shared_limit(Limit::tokens_per_minute(20_000))
        .bulkhead(Bulkhead::builder(100).max_queue(10_000).build().unwrap())
        .build()
        .unwrap();
    let svc = stack
        .layer()
        .layer(client(r#"{"choices":[]}"#, Duration::from_secs(1)));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let model = ["a", "b", "c", "d"][i % 4];
        let body = if i % 7 == 0 {
            "not json".to_string()
        } else {
            String::new()
        };
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let r = if body.is_empty() {
                chat(model, "hello", Some(900))
            } else {
                req(body)
            };
            svc.oneshot(r).await.map(|_| ()).map_err(|e| kind(&e))
        }));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack.shutdown().trigger();
    let t = Instant::now();
    let mut ok = 0;
    let mut kinds = std::collections::HashMap::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(3), task).await {
            Ok(Ok(Ok(()))) => ok += 1,
            Ok(Ok(Err(k))) => *kinds.entry(format!("{k:?}")).or_insert(0) += 1,
            Ok(Err(p)) => panic!("task panicked: {p}"),
            Err(_) => panic!("a waiter hangs after shutdown"),
        }
    }
    println!("ok {ok}, refused {kinds:?}, drained in {:?}", t.elapsed());
    for (k, p) in stack.pace().pacers() {
        assert_eq!(p.snapshot().waiting, 0, "{k} still has waiters");
    }
}

// ---------------------------------------------------------------------------
// 11. Cancellation in the shared line: the head leaves, the next goes.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn dropping_the_head_of_the_shared_line_lets_the_next_model_go() {
    let stack = LlmStack::openai(tier(100_000, 10_000_000))
        .shared_limit(Limit::tokens_per_minute(10_000))
        .retry(Retry::builder().max_attempts(1).build().unwrap())
        .build()
        .unwrap();
    let svc = stack
        .layer()
        .layer(client(r#"{"choices":[]}"#, Duration::ZERO));
    let t0 = Instant::now();
    svc.clone()
        .oneshot(chat("a", "", Some(10_000)))
        .await
        .unwrap();
    let a2 = tokio::spawn(svc.clone().oneshot(chat("a", "", Some(5_000))));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let b1 = tokio::spawn({
        let svc = svc.clone();
        async move {
            svc.oneshot(chat("b", "", Some(5_000))).await.unwrap();
            t0.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    a2.abort();
    let _ = a2.await;
    let b_at = b1.await.unwrap();
    println!("b started at {b_at:?}");
    assert!(b_at <= Duration::from_secs(31), "{b_at:?}");
    for (k, p) in stack.pace().pacers() {
        assert_eq!(p.snapshot().waiting, 0, "{k}");
    }
}

// ---------------------------------------------------------------------------
// 12. A streamed body dropped mid-way returns the permit; nothing hangs.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_stream_dropped_mid_way_frees_its_permit() {
    use http_body_util::{BodyExt, StreamBody};
    let stack = LlmStack::openai(tier(10_000, 1_000_000))
        .bulkhead(Bulkhead::builder(1).max_queue(10).build().unwrap())
        .build()
        .unwrap();
    let streamer = tower::service_fn(|_r: http::Request<Bytes>| async {
        let frames = futures::stream::iter(vec![Ok::<_, std::io::Error>(http_body::Frame::data(
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"),
        ))])
        .chain(futures::stream::pending());
        Ok::<_, std::io::Error>(http::Response::new(StreamBody::new(frames)))
    });
    use futures::StreamExt;
    let svc = stack.stream_layer().layer(streamer);
    for i in 0..5 {
        let res = tokio::time::timeout(
            Duration::from_secs(1),
            svc.clone().oneshot(chat(&format!("m{i}"), "hi", Some(10))),
        )
        .await
        .expect("the permit came back")
        .unwrap();
        let mut body = res.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
    }
    assert_eq!(stack.bulkhead().snapshot().in_flight, 0);
    assert_eq!(stack.shutdown().in_flight(), 0);
}

// ---------------------------------------------------------------------------
// 13. Odd but valid model values; huge and deep bodies; n/max extremes.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn odd_models_and_bodies_never_panic() {
    let stack = LlmStack::openai(tier(100_000, 10_000_000))
        .model("gpt-4o", Profile::openai(tier(5_000, 450_000)))
        .build()
        .unwrap();
    let svc = stack.layer().layer(client(
        r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":-5}}"#,
        Duration::ZERO,
    ));
    // Escaped: the same model as "gpt-4o".
    let p = Prompt::read(Bytes::from_static(br#"{"model":"gpt\u002d4o"}"#));
    assert_eq!(p.model(), Some("gpt-4o"));
    let deep = format!(
        r#"{{"model":"a","messages":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let huge = format!(
        r#"{{"model":"a","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "é".repeat(5_000_000)
    );
    let bodies: Vec<String> = vec![
        String::new(),
        "null".into(),
        "[]".into(),
        "\u{feff}{\"model\":\"a\"}".into(),
        r#"{"model":"a","model":"b"}"#.into(),
        r#"{"model":"a","model":5}"#.into(),
        r#"{"model":""}"#.into(),
        r#"{"model":"\u0000"}"#.into(),
        format!(r#"{{"model":"{}"}}"#, "🦀".repeat(10_000)),
        r#"{"model":"a","n":18446744073709551615}"#.into(),
        r#"{"model":"a","n":18446744073709551615,"max_tokens":2}"#.into(),
        r#"{"model":"a","n":-1,"max_tokens":-1}"#.into(),
        r#"{"model":"a","n":0,"max_tokens":0,"max_completion_tokens":5,"max_output_tokens":3}"#
            .into(),
        r#"{"model":"a","max_tokens":"18446744073709551616"}"#.into(),
        r#"{"model":"a","max_tokens":1.5e19}"#.into(),
        r#"{"model":"a","messages":[{"image_url":{},"text":"x"}],"max_tokens":1}"#.into(),
        deep,
        huge,
    ];
    for b in bodies {
        let short: String = b.chars().take(60).collect();
        let p = Prompt::read(Bytes::from(b.clone()));
        let res = svc.clone().oneshot(req(b)).await;
        println!(
            "{short:60} model {:?} chars {} max {:?} n {} -> {:?}",
            p.model().map(|m| m.chars().take(10).collect::<String>()),
            p.chars(),
            p.max_output(),
            p.choices(),
            res.as_ref().map(|r| r.status().as_u16()).map_err(kind)
        );
    }
}

// ---------------------------------------------------------------------------
// 14. Non-text parts: a fixed 765 per image distorts the learned ratio.
// ---------------------------------------------------------------------------

#[test]
fn low_detail_images_drag_the_learned_ratio() {
    let est = CharsPerToken::new();
    let text = "a".repeat(4_000); // 1,000 real tokens at 4.0
    let with_image = Prompt::read(Bytes::from(format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"x","detail":"low"}}}},{{"type":"text","text":"{text}"}}]}}]}}"#
    )));
    assert_eq!(with_image.non_text_parts(), 1);
    // Billed: 1,000 text + 85 for a low-detail image; the estimator is told
    // 1,085 - 765 = 320 (as the preset would).
    for _ in 0..30 {
        est.learn(&with_image, 1_085 - 765);
    }
    let plain = Prompt::read(Bytes::from(format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{text}"}}]}}"#
    )));
    println!(
        "ratio {}, a text-only prompt of 1,000 tokens estimated at {}",
        est.ratio(Some("m")),
        est.text_tokens(&plain)
    );
    assert!(est.text_tokens(&plain) >= 500);
}

// ---------------------------------------------------------------------------
// 15. The response keeps the request body alive (Asked in its extensions).
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_response_keeps_the_request_body_alive() {
    struct Owner(Vec<u8>, Arc<AtomicU64>);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    impl Drop for Owner {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicU64::new(0));
    let body = format!(
        r#"{{"model":"m","max_tokens":1,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(1_000_000)
    );
    let bytes = Bytes::from_owner(Owner(body.into_bytes(), dropped.clone()));
    let stack = LlmStack::openai(tier(10_000, 10_000_000)).build().unwrap();
    let svc = stack
        .layer()
        .layer(client(r#"{"choices":[]}"#, Duration::ZERO));
    let res = svc.oneshot(req(bytes)).await.unwrap();
    let alive = dropped.load(Ordering::SeqCst) == 0;
    println!("request body (1 MB) alive while the response is held: {alive}");
    drop(res);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    assert!(!alive, "the response holds the 1 MB request body");
}

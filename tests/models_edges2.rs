//! Adversarial tests of the per-model LLM preset, part 2 (attack session).
#![cfg(feature = "llm")]

use bytes::Bytes;
use semaforo::bulkhead::{Bulkhead, QueueTicket};
use semaforo::llm::{LlmStack, Profile, Prompt, Tier};
use semaforo::pace::Unit;
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

fn chat(model: &str, content: &str, max_tokens: u64) -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .body(Bytes::from(format!(
            r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{content}"}}]}}"#
        )))
        .unwrap()
}

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

/// Two models each waiting in its own pacer: the ETA counts the other
/// model's waiters as running upstream.
#[tokio::test(start_paused = true)]
async fn eta_with_two_models_waiting() {
    let service = Duration::from_secs(1);
    let stack = LlmStack::openai(tier(100_000, 10_000))
        .bulkhead(
            Bulkhead::builder(4)
                .max_queue(10)
                .expected_service_time(service)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let svc = stack.layer().layer(client(r#"{"choices":[]}"#, service));
    let t0 = Instant::now();
    let ends = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut tickets = Vec::new();
    // Burst 9,500 per model: one call of 9,000 each goes, the next two of
    // each wait ~54 s and ~108 s; the 7th call waits for a permit.
    let order = ["a", "b", "a", "b", "a", "b", "a"];
    for (i, m) in order.iter().enumerate() {
        let mut r = chat(m, "", 9_000);
        let t = QueueTicket::new();
        r.extensions_mut().insert(t.clone());
        tickets.push(t);
        let (svc, ends) = (svc.clone(), ends.clone());
        tasks.push(tokio::spawn(async move {
            svc.oneshot(r).await.unwrap();
            ends.lock().unwrap().push((i, t0.elapsed()));
        }));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let st = tickets[6].queue_status();
    let at = t0.elapsed();
    for t in tasks {
        t.await.unwrap();
    }
    let ends = ends.lock().unwrap().clone();
    println!("at {at:?}: 7th call {st:?}; ends {ends:?}");
    let first_free = ends
        .iter()
        .filter(|(i, _)| *i >= 2 && *i < 6)
        .map(|(_, t)| *t)
        .min()
        .unwrap();
    let eta = st.and_then(|s| s.eta).expect("an eta");
    let real = first_free - at;
    // Within 10 % of when the permit really freed (50.5 s here).
    assert!(
        (eta.as_secs_f64() - real.as_secs_f64()).abs() <= 0.1 * real.as_secs_f64(),
        "ETA {eta:?}, real {real:?}"
    );
}

/// Drop a call at every poll point (the bulkhead line, the pacer line, the
/// shared line, upstream, retry backoff): nothing stays held.
#[tokio::test(start_paused = true)]
async fn dropped_at_every_point_nothing_stays_held() {
    use std::future::Future;
    use std::task::Context;
    let stack = LlmStack::openai(tier(100_000, 20_000))
        .model("b", Profile::openai(tier(100_000, 5_000)))
        .shared_limit(semaforo::pace::Limit::tokens_per_minute(15_000))
        .bulkhead(Bulkhead::builder(2).max_queue(100).build().unwrap())
        .build()
        .unwrap();
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    let flaky = tower::service_fn(move |_r: http::Request<Bytes>| {
        let k = n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let status = if k % 3 == 0 { 500 } else { 200 };
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(status)
                    .body(Bytes::from_static(
                        br#"{"usage":{"prompt_tokens":1,"completion_tokens":100}}"#,
                    ))
                    .unwrap(),
            )
        }
    });
    let svc = stack.layer().layer(flaky);
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    for polls in 0..40u32 {
        // Background load: a few calls of each model in flight.
        let mut bg = Vec::new();
        for m in ["a", "b", "a", "b"] {
            bg.push(tokio::spawn(svc.clone().oneshot(chat(m, "xx", 4_000))));
        }
        tokio::task::yield_now().await;
        let mut fut = Box::pin(svc.clone().oneshot(chat(
            if polls % 2 == 0 { "a" } else { "b" },
            "hi",
            3_000,
        )));
        let mut done = false;
        for _ in 0..polls {
            if fut.as_mut().poll(&mut cx).is_ready() {
                done = true;
                break;
            }
            tokio::time::advance(Duration::from_millis(700)).await;
            tokio::task::yield_now().await;
        }
        drop(fut);
        for b in bg {
            tokio::time::timeout(Duration::from_secs(3_600), b)
                .await
                .expect("no hang")
                .unwrap()
                .ok();
        }
        let _ = done;
        assert_eq!(
            stack.bulkhead().snapshot().in_flight,
            0,
            "after {polls} polls"
        );
        assert_eq!(stack.shutdown().in_flight(), 0, "after {polls} polls");
        for (k, p) in stack.pace().pacers() {
            assert_eq!(p.snapshot().waiting, 0, "{k} after {polls} polls");
        }
    }
    // Still works.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let t = Instant::now();
    let r = svc.clone().oneshot(chat("a", "ok", 10)).await;
    println!(
        "final call: {:?} after {:?}",
        r.as_ref().map(|r| r.status()),
        t.elapsed()
    );
}

/// max_keys bounds the count, and names above 256 bytes get no pacer (nor
/// ratio) of their own: 1,100 models of 64 KB names keep nothing per name.
#[tokio::test(start_paused = true)]
async fn long_model_names_get_no_pacer_of_their_own() {
    let stack = LlmStack::openai(tier(10_000_000, 1_000_000_000))
        .bulkhead(Bulkhead::builder(100_000).build().unwrap())
        .build()
        .unwrap();
    let svc = stack.layer().layer(client(
        r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        Duration::ZERO,
    ));
    for i in 0..1_100 {
        let name = format!("{i:05}{}", "x".repeat(64 * 1024));
        svc.clone().oneshot(chat(&name, "", 1)).await.unwrap();
    }
    assert!(stack.pace().keys().is_empty());
    // 256 bytes still has its own.
    svc.clone()
        .oneshot(chat(&"y".repeat(256), "", 1))
        .await
        .unwrap();
    assert_eq!(stack.pace().keys(), vec!["y".repeat(256)]);
}

/// A model given twice keeps the last profile; clones share what is learned.
#[tokio::test(start_paused = true)]
async fn model_twice_and_clones() {
    let stack = LlmStack::openai(tier(500, 30_000))
        .model("m", Profile::openai(tier(5, 1_000)))
        .model("m", Profile::openai(tier(7, 2_000)))
        .build()
        .unwrap();
    let p = stack.pace().peek("m").unwrap();
    let dims: Vec<(Unit, f64)> = p
        .snapshot()
        .dims
        .iter()
        .map(|d| (d.unit, d.capacity))
        .collect();
    println!("{dims:?}");
    assert!(dims.contains(&(Unit::Requests, 7.0)));
    let copy = stack.clone();
    let svc = copy.layer().layer(client(
        r#"{"usage":{"prompt_tokens":2000,"completion_tokens":1}}"#,
        Duration::ZERO,
    ));
    let prompt = "a".repeat(4_000);
    svc.oneshot(chat("m", &prompt, 1)).await.unwrap();
    let est = stack
        .estimator()
        .text_tokens(&Prompt::read(chat("m", &prompt, 1).into_body()));
    assert_eq!(est, 1_112);
}

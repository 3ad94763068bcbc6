//! The router over several deployments (tokio time, paused): the soonest
//! start wins, failover by class, weights among ties, the total deadline.
#![cfg(feature = "llm")]

#[path = "support/account.rs"]
mod account;

use account::{Account, Counts, Shape};
use bytes::Bytes;
use semaforo::breaker::Breaker;
use semaforo::classify::LlmClassifier;
use semaforo::llm::{estimate_cost, observe_response};
use semaforo::pace::{Cost, Limit, Observed, Pace};
use semaforo::route::{Deployment, Router};
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

type Client = BoxCloneSyncService<http::Request<Bytes>, http::Response<Bytes>, BoxError>;

const SERVICE: Duration = Duration::from_secs(2);

fn chat(max_tokens: u64) -> http::Request<Bytes> {
    let body = format!(r#"{{"model":"m","max_tokens":{max_tokens},"messages":[]}}"#);
    http::Request::post("/v1/chat/completions")
        .body(Bytes::from(body))
        .expect("a request")
}

fn weigh(req: &http::Request<Bytes>) -> Cost {
    estimate_cost(req.body())
}

/// A deployment: its pacer (30,000 TPM, 5 % headroom; 500 RPM) in front of
/// `client`, classified as an LLM answer.
fn deployment<S>(name: &'static str, client: S, weight: u32) -> (Deployment<Client>, Pace)
where
    S: tower::Service<http::Request<Bytes>, Response = http::Response<Bytes>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + semaforo::classify::AsErrorRef,
{
    let pace = Pace::builder()
        .limit(Limit::tokens_per_minute(30_000).headroom(5))
        .requests_per_minute(500)
        .build()
        .unwrap();
    let paced = pace
        .layer()
        .weigh(weigh)
        .observe(observe_response as fn(&http::Response<Bytes>) -> Observed)
        .classify(LlmClassifier::new())
        .layer(client);
    let d = Deployment::new(name, BoxCloneSyncService::new(paced))
        .pace(pace.clone())
        .weight(weight);
    (d, pace)
}

/// Seed 000 over two deployments of 30k TPM each: 50 × 2,000 tokens, every
/// call answered, no 429, near the bound of the combined 60k TPM.
#[tokio::test(start_paused = true)]
async fn fifty_teachers_over_two_deployments_near_the_combined_bound() {
    let accounts = [0, 1].map(|_| {
        Account::new(
            Shape::OpenAi,
            &[
                (Counts::Tokens, 30_000, 30_000),
                (Counts::Requests, 500, 500),
            ],
            SERVICE,
        )
    });
    let (a, _) = deployment("a", accounts[0].service(), 1);
    let (b, _) = deployment("b", accounts[1].service(), 1);
    let router = Router::builder()
        .deployment(a)
        .deployment(b)
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    let t0 = Instant::now();
    // Joined, not spawned: a spawned future of a layer over a service whose
    // error already is a `BoxError` meets a rustc limitation ("implementation
    // of `From` is not general enough"), whatever the layer.
    let calls = (0..50).map(|_| {
        let r = router.clone();
        async move {
            r.oneshot(chat(2_000))
                .await
                .map(|res| (res.status(), t0.elapsed()))
        }
    });
    let mut makespan = Duration::ZERO;
    for done in futures::future::join_all(calls).await {
        let (status, at) = done.unwrap();
        assert_eq!(status, 200);
        makespan = makespan.max(at);
    }
    let throttled: usize = accounts.iter().map(Account::throttled).sum();
    assert_eq!(throttled, 0, "no 429");
    // 100,000 tokens; each deployment bursts 28,500 (5 % headroom), then
    // 60,000 a minute together.
    let bound = (100_000.0 - 2.0 * 28_500.0) / 60_000.0 * 60.0 + SERVICE.as_secs_f64();
    let got = makespan.as_secs_f64();
    println!("two deployments: makespan {got:.1} s, bound {bound:.1} s");
    assert!(got <= 1.05 * bound, "{got} vs {bound}");
    assert_eq!(accounts[0].accepted() + accounts[1].accepted(), 50);
}

/// A client answering `status` with `body` (and `retry-after`), counting calls.
fn answering(
    status: u16,
    body: &'static str,
    retry_after: Option<&'static str>,
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    http::Request<Bytes>,
    Response = http::Response<Bytes>,
    Error = std::io::Error,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |_req: http::Request<Bytes>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut res = http::Response::builder().status(status);
            if let Some(ra) = retry_after {
                res = res.header("retry-after", ra);
            }
            Ok::<_, std::io::Error>(res.body(Bytes::from_static(body.as_bytes())).unwrap())
        }
    })
}

const OK: &str = r#"{"usage":{"prompt_tokens":0,"completion_tokens":10,"total_tokens":10}}"#;

/// A answers 429 with `retry-after: 30`; B can start now: the call goes to
/// B at once, no 30 s wait. A `Permanent` answer is not retried anywhere.
#[tokio::test(start_paused = true)]
async fn a_429_fails_over_at_once_and_a_permanent_answer_is_returned() {
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let limited = r#"{"error":{"type":"rate_limit_error","message":"slow down"}}"#;
    let (a, _) = deployment(
        "a",
        answering(429, limited, Some("30"), a_calls.clone()),
        10,
    );
    let (b, _) = deployment("b", answering(200, OK, None, b_calls.clone()), 1);
    let router = Router::builder()
        .deployment(a)
        .deployment(b)
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    let t0 = Instant::now();
    let res = router.clone().oneshot(chat(100)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        (
            a_calls.load(Ordering::SeqCst),
            b_calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    // Two attempts of 100 ms: no backoff, no 30 s wait.
    assert_eq!(t0.elapsed(), Duration::from_millis(200));
    // A is paused for 30 s: the next calls go to B without trying A.
    router.clone().oneshot(chat(100)).await.unwrap();
    assert_eq!(a_calls.load(Ordering::SeqCst), 1);

    // An invalid key (401): returned as is, never tried elsewhere.
    let (x_calls, y_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let bad_key = r#"{"error":{"type":"invalid_request_error","code":"invalid_api_key","message":"bad key"}}"#;
    let (x, _) = deployment("x", answering(401, bad_key, None, x_calls.clone()), 10);
    let (y, _) = deployment("y", answering(200, OK, None, y_calls.clone()), 1);
    let router = Router::builder()
        .deployment(x)
        .deployment(y)
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    let res = router.oneshot(chat(100)).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        (
            x_calls.load(Ordering::SeqCst),
            y_calls.load(Ordering::SeqCst)
        ),
        (1, 0)
    );
}

/// A answers 529 to everything (the chaos layer injecting Anthropic's
/// `overloaded_error` after 100 ms, where a hand-made failing service used to
/// be); its breaker trips after 3: the failures that reach A are those 3,
/// each failed over to B, and every call succeeds.
#[cfg(feature = "chaos")]
#[tokio::test(start_paused = true)]
async fn an_overloaded_deployment_trips_its_breaker_and_calls_go_elsewhere() {
    use semaforo::chaos::{overloaded, Chaos, Fault, Latency};
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let chaos = Chaos::builder()
        .fault(Fault::latency(Latency::Fixed(Duration::from_millis(100))))
        .fault(Fault::respond(overloaded::<Bytes>()))
        .build()
        .unwrap();
    chaos.enable();
    let breaker = Breaker::builder()
        .consecutive_failures(3)
        .open_for(Duration::from_secs(30))
        .build()
        .unwrap();
    let (a, pa) = deployment(
        "a",
        chaos
            .layer()
            .layer(answering(200, OK, None, a_calls.clone())),
        100,
    );
    let a = Deployment::new(
        "a",
        BoxCloneSyncService::new(
            breaker
                .layer()
                .classify(LlmClassifier::new())
                .layer(a_service(a)),
        ),
    )
    .breaker(breaker.clone())
    .pace(pa)
    .weight(100);
    let (b, _) = deployment("b", answering(200, OK, None, b_calls.clone()), 1);
    let router = Router::builder()
        .deployment(a)
        .deployment(b)
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    for _ in 0..20 {
        let res = router.clone().oneshot(chat(100)).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(chaos.calls(), 3, "the trip threshold");
    assert_eq!(
        a_calls.load(Ordering::SeqCst),
        0,
        "A's own service never answered"
    );
    assert_eq!(b_calls.load(Ordering::SeqCst), 20);
}

#[cfg(feature = "chaos")]
fn a_service(d: Deployment<Client>) -> Client {
    d.service().clone()
}

/// Two healthy deployments weighted 3:1 with room on both: 75 % ± 5 % of
/// 1,000 calls go to the first.
#[tokio::test(start_paused = true)]
async fn weights_share_the_calls_among_ties() {
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, _) = deployment("a", answering(200, OK, None, a_calls.clone()), 3);
    let (b, _) = deployment("b", answering(200, OK, None, b_calls.clone()), 1);
    let router = Router::builder()
        .deployment(a)
        .deployment(b)
        .weigh(|_: &http::Request<Bytes>| Cost::requests(0))
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    for _ in 0..1_000 {
        router.clone().oneshot(chat(1)).await.unwrap();
    }
    let a = a_calls.load(Ordering::SeqCst);
    assert!((700..=800).contains(&a), "{a} of 1,000");
    assert_eq!(a + b_calls.load(Ordering::SeqCst), 1_000);
}

/// Both deployments' budgets spent for a minute, a deadline of 10 s: the
/// call is refused at once with the exact wait; dropped while it waits in a
/// line, it leaves nothing behind.
#[tokio::test(start_paused = true)]
async fn the_deadline_refuses_at_once_and_a_dropped_call_leaves_no_trace() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (a, pa) = deployment("a", answering(200, OK, None, calls.clone()), 1);
    let (b, pb) = deployment("b", answering(200, OK, None, calls.clone()), 1);
    // Each spent: 28,500 of 28,500 planned.
    for p in [&pa, &pb] {
        let spend = p
            .layer()
            .weigh(|n: &u64| Cost::tokens(*n))
            .layer(tower::service_fn(|n: u64| async move {
                Ok::<_, std::io::Error>(n)
            }));
        spend.oneshot(28_500).await.unwrap();
    }
    let router = Router::builder()
        .deployment(a)
        .deployment(b)
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let err = router.clone().oneshot(chat(15_000)).await.unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    assert_eq!(r.kind(), RejectKind::BudgetExceeded);
    // 15,000 tokens refill in 30 s.
    assert_eq!(r.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // Within the deadline, it waits in the soonest line; dropped there, it
    // holds nothing.
    let router = Router::builder()
        .deployment(deployment("c", answering(200, OK, None, calls.clone()), 1).0)
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    let pc = router.deployments()[0].pacer().unwrap().overflow().clone();
    let spend = pc
        .layer()
        .weigh(|n: &u64| Cost::tokens(*n))
        .layer(tower::service_fn(|n: u64| async move {
            Ok::<_, std::io::Error>(n)
        }));
    spend.oneshot(28_500).await.unwrap();
    let mut waiting = Box::pin(router.clone().oneshot(chat(1_000)));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    assert_eq!(pc.snapshot().waiting, 1);
    drop(waiting);
    assert_eq!(pc.snapshot().waiting, 0);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// A context-length 400 from the small model: exactly one more call, to
/// the long-context group, and the caller gets its answer.
#[tokio::test(start_paused = true)]
async fn a_context_length_error_falls_back_once_to_the_long_context_group() {
    use semaforo::classify::Permanent;
    let (small_calls, long_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let too_long = r#"{"error":{"type":"invalid_request_error","code":"context_length_exceeded","message":"This model's maximum context length is 8192 tokens"}}"#;
    let (small, _) = deployment(
        "small",
        answering(400, too_long, None, small_calls.clone()),
        1,
    );
    let (long, _) = deployment("long", answering(200, OK, None, long_calls.clone()), 1);
    let router = Router::builder()
        .deployment(small)
        .deployment(long.group("long-context"))
        .fallback(Permanent::ContextLengthExceeded, "long-context")
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    let res = router.clone().oneshot(chat(100)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        (
            small_calls.load(Ordering::SeqCst),
            long_calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    // The long-context group is a fallback only: a call that succeeds on the
    // small model never goes there. A group without deployments is an error.
    assert!(Router::builder()
        .deployment(deployment("x", answering(200, OK, None, Arc::default()), 1).0)
        .fallback(Permanent::ContextLengthExceeded, "nowhere")
        .build()
        .is_err());
}

/// Both deployments answered 429 (`retry-after` 30 s and 5 s): the third
/// attempt waits for the earlier of the two, not the later.
#[tokio::test(start_paused = true)]
async fn both_throttled_the_call_waits_for_the_earlier() {
    let limited = r#"{"error":{"type":"rate_limit_error","message":"slow down"}}"#;
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // Each answers 429 once, then 200.
    let once = |ra: &'static str, calls: Arc<AtomicUsize>| {
        tower::service_fn(move |_req: http::Request<Bytes>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let res = if n == 0 {
                    http::Response::builder()
                        .status(429)
                        .header("retry-after", ra)
                        .body(Bytes::from_static(limited.as_bytes()))
                } else {
                    http::Response::builder().body(Bytes::from_static(OK.as_bytes()))
                };
                Ok::<_, std::io::Error>(res.unwrap())
            }
        })
    };
    let (a, _) = deployment("a", once("30", a_calls.clone()), 1);
    let (b, _) = deployment("b", once("5", b_calls.clone()), 1);
    let router = Router::builder()
        .deployment(a)
        .deployment(b)
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    let t0 = Instant::now();
    let res = router.oneshot(chat(100)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(5),
        "the earlier of the two pauses"
    );
    assert_eq!(
        (
            a_calls.load(Ordering::SeqCst),
            b_calls.load(Ordering::SeqCst)
        ),
        (1, 2)
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..proptest::prelude::ProptestConfig::default() })]

    /// Over random deployments (budgets, breakers forced open between calls)
    /// and calls: the router never sends to a deployment whose breaker is
    /// open, and each deployment admits within its budget (rate·W + burst).
    #[test]
    fn never_to_an_open_breaker_and_each_within_its_budget(
        tpms in proptest::collection::vec(2_000u64..20_000, 2..5),
        calls in proptest::collection::vec((0u64..3_000, 1u64..2_000, proptest::collection::vec(proptest::bool::ANY, 5)), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            // What the router sent (and whether that breaker was open), and
            // what each deployment's pacer admitted.
            let sent: Arc<std::sync::Mutex<Vec<(usize, bool)>>> = Arc::default();
            let log: Arc<std::sync::Mutex<Vec<(usize, Instant, u64)>>> = Arc::default();
            let mut breakers = Vec::new();
            let mut router = Router::builder();
            for (i, tpm) in tpms.iter().enumerate() {
                let pace = Pace::builder().tokens_per_minute(*tpm).build().unwrap();
                let breaker = Breaker::builder().build().unwrap();
                let admitted = log.clone();
                let client = tower::service_fn(move |n: u64| {
                    admitted.lock().unwrap().push((i, Instant::now(), n));
                    async move { Ok::<_, std::io::Error>(n) }
                });
                let paced = pace.layer().weigh(|n: &u64| Cost::tokens(*n)).layer(client);
                let guarded = breaker.layer().layer(paced);
                // Outside the breaker: what the router sent, and whether the
                // breaker was open then.
                let (sent, b) = (sent.clone(), breaker.clone());
                let seen = tower::service_fn(move |n: u64| {
                    let open = b.snapshot().state == semaforo::observe::BreakerState::Open;
                    sent.lock().unwrap().push((i, open));
                    guarded.clone().oneshot(n)
                });
                router = router.deployment(
                    Deployment::new(format!("d{i}"), BoxCloneSyncService::new(seen))
                        .pace(pace)
                        .breaker(breaker.clone()),
                );
                breakers.push(breaker);
            }
            let router = router.weigh(|n: &u64| Cost::tokens(*n)).max_attempts(2).build().unwrap();
            let t0 = Instant::now();
            for (at_ms, tokens, open) in calls {
                tokio::time::sleep_until(t0 + Duration::from_millis(at_ms)).await;
                for (b, o) in breakers.iter().zip(&open) {
                    if *o { b.force_open() } else { b.reset() }
                }
                let _ = router.clone().oneshot(tokens).await;
            }
            let sent = sent.lock().unwrap().clone();
            proptest::prop_assert!(sent.iter().all(|(_, open)| !open), "sent to an open breaker: {sent:?}");
            let log = log.lock().unwrap().clone();
            for (i, tpm) in tpms.iter().enumerate() {
                let mine: Vec<_> = log.iter().filter(|(d, ..)| *d == i).collect();
                let rate = *tpm as f64 / 60.0;
                for a in 0..mine.len() {
                    let mut sum = 0.0;
                    for b in a..mine.len() {
                        sum += mine[b].2 as f64;
                        let w = (mine[b].1 - mine[a].1).as_secs_f64() + 1e-6;
                        proptest::prop_assert!(sum <= rate * w + *tpm as f64 + 1e-6, "d{i}: {sum} in {w} s");
                    }
                }
            }
            Ok(())
        })?;
    }
}

/// Hedging at A's tracked p90 after a 50-call warm-up: A answers in 1 s but
/// one call in 20 takes 10 s; B always 1 s. The p99 is at least halved, at
/// most 10 % more calls are sent; with B's pacer unable to start, no hedge.
#[tokio::test(start_paused = true)]
async fn hedging_halves_the_p99_within_ten_percent_more_calls() {
    use semaforo::route::Hedge;
    let run = |hedge: bool, b_spent: bool| async move {
        let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let a_client = {
            let calls = a_calls.clone();
            tower::service_fn(move |_req: http::Request<Bytes>| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    let slow = n % 20 == 19;
                    tokio::time::sleep(Duration::from_secs(if slow { 10 } else { 1 })).await;
                    Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(OK.as_bytes())))
                }
            })
        };
        let b_client = {
            let calls = b_calls.clone();
            tower::service_fn(move |_req: http::Request<Bytes>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(OK.as_bytes())))
                }
            })
        };
        let (a, _) = deployment("a", a_client, 1_000);
        let (b, _) = deployment("b", b_client, 1);
        let b = if b_spent {
            // One request a day, spent: B cannot start anything in the run.
            let day = Pace::builder().requests_per_day(1).build().unwrap();
            let spend = day.layer().layer(tower::service_fn(|n: u64| async move {
                Ok::<_, std::io::Error>(n)
            }));
            spend.oneshot(1).await.unwrap();
            b.pace(day)
        } else {
            b
        };
        let mut router = Router::builder()
            .deployment(a)
            .deployment(b)
            .weigh(weigh)
            .classify(LlmClassifier::new());
        if hedge {
            router = router.hedge(
                Hedge::Percentile {
                    quantile: 0.9,
                    warm_up: 50,
                },
                0.1,
            );
        }
        let router = router.build().unwrap();
        let mut latencies = Vec::new();
        for _ in 0..1_000 {
            let t = Instant::now();
            router.clone().oneshot(chat(1)).await.unwrap();
            latencies.push(t.elapsed());
        }
        latencies.sort();
        let p99 = latencies[989];
        let sent = a_calls.load(Ordering::SeqCst) + b_calls.load(Ordering::SeqCst);
        (p99, sent)
    };
    let (p99_plain, sent_plain) = run(false, false).await;
    let (p99_hedged, sent_hedged) = run(true, false).await;
    println!("p99 {p99_plain:?} → {p99_hedged:?}; calls sent {sent_plain} → {sent_hedged}");
    assert!(
        p99_hedged * 2 <= p99_plain,
        "{p99_hedged:?} vs {p99_plain:?}"
    );
    assert!(sent_hedged <= 1_100, "{sent_hedged} calls for 1,000");
    // B cannot start a hedge (its pacer spent for the day): none is sent,
    // the p99 stays.
    let (p99_blocked, sent_blocked) = run(true, true).await;
    println!("b spent: p99 {p99_blocked:?}, calls sent {sent_blocked}");
    assert_eq!((p99_blocked, sent_blocked), (p99_plain, 1_000));
}

/// A hedge that fails first does not end the call: A answers 200 after 2 s,
/// the hedge to B (sent at 500 ms) answers 500 after 100 ms; the caller gets
/// A's 200 at 2 s, two calls sent. With `Hedge::After(0)` and a 10 % cap,
/// 200 calls send 21 hedges (10 %, plus the first a fresh router may send).
#[tokio::test(start_paused = true)]
async fn a_failed_hedge_waits_for_the_first_attempt_and_the_cap_holds() {
    use semaforo::route::Hedge;
    let slow_ok = |calls: Arc<AtomicUsize>| {
        tower::service_fn(move |_req: http::Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(OK.as_bytes())))
            }
        })
    };
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, _) = deployment("a", slow_ok(a_calls.clone()), 1_000);
    let (b, _) = deployment("b", answering(500, "{}", None, b_calls.clone()), 1);
    let router = Router::builder()
        .deployment(a)
        .deployment(b)
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .hedge(Hedge::After(Duration::from_millis(500)), 1.0)
        .build()
        .unwrap();
    let t = Instant::now();
    let res = router.clone().oneshot(chat(1)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(t.elapsed(), Duration::from_secs(2));
    assert_eq!(
        (
            a_calls.load(Ordering::SeqCst),
            b_calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );

    // The cap: every call late at once, at most 10 % hedged.
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, _) = deployment("a", slow_ok(a_calls.clone()), 1_000);
    let (b, _) = deployment("b", slow_ok(b_calls.clone()), 1);
    let router = Router::builder()
        .deployment(a)
        .deployment(b)
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .hedge(Hedge::After(Duration::ZERO), 0.1)
        .build()
        .unwrap();
    for _ in 0..200 {
        router.clone().oneshot(chat(1)).await.unwrap();
    }
    let (a_n, b_n) = (
        a_calls.load(Ordering::SeqCst),
        b_calls.load(Ordering::SeqCst),
    );
    println!("cap: a {a_n}, b {b_n}");
    assert_eq!(a_n + b_n, 221, "200 calls, 20 hedges (10 %) plus the first");

    // Invalid hedges are refused by the builder.
    for (when, share) in [
        (Hedge::After(Duration::ZERO), 0.0),
        (Hedge::After(Duration::ZERO), f64::NAN),
        (Hedge::After(Duration::ZERO), 1.5),
        (
            Hedge::Percentile {
                quantile: 1.5,
                warm_up: 0,
            },
            0.1,
        ),
    ] {
        let (a, _) = deployment("a", slow_ok(Arc::default()), 1);
        let err = Router::builder()
            .deployment(a)
            .hedge(when, share)
            .build()
            .expect_err("refused");
        assert!(err.to_string().contains("hedge"), "{err}");
    }
}

/// The total deadline holds across a deployment's bulkhead line: its one
/// place is taken by a 60 s call; a second call with a 5 s deadline ends at
/// 5 s (`Timeout`), not 60 s, and leaves the line.
#[tokio::test(start_paused = true)]
async fn the_deadline_holds_across_a_bulkhead_line() {
    let bulkhead = semaforo::bulkhead::Bulkhead::builder(1)
        .max_queue(10)
        .build()
        .unwrap();
    let slow = tower::service_fn(|_req: http::Request<Bytes>| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(OK.as_bytes())))
    });
    let svc = BoxCloneSyncService::new(bulkhead.layer().layer(slow));
    let router = Router::builder()
        .deployment(Deployment::new("a", svc))
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .deadline(Duration::from_secs(5))
        .build()
        .unwrap();
    let first = tokio::spawn(router.clone().oneshot(chat(1)));
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    let e = router.clone().oneshot(chat(1)).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    let r = Rejected::from_box(&e).unwrap();
    assert_eq!((r.layer(), r.kind()), ("route", RejectKind::Timeout));
    assert_eq!(bulkhead.snapshot().waiting, 0, "it left the line");
    // The first one ran into the same deadline.
    let e = first.await.unwrap().unwrap_err();
    assert_eq!(Rejected::from_box(&e).unwrap().kind(), RejectKind::Timeout);
}

/// One retry budget for failovers: with a budget of nothing (ratio 0, no
/// floor), a 529 from A is returned as it is (B never called); with room,
/// it fails over.
#[tokio::test(start_paused = true)]
async fn failovers_draw_from_one_retry_budget() {
    use semaforo::retry::RetryBudget;
    let overloaded =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    for (ratio, floor, b_expected, status) in [(0.0, 0.0, 0, 529), (1.0, 10.0, 1, 200)] {
        let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, _) = deployment(
            "a",
            answering(529, overloaded, None, a_calls.clone()),
            1_000,
        );
        let (b, _) = deployment("b", answering(200, OK, None, b_calls.clone()), 1);
        let budget = Arc::new(RetryBudget::new(ratio, floor, Duration::from_secs(10)).unwrap());
        let router = Router::builder()
            .deployment(a)
            .deployment(b)
            .weigh(weigh)
            .classify(LlmClassifier::new())
            .retry_budget(budget.clone())
            .build()
            .unwrap();
        let res = router.oneshot(chat(1)).await.unwrap();
        assert_eq!(res.status(), status);
        assert_eq!(
            (
                a_calls.load(Ordering::SeqCst),
                b_calls.load(Ordering::SeqCst)
            ),
            (1, b_expected)
        );
        assert_eq!(budget.exhausted(), u64::from(b_expected == 0));
    }
}

/// Two deployments of one account (two models) share its org-wide limit
/// through one `KeyedPace` and keep their own per-model ones: after a call
/// spends the org's 10,000 tokens on A's model, B's model cannot start now
/// either — the router waits for the earlier, not B at once.
#[tokio::test(start_paused = true)]
async fn deployments_of_one_account_share_its_limit() {
    use semaforo::llm::ModelField;
    use semaforo::pace::KeyedPace;
    let account = KeyedPace::builder(Pace::builder().tokens_per_minute(10_000))
        .shared(Pace::builder().tokens_per_minute(10_000))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let paced = |model: &'static str| {
        let svc = account
            .layer()
            .key(move |_: &http::Request<Bytes>| Some(model.to_owned()))
            .weigh(weigh)
            .layer(answering(200, OK, None, calls.clone()));
        Deployment::new(model, BoxCloneSyncService::new(svc))
            .pace(account.clone())
            .key(model)
    };
    let router = Router::builder()
        .deployment(paced("gpt-4o"))
        .deployment(paced("gpt-4o-mini"))
        .weigh(weigh)
        .key(ModelField)
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    let t0 = Instant::now();
    // ~10,000 tokens: the whole org budget.
    router.clone().oneshot(chat(9_990)).await.unwrap();
    let spent = t0.elapsed();
    router.clone().oneshot(chat(5_000)).await.unwrap();
    // The second waited for the org budget to refill 5,000 tokens (30 s),
    // though its model's own pacer was full.
    let waited = t0.elapsed() - spent;
    assert!(
        waited >= Duration::from_secs(29) && waited <= Duration::from_secs(31),
        "{waited:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(account.keys().len(), 2, "{:?}", account.keys());
}

/// Preference breaks ties before weights: A (preference 0) takes every
/// call it can start as soon as B (preference 1, weight 1,000) — 20 of 20
/// while A has room; once A's tokens are spent, B starts sooner and takes
/// the call.
#[tokio::test(start_paused = true)]
async fn preference_breaks_ties_and_never_delays_a_call() {
    let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, pa) = deployment("a", answering(200, OK, None, a_calls.clone()), 1);
    let (b, _) = deployment("b", answering(200, OK, None, b_calls.clone()), 1_000);
    let router = Router::builder()
        .deployment(a.preference(0))
        .deployment(b.preference(1))
        .weigh(weigh)
        .classify(LlmClassifier::new())
        .build()
        .unwrap();
    for _ in 0..20 {
        router.clone().oneshot(chat(100)).await.unwrap();
    }
    assert_eq!(
        (
            a_calls.load(Ordering::SeqCst),
            b_calls.load(Ordering::SeqCst)
        ),
        (20, 0)
    );
    // Another client of A's account spends its tokens (28,500 of burst
    // after the 5 % headroom): A cannot start the next call now, B can.
    let spend = pa
        .layer()
        .weigh(|n: &u64| Cost::tokens(*n))
        .layer(tower::service_fn(|n: u64| async move {
            Ok::<_, std::io::Error>(n)
        }));
    spend.oneshot(26_000).await.unwrap();
    let t0 = Instant::now();
    router.clone().oneshot(chat(5_000)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_millis(100), "no wait for A");
    assert_eq!(b_calls.load(Ordering::SeqCst), 1);
}

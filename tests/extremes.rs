//! Extreme values never panic: `Duration::MAX` is how many users spell "no
//! limit", and waits and counts come from classifiers and servers. Every
//! builder takes 0, 1 ns, ordinary values and `Duration::MAX` (it builds or
//! refuses with a `ConfigError`), and a call through what it built neither
//! panics nor hangs past what it promised.

use proptest::prelude::*;
use semaforo::backoff::Backoff;
use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::classify::Class;
use semaforo::pace::{Cost, Pace};
use semaforo::quota::{Quota, Rate};
use semaforo::retry::Retry;
use semaforo::shutdown::Shutdown;
use semaforo::timeout::Timeout;
use semaforo::BoxError;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

fn extreme() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::from_secs(1)),
        Just(Duration::from_secs(u64::MAX)),
        Just(Duration::MAX),
        any::<u64>().prop_map(Duration::from_nanos),
        any::<u64>().prop_map(Duration::from_secs),
    ]
}

/// An upstream that answers `class` after `work`.
fn upstream(
    class: Class,
    work: Duration,
) -> impl Service<(), Response = Class, Error = BoxError, Future = impl Send> + Clone + Send {
    tower::service_fn(move |()| async move {
        tokio::time::sleep(work).await;
        Ok::<_, BoxError>(class)
    })
}

fn by_class(r: Result<&Class, &BoxError>) -> Class {
    r.map_or(Class::Transient, |c| *c)
}

/// Runs one call for at most an hour of (paused) time; it may succeed, fail
/// or still be running, but it must not panic.
async fn one_call<S>(svc: S)
where
    S: Service<(), Error = BoxError>,
{
    let _ = tokio::time::timeout(Duration::from_secs(3_600), svc.oneshot(())).await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn timeouts_take_any_duration(a in extreme(), b in extreme(), c in extreme(), d in extreme()) {
        runtime().block_on(async {
            for t in [
                Timeout::builder().attempt(a).build(),
                Timeout::builder().attempt(a).total(b).build(),
                Timeout::builder().first_chunk(c).idle(d).build(),
            ]
            .into_iter()
            .flatten()
            {
                one_call(t.layer().layer(upstream(Class::Success, Duration::from_secs(86_400)))).await;
            }
        });
    }

    #[test]
    fn bulkhead_waits_take_any_duration(wait in extreme(), service in extreme()) {
        runtime().block_on(async {
            let Ok(b) = Bulkhead::builder(1)
                .max_queue(4)
                .max_wait(wait)
                .expected_service_time(service)
                .build()
            else {
                return;
            };
            let svc = b.layer().layer(upstream(Class::Success, Duration::from_secs(600)));
            let calls: Vec<_> = (0..3).map(|_| tokio::spawn(one_call(svc.clone()))).collect();
            for c in calls {
                c.await.unwrap();
            }
        });
    }

    #[test]
    fn breakers_take_any_duration(open in extreme(), cap in extreme(), window in extreme(), growth in prop_oneof![Just(1.0), Just(2.0), Just(f64::MAX)]) {
        runtime().block_on(async {
            for b in [
                Breaker::builder().consecutive_failures(1).open_for(open).build(),
                Breaker::builder().consecutive_failures(1).open_for(open).open_growth(growth, cap).open_jitter(1.0).build(),
                Breaker::builder().failure_rate(0.5).min_calls(1).window_time(window, 10).open_for(open).build(),
            ]
            .into_iter()
            .flatten()
            {
                let svc = b.layer().classify(by_class).layer(upstream(Class::Overloaded { retry_after: None }, Duration::ZERO));
                for _ in 0..3 {
                    one_call(svc.clone()).await;
                }
                let _ = b.snapshot();
            }
        });
    }

    #[test]
    fn retries_take_any_duration(base in extreme(), cap in extreme(), ceiling in extreme(), deadline in extreme(), hint in extreme()) {
        runtime().block_on(async {
            let Ok(backoff) = Backoff::exponential(base).cap(cap).build() else { return };
            for r in [
                Retry::builder().max_attempts(4).backoff(backoff.clone()).retry_after_ceiling(ceiling).build(),
                Retry::builder().max_attempts(4).backoff(backoff.clone()).deadline(deadline).build(),
            ]
            .into_iter()
            .flatten()
            {
                let throttled = Class::Throttled { retry_after: Some(hint) };
                one_call(r.layer().classify(by_class).layer(upstream(throttled, Duration::ZERO))).await;
                one_call(r.layer().classify(by_class).layer(upstream(Class::Transient, Duration::ZERO))).await;
            }
        });
    }

    #[test]
    fn pacers_take_any_duration_and_count(per in extreme(), wait in extreme(), pause in extreme(), hint in extreme(), n in prop_oneof![Just(1u64), Just(u64::MAX), any::<u64>()], tokens in prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()]) {
        runtime().block_on(async {
            let Ok(pace) = Pace::builder()
                .limit(semaforo::pace::Limit::new(semaforo::pace::Unit::Tokens, n, per))
                .max_wait(wait)
                .max_pause(pause)
                .build()
            else {
                return;
            };
            let throttled = Class::Throttled { retry_after: Some(hint) };
            let svc = pace
                .layer()
                .weigh(move |_: &()| Cost::tokens(tokens))
                .observe(move |_: &Class| semaforo::pace::Observed {
                    usage: Some(Cost::tokens(u64::MAX)),
                    info: None,
                })
                .classify(by_class)
                .layer(upstream(throttled, Duration::ZERO));
            for _ in 0..3 {
                one_call(svc.clone()).await;
            }
            let _ = pace.snapshot();
        });
    }

    #[test]
    fn quotas_and_shutdown_take_any_duration(per in extreme(), wait in extreme(), drain in extreme()) {
        runtime().block_on(async {
            let built: Result<Quota<u8>, _> = Quota::builder()
                .plan("p", Rate::new(1, per).burst(1))
                .max_wait(wait)
                .build();
            if let Ok(q) = built {
                let plan = q.plan_id("p").unwrap();
                let svc = q.layer(move |_: &()| (0u8, plan)).layer(upstream(Class::Success, Duration::ZERO));
                for _ in 0..3 {
                    one_call(svc.clone()).await;
                }
            }
            let shutdown = Shutdown::new();
            let svc = shutdown.layer().layer(upstream(Class::Success, Duration::from_secs(10)));
            let call = tokio::spawn(one_call(svc));
            tokio::task::yield_now().await;
            let report = tokio::time::timeout(Duration::from_secs(7_200), shutdown.drain(drain)).await;
            prop_assert!(report.is_ok(), "drain returned");
            call.await.unwrap();
            Ok(())
        })?;
    }
}

/// Request- and server-derived numbers through the LLM preset: a `max_tokens`
/// of u64::MAX is refused (it can never fit), a `Retry-After` of u64::MAX
/// seconds or of year 9999 neither panics nor stops the pacer for a year.
#[cfg(feature = "llm")]
#[tokio::test(start_paused = true)]
async fn llm_preset_takes_extreme_requests_and_answers() {
    use bytes::Bytes;
    use semaforo::llm::{LlmStack, Tier};
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()
    .unwrap();
    let hints = [
        "18446744073709551615",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "1e308",
    ];
    for hint in hints {
        let client = tower::service_fn(move |_req: http::Request<Bytes>| async move {
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(429)
                    .header("retry-after", hint)
                    .body(Bytes::from_static(
                        br#"{"usage":{"total_tokens":18446744073709551615}}"#,
                    ))
                    .unwrap(),
            )
        });
        let svc = stack.layer().layer(client);
        let req = http::Request::post("/v1/chat/completions")
            .body(Bytes::from_static(br#"{"max_tokens":10,"messages":[]}"#))
            .unwrap();
        let t0 = tokio::time::Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(3_600), svc.oneshot(req))
            .await
            .expect("answered within the hour");
        assert!(res.is_ok() || res.is_err());
        assert!(t0.elapsed() < Duration::from_secs(3_600));
        let paused = stack.pace().overflow().snapshot().paused_until;
        assert!(
            paused.is_none_or(|p| p - tokio::time::Instant::now() <= Duration::from_secs(60)),
            "paused {paused:?}"
        );
    }
    let client = tower::service_fn(|_req: http::Request<Bytes>| async {
        Ok::<_, std::io::Error>(http::Response::new(Bytes::new()))
    });
    let req = http::Request::post("/v1/chat/completions")
        .body(Bytes::from_static(
            br#"{"max_tokens":18446744073709551615,"messages":[{"role":"user","content":"hola"}]}"#,
        ))
        .unwrap();
    let err = stack.layer().layer(client).oneshot(req).await.unwrap_err();
    let r = semaforo::Rejected::from_box(&err).expect("a refusal");
    assert_eq!(r.kind(), semaforo::RejectKind::BudgetExceeded);
}

//! Fallback: answers from elsewhere on chosen classes, counted (not timed).

use semaforo::breaker::Breaker;
use semaforo::classify::{Class, Permanent};
use semaforo::fallback::{self, FallbackLayer};
use semaforo::observe::EventKind;
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{service_fn, Layer, Service, ServiceExt};

fn counting<F>(
    calls: &Arc<AtomicUsize>,
    answer: F,
) -> impl Service<u32, Response = String, Error = BoxError, Future = impl Send> + Clone
where
    F: Fn(u32) -> Result<String, BoxError> + Clone + Send + 'static,
{
    let calls = calls.clone();
    service_fn(move |x: u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        let r = answer(x);
        async move { r }
    })
}

#[tokio::test(start_paused = true)]
async fn breaker_open_100_calls_get_the_fallback_and_none_reaches_the_inner_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let breaker = Breaker::builder()
        .consecutive_failures(3)
        .open_for(Duration::from_secs(60))
        .build()
        .unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let layer = FallbackLayer::new(fallback::value("resting".to_string()))
        .name("plans")
        .on_event(move |e| ev.lock().unwrap().push(e.kind.clone()));
    let upstream = counting(&calls, |_| {
        Err(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) as BoxError)
    });
    let svc = layer.layer(breaker.layer().layer(upstream));

    // Three failures open the breaker (each answered by the fallback too:
    // `ConnectionRefused` is `Infrastructure`).
    for _ in 0..3 {
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), "resting");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(breaker.state(), semaforo::breaker::BreakerState::Open);
    for _ in 0..100 {
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), "resting");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "no call passed the open breaker"
    );
    // The breaker refused the 100 and is still open: no fallback answer
    // reached it as a success.
    let s = breaker.snapshot();
    assert_eq!(s.rejected, 100);
    assert_eq!(s.state, semaforo::breaker::BreakerState::Open);
    let ev = events.lock().unwrap();
    assert_eq!(ev.len(), 103);
    assert_eq!(
        ev.iter()
            .filter(|k| matches!(
                k,
                EventKind::Fallback {
                    class: Class::Overloaded { .. },
                    answered: true
                }
            ))
            .count(),
        100
    );
}

#[tokio::test]
async fn permanent_and_throttled_pass_unchanged_and_successes_are_untouched() {
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = counting(&calls, |x| match x {
        0 => Ok("real".to_string()),
        1 => Err(Box::new(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "bad request",
        )) as BoxError),
        2 => Err(Box::new(
            Rejected::new("quota", RejectKind::QuotaExceeded)
                .with_retry_after(Duration::from_secs(1)),
        ) as BoxError),
        3 => Err(Box::new(Rejected::new("budget", RejectKind::BudgetExceeded)) as BoxError),
        4 => Err(Box::new(Rejected::new("bulkhead", RejectKind::QueueFull)) as BoxError),
        _ => Err(Box::new(
            Rejected::new("budget", RejectKind::BudgetExceeded)
                .with_retry_after(Duration::from_secs(5)),
        ) as BoxError),
    });
    let svc = FallbackLayer::new(fallback::value("fallback".to_string())).layer(upstream);
    assert_eq!(svc.clone().oneshot(0).await.unwrap(), "real");
    // `InvalidInput` is Permanent: the same error, unchanged.
    let e = svc.clone().oneshot(1).await.unwrap_err();
    assert_eq!(e.to_string(), "bad request");
    assert!(semaforo::classify::classify_error(&*e)
        .permanent_reason()
        .is_some());
    // A quota's verdict on the caller is not answered.
    let e = svc.clone().oneshot(2).await.unwrap_err();
    assert_eq!(
        Rejected::find(&*e).unwrap().kind(),
        RejectKind::QuotaExceeded
    );
    // A budget refusal no wait would help is Permanent: not answered.
    let e = svc.clone().oneshot(3).await.unwrap_err();
    assert_eq!(
        Rejected::find(&*e).unwrap().kind(),
        RejectKind::BudgetExceeded
    );
    // A full line and a budget refusal with a time are answered.
    assert_eq!(svc.clone().oneshot(4).await.unwrap(), "fallback");
    assert_eq!(svc.clone().oneshot(5).await.unwrap(), "fallback");
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn a_failing_fallback_returns_the_original_error_and_a_529_response() {
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = counting(&calls, |_| {
        Err(
            Box::new(Rejected::new("breaker", RejectKind::CircuitOpen).with_detail("the original"))
                as BoxError,
        )
    });
    let svc = FallbackLayer::new(fallback::from_fn(|_: &fallback::Failure<'_>| {
        Err::<String, BoxError>("the fallback broke too".into())
    }))
    .layer(upstream);
    let e = svc.oneshot(1).await.unwrap_err();
    let r = Rejected::find(&*e).expect("the original refusal");
    assert_eq!(r.kind(), RejectKind::CircuitOpen);
    assert_eq!(r.detail(), Some("the original"));
}

/// An `Ok` 529 classified Overloaded: the fallback answers, marked; when
/// the fallback fails the original 529 comes back.
#[cfg(feature = "http")]
#[tokio::test]
async fn a_529_response_is_answered_and_marked_and_comes_back_when_the_fallback_fails() {
    use semaforo::classify::HttpClassifier;
    use semaforo::fallback::{FellBack, MarkHttp};

    let upstream = service_fn(|_: http::Request<()>| async {
        Ok::<_, std::io::Error>(
            http::Response::builder()
                .status(529)
                .body("overloaded")
                .unwrap(),
        )
    });
    let svc = FallbackLayer::new(fallback::value(http::Response::new("cached lesson")))
        .classify(HttpClassifier)
        .mark(MarkHttp)
        .layer(upstream);
    let res = svc.oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(*res.body(), "cached lesson");
    assert_eq!(
        res.extensions().get::<FellBack>().map(|f| f.class),
        Some(Class::Overloaded { retry_after: None })
    );

    let upstream = service_fn(|_: http::Request<()>| async {
        Ok::<_, std::io::Error>(
            http::Response::builder()
                .status(529)
                .body("overloaded")
                .unwrap(),
        )
    });
    let svc = FallbackLayer::new(fallback::from_fn(|_: &fallback::Failure<'_>| {
        Err::<http::Response<&'static str>, BoxError>("no".into())
    }))
    .classify(HttpClassifier)
    .mark(MarkHttp)
    .layer(upstream);
    let res = svc.oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(res.status(), 529);
    assert_eq!(*res.body(), "overloaded");
    assert!(res.extensions().get::<FellBack>().is_none());
}

#[tokio::test]
async fn another_service_gets_a_clone_of_the_request_and_when_replaces_the_rule() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let backup = service_fn(move |x: u32| {
        s.lock().unwrap().push(x);
        async move { Ok::<_, std::io::Error>(format!("backup {x}")) }
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = counting(&calls, |_| {
        Err(Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)) as BoxError)
    });
    // TimedOut is Transient: not answered by default …
    let svc = FallbackLayer::new(fallback::service(backup.clone())).layer(upstream.clone());
    assert!(svc.oneshot(7).await.is_err());
    // … answered with a rule that says so.
    let svc = FallbackLayer::new(fallback::service(backup))
        .when(|f| f.class() == Class::Transient)
        .layer(upstream);
    assert_eq!(svc.oneshot(7).await.unwrap(), "backup 7");
    assert_eq!(*seen.lock().unwrap(), vec![7]);
    // Permanent is never answered by the default rule, even for a refusal
    // of the listed kinds classified Permanent.
    use semaforo::fallback::When;
    let budget = Rejected::new("budget", RejectKind::BudgetExceeded);
    let f = fallback::Failure::new(Class::permanent(Permanent::RequestTooLarge), Some(&budget));
    assert!(!fallback::DefaultWhen.when(&f));
    let f = fallback::Failure::new(Class::Throttled { retry_after: None }, Some(&budget));
    assert!(fallback::DefaultWhen.when(&f));
}

/// A future that counts its drops.
struct Tracked(Arc<AtomicUsize>);
impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn dropped_at_each_await_the_call_it_waits_for_is_dropped() {
    use futures::FutureExt;
    let drops = Arc::new(AtomicUsize::new(0));
    // Waiting for the inner call.
    let d = drops.clone();
    let upstream = service_fn(move |_: u32| {
        let t = Tracked(d.clone());
        async move {
            let _t = t;
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<String, std::io::Error>("late".into())
        }
    });
    let mut svc = FallbackLayer::new(fallback::value("f".to_string())).layer(upstream);
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert!((&mut fut).now_or_never().is_none());
    drop(fut);
    assert_eq!(drops.load(Ordering::SeqCst), 1);

    // Waiting for the fallback service.
    let d = drops.clone();
    let backup = service_fn(move |_: u32| {
        let t = Tracked(d.clone());
        async move {
            let _t = t;
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<String, std::io::Error>("late backup".into())
        }
    });
    let upstream = service_fn(|_: u32| async {
        Err::<String, _>(Rejected::new("breaker", RejectKind::CircuitOpen))
    });
    let mut svc = FallbackLayer::new(fallback::service(backup)).layer(upstream);
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert!((&mut fut).now_or_never().is_none());
    drop(fut);
    assert_eq!(drops.load(Ordering::SeqCst), 2);
}

#[cfg(feature = "cache")]
mod stale {
    use super::*;
    use semaforo::cache::Cache;

    #[tokio::test(start_paused = true)]
    async fn the_last_good_answer_is_served_stale_and_marked_and_never_cached_back() {
        let cache: Cache<u32, String> = Cache::builder()
            .ttl(Duration::from_secs(60))
            .stale_for(Duration::from_secs(600))
            .build()
            .unwrap();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let (d, c) = (down.clone(), calls.clone());
        let upstream = service_fn(move |x: u32| {
            c.fetch_add(1, Ordering::SeqCst);
            let down = d.load(Ordering::SeqCst);
            async move {
                if down {
                    Err(Box::new(Rejected::new("breaker", RejectKind::CircuitOpen)) as BoxError)
                } else {
                    Ok(format!("plan {x}"))
                }
            }
        });
        let key = |x: &u32| Some(*x);
        let marks = Arc::new(Mutex::new(Vec::new()));
        let m = marks.clone();
        let svc = FallbackLayer::new(fallback::stale(&cache, key, semaforo::share::Cloned))
            .mark_fn(move |_: &mut String, f| m.lock().unwrap().push(f.class))
            .layer(cache.layer(key).layer(upstream));

        assert_eq!(svc.clone().oneshot(1).await.unwrap(), "plan 1");
        down.store(true, Ordering::SeqCst);
        // Within the TTL the cache answers.
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), "plan 1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Past it, the upstream is asked, fails, and the stale answer is
        // served through the fallback, marked.
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), "plan 1");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            *marks.lock().unwrap(),
            vec![Class::Overloaded { retry_after: None }]
        );
        assert_eq!(cache.snapshot().stale_served, 1);
        // Not cached back: still a miss and a stale answer next time.
        assert_eq!(cache.get(&1), None);
        assert_eq!(svc.clone().oneshot(1).await.unwrap(), "plan 1");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Nothing kept for another key: the original error.
        let e = svc.clone().oneshot(2).await.unwrap_err();
        assert_eq!(Rejected::find(&*e).unwrap().kind(), RejectKind::CircuitOpen);
        // Past ttl + stale_for: gone.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(svc.oneshot(1).await.is_err());
    }

    #[cfg(feature = "http")]
    #[tokio::test(start_paused = true)]
    async fn a_stale_http_answer_carries_its_age_and_the_fallback_mark() {
        use bytes::Bytes;
        use semaforo::classify::HttpClassifier;
        use semaforo::fallback::{FellBack, MarkHttp};
        use semaforo::share::{KeptResponse, Served, WholeResponse};
        let cache: Cache<u32, Arc<KeptResponse>> = Cache::builder()
            .ttl(Duration::from_secs(60))
            .stale_for(Duration::from_secs(600))
            .build()
            .unwrap();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = down.clone();
        let upstream = service_fn(move |_: http::Request<()>| {
            let down = d.load(Ordering::SeqCst);
            async move {
                let status = if down { 529 } else { 200 };
                Ok::<_, std::io::Error>(
                    http::Response::builder()
                        .status(status)
                        .body(Bytes::from("lesson"))
                        .unwrap(),
                )
            }
        });
        let key = |_: &http::Request<()>| Some(1u32);
        let svc = FallbackLayer::new(fallback::stale(&cache, key, WholeResponse))
            .classify(HttpClassifier)
            .mark(MarkHttp)
            .layer(
                cache
                    .layer(key)
                    .share(WholeResponse)
                    .classify(HttpClassifier)
                    .layer(upstream),
            );
        assert_eq!(
            svc.clone()
                .oneshot(http::Request::new(()))
                .await
                .unwrap()
                .status(),
            200
        );
        down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(90)).await;
        let res = svc.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.body(), "lesson");
        assert_eq!(
            res.extensions().get::<Served>(),
            Some(&Served::Cache {
                age: Duration::from_secs(90),
                stale: true
            })
        );
        assert!(res.extensions().get::<FellBack>().is_some());
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn outcome(code: u8) -> Result<String, BoxError> {
        use std::io::ErrorKind::*;
        match code % 8 {
            0 => Ok("real".into()),
            1 => Err(Box::new(std::io::Error::from(ConnectionRefused))),
            2 => Err(Box::new(std::io::Error::from(TimedOut))),
            3 => Err(Box::new(std::io::Error::from(InvalidInput))),
            4 => Err(Box::new(Rejected::new("breaker", RejectKind::CircuitOpen))),
            5 => Err(Box::new(Rejected::new("bulkhead", RejectKind::QueueFull))),
            6 => Err(Box::new(
                Rejected::new("quota", RejectKind::QuotaExceeded)
                    .with_retry_after(Duration::from_secs(1)),
            )),
            _ => Err(Box::new(Rejected::new(
                "shutdown",
                RejectKind::ShuttingDown,
            ))),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The caller gets the fallback exactly when the default rule
        /// accepts the class, and otherwise the inner result unchanged;
        /// the fallback is never asked for a success.
        #[test]
        fn the_fallback_answers_exactly_the_accepted_classes(codes in proptest::collection::vec(any::<u8>(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let asked = Arc::new(AtomicUsize::new(0));
                let a = asked.clone();
                let upstream = service_fn(|code: u8| async move { outcome(code) });
                let svc = FallbackLayer::new(fallback::from_fn(move |_: &fallback::Failure<'_>| {
                    a.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, BoxError>("fallback".to_string())
                }))
                .layer(upstream);
                let mut expected_asks = 0;
                for code in codes {
                    let got = svc.clone().oneshot(code).await;
                    let accepted = matches!(code % 8, 1 | 4 | 5);
                    if accepted {
                        expected_asks += 1;
                        prop_assert_eq!(got.unwrap(), "fallback");
                    } else {
                        match (got, outcome(code)) {
                            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                            (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                            _ => prop_assert!(false, "the result changed for code {}", code),
                        }
                    }
                }
                prop_assert_eq!(asked.load(Ordering::SeqCst), expected_asks);
                Ok(())
            })?;
        }
    }
}

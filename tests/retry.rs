//! Retry behaviour under paused time: seed schedules, Retry-After, ceilings,
//! deadlines, budgets, request policies, cancellation.

use semaforo::backoff::{Backoff, Jitter};
use semaforo::classify::{Class, Permanent};
use semaforo::observe::EventKind;
use semaforo::retry::{Retry, RetryAfterTooLong, RetryBudget};
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// An upstream that answers the classes of `script` in turn (then successes),
/// each after `work`, and logs when each attempt started.
#[derive(Clone)]
struct Scripted {
    script: Arc<Mutex<Vec<Class>>>,
    starts: Arc<Mutex<Vec<Duration>>>,
    work: Duration,
    t0: Instant,
}

impl Scripted {
    fn new(script: Vec<Class>, work: Duration) -> Self {
        Scripted {
            script: Arc::new(Mutex::new(script.into_iter().rev().collect())),
            starts: Arc::default(),
            work,
            t0: Instant::now(),
        }
    }

    fn service(
        &self,
    ) -> impl Service<
        u32,
        Response = Class,
        Error = std::io::Error,
        Future = impl std::future::Future<Output = Result<Class, std::io::Error>> + Send,
    > + Clone
           + Send {
        let me = self.clone();
        tower::service_fn(move |_req: u32| {
            let me = me.clone();
            async move {
                me.starts.lock().unwrap().push(me.t0.elapsed());
                let class = me.script.lock().unwrap().pop().unwrap_or(Class::Success);
                tokio::time::sleep(me.work).await;
                Ok::<_, std::io::Error>(class)
            }
        })
    }

    fn starts(&self) -> Vec<Duration> {
        self.starts.lock().unwrap().clone()
    }
}

/// The upstream's `Ok(class)` is the outcome.
fn by_value(r: Result<&Class, &std::io::Error>) -> Class {
    r.map_or(Class::Transient, |c| *c)
}

fn stack(retry: &Retry, up: &Scripted) -> impl Service<u32, Response = Class, Error = BoxError> {
    ServiceBuilder::new()
        .layer(retry.layer().classify(by_value))
        .service(up.service())
}

async fn once<S: Service<u32, Response = Class, Error = BoxError>>(
    svc: &mut S,
) -> Result<Class, BoxError> {
    svc.ready().await?.call(7).await
}

fn no_jitter(base: Duration) -> Backoff {
    Backoff::exponential(base)
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn seed_001_three_attempts_exponential_from_two_seconds() {
    let up = Scripted::new(vec![Class::Transient; 5], Duration::ZERO);
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(no_jitter(secs(2)))
        .no_budget()
        .build()
        .unwrap();
    let mut svc = stack(&retry, &up);
    assert_eq!(
        once(&mut svc).await.unwrap(),
        Class::Transient,
        "the last real result"
    );
    assert_eq!(up.starts(), vec![secs(0), secs(2), secs(6)]);
    assert_eq!(retry.retries(), 2);
}

#[tokio::test(start_paused = true)]
async fn seed_004_schedule_within_its_jitter_bounds_for_each_class() {
    let backoff = Backoff::exponential(secs(60))
        .ceiling(secs(300))
        .cap(secs(390))
        .jitter(Jitter::Proportional {
            min: 0.10,
            max: 0.30,
        })
        .throttled(2.0, secs(900))
        .overloaded(1.5, secs(600))
        .build()
        .unwrap();
    let throttled = Class::Throttled { retry_after: None };
    let overloaded = Class::Overloaded { retry_after: None };
    for (class, mult, class_cap) in [
        (Class::Transient, 1.0, 390.0),
        (throttled, 2.0, 900.0),
        (overloaded, 1.5, 600.0),
    ] {
        for _ in 0..5 {
            let up = Scripted::new(vec![class; 6], Duration::ZERO);
            let retry = Retry::builder()
                .max_attempts(6)
                .backoff(backoff.clone())
                .no_budget()
                .build()
                .unwrap();
            let mut svc = stack(&retry, &up);
            once(&mut svc).await.unwrap();
            let starts = up.starts();
            assert_eq!(starts.len(), 6);
            for (n, w) in starts.windows(2).enumerate() {
                let delay = (w[1] - w[0]).as_secs_f64();
                let e = (60.0 * 2f64.powi(n as i32)).min(300.0);
                let lo = ((e * 1.1).min(390.0) * mult).min(class_cap);
                let hi = ((e * 1.3).min(390.0) * mult).min(class_cap);
                assert!(
                    delay >= lo - 1e-6 && delay <= hi + 1e-6,
                    "{class:?} retry {n}: {delay} not in [{lo}, {hi}]"
                );
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_seven_seconds_is_honoured() {
    let up = Scripted::new(
        vec![Class::Throttled {
            retry_after: Some(secs(7)),
        }],
        Duration::ZERO,
    );
    let retry = Retry::builder()
        .backoff(no_jitter(secs(1)))
        .build()
        .unwrap();
    let mut svc = stack(&retry, &up);
    assert_eq!(once(&mut svc).await.unwrap(), Class::Success);
    assert_eq!(
        up.starts(),
        vec![secs(0), secs(7)],
        "attempt 2 at 7 s, not earlier"
    );
    // And a backoff longer than the Retry-After wins: max(retry_after, backoff).
    let up = Scripted::new(
        vec![Class::Throttled {
            retry_after: Some(secs(1)),
        }],
        Duration::ZERO,
    );
    let retry = Retry::builder()
        .backoff(no_jitter(secs(5)))
        .build()
        .unwrap();
    once(&mut stack(&retry, &up)).await.unwrap();
    assert_eq!(up.starts(), vec![secs(0), secs(5)]);
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn http_retry_after_and_retry_after_ms_headers() {
    use semaforo::classify::HttpClassifier;
    for (header, value, expected) in [
        ("retry-after", "7", secs(7)),
        ("retry-after-ms", "1500", Duration::from_millis(1500)),
    ] {
        let starts: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let t0 = Instant::now();
        let svc = tower::service_fn({
            let starts = starts.clone();
            move |_req: http::Request<()>| {
                let mut s = starts.lock().unwrap();
                s.push(t0.elapsed());
                let status = if s.len() == 1 { 429 } else { 200 };
                let res = http::Response::builder()
                    .status(status)
                    .header(header, value)
                    .body(())
                    .unwrap();
                async move { Ok::<_, std::io::Error>(res) }
            }
        });
        let retry = Retry::builder()
            .backoff(no_jitter(Duration::from_millis(100)))
            .build()
            .unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(
                retry
                    .layer()
                    .classify(HttpClassifier)
                    .requests(semaforo::retry::HttpRequests::default()),
            )
            .service(svc);
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            *starts.lock().unwrap(),
            vec![Duration::ZERO, expected],
            "{header}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_an_hour_returns_at_once_with_the_hint() {
    let hour = secs(3600);
    // As an Ok response (a 429): returned as is, at once.
    let up = Scripted::new(
        vec![Class::Throttled {
            retry_after: Some(hour),
        }],
        Duration::ZERO,
    );
    let retry = Retry::builder().build().unwrap();
    let t0 = Instant::now();
    assert_eq!(
        once(&mut stack(&retry, &up)).await.unwrap(),
        Class::Throttled {
            retry_after: Some(hour)
        }
    );
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(up.starts().len(), 1);
    // As an error: wrapped with the wait attached.
    let svc = tower::service_fn(|_: u32| async { Err::<(), _>(std::io::Error::other("429")) });
    let mut svc = ServiceBuilder::new()
        .layer(
            retry
                .layer()
                .classify(move |_: Result<&(), &std::io::Error>| Class::Throttled {
                    retry_after: Some(hour),
                }),
        )
        .service(svc);
    let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
    let too_long = err
        .downcast_ref::<RetryAfterTooLong>()
        .expect("RetryAfterTooLong");
    assert_eq!(too_long.retry_after, hour);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(
        semaforo::classify::classify_error(err.as_ref()),
        Class::Throttled {
            retry_after: Some(hour)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn permanent_is_never_retried() {
    let up = Scripted::new(
        vec![Class::permanent(Permanent::InvalidRequest); 3],
        Duration::ZERO,
    );
    let retry = Retry::builder().max_attempts(5).build().unwrap();
    assert_eq!(
        once(&mut stack(&retry, &up)).await.unwrap(),
        Class::permanent(Permanent::InvalidRequest)
    );
    assert_eq!(up.starts().len(), 1);
    assert_eq!(retry.retries(), 0);
}

#[tokio::test(start_paused = true)]
async fn deadline_is_respected_to_the_millisecond() {
    // Attempts take 2 s and fail; 3 s between attempts; 10 s in all.
    let up = Scripted::new(vec![Class::Transient; 10], secs(2));
    let retry = Retry::builder()
        .max_attempts(10)
        .backoff(
            Backoff::exponential(secs(3))
                .factor(1.0)
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        )
        .deadline(secs(10))
        .no_budget()
        .build()
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(
        once(&mut stack(&retry, &up)).await.unwrap(),
        Class::Transient
    );
    // 0–2, sleep to 5, 5–7; a 3 s sleep would end at the deadline: stop at 7 s.
    assert_eq!(up.starts(), vec![secs(0), secs(5)]);
    assert_eq!(t0.elapsed(), secs(7));

    // A hanging attempt is cut exactly at the deadline.
    let up = Scripted::new(vec![Class::Transient], secs(1000));
    let retry = Retry::builder()
        .name("openai")
        .deadline(Duration::from_millis(10_250))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let err = once(&mut stack(&retry, &up)).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_millis(10_250));
    let r = Rejected::from_box(&err).unwrap();
    assert_eq!(r.kind(), RejectKind::Timeout);
    assert_eq!(
        err.to_string(),
        "retry 'openai': timed out (deadline 10.25 s)"
    );
}

#[tokio::test(start_paused = true)]
async fn amplification_is_bounded_by_the_budget() {
    for (ratio, floor) in [(0.2, 1.0), (0.01, 1.0), (0.01, 0.0)] {
        let attempts = Arc::new(AtomicUsize::new(0));
        let per_call: Arc<Mutex<std::collections::HashMap<u32, u32>>> = Arc::default();
        let budget = Arc::new(RetryBudget::new(ratio, floor, secs(10)).unwrap());
        let retry = Retry::builder()
            .max_attempts(3)
            .backoff(no_jitter(Duration::ZERO))
            .budget(budget.clone())
            .build()
            .unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(retry.layer())
            .service(tower::service_fn({
                let attempts = attempts.clone();
                let per_call = per_call.clone();
                move |i: u32| {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    *per_call.lock().unwrap().entry(i).or_default() += 1;
                    async {
                        Err::<(), _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                    }
                }
            }));
        for i in 0..1000 {
            let err = svc.ready().await.unwrap().call(i).await.unwrap_err();
            // The last real error, not a new one.
            assert_eq!(
                err.downcast_ref::<std::io::Error>().unwrap().kind(),
                std::io::ErrorKind::ConnectionRefused
            );
        }
        let total = attempts.load(Ordering::SeqCst) as f64;
        let floor_total = floor * 10.0;
        assert!(
            total <= 1000.0 * (1.0 + ratio) + floor_total,
            "ratio {ratio}: {total} attempts"
        );
        // Not truncated to zero: the ratio's share of retries really happened.
        assert!(
            total >= 1000.0 * (1.0 + ratio) + floor_total - 2.0,
            "ratio {ratio}: only {total} attempts"
        );
        // Every call that stopped before its 3rd attempt was refused once, and counted.
        let cut_short = per_call
            .lock()
            .unwrap()
            .values()
            .filter(|n| **n < 3)
            .count() as u64;
        assert_eq!(retry.gave_up_on_budget(), cut_short, "each refusal counted");
        assert_eq!(budget.exhausted(), cut_short);
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_during_backoff_stops_everything() {
    let up = Scripted::new(vec![Class::Transient; 5], Duration::ZERO);
    let retry = Retry::builder()
        .backoff(no_jitter(secs(10)))
        .no_budget()
        .build()
        .unwrap();
    let mut svc = stack(&retry, &up);
    let fut = svc.ready().await.unwrap().call(1);
    let _ = tokio::time::timeout(secs(5), fut).await; // dropped mid-sleep
    tokio::time::sleep(secs(100)).await;
    assert_eq!(up.starts(), vec![secs(0)], "no attempt after the drop");
}

#[tokio::test(start_paused = true)]
async fn retry_events_say_class_attempt_and_delay() {
    let events: Arc<Mutex<Vec<(u32, Class, Duration)>>> = Arc::default();
    let up = Scripted::new(
        vec![
            Class::Infrastructure,
            Class::Overloaded { retry_after: None },
        ],
        Duration::ZERO,
    );
    let retry = Retry::builder()
        .backoff(no_jitter(secs(1)))
        .on_event({
            let events = events.clone();
            move |e| {
                if let EventKind::Retried {
                    class,
                    attempt,
                    delay,
                } = e.kind
                {
                    events.lock().unwrap().push((attempt, class, delay))
                }
            }
        })
        .build()
        .unwrap();
    once(&mut stack(&retry, &up)).await.unwrap();
    let got = events.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            (1, Class::Infrastructure, secs(1)),
            (2, Class::Overloaded { retry_after: None }, secs(2))
        ]
    );
}

/// A request that counts its clones.
#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);
impl Clone for Counted {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::SeqCst);
        Counted(self.0.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn requests_are_cloned_only_when_retries_are_possible() {
    let clones = Arc::new(AtomicUsize::new(0));
    let ok = tower::service_fn(|_: Counted| async { Ok::<_, std::io::Error>(()) });
    let off = Retry::builder().max_attempts(1).build().unwrap();
    let mut svc = ServiceBuilder::new().layer(off.layer()).service(ok);
    svc.ready()
        .await
        .unwrap()
        .call(Counted(clones.clone()))
        .await
        .unwrap();
    assert_eq!(
        clones.load(Ordering::SeqCst),
        0,
        "nothing cloned with retries off"
    );
    let failing = tower::service_fn(|_: Counted| async {
        Err::<(), _>(std::io::Error::from(std::io::ErrorKind::TimedOut))
    });
    let on = Retry::builder()
        .max_attempts(3)
        .backoff(no_jitter(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(on.layer()).service(failing);
    let _ = svc
        .ready()
        .await
        .unwrap()
        .call(Counted(clones.clone()))
        .await;
    assert_eq!(clones.load(Ordering::SeqCst), 2, "3 attempts need 2 copies");
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn http_post_needs_an_idempotency_key_and_attempts_are_visible() {
    use semaforo::retry::{Attempt, HttpRequests};
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let svc = tower::service_fn({
        let seen = seen.clone();
        move |req: http::Request<()>| {
            seen.lock()
                .unwrap()
                .push(req.extensions().get::<Attempt>().unwrap().0);
            async {
                Ok::<_, std::io::Error>(http::Response::builder().status(503).body(()).unwrap())
            }
        }
    });
    let retry = Retry::builder()
        .backoff(no_jitter(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let layer = retry.layer().classify(semaforo::classify::HttpClassifier);
    let mut plain = ServiceBuilder::new()
        .layer(layer.clone().requests(HttpRequests::default()))
        .service(svc.clone());
    let post = || {
        http::Request::post("/v1/chat/completions")
            .body(())
            .unwrap()
    };
    plain.ready().await.unwrap().call(post()).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![1],
        "POST without Idempotency-Key: not retried"
    );
    seen.lock().unwrap().clear();
    let keyed = http::Request::post("/v1/chat/completions")
        .header("Idempotency-Key", "abc")
        .body(())
        .unwrap();
    plain.ready().await.unwrap().call(keyed).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
    seen.lock().unwrap().clear();
    let mut llm = ServiceBuilder::new()
        .layer(layer.requests(HttpRequests::default().allow_non_idempotent()))
        .service(svc);
    llm.ready().await.unwrap().call(post()).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
}

#[test]
fn bad_configuration_is_an_error() {
    assert_eq!(
        Retry::builder().max_attempts(0).build().unwrap_err().field,
        "max_attempts"
    );
}

/// An upstream that counts its clones; the first attempt of every call fails
/// (transient), retries answer the upstream's `version`.
struct Versioned {
    version: u32,
    clones: Arc<AtomicUsize>,
    fail_first: bool,
}

impl Clone for Versioned {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Versioned {
            version: self.version,
            clones: self.clones.clone(),
            fail_first: self.fail_first,
        }
    }
}

impl Service<u32> for Versioned {
    type Response = u32;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<u32, std::io::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: u32) -> Self::Future {
        std::future::ready(if self.fail_first && attempt == 1 {
            Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
        } else {
            Ok(self.version)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_that_succeeds_at_once_clones_no_service() {
    let clones = Arc::new(AtomicUsize::new(0));
    let upstream = Versioned {
        version: 1,
        clones: clones.clone(),
        fail_first: false,
    };
    let retry = Retry::builder()
        .max_attempts(3)
        .no_budget()
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new().layer(retry.layer()).service(upstream);
    let at_layer = clones.load(Ordering::SeqCst);
    assert_eq!(
        at_layer, 1,
        "one copy for retries, made when the layer wraps it"
    );
    for _ in 0..100 {
        assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
    }
    assert_eq!(
        clones.load(Ordering::SeqCst),
        at_layer,
        "100 successes, no clone"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_go_to_a_clone_of_the_service_as_changed_by_get_mut() {
    let clones = Arc::new(AtomicUsize::new(0));
    let upstream = Versioned {
        version: 1,
        clones: clones.clone(),
        fail_first: true,
    };
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(no_jitter(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    // The attempt number is the request: attempt 1 fails, the retry answers.
    let mut svc = ServiceBuilder::new()
        .layer(
            retry.layer().requests(
                semaforo::retry::RequestFns::new(|n: &u32| Some(*n))
                    .on_attempt(|n: &mut u32, a| *n = a),
            ),
        )
        .service(upstream);
    let before = clones.load(Ordering::SeqCst);
    assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 1);
    assert_eq!(
        clones.load(Ordering::SeqCst),
        before + 1,
        "one clone for the call's retries"
    );
    svc.get_mut().version = 2;
    assert_eq!(svc.get_ref().version, 2);
    assert_eq!(
        svc.ready().await.unwrap().call(1).await.unwrap(),
        2,
        "the retry went to the service as changed"
    );
    // A clone of the service shares its copy for retries.
    let mut other = svc.clone();
    assert_eq!(other.ready().await.unwrap().call(1).await.unwrap(), 2);
    assert_eq!(svc.into_inner().version, 2);
}

/// A retryable call's future polled again after it answered calls the
/// upstream no more (it made a new attempt before).
#[tokio::test(start_paused = true)]
async fn poll_after_ready_does_not_call_the_upstream_again() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |_: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<u32, std::io::Error>(5) }
    });
    let retry = Retry::builder()
        .max_attempts(3)
        .no_budget()
        .build()
        .unwrap();
    let mut svc = tower::Layer::layer(&retry.layer(), upstream);
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert!(matches!(
        futures::poll!(fut.as_mut()),
        std::task::Poll::Ready(Ok(5))
    ));
    let again = futures::poll!(fut.as_mut());
    assert!(
        matches!(again, std::task::Poll::Ready(Err(_))),
        "polled after done: an error"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "polled after done: a second upstream call"
    );
}

/// An answered call polled again after its deadline passed reports no
/// deadline (and calls nothing).
#[tokio::test(start_paused = true)]
async fn an_answered_call_polled_after_its_deadline_reports_nothing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let rejected = Arc::new(AtomicUsize::new(0));
    let (c, r) = (calls.clone(), rejected.clone());
    let upstream = tower::service_fn(move |_: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<u32, std::io::Error>(5) }
    });
    let retry = Retry::builder()
        .max_attempts(3)
        .deadline(Duration::from_secs(1))
        .no_budget()
        .on_event(move |e| {
            if matches!(e.kind, EventKind::Rejected { .. }) {
                r.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let mut svc = tower::Layer::layer(&retry.layer(), upstream);
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert!(matches!(
        futures::poll!(fut.as_mut()),
        std::task::Poll::Ready(Ok(5))
    ));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(matches!(
        futures::poll!(fut.as_mut()),
        std::task::Poll::Ready(Err(_))
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        rejected.load(Ordering::SeqCst),
        0,
        "no deadline reported for an answered call"
    );
}

/// A backoff ceiling below the base is a configuration error, as a cap below
/// it is (every delay was flattened to the ceiling, the growth gone).
#[test]
fn a_backoff_ceiling_below_the_base_is_an_error() {
    let e = Backoff::exponential(secs(2))
        .ceiling(secs(1))
        .build()
        .unwrap_err();
    assert_eq!(e.field, "ceiling");
    assert!(Backoff::exponential(secs(2))
        .ceiling(secs(2))
        .build()
        .is_ok());
}

/// A ratio of the recent requests that is a whole number of retries gives
/// exactly that many: 0.57 of 100 requests is 57 retries (in `f64`,
/// 0.57 × 100 is 56.99999999999999, and the 57th was refused), 0.29 of 100
/// is 29; never one more.
#[tokio::test(start_paused = true)]
async fn a_ratio_of_whole_retries_allows_exactly_that_many() {
    for (ratio, requests, retries) in [
        (0.57, 100, 57),
        (0.29, 100, 29),
        (0.1, 30, 3),
        (0.25, 10, 2),
    ] {
        let budget = RetryBudget::new(ratio, 0.0, secs(10)).unwrap();
        for _ in 0..requests {
            budget.deposit();
        }
        let mut allowed = 0;
        while budget.try_withdraw() {
            allowed += 1;
            assert!(allowed <= requests, "no end");
        }
        assert_eq!(allowed, retries, "{ratio} of {requests}");
        assert_eq!(budget.exhausted(), 1);
    }
}

//! Outside attack on `route` (routing and failover), the adaptive bulkhead
//! limit (`bulkhead::adaptive`), `degrade` and `health`.
//!
//! Every test asserts a promised behaviour with numbers. Tests marked with a
//! `// FAILS_<name>` comment above them were failing when written: they
//! document a broken promise (expected vs actual in the report).

#![cfg(feature = "http")]
#![allow(clippy::type_complexity)]

use semaforo::backoff::{Backoff, Jitter};
use semaforo::breaker::Breaker;
use semaforo::bulkhead::{Aimd, Bulkhead, Gradient2, Limit, Vegas};
use semaforo::classify::Class;
use semaforo::degrade::{self, Degrade, DegradeLayer, Level, Rule};
use semaforo::health::{Health, Status};
use semaforo::observe::EventKind;
use semaforo::route::{Deployment, Hedge, Router};
use semaforo::shutdown::Shutdown;
use semaforo::{BoxError, RejectKind, Rejected};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, Service, ServiceExt};

type Svc = BoxCloneSyncService<u64, u64, BoxError>;

// ───────────────────────────── helpers ─────────────────────────────

/// Polls once with a no-op waker, turning a panic into `Err(message)`.
fn poll_catch<F: Future + ?Sized>(fut: Pin<&mut F>) -> Result<Poll<F::Output>, String> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(&mut cx))).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".into())
    })
}

/// A client answering the `i`-th call with `script[i]` (the last one
/// repeated) after `delay`; counts calls.
fn scripted(script: Vec<u64>, delay: Duration, calls: Arc<AtomicUsize>) -> Svc {
    BoxCloneSyncService::new(service_fn(move |_n: u64| {
        let i = calls.fetch_add(1, Ordering::SeqCst);
        let code = script[i.min(script.len() - 1)];
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<u64, BoxError>(code)
        }
    }))
}

/// Deployment `name`: `pace` in front of a client answering 0 at once.
fn paced(
    name: &'static str,
    pace: &semaforo::pace::Pace,
    calls: Arc<AtomicUsize>,
) -> Deployment<Svc> {
    Deployment::new(
        name,
        BoxCloneSyncService::new(pace.layer().layer(scripted(vec![0], Duration::ZERO, calls))),
    )
    .pace(pace.clone())
}

/// 0 → success; 429 → throttled, retry after 10 s; 503 → overloaded,
/// retry after 10 s; 401 → permanent; anything else → transient.
fn classify(r: Result<&u64, &BoxError>) -> Class {
    match r {
        Ok(0) => Class::Success,
        Ok(429) => Class::Throttled {
            retry_after: Some(Duration::from_secs(10)),
        },
        Ok(503) => Class::Overloaded {
            retry_after: Some(Duration::from_secs(10)),
        },
        Ok(401) => Class::permanent(semaforo::classify::Permanent::Authentication),
        Ok(_) => Class::Transient,
        Err(e) => semaforo::classify::classify_error(e.as_ref()),
    }
}

fn counters(n: usize) -> Vec<Arc<AtomicUsize>> {
    (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect()
}

fn load(c: &[Arc<AtomicUsize>]) -> Vec<usize> {
    c.iter().map(|c| c.load(Ordering::SeqCst)).collect()
}

type Log = Arc<Mutex<Vec<(String, u32, String)>>>;

fn routed_log(log: &Log) -> impl Fn(&semaforo::observe::Event<'_>) + Send + Sync + 'static {
    let log = log.clone();
    move |e| {
        if let EventKind::Routed {
            deployment,
            attempt,
            why,
        } = &e.kind
        {
            log.lock()
                .unwrap()
                .push((deployment.to_string(), *attempt, why.as_str().to_owned()));
        }
    }
}

/// A deployment whose `poll_ready` always fails; counts readies and calls.
#[derive(Clone)]
struct NeverReady {
    name: &'static str,
    readies: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Service<u64> for NeverReady {
    type Response = u64;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u64, BoxError>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.readies.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("{} refused the connection", self.name),
        )
        .into()))
    }
    fn call(&mut self, _req: u64) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(0))
    }
}

/// Counts drops of a hung call's future.
struct DropCount(Arc<AtomicUsize>);
impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

// ───────────────────────── route: configuration ─────────────────────────

/// Builders refuse NaN, infinite, negative and out-of-range floats, and
/// never panic on them; the extreme valid values build.
#[tokio::test(start_paused = true)]
async fn r_hedge_floats_at_their_extremes_are_config_errors() {
    let c = counters(2);
    let mk = || {
        Router::builder()
            .deployment(Deployment::new(
                "a",
                scripted(vec![0], Duration::ZERO, c[0].clone()),
            ))
            .deployment(Deployment::new(
                "b",
                scripted(vec![0], Duration::ZERO, c[1].clone()),
            ))
    };
    for share in [
        f64::NAN,
        f64::INFINITY,
        -1.0,
        0.0,
        -0.0,
        1.0000001,
        f64::MIN_POSITIVE - 1.0,
    ] {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            mk().hedge(Hedge::After(Duration::ZERO), share)
                .build()
                .is_err()
        }));
        assert_eq!(
            r.ok(),
            Some(true),
            "max_share {share} must be a ConfigError"
        );
    }
    for q in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.1, 1.1] {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            mk().hedge(
                Hedge::Percentile {
                    quantile: q,
                    warm_up: 0,
                },
                0.5,
            )
            .build()
            .is_err()
        }));
        assert_eq!(r.ok(), Some(true), "quantile {q} must be a ConfigError");
    }
    // Valid extremes build and route.
    for (h, share) in [
        (Hedge::After(Duration::MAX), 1.0),
        (Hedge::After(Duration::ZERO), f64::MIN_POSITIVE),
        (
            Hedge::Percentile {
                quantile: 0.0,
                warm_up: u32::MAX,
            },
            1.0,
        ),
        (
            Hedge::Percentile {
                quantile: 1.0,
                warm_up: 0,
            },
            1.0,
        ),
    ] {
        let r = mk().hedge(h, share).build().unwrap();
        assert_eq!(r.oneshot(1).await.unwrap(), 0);
    }
}

// ───────────────────────── route: failover ─────────────────────────

/// Every deployment failing: each is tried exactly once before any is
/// tried again, attempt numbers 1, 2, 3, and the answer is the last one.
#[tokio::test(start_paused = true)]
async fn r_every_deployment_failing_is_tried_once_and_the_last_answer_returned() {
    let c = counters(3);
    let log: Log = Arc::default();
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            scripted(vec![500], Duration::from_millis(5), c[0].clone()),
        ))
        .deployment(Deployment::new(
            "b",
            scripted(vec![502], Duration::from_millis(5), c[1].clone()),
        ))
        .deployment(Deployment::new(
            "c",
            scripted(vec![504], Duration::from_millis(5), c[2].clone()),
        ))
        .classify(classify)
        .backoff(None)
        .max_attempts(3)
        .on_event(routed_log(&log))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let out = router.clone().oneshot(1).await.unwrap();
    assert_eq!(load(&c), vec![1, 1, 1], "each deployment once");
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(15),
        "no wait between failovers"
    );
    let log = log.lock().unwrap().clone();
    let names: Vec<&str> = log.iter().map(|(d, _, _)| d.as_str()).collect();
    let attempts: Vec<u32> = log.iter().map(|(_, a, _)| *a).collect();
    assert_eq!(attempts, vec![1, 2, 3], "{log:?}");
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["a", "b", "c"], "{log:?}");
    let expected = match names[2] {
        "a" => 500,
        "b" => 502,
        _ => 504,
    };
    assert_eq!(out, expected, "the answer of the last attempt ({log:?})");
    assert_eq!(log[1].2, "failed_over");
    assert_eq!(log[2].2, "failed_over");
}

/// Readiness failures: nothing is ever called on a deployment whose
/// `poll_ready` fails; each failing deployment is readied once per attempt;
/// the error returned is the readiness error (it says who refused); a
/// healthy deployment takes the call.
#[tokio::test(start_paused = true)]
async fn r_readiness_failures_fail_over_and_the_error_says_who() {
    let (ra, ca, rb, cb) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let a = NeverReady {
        name: "a",
        readies: ra.clone(),
        calls: ca.clone(),
    };
    let b = NeverReady {
        name: "b",
        readies: rb.clone(),
        calls: cb.clone(),
    };
    let router = Router::builder()
        .deployment(Deployment::new("a", a.clone()))
        .deployment(Deployment::new("b", b.clone()))
        .backoff(None)
        .max_attempts(4)
        .build()
        .unwrap();
    let err = router.clone().oneshot(1).await.unwrap_err();
    assert_eq!(ca.load(Ordering::SeqCst) + cb.load(Ordering::SeqCst), 0);
    assert_eq!(
        ra.load(Ordering::SeqCst) + rb.load(Ordering::SeqCst),
        4,
        "one readiness poll per attempt"
    );
    assert_eq!(ra.load(Ordering::SeqCst), 2);
    assert_eq!(rb.load(Ordering::SeqCst), 2);
    let msg = err.to_string();
    assert!(msg.contains("refused the connection"), "{msg}");

    // With a healthy third one, it takes the call, once.
    let c = counters(1);
    let router: Router<BoxCloneSyncService<u64, u64, BoxError>> = Router::builder()
        .deployment(Deployment::new("a", BoxCloneSyncService::new(a)))
        .deployment(Deployment::new("b", BoxCloneSyncService::new(b)))
        .deployment(Deployment::new(
            "c",
            scripted(vec![0], Duration::ZERO, c[0].clone()),
        ))
        .backoff(None)
        .max_attempts(3)
        .build()
        .unwrap();
    for _ in 0..10 {
        assert_eq!(router.clone().oneshot(1).await.unwrap(), 0);
    }
    assert_eq!(load(&c), vec![10]);
    assert_eq!(ca.load(Ordering::SeqCst) + cb.load(Ordering::SeqCst), 0);
}

// FAILS_r_a_retry_after_is_honoured_before_going_back_to_a_deployment
/// "The wait before an attempt goes back to a deployment already tried
/// …: by the last failure's class, as the retry layer's" — and the retry
/// layer waits `max(retry_after, backoff)` for `Throttled`. A lone
/// deployment answering 429 with Retry-After 10 s must not be called again
/// before 10 s (no pacer: the router is the only one who knows).
#[tokio::test(start_paused = true)]
async fn r_a_retry_after_is_honoured_before_going_back_to_a_deployment() {
    for first in [429u64, 503] {
        let c = counters(1);
        let times: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let t0 = Instant::now();
        let svc = {
            let (c, times) = (c[0].clone(), times.clone());
            BoxCloneSyncService::new(service_fn(move |_n: u64| {
                times.lock().unwrap().push(t0.elapsed());
                let i = c.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<u64, BoxError>(if i == 0 { first } else { 0 }) }
            }))
        };
        let router = Router::builder()
            .deployment(Deployment::new("a", svc))
            .classify(classify)
            .max_attempts(2)
            .build()
            .unwrap();
        let out = router.oneshot(1).await.unwrap();
        let times = times.lock().unwrap().clone();
        println!("{first}: answer {out}, call times {times:?}");
        assert_eq!(out, 0);
        assert_eq!(times.len(), 2);
        assert!(
            times[1] >= Duration::from_secs(10),
            "{first} with Retry-After 10 s: called again after {:?}",
            times[1]
        );
    }
}

/// Each deployment's own `Retry-After` is kept for the call: "a" asks 20 s,
/// then "b" asks 1 s. The third attempt goes to "b" after 1 s — not to "a"
/// after "b"'s 1 s (the last failure's wait, read for another deployment).
/// (Added after the trial, with the fix.)
#[tokio::test(start_paused = true)]
async fn r_each_deployment_keeps_its_own_retry_after() {
    // 20 → throttled 20 s; 1 → throttled 1 s; 0 → success.
    fn classify(r: Result<&u64, &BoxError>) -> Class {
        match r {
            Ok(0) => Class::Success,
            Ok(s) => Class::Throttled {
                retry_after: Some(Duration::from_secs(*s)),
            },
            Err(e) => semaforo::classify::classify_error(e.as_ref()),
        }
    }
    let log: Arc<Mutex<Vec<(&'static str, Duration)>>> = Arc::default();
    let t0 = Instant::now();
    let dep = |name: &'static str, first: u64| {
        let (log, n) = (log.clone(), Arc::new(AtomicUsize::new(0)));
        Deployment::new(
            name,
            BoxCloneSyncService::new(service_fn(move |_r: u64| {
                log.lock().unwrap().push((name, t0.elapsed()));
                let i = n.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<u64, BoxError>(if i == 0 { first } else { 0 }) }
            })),
        )
    };
    let router = Router::builder()
        .deployment(dep("a", 20))
        .deployment(dep("b", 1))
        .classify(classify)
        .max_attempts(3)
        .build()
        .unwrap();
    assert_eq!(router.oneshot(1).await.unwrap(), 0);
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!((log[0].0, log[1].0), ("a", "b"), "{log:?}");
    assert_eq!(log[2].0, "b", "the sooner deployment: {log:?}");
    assert!(log[2].1 >= Duration::from_secs(1), "{log:?}");
    assert!(log[2].1 < Duration::from_secs(20), "{log:?}");

    // A lone deployment asking 20 s with a 5 s deadline: its answer comes
    // back at once (the soonest start is past the deadline).
    let router = Router::builder()
        .deployment(dep("c", 20))
        .classify(classify)
        .max_attempts(3)
        .deadline(Duration::from_secs(5))
        .build()
        .unwrap();
    let t1 = Instant::now();
    assert_eq!(router.oneshot(1).await.unwrap(), 20);
    assert_eq!(t1.elapsed(), Duration::ZERO);
}

/// A hung upstream: with a deadline, the call ends at exactly the deadline
/// with `Timeout`, the hung future is dropped, and nothing else is called
/// (no hedge configured). The error says what happened.
#[tokio::test(start_paused = true)]
async fn r_a_hung_upstream_ends_at_the_deadline_and_is_dropped() {
    let drops = Arc::new(AtomicUsize::new(0));
    let hung = {
        let drops = drops.clone();
        BoxCloneSyncService::new(service_fn(move |_n: u64| {
            let guard = DropCount(drops.clone());
            async move {
                let _g = guard;
                std::future::pending::<()>().await;
                Ok::<u64, BoxError>(0)
            }
        }))
    };
    let c = counters(1);
    let router = Router::builder()
        .deployment(Deployment::new("hung", hung))
        .deployment(Deployment::new(
            "ok",
            scripted(vec![0], Duration::ZERO, c[0].clone()),
        ))
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let err = router.clone().oneshot(1).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    let r = Rejected::from_box(&err).expect("a Rejected");
    assert_eq!(r.kind(), RejectKind::Timeout);
    assert!(r.to_string().contains("deadline"), "{r}");
    assert_eq!(drops.load(Ordering::SeqCst), 1, "the hung call dropped");
    assert_eq!(load(&c), vec![0]);
}

// FAILS_r_a_backoff_past_the_deadline_is_not_slept
/// "A call whose earliest start is beyond [the deadline] is refused at
/// once". A lone deployment failing, backoff a constant 10 s, deadline 1 s:
/// the retry's earliest start is 10 s away; the call must end at once (its
/// last answer, or `BudgetExceeded` with a retry_after), not sleep until the
/// deadline and end in a `Timeout` that hides the upstream's answer.
#[tokio::test(start_paused = true)]
async fn r_a_backoff_past_the_deadline_is_not_slept() {
    let c = counters(1);
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            scripted(vec![500], Duration::ZERO, c[0].clone()),
        ))
        .classify(classify)
        .backoff(Some(
            Backoff::exponential(Duration::from_secs(10))
                .factor(1.0)
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        ))
        .deadline(Duration::from_secs(1))
        .max_attempts(3)
        .build()
        .unwrap();
    let t0 = Instant::now();
    let out = router.oneshot(1).await;
    let took = t0.elapsed();
    println!("took {took:?}, out {out:?}, calls {:?}", load(&c));
    assert_eq!(load(&c), vec![1]);
    assert!(
        took < Duration::from_secs(1),
        "slept {took:?} for a retry it could never make; answer: {out:?}"
    );
}

/// Smooth weighted round robin, 3:1, from 4,000 concurrent calls on a
/// multi-thread runtime: exactly 3,000 and 1,000, and exactly one `Routed`
/// event per call.
#[test]
fn r_weights_share_exactly_under_a_multi_thread_storm() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = counters(2);
        let events = Arc::new(AtomicUsize::new(0));
        let ev = events.clone();
        let router = Router::builder()
            .deployment(
                Deployment::new("a", scripted(vec![0], Duration::ZERO, c[0].clone())).weight(3),
            )
            .deployment(Deployment::new(
                "b",
                scripted(vec![0], Duration::ZERO, c[1].clone()),
            ))
            .on_event(move |e| {
                if matches!(e.kind, EventKind::Routed { .. }) {
                    ev.fetch_add(1, Ordering::SeqCst);
                }
            })
            .build()
            .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let r = router.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    // The router is always ready (documented).
                    assert_eq!(r.clone().call(1).await.unwrap(), 0);
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(load(&c), vec![3000, 1000]);
        assert_eq!(events.load(Ordering::SeqCst), 4000);
    });
}

/// A router future polled again after it answered — an error answer from
/// failover, and a refusal with every breaker open — answers an error and
/// calls nothing (the upstream is an `async` block: resuming it panics).
#[tokio::test(start_paused = true)]
async fn r_polled_again_after_a_failure_or_a_refusal_calls_nothing() {
    let c = counters(2);
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            scripted(vec![500], Duration::ZERO, c[0].clone()),
        ))
        .deployment(Deployment::new(
            "b",
            scripted(vec![500], Duration::ZERO, c[1].clone()),
        ))
        .classify(classify)
        .backoff(None)
        .build()
        .unwrap();
    let mut f = Box::pin(router.clone().call(1));
    let first = poll_catch(f.as_mut()).unwrap();
    assert!(matches!(first, Poll::Ready(Ok(500))), "{first:?}");
    let calls = load(&c).iter().sum::<usize>();
    assert_eq!(calls, 3);
    for _ in 0..3 {
        let again = poll_catch(f.as_mut()).expect("no panic");
        assert!(matches!(again, Poll::Ready(Err(_))), "{again:?}");
    }
    assert_eq!(load(&c).iter().sum::<usize>(), 3, "no new call");

    // Every breaker open (tripped): the router's own refusal, then an
    // error again.
    let br: Vec<Breaker> = (0..2)
        .map(|_| {
            Breaker::builder()
                .consecutive_failures(1)
                .open_for(Duration::from_secs(30))
                .open_jitter(0.0)
                .build()
                .unwrap()
        })
        .collect();
    let dep = |i: usize, name: &'static str| {
        let up = scripted(vec![500], Duration::ZERO, c[i].clone());
        let up = service_fn(move |n: u64| {
            let mut up = up.clone();
            async move {
                match up.call(n).await {
                    Ok(0) => Ok(0),
                    Ok(code) => Err::<u64, BoxError>(format!("status {code}").into()),
                    Err(e) => Err(e),
                }
            }
        });
        Deployment::new(name, BoxCloneSyncService::new(br[i].layer().layer(up)))
            .breaker(br[i].clone())
    };
    let router = Router::builder()
        .deployment(dep(0, "a"))
        .deployment(dep(1, "b"))
        .backoff(None)
        .build()
        .unwrap();
    let _ = router.clone().oneshot(1).await.unwrap_err();
    let before = load(&c).iter().sum::<usize>();
    assert_eq!(before, 5, "two more upstream calls tripped both breakers");
    let mut f = Box::pin(router.clone().call(1));
    match poll_catch(f.as_mut()).unwrap() {
        Poll::Ready(Err(e)) => {
            let r = Rejected::from_box(&e).expect("a Rejected");
            assert_eq!(r.kind(), RejectKind::CircuitOpen);
            assert_eq!(r.layer(), "route");
            assert!(
                r.retry_after()
                    .is_some_and(|ra| ra <= Duration::from_secs(30)),
                "{r:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let again = poll_catch(f.as_mut()).expect("no panic");
    assert!(matches!(again, Poll::Ready(Err(_))), "{again:?}");
    assert_eq!(load(&c).iter().sum::<usize>(), before, "no new call");
}

// FAILS_r_a_forced_open_breaker_takes_no_call
/// `Deployment::breaker`: "the router sends nothing to it while it is
/// open"; `Breaker::force_open`: "Refuse every call" (health and
/// `degrade::breaker_open` count it as open). A forced-open deployment next
/// to a healthy one, `max_attempts(1)`: every call must go to the healthy
/// one. And with both forced open, the call is refused at once (module
/// docs: "when every deployment's breaker is open, CircuitOpen …, none
/// for a breaker forced open"), not after a backoff.
#[tokio::test(start_paused = true)]
async fn r_a_forced_open_breaker_takes_no_call() {
    let c = counters(2);
    let br: Vec<Breaker> = (0..2)
        .map(|_| Breaker::builder().build().unwrap())
        .collect();
    let dep = |i: usize, name: &'static str| {
        let up = scripted(vec![0], Duration::ZERO, c[i].clone());
        Deployment::new(name, BoxCloneSyncService::new(br[i].layer().layer(up)))
            .breaker(br[i].clone())
    };
    br[0].force_open();
    let router = Router::builder()
        .deployment(dep(0, "drained"))
        .deployment(dep(1, "healthy"))
        .max_attempts(1)
        .build()
        .unwrap();
    let mut failed = Vec::new();
    for k in 0..10 {
        if let Err(e) = router.clone().oneshot(1).await {
            failed.push((k, e.to_string()));
        }
    }
    println!("failed calls: {failed:?}, upstream calls {:?}", load(&c));
    let fails_one = failed.len();

    br[1].force_open();
    let router = Router::builder()
        .deployment(dep(0, "a"))
        .deployment(dep(1, "b"))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let err = router.clone().oneshot(1).await.unwrap_err();
    let took = t0.elapsed();
    let r = Rejected::from_box(&err).expect("a Rejected");
    println!("both forced open: {r:?} after {took:?}");
    assert_eq!(
        fails_one, 0,
        "calls routed to a forced-open deployment: {failed:?}"
    );
    assert_eq!(r.kind(), RejectKind::CircuitOpen);
    assert_eq!(r.retry_after(), None);
    assert_eq!(took, Duration::ZERO, "refused after a backoff");
}

/// Full bulkheads on every deployment: the call fails over from one to the
/// other and the error says the line was full; with a deadline shorter than
/// the line's wait, it is refused at once with a retry_after.
#[tokio::test(start_paused = true)]
async fn r_every_bulkhead_full_the_error_says_queue_full() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let bh: Vec<Bulkhead> = (0..2)
        .map(|_| {
            Bulkhead::builder(1)
                .expected_service_time(Duration::from_secs(4))
                .build()
                .unwrap()
        })
        .collect();
    let calls = counters(2);
    let dep = |i: usize, name: &'static str| {
        let (gate, calls) = (gate.clone(), calls[i].clone());
        let up = service_fn(move |_n: u64| {
            let gate = gate.clone();
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                gate.notified().await;
                Ok::<u64, BoxError>(0)
            }
        });
        Deployment::new(name, BoxCloneSyncService::new(bh[i].layer().layer(up)))
            .bulkhead(bh[i].clone())
    };
    let router = Router::builder()
        .deployment(dep(0, "a"))
        .deployment(dep(1, "b"))
        .backoff(None)
        .max_attempts(2)
        .build()
        .unwrap();
    let h1 = tokio::spawn(router.clone().oneshot(1));
    let h2 = tokio::spawn(router.clone().oneshot(2));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(load(&calls), vec![1, 1]);
    let err = router.clone().oneshot(3).await.unwrap_err();
    let r = Rejected::from_box(&err).expect("a Rejected");
    assert_eq!(r.kind(), RejectKind::QueueFull, "{r}");
    assert_eq!(load(&calls), vec![1, 1], "a full bulkhead calls nothing");

    let router = Router::builder()
        .deployment(dep(0, "a"))
        .deployment(dep(1, "b"))
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let err = router.clone().oneshot(3).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let r = Rejected::from_box(&err).expect("a Rejected");
    assert_eq!(r.kind(), RejectKind::BudgetExceeded, "{r}");
    assert!(
        r.retry_after()
            .is_some_and(|ra| ra > Duration::from_secs(1)),
        "{r:?}"
    );
    gate.notify_waiters();
    h1.await.unwrap().unwrap();
    h2.await.unwrap().unwrap();
    for b in &bh {
        assert_eq!(b.snapshot().in_flight, 0);
    }
}

/// A deployment whose own layers would refuse a call coming now (its
/// bulkhead's line full, its pacer's start past the pacer's `max_wait`)
/// goes after one that would take it, even a later one: with
/// `max_attempts(1)` the call waits in "b"'s line and is answered, where it
/// went to the sooner "a" and was refused at once. (Added after the trial,
/// with the fix.)
#[tokio::test(start_paused = true)]
async fn r_a_deployment_that_would_refuse_goes_after_one_that_takes_the_call() {
    let work = Duration::from_secs(10);
    let held = |service: Duration| {
        Bulkhead::builder(1)
            .max_queue(10)
            .expected_service_time(service)
            .build()
            .unwrap()
    };
    // Bulkheads: "a" (1 s a call, no line) and "b" (4 s a call, a line of
    // 10), each running one call.
    let c = counters(2);
    let full = Bulkhead::builder(1)
        .max_queue(0)
        .expected_service_time(Duration::from_secs(1))
        .build()
        .unwrap();
    let waits = held(Duration::from_secs(4));
    let router = Router::builder()
        .deployment(
            Deployment::new(
                "a",
                BoxCloneSyncService::new(full.layer().layer(scripted(vec![0], work, c[0].clone()))),
            )
            .bulkhead(full.clone()),
        )
        .deployment(
            Deployment::new(
                "b",
                BoxCloneSyncService::new(waits.layer().layer(scripted(
                    vec![0],
                    work,
                    c[1].clone(),
                ))),
            )
            .bulkhead(waits.clone()),
        )
        .max_attempts(1)
        .build()
        .unwrap();
    let h1 = tokio::spawn(router.clone().oneshot(1));
    let h2 = tokio::spawn(router.clone().oneshot(2));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(load(&c), vec![1, 1]);
    let t0 = Instant::now();
    assert_eq!(router.clone().oneshot(3).await.unwrap(), 0);
    assert_eq!(load(&c), vec![1, 2]);
    assert!(
        t0.elapsed() >= work,
        "waited in b's line: {:?}",
        t0.elapsed()
    );
    h1.await.unwrap().unwrap();
    h2.await.unwrap().unwrap();

    // Pacer: "a" allows 1 call a minute and waits at most 5 s (its next
    // start, 60 s away, is refused at once); "b"'s bulkhead line is 100 s.
    let c = counters(2);
    let pace = semaforo::pace::Pace::builder()
        .requests_per_minute(1)
        .max_wait(Duration::from_secs(5))
        .build()
        .unwrap();
    let slow = held(Duration::from_secs(100));
    let router = Router::builder()
        .deployment(paced("a", &pace, c[0].clone()))
        .deployment(
            Deployment::new(
                "b",
                BoxCloneSyncService::new(slow.layer().layer(scripted(vec![0], work, c[1].clone()))),
            )
            .bulkhead(slow.clone()),
        )
        .max_attempts(1)
        .build()
        .unwrap();
    assert_eq!(router.clone().oneshot(1).await.unwrap(), 0); // a's one call
    let h = tokio::spawn(router.clone().oneshot(2)); // b's running call
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(load(&c), vec![1, 1]);
    assert_eq!(router.clone().oneshot(3).await.unwrap(), 0);
    assert_eq!(load(&c), vec![1, 2]);
    h.await.unwrap().unwrap();
}

/// The same for a deployment whose key has no pacer yet: its first call
/// would get a new pacer from the template (`max_wait` 2 s) under shared
/// limits 10 s busy — refused at once — so the call goes to the deployment
/// whose line is 100 s. (Added after the trial, with the fix.)
#[tokio::test(start_paused = true)]
async fn r_an_unbuilt_key_is_read_as_its_first_call_would_meet_it() {
    use semaforo::pace::{KeyedPace, Pace};
    let keyed = KeyedPace::builder(
        Pace::builder()
            .requests_per_minute(1_000)
            .max_wait(Duration::from_secs(2)),
    )
    .shared(Pace::builder().requests_per_minute(6))
    .build()
    .unwrap();
    let c = counters(3);
    let paced = |key: &'static str, calls: Arc<AtomicUsize>| {
        BoxCloneSyncService::new(
            keyed
                .layer()
                .key(move |_: &u64| Some(key.to_owned()))
                .layer(scripted(vec![0], Duration::ZERO, calls)),
        )
    };
    // Another model spends the shared limits: the next start is 10 s out.
    let other = paced("other", c[2].clone());
    for i in 0..6 {
        other.clone().oneshot(i).await.unwrap();
    }
    let slow = Bulkhead::builder(1)
        .max_queue(10)
        .expected_service_time(Duration::from_secs(100))
        .build()
        .unwrap();
    let router = Router::builder()
        .deployment(
            Deployment::new("a", paced("gpt", c[0].clone()))
                .pace(keyed.clone())
                .key("gpt"),
        )
        .deployment(
            Deployment::new(
                "b",
                BoxCloneSyncService::new(slow.layer().layer(scripted(
                    vec![0],
                    Duration::from_secs(10),
                    c[1].clone(),
                ))),
            )
            .bulkhead(slow.clone()),
        )
        .max_attempts(1)
        .build()
        .unwrap();
    let h = tokio::spawn(router.clone().oneshot(1)); // b's running call
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(load(&c), vec![0, 1, 6]);
    assert_eq!(router.clone().oneshot(2).await.unwrap(), 0);
    assert_eq!(load(&c), vec![0, 2, 6]);
    h.await.unwrap().unwrap();
}

/// A deployment whose pacer refuses for now — a budget (a limit with a
/// `max_wait` of its own) spent, the pacer closed — is not "a cost no
/// deployment can ever admit" (413, no `retry_after`): its own refusal comes
/// back, `BudgetExceeded` with the budget's `retry_after`, or
/// `ShuttingDown`, at once. (Added after the trial, with the fix.)
#[tokio::test(start_paused = true)]
async fn r_a_budget_spent_or_a_closed_pacer_answers_its_own_refusal() {
    use semaforo::pace::{Limit, Pace};
    let pace = Pace::builder()
        .limit(Limit::requests_per_minute(1).max_wait(Duration::from_secs(1)))
        .build()
        .unwrap();
    let c = counters(1);
    let router = Router::builder()
        .deployment(paced("a", &pace, c[0].clone()))
        .build()
        .unwrap();
    assert_eq!(router.clone().oneshot(1).await.unwrap(), 0);
    let t0 = Instant::now();
    let err = router.clone().oneshot(2).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let r = Rejected::from_box(&err).expect("a Rejected");
    assert_eq!(r.kind(), RejectKind::BudgetExceeded, "{r}");
    assert_eq!(r.http_status(), 503, "{r}");
    let ra = r.retry_after().expect("the budget's retry_after");
    assert!(
        ra >= Duration::from_secs(58) && ra <= Duration::from_secs(60),
        "{r}"
    );
    pace.close();
    let err = router.clone().oneshot(3).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let r = Rejected::from_box(&err).expect("a Rejected");
    assert_eq!(r.kind(), RejectKind::ShuttingDown, "{r}");
    assert_eq!(load(&c), vec![1]);
}

/// A deployment whose breaker is half-open with its probe place taken
/// refuses every other call: the router sends them elsewhere (they tied
/// with it at "now", and half of them were refused `CircuitOpen`). (Added
/// after an audit, with the fix.)
#[tokio::test(start_paused = true)]
async fn r_a_half_open_breaker_with_its_probe_taken_takes_no_call() {
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(1))
        .build()
        .unwrap();
    let c = counters(2);
    let a = {
        let n = c[0].clone();
        BoxCloneSyncService::new(breaker.layer().classify(classify).layer(service_fn(
            move |_r: u64| {
                let i = n.fetch_add(1, Ordering::SeqCst);
                async move {
                    if i == 0 {
                        return Ok::<u64, BoxError>(500);
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(0)
                }
            },
        )))
    };
    // Opened by a failure; 1 s later a probe goes and takes 5 s.
    assert_eq!(a.clone().oneshot(0).await.unwrap(), 500);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let probe = tokio::spawn(a.clone().oneshot(0));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(breaker.state(), semaforo::breaker::BreakerState::HalfOpen);
    let router = Router::builder()
        .deployment(Deployment::new("a", a.clone()).breaker(breaker.clone()))
        .deployment(Deployment::new(
            "b",
            scripted(vec![0], Duration::ZERO, c[1].clone()),
        ))
        .max_attempts(1)
        .build()
        .unwrap();
    for i in 0..10 {
        assert_eq!(router.clone().oneshot(i).await.unwrap(), 0, "call {i}");
    }
    assert_eq!(load(&c), vec![2, 10]);
    // The probe outlives `open_for` (a hung upstream): a call now would
    // reopen the breaker and be refused — still not sent there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..10 {
        assert_eq!(router.clone().oneshot(i).await.unwrap(), 0, "call {i}");
    }
    assert_eq!(load(&c), vec![2, 20]);
    assert_eq!(probe.await.unwrap().unwrap(), 0);
}

/// "Hedging: … a second goes to another deployment … — only one whose
/// breaker is closed": a breaker whose open time is over (it would turn
/// half-open and spend its probe on the hedge) takes no hedge. (Added after
/// an audit, with the fix.)
#[tokio::test(start_paused = true)]
async fn r_a_hedge_never_goes_to_a_breaker_that_is_not_closed() {
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(1))
        .build()
        .unwrap();
    let c = counters(2);
    let b = BoxCloneSyncService::new(breaker.layer().classify(classify).layer(scripted(
        vec![500, 0],
        Duration::ZERO,
        c[1].clone(),
    )));
    assert_eq!(b.clone().oneshot(0).await.unwrap(), 500);
    tokio::time::sleep(Duration::from_secs(2)).await; // open time over
    let router = Router::builder()
        .deployment(
            Deployment::new("a", scripted(vec![0], Duration::from_secs(5), c[0].clone()))
                .preference(0),
        )
        .deployment(
            Deployment::new("b", b)
                .breaker(breaker.clone())
                .preference(1),
        )
        .hedge(Hedge::After(Duration::from_secs(1)), 1.0)
        .build()
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(router.oneshot(1).await.unwrap(), 0);
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(5),
        "a's answer, not a hedge's"
    );
    assert_eq!(load(&c), vec![1, 1], "no hedge to b");
    assert_eq!(breaker.state(), semaforo::breaker::BreakerState::Open);
}

/// Cancellation storm on a multi-thread runtime: 64 tasks × 60 calls over
/// three deployments behind bulkheads, half the upstream answers failing,
/// each call dropped before its first poll, after a few polls, or awaited.
/// At the end no permit is held and nobody waits; every upstream call
/// started was ended or dropped; the health report says so too.
#[test]
fn r_cancellation_storm_leaves_no_permit() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let started = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let bh: Vec<Bulkhead> = (0..3)
            .map(|_| Bulkhead::builder(2).max_queue(4).build().unwrap())
            .collect();
        let mk = |i: usize| {
            let (started, ended) = (started.clone(), ended.clone());
            let up = service_fn(move |n: u64| {
                let n0 = started.fetch_add(1, Ordering::SeqCst);
                let guard = DropCount(ended.clone());
                async move {
                    let _g = guard;
                    for _ in 0..(n % 5) {
                        tokio::task::yield_now().await;
                    }
                    if n0 % 2 == 0 {
                        Err::<u64, BoxError>(
                            std::io::Error::from(std::io::ErrorKind::TimedOut).into(),
                        )
                    } else {
                        Ok(0)
                    }
                }
            });
            Deployment::new(
                format!("d{i}"),
                BoxCloneSyncService::new(bh[i].layer().layer(up)),
            )
            .bulkhead(bh[i].clone())
        };
        let router = Router::builder()
            .deployment(mk(0))
            .deployment(mk(1))
            .deployment(mk(2))
            .backoff(None)
            .max_attempts(3)
            .build()
            .unwrap();
        let mut tasks = Vec::new();
        for t in 0..64u64 {
            let r = router.clone();
            tasks.push(tokio::spawn(async move {
                for k in 0..60u64 {
                    let mut fut = Box::pin(r.clone().call(t * 1000 + k));
                    match (t + k) % 3 {
                        0 => drop(fut),
                        1 => {
                            let polls = 1 + (k % 4);
                            for _ in 0..polls {
                                if futures::poll!(fut.as_mut()).is_ready() {
                                    break;
                                }
                                tokio::task::yield_now().await;
                            }
                            drop(fut);
                        }
                        _ => {
                            let _ = fut.await;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let s = started.load(Ordering::SeqCst);
        let e = ended.load(Ordering::SeqCst);
        assert_eq!(s, e, "every upstream call ended or was dropped");
        for b in &bh {
            let snap = b.snapshot();
            assert_eq!((snap.in_flight, snap.waiting), (0, 0), "{snap:?}");
        }
        let health = router.register_health(Health::new(&Shutdown::new()), "llm");
        let report = health.report();
        assert_eq!(report.components.len(), 3);
        for comp in &report.components {
            let get = |k: &str| comp.details.iter().find(|(l, _)| *l == k).unwrap().1;
            assert_eq!(get("in_flight"), 0.0, "{comp:?}");
            assert_eq!(get("waiting"), 0.0, "{comp:?}");
        }
        println!("upstream calls {s}");
    });
}

// ───────────────────────── adaptive limit ─────────────────────────

/// Builders refuse every NaN / infinite / negative / out-of-range
/// parameter with a ConfigError (no panic); the extreme valid ones build
/// and serve a call.
#[tokio::test(start_paused = true)]
async fn a_adaptive_builders_at_their_extremes() {
    let bad: Vec<(&str, Limit, u32)> = vec![
        (
            "aimd ratio NaN",
            Aimd::new().backoff_ratio(f64::NAN).into(),
            10,
        ),
        ("aimd ratio 1", Aimd::new().backoff_ratio(1.0).into(), 10),
        (
            "aimd ratio -0.5",
            Aimd::new().backoff_ratio(-0.5).into(),
            10,
        ),
        (
            "aimd ratio inf",
            Aimd::new().backoff_ratio(f64::INFINITY).into(),
            10,
        ),
        (
            "aimd threshold 0",
            Aimd::new().latency_threshold(Duration::ZERO).into(),
            10,
        ),
        ("aimd min 0", Aimd::new().min(0).into(), 10),
        ("aimd min > max", Aimd::new().min(11).into(), 10),
        ("aimd initial > max", Aimd::new().initial(11).into(), 10),
        (
            "aimd initial < min",
            Aimd::new().min(5).initial(4).into(),
            10,
        ),
        (
            "vegas smoothing NaN",
            Vegas::new().smoothing(f64::NAN).into(),
            10,
        ),
        ("vegas smoothing 0", Vegas::new().smoothing(0.0).into(), 10),
        (
            "vegas smoothing 1.5",
            Vegas::new().smoothing(1.5).into(),
            10,
        ),
        (
            "vegas queue NaN",
            Vegas::new().queue(f64::NAN, 6.0).into(),
            10,
        ),
        (
            "vegas queue inf",
            Vegas::new().queue(1.0, f64::INFINITY).into(),
            10,
        ),
        (
            "vegas queue alpha 0",
            Vegas::new().queue(0.0, 1.0).into(),
            10,
        ),
        (
            "vegas queue alpha = beta",
            Vegas::new().queue(2.0, 2.0).into(),
            10,
        ),
        (
            "vegas queue negative",
            Vegas::new().queue(-2.0, -1.0).into(),
            10,
        ),
        (
            "g2 smoothing NaN",
            Gradient2::new().smoothing(f64::NAN).into(),
            10,
        ),
        (
            "g2 smoothing -1",
            Gradient2::new().smoothing(-1.0).into(),
            10,
        ),
        (
            "g2 tolerance NaN",
            Gradient2::new().tolerance(f64::NAN).into(),
            10,
        ),
        (
            "g2 tolerance inf",
            Gradient2::new().tolerance(f64::INFINITY).into(),
            10,
        ),
        (
            "g2 tolerance 0.99",
            Gradient2::new().tolerance(0.99).into(),
            10,
        ),
        ("g2 min 0", Gradient2::new().min(0).into(), 10),
    ];
    for (name, limit, max) in bad {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            Bulkhead::builder(max).limit(limit).build().is_err()
        }));
        assert_eq!(r.ok(), Some(true), "{name}: must be a ConfigError");
    }
    let max = (1u32 << 31) - 1;
    let good: Vec<(&str, Limit, u32)> = vec![
        (
            "aimd threshold MAX, ratio tiny",
            Aimd::new()
                .latency_threshold(Duration::MAX)
                .backoff_ratio(f64::MIN_POSITIVE)
                .into(),
            max,
        ),
        (
            "vegas huge queue, tiny smoothing",
            Vegas::new()
                .queue(f64::MIN_POSITIVE, f64::MAX)
                .smoothing(f64::MIN_POSITIVE)
                .into(),
            max,
        ),
        (
            "g2 queue_size MAX, tolerance MAX",
            Gradient2::new()
                .queue_size(u32::MAX)
                .tolerance(f64::MAX)
                .into(),
            max,
        ),
        ("vegas max 1", Vegas::new().into(), 1),
        ("g2 max 2 min 2", Gradient2::new().min(2).into(), 2),
    ];
    for (name, limit, max) in good {
        let b = Bulkhead::builder(max)
            .limit(limit)
            .sample_every(1)
            .build()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let svc = b.layer().layer(service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, BoxError>(())
        }));
        for _ in 0..50 {
            svc.clone().oneshot(()).await.unwrap();
        }
        let s = b.snapshot();
        assert!(s.limit >= 1 && s.limit <= u64::from(max), "{name}: {s:?}");
        let a = s.adaptive_limit.unwrap();
        assert!(a >= 1 && a <= u64::from(max), "{name}: {s:?}");
    }
}

/// A closed-loop load of `workers` callers through `svc` until `until`;
/// a refused call waits 10 ms before calling again.
async fn drive<S>(svc: S, workers: usize, until: Instant)
where
    S: Service<(), Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                if svc.clone().oneshot(()).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Records every `LimitChanged` target of a bulkhead.
fn limit_log(log: &Arc<Mutex<Vec<u64>>>) -> impl Fn(&semaforo::observe::Event<'_>) + Send + Sync {
    let log = log.clone();
    move |e| {
        if let EventKind::LimitChanged { to, .. } = e.kind {
            log.lock().unwrap().push(to);
        }
    }
}

/// Outage and recovery, for each strategy (max 30, min 2, 45 callers):
/// 20 s healthy (100 ms, no load dependence), 20 s of instant failures (connection
/// reset, a drop), then healthy again. The limit stays within [2, 30] at
/// every change, falls during the outage, and — the upstream's latency
/// never rising with load — is back at 30 within 60 s of the recovery
/// (each strategy's documented step: AIMD +1, Vegas +β, Gradient2 toward
/// `limit + queue_size`, all while at least half the limit is in use).
#[tokio::test(start_paused = true)]
async fn a_outage_then_recovery_back_to_max() {
    let strategies: Vec<(&str, Limit)> = vec![
        ("aimd", Aimd::new().min(2).backoff_ratio(0.5).into()),
        ("vegas", Vegas::new().min(2).into()),
        ("gradient2", Gradient2::new().min(2).into()),
    ];
    let mut bad = Vec::new();
    for (name, limit) in strategies {
        let log: Arc<Mutex<Vec<u64>>> = Arc::default();
        let b = Bulkhead::builder(30)
            .limit(limit)
            .max_queue(1_000)
            .sample_every(1)
            .on_event(limit_log(&log))
            .build()
            .unwrap();
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let svc = {
            let failing = failing.clone();
            b.layer().layer(service_fn(move |_: ()| {
                let failing = failing.load(Ordering::SeqCst);
                async move {
                    if failing {
                        return Err::<(), BoxError>(
                            std::io::Error::from(std::io::ErrorKind::ConnectionReset).into(),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(())
                }
            }))
        };
        let t0 = Instant::now();
        drive(svc.clone(), 45, t0 + Duration::from_secs(20)).await;
        let healthy = b.snapshot().adaptive_limit.unwrap();
        failing.store(true, Ordering::SeqCst);
        drive(svc.clone(), 45, t0 + Duration::from_secs(40)).await;
        let outage = b.snapshot().adaptive_limit.unwrap();
        failing.store(false, Ordering::SeqCst);
        let mut after = Vec::new();
        for s in 1..=6 {
            drive(svc.clone(), 45, t0 + Duration::from_secs(40 + 10 * s)).await;
            after.push(b.snapshot().adaptive_limit.unwrap());
        }
        let changes = log.lock().unwrap().clone();
        let (lo, hi) = (
            changes.iter().min().copied().unwrap_or(30),
            changes.iter().max().copied().unwrap_or(30),
        );
        println!(
            "{name}: healthy {healthy}, outage {outage}, after (every 10 s) {after:?}, changes in [{lo}, {hi}]"
        );
        if lo < 2 || hi > 30 {
            bad.push(format!("{name}: a limit outside [2, 30]: [{lo}, {hi}]"));
        }
        if healthy != 30 {
            bad.push(format!("{name}: healthy limit {healthy}, not 30"));
        }
        if outage >= healthy {
            bad.push(format!("{name}: did not fall in the outage ({outage})"));
        }
        if *after.last().unwrap() != 30 {
            bad.push(format!("{name}: 60 s after the recovery at {after:?}"));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

// FAILS_a_one_fast_answer_in_the_probe_does_not_collapse_the_limit
/// The baseline of Vegas and Gradient2 is documented as "the upstream's
/// unloaded latency". An upstream whose latency does not depend on load at
/// all — 100 ms, except one answer in ten in 1 ms (a cache hit upstream, a
/// short answer) — has no queue: with 45 callers and max 30 (≥ 27 after 60 s) the limit
/// must settle at max ("Vegas: settles at the upstream's capacity plus α…β";
/// "Gradient2: settles where the latency is tolerance × base"). The
/// minimum of the probe's 10 samples takes the 1 ms outlier as the
/// baseline, and the limit collapses.
#[tokio::test(start_paused = true)]
async fn a_one_fast_answer_in_the_probe_does_not_collapse_the_limit() {
    let strategies: Vec<(&str, Limit)> = vec![
        ("vegas", Vegas::new().min(2).into()),
        ("gradient2", Gradient2::new().min(2).into()),
    ];
    let mut bad = Vec::new();
    for (name, limit) in strategies {
        let b = Bulkhead::builder(30)
            .limit(limit)
            .max_queue(1_000)
            .sample_every(1)
            .build()
            .unwrap();
        let n = Arc::new(AtomicU64::new(0));
        let svc = {
            let n = n.clone();
            b.layer().layer(service_fn(move |_: ()| {
                let i = n.fetch_add(1, Ordering::SeqCst);
                async move {
                    let ms = if i % 10 == 3 { 1 } else { 100 };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<(), BoxError>(())
                }
            }))
        };
        let t0 = Instant::now();
        let mut seen = Vec::new();
        for s in 1..=12 {
            drive(svc.clone(), 45, t0 + Duration::from_secs(10 * s)).await;
            seen.push(b.snapshot().adaptive_limit.unwrap());
        }
        println!("{name}: limit every 10 s {seen:?}");
        let tail = &seen[6..];
        if tail.iter().any(|l| *l < 27) {
            bad.push(format!("{name}: limit every 10 s {seen:?}"));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// Zero latency (paused time: every call answers in 0 ns), then huge
/// latencies (an hour), then 100 ms (max 20, 30 callers): the limit stays
/// within [min, max] at every change, and after 3 minutes of 100 ms answers (three
/// baseline probes) it is back at max.
#[tokio::test(start_paused = true)]
async fn a_zero_and_huge_latencies_keep_the_limit_in_bounds_and_recover() {
    let strategies: Vec<(&str, Limit)> = vec![
        (
            "aimd",
            Aimd::new()
                .min(3)
                .latency_threshold(Duration::from_secs(1))
                .into(),
        ),
        ("vegas", Vegas::new().min(3).into()),
        ("gradient2", Gradient2::new().min(3).into()),
    ];
    let mut bad = Vec::new();
    for (name, limit) in strategies {
        let log: Arc<Mutex<Vec<u64>>> = Arc::default();
        let b = Bulkhead::builder(20)
            .limit(limit)
            .max_queue(1_000)
            .sample_every(1)
            .on_event(limit_log(&log))
            .build()
            .unwrap();
        let latency = Arc::new(AtomicU64::new(0));
        let svc = {
            let latency = latency.clone();
            b.layer().layer(service_fn(move |_: ()| {
                let ms = latency.load(Ordering::SeqCst);
                async move {
                    if ms > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Ok::<(), BoxError>(())
                }
            }))
        };
        // Zero latency: a fixed number of calls (time does not move).
        let mut set = Vec::new();
        for _ in 0..2_000 {
            set.push(svc.clone().oneshot(()));
        }
        for r in futures::future::join_all(set).await {
            r.unwrap();
        }
        let after_zero = b.snapshot().adaptive_limit.unwrap();
        // An hour per call.
        latency.store(3_600_000, Ordering::SeqCst);
        let t0 = Instant::now();
        drive(svc.clone(), 30, t0 + Duration::from_secs(3 * 3600)).await;
        let after_huge = b.snapshot().adaptive_limit.unwrap();
        latency.store(100, Ordering::SeqCst);
        let t1 = Instant::now();
        // (`drive` returned once the hour-long calls in flight ended.)
        drive(svc.clone(), 30, t1 + Duration::from_secs(180)).await;
        let end = b.snapshot();
        let changes = log.lock().unwrap().clone();
        println!(
            "{name}: after zero {after_zero}, after huge {after_huge}, end {:?} (limit {}), {} changes in [{:?}, {:?}]",
            end.adaptive_limit,
            end.limit,
            changes.len(),
            changes.iter().min(),
            changes.iter().max()
        );
        if changes.iter().any(|l| *l < 3 || *l > 20) {
            bad.push(format!("{name}: a change outside [3, 20]"));
        }
        if end.adaptive_limit != Some(20) {
            bad.push(format!("{name}: not back at 20: {end:?}"));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

// ───────────────────────── degrade ─────────────────────────

/// A `DegradeFuture` polled again after it answered polls the inner future
/// again (documented: its error type is the inner service's — an axum
/// service's is `Infallible` — so it has no error of its own to answer).
/// With an inner future that answers an error when polled again, that error
/// comes through and nothing is called twice. (Written as "must not resume":
/// an `async` inner block panics when resumed — the documented limit.)
#[tokio::test(start_paused = true)]
async fn d_degrade_future_polled_again_passes_the_inner_answer() {
    struct Once(Option<http::Response<String>>);
    impl std::future::Future for Once {
        type Output = Result<http::Response<String>, std::io::Error>;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            Poll::Ready(
                self.get_mut()
                    .0
                    .take()
                    .ok_or_else(|| std::io::Error::other("polled after done")),
            )
        }
    }
    let switch = Degrade::builder().build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |_req: http::Request<String>| {
        c.fetch_add(1, Ordering::SeqCst);
        Once(Some(http::Response::new(String::from("ok"))))
    });
    let mut svc = DegradeLayer::new(&switch).layer(inner);
    let mut f = Box::pin(svc.call(http::Request::new(String::new())));
    let first = poll_catch(f.as_mut()).unwrap();
    assert!(matches!(first, Poll::Ready(Ok(_))));
    let again = poll_catch(f.as_mut()).expect("no panic");
    assert!(matches!(again, Poll::Ready(Err(_))), "{again:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// `limit_below` reads the adaptive limit, not the probe's pinned 3: a
/// fresh Vegas bulkhead of 100 (probing its baseline, `limit` 3) is not
/// "below 10", and a rule over it stays `Normal`.
#[tokio::test(start_paused = true)]
async fn d_limit_below_ignores_the_baseline_probe() {
    let b = Bulkhead::builder(100).limit(Vegas::new()).build().unwrap();
    let s = b.snapshot();
    assert_eq!(s.limit, 3, "the probe pins 3: {s:?}");
    assert_eq!(s.adaptive_limit, Some(100));
    let switch = Degrade::builder()
        .rule(Rule::new(Level::Minimal, degrade::limit_below(&b, 10)))
        .build()
        .unwrap();
    assert_eq!(switch.evaluate(), Level::Normal);
}

// ───────────────────────── health ─────────────────────────

// FAILS_h_a_full_line_shrunk_by_the_adaptive_limit_is_degraded
/// "Reports a bulkhead: degraded while its line is full", and
/// `line_above(b, 0.5)` "holds while more than half of the line is taken".
/// Under an adaptive limit the line holds at most
/// `max_queue × limit / max_concurrent`: with the limit fallen from 100 to
/// 1, a line of 1 waiter is full (the next caller is refused `QueueFull`),
/// yet health says `Ok` and the signal does not hold (both compare with
/// the configured `max_queue`, 100).
#[tokio::test(start_paused = true)]
async fn h_a_full_line_shrunk_by_the_adaptive_limit_is_degraded() {
    let b = Bulkhead::builder(100)
        .limit(Aimd::new().min(1).backoff_ratio(0.5))
        .max_queue(100)
        .sample_every(1)
        .build()
        .unwrap();
    let fail = service_fn(|_: ()| async {
        Err::<(), BoxError>(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into())
    });
    let svc = b.layer().layer(fail);
    // Windows of max(10, limit) samples, each halving: 100 → 1 within
    // 100 + 50 + 25 + 13 + 10 × 3 calls.
    for _ in 0..400 {
        let _ = svc.clone().oneshot(()).await;
    }
    assert_eq!(b.snapshot().limit, 1, "{:?}", b.snapshot());
    // Fill: one in flight, the line full.
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let hold = b.layer().layer(service_fn(move |_: ()| {
        let g = g.clone();
        async move {
            g.notified().await;
            Ok::<(), BoxError>(())
        }
    }));
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        let mut f = Box::pin(hold.clone().oneshot(()));
        match futures::poll!(f.as_mut()) {
            Poll::Ready(Err(e)) => {
                assert_eq!(
                    Rejected::from_box(&e).unwrap().kind(),
                    RejectKind::QueueFull
                );
                refused += 1;
            }
            Poll::Ready(Ok(())) => panic!("answered"),
            Poll::Pending => held.push(f),
        }
    }
    let s = b.snapshot();
    println!("{s:?}, held {}, refused {refused}", held.len());
    assert!(refused > 0, "the line is full: callers are refused");
    let health = Health::new(&Shutdown::new()).bulkhead("up", &b);
    let report = health.report();
    let signal = degrade::line_above(&b, 0.5);
    let switch = Degrade::builder()
        .rule(Rule::new(Level::Reduced, signal))
        .build()
        .unwrap();
    let level = switch.evaluate();
    println!("health {:?}, degrade {level:?}", report.components[0]);
    assert_eq!(
        report.components[0].status,
        Status::Degraded,
        "the line refuses callers ({refused} QueueFull) but health says {:?}",
        report.components[0].status
    );
    assert_eq!(level, Level::Reduced, "line_above(0.5) with a full line");
    gate.notify_waiters();
    drop(held);
}

/// A storm on a multi-thread runtime: 1,000 callers at a bulkhead of 10
/// with a line of 90 whose calls wait on a gate: exactly 10 in flight, 90
/// waiting, 900 refused `QueueFull`; the health report's details are the
/// same numbers; once the gate opens, 100 answers and 0 held.
#[test]
fn h_counts_add_up_exactly_under_a_storm() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = Bulkhead::builder(10).max_queue(90).build().unwrap();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let g = gate.clone();
        let svc = b.layer().layer(service_fn(move |_: ()| {
            let g = g.clone();
            async move {
                g.acquire().await.unwrap().forget();
                Ok::<(), BoxError>(())
            }
        }));
        let refused = Arc::new(AtomicUsize::new(0));
        let ok = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let (svc, refused, ok) = (svc.clone(), refused.clone(), ok.clone());
            let fut: Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>> =
                Box::pin(svc.oneshot(()));
            tasks.push(tokio::spawn(async move {
                match fut.await {
                    Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        assert_eq!(
                            Rejected::from_box(&e).unwrap().kind(),
                            RejectKind::QueueFull
                        );
                        refused.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }));
        }
        // Wait (by yielding) until every caller is placed.
        for _ in 0..100_000 {
            if refused.load(Ordering::SeqCst) == 900 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let s = b.snapshot();
        assert_eq!(refused.load(Ordering::SeqCst), 900);
        assert_eq!(
            (s.in_flight, s.waiting, s.rejected_queue_full),
            (10, 90, 900),
            "{s:?}"
        );
        let report = Health::new(&Shutdown::new()).bulkhead("b", &b).report();
        let d = &report.components[0];
        let get = |k: &str| d.details.iter().find(|(l, _)| *l == k).unwrap().1;
        assert_eq!(
            (get("in_flight"), get("waiting"), get("rejected_queue_full")),
            (10.0, 90.0, 900.0)
        );
        assert_eq!(d.status, Status::Degraded, "a full line");
        gate.add_permits(100);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(ok.load(Ordering::SeqCst), 100);
        let s = b.snapshot();
        assert_eq!((s.in_flight, s.waiting, s.rejected_queue_full), (0, 0, 900));
    });
}

/// Health of a degrade switch under a manual override that expires: the
/// level and `manual` details agree at every report, and a report after
/// the expiry is `Ok` with both 0.
#[tokio::test(start_paused = true)]
async fn h_degrade_details_agree_across_an_expiry() {
    let switch = Degrade::builder().build().unwrap();
    let health = Health::new(&Shutdown::new()).degrade("dg", &switch);
    switch.set_for(Level::Minimal, Duration::from_secs(5));
    let r = health.report();
    assert_eq!(r.status, Status::Degraded);
    assert_eq!(
        r.components[0].details,
        vec![("level", 2.0), ("manual", 1.0)]
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    let r = health.report();
    assert_eq!(r.status, Status::Ok);
    assert_eq!(
        r.components[0].details,
        vec![("level", 0.0), ("manual", 0.0)]
    );
}

//! Hostile tests of the router (`semaforo::route`) and its LLM preset.
#![cfg(feature = "llm")]
#![allow(clippy::type_complexity)]

use bytes::Bytes;
use futures::FutureExt;
use http_body_util::BodyExt;
use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::classify::{Class, Permanent};
use semaforo::llm::{LlmDeployment, LlmStack, Tier};
use semaforo::observe::EventKind;
use semaforo::pace::{Cost, Pace};
use semaforo::route::{Deployment, FirstChunkLayer, Hedge, Router};
use semaforo::{BoxError, RejectKind, Rejected};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, Service, ServiceExt};

type Svc = BoxCloneSyncService<u64, u64, BoxError>;

/// A client: after `delay`, answers `code` (0 = success); counts calls.
fn client(code: u64, delay: Duration, calls: Arc<AtomicUsize>) -> Svc {
    BoxCloneSyncService::new(service_fn(move |_n: u64| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<u64, BoxError>(code)
        }
    }))
}

/// A client failing with an io error of `kind` (immediately).
fn failing(kind: std::io::ErrorKind, calls: Arc<AtomicUsize>) -> Svc {
    BoxCloneSyncService::new(service_fn(move |_n: u64| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Err::<u64, BoxError>(std::io::Error::from(kind).into()) }
    }))
}

/// 0 → success, 401 → auth, 413 → context length, 451 → content policy,
/// 429 → throttled, 503 → overloaded, anything else → transient.
fn classify(r: Result<&u64, &BoxError>) -> Class {
    match r {
        Ok(0) => Class::Success,
        Ok(401) => Class::permanent(Permanent::Authentication),
        Ok(413) => Class::permanent(Permanent::ContextLengthExceeded),
        Ok(451) => Class::permanent(Permanent::ContentPolicy),
        Ok(429) => Class::Throttled { retry_after: None },
        Ok(503) => Class::Overloaded { retry_after: None },
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

type Log = Arc<Mutex<Vec<String>>>;

fn log_event(log: &Log) -> impl Fn(&semaforo::observe::Event<'_>) + Send + Sync + 'static {
    let log = log.clone();
    move |e| {
        let s = match &e.kind {
            EventKind::Routed {
                deployment,
                attempt,
                why,
            } => format!("routed {deployment} #{attempt} {}", why.as_str()),
            EventKind::HedgeSettled { winner, hedge_won } => {
                format!("settled {winner} hedge_won={hedge_won}")
            }
            EventKind::Rejected { .. } => "rejected".to_owned(),
            _ => return,
        };
        log.lock().unwrap().push(s);
    }
}

// ---------------------------------------------------------------------------
// Extreme configurations
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn builder_refuses_zero_attempts_zero_weight_duplicates_and_accepts_empty_names() {
    let c = counters(1);
    assert!(Router::builder()
        .deployment(Deployment::new(
            "a",
            client(0, Duration::ZERO, c[0].clone())
        ))
        .max_attempts(0)
        .build()
        .is_err());
    assert!(Router::builder()
        .deployment(Deployment::new("a", client(0, Duration::ZERO, c[0].clone())).weight(0))
        .build()
        .is_err());
    assert!(Router::builder()
        .deployment(Deployment::new(
            "a",
            client(0, Duration::ZERO, c[0].clone())
        ))
        .deployment(Deployment::new(
            "a",
            client(0, Duration::ZERO, c[0].clone())
        ))
        .build()
        .is_err());
    assert!(Router::<Svc>::builder().build().is_err());
    // Empty name and empty group: accepted, and they work.
    let r = Router::builder()
        .deployment(Deployment::new("", client(0, Duration::ZERO, c[0].clone())).group(""))
        .build()
        .unwrap();
    assert_eq!(r.oneshot(1).await.unwrap(), 0);
    // A first group with no deployment: refused.
    assert!(Router::builder()
        .deployment(Deployment::new(
            "a",
            client(0, Duration::ZERO, c[0].clone())
        ))
        .group("nope")
        .build()
        .is_err());
}

#[tokio::test(start_paused = true)]
async fn failover_respects_max_attempts_exactly() {
    for max in [1u32, 2, 3, 5, 7, 10] {
        for n in [1usize, 2, 3] {
            let c = counters(n);
            let mut b = Router::builder();
            for (i, c) in c.iter().enumerate() {
                b = b.deployment(Deployment::new(
                    format!("d{i}"),
                    failing(std::io::ErrorKind::ConnectionRefused, c.clone()),
                ));
            }
            let r = b.max_attempts(max).build().unwrap();
            let err = r.oneshot(1).await.unwrap_err();
            assert!(
                err.to_string().contains("refused") || err.to_string().contains("onnection"),
                "{err}"
            );
            let total: usize = load(&c).iter().sum();
            assert_eq!(total, max as usize, "max {max} over {n}: {:?}", load(&c));
            // Spread: each deployment at most ceil(max/n) times.
            let per = (max as usize).div_ceil(n);
            assert!(load(&c).iter().all(|x| *x <= per), "{:?}", load(&c));
        }
    }
}

/// Many attempts over a deployment that fails at once: the future yields
/// (at most 16 attempts a poll) and, between retries of the same
/// deployment, backs off; without a backoff it still yields.
#[tokio::test(start_paused = true)]
async fn huge_max_attempts_with_an_instant_failure_yields() {
    for backoff in [true, false] {
        let c = counters(1);
        let mut b = Router::builder()
            .deployment(Deployment::new(
                "a",
                failing(std::io::ErrorKind::ConnectionRefused, c[0].clone()),
            ))
            .max_attempts(1_000);
        if !backoff {
            b = b.backoff(None);
        }
        let r = b.build().unwrap();
        let mut fut = Box::pin(r.oneshot(1));
        let first = futures::poll!(fut.as_mut());
        assert!(first.is_pending(), "backoff {backoff}");
        let after_one = c[0].load(Ordering::SeqCst);
        assert!(
            (1..=16).contains(&after_one),
            "{after_one} calls in one poll"
        );
        assert!(fut.await.is_err());
        assert_eq!(c[0].load(Ordering::SeqCst), 1_000);
    }
}

/// A single deployment failing `Transient`: retried after a backoff (by
/// default); with `backoff(None)`, at once.
#[tokio::test(start_paused = true)]
async fn a_lone_failing_deployment_backs_off() {
    for backoff in [true, false] {
        let c = counters(1);
        let mut b = Router::builder()
            .deployment(Deployment::new(
                "a",
                client(500, Duration::ZERO, c[0].clone()),
            ))
            .classify(classify)
            .max_attempts(3);
        if !backoff {
            b = b.backoff(None);
        }
        let r = b.build().unwrap();
        let t0 = Instant::now();
        assert_eq!(r.oneshot(1).await.unwrap(), 500);
        assert_eq!(c[0].load(Ordering::SeqCst), 3);
        // Full jitter of 100 ms then 200 ms: at most 300 ms.
        if backoff {
            assert!(
                t0.elapsed() <= Duration::from_millis(300),
                "{:?}",
                t0.elapsed()
            );
        } else {
            assert_eq!(t0.elapsed(), Duration::ZERO);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_thousand_deployments_of_weight_u32_max() {
    let c = counters(1_000);
    let mut b = Router::builder();
    for (i, c) in c.iter().enumerate() {
        b = b.deployment(
            Deployment::new(format!("d{i}"), client(0, Duration::ZERO, c.clone())).weight(u32::MAX),
        );
    }
    let r = b.build().unwrap();
    for _ in 0..3_000 {
        r.clone().oneshot(1).await.unwrap();
    }
    let l = load(&c);
    assert!(
        l.iter().all(|x| *x == 3),
        "equal weights share equally: min {:?} max {:?}",
        l.iter().min(),
        l.iter().max()
    );
}

#[tokio::test(start_paused = true)]
async fn weights_u32_max_and_one() {
    let c = counters(2);
    let r = Router::builder()
        .deployment(
            Deployment::new("big", client(0, Duration::ZERO, c[0].clone())).weight(u32::MAX),
        )
        .deployment(Deployment::new("small", client(0, Duration::ZERO, c[1].clone())).weight(1))
        .build()
        .unwrap();
    for _ in 0..10_000 {
        r.clone().oneshot(1).await.unwrap();
    }
    assert_eq!(load(&c), vec![10_000, 0]);
}

#[tokio::test(start_paused = true)]
async fn deadline_zero_and_max() {
    let c = counters(1);
    let r = Router::builder()
        .deployment(Deployment::new(
            "a",
            client(0, Duration::from_millis(1), c[0].clone()),
        ))
        .deadline(Duration::ZERO)
        .build()
        .unwrap();
    let t0 = Instant::now();
    let err = r.oneshot(1).await.unwrap_err();
    let rej = Rejected::from_box(&err).expect("a refusal");
    println!(
        "deadline 0: {:?} after {:?}, calls {}",
        rej.kind(),
        t0.elapsed(),
        c[0].load(Ordering::SeqCst)
    );
    assert!(matches!(
        rej.kind(),
        RejectKind::Timeout | RejectKind::BudgetExceeded
    ));
    assert_eq!(t0.elapsed(), Duration::ZERO);

    // Zero deadline, instant client: whatever, no hang.
    let r = Router::builder()
        .deployment(Deployment::new(
            "a",
            client(0, Duration::ZERO, c[0].clone()),
        ))
        .deadline(Duration::ZERO)
        .build()
        .unwrap();
    let _ = r.oneshot(1).await;

    let r = Router::builder()
        .deployment(Deployment::new(
            "a",
            client(0, Duration::from_secs(3600), c[0].clone()),
        ))
        .deadline(Duration::MAX)
        .hedge(Hedge::After(Duration::MAX), 1.0)
        .build()
        .unwrap();
    assert_eq!(r.oneshot(1).await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn hedge_after_max_and_percentile_warm_up_zero() {
    let c = counters(2);
    let log: Log = Log::default();
    let r = Router::builder()
        .deployment(
            Deployment::new("a", client(0, Duration::from_secs(10), c[0].clone())).weight(1_000),
        )
        .deployment(Deployment::new(
            "b",
            client(0, Duration::from_secs(1), c[1].clone()),
        ))
        .hedge(Hedge::After(Duration::MAX), 1.0)
        .on_event(log_event(&log))
        .build()
        .unwrap();
    r.oneshot(1).await.unwrap();
    assert_eq!(load(&c).iter().sum::<usize>(), 1);

    // warm_up 0, quantile 0 and 1: first call (no latency yet) not hedged;
    // then hedged at the min / max latency.
    for q in [0.0, 1.0] {
        let c = counters(2);
        let r = Router::builder()
            .deployment(
                Deployment::new("a", client(0, Duration::from_secs(10), c[0].clone()))
                    .weight(1_000),
            )
            .deployment(Deployment::new(
                "b",
                client(0, Duration::from_secs(1), c[1].clone()),
            ))
            .hedge(
                Hedge::Percentile {
                    quantile: q,
                    warm_up: 0,
                },
                1.0,
            )
            .build()
            .unwrap();
        for _ in 0..5 {
            r.clone().oneshot(1).await.unwrap();
        }
        println!("q={q}: {:?}", load(&c));
    }
    // quantile NaN / negative: refused.
    for q in [f64::NAN, -0.1, f64::INFINITY] {
        assert!(Router::builder()
            .deployment(Deployment::new(
                "a",
                client(0, Duration::ZERO, c[0].clone())
            ))
            .hedge(
                Hedge::Percentile {
                    quantile: q,
                    warm_up: 0
                },
                1.0
            )
            .build()
            .is_err());
    }
}

/// Groups falling back to each other: A's ContextLength → group b, B's
/// ContentPolicy → group a. Bounded by max_attempts / once per reason.
#[tokio::test(start_paused = true)]
async fn looping_fallback_groups_terminate() {
    let c = counters(2);
    let log: Log = Log::default();
    let r = Router::builder()
        .deployment(Deployment::new("a", client(413, Duration::ZERO, c[0].clone())).group("ga"))
        .deployment(Deployment::new("b", client(451, Duration::ZERO, c[1].clone())).group("gb"))
        .fallback(Permanent::ContextLengthExceeded, "gb")
        .fallback(Permanent::ContentPolicy, "ga")
        .classify(classify)
        .max_attempts(u32::MAX)
        .on_event(log_event(&log))
        .build()
        .unwrap();
    let got = r.oneshot(1).await.unwrap();
    println!("{:?} {:?}", load(&c), log.lock().unwrap());
    assert_eq!(got, 413);
    assert_eq!(load(&c), vec![2, 1]);

    // A fallback to its own group: once.
    let c = counters(1);
    let r = Router::builder()
        .deployment(Deployment::new(
            "a",
            client(413, Duration::ZERO, c[0].clone()),
        ))
        .fallback(
            Permanent::ContextLengthExceeded,
            semaforo::route::DEFAULT_GROUP,
        )
        .fallback(
            Permanent::ContextLengthExceeded,
            semaforo::route::DEFAULT_GROUP,
        )
        .classify(classify)
        .max_attempts(100)
        .build()
        .unwrap();
    assert_eq!(r.oneshot(1).await.unwrap(), 413);
    assert_eq!(load(&c), vec![2]);
}

/// A Permanent answer (401) is returned at once, never retried, whatever
/// max_attempts.
#[tokio::test(start_paused = true)]
async fn a_permanent_answer_is_never_retried() {
    let c = counters(3);
    let r = Router::builder()
        .deployment(Deployment::new("a", client(401, Duration::ZERO, c[0].clone())).weight(100))
        .deployment(Deployment::new(
            "b",
            client(0, Duration::ZERO, c[1].clone()),
        ))
        .deployment(Deployment::new(
            "c",
            client(0, Duration::ZERO, c[2].clone()),
        ))
        .fallback(
            Permanent::ContextLengthExceeded,
            semaforo::route::DEFAULT_GROUP,
        )
        .classify(classify)
        .max_attempts(50)
        .build()
        .unwrap();
    assert_eq!(r.oneshot(1).await.unwrap(), 401);
    assert_eq!(load(&c), vec![1, 0, 0]);
}

/// With a hedge in flight, the first attempt answers 401 (Permanent); the
/// hedge then fails transiently: the router then sends a THIRD attempt
/// (and may answer something else than the 401).
#[tokio::test(start_paused = true)]
async fn a_permanent_answer_during_a_hedge_is_not_retried() {
    let c = counters(3);
    let log: Log = Log::default();
    let r = Router::builder()
        .deployment(
            Deployment::new("a", client(401, Duration::from_secs(1), c[0].clone())).weight(1_000),
        )
        .deployment(
            Deployment::new("b", client(500, Duration::from_secs(2), c[1].clone())).weight(10),
        )
        .deployment(Deployment::new(
            "c",
            client(0, Duration::ZERO, c[2].clone()),
        ))
        .hedge(Hedge::After(Duration::from_millis(500)), 1.0)
        .classify(classify)
        .max_attempts(3)
        .on_event(log_event(&log))
        .build()
        .unwrap();
    let got = r.oneshot(1).await.unwrap();
    println!(
        "got {got}, calls {:?}, events {:?}",
        load(&c),
        log.lock().unwrap()
    );
    assert_eq!(
        load(&c)[2],
        0,
        "a third attempt after a 401: {:?}",
        log.lock().unwrap()
    );
    assert_eq!(got, 401);
}

// ---------------------------------------------------------------------------
// poll_ready misbehaving
// ---------------------------------------------------------------------------

/// A service whose poll_ready is `Pending` for the first `pending` polls
/// (forever if usize::MAX), then `Err` if `err`, else ready.
#[derive(Clone)]
struct Readiness {
    pending: Arc<AtomicUsize>,
    err: bool,
    inner: Svc,
}

impl Service<u64> for Readiness {
    type Response = u64;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<u64, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let left = self.pending.load(Ordering::SeqCst);
        if left > 0 {
            if left != usize::MAX {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        if self.err {
            return Poll::Ready(Err("not ready, ever".into()));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: u64) -> Self::Future {
        Box::pin(self.inner.call(req))
    }
}

/// A's poll_ready fails; B answers. The Routed event of B says why.
#[tokio::test(start_paused = true)]
async fn a_poll_ready_error_fails_over_and_is_told() {
    let c = counters(2);
    let log: Log = Log::default();
    let a = Readiness {
        pending: Arc::new(AtomicUsize::new(0)),
        err: true,
        inner: client(0, Duration::ZERO, c[0].clone()),
    };
    let r = Router::builder()
        .deployment(Deployment::new("a", BoxCloneSyncService::new(a)).weight(1_000))
        .deployment(Deployment::new(
            "b",
            client(0, Duration::ZERO, c[1].clone()),
        ))
        .on_event(log_event(&log))
        .build()
        .unwrap();
    assert_eq!(r.oneshot(1).await.unwrap(), 0);
    let log = log.lock().unwrap().clone();
    println!("{log:?}");
    assert_eq!(load(&c), vec![0, 1]);
    assert_eq!(
        log,
        ["routed b #2 failed_over"],
        "B's event should say it failed over from A"
    );
}

/// A's poll_ready fails with a max_attempts of 1: the error is returned (no
/// Routed event at all).
#[tokio::test(start_paused = true)]
async fn a_poll_ready_error_on_the_last_attempt() {
    let c = counters(1);
    let a = Readiness {
        pending: Arc::new(AtomicUsize::new(0)),
        err: true,
        inner: client(0, Duration::ZERO, c[0].clone()),
    };
    let r = Router::builder()
        .deployment(Deployment::new("a", BoxCloneSyncService::new(a)))
        .max_attempts(1)
        .build()
        .unwrap();
    let err = r.oneshot(1).await.unwrap_err();
    assert!(err.to_string().contains("not ready"), "{err}");
}

/// A's poll_ready stays Pending forever; B is healthy. Past the hedge
/// delay the call goes to B (nothing was sent to A).
#[tokio::test(start_paused = true)]
async fn a_deployment_never_ready_gives_the_call_to_another_at_the_hedge_delay() {
    let c = counters(2);
    let a = Readiness {
        pending: Arc::new(AtomicUsize::new(usize::MAX)),
        err: false,
        inner: client(0, Duration::ZERO, c[0].clone()),
    };
    let r = Router::builder()
        .deployment(Deployment::new("a", BoxCloneSyncService::new(a)).weight(1_000))
        .deployment(Deployment::new(
            "b",
            client(0, Duration::ZERO, c[1].clone()),
        ))
        .hedge(Hedge::After(Duration::from_millis(10)), 1.0)
        .deadline(Duration::from_secs(5))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let res = r.oneshot(1).await;
    assert_eq!(res.unwrap(), 0, "B took the call; calls {:?}", load(&c));
    assert_eq!(t0.elapsed(), Duration::from_millis(10));
    assert_eq!(load(&c), vec![0, 1]);
}

/// B's poll_ready is Pending at the hedge moment: no hedge is sent, but
/// does the cap count one?
#[tokio::test(start_paused = true)]
async fn a_hedge_not_sent_does_not_use_the_cap() {
    let c = counters(2);
    // B pending on its first 2 poll_ready calls (each a hedge try), then ready.
    let b = Readiness {
        pending: Arc::new(AtomicUsize::new(2)),
        err: false,
        inner: client(0, Duration::from_secs(1), c[1].clone()),
    };
    let log: Log = Log::default();
    let r = Router::builder()
        .deployment(
            Deployment::new("a", client(0, Duration::from_secs(10), c[0].clone())).weight(1_000),
        )
        .deployment(Deployment::new("b", BoxCloneSyncService::new(b)))
        .hedge(Hedge::After(Duration::from_millis(100)), 0.5)
        .on_event(log_event(&log))
        .build()
        .unwrap();
    // 8 calls at once: the cap allows 4 hedges.
    let calls = (0..8).map(|_| r.clone().oneshot(1));
    for x in futures::future::join_all(calls).await {
        x.unwrap();
    }
    let hedges = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.ends_with("hedge"))
        .count();
    println!("hedges sent {hedges}, calls {:?}", load(&c));
    // Half of 8 calls, plus the one a fresh router may send.
    assert_eq!(
        hedges, 5,
        "2 hedge tries found B not ready: 2 more should be allowed"
    );
}

// ---------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------

/// A drop guard held by a call in flight.
struct Guard(Arc<AtomicUsize>);
impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A client whose call holds a guard while it sleeps `delay`.
fn guarded(
    delay: Duration,
    live: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
) -> impl Service<u64, Response = u64, Error = BoxError, Future = impl Send + 'static>
       + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_n: u64| {
        calls.fetch_add(1, Ordering::SeqCst);
        live.fetch_add(1, Ordering::SeqCst);
        let g = Guard(live.clone());
        async move {
            tokio::time::sleep(delay).await;
            drop(g);
            Ok::<u64, BoxError>(0)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn dropping_at_every_point_leaks_nothing() {
    let live = Arc::new(AtomicUsize::new(0));
    let c = counters(2);
    let bulk = [
        Bulkhead::builder(1).build().unwrap(),
        Bulkhead::builder(1).build().unwrap(),
    ];
    let pace = Pace::builder().tokens_per_minute(1_000).build().unwrap();
    let mk = |i: usize, delay: Duration| {
        let svc = bulk[i].layer().layer(
            pace.layer()
                .weigh(|n: &u64| Cost::tokens(*n))
                .layer(guarded(delay, live.clone(), c[i].clone())),
        );
        BoxCloneSyncService::new(svc)
    };
    let r = Router::builder()
        .deployment(
            Deployment::new("a", mk(0, Duration::from_secs(10)))
                .weight(1_000)
                .pace(pace.clone()),
        )
        .deployment(Deployment::new("b", mk(1, Duration::from_secs(10))))
        .weigh(|n: &u64| Cost::tokens(*n))
        .hedge(Hedge::After(Duration::from_secs(1)), 1.0)
        .build()
        .unwrap();

    // 1. In flight.
    let mut f = Box::pin(r.clone().oneshot(1));
    assert!(futures::poll!(f.as_mut()).is_pending());
    assert_eq!(live.load(Ordering::SeqCst), 1);
    assert_eq!(bulk[0].snapshot().in_flight, 1);
    drop(f);
    assert_eq!(live.load(Ordering::SeqCst), 0);
    assert_eq!(bulk[0].snapshot().in_flight, 0);

    // 2. Hedge in flight.
    let mut f = Box::pin(r.clone().oneshot(1));
    assert!(futures::poll!(f.as_mut()).is_pending());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(futures::poll!(f.as_mut()).is_pending());
    assert_eq!(live.load(Ordering::SeqCst), 2, "attempt and hedge");
    assert_eq!(
        (bulk[0].snapshot().in_flight, bulk[1].snapshot().in_flight),
        (1, 1)
    );
    drop(f);
    assert_eq!(live.load(Ordering::SeqCst), 0);
    assert_eq!(
        (bulk[0].snapshot().in_flight, bulk[1].snapshot().in_flight),
        (0, 0)
    );

    // 3. Waiting in A's pacer line (spent), B also spent? B has no pacer:
    // spend A so the call goes to B... instead: hold B's bulkhead and spend A.
    let spend = pace
        .layer()
        .weigh(|n: &u64| Cost::tokens(*n))
        .layer(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    spend.oneshot(1_000).await.unwrap();
    let held = bulk[1].try_permit().unwrap();
    // Now A starts in ~60 s, B now (no pacer) but its bulkhead is full.
    let mut f = Box::pin(r.clone().oneshot(500));
    assert!(futures::poll!(f.as_mut()).is_pending());
    // B's bulkhead (no queue) refuses at once: failed over to A's line.
    println!(
        "waiting: bulk b {:?}, pace a {}",
        bulk[1].snapshot().waiting,
        pace.snapshot().waiting
    );
    assert_eq!(pace.snapshot().waiting, 1);
    drop(f);
    assert_eq!(pace.snapshot().waiting, 0);
    assert_eq!(bulk[1].snapshot().waiting, 0);
    drop(held);
    // Waiting in A's pacer line: B forced away by weight? B has no pacer, so
    // it is always "now": hold B's breaker instead is not possible here.
    let calls_before = load(&c);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(load(&c), calls_before, "no call after drop");
    assert_eq!(pace.snapshot().waiting, 0);
}

/// Dropped while waiting in a pacer's line behind a deadline: waiting back to 0.
#[tokio::test(start_paused = true)]
async fn dropped_in_a_pacer_line_during_failover() {
    let c = counters(2);
    let pace_a = Pace::builder().tokens_per_minute(1_000).build().unwrap();
    let pace_b = Pace::builder().tokens_per_minute(1_000).build().unwrap();
    let mk = |p: &Pace, code: u64, c: Arc<AtomicUsize>| {
        BoxCloneSyncService::new(p.layer().weigh(|n: &u64| Cost::tokens(*n)).layer(client(
            code,
            Duration::from_millis(10),
            c,
        )))
    };
    let r = Router::builder()
        .deployment(
            Deployment::new("a", mk(&pace_a, 500, c[0].clone()))
                .pace(pace_a.clone())
                .weight(10),
        )
        .deployment(Deployment::new("b", mk(&pace_b, 0, c[1].clone())).pace(pace_b.clone()))
        .weigh(|n: &u64| Cost::tokens(*n))
        .classify(classify)
        .build()
        .unwrap();
    // Spend B: the failover from A will wait in B's line.
    let spend = pace_b
        .layer()
        .weigh(|n: &u64| Cost::tokens(*n))
        .layer(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
    spend.oneshot(1_000).await.unwrap();
    let mut f = Box::pin(r.clone().oneshot(600));
    assert!(futures::poll!(f.as_mut()).is_pending());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(futures::poll!(f.as_mut()).is_pending());
    println!(
        "a calls {:?}, waiting a {} b {}",
        load(&c),
        pace_a.snapshot().waiting,
        pace_b.snapshot().waiting
    );
    drop(f);
    assert_eq!(pace_a.snapshot().waiting + pace_b.snapshot().waiting, 0);
    tokio::time::sleep(Duration::from_secs(300)).await;
    println!("after: {:?}", load(&c));
    assert_eq!(load(&c)[1], 0);
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn all_open_gives_the_soonest_reopen() {
    let c = counters(3);
    let mut breakers = Vec::new();
    let mut b = Router::builder();
    for (i, secs) in [30u64, 7, 60].into_iter().enumerate() {
        let br = Breaker::builder()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(secs))
            .open_jitter(0.0)
            .build()
            .unwrap();
        let svc = BoxCloneSyncService::new(
            br.layer()
                .layer(failing(std::io::ErrorKind::ConnectionRefused, c[i].clone())),
        );
        b = b.deployment(Deployment::new(format!("d{i}"), svc).breaker(br.clone()));
        breakers.push(br);
    }
    let log: Log = Log::default();
    let r = b.on_event(log_event(&log)).build().unwrap();
    // Trip all three (one call each; 3 attempts).
    let e = r.clone().oneshot(1).await.unwrap_err();
    println!("first: {e}");
    assert_eq!(load(&c), vec![1, 1, 1]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let err = r.clone().oneshot(1).await.unwrap_err();
    let rej = Rejected::from_box(&err).expect("a refusal");
    println!("all open: {rej:?}");
    assert_eq!(rej.kind(), RejectKind::CircuitOpen);
    assert_eq!(rej.retry_after(), Some(Duration::from_secs(5)));
    assert_eq!(load(&c), vec![1, 1, 1]);

    // Forced open: no retry_after (none known), but a refusal.
    for br in &breakers {
        br.force_open();
    }
    let err = r.clone().oneshot(1).await.unwrap_err();
    let rej = Rejected::from_box(&err).expect("a refusal");
    assert_eq!(rej.kind(), RejectKind::CircuitOpen);
    println!("forced: {:?}", rej.retry_after());
}

/// A request too large for every deployment's pacer (above the burst):
/// which refusal?
#[tokio::test(start_paused = true)]
async fn a_cost_above_every_burst_is_refused_as_what() {
    let c = counters(2);
    let pa = Pace::builder().tokens_per_minute(1_000).build().unwrap();
    let pb = Pace::builder().tokens_per_minute(1_000).build().unwrap();
    let mk = |p: &Pace, c: Arc<AtomicUsize>| {
        BoxCloneSyncService::new(p.layer().weigh(|n: &u64| Cost::tokens(*n)).layer(client(
            0,
            Duration::ZERO,
            c,
        )))
    };
    let r = Router::builder()
        .deployment(Deployment::new("a", mk(&pa, c[0].clone())).pace(pa.clone()))
        .deployment(Deployment::new("b", mk(&pb, c[1].clone())).pace(pb.clone()))
        .weigh(|n: &u64| Cost::tokens(*n))
        .build()
        .unwrap();
    let err = r.oneshot(5_000).await.unwrap_err();
    let rej = Rejected::from_box(&err).expect("a refusal");
    let class = semaforo::classify::classify_error(err.as_ref());
    println!("too large: {rej:?} class {class:?}");
    // What a pacer alone says for the same cost: BudgetExceeded, no retry_after → Permanent(RequestTooLarge).
    let alone = pa
        .layer()
        .weigh(|n: &u64| Cost::tokens(*n))
        .layer(client(0, Duration::ZERO, c[0].clone()))
        .oneshot(5_000)
        .await
        .unwrap_err();
    println!(
        "pacer alone: {alone}, class {:?}",
        semaforo::classify::classify_error(alone.as_ref())
    );
    assert_eq!(
        class,
        Class::permanent(Permanent::RequestTooLarge),
        "router said {rej}: a CircuitOpen is retried by any outer retry"
    );
}

#[tokio::test(start_paused = true)]
async fn deadline_refusal_retry_after_is_exact() {
    let c = counters(2);
    let pa = Pace::builder().tokens_per_minute(6_000).build().unwrap();
    let pb = Pace::builder().tokens_per_minute(6_000).build().unwrap();
    let mk = |p: &Pace, c: Arc<AtomicUsize>| {
        BoxCloneSyncService::new(p.layer().weigh(|n: &u64| Cost::tokens(*n)).layer(client(
            0,
            Duration::ZERO,
            c,
        )))
    };
    for (p, spent) in [(&pa, 6_000u64), (&pb, 5_000)] {
        let spend = p
            .layer()
            .weigh(|n: &u64| Cost::tokens(*n))
            .layer(service_fn(|n: u64| async move { Ok::<_, BoxError>(n) }));
        spend.oneshot(spent).await.unwrap();
    }
    let r = Router::builder()
        .deployment(Deployment::new("a", mk(&pa, c[0].clone())).pace(pa.clone()))
        .deployment(Deployment::new("b", mk(&pb, c[1].clone())).pace(pb.clone()))
        .weigh(|n: &u64| Cost::tokens(*n))
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap();
    // B has 1,000 left; 3,000 needs 2,000 more → 20 s at 100/s.
    let err = r.clone().oneshot(3_000).await.unwrap_err();
    let rej = Rejected::from_box(&err).unwrap();
    assert_eq!(rej.kind(), RejectKind::BudgetExceeded);
    assert_eq!(rej.retry_after(), Some(Duration::from_secs(20)));
    tokio::time::sleep(Duration::from_secs(20)).await;
    r.oneshot(3_000).await.unwrap();
    assert_eq!(load(&c), vec![0, 1]);
}

// ---------------------------------------------------------------------------
// Hedge: cap under concurrency, events
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_hedge_cap_holds_for_a_thousand_concurrent_calls() {
    let c = counters(2);
    let log: Log = Log::default();
    let r = Router::builder()
        .deployment(
            Deployment::new("a", client(0, Duration::from_secs(2), c[0].clone())).weight(1_000),
        )
        .deployment(Deployment::new(
            "b",
            client(0, Duration::from_secs(2), c[1].clone()),
        ))
        .hedge(Hedge::After(Duration::ZERO), 0.05)
        .on_event(log_event(&log))
        .build()
        .unwrap();
    let calls = (0..1_000).map(|_| r.clone().oneshot(1));
    for x in futures::future::join_all(calls).await {
        x.unwrap();
    }
    let hedges = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.ends_with("hedge"))
        .count();
    let settled = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("settled"))
        .count();
    println!("hedges {hedges} settled {settled} calls {:?}", load(&c));
    assert!(hedges <= 50);
    assert_eq!(settled, hedges);
    assert_eq!(load(&c).iter().sum::<usize>(), 1_000 + hedges);
}

/// Hedge wins, hedge loses, both fail: the events.
#[tokio::test(start_paused = true)]
async fn hedge_events_match_what_happened() {
    // Hedge wins.
    let c = counters(2);
    let log: Log = Log::default();
    let r = Router::builder()
        .deployment(
            Deployment::new("a", client(0, Duration::from_secs(10), c[0].clone())).weight(1_000),
        )
        .deployment(Deployment::new(
            "b",
            client(0, Duration::from_secs(1), c[1].clone()),
        ))
        .hedge(Hedge::After(Duration::from_secs(1)), 1.0)
        .on_event(log_event(&log))
        .build()
        .unwrap();
    let t0 = Instant::now();
    r.oneshot(1).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(
        *log.lock().unwrap(),
        [
            "routed a #1 first",
            "routed b #2 hedge",
            "settled b hedge_won=true"
        ]
    );

    // Both fail, a third attempt succeeds on C: who "settled" the hedge?
    let c = counters(3);
    let log: Log = Log::default();
    let r = Router::builder()
        .deployment(
            Deployment::new("a", client(500, Duration::from_secs(10), c[0].clone())).weight(1_000),
        )
        .deployment(
            Deployment::new("b", client(500, Duration::from_secs(1), c[1].clone())).weight(10),
        )
        .deployment(Deployment::new(
            "c",
            client(0, Duration::from_secs(1), c[2].clone()),
        ))
        .hedge(Hedge::After(Duration::from_secs(1)), 1.0)
        .classify(classify)
        .max_attempts(3)
        .on_event(log_event(&log))
        .build()
        .unwrap();
    assert_eq!(r.oneshot(1).await.unwrap(), 0);
    // C's answer settles no hedge: it was neither the hedged attempt nor
    // its hedge.
    assert_eq!(
        *log.lock().unwrap(),
        [
            "routed a #1 first",
            "routed b #2 hedge",
            "routed c #3 failed_over"
        ]
    );

    // Both fail, max_attempts 2: error, no HedgeSettled?
    let c = counters(2);
    let log: Log = Log::default();
    let r = Router::builder()
        .deployment(
            Deployment::new("a", client(500, Duration::from_secs(10), c[0].clone())).weight(1_000),
        )
        .deployment(Deployment::new(
            "b",
            client(500, Duration::from_secs(1), c[1].clone()),
        ))
        .hedge(Hedge::After(Duration::from_secs(1)), 1.0)
        .classify(classify)
        .max_attempts(2)
        .on_event(log_event(&log))
        .build()
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(r.oneshot(1).await.unwrap(), 500);
    // Both failed: no HedgeSettled; the call ends when the hedged attempt
    // answers.
    assert_eq!(
        *log.lock().unwrap(),
        ["routed a #1 first", "routed b #2 hedge"]
    );
    assert_eq!(t0.elapsed(), Duration::from_secs(10));
    assert_eq!(load(&c), vec![1, 1]);
}

/// Hedge and max_attempts 1: never hedged (a hedge is an attempt).
#[tokio::test(start_paused = true)]
async fn no_hedge_with_a_single_attempt() {
    let c = counters(2);
    let r = Router::builder()
        .deployment(
            Deployment::new("a", client(0, Duration::from_secs(10), c[0].clone())).weight(1_000),
        )
        .deployment(Deployment::new(
            "b",
            client(0, Duration::from_secs(1), c[1].clone()),
        ))
        .hedge(Hedge::After(Duration::ZERO), 1.0)
        .max_attempts(1)
        .build()
        .unwrap();
    r.oneshot(1).await.unwrap();
    assert_eq!(load(&c), vec![1, 0]);
}

// ---------------------------------------------------------------------------
// FirstChunk
// ---------------------------------------------------------------------------

type Frames = futures::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, BoxError>>;
type Streamed = http_body_util::StreamBody<Frames>;

fn body_of(frames: Vec<Result<http_body::Frame<Bytes>, BoxError>>, then_pending: bool) -> Streamed {
    let s = futures::stream::iter(frames);
    let s: Frames = if then_pending {
        s.chain(futures::stream::pending()).boxed()
    } else {
        s.boxed()
    };
    http_body_util::StreamBody::new(s)
}

use futures::StreamExt;

async fn first_chunk(
    frames: Vec<Result<http_body::Frame<Bytes>, BoxError>>,
    then_pending: bool,
) -> Result<http::Response<semaforo::route::FirstChunkBody<Streamed>>, BoxError> {
    let frames = Mutex::new(Some(frames));
    let svc = service_fn(move |_: ()| {
        let f = frames.lock().unwrap().take().unwrap();
        async move { Ok::<_, BoxError>(http::Response::new(body_of(f, then_pending))) }
    });
    FirstChunkLayer::new().layer(svc).oneshot(()).await
}

/// Reads a body hyper's way: stop at is_end_stream.
async fn hyper_read<B: http_body::Body<Data = Bytes> + Unpin>(
    mut b: B,
) -> (Vec<u8>, usize, Option<String>)
where
    B::Error: std::fmt::Display,
{
    let mut data = Vec::new();
    let mut trailers = 0;
    while !b.is_end_stream() {
        match b.frame().await {
            None => break,
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    data.extend_from_slice(d);
                } else {
                    trailers += 1;
                }
            }
            Some(Err(e)) => return (data, trailers, Some(e.to_string())),
        }
    }
    (data, trailers, None)
}

#[tokio::test(start_paused = true)]
async fn first_chunk_edge_bodies() {
    use http_body::Frame;
    // Error before any data: the call's error.
    let r = first_chunk(vec![Err("cut".into())], false).await;
    assert!(r.is_err());
    // Zero frames: answered, empty.
    let r = first_chunk(vec![], false).await.unwrap();
    assert_eq!(hyper_read(r.into_body()).await, (vec![], 0, None));
    // Only trailers.
    let mut t = http::HeaderMap::new();
    t.insert("x", http::HeaderValue::from_static("y"));
    let r = first_chunk(vec![Ok(Frame::trailers(t.clone()))], false)
        .await
        .unwrap();
    assert_eq!(hyper_read(r.into_body()).await, (vec![], 1, None));
    // Empty data frames, then data, then trailers.
    let r = first_chunk(
        vec![
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::data(Bytes::from_static(b"hi"))),
            Ok(Frame::trailers(t.clone())),
        ],
        false,
    )
    .await
    .unwrap();
    assert_eq!(hyper_read(r.into_body()).await, (b"hi".to_vec(), 1, None));
    // Empty data frames then an error: the call's error.
    let r = first_chunk(
        vec![Ok(Frame::data(Bytes::new())), Err("cut".into())],
        false,
    )
    .await;
    assert!(r.is_err());
    // Data then an error at once: the call's error (held frames).
    let r = first_chunk(
        vec![Ok(Frame::data(Bytes::from_static(b"x"))), Err("cut".into())],
        false,
    )
    .await;
    assert!(
        r.is_err(),
        "an error among the frames ready at once fails the attempt"
    );
    // Data then 20 frames then error: error reaches the caller.
    let mut v: Vec<Result<Frame<Bytes>, BoxError>> = (0..20)
        .map(|_| Ok(Frame::data(Bytes::from_static(b"a"))))
        .collect();
    v.push(Err("late".into()));
    let r = first_chunk(v, false).await.unwrap();
    let (d, _, e) = hyper_read(r.into_body()).await;
    assert_eq!(d.len(), 20);
    assert_eq!(e.as_deref(), Some("late"));
    // Data, then a body that never ends: answered at the first data.
    let r = first_chunk(vec![Ok(Frame::data(Bytes::from_static(b"x")))], true)
        .await
        .unwrap();
    let mut b = r.into_body();
    assert_eq!(b.frame().await.unwrap().unwrap().into_data().unwrap(), "x");
    assert!(b.frame().now_or_never().is_none());
    // No data, never ends: pending forever (until a timeout).
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        first_chunk(vec![Ok(Frame::data(Bytes::new()))], true),
    )
    .await;
    assert!(r.is_err());
    // A huge first frame (1 MiB) then more ready: held.
    let big = Bytes::from(vec![b'z'; 1 << 20]);
    let r = first_chunk(
        vec![Ok(Frame::data(big.clone())), Ok(Frame::data(big.clone()))],
        false,
    )
    .await
    .unwrap();
    let (d, _, e) = hyper_read(r.into_body()).await;
    assert_eq!((d.len(), e), (2 << 20, None));
}

/// is_end_stream must not report the end while frames are still to come;
/// a body whose inner ends right after the first chunk.
#[tokio::test(start_paused = true)]
async fn first_chunk_full_body_hyper_way() {
    let svc = service_fn(|_: ()| async {
        Ok::<_, BoxError>(http::Response::new(http_body_util::Full::new(
            Bytes::from_static(b"whole"),
        )))
    });
    let r = FirstChunkLayer::new().layer(svc).oneshot(()).await.unwrap();
    let b = r.into_body();
    assert!(!http_body::Body::is_end_stream(&b));
    assert_eq!(http_body::Body::size_hint(&b).exact(), Some(5));
    assert_eq!(hyper_read(b).await, (b"whole".to_vec(), 0, None));
    // Empty Full body.
    let svc = service_fn(|_: ()| async {
        Ok::<_, BoxError>(http::Response::new(http_body_util::Full::new(Bytes::new())))
    });
    let r = FirstChunkLayer::new().layer(svc).oneshot(()).await.unwrap();
    assert_eq!(hyper_read(r.into_body()).await, (vec![], 0, None));
}

/// Dropping the router's future while FirstChunk waits for the first chunk
/// drops the body (its bulkhead permit back).
#[tokio::test(start_paused = true)]
async fn dropped_while_waiting_for_the_first_chunk() {
    let live = Arc::new(AtomicUsize::new(0));
    let bulk = Bulkhead::builder(1).build().unwrap();
    let l2 = live.clone();
    let svc = service_fn(move |_: u64| {
        l2.fetch_add(1, Ordering::SeqCst);
        let g = Guard(l2.clone());
        async move {
            let s: Frames = futures::stream::pending::<Result<http_body::Frame<Bytes>, BoxError>>()
                .map(move |x| {
                    let _ = &g;
                    x
                })
                .boxed();
            Ok::<_, BoxError>(http::Response::new(http_body_util::StreamBody::new(s)))
        }
    });
    let held = FirstChunkLayer::new().layer(bulk.layer().release_on_body_end().layer(svc));
    let r = Router::builder()
        .deployment(Deployment::new("a", held))
        .build()
        .unwrap();
    let mut f = Box::pin(r.oneshot(1));
    assert!(futures::poll!(f.as_mut()).is_pending());
    assert_eq!(
        (live.load(Ordering::SeqCst), bulk.snapshot().in_flight),
        (1, 1)
    );
    drop(f);
    assert_eq!(
        (live.load(Ordering::SeqCst), bulk.snapshot().in_flight),
        (0, 0)
    );
}

// ---------------------------------------------------------------------------
// LLM preset
// ---------------------------------------------------------------------------

const TIER: Tier = Tier {
    requests_per_minute: 500,
    tokens_per_minute: 30_000,
};
const OK: &str =
    r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#;

fn llm_client(
    seen: Arc<Mutex<Vec<Bytes>>>,
) -> impl Service<
    http::Request<Bytes>,
    Response = http::Response<Bytes>,
    Error = std::io::Error,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |req: http::Request<Bytes>| {
        seen.lock().unwrap().push(req.body().clone());
        async move { Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(OK.as_bytes()))) }
    })
}

fn post(body: impl Into<Bytes>) -> http::Request<Bytes> {
    let body = body.into();
    http::Request::post("/v1/chat/completions")
        .header("content-length", body.len())
        .body(body)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn llm_router_odd_bodies_and_rename() {
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let router = LlmStack::router()
        .deployment(
            LlmDeployment::new("a", LlmStack::openai(TIER), llm_client(seen.clone()))
                .model("renamed"),
        )
        .build()
        .unwrap();
    for body in [
        &b"not json at all"[..],
        b"",
        b"[1,2,3]",
        b"{\"messages\":[]}",
        b"{\"model\":null}",
        b"{\"model\":42,\"max_tokens\":10}",
        b"{\"model\":\"x\",\"model\":\"y\"}",
        b"\xff\xfe",
        b"{\"model\":\"gpt-4o\"",
    ] {
        let res = router
            .clone()
            .oneshot(post(Bytes::copy_from_slice(body)))
            .await;
        let got = seen.lock().unwrap().last().cloned();
        assert_eq!(res.unwrap().status(), 200);
        let got = got.expect("sent upstream");
        // A top-level `model` of any type is renamed (each of two: parsers
        // differ on which one wins); anything else goes as it was.
        let want: &[u8] = match body {
            b"{\"model\":null}" => b"{\"model\":\"renamed\"}",
            b"{\"model\":42,\"max_tokens\":10}" => b"{\"model\":\"renamed\",\"max_tokens\":10}",
            b"{\"model\":\"x\",\"model\":\"y\"}" => {
                b"{\"model\":\"renamed\",\"model\":\"renamed\"}"
            }
            other => other,
        };
        assert_eq!(&got[..], want, "{:?}", String::from_utf8_lossy(body));
    }
}

/// Content-Length kept right when the model is renamed; absent stays absent.
#[tokio::test(start_paused = true)]
async fn llm_rename_updates_content_length() {
    let heads: Arc<Mutex<Vec<(Option<String>, usize)>>> = Arc::default();
    let h = heads.clone();
    let client = service_fn(move |req: http::Request<Bytes>| {
        h.lock().unwrap().push((
            req.headers()
                .get("content-length")
                .map(|v| v.to_str().unwrap().to_owned()),
            req.body().len(),
        ));
        async move { Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(OK.as_bytes()))) }
    });
    let router = LlmStack::router()
        .deployment(
            LlmDeployment::new("a", LlmStack::openai(TIER), client)
                .model("a-much-longer-model-name-than-before"),
        )
        .build()
        .unwrap();
    router
        .clone()
        .oneshot(post(r#"{"model":"m","max_tokens":5}"#))
        .await
        .unwrap();
    let (cl, len) = heads.lock().unwrap()[0].clone();
    assert_eq!(cl, Some(len.to_string()));
}

/// A huge body: 8 MiB of prompt, far above a 30k TPM burst: how is it refused?
#[tokio::test(start_paused = true)]
async fn llm_router_huge_body() {
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let router = LlmStack::router()
        .deployment(LlmDeployment::new(
            "a",
            LlmStack::openai(TIER),
            llm_client(seen.clone()),
        ))
        .deployment(LlmDeployment::new(
            "b",
            LlmStack::openai(TIER),
            llm_client(seen.clone()),
        ))
        .build()
        .unwrap();
    let text = "word ".repeat((8 << 20) / 5);
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":100,"messages":[{{"role":"user","content":"{text}"}}]}}"#
    );
    let t0 = Instant::now();
    let err = router.clone().oneshot(post(body)).await.unwrap_err();
    let class = semaforo::classify::classify_error(err.as_ref());
    println!("huge: {err} → {class:?} after {:?}", t0.elapsed());
    assert_eq!(seen.lock().unwrap().len(), 0);
    assert_eq!(class, Class::permanent(Permanent::RequestTooLarge), "{err}");
}

/// Streaming: every deployment's stream starts with an error event.
#[tokio::test(start_paused = true)]
async fn llm_stream_every_deployment_errors_first() {
    let calls = counters(2);
    let mk = |c: Arc<AtomicUsize>| {
        service_fn(move |_req: http::Request<Bytes>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                let frames = futures::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(
                    b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
                )))]);
                Ok::<_, std::io::Error>(http::Response::new(http_body_util::StreamBody::new(
                    frames,
                )))
            }
        })
    };
    let log: Log = Log::default();
    let router = LlmStack::stream_router()
        .deployment(LlmDeployment::streaming(
            "a",
            LlmStack::openai(TIER),
            mk(calls[0].clone()),
        ))
        .deployment(LlmDeployment::streaming(
            "b",
            LlmStack::openai(TIER),
            mk(calls[1].clone()),
        ))
        .max_attempts(5)
        .on_event(log_event(&log))
        .build()
        .unwrap();
    let req = post(r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":10,"messages":[]}"#);
    let err = router.oneshot(req).await.unwrap_err();
    println!(
        "all error-first: {err}; calls {:?}; {:?}",
        load(&calls),
        log.lock().unwrap()
    );
    assert!(err.to_string().to_lowercase().contains("overload"), "{err}");
    assert_eq!(load(&calls).iter().sum::<usize>(), 5);
    // Failover never goes straight back to the deployment that just failed.
    assert_eq!(
        *log.lock().unwrap(),
        [
            "routed a #1 first",
            "routed b #2 failed_over",
            "routed a #3 failed_over",
            "routed b #4 failed_over",
            "routed a #5 failed_over"
        ]
    );
}

/// Streaming: a 200 with 0 frames, and one with only an empty data frame.
#[tokio::test(start_paused = true)]
async fn llm_stream_empty_bodies() {
    let mk = |frames: Vec<Bytes>| {
        service_fn(move |_req: http::Request<Bytes>| {
            let f = frames.clone();
            async move {
                let s = futures::stream::iter(
                    f.into_iter()
                        .map(|b| Ok::<_, Infallible>(http_body::Frame::data(b))),
                );
                Ok::<_, std::io::Error>(http::Response::new(http_body_util::StreamBody::new(s)))
            }
        })
    };
    for frames in [
        vec![],
        vec![Bytes::new()],
        vec![Bytes::new(), Bytes::from_static(b"data: [DONE]\n\n")],
    ] {
        let router = LlmStack::stream_router()
            .deployment(LlmDeployment::streaming(
                "a",
                LlmStack::openai(TIER),
                mk(frames.clone()),
            ))
            .build()
            .unwrap();
        let req = post(r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":10,"messages":[]}"#);
        let res = router.oneshot(req).await;
        let r = res.expect("an empty stream is an answer");
        assert_eq!(r.status(), 200);
        let (bytes, _, err) = hyper_read(r.into_body()).await;
        assert_eq!(bytes, frames.concat(), "{frames:?}");
        assert!(err.is_none(), "{err:?}");
    }
}

/// LlmDeployment weight 0 is refused; an LLM router with no deployment too.
#[tokio::test(start_paused = true)]
async fn llm_router_config_errors() {
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    assert!(LlmStack::router().build().is_err());
    assert!(LlmStack::router()
        .deployment(
            LlmDeployment::new("a", LlmStack::openai(TIER), llm_client(seen.clone())).weight(0)
        )
        .build()
        .is_err());
    assert!(LlmStack::router()
        .deployment(LlmDeployment::new(
            "a",
            LlmStack::openai(TIER),
            llm_client(seen.clone())
        ))
        .max_attempts(0)
        .build()
        .is_err());
    assert!(LlmStack::router()
        .deployment(LlmDeployment::new(
            "a",
            LlmStack::openai(TIER),
            llm_client(seen.clone())
        ))
        .deployment(LlmDeployment::new(
            "a",
            LlmStack::openai(TIER),
            llm_client(seen.clone())
        ))
        .build()
        .is_err());
}

/// Breakers forced open after they tripped: the refusal still promises a
/// reopen (`retry_after`) that will not come.
#[tokio::test(start_paused = true)]
async fn forced_open_breakers_promise_no_reopen() {
    let c = counters(1);
    let br = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(7))
        .open_jitter(0.0)
        .build()
        .unwrap();
    let svc = BoxCloneSyncService::new(
        br.layer()
            .layer(failing(std::io::ErrorKind::ConnectionRefused, c[0].clone())),
    );
    let r = Router::builder()
        .deployment(Deployment::new("a", svc).breaker(br.clone()))
        .build()
        .unwrap();
    let _ = r.clone().oneshot(1).await.unwrap_err();
    br.force_open();
    let err = r.clone().oneshot(1).await.unwrap_err();
    let ra = Rejected::from_box(&err).unwrap().retry_after();
    println!("forced open after a trip: retry_after {ra:?}");
    tokio::time::sleep(ra.unwrap_or_default()).await;
    let err = r.clone().oneshot(1).await.unwrap_err();
    println!("after waiting retry_after: {err:?}");
    assert_eq!(ra, None, "a forced-open breaker does not reopen by itself");
}

/// A RouteFuture polled again after it answered.
#[tokio::test(start_paused = true)]
async fn polled_after_completion() {
    let c = counters(1);
    let r = Router::builder()
        .deployment(Deployment::new(
            "a",
            client(0, Duration::ZERO, c[0].clone()),
        ))
        .build()
        .unwrap();
    let mut f = Box::pin(r.clone().call(1));
    assert!(futures::poll!(f.as_mut()).is_ready());
    let again = futures::poll!(f.as_mut());
    println!("second poll: {again:?}, calls {:?}", load(&c));
    assert_eq!(
        load(&c),
        vec![1],
        "a completed future sent another request upstream"
    );
}

/// Rename re-serializes the whole JSON: precision of big numbers, and a
/// body serde_json cannot parse (1e400) keeps the old model.
#[tokio::test(start_paused = true)]
async fn llm_rename_reserializes_the_body() {
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let router = LlmStack::router()
        .deployment(
            LlmDeployment::new("a", LlmStack::openai(TIER), llm_client(seen.clone()))
                .model("renamed"),
        )
        .build()
        .unwrap();
    for body in [
        r#"{"model":"m","seed":123456789012345678901234567890,"max_tokens":5}"#,
        r#"{"model":"m","temperature":1e400,"max_tokens":5}"#,
        r#"{"model":"m","logit_bias":{"1":1.0},"max_tokens":5}"#,
    ] {
        router.clone().oneshot(post(body)).await.unwrap();
        let got = seen.lock().unwrap().last().cloned().unwrap();
        // Only the model's value changes: order, numbers, spellings kept.
        assert_eq!(
            got,
            body.replacen(r#""model":"m""#, r#""model":"renamed""#, 1)
        );
    }
}

/// A stream whose first chunk never comes on A; hedging sends B's.
#[tokio::test(start_paused = true)]
async fn llm_stream_a_silent_stream_is_hedged_and_a_cut_fails_over() {
    let silent = service_fn(|_req: http::Request<Bytes>| async move {
        let s = futures::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
        Ok::<_, std::io::Error>(http::Response::new(http_body_util::StreamBody::new(s)))
    });
    let cut = service_fn(|_req: http::Request<Bytes>| async move {
        let s = futures::stream::iter([Err::<http_body::Frame<Bytes>, std::io::Error>(
            std::io::ErrorKind::ConnectionReset.into(),
        )]);
        Ok::<_, std::io::Error>(http::Response::new(http_body_util::StreamBody::new(s)))
    });
    let good = |c: Arc<AtomicUsize>| {
        service_fn(move |_req: http::Request<Bytes>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                let s = futures::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
                    Bytes::from_static(b"data: [DONE]\n\n"),
                ))]);
                Ok::<_, std::io::Error>(http::Response::new(http_body_util::StreamBody::new(s)))
            }
        })
    };
    let c = counters(2);
    let router = LlmStack::stream_router()
        .deployment(
            LlmDeployment::streaming("silent", LlmStack::openai(TIER), silent).weight(1_000),
        )
        .deployment(LlmDeployment::streaming(
            "good",
            LlmStack::openai(TIER),
            good(c[0].clone()),
        ))
        .hedge(Hedge::After(Duration::from_secs(1)), 1.0)
        .build()
        .unwrap();
    let req = || post(r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":10,"messages":[]}"#);
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(60), router.oneshot(req())).await;
    println!(
        "silent: {:?} after {:?}",
        res.as_ref()
            .map(|r| r.as_ref().map(|r| r.status()).map_err(|e| e.to_string())),
        t0.elapsed()
    );
    assert_eq!(res.unwrap().unwrap().status(), 200);

    let router = LlmStack::stream_router()
        .deployment(LlmDeployment::streaming("cut", LlmStack::openai(TIER), cut).weight(1_000))
        .deployment(LlmDeployment::streaming(
            "good",
            LlmStack::openai(TIER),
            good(c[1].clone()),
        ))
        .build()
        .unwrap();
    let res = router.oneshot(req()).await;
    println!(
        "cut: {:?}",
        res.as_ref().map(|r| r.status()).map_err(|e| e.to_string())
    );
    assert_eq!(res.unwrap().status(), 200);
}

/// Once the model's pacer exists (after one small call), a request above
/// every deployment's burst is refused by the router itself: as what?
#[tokio::test(start_paused = true)]
async fn llm_router_huge_body_after_a_first_call() {
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let router = LlmStack::router()
        .deployment(LlmDeployment::new(
            "a",
            LlmStack::openai(TIER),
            llm_client(seen.clone()),
        ))
        .deployment(LlmDeployment::new(
            "b",
            LlmStack::openai(TIER),
            llm_client(seen.clone()),
        ))
        .build()
        .unwrap();
    let small = r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[]}"#;
    router.clone().oneshot(post(small)).await.unwrap();
    router.clone().oneshot(post(small)).await.unwrap();
    let huge = r#"{"model":"gpt-4o-mini","max_tokens":1000000,"messages":[]}"#;
    let err = router.clone().oneshot(post(huge)).await.unwrap_err();
    let class = semaforo::classify::classify_error(err.as_ref());
    println!("huge after warm-up: {err} → {class:?}");
    assert_eq!(class, Class::permanent(Permanent::RequestTooLarge), "{err}");
}

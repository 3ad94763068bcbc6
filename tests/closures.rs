//! The closure API (`breaker.call(|| async { … })`, `retry.call`,
//! `bulkhead.call`, `timeout.call`, `closure::run`) replays the layers'
//! scenario tests (`tests/breaker.rs`, `tests/retry.rs`, `tests/bulkhead.rs`)
//! with the same numbers, under paused time.

mod support;

use semaforo::backoff::{Backoff, Jitter};
use semaforo::breaker::{Breaker, BreakerState};
use semaforo::bulkhead::Bulkhead;
use semaforo::classify::{Class, ClassError, Permanent};
use semaforo::retry::Retry;
use semaforo::timeout::Timeout;
use semaforo::{closure, BoxError, RejectKind, Rejected};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{Job, Upstream};
use tokio::time::Instant;
use tower::ServiceExt;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn kind(err: &BoxError) -> RejectKind {
    Rejected::from_box(err).expect("a refusal").kind()
}

const OVERLOADED: Class = Class::Overloaded { retry_after: None };

/// An upstream that answers `class` after 10 ms, counting its calls.
async fn upstream(calls: &AtomicUsize, class: Class) -> Result<Class, ClassError> {
    calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(10)).await;
    match class {
        Class::Success => Ok(class),
        failure => Err(ClassError::new(failure, "scripted")),
    }
}

/// `tests/breaker.rs`' seeds 003/004: five consecutive `Overloaded` open it
/// for five minutes; meanwhile calls fail fast without reaching the
/// upstream, `retry_after` counting down; after five minutes one probe
/// passes (another caller is refused meanwhile) and its success closes it.
#[tokio::test(start_paused = true)]
async fn breaker_call_replays_seeds_003_004() {
    let calls = Arc::new(AtomicUsize::new(0));
    let breaker = Breaker::builder()
        .name("claude")
        .consecutive_failures(5)
        .open_for(secs(300))
        .build()
        .unwrap();
    for i in 0..5 {
        let err = breaker
            .call(|| upstream(&calls, OVERLOADED))
            .await
            .unwrap_err();
        assert!(
            err.downcast_ref::<ClassError>().is_some(),
            "the closure's own error"
        );
        let expected = if i < 4 {
            BreakerState::Closed
        } else {
            BreakerState::Open
        };
        assert_eq!(breaker.state(), expected, "after {} failures", i + 1);
    }
    let opened_at = Instant::now();
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    for t in [0u64, 60, 299] {
        tokio::time::sleep_until(opened_at + secs(t)).await;
        let t0 = Instant::now();
        let err = breaker
            .call(|| upstream(&calls, Class::Success))
            .await
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_millis(1));
        let r = Rejected::from_box(&err).unwrap();
        assert_eq!(r.kind(), RejectKind::CircuitOpen);
        assert_eq!(r.retry_after(), Some(secs(300 - t)));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "none reached the upstream while open"
    );

    tokio::time::sleep_until(opened_at + secs(300)).await;
    let probe = {
        let breaker = breaker.clone();
        let calls = calls.clone();
        tokio::spawn(async move { breaker.call(|| upstream(&calls, Class::Success)).await })
    };
    tokio::task::yield_now().await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    let err = breaker
        .call(|| upstream(&calls, Class::Success))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), RejectKind::CircuitOpen);
    assert_eq!(probe.await.unwrap().unwrap(), Class::Success);
    assert_eq!(breaker.state(), BreakerState::Closed, "the probe closed it");
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

/// The breaker's class awareness holds through a closure: 50 `Throttled`
/// and 50 `Permanent` results leave it closed (as `tests/breaker.rs`'
/// `fifty_throttled_results_leave_it_closed`), and a closure-opened breaker
/// refuses tower calls (one state).
#[tokio::test(start_paused = true)]
async fn throttled_and_permanent_never_open_it_and_the_state_is_shared() {
    let calls = AtomicUsize::new(0);
    let breaker = Breaker::builder().consecutive_failures(5).build().unwrap();
    for _ in 0..50 {
        let _ = breaker
            .call(|| upstream(&calls, Class::Throttled { retry_after: None }))
            .await;
        let _ = breaker
            .call(|| upstream(&calls, Class::permanent(Permanent::InvalidRequest)))
            .await;
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    for _ in 0..5 {
        let _ = breaker.call(|| upstream(&calls, OVERLOADED)).await;
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    let svc = tower::ServiceBuilder::new()
        .layer(breaker.layer())
        .service(tower::service_fn(|()| async { Ok::<_, std::io::Error>(1) }));
    let err = svc.oneshot(()).await.unwrap_err();
    assert_eq!(kind(&err), RejectKind::CircuitOpen);
}

/// `tests/retry.rs`' seed 001: three attempts, exponential from 2 s, no
/// jitter: attempts at 0, 2 and 6 s, the last real error returned.
#[tokio::test(start_paused = true)]
async fn retry_call_replays_seed_001() {
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(
            Backoff::exponential(secs(2))
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        )
        .no_budget()
        .build()
        .unwrap();
    let t0 = Instant::now();
    let starts = Mutex::new(Vec::new());
    let err = retry
        .call(|| async {
            starts.lock().unwrap().push(t0.elapsed());
            Err::<(), _>(std::io::Error::from(std::io::ErrorKind::TimedOut))
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<std::io::Error>().map(|e| e.kind()),
        Some(std::io::ErrorKind::TimedOut),
        "the last real error"
    );
    assert_eq!(*starts.lock().unwrap(), vec![secs(0), secs(2), secs(6)]);
    assert_eq!(retry.retries(), 2);

    // A success on the second attempt is returned as it is.
    let n = AtomicUsize::new(0);
    let t0 = Instant::now();
    let ok = retry
        .call(|| async {
            match n.fetch_add(1, Ordering::SeqCst) {
                0 => Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                k => Ok(k),
            }
        })
        .await
        .unwrap();
    assert_eq!((ok, t0.elapsed()), (1, secs(2)));
}

/// `tests/retry.rs`' `retry_after_seven_seconds_is_honoured` and
/// `permanent_is_never_retried`, with the classes coming from the closure's
/// error.
#[tokio::test(start_paused = true)]
async fn retry_call_honours_retry_after_and_never_retries_permanent() {
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(
            Backoff::exponential(Duration::from_millis(100))
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        )
        .no_budget()
        .build()
        .unwrap();
    let calls = AtomicUsize::new(0);
    let t0 = Instant::now();
    let ok = retry
        .call(|| async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                let throttled = Class::Throttled {
                    retry_after: Some(secs(7)),
                };
                return Err(ClassError::new(throttled, "429"));
            }
            Ok("done")
        })
        .await
        .unwrap();
    assert_eq!((ok, t0.elapsed()), ("done", secs(7)));

    let calls = AtomicUsize::new(0);
    let err = retry
        .call(|| upstream(&calls, Class::permanent(Permanent::Authentication)))
        .await
        .unwrap_err();
    assert!(err.downcast_ref::<ClassError>().is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 1, "never retried");
}

/// `tests/bulkhead.rs`' seed 000: 50 teachers, 5 at a time, a line of 45:
/// 50/50 succeed, at most 5 in flight, FIFO, makespan 100 s ± 1 %.
#[tokio::test(start_paused = true)]
async fn bulkhead_call_replays_seed_000() {
    let up = Upstream::default();
    let bulkhead = Bulkhead::builder(5)
        .name("openai")
        .max_queue(45)
        .build()
        .unwrap();
    let start = Instant::now();
    let mut handles = Vec::new();
    for id in 0..50 {
        let (bulkhead, svc) = (bulkhead.clone(), up.service());
        handles.push(tokio::spawn(async move {
            let job = Job::new(id, secs(10));
            bulkhead.call(|| svc.clone().oneshot(job.clone())).await
        }));
        // Arrival order is spawn order: let each reach the line.
        tokio::task::yield_now().await;
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let makespan = start.elapsed();
    assert_eq!(up.record.lock().unwrap().finished, 50);
    assert_eq!(up.max_in_flight(), 5);
    let ratio = makespan.as_secs_f64() / 100.0;
    assert!((0.99..=1.01).contains(&ratio), "makespan {makespan:?}");
    assert_eq!(up.start_order(), (0..50).collect::<Vec<_>>());
}

/// `tests/bulkhead.rs`' `queue_full_rejects_at_once_without_calling_inner`.
#[tokio::test(start_paused = true)]
async fn bulkhead_call_refuses_a_full_line_without_calling_the_closure() {
    let bulkhead = Bulkhead::builder(1).max_queue(1).build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let slow = |calls: Arc<AtomicUsize>| async move {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(secs(10)).await;
        Ok::<_, std::io::Error>(())
    };
    let running = {
        let (b, c) = (bulkhead.clone(), calls.clone());
        tokio::spawn(async move { b.call(|| slow(c.clone())).await })
    };
    tokio::task::yield_now().await;
    let waiting = {
        let (b, c) = (bulkhead.clone(), calls.clone());
        tokio::spawn(async move { b.call(|| slow(c.clone())).await })
    };
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    let err = bulkhead.call(|| slow(calls.clone())).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(kind(&err), RejectKind::QueueFull);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "only the running call");
    running.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// `timeout.call` cuts the closure at the deadline with a `Timeout`
/// refusal, and dropping any of these futures drops the closure's.
#[tokio::test(start_paused = true)]
async fn timeout_call_cuts_at_the_deadline_and_drops_cancel_the_closure() {
    let timeout = Timeout::builder().total(secs(2)).build().unwrap();
    let t0 = Instant::now();
    let err = timeout
        .call(|| async {
            tokio::time::sleep(secs(60)).await;
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), secs(2));
    assert_eq!(kind(&err), RejectKind::Timeout);

    struct Dropped(Arc<AtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicUsize::new(0));
    let bulkhead = Bulkhead::builder(1).build().unwrap();
    let guarded = bulkhead.call(|| {
        let d = Dropped(dropped.clone());
        async move {
            let _d = d;
            tokio::time::sleep(secs(60)).await;
            Ok::<_, std::io::Error>(())
        }
    });
    let cut = tokio::time::timeout(secs(1), guarded).await;
    assert!(cut.is_err());
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the closure's future was dropped"
    );
    assert_eq!(
        bulkhead.snapshot().in_flight,
        0,
        "and the permit given back"
    );
}

/// `closure::run` takes any layer — here a retry classifying the closure's
/// `Ok` values, around a breaker, as one stack.
#[tokio::test(start_paused = true)]
async fn run_takes_a_classified_layer_and_a_stack() {
    let retry = Retry::builder()
        .max_attempts(4)
        .backoff(
            Backoff::exponential(secs(1))
                .factor(1.0)
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        )
        .no_budget()
        .build()
        .unwrap();
    let breaker = Breaker::builder().consecutive_failures(10).build().unwrap();
    let by_status = |r: Result<&u16, &BoxError>| match r {
        Ok(200) => Class::Success,
        Ok(503) => Class::Transient,
        Ok(_) => Class::permanent(Permanent::Other),
        Err(_) => Class::Transient,
    };
    let stack = tower::ServiceBuilder::new()
        .layer(retry.layer().classify(by_status))
        .layer(breaker.layer().classify(by_status));
    let n = AtomicUsize::new(0);
    let t0 = Instant::now();
    let status = closure::run(&stack, || async {
        Ok::<u16, std::io::Error>(if n.fetch_add(1, Ordering::SeqCst) < 3 {
            503
        } else {
            200
        })
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(n.load(Ordering::SeqCst), 4);
    assert_eq!(t0.elapsed(), secs(3));
    assert_eq!(
        breaker.snapshot().consecutive_failures,
        0,
        "the success reset the count"
    );
}

/// A closure that owns something it cannot clone (a connection) still
/// retries: it is called again, not cloned.
#[tokio::test(start_paused = true)]
async fn a_closure_that_cannot_be_cloned_is_retried() {
    struct Connection {
        attempts: u32,
    }
    let mut conn = Connection { attempts: 0 };
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(
            Backoff::exponential(secs(1))
                .jitter(Jitter::None)
                .build()
                .unwrap(),
        )
        .no_budget()
        .build()
        .unwrap();
    let ok = retry
        .call(move || {
            conn.attempts += 1;
            let n = conn.attempts;
            async move {
                if n < 3 {
                    Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(ok, 3);
    let bulkhead = Bulkhead::builder(1).build().unwrap();
    let owned = String::from("only one");
    let got = bulkhead
        .call(move || {
            let s = owned.clone();
            async move { Ok::<_, std::io::Error>(s) }
        })
        .await
        .unwrap();
    assert_eq!(got, "only one");
}

//! Breaker behaviour under paused time: seeds 003 and 004, class awareness,
//! rate and slow-call policies, half-open probes and drops, manual modes, events.

use semaforo::breaker::{Breaker, BreakerState};
use semaforo::classify::{Class, Permanent};
use semaforo::observe::{EventKind, TransitionReason};
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// An upstream told what to answer: the request is the class of the outcome and
/// how long it takes. Counts the calls that reach it.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
}

type Step = (Class, Duration);

impl Upstream {
    fn behind(
        &self,
        breaker: &Breaker,
    ) -> impl Service<
        Step,
        Response = Class,
        Error = BoxError,
        Future = impl std::future::Future<Output = Result<Class, BoxError>> + Send,
    > + Clone {
        let calls = self.calls.clone();
        ServiceBuilder::new()
            .layer(
                breaker
                    .layer()
                    .classify(|r: Result<&Class, &std::io::Error>| {
                        r.map_or(Class::Transient, |c| *c)
                    }),
            )
            .service(tower::service_fn(move |(class, work): Step| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(work).await;
                    Ok::<_, std::io::Error>(class)
                }
            }))
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

type Told = Arc<Mutex<Vec<(BreakerState, BreakerState, TransitionReason)>>>;

/// A breaker built from `builder`, and the transitions its listener hears.
fn recorded(builder: semaforo::breaker::BreakerBuilder) -> (Breaker, Told) {
    let seen: Told = Arc::default();
    let breaker = builder
        .on_event({
            let seen = seen.clone();
            move |e| {
                if let EventKind::BreakerTransition { from, to, reason } = e.kind {
                    seen.lock().unwrap().push((from, to, reason))
                }
            }
        })
        .build()
        .unwrap();
    (breaker, seen)
}

async fn step<S>(svc: &mut S, class: Class) -> Result<Class, BoxError>
where
    S: Service<Step, Response = Class, Error = BoxError>,
{
    svc.ready()
        .await?
        .call((class, Duration::from_millis(10)))
        .await
}

const OVERLOADED: Class = Class::Overloaded { retry_after: None };
const THROTTLED: Class = Class::Throttled { retry_after: None };

#[tokio::test(start_paused = true)]
async fn seed_003_004_five_failures_open_five_minutes_then_one_probe() {
    let up = Upstream::default();
    let breaker = Breaker::builder()
        .name("claude")
        .consecutive_failures(5)
        .open_for(secs(300))
        .build()
        .unwrap();
    let mut svc = up.behind(&breaker);
    for i in 0..4 {
        step(&mut svc, OVERLOADED).await.unwrap();
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "after {} failures",
            i + 1
        );
    }
    step(&mut svc, OVERLOADED).await.unwrap();
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "5th consecutive Overloaded opens it"
    );
    let opened_at = Instant::now();
    assert_eq!(up.calls(), 5);

    // During the 5 minutes: fail fast, no inner call, retry_after counts down.
    for t in [0u64, 60, 299] {
        tokio::time::sleep_until(opened_at + secs(t)).await;
        let t0 = Instant::now();
        let err = step(&mut svc, Class::Success).await.unwrap_err();
        assert!(t0.elapsed() < Duration::from_millis(1));
        let r = Rejected::from_box(&err).unwrap();
        assert_eq!(r.kind(), RejectKind::CircuitOpen);
        assert_eq!(r.retry_after(), Some(secs(300 - t)));
    }
    assert_eq!(up.calls(), 5, "no request reached the upstream while open");

    // After 5 minutes: one probe passes, others are refused meanwhile.
    tokio::time::sleep_until(opened_at + secs(300)).await;
    let mut probe_svc = svc.clone();
    let probe = tokio::spawn(async move { step(&mut probe_svc, Class::Success).await });
    tokio::task::yield_now().await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    let err = step(&mut svc, Class::Success).await.unwrap_err();
    assert_eq!(
        Rejected::from_box(&err).unwrap().kind(),
        RejectKind::CircuitOpen
    );
    probe.await.unwrap().unwrap();
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "the probe's success closes it"
    );
    assert_eq!(up.calls(), 6);
    step(&mut svc, Class::Success).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn fifty_throttled_results_leave_it_closed() {
    let up = Upstream::default();
    let breaker = Breaker::builder().consecutive_failures(5).build().unwrap();
    let mut svc = up.behind(&breaker);
    for _ in 0..50 {
        step(&mut svc, THROTTLED).await.unwrap();
    }
    for _ in 0..50 {
        step(&mut svc, Class::permanent(Permanent::InvalidRequest))
            .await
            .unwrap();
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.snapshot().consecutive_failures, 0);
    // ...and a success resets a failure run.
    for _ in 0..4 {
        step(&mut svc, Class::Transient).await.unwrap();
    }
    step(&mut svc, Class::Success).await.unwrap();
    for _ in 0..4 {
        step(&mut svc, Class::Infrastructure).await.unwrap();
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    step(&mut svc, Class::Infrastructure).await.unwrap();
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_and_the_open_time_grows_capped() {
    let up = Upstream::default();
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(secs(10))
        .open_growth(2.0, secs(35))
        .build()
        .unwrap();
    let mut svc = up.behind(&breaker);
    step(&mut svc, OVERLOADED).await.unwrap();
    let mut waits = Vec::new();
    for _ in 0..4 {
        let err = step(&mut svc, Class::Success).await.unwrap_err();
        let wait = Rejected::from_box(&err).unwrap().retry_after().unwrap();
        waits.push(wait);
        tokio::time::sleep(wait).await;
        step(&mut svc, OVERLOADED).await.unwrap(); // the probe fails
        assert_eq!(breaker.state(), BreakerState::Open);
    }
    // 10 s, then ×2 per re-open, capped at 35 s (10 ms of the probe's own work elapsed before re-opening).
    assert_eq!(waits, vec![secs(10), secs(20), secs(35), secs(35)]);
}

#[tokio::test(start_paused = true)]
async fn jitter_spreads_the_open_time_within_its_bound() {
    let mut seen = Vec::new();
    for seed in 0..20 {
        let up = Upstream::default();
        let breaker = Breaker::builder()
            .consecutive_failures(1)
            .open_for(secs(100))
            .open_jitter(0.2)
            .seed(seed)
            .build()
            .unwrap();
        let mut svc = up.behind(&breaker);
        step(&mut svc, OVERLOADED).await.unwrap();
        let ra = breaker.snapshot().retry_after.unwrap();
        assert!(ra >= secs(100) && ra <= secs(120), "{ra:?}");
        seen.push(ra);
    }
    seen.sort();
    seen.dedup();
    assert!(seen.len() > 10, "instances do not probe in lockstep");
}

#[tokio::test(start_paused = true)]
async fn dropped_probe_frees_its_slot_and_counts_nothing() {
    let up = Upstream::default();
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(secs(10))
        .half_open_probes(2)
        .build()
        .unwrap();
    let mut svc = up.behind(&breaker);
    step(&mut svc, OVERLOADED).await.unwrap();
    tokio::time::sleep(secs(10)).await;
    // Two probes start; a third caller is refused.
    let p1 = svc.ready().await.unwrap().call((Class::Success, secs(5)));
    let p2 = svc.ready().await.unwrap().call((Class::Success, secs(5)));
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    assert!(step(&mut svc, Class::Success).await.is_err());
    // Dropping one frees its slot: the next caller is a probe.
    drop(p1);
    let p3 = svc.ready().await.unwrap().call((Class::Success, secs(1)));
    assert!(
        step(&mut svc, Class::Success).await.is_err(),
        "still only 2 probe slots"
    );
    p3.await.unwrap();
    assert_eq!(breaker.state(), BreakerState::HalfOpen, "1 of 2 successes");
    p2.await.unwrap();
    assert_eq!(breaker.state(), BreakerState::Closed);
    // A probe dropped at each await point of an unfinished call leaves no trace.
    step(&mut svc, OVERLOADED).await.unwrap();
    tokio::time::sleep(secs(10)).await;
    let fut = svc.ready().await.unwrap().call((OVERLOADED, secs(5)));
    let mut fut = Box::pin(fut);
    assert!(futures::poll!(fut.as_mut()).is_pending());
    drop(fut); // a failure that never finished: not counted
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    step(&mut svc, Class::Success).await.unwrap();
    step(&mut svc, Class::Success).await.unwrap();
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_over_a_count_window_with_min_calls() {
    let up = Upstream::default();
    let breaker = Breaker::builder()
        .no_consecutive_failures()
        .failure_rate(0.5)
        .window_calls(10)
        .min_calls(10)
        .build()
        .unwrap();
    let mut svc = up.behind(&breaker);
    // 5 failures in the first 9 calls: under min_calls, stays closed.
    for i in 0..9 {
        let c = if i % 2 == 0 {
            Class::Transient
        } else {
            Class::Success
        };
        step(&mut svc, c).await.unwrap();
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.snapshot().failures_in_window, 5);
    step(&mut svc, Class::Success).await.unwrap(); // 10 calls, 50 % — but a success never trips
    assert_eq!(breaker.state(), BreakerState::Closed);
    step(&mut svc, Class::Transient).await.unwrap(); // window: 5 fail of 10 → 50 %
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_over_a_time_window_forgets_old_failures() {
    let up = Upstream::default();
    let breaker = Breaker::builder()
        .no_consecutive_failures()
        .failure_rate(0.5)
        .window_time(secs(60), 6)
        .min_calls(4)
        .build()
        .unwrap();
    let mut svc = up.behind(&breaker);
    step(&mut svc, Class::Transient).await.unwrap();
    step(&mut svc, Class::Transient).await.unwrap();
    step(&mut svc, Class::Success).await.unwrap();
    tokio::time::sleep(secs(70)).await; // the two failures left the window
    step(&mut svc, Class::Success).await.unwrap();
    step(&mut svc, Class::Success).await.unwrap();
    step(&mut svc, Class::Success).await.unwrap();
    step(&mut svc, Class::Transient).await.unwrap(); // 1 of 4
    assert_eq!(breaker.state(), BreakerState::Closed);
    step(&mut svc, Class::Transient).await.unwrap();
    step(&mut svc, Class::Transient).await.unwrap(); // 3 of 6 = 50 %
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_their_own_rate() {
    let up = Upstream::default();
    let breaker = Breaker::builder()
        .no_consecutive_failures()
        .slow_calls(secs(2), 0.6)
        .window_calls(5)
        .min_calls(5)
        .build()
        .unwrap();
    let mut svc = up.behind(&breaker);
    for work in [1u64, 3, 3, 1] {
        svc.ready()
            .await
            .unwrap()
            .call((Class::Success, secs(work)))
            .await
            .unwrap();
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    svc.ready()
        .await
        .unwrap()
        .call((Class::Success, secs(3)))
        .await
        .unwrap(); // 3 slow of 5
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(breaker.snapshot().state, BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn manual_modes() {
    let up = Upstream::default();
    let breaker = Breaker::builder().consecutive_failures(1).build().unwrap();
    let mut svc = up.behind(&breaker);
    breaker.force_open();
    assert!(step(&mut svc, Class::Success).await.is_err());
    assert_eq!(up.calls(), 0);
    breaker.disable();
    for _ in 0..10 {
        step(&mut svc, OVERLOADED).await.unwrap();
    }
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "disabled records nothing"
    );
    breaker.metrics_only();
    step(&mut svc, OVERLOADED).await.unwrap();
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "metrics-only runs the state machine"
    );
    step(&mut svc, Class::Success).await.unwrap(); // ...but never refuses
    breaker.reset();
    assert_eq!(breaker.state(), BreakerState::Closed);
    step(&mut svc, OVERLOADED).await.unwrap();
    assert!(
        step(&mut svc, Class::Success).await.is_err(),
        "normal again after reset"
    );
}

/// A manual mode that changes what callers meet is told on the `watch` and
/// to listeners (reason `Manual`, the states callers meet); one that does not
/// (disabled → metrics-only while closed) is told to nobody; a metrics-only
/// breaker's shadow transitions reach listeners, not the `watch`. A
/// forced-open refusal says so.
#[tokio::test(start_paused = true)]
async fn manual_modes_are_told() {
    let (breaker, seen) = recorded(Breaker::builder().consecutive_failures(1));
    let mut rx = breaker.subscribe();
    use BreakerState::*;
    breaker.force_open();
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), Open);
    let up = Upstream::default();
    let err = step(&mut up.behind(&breaker), Class::Success)
        .await
        .unwrap_err();
    let r = Rejected::find(err.as_ref()).expect("the breaker's refusal");
    assert_eq!(r.kind(), RejectKind::CircuitOpen);
    assert_eq!(r.detail(), Some("forced open"));
    assert_eq!(up.calls(), 0);
    breaker.disable();
    assert_eq!(*rx.borrow_and_update(), Closed);
    breaker.metrics_only(); // closed → closed: nothing told
    assert!(!rx.has_changed().unwrap());
    let mut svc = up.behind(&breaker);
    step(&mut svc, OVERLOADED).await.unwrap(); // shadow: opens, never refuses
    assert_eq!(breaker.state(), Open);
    assert!(
        !rx.has_changed().unwrap(),
        "callers still meet a closed breaker"
    );
    breaker.reset(); // normal and closed
                     // Reset of a disabled or metrics-only closed breaker: nothing to tell.
    breaker.disable();
    breaker.reset();
    breaker.metrics_only();
    breaker.reset();
    assert!(!rx.has_changed().unwrap());
    breaker.force_open();
    breaker.reset();
    assert_eq!(*rx.borrow_and_update(), Closed);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (Closed, Open, TransitionReason::Manual),
            (Open, Closed, TransitionReason::Manual),
            (Closed, Open, TransitionReason::ConsecutiveFailures),
            (Open, Closed, TransitionReason::Reset),
            (Closed, Open, TransitionReason::Manual),
            (Open, Closed, TransitionReason::Reset),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn every_transition_is_observable() {
    let up = Upstream::default();
    let (breaker, seen) = recorded(
        Breaker::builder()
            .consecutive_failures(2)
            .open_for(secs(30)),
    );
    let mut rx = breaker.subscribe();
    let mut svc = up.behind(&breaker);
    step(&mut svc, OVERLOADED).await.unwrap();
    step(&mut svc, OVERLOADED).await.unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), BreakerState::Open);
    tokio::time::sleep(secs(30)).await;
    step(&mut svc, Class::Success).await.unwrap();
    let got: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(from, to, reason)| (*from, *to, reason.as_str()))
        .collect();
    use BreakerState::*;
    assert_eq!(
        got,
        vec![
            (Closed, Open, "consecutive failures"),
            (Open, HalfOpen, "open duration elapsed"),
            (HalfOpen, Closed, "probes succeeded"),
        ]
    );
    assert_eq!(*rx.borrow_and_update(), Closed);
}

#[test]
fn bad_configuration_is_an_error() {
    let field = |b: semaforo::breaker::BreakerBuilder| b.build().unwrap_err().field;
    assert_eq!(
        field(Breaker::builder().consecutive_failures(0)),
        "consecutive_failures"
    );
    assert_eq!(field(Breaker::builder().failure_rate(1.5)), "failure_rate");
    assert_eq!(
        field(Breaker::builder().failure_rate(f64::NAN)),
        "failure_rate"
    );
    assert_eq!(
        field(Breaker::builder().no_consecutive_failures()),
        "policy"
    );
    assert_eq!(field(Breaker::builder().window_calls(0)), "window_calls");
    assert_eq!(
        field(Breaker::builder().window_time(Duration::ZERO, 5)),
        "window_time"
    );
    assert_eq!(
        field(Breaker::builder().open_for(Duration::ZERO)),
        "open_for"
    );
    assert_eq!(
        field(Breaker::builder().open_growth(0.5, secs(10))),
        "open_growth"
    );
    assert_eq!(
        field(Breaker::builder().open_growth(2.0, secs(1))),
        "open_growth"
    );
    assert_eq!(field(Breaker::builder().open_jitter(2.0)), "open_jitter");
    assert_eq!(
        field(Breaker::builder().half_open_probes(0)),
        "half_open_probes"
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_breakers_isolate_upstreams_and_stay_bounded() {
    let per_model = Breaker::builder()
        .consecutive_failures(2)
        .keyed::<&'static str>(3)
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(
            per_model
                .layer(|(model, _): &(&'static str, Class)| *model)
                .classify(|r: Result<&Class, &std::io::Error>| r.map_or(Class::Transient, |c| *c)),
        )
        .service(tower::service_fn({
            let calls = calls.clone();
            move |(_, class): (&'static str, Class)| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, std::io::Error>(class) }
            }
        }));
    for _ in 0..2 {
        svc.ready()
            .await
            .unwrap()
            .call(("gpt-4o", OVERLOADED))
            .await
            .unwrap();
    }
    assert_eq!(per_model.get(&"gpt-4o").state(), BreakerState::Open);
    assert!(svc
        .ready()
        .await
        .unwrap()
        .call(("gpt-4o", Class::Success))
        .await
        .is_err());
    svc.ready()
        .await
        .unwrap()
        .call(("gpt-4o-mini", Class::Success))
        .await
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the open model got no call, the other did"
    );
    // Bounded: many more keys evict closed breakers, never the open one.
    for m in ["a", "b", "c", "d", "e", "f"] {
        svc.ready()
            .await
            .unwrap()
            .call((m, Class::Success))
            .await
            .unwrap();
        assert!(per_model.len() <= 3);
    }
    assert_eq!(per_model.get(&"gpt-4o").state(), BreakerState::Open);
    assert!(per_model
        .snapshots()
        .iter()
        .any(|(k, s)| *k == "gpt-4o" && s.state == BreakerState::Open));
    assert_eq!(
        Breaker::builder().keyed::<u32>(0).unwrap_err().field,
        "keyed"
    );
}

mod streamed {
    use super::*;
    use futures::stream::{self, BoxStream, StreamExt};

    type Chunks = BoxStream<'static, Result<u32, std::io::Error>>;

    /// A 200 whose stream fails after its first chunk (an SSE `event: error`).
    fn failing_stream() -> impl Service<
        (),
        Response = Chunks,
        Error = std::io::Error,
        Future = futures::future::Ready<Result<Chunks, std::io::Error>>,
    > + Clone {
        tower::service_fn(|_: ()| {
            let s = stream::iter(vec![Ok(1), Err(std::io::Error::other("event: error"))]).boxed();
            futures::future::ready(Ok::<_, std::io::Error>(s))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_mid_stream_failure_counts_even_though_the_response_was_ok() {
        let breaker = Breaker::builder().consecutive_failures(2).build().unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(breaker.layer().record_on_stream_end())
            .service(failing_stream());
        for i in 0..2 {
            let mut s = svc.ready().await.unwrap().call(()).await.unwrap();
            assert_eq!(
                breaker.snapshot().consecutive_failures,
                i,
                "nothing recorded at the headers"
            );
            while s.next().await.is_some() {}
        }
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "two streams failed mid-way"
        );
        // Recording at the response instead sees only successes.
        let breaker = Breaker::builder().consecutive_failures(2).build().unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(breaker.layer())
            .service(failing_stream());
        for _ in 0..2 {
            let s = svc.ready().await.unwrap().call(()).await.unwrap();
            let _ = s.collect::<Vec<_>>().await;
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_stream_counts_nothing() {
        let breaker = Breaker::builder().consecutive_failures(1).build().unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(breaker.layer().record_on_stream_end())
            .service(failing_stream());
        let mut s = svc.ready().await.unwrap().call(()).await.unwrap();
        assert!(s.next().await.unwrap().is_ok());
        drop(s);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.snapshot().consecutive_failures, 0);
    }
}

// ---- Faults found from outside (correctness issue, §3) ----

/// A half-open probe that never ends (never completes, never dropped) does not
/// keep the breaker half-open for ever: after `open_for` the next call opens it
/// again, and recovery goes on; every refusal meanwhile carries a `retry_after`.
#[tokio::test(start_paused = true)]
async fn a_hung_probe_does_not_block_recovery() {
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(secs(10))
        .build()
        .unwrap();
    let up = Upstream::default();
    let mut svc = up.behind(&breaker);
    step(&mut svc, OVERLOADED).await.unwrap();
    assert_eq!(breaker.state(), BreakerState::Open);
    tokio::time::sleep(secs(10)).await;
    // The probe hangs: its future is kept alive, never polled to the end.
    let hung = svc
        .ready()
        .await
        .unwrap()
        .call((Class::Success, secs(1_000_000)));
    let mut hung = Box::pin(hung);
    assert!(futures::poll!(hung.as_mut()).is_pending());
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    // While the probe runs, refusals say when to come back.
    let err = step(&mut svc, Class::Success).await.unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    assert_eq!(r.kind(), RejectKind::CircuitOpen);
    assert_eq!(r.retry_after(), Some(secs(10)));
    // An hour later: the next call re-opens (the probe timed out)...
    tokio::time::sleep(secs(3_600)).await;
    let err = step(&mut svc, Class::Success).await.unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    assert_eq!(breaker.state(), BreakerState::Open);
    assert!(r
        .retry_after()
        .is_some_and(|d| d > Duration::ZERO && d <= secs(10)));
    // ...and after the open time a fresh probe closes it.
    tokio::time::sleep(r.retry_after().unwrap()).await;
    assert_eq!(
        step(&mut svc, Class::Success).await.unwrap(),
        Class::Success
    );
    assert_eq!(breaker.state(), BreakerState::Closed);
    drop(hung);
}

/// `failure_rate` over a count window smaller than the default `min_calls`
/// trips; an explicit `min_calls` above the window is refused by `build()`.
#[tokio::test(start_paused = true)]
async fn min_calls_never_exceeds_a_count_window() {
    let breaker = Breaker::builder()
        .no_consecutive_failures()
        .failure_rate(0.5)
        .window_calls(5)
        .build()
        .unwrap();
    let up = Upstream::default();
    let mut svc = up.behind(&breaker);
    for _ in 0..5 {
        let _ = step(&mut svc, OVERLOADED).await;
    }
    assert_eq!(breaker.state(), BreakerState::Open, "5 failures of 5 calls");
    let e = Breaker::builder()
        .failure_rate(0.5)
        .window_calls(5)
        .min_calls(6)
        .build()
        .unwrap_err();
    assert_eq!(e.field, "min_calls");
}

/// A listener that calls back into the breaker when it hears of a transition
/// runs after the breaker's lock is released (no deadlock).
#[tokio::test(start_paused = true)]
async fn a_listener_may_call_back_into_the_breaker() {
    let seen: Arc<Mutex<Vec<BreakerState>>> = Arc::default();
    let slot: Arc<Mutex<Option<Breaker>>> = Arc::default();
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(secs(5))
        .on_event({
            let (seen, slot) = (seen.clone(), slot.clone());
            move |e| {
                if !matches!(e.kind, EventKind::BreakerTransition { .. }) {
                    return;
                }
                if let Some(b) = slot.lock().unwrap().as_ref() {
                    seen.lock().unwrap().push(b.snapshot().state);
                }
            }
        })
        .on_event({
            let slot = slot.clone();
            move |_e| {
                if let Some(b) = slot.lock().unwrap().as_ref() {
                    let _ = b.snapshot();
                }
            }
        })
        .build()
        .unwrap();
    *slot.lock().unwrap() = Some(breaker.clone());
    let up = Upstream::default();
    let mut svc = up.behind(&breaker);
    step(&mut svc, OVERLOADED).await.unwrap();
    let _ = step(&mut svc, Class::Success).await; // refused: open
    tokio::time::sleep(secs(5)).await;
    step(&mut svc, Class::Success).await.unwrap();
    breaker.reset(); // already closed: nothing to tell
    breaker.force_open(); // told (its state machine stays closed)
    breaker.reset();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            BreakerState::Open,
            BreakerState::HalfOpen,
            BreakerState::Closed,
            BreakerState::Closed,
            BreakerState::Closed
        ]
    );
    slot.lock().unwrap().take();
}

/// Streamed bodies consumed the way hyper's server does (it stops polling
/// once `is_end_stream()` is true after the last frame, then drops the body):
/// five successful probes through `record_on_body_end()` close the breaker.
#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn bodies_read_to_is_end_stream_count_as_completed() {
    use bytes::Bytes;
    use http_body::Body;
    use http_body_util::BodyExt;
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(secs(5))
        .half_open_probes(5)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(
            breaker
                .layer()
                .classify(semaforo::classify::HttpClassifier)
                .record_on_body_end(),
        )
        .service(tower::service_fn(|fail: bool| async move {
            let status = if fail { 503 } else { 200 };
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(status)
                    .body(http_body_util::Full::new(Bytes::from_static(
                        b"data: done\n\n",
                    )))
                    .unwrap(),
            )
        }));
    let res = svc.ready().await.unwrap().call(true).await.unwrap();
    drop(res.into_body().collect().await);
    assert_eq!(breaker.state(), BreakerState::Open);
    tokio::time::sleep(secs(5)).await;
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let mut body = svc
            .ready()
            .await
            .unwrap()
            .call(false)
            .await
            .unwrap()
            .into_body();
        // hyper: poll frames until `is_end_stream()`, then drop.
        while !body.is_end_stream() {
            let frame =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
            if frame.is_none() {
                break;
            }
        }
        bodies.push(body);
    }
    drop(bodies);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

/// Transitions reach the listeners in the order they were made, also when a
/// listener is slow and another thread moves the breaker meanwhile; a
/// listener that resets the breaker on `Closed` does not loop.
#[test]
fn listeners_hear_transitions_in_order() {
    let log: Arc<Mutex<Vec<(BreakerState, BreakerState)>>> = Arc::default();
    let slot: Arc<Mutex<Option<Breaker>>> = Arc::default();
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_millis(1))
        .on_event({
            let (log, slot) = (log.clone(), slot.clone());
            move |e| {
                let EventKind::BreakerTransition { from, to, .. } = e.kind else {
                    return;
                };
                log.lock().unwrap().push((from, to));
                if to == BreakerState::HalfOpen {
                    // A slow listener: another thread fails the probe meanwhile.
                    std::thread::sleep(Duration::from_millis(50));
                }
                if to == BreakerState::Closed {
                    if let Some(b) = slot.lock().unwrap().as_ref() {
                        b.reset();
                    }
                }
            }
        })
        .build()
        .unwrap();
    *slot.lock().unwrap() = Some(breaker.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let up = Upstream::default();
        let svc = up.behind(&breaker);
        step(&mut svc.clone(), OVERLOADED).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The probe (whose admission moves the breaker to half-open, with a
        // slow listener) and, on another task, a failure right behind it.
        let probe = tokio::spawn(svc.clone().oneshot((OVERLOADED, Duration::ZERO)));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let _ = probe.await;
    });
    let log = log.lock().unwrap().clone();
    for w in log.windows(2) {
        assert_eq!(w[0].1, w[1].0, "out of order: {log:?}");
    }
    assert_eq!(log.last().map(|t| t.1), Some(breaker.state()), "{log:?}");
    breaker.reset();
    slot.lock().unwrap().take();
}

/// Past `max_keys` with every breaker open, none is forgotten ("an open one
/// is never forgotten"): new keys share the overflow breaker — which opens
/// for them together — until a tracked breaker closes and may be evicted.
#[tokio::test(start_paused = true)]
async fn keyed_breakers_never_forget_an_open_one() {
    let keyed = Breaker::builder()
        .consecutive_failures(1)
        .open_for(secs(60))
        .keyed::<&'static str>(2)
        .unwrap();
    let mut svc = keyed
        .layer(|(k, _): &(&'static str, Class)| *k)
        .classify(|r: Result<&Class, &std::io::Error>| r.map_or(Class::Transient, |c| *c))
        .layer(tower::service_fn(
            |(_, c): (&'static str, Class)| async move { Ok::<_, std::io::Error>(c) },
        ));
    for k in ["x", "y"] {
        svc.ready()
            .await
            .unwrap()
            .call((k, OVERLOADED))
            .await
            .unwrap();
    }
    // "z" fails: the overflow opens, for "w" too; "x" and "y" stay open.
    svc.ready()
        .await
        .unwrap()
        .call(("z", OVERLOADED))
        .await
        .unwrap();
    assert_eq!(keyed.overflow().state(), BreakerState::Open);
    assert!(svc
        .ready()
        .await
        .unwrap()
        .call(("w", Class::Success))
        .await
        .is_err());
    assert_eq!(keyed.len(), 2);
    for k in ["x", "y"] {
        assert_eq!(keyed.get(&k).state(), BreakerState::Open, "{k}");
    }
    // "x" closed again by hand: a place to evict, "w" gets its own.
    keyed.get(&"x").reset();
    svc.ready()
        .await
        .unwrap()
        .call(("w", Class::Success))
        .await
        .unwrap();
    assert_eq!(keyed.len(), 2);
    assert_eq!(keyed.get(&"y").state(), BreakerState::Open);
}

/// A call admitted before `disable` (or a probe before `force_open`) moves
/// nothing when it ends: "disabled … records nothing" — no transition told
/// that callers never meet (a listener believed the breaker open for good).
/// A manual change restarts `time_in_state`.
#[tokio::test(start_paused = true)]
async fn results_of_calls_admitted_before_a_manual_mode_move_nothing() {
    let (breaker, seen) = recorded(Breaker::builder().consecutive_failures(1).open_for(secs(5)));
    let up = Upstream::default();
    let svc = up.behind(&breaker);
    // A failing call in flight, then `disable`.
    let call = tokio::spawn(svc.clone().oneshot((OVERLOADED, secs(1))));
    tokio::time::sleep(secs(0)).await;
    tokio::task::yield_now().await;
    breaker.disable();
    call.await.unwrap().unwrap();
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "disabled records nothing"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    breaker.reset();
    // A probe in flight, then `force_open`: its success closes nothing.
    svc.clone().oneshot((OVERLOADED, secs(0))).await.unwrap();
    assert_eq!(breaker.state(), BreakerState::Open);
    tokio::time::sleep(secs(5)).await;
    let probe = tokio::spawn(svc.clone().oneshot((Class::Success, secs(1))));
    tokio::task::yield_now().await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    tokio::time::sleep(secs(0)).await;
    breaker.force_open(); // callers met half-open (probing): now open
    tokio::time::sleep(secs(10)).await;
    assert_eq!(
        breaker.snapshot().time_in_state,
        secs(10),
        "since force_open"
    );
    probe.await.unwrap().unwrap();
    assert_eq!(
        breaker.state(),
        BreakerState::HalfOpen,
        "the probe moved nothing"
    );
    use BreakerState::*;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (Closed, Open, TransitionReason::ConsecutiveFailures),
            (Open, HalfOpen, TransitionReason::OpenElapsed),
            (HalfOpen, Open, TransitionReason::Manual),
        ]
    );
}

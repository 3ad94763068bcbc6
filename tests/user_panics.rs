//! The caller's code panics (an `on_event` listener, the inner service's
//! `Clone` or `call`, a degrade signal, a shared streamed body): the layer
//! must not be left half-way for the callers after it — no place in a line
//! that nobody will take out, no breaker probe never given back, no flag
//! never cleared. Found by an audit after the coalesce fault of the outside
//! trial (`tests/cca_attack.rs`); each test failed before its fix.

use semaforo::breaker::{Breaker, BreakerState};
use semaforo::bulkhead::Bulkhead;
use semaforo::observe::{Event, EventKind, ShutdownPhase};
use semaforo::pace::Pace;
use semaforo::quota::{Quota, Rate};
use semaforo::BoxError;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
use tower::{Layer, Service, ServiceExt};

/// An upstream whose calls wait for `gate` (while `hold` is set), and whose
/// `Clone` and `call` panic while the flags say so.
#[derive(Default)]
struct Up {
    gate: Arc<Notify>,
    hold: Arc<AtomicBool>,
    panic_clone: Arc<AtomicBool>,
    panic_call: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Clone for Up {
    fn clone(&self) -> Self {
        if self.panic_clone.swap(false, Ordering::SeqCst) {
            panic!("the inner service's clone panicked");
        }
        Up {
            gate: self.gate.clone(),
            hold: self.hold.clone(),
            panic_clone: self.panic_clone.clone(),
            panic_call: self.panic_call.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl Service<u32> for Up {
    type Response = u32;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, x: u32) -> Self::Future {
        if self.panic_call.swap(false, Ordering::SeqCst) {
            panic!("the inner service's call panicked");
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (gate, hold) = (self.gate.clone(), self.hold.load(Ordering::SeqCst));
        Box::pin(async move {
            if hold {
                gate.notified().await;
            }
            if x == u32::MAX {
                return Err("failed".into());
            }
            Ok(x)
        })
    }
}

/// A listener that panics on the events `when` picks.
fn panicking(when: fn(&EventKind) -> bool) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
    move |e: &Event<'_>| {
        if when(&e.kind) {
            panic!("the listener panicked");
        }
    }
}

/// `svc.call(x)` (after readiness), the panic of `call` itself caught.
async fn call_caught<S>(svc: &mut S, x: u32) -> Option<S::Future>
where
    S: Service<u32>,
    S::Error: std::fmt::Debug,
{
    let svc = svc.ready().await.expect("ready");
    std::panic::catch_unwind(AssertUnwindSafe(|| svc.call(x))).ok()
}

/// One permit: a call holds it, a second queues (its `call` panics in the
/// listener or in the clone), the first ends. A third call must then get
/// the permit at once — not wait for a place nobody will ever take out.
async fn line_survives<S>(svc: &mut S, up: &Up) -> Result<(), String>
where
    S: Service<u32, Response = u32>,
    S::Error: std::fmt::Debug,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    up.hold.store(true, Ordering::SeqCst);
    let first = call_caught(svc, 1).await.ok_or("the first call panicked")?;
    let first = tokio::spawn(first);
    tokio::task::yield_now().await;
    up.hold.store(false, Ordering::SeqCst);
    let second = call_caught(svc, 2).await;
    up.gate.notify_one();
    first
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:?}"))?;
    if let Some(second) = second {
        let got = tokio::time::timeout(Duration::from_secs(5), second).await;
        if !matches!(got, Ok(Ok(2))) {
            return Err(format!("the second call: {got:?}"));
        }
    }
    let third = call_caught(svc, 3).await.ok_or("the third call panicked")?;
    match tokio::time::timeout(Duration::from_secs(5), third).await {
        Ok(Ok(3)) => Ok(()),
        other => Err(format!("the third call: {other:?}")),
    }
}

#[tokio::test(start_paused = true)]
async fn bulkhead_a_panicking_queued_listener_leaves_no_orphan_in_line() {
    let bh = Bulkhead::builder(1)
        .max_queue(4)
        .max_wait(Duration::from_secs(60))
        .on_event(panicking(|k| matches!(k, EventKind::Queued { .. })))
        .build()
        .unwrap();
    let up = Up::default();
    let mut svc = bh.layer().layer(up.clone());
    line_survives(&mut svc, &up).await.unwrap();
    let s = bh.snapshot();
    assert_eq!((s.in_flight, s.waiting), (0, 0), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn pace_a_panicking_queued_listener_or_clone_leaves_no_orphan_in_line() {
    for clone_panics in [false, true] {
        let pace = Pace::builder()
            .requests_per_minute(60)
            .max_wait(Duration::from_secs(600))
            .on_event(move |e: &Event<'_>| {
                if !clone_panics && matches!(e.kind, EventKind::Queued { .. }) {
                    panic!("the listener panicked");
                }
            })
            .build()
            .unwrap();
        let up = Up::default();
        let mut svc = pace.layer().layer(up.clone());
        // Spend the burst: the next call waits in line a second.
        let burst = pace.snapshot().dims[0].available as u32;
        for i in 0..burst {
            svc.ready().await.unwrap().call(100 + i).await.unwrap();
        }
        up.panic_clone.store(clone_panics, Ordering::SeqCst);
        let second = call_caught(&mut svc, 2).await;
        // A clone that panics gives no future (the caller sees the panic); a
        // listener's panic is caught and the call goes on.
        assert_eq!(second.is_none(), clone_panics);
        if let Some(second) = second {
            assert_eq!(second.await.unwrap(), 2);
        }
        up.panic_clone.store(false, Ordering::SeqCst);
        let third = call_caught(&mut svc, 3).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), third).await;
        assert!(
            matches!(got, Ok(Ok(3))),
            "clone_panics {clone_panics}: {got:?}"
        );
        assert_eq!(pace.snapshot().waiting, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn quota_a_panicking_queued_listener_or_clone_leaves_no_orphan_in_line() {
    for clone_panics in [false, true] {
        let quota = Quota::builder()
            .plan("p", Rate::per_second(1))
            .max_wait(Duration::from_secs(60))
            .on_event(move |e: &Event<'_>| {
                if !clone_panics && matches!(e.kind, EventKind::Queued { .. }) {
                    panic!("the listener panicked");
                }
            })
            .build::<u32>()
            .unwrap();
        let plan = quota.plan_id("p").unwrap();
        let up = Up::default();
        let mut svc = quota.layer(move |_: &u32| (7u32, plan)).layer(up.clone());
        svc.ready().await.unwrap().call(1).await.unwrap();
        up.panic_clone.store(clone_panics, Ordering::SeqCst);
        let second = call_caught(&mut svc, 2).await;
        up.panic_clone.store(false, Ordering::SeqCst);
        if let Some(second) = second {
            assert!(!clone_panics, "a clone that panics cannot give a future");
            assert!(matches!(second.await, Ok(2)));
        }
        let third = call_caught(&mut svc, 3).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), third).await;
        assert!(
            matches!(got, Ok(Ok(3))),
            "clone_panics {clone_panics}: {got:?}"
        );
    }
}

/// A half-open probe whose inner `call` panics gives its place back: the
/// next caller probes at once (it was refused with `CircuitOpen` until the
/// probe timed out, and the breaker reopened for longer).
#[tokio::test(start_paused = true)]
async fn breaker_a_probe_whose_call_panics_gives_its_place_back() {
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(1))
        .half_open_probes(1)
        .build()
        .unwrap();
    let up = Up::default();
    let mut svc = breaker.layer().layer(up.clone());
    assert!(svc.ready().await.unwrap().call(u32::MAX).await.is_err());
    assert_eq!(breaker.state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(1_001)).await;
    up.panic_call.store(true, Ordering::SeqCst);
    assert!(
        call_caught(&mut svc, 1).await.is_none(),
        "the probe's call panicked"
    );
    let next = call_caught(&mut svc, 2).await.unwrap();
    assert_eq!(next.await.unwrap(), 2, "the next caller probes");
    assert_eq!(breaker.state(), BreakerState::Closed);
}

/// A listener that panics on a breaker transition: later transitions are
/// still told (the "someone is telling" flag was left set for good).
#[tokio::test(start_paused = true)]
async fn breaker_transitions_are_still_told_after_a_listener_panicked() {
    let told = Arc::new(AtomicUsize::new(0));
    let t = told.clone();
    let first = Arc::new(AtomicBool::new(true));
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(1))
        .on_event(move |e: &Event<'_>| {
            if let EventKind::BreakerTransition { .. } = e.kind {
                if first.swap(false, Ordering::SeqCst) {
                    panic!("the listener panicked");
                }
                t.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let mut svc = breaker.layer().layer(Up::default());
    // Closed → Open (the listener panics), then Open → HalfOpen → Closed.
    let _ = svc.ready().await.unwrap().call(u32::MAX).await;
    tokio::time::sleep(Duration::from_millis(1_001)).await;
    assert_eq!(svc.ready().await.unwrap().call(5).await.unwrap(), 5);
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(told.load(Ordering::SeqCst), 2, "HalfOpen and Closed told");
}

/// A listener that panics when the drain starts: the watched lines are
/// closed all the same (a waiting call is answered `ShuttingDown` at once).
#[tokio::test(start_paused = true)]
async fn shutdown_closes_its_lines_when_the_draining_listener_panics() {
    let shutdown = semaforo::shutdown::Shutdown::new();
    shutdown.on_event(panicking(|k| {
        matches!(
            k,
            EventKind::Shutdown {
                phase: ShutdownPhase::Draining,
                ..
            }
        )
    }));
    let bh = Bulkhead::builder(1)
        .max_queue(4)
        .max_wait(Duration::from_secs(3_600))
        .build()
        .unwrap();
    shutdown.watch(bh.clone());
    let up = Up::default();
    let mut svc = bh.layer().layer(up.clone());
    up.hold.store(true, Ordering::SeqCst);
    let first = tokio::spawn(svc.ready().await.unwrap().call(1));
    tokio::task::yield_now().await;
    let waiting = tokio::spawn(svc.ready().await.unwrap().call(2));
    tokio::task::yield_now().await;
    assert_eq!(bh.snapshot().waiting, 1);
    let trigger = std::panic::catch_unwind(AssertUnwindSafe(|| shutdown.trigger()));
    assert!(trigger.is_ok(), "the listener's panic reached trigger()");
    let got = tokio::time::timeout(Duration::from_secs(1), waiting).await;
    let err = got.expect("answered at once").unwrap().unwrap_err();
    let r = semaforo::Rejected::from_box(&err).unwrap();
    assert_eq!(r.kind(), semaforo::RejectKind::ShuttingDown);
    up.gate.notify_one();
    first.await.unwrap().unwrap();
}

/// A signal that panics once: the evaluator task goes on (it ended, and the
/// level stayed where it was for good), and the rule still turns active.
#[tokio::test(start_paused = true)]
async fn degrade_a_panicking_signal_does_not_end_the_evaluator() {
    use semaforo::degrade::{Degrade, Level, Rule};
    let evaluations = Arc::new(AtomicUsize::new(0));
    let e = evaluations.clone();
    let switch = Degrade::builder()
        .every(Duration::from_secs(1))
        .rule(Rule::new(Level::Reduced, move || {
            if e.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("the signal panicked");
            }
            true
        }))
        .build()
        .unwrap();
    let _task = switch.spawn();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        evaluations.load(Ordering::SeqCst) >= 5,
        "evaluated after the panic"
    );
    assert_eq!(switch.level(), Level::Reduced);
}

/// The shared upstream body of a `FanOut` answer panics: every reader gets
/// an error (they waited for ever for a chunk nobody would pull).
#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn fanout_a_panicking_upstream_body_ends_every_reader_in_an_error() {
    use bytes::Bytes;
    use http_body::{Body, Frame};
    use http_body_util::BodyExt;
    use semaforo::coalesce::CoalesceLayer;
    use semaforo::share::FanOut;

    struct Boom(u8);
    impl Body for Boom {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0 += 1;
            if self.0 > 1 {
                panic!("the upstream body panicked");
            }
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))))
        }
    }
    let svc = CoalesceLayer::new(|_: &u32| Some(0u32))
        .share(FanOut::default())
        .layer(tower::service_fn(|_: u32| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, std::io::Error>(http::Response::new(Boom(0)))
        }));
    let (a, b) = tokio::join!(svc.clone().oneshot(1), svc.clone().oneshot(2));
    let (mut a, mut b) = (a.unwrap().into_body(), b.unwrap().into_body());
    assert_eq!(a.frame().await.unwrap().unwrap().into_data().unwrap(), "a");
    // `a` pulls the next frame: the upstream panics; caught, an error.
    let next = std::panic::catch_unwind(AssertUnwindSafe(|| {
        futures::FutureExt::now_or_never(a.frame())
    }));
    let next = next.expect("the panic was caught").expect("ready");
    assert!(matches!(next, Some(Err(_))), "{next:?}");
    // `b` reads the chunk, then the same error, at once.
    let got = tokio::time::timeout(Duration::from_secs(1), async {
        let first = b.frame().await.unwrap().unwrap().into_data().unwrap();
        (first, b.frame().await)
    })
    .await
    .expect("no hang");
    assert_eq!(got.0, "a");
    assert!(matches!(got.1, Some(Err(_))));
}

// ------------------------------------------- manual modes, as callers meet them

/// Found by the audit after the router read a forced-open breaker as
/// closed: health, `degrade::breaker_open` and the keyed breaker's eviction
/// read the breaker as callers meet it. A disabled breaker whose state
/// machine sits at `Open` refuses nothing: not degraded; a forced-open one
/// (state `Closed`) refuses everything: degraded, and never the one evicted.
#[tokio::test(start_paused = true)]
async fn manual_modes_are_read_as_callers_meet_them() {
    use semaforo::degrade::{self, Degrade, Level, Rule};
    use semaforo::health::{Health, Status};
    let b = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut svc = b.layer().layer(Up::default());
    let _ = svc.ready().await.unwrap().call(u32::MAX).await;
    assert_eq!(b.state(), BreakerState::Open);
    b.disable();
    let health = Health::new(&semaforo::shutdown::Shutdown::new()).breaker("b", &b);
    let switch = Degrade::builder()
        .rule(Rule::new(Level::Reduced, degrade::breaker_open(&b)))
        .build()
        .unwrap();
    assert_eq!(
        health.report().components[0].status,
        Status::Ok,
        "disabled refuses nothing"
    );
    assert_eq!(switch.evaluate(), Level::Normal);
    b.reset();
    b.force_open();
    assert_eq!(b.state(), BreakerState::Closed, "the state machine's");
    assert_eq!(health.report().components[0].status, Status::Degraded);
    assert_eq!(switch.evaluate(), Level::Reduced);

    // Keyed, 2 keys: "a" forced open (state Closed), "b" open. A third key
    // evicts neither (the operator's forced-open "a", the failing "b"): it
    // shares the overflow breaker.
    let keyed = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(60))
        .keyed::<&'static str>(2)
        .unwrap();
    keyed.get(&"a").force_open();
    let mut kb =
        keyed
            .layer(|k: &&'static str| *k)
            .layer(tower::service_fn(|k: &'static str| async move {
                if k == "b" {
                    Err::<u32, BoxError>("down".into())
                } else {
                    Ok(1)
                }
            }));
    let _ = kb.ready().await.unwrap().call("b").await;
    assert_eq!(keyed.get(&"b").state(), BreakerState::Open);
    assert_eq!(kb.ready().await.unwrap().call("c").await.unwrap(), 1);
    let refused = kb.ready().await.unwrap().call("a").await;
    assert!(
        refused.is_err(),
        "\"a\" is still forced open after a third key"
    );
    assert_eq!(keyed.len(), 2);
    assert_eq!(
        keyed.get(&"b").state(),
        BreakerState::Open,
        "never forgotten"
    );
}

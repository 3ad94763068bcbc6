//! Hostile tests of the fallback, the degradation switch, chaos, and the LLM
//! preset's `stale_if_error` / the drill. Tests marked `// Found by the outside attack (fixed since):` fail on
//! purpose: they document a broken promise (expected vs actual).

#[allow(dead_code)]
#[path = "../examples/drill.rs"]
mod drill;

use bytes::Bytes;
use semaforo::cache::Cache;
use semaforo::chaos::{Chaos, ChaosBody, Fault, Latency};
use semaforo::classify::{classify_error, Class, HttpClassifier};
use semaforo::coalesce::CoalesceLayer;
use semaforo::degrade::{Degrade, DegradeLayer, Level, LevelReason, Rule};
use semaforo::fallback::{self, FallbackLayer, FellBack, MarkHttp};
use semaforo::observe::{Event, EventKind};
use semaforo::{BoxError, RejectKind, Rejected};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

struct Tracked(Arc<AtomicUsize>);
impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn circuit_open() -> BoxError {
    Box::new(Rejected::new("breaker", RejectKind::CircuitOpen))
}

/// Runs `f` on its own thread; a deadlock shows as a failed test instead of
/// a hung suite (the guard is only a ceiling: a passing run returns at once).
fn no_deadlock<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // It panicked: pass its panic on.
            std::panic::resume_unwind(h.join().unwrap_err())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what}: deadlocked"),
    }
}

// ───────────────────────────── fallback ─────────────────────────────

/// A fallback service that is never ready.
#[derive(Clone)]
struct NeverReady(#[allow(dead_code)] Arc<()>);

impl Service<u32> for NeverReady {
    type Response = String;
    type Error = BoxError;
    type Future = std::future::Ready<Result<String, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Pending
    }
    fn call(&mut self, _: u32) -> Self::Future {
        std::future::ready(Err("called while not ready".into()))
    }
}

/// A fallback service whose readiness fails.
#[derive(Clone)]
struct BrokenReady;

impl Service<u32> for BrokenReady {
    type Response = String;
    type Error = BoxError;
    type Future = std::future::Ready<Result<String, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Err("fallback not ready: broken".into()))
    }
    fn call(&mut self, _: u32) -> Self::Future {
        std::future::ready(Ok("should not be called".into()))
    }
}

#[tokio::test(start_paused = true)]
async fn fb_never_ready_fallback_waits_for_the_callers_timeout_and_drops_clean() {
    let marker = Arc::new(());
    let svc = FallbackLayer::new(fallback::service(NeverReady(marker.clone()))).layer(service_fn(
        |_: u32| async { Err::<String, BoxError>(circuit_open()) },
    ));
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(60), svc.clone().oneshot(1)).await;
    assert!(
        r.is_err(),
        "a never-ready fallback waits (the caller's timeout's job)"
    );
    assert_eq!(t.elapsed(), Duration::from_secs(60));
    drop(svc);
    // Every clone of the fallback service went with the dropped future.
    assert_eq!(Arc::strong_count(&marker), 1);
}

#[tokio::test]
async fn fb_fallback_whose_readiness_fails_returns_the_original_error() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let svc = FallbackLayer::new(fallback::service(BrokenReady))
        .on_event(move |e| ev.lock().unwrap().push(e.kind.clone()))
        .layer(service_fn(|_: u32| async {
            Err::<String, BoxError>(circuit_open())
        }));
    let e = svc.oneshot(1).await.unwrap_err();
    assert_eq!(Rejected::find(&*e).unwrap().kind(), RejectKind::CircuitOpen);
    assert_eq!(
        *events.lock().unwrap(),
        vec![EventKind::Fallback {
            class: Class::Overloaded { retry_after: None },
            answered: false
        }]
    );
}

#[tokio::test]
async fn fb_from_fn_error_returns_the_original_and_permanent_in_any_wrapping_is_never_answered() {
    let answered = Arc::new(AtomicUsize::new(0));
    let a = answered.clone();
    let svc = FallbackLayer::new(fallback::from_fn(move |_f: &fallback::Failure<'_>| {
        a.fetch_add(1, Ordering::SeqCst);
        Err::<String, BoxError>("the fallback failed too".into())
    }))
    .layer(service_fn(|x: u32| async move {
        match x {
            0 => Err::<String, BoxError>(circuit_open()),
            // Permanent (InvalidInput) wrapping a CircuitOpen refusal.
            1 => Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                Rejected::new("breaker", RejectKind::CircuitOpen),
            )) as BoxError),
            // Shutting down: Permanent.
            2 => Err(Box::new(Rejected::new("shutdown", RejectKind::ShuttingDown)) as BoxError),
            // Retry budget spent: Permanent.
            _ => {
                Err(Box::new(Rejected::new("retry", RejectKind::RetryBudgetExhausted)) as BoxError)
            }
        }
    }));
    let e = svc.clone().oneshot(0).await.unwrap_err();
    assert_eq!(Rejected::find(&*e).unwrap().kind(), RejectKind::CircuitOpen);
    assert_eq!(answered.load(Ordering::SeqCst), 1);
    for x in 1..4 {
        let e = svc.clone().oneshot(x).await.unwrap_err();
        assert!(classify_error(&*e).permanent_reason().is_some(), "{x}: {e}");
    }
    assert_eq!(
        answered.load(Ordering::SeqCst),
        1,
        "Permanent never reaches the source"
    );
}

/// Which of our own refusals the default rule answers (documents the rule:
/// `Timeout` and `QueueTimeout` are *not* answered).
#[tokio::test]
async fn fb_default_rule_on_every_reject_kind() {
    let kinds = [
        (RejectKind::QueueFull, None, true),
        (RejectKind::QueueTimeout, None, false),
        (RejectKind::QuotaExceeded, Some(1), false),
        (RejectKind::QuotaExceeded, None, false),
        (RejectKind::BudgetExceeded, Some(1), true),
        (RejectKind::BudgetExceeded, None, false),
        (RejectKind::CircuitOpen, None, true),
        (RejectKind::CircuitOpen, Some(3600), true),
        (RejectKind::RetryBudgetExhausted, None, false),
        (RejectKind::ShuttingDown, None, false),
        (RejectKind::Timeout, None, false),
        (RejectKind::BackendUnavailable, None, true),
    ];
    for (kind, retry_after, answered) in kinds {
        let svc = FallbackLayer::new(fallback::value("fb".to_string())).layer(service_fn(
            move |_: u32| async move {
                let mut r = Rejected::new("x", kind);
                if let Some(s) = retry_after {
                    r = r.with_retry_after(Duration::from_secs(s));
                }
                Err::<String, BoxError>(Box::new(r))
            },
        ));
        let got = svc.oneshot(1).await;
        assert_eq!(got.is_ok(), answered, "{kind:?} {retry_after:?}");
    }
}

#[tokio::test]
async fn fb_http_statuses_only_overloaded_ones_are_answered_and_marked() {
    let svc = FallbackLayer::new(fallback::value(
        http::Response::builder()
            .status(200)
            .body(Bytes::from_static(b"fallback"))
            .unwrap(),
    ))
    .classify(HttpClassifier)
    .mark(MarkHttp)
    .layer(service_fn(|status: u16| async move {
        Ok::<_, Infallible>(
            http::Response::builder()
                .status(status)
                .body(Bytes::from_static(b"real"))
                .unwrap(),
        )
    }));
    for (status, answered) in [
        (200, false),
        (400, false),
        (401, false),
        (404, false),
        (429, false),
        (503, true),
        (529, true),
    ] {
        let res = svc.clone().oneshot(status).await.unwrap();
        assert_eq!(
            res.extensions().get::<FellBack>().is_some(),
            answered,
            "status {status}"
        );
        if answered {
            assert_eq!(res.body(), "fallback");
        } else {
            assert_eq!(res.status(), status);
            assert_eq!(res.body(), "real");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn fb_dropped_while_the_fallback_runs_drops_the_fallback_call() {
    let created = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (c, d, f) = (created.clone(), dropped.clone(), finished.clone());
    let slow_fallback = service_fn(move |_: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        let guard = Tracked(d.clone());
        let f = f.clone();
        async move {
            let _g = guard;
            tokio::time::sleep(Duration::from_secs(10)).await;
            f.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>("late fallback".to_string())
        }
    });
    let svc =
        FallbackLayer::new(fallback::service(slow_fallback)).layer(service_fn(|_: u32| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err::<String, BoxError>(circuit_open())
        }));
    let r = tokio::time::timeout(Duration::from_secs(5), svc.oneshot(1)).await;
    assert!(r.is_err());
    assert_eq!(created.load(Ordering::SeqCst), 1, "the fallback started");
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "and was dropped with the future"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(finished.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn fb_polled_after_completion_is_an_error_not_a_panic() {
    let mut svc =
        FallbackLayer::new(fallback::value("fb".to_string())).layer(service_fn(|_: u32| async {
            Err::<String, BoxError>(circuit_open())
        }));
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    assert_eq!((&mut fut).await.unwrap(), "fb");
    match futures::poll!(&mut fut) {
        Poll::Ready(Err(_)) => {}
        other => panic!("polled after done: {:?}", other.map(|r| r.is_ok())),
    }
}

#[tokio::test(start_paused = true)]
async fn fb_over_a_coalesced_error_every_follower_is_answered_with_the_original_class() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let upstream = service_fn(move |_: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err::<String, BoxError>(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        }
    });
    let events = Arc::new(AtomicUsize::new(0));
    let ev = events.clone();
    let svc = FallbackLayer::new(fallback::from_fn(|f: &fallback::Failure<'_>| {
        Ok::<_, BoxError>(format!("{:?}", f.class()))
    }))
    .on_event(move |e| {
        if matches!(e.kind, EventKind::Fallback { answered: true, .. }) {
            ev.fetch_add(1, Ordering::SeqCst);
        }
    })
    .layer(CoalesceLayer::new(|x: &u32| Some(*x)).layer(upstream));
    let all = futures::future::join_all((0..10).map(|_| svc.clone().oneshot(7))).await;
    for r in &all {
        assert_eq!(r.as_deref().unwrap(), "Infrastructure");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(events.load(Ordering::SeqCst), 10);
}

#[tokio::test(start_paused = true)]
async fn fb_over_coalesced_quota_refusals_nobody_gets_the_fallback() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let upstream = service_fn(move |_: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err::<String, BoxError>(Box::new(
                Rejected::new("quota", RejectKind::QuotaExceeded)
                    .with_retry_after(Duration::from_secs(3)),
            ))
        }
    });
    let svc = FallbackLayer::new(fallback::value("fallback".to_string()))
        .layer(CoalesceLayer::new(|x: &u32| Some(*x)).layer(upstream));
    let all = tokio::time::timeout(
        Duration::from_secs(600),
        futures::future::join_all((0..10).map(|_| svc.clone().oneshot(7))),
    )
    .await
    .expect("nobody hangs");
    for r in all {
        let e = r.unwrap_err();
        assert_eq!(
            Rejected::find(&*e).map(|r| r.kind()),
            Some(RejectKind::QuotaExceeded)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn fb_stale_with_an_evicting_cache_never_answers_another_keys_value() {
    let cache: Cache<u32, String> = Cache::builder()
        .ttl(Duration::from_secs(5))
        .stale_for(Duration::from_secs(3600))
        .max_entries(4)
        .max_bytes(4096)
        .max_entry_bytes(1024)
        .build()
        .unwrap();
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let upstream = service_fn(move |x: u32| {
        let down = d.load(Ordering::SeqCst);
        async move {
            if down {
                Err::<String, BoxError>(circuit_open())
            } else {
                Ok(format!("answer {x}"))
            }
        }
    });
    let key = |x: &u32| Some(*x);
    let svc = FallbackLayer::new(fallback::stale(&cache, key, semaforo::share::Cloned))
        .layer(cache.layer(key).layer(upstream));
    for x in 0..200u32 {
        assert_eq!(svc.clone().oneshot(x).await.unwrap(), format!("answer {x}"));
    }
    cache.run_pending_tasks();
    assert!(cache.snapshot().entries <= 4, "{:?}", cache.snapshot());
    tokio::time::sleep(Duration::from_secs(10)).await;
    down.store(true, Ordering::SeqCst);
    let mut stale = 0;
    for x in 0..200u32 {
        match svc.clone().oneshot(x).await {
            Ok(s) => {
                assert_eq!(s, format!("answer {x}"), "another key's answer");
                stale += 1;
            }
            Err(e) => assert_eq!(Rejected::find(&*e).unwrap().kind(), RejectKind::CircuitOpen),
        }
    }
    assert!(stale <= 4, "{stale}");
    // Cleared under our feet: the original error.
    cache.clear();
    cache.run_pending_tasks();
    assert!(svc.oneshot(199).await.is_err());
}

// ───────────────────────────── degrade ─────────────────────────────

fn flag() -> (Arc<AtomicBool>, impl Fn() -> bool + Send + Sync + 'static) {
    let f = Arc::new(AtomicBool::new(false));
    let g = f.clone();
    (f, move || g.load(Ordering::SeqCst))
}

type Changes = Arc<Mutex<Vec<(Level, Level, LevelReason)>>>;

fn recorder() -> (Changes, impl Fn(&Event<'_>) + Send + Sync + 'static) {
    let changes: Changes = Arc::default();
    let c = changes.clone();
    (changes, move |e: &Event<'_>| {
        if let EventKind::LevelChanged { from, to, reason } = e.kind {
            c.lock().unwrap().push((from, to, reason));
        }
    })
}

#[test]
fn dg_every_below_one_ms_is_a_config_error() {
    for d in [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_micros(999),
    ] {
        assert!(Degrade::builder().every(d).build().is_err(), "{d:?}");
    }
    assert!(Degrade::builder()
        .every(Duration::from_millis(1))
        .build()
        .is_ok());
    assert!(Degrade::builder().every(Duration::MAX).build().is_ok());
}

// `every(Duration::MAX)` is accepted; the spawned task must neither panic
// (tokio's `Interval` computes `timeout + period`; it survives because tokio
// caps the period) nor skip its first evaluation.
#[tokio::test(start_paused = true)]
async fn dg_every_duration_max_the_spawned_task_does_not_panic() {
    let (on, signal) = flag();
    on.store(true, Ordering::SeqCst);
    let switch = Degrade::builder()
        .every(Duration::MAX)
        .rule(Rule::new(Level::Reduced, signal))
        .build()
        .unwrap();
    let h = switch.spawn().unwrap();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    if h.is_finished() {
        let e = h.await.unwrap_err();
        panic!(
            "the evaluation task died: {e:?} (level {:?})",
            switch.level()
        );
    }
    assert_eq!(
        switch.level(),
        Level::Reduced,
        "the first evaluation is at once"
    );
}

#[tokio::test(start_paused = true)]
async fn dg_after_and_recover_after_max_never_flip_and_zero_flips_at_once() {
    let (on, signal) = flag();
    let (changes, listener) = recorder();
    let stuck = Degrade::builder()
        .rule(
            Rule::new(Level::Minimal, signal)
                .after(Duration::MAX)
                .recover_after(Duration::MAX),
        )
        .on_event(listener)
        .build()
        .unwrap();
    on.store(true, Ordering::SeqCst);
    for _ in 0..100 {
        assert_eq!(stuck.evaluate(), Level::Normal);
        tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
    }
    assert!(changes.lock().unwrap().is_empty());

    let (on, signal) = flag();
    let (changes, listener) = recorder();
    let quick = Degrade::builder()
        .rule(
            Rule::new(Level::Reduced, signal)
                .after(Duration::ZERO)
                .recover_after(Duration::ZERO),
        )
        .on_event(listener)
        .build()
        .unwrap();
    for i in 0..50 {
        on.store(i % 2 == 0, Ordering::SeqCst);
        let want = if i % 2 == 0 {
            Level::Reduced
        } else {
            Level::Normal
        };
        assert_eq!(quick.evaluate(), want);
    }
    assert_eq!(changes.lock().unwrap().len(), 50);
}

#[tokio::test(start_paused = true)]
async fn dg_hysteresis_exact_boundaries_and_an_oscillating_signal_never_moves() {
    let (on, signal) = flag();
    let switch = Degrade::builder()
        .rule(
            Rule::new(Level::Reduced, signal)
                .after(Duration::from_secs(3))
                .recover_after(Duration::from_secs(2)),
        )
        .build()
        .unwrap();
    on.store(true, Ordering::SeqCst);
    assert_eq!(switch.evaluate(), Level::Normal);
    tokio::time::advance(Duration::from_millis(2_999)).await;
    assert_eq!(switch.evaluate(), Level::Normal);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(switch.evaluate(), Level::Reduced);
    on.store(false, Ordering::SeqCst);
    assert_eq!(switch.evaluate(), Level::Reduced);
    tokio::time::advance(Duration::from_millis(1_999)).await;
    assert_eq!(switch.evaluate(), Level::Reduced);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(switch.evaluate(), Level::Normal);

    // A signal that flips at each read, evaluated every second by the task:
    // it never holds (nor is absent) for 2 s in a row.
    let toggled = Arc::new(AtomicBool::new(false));
    let t = toggled.clone();
    let (changes, listener) = recorder();
    let switch = Degrade::builder()
        .every(Duration::from_secs(1))
        .rule(
            Rule::new(Level::Minimal, move || !t.fetch_xor(true, Ordering::SeqCst))
                .after(Duration::from_secs(2))
                .recover_after(Duration::from_secs(2)),
        )
        .on_event(listener)
        .build()
        .unwrap();
    let _task = switch.spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(1_000)).await;
    assert!(
        changes.lock().unwrap().is_empty(),
        "{:?}",
        changes.lock().unwrap()
    );
    assert_eq!(switch.level(), Level::Normal);
}

#[tokio::test(start_paused = true)]
async fn dg_set_for_max_and_zero() {
    let (changes, listener) = recorder();
    let switch = Degrade::builder().on_event(listener).build().unwrap();
    switch.set_for(Level::Minimal, Duration::MAX);
    assert_eq!(switch.level(), Level::Minimal);
    let (l, until) = switch.manual().unwrap();
    assert_eq!(l, Level::Minimal);
    assert!(until.unwrap() > Instant::now() + Duration::from_secs(86_400 * 365 * 29));
    tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
    assert_eq!(switch.level(), Level::Minimal);
    switch.release();
    assert_eq!(switch.level(), Level::Normal);

    // Zero: over before it starts; no change, no event.
    let before = changes.lock().unwrap().len();
    switch.set_for(Level::Reduced, Duration::ZERO);
    assert_eq!(switch.level(), Level::Normal);
    assert_eq!(switch.manual(), None);
    assert_eq!(changes.lock().unwrap().len(), before);
    // Over a `set`: the zero override ends the manual state.
    switch.set(Level::Reduced);
    switch.set_for(Level::Minimal, Duration::ZERO);
    assert_eq!(switch.level(), Level::Normal);
    let c = changes.lock().unwrap();
    assert_eq!(
        *c,
        vec![
            (Level::Normal, Level::Minimal, LevelReason::Manual),
            (Level::Minimal, Level::Normal, LevelReason::Released),
            (Level::Normal, Level::Reduced, LevelReason::Manual),
            (Level::Reduced, Level::Normal, LevelReason::OverrideExpired),
        ]
    );
    // Every event is a change.
    assert!(c.iter().all(|(f, t, _)| f != t));
}

#[tokio::test(start_paused = true)]
async fn dg_set_for_expires_exactly_and_manual_wins_over_active_rules() {
    let (on, signal) = flag();
    let (changes, listener) = recorder();
    let switch = Degrade::builder()
        .rule(Rule::new(Level::Minimal, signal))
        .on_event(listener)
        .build()
        .unwrap();
    on.store(true, Ordering::SeqCst);
    assert_eq!(switch.evaluate(), Level::Minimal);
    switch.set_for(Level::Normal, Duration::from_secs(5));
    assert_eq!(switch.level(), Level::Normal);
    // Rules keep evaluating under the override, without a change.
    assert_eq!(switch.evaluate(), Level::Normal);
    assert_eq!(switch.rules_level(), Level::Minimal);
    tokio::time::advance(Duration::from_millis(4_999)).await;
    assert_eq!(switch.level(), Level::Normal);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(switch.level(), Level::Minimal);
    assert_eq!(
        *changes.lock().unwrap(),
        vec![
            (Level::Normal, Level::Minimal, LevelReason::Rules),
            (Level::Minimal, Level::Normal, LevelReason::Manual),
            (Level::Normal, Level::Minimal, LevelReason::OverrideExpired),
        ]
    );
}

#[test]
fn dg_listener_reentering_set_release_level_evaluate_does_not_deadlock() {
    no_deadlock("re-entrant listener", || {
        let handle: Arc<Mutex<Option<Degrade>>> = Arc::default();
        let h = handle.clone();
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let switch = Degrade::builder()
            .on_event(move |e| {
                s.fetch_add(1, Ordering::SeqCst);
                let sw = h.lock().unwrap().clone();
                let Some(sw) = sw else { return };
                if let EventKind::LevelChanged { to, reason, .. } = e.kind {
                    // Reads of every kind, from inside the event.
                    let _ = (sw.level(), sw.manual(), sw.rules_level(), sw.evaluate());
                    let _ = format!("{sw:?}");
                    if to == Level::Reduced && reason == LevelReason::Manual {
                        sw.release();
                    }
                    if to == Level::Minimal {
                        sw.set(Level::Minimal); // same level: no change, no recursion
                    }
                }
            })
            .build()
            .unwrap();
        *handle.lock().unwrap() = Some(switch.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            switch.set(Level::Reduced);
            assert_eq!(switch.level(), Level::Normal, "the listener released it");
            switch.set(Level::Minimal);
            assert_eq!(switch.level(), Level::Minimal);
            switch.set_for(Level::Reduced, Duration::from_secs(1));
            tokio::time::advance(Duration::from_secs(2)).await;
            assert_eq!(switch.level(), Level::Normal);
        });
        // Break the cycle.
        *handle.lock().unwrap() = None;
        seen.load(Ordering::SeqCst)
    });
}

// Found by the outside attack (fixed since): events are told after the switch's lock is released, so a listener
// that changes the level from inside an event gets its nested change told to
// the listeners after it *before* the change that caused it. Here the first
// listener releases a manual `Reduced`; the second listener sees
// `Reduced→Normal (released)` and only then `Normal→Reduced (manual)`, so its
// last event says `Reduced` while the level is `Normal`. Expected: events in
// the order of the changes (each `from` the previous `to`). Actual: reversed.
// src/degrade/mod.rs `Degrade::locked` (emit after unlock, no queue).
#[test]
fn dg_a_second_listener_sees_changes_in_the_order_they_happened() {
    no_deadlock("ordering", || {
        let handle: Arc<Mutex<Option<Degrade>>> = Arc::default();
        let h = handle.clone();
        let (changes, record) = recorder();
        let switch = Degrade::builder()
            .on_event(move |e| {
                let sw = h.lock().unwrap().clone();
                if let (Some(sw), EventKind::LevelChanged { to, reason, .. }) = (sw, &e.kind) {
                    if *to == Level::Reduced && *reason == LevelReason::Manual {
                        sw.release();
                    }
                }
            })
            .on_event(record)
            .build()
            .unwrap();
        *handle.lock().unwrap() = Some(switch.clone());
        switch.set(Level::Reduced);
        *handle.lock().unwrap() = None;
        let c = changes.lock().unwrap().clone();
        assert_eq!(switch.level(), Level::Normal);
        assert_eq!(
            c,
            vec![
                (Level::Normal, Level::Reduced, LevelReason::Manual),
                (Level::Reduced, Level::Normal, LevelReason::Released),
            ],
            "the last event told must match the level in force"
        );
    });
}

#[test]
fn dg_signals_that_read_and_write_the_switch_do_not_deadlock() {
    no_deadlock("signal reads the switch", || {
        let handle: Arc<Mutex<Option<Degrade>>> = Arc::default();
        let h = handle.clone();
        let reads = Arc::new(AtomicUsize::new(0));
        let r = reads.clone();
        let switch = Degrade::builder()
            .rule(Rule::new(Level::Reduced, move || {
                r.fetch_add(1, Ordering::SeqCst);
                let sw = h.lock().unwrap().clone();
                match sw {
                    Some(sw) => {
                        let _ = (sw.level(), sw.manual(), sw.rules_level());
                        sw.level() == Level::Normal
                    }
                    None => false,
                }
            }))
            .build()
            .unwrap();
        *handle.lock().unwrap() = Some(switch.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(switch.evaluate(), Level::Reduced);
            switch.set_for(Level::Minimal, Duration::from_secs(1));
            assert_eq!(switch.evaluate(), Level::Minimal);
        });
        *handle.lock().unwrap() = None;
        assert!(reads.load(Ordering::SeqCst) >= 2);
    });
}

#[tokio::test(start_paused = true)]
async fn dg_many_clones_and_spawns_all_tasks_end_after_the_last_handle() {
    let (on, signal) = flag();
    on.store(true, Ordering::SeqCst);
    let switch = Degrade::builder()
        .every(Duration::from_millis(1))
        .rule(Rule::new(Level::Reduced, signal).recover_after(Duration::ZERO))
        .build()
        .unwrap();
    let clones: Vec<Degrade> = (0..200).map(|_| switch.clone()).collect();
    let tasks: Vec<_> = clones
        .iter()
        .step_by(10)
        .map(|c| c.spawn().unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(switch.level(), Level::Reduced);
    drop(clones);
    drop(switch);
    for t in tasks {
        tokio::time::timeout(Duration::from_millis(10), t)
            .await
            .expect("the task ended")
            .expect("without a panic");
    }
}

// Found by the outside attack (fixed since): the spawned task holds only a `Weak`, but it notices the last
// handle is gone only at its next tick: with `every(1 h)` the task (and its
// timer) live on for up to an hour after the last `Degrade` is dropped.
// Expected ("it ends when every clone of this switch is dropped"): the task
// ends at once. Actual: it ends `every` later. src/degrade/mod.rs `spawn`
// (the loop checks `weak.upgrade()` only after `tick.tick().await`).
// Low severity (no strong reference is kept).
#[tokio::test(start_paused = true)]
async fn dg_the_task_ends_when_the_last_handle_drops_not_a_tick_later() {
    let switch = Degrade::builder()
        .every(Duration::from_secs(3600))
        .build()
        .unwrap();
    let task = switch.spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(switch);
    let t = Instant::now();
    task.await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the task lived {:?} after the last handle dropped",
        t.elapsed()
    );
}

// Found by the outside attack (fixed since): a listener or a signal that reads the switch (which the module
// docs explicitly allow) can only do so through a strong `Degrade` clone —
// there is no weak handle — so it keeps the switch alive from inside: the
// task started by `spawn()` never ends although every handle the user holds
// is gone (an `Arc` cycle Inner → listener → Degrade → Inner). Expected: some
// way (a weak handle, or the switch passed to the listener/signal) to read
// the switch without leaking it; the task ends. Actual: the task runs for
// ever. src/degrade/mod.rs (no `Degrade::downgrade` / `WeakDegrade`).
#[tokio::test(start_paused = true)]
async fn dg_a_listener_that_reads_the_switch_does_not_keep_the_task_alive_for_ever() {
    // The fix: the listener holds a `WeakDegrade`.
    let handle: Arc<Mutex<Option<semaforo::degrade::WeakDegrade>>> = Arc::default();
    let h = handle.clone();
    let switch = Degrade::builder()
        .every(Duration::from_secs(1))
        .on_event(move |_| {
            if let Some(sw) = h.lock().unwrap().as_ref().and_then(|w| w.upgrade()) {
                let _ = sw.level();
            }
        })
        .build()
        .unwrap();
    *handle.lock().unwrap() = Some(switch.downgrade());
    switch.set(Level::Reduced); // the listener runs and reads the switch
    let task = switch.spawn().unwrap();
    drop(switch);
    drop(handle); // the user keeps nothing
    let r = tokio::time::timeout(Duration::from_secs(3600), task).await;
    assert!(r.is_ok(), "the evaluation task still runs an hour later");
}

#[test]
fn dg_concurrent_set_release_evaluate_from_many_threads() {
    no_deadlock("concurrent", || {
        let (changes, listener) = recorder();
        let on = Arc::new(AtomicBool::new(false));
        let o = on.clone();
        let switch = Degrade::builder()
            .rule(
                Rule::new(Level::Reduced, move || o.load(Ordering::Relaxed))
                    .recover_after(Duration::ZERO),
            )
            .on_event(listener)
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let sw = switch.clone();
                let on = on.clone();
                let _g2 = rt.handle().clone();
                std::thread::spawn(move || {
                    let _e = _g2.enter();
                    for j in 0..3_000u32 {
                        match (i + j) % 6 {
                            0 => sw.set(Level::Minimal),
                            1 => sw.release(),
                            2 => sw.set_for(Level::Reduced, Duration::from_nanos(j as u64 % 3)),
                            3 => {
                                on.fetch_xor(true, Ordering::Relaxed);
                                sw.evaluate();
                            }
                            4 => {
                                let _ = sw.manual();
                            }
                            _ => {
                                let _ = sw.level();
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        switch.release();
        on.store(false, Ordering::Relaxed);
        switch.evaluate();
        assert_eq!(switch.level(), Level::Normal);
        let c = changes.lock().unwrap();
        assert!(c.iter().all(|(f, t, _)| f != t));
        assert!(!c.is_empty());
    });
}

#[tokio::test]
async fn dg_layer_over_an_erroring_inner_service_and_a_level_read_once_per_request() {
    let switch = Degrade::builder().build().unwrap();
    let sw = switch.clone();
    let svc = DegradeLayer::new(&switch).layer(service_fn(move |req: http::Request<u8>| {
        let level = req.extensions().get::<Level>().copied();
        // The level changes while the request runs.
        sw.set(Level::Minimal);
        async move {
            match *req.body() {
                0 => Err(std::io::Error::other("inner failed")),
                _ => Ok(http::Response::builder()
                    .status(500)
                    .header("x-degrade-level", "forged")
                    .body(format!("{level:?}"))
                    .unwrap()),
            }
        }
    }));
    let e = svc
        .clone()
        .oneshot(http::Request::new(0))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "inner failed");
    switch.release();
    let res = svc.clone().oneshot(http::Request::new(1)).await.unwrap();
    assert_eq!(res.body(), "Some(Normal)");
    assert_eq!(res.extensions().get::<Level>(), Some(&Level::Normal));
    // Normal: no header of ours (the handler's passes).
    assert_eq!(res.headers()["x-degrade-level"], "forged");
    let res = svc.oneshot(http::Request::new(1)).await.unwrap();
    assert_eq!(res.headers()["x-degrade-level"], "minimal");
    assert_eq!(res.headers().get_all("x-degrade-level").iter().count(), 1);
}

// Found by the outside attack (fixed since): `degrade::breaker_open` is documented to hold "while `breaker` is
// not closed (open, half-open, or forced open)", but it reads only
// `Breaker::state()`, and `force_open()` changes the breaker's *mode*, not its
// state (which stays `Closed`). Expected: after `force_open()` the signal
// holds and a `Reduced` rule fires (the breaker refuses every call).
// Actual: `holds()` is false and the level stays `Normal`.
// src/degrade/mod.rs `breaker_open` (`b.state() != BreakerState::Closed`;
// compare src/health/mod.rs which also checks `mode == Mode::ForcedOpen`).
#[tokio::test(start_paused = true)]
async fn dg_breaker_open_signal_holds_while_the_breaker_is_forced_open() {
    use semaforo::breaker::Breaker;
    use semaforo::degrade::{breaker_open, Signal};
    let breaker = Breaker::builder().build().unwrap();
    let switch = Degrade::builder()
        .rule(Rule::new(Level::Reduced, breaker_open(&breaker)))
        .build()
        .unwrap();
    let open = breaker_open(&breaker);
    assert!(!open.holds());
    breaker.force_open();
    // The breaker refuses every call now.
    let refused = breaker
        .layer()
        .layer(service_fn(|_: u32| async { Ok::<_, Infallible>(1) }))
        .oneshot(1)
        .await
        .unwrap_err();
    assert_eq!(
        Rejected::find(&*refused).unwrap().kind(),
        RejectKind::CircuitOpen
    );
    assert!(
        open.holds(),
        "forced open, refusing calls, but breaker_open() does not hold (state {:?})",
        breaker.state()
    );
    assert_eq!(switch.evaluate(), Level::Reduced);
}

#[tokio::test(start_paused = true)]
async fn dg_built_in_signals_at_their_extremes() {
    use semaforo::breaker::Breaker;
    use semaforo::bulkhead::Bulkhead;
    use semaforo::degrade::Signal;
    use semaforo::degrade::{breaker_open, limit_below, line_above, pace_wait_above};
    use semaforo::pace::Pace;
    let breaker = Breaker::builder().consecutive_failures(1).build().unwrap();
    let open = breaker_open(&breaker);
    assert!(!open.holds());
    let _ = breaker
        .layer()
        .layer(service_fn(|_: u32| async {
            Err::<u32, BoxError>(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        }))
        .oneshot(1)
        .await;
    assert!(open.holds(), "{:?}", breaker.state());
    breaker.reset();
    assert!(!open.holds());

    let bulkhead = Bulkhead::builder(1).max_queue(4).build().unwrap();
    let none = Bulkhead::builder(1).build().unwrap();
    for f in [f64::NAN, f64::INFINITY, 1.0, 2.0] {
        assert!(!line_above(&bulkhead, f).holds(), "{f}");
        assert!(!line_above(&none, f).holds(), "{f}");
    }
    assert!(!limit_below(&bulkhead, 0).holds());
    assert!(!limit_below(&bulkhead, 1).holds());
    assert!(limit_below(&bulkhead, 2).holds());
    assert!(limit_below(&bulkhead, u64::MAX).holds());

    let pace = Pace::builder().requests_per_minute(60).build().unwrap();
    assert!(!pace_wait_above(&pace, Duration::ZERO).holds());
    assert!(!pace_wait_above(&pace, Duration::MAX).holds());
    // The signals are usable in a switch with every Duration.
    let switch = Degrade::builder()
        .rule(Rule::new(Level::Reduced, pace_wait_above(&pace, Duration::MAX)).after(Duration::MAX))
        .rule(
            Rule::new(Level::Minimal, line_above(&bulkhead, f64::NAN)).recover_after(Duration::MAX),
        )
        .rule(Rule::new(Level::Reduced, breaker_open(&breaker)).after(Duration::ZERO))
        .build()
        .unwrap();
    assert_eq!(switch.evaluate(), Level::Normal);
}

// ───────────────────────────── chaos ─────────────────────────────

fn echo() -> impl Service<
    u32,
    Response = u32,
    Error = Infallible,
    Future = std::future::Ready<Result<u32, Infallible>>,
> + Clone {
    service_fn(|x: u32| std::future::ready(Ok(x)))
}

/// What each of `n` calls got: 0 passed, 1 error.
async fn outcomes(chaos: &Chaos<u32>, n: usize) -> Vec<u8> {
    let mut svc = chaos.layer().layer(echo());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = svc.ready().await.unwrap().call(i as u32).await;
        out.push(u8::from(r.is_err()));
    }
    out
}

fn half_errors(seed: u64) -> Chaos<u32> {
    Chaos::builder()
        .seed(seed)
        .fault(Fault::error(Class::Transient).rate(0.5))
        .build()
        .unwrap()
}

#[test]
fn ch_bad_rates_and_schedules_are_config_errors_never_panics() {
    for p in [
        f64::NAN,
        -f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1e-300,
        1.0 + f64::EPSILON,
        f64::MAX,
        f64::MIN,
    ] {
        let r = std::panic::catch_unwind(|| {
            Chaos::<u32>::builder().fault(Fault::hang().rate(p)).build()
        });
        assert!(r.expect("no panic").is_err(), "rate {p}");
    }
    // Valid extremes.
    for p in [0.0, -0.0, 1.0, f64::MIN_POSITIVE, 5e-324] {
        assert!(
            Chaos::<u32>::builder()
                .fault(Fault::hang().rate(p))
                .build()
                .is_ok(),
            "{p}"
        );
    }
    assert!(Chaos::<u32>::builder()
        .fault(Fault::hang().between(Duration::MAX, Duration::ZERO))
        .build()
        .is_err());
    assert!(Chaos::<u32>::builder()
        .fault(Fault::hang().between(Duration::MAX, Duration::MAX))
        .fault(Fault::hang().since(Duration::MAX))
        .build()
        .is_ok());
    let b = (0..64).fold(Chaos::<u32>::builder(), |b, _| b.fault(Fault::hang()));
    assert!(b.build().is_ok());
    let b = (0..65).fold(Chaos::<u32>::builder(), |b, _| b.fault(Fault::hang()));
    assert!(b.build().is_err());
    let b = (0..10_000).fold(Chaos::<u32>::builder(), |b, _| b.fault(Fault::hang()));
    assert!(b.build().is_err());
    // Stream faults after 0 chunks.
    type R = http::Response<ChaosBody<Bytes>>;
    assert!(Chaos::<R>::builder()
        .fault(Fault::cut_stream(0))
        .build()
        .is_err());
    assert!(Chaos::<R>::builder()
        .fault(Fault::stall_stream(0))
        .build()
        .is_err());
    assert!(Chaos::<R>::builder()
        .fault(Fault::cut_stream(u32::MAX))
        .fault(Fault::stall_stream(u32::MAX))
        .build()
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn ch_rate_zero_never_rate_one_always_with_64_faults() {
    let mut b = Chaos::<u32>::builder().seed(u64::MAX);
    for _ in 0..63 {
        b = b.fault(Fault::error(Class::Transient).rate(0.0));
    }
    let chaos = b
        .fault(Fault::error(Class::Infrastructure).rate(1.0))
        .build()
        .unwrap();
    chaos.enable();
    let svc = chaos.layer().layer(echo());
    for i in 0..2_000 {
        let e = svc.clone().oneshot(i).await.unwrap_err();
        assert_eq!(classify_error(&*e), Class::Infrastructure);
    }
    assert_eq!(chaos.calls(), 2_000);
}

#[tokio::test(start_paused = true)]
async fn ch_seeds_zero_and_max_are_repeatable_and_differ() {
    let run = |seed: u64| async move {
        let c = half_errors(seed);
        c.enable();
        outcomes(&c, 2_000).await
    };
    let (a0, b0) = (run(0).await, run(0).await);
    let (am, bm) = (run(u64::MAX).await, run(u64::MAX).await);
    assert_eq!(a0, b0);
    assert_eq!(am, bm);
    assert_ne!(a0, am);
    for v in [&a0, &am] {
        let hits = v.iter().filter(|&&x| x == 1).count() as f64;
        // 2,000 draws at 0.5: σ ≈ 22.4; within 5σ.
        assert!((hits - 1_000.0).abs() < 112.0, "{hits}");
    }
}

// Found by the outside attack (fixed since): call n of seed s draws from `SmallRng::seed_from_u64(s + n ·
// 0x9E3779B97F4A7C15)`, so seed `s + 0x9E3779B97F4A7C15` replays seed `s`'s
// faults shifted by one call (and `s + k·γ` shifted by k): two "different"
// seeds give the same fault sequence. Expected: distinct seeds give
// independent sequences. Actual: `seed(γ)` calls 0.. == `seed(0)` calls 1..
// exactly. src/chaos/mod.rs `Chaos::plan` (seed and call number mixed by an
// addition instead of hashing the pair). Low severity.
#[tokio::test(start_paused = true)]
async fn ch_seeds_one_golden_step_apart_are_not_the_same_sequence_shifted() {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    let a = half_errors(0);
    a.enable();
    let a = outcomes(&a, 1_001).await;
    let b = half_errors(GAMMA);
    b.enable();
    let b = outcomes(&b, 1_000).await;
    assert!(
        a[1..] != b[..],
        "seed γ is seed 0 shifted by one call: all {} outcomes equal",
        b.len()
    );
}

/// Call n's generator is seeded with `seed + n·γ`, which SplitMix64
/// expands into the next four words of one sequence: consecutive calls'
/// states share three of their four words. Their draws must still be
/// independent: at rate 0.5, calls n and n + k agree half the time (and
/// two faults of one call too).
#[tokio::test(start_paused = true)]
async fn ch_draws_of_nearby_calls_and_of_two_faults_are_uncorrelated() {
    let n = 200_000usize;
    let chaos = Chaos::<u32>::builder()
        .seed(12345)
        .fault(Fault::error(Class::Transient).rate(0.5))
        .fault(Fault::error(Class::Infrastructure).rate(0.5))
        .build()
        .unwrap();
    chaos.enable();
    let mut svc = chaos.layer().layer(echo());
    // 0 pass, 1 first fault, 2 second fault only.
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = svc.ready().await.unwrap().call(i as u32).await;
        out.push(match r {
            Ok(_) => 0u8,
            Err(e) if classify_error(&*e) == Class::Transient => 1,
            Err(_) => 2,
        });
    }
    let first: Vec<bool> = out.iter().map(|&o| o == 1).collect();
    let sigma = (0.25 / n as f64).sqrt();
    for lag in 1..=8 {
        let agree =
            (0..n - lag).filter(|&i| first[i] == first[i + lag]).count() as f64 / (n - lag) as f64;
        assert!((agree - 0.5).abs() < 5.0 * sigma, "lag {lag}: {agree}");
    }
    // Second fault hits when the first misses: P = 0.25 of all calls.
    let second = out.iter().filter(|&&o| o == 2).count() as f64 / n as f64;
    let s2 = (0.25 * 0.75 / n as f64).sqrt();
    assert!((second - 0.25).abs() < 5.0 * s2, "{second}");
}

#[tokio::test(start_paused = true)]
async fn ch_latency_extremes_are_capped_and_add_up_without_overflow() {
    let mut b = Chaos::<u32>::builder();
    for _ in 0..64 {
        b = b.fault(Fault::latency(Latency::Fixed(Duration::MAX)));
    }
    let chaos = b.build().unwrap();
    chaos.enable();
    let t = Instant::now();
    assert_eq!(chaos.layer().layer(echo()).oneshot(5).await.unwrap(), 5);
    assert_eq!(t.elapsed(), 64 * semaforo::chaos::MAX_LATENCY);

    for l in [
        Latency::Uniform {
            min: Duration::MAX,
            max: Duration::MAX,
        },
        Latency::Uniform {
            min: Duration::ZERO,
            max: Duration::MAX,
        },
        Latency::LongTail {
            median: Duration::MAX,
            p99: Duration::MAX,
        },
        Latency::LongTail {
            median: Duration::from_nanos(1),
            p99: Duration::MAX,
        },
        Latency::LongTail {
            median: Duration::from_nanos(1),
            p99: Duration::from_nanos(1),
        },
        Latency::Fixed(Duration::ZERO),
    ] {
        let chaos = Chaos::<u32>::builder()
            .seed(u64::MAX)
            .fault(Fault::latency(l))
            .build()
            .unwrap();
        chaos.enable();
        for i in 0..200 {
            let t = Instant::now();
            assert_eq!(chaos.layer().layer(echo()).oneshot(i).await.unwrap(), i);
            assert!(t.elapsed() <= semaforo::chaos::MAX_LATENCY, "{l:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn ch_schedules_are_exact_and_an_empty_window_never_fires() {
    let chaos = Chaos::<u32>::builder()
        .fault(
            Fault::error(Class::Transient).between(Duration::from_secs(1), Duration::from_secs(2)),
        )
        .fault(
            Fault::error(Class::Infrastructure)
                .between(Duration::from_secs(5), Duration::from_secs(5)),
        )
        .fault(Fault::error(Class::Infrastructure).between(Duration::ZERO, Duration::ZERO))
        .fault(Fault::error(Class::Infrastructure).since(Duration::MAX))
        .build()
        .unwrap();
    let svc = chaos.layer().layer(echo());
    // Off: nothing, even inside the windows.
    tokio::time::advance(Duration::from_millis(1_500)).await;
    assert!(svc.clone().oneshot(1).await.is_ok());
    chaos.enable();
    let probe = |ms: u64| {
        let svc = svc.clone();
        async move { (ms, svc.oneshot(1).await.err().map(|e| classify_error(&*e))) }
    };
    let start = Instant::now();
    let mut got = Vec::new();
    for ms in [0u64, 999, 1_000, 1_999, 2_000, 4_999, 5_000, 5_001, 10_000] {
        tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
        got.push(probe(ms).await);
    }
    let want: Vec<(u64, Option<Class>)> = vec![
        (0, None),
        (999, None),
        (1_000, Some(Class::Transient)),
        (1_999, Some(Class::Transient)),
        (2_000, None),
        (4_999, None),
        (5_000, None),
        (5_001, None),
        (10_000, None),
    ];
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ch_enable_and_disable_concurrently_with_calls() {
    let chaos = half_errors(9);
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let svc = chaos.layer().layer(echo());
        callers.push(tokio::spawn(async move {
            for i in 0..3_000u32 {
                match svc.clone().oneshot(i).await {
                    Ok(x) => assert_eq!(x, i),
                    Err(e) => assert_eq!(classify_error(&*e), Class::Transient),
                }
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let (c, s) = (chaos.clone(), stop.clone());
    let toggler = tokio::spawn(async move {
        let mut i = 0u32;
        while !s.load(Ordering::Relaxed) {
            if i % 3 == 0 {
                c.disable();
            } else {
                c.enable();
            }
            i += 1;
            tokio::task::yield_now().await;
        }
    });
    for c in callers {
        c.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    toggler.await.unwrap();
    // Quiet again: enable() restarts the seeded sequence at call 0.
    chaos.enable();
    let again = outcomes(&chaos, 500).await;
    let fresh = half_errors(9);
    fresh.enable();
    assert_eq!(again, outcomes(&fresh, 500).await);
}

#[tokio::test(start_paused = true)]
async fn ch_dropped_mid_delay_or_hang_drops_the_inner_future_and_disabled_is_untouched() {
    let created = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (c, d) = (created.clone(), dropped.clone());
    let inner = service_fn(move |x: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        let g = Tracked(d.clone());
        async move {
            let _g = g;
            Ok::<_, Infallible>(x)
        }
    });
    // Latency then the call: dropped mid-delay.
    let chaos = Chaos::<u32>::builder()
        .fault(Fault::latency(Latency::Fixed(Duration::from_secs(10))))
        .build()
        .unwrap();
    chaos.enable();
    let svc = chaos.layer().layer(inner.clone());
    assert!(
        tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(1))
            .await
            .is_err()
    );
    assert_eq!(created.load(Ordering::SeqCst), 1);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    // Latency then a hang: the inner service is never called.
    let chaos = Chaos::<u32>::builder()
        .fault(Fault::latency(Latency::Fixed(Duration::from_secs(10))))
        .fault(Fault::hang())
        .build()
        .unwrap();
    chaos.enable();
    let svc = chaos.layer().layer(inner.clone());
    for wait in [5, 15] {
        assert!(
            tokio::time::timeout(Duration::from_secs(wait), svc.clone().oneshot(1))
                .await
                .is_err()
        );
    }
    assert_eq!(created.load(Ordering::SeqCst), 1);
    // Disabled mid-delay: the delayed call stays delayed, new calls pass.
    let chaos = Chaos::<u32>::builder()
        .fault(Fault::latency(Latency::Fixed(Duration::from_secs(10))))
        .build()
        .unwrap();
    chaos.enable();
    let svc = chaos.layer().layer(inner);
    let t = Instant::now();
    let delayed = tokio::spawn(svc.clone().oneshot(7));
    tokio::task::yield_now().await;
    chaos.disable();
    assert_eq!(svc.clone().oneshot(8).await.unwrap(), 8);
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(delayed.await.unwrap().unwrap(), 7);
    assert_eq!(t.elapsed(), Duration::from_secs(10));
    assert_eq!(created.load(Ordering::SeqCst), 3);
    assert_eq!(dropped.load(Ordering::SeqCst), 3);
}

mod bodies {
    use super::*;
    use http_body::{Body, Frame};
    use http_body_util::{BodyExt, Empty, Full, StreamBody};

    type Frames = futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

    fn frames(data: usize, trailers: bool) -> StreamBody<Frames> {
        let mut v: Vec<Result<Frame<Bytes>, Infallible>> = (0..data)
            .map(|i| Ok(Frame::data(Bytes::from(format!("chunk {i}")))))
            .collect();
        if trailers {
            let mut t = http::HeaderMap::new();
            t.insert("x-done", http::HeaderValue::from_static("1"));
            v.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures::stream::iter(v))
    }

    /// (data chunks, trailers seen, error seen) read the way hyper does:
    /// stop as soon as `is_end_stream` says so.
    async fn hyper_read<B>(mut body: B) -> (usize, bool, bool)
    where
        B: Body + Unpin,
    {
        let (mut data, mut trailers, mut error) = (0, false, false);
        while !body.is_end_stream() {
            match tokio::time::timeout(Duration::from_secs(3600), body.frame()).await {
                Err(_) => panic!("stalled"),
                Ok(None) => break,
                Ok(Some(Ok(f))) if f.is_data() => data += 1,
                Ok(Some(Ok(_))) => trailers = true,
                Ok(Some(Err(_))) => {
                    error = true;
                    // After the error the body must say it is over.
                    assert!(body.is_end_stream(), "is_end_stream after a cut");
                    assert!(body.frame().await.is_none());
                    break;
                }
            }
        }
        (data, trailers, error)
    }

    async fn through<B>(
        fault: Fault<http::Response<ChaosBody<B>>>,
        status: u16,
        body: B,
    ) -> http::Response<ChaosBody<B>>
    where
        B: Send + 'static,
    {
        let chaos: Chaos<http::Response<ChaosBody<B>>> =
            Chaos::builder().fault(fault).build().unwrap();
        chaos.enable();
        let body = Mutex::new(Some(body));
        let svc = chaos.stream_layer().layer(service_fn(move |_: ()| {
            let b = body.lock().unwrap().take().unwrap();
            std::future::ready(Ok::<_, Infallible>(
                http::Response::builder().status(status).body(b).unwrap(),
            ))
        }));
        svc.oneshot(()).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn cut_at_exactly_the_body_length_and_past_it() {
        // Exactly 3 chunks, cut after 3: the cut happens (an error after the
        // third chunk), read the hyper way.
        let res = through(Fault::cut_stream(3), 200, frames(3, false)).await;
        assert_eq!(hyper_read(res.into_body()).await, (3, false, true));
        // 2 chunks, cut after 3: ends as it would.
        let res = through(Fault::cut_stream(3), 200, frames(2, false)).await;
        assert_eq!(hyper_read(res.into_body()).await, (2, false, false));
        // Trailers before the cut point pass; after it, they are lost.
        let res = through(Fault::cut_stream(3), 200, frames(2, true)).await;
        assert_eq!(hyper_read(res.into_body()).await, (2, true, false));
        let res = through(Fault::cut_stream(2), 200, frames(2, true)).await;
        assert_eq!(hyper_read(res.into_body()).await, (2, false, true));
        let res = through(Fault::cut_stream(u32::MAX), 200, frames(10, true)).await;
        assert_eq!(hyper_read(res.into_body()).await, (10, true, false));
    }

    #[tokio::test(start_paused = true)]
    async fn empty_and_full_bodies_and_non_2xx_are_read_the_hyper_way() {
        // An empty body is over before a chunk: nothing to cut.
        let res = through(Fault::cut_stream(1), 200, Empty::<Bytes>::new()).await;
        assert!(res.body().is_end_stream());
        assert_eq!(hyper_read(res.into_body()).await, (0, false, false));
        let res = through(Fault::stall_stream(1), 200, Empty::<Bytes>::new()).await;
        assert_eq!(hyper_read(res.into_body()).await, (0, false, false));
        // A 5xx stream is never cut.
        let res = through(Fault::cut_stream(1), 503, frames(4, false)).await;
        assert_eq!(hyper_read(res.into_body()).await, (4, false, false));
        // A Full body past its cut point: the cut.
        let res = through(Fault::cut_stream(1), 200, Full::new(Bytes::from("abc"))).await;
        // With a fault drawn, no exact size is promised (hyper would send a
        // content-length and then cut).
        assert!(res.body().size_hint().exact().is_none());
        assert_eq!(hyper_read(res.into_body()).await, (1, false, true));
        // A Full body with a cut past its end: untouched, exact size dropped.
        let res = through(Fault::cut_stream(2), 200, Full::new(Bytes::from("abc"))).await;
        assert_eq!(hyper_read(res.into_body()).await, (1, false, false));
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_stream_chaos_keeps_the_exact_size_and_end() {
        let chaos: Chaos<http::Response<ChaosBody<Full<Bytes>>>> = Chaos::builder()
            .fault(Fault::cut_stream(1))
            .build()
            .unwrap();
        let svc = chaos.stream_layer().layer(service_fn(|_: ()| {
            std::future::ready(Ok::<_, Infallible>(http::Response::new(Full::new(
                Bytes::from("abc"),
            ))))
        }));
        let res = svc.oneshot(()).await.unwrap();
        assert_eq!(res.body().size_hint().exact(), Some(3));
        assert_eq!(hyper_read(res.into_body()).await, (1, false, false));
    }

    #[tokio::test(start_paused = true)]
    async fn an_injected_response_through_the_stream_layer_is_whole() {
        let chaos: Chaos<http::Response<ChaosBody<Full<Bytes>>>> = Chaos::builder()
            .fault(Fault::respond(semaforo::chaos::overloaded::<
                ChaosBody<Full<Bytes>>,
            >()))
            .fault(Fault::cut_stream(1))
            .build()
            .unwrap();
        chaos.enable();
        let svc = chaos.stream_layer().layer(service_fn(|_: ()| {
            std::future::ready(Ok::<_, Infallible>(http::Response::new(Full::new(
                Bytes::from("abc"),
            ))))
        }));
        let res = svc.oneshot(()).await.unwrap();
        assert_eq!(res.status(), 529);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"{\"type\":\"error\""));
    }
}

// ───────────────────────────── LLM preset ─────────────────────────────

mod llm {
    use super::*;
    use semaforo::llm::{LlmCache, LlmStack, Tier};
    use semaforo::share::Served;

    const TIER: Tier = Tier {
        requests_per_minute: 10_000,
        tokens_per_minute: 10_000_000,
    };

    fn cache() -> LlmCache {
        Cache::builder()
            .ttl(Duration::from_secs(5))
            .stale_for(Duration::from_secs(86_400))
            .build()
            .unwrap()
    }

    fn ask(topic: usize) -> http::Request<Bytes> {
        http::Request::post("/v1/chat/completions")
            .header("authorization", "Bearer sk-attack")
            .body(Bytes::from(format!(
                r#"{{"model":"gpt-4o-mini","temperature":0,"max_tokens":20,"messages":[{{"role":"user","content":"topic {topic}"}}]}}"#
            )))
            .unwrap()
    }

    /// A provider answering 200 while `status` is 200, else that status
    /// (529: Anthropic's `overloaded_error` body).
    fn provider(
        status: &Arc<AtomicU64>,
        calls: &Arc<AtomicUsize>,
    ) -> impl Service<
        http::Request<Bytes>,
        Response = http::Response<Bytes>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        let (status, calls) = (status.clone(), calls.clone());
        service_fn(move |_req: http::Request<Bytes>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let s = status.load(Ordering::SeqCst) as u16;
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let body = if s == 200 {
                    format!(
                        r#"{{"id":"msg-{n}","choices":[{{"message":{{"content":"plan"}}}}],"usage":{{"prompt_tokens":5,"completion_tokens":20,"total_tokens":25}}}}"#
                    )
                } else if s == 529 {
                    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
                        .to_string()
                } else {
                    r#"{"error":{"message":"bad gateway","type":"server_error"}}"#.to_string()
                };
                Ok(http::Response::builder()
                    .status(s)
                    .header("content-type", "application/json")
                    .body(Bytes::from(body))
                    .unwrap())
            }
        })
    }

    #[test]
    fn stale_if_error_without_a_cache_is_a_config_error() {
        let e = LlmStack::openai(TIER)
            .stale_if_error(true)
            .build()
            .unwrap_err();
        assert_eq!(e.field, "stale_if_error");
        // Off without a cache, and on with one: fine.
        assert!(LlmStack::openai(TIER).stale_if_error(false).build().is_ok());
        assert!(LlmStack::openai(TIER)
            .cache(cache())
            .stale_if_error(true)
            .build()
            .is_ok());
        // Given twice, the last word wins.
        assert!(LlmStack::openai(TIER)
            .stale_if_error(true)
            .stale_if_error(false)
            .build()
            .is_ok());
    }

    // Found by the outside attack (fixed since): `stale_if_error(true)` is refused without a cache, but
    // accepted with a cache that keeps nothing past its TTL (the cache's
    // default `stale_for` is 0). Such a stack can never answer stale: past
    // the TTL the entry is gone for `Cache::stale` too, so the option is
    // silently a no-op. Expected: a ConfigError (like the no-cache case) —
    // or at least a stale answer. Actual: `build()` is Ok and a 529 after the
    // TTL reaches the caller. src/llm/mod.rs `build` (checks only
    // `self.cache.is_none()`).
    #[tokio::test(start_paused = true)]
    async fn stale_if_error_with_a_cache_that_keeps_nothing_stale_is_refused_or_works() {
        let no_stale: LlmCache = Cache::builder()
            .ttl(Duration::from_secs(5))
            .build()
            .unwrap();
        let built = LlmStack::openai(TIER)
            .cache(no_stale)
            .stale_if_error(true)
            .build();
        let Ok(stack) = built else { return }; // refused: fine
        let status = Arc::new(AtomicU64::new(200));
        let calls = Arc::new(AtomicUsize::new(0));
        let llm = stack.layer().layer(provider(&status, &calls));
        assert_eq!(llm.clone().oneshot(ask(1)).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_secs(10)).await;
        status.store(529, Ordering::SeqCst);
        let res = llm.oneshot(ask(1)).await;
        let stale = matches!(&res, Ok(r) if r.extensions().get::<FellBack>().is_some());
        assert!(
            stale,
            "built without a ConfigError, yet no stale answer: {:?}",
            res.map(|r| r.status())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_if_error_under_coalescing_10_identical_failing_calls_all_get_the_stale_answer() {
        let status = Arc::new(AtomicU64::new(200));
        let calls = Arc::new(AtomicUsize::new(0));
        let c = cache();
        let stack = LlmStack::openai(TIER)
            .cache(c.clone())
            .coalesce(true)
            .stale_if_error(true)
            .build()
            .unwrap();
        let llm = stack.layer().layer(provider(&status, &calls));
        let first = llm.clone().oneshot(ask(1)).await.unwrap();
        assert_eq!(first.status(), 200);
        let good = first.into_body();
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        tokio::time::sleep(Duration::from_secs(10)).await; // past the TTL
        status.store(529, Ordering::SeqCst);
        let all = futures::future::join_all((0..10).map(|_| llm.clone().oneshot(ask(1)))).await;
        let upstream_during = calls.load(Ordering::SeqCst) - 1;
        for r in all {
            let res = r.unwrap();
            assert_eq!(res.status(), 200);
            assert!(res.extensions().get::<FellBack>().is_some());
            assert!(
                matches!(
                    res.extensions().get::<Served>(),
                    Some(Served::Cache { stale: true, .. })
                ),
                "{:?}",
                res.extensions().get::<Served>()
            );
            assert_eq!(res.body(), &good);
            let age: u64 = res.headers()["age"].to_str().unwrap().parse().unwrap();
            assert!((10..=60).contains(&age), "age {age}");
        }
        assert!(
            (1..=4).contains(&upstream_during),
            "one coalesced flight (with its retries): {upstream_during}"
        );
        // Never cached back.
        let k = semaforo::share::RequestKey::key(&semaforo::llm::LlmKey::new(), &ask(1)).unwrap();
        assert!(c.get(&k).is_none());
        // A request the cache never saw: the original failure, unchanged
        // (the breaker is open by now: its refusal).
        match llm.clone().oneshot(ask(2)).await {
            Ok(res) => {
                assert_eq!(res.status(), 529);
                assert!(res.extensions().get::<FellBack>().is_none());
            }
            Err(e) => assert_eq!(Rejected::find(&*e).unwrap().kind(), RejectKind::CircuitOpen),
        }
        // `no-store`: no key, no stale answer.
        let mut req = ask(1);
        req.headers_mut()
            .insert("cache-control", http::HeaderValue::from_static("no-store"));
        if let Ok(res) = llm.oneshot(req).await {
            assert!(res.extensions().get::<FellBack>().is_none());
        }
    }

    // Found by the outside attack (fixed since): `stale_if_error` cites RFC 5861 ("stale-if-error"), whose
    // "error" is any situation that would give a 500, 502, 503 or 504. The
    // preset's fallback uses `DefaultWhen`, which answers only `Overloaded`
    // and `Infrastructure` (and open breaker/full line/budget refusals); a
    // 500/502/504 from the upstream (or an attempt timeout) is `Transient`,
    // so after the retries the caller gets the 502 although a last good
    // answer is kept. Expected: the stale answer (200, `FellBack`). Actual:
    // the 502. src/llm/mod.rs `build` (`FallbackLayer::new(stale)` with the
    // default rule) / src/fallback/mod.rs `DefaultWhen::when`.
    #[tokio::test(start_paused = true)]
    async fn stale_if_error_answers_a_502_as_rfc_5861_says() {
        let status = Arc::new(AtomicU64::new(200));
        let calls = Arc::new(AtomicUsize::new(0));
        let stack = LlmStack::openai(TIER)
            .cache(cache())
            .stale_if_error(true)
            .build()
            .unwrap();
        let llm = stack.layer().layer(provider(&status, &calls));
        assert_eq!(llm.clone().oneshot(ask(1)).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_secs(10)).await;
        status.store(502, Ordering::SeqCst);
        let res = llm.oneshot(ask(1)).await.unwrap();
        assert_eq!(
            (
                res.status().as_u16(),
                res.extensions().get::<FellBack>().is_some()
            ),
            (200, true),
            "a kept answer exists, the upstream says 502"
        );
    }

    /// `tests/drill.rs`'s assertions, as a check of one run.
    fn drill_holds(d: &drill::Drill) -> Result<(), String> {
        use drill::What;
        use semaforo::observe::BreakerState;
        let secs = Duration::from_secs_f64;
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("{what}: {:?}", d.timeline))
            }
        };
        check(
            d.first(&What::OutageStarts) == Some(secs(60.0)),
            "outage start",
        )?;
        check(d.first(&What::OutageEnds) == Some(secs(90.0)), "outage end")?;
        let opened = d
            .first(&What::Breaker(BreakerState::Open))
            .ok_or("never opened")?;
        check(opened >= secs(60.0) && opened <= secs(61.0), "opened")?;
        let reduced = d
            .first(&What::Level(Level::Reduced))
            .ok_or("never reduced")?;
        check(
            reduced >= opened + drill::REDUCED_AFTER && reduced <= secs(65.0),
            "reduced",
        )?;
        let outage = d.between(60, 90);
        check(outage.failed == 0, &format!("outage failed {outage:?}"))?;
        check(
            outage.stale + outage.real == 150,
            &format!("outage {outage:?}"),
        )?;
        let open = d.between(61, 89);
        check(
            open.stale + open.real == 140 && open.stale >= 135,
            &format!("open {open:?}"),
        )?;
        check(
            d.between(61, 85).stale == 120,
            &format!("61..85 {:?}", d.between(61, 85)),
        )?;
        check(d.injected <= 10, &format!("injected {}", d.injected))?;
        let closed = d
            .first(&What::Breaker(BreakerState::Closed))
            .ok_or("never closed")?;
        check(
            closed >= secs(90.0) && closed <= opened + drill::OPEN_FOR + secs(0.7),
            "closed",
        )?;
        let normal = d.first(&What::Level(Level::Normal)).ok_or("never normal")?;
        check(
            normal >= closed + drill::NORMAL_AFTER
                && normal <= closed + drill::NORMAL_AFTER + drill::EVERY,
            "normal",
        )?;
        let levels = d
            .timeline
            .iter()
            .filter(|(_, w)| matches!(w, What::Level(_)))
            .count();
        check(levels == 2, "two level changes")?;
        let all = d.between(0, 150);
        check(
            all.failed == 0 && all.real + all.stale == 750,
            &format!("all {all:?}"),
        )?;
        check(d.between(100, 150).stale == 0, "stale after 100 s")?;
        Ok(())
    }

    /// The drill's own test, over many runs (the preset's retry jitter is
    /// not seeded, so each run differs): the asserted timeline must hold
    /// for every one of them, or `tests/drill.rs` is flaky.
    #[tokio::test(start_paused = true)]
    async fn the_drill_timeline_holds_over_40_runs() {
        let mut bad = Vec::new();
        for run in 0..40 {
            let d = drill::run().await.unwrap();
            if let Err(e) = drill_holds(&d) {
                bad.push(format!("run {run}: {e}"));
            }
        }
        assert!(
            bad.is_empty(),
            "{} of 40 runs broke the drill's assertions:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }
}

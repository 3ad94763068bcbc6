//! The degradation switch: scripted signals on paused time, hysteresis,
//! manual overrides, what it tells.

use semaforo::degrade::{Degrade, Level, LevelReason, Rule};
use semaforo::observe::EventKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{sleep, Instant};

fn flag() -> (Arc<AtomicBool>, impl Fn() -> bool + Send + Sync + 'static) {
    let f = Arc::new(AtomicBool::new(false));
    let g = f.clone();
    (f, move || g.load(Ordering::SeqCst))
}

type Changes = Arc<Mutex<Vec<(u64, Level, Level, LevelReason)>>>;

fn recorder(
    start: Instant,
) -> (
    Changes,
    impl Fn(&semaforo::observe::Event<'_>) + Send + Sync,
) {
    let changes: Changes = Arc::default();
    let c = changes.clone();
    (changes, move |e: &semaforo::observe::Event<'_>| {
        if let EventKind::LevelChanged { from, to, reason } = e.kind {
            c.lock()
                .unwrap()
                .push((start.elapsed().as_secs(), from, to, reason));
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_scripted_signal_gives_exactly_the_expected_changes() {
    let start = Instant::now();
    let (changes, listener) = recorder(start);
    let (reduced, reduced_signal) = flag();
    let (minimal, minimal_signal) = flag();
    let switch = Degrade::builder()
        .rule(
            Rule::new(Level::Reduced, reduced_signal)
                .after(Duration::from_secs(3))
                .recover_after(Duration::from_secs(10)),
        )
        .rule(
            Rule::new(Level::Minimal, minimal_signal)
                .after(Duration::from_secs(5))
                .recover_after(Duration::from_secs(5)),
        )
        .on_event(listener)
        .build()
        .unwrap();
    let _task = switch.spawn().unwrap();
    // The script, one step a second: (from, to, reduced, minimal).
    let script: &[(u64, u64, bool, bool)] = &[
        (0, 10, false, false),
        (10, 40, true, false),   // Reduced from 10 + 3 = 13
        (40, 50, true, true),    // Minimal from 40 + 5 = 45
        (50, 60, true, false),   // back to Reduced at 50 + 5 = 55
        (60, 100, false, false), // Normal at 60 + 10 = 70
    ];
    for &(from, to, r, m) in script {
        reduced.store(r, Ordering::SeqCst);
        minimal.store(m, Ordering::SeqCst);
        sleep(Duration::from_secs(to - from)).await;
    }
    // The interval ticks at 0, 1, 2 …: a signal set at t is seen at t.
    assert_eq!(
        *changes.lock().unwrap(),
        vec![
            (13, Level::Normal, Level::Reduced, LevelReason::Rules),
            (45, Level::Reduced, Level::Minimal, LevelReason::Rules),
            (55, Level::Minimal, Level::Reduced, LevelReason::Rules),
            (70, Level::Reduced, Level::Normal, LevelReason::Rules),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_signal_oscillating_around_its_threshold_does_not_flap() {
    let start = Instant::now();
    let (changes, listener) = recorder(start);
    let (on, signal) = flag();
    let switch = Degrade::builder()
        .rule(
            Rule::new(Level::Reduced, signal)
                .after(Duration::from_secs(3))
                .recover_after(Duration::from_secs(10)),
        )
        .on_event(listener)
        .build()
        .unwrap();
    let _task = switch.spawn().unwrap();
    // On 2 s, off 1 s, for 5 minutes: never 3 s in a row.
    for _ in 0..100 {
        on.store(true, Ordering::SeqCst);
        sleep(Duration::from_secs(2)).await;
        on.store(false, Ordering::SeqCst);
        sleep(Duration::from_secs(1)).await;
    }
    assert!(changes.lock().unwrap().is_empty());
    // Once active, an oscillation with gaps shorter than 10 s keeps it.
    on.store(true, Ordering::SeqCst);
    sleep(Duration::from_secs(4)).await;
    assert_eq!(switch.level(), Level::Reduced);
    for _ in 0..100 {
        on.store(false, Ordering::SeqCst);
        sleep(Duration::from_secs(9)).await;
        on.store(true, Ordering::SeqCst);
        sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(changes.lock().unwrap().len(), 1, "one change in 1,000 s");
    assert_eq!(switch.level(), Level::Reduced);
}

#[tokio::test(start_paused = true)]
async fn a_manual_override_wins_until_released_or_expired() {
    let start = Instant::now();
    let (changes, listener) = recorder(start);
    let (on, signal) = flag();
    let switch = Degrade::builder()
        .rule(Rule::new(Level::Reduced, signal).recover_after(Duration::from_secs(2)))
        .on_event(listener)
        .build()
        .unwrap();
    let _task = switch.spawn().unwrap();
    sleep(Duration::from_millis(500)).await;
    switch.set(Level::Normal);
    on.store(true, Ordering::SeqCst);
    sleep(Duration::from_secs(10)).await;
    assert_eq!(switch.level(), Level::Normal, "the override wins");
    assert_eq!(switch.rules_level(), Level::Reduced);
    switch.release(); // t = 10.5
    assert_eq!(switch.level(), Level::Reduced);
    switch.set_for(Level::Minimal, Duration::from_secs(20)); // until 30.5
    sleep(Duration::from_secs(19)).await;
    assert_eq!(switch.level(), Level::Minimal);
    sleep(Duration::from_secs(1)).await;
    // Read at 30.5: expired, the rules again.
    assert_eq!(switch.level(), Level::Reduced);
    assert_eq!(switch.manual(), None);
    assert_eq!(
        *changes.lock().unwrap(),
        vec![
            (10, Level::Normal, Level::Reduced, LevelReason::Released),
            (10, Level::Reduced, Level::Minimal, LevelReason::Manual),
            (
                30,
                Level::Minimal,
                Level::Reduced,
                LevelReason::OverrideExpired
            ),
        ]
    );
    // No reader: the task notices the expiry too.
    switch.set_for(Level::Minimal, Duration::from_millis(1500));
    sleep(Duration::from_secs(3)).await;
    assert_eq!(changes.lock().unwrap().len(), 5);
    assert_eq!(changes.lock().unwrap()[4].3, LevelReason::OverrideExpired);
}

#[tokio::test(start_paused = true)]
async fn the_rules_over_our_own_layers_and_what_it_tells() {
    use semaforo::breaker::Breaker;
    use semaforo::degrade;
    use tower::{service_fn, Layer, ServiceExt};
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(30))
        .build()
        .unwrap();
    let switch = Degrade::builder()
        .name("plans")
        .rule(
            Rule::new(Level::Reduced, degrade::breaker_open(&breaker))
                .after(Duration::from_secs(4))
                .recover_after(Duration::from_secs(5)),
        )
        .build()
        .unwrap();
    let _task = switch.spawn().unwrap();
    let failing = breaker.layer().layer(service_fn(|_: ()| async {
        Err::<(), _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }));
    let opened = Instant::now();
    assert!(failing.oneshot(()).await.is_err());
    let health = semaforo::health::Health::new(&semaforo::shutdown::Shutdown::new())
        .degrade("plans", &switch);
    sleep(Duration::from_millis(3900)).await;
    assert_eq!(switch.level(), Level::Normal);
    sleep(Duration::from_millis(200)).await;
    assert_eq!(
        switch.level(),
        Level::Reduced,
        "open at the tick of t = 0, Reduced at the tick of t = 4"
    );
    let report = health.report();
    let c = report
        .components
        .iter()
        .find(|c| c.kind == "degrade")
        .unwrap();
    assert_eq!(c.status, semaforo::health::Status::Degraded);
    assert_eq!(c.details[0], ("level", 1.0));
    // The breaker half-opens at 30 s (nothing calls, so it stays half-open:
    // still not closed) — reset it: closed from 40 s, Normal 5 s later.
    sleep_until(opened, 40).await;
    breaker.reset();
    sleep_until(opened, 44).await;
    assert_eq!(switch.level(), Level::Reduced);
    sleep_until(opened, 46).await;
    assert_eq!(switch.level(), Level::Normal);
}

async fn sleep_until(start: Instant, secs: u64) {
    tokio::time::sleep_until(start + Duration::from_secs(secs)).await;
}

#[test]
fn the_builder_refuses_a_zero_interval() {
    let e = Degrade::builder()
        .every(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!((e.component, e.field), ("degrade", "every"));
}

#[tokio::test(start_paused = true)]
async fn the_task_ends_with_the_last_handle() {
    let switch = Degrade::builder().build().unwrap();
    let task = switch.spawn().unwrap();
    sleep(Duration::from_secs(3)).await;
    assert!(!task.is_finished());
    drop(switch);
    sleep(Duration::from_secs(2)).await;
    assert!(task.is_finished());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Against a model: the rule is active once its signal has held at
        /// every evaluation for `after`, inactive once it has been absent
        /// for `recover_after`; the level changes only then.
        #[test]
        fn the_level_follows_the_hysteresis_model(
            steps in proptest::collection::vec(any::<bool>(), 1..200),
            after in 0u64..6,
            recover in 0u64..6,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
            rt.block_on(async {
                let (on, signal) = flag();
                let switch = Degrade::builder()
                    .rule(Rule::new(Level::Minimal, signal)
                        .after(Duration::from_secs(after))
                        .recover_after(Duration::from_secs(recover)))
                    .build()
                    .unwrap();
                let (mut active, mut since): (bool, Option<u64>) = (false, None);
                for (t, &s) in steps.iter().enumerate() {
                    let t = t as u64;
                    on.store(s, Ordering::SeqCst);
                    let got = switch.evaluate();
                    if s == active {
                        since = None;
                    } else {
                        let from = *since.get_or_insert(t);
                        let wait = if active { recover } else { after };
                        if t - from >= wait {
                            active = s;
                            since = None;
                        }
                    }
                    let want = if active { Level::Minimal } else { Level::Normal };
                    prop_assert_eq!(got, want, "step {}", t);
                    tokio::time::advance(Duration::from_secs(1)).await;
                }
                Ok(())
            })?;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_listener_and_a_signal_may_read_the_switch() {
    // Weak handles: a `Degrade` inside its own listener would keep it alive.
    let cell: Arc<std::sync::OnceLock<semaforo::degrade::WeakDegrade>> = Arc::default();
    let (c1, c2) = (cell.clone(), cell.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let switch = Degrade::builder()
        // Minimal once Reduced has been in force for 2 s (a signal reading
        // the switch itself).
        .rule(
            Rule::new(Level::Minimal, move || {
                c1.get()
                    .and_then(|w| w.upgrade())
                    .is_some_and(|d| d.manual().is_some() && d.level() >= Level::Reduced)
            })
            .after(Duration::from_secs(2)),
        )
        .on_event(move |_| {
            if let Some(d) = c2.get().and_then(|w| w.upgrade()) {
                s.lock().unwrap().push((d.level(), d.manual().map(|m| m.0)));
            }
        })
        .build()
        .unwrap();
    assert!(cell.set(switch.downgrade()).is_ok());
    switch.set(Level::Reduced);
    for _ in 0..3 {
        switch.evaluate();
        sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(switch.rules_level(), Level::Minimal);
    switch.release();
    assert_eq!(switch.level(), Level::Minimal);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (Level::Reduced, Some(Level::Reduced)),
            (Level::Minimal, None)
        ]
    );
}

#[test]
fn spawn_outside_a_runtime_is_an_error_not_a_panic() {
    let switch = Degrade::builder().build().unwrap();
    assert!(switch.spawn().is_err());
}

/// A forced-open breaker refuses whatever its state machine says: the
/// signal holds (found by a newcomer: `state()` stays `Closed`).
#[tokio::test(start_paused = true)]
async fn a_forced_open_breaker_is_open_for_the_rules() {
    let breaker = semaforo::breaker::Breaker::builder().build().unwrap();
    let switch = Degrade::builder()
        .rule(
            Rule::new(Level::Reduced, semaforo::degrade::breaker_open(&breaker))
                .after(Duration::from_secs(5))
                .recover_after(Duration::from_secs(2)),
        )
        .build()
        .unwrap();
    breaker.force_open();
    for _ in 0..5 {
        assert_eq!(switch.evaluate(), Level::Normal);
        sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(switch.evaluate(), Level::Reduced, "forced open for 5 s");
    breaker.reset();
    switch.evaluate();
    sleep(Duration::from_secs(2)).await;
    assert_eq!(switch.evaluate(), Level::Normal);
}

#[tokio::test(start_paused = true)]
async fn a_change_made_by_a_listener_is_told_after_the_one_it_heard() {
    let weak: Arc<std::sync::OnceLock<semaforo::degrade::WeakDegrade>> = Arc::default();
    let w = weak.clone();
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let switch = Degrade::builder()
        // The first listener undoes a manual `Reduced` at once …
        .on_event(move |e| {
            if let EventKind::LevelChanged {
                to: Level::Reduced, ..
            } = e.kind
            {
                if let Some(d) = w.get().and_then(|w| w.upgrade()) {
                    d.release();
                }
            }
        })
        // … the second hears both changes, in the order they were made.
        .on_event(move |e| {
            if let EventKind::LevelChanged { to, reason, .. } = e.kind {
                o.lock().unwrap().push((to, reason));
            }
        })
        .build()
        .unwrap();
    assert!(weak.set(switch.downgrade()).is_ok());
    switch.set(Level::Reduced);
    assert_eq!(switch.level(), Level::Normal);
    assert_eq!(
        *order.lock().unwrap(),
        vec![
            (Level::Reduced, LevelReason::Manual),
            (Level::Normal, LevelReason::Released)
        ]
    );
    // The spawned task ends as soon as the last handle goes, not at its
    // next tick an hour later.
    let slow = Degrade::builder()
        .every(Duration::from_secs(3600))
        .build()
        .unwrap();
    let task = slow.spawn().unwrap();
    tokio::task::yield_now().await;
    drop(slow);
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// `DegradeLayer`'s future dropped while the inner call waits: the inner
/// call goes with it.
#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn a_dropped_degrade_future_drops_the_inner_call() {
    use futures::FutureExt;
    use semaforo::degrade::DegradeLayer;
    use tower::{Layer, Service, ServiceExt};
    struct Tracked(Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d = drops.clone();
    let switch = Degrade::builder().build().unwrap();
    let mut svc =
        DegradeLayer::new(&switch).layer(tower::service_fn(move |_: http::Request<()>| {
            let t = Tracked(d.clone());
            async move {
                let _t = t;
                sleep(Duration::from_secs(10)).await;
                Ok::<_, std::io::Error>(http::Response::new(()))
            }
        }));
    let mut fut = Box::pin(svc.ready().await.unwrap().call(http::Request::new(())));
    assert!((&mut fut).now_or_never().is_none());
    drop(fut);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

/// `pace_wait_above` reads when a typical call coming now would start: a
/// pacer whose cells are spent ahead of now (60 calls of a 60-a-minute
/// burst) holds a next call back by 1 s with nobody in line and no pause;
/// the signal holds for any `wait` under that and not above, and stops
/// holding once the debt is paid.
#[tokio::test(start_paused = true)]
async fn pace_wait_above_sees_the_cells_debt_with_nobody_in_line() {
    use semaforo::degrade::{pace_wait_above, Signal};
    use semaforo::pace::Pace;
    use tower::{Layer, ServiceExt};
    let pace = Pace::builder().requests_per_minute(60).build().unwrap();
    let svc = pace.layer().layer(tower::service_fn(|_: u32| async {
        Ok::<_, std::io::Error>(0u32)
    }));
    for i in 0..60 {
        svc.clone().oneshot(i).await.unwrap();
    }
    let snap = pace.snapshot();
    assert_eq!(
        (snap.waiting, snap.next_start, snap.paused_until),
        (0, None, None)
    );
    assert!(pace_wait_above(&pace, Duration::from_millis(900)).holds());
    assert!(!pace_wait_above(&pace, Duration::from_millis(1_100)).holds());
    sleep(Duration::from_secs(1)).await;
    assert!(!pace_wait_above(&pace, Duration::ZERO).holds());
}

/// … and holds while a typical call would be refused for the pacer's own
/// `max_wait`: 1 call a second, `max_wait` 5 s, 5 calls waiting (the next
/// one would start 6 s out): refused at once, so the signal holds for a
/// `wait` of 10 s.
#[tokio::test(start_paused = true)]
async fn pace_wait_above_holds_while_calls_are_refused_for_max_wait() {
    use semaforo::degrade::{pace_wait_above, Signal};
    use semaforo::pace::{Limit, Pace};
    use tower::{Layer, ServiceExt};
    let pace = Pace::builder()
        .limit(Limit::requests_per_minute(60).burst(1))
        .max_wait(Duration::from_secs(5))
        .build()
        .unwrap();
    let svc = pace.layer().layer(tower::service_fn(|_: u32| async {
        Ok::<_, std::io::Error>(0u32)
    }));
    let signal = pace_wait_above(&pace, Duration::from_secs(10));
    assert!(!signal.holds());
    svc.clone().oneshot(0).await.unwrap();
    let mut line = Vec::new();
    for i in 1..=5 {
        line.push(tokio::spawn(svc.clone().oneshot(i)));
    }
    tokio::task::yield_now().await;
    assert_eq!(pace.snapshot().waiting, 5);
    let refused = svc.clone().oneshot(9).await.unwrap_err();
    assert!(refused.to_string().contains("max_wait"), "{refused}");
    assert!(signal.holds(), "calls are refused at once");
    for l in line {
        l.await.unwrap().unwrap();
    }
    assert!(!signal.holds());
}

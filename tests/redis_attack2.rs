//! Outside tester's attack on the Redis fleet features (budget pause,
//! refunds, lease semaphore, failure policies). Real time: Redis `TIME` is the
//! clock. Each test quotes the doc line it checks.
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;

use redis_server::RedisServer;
use semaforo::breaker::BreakerState;
use semaforo::classify::{Class, ClassError, ErrorClassifier};
use semaforo::pace::{Cost, Limit, Pace, PaceBuilder, Unit};
use semaforo::redis::{Budget, FailurePolicy, Grant, RedisBackend, Semaphore};
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{service_fn, Layer, ServiceExt};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

async fn setup() -> Option<(tokio::sync::MutexGuard<'static, ()>, RedisServer)> {
    let turn = SERIAL.lock().await;
    let server = RedisServer::start()?;
    Some((turn, server))
}

async fn backend(server: &RedisServer) -> RedisBackend {
    RedisBackend::connect(server.url()).await.expect("connects")
}

/// 10 requests a second, burst 10.
fn ten_per_second() -> PaceBuilder {
    Pace::builder().limit(Limit::new(Unit::Requests, 10, Duration::from_secs(1)))
}

/// 1 request a second, burst 1.
fn one_per_second() -> PaceBuilder {
    Pace::builder().limit(Limit::new(Unit::Requests, 1, Duration::from_secs(1)).burst(1))
}

fn budget(b: &RedisBackend, name: &str, limits: PaceBuilder) -> Budget {
    Budget::builder(b, name, limits).build().expect("a budget")
}

async fn wait_of(budget: &Budget, key: Option<&str>) -> Duration {
    match budget.reserve(key, &Cost::requests(1)).await {
        Ok(Grant::Redis(w)) => w,
        other => panic!("expected a Redis grant, got {other:?}"),
    }
}

fn throttling(
    retry_after: Option<Duration>,
) -> impl tower::Service<u64, Response = u64, Error = BoxError, Future = impl Send> + Clone + Send {
    service_fn(move |_: u64| async move {
        Err::<u64, BoxError>(ClassError::new(Class::Throttled { retry_after }, "429").into())
    })
}

fn within(d: Duration, lo: Duration, hi: Duration) -> bool {
    (lo..=hi).contains(&d)
}

// ---------------------------------------------------------------------------
// Budget::pause: zero, tiny, huge
// ---------------------------------------------------------------------------

/// "Pauses the budget ... no reservation made from now on starts before
/// `pause` has passed" / "# Errors The Redis error when the pause could not
/// be set". A zero or sub-millisecond pause is a legal Duration: it must not
/// be an error, must not hold anyone back noticeably, and must never open the
/// backend's shared breaker ("A Redis error reply ... does not open the
/// breaker the other budgets and semaphores share").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_tiny_pauses_are_no_ops() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let b = budget(&redis, "pz", ten_per_second());
    for d in [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_micros(1),
        Duration::from_micros(999),
    ] {
        for key in [None, Some("k")] {
            b.pause(key, d)
                .await
                .unwrap_or_else(|e| panic!("pause({key:?}, {d:?}): {e}"));
        }
    }
    assert_eq!(redis.breaker().snapshot().state, BreakerState::Closed);
    let w = wait_of(&b, None).await;
    assert!(
        w <= Duration::from_millis(2),
        "waits {w:?} after tiny pauses"
    );
    let w = wait_of(&b, Some("k")).await;
    assert!(
        w <= Duration::from_millis(2),
        "keyed waits {w:?} after tiny pauses"
    );
}

/// "A pause is capped at 100 years." + "`BudgetExceeded` with the exact
/// `retry_after` when the wait would pass `max_wait`" + "a longer pause
/// already set stays".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_of_duration_max_is_capped_at_a_hundred_years() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let free = budget(&redis, "ph", ten_per_second());
    let waiting = budget(
        &redis,
        "ph",
        ten_per_second().max_wait(Duration::from_secs(5)),
    );
    for key in [None, Some("tenant")] {
        free.pause(key, Duration::MAX)
            .await
            .expect("a huge pause is set (capped)");
        // A shorter one afterwards leaves it.
        free.pause(key, Duration::from_secs(1)).await.unwrap();
        let w = wait_of(&free, key).await;
        assert!(
            within(
                w,
                100 * YEAR - Duration::from_secs(10),
                100 * YEAR + 25 * 24 * 3600 * Duration::from_secs(1)
            ),
            "{key:?}: waits {w:?} ({} years)",
            w.as_secs_f64() / YEAR.as_secs_f64()
        );
        let r = waiting.reserve(key, &Cost::requests(1)).await.unwrap_err();
        assert_eq!(r.kind(), RejectKind::BudgetExceeded, "{r}");
        let ra = r.retry_after().expect("a retry_after");
        assert!(
            within(
                ra,
                100 * YEAR - Duration::from_secs(20),
                100 * YEAR + 25 * 24 * 3600 * Duration::from_secs(1)
            ),
            "{key:?}: retry_after {ra:?}"
        );
    }
    assert_eq!(redis.breaker().snapshot().state, BreakerState::Closed);
}

/// The layer: "for its `retry_after` (1 s without one, at most 60 s: the
/// local pacer's rule), before the answer is handed on". A 429 with a
/// `Retry-After: 0` must hand the 429 on and leave the budget usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_a_zero_retry_after_is_handed_on_and_breaks_nothing() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let a = budget(&redis, "p0", ten_per_second());
    for _ in 0..5 {
        let svc = a
            .layer()
            .classify(ErrorClassifier)
            .layer(throttling(Some(Duration::ZERO)));
        let e = svc.oneshot(1).await.unwrap_err();
        assert!(
            e.to_string().contains("429"),
            "the answer is handed on: {e}"
        );
    }
    assert_eq!(redis.breaker().snapshot().state, BreakerState::Closed);
    let w = wait_of(&a, None).await;
    assert!(w <= Duration::from_secs(1), "waits {w:?}");
}

// ---------------------------------------------------------------------------
// Pause and the GCRA bound: "normal running | R · W + B"
// ---------------------------------------------------------------------------

/// Module docs: "normal running | admitted over any window W: R · W + B";
/// `Budget::pause`: "the cells are not emptied (they refill through the
/// pause)". A bucket refills to its burst, not beyond: when a 3 s pause
/// ends, at most B = 10 calls may start at once, then 10 a second.
async fn after_a_pause(drain_first: bool, keyed: bool) {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let (ra, rb) = (backend(&server).await, backend(&server).await);
    let a = budget(&ra, "pg", ten_per_second());
    let b = budget(&rb, "pg", ten_per_second());
    let key = keyed.then_some("user-1");
    if drain_first {
        for _ in 0..10 {
            wait_of(&a, key).await;
        }
    }
    a.pause(key, Duration::from_secs(3)).await.unwrap();
    let t0 = Instant::now();
    let mut starts = Vec::new();
    for i in 0..40 {
        let who = if i % 2 == 0 { &a } else { &b };
        let asked = t0.elapsed();
        let w = wait_of(who, key).await;
        starts.push(asked + w);
    }
    starts.sort();
    let first = starts[0];
    assert!(
        first >= Duration::from_millis(2_900),
        "first start {first:?}"
    );
    // Count starts in each 50 ms window from each start: R·W + B = 10.5.
    let mut worst = 0;
    for (i, s) in starts.iter().enumerate() {
        let n = starts[i..]
            .iter()
            .take_while(|t| **t <= *s + Duration::from_millis(50))
            .count();
        worst = worst.max(n);
    }
    let at_resume = starts
        .iter()
        .filter(|t| **t <= first + Duration::from_millis(50))
        .count();
    assert!(
        worst <= 10,
        "{worst} starts within 50 ms ({at_resume} right at the pause's end; bound R·W+B = 10); starts: {:?}",
        starts.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
    // Over the whole run: 40 calls need at least (40-10)/10 = 3 s after the
    // first start.
    let last = *starts.last().unwrap();
    assert!(
        last >= first + Duration::from_millis(2_900),
        "40 starts from {first:?} to {last:?}: more than R·W + B"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_ends_with_one_burst_not_the_pauses_refill() {
    after_a_pause(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_after_a_drained_burst_ends_with_one_burst() {
    after_a_pause(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_pause_ends_with_one_burst() {
    after_a_pause(false, true).await;
}

// ---------------------------------------------------------------------------
// Pause and max_wait with a backlog: exact retry_after
// ---------------------------------------------------------------------------

/// "`BudgetExceeded` with the exact `retry_after` when the wait would pass
/// `max_wait`". When the cell's backlog ends after the pause, the wait is
/// the backlog's, and so is retry_after; when the pause ends later, the
/// pause's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_under_a_pause_counts_the_backlog_too() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let free = budget(&redis, "pr", one_per_second());
    let strict = budget(
        &redis,
        "pr",
        one_per_second().max_wait(Duration::from_secs(2)),
    );
    // Backlog: 8 reservations at 1/s, burst 1 → the next start ≈ 8 s away.
    for _ in 0..8 {
        wait_of(&free, None).await;
    }
    free.pause(None, Duration::from_secs(5)).await.unwrap();
    let r = strict.reserve(None, &Cost::requests(1)).await.unwrap_err();
    let ra = r.retry_after().expect("retry_after");
    assert!(
        within(ra, Duration::from_millis(5_500), Duration::from_secs(6)),
        "backlog 8 s, pause 5 s, max_wait 2 s: retry_after {ra:?} (want ≈ 6 s)"
    );
    // Now a pause longer than the backlog.
    free.pause(None, Duration::from_secs(20)).await.unwrap();
    let r = strict.reserve(None, &Cost::requests(1)).await.unwrap_err();
    let ra = r.retry_after().expect("retry_after");
    assert!(
        within(ra, Duration::from_millis(17_500), Duration::from_secs(18)),
        "backlog 8 s, pause 20 s, max_wait 2 s: retry_after {ra:?} (want ≈ 18 s)"
    );
    // And the free instance's next start is after both.
    let w = wait_of(&free, None).await;
    assert!(w >= Duration::from_millis(19_500), "waits {w:?}");
}

// ---------------------------------------------------------------------------
// A call dropped while it waits for a pause; close during a pause
// ---------------------------------------------------------------------------

/// Polls `probe` (max_wait 0: reserves nothing, answers the exact
/// retry_after) until its retry_after drops below `below`.
async fn until_next_start_below(probe: &Budget, below: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let ra = match probe.reserve(None, &Cost::requests(1)).await {
            Err(r) => r.retry_after().expect("retry_after"),
            Ok(g) => panic!("the probe reserved: {g:?}"),
        };
        if ra < below || t0.elapsed() > Duration::from_secs(10) {
            return ra;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Module docs: "A call through the layer that is dropped while it waits for
/// its start gives its reservation back (in the background), so the next
/// reservation is not held back by it." Here the wait is a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_dropped_while_it_waits_out_a_pause_gives_its_reservation_back() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let a = budget(&redis, "pd", one_per_second());
    let probe = budget(&redis, "pd", one_per_second().max_wait(Duration::ZERO));
    a.pause(None, Duration::from_secs(5)).await.unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c = calls.clone();
    let svc = a.layer().layer(service_fn(move |_: u64| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<_, BoxError>(0u64) }
    }));
    let t = tokio::spawn(svc.oneshot(1));
    // The layer's call reserved the pause's end: the probe now sees ≈ 6 s.
    let t0 = Instant::now();
    let ra = loop {
        let ra = match probe.reserve(None, &Cost::requests(1)).await {
            Err(r) => r.retry_after().expect("retry_after"),
            Ok(g) => panic!("the probe reserved: {g:?}"),
        };
        if ra > Duration::from_millis(5_200) || t0.elapsed() > Duration::from_secs(3) {
            break ra;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        ra > Duration::from_millis(5_200),
        "the layer's call reserved nothing? {ra:?}"
    );
    t.abort();
    let _ = t.await;
    let ra = until_next_start_below(&probe, Duration::from_millis(5_100)).await;
    assert!(
        ra <= Duration::from_secs(5),
        "the dropped call's reservation is still held: next start in {ra:?}"
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// `Budget::close`: "Answers every call waiting for its reserved start
/// (through the layer) `ShuttingDown` now, giving its reservation back ...
/// Returns how many were waiting."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_during_a_pause_answers_the_waiters_and_gives_back() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let a = budget(&redis, "pc", ten_per_second());
    let probe = budget(&redis, "pc", ten_per_second().max_wait(Duration::ZERO));
    a.pause(None, Duration::from_secs(30)).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..15 {
        let svc = a
            .layer()
            .layer(service_fn(|_: u64| async { Ok::<_, BoxError>(0u64) }));
        tasks.push(tokio::spawn(svc.oneshot(1)));
    }
    // Wait until all 15 reserved: 10 at the pause's end, 5 more at 10/s →
    // the next start is 30.5 s away.
    let t0 = Instant::now();
    loop {
        let ra = match probe.reserve(None, &Cost::requests(1)).await {
            Err(r) => r.retry_after().expect("retry_after"),
            Ok(g) => panic!("probe reserved {g:?}"),
        };
        if ra >= Duration::from_millis(30_400) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "15 reservations not made: {ra:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = a.close();
    for t in tasks {
        let e = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("no hang")
            .expect("no panic")
            .unwrap_err();
        let r = Rejected::from_box(&e).unwrap_or_else(|| panic!("a refusal: {e}"));
        assert_eq!(r.kind(), RejectKind::ShuttingDown);
    }
    // Given back: the next start is the pause's end again (≈ 30 s, not 31.5).
    let ra = until_next_start_below(&probe, Duration::from_millis(30_050)).await;
    assert!(ra < Duration::from_millis(30_050), "still held: {ra:?}");
    // Budget::close: "Returns how many were asleep for their start at that
    // instant (a call whose reservation was in a round trip to Redis then is
    // answered too when its reply comes ... and is not counted)".
    assert!(n <= 15, "close() counted {n} of 15");
}

// ---------------------------------------------------------------------------
// classify while Redis is down / paused; Local policy gets the classifier
// ---------------------------------------------------------------------------

/// `BudgetLayer::classify`: the budget is paused "before the answer is handed
/// on"; "every call has a tight timeout (50 ms by default)". With Redis
/// frozen after the reservation, the 429 must still come back, quickly, as
/// the upstream's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_while_redis_freezes_is_handed_on_quickly() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let server = Arc::new(server);
    let redis = backend(&server).await;
    let a = budget(&redis, "pf", ten_per_second());
    let s = server.clone();
    let svc = a
        .layer()
        .classify(ErrorClassifier)
        .layer(service_fn(move |_: u64| {
            s.pause();
            async {
                Err::<u64, BoxError>(
                    ClassError::new(
                        Class::Throttled {
                            retry_after: Some(Duration::from_secs(5)),
                        },
                        "429 upstream",
                    )
                    .into(),
                )
            }
        }));
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), svc.oneshot(1)).await;
    let el = t0.elapsed();
    server.resume();
    let e = r.expect("no hang").unwrap_err();
    assert!(
        e.to_string().contains("429 upstream"),
        "the upstream's answer: {e}"
    );
    assert!(el < Duration::from_secs(2), "took {el:?}");
}

/// `BudgetLayer::classify`: "Under `FailurePolicy::Local` the local pacer is
/// given this classifier too." With Redis gone, a 429 pauses the local pacer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_local_a_429_pauses_the_local_pacer() {
    let Some((_t, mut server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let a = Budget::builder(&redis, "pl", ten_per_second())
        .failure_policy(FailurePolicy::Local { share: 1.0 })
        .build()
        .unwrap();
    server.stop();
    let svc = a
        .layer()
        .classify(ErrorClassifier)
        .layer(throttling(Some(Duration::from_secs(4))));
    let e = tokio::time::timeout(Duration::from_secs(5), svc.oneshot(1))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(e.to_string().contains("429"), "{e}");
    let pace = a.local().expect("a local pacer");
    let snap = pace.snapshot();
    let until = snap.paused_until.expect("the local pacer is paused");
    let left = until.saturating_duration_since(tokio::time::Instant::now());
    assert!(left >= Duration::from_secs(3), "paused for {left:?} more");
}

// ---------------------------------------------------------------------------
// Keys: distinct keys never share cells
// ---------------------------------------------------------------------------

/// `BudgetLayer::key`: "each key gets the whole budget for itself"; `None`:
/// "the whole budget". Two budget names are two budgets ("instances sharing
/// a name share the budget"). Keys that look alike must not collide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_keys_and_names_do_not_share_cells() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    // (name, key) pairs that a naive "name:key" layout would merge.
    let pairs: &[(&str, Option<&str>)] = &[
        ("kx", None),
        ("kx", Some("")),
        ("kx", Some("a:b")),
        ("kx:a", Some("b")),
        ("kx:a:b", None),
        ("kx", Some("a}b")),
        ("kx", Some("pause")),
        ("ky", Some("alice")),
        ("kz", Some("alice")),
        ("kx", Some("r:1")),
    ];
    let budgets: Vec<_> = pairs
        .iter()
        .map(|(n, k)| (budget(&redis, n, one_per_second()), *k))
        .collect();
    // Each pair takes its one-unit burst: each must get it at once.
    for ((b, k), (n, _)) in budgets.iter().zip(pairs) {
        let w = wait_of(b, *k).await;
        assert!(
            w <= Duration::from_millis(5),
            "{n:?}/{k:?} waited {w:?}: it shares a cell with an earlier pair"
        );
    }
    // Pausing one key pauses no other pair.
    budgets[6]
        .0
        .pause(Some("pause"), Duration::from_secs(60))
        .await
        .unwrap();
    budgets[0]
        .0
        .pause(None, Duration::from_secs(60))
        .await
        .unwrap();
    for (i, ((b, k), (n, _))) in budgets.iter().zip(pairs).enumerate() {
        if i == 0 || i == 6 {
            continue;
        }
        let w = wait_of(b, *k).await;
        assert!(
            w <= Duration::from_millis(1_100),
            "{n:?}/{k:?} waited {w:?}: paused by another pair"
        );
    }
}

// ---------------------------------------------------------------------------
// Failure policies under Redis trouble
// ---------------------------------------------------------------------------

/// "`FailClosed` | nothing | everything, as `BackendUnavailable`"; "an outage
/// costs at most a few timeouts, then nothing per call". Then Redis restarts
/// empty: calls are served from Redis again (no restart of ours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_budget_and_semaphore_through_a_kill_and_empty_restart() {
    let Some((_t, mut server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let b = budget(&redis, "fc", ten_per_second());
    let sem = Semaphore::builder(&redis, "fcs", 2).build().unwrap();
    let held = sem.acquire().await.unwrap();
    assert!(held.is_shared());
    server.stop();
    let t0 = Instant::now();
    for _ in 0..50 {
        let r = b.reserve(None, &Cost::requests(1)).await.unwrap_err();
        assert_eq!(r.kind(), RejectKind::BackendUnavailable, "{r}");
        let r = sem.acquire().await.expect_err("refused");
        assert_eq!(r.kind(), RejectKind::BackendUnavailable, "{r}");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "100 refusals took {:?}",
        t0.elapsed()
    );
    server.restart();
    let t0 = Instant::now();
    loop {
        match b.reserve(None, &Cost::requests(1)).await {
            Ok(Grant::Redis(_)) => break,
            Ok(g) => panic!("FailClosed granted {g:?}"),
            Err(r) => assert_eq!(r.kind(), RejectKind::BackendUnavailable, "{r}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "Redis never used again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The semaphore works again: the held lease is re-taken at its renewal
    // or it is lost; either way at most 2 holders, and a new one fits.
    let l2 = loop {
        match sem.acquire().await {
            Ok(l) => break l,
            Err(r) => assert!(
                matches!(
                    r.kind(),
                    RejectKind::BackendUnavailable | RejectKind::QueueFull
                ),
                "{r}"
            ),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "semaphore never used again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(l2.is_shared());
    let n = sem.holders().await.unwrap();
    assert!(n <= 2, "{n} holders of 2 slots");
    drop((held, l2));
    let t0 = Instant::now();
    while sem.holders().await.unwrap() != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "released leases are still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// "`FailOpen` | unbounded (everything) | nothing" while Redis is frozen
/// (SIGSTOP): no call hangs; answers come after at most a timeout each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_while_redis_is_frozen_admits_without_hanging() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let b = Budget::builder(&redis, "fo", ten_per_second())
        .failure_policy(FailurePolicy::FailOpen)
        .build()
        .unwrap();
    let sem = Semaphore::builder(&redis, "fos", 1)
        .failure_policy(FailurePolicy::FailOpen)
        .build()
        .unwrap();
    server.pause();
    let t0 = Instant::now();
    let mut leases = Vec::new();
    for _ in 0..20 {
        let g = tokio::time::timeout(Duration::from_secs(3), b.reserve(None, &Cost::requests(1)))
            .await
            .expect("no hang");
        assert!(matches!(g, Ok(Grant::Open)), "{g:?}");
        let l = tokio::time::timeout(Duration::from_secs(3), sem.acquire())
            .await
            .expect("no hang")
            .expect("FailOpen admits");
        assert!(!l.is_shared());
        leases.push(l);
    }
    let el = t0.elapsed();
    server.resume();
    assert!(el < Duration::from_secs(8), "40 answers took {el:?}");
    drop(leases);
    // Nothing taken in Redis by the stand-ins nor by the late scripts.
    let t0 = Instant::now();
    loop {
        if matches!(sem.holders().await, Ok(0)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "holders left after a frozen Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `FailurePolicy::Local`: "Fall back to a local limiter holding `share` of
/// the budget (or of the semaphore's slots)". A share of one slot that
/// rounds to less than one must not panic; the local limit holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_semaphore_with_a_fractional_share() {
    let Some((_t, mut server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let sem = Semaphore::builder(&redis, "ls", 3)
        .failure_policy(FailurePolicy::Local { share: 0.5 })
        .build()
        .unwrap();
    server.stop();
    let mut got = Vec::new();
    for _ in 0..5 {
        match tokio::time::timeout(Duration::from_secs(3), sem.acquire())
            .await
            .expect("no hang")
        {
            Ok(l) => {
                assert!(!l.is_shared());
                got.push(l);
            }
            Err(r) => assert_ne!(r.kind(), RejectKind::BackendUnavailable, "{r}"),
        }
    }
    // share·max_concurrent = 1.5: at most 2 local permits (rounded up), at least 1.
    assert!(
        (1..=2).contains(&got.len()),
        "{} local permits of 1.5",
        got.len()
    );
}

// ---------------------------------------------------------------------------
// Lease semaphore
// ---------------------------------------------------------------------------

/// "a live holder renews every third of its lease"; "Holders now, read from
/// Redis (expired leases not counted)"; "a dropped lease is released".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lease_outlives_many_lease_lengths_and_is_released() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let sem = Semaphore::builder(&redis, "sl", 1)
        .lease(Duration::from_millis(600))
        .build()
        .unwrap();
    let l = sem.acquire().await.unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(sem.holders().await.unwrap(), 1, "at {:?}", t0.elapsed());
        let r = sem.acquire().await.expect_err("full");
        assert_eq!(r.kind(), RejectKind::QueueFull);
        let ra = r.retry_after().expect("a retry_after");
        assert!(
            ra <= Duration::from_millis(600),
            "retry_after {ra:?} beyond the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!l.is_lost());
    drop(l);
    let t0 = Instant::now();
    while sem.holders().await.unwrap() != 0 {
        assert!(t0.elapsed() < Duration::from_millis(500), "not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sem.acquire().await.expect("free again");
}

/// Module docs: "an acquire that times out or is dropped while its script is
/// in flight releases whatever that script took". Dropped at every poll
/// count, many times over, with waiting (max_wait) acquirers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_dropped_at_every_await_leave_nothing_held() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let sem = Semaphore::builder(&redis, "sd", 3)
        .max_wait(Duration::from_millis(400))
        .build()
        .unwrap();
    let blockers = [sem.acquire().await.unwrap(), sem.acquire().await.unwrap()];
    for polls in 1..40usize {
        let mut fut = Box::pin(sem.acquire());
        let mut done = None;
        for _ in 0..polls {
            match futures::poll!(fut.as_mut()) {
                std::task::Poll::Ready(r) => {
                    done = Some(r);
                    break;
                }
                std::task::Poll::Pending => tokio::task::yield_now().await,
            }
        }
        drop(fut);
        drop(done);
    }
    drop(blockers);
    let t0 = Instant::now();
    loop {
        // A loaded machine may miss the backend's 50 ms timeout: asked again.
        let n = sem.holders().await;
        if matches!(n, Ok(0)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{n:?} holders left by dropped acquires"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // All three slots usable at once.
    let mut held = Vec::new();
    while held.len() < 3 {
        match sem.acquire().await {
            Ok(lease) => held.push(lease),
            Err(r) => assert!(
                r.kind() == RejectKind::BackendUnavailable
                    && t0.elapsed() < Duration::from_secs(10),
                "{r}"
            ),
        }
    }
}

/// Semaphore through a FLUSHALL: "A semaphore whose set is lost admits new
/// holders beside the old ones until each old holder's next renewal ... a
/// renewal that finds its lease gone takes it again while there is room,
/// else reports it lost". After a third of the lease, never more than
/// max_concurrent holders in Redis, and held + not-lost leases ≤ max.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_flushall_the_old_and_new_holders_settle_within_the_limit() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let sem = Semaphore::builder(&redis, "sf", 2)
        .lease(Duration::from_millis(900))
        .build()
        .unwrap();
    let old = [sem.acquire().await.unwrap(), sem.acquire().await.unwrap()];
    let mut conn = server.connection().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let new = [sem.acquire().await.unwrap(), sem.acquire().await.unwrap()];
    assert!(sem.acquire().await.is_err(), "a fifth holder");
    // Past a third of the lease (300 ms) plus slack, every old holder has
    // renewed: its lease is lost (no room).
    let t0 = Instant::now();
    loop {
        let lost = old.iter().filter(|l| l.is_lost()).count();
        if lost == 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{lost} of the old holders reported lost; Redis holders {}",
            sem.holders().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sem.holders().await.unwrap(), 2);
    assert!(new.iter().all(|l| !l.is_lost()));
    drop(old);
    assert!(
        sem.acquire().await.is_err(),
        "a third holder after the old ones dropped"
    );
}

// ---------------------------------------------------------------------------
// Cache tier (as a RemoteTier)
// ---------------------------------------------------------------------------

/// `CacheTier`: "values above `max_value_bytes` are not stored" (so one of
/// exactly `max_value_bytes` is, whatever the key's length); "each value
/// holding the whole key (compared on read: two requests never share an
/// answer on a hash)"; "The age of an answer is the TTL minus Redis' PTTL".
#[cfg(feature = "cache")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_tier_sizes_keys_and_ages() {
    use semaforo::cache::RemoteTier;
    use semaforo::redis::CacheTier;
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let tier = CacheTier::builder(&redis, "ct")
        .ttl(Duration::from_secs(60))
        .max_value_bytes(100)
        .build()
        .unwrap();
    let long_key = vec![b'k'; 10_000];
    tier.set(&long_key, vec![7u8; 100]).await.unwrap();
    let got = tier.get(&long_key).await.unwrap();
    assert!(
        matches!(&got, Some((v, _)) if v.len() == 100),
        "a value of exactly max_value_bytes under a long key: {:?}",
        got.map(|(v, a)| (v.len(), a))
    );
    // Empty key and empty value.
    tier.set(b"", Vec::new()).await.unwrap();
    let got = tier.get(b"").await.unwrap();
    assert!(
        matches!(&got, Some((v, _)) if v.is_empty()),
        "empty value under empty key: {got:?}"
    );
    // Keys that are prefixes of each other do not share a value.
    tier.set(b"ab", b"AB".to_vec()).await.unwrap();
    assert!(tier.get(b"a").await.unwrap().is_none());
    assert!(tier.get(b"abc").await.unwrap().is_none());
    let (v, age) = tier.get(b"ab").await.unwrap().expect("stored");
    assert_eq!(v, b"AB");
    assert!(age <= Duration::from_secs(2), "age {age:?}");
    // Fill lock: one holder; a wrong token does not release it.
    let tok = tier.lock(b"ab").await.unwrap().expect("free lock");
    assert_eq!(tier.lock(b"ab").await.unwrap(), None);
    tier.unlock(b"ab", tok.wrapping_add(1)).await.unwrap();
    assert_eq!(
        tier.lock(b"ab").await.unwrap(),
        None,
        "a wrong token released the lock"
    );
    tier.unlock(b"ab", tok).await.unwrap();
    assert!(
        tier.lock(b"ab").await.unwrap().is_some(),
        "the right token did not release it"
    );
}

/// "Redis trouble never fails a call: every command goes through the
/// backend's timeout and breaker; an error is a miss". A frozen Redis: each
/// command answers (an error or a miss) within a timeout, never hangs.
#[cfg(feature = "cache")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_tier_on_a_frozen_redis_answers_fast() {
    use semaforo::cache::RemoteTier;
    use semaforo::redis::CacheTier;
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let tier = CacheTier::builder(&redis, "cf").build().unwrap();
    tier.set(b"x", b"1".to_vec()).await.unwrap();
    server.pause();
    let t0 = Instant::now();
    for _ in 0..20 {
        let g = tokio::time::timeout(Duration::from_secs(2), tier.get(b"x")).await;
        let l = tokio::time::timeout(Duration::from_secs(2), tier.lock(b"x")).await;
        assert!(g.is_ok() && l.is_ok(), "a command hung on a frozen Redis");
        assert!(
            !matches!(l, Ok(Ok(Some(_)))),
            "a lock taken on a frozen Redis"
        );
    }
    let el = t0.elapsed();
    server.resume();
    assert!(el < Duration::from_secs(5), "40 commands took {el:?}");
}

/// `BudgetBuilder::build` errors are "Those of PaceBuilder::build, and a
/// ConfigError on name, failure_policy or resets"; PaceBuilder::max_wait
/// defaults to "wait as long as it takes". A max_wait of Duration::MAX is
/// accepted, and a 100-year pause (the cap) is then waited for, not refused
/// nor an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_wait_of_duration_max_and_a_capped_pause() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let b = Budget::builder(&redis, "mw", ten_per_second().max_wait(Duration::MAX))
        .build()
        .expect("max_wait MAX accepted");
    assert_eq!(wait_of(&b, None).await, Duration::ZERO);
    b.pause(None, Duration::MAX).await.unwrap();
    match b.reserve(None, &Cost::requests(1)).await {
        Ok(Grant::Redis(w)) => assert!(w >= 99 * YEAR, "waits {w:?}"),
        other => panic!("a 100-year pause under max_wait MAX: {other:?}"),
    }
    assert_eq!(redis.breaker().snapshot().state, BreakerState::Closed);
}

/// Several instances pausing at once with different lengths: "a longer
/// pause already set stays" — the longest wins whatever the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pauses_from_many_instances_keep_the_longest() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let mut budgets = Vec::new();
    for _ in 0..4 {
        let r = backend(&server).await;
        budgets.push(budget(&r, "pm", ten_per_second()));
    }
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let b = budgets[i as usize % 4].clone();
        let d = Duration::from_millis(1_000 + (i * 7919) % 40 * 250); // up to 10.75 s
        tasks.push(tokio::spawn(async move {
            b.pause(None, d).await.map_err(|e| e.to_string())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let longest = (0..40u64)
        .map(|i| 1_000 + (i * 7919) % 40 * 250)
        .max()
        .unwrap();
    let w = wait_of(&budgets[3], None).await;
    assert!(
        within(
            w,
            Duration::from_millis(longest - 1_000),
            Duration::from_millis(longest)
        ),
        "waits {w:?}, longest pause {longest} ms"
    );
}

/// `CacheTier` docs: "values above `max_value_bytes` are not stored";
/// `RemoteTier::max_value_bytes`: "The largest value stored (bytes)".
/// Through the `RemoteTier` trait directly (a user's own layer).
#[cfg(feature = "cache")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_tier_does_not_store_a_value_above_max_value_bytes() {
    use semaforo::cache::RemoteTier;
    use semaforo::redis::CacheTier;
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let tier = CacheTier::builder(&redis, "cb")
        .max_value_bytes(100)
        .build()
        .unwrap();
    let _ = tier.set(b"big", vec![1u8; 101]).await;
    let got = tier.get(b"big").await.unwrap();
    assert!(
        got.is_none(),
        "a 101-byte value stored by a tier of max_value_bytes 100 (read back {} bytes)",
        got.map_or(0, |(v, _)| v.len())
    );
}

/// `Limit::max_wait`: "Refuse a call that would wait longer than this *for
/// this limit*"; `Budget::pause`: "no reservation made from now on starts
/// before `pause` has passed"; module docs: "The same semantics as the local
/// layers". After a 429 pause, a call that fits both the TPM and the dollar
/// budget waits for the pause's end — as the local pacer does — instead of
/// being refused as if the dollars were spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_with_a_spend_limit_waits_like_the_local_pacer() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let limits = || {
        Pace::builder()
            .limit(Limit::spend_per_day(1_000_000))
            .limit(Limit::new(Unit::Tokens, 100_000, Duration::from_secs(60)))
    };
    let b = Budget::builder(&redis, "ps", limits()).build().unwrap();
    let svc = b
        .layer()
        .weigh(|_: &u64| Cost::tokens(10).with_spend(1))
        .classify(ErrorClassifier)
        .layer(throttling(Some(Duration::from_secs(5))));
    assert!(svc.oneshot(1).await.is_err());
    let redis_answer = b.reserve(None, &Cost::tokens(10).with_spend(1)).await;

    // The same limits locally (paused clock), after the same 429.
    let local = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let pace = limits().build().unwrap();
            let svc = pace
                .layer()
                .weigh(|_: &u64| Cost::tokens(10).with_spend(1))
                .classify(ErrorClassifier)
                .layer(throttling(Some(Duration::from_secs(5))));
            let _ = svc.oneshot(1).await;
            let now = tokio::time::Instant::now();
            pace.start_for(&Cost::tokens(10).with_spend(1))
                .map(|t| t - now)
        })
    })
    .await
    .unwrap();
    match &redis_answer {
        Ok(Grant::Redis(w)) => assert!(*w >= Duration::from_secs(4), "Redis: waits {w:?}"),
        other => panic!(
            "Redis budget after a 5 s pause refuses a call that fits: {other:?}; local pacer: start in {local:?}"
        ),
    }
}

/// A 100-year pause (the cap) met by a call through the layer: the call
/// waits (no panic in a timer, no early start); dropped, it gives its
/// reservation back ("A call through the layer that is dropped while it
/// waits for its start gives its reservation back").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_through_the_layer_into_a_hundred_year_pause() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let a = budget(&redis, "p100", one_per_second());
    let probe = budget(&redis, "p100", one_per_second().max_wait(Duration::ZERO));
    a.pause(None, Duration::MAX).await.unwrap();
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r2 = ran.clone();
    let svc = a.layer().layer(service_fn(move |_: u64| {
        r2.store(true, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<_, BoxError>(0u64) }
    }));
    // The next start with the pause alone, then with the layer's call
    // reserved (one more unit: ≈ 1 s later), time passed allowed for.
    let next = || async {
        probe
            .reserve(None, &Cost::requests(1))
            .await
            .unwrap_err()
            .retry_after()
            .expect("retry_after")
    };
    let (base, base_at) = (next().await, Instant::now());
    let t = tokio::spawn(svc.oneshot(1));
    let t0 = Instant::now();
    let held = loop {
        let ra = probe
            .reserve(None, &Cost::requests(1))
            .await
            .unwrap_err()
            .retry_after();
        let ra = ra.expect("retry_after");
        if ra + base_at.elapsed() > base + Duration::from_millis(500) {
            break (ra, Instant::now());
        }
        assert!(!t.is_finished(), "the call ended: {:?}", t.await);
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the layer's call reserved nothing ({ra:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (held, held_at) = held;
    assert!(!t.is_finished(), "the call ended early: {:?}", t.await);
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    t.abort();
    let e = t.await.unwrap_err();
    assert!(e.is_cancelled(), "the task panicked: {e}");
    // A refund moves the next start back by ≈ 1 s more than the time passed
    // since it was read with the reservation held (whenever the background
    // undo lands).
    let t0 = Instant::now();
    loop {
        let now = probe
            .reserve(None, &Cost::requests(1))
            .await
            .unwrap_err()
            .retry_after()
            .unwrap();
        if held.saturating_sub(now) > held_at.elapsed() + Duration::from_millis(500) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "not given back: {held:?} → {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `Semaphore::close`: "Answers every acquirer waiting for a slot
/// `ShuttingDown` now, and refuses every acquire from now on ... (held
/// leases are kept until released). Returns how many were waiting."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_close_answers_waiters_and_keeps_leases() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let sem = Semaphore::builder(&redis, "sc", 1)
        .max_wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let held = sem.acquire().await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let s = sem.clone();
        tasks.push(tokio::spawn(async move { s.acquire().await.map(|_| ()) }));
    }
    // Let them start waiting (they poll Redis; nothing to read but time).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = sem.close();
    let mut kinds = Vec::new();
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(3), t)
            .await
            .expect("no hang")
            .unwrap();
        kinds.push(r.unwrap_err().kind());
    }
    eprintln!("close() returned {n}; the 3 waiters got {kinds:?}");
    // Nobody gets a lease after the close; on a loaded machine a waiter's
    // Redis poll may also miss the backend's 50 ms timeout first
    // (`FailClosed`: `BackendUnavailable`).
    assert!(
        kinds
            .iter()
            .all(|k| matches!(k, RejectKind::ShuttingDown | RejectKind::BackendUnavailable)),
        "{kinds:?}"
    );
    // Semaphore::close: "Returns how many were asleep between two tries at
    // that instant (one in a round trip to Redis then is refused too when
    // its reply comes, not counted)".
    assert!(n <= 3, "close() counted {n}: {kinds:?}");
    assert_eq!(
        sem.acquire().await.err().unwrap().kind(),
        RejectKind::ShuttingDown
    );
    let t0 = Instant::now();
    while !matches!(sem.holders().await, Ok(1)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the held lease is kept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!held.is_lost());
    drop(held);
    let t0 = Instant::now();
    while !matches!(sem.holders().await, Ok(0)) {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `SemaphoreBuilder::max_wait`: "How long a caller may wait for a slot";
/// "every call has a tight timeout (50 ms by default)". Redis freezing while
/// an acquirer waits must not stretch its wait far beyond max_wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_acquire_on_a_frozen_redis_ends_near_max_wait() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let sem = Semaphore::builder(&redis, "sw", 1)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let _held = sem.acquire().await.unwrap();
    let s = sem.clone();
    let t0 = Instant::now();
    let t = tokio::spawn(async move { s.acquire().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.pause();
    let r = tokio::time::timeout(Duration::from_secs(6), t).await;
    let el = t0.elapsed();
    server.resume();
    let r = r.expect("the acquire hung on a frozen Redis").unwrap();
    let e = r.expect_err("no slot");
    assert!(
        matches!(
            e.kind(),
            RejectKind::QueueTimeout | RejectKind::BackendUnavailable
        ),
        "{e}"
    );
    assert!(
        el < Duration::from_millis(2_500),
        "max_wait 1 s, answered after {el:?}"
    );
}

/// `Budget::close`: "Answers every call waiting for its reserved start
/// (through the layer) `ShuttingDown` now, giving its reservation back, and
/// lets no call wait from now on." Closed while the calls' reserve scripts
/// are still in flight: none may wait out the 30 s pause, and every
/// reservation comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_racing_reserves_in_flight_lets_nobody_wait_and_gives_all_back() {
    let Some((_t, server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    for delay_us in [0u64, 300, 700, 1_000, 1_500, 2_000, 3_000, 5_000, 8_000] {
        let name = format!("pcr{delay_us}");
        let a = budget(&redis, &name, ten_per_second());
        let probe = budget(&redis, &name, ten_per_second().max_wait(Duration::ZERO));
        a.pause(None, Duration::from_secs(30)).await.unwrap();
        let ran = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..30 {
            let r = ran.clone();
            let svc = a.layer().layer(service_fn(move |_: u64| {
                r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<_, BoxError>(0u64) }
            }));
            tasks.push(tokio::spawn(svc.oneshot(1)));
        }
        tokio::time::sleep(Duration::from_micros(delay_us)).await;
        let n = a.close();
        let mut kinds = Vec::new();
        for t in tasks {
            let r = tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("a call waits out the pause after close()")
                .unwrap();
            kinds.push(
                r.map(|_| ())
                    .map_err(|e| Rejected::from_box(&e).map(|r| r.kind())),
            );
        }
        eprintln!("delay {delay_us} µs: close() returned {n}; results {kinds:?}");
        assert_eq!(
            ran.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a call ran during the pause"
        );
        assert!(
            kinds
                .iter()
                .all(|k| *k == Err(Some(RejectKind::ShuttingDown))),
            "{kinds:?}"
        );
        // Every reservation given back: the next start is the pause's end (≈30 s), not 32 s.
        let ra = until_next_start_below(&probe, Duration::from_millis(30_050)).await;
        assert!(
            ra < Duration::from_millis(30_050),
            "reservations still held: next start in {ra:?}"
        );
    }
}

/// Module docs, over-admission table: "`Local { share }` | at most
/// `N · share · (R · T + B)`". One instance, share 0.01, R = 10/s, B = 10,
/// Redis down for T ≈ 1 s: at most 0.01 · (10 · 1 + 10) = 0.2 calls → none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_share_bound_for_a_small_share() {
    let Some((_t, mut server)) = setup().await else {
        return;
    };
    let redis = backend(&server).await;
    let b = Budget::builder(&redis, "lsb", ten_per_second())
        .failure_policy(FailurePolicy::Local { share: 0.01 })
        .build()
        .unwrap();
    server.stop();
    let ran = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let r = ran.clone();
    let svc = b.layer().layer(service_fn(move |_: u64| {
        r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<_, BoxError>(0u64) }
    }));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(tokio::time::timeout(
            Duration::from_secs(1),
            svc.clone().oneshot(1),
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
    let t = t0.elapsed().as_secs_f64();
    let n = ran.load(std::sync::atomic::Ordering::SeqCst);
    // Module docs: "at most `N · share · (R · T + B)` ... — but never less
    // than one unit per window and a burst of one per instance (... with
    // `share · R` or `share · B` below 1, `N · (T / window + 1)`)".
    let bound = (0.01 * (10.0 * t + 10.0)).max(t / 1.0 + 1.0);
    assert!(
        f64::from(n) <= bound,
        "{n} admitted in {t:.2} s with share 0.01 (bound {bound:.2})"
    );
}

//! Quotas under paused time: seeds 003 and 004, plan upgrades, the global limit
//! beside keyed ones, weighted costs, 429 headers, eviction of idle keys, and a
//! property test of the rate bound.

use proptest::prelude::*;
use semaforo::quota::{PlanId, Quota, Rate};
use semaforo::{BoxError, RejectKind, Rejected};
use std::time::Duration;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

type Req = (u32, PlanId, u32);

fn api(quota: &Quota<u32>) -> impl Service<Req, Response = (), Error = BoxError> {
    ServiceBuilder::new()
        .layer(quota.layer(|r: &Req| (r.0, r.1)).cost(|r: &Req| r.2))
        .service(tower::service_fn(|_: Req| async {
            Ok::<_, std::io::Error>(())
        }))
}

async fn hit<S: Service<Req, Response = (), Error = BoxError>>(
    svc: &mut S,
    user: u32,
    plan: PlanId,
) -> Result<(), Rejected> {
    svc.ready()
        .await
        .unwrap()
        .call((user, plan, 1))
        .await
        .map_err(|e| Rejected::from_box(&e).expect("rejection").clone())
}

fn seed_003() -> Quota<u32> {
    Quota::builder()
        .name("api")
        .plan("free", Rate::per_minute(60))
        .plan("pro", Rate::per_minute(1_000))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn seed_003_free_60_per_minute_pro_1000() {
    let quota = seed_003();
    let (free, pro) = (
        quota.plan_id("free").unwrap(),
        quota.plan_id("pro").unwrap(),
    );
    let mut svc = api(&quota);
    for _ in 0..60 {
        hit(&mut svc, 1, free).await.unwrap();
    }
    let r = hit(&mut svc, 1, free).await.unwrap_err();
    assert_eq!(r.kind(), RejectKind::QuotaExceeded);
    assert_eq!(
        r.retry_after(),
        Some(Duration::from_secs(1)),
        "one more token each second"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    hit(&mut svc, 1, free).await.unwrap();
    assert!(hit(&mut svc, 1, free).await.is_err());
    // Over a full minute, a Free key gets 60 more.
    tokio::time::advance(Duration::from_secs(60)).await;
    let mut admitted = 0;
    for _ in 0..100 {
        admitted += hit(&mut svc, 1, free).await.is_ok() as u32;
    }
    assert_eq!(admitted, 60);
    // A Pro key: 1000.
    let mut admitted = 0;
    for _ in 0..1_200 {
        admitted += hit(&mut svc, 2, pro).await.is_ok() as u32;
    }
    assert_eq!(admitted, 1_000);
    let snap = quota.snapshot();
    assert_eq!((snap.admitted, snap.keys), (60 + 1 + 60 + 1_000, 2));
}

#[tokio::test(start_paused = true)]
async fn seed_004_three_per_hour_per_user() {
    let quota: Quota<u32> = Quota::builder()
        .plan("architecture", Rate::per_hour(3))
        .plan("book", Rate::per_hour(2))
        .build()
        .unwrap();
    let (arch, book) = (
        quota.plan_id("architecture").unwrap(),
        quota.plan_id("book").unwrap(),
    );
    let mut svc = api(&quota);
    for _ in 0..3 {
        hit(&mut svc, 7, arch).await.unwrap();
    }
    let r = hit(&mut svc, 7, arch).await.unwrap_err();
    assert_eq!(r.retry_after(), Some(Duration::from_secs(20 * 60)));
    for _ in 0..2 {
        hit(&mut svc, 7, book).await.unwrap();
    }
    assert_eq!(
        hit(&mut svc, 7, book).await.unwrap_err().retry_after(),
        Some(Duration::from_secs(30 * 60))
    );
    hit(&mut svc, 8, arch).await.unwrap(); // another user is not affected
    tokio::time::advance(Duration::from_secs(20 * 60)).await;
    hit(&mut svc, 7, arch).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_plan_upgrade_takes_effect_on_the_next_call() {
    let quota = seed_003();
    let (free, pro) = (
        quota.plan_id("free").unwrap(),
        quota.plan_id("pro").unwrap(),
    );
    let mut svc = api(&quota);
    for _ in 0..60 {
        hit(&mut svc, 1, free).await.unwrap();
    }
    assert!(hit(&mut svc, 1, free).await.is_err());
    // The user upgrades: the lookup now says Pro.
    hit(&mut svc, 1, pro).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_global_limit_and_the_keyed_ones_never_consume_each_other() {
    let quota: Quota<u32> = Quota::builder()
        .plan("user", Rate::per_minute(2))
        .global(Rate::per_minute(3))
        .build()
        .unwrap();
    let user = quota.plan_id("user").unwrap();
    let mut svc = api(&quota);
    hit(&mut svc, 1, user).await.unwrap();
    hit(&mut svc, 1, user).await.unwrap();
    // User 1 is over its quota: refused, and the global limit is not charged.
    for _ in 0..5 {
        assert_eq!(
            hit(&mut svc, 1, user).await.unwrap_err().detail(),
            Some("plan 'user'")
        );
    }
    hit(&mut svc, 2, user).await.unwrap(); // the 3rd global token is still there
                                           // The global limit is spent: refused, and user 3's own quota is not charged.
    let r = hit(&mut svc, 3, user).await.unwrap_err();
    assert_eq!(r.detail(), Some("global limit"));
    assert_eq!(r.retry_after(), Some(Duration::from_secs(20)));
    tokio::time::advance(Duration::from_secs(40)).await; // 2 global tokens back
    hit(&mut svc, 3, user).await.unwrap();
    hit(&mut svc, 3, user).await.unwrap(); // user 3 still had both of its own
}

#[tokio::test(start_paused = true)]
async fn a_cost_that_can_never_fit_is_refused_clearly() {
    let quota = seed_003();
    let free = quota.plan_id("free").unwrap();
    let mut svc = api(&quota);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call((1, free, 61))
        .await
        .unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    assert_eq!(r.retry_after(), None);
    assert!(
        err.to_string().contains("can never fit plan 'free'"),
        "{err}"
    );
    svc.ready()
        .await
        .unwrap()
        .call((1, free, 60))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_rejection_gives_the_429_headers() {
    let quota = seed_003();
    let free = quota.plan_id("free").unwrap();
    let mut svc = api(&quota);
    for _ in 0..60 {
        hit(&mut svc, 1, free).await.unwrap();
    }
    let r = hit(&mut svc, 1, free).await.unwrap_err();
    assert_eq!(
        r.http_headers(),
        vec![
            ("retry-after", "1".to_string()),
            ("ratelimit-policy", "\"free\";q=60;w=60".to_string()),
            ("ratelimit", "\"free\";r=0;t=1".to_string()),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_million_idle_keys_are_evicted() {
    let quota: Quota<u32> = Quota::builder()
        .plan("user", Rate::per_second(10))
        .build()
        .unwrap();
    let user = quota.plan_id("user").unwrap();
    let mut svc = api(&quota);
    for k in 0..1_000_000u32 {
        hit(&mut svc, k, user).await.unwrap();
    }
    assert!(quota.snapshot().keys > 900_000, "{:?}", quota.snapshot());
    // Idle for longer than their refill period (1 s): swept in the background
    // (asked for by ordinary traffic, or by the sweeper's own timer).
    tokio::time::advance(Duration::from_secs(2)).await;
    let sweeps = quota.snapshot().sweeps;
    for _ in 0..70_000 {
        let _ = hit(&mut svc, 42, user).await;
    }
    // No request paid for it: the sweep runs on the quota's own thread. Wait
    // (at most 20 s of real time) for it to finish.
    let mut keys = quota.snapshot().keys;
    for _ in 0..2_000 {
        if keys <= 1 && quota.snapshot().sweeps > sweeps {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        keys = quota.snapshot().keys;
    }
    assert!(keys <= 1, "the store still holds {keys} keys");
}

/// `(admitted at ms, key, cost)`: the admitted cost in every window W is at
/// most `rate · W + burst`.
fn within_rate(adm: &[(u64, u32, u32)], rate: Rate) -> Result<(), TestCaseError> {
    let per_ms = rate.count as f64 / rate.per.as_millis() as f64;
    for i in 0..adm.len() {
        let mut sum = 0.0;
        for j in i..adm.len() {
            sum += adm[j].2 as f64;
            let w = (adm[j].0 - adm[i].0) as f64;
            prop_assert!(
                sum <= per_ms * w + rate.burst as f64 + 1e-9,
                "{sum} in {w} ms"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Admitted cost in any window W ≤ rate · W + burst, per key and globally,
    /// and a key's admissions do not depend on other keys' traffic.
    #[test]
    fn admitted_within_rate_and_burst(
        arrivals in prop::collection::vec((0u64..30_000, 0u32..4, 1u32..4), 1..150),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let (per_key, global) = (Rate::per_minute(30).burst(5), Rate::per_minute(60).burst(8));
            let run = |with_global: bool, only: Option<u32>| {
                let arrivals = arrivals.clone();
                async move {
                    let mut b = Quota::builder().plan("p", per_key);
                    if with_global {
                        b = b.global(global);
                    }
                    let quota: Quota<u32> = b.build().unwrap();
                    let p = quota.plan_id("p").unwrap();
                    let mut svc = api(&quota);
                    let mut sorted = arrivals;
                    sorted.sort_by_key(|a| a.0);
                    let t0 = tokio::time::Instant::now();
                    let mut admitted = Vec::new();
                    for (at, key, cost) in sorted {
                        if only.is_some_and(|k| k != key) {
                            continue;
                        }
                        tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
                        if svc.ready().await.unwrap().call((key, p, cost)).await.is_ok() {
                            admitted.push((at, key, cost));
                        }
                    }
                    admitted
                }
            };
            let with_global = run(true, None).await;
            within_rate(&with_global, global)?;
            let alone = run(false, None).await;
            for key in 0..4 {
                let mine: Vec<_> = with_global.iter().copied().filter(|a| a.1 == key).collect();
                within_rate(&mine, per_key)?;
                // Without the global limit, a key admits exactly what it admits alone.
                let in_crowd: Vec<_> = alone.iter().copied().filter(|a| a.1 == key).collect();
                let by_itself = run(false, Some(key)).await;
                prop_assert_eq!(in_crowd, by_itself, "key {} depends on others", key);
            }
            Ok(())
        })?;
    }
}

#[test]
fn bad_configuration_is_an_error() {
    let field = |b: semaforo::quota::QuotaBuilder| b.build::<u32>().unwrap_err().field;
    assert_eq!(field(Quota::builder()), "plan");
    assert_eq!(
        field(Quota::builder().plan("x", Rate::per_minute(0))),
        "plan"
    );
    assert_eq!(
        field(
            Quota::builder()
                .plan("x", Rate::per_minute(1))
                .plan("x", Rate::per_minute(2))
        ),
        "plan"
    );
    assert_eq!(
        field(
            Quota::builder()
                .plan("x", Rate::per_minute(1))
                .global(Rate::per_minute(1).burst(0))
        ),
        "global"
    );
}

// ---- Wait mode -------------------------------------------------------------

/// `(key, plan, cost, seq)`.
type Seq = (u32, PlanId, u32, u32);
type Log = std::sync::Arc<std::sync::Mutex<Vec<(u32, u32, Duration)>>>;

/// A clonable service recording `(key, seq, since start)` of each admitted call.
fn recording(
    quota: &Quota<u32>,
) -> (
    impl Service<Seq, Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static,
    Log,
) {
    let log: Log = Default::default();
    let t0 = tokio::time::Instant::now();
    let l = log.clone();
    let svc = ServiceBuilder::new()
        .layer(quota.layer(|r: &Seq| (r.0, r.1)).cost(|r: &Seq| r.2))
        .service(tower::service_fn(move |r: Seq| {
            l.lock().unwrap().push((r.0, r.3, t0.elapsed()));
            async { Ok::<_, std::io::Error>(()) }
        }));
    (svc, log)
}

/// One call per second per key, burst 1, waiting up to `max_wait`.
fn one_per_second(max_wait: Duration) -> (Quota<u32>, PlanId) {
    let quota: Quota<u32> = Quota::builder()
        .plan("p", Rate::per_second(1).burst(1))
        .max_wait(max_wait)
        .build()
        .unwrap();
    let p = quota.plan_id("p").unwrap();
    (quota, p)
}

fn spawn_call<S>(svc: &S, req: Seq) -> tokio::task::JoinHandle<Result<(), Rejected>>
where
    S: Service<Seq, Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static,
{
    let mut svc = svc.clone();
    tokio::spawn(async move {
        svc.ready()
            .await
            .unwrap()
            .call(req)
            .await
            .map_err(|e| Rejected::from_box(&e).expect("rejection").clone())
    })
}

#[tokio::test(start_paused = true)]
async fn wait_mode_admits_in_arrival_order_at_the_refill_instants() {
    let (quota, p) = one_per_second(Duration::from_secs(9));
    let (svc, log) = recording(&quota);
    let mut calls = Vec::new();
    // Ten calls of key 1, 100 ms apart: the first passes, the rest queue
    // (call k would wait k − 0.1·k s, its estimate at arrival, ≤ 9 s).
    for seq in 0..10 {
        if seq > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        calls.push(spawn_call(&svc, (1, p, 1, seq)));
    }
    // At 0.95 s nine calls are in line ahead of this one: it would start at
    // the tenth refill instant, 10 s, a wait of 9.05 s > max_wait — refused
    // with that estimate (exact: the cells' wait for everything ahead).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(quota.snapshot().waiting, 9, "{:?}", quota.snapshot());
    let over = spawn_call(&svc, (1, p, 1, 99)).await.unwrap().unwrap_err();
    assert_eq!(over.kind(), RejectKind::QuotaExceeded);
    assert_eq!(over.retry_after(), Some(Duration::from_millis(9_050)));
    // Another key is not held up by key 1's line.
    spawn_call(&svc, (2, p, 1, 0)).await.unwrap().unwrap();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let got: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.0 == 1)
        .map(|e| (e.1, e.2.as_millis()))
        .collect();
    let want: Vec<_> = (0..10).map(|s| (s, u128::from(s) * 1_000)).collect();
    assert_eq!(got, want, "FIFO, one per second from 0 s");
    let snap = quota.snapshot();
    assert_eq!((snap.admitted, snap.rejected, snap.waiting), (11, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn wait_mode_a_dropped_waiter_lets_the_next_move_up() {
    let (quota, p) = one_per_second(Duration::from_secs(10));
    let (svc, log) = recording(&quota);
    let first = spawn_call(&svc, (1, p, 1, 0));
    tokio::task::yield_now().await;
    let second = spawn_call(&svc, (1, p, 1, 1));
    tokio::task::yield_now().await;
    let third = spawn_call(&svc, (1, p, 1, 2));
    tokio::task::yield_now().await;
    assert_eq!(quota.snapshot().waiting, 2);
    // The front of the line (sleeping until 1 s) goes away at 0.5 s.
    tokio::time::sleep(Duration::from_millis(500)).await;
    second.abort();
    assert!(second.await.unwrap_err().is_cancelled());
    first.await.unwrap().unwrap();
    third.await.unwrap().unwrap();
    let got: Vec<_> = log.lock().unwrap().iter().map(|e| (e.1, e.2)).collect();
    assert_eq!(got, [(0, Duration::ZERO), (2, Duration::from_secs(1))]);
    assert_eq!(quota.snapshot().waiting, 0);
}

/// Drop the future at each point it can wait: behind another call, at the
/// front asleep until its cost fits, and waiting for the inner service to be
/// ready. Each time the line is left clean and the next call's turn is exact.
#[tokio::test(start_paused = true)]
async fn wait_mode_drop_at_each_await_point() {
    use std::future::Future;
    use std::task::{Context, Poll};
    let (quota, p) = one_per_second(Duration::from_secs(10));
    // An inner service that is not ready until `open` is set.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    #[derive(Clone)]
    struct Gate(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Service<Seq> for Gate {
        type Response = ();
        type Error = BoxError;
        type Future = std::future::Ready<Result<(), BoxError>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            if self.0.load(std::sync::atomic::Ordering::SeqCst) {
                Poll::Ready(Ok(()))
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        fn call(&mut self, _: Seq) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }
    let mut svc = quota.layer(|r: &Seq| (r.0, r.1)).layer(Gate(open.clone()));
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    svc.ready().await.unwrap().call((1, p, 1, 0)).await.unwrap(); // t = 0: burst used
                                                                  // 1. At the front, asleep until 1 s; 2. behind it.
    let mut front = Box::pin(svc.call((1, p, 1, 1)));
    let mut behind = Box::pin(svc.call((1, p, 1, 2)));
    assert!(front.as_mut().poll(&mut cx).is_pending());
    assert!(behind.as_mut().poll(&mut cx).is_pending());
    assert_eq!(quota.snapshot().waiting, 2);
    drop(behind);
    assert_eq!(quota.snapshot().waiting, 1);
    drop(front);
    assert_eq!(quota.snapshot().waiting, 0);
    // Nothing was taken by the dropped calls: the next one passes at 1 s.
    tokio::time::sleep(Duration::from_secs(1)).await;
    svc.ready().await.unwrap().call((1, p, 1, 3)).await.unwrap();
    // 3. Admitted, waiting for the inner service to be ready, then dropped.
    open.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut admitted = Box::pin(svc.call((1, p, 1, 4)));
    assert!(admitted.as_mut().poll(&mut cx).is_pending());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        admitted.as_mut().poll(&mut cx).is_pending(),
        "inner not ready"
    );
    assert_eq!(quota.snapshot().waiting, 0, "admitted: out of the line");
    drop(admitted);
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    // Its token was spent (governor cannot give it back): the next fits at 3 s.
    let t = tokio::time::Instant::now();
    svc.ready().await.unwrap().call((1, p, 1, 5)).await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn wait_mode_refuses_at_max_wait_when_another_key_takes_the_global_turn() {
    // Global 1/s; each key could go 100/s. Key 1's second call waits for the
    // global limit; key 2's call, queued 0.2 s later, competes at 1 s. Whoever
    // loses would need until 2 s, past both deadlines (1.5 s and 1.7 s).
    let quota: Quota<u32> = Quota::builder()
        .plan("p", Rate::per_second(100).burst(10))
        .global(Rate::per_second(1).burst(1))
        .max_wait(Duration::from_millis(1_500))
        .build()
        .unwrap();
    let p = quota.plan_id("p").unwrap();
    let (svc, log) = recording(&quota);
    spawn_call(&svc, (1, p, 1, 0)).await.unwrap().unwrap();
    let a = spawn_call(&svc, (1, p, 1, 1));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = spawn_call(&svc, (2, p, 1, 0));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(a.is_ok() != b.is_ok(), "exactly one of them: {a:?} {b:?}");
    let lost = a.err().or(b.err()).unwrap();
    assert_eq!(lost.retry_after(), Some(Duration::from_secs(1)));
    assert!(lost.detail().unwrap().contains("max_wait"), "{lost}");
    assert_eq!(
        log.lock().unwrap().last().unwrap().2,
        Duration::from_secs(1)
    );
    assert_eq!(quota.snapshot().waiting, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Wait mode keeps the rate bound per key and globally, admits each key's
    /// calls in arrival order, and no call waits longer than `max_wait`.
    #[test]
    fn wait_mode_keeps_the_bound_fifo_and_max_wait(
        arrivals in prop::collection::vec((0u64..20_000, 0u32..3, 1u32..4), 1..80),
        global_on in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let (per_key, global) = (Rate::per_minute(30).burst(5), Rate::per_minute(60).burst(8));
            let max_wait = Duration::from_secs(3);
            let mut b = Quota::builder().plan("p", per_key).max_wait(max_wait);
            if global_on {
                b = b.global(global);
            }
            let quota: Quota<u32> = b.build().unwrap();
            let p = quota.plan_id("p").unwrap();
            let (svc, log) = recording(&quota);
            let mut sorted = arrivals;
            sorted.sort_by_key(|a| a.0);
            let t0 = tokio::time::Instant::now();
            let mut calls = Vec::new();
            for (seq, (at, key, cost)) in sorted.iter().enumerate() {
                tokio::time::sleep_until(t0 + Duration::from_millis(*at)).await;
                calls.push(spawn_call(&svc, (*key, p, *cost, seq as u32)));
                tokio::task::yield_now().await;
            }
            for c in calls {
                let _ = c.await.unwrap();
            }
            let log = log.lock().unwrap().clone();
            // (admitted at ms, key, cost), in admission order.
            let adm: Vec<(u64, u32, u32)> = log.iter().map(|&(key, seq, at)| {
                let (arrived, _, cost) = sorted[seq as usize];
                let at = at.as_millis() as u64;
                assert!(at >= arrived && at - arrived <= max_wait.as_millis() as u64,
                    "call {seq} arrived at {arrived} ms, admitted at {at} ms");
                (at, key, cost)
            }).collect();
            if global_on {
                within_rate(&adm, global)?;
            }
            for key in 0..3 {
                let mine: Vec<_> = adm.iter().copied().filter(|a| a.1 == key).collect();
                within_rate(&mine, per_key)?;
                let seqs: Vec<u32> = log.iter().filter(|e| e.0 == key).map(|e| e.1).collect();
                let mut in_order = seqs.clone();
                in_order.sort_unstable();
                prop_assert_eq!(seqs, in_order, "key {} out of arrival order", key);
            }
            prop_assert_eq!(quota.snapshot().waiting, 0);
            Ok(())
        })?;
    }
}

/// A "60 per minute" plan, back-to-back calls for a minute: 60 at once, then
/// one a second (the 61st at 1 s), 119 in the minute — what `Rate`'s docs
/// say; with `burst(1)`, 60.
#[tokio::test(start_paused = true)]
async fn what_a_60_per_minute_plan_admits_in_a_minute() {
    for (rate, expected) in [
        (Rate::per_minute(60), 119),
        (Rate::per_minute(60).burst(1), 60),
    ] {
        let quota: Quota<u32> = Quota::builder().plan("p", rate).build().unwrap();
        let plan = quota.plan_id("p").unwrap();
        let mut svc = api(&quota);
        let t0 = tokio::time::Instant::now();
        let mut admitted = 0;
        let mut at_61 = None;
        while t0.elapsed() < Duration::from_secs(60) {
            match hit(&mut svc, 1, plan).await {
                Ok(_) => {
                    admitted += 1;
                    if admitted == 61 {
                        at_61 = Some(t0.elapsed());
                    }
                }
                Err(e) => {
                    let wait = e.retry_after().unwrap();
                    tokio::time::sleep(wait).await;
                }
            }
        }
        assert_eq!(admitted, expected, "{rate:?}");
        if rate.burst == 60 {
            assert_eq!(at_61, Some(Duration::from_secs(1)));
        }
    }
}

/// A key's line cannot move faster than the global limit refills (found by
/// an audit): plan 10/s, global 1/s, `max_wait` 3 s. The first call passes;
/// the next three join (they start at 1 s, 2 s, 3 s); the fifth would start
/// at 4 s and is refused at once with a `retry_after` of 4 s — it joined on
/// an estimate of 0.4 s (the plan's unit alone) and was refused at 3 s with
/// 100 ms.
#[tokio::test(start_paused = true)]
async fn wait_mode_estimates_a_line_at_the_global_limit() {
    let quota: Quota<u32> = Quota::builder()
        .plan("p", Rate::per_second(10).burst(1))
        .global(Rate::per_second(1).burst(1))
        .max_wait(Duration::from_secs(3))
        .build()
        .unwrap();
    let p = quota.plan_id("p").unwrap();
    let (svc, log) = recording(&quota);
    spawn_call(&svc, (7, p, 1, 0)).await.unwrap().unwrap();
    let mut joined = Vec::new();
    for n in 1..4 {
        joined.push(spawn_call(&svc, (7, p, 1, n)));
        tokio::task::yield_now().await;
    }
    let t0 = tokio::time::Instant::now();
    let fifth = spawn_call(&svc, (7, p, 1, 4)).await.unwrap();
    let r = fifth.expect_err("refused");
    assert_eq!(t0.elapsed(), Duration::ZERO, "at once");
    assert_eq!(r.retry_after(), Some(Duration::from_secs(4)));
    for j in joined {
        j.await.unwrap().unwrap();
    }
    let starts: Vec<Duration> = log.lock().unwrap().iter().map(|e| e.2).collect();
    assert_eq!(
        starts,
        [0, 1, 2, 3].map(Duration::from_secs).to_vec(),
        "the line moves at the global rate"
    );
}

/// A cost above the global limit's burst can never fit: `QuotaExceeded`
/// without `retry_after`, at once, in both modes (it had a `retry_after` of
/// 1 s that never came true, and wait mode waited its `max_wait` for it).
#[tokio::test(start_paused = true)]
async fn a_cost_above_the_global_burst_is_refused_for_good() {
    for max_wait in [None, Some(Duration::from_secs(5))] {
        let mut b = Quota::builder()
            .plan("p", Rate::per_minute(1_000))
            .global(Rate::per_second(50));
        if let Some(w) = max_wait {
            b = b.max_wait(w);
        }
        let quota: Quota<u32> = b.build().unwrap();
        let p = quota.plan_id("p").unwrap();
        let (svc, log) = recording(&quota);
        let t0 = tokio::time::Instant::now();
        let r = spawn_call(&svc, (7, p, 100, 0)).await.unwrap().unwrap_err();
        assert_eq!(t0.elapsed(), Duration::ZERO, "{max_wait:?}");
        assert_eq!(r.kind(), RejectKind::QuotaExceeded);
        assert_eq!(r.retry_after(), None, "{max_wait:?}: {r}");
        assert!(r.to_string().contains("global limit"), "{r}");
        // A cost within both bursts still passes.
        spawn_call(&svc, (7, p, 50, 1)).await.unwrap().unwrap();
        assert_eq!(log.lock().unwrap().len(), 1);
    }
}

/// The snapshot's counts add up to what callers met: a waiter dropped from
/// the line is neither admitted nor refused, a `ShuttingDown` refusal (a
/// waiter released by `close`, a call over its quota after it) is refused.
#[tokio::test(start_paused = true)]
async fn the_snapshot_counts_a_left_waiter_and_shutdown_refusals_as_they_were() {
    let (quota, p) = one_per_second(Duration::from_secs(10));
    let (svc, _log) = recording(&quota);
    spawn_call(&svc, (1, p, 1, 0)).await.unwrap().unwrap();
    // A waiter polled once, then dropped.
    {
        let mut s = svc.clone();
        let fut = s.ready().await.unwrap().call((1, p, 1, 1));
        let mut fut = std::pin::pin!(fut);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(std::future::Future::poll(fut.as_mut(), &mut cx).is_pending());
        assert_eq!(quota.snapshot().waiting, 1);
    }
    let s = quota.snapshot();
    assert_eq!((s.admitted, s.rejected, s.waiting), (1, 0, 0));
    // A waiter released by `close`, then a call over its quota after it.
    let waiter = spawn_call(&svc, (1, p, 1, 2));
    tokio::task::yield_now().await;
    assert_eq!(quota.snapshot().waiting, 1);
    assert_eq!(quota.close(), 1);
    let r = waiter.await.unwrap().unwrap_err();
    assert_eq!(r.kind(), RejectKind::ShuttingDown);
    let r = spawn_call(&svc, (1, p, 1, 3)).await.unwrap().unwrap_err();
    assert_eq!(r.kind(), RejectKind::ShuttingDown);
    let s = quota.snapshot();
    assert_eq!((s.admitted, s.rejected, s.waiting), (1, 2, 0));
}

/// A rate whose unit would refill in under 1 ns is a configuration error
/// for the global limit and for `RateLimit`, as for a plan (the global cell
/// rounded it to 1 ns: 1e9 a second, not what was asked).
#[test]
fn a_rate_too_fine_is_refused_everywhere() {
    let fine = Rate::new(u32::MAX, Duration::from_nanos(1));
    let e = Quota::builder()
        .plan("p", Rate::per_second(1))
        .global(fine)
        .build::<u32>()
        .unwrap_err();
    assert!(e.to_string().contains("too fine"), "{e}");
    assert!(e.to_string().contains("global"), "{e}");
    let e = Quota::builder().plan("p", fine).build::<u32>().unwrap_err();
    assert!(e.to_string().contains("too fine"), "{e}");
    let e = semaforo::quota::RateLimit::builder(fine)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("too fine"), "{e}");
    // Rounded by more than 1 %: 3.33 ns kept as 3 (+11 %).
    let e = semaforo::quota::RateLimit::builder(Rate::per_second(300_000_000))
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("too fine"), "{e}");
    // Within 1 %: 1.01 µs kept as 1.010 µs.
    assert!(Quota::builder()
        .plan("p", Rate::per_second(990_000))
        .build::<u32>()
        .is_ok());
    // The finest that fits: one unit a nanosecond.
    assert!(
        semaforo::quota::RateLimit::builder(Rate::new(1, Duration::from_nanos(1)))
            .build()
            .is_ok()
    );
}

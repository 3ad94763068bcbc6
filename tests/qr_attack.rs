//! Outside tester's attack on `quota` and `route` (attack 3): extreme inputs,
//! cancellation, counts, exact `retry_after`s, the bounds the docs promise.
#![cfg(feature = "http")]
#![allow(clippy::type_complexity)]

use futures::FutureExt;
use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::observe::{EventKind, RouteReason};
use semaforo::pace::Pace;
use semaforo::quota::{HeaderKey, Quota, Rate, RateLimit};
use semaforo::retry::RetryBudget;
use semaforo::route::{Deployment, Hedge, Router};
use semaforo::{BoxError, RejectKind, Rejected};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

// ---------------------------------------------------------------- helpers

fn noop_cx() -> Context<'static> {
    Context::from_waker(futures::task::noop_waker_ref())
}

fn rejected(e: &BoxError) -> &Rejected {
    Rejected::from_box(e).unwrap_or_else(|| panic!("not a Rejected: {e}"))
}

type Req = (&'static str, u32);

/// A quota layer over a service that answers at once: key = req.0 on `plan`,
/// cost = req.1.
fn weighted(
    quota: &Quota<String>,
    plan: &str,
) -> impl Service<Req, Response = (), Error = BoxError, Future: Send> + Clone {
    let plan = quota.plan_id(plan).expect("plan");
    ServiceBuilder::new()
        .layer(
            quota
                .layer(move |r: &Req| (r.0.to_owned(), plan))
                .cost(|r: &Req| r.1),
        )
        .service(service_fn(|_: Req| async { Ok::<_, std::io::Error>(()) }))
}

/// Calls once; the future must be ready at its first poll (fail fast).
fn call_now<S>(svc: &S, req: Req) -> Result<(), BoxError>
where
    S: Service<Req, Response = (), Error = BoxError> + Clone,
{
    let mut s = svc.clone();
    let mut fut = Box::pin(async move { s.ready().await?.call(req).await });
    match fut.as_mut().poll(&mut noop_cx()) {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("call {req:?} did not answer at once"),
    }
}

// ====================================================================
// quota: exact retry_after, and what a wait of exactly that admits
// ====================================================================

/// quota/mod.rs: "Refusals are RejectKind::QuotaExceeded with the exact
/// `retry_after` (to the nanosecond, from the cells' arithmetic)".
#[tokio::test(start_paused = true)]
async fn quota_retry_after_is_exact_to_the_nanosecond_and_waiting_it_admits() {
    for rate in [
        Rate::per_second(3).burst(1),
        Rate::per_minute(60),
        Rate::new(7, Duration::from_millis(13)).burst(2),
        Rate::per_hour(1_000_000).burst(5),
    ] {
        let quota = Quota::builder().plan("p", rate).build::<String>().unwrap();
        let svc = weighted(&quota, "p");
        for _ in 0..rate.burst {
            call_now(&svc, ("k", 1)).unwrap();
        }
        let e = call_now(&svc, ("k", 1)).unwrap_err();
        let r = rejected(&e);
        assert_eq!(r.kind(), RejectKind::QuotaExceeded);
        let ra = r.retry_after().expect("a retry_after");
        // One unit, kept in whole nanoseconds rounded up (Rate's docs).
        let unit = Duration::from_nanos(
            u64::try_from(rate.per.as_nanos().div_ceil(u128::from(rate.count))).unwrap(),
        );
        assert_eq!(ra, unit, "{rate:?}: a full bucket refills one unit");
        // One nanosecond early: still refused, told 1 ns.
        tokio::time::advance(ra - Duration::from_nanos(1)).await;
        let e = call_now(&svc, ("k", 1)).unwrap_err();
        assert_eq!(
            rejected(&e).retry_after(),
            Some(Duration::from_nanos(1)),
            "{rate:?}"
        );
        tokio::time::advance(Duration::from_nanos(1)).await;
        call_now(&svc, ("k", 1)).unwrap_or_else(|e| panic!("{rate:?}: waited exactly, {e}"));
    }
}

/// quota/limit.rs: "A call over the limit is refused at once with
/// QuotaExceeded and the exact `retry_after`".
#[tokio::test(start_paused = true)]
async fn rate_limit_retry_after_is_exact_and_waiting_it_admits() {
    let limit = RateLimit::builder(Rate::per_second(3).burst(2))
        .build()
        .unwrap();
    limit.try_take_n(2).unwrap();
    let r = limit.try_take_n(2).unwrap_err();
    assert_eq!(r.kind(), RejectKind::QuotaExceeded);
    // Two units of 333,333,334 ns (a unit is rounded up to the nanosecond).
    assert_eq!(r.retry_after(), Some(Duration::from_nanos(666_666_668)));
    tokio::time::advance(Duration::from_nanos(666_666_667)).await;
    assert_eq!(
        limit.try_take_n(2).unwrap_err().retry_after(),
        Some(Duration::from_nanos(1))
    );
    tokio::time::advance(Duration::from_nanos(1)).await;
    limit.try_take_n(2).unwrap();
}

/// quota/mod.rs (Rate): "over any window of length `W` it admits at most
/// `count · W / per + burst`". Counted with a weighted cost (tokens): a
/// 7,000,000-per-minute budget.
#[tokio::test(start_paused = true)]
async fn rate_limit_admits_at_most_count_w_per_plus_burst_for_a_token_rate() {
    let rate = Rate::per_minute(7_000_000);
    let limit = RateLimit::builder(rate).build().unwrap();
    let t0 = Instant::now();
    limit.try_take_n(7_000_000).unwrap();
    let mut admitted: u64 = 7_000_000;
    // The bucket's refill, to the nanosecond at which it is full again by the
    // docs' rate: 60 s. Ask a little earlier.
    tokio::time::advance(Duration::from_millis(59_997)).await;
    if limit.try_take_n(7_000_000).is_ok() {
        admitted += 7_000_000;
    }
    let w = t0.elapsed();
    let bound = u64::from(rate.count) as f64 * w.as_secs_f64() / rate.per.as_secs_f64()
        + f64::from(rate.burst);
    assert!(
        admitted as f64 <= bound,
        "admitted {admitted} units within a closed window of {w:?}; the docs' bound is {bound}"
    );
}

/// The same bound through a keyed Quota (quota/mod.rs, `QuotaBuilder::plan`:
/// "A plan admits at most `rate · W + burst` in any window `W`").
#[tokio::test(start_paused = true)]
async fn quota_plan_admits_at_most_rate_w_plus_burst_for_a_token_rate() {
    let rate = Rate::per_minute(7_000_000);
    let quota = Quota::builder()
        .plan("tokens", rate)
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "tokens");
    let t0 = Instant::now();
    call_now(&svc, ("tenant", 7_000_000)).unwrap();
    let mut admitted: u64 = 7_000_000;
    tokio::time::advance(Duration::from_millis(59_997)).await;
    if call_now(&svc, ("tenant", 7_000_000)).is_ok() {
        admitted += 7_000_000;
    }
    let w = t0.elapsed();
    let bound = 7_000_000.0 * w.as_secs_f64() / 60.0 + 7_000_000.0;
    assert!(
        admitted as f64 <= bound,
        "admitted {admitted} within {w:?}; bound {bound}"
    );
}

/// quota/mod.rs: "Its refusal's `retry_after` is the longer of the global
/// wait and the key's own ..., and names the limit that waits longer: a
/// caller that comes back then is not refused by its plan instead."
#[tokio::test(start_paused = true)]
async fn quota_global_refusal_names_the_longer_wait_and_coming_back_then_admits() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(1))
        .global(Rate::per_second(2).burst(1))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    call_now(&svc, ("a", 1)).unwrap();
    // "a" again: the global waits 0.5 s, the key 1 s → 1 s, the plan named.
    let e = call_now(&svc, ("a", 1)).unwrap_err();
    let r = rejected(&e);
    assert_eq!(r.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(r.policy().map(|p| p.name.to_string()).as_deref(), Some("p"));
    // "b" (new key): only the global waits, 0.5 s.
    let e = call_now(&svc, ("b", 1)).unwrap_err();
    let r = rejected(&e);
    assert_eq!(r.retry_after(), Some(Duration::from_millis(500)));
    assert_eq!(
        r.policy().map(|p| p.name.to_string()).as_deref(),
        Some("global")
    );
    // "A call refused on a key not seen leaves no key behind."
    assert_eq!(quota.snapshot().keys, 1);
    tokio::time::advance(Duration::from_millis(500)).await;
    call_now(&svc, ("b", 1)).unwrap();
    // "a" now: the global waits 0.5 s again, the key 0.5 s.
    let e = call_now(&svc, ("a", 1)).unwrap_err();
    let ra = rejected(&e).retry_after().unwrap();
    assert_eq!(ra, Duration::from_millis(500));
    tokio::time::advance(ra).await;
    call_now(&svc, ("a", 1)).unwrap();
    let s = quota.snapshot();
    assert_eq!((s.admitted, s.rejected), (3, 3));
}

// ====================================================================
// quota: weighted cost, extremes
// ====================================================================

/// quota/service.rs (QuotaCost::cost): "The cost of `req` (0 is free:
/// admitted without a check)" — also in wait mode, with a line of its key.
#[tokio::test(start_paused = true)]
async fn quota_wait_mode_a_free_call_is_admitted_without_a_check_even_behind_a_line() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(2))
        .max_wait(Duration::from_secs(1))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    call_now(&svc, ("a", 2)).unwrap();
    tokio::time::advance(Duration::from_millis(1_900)).await;
    // Fits in 0.1 s: it waits in "a"'s line.
    let mut s = svc.clone();
    let mut waiter = Box::pin(async move { s.ready().await?.call(("a", 2)).await });
    assert!(waiter.as_mut().poll(&mut noop_cx()).is_pending());
    assert_eq!(quota.snapshot().waiting, 1);
    // A free call of the same key.
    let mut s = svc.clone();
    let free = async move { s.ready().await?.call(("a", 0)).await }.now_or_never();
    match free {
        Some(Ok(())) => {}
        Some(Err(e)) => panic!("a call of cost 0 was refused: {e}"),
        None => panic!("a call of cost 0 waits in line"),
    }
    drop(waiter);
}

/// quota/mod.rs: "**Weighted cost** (`cost(&Req)`): a cost that can never
/// fit a burst is a clear `QuotaExceeded` without `retry_after`, not an
/// endless wait." — in wait mode, with a line of its key.
#[tokio::test(start_paused = true)]
async fn quota_wait_mode_a_cost_above_the_burst_is_refused_at_once_without_retry_after() {
    let mut failures = Vec::new();
    for max_wait in [Duration::from_secs(1), Duration::from_secs(60)] {
        let quota = Quota::builder()
            .plan("p", Rate::per_second(1).burst(2))
            .max_wait(max_wait)
            .build::<String>()
            .unwrap();
        let svc = weighted(&quota, "p");
        call_now(&svc, ("a", 2)).unwrap();
        tokio::time::advance(Duration::from_millis(1_900)).await;
        let mut s = svc.clone();
        let mut waiter = Box::pin(async move { s.ready().await?.call(("a", 2)).await });
        assert!(waiter.as_mut().poll(&mut noop_cx()).is_pending());
        let mut s = svc.clone();
        let never = async move { s.ready().await?.call(("a", 3)).await }.now_or_never();
        match never {
            Some(Err(e)) => {
                let r = rejected(&e);
                assert_eq!(r.kind(), RejectKind::QuotaExceeded);
                if r.retry_after().is_some() {
                    failures.push(format!(
                        "max_wait {max_wait:?}: a cost of 3 over a burst of 2 told to come back in {:?}",
                        r.retry_after()
                    ));
                }
            }
            Some(Ok(())) => panic!("admitted a cost above the burst"),
            None => failures.push(format!(
                "max_wait {max_wait:?}: a cost above the burst waits in line"
            )),
        }
        drop(waiter);
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Same promise, fail-fast mode and RateLimit: never `retry_after`, for
/// costs up to u32::MAX; the counts add up.
#[tokio::test(start_paused = true)]
async fn quota_and_rate_limit_huge_costs_are_refused_for_good() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(10))
        .global(Rate::per_second(100).burst(20))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    for cost in [11, 1_000, u32::MAX] {
        let e = call_now(&svc, ("a", cost)).unwrap_err();
        assert_eq!(rejected(&e).retry_after(), None, "cost {cost}");
    }
    let limit = RateLimit::builder(Rate::per_second(10)).build().unwrap();
    for n in [11, u32::MAX] {
        assert_eq!(limit.try_take_n(n).unwrap_err().retry_after(), None);
    }
    limit.try_take_n(0).unwrap();
    limit.try_take_n(10).unwrap();
    let s = quota.snapshot();
    assert_eq!((s.admitted, s.rejected, s.keys), (0, 3, 0));
}

/// QuotaBuilder::build: errors for a rate of 0, a zero or too fine period, a
/// refill above 100 years — never a panic; the edges within are usable.
#[tokio::test(start_paused = true)]
async fn quota_extreme_rates_are_errors_or_work_exactly() {
    let bad = [
        Rate::new(0, Duration::from_secs(1)),
        Rate::new(1, Duration::ZERO),
        Rate::new(1, Duration::MAX),
        Rate::new(u32::MAX, Duration::from_secs(1)),
        Rate::new(u32::MAX, Duration::MAX),
        Rate::per_second(1).burst(u32::MAX),
        Rate::per_second(1).burst(0),
    ];
    for rate in bad {
        assert!(
            Quota::builder().plan("p", rate).build::<String>().is_err(),
            "{rate:?}"
        );
        assert!(RateLimit::builder(rate).build().is_err(), "{rate:?}");
        assert!(
            Quota::builder()
                .plan("p", Rate::per_second(1))
                .global(rate)
                .build::<String>()
                .is_err(),
            "{rate:?}"
        );
    }
    // 1 per 100 years: allowed; the second call waits exactly 100 years.
    let century = Duration::from_secs(100 * 365 * 86_400);
    let quota = Quota::builder()
        .plan("p", Rate::new(1, century))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    call_now(&svc, ("k", 1)).unwrap();
    let e = call_now(&svc, ("k", 1)).unwrap_err();
    assert_eq!(rejected(&e).retry_after(), Some(century));
    // 1 per nanosecond: allowed.
    let limit = RateLimit::builder(Rate::new(1, Duration::from_nanos(1)))
        .build()
        .unwrap();
    limit.try_take().unwrap();
    assert_eq!(
        limit.try_take().unwrap_err().retry_after(),
        Some(Duration::from_nanos(1))
    );
    // u32::MAX per ~100 years with a burst of u32::MAX: a full burst at once.
    let per = Duration::from_nanos(u64::from(u32::MAX) * 700_000_000);
    let limit = RateLimit::builder(Rate::new(u32::MAX, per))
        .build()
        .unwrap();
    limit.try_take_n(u32::MAX).unwrap();
    assert_eq!(
        limit.try_take().unwrap_err().retry_after(),
        Some(Duration::from_nanos(700_000_000))
    );
    // max_wait: zero is an error, MAX works.
    assert!(Quota::builder()
        .plan("p", Rate::per_second(1))
        .max_wait(Duration::ZERO)
        .build::<String>()
        .is_err());
}

/// Wait mode with max_wait = Duration::MAX: a call waits its turn and is
/// admitted at the refill instant (no overflow, no panic).
#[tokio::test(start_paused = true)]
async fn quota_wait_mode_max_wait_duration_max() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(1))
        .max_wait(Duration::MAX)
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    let t0 = Instant::now();
    svc.clone().oneshot(("k", 1)).await.unwrap();
    svc.clone().oneshot(("k", 1)).await.unwrap();
    svc.clone().oneshot(("k", 1)).await.unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_millis(2_002),
        "{took:?}"
    );
    let s = quota.snapshot();
    assert_eq!((s.admitted, s.rejected, s.waiting), (3, 0, 0));
}

// ====================================================================
// quota: cancellation in wait mode, counts
// ====================================================================

/// service.rs (ResponseFuture): "Dropping it while it waits takes it out of
/// its key's line (the next one moves up)." QuotaSnapshot: `admitted`
/// "Calls admitted so far", `waiting` "Calls waiting in line now".
#[tokio::test(start_paused = true)]
async fn quota_wait_mode_futures_dropped_after_n_polls_hold_nothing() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(1))
        .global(Rate::per_second(10).burst(10))
        .max_wait(Duration::from_secs(30))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    call_now(&svc, ("k", 1)).unwrap();
    for polls in 0..6 {
        // Several waiters, each dropped after `polls` polls, time moving
        // a little between polls (never to the refill).
        let mut futs: Vec<_> = (0..3)
            .map(|_| {
                let mut s = svc.clone();
                Box::pin(async move { s.ready().await?.call(("k", 1)).await })
            })
            .collect();
        for _ in 0..polls {
            for f in &mut futs {
                assert!(f.as_mut().poll(&mut noop_cx()).is_pending());
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        drop(futs);
        assert_eq!(quota.snapshot().waiting, 0, "after {polls} polls");
    }
    // The key is not blocked: the next call waits only for its refill.
    let t = Instant::now();
    svc.clone().oneshot(("k", 1)).await.unwrap();
    assert!(
        t.elapsed() <= Duration::from_millis(1_000),
        "{:?}",
        t.elapsed()
    );
    let s = quota.snapshot();
    assert_eq!((s.admitted, s.rejected, s.waiting), (2, 0, 0));
}

/// A user's service whose `clone` panics while a call joins the wait line:
/// the line must not keep a ghost (service.rs: "If the clone (the caller's
/// code) panics, the place in line goes with it").
#[tokio::test(start_paused = true)]
async fn quota_wait_mode_a_panicking_clone_leaves_no_ghost_in_line() {
    #[derive(Debug)]
    struct Fragile {
        clones: Arc<AtomicUsize>,
        panic_at: usize,
    }
    impl Clone for Fragile {
        fn clone(&self) -> Self {
            let n = self.clones.fetch_add(1, Ordering::SeqCst);
            if n == self.panic_at {
                panic!("user clone panics");
            }
            Fragile {
                clones: self.clones.clone(),
                panic_at: self.panic_at,
            }
        }
    }
    impl Service<Req> for Fragile {
        type Response = ();
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<(), std::io::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Req) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(1))
        .max_wait(Duration::from_secs(30))
        .build::<String>()
        .unwrap();
    let plan = quota.plan_id("p").unwrap();
    let clones = Arc::new(AtomicUsize::new(0));
    let mut svc = quota
        .layer(move |r: &Req| (r.0.to_owned(), plan))
        .layer(Fragile {
            clones: clones.clone(),
            panic_at: 0,
        });
    // Admitted at once (no clone).
    svc.call(("k", 1)).await.unwrap();
    // Joins the line: the clone panics.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(svc.call(("k", 1)));
    }));
    assert!(caught.is_err());
    assert_eq!(quota.snapshot().waiting, 0, "a ghost stays in line");
    // The key's next call is admitted at the refill instant, not held
    // behind a ghost until max_wait.
    let t = Instant::now();
    svc.call(("k", 1)).await.unwrap();
    assert!(
        t.elapsed() <= Duration::from_millis(1_001),
        "{:?}",
        t.elapsed()
    );
}

/// A panicking key closure: the panic is the caller's; nothing is counted
/// as held and the quota goes on.
#[tokio::test(start_paused = true)]
async fn quota_a_panicking_key_closure_leaves_counts_consistent() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(1))
        .max_wait(Duration::from_secs(5))
        .build::<String>()
        .unwrap();
    let plan = quota.plan_id("p").unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(quota.layer(move |r: &Req| {
            if r.0 == "boom" {
                panic!("user key closure");
            }
            (r.0.to_owned(), plan)
        }))
        .service(service_fn(|_: Req| async { Ok::<_, std::io::Error>(()) }));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(svc.call(("boom", 1)));
    }));
    assert!(caught.is_err());
    svc.call(("k", 1)).await.unwrap();
    let s = quota.snapshot();
    assert_eq!((s.admitted, s.rejected, s.waiting), (1, 0, 0));
}

/// Snapshot counts add up over a mix: admitted + rejected = calls (no wait
/// mode), refusals of every kind (plan, global, never).
#[tokio::test(start_paused = true)]
async fn quota_snapshot_counts_add_up() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(2).burst(3))
        .global(Rate::per_second(5).burst(6))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    let (mut ok, mut no) = (0u64, 0u64);
    let keys = ["a", "b", "c", "d"];
    for step in 0..400u32 {
        let key = keys[(step as usize * 7) % 4];
        let cost = [1, 1, 2, 0, 4, 3][step as usize % 6];
        match call_now(&svc, (key, cost)) {
            Ok(()) => ok += 1,
            Err(_) => no += 1,
        }
        if step % 3 == 0 {
            tokio::time::advance(Duration::from_millis(137)).await;
        }
    }
    let s = quota.snapshot();
    assert_eq!((s.admitted, s.rejected), (ok, no));
}

// ====================================================================
// quota: evict_idle, HeaderKey
// ====================================================================

/// quota/mod.rs: "Keys idle for longer than their refill period ... are
/// indistinguishable from new ones"; `evict_idle` "Sweeps keys idle for
/// longer than their refill period now."
#[tokio::test(start_paused = true)]
async fn quota_evict_idle_drops_exactly_the_keys_whose_bucket_is_full() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(5))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    let names: Vec<&'static str> = (0..50)
        .map(|i| &*Box::leak(format!("user-{i}").into_boxed_str()))
        .collect();
    for n in &names {
        call_now(&svc, (n, 1)).unwrap(); // refills in 1 s
    }
    call_now(&svc, ("heavy", 5)).unwrap(); // refills in 5 s
    assert_eq!(quota.snapshot().keys, 51);
    let sweeps = quota.snapshot().sweeps;
    tokio::time::advance(Duration::from_millis(999)).await;
    quota.evict_idle();
    assert_eq!(quota.snapshot().keys, 51);
    tokio::time::advance(Duration::from_millis(1)).await;
    quota.evict_idle();
    assert_eq!(quota.snapshot().keys, 1);
    assert!(quota.snapshot().sweeps >= sweeps + 2);
    // "heavy" kept its debt: 4 units available at 4 s... not 5.
    tokio::time::advance(Duration::from_millis(3_000)).await; // t = 4 s
    let e = call_now(&svc, ("heavy", 5)).unwrap_err();
    assert_eq!(rejected(&e).retry_after(), Some(Duration::from_secs(1)));
    // An evicted key gets a full burst again.
    call_now(&svc, ("user-0", 5)).unwrap();
}

/// service.rs (HeaderKey): "The key is an `http::Request` header (an API
/// key, a user id), every key on one plan; requests without the header share
/// the key `"anonymous"`." Two callers with different header values are
/// different keys.
#[tokio::test(start_paused = true)]
async fn header_key_distinct_non_ascii_values_are_distinct_keys() {
    let quota = Quota::builder()
        .plan("p", Rate::per_minute(1).burst(1))
        .build::<String>()
        .unwrap();
    let plan = quota.plan_id("p").unwrap();
    let svc = ServiceBuilder::new()
        .layer(quota.layer(HeaderKey::new(
            http::HeaderName::from_static("x-api-key"),
            plan,
        )))
        .service(service_fn(|_: http::Request<()>| async {
            Ok::<_, std::io::Error>(())
        }));
    let req = |v: &[u8]| {
        let mut r = http::Request::new(());
        r.headers_mut().insert(
            "x-api-key",
            http::HeaderValue::from_bytes(v).expect("obs-text is a valid header value"),
        );
        r
    };
    svc.clone().oneshot(req(b"caf\xe9-1")).await.unwrap();
    // Another caller (another API key).
    let other = svc.clone().oneshot(req(b"caf\xe9-2")).await;
    assert!(
        other.is_ok(),
        "a caller with another key value was refused: {:?}",
        other.err().map(|e| e.to_string())
    );
    // And a caller without the header is not charged to either.
    let anon = svc.clone().oneshot(http::Request::new(())).await;
    assert!(anon.is_ok(), "{:?}", anon.err().map(|e| e.to_string()));
}

// ====================================================================
// quota / rate limit: threads
// ====================================================================

/// RateLimit: "A rate limit shared by every call through its layers (and
/// every clone) ... as one GCRA cell updated by a compare-and-swap": with
/// 1 unit an hour, burst 100, any number of threads admit exactly 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_threads_admit_exactly_the_burst() {
    let limit = RateLimit::builder(Rate::per_hour(1).burst(100))
        .build()
        .unwrap();
    let admitted = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let limit = limit.clone();
            let admitted = admitted.clone();
            tokio::spawn(async move {
                for i in 0..2_000 {
                    if limit.try_take().is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 100);
}

/// Quota with a global limit, threads on shared and own keys: a key never
/// exceeds its burst, the global never exceeds its own, and the snapshot
/// counts what callers saw.
#[test]
fn quota_threads_keys_and_global_bounds_and_counts() {
    let quota = Quota::builder()
        .plan("p", Rate::per_hour(1).burst(3))
        .global(Rate::per_hour(1).burst(40))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    let keys: Vec<&'static str> = (0..30)
        .map(|i| &*Box::leak(format!("k{i}").into_boxed_str()))
        .collect();
    let per_key: Mutex<std::collections::HashMap<&'static str, u64>> = Mutex::default();
    let (ok, no) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let (svc, keys, per_key, ok, no) = (svc.clone(), &keys, &per_key, &ok, &no);
            s.spawn(move || {
                for i in 0..600u32 {
                    let k = keys[((i * 7 + t) % 30) as usize];
                    match call_now(&svc, (k, 1)) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            *per_key.lock().unwrap().entry(k).or_default() += 1;
                        }
                        Err(_) => {
                            no.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let ok = ok.load(Ordering::Relaxed);
    assert!(ok <= 40, "global burst 40, admitted {ok}");
    for (k, n) in per_key.lock().unwrap().iter() {
        assert!(*n <= 3, "key {k}: {n}");
    }
    let s = quota.snapshot();
    assert_eq!((s.admitted, s.rejected), (ok, no.load(Ordering::Relaxed)));
}

// ====================================================================
// route
// ====================================================================

type Svc = BoxCloneSyncService<u32, &'static str, BoxError>;

/// A deployment answering `name` after `delay`, or failing with `fail`
/// (an io error kind), counting its calls.
fn svc(
    name: &'static str,
    delay: Duration,
    fail: Option<std::io::ErrorKind>,
    calls: Arc<AtomicUsize>,
) -> Svc {
    BoxCloneSyncService::new(service_fn(move |_: u32| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match fail {
                Some(kind) => Err(BoxError::from(std::io::Error::from(kind))),
                None => Ok(name),
            }
        }
    }))
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

#[derive(Default, Clone)]
struct Events(Arc<Mutex<Vec<String>>>);
impl Events {
    fn listener(&self) -> impl Fn(&semaforo::observe::Event<'_>) + Send + Sync + 'static {
        let me = self.0.clone();
        move |e| {
            let s = match &e.kind {
                EventKind::Routed {
                    deployment, why, ..
                } => match why {
                    RouteReason::First => format!("first:{deployment}"),
                    RouteReason::FailedOver { from, .. } => {
                        format!("failover:{from}->{deployment}")
                    }
                    RouteReason::FellBack { from, .. } => format!("fallback:{from}->{deployment}"),
                    RouteReason::Hedge { from } => format!("hedge:{from}->{deployment}"),
                    _ => format!("other:{deployment}"),
                },
                EventKind::HedgeSettled { hedge_won, .. } => format!("settled:{hedge_won}"),
                other => format!("{other:?}").chars().take(40).collect(),
            };
            me.lock().unwrap().push(s);
        }
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// RouterBuilder::build errors: "`deployments` (none, or two of one name),
/// `weight` (0), `max_attempts` (0), `group` / `fallback` naming a group
/// without deployments, or `hedge` (a `max_share` outside (0, 1], a quantile
/// outside [0, 1])" — errors, never panics.
#[tokio::test(start_paused = true)]
async fn router_bad_configurations_are_errors() {
    let d = |n: &'static str| Deployment::new(n, svc(n, Duration::ZERO, None, counter()));
    assert!(Router::<Svc>::builder().build().is_err());
    assert!(Router::builder()
        .deployment(d("a"))
        .deployment(d("a"))
        .build()
        .is_err());
    assert!(Router::builder()
        .deployment(d("a").weight(0))
        .build()
        .is_err());
    assert!(Router::builder()
        .deployment(d("a"))
        .max_attempts(0)
        .build()
        .is_err());
    assert!(Router::builder()
        .deployment(d("a"))
        .group("nope")
        .build()
        .is_err());
    for share in [0.0, -1.0, 1.5, f64::NAN, f64::INFINITY] {
        assert!(
            Router::builder()
                .deployment(d("a"))
                .hedge(Hedge::After(Duration::from_millis(1)), share)
                .build()
                .is_err(),
            "{share}"
        );
    }
    for q in [-0.1, 1.1, f64::NAN] {
        assert!(Router::builder()
            .deployment(d("a"))
            .hedge(
                Hedge::Percentile {
                    quantile: q,
                    warm_up: 1
                },
                0.5
            )
            .build()
            .is_err());
    }
    // Edges that are fine.
    let r = Router::builder()
        .deployment(d("a").weight(u32::MAX).preference(u32::MAX))
        .deployment(d("b").weight(1))
        .max_attempts(u32::MAX)
        .deadline(Duration::MAX)
        .hedge(Hedge::After(Duration::MAX), 1.0)
        .build()
        .unwrap();
    let out = r.clone().oneshot(1).await.unwrap();
    assert!(out == "a" || out == "b");
}

/// RouterBuilder::deadline: "A call whose earliest start is beyond it is
/// refused at once (`BudgetExceeded` with the exact `retry_after`)". A
/// caller that comes back after exactly that is taken.
#[tokio::test(start_paused = true)]
async fn router_deadline_refusal_has_the_exact_retry_after_and_waiting_it_works() {
    let pace = Pace::builder().requests_per_minute(1).build().unwrap();
    let calls = counter();
    let paced = pace
        .layer()
        .layer(svc("a", Duration::ZERO, None, calls.clone()));
    let router = Router::builder()
        .deployment(Deployment::new("a", BoxCloneSyncService::new(paced)).pace(pace.clone()))
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap();
    let t0 = Instant::now();
    router.clone().oneshot(1).await.unwrap();
    let e = router.clone().oneshot(2).await.unwrap_err();
    let r = rejected(&e);
    assert_eq!(r.kind(), RejectKind::BudgetExceeded);
    let ra = r.retry_after().expect("a retry_after");
    assert_eq!(t0.elapsed(), Duration::ZERO, "refused at once");
    assert!(
        ra <= Duration::from_secs(60) && ra >= Duration::from_millis(59_999),
        "{ra:?}"
    );
    tokio::time::advance(ra).await;
    let again = router.clone().oneshot(3).await;
    assert!(
        again.is_ok(),
        "came back after exactly retry_after {ra:?}: {:?}",
        again.err().map(|e| e.to_string())
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// max_attempts at u32::MAX with every deployment failing at once, a
/// deadline: no hang, the documented error, the executor not held.
#[tokio::test(start_paused = true)]
async fn router_max_attempts_u32_max_with_a_deadline_ends() {
    let (ca, cb) = (counter(), counter());
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            svc(
                "a",
                Duration::ZERO,
                Some(std::io::ErrorKind::ConnectionRefused),
                ca.clone(),
            ),
        ))
        .deployment(Deployment::new(
            "b",
            svc(
                "b",
                Duration::ZERO,
                Some(std::io::ErrorKind::ConnectionReset),
                cb.clone(),
            ),
        ))
        .max_attempts(u32::MAX)
        .deadline(Duration::from_secs(30))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(120), router.oneshot(1))
        .await
        .expect("the router ends by its deadline");
    let e = out.unwrap_err();
    assert!(
        t0.elapsed() <= Duration::from_secs(30),
        "{:?}",
        t0.elapsed()
    );
    // The last answer, or Timeout.
    let io = e.downcast_ref::<std::io::Error>().is_some();
    let timeout = Rejected::from_box(&e).is_some_and(|r| r.kind() == RejectKind::Timeout);
    assert!(io || timeout, "{e}");
}

/// max_attempts(1): exactly one call upstream, whatever fails.
#[tokio::test(start_paused = true)]
async fn router_max_attempts_one_sends_once() {
    let (ca, cb) = (counter(), counter());
    let events = Events::default();
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            svc(
                "a",
                Duration::ZERO,
                Some(std::io::ErrorKind::ConnectionRefused),
                ca.clone(),
            ),
        ))
        .deployment(Deployment::new(
            "b",
            svc(
                "b",
                Duration::ZERO,
                Some(std::io::ErrorKind::ConnectionRefused),
                cb.clone(),
            ),
        ))
        .max_attempts(1)
        .hedge(Hedge::After(Duration::from_millis(1)), 1.0)
        .on_event(events.listener())
        .build()
        .unwrap();
    for i in 0..10 {
        let _ = router.clone().oneshot(i).await.unwrap_err();
    }
    assert_eq!(ca.load(Ordering::SeqCst) + cb.load(Ordering::SeqCst), 10);
    let ev = events.take();
    assert_eq!(
        ev.iter().filter(|e| e.starts_with("first:")).count(),
        10,
        "{ev:?}"
    );
}

/// Failover and events: "an EventKind::Routed per attempt: which
/// deployment, why". Routed events = calls upstream.
#[tokio::test(start_paused = true)]
async fn router_events_tell_each_attempt_and_failover() {
    let (ca, cb) = (counter(), counter());
    let events = Events::default();
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            svc(
                "a",
                Duration::ZERO,
                Some(std::io::ErrorKind::ConnectionRefused),
                ca.clone(),
            ),
        ))
        .deployment(Deployment::new("b", svc("b", Duration::ZERO, None, cb.clone())).preference(1))
        .on_event(events.listener())
        .build()
        .unwrap();
    let out = router.clone().oneshot(1).await.unwrap();
    assert_eq!(out, "b");
    assert_eq!(events.take(), ["first:a", "failover:a->b"]);
    assert_eq!(
        (ca.load(Ordering::SeqCst), cb.load(Ordering::SeqCst)),
        (1, 1)
    );
}

/// Deployment::weight: "ties: smooth weighted round robin, so 3:1 weights
/// get 3 calls of 4"; u32::MAX weights do not overflow.
#[tokio::test(start_paused = true)]
async fn router_weights_share_ties_exactly() {
    for (wa, wb, n, want_a) in [
        (3u32, 1u32, 400usize, 300usize),
        (1, 1, 101, 51),
        (u32::MAX, 1, 500, 500),
    ] {
        let (ca, cb) = (counter(), counter());
        let router = Router::builder()
            .deployment(Deployment::new("a", svc("a", Duration::ZERO, None, ca.clone())).weight(wa))
            .deployment(Deployment::new("b", svc("b", Duration::ZERO, None, cb.clone())).weight(wb))
            .build()
            .unwrap();
        for i in 0..n {
            router.clone().oneshot(i as u32).await.unwrap();
        }
        let a = ca.load(Ordering::SeqCst);
        assert!(
            a == want_a || (wa == u32::MAX && a >= n - 1),
            "weights {wa}:{wb}: a took {a} of {n}"
        );
    }
}

/// Deployment::preference: "a cheaper or nearer deployment takes every call
/// it can start as soon as any other".
#[tokio::test(start_paused = true)]
async fn router_preference_takes_every_tie() {
    let (ca, cb) = (counter(), counter());
    let router = Router::builder()
        .deployment(
            Deployment::new("a", svc("a", Duration::ZERO, None, ca.clone()))
                .weight(100)
                .preference(1),
        )
        .deployment(Deployment::new("b", svc("b", Duration::ZERO, None, cb.clone())).preference(0))
        .build()
        .unwrap();
    for i in 0..50 {
        assert_eq!(router.clone().oneshot(i).await.unwrap(), "b");
    }
}

/// RouteFuture: "Dropping it at any point drops the attempt in flight (a
/// deployment's layers give back what it held); nothing else is held
/// between attempts." Bulkheads attached, hedging on: polled 1..N times
/// with time moving, then dropped.
#[tokio::test(start_paused = true)]
async fn router_dropped_after_n_polls_holds_no_permit() {
    let bulk = |n| {
        Bulkhead::builder(1)
            .name(n)
            .max_queue(4)
            .max_wait(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let (ba, bb) = (bulk("a"), bulk("b"));
    let (ca, cb) = (counter(), counter());
    let sa = BoxCloneSyncService::new(ba.layer().layer(svc(
        "a",
        Duration::from_secs(5),
        None,
        ca.clone(),
    )));
    let sb = BoxCloneSyncService::new(bb.layer().layer(svc(
        "b",
        Duration::from_secs(5),
        None,
        cb.clone(),
    )));
    let router = Router::builder()
        .deployment(Deployment::new("a", sa).bulkhead(ba.clone()))
        .deployment(Deployment::new("b", sb).bulkhead(bb.clone()))
        .hedge(Hedge::After(Duration::from_millis(100)), 1.0)
        .deadline(Duration::from_secs(60))
        .build()
        .unwrap();
    for polls in 1..12 {
        let mut futs: Vec<_> = (0..3)
            .map(|i| Box::pin(router.clone().oneshot(i)))
            .collect();
        for _ in 0..polls {
            for f in &mut futs {
                let _ = f.as_mut().poll(&mut noop_cx());
            }
            tokio::time::advance(Duration::from_millis(70)).await;
        }
        drop(futs);
        for b in [&ba, &bb] {
            let s = b.snapshot();
            assert_eq!(
                (s.in_flight, s.waiting),
                (0, 0),
                "after {polls} polls: {s:?}"
            );
        }
    }
    // Both still take calls.
    tokio::time::advance(Duration::from_secs(10)).await;
    let out = router.clone().oneshot(9).await.unwrap();
    assert!(out == "a" || out == "b");
}

/// RouterBuilder::retry_budget: "each call deposits, each further attempt
/// withdraws, and a call whose budget is spent ends with its last answer".
#[tokio::test(start_paused = true)]
async fn router_an_empty_retry_budget_ends_with_the_last_answer() {
    let (ca, cb) = (counter(), counter());
    let budget = Arc::new(RetryBudget::new(0.0, 0.0, Duration::from_secs(10)).unwrap());
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            svc(
                "a",
                Duration::ZERO,
                Some(std::io::ErrorKind::ConnectionRefused),
                ca.clone(),
            ),
        ))
        .deployment(Deployment::new("b", svc("b", Duration::ZERO, None, cb.clone())).preference(1))
        .retry_budget(budget.clone())
        .build()
        .unwrap();
    let e = router.clone().oneshot(1).await.unwrap_err();
    assert!(e.downcast_ref::<std::io::Error>().is_some(), "{e}");
    assert_eq!(
        (ca.load(Ordering::SeqCst), cb.load(Ordering::SeqCst)),
        (1, 0)
    );
}

/// Module docs: "when every deployment's breaker is open, `CircuitOpen`
/// with the soonest reopen (none for a breaker forced open)". A caller that
/// comes back then is taken (the half-open probe).
#[tokio::test(start_paused = true)]
async fn router_all_breakers_open_says_when_and_coming_back_then_works() {
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mk = |name: &'static str, open_for: u64| {
        let breaker = Breaker::builder()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(open_for))
            .build()
            .unwrap();
        let fail = fail.clone();
        let inner = service_fn(move |_: u32| {
            let fail = fail.load(Ordering::SeqCst);
            async move {
                if fail {
                    Err(BoxError::from(std::io::Error::from(
                        std::io::ErrorKind::ConnectionRefused,
                    )))
                } else {
                    Ok(name)
                }
            }
        });
        let s = BoxCloneSyncService::new(breaker.layer().layer(inner));
        (Deployment::new(name, s).breaker(breaker.clone()), breaker)
    };
    let (da, _ba) = mk("a", 10);
    let (db, _bb) = mk("b", 7);
    let router = Router::builder()
        .deployment(da)
        .deployment(db)
        .max_attempts(2)
        .build()
        .unwrap();
    let _ = router.clone().oneshot(1).await.unwrap_err(); // opens both
    let e = router.clone().oneshot(2).await.unwrap_err();
    let r = rejected(&e);
    assert_eq!(r.kind(), RejectKind::CircuitOpen);
    assert_eq!(r.retry_after(), Some(Duration::from_secs(7)));
    fail.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(7)).await;
    assert_eq!(router.clone().oneshot(3).await.unwrap(), "b");

    // Forced open: no retry_after.
    let (dc, bc) = mk("c", 10);
    bc.force_open();
    let router = Router::builder().deployment(dc).build().unwrap();
    let e = router.oneshot(4).await.unwrap_err();
    let r = rejected(&e);
    assert_eq!(r.kind(), RejectKind::CircuitOpen);
    assert_eq!(r.retry_after(), None);
}

/// Module docs: "A deployment's own `Retry-After` ... so is the
/// `retry_after` of a refusal by its own layers (a quota or rate limit
/// inside it ...): it is not asked again before then, and a wait past the
/// deadline is not slept (the refusal comes back at once)."
#[tokio::test(start_paused = true)]
async fn router_inner_rate_limit_refusal_is_waited_or_returned_at_once() {
    let limit = RateLimit::builder(Rate::per_second(1).burst(1))
        .build()
        .unwrap();
    let calls = counter();
    let inner = BoxCloneSyncService::new(limit.layer().layer(svc(
        "a",
        Duration::ZERO,
        None,
        calls.clone(),
    )));
    let router = Router::builder()
        .deployment(Deployment::new("a", inner.clone()))
        .max_attempts(3)
        .backoff(None)
        .build()
        .unwrap();
    router.clone().oneshot(1).await.unwrap();
    let t = Instant::now();
    router.clone().oneshot(2).await.unwrap();
    assert_eq!(
        t.elapsed(),
        Duration::from_secs(1),
        "waited exactly the limit's retry_after"
    );

    let router = Router::builder()
        .deployment(Deployment::new("a", inner))
        .max_attempts(3)
        .deadline(Duration::from_millis(500))
        .build()
        .unwrap();
    let t = Instant::now();
    let e = router.clone().oneshot(3).await.unwrap_err();
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(rejected(&e).kind(), RejectKind::QuotaExceeded);
}

/// Hedging: "At most `max_share` (in (0, 1]) of the recent calls are hedged
/// (plus one ...)", and "a hedge counts as an attempt (within
/// `max_attempts`)"; HedgeSettled told for each hedged call answered.
#[tokio::test(start_paused = true)]
async fn router_hedges_stay_within_their_share() {
    let (ca, cb) = (counter(), counter());
    let events = Events::default();
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            svc("a", Duration::from_millis(200), None, ca.clone()),
        ))
        .deployment(Deployment::new(
            "b",
            svc("b", Duration::from_millis(200), None, cb.clone()),
        ))
        .hedge(Hedge::After(Duration::from_millis(50)), 0.1)
        .build()
        .unwrap();
    let router = {
        // rebuild with the listener
        let _ = router;
        Router::builder()
            .deployment(Deployment::new(
                "a",
                svc("a", Duration::from_millis(200), None, ca.clone()),
            ))
            .deployment(Deployment::new(
                "b",
                svc("b", Duration::from_millis(200), None, cb.clone()),
            ))
            .hedge(Hedge::After(Duration::from_millis(50)), 0.1)
            .on_event(events.listener())
            .build()
            .unwrap()
    };
    for i in 0..200 {
        router.clone().oneshot(i).await.unwrap();
    }
    let ev = events.take();
    let hedges = ev.iter().filter(|e| e.starts_with("hedge:")).count();
    let settled = ev.iter().filter(|e| e.starts_with("settled:")).count();
    assert!(
        hedges as f64 <= 0.1 * 200.0 + 1.0,
        "{hedges} hedges of 200 calls"
    );
    assert!(hedges >= 1);
    assert_eq!(settled, hedges, "{ev:?}");
    assert_eq!(
        ca.load(Ordering::SeqCst) + cb.load(Ordering::SeqCst),
        200 + hedges
    );
}

/// RouterBuilder::fallback: "A `Permanent` answer of `reason` moves the call
/// to the deployments of `group`, once per call ... The move is one more
/// attempt, within `max_attempts`."
#[tokio::test(start_paused = true)]
async fn router_fallback_once_and_within_max_attempts() {
    use semaforo::classify::Permanent;
    for (max_attempts, want) in [(1u32, None), (2, Some("big"))] {
        let (ca, cb) = (counter(), counter());
        let events = Events::default();
        let router = Router::builder()
            .deployment(Deployment::new(
                "small",
                svc(
                    "small",
                    Duration::ZERO,
                    Some(std::io::ErrorKind::InvalidInput),
                    ca.clone(),
                ),
            ))
            .deployment(
                Deployment::new("big", svc("big", Duration::ZERO, None, cb.clone())).group("long"),
            )
            .fallback(Permanent::InvalidRequest, "long")
            .max_attempts(max_attempts)
            .on_event(events.listener())
            .build()
            .unwrap();
        let out = router.oneshot(1).await;
        match want {
            Some(w) => {
                assert_eq!(out.unwrap(), w);
                assert_eq!(events.take(), ["first:small", "fallback:small->big"]);
            }
            None => {
                assert!(out.is_err());
                assert_eq!(cb.load(Ordering::SeqCst), 0);
            }
        }
        assert_eq!(ca.load(Ordering::SeqCst), 1);
    }
}

/// More than 64 deployments (the tried set leaves one word): every one is
/// tried once before any is retried.
#[tokio::test(start_paused = true)]
async fn router_seventy_deployments_each_tried_once() {
    let counts: Vec<_> = (0..70).map(|_| counter()).collect();
    let mut b = Router::builder().backoff(None).max_attempts(70);
    for (i, c) in counts.iter().enumerate() {
        let name: &'static str = Box::leak(format!("d{i}").into_boxed_str());
        let fail = (i != 69).then_some(std::io::ErrorKind::ConnectionRefused);
        b = b.deployment(
            Deployment::new(name, svc(name, Duration::ZERO, fail, c.clone())).preference(i as u32),
        );
    }
    let router = b.build().unwrap();
    assert_eq!(router.oneshot(1).await.unwrap(), "d69");
    for (i, c) in counts.iter().enumerate() {
        assert_eq!(c.load(Ordering::SeqCst), 1, "d{i}");
    }
}

/// A deadline of zero or Duration::MAX: never a panic; MAX behaves as none.
#[tokio::test(start_paused = true)]
async fn router_deadline_extremes() {
    let c = counter();
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            svc("a", Duration::from_secs(3600), None, c.clone()),
        ))
        .deadline(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(router.oneshot(1).await.unwrap(), "a");
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            svc("a", Duration::ZERO, None, c.clone()),
        ))
        .deadline(Duration::ZERO)
        .build()
        .unwrap();
    // Either answered or the documented Timeout / BudgetExceeded.
    match router.oneshot(2).await {
        Ok(_) => {}
        Err(e) => {
            let k = rejected(&e).kind();
            assert!(
                matches!(k, RejectKind::Timeout | RejectKind::BudgetExceeded),
                "{k:?}"
            );
        }
    }
}

/// A panicking deployment service (user code) propagates; the router's
/// round robin and other calls go on.
#[tokio::test(start_paused = true)]
async fn router_a_panicking_deployment_does_not_poison_the_router() {
    let boom = BoxCloneSyncService::new(service_fn(|n: u32| async move {
        if n == 0 {
            panic!("user service panics");
        }
        Ok::<_, BoxError>("a")
    }));
    let router = Router::builder()
        .deployment(Deployment::new("a", boom))
        .deployment(Deployment::new(
            "b",
            svc("b", Duration::ZERO, None, counter()),
        ))
        .build()
        .unwrap();
    let mut panicked = 0;
    for _ in 0..4 {
        // Made outside the spawned task (README: "A rustc limitation to know").
        let fut = router.clone().oneshot(0);
        if tokio::spawn(fut).await.is_err() {
            panicked += 1;
        }
    }
    assert!(panicked >= 1, "a's panic reaches the caller");
    for i in 1..20 {
        router.clone().oneshot(i).await.unwrap();
    }
}

/// Pinned but never polled, and polled after done: errors, not panics.
#[tokio::test(start_paused = true)]
async fn router_future_polled_after_done_is_an_error() {
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            svc("a", Duration::ZERO, None, counter()),
        ))
        .build()
        .unwrap();
    let mut r = router.clone();
    let mut fut = Box::pin(r.call(1));
    let first = futures::future::poll_fn(|cx| fut.as_mut().poll(cx)).await;
    assert_eq!(first.unwrap(), "a");
    match fut.as_mut().poll(&mut noop_cx()) {
        Poll::Ready(Err(_)) => {}
        other => panic!("{:?}", other.map(|r| r.map_err(|e| e.to_string()))),
    }
    let _: Option<Pin<Box<dyn Future<Output = ()>>>> = None;
}

// ====================================================================
// second round
// ====================================================================

/// QuotaBuilder::max_wait: "A call whose wait would be longer is refused at
/// arrival with the estimate as `retry_after`" — so a call whose wait is
/// shorter than `max_wait` is not refused at arrival.
#[tokio::test(start_paused = true)]
async fn quota_wait_mode_does_not_refuse_a_call_whose_wait_fits_max_wait() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(1))
        .max_wait(Duration::from_millis(1_800))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    let t0 = Instant::now();
    call_now(&svc, ("k", 1)).unwrap(); // next unit at 1 s
    tokio::time::advance(Duration::from_millis(500)).await;
    // Admitted at 1 s (waits 0.5 s).
    let mut s2 = svc.clone();
    let mut second = Box::pin(async move {
        s2.ready()
            .await?
            .call(("k", 1))
            .await
            .map(|()| t0.elapsed())
    });
    assert!(second.as_mut().poll(&mut noop_cx()).is_pending());
    assert_eq!(quota.snapshot().waiting, 1);
    // Admitted at 2 s: it waits 1.5 s, within max_wait's 1.8 s.
    let mut s3 = svc.clone();
    let mut third = Box::pin(async move {
        s3.ready()
            .await?
            .call(("k", 1))
            .await
            .map(|()| t0.elapsed())
    });
    if let Poll::Ready(Err(e)) = third.as_mut().poll(&mut noop_cx()) {
        panic!("a call whose wait (1.5 s) fits max_wait (1.8 s) was refused at arrival: {e}");
    }
    let (second, third) = futures::join!(second, third);
    let second = second.unwrap();
    assert!(second <= Duration::from_millis(1_001), "{second:?}");
    match third {
        Ok(at) => assert!(at <= Duration::from_millis(2_001), "{at:?}"),
        Err(e) => {
            panic!("a call whose wait (1.5 s) fits max_wait (1.8 s) was refused at arrival: {e}")
        }
    }
}

/// Wait mode, empty line: "refused at arrival with the estimate as
/// `retry_after`"; coming back after exactly that is admitted at once.
#[tokio::test(start_paused = true)]
async fn quota_wait_mode_refusal_at_arrival_then_coming_back_admits() {
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(3))
        .global(Rate::per_second(1).burst(5))
        .max_wait(Duration::from_millis(500))
        .build::<String>()
        .unwrap();
    let svc = weighted(&quota, "p");
    call_now(&svc, ("k", 3)).unwrap();
    let e = call_now(&svc, ("k", 2)).unwrap_err();
    let ra = rejected(&e).retry_after().unwrap();
    assert_eq!(ra, Duration::from_secs(2));
    tokio::time::advance(ra).await;
    call_now(&svc, ("k", 2)).unwrap();
}

/// RouterBuilder::retry_budget: "each call deposits, each further attempt
/// withdraws". A call that ends without a further attempt (its deployment's
/// Retry-After above the ceiling: "the last answer comes back now") must not
/// spend the budget.
#[tokio::test(start_paused = true)]
async fn router_retry_budget_is_not_spent_without_an_attempt() {
    let limit = RateLimit::builder(Rate::per_hour(1).burst(1))
        .build()
        .unwrap();
    let calls = counter();
    let inner = BoxCloneSyncService::new(limit.layer().layer(svc(
        "a",
        Duration::ZERO,
        None,
        calls.clone(),
    )));
    let budget = Arc::new(RetryBudget::new(1.0, 0.0, Duration::from_secs(10)).unwrap());
    let router = Router::builder()
        .deployment(Deployment::new("a", inner))
        .max_attempts(3)
        .retry_budget(budget.clone())
        .build()
        .unwrap();
    router.clone().oneshot(1).await.unwrap();
    let t = Instant::now();
    let e = router.clone().oneshot(2).await.unwrap_err();
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(rejected(&e).kind(), RejectKind::QuotaExceeded);
    // Two calls deposited, no further attempt was sent upstream.
    assert_eq!(budget.requests(), 2);
    let left = (0..2).filter(|_| budget.try_withdraw()).count();
    assert_eq!(left, 2, "the budget was spent on an attempt never sent");
}

/// Module docs: "A call whose cost no deployment could ever admit (above
/// every burst) is refused `BudgetExceeded` without a `retry_after`".
#[tokio::test(start_paused = true)]
async fn router_a_cost_no_deployment_can_admit_is_refused_without_retry_after() {
    use semaforo::pace::Cost;
    let mk = |name: &'static str| {
        let pace = Pace::builder().requests_per_minute(2).build().unwrap();
        let s =
            BoxCloneSyncService::new(pace.layer().weigh(|n: &u32| Cost::requests(*n)).layer(svc(
                name,
                Duration::ZERO,
                None,
                counter(),
            )));
        Deployment::new(name, s).pace(pace)
    };
    let router = Router::builder()
        .deployment(mk("a"))
        .deployment(mk("b"))
        .weigh(|n: &u32| Cost::requests(*n))
        .build()
        .unwrap();
    for cost in [3u32, u32::MAX] {
        let e = router.clone().oneshot(cost).await.unwrap_err();
        let r = rejected(&e);
        assert_eq!(r.kind(), RejectKind::BudgetExceeded, "cost {cost}");
        assert_eq!(r.retry_after(), None, "cost {cost}");
    }
    assert_eq!(router.clone().oneshot(2).await.unwrap().len(), 1);
}

/// A deployment hung forever, a deadline: "one still running at it ends
/// with `Timeout`", at the deadline; its bulkhead permit given back.
#[tokio::test(start_paused = true)]
async fn router_hung_deployment_times_out_at_the_deadline_and_releases() {
    let b = Bulkhead::builder(1).build().unwrap();
    let hung = BoxCloneSyncService::new(b.layer().layer(service_fn(|_: u32| async {
        std::future::pending::<()>().await;
        Ok::<_, BoxError>("never")
    })));
    let router = Router::builder()
        .deployment(Deployment::new("a", hung).bulkhead(b.clone()))
        .deadline(Duration::from_secs(3))
        .build()
        .unwrap();
    let t = Instant::now();
    let e = router.clone().oneshot(1).await.unwrap_err();
    assert_eq!(rejected(&e).kind(), RejectKind::Timeout);
    assert_eq!(t.elapsed(), Duration::from_secs(3));
    assert_eq!(b.snapshot().in_flight, 0);
}

/// Module docs: "A deployment whose `poll_ready` stays pending holds the
/// call until the deadline — unless hedging is on: past the hedge delay,
/// another deployment that can start the call now takes it".
#[tokio::test(start_paused = true)]
async fn router_hedge_moves_a_call_stuck_in_readiness() {
    let ba = Bulkhead::builder(1)
        .max_queue(10)
        .max_wait(Duration::from_secs(60))
        .build()
        .unwrap();
    let held = ba.try_permit().unwrap(); // a is full
    let (ca, cb) = (counter(), counter());
    let sa = BoxCloneSyncService::new(ba.layer().layer(svc("a", Duration::ZERO, None, ca.clone())));
    let router = Router::builder()
        .deployment(Deployment::new("a", sa)) // the router is not told of a's bulkhead
        .deployment(Deployment::new("b", svc("b", Duration::ZERO, None, cb.clone())).preference(1))
        .hedge(Hedge::After(Duration::from_millis(100)), 1.0)
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap();
    let t = Instant::now();
    let out = router.clone().oneshot(1).await.unwrap();
    assert_eq!(out, "b");
    assert!(
        t.elapsed() <= Duration::from_millis(101),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(ca.load(Ordering::SeqCst), 0);
    let s = ba.snapshot();
    assert_eq!(
        (s.in_flight, s.waiting),
        (1, 0),
        "only the permit held by hand"
    );
    drop(held);
}

/// RouterBuilder::on_event: "each attempt sent (Routed ...), each hedged
/// call answered (HedgeSettled ...), and its refusals". Each refusal of the
/// router's own told once, with the kind and retry_after the caller got.
#[tokio::test(start_paused = true)]
async fn router_refusals_are_told_once_as_returned() {
    let seen: Arc<Mutex<Vec<(RejectKind, Option<Duration>)>>> = Arc::default();
    let pace = Pace::builder().requests_per_minute(1).build().unwrap();
    let paced = pace
        .layer()
        .layer(svc("a", Duration::ZERO, None, counter()));
    let router = Router::builder()
        .deployment(Deployment::new("a", BoxCloneSyncService::new(paced)).pace(pace))
        .deadline(Duration::from_secs(1))
        .on_event({
            let seen = seen.clone();
            move |e| {
                if let EventKind::Rejected { kind, retry_after } = &e.kind {
                    seen.lock().unwrap().push((*kind, *retry_after));
                }
            }
        })
        .build()
        .unwrap();
    router.clone().oneshot(1).await.unwrap();
    let e = router.clone().oneshot(2).await.unwrap_err();
    let r = rejected(&e);
    let mut wrong = Vec::new();
    let told = std::mem::take(&mut *seen.lock().unwrap());
    if told != [(r.kind(), r.retry_after())] {
        wrong.push(format!(
            "deadline: returned {:?}, told {told:?}",
            (r.kind(), r.retry_after())
        ));
    }
    // Every breaker open: CircuitOpen "with the soonest reopen".
    let breaker = Breaker::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_secs(10))
        .build()
        .unwrap();
    let failing = BoxCloneSyncService::new(breaker.layer().layer(svc(
        "c",
        Duration::ZERO,
        Some(std::io::ErrorKind::ConnectionRefused),
        counter(),
    )));
    let router = Router::builder()
        .deployment(Deployment::new("c", failing).breaker(breaker))
        .max_attempts(1)
        .on_event({
            let seen = seen.clone();
            move |e| {
                if let EventKind::Rejected { kind, retry_after } = &e.kind {
                    seen.lock().unwrap().push((*kind, *retry_after));
                }
            }
        })
        .build()
        .unwrap();
    let _ = router.clone().oneshot(1).await.unwrap_err();
    let e = router.clone().oneshot(2).await.unwrap_err();
    let r = rejected(&e);
    let told = std::mem::take(&mut *seen.lock().unwrap());
    if told != [(r.kind(), r.retry_after())] {
        wrong.push(format!(
            "breakers open: returned {:?}, told {told:?}",
            (r.kind(), r.retry_after())
        ));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// RouterBuilder::hedge: "At most `max_share` (in (0, 1]) of the recent
/// calls are hedged (plus one: a fresh router may hedge its first late
/// call ...)". With 1 % of 50 calls: at most 0.5 + 1 = 1.5, so one hedge.
#[tokio::test(start_paused = true)]
async fn router_hedge_cap_is_max_share_of_calls_plus_one() {
    let (ca, cb) = (counter(), counter());
    let events = Events::default();
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            svc("a", Duration::from_secs(1), None, ca.clone()),
        ))
        .deployment(
            Deployment::new("b", svc("b", Duration::from_secs(1), None, cb.clone())).preference(1),
        )
        .hedge(Hedge::After(Duration::from_millis(100)), 0.01)
        .on_event(events.listener())
        .build()
        .unwrap();
    for i in 0..50 {
        router.clone().oneshot(i).await.unwrap();
    }
    let ev = events.take();
    let hedges = ev.iter().filter(|e| e.starts_with("hedge:")).count();
    assert!(
        hedges as f64 <= 0.01 * 50.0 + 1.0,
        "{hedges} hedges of 50 calls with max_share 1 %; first events {:?}",
        &ev[..ev.len().min(8)]
    );
}

#[derive(Clone)]
struct NeverReady(Arc<AtomicUsize>);
impl Service<u32> for NeverReady {
    type Response = &'static str;
    type Error = BoxError;
    type Future = std::future::Ready<Result<&'static str, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Poll::Pending
    }
    fn call(&mut self, _: u32) -> Self::Future {
        std::future::ready(Ok("never"))
    }
}

/// Module docs: "A deployment whose `poll_ready` stays pending holds the
/// call until the deadline — unless hedging is on: past the hedge delay,
/// another deployment that can start the call now takes it (nothing was sent
/// to the first: the move is told as a failover, and draws on neither the
/// retry budget nor the hedge cap, since nothing is sent twice)". With an
/// empty retry budget and a 1 % hedge cap, every call moves, none reaches
/// "a", and each is told as a failover.
#[tokio::test(start_paused = true)]
async fn router_readiness_moves_send_nothing_twice_and_draw_on_no_cap() {
    let polls = counter();
    let cb = counter();
    let events = Events::default();
    let router = Router::builder()
        .deployment(Deployment::new(
            "a",
            BoxCloneSyncService::new(NeverReady(polls.clone())),
        ))
        .deployment(Deployment::new("b", svc("b", Duration::ZERO, None, cb.clone())).preference(1))
        .hedge(Hedge::After(Duration::from_millis(100)), 0.01)
        .retry_budget(Arc::new(
            RetryBudget::new(0.0, 0.0, Duration::from_secs(10)).unwrap(),
        ))
        .deadline(Duration::from_secs(1))
        .on_event(events.listener())
        .build()
        .unwrap();
    let mut moved = 0;
    for i in 0..50 {
        if router.clone().oneshot(i).await.is_ok() {
            moved += 1;
        }
    }
    let ev = events.take();
    assert_eq!(moved, 50, "events: {:?}", &ev[..ev.len().min(4)]);
    assert_eq!(
        cb.load(Ordering::SeqCst),
        50,
        "each call answered by b once"
    );
    assert_eq!(
        ev.iter().filter(|e| e.as_str() == "failover:a->b").count(),
        50,
        "{:?}",
        &ev[..ev.len().min(4)]
    );
    assert!(
        !ev.iter().any(|e| e.starts_with("hedge")),
        "no hedge: {ev:?}"
    );
}

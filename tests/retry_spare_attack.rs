//! Outside attacks on `RetryService`'s spare copy (retries clone a copy made
//! when the layer wraps the service, refreshed after `get_mut`): cancellation
//! at every step, readiness of the copy, panics in `clone`, concurrency.

use semaforo::backoff::{Backoff, Jitter};
use semaforo::classify::Class;
use semaforo::retry::{RequestFns, Retry};
use semaforo::{BoxError, RejectKind, Rejected};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

fn no_jitter(base: Duration) -> Backoff {
    Backoff::exponential(base)
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

/// Shared observations across every copy of a `Probe`.
#[derive(Default)]
struct Stats {
    clones: AtomicUsize,
    alive: AtomicI64,
    calls: AtomicUsize,
    live_futs: AtomicI64,
    panic_on_clone: AtomicBool,
    /// Retries (attempt > 1) get this many Pending from poll_ready per copy.
    pending_polls: AtomicU32,
    /// poll_ready of copies that are not the original errors.
    ready_error_on_copies: AtomicBool,
    /// Copies' poll_ready pending forever (no wake).
    pending_forever_on_copies: AtomicBool,
    /// Attempts < this fail (attempt number is the request).
    fail_below: AtomicU32,
    /// Each attempt takes this long.
    work_ms: AtomicU32,
}

struct Probe {
    stats: Arc<Stats>,
    version: u32,
    is_copy: bool,
    pending_left: u32,
}

impl Probe {
    fn new(stats: &Arc<Stats>, version: u32) -> Self {
        stats.alive.fetch_add(1, Ordering::SeqCst);
        Probe {
            stats: stats.clone(),
            version,
            is_copy: false,
            pending_left: 0,
        }
    }
}

impl Clone for Probe {
    fn clone(&self) -> Self {
        if self.stats.panic_on_clone.load(Ordering::SeqCst) {
            panic!("clone panics");
        }
        self.stats.clones.fetch_add(1, Ordering::SeqCst);
        self.stats.alive.fetch_add(1, Ordering::SeqCst);
        Probe {
            stats: self.stats.clone(),
            version: self.version,
            is_copy: true,
            pending_left: self.stats.pending_polls.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stats.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

struct LiveGuard(Arc<Stats>);
impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live_futs.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<u32> for Probe {
    type Response = u32;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<u32, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.is_copy {
            if self.stats.ready_error_on_copies.load(Ordering::SeqCst) {
                return Poll::Ready(Err(std::io::Error::other("copy not ready")));
            }
            if self.stats.pending_forever_on_copies.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
            if self.pending_left > 0 {
                self.pending_left -= 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: u32) -> Self::Future {
        self.stats.calls.fetch_add(1, Ordering::SeqCst);
        self.stats.live_futs.fetch_add(1, Ordering::SeqCst);
        let guard = LiveGuard(self.stats.clone());
        let fail = attempt < self.stats.fail_below.load(Ordering::SeqCst);
        let work = Duration::from_millis(self.stats.work_ms.load(Ordering::SeqCst) as u64);
        let version = self.version;
        Box::pin(async move {
            let _g = guard;
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            if fail {
                Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
            } else {
                Ok(version)
            }
        })
    }
}

fn classify(r: Result<&u32, &std::io::Error>) -> Class {
    if r.is_ok() {
        Class::Success
    } else {
        Class::Transient
    }
}

fn attempt_policy() -> RequestFns<u32> {
    RequestFns::new(|n: &u32| Some(*n)).on_attempt(|n: &mut u32, a| *n = a)
}

type Svc = semaforo::retry::RetryService<
    Probe,
    fn(Result<&u32, &std::io::Error>) -> Class,
    RequestFns<u32>,
>;

fn build(retry: &Retry, stats: &Arc<Stats>, version: u32) -> Svc {
    retry
        .layer()
        .classify(classify as fn(Result<&u32, &std::io::Error>) -> Class)
        .requests(attempt_policy())
        .layer(Probe::new(stats, version))
}

fn retry_cfg(max: u32, base: Duration) -> Retry {
    Retry::builder()
        .max_attempts(max)
        .backoff(no_jitter(base))
        .no_budget()
        .build()
        .unwrap()
}

async fn once(svc: &mut Svc) -> Result<u32, BoxError> {
    svc.ready().await?.call(1).await
}

/// Drop the response future at every point in time (1 ms grid) of a call whose
/// first two attempts fail (10 ms each, 5/10 ms backoff): no attempt future
/// outlives it, no copy of the service leaks, the next call works.
#[tokio::test(start_paused = true)]
async fn cancel_at_every_instant_leaks_nothing() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(3, Ordering::SeqCst);
    stats.work_ms.store(10, Ordering::SeqCst);
    let retry = retry_cfg(5, Duration::from_millis(5));
    let mut svc = build(&retry, &stats, 1);
    assert_eq!(stats.alive.load(Ordering::SeqCst), 2, "inner + spare");
    for cut in 0..=50u64 {
        let fut = svc.ready().await.unwrap().call(1);
        let r = tokio::time::timeout(Duration::from_millis(cut), fut).await;
        assert_eq!(stats.live_futs.load(Ordering::SeqCst), 0, "cut {cut}");
        assert_eq!(
            stats.alive.load(Ordering::SeqCst),
            2,
            "cut {cut}: a copy leaked"
        );
        if let Ok(r) = r {
            assert_eq!(r.unwrap(), 1);
        }
    }
    assert_eq!(once(&mut svc).await.unwrap(), 1);
    drop(svc);
    assert_eq!(stats.alive.load(Ordering::SeqCst), 0);
}

/// Manual polling: drop after exactly k polls (each poll advancing time a bit).
#[tokio::test(start_paused = true)]
async fn cancel_after_k_polls() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(3, Ordering::SeqCst);
    stats.work_ms.store(3, Ordering::SeqCst);
    stats.pending_polls.store(2, Ordering::SeqCst);
    let retry = retry_cfg(4, Duration::from_millis(2));
    let mut svc = build(&retry, &stats, 1);
    for k in 0..40 {
        let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
        let mut done = false;
        for _ in 0..k {
            let polled = futures::poll!(fut.as_mut());
            if let Poll::Ready(r) = polled {
                assert_eq!(r.unwrap(), 1);
                done = true;
                break;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let _ = done;
        drop(fut);
        assert_eq!(stats.live_futs.load(Ordering::SeqCst), 0, "k {k}");
        assert_eq!(stats.alive.load(Ordering::SeqCst), 2, "k {k}");
    }
}

/// Retries' copies that are Pending a few times (self-waking) still get the call.
#[tokio::test(start_paused = true)]
async fn retry_copy_pending_then_ready() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(3, Ordering::SeqCst);
    stats.pending_polls.store(5, Ordering::SeqCst);
    let retry = retry_cfg(3, Duration::ZERO);
    let mut svc = build(&retry, &stats, 7);
    assert_eq!(once(&mut svc).await.unwrap(), 7);
    assert_eq!(stats.calls.load(Ordering::SeqCst), 3);
}

/// A retry copy whose poll_ready errors: the call fails with that error, later calls
/// that succeed at once are unaffected.
#[tokio::test(start_paused = true)]
async fn retry_copy_poll_ready_error() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    stats.ready_error_on_copies.store(true, Ordering::SeqCst);
    let retry = retry_cfg(3, Duration::ZERO);
    let mut svc = build(&retry, &stats, 7);
    let e = once(&mut svc).await.unwrap_err();
    assert!(e.to_string().contains("copy not ready"), "{e}");
    assert_eq!(stats.calls.load(Ordering::SeqCst), 1);
    stats.fail_below.store(0, Ordering::SeqCst);
    assert_eq!(once(&mut svc).await.unwrap(), 7);
    stats.ready_error_on_copies.store(false, Ordering::SeqCst);
    stats.fail_below.store(2, Ordering::SeqCst);
    assert_eq!(once(&mut svc).await.unwrap(), 7);
    drop(svc);
    assert_eq!(stats.alive.load(Ordering::SeqCst), 0);
}

/// A retry copy Pending forever: the deadline ends the call with retry's Timeout.
#[tokio::test(start_paused = true)]
async fn deadline_while_retry_copy_pending_forever() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    stats
        .pending_forever_on_copies
        .store(true, Ordering::SeqCst);
    let retry = Retry::builder()
        .max_attempts(3)
        .backoff(no_jitter(Duration::ZERO))
        .deadline(Duration::from_secs(1))
        .min_attempt_time(Duration::ZERO)
        .no_budget()
        .build()
        .unwrap();
    let mut svc = build(&retry, &stats, 7);
    let t0 = tokio::time::Instant::now();
    let e = once(&mut svc).await.unwrap_err();
    let r = e.downcast_ref::<Rejected>().expect("a Rejected");
    assert_eq!(r.kind(), RejectKind::Timeout);
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    drop(svc);
    assert_eq!(stats.alive.load(Ordering::SeqCst), 0);
}

/// Clone panics while retrying (mutex poisoned): later calls don't panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_panic_poisons_nothing_for_later_calls() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    let retry = retry_cfg(3, Duration::ZERO);
    let svc = build(&retry, &stats, 9);
    let mut s2 = svc.clone();
    stats.panic_on_clone.store(true, Ordering::SeqCst);
    let j = tokio::spawn(async move { once(&mut s2).await });
    let err = j.await.unwrap_err();
    assert!(err.is_panic());
    stats.panic_on_clone.store(false, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                assert_eq!(once(&mut s).await.unwrap(), 9);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Clone panics in the stale refresh (call after get_mut): later calls recover and
/// retries reach the changed service.
#[tokio::test(start_paused = true)]
async fn clone_panic_in_stale_refresh() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    let retry = retry_cfg(3, Duration::ZERO);
    let mut svc = build(&retry, &stats, 1);
    svc.get_mut().version = 2;
    stats.panic_on_clone.store(true, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(svc.call(1));
    }));
    assert!(r.is_err());
    stats.panic_on_clone.store(false, Ordering::SeqCst);
    assert_eq!(once(&mut svc).await.unwrap(), 2);
}

/// Many tasks on clones of one service, the first attempt of every call failing:
/// every call succeeds, each retried call clones exactly one copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clones_with_failures() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    stats.work_ms.store(1, Ordering::SeqCst);
    let retry = retry_cfg(3, Duration::from_millis(1));
    let svc = build(&retry, &stats, 4);
    let tasks_n = 32;
    let per = 25;
    let mut tasks = Vec::new();
    for _ in 0..tasks_n {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                assert_eq!(once(&mut s).await.unwrap(), 4);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let calls = tasks_n * per;
    assert_eq!(stats.calls.load(Ordering::SeqCst), 2 * calls);
    // layer's spare (1) + one per RetryService clone + one per retried call
    assert_eq!(stats.clones.load(Ordering::SeqCst), 1 + tasks_n + calls);
    assert_eq!(stats.live_futs.load(Ordering::SeqCst), 0);
    drop(svc);
    assert_eq!(stats.alive.load(Ordering::SeqCst), 0);
}

/// get_mut, then clone: both the clone and the original retry to the changed
/// service; a clone made before get_mut keeps retrying to the old one.
#[tokio::test(start_paused = true)]
async fn get_mut_then_clone() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    let retry = retry_cfg(3, Duration::ZERO);
    let mut svc = build(&retry, &stats, 1);
    let mut before = svc.clone();
    svc.get_mut().version = 2;
    let mut after = svc.clone();
    assert_eq!(once(&mut after).await.unwrap(), 2);
    assert_eq!(once(&mut svc).await.unwrap(), 2);
    assert_eq!(once(&mut before).await.unwrap(), 1);
    // again, after a refresh
    svc.get_mut().version = 3;
    let mut after2 = svc.clone();
    assert_eq!(once(&mut svc).await.unwrap(), 3);
    assert_eq!(once(&mut after2).await.unwrap(), 3);
    assert_eq!(once(&mut after).await.unwrap(), 2);
    // get_mut on the clone made before: only it changes
    before.get_mut().version = 10;
    assert_eq!(once(&mut before).await.unwrap(), 10);
    assert_eq!(once(&mut svc).await.unwrap(), 3);
    // version checked on the retry (attempt 2), not only on the first attempt
    stats.fail_below.store(3, Ordering::SeqCst);
    assert_eq!(once(&mut after2).await.unwrap(), 3);
}

/// get_mut while a call is in flight: that call's retries may go either way, the
/// next call's retries go to the changed service.
#[tokio::test(start_paused = true)]
async fn get_mut_while_in_flight() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    stats.work_ms.store(5, Ordering::SeqCst);
    let retry = retry_cfg(3, Duration::ZERO);
    let mut svc = build(&retry, &stats, 1);
    let fut = svc.ready().await.unwrap().call(1);
    svc.get_mut().version = 2;
    let v = fut.await.unwrap();
    assert!(v == 1 || v == 2);
    assert_eq!(once(&mut svc).await.unwrap(), 2);
}

/// max_attempts 1: no retry, no copy, the error comes back.
#[tokio::test(start_paused = true)]
async fn max_attempts_one() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    let retry = retry_cfg(1, Duration::ZERO);
    let mut svc = build(&retry, &stats, 1);
    let c0 = stats.clones.load(Ordering::SeqCst);
    assert!(once(&mut svc).await.is_err());
    assert_eq!(stats.calls.load(Ordering::SeqCst), 1);
    assert_eq!(stats.clones.load(Ordering::SeqCst), c0);
}

/// max_attempts u32::MAX: 2000 failures then success; one copy for the call.
#[tokio::test(start_paused = true)]
async fn max_attempts_u32_max() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2001, Ordering::SeqCst);
    let retry = retry_cfg(u32::MAX, Duration::ZERO);
    let mut svc = build(&retry, &stats, 5);
    let c0 = stats.clones.load(Ordering::SeqCst);
    assert_eq!(once(&mut svc).await.unwrap(), 5);
    assert_eq!(stats.calls.load(Ordering::SeqCst), 2001);
    assert_eq!(stats.clones.load(Ordering::SeqCst), c0 + 1);
}

/// u32::MAX attempts, always failing, with a deadline: the call ends by the deadline.
#[tokio::test(start_paused = true)]
async fn max_attempts_u32_max_with_deadline() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(u32::MAX, Ordering::SeqCst);
    stats.work_ms.store(7, Ordering::SeqCst);
    let retry = Retry::builder()
        .max_attempts(u32::MAX)
        .backoff(no_jitter(Duration::from_millis(3)))
        .deadline(Duration::from_secs(2))
        .no_budget()
        .build()
        .unwrap();
    let mut svc = build(&retry, &stats, 5);
    let t0 = tokio::time::Instant::now();
    assert!(once(&mut svc).await.is_err());
    assert!(t0.elapsed() <= Duration::from_secs(2));
    assert_eq!(stats.live_futs.load(Ordering::SeqCst), 0);
}

/// Deadline expiry during an attempt that hangs, with and without a retry copy.
#[tokio::test(start_paused = true)]
async fn deadline_mid_attempt_after_first_failure() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    stats.work_ms.store(400, Ordering::SeqCst);
    let retry = Retry::builder()
        .max_attempts(5)
        .backoff(no_jitter(Duration::ZERO))
        .deadline(Duration::from_millis(600))
        .min_attempt_time(Duration::ZERO)
        .no_budget()
        .build()
        .unwrap();
    let mut svc = build(&retry, &stats, 5);
    let e = once(&mut svc).await.unwrap_err();
    assert_eq!(
        e.downcast_ref::<Rejected>().unwrap().kind(),
        RejectKind::Timeout
    );
    assert_eq!(stats.live_futs.load(Ordering::SeqCst), 0);
    assert_eq!(stats.alive.load(Ordering::SeqCst), 2);
}

/// Polled again after it returned: it must not call the upstream again.
#[tokio::test(start_paused = true)]
async fn poll_after_ready_does_not_call_again() {
    let stats = Arc::new(Stats::default());
    let retry = retry_cfg(3, Duration::ZERO);
    let mut svc = build(&retry, &stats, 5);
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    let first = futures::poll!(fut.as_mut());
    assert!(matches!(first, Poll::Ready(Ok(5))));
    let _ = futures::poll!(fut.as_mut());
    assert_eq!(
        stats.calls.load(Ordering::SeqCst),
        1,
        "polled after done: a second upstream call"
    );
}

/// Layering and tower's Buffer as the inner service (clone at layer time of a
/// handle): retries still go through.
#[tokio::test]
async fn buffer_inner() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    let retry = retry_cfg(3, Duration::ZERO);
    let buf = tower::buffer::Buffer::new(Probe::new(&stats, 3), 4);
    let mut svc = retry
        .layer()
        .classify(|r: Result<&u32, &BoxError>| {
            if r.is_ok() {
                Class::Success
            } else {
                Class::Transient
            }
        })
        .requests(attempt_policy())
        .layer(buf);
    for _ in 0..10 {
        assert_eq!(svc.ready().await.unwrap().call(1).await.unwrap(), 3);
    }
}

/// A !Send inner service (Rc) on a LocalSet: retries still work.
#[tokio::test(start_paused = true)]
async fn not_send_inner() {
    use std::rc::Rc;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let count = Rc::new(std::cell::Cell::new(0u32));
            let c = count.clone();
            let inner = tower::service_fn(move |a: u32| {
                let c = c.clone();
                async move {
                    c.set(c.get() + 1);
                    if a < 2 {
                        Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
                    } else {
                        Ok(a)
                    }
                }
            });
            let mut svc = retry_cfg(3, Duration::ZERO)
                .layer()
                .classify(classify as fn(Result<&u32, &std::io::Error>) -> Class)
                .requests(attempt_policy())
                .layer(inner);
            let r =
                tokio::task::spawn_local(async move { svc.ready().await.unwrap().call(1).await });
            assert_eq!(r.await.unwrap().unwrap(), 2);
            assert_eq!(count.get(), 2);
        })
        .await;
}

/// Retry over retry: both layers' spares, first attempts failing at both.
#[tokio::test(start_paused = true)]
async fn nested_retry_layers() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(3, Ordering::SeqCst);
    let inner = build(&retry_cfg(2, Duration::ZERO), &stats, 8);
    let mut outer = retry_cfg(3, Duration::ZERO)
        .layer()
        .classify(|r: Result<&u32, &BoxError>| {
            if r.is_ok() {
                Class::Success
            } else {
                Class::Transient
            }
        })
        .layer(inner);
    // outer attempt 1 -> inner attempts 1, 2 fail; outer attempt 2 -> inner 1, 2 fail ... the
    // inner policy rewrites the request to the attempt number, so only attempt >= 3 succeeds:
    // never; the call ends in an error after 3 x 2 upstream calls.
    let r = outer.ready().await.unwrap().call(1).await;
    assert!(r.is_err());
    assert_eq!(stats.calls.load(Ordering::SeqCst), 6);
    stats.fail_below.store(2, Ordering::SeqCst);
    assert_eq!(outer.ready().await.unwrap().call(1).await.unwrap(), 8);
    drop(outer);
    assert_eq!(stats.alive.load(Ordering::SeqCst), 0);
}

/// Clone panics in many tasks at once, then none: every later call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clone_panics_then_recovery() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    let svc = build(&retry_cfg(3, Duration::ZERO), &stats, 6);
    let clones: Vec<Svc> = (0..16).map(|_| svc.clone()).collect();
    stats.panic_on_clone.store(true, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for mut s in clones {
        tasks.push(tokio::spawn(async move { once(&mut s).await }));
    }
    for t in tasks {
        assert!(t.await.unwrap_err().is_panic());
    }
    stats.panic_on_clone.store(false, Ordering::SeqCst);
    let mut s = svc.clone();
    for _ in 0..10 {
        assert_eq!(once(&mut s).await.unwrap(), 6);
    }
    drop((s, svc));
    assert_eq!(stats.live_futs.load(Ordering::SeqCst), 0);
    assert_eq!(stats.alive.load(Ordering::SeqCst), 0);
}

/// Retry::call (closure path): the closure runs again on retry.
#[tokio::test(start_paused = true)]
async fn closure_path_retries() {
    let n = Arc::new(AtomicUsize::new(0));
    let retry = retry_cfg(3, Duration::ZERO);
    let n2 = n.clone();
    let r: Result<u32, BoxError> = semaforo::closure::run(&retry.layer(), move || {
        let n = n2.clone();
        async move {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
            } else {
                Ok(3)
            }
        }
    })
    .await;
    assert_eq!(r.unwrap(), 3);
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

/// A clone shares its original's spare for its first 32 calls, then takes
/// one of its own: one more clone of the inner service at its 32nd call and
/// none after (nor on the original's calls); its retries keep working, on
/// its own copy; everything is let go when the services are dropped.
#[tokio::test(start_paused = true)]
async fn a_clone_takes_a_spare_of_its_own_at_its_32nd_call_and_only_then() {
    let stats = Arc::new(Stats::default());
    let retry = retry_cfg(3, Duration::ZERO);
    let mut svc = build(&retry, &stats, 1);
    assert_eq!(stats.clones.load(Ordering::SeqCst), 1, "the layer's spare");
    let mut worker = svc.clone();
    assert_eq!(stats.clones.load(Ordering::SeqCst), 2, "the clone's inner");
    for call in 1..=31 {
        assert_eq!(once(&mut worker).await.unwrap(), 1);
        assert_eq!(stats.clones.load(Ordering::SeqCst), 2, "call {call}");
    }
    assert_eq!(once(&mut worker).await.unwrap(), 1);
    assert_eq!(
        stats.clones.load(Ordering::SeqCst),
        3,
        "its own spare at its 32nd call"
    );
    assert_eq!(stats.alive.load(Ordering::SeqCst), 4, "2 inners, 2 spares");
    for _ in 0..100 {
        assert_eq!(once(&mut worker).await.unwrap(), 1);
        assert_eq!(once(&mut svc).await.unwrap(), 1);
    }
    assert_eq!(stats.clones.load(Ordering::SeqCst), 3, "and never again");
    // Its retries: one clone of its own spare each, as before.
    stats.fail_below.store(2, Ordering::SeqCst);
    assert_eq!(once(&mut worker).await.unwrap(), 1);
    assert_eq!(stats.clones.load(Ordering::SeqCst), 4, "one retried call");
    drop(svc);
    assert_eq!(once(&mut worker).await.unwrap(), 1, "without its original");
    drop(worker);
    assert_eq!(stats.alive.load(Ordering::SeqCst), 0, "nothing kept");
}

/// A clone made of a clone before the latter has a spare of its own counts
/// on from where the latter is; after `get_mut` the next call takes a spare
/// of the changed service whatever the count (a clone's retries go to it).
#[tokio::test(start_paused = true)]
async fn a_clone_of_a_clone_counts_on_and_get_mut_still_takes_effect_at_once() {
    let stats = Arc::new(Stats::default());
    stats.fail_below.store(2, Ordering::SeqCst);
    let retry = retry_cfg(3, Duration::ZERO);
    let svc = build(&retry, &stats, 1);
    let mut first = svc.clone();
    for _ in 0..10 {
        assert_eq!(once(&mut first).await.unwrap(), 1);
    }
    let mut second = first.clone();
    let before = stats.clones.load(Ordering::SeqCst);
    // 22 calls to go for `second`, each retried once (one clone each).
    for _ in 0..21 {
        assert_eq!(once(&mut second).await.unwrap(), 1);
    }
    assert_eq!(stats.clones.load(Ordering::SeqCst), before + 21);
    assert_eq!(once(&mut second).await.unwrap(), 1);
    assert_eq!(
        stats.clones.load(Ordering::SeqCst),
        before + 23,
        "its 22nd call: its own spare, and the retry's clone"
    );
    let mut third = svc.clone();
    third.get_mut().version = 7;
    stats.fail_below.store(3, Ordering::SeqCst);
    assert_eq!(
        once(&mut third).await.unwrap(),
        7,
        "retries reach the change"
    );
    assert_eq!(once(&mut first).await.unwrap(), 1);
}

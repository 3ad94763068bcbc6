//! A call that waits in one of our lines must not hold the inner service's
//! readiness (DESIGN.md, principle 2): over a `tower::buffer::Buffer` (whose
//! `poll_ready` takes one of its slots), a waiter that kept the readied buffer
//! would keep a slot, and the callers behind it would hang in `poll_ready`
//! instead of joining our line or being refused at once.

use semaforo::bulkhead::Bulkhead;
use semaforo::pace::{Limit, Pace};
use semaforo::quota::{Quota, Rate};
use semaforo::{BoxError, RejectKind, Rejected};
use std::time::Duration;
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::{service_fn, Service, ServiceExt};

/// A buffered upstream whose calls take 10 s, with room for `bound` calls
/// readied but not yet sent.
fn buffered(bound: usize) -> Buffer<u32, <SlowFn as Service<u32>>::Future> {
    Buffer::new(slow(), bound)
}

type SlowFn = tower::util::ServiceFn<fn(u32) -> SlowFut>;
type SlowFut = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, BoxError>> + Send>>;

fn slow() -> SlowFn {
    fn call(i: u32) -> SlowFut {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(i)
        })
    }
    service_fn(call as fn(u32) -> SlowFut)
}

/// Spawns `n` callers that each get `svc` ready, call it and drop it.
fn spawn_callers<S>(
    svc: &S,
    n: u32,
) -> Vec<tokio::task::JoinHandle<(Result<u32, BoxError>, Instant)>>
where
    S: Service<u32, Response = u32, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    (0..n)
        .map(|i| {
            // `oneshot`, as hyper and most callers do: the service is dropped
            // as soon as it has been called.
            let svc = svc.clone();
            tokio::spawn(async move { (svc.oneshot(i).await, Instant::now()) })
        })
        .collect()
}

fn kind(e: &BoxError) -> Option<RejectKind> {
    Rejected::from_box(e).map(Rejected::kind)
}

#[tokio::test(start_paused = true)]
async fn bulkhead_waiters_do_not_hold_a_buffer_slot() {
    let bulkhead = Bulkhead::builder(1).max_queue(5).build().unwrap();
    let svc = bulkhead.layer().layer_service(buffered(2));
    let t0 = Instant::now();
    let callers = spawn_callers(&svc, 7);
    // Let every caller reach its place (no time passes).
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let snap = bulkhead.snapshot();
    assert_eq!(snap.in_flight, 1);
    assert_eq!(snap.waiting, 5, "five wait in our line, not two");

    let mut refused = Vec::new();
    let mut served = Vec::new();
    for c in callers {
        let (r, at) = c.await.unwrap();
        match r {
            Ok(_) => served.push(at - t0),
            Err(e) => {
                assert_eq!(kind(&e), Some(RejectKind::QueueFull), "{e}");
                refused.push(at - t0);
            }
        }
    }
    assert_eq!(refused, vec![Duration::ZERO], "the 7th is refused at once");
    assert_eq!(served.len(), 6);
    // One at a time, 10 s each.
    assert_eq!(served.iter().max(), Some(&Duration::from_secs(60)));
}

#[tokio::test(start_paused = true)]
async fn pace_waiters_do_not_hold_a_buffer_slot() {
    // One request per second, no burst: 1 goes now, 6 wait in the pacer's line.
    let pace = Pace::builder()
        .limit(Limit::requests_per_minute(60).burst(1))
        .build()
        .unwrap();
    let svc = pace.layer().layer_service(buffered(2));
    let t0 = Instant::now();
    let callers = spawn_callers(&svc, 7);
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        pace.snapshot().waiting,
        6,
        "six wait in the pacer's line, not two"
    );
    let mut done = Vec::new();
    for c in callers {
        let (r, at) = c.await.unwrap();
        r.unwrap();
        done.push(at - t0);
    }
    done.sort();
    // Starts at 0, 1, ..., 6 s; each call takes 10 s.
    let expected: Vec<Duration> = (0..7).map(|s| Duration::from_secs(10 + s)).collect();
    assert_eq!(done, expected);
}

#[tokio::test(start_paused = true)]
async fn quota_waiters_do_not_hold_a_buffer_slot() {
    // The quota's wait mode already does it right; kept here so it stays so.
    let quota: Quota<u32> = Quota::builder()
        .plan("one per second", Rate::per_second(1).burst(1))
        .max_wait(Duration::from_secs(60))
        .build()
        .unwrap();
    let plan = quota.plan_id("one per second").unwrap();
    let svc = quota
        .layer(move |_: &u32| (0u32, plan))
        .layer_service(buffered(2));
    let callers = spawn_callers(&svc, 7);
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    for c in callers {
        let (r, _) = c.await.unwrap();
        r.unwrap();
    }
}

/// `Layer::layer` under a name that reads well in these tests.
trait LayerService<S> {
    type Service;
    fn layer_service(&self, s: S) -> Self::Service;
}

impl<L: tower::Layer<S>, S> LayerService<S> for L {
    type Service = L::Service;
    fn layer_service(&self, s: S) -> L::Service {
        self.layer(s)
    }
}

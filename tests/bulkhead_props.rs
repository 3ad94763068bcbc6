//! Property tests of the bulkhead's promises, and a drop at each await point.

mod support;

use proptest::prelude::*;
use semaforo::bulkhead::Bulkhead;
use semaforo::{RejectKind, Rejected};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use support::{Job, Upstream};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

#[derive(Debug, Clone)]
struct Caller {
    arrival_ms: u64,
    work_ms: u64,
    priority: i32,
    tenant: u32,
    drop_after_ms: Option<u64>,
}

fn caller() -> impl Strategy<Value = Caller> {
    (
        0u64..5_000,
        1u64..3_000,
        0i32..3,
        0u32..3,
        prop::option::weighted(0.3, 0u64..4_000),
    )
        .prop_map(
            |(arrival_ms, work_ms, priority, tenant, drop_after_ms)| Caller {
                arrival_ms,
                work_ms,
                priority,
                tenant,
                drop_after_ms,
            },
        )
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Ok,
    Rejected(RejectKind),
    Dropped,
}

#[derive(Debug, Clone)]
struct Setup {
    limit: u32,
    max_queue: u32,
    per_key: Option<u32>,
    aging_ms: Option<u64>,
    max_wait_ms: Option<u64>,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1u32..5,
        0u32..20,
        prop::option::of(1u32..3),
        prop::option::of(0u64..2_000),
        prop::option::weighted(0.3, 1u64..3_000),
    )
        .prop_map(|(limit, max_queue, per_key, aging_ms, max_wait_ms)| Setup {
            limit,
            max_queue,
            per_key,
            aging_ms,
            max_wait_ms,
        })
}

fn run(setup: Setup, mut callers: Vec<Caller>) -> Result<(), TestCaseError> {
    callers.sort_by_key(|c| c.arrival_ms);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let up = Upstream::default();
        let mut b = Bulkhead::builder(setup.limit)
            .max_queue(setup.max_queue)
            .priority_aging(setup.aging_ms.map(Duration::from_millis));
        if let Some(k) = setup.per_key {
            b = b.max_per_key(k);
        }
        if let Some(w) = setup.max_wait_ms {
            b = b.max_wait(Duration::from_millis(w));
        }
        let bulkhead = b.build().unwrap();
        let mut svc = support::prioritised_and_partitioned(&bulkhead, &up);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for (id, c) in callers.iter().enumerate() {
            tokio::time::sleep_until(t0 + Duration::from_millis(c.arrival_ms)).await;
            let mut job = Job::new(id, Duration::from_millis(c.work_ms));
            job.priority = c.priority;
            job.tenant = c.tenant;
            let fut = svc.ready().await.unwrap().call(job);
            let snap = bulkhead.snapshot();
            prop_assert!(
                snap.waiting <= u64::from(setup.max_queue),
                "line {} > {}",
                snap.waiting,
                setup.max_queue
            );
            prop_assert!(snap.in_flight <= u64::from(setup.limit));
            let drop_after = c.drop_after_ms.map(Duration::from_millis);
            tasks.push(tokio::spawn(async move {
                let res = match drop_after {
                    Some(d) => match tokio::time::timeout(d, fut).await {
                        Ok(r) => r,
                        Err(_) => return Outcome::Dropped,
                    },
                    None => fut.await,
                };
                match res {
                    Ok(_) => Outcome::Ok,
                    Err(e) => Outcome::Rejected(Rejected::from_box(&e).expect("rejection").kind()),
                }
            }));
        }
        // Every caller runs, is rejected or was dropped: nothing hangs.
        let mut outcomes = Vec::new();
        for t in tasks {
            let o = tokio::time::timeout(Duration::from_secs(3600), t)
                .await
                .map_err(|_| TestCaseError::fail("a caller hung"))?
                .unwrap();
            outcomes.push(o);
        }
        for (c, o) in callers.iter().zip(&outcomes) {
            match o {
                Outcome::Ok => {}
                Outcome::Dropped => prop_assert!(c.drop_after_ms.is_some()),
                Outcome::Rejected(RejectKind::QueueFull) => {}
                Outcome::Rejected(RejectKind::QueueTimeout) => {
                    prop_assert!(setup.max_wait_ms.is_some())
                }
                Outcome::Rejected(k) => prop_assert!(false, "unexpected rejection {k:?}"),
            }
        }
        let rec = up.record.lock().unwrap();
        prop_assert!(
            rec.max_in_flight <= setup.limit as usize,
            "in flight {} > {}",
            rec.max_in_flight,
            setup.limit
        );
        if let Some(k) = setup.per_key {
            prop_assert!(
                rec.max_per_tenant <= k as usize,
                "per key {} > {k}",
                rec.max_per_tenant
            );
        }
        // FIFO within a priority (and a partition): same priority + tenant start in arrival order.
        let start_of = |id: usize| rec.starts.iter().find(|s| s.0 == id).map(|s| s.3);
        for (a, ca) in callers.iter().enumerate() {
            for (b, cb) in callers.iter().enumerate().skip(a + 1) {
                if ca.priority == cb.priority && ca.tenant == cb.tenant {
                    if let (Some(sa), Some(sb)) = (start_of(a), start_of(b)) {
                        prop_assert!(
                            sa <= sb,
                            "caller {a} started after later caller {b} of the same priority"
                        );
                    }
                }
            }
        }
        let snap = bulkhead.snapshot();
        prop_assert_eq!((snap.in_flight, snap.waiting, snap.partitions), (0, 0, 0));
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn bulkhead_invariants_hold(setup in setup(), callers in prop::collection::vec(caller(), 1..60)) {
        run(setup, callers)?;
    }
}

/// An inner service whose readiness and response are released by hand, so the
/// response future can be dropped at each of its await points.
#[derive(Clone, Default)]
struct Gate {
    ready: Arc<AtomicBool>,
    respond: Arc<AtomicBool>,
    wakers: Arc<Mutex<Vec<Waker>>>,
    calls: Arc<AtomicUsize>,
}

impl Gate {
    fn open(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::SeqCst);
        for w in self.wakers.lock().unwrap().drain(..) {
            w.wake();
        }
    }
}

impl Service<u32> for Gate {
    type Response = u32;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<u32, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.ready.load(Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            self.wakers.lock().unwrap().push(cx.waker().clone());
            Poll::Pending
        }
    }

    fn call(&mut self, n: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let gate = self.clone();
        Box::pin(std::future::poll_fn(move |cx| {
            if gate.respond.load(Ordering::SeqCst) {
                Poll::Ready(Ok(n))
            } else {
                gate.wakers.lock().unwrap().push(cx.waker().clone());
                Poll::Pending
            }
        }))
    }
}

#[tokio::test(start_paused = true)]
async fn drop_at_each_await_point_releases_everything() {
    use futures::FutureExt;
    for stage in ["in line", "granted, inner not ready", "inner call running"] {
        let bh = Bulkhead::builder(1)
            .max_queue(4)
            .max_wait(Duration::from_secs(60))
            .build()
            .unwrap();
        let gate = Gate::default();
        gate.ready.store(true, Ordering::SeqCst);
        let mut svc = ServiceBuilder::new()
            .layer(bh.layer())
            .service(gate.clone());
        // Hold the permit with a first call whose response waits on the gate.
        let mut first = Some(Box::pin(svc.ready().await.unwrap().call(1)));
        assert!(first.as_mut().unwrap().as_mut().now_or_never().is_none());
        let mut second = Box::pin(svc.ready().await.unwrap().call(2));
        assert!(
            second.as_mut().now_or_never().is_none(),
            "{stage}: waits in line"
        );
        assert_eq!(bh.snapshot().waiting, 1);
        if stage != "in line" {
            gate.ready.store(false, Ordering::SeqCst);
            first = None; // the permit passes to `second`
            assert!(
                second.as_mut().now_or_never().is_none(),
                "{stage}: inner not ready"
            );
            assert_eq!(bh.snapshot().in_flight, 1);
            assert_eq!(bh.snapshot().waiting, 0);
            if stage == "inner call running" {
                gate.open(&gate.ready);
                assert!(
                    second.as_mut().now_or_never().is_none(),
                    "{stage}: call running"
                );
                assert_eq!(gate.calls.load(Ordering::SeqCst), 2);
            }
        }
        drop(second);
        drop(first);
        let snap = bh.snapshot();
        assert_eq!((snap.in_flight, snap.waiting), (0, 0), "{stage}: {snap:?}");
    }
}

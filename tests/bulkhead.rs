//! Bulkhead behaviour, under paused time: seed 000's scenario, limits, order,
//! partitions, run-time control, close, drops and streamed release.

mod support;

use futures::StreamExt;
use semaforo::bulkhead::{Bulkhead, QueueTicket, TicketStatus};
use semaforo::{BoxError, RejectKind, Rejected};
use std::time::Duration;
use support::{Job, Upstream};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn kind(err: &BoxError) -> RejectKind {
    Rejected::from_box(err)
        .expect("a semaforo rejection")
        .kind()
}

/// Calls `svc` now (the place in line is taken in `call`) and spawns the future.
async fn send<S>(svc: &mut S, job: Job) -> tokio::task::JoinHandle<Result<usize, BoxError>>
where
    S: Service<Job, Response = usize, Error = BoxError>,
    S::Future: Send + 'static,
{
    let fut = svc.ready().await.expect("ready").call(job);
    tokio::spawn(fut)
}

/// Calls `svc` and waits for the answer.
async fn call<S>(svc: &mut S, job: Job) -> Result<usize, BoxError>
where
    S: Service<Job, Response = usize, Error = BoxError>,
{
    svc.ready().await?.call(job).await
}

/// A bulkhead with `limit` permits and a line of `queue`.
fn line(limit: u32, queue: u32) -> Bulkhead {
    Bulkhead::builder(limit).max_queue(queue).build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn seed_000_sunday_night_50_teachers_5_at_a_time() {
    let up = Upstream::default();
    let bulkhead = Bulkhead::builder(5)
        .name("openai")
        .max_queue(45)
        .expected_service_time(secs(10))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer().ticket(|j: &Job| Some(j.ticket.clone())))
        .service(up.service());

    let start = Instant::now();
    let mut handles = Vec::new();
    let mut tickets = Vec::new();
    for id in 0..50 {
        let job = Job::new(id, secs(10));
        tickets.push(job.ticket.clone());
        handles.push(send(&mut svc, job).await);
    }
    // Each caller's first position is its arrival rank.
    for (id, t) in tickets.iter().enumerate() {
        if id < 5 {
            assert_eq!(t.status(), TicketStatus::Admitted, "teacher {id}");
        } else {
            let st = t.queue_status().expect("waiting");
            assert_eq!(st.position as usize, id - 4, "teacher {id}");
            assert_eq!(st.waiting, 45);
            // ETA: ceil(position / 5) × 10 s.
            assert_eq!(st.eta, Some(secs(10 * st.position.div_ceil(5))));
        }
    }
    assert_eq!(
        tickets[16].queue_status().unwrap().to_string(),
        "you are 12th of 45, about 30 s"
    );

    // Watch positions every second: they only go down, then the call is admitted.
    let watcher = tokio::spawn({
        let tickets = tickets.clone();
        async move {
            let mut last: Vec<Option<u64>> = tickets
                .iter()
                .map(|t| t.queue_status().map(|s| s.position))
                .collect();
            let mut admitted_at = vec![None; tickets.len()];
            let t0 = Instant::now();
            while admitted_at.iter().any(Option::is_none) {
                for (i, t) in tickets.iter().enumerate() {
                    match t.status() {
                        TicketStatus::Waiting(s) => {
                            let prev = last[i].expect("a waiting caller was waiting before");
                            assert!(
                                s.position <= prev,
                                "teacher {i}: {} after {prev}",
                                s.position
                            );
                            last[i] = Some(s.position);
                        }
                        TicketStatus::Admitted => {
                            admitted_at[i].get_or_insert(t0.elapsed());
                        }
                        other => panic!("teacher {i}: {other:?}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            admitted_at
        }
    });

    for h in handles {
        h.await.unwrap().unwrap();
    }
    let makespan = start.elapsed();
    let admitted_at = watcher.await.unwrap();
    assert_eq!(up.record.lock().unwrap().finished, 50, "50/50 succeed");
    assert_eq!(up.max_in_flight(), 5, "max in flight exactly 5");
    let ratio = makespan.as_secs_f64() / 100.0;
    assert!((0.99..=1.01).contains(&ratio), "makespan {makespan:?}");
    // The ETA was right: position p waited ceil(p/5) × 10 s (sampled every 0.5 s).
    for (id, at) in admitted_at.iter().enumerate().skip(5) {
        let expected = secs(10 * ((id as u64 - 4).div_ceil(5)));
        let at = at.unwrap();
        assert!(
            at >= expected && at <= expected + Duration::from_millis(500),
            "teacher {id} at {at:?}"
        );
    }
    // FIFO: started in arrival order.
    assert_eq!(up.start_order(), (0..50).collect::<Vec<_>>());
    let snap = bulkhead.snapshot();
    assert_eq!(
        (snap.in_flight, snap.waiting, snap.rejected_queue_full),
        (0, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn queue_full_rejects_at_once_without_calling_inner() {
    let up = Upstream::default();
    let bulkhead = Bulkhead::builder(1)
        .name("openai")
        .max_queue(1)
        .expected_service_time(secs(4))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer())
        .service(up.service());
    let a = send(&mut svc, Job::new(0, secs(10))).await;
    let b = send(&mut svc, Job::new(1, secs(10))).await;
    let t0 = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Job::new(2, secs(10)))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(kind(&err), RejectKind::QueueFull);
    assert_eq!(
        err.to_string(),
        "bulkhead 'openai': queue full (1/1 waiting), retry after 4 s"
    );
    assert_eq!(
        Rejected::from_box(&err).unwrap().retry_after(),
        Some(secs(4))
    );
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(
        up.start_order(),
        vec![0, 1],
        "the rejected call never reached the upstream"
    );
    assert_eq!(bulkhead.snapshot().rejected_queue_full, 1);
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_after_max_wait_with_retry_after() {
    let up = Upstream::default();
    let bulkhead = Bulkhead::builder(1)
        .max_queue(10)
        .max_wait(secs(5))
        .expected_service_time(secs(30))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer())
        .service(up.service());
    let _a = send(&mut svc, Job::new(0, secs(60))).await;
    let t0 = Instant::now();
    let err = send(&mut svc, Job::new(1, secs(1)))
        .await
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(t0.elapsed(), secs(5), "gave up exactly at max_wait");
    assert_eq!(kind(&err), RejectKind::QueueTimeout);
    assert_eq!(
        Rejected::from_box(&err).unwrap().retry_after(),
        Some(secs(30))
    );
    let snap = bulkhead.snapshot();
    assert_eq!((snap.waiting, snap.rejected_queue_timeout), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn strict_priority_then_fifo_within_priority() {
    let up = Upstream::default();
    let bulkhead = Bulkhead::builder(1)
        .max_queue(100)
        .priority_aging(None)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer().priority(|j: &Job| j.priority))
        .service(up.service());
    let mut hs = vec![send(&mut svc, Job::new(0, secs(1))).await];
    for (id, prio) in [(1, 0), (2, 10), (3, 5), (4, 10), (5, 0), (6, 5)] {
        let mut j = Job::new(id, secs(1));
        j.priority = prio;
        hs.push(send(&mut svc, j).await);
    }
    for h in hs {
        h.await.unwrap().unwrap();
    }
    assert_eq!(up.start_order(), vec![0, 2, 4, 3, 6, 1, 5]);
}

/// Under constant high-priority load, a low-priority caller still gets its turn:
/// with aging 1 s per level, it is overtaken only by callers that arrive less than
/// 3 s after it (Δpriority 3). With strict priority it waits for the whole flood.
#[tokio::test(start_paused = true)]
async fn starvation_guard_bounds_how_long_low_priority_waits() {
    async fn low_priority_start(aging: Option<Duration>) -> Duration {
        let up = Upstream::default();
        let bulkhead = Bulkhead::builder(1)
            .max_queue(1000)
            .priority_aging(aging)
            .build()
            .unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(bulkhead.layer().priority(|j: &Job| j.priority))
            .service(up.service());
        let t0 = Instant::now();
        let mut hs = vec![send(&mut svc, Job::new(0, secs(1))).await]; // busy
        hs.push(send(&mut svc, Job::new(1, secs(1))).await); // low, priority 0
                                                             // A flood: a priority-3 job every 0.5 s for 60 s (twice what the upstream can do).
        for id in 2..122 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut j = Job::new(id, secs(1));
            j.priority = 3;
            hs.push(send(&mut svc, j).await);
        }
        for h in hs {
            h.await.unwrap().unwrap();
        }
        let starts = up.record.lock().unwrap().starts.clone();
        let low = starts.iter().find(|s| s.0 == 1).unwrap();
        low.3 - t0
    }
    let guarded = low_priority_start(Some(secs(1))).await;
    // Overtaken by the ≤ 6 high-priority jobs that arrived within 3 s: starts by ~7 s.
    assert!(
        guarded <= secs(8),
        "with aging the low-priority job started at {guarded:?}"
    );
    let strict = low_priority_start(None).await;
    assert!(
        strict >= secs(100),
        "strict priority starves it until the flood ends: {strict:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn partitions_cap_each_tenant_inside_the_global_limit() {
    let up = Upstream::default();
    let bulkhead = Bulkhead::builder(4)
        .max_per_key(2)
        .max_queue(100)
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer().partition(|j: &Job| j.tenant))
        .service(up.service());
    let mut hs = Vec::new();
    for id in 0..10 {
        let mut j = Job::new(id, secs(10));
        j.tenant = 1;
        hs.push(send(&mut svc, j).await);
    }
    // Tenant 2 arrives later but is not stuck behind tenant 1's line.
    tokio::time::sleep(secs(1)).await;
    let t0 = Instant::now();
    let mut b = Job::new(100, secs(10));
    b.tenant = 2;
    let b = send(&mut svc, b).await;
    tokio::task::yield_now().await;
    assert_eq!(
        up.record.lock().unwrap().per_tenant.get(&2),
        Some(&1),
        "tenant 2 admitted at once"
    );
    assert_eq!(b.await.unwrap().unwrap(), 100);
    assert_eq!(t0.elapsed(), secs(10));
    for h in hs {
        h.await.unwrap().unwrap();
    }
    assert_eq!(up.record.lock().unwrap().max_per_tenant, 2);
    assert!(up.max_in_flight() <= 4);
    // Tenant 1: 10 jobs, 2 at a time, 10 s each → 50 s.
    let snap = bulkhead.snapshot();
    assert_eq!((snap.in_flight, snap.waiting, snap.partitions), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn set_max_concurrent_grows_and_shrinks_without_cutting_calls() {
    let up = Upstream::default();
    let bulkhead = line(1, 100);
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer())
        .service(up.service());
    let mut hs = Vec::new();
    for id in 0..6 {
        hs.push(send(&mut svc, Job::new(id, secs(10))).await);
    }
    tokio::task::yield_now().await;
    assert_eq!(bulkhead.snapshot().in_flight, 1);
    bulkhead.set_max_concurrent(3);
    tokio::task::yield_now().await;
    assert_eq!(
        up.record.lock().unwrap().in_flight,
        3,
        "growing admits waiters at once"
    );
    bulkhead.set_max_concurrent(1);
    tokio::time::sleep(secs(5)).await;
    assert_eq!(
        up.record.lock().unwrap().in_flight,
        3,
        "shrinking cuts no running call"
    );
    tokio::time::sleep(secs(6)).await; // t = 11: the 3 finished; only 1 admitted now
    assert_eq!(up.record.lock().unwrap().in_flight, 1);
    assert_eq!(bulkhead.snapshot().limit, 1);
    for h in hs {
        h.await.unwrap().unwrap();
    }
    assert_eq!(up.max_in_flight(), 3);
}

#[tokio::test(start_paused = true)]
async fn close_releases_waiters_at_once_and_lets_running_calls_finish() {
    let up = Upstream::default();
    let bulkhead = line(2, 10);
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer())
        .service(up.service());
    let mut hs = Vec::new();
    for id in 0..6 {
        hs.push(send(&mut svc, Job::new(id, secs(10))).await);
    }
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    assert_eq!(bulkhead.close(), 4);
    let mut ok = 0;
    for h in hs {
        match h.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(kind(&e), RejectKind::ShuttingDown),
        }
    }
    assert_eq!(ok, 2, "the running calls finished");
    assert_eq!(t0.elapsed(), secs(10));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Job::new(9, secs(1)))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), RejectKind::ShuttingDown);
    let snap = bulkhead.snapshot();
    assert!(snap.closed);
    assert_eq!(
        (snap.in_flight, snap.waiting, snap.rejected_shutting_down),
        (0, 0, 5)
    );
}

#[tokio::test(start_paused = true)]
async fn poll_ready_holds_no_permit() {
    let up = Upstream::default();
    let bulkhead = Bulkhead::builder(1).build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(bulkhead.layer())
        .service(up.service());
    // Many clones polled ready and left idle (tower#408): nothing is held.
    let mut idle: Vec<_> = (0..10).map(|_| svc.clone()).collect();
    for c in &mut idle {
        c.ready().await.unwrap();
    }
    assert_eq!(bulkhead.snapshot().in_flight, 0);
    let mut one = svc.clone();
    assert_eq!(call(&mut one, Job::new(1, secs(1))).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_queued_callers_moves_the_others_up() {
    let up = Upstream::default();
    let bulkhead = line(1, 10);
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer().ticket(|j: &Job| Some(j.ticket.clone())))
        .service(up.service());
    let first = send(&mut svc, Job::new(0, secs(10))).await;
    let mut queued = Vec::new();
    let mut tickets = Vec::new();
    for id in 1..=4 {
        let j = Job::new(id, secs(1));
        tickets.push(j.ticket.clone());
        queued.push(Some(svc.ready().await.unwrap().call(j)));
    }
    let pos = |t: &QueueTicket| t.queue_status().map(|s| (s.position, s.waiting));
    assert_eq!(pos(&tickets[3]), Some((4, 4)));
    queued[1] = None; // drop the 2nd in line
    assert_eq!(tickets[1].status(), TicketStatus::Cancelled);
    assert_eq!(pos(&tickets[2]), Some((2, 3)));
    assert_eq!(pos(&tickets[3]), Some((3, 3)));
    assert_eq!(bulkhead.snapshot().waiting, 3);
    first.await.unwrap().unwrap();
    let rest: Vec<_> = queued.into_iter().flatten().collect();
    for r in futures::future::join_all(rest).await {
        r.unwrap();
    }
    assert_eq!(up.start_order(), vec![0, 1, 3, 4]);
    assert_eq!(bulkhead.snapshot().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_running_call_or_a_granted_waiter_releases_the_permit() {
    let up = Upstream::default();
    let bulkhead = line(1, 10);
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer())
        .service(up.service());
    // Running call dropped mid-way.
    let running = send(&mut svc, Job::new(0, secs(100))).await;
    tokio::task::yield_now().await;
    assert_eq!(bulkhead.snapshot().in_flight, 1);
    // A waiter that will be granted the permit but never polled again.
    let granted = svc.ready().await.unwrap().call(Job::new(1, secs(1)));
    running.abort();
    let _ = running.await;
    tokio::task::yield_now().await;
    assert_eq!(
        bulkhead.snapshot().in_flight,
        1,
        "the permit passed to the waiter"
    );
    drop(granted);
    let snap = bulkhead.snapshot();
    assert_eq!(
        (snap.in_flight, snap.waiting),
        (0, 0),
        "and came back when it was dropped"
    );
    assert_eq!(call(&mut svc, Job::new(2, secs(1))).await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_random_drops_leak_nothing() {
    use rand::{Rng, SeedableRng};
    let up = Upstream::default();
    let bulkhead = Bulkhead::builder(7)
        .max_per_key(3)
        .max_queue(20_000)
        .build()
        .unwrap();
    let mut svc = support::prioritised_and_partitioned(&bulkhead, &up);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(10_000);
    let mut hs = Vec::new();
    for id in 0..10_000 {
        let mut j = Job::new(id, Duration::from_millis(rng.random_range(1..500)));
        j.priority = rng.random_range(0..3);
        j.tenant = rng.random_range(0..5);
        let fut = svc.ready().await.unwrap().call(j);
        let drop_after = Duration::from_millis(rng.random_range(0..2_000));
        hs.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(drop_after, fut).await;
        }));
        if id % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for h in hs {
        h.await.unwrap();
    }
    let snap = bulkhead.snapshot();
    assert_eq!(
        (snap.in_flight, snap.waiting, snap.partitions),
        (0, 0, 0),
        "{snap:?}"
    );
    assert!(up.max_in_flight() <= 7);
    assert!(up.record.lock().unwrap().max_per_tenant <= 3);
    assert_eq!(up.record.lock().unwrap().in_flight, 0);
}

mod streamed {
    use super::*;
    use futures::stream::{self, BoxStream};
    use semaforo::guard::Tapped;

    type Chunks = BoxStream<'static, Result<u32, std::io::Error>>;

    fn bulkhead() -> Bulkhead {
        Bulkhead::builder(1).max_queue(1).build().unwrap()
    }

    /// A service answering a stream of 3 chunks, 1 s apart; `fail` makes the 2nd an error.
    fn streaming(
        fail: bool,
    ) -> impl Service<
        u32,
        Response = Chunks,
        Error = std::io::Error,
        Future = futures::future::Ready<Result<Chunks, std::io::Error>>,
    > + Clone {
        tower::service_fn(move |_n: u32| {
            let s = stream::iter(0..3u32)
                .then(move |i| async move {
                    tokio::time::sleep(secs(1)).await;
                    if fail && i == 1 {
                        Err(std::io::Error::other("event: error"))
                    } else {
                        Ok(i)
                    }
                })
                .boxed();
            futures::future::ready(Ok::<_, std::io::Error>(s))
        })
    }

    async fn open(bh: &Bulkhead, fail: bool) -> Tapped<Chunks, semaforo::bulkhead::BulkheadPermit> {
        let mut svc = ServiceBuilder::new()
            .layer(bh.layer().release_on_stream_end())
            .service(streaming(fail));
        svc.ready().await.unwrap().call(7).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn slot_held_until_the_last_chunk() {
        let bh = bulkhead();
        let mut s = open(&bh, false).await;
        assert_eq!(
            bh.snapshot().in_flight,
            1,
            "headers arrived, the stream has not"
        );
        assert_eq!(s.next().await.unwrap().unwrap(), 0);
        assert_eq!(s.next().await.unwrap().unwrap(), 1);
        assert_eq!(s.next().await.unwrap().unwrap(), 2);
        assert_eq!(bh.snapshot().in_flight, 1);
        assert!(s.next().await.is_none());
        assert_eq!(bh.snapshot().in_flight, 0, "released at the end");
    }

    #[tokio::test(start_paused = true)]
    async fn slot_released_when_the_stream_errors() {
        let bh = bulkhead();
        let mut s = open(&bh, true).await;
        assert!(s.next().await.unwrap().is_ok());
        assert_eq!(bh.snapshot().in_flight, 1);
        assert!(s.next().await.unwrap().is_err());
        assert_eq!(bh.snapshot().in_flight, 0, "released at the error");
    }

    #[tokio::test(start_paused = true)]
    async fn slot_released_when_the_stream_is_dropped() {
        let bh = bulkhead();
        let mut s = open(&bh, false).await;
        assert!(s.next().await.unwrap().is_ok());
        assert_eq!(bh.snapshot().in_flight, 1);
        drop(s);
        assert_eq!(bh.snapshot().in_flight, 0, "released on drop");
    }

    #[tokio::test(start_paused = true)]
    async fn next_caller_waits_for_the_stream_not_the_headers() {
        let bh = bulkhead();
        let mut s = open(&bh, false).await;
        let bh2 = bh.clone();
        let t0 = Instant::now();
        let next = tokio::spawn(async move {
            let s = open(&bh2, false).await;
            (t0.elapsed(), s.count().await)
        });
        while s.next().await.is_some() {}
        assert_eq!(t0.elapsed(), secs(3));
        let (admitted_at, chunks) = next.await.unwrap();
        assert_eq!(
            admitted_at,
            secs(3),
            "admitted when the first stream ended, not at its headers"
        );
        assert_eq!(chunks, 3);
    }
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn http_body_holds_the_slot_until_it_ends() {
    use http_body_util::BodyExt;
    let bh = Bulkhead::builder(1).build().unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(bh.layer().release_on_body_end())
        .service(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::io::Error>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"hola"),
            )))
        }));
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(()))
        .await
        .unwrap();
    assert_eq!(bh.snapshot().in_flight, 1);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hola");
    assert_eq!(bh.snapshot().in_flight, 0);
}

#[test]
fn bad_configuration_is_an_error_not_a_panic() {
    let field = |b: semaforo::bulkhead::BulkheadBuilder| b.build().unwrap_err().field;
    assert_eq!(field(Bulkhead::builder(0)), "max_concurrent");
    assert_eq!(field(Bulkhead::builder(u32::MAX)), "max_concurrent");
    assert_eq!(field(Bulkhead::builder(1).max_queue(u32::MAX)), "max_queue");
    assert_eq!(
        field(Bulkhead::builder(1).max_wait(Duration::ZERO)),
        "max_wait"
    );
    assert_eq!(field(Bulkhead::builder(1).max_per_key(0)), "max_per_key");
}

/// A waiter granted a permit but not yet polled still starts before a
/// newcomer of the same instant: the newcomer queues behind it instead of
/// taking the permit freed next through the fast path.
#[tokio::test(start_paused = true)]
async fn a_newcomer_starts_after_a_granted_waiter_not_yet_polled() {
    let (bulkhead, svc, log, c) = granted::one_granted_one_free().await;
    let mut d = Box::pin(svc.clone().oneshot((3, None)));
    let _ = futures::poll!(&mut d);
    assert_eq!(*log.lock().unwrap(), vec![0, 1], "D started before C");
    assert_eq!(c.await.unwrap(), 2);
    assert_eq!(d.await.unwrap(), 3);
    assert_eq!(*log.lock().unwrap(), vec![0, 1, 2, 3]);
    let snap = bulkhead.snapshot();
    assert_eq!((snap.in_flight, snap.waiting), (0, 0));
    // The next call takes the fast path again.
    assert_eq!(svc.clone().oneshot((4, None)).await.unwrap(), 4);
}

/// Dropped while granted and not polled (both the earlier waiter and a
/// newcomer that yielded to it): the permits come back and the waiter count
/// clears, so the next call takes the fast path.
#[tokio::test(start_paused = true)]
async fn granted_waiters_dropped_before_polling_give_everything_back() {
    let (bulkhead, svc, log, c) = granted::one_granted_one_free().await;
    let mut d = Box::pin(svc.clone().oneshot((3, None)));
    assert!(futures::poll!(&mut d).is_pending(), "D yields to C once");
    assert_eq!(bulkhead.snapshot().in_flight, 2, "C and D hold permits");
    drop(d);
    drop(c);
    let snap = bulkhead.snapshot();
    assert_eq!((snap.in_flight, snap.waiting), (0, 0));
    let mut e = Box::pin(svc.clone().oneshot((4, None)));
    assert!(
        matches!(futures::poll!(&mut e), std::task::Poll::Ready(Ok(4))),
        "the fast path again"
    );
    assert_eq!(*log.lock().unwrap(), vec![0, 1, 4]);
}

/// A newcomer never waits for an earlier call's granted future to be polled:
/// that future may not be polled again before the newcomer is awaited
/// (`let c = svc.call(..); let d = svc.call(..); d.await; c.await`).
#[tokio::test(start_paused = true)]
async fn a_newcomer_does_not_wait_for_an_unpolled_grant() {
    let (bulkhead, svc, log, c) = granted::one_granted_one_free().await;
    // C is granted and not polled again until D has answered.
    let t0 = Instant::now();
    let d = tokio::time::timeout(secs(1), svc.clone().oneshot((3, None))).await;
    assert_eq!(d.expect("D does not wait for C").unwrap(), 3);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(*log.lock().unwrap(), vec![0, 1, 3], "C not polled: D first");
    assert_eq!(c.await.unwrap(), 2);
    let snap = bulkhead.snapshot();
    assert_eq!((snap.in_flight, snap.waiting), (0, 0));
}

/// The three tests above: the state after which a newcomer meets a grant
/// not yet picked up.
mod granted {
    use super::*;
    use futures::future::BoxFuture;
    use std::sync::{Arc, Mutex};
    use tokio::sync::oneshot;
    use tower::util::BoxCloneService;
    use tower::Layer;

    /// A call: its id, and a gate that holds its permit until opened.
    pub type Call = (u32, Option<oneshot::Receiver<()>>);

    /// A bulkhead of 2 permits around a service that logs each start. A (0)
    /// and B (1) hold both permits, C (2) queues; A and B end: C is granted
    /// (its future, returned, not polled since) and one permit is free.
    pub async fn one_granted_one_free() -> (
        Bulkhead,
        BoxCloneService<Call, u32, BoxError>,
        Arc<Mutex<Vec<u32>>>,
        BoxFuture<'static, Result<u32, BoxError>>,
    ) {
        let bulkhead = Bulkhead::builder(2).max_queue(10).build().unwrap();
        let log = Arc::new(Mutex::new(Vec::<u32>::new()));
        let l = log.clone();
        let svc = BoxCloneService::new(bulkhead.layer().layer(tower::service_fn(
            move |(id, gate): Call| {
                l.lock().unwrap().push(id);
                async move {
                    if let Some(g) = gate {
                        let _ = g.await;
                    }
                    Ok::<u32, BoxError>(id)
                }
            },
        )));
        let (open_a, gate_a) = oneshot::channel();
        let (open_b, gate_b) = oneshot::channel();
        let a = tokio::spawn(svc.clone().oneshot((0, Some(gate_a))));
        let b = tokio::spawn(svc.clone().oneshot((1, Some(gate_b))));
        while log.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
        let mut c: BoxFuture<'static, Result<u32, BoxError>> =
            Box::pin(svc.clone().oneshot((2, None)));
        assert!(futures::poll!(&mut c).is_pending(), "both permits are held");
        assert_eq!(bulkhead.snapshot().waiting, 1);
        // A's permit goes to C (not polled yet); B's permit is then free.
        open_a.send(()).unwrap();
        open_b.send(()).unwrap();
        assert_eq!(a.await.unwrap().unwrap(), 0);
        assert_eq!(b.await.unwrap().unwrap(), 1);
        (bulkhead, svc, log, c)
    }
}

/// Admissions paused (`set_max_concurrent(0)`): a waiter's ticket says no
/// time (it said "about 2 s", as if one permit were still there), and the
/// health report calls the bulkhead degraded with its line not full.
#[tokio::test(start_paused = true)]
async fn paused_admissions_give_no_eta_and_a_degraded_health() {
    use semaforo::health::{Health, Status};
    let bulkhead = Bulkhead::builder(1)
        .max_queue(10)
        .expected_service_time(Duration::from_secs(2))
        .build()
        .unwrap();
    let shutdown = semaforo::shutdown::Shutdown::new();
    let health = Health::new(&shutdown).bulkhead("b", &bulkhead);
    assert_eq!(health.report().components[0].status, Status::Ok);
    bulkhead.set_max_concurrent(0);
    let svc = bulkhead
        .layer()
        .ticket(|r: &(u32, QueueTicket)| Some(r.1.clone()))
        .layer(tower::service_fn(|r: (u32, QueueTicket)| async move {
            Ok::<_, BoxError>(r.0)
        }));
    let t = QueueTicket::new();
    let waiter = tokio::spawn(svc.clone().oneshot((1, t.clone())));
    tokio::time::sleep(Duration::from_millis(1)).await;
    match t.status() {
        TicketStatus::Waiting(s) => {
            assert_eq!((s.position, s.waiting), (1, 1));
            assert_eq!(s.eta, None, "paused: no time to say");
        }
        other => panic!("waiting, not {other:?}"),
    }
    assert_eq!(health.report().components[0].status, Status::Degraded);
    bulkhead.set_max_concurrent(1);
    assert_eq!(waiter.await.unwrap().unwrap(), 1);
    assert_eq!(health.report().components[0].status, Status::Ok);
}

/// `try_permit` on a closed bulkhead: `ShuttingDown` (counted as such), not
/// `QueueFull` with a `retry_after` that never comes true.
#[tokio::test(start_paused = true)]
async fn try_permit_after_close_is_shutting_down() {
    let bulkhead = Bulkhead::builder(2).build().unwrap();
    bulkhead.close();
    let r = bulkhead.try_permit().unwrap_err();
    assert_eq!(r.kind(), RejectKind::ShuttingDown, "{r}");
    assert_eq!(r.retry_after(), None);
    let s = bulkhead.snapshot();
    assert_eq!((s.rejected_shutting_down, s.rejected_queue_full), (1, 0));
}

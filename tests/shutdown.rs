//! Graceful shutdown under paused time: refusal after the trigger, readiness,
//! drain with a deadline, cancellation, released queues, streamed bodies, and
//! a report that counts every call once.

use futures::stream::{self, BoxStream, StreamExt};
use semaforo::bulkhead::Bulkhead;
use semaforo::shutdown::Shutdown;
use semaforo::{BoxError, RejectKind, Rejected};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn kind(e: &BoxError) -> RejectKind {
    Rejected::from_box(e).expect("a rejection").kind()
}

/// How many of `tasks` were answered `ShuttingDown` (any other error fails).
async fn shut_out<T>(tasks: Vec<tokio::task::JoinHandle<Result<T, BoxError>>>) -> usize {
    let mut refused = 0;
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            assert_eq!(kind(&e), RejectKind::ShuttingDown);
            refused += 1;
        }
    }
    refused
}

/// A call that works for `n` seconds.
fn worker() -> impl Service<
    u64,
    Response = u64,
    Error = std::io::Error,
    Future = futures::future::BoxFuture<'static, Result<u64, std::io::Error>>,
> + Clone {
    tower::service_fn(|n: u64| {
        Box::pin(async move {
            tokio::time::sleep(secs(n)).await;
            Ok(n)
        }) as futures::future::BoxFuture<'static, _>
    })
}

#[tokio::test(start_paused = true)]
async fn hundred_in_flight_drain_within_the_deadline_and_the_rest_is_cancelled() {
    let shutdown = Shutdown::new();
    let svc = ServiceBuilder::new()
        .layer(shutdown.layer())
        .service(worker());
    let mut readiness = shutdown.readiness();
    // 100 calls: 90 take 1..=20 s, 10 take 60 s.
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let mut s = svc.clone();
        let work = if i < 90 { 1 + i % 20 } else { 60 };
        tasks.push(tokio::spawn(
            async move { s.ready().await?.call(work).await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(shutdown.in_flight(), 100);
    let t0 = Instant::now();
    shutdown.trigger();
    assert!(!shutdown.is_ready(), "readiness flips at once");
    assert!(readiness.has_changed().unwrap());
    assert!(!*readiness.borrow_and_update());
    // New calls are refused at once, with a retry-after hint.
    let mut late = svc.clone();
    let err = late.ready().await.unwrap().call(1).await.unwrap_err();
    assert_eq!(kind(&err), RejectKind::ShuttingDown);
    assert_eq!(
        Rejected::from_box(&err).unwrap().retry_after(),
        Some(secs(1))
    );
    assert_eq!(t0.elapsed(), Duration::ZERO);

    let report = shutdown.drain(secs(30)).await;
    assert_eq!(t0.elapsed(), secs(30), "the drain ends at its deadline");
    let (mut ok, mut cancelled) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(kind(&e), RejectKind::ShuttingDown);
                cancelled += 1;
            }
        }
    }
    assert_eq!((ok, cancelled), (90, 10));
    assert_eq!(
        (report.completed, report.cancelled, report.rejected),
        (90, 10, 1),
        "{report:?}"
    );
    assert_eq!(report.still_streaming, 0);
    assert_eq!(shutdown.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_drain_with_nothing_left_returns_at_once() {
    let shutdown = Shutdown::new();
    let mut svc = ServiceBuilder::new()
        .layer(shutdown.layer())
        .service(worker());
    svc.ready().await.unwrap().call(2).await.unwrap();
    let t0 = Instant::now();
    let report = shutdown.drain(secs(30)).await;
    assert_eq!(t0.elapsed(), Duration::ZERO);
    // The call ended before the trigger: the drain finished nothing.
    assert_eq!((report.completed, report.cancelled), (0, 0));
}

/// A server that served thousands of calls reports, at SIGTERM, only the
/// calls its drain finished.
#[tokio::test(start_paused = true)]
async fn the_report_counts_what_the_drain_finished_not_every_call_since_start() {
    let shutdown = Shutdown::new();
    let svc = ServiceBuilder::new()
        .layer(shutdown.layer())
        .service(worker());
    for _ in 0..4_975 {
        svc.clone().oneshot(0).await.unwrap();
    }
    let running: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(5)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let report = shutdown.drain(secs(30)).await;
    assert_eq!((report.completed, report.cancelled), (3, 0));
    for r in running {
        r.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn queued_callers_of_a_watched_bulkhead_are_released_never_left_hanging() {
    let shutdown = Shutdown::new();
    let bulkhead = Bulkhead::builder(2).max_queue(10).build().unwrap();
    shutdown.watch(bulkhead.clone());
    let svc = ServiceBuilder::new()
        .layer(shutdown.layer())
        .layer(bulkhead.layer())
        .service(worker());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..7 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move { s.ready().await?.call(5).await }));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(bulkhead.snapshot().waiting, 5);
    let report = shutdown.drain(secs(30)).await;
    assert_eq!(report.queued_released, 5);
    let released_at_once = shut_out(tasks).await;
    assert_eq!(released_at_once, 5);
    // The two running ones finished (5 s); the five released ones ended too.
    assert_eq!(t0.elapsed(), secs(5));
    assert_eq!((report.completed, report.cancelled), (7, 0));
}

#[tokio::test(start_paused = true)]
async fn streamed_answers_are_counted_until_their_last_chunk() {
    type Chunks = BoxStream<'static, Result<u32, std::io::Error>>;
    let shutdown = Shutdown::new();
    let svc = tower::service_fn(|secs_long: u64| {
        let s: Chunks = stream::iter(0..secs_long as u32)
            .then(|i| async move {
                tokio::time::sleep(secs(1)).await;
                Ok(i)
            })
            .boxed();
        futures::future::ready(Ok::<_, std::io::Error>(s))
    });
    let mut svc = ServiceBuilder::new()
        .layer(shutdown.layer().release_on_stream_end())
        .service(svc);
    let short = svc.ready().await.unwrap().call(10).await.unwrap();
    let long = svc.ready().await.unwrap().call(100).await.unwrap();
    assert_eq!(
        shutdown.in_flight(),
        2,
        "headers are in, the streams are not over"
    );
    let reader = |mut s: semaforo::guard::Tapped<Chunks, semaforo::shutdown::InFlight>| async move {
        let mut n = 0;
        while let Some(Ok(_)) = s.next().await {
            n += 1;
        }
        n
    };
    let short = tokio::spawn(reader(short));
    let long = tokio::spawn(reader(long));
    let report = shutdown.drain(secs(30)).await;
    assert_eq!(short.await.unwrap(), 10);
    assert_eq!(report.completed, 1);
    assert_eq!(
        report.still_streaming, 1,
        "the 100 s stream was still open at the deadline"
    );
    long.abort();
    let _ = long.await;
    assert_eq!(shutdown.in_flight(), 0, "released when the client let go");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_is_not_left_counted() {
    let shutdown = Shutdown::new();
    let mut svc = ServiceBuilder::new()
        .layer(shutdown.layer())
        .service(worker());
    let fut = svc.ready().await.unwrap().call(100);
    let _ = tokio::time::timeout(secs(1), fut).await;
    assert_eq!(shutdown.in_flight(), 0);
    let t0 = Instant::now();
    shutdown.drain(secs(30)).await;
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn callers_waiting_for_pace_are_released_at_the_trigger() {
    use semaforo::pace::{Cost, Pace};
    let shutdown = Shutdown::new();
    let pace = Pace::builder().tokens_per_minute(6_000).build().unwrap(); // 100 tokens/s
    shutdown.watch(pace.clone());
    let svc = ServiceBuilder::new()
        .layer(shutdown.layer())
        .layer(pace.layer().weigh(|n: &u64| Cost::tokens(*n)))
        .service(tower::service_fn(|n: u64| async move {
            Ok::<_, std::io::Error>(n)
        }));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut s = svc.clone();
        // 6,000 tokens each: the first goes, the others would wait 60, 120, 180 s.
        tasks.push(tokio::spawn(
            async move { s.ready().await?.call(6_000).await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(pace.snapshot().waiting, 3);
    let t0 = Instant::now();
    let report = shutdown.drain(secs(30)).await;
    assert_eq!(
        t0.elapsed(),
        Duration::ZERO,
        "nobody left waiting for the budget"
    );
    assert_eq!(report.queued_released, 3);
    let released = shut_out(tasks).await;
    assert_eq!(released, 3);
    // The first call ended before the trigger; the three released ended in it.
    assert_eq!((report.completed, report.cancelled), (3, 0));
    assert_eq!(pace.snapshot().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn callers_waiting_in_a_quota_line_are_released_at_the_trigger() {
    use semaforo::quota::{Quota, Rate};
    let shutdown = Shutdown::new();
    // 1 call per 10 s per key, waiting up to 60 s.
    let quota = Quota::builder()
        .plan("p", Rate::new(1, secs(10)))
        .max_wait(secs(60))
        .build::<u64>()
        .unwrap();
    let plan = quota.plan_id("p").unwrap();
    shutdown.watch(quota.clone());
    let svc = ServiceBuilder::new()
        .layer(shutdown.layer())
        .layer(quota.layer(move |_: &u64| (7u64, plan)))
        .service(tower::service_fn(|n: u64| async move {
            Ok::<_, std::io::Error>(n)
        }));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut s = svc.clone();
        // Key 7: the first goes, the others would wait 10, 20, 30 s.
        tasks.push(tokio::spawn(async move { s.ready().await?.call(1).await }));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(quota.snapshot().waiting, 3);
    let t0 = Instant::now();
    let report = shutdown.drain(secs(30)).await;
    assert_eq!(t0.elapsed(), Duration::ZERO, "nobody left waiting in line");
    assert_eq!(report.queued_released, 3);
    let released = shut_out(tasks).await;
    assert_eq!(released, 3);
    assert_eq!(quota.snapshot().waiting, 0);
    // Closed: a call over its quota is refused at once instead of waiting;
    // one within its quota (another key) still passes the quota.
    let mut inner = ServiceBuilder::new()
        .layer(quota.layer(move |k: &u64| (*k, plan)))
        .service(tower::service_fn(|n: u64| async move {
            Ok::<_, std::io::Error>(n)
        }));
    let t0 = Instant::now();
    let err = inner.ready().await.unwrap().call(7).await.unwrap_err();
    assert_eq!(kind(&err), RejectKind::ShuttingDown);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(inner.ready().await.unwrap().call(8).await.unwrap(), 8);
}

#[tokio::test(start_paused = true)]
async fn a_line_watched_after_the_trigger_is_closed_at_once() {
    let shutdown = Shutdown::new();
    shutdown.trigger();
    let bulkhead = Bulkhead::builder(1).max_queue(10).build().unwrap();
    shutdown.watch(bulkhead.clone());
    assert!(bulkhead.snapshot().closed);
}

/// Closing is idempotent and counts every waiter once, however often a line
/// is closed or watched; a closed quota still lets a call within its quota
/// through, even while an old waiter has not been polled yet (both found by
/// an outside attacker).
#[tokio::test(start_paused = true)]
async fn a_second_close_releases_and_counts_nobody() {
    use futures::FutureExt;
    use semaforo::pace::Pace;
    use semaforo::quota::{PlanId, Quota, Rate};
    let echo = || tower::service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n) });
    // The pacer: one request a minute, two waiting.
    let pace = Pace::builder().requests_per_minute(1).build().unwrap();
    let mut svc = tower::Layer::layer(&pace.layer(), echo());
    svc.ready().await.unwrap().call(1).await.unwrap();
    let mut w1 = Box::pin(svc.ready().await.unwrap().call(2));
    let mut w2 = Box::pin(svc.ready().await.unwrap().call(3));
    assert!((&mut w1).now_or_never().is_none());
    assert!((&mut w2).now_or_never().is_none());
    let shutdown = Shutdown::new();
    shutdown.watch(pace.clone());
    shutdown.trigger();
    shutdown.watch(pace.clone()); // watched again after the trigger
    assert_eq!(pace.close(), 0);
    for w in [w1, w2] {
        let e = tokio::time::timeout(secs(1), w)
            .await
            .expect("no hang")
            .unwrap_err();
        assert_eq!(kind(&e), RejectKind::ShuttingDown);
    }
    assert_eq!(shutdown.drain(secs(1)).await.queued_released, 2);
    assert_eq!(pace.snapshot().waiting, 0);

    // The quota: key 1 has a waiter that is not polled again before key 2 calls.
    let quota = Quota::builder()
        .plan("p", Rate::per_second(1).burst(1))
        .max_wait(secs(60))
        .build::<u32>()
        .unwrap();
    let mut svc = tower::Layer::layer(&quota.layer(|n: &u32| (*n, PlanId::FIRST)), echo());
    svc.ready().await.unwrap().call(1).await.unwrap();
    let mut waiter = Box::pin(svc.ready().await.unwrap().call(1));
    assert!((&mut waiter).now_or_never().is_none());
    assert_eq!(quota.close(), 1);
    assert_eq!(quota.close(), 0);
    assert_eq!(svc.ready().await.unwrap().call(2).await.unwrap(), 2);
    let e = waiter.await.unwrap_err();
    assert_eq!(kind(&e), RejectKind::ShuttingDown);
    assert_eq!(quota.snapshot().waiting, 0);
}

/// A pacer caller that had its turn (its tokens reserved) and is readying the
/// inner service when the shutdown closes the line is past the line: it goes
/// on, and is not counted as released (found by an outside attacker).
#[tokio::test(start_paused = true)]
async fn a_caller_past_the_pacers_line_goes_on_at_the_close() {
    use semaforo::pace::Pace;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    /// Not ready until opened.
    #[derive(Clone, Default)]
    struct Gate(Arc<(AtomicBool, Mutex<Option<Waker>>)>);
    impl Service<u32> for Gate {
        type Response = u32;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<u32, std::io::Error>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
            if self.0 .0.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            *self.0 .1.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
        fn call(&mut self, n: u32) -> Self::Future {
            std::future::ready(Ok(n))
        }
    }

    let gate = Gate::default();
    // One request a second, no burst.
    let pace = Pace::builder()
        .limit(semaforo::pace::Limit::requests_per_minute(60).burst(1))
        .build()
        .unwrap();
    let shutdown = Shutdown::new();
    shutdown.watch(pace.clone());
    let mut svc = tower::Layer::layer(&pace.layer(), gate.clone());
    gate.0 .0.store(true, Ordering::SeqCst);
    svc.ready().await.unwrap().call(1).await.unwrap(); // spends the second
    let ready = svc.ready().await.unwrap();
    let call = ready.call(7); // waits ~1 s in the pacer's line
    gate.0 .0.store(false, Ordering::SeqCst);
    let call = tokio::spawn(call);
    // Its turn comes (reserved); the inner service is not ready.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(pace.snapshot().waiting, 0, "out of the line");
    assert!(!call.is_finished());
    shutdown.trigger();
    gate.0 .0.store(true, Ordering::SeqCst);
    if let Some(w) = gate.0 .1.lock().unwrap().take() {
        w.wake();
    }
    let report = shutdown.drain(secs(1)).await;
    assert_eq!(
        call.await.unwrap().unwrap(),
        7,
        "it had its turn: it goes on"
    );
    assert_eq!(report.queued_released, 0);
}

/// `signal()` answers an error, never a panic, where it cannot install its
/// handlers; in a runtime with IO it installs them at once.
#[cfg(all(feature = "signal", unix))]
#[test]
fn signal_reports_what_keeps_it_from_installing() {
    let e = semaforo::shutdown::signal().unwrap_err();
    assert!(e.to_string().contains("tokio runtime"), "{e}");
    let no_io = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let e = no_io.block_on(async { semaforo::shutdown::signal().unwrap_err() });
    assert!(e.to_string().contains("IO driver"), "{e}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let installed = semaforo::shutdown::signal();
        assert!(installed.is_ok());
    });
}

/// Listeners add up: a shutdown with its own listener, given to the LLM
/// preset that has one too, tells both.
#[cfg(feature = "llm")]
#[test]
fn listeners_add_up() {
    use semaforo::llm::{LlmStack, Tier};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (mine, preset) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let shutdown = Shutdown::new();
    shutdown.on_event({
        let mine = mine.clone();
        move |_| {
            mine.fetch_add(1, Ordering::SeqCst);
        }
    });
    let _stack = LlmStack::openai(Tier {
        requests_per_minute: 1,
        tokens_per_minute: 1_000,
    })
    .shutdown(shutdown.clone())
    .on_event({
        let preset = preset.clone();
        move |_| {
            preset.fetch_add(1, Ordering::SeqCst);
        }
    })
    .build()
    .unwrap();
    shutdown.trigger();
    assert_eq!(
        mine.load(Ordering::SeqCst),
        1,
        "the shutdown's own listener"
    );
    assert_eq!(preset.load(Ordering::SeqCst), 1, "the preset's listener");
}

/// At the drain deadline only an event stream is cut with the drain event;
/// a plain body, or an event stream that sent its trailers, is never
/// appended to (it stays counted until it ends).
#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn only_an_event_stream_without_trailers_is_cut_with_the_drain_event() {
    use bytes::Bytes;
    use http_body::{Body, Frame};
    use http_body_util::BodyExt;
    use semaforo::shutdown::DRAIN_EVENT;

    type Frames = BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>;
    // One data frame (and trailers if asked), then nothing for ever.
    let body = |trailers: bool| {
        let mut frames = vec![Ok(Frame::data(Bytes::from_static(b"data: a\n\n")))];
        if trailers {
            frames.push(Ok(Frame::trailers(http::HeaderMap::new())));
        }
        http_body_util::StreamBody::new(
            stream::iter(frames).chain(stream::pending()).boxed() as Frames
        )
    };
    for (content_type, trailers, cut) in [
        ("text/event-stream", false, true),
        ("Text/Event-Stream; charset=utf-8", false, true),
        ("application/json", false, false),
        ("text/event-stream", true, false),
    ] {
        let shutdown = Shutdown::new();
        let svc = ServiceBuilder::new()
            .layer(shutdown.layer().cut_bodies_at_deadline())
            .service(tower::service_fn(move |_: ()| async move {
                Ok::<_, std::io::Error>(
                    http::Response::builder()
                        .header("content-type", content_type)
                        .body(body(trailers))
                        .unwrap(),
                )
            }));
        let mut res = svc.oneshot(()).await.unwrap().into_body();
        let first = res.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(|d| &d[..]), Some(&b"data: a\n\n"[..]));
        if trailers {
            assert!(res.frame().await.unwrap().unwrap().is_trailers());
        }
        let reader = tokio::spawn(async move {
            let next = res.frame().await;
            (
                next.map(|f| f.map(|f| f.into_data().ok())),
                res.is_end_stream(),
            )
        });
        let report = shutdown.drain(secs(1)).await;
        if cut {
            let (next, ended) = reader.await.unwrap();
            let data = next.unwrap().unwrap().unwrap();
            assert_eq!(&data[..], DRAIN_EVENT.as_bytes(), "{content_type}");
            assert!(ended);
            assert_eq!(report.cancelled, 1);
        } else {
            tokio::time::sleep(secs(60)).await;
            assert!(
                !reader.is_finished(),
                "{content_type}, trailers {trailers}: never cut"
            );
            assert_eq!(report.cancelled, 0);
            reader.abort();
        }
    }
}

//! Hostile tests of coalesce / cache / share::FanOut / LlmKey, kept from an
//! outside attack (each once a failing case or a case that held).
#![allow(clippy::all)]

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use semaforo::cache::{http_cache_control, Cache};
use semaforo::coalesce::CoalesceLayer;
use semaforo::llm::LlmKey;
use semaforo::share::{Cloned, FanOut, FanOutBody, RequestKey, Served, Share, WholeResponse};
use semaforo::BoxError;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------- helpers

async fn read_all(mut body: FanOutBody) -> Result<(Vec<u8>, Option<http::HeaderMap>), BoxError> {
    let mut out = Vec::new();
    let mut tr = None;
    while !body.is_end_stream() {
        match body.frame().await {
            Some(f) => {
                let f = f?;
                match f.into_data() {
                    Ok(d) => out.extend_from_slice(&d),
                    Err(f) => tr = f.into_trailers().ok(),
                }
            }
            None => break,
        }
    }
    Ok((out, tr))
}

/// A body that yields "x" `n` times; before each chunk it wakes its own
/// waker synchronously and returns Pending once (what tokio's coop budget
/// does in every tokio resource).
struct SelfWake {
    n: usize,
    yielded: bool,
}
impl Body for SelfWake {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.n == 0 {
            return Poll::Ready(None);
        }
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        self.n -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
    }
}

/// One chunk, then Pending forever keeping the waker (like any channel /
/// socket / timer body). Sets `dropped` when dropped.
struct Pend {
    first: bool,
    waker: Option<Waker>,
    dropped: Arc<AtomicBool>,
}
impl Drop for Pend {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}
impl Body for Pend {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.first {
            self.first = false;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))));
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

type Chunks = Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>>;

fn frames(v: Vec<Result<Frame<Bytes>, std::io::Error>>, delay_ms: u64) -> StreamBody<Chunks> {
    let s: Chunks = Box::pin(futures::stream::unfold(
        v.into_iter(),
        move |mut it| async move {
            let x = it.next()?;
            if delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            Some((x, it))
        },
    ));
    StreamBody::new(s)
}

fn k(_: &String) -> Option<u8> {
    Some(0)
}

// ---------------------------------------------------------------- FanOut

/// F1: an upstream body that wakes itself inside poll_frame (tokio coop
/// budget does exactly this) must not deadlock the tee.
#[test]
fn fanout_self_waking_upstream_does_not_deadlock() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(async {
            let svc = CoalesceLayer::new(k)
                .share(FanOut::new(1024))
                .layer(tower::service_fn(|_: String| async {
                    Ok::<_, std::io::Error>(http::Response::new(SelfWake {
                        n: 3,
                        yielded: false,
                    }))
                }));
            let res = svc.oneshot("a".into()).await.unwrap();
            read_all(res.into_body()).await.unwrap().0
        });
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(v) => assert_eq!(v, b"xxx"),
        Err(_) => panic!("DEADLOCK: FanOutBody::poll_frame holds the tee lock while polling upstream; WakeAll::wake_by_ref re-locks it"),
    }
}

/// F2: every reader dropped mid-stream: the upstream body must be dropped
/// (it holds the bulkhead permit / pacer reservation / connection).
#[tokio::test(start_paused = true)]
async fn fanout_upstream_dropped_after_all_readers_drop_midstream() {
    let dropped = Arc::new(AtomicBool::new(false));
    let d = dropped.clone();
    let layer = CoalesceLayer::new(k).share(FanOut::new(1024));
    let svc = layer.clone().layer(tower::service_fn(move |_: String| {
        let d = d.clone();
        async move {
            Ok::<_, std::io::Error>(http::Response::new(Pend {
                first: true,
                waker: None,
                dropped: d,
            }))
        }
    }));
    let res = svc.oneshot("a".into()).await.unwrap();
    let mut body = res.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );
    // Poll once more: upstream Pending, it keeps the (tee's) waker.
    let r = tokio::time::timeout(Duration::from_millis(10), body.frame()).await;
    assert!(r.is_err());
    drop(body);
    assert_eq!(layer.in_flight(), 0, "flight left in the map");
    assert!(
        dropped.load(Ordering::SeqCst),
        "LEAK: upstream body never dropped after its last reader dropped (Tee -> upstream -> stored WakeAll waker -> Arc<Tee> cycle)"
    );
}

/// F2b: same without coalescing (pass / bypass path).
#[tokio::test(start_paused = true)]
async fn fanout_upstream_dropped_bypass_path() {
    let dropped = Arc::new(AtomicBool::new(false));
    let d = dropped.clone();
    let svc = CoalesceLayer::new(|_: &String| None::<u8>)
        .share(FanOut::new(1024))
        .layer(tower::service_fn(move |_: String| {
            let d = d.clone();
            async move {
                Ok::<_, std::io::Error>(http::Response::new(Pend {
                    first: true,
                    waker: None,
                    dropped: d,
                }))
            }
        }));
    let mut body = svc.oneshot("a".into()).await.unwrap().into_body();
    body.frame().await;
    let _ = tokio::time::timeout(Duration::from_millis(10), body.frame()).await;
    drop(body);
    assert!(dropped.load(Ordering::SeqCst), "LEAK (bypass path)");
}

/// F2c: the control: readers dropped without ever leaving a waker upstream.
#[tokio::test(start_paused = true)]
async fn fanout_upstream_dropped_when_no_waker_stored() {
    let dropped = Arc::new(AtomicBool::new(false));
    let d = dropped.clone();
    let layer = CoalesceLayer::new(k).share(FanOut::new(1024));
    let svc = layer.clone().layer(tower::service_fn(move |_: String| {
        let d = d.clone();
        async move {
            Ok::<_, std::io::Error>(http::Response::new(Pend {
                first: true,
                waker: None,
                dropped: d,
            }))
        }
    }));
    let mut body = svc.oneshot("a".into()).await.unwrap().into_body();
    body.frame().await;
    drop(body);
    assert_eq!(layer.in_flight(), 0);
    assert!(dropped.load(Ordering::SeqCst));
}

async fn two_readers(
    fan: FanOut,
    mk: impl Fn() -> StreamBody<Chunks> + Clone + Send + Sync + 'static,
) -> (
    Result<(Vec<u8>, Option<http::HeaderMap>), BoxError>,
    Result<(Vec<u8>, Option<http::HeaderMap>), BoxError>,
    usize,
    usize,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let layer = CoalesceLayer::new(k).share(fan);
    let svc = layer.clone().layer(tower::service_fn(move |_: String| {
        c.fetch_add(1, Ordering::SeqCst);
        let mk = mk.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, std::io::Error>(http::Response::new(mk()))
        }
    }));
    let (a, b) = tokio::join!(
        svc.clone().oneshot("a".into()),
        svc.clone().oneshot("a".into())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.status(), 200);
    assert_eq!(b.extensions().get::<Served>(), Some(&Served::Coalesced));
    let (ra, rb) = tokio::join!(read_all(a.into_body()), read_all(b.into_body()));
    (ra, rb, calls.load(Ordering::SeqCst), layer.in_flight())
}

/// F3: one chunk larger than max_buffer, both readers reading concurrently.
#[tokio::test(start_paused = true)]
async fn fanout_chunk_bigger_than_buffer_cuts_concurrent_reader() {
    let (a, b, calls, inflight) = two_readers(FanOut::new(4), || {
        frames(vec![Ok(Frame::data(Bytes::from_static(b"0123456789")))], 5)
    })
    .await;
    assert_eq!(calls, 1);
    assert_eq!(inflight, 0);
    assert_eq!(a.unwrap().0, b"0123456789");
    assert_eq!(
        b.map(|x| x.0).map_err(|e| e.to_string()),
        Ok(b"0123456789".to_vec()),
        "a reader polled concurrently (not stalled) is cut by one chunk > max_buffer"
    );
}

/// F4: trailers reach every reader; is_end_stream only after them.
#[tokio::test(start_paused = true)]
async fn fanout_trailers_reach_every_reader() {
    let mk = || {
        let mut t = http::HeaderMap::new();
        t.insert("x-t", http::HeaderValue::from_static("1"));
        frames(
            vec![
                Ok(Frame::data(Bytes::from_static(b"ab"))),
                Ok(Frame::trailers(t)),
            ],
            5,
        )
    };
    let (a, b, calls, inflight) = two_readers(FanOut::new(1024), mk).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(calls, 1);
    assert_eq!(inflight, 0);
    assert_eq!(a.0, b"ab");
    assert_eq!(b.0, b"ab");
    assert_eq!(a.1.unwrap()["x-t"], "1");
    assert_eq!(b.1.unwrap()["x-t"], "1");
}

/// F6: empty bodies; F7: body erroring at once.
#[tokio::test(start_paused = true)]
async fn fanout_empty_and_immediate_error() {
    let (a, b, _, inflight) = two_readers(FanOut::new(1024), || frames(vec![], 0)).await;
    assert_eq!(a.unwrap().0, b"");
    assert_eq!(b.unwrap().0, b"");
    assert_eq!(inflight, 0);
    let (a, b, _, inflight) = two_readers(FanOut::new(1024), || {
        frames(vec![Err(std::io::Error::other("boom"))], 0)
    })
    .await;
    assert!(a.unwrap_err().to_string().contains("boom"));
    assert!(b.unwrap_err().to_string().contains("boom"));
    assert_eq!(inflight, 0);
}

/// F5: a reader polled after its end, repeatedly; after an error.
#[tokio::test(start_paused = true)]
async fn fanout_poll_after_end() {
    let fan = FanOut::new(1024);
    let res = http::Response::new(Full::new(Bytes::from_static(b"hi")));
    let (out, kept) = fan.keep(res);
    let mut b = out.into_body();
    assert_eq!(b.frame().await.unwrap().unwrap().into_data().unwrap(), "hi");
    assert!(b.frame().await.is_none());
    assert!(b.is_end_stream());
    assert!(b.frame().await.is_none());
    assert!(b.frame().await.is_none());
    // A reader created after the end: whole answer or an error, never a
    // silent truncated body.
    let mut late =
        Share::<http::Response<Full<Bytes>>>::give(&fan, &kept, Served::Coalesced).into_body();
    let mut got = Vec::new();
    let mut err = false;
    loop {
        match late.frame().await {
            Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap()),
            Some(Err(_)) => {
                err = true;
                break;
            }
            None => break,
        }
    }
    assert!(
        err || got == b"hi",
        "late reader got truncated body {got:?} without error"
    );
    // erroring body: polled again after the error
    let res = http::Response::new(frames(vec![Err(std::io::Error::other("x"))], 0));
    let (out, _kept) = fan.keep(res);
    let mut b = out.into_body();
    assert!(b.frame().await.unwrap().is_err());
    assert!(b.frame().await.is_none());
    assert!(b.is_end_stream());
}

/// A stalled reader with a tiny buffer is cut; the other reads all.
#[tokio::test(start_paused = true)]
async fn fanout_stalled_reader_tiny_buffer() {
    let fan = FanOut::new(3);
    let res = http::Response::new(frames(
        (0..10)
            .map(|i| Ok(Frame::data(Bytes::from(format!("{i}")))))
            .collect(),
        1,
    ));
    let (out, kept) = fan.keep(res);
    let mut stalled =
        Share::<http::Response<StreamBody<Chunks>>>::give(&fan, &kept, Served::Coalesced)
            .into_body();
    let (all, _) = read_all(out.into_body()).await.unwrap();
    assert_eq!(all, b"0123456789");
    assert!(stalled.frame().await.unwrap().is_err());
    assert!(stalled.frame().await.unwrap().is_err() || true);
}

/// F8: multi-thread stress with real time: many keys, readers dropping
/// mid-way; every complete read is the whole body; nothing left in flight;
/// every upstream body dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fanout_multithread_stress() {
    struct Counted(StreamBody<Chunks>, Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_sub(1, Ordering::SeqCst);
        }
    }
    impl Body for Counted {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
    }
    let live = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (l2, c2) = (live.clone(), calls.clone());
    let layer = CoalesceLayer::new(|s: &String| Some(s.clone())).share(FanOut::new(64));
    let svc = layer.clone().layer(tower::service_fn(move |key: String| {
        let (l, c) = (l2.clone(), c2.clone());
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::task::yield_now().await;
            l.fetch_add(1, Ordering::SeqCst);
            let k2 = key.clone();
            let s: Chunks = Box::pin(futures::stream::unfold(0usize, move |i| {
                let k2 = k2.clone();
                async move {
                    if i == 20 {
                        return None;
                    }
                    if i % 3 == 0 {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    Some((Ok(Frame::data(Bytes::from(format!("{k2}:{i};")))), i + 1))
                }
            }));
            Ok::<_, std::io::Error>(http::Response::new(Counted(StreamBody::new(s), l)))
        }
    }));
    let expect = |key: &str| {
        (0..20)
            .map(|i| format!("{key}:{i};"))
            .collect::<String>()
            .into_bytes()
    };
    let mut tasks = Vec::new();
    for t in 0..400usize {
        let svc = svc.clone();
        let key = format!("k{}", t % 13);
        let exp = expect(&key);
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(key).await.unwrap();
            let mut body = res.into_body();
            let stop = if t % 5 == 0 { t % 17 } else { usize::MAX };
            let mut got = Vec::new();
            let mut n = 0;
            while !body.is_end_stream() {
                if n == stop {
                    return;
                }
                match body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            got.extend_from_slice(&d)
                        }
                    }
                    Some(Err(_)) => return, // cut: allowed
                    None => break,
                }
                n += 1;
            }
            assert_eq!(got, exp, "wrong body for {t}");
        }));
    }
    let all = futures::future::join_all(tasks);
    let r = tokio::time::timeout(Duration::from_secs(30), all).await;
    let r = r.expect("HANG in multi-thread stress");
    for x in r {
        x.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(layer.in_flight(), 0, "in_flight not back to 0");
    assert_eq!(
        live.load(Ordering::SeqCst),
        0,
        "upstream bodies never dropped (calls: {})",
        calls.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------- coalesce

fn slow_counted(
    calls: &Arc<AtomicUsize>,
) -> impl Service<String, Response = String, Error = std::io::Error, Future = impl Send> + Clone + Send
{
    let c = calls.clone();
    tower::service_fn(move |s: String| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, std::io::Error>(format!("{s}#{n}"))
        }
    })
}

/// Leader dropped at every await point; followers never hang.
#[tokio::test(start_paused = true)]
async fn coalesce_leader_dropped_at_each_point() {
    for drop_at in [0u64, 1, 50, 100, 150, 199] {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = CoalesceLayer::new(|s: &String| Some(s.clone()));
        let svc = layer.clone().layer(slow_counted(&calls));
        let mut lead = Box::pin(svc.clone().oneshot("x".into()));
        // get it started
        assert!(futures::poll!(lead.as_mut()).is_pending());
        let f1 = tokio::spawn(svc.clone().oneshot("x".into()));
        let f2 = tokio::spawn(svc.clone().oneshot("x".into()));
        tokio::time::sleep(Duration::from_millis(drop_at)).await;
        drop(lead);
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            (f1.await.unwrap().unwrap(), f2.await.unwrap().unwrap())
        })
        .await
        .expect("follower hung");
        assert_eq!(r.0, r.1);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "drop_at {drop_at}");
        assert_eq!(layer.in_flight(), 0);
    }
}

/// Leader future created (call()) but never polled, then dropped.
#[tokio::test(start_paused = true)]
async fn coalesce_leader_never_polled() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CoalesceLayer::new(|s: &String| Some(s.clone()));
    let mut svc = layer.clone().layer(slow_counted(&calls));
    futures::future::poll_fn(|cx| svc.poll_ready(cx))
        .await
        .unwrap();
    let lead = svc.call("x".into());
    let f = tokio::spawn(svc.clone().oneshot("x".into()));
    tokio::task::yield_now().await;
    drop(lead);
    let r = tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("hang")
        .unwrap()
        .unwrap();
    // The leader's inner call is made in its future: dropped unpolled, it
    // made none; the follower's takeover is the only call (#0).
    assert_eq!(r, "x#0");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(layer.in_flight(), 0);
}

/// Followers dropped, the taker-over dropped while not ready, many keys.
#[tokio::test(start_paused = true)]
async fn coalesce_followers_dropped_and_many_keys() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CoalesceLayer::new(|s: &String| Some(s.clone()));
    let svc = layer.clone().layer(slow_counted(&calls));
    let mut futs = Vec::new();
    for i in 0..2000 {
        futs.push(svc.clone().oneshot(format!("k{}", i % 500)));
    }
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    for f in futs.iter_mut() {
        assert!(futures::poll!(f.as_mut()).is_pending());
    }
    assert_eq!(layer.in_flight(), 500);
    // drop every other follower and every 3rd leader
    let kept: Vec<_> = futs
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1 || (*i < 500 && i % 3 != 0))
        .map(|(_, f)| f)
        .collect();
    let n = kept.len();
    let r = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(kept))
        .await
        .expect("hang");
    assert_eq!(r.len(), n);
    assert!(r.iter().all(|x| x.is_ok()));
    assert_eq!(layer.in_flight(), 0);
}

/// Two different requests never share when keys differ; the coalesced copy
/// keeps the leader's status.
#[tokio::test(start_paused = true)]
async fn coalesce_whole_response_status_and_errors() {
    let svc = CoalesceLayer::new(|s: &String| Some(s.clone()))
        .share(WholeResponse)
        .layer(tower::service_fn(|s: String| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if s == "err" {
                return Err(std::io::Error::other("upstream down"));
            }
            Ok(http::Response::builder()
                .status(if s == "nf" { 404 } else { 200 })
                .header("x-s", s.clone())
                .body(Bytes::from(s))
                .unwrap())
        }));
    let (a, b, c, d) = tokio::join!(
        svc.clone().oneshot("nf".into()),
        svc.clone().oneshot("nf".into()),
        svc.clone().oneshot("ok".into()),
        svc.clone().oneshot("err".into()),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(a.status(), 404);
    assert_eq!(b.status(), 404);
    assert_eq!(b.body(), "nf");
    assert_eq!(c.status(), 200);
    assert_eq!(c.body(), "ok");
    assert!(d.unwrap_err().to_string().contains("upstream down"));
    let (e1, e2) = tokio::join!(
        svc.clone().oneshot("err".into()),
        svc.clone().oneshot("err".into())
    );
    let e2 = e2.unwrap_err();
    assert!(e1.unwrap_err().to_string().contains("upstream down"));
    assert!(e2.to_string().contains("upstream down"));
    assert!(std::error::Error::source(&*e2).is_some());
}

/// Coalescing under an inner service that is not ready (tower
/// ConcurrencyLimit(1)): identical calls should still be one call.
#[tokio::test(start_paused = true)]
async fn coalesce_not_ready_inner_defeats_singleflight() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = CoalesceLayer::new(|s: &String| Some(s.clone()))
        .layer(tower::limit::ConcurrencyLimit::new(slow_counted(&calls), 1));
    let r = futures::future::join_all((0..5).map(|_| svc.clone().oneshot("x".into()))).await;
    assert!(r.iter().all(|x| x.is_ok()));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "identical calls not coalesced: followers wait in inner poll_ready before they can join"
    );
}

/// Takeover while the inner service is not ready.
#[tokio::test(start_paused = true)]
async fn coalesce_takeover_inner_not_ready() {
    let calls = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(0));
    // inner: ready only when the semaphore has a permit (checked in poll_ready)
    #[derive(Clone)]
    struct Gate<S> {
        inner: S,
        sem: Arc<tokio::sync::Semaphore>,
        ready: bool,
    }
    impl<S: Service<String>> Service<String> for Gate<S> {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            if self.ready || self.sem.available_permits() > 0 {
                self.ready = true;
                return self.inner.poll_ready(cx);
            }
            // poll again soon
            let w = cx.waker().clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                w.wake()
            });
            Poll::Pending
        }
        fn call(&mut self, r: String) -> S::Future {
            self.ready = false;
            self.inner.call(r)
        }
    }
    let layer = CoalesceLayer::new(|s: &String| Some(s.clone()));
    let svc = layer.clone().layer(Gate {
        inner: slow_counted(&calls),
        sem: sem.clone(),
        ready: true, // first caller's service is ready
    });
    let mut s1 = svc.clone();
    futures::future::poll_fn(|cx| s1.poll_ready(cx))
        .await
        .unwrap();
    let lead = s1.call("x".into());
    // followers: their own clones are "ready" (copied flag), join
    let f1 = tokio::spawn(svc.clone().oneshot("x".into()));
    let f2 = tokio::spawn(svc.clone().oneshot("x".into()));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let mut lead = Box::pin(lead);
    assert!(futures::poll!(lead.as_mut()).is_pending());
    drop(lead);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // nobody ready yet? (follower clones carry ready=true copied, so takeover proceeds)
    sem.add_permits(10);
    let r = tokio::time::timeout(Duration::from_secs(5), async { (f1.await, f2.await) })
        .await
        .expect("hang");
    assert!(r.0.unwrap().is_ok() && r.1.unwrap().is_ok());
    assert_eq!(layer.in_flight(), 0);
}

// ---------------------------------------------------------------- cache

fn counted_resp(
    calls: &Arc<AtomicUsize>,
    status: u16,
    extra: Option<(&'static str, &'static str)>,
) -> impl Service<String, Response = http::Response<Bytes>, Error = std::io::Error, Future = impl Send>
       + Clone
       + Send {
    let c = calls.clone();
    tower::service_fn(move |s: String| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut b = http::Response::builder().status(status);
            if let Some((k, v)) = extra {
                b = b.header(k, v);
            }
            Ok::<_, std::io::Error>(b.body(Bytes::from(format!("{s}#{n}"))).unwrap())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn cache_ttl_exact_and_stale() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, String> = Cache::builder()
        .ttl(Duration::from_secs(10))
        .stale_for(Duration::from_secs(5))
        .build()
        .unwrap();
    let svc = cache
        .layer(|s: &String| Some(s.clone()))
        .layer(slow_counted(&calls));
    let t0 = Instant::now();
    let a = svc.clone().oneshot("x".into()).await.unwrap();
    let stored_at = Instant::now();
    assert_eq!(stored_at - t0, Duration::from_millis(200));
    tokio::time::advance(Duration::from_secs(10) - Duration::from_nanos(1)).await;
    let b = svc.clone().oneshot("x".into()).await.unwrap();
    assert_eq!(a, b);
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert_eq!(cache.get(&"x".to_string()), None, "served at exactly ttl");
    let st = cache.stale(&"x".to_string()).unwrap();
    assert_eq!(st.0, a);
    assert_eq!(st.1, Duration::from_secs(10));
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(
        cache.stale(&"x".to_string()),
        None,
        "stale at exactly ttl+stale_for"
    );
    assert_eq!(cache.snapshot().stale_served, 1);
}

#[tokio::test(start_paused = true)]
async fn cache_duration_max_settings() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, String> = Cache::builder()
        .ttl(Duration::MAX)
        .stale_for(Duration::MAX)
        .max_entries(u64::MAX)
        .max_bytes(u64::MAX)
        .max_entry_bytes(usize::MAX)
        .build()
        .unwrap();
    let svc = cache
        .layer(|s: &String| Some(s.clone()))
        .layer(slow_counted(&calls));
    svc.clone().oneshot("x".into()).await.unwrap();
    tokio::time::advance(Duration::from_secs(86400 * 365 * 10)).await;
    svc.clone().oneshot("x".into()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(cache.stale(&"x".to_string()).is_some());
    // zero / nonsense configs rejected, not panicking
    assert!(Cache::builder()
        .ttl(Duration::ZERO)
        .build::<u8, u8>()
        .is_err());
    assert!(Cache::builder()
        .max_bytes(10)
        .max_entry_bytes(11)
        .build::<u8, u8>()
        .is_err());
    assert!(Cache::builder().max_entries(0).build::<u8, u8>().is_err());
}

#[tokio::test(start_paused = true)]
async fn cache_max_entry_bytes_and_max_bytes() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, Arc<semaforo::share::KeptResponse>> = Cache::builder()
        .max_bytes(20_000)
        .max_entries(1_000_000)
        .max_entry_bytes(5_000)
        .build()
        .unwrap();
    let c = calls.clone();
    let svc = cache
        .layer(|s: &String| Some(s.clone()))
        .share(WholeResponse)
        .layer(tower::service_fn(move |s: String| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                let n: usize = s.trim_start_matches('k').parse().unwrap();
                Ok::<_, std::io::Error>(http::Response::new(Bytes::from(vec![
                    b'x';
                    if n == 0 {
                        10_000
                    } else {
                        1_000
                    }
                ])))
            }
        }));
    svc.clone().oneshot("k0".into()).await.unwrap();
    svc.clone().oneshot("k0".into()).await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "over max_entry_bytes stored"
    );
    for i in 1..200 {
        svc.clone().oneshot(format!("k{i}")).await.unwrap();
    }
    cache.run_pending_tasks();
    let s = cache.snapshot();
    assert!(s.bytes <= 20_000, "bytes {} > max_bytes", s.bytes);
    assert!(s.entries <= 20, "entries {}", s.entries);
}

#[tokio::test(start_paused = true)]
async fn cache_non_success_and_control() {
    // HttpClassifier: a 500 is not kept.
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, Arc<semaforo::share::KeptResponse>> =
        Cache::builder().build().unwrap();
    let svc = cache
        .layer(|s: &String| Some(s.clone()))
        .share(WholeResponse)
        .classify(semaforo::classify::HttpClassifier)
        .layer(counted_resp(&calls, 500, None));
    svc.clone().oneshot("x".into()).await.unwrap();
    svc.clone().oneshot("x".into()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.snapshot().stores, 0);

    // request no-store / no-cache
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, Arc<semaforo::share::KeptResponse>> =
        Cache::builder().build().unwrap();
    let c = calls.clone();
    let svc = cache
        .layer(|r: &http::Request<String>| Some(r.body().clone()))
        .share(WholeResponse)
        .control(http_cache_control)
        .layer(tower::service_fn(move |r: http::Request<String>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, std::io::Error>(http::Response::new(Bytes::from(format!(
                    "{}#{n}",
                    r.body()
                ))))
            }
        }));
    let req = |cc: Option<&str>| {
        let mut b = http::Request::builder();
        if let Some(cc) = cc {
            b = b.header("cache-control", cc);
        }
        b.body("x".to_string()).unwrap()
    };
    let r = svc.clone().oneshot(req(Some("No-Store"))).await.unwrap();
    assert_eq!(r.body(), "x#0");
    assert_eq!(cache.snapshot().stores, 0);
    let r = svc.clone().oneshot(req(None)).await.unwrap();
    assert_eq!(r.body(), "x#1");
    let r = svc.clone().oneshot(req(None)).await.unwrap();
    assert_eq!(r.body(), "x#1");
    assert!(matches!(
        r.extensions().get::<Served>(),
        Some(Served::Cache { .. })
    ));
    assert_eq!(r.headers()["age"], "0");
    let r = svc
        .clone()
        .oneshot(req(Some("max-age=0, foo")))
        .await
        .unwrap();
    assert_eq!(r.body(), "x#2");
    let r = svc.clone().oneshot(req(None)).await.unwrap();
    assert_eq!(r.body(), "x#2");
}

/// The response says `Cache-Control: no-store` / `private`: a shared cache
/// must not store it (RFC 9111 §3, §5.2.2.3, §5.2.2.7).
#[tokio::test(start_paused = true)]
async fn cache_response_no_store_is_stored() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, Arc<semaforo::share::KeptResponse>> =
        Cache::builder().build().unwrap();
    let svc = cache
        .layer(|s: &String| Some(s.clone()))
        .share(WholeResponse)
        .classify(semaforo::classify::HttpClassifier)
        .layer(counted_resp(
            &calls,
            200,
            Some(("cache-control", "no-store")),
        ));
    svc.clone().oneshot("x".into()).await.unwrap();
    svc.clone().oneshot("x".into()).await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "response `cache-control: no-store` was cached and served"
    );
}

/// Default classifier with WholeResponse: is a 500 cached?
#[tokio::test(start_paused = true)]
async fn cache_default_classifier_keeps_500() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, Arc<semaforo::share::KeptResponse>> =
        Cache::builder().build().unwrap();
    let svc = cache
        .layer(|s: &String| Some(s.clone()))
        .share(WholeResponse)
        .layer(counted_resp(&calls, 500, None));
    svc.clone().oneshot("x".into()).await.unwrap();
    let r = svc.clone().oneshot("x".into()).await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "500 cached with the default classifier"
    );
}

/// A cache hit must not wait for the inner service's readiness ("a hit
/// waits in no line").
#[tokio::test(start_paused = true)]
async fn cache_hit_waits_for_inner_readiness() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, String> = Cache::builder().build().unwrap();
    let svc = cache
        .layer(|s: &String| Some(s.clone()))
        .layer(tower::limit::ConcurrencyLimit::new(slow_counted(&calls), 1));
    svc.clone().oneshot("a".into()).await.unwrap();
    let busy = tokio::spawn(svc.clone().oneshot("b".into()));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let t = Instant::now();
    svc.clone().oneshot("a".into()).await.unwrap();
    let waited = t.elapsed();
    busy.await.unwrap().unwrap();
    assert_eq!(
        waited,
        Duration::ZERO,
        "cache hit waited {waited:?} for the inner service's poll_ready"
    );
}

/// Cache over coalesce: 20 identical misses -> 1 call, 1 store; then hits.
#[tokio::test(start_paused = true)]
async fn cache_over_coalesce_stores_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, Arc<semaforo::share::KeptResponse>> =
        Cache::builder().build().unwrap();
    let co = CoalesceLayer::new(|s: &String| Some(s.clone())).share(WholeResponse);
    let c = calls.clone();
    let svc = cache
        .layer(|s: &String| Some(s.clone()))
        .share(WholeResponse)
        .layer(co.clone().layer(tower::service_fn(move |s: String| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, std::io::Error>(http::Response::new(Bytes::from(s)))
            }
        })));
    let r = futures::future::join_all((0..20).map(|_| svc.clone().oneshot("x".into()))).await;
    assert!(r.iter().all(|x| x.as_ref().unwrap().body() == "x"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.snapshot().stores, 1);
    assert_eq!(co.in_flight(), 0);
}

// ---------------------------------------------------------------- LlmKey

fn req(path: &str, auth: Option<&str>, body: &[u8]) -> http::Request<Bytes> {
    let mut b = http::Request::post(path);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.body(Bytes::copy_from_slice(body)).unwrap()
}
fn key(body: &str) -> Option<semaforo::llm::LlmRequestKey> {
    LlmKey::new().key(&req(
        "/v1/chat/completions",
        Some("Bearer a"),
        body.as_bytes(),
    ))
}

#[test]
fn llmkey_canonical_forms() {
    let base =
        key(r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"é"}]}"#).unwrap();
    for b in [
        r#"{"messages":[{"content":"é","role":"user"}],"temperature":0.0,"model":"m"}"#,
        r#"  {"temperature":-0.0 , "model":"m","messages":[{"role":"user","content":"\u00e9"}]}"#,
        r#"{"temperature":-0,"model":"m","messages":[{"role":"user","content":"\u00E9"}]}"#,
        r#"{"temperature":0e0,"model":"m","messages":[{"role":"user","content":"é"}],"user":"bob","metadata":{"a":1}}"#,
        r#"{"\u0074emperature":0,"model":"m","messages":[{"role":"user","content":"é"}]}"#,
    ] {
        assert_eq!(key(b).as_ref(), Some(&base), "{b}");
    }
    // differences are different keys
    for b in [
        r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"e\u0301"}]}"#,
        r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"é","user":"x"}]}"#,
        r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"é"}],"n":1}"#,
        r#"{"model":"m","temperature":0,"messages":[{"content":"é","role":"user"}],"stream":false}"#,
    ] {
        assert_ne!(key(b).as_ref(), Some(&base), "{b}");
    }
    // sampled
    assert!(key(r#"{"model":"m","temperature":0.0001}"#).is_none());
    assert!(key(r#"{"model":"m","temperature":"0"}"#).is_none());
    assert!(key(r#"{"model":"m","temperature":null}"#).is_none());
    assert!(key(r#"{"model":"m"}"#).is_none());
}

#[test]
fn llmkey_numbers() {
    let k = |n: &str| key(&format!(r#"{{"temperature":0,"seed":{n}}}"#));
    assert_eq!(k("1"), k("1.0"));
    assert_eq!(k("1"), k("1e0"));
    assert_eq!(k("100"), k("1e2"));
    assert_eq!(k("0.5"), k("5e-1"));
    // distinct huge integers must not collide (different requests)
    let a = k("123456789012345678901234567890");
    let b = k("123456789012345678901234567891");
    assert!(
        a.is_none() || a != b,
        "two different huge integers give one key"
    );
    // no panic
    for n in [
        "1e308",
        "-1e308",
        "1e-400",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "1e400",
    ] {
        let _ = k(n);
    }
}

#[test]
fn llmkey_numbers_one_form_above_9e15() {
    let k = |n: &str| key(&format!(r#"{{"temperature":0,"seed":{n}}}"#));
    // An integer literal is exact; a whole float past 2^53 may have lost
    // digits, so it has no key (never a wrong share).
    assert!(k("10000000000000000").is_some());
    assert!(k("1e16").is_none());
    assert!(k("1.0000000000000001e16").is_none());
}

#[test]
fn llmkey_credentials() {
    let b = br#"{"model":"m","temperature":0}"#;
    let k = LlmKey::new();
    let p = "/v1/chat/completions";
    assert_ne!(
        k.key(&req(p, Some("Bearer a"), b)),
        k.key(&req(p, Some("Bearer b"), b))
    );
    assert_ne!(k.key(&req(p, Some("Bearer a"), b)), k.key(&req(p, None, b)));
    let mut r = req(p, None, b);
    r.headers_mut().insert("x-api-key", "A".parse().unwrap());
    let mut r2 = req(p, None, b);
    r2.headers_mut().insert("api-key", "A".parse().unwrap());
    assert_ne!(k.key(&r), k.key(&r2));
    let ka = LlmKey::new().across_credentials(true);
    assert_eq!(
        ka.key(&req(p, Some("Bearer a"), b)),
        ka.key(&req(p, Some("Bearer b"), b))
    );
}

/// Gemini's API key travels in the query string (`?key=...`).
#[test]
fn llmkey_query_string_credential() {
    let b = br#"{"contents":[{"parts":[{"text":"hola"}]}],"generationConfig":{"temperature":0},"temperature":0}"#;
    let k = LlmKey::new();
    let a = k.key(&req("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent?key=AAA", None, b));
    let c = k.key(&req("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent?key=BBB", None, b));
    assert!(a.is_some());
    assert_ne!(a, c, "two API keys in the query string share one key");
}

#[test]
fn llmkey_gemini_temperature_nested() {
    // Gemini puts temperature in generationConfig: is such a request keyable at all?
    let b = br#"{"contents":[{"parts":[{"text":"hola"}]}],"generationConfig":{"temperature":0}}"#;
    let r = req(
        "/v1beta/models/gemini-2.0-flash:generateContent",
        Some("x"),
        b,
    );
    assert!(
        LlmKey::new().key(&r).is_some(),
        "a Gemini request with temperature 0 (generationConfig) gets no key"
    );
}

#[test]
fn llmkey_hostile_bodies() {
    let k = LlmKey::new().nondeterministic(true);
    let p = "/v1/chat/completions";
    for b in [
        &b""[..],
        b"[]",
        b"1",
        b"\"x\"",
        b"null",
        b"\xff\xfe",
        b"{",
        b"{\"a\":\"\\ud800\"}",
        b"{\"temperature\":0}garbage",
    ] {
        assert!(
            k.key(&req(p, None, b)).is_none(),
            "{:?}",
            String::from_utf8_lossy(b)
        );
    }
    // deep nesting: no panic, no stack overflow
    for depth in [100usize, 127, 128, 129, 200, 100_000] {
        let s = format!(
            r#"{{"temperature":0,"x":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let _ = k.key(&req(p, None, s.as_bytes()));
        let s = format!(
            r#"{{"temperature":0,"x":{}1{}}}"#,
            "{\"a\":".repeat(depth),
            "}".repeat(depth)
        );
        let _ = k.key(&req(p, None, s.as_bytes()));
    }
    // duplicate keys: the upstream (Python json, serde) takes the last.
    let k0 = LlmKey::new();
    assert!(k0
        .key(&req(p, None, br#"{"temperature":0,"temperature":1}"#))
        .is_none());
    let a = k0.key(&req(
        p,
        None,
        br#"{"temperature":1,"temperature":0,"m":1,"m":2}"#,
    ));
    let b = k0.key(&req(p, None, br#"{"temperature":0,"m":2}"#));
    assert_eq!(a, b);
    // cache-control no-store: no key
    let mut r = req(p, None, br#"{"temperature":0}"#);
    r.headers_mut()
        .insert("cache-control", "no-store".parse().unwrap());
    assert!(k0.key(&r).is_none());
}

/// The LLM preset end to end: different credentials never share.
#[tokio::test(start_paused = true)]
async fn llm_preset_credentials_and_statuses() {
    use semaforo::llm::{LlmCache, LlmStack, Tier};
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let provider = tower::service_fn(move |r: http::Request<Bytes>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        let auth = r
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let status = if auth.as_deref() == Some("Bearer bad") {
                401
            } else {
                200
            };
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Bytes::from(format!(
                        r#"{{"id":"{n}-{auth:?}","choices":[{{"message":{{"content":"x"}}}}],"usage":{{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}}}"#
                    )))
                    .unwrap(),
            )
        }
    });
    let cache: LlmCache = Cache::builder().build().unwrap();
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 300_000,
    })
    .cache(cache.clone())
    .coalesce(true)
    .build()
    .unwrap();
    let svc = stack.layer().layer(provider);
    let body = br#"{"model":"gpt-4o-mini","temperature":0,"max_tokens":5,"messages":[{"role":"user","content":"hola"}]}"#;
    let p = "/v1/chat/completions";
    let rs = futures::future::join_all(
        [
            "Bearer a",
            "Bearer b",
            "Bearer a",
            "Bearer bad",
            "Bearer bad",
        ]
        .into_iter()
        .map(|a| svc.clone().oneshot(req(p, Some(a), body))),
    )
    .await;
    let bodies: Vec<String> = rs
        .into_iter()
        .map(|r| match r {
            Ok(r) => format!("{} {}", r.status(), String::from_utf8_lossy(r.body())),
            Err(e) => format!("err {e}"),
        })
        .collect();
    assert!(bodies[0].contains("Bearer a"), "{bodies:?}");
    assert!(bodies[1].contains("Bearer b"), "{bodies:?}");
    assert!(bodies[2].contains("Bearer a"), "{bodies:?}");
    assert!(!bodies[3].contains("200"), "{bodies:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "{bodies:?}");
    // hit for a, not for bad (401 never cached)
    let n0 = calls.load(Ordering::SeqCst);
    let r = svc
        .clone()
        .oneshot(req(p, Some("Bearer a"), body))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(r.body()).contains("Bearer a"));
    let _ = svc.clone().oneshot(req(p, Some("Bearer bad"), body)).await;
    assert_eq!(calls.load(Ordering::SeqCst), n0 + 1);
}

#[allow(dead_code)]
fn _unused() -> Cloned {
    Cloned
}

fn mpsc_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> StreamBody<Chunks> {
    let mut rx = rx;
    let s: Chunks = Box::pin(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }));
    StreamBody::new(s)
}

/// F1 realistic: an upstream fed by a tokio mpsc channel with 300 chunks
/// already queued; tokio's coop budget (128) makes poll_recv wake itself.
#[test]
fn fanout_tokio_channel_body_coop_budget_deadlock() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let n = rt.block_on(async {
            let (tx, rx) = tokio::sync::mpsc::channel(1000);
            for _ in 0..900 {
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
            drop(tx);
            let rx = std::sync::Mutex::new(Some(rx));
            let rx = Arc::new(rx);
            let svc = CoalesceLayer::new(k)
                .share(FanOut::default())
                .layer(tower::service_fn(move |_: String| {
                    let rx = rx.lock().unwrap().take().unwrap();
                    async move { Ok::<_, std::io::Error>(http::Response::new(mpsc_body(rx))) }
                }));
            let res = svc.oneshot("a".into()).await.unwrap();
            read_all(res.into_body()).await.unwrap().0.len()
        });
        let _ = done_tx.send(n);
    });
    let n = done_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("DEADLOCK reading a tokio-mpsc body through FanOut");
    assert_eq!(n, 900);
}

/// F2 realistic: the last reader drops mid-stream; the upstream's channel
/// (a connection, in real life) must close.
#[tokio::test(start_paused = true)]
async fn fanout_tokio_channel_upstream_closed_after_readers_drop() {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let layer = CoalesceLayer::new(k).share(FanOut::default());
    let svc = layer.clone().layer(tower::service_fn(move |_: String| {
        let rx = rx.lock().unwrap().take().unwrap();
        async move { Ok::<_, std::io::Error>(http::Response::new(mpsc_body(rx))) }
    }));
    let (a, b) = tokio::join!(
        svc.clone().oneshot("a".into()),
        svc.clone().oneshot("a".into())
    );
    let (mut a, mut b) = (a.unwrap().into_body(), b.unwrap().into_body());
    tx.send(Bytes::from_static(b"1")).await.unwrap();
    a.frame().await.unwrap().unwrap();
    b.frame().await.unwrap().unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(10), a.frame()).await;
    drop(a);
    drop(b);
    tokio::task::yield_now().await;
    assert_eq!(layer.in_flight(), 0);
    assert!(
        tx.is_closed(),
        "LEAK: upstream body (channel receiver) still alive after every reader dropped"
    );
}

/// F1 with an ordinary async stream that yields the futures way
/// (`wake_by_ref` + Pending, as futures-lite / smol `yield_now` do).
#[test]
fn fanout_async_stream_with_sync_yield_deadlocks() {
    struct YieldNow(bool);
    impl std::future::Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(async {
            let svc = CoalesceLayer::new(k)
                .share(FanOut::default())
                .layer(tower::service_fn(|_: String| async {
                    let s: Chunks = Box::pin(futures::stream::unfold(0, |i| async move {
                        if i == 3 {
                            return None;
                        }
                        YieldNow(false).await;
                        Some((Ok(Frame::data(Bytes::from_static(b"x"))), i + 1))
                    }));
                    Ok::<_, std::io::Error>(http::Response::new(StreamBody::new(s)))
                }));
            read_all(svc.oneshot("a".into()).await.unwrap().into_body())
                .await
                .unwrap()
                .0
        });
        let _ = tx.send(r);
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).expect("DEADLOCK"),
        b"xxx"
    );
}

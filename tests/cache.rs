//! The response cache: TTL on the crate's clock, size bounds, what is never
//! kept, bypass, stale answers for errors.

use bytes::Bytes;
use proptest::prelude::*;
use semaforo::cache::{http_cache_control, Cache, CacheControl};
use semaforo::classify::HttpClassifier;
use semaforo::share::{Served, WholeResponse};
use semaforo::BoxError;
use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

/// Bytes held on the heap, for the size-bound test.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted(
    calls: &Arc<AtomicUsize>,
) -> impl Service<
    String,
    Response = String,
    Error = std::io::Error,
    Future = impl Future<Output = Result<String, std::io::Error>> + Send,
> + Clone {
    let calls = calls.clone();
    tower::service_fn(move |t: String| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, std::io::Error>(format!("answer to {t}")) }
    })
}

#[allow(clippy::ptr_arg)] // a key of `String` requests reads `&String`
fn by_topic(t: &String) -> Option<String> {
    Some(t.clone())
}

/// Stored at t0 with a TTL of 60 s: a hit at 59.999 s, a miss at 60 s.
#[tokio::test(start_paused = true)]
async fn the_ttl_is_exact_on_the_crate_clock() {
    let cache: Cache<String, String> = Cache::builder()
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = cache.layer(by_topic).layer(counted(&calls));
    assert_eq!(
        svc.clone().oneshot("a".into()).await.unwrap(),
        "answer to a"
    );
    tokio::time::sleep(Duration::from_millis(59_999)).await;
    assert_eq!(
        svc.clone().oneshot("a".into()).await.unwrap(),
        "answer to a"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(1)).await;
    svc.clone().oneshot("a".into()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let s = cache.snapshot();
    assert_eq!((s.hits, s.misses, s.stores), (1, 2, 2));
}

/// 1,000,000 distinct keys through the layer into a cache of 10,000
/// entries / 4 MiB: after moka's pending work, at most 10,000 entries and
/// 4 MiB weighed, and the heap it holds within 4 MiB + 10,000 × 512 B.
#[tokio::test(start_paused = true)]
async fn a_million_keys_stay_within_the_bounds() {
    let before = LIVE.load(Ordering::Relaxed);
    let cache: Cache<String, String> = Cache::builder()
        .max_entries(10_000)
        .max_bytes(4 << 20)
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = cache.layer(by_topic).layer(counted(&calls));
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    for i in 0..1_000_000u32 {
        let mut fut = std::pin::pin!(svc.call(format!("k{i}")));
        assert!(fut.as_mut().poll(&mut cx).is_ready());
    }
    cache.run_pending_tasks();
    let s = cache.snapshot();
    let held = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "{} entries, {} bytes weighed, {} evicted, heap held {held} B ({} B an entry)",
        s.entries,
        s.bytes,
        s.evicted,
        held / s.entries.max(1) as i64
    );
    assert!(s.entries <= 10_000, "{s:?}");
    assert!(s.bytes <= 4 << 20, "{s:?}");
    assert!(held <= (4 << 20) + 10_000 * 512, "heap {held}");
    assert_eq!(calls.load(Ordering::SeqCst), 1_000_000);
}

fn http_upstream(
    calls: &Arc<AtomicUsize>,
    status: u16,
) -> impl Service<
    http::Request<Bytes>,
    Response = http::Response<Bytes>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    let calls = calls.clone();
    tower::service_fn(move |_req: http::Request<Bytes>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(status)
                    .header("x-call", n)
                    .body(Bytes::from(format!("body {n}")))
                    .unwrap(),
            )
        }
    })
}

fn by_path(req: &http::Request<Bytes>) -> Option<String> {
    Some(req.uri().path().to_owned())
}

/// `http::Response<Bytes>` through `WholeResponse`: a hit is the same
/// status, headers and body, marked `Served::Cache` with an `age` header;
/// `no-store` bypasses; `no-cache` refreshes; an error status is not kept.
#[tokio::test(start_paused = true)]
async fn http_answers_are_kept_marked_and_bypassed_on_request() {
    let cache: Cache<String, Arc<semaforo::share::KeptResponse>> = Cache::builder()
        .ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = cache
        .layer(by_path)
        .share(WholeResponse)
        .classify(HttpClassifier)
        .control(http_cache_control);
    let svc = layer.clone().layer(http_upstream(&calls, 200));
    let get = |path: &str, cc: Option<&str>| {
        let mut b = http::Request::get(path);
        if let Some(cc) = cc {
            b = b.header(http::header::CACHE_CONTROL, cc);
        }
        b.body(Bytes::new()).unwrap()
    };
    let first = svc.clone().oneshot(get("/a", None)).await.unwrap();
    assert!(first.extensions().get::<Served>().is_none());
    tokio::time::sleep(Duration::from_secs(7)).await;
    let hit = svc.clone().oneshot(get("/a", None)).await.unwrap();
    assert_eq!(hit.body(), "body 0");
    assert_eq!(hit.headers()["x-call"], "0");
    assert_eq!(hit.headers()[http::header::AGE], "7");
    assert_eq!(
        hit.extensions().get::<Served>(),
        Some(&Served::Cache {
            age: Duration::from_secs(7),
            stale: false
        })
    );
    // no-store: neither read nor written.
    let r = svc
        .clone()
        .oneshot(get("/a", Some("no-store")))
        .await
        .unwrap();
    assert_eq!(r.body(), "body 1");
    assert_eq!(
        svc.clone().oneshot(get("/a", None)).await.unwrap().body(),
        "body 0"
    );
    // no-cache: a fresh answer, which replaces the kept one.
    let r = svc
        .clone()
        .oneshot(get("/a", Some("max-age=0, no-cache")))
        .await
        .unwrap();
    assert_eq!(r.body(), "body 2");
    assert_eq!(
        svc.clone().oneshot(get("/a", None)).await.unwrap().body(),
        "body 2"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        http_cache_control(&get("/", Some("No-Store"))),
        CacheControl::Bypass
    );

    // A 503 is passed on and never kept.
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = layer.layer(http_upstream(&calls, 503));
    for _ in 0..3 {
        let r = failing.clone().oneshot(get("/b", None)).await.unwrap();
        assert_eq!(r.status(), 503);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// Past its TTL an answer is a miss, but `Cache::stale` hands it out until
/// `ttl + stale_for` (for a fallback), then it is gone.
#[tokio::test(start_paused = true)]
async fn stale_answers_are_kept_for_errors_until_their_time() {
    let cache: Cache<String, String> = Cache::builder()
        .ttl(Duration::from_secs(60))
        .stale_for(Duration::from_secs(600))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = cache.layer(by_topic).layer(counted(&calls));
    svc.clone().oneshot("a".into()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(cache.get(&"a".to_string()), None, "past its TTL");
    let (v, age) = cache.stale(&"a".to_string()).unwrap();
    assert_eq!((v.as_str(), age), ("answer to a", Duration::from_secs(61)));
    tokio::time::sleep(Duration::from_secs(599)).await;
    assert!(cache.stale(&"a".to_string()).is_none(), "gone at 660 s");
    assert_eq!(cache.snapshot().stale_served, 1);
}

#[test]
fn bad_settings_are_refused() {
    for (b, field) in [
        (Cache::builder().ttl(Duration::ZERO), "ttl"),
        (Cache::builder().max_entries(0), "max_entries"),
        (Cache::builder().max_bytes(0), "max_bytes"),
        (Cache::builder().max_entry_bytes(0), "max_entry_bytes"),
        (
            Cache::builder().max_bytes(10).max_entry_bytes(11),
            "max_entry_bytes",
        ),
    ] {
        let e = b.build::<String, String>().unwrap_err();
        assert_eq!(e.field, field);
    }
    // Extremes are fine.
    Cache::builder()
        .ttl(Duration::MAX)
        .stale_for(Duration::MAX)
        .max_entries(u64::MAX)
        .max_bytes(u64::MAX)
        .max_entry_bytes(usize::MAX)
        .build::<String, String>()
        .unwrap();
}

/// A miss dropped before its answer stores nothing; a hit's future is
/// ready at once; polled again it errs (no panic).
#[tokio::test(start_paused = true)]
async fn dropped_misses_store_nothing() {
    let cache: Cache<String, String> = Cache::builder().build().unwrap();
    let slow = tower::service_fn(|t: String| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, std::io::Error>(t)
    });
    let mut svc = cache.layer(by_topic).layer(slow);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut miss = Box::pin(svc.ready().await.unwrap().call("a".into()));
    assert!(miss.as_mut().poll(&mut cx).is_pending());
    drop(miss);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cache.get(&"a".into()), None);
    svc.ready().await.unwrap().call("a".into()).await.unwrap();
    let mut hit = Box::pin(svc.ready().await.unwrap().call("a".into()));
    assert!(hit.as_mut().poll(&mut cx).is_ready());
    assert!(matches!(
        hit.as_mut().poll(&mut cx),
        std::task::Poll::Ready(Err(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever sequence of answers (200, 429, 500, 529, a transport
    /// error), only a 200 is ever kept and served: every hit is the body of
    /// the last 200 stored, and a key whose calls never succeeded is never
    /// in the cache.
    #[test]
    fn only_successes_are_kept(answers in prop::collection::vec(0u8..5, 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let cache: Cache<String, Arc<semaforo::share::KeptResponse>> =
                Cache::builder().ttl(Duration::from_secs(10)).build().unwrap();
            let seq = Arc::new(answers.clone());
            let n = Arc::new(AtomicUsize::new(0));
            let (s2, n2) = (seq.clone(), n.clone());
            let upstream = tower::service_fn(move |_req: http::Request<Bytes>| {
                let i = n2.fetch_add(1, Ordering::SeqCst);
                let kind = s2[i % s2.len()];
                async move {
                    let status = match kind {
                        0 => 200,
                        1 => 429,
                        2 => 500,
                        3 => 529,
                        _ => return Err(BoxError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset))),
                    };
                    Ok(http::Response::builder().status(status).body(Bytes::from(format!("{i}"))).unwrap())
                }
            });
            let svc = cache
                .layer(by_path)
                .share(WholeResponse)
                .classify(HttpClassifier)
                .layer(upstream);
            let mut last_ok: Option<String> = None;
            for step in 0..answers.len() {
                let before = n.load(Ordering::SeqCst);
                let r = svc.clone().oneshot(http::Request::get("/k").body(Bytes::new()).unwrap()).await;
                let called = n.load(Ordering::SeqCst) > before;
                match r {
                    Ok(res) if !called => {
                        // A hit: the last success, marked.
                        prop_assert!(res.extensions().get::<Served>().is_some());
                        prop_assert_eq!(Some(String::from_utf8_lossy(res.body()).into_owned()), last_ok.clone());
                        prop_assert_eq!(res.status(), 200);
                    }
                    Ok(res) => {
                        if res.status() == 200 {
                            last_ok = Some(String::from_utf8_lossy(res.body()).into_owned());
                        }
                    }
                    Err(_) => prop_assert!(called),
                }
                prop_assert_eq!(cache.get(&"/k".to_string()).is_some(), last_ok.is_some(), "step {}", step);
                tokio::time::sleep(Duration::from_secs(3)).await;
                // Past the TTL, the answer is no longer served.
                if last_ok.is_some() && cache.get(&"/k".to_string()).is_none() {
                    last_ok = None;
                }
            }
            Ok(())
        })?;
    }
}

/// A health report names the cache's counts and bytes.
#[tokio::test(start_paused = true)]
async fn the_health_report_shows_the_cache() {
    let cache: Cache<String, String> = Cache::builder().build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = cache.layer(by_topic).layer(counted(&calls));
    svc.clone().oneshot("a".into()).await.unwrap();
    svc.clone().oneshot("a".into()).await.unwrap();
    cache.run_pending_tasks();
    let shutdown = semaforo::shutdown::Shutdown::default();
    let report = semaforo::health::Health::new(&shutdown)
        .cache("plans", &cache)
        .report();
    let c = report
        .components
        .iter()
        .find(|c| c.name == "plans")
        .unwrap();
    let get = |k: &str| c.details.iter().find(|(n, _)| *n == k).unwrap().1;
    assert_eq!(
        (get("entries"), get("hits"), get("misses")),
        (1.0, 1.0, 1.0)
    );
    assert!(get("bytes") > 0.0);
}

/// An entry found past its keep time leaves the cache told as evicted: one
/// `Shared { Evicted }` event and one in the snapshot's count (it was told
/// only for the size bounds). (That an answer stored again meanwhile stays
/// is `cache::tests::expire_keeps_an_answer_stored_meanwhile`: it needs the
/// two callers interleaved.)
#[tokio::test(start_paused = true)]
async fn an_expired_entry_is_told_as_evicted() {
    use semaforo::observe::{EventKind, ShareOutcome};
    let evicted = Arc::new(AtomicUsize::new(0));
    let cache: Cache<String, String> = Cache::builder()
        .ttl(Duration::from_secs(1))
        .on_event({
            let evicted = evicted.clone();
            move |e| {
                if let EventKind::Shared {
                    outcome: ShareOutcome::Evicted,
                } = e.kind
                {
                    evicted.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = cache.layer(by_topic).layer(counted(&calls));
    svc.clone().oneshot("a".into()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Found expired by the layer: removed (told), then called and stored again.
    svc.clone().oneshot("a".into()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(evicted.load(Ordering::SeqCst), 1);
    assert_eq!(cache.snapshot().evicted, 1);
    assert_eq!(cache.get(&"a".to_owned()).as_deref(), Some("answer to a"));
    // Found expired by `stale`: removed and told once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cache.stale(&"a".to_owned()), None);
    assert_eq!(cache.stale(&"a".to_owned()), None);
    assert_eq!(evicted.load(Ordering::SeqCst), 2);
    assert_eq!(cache.snapshot().evicted, 2);
}

//! The healthy paths allocate nothing: a counting global allocator around one
//! call through each layer (after a warm-up call), for the layers whose closed /
//! free / hot-key path promises zero allocations.

use futures::FutureExt;
use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::quota::{Quota, Rate};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Bytes this thread holds now, and the most it held since the last reset.
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn grow(by: i64) {
    LIVE.with(|l| {
        let now = l.get() + by;
        l.set(now);
        PEAK.with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        grow(layout.size() as i64);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        grow(-(layout.size() as i64));
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// The most bytes this thread held at once while running `f`, above what it
/// held before.
#[cfg_attr(not(feature = "llm"), allow(dead_code))]
fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - before).max(0) as u64)
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread while running `f`.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn call<S: Service<u64, Response = u64>>(svc: &mut S) -> u64
where
    S::Error: std::fmt::Debug,
{
    let svc = svc.ready().now_or_never().expect("ready").expect("ok");
    svc.call(1).now_or_never().expect("done").expect("ok")
}

fn bare() -> impl Service<
    u64,
    Response = u64,
    Error = Infallible,
    Future = std::future::Ready<Result<u64, Infallible>>,
> + Clone {
    service_fn(|x: u64| std::future::ready(Ok::<_, Infallible>(x)))
}

#[test]
fn hot_paths_do_not_allocate() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();

    let bulkhead = Bulkhead::builder(10).max_queue(10).build().unwrap();
    let mut s = ServiceBuilder::new()
        .layer(bulkhead.layer())
        .service(bare());
    call(&mut s);
    assert_eq!(
        allocations(|| {
            call(&mut s);
        }),
        0,
        "bulkhead with a free permit"
    );

    let breaker = Breaker::builder().build().unwrap();
    let mut s = ServiceBuilder::new().layer(breaker.layer()).service(bare());
    call(&mut s);
    assert_eq!(
        allocations(|| {
            call(&mut s);
        }),
        0,
        "closed breaker"
    );

    let rated = Breaker::builder()
        .failure_rate(0.5)
        .window_calls(100)
        .build()
        .unwrap();
    let mut s = ServiceBuilder::new().layer(rated.layer()).service(bare());
    call(&mut s);
    assert_eq!(
        allocations(|| {
            call(&mut s);
        }),
        0,
        "closed breaker with a rate window"
    );

    let quota = Quota::builder()
        .plan("p", Rate::per_second(1_000_000))
        .build::<u64>()
        .unwrap();
    let plan = quota.plan_id("p").unwrap();
    let mut s = ServiceBuilder::new()
        .layer(quota.layer(move |_: &u64| (7u64, plan)))
        .service(bare());
    call(&mut s);
    assert_eq!(
        allocations(|| {
            call(&mut s);
        }),
        0,
        "quota, hot key"
    );

    let limit = semaforo::quota::RateLimit::builder(Rate::per_second(1_000_000))
        .build()
        .unwrap();
    let mut s = ServiceBuilder::new().layer(limit.layer()).service(bare());
    call(&mut s);
    assert_eq!(
        allocations(|| {
            call(&mut s);
        }),
        0,
        "unkeyed rate limit"
    );

    let big = u32::MAX as u64 * 60;
    let pace = semaforo::pace::Pace::builder()
        .requests_per_minute(big)
        .tokens_per_minute(big)
        .build()
        .unwrap();
    let mut s = ServiceBuilder::new()
        .layer(
            pace.layer()
                .weigh(|_: &u64| semaforo::pace::Cost::tokens(7)),
        )
        .service(bare());
    call(&mut s);
    assert_eq!(
        allocations(|| {
            call(&mut s);
        }),
        0,
        "pace, RPM + TPM, reserve and go"
    );

    for (retry, what) in [
        (
            semaforo::retry::Retry::builder()
                .max_attempts(3)
                .no_budget()
                .build()
                .unwrap(),
            "retry, success path, no budget",
        ),
        (
            semaforo::retry::Retry::builder()
                .max_attempts(3)
                .build()
                .unwrap(),
            "retry, success path, with a budget",
        ),
    ] {
        let mut s = ServiceBuilder::new().layer(retry.layer()).service(bare());
        call(&mut s);
        assert_eq!(
            allocations(|| {
                call(&mut s);
            }),
            0,
            "{what}"
        );
    }

    let timeout = semaforo::timeout::Timeout::builder()
        .attempt(std::time::Duration::from_secs(30))
        .build()
        .unwrap();
    let mut s = ServiceBuilder::new().layer(timeout.layer()).service(bare());
    call(&mut s);
    assert_eq!(
        allocations(|| {
            call(&mut s);
        }),
        0,
        "attempt timeout, answered at once"
    );

    // The whole generic stack (shutdown → bulkhead → retry → breaker →
    // pace → timeout).
    let mut s = ServiceBuilder::new()
        .layer(semaforo::shutdown::Shutdown::new().layer())
        .layer(Bulkhead::builder(1_000).build().unwrap().layer())
        .layer(
            semaforo::retry::Retry::builder()
                .max_attempts(3)
                .build()
                .unwrap()
                .layer(),
        )
        .layer(Breaker::builder().build().unwrap().layer())
        .layer(
            pace.layer()
                .weigh(|_: &u64| semaforo::pace::Cost::tokens(7)),
        )
        .layer(timeout.layer())
        .service(bare());
    call(&mut s);
    assert_eq!(
        allocations(|| {
            call(&mut s);
        }),
        0,
        "the whole stack"
    );

    // A sanity check that the counter sees allocations at all.
    assert!(allocations(|| drop(std::hint::black_box(Box::new(1u64)))) >= 1);
}

/// Sizes that come from outside are bounded: bodies are read for the few fields
/// needed (typed, borrowed), never built into a JSON tree; an SSE line without
/// an end does not grow a buffer; bytes are scanned once.
#[cfg(feature = "llm")]
#[test]
fn outside_sizes_cost_bounded_memory_and_linear_scans() {
    use semaforo::classify::{Class, LlmClassifier, ProviderError};
    use semaforo::llm::{estimate_cost, usage_tokens, SseParser, DEFAULT_MAX_LINE};

    // A 50 MB error body: not inspected (over the 64 KiB cap): its class is
    // the status's, and nothing is allocated for it.
    let message = "x".repeat(50 << 20);
    let big_error = format!(r#"{{"error":{{"type":"insufficient_quota","message":"{message}"}}}}"#);
    let no_headers: [(&str, &str); 0] = [];
    let (class, peak) = peak_bytes(|| {
        LlmClassifier::new().classify_parts(429, &no_headers[..], big_error.as_bytes())
    });
    assert_eq!(class, Class::Throttled { retry_after: None });
    assert!(peak < 4 * 1024, "{peak} bytes for a 50 MB error body");
    assert_eq!(ProviderError::parse(big_error.as_bytes()), None);
    drop((message, big_error));

    // A 39 MB embeddings answer: usage read, nothing of the rest kept.
    let vector = "0.0123,".repeat(39 << 17);
    let answer =
        format!(r#"{{"data":[{{"embedding":[{vector}0.1]}}],"usage":{{"total_tokens":8}}}}"#);
    let (usage, peak) = peak_bytes(|| usage_tokens(answer.as_bytes()));
    assert_eq!(usage, Some(8));
    assert!(
        peak < 4 * 1024,
        "{peak} bytes for a {} byte answer",
        answer.len()
    );
    drop(answer);

    // A 40,000-character prompt in content parts: estimated without copying it.
    let text = "a".repeat(40_000);
    let req = format!(
        r#"{{"max_tokens":100,"messages":[{{"role":"user","content":[{{"type":"text","text":"{text}"}}]}}]}}"#
    );
    let (cost, peak) = peak_bytes(|| estimate_cost(req.as_bytes()));
    assert_eq!(cost.total_tokens(), 10_100);
    assert!(peak < 4 * 1024, "{peak} bytes to estimate a 40 kB prompt");

    // 32 MB of SSE without a newline, in 64 KiB chunks: every byte examined
    // once, the line buffer never above the cap.
    let chunk = vec![b'x'; 64 * 1024];
    let mut parser = SseParser::new();
    let (events, peak) = peak_bytes(|| {
        let mut events = 0;
        let mut count = |e: semaforo::llm::SseEvent<'_>| events += usize::from(!e.truncated);
        parser.feed(b"data: ", &mut count);
        for _ in 0..512 {
            parser.feed(&chunk, &mut count);
        }
        parser.feed(b"\n\ndata: ok\n\n", &mut count);
        events
    });
    assert_eq!(
        events, 1,
        "the over-long event is dropped, the next one read"
    );
    assert_eq!(parser.scanned(), 6 + 32 * 1024 * 1024 + 12);
    assert!(
        peak <= 2 * DEFAULT_MAX_LINE as u64,
        "{peak} bytes held for a 32 MB line (cap {DEFAULT_MAX_LINE})"
    );
}

/// No request pays for sweeping a quota's idle keys: 65,536 calls on one hot
/// key with 200,000 idle keys present (the count that asks for a sweep)
/// allocate nothing on the calling thread — the sweep (which rebuilds the
/// store) runs on the quota's own thread.
#[test]
fn no_request_pays_for_the_quota_sweep() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        // Generous enough that the hot key is never refused (a refusal
        // allocates its error).
        let quota: Quota<u32> = Quota::builder()
            .plan("user", Rate::per_second(1_000_000))
            .build()
            .unwrap();
        let user = quota.plan_id("user").unwrap();
        let mut svc = ServiceBuilder::new()
            .layer(quota.layer(move |k: &u64| (*k as u32, user)))
            .service(bare());
        for k in 0..200_000u64 {
            svc.ready().await.unwrap().call(k).await.unwrap();
        }
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        let sweeps = quota.snapshot().sweeps;
        park_once();
        let n = allocations(|| {
            for _ in 0..65_536 {
                assert_eq!(call_quiet(&mut svc), Some(7));
            }
        });
        assert_eq!(n, 0, "the calling thread allocated {n} times");
        let mut swept = false;
        for _ in 0..2_000 {
            if quota.snapshot().sweeps > sweeps && quota.snapshot().keys <= 1 {
                swept = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(swept, "{:?}", quota.snapshot());
    });
}

/// Parks this thread once on a `parking_lot` lock held by another thread.
/// A call that meets a key-map shard the sweep holds waits for it, and the
/// map's lock parks through `parking_lot_core`, whose first park on a thread
/// sets up its thread data (allocating, once per thread — and its table,
/// once per process): not the sweep's work, and not a request's. Done here,
/// before the count, so the count sees only what the calls themselves do
/// (it allocated 2 times in one CI run, where a timed sweep overlapped).
fn park_once() {
    let lock = std::sync::Arc::new(parking_lot::Mutex::new(()));
    let (held, is_held) = std::sync::mpsc::channel();
    let holder = {
        let lock = lock.clone();
        std::thread::spawn(move || {
            let _guard = lock.lock();
            held.send(()).unwrap();
            // Long enough that the other thread stops spinning and parks.
            std::thread::sleep(std::time::Duration::from_millis(50));
        })
    };
    is_held.recv().unwrap();
    drop(lock.lock());
    holder.join().unwrap();
}

/// One call, refused or not.
fn call_quiet<S: Service<u64, Response = u64>>(svc: &mut S) -> Option<u64> {
    let svc = svc.ready().now_or_never()?.ok()?;
    svc.call(7).now_or_never()?.ok()
}

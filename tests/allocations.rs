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
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|a| a.set(a.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
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

    let bulkhead = Bulkhead::builder()
        .max_concurrent(10)
        .max_queue(10)
        .build()
        .unwrap();
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

    // A sanity check that the counter sees allocations at all.
    assert!(allocations(|| drop(std::hint::black_box(Box::new(1u64)))) >= 1);
}

//! Uncontended reserve-and-go: the pacer (RPM + TPM reserved together) next to
//! governor's direct `check_n` on one cell, in the same run.

mod common;
use common::once;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use governor::{Quota, RateLimiter};
use semaforo::pace::{Cost, KeyedPace, Pace, PaceKey};
use std::borrow::Cow;

const MODELS: [&str; 3] = ["gpt-4o", "gpt-4o-mini", "o3-mini"];

/// The model of a request: given, not parsed.
#[derive(Clone, Copy)]
struct Model;

impl PaceKey<u64> for Model {
    fn key<'a>(&self, req: &'a u64) -> Option<Cow<'a, str>> {
        Some(Cow::Borrowed(MODELS[(*req % 3) as usize]))
    }
}
use std::convert::Infallible;
use std::num::NonZeroU32;
use std::time::Duration;
use tower::{service_fn, ServiceBuilder};

fn reserve(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("pace/reserve_and_go");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let limiter = RateLimiter::direct(Quota::per_second(NonZeroU32::new(u32::MAX).unwrap()));
    let n = NonZeroU32::new(7).unwrap();
    g.bench_function("governor direct check_n (1 cell)", |b| {
        b.iter(|| black_box(limiter.check_n(n)))
    });

    let tokens = RateLimiter::direct(Quota::per_second(NonZeroU32::new(u32::MAX).unwrap()));
    let requests = RateLimiter::direct(Quota::per_second(NonZeroU32::new(u32::MAX).unwrap()));
    g.bench_function("governor direct check_n ×2 (RPM + TPM cells)", |b| {
        b.iter(|| black_box((requests.check(), tokens.check_n(n))))
    });

    let limiter = RateLimiter::direct_with_clock(
        Quota::per_second(NonZeroU32::new(u32::MAX).unwrap()),
        common::TokioClock::new(),
    );
    g.bench_function("governor direct check_n (1 cell, tokio clock)", |b| {
        b.iter(|| black_box(limiter.check_n(n)))
    });

    // Two cells on the tokio clock (each check reads it, as two limiters do).
    let clock = common::TokioClock::new();
    let tokens = RateLimiter::direct_with_clock(
        Quota::per_second(NonZeroU32::new(u32::MAX).unwrap()),
        clock,
    );
    let requests = RateLimiter::direct_with_clock(
        Quota::per_second(NonZeroU32::new(u32::MAX).unwrap()),
        clock,
    );
    g.bench_function(
        "governor direct check_n ×2 (RPM + TPM cells, tokio clock)",
        |b| b.iter(|| black_box((requests.check(), tokens.check_n(n)))),
    );

    let pace = Pace::builder()
        .requests_per_minute(u32::MAX as u64 * 60)
        .tokens_per_minute(u32::MAX as u64 * 60)
        .build()
        .unwrap();
    let mut s = ServiceBuilder::new()
        .layer(pace.layer().weigh(|_: &u64| Cost::tokens(7)))
        .service(service_fn(|x: u64| {
            std::future::ready(Ok::<_, Infallible>(x))
        }));
    g.bench_function("semaforo Pace layer (RPM + TPM, call included)", |b| {
        b.iter(|| once(&mut s, black_box(1)))
    });

    // The same limits per model, three models; the key is given (a static
    // name), not parsed from a body.
    let per_model = || {
        Pace::builder()
            .requests_per_minute(u32::MAX as u64 * 60)
            .tokens_per_minute(u32::MAX as u64 * 60)
    };
    let keyed = KeyedPace::builder(per_model())
        .key(MODELS[0], per_model())
        .key(MODELS[1], per_model())
        .key(MODELS[2], per_model())
        .build()
        .unwrap();
    let mut k = ServiceBuilder::new()
        .layer(keyed.layer().key(Model).weigh(|_: &u64| Cost::tokens(7)))
        .service(service_fn(|x: u64| {
            std::future::ready(Ok::<_, Infallible>(x))
        }));
    let mut i = 0u64;
    g.bench_function(
        "semaforo KeyedPace layer (3 models, RPM + TPM each, call included)",
        |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                once(&mut k, black_box(i))
            })
        },
    );
    g.finish();
}

/// Two threads reserving on one pacer (RPM + TPM) next to two governor cells
/// shared by both threads, on the same (tokio) clock.
fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("pace/contended_2_threads");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let big = NonZeroU32::new(u32::MAX).unwrap();
    let clock = common::TokioClock::new();
    let cells = std::sync::Arc::new((
        RateLimiter::direct_with_clock(Quota::per_second(big), clock),
        RateLimiter::direct_with_clock(Quota::per_second(big), clock),
    ));
    let n = NonZeroU32::new(7).unwrap();
    g.bench_function(
        "governor direct check_n ×2 (RPM + TPM cells, tokio clock)",
        |b| {
            b.iter_custom(|iters| {
                common::two_callers(iters, || {
                    let cells = cells.clone();
                    move |_| {
                        let _ = black_box((cells.0.check(), cells.1.check_n(n)));
                    }
                })
            })
        },
    );
    let pace = Pace::builder()
        .requests_per_minute(u32::MAX as u64 * 60)
        .tokens_per_minute(u32::MAX as u64 * 60)
        .build()
        .unwrap();
    g.bench_function("semaforo Pace layer (RPM + TPM, call included)", |b| {
        b.iter_custom(|iters| {
            common::two_callers(iters, || {
                let mut s = ServiceBuilder::new()
                    .layer(pace.layer().weigh(|_: &u64| Cost::tokens(7)))
                    .service(service_fn(|x: u64| {
                        std::future::ready(Ok::<_, Infallible>(x))
                    }));
                move |x| {
                    once(&mut s, x);
                }
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = reserve, contended
}
criterion_main!(benches);

//! Cost of computing one backoff delay (it runs once per retry, so this only has
//! to be far below the sleep it computes; it is here to catch regressions).
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use semaforo::backoff::{Backoff, Jitter};
use semaforo::classify::Class;
use std::time::Duration;

fn delays(c: &mut Criterion) {
    let mut g = c.benchmark_group("backoff/delay");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let mut rng = SmallRng::seed_from_u64(1);
    for (name, jitter) in [
        ("none", Jitter::None),
        ("full", Jitter::Full),
        ("equal", Jitter::Equal),
        ("decorrelated", Jitter::Decorrelated),
        ("proportional", Jitter::Proportional { min: 0.1, max: 0.3 }),
    ] {
        let b = Backoff::exponential(Duration::from_millis(100))
            .jitter(jitter)
            .throttled(2.0, Duration::from_secs(900))
            .build()
            .expect("valid backoff");
        let class = Class::Throttled { retry_after: None };
        g.bench_function(name, |bench| {
            bench.iter(|| {
                b.delay_for_drawn(
                    black_box(&class),
                    black_box(5),
                    Duration::from_secs(1),
                    rng.random(),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, delays);
criterion_main!(benches);

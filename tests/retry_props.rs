//! Property: for random outcome sequences, attempts never exceed the maximum,
//! the whole call never outlives its deadline, and every wait respects both the
//! backoff bounds and the upstream's Retry-After.

use proptest::prelude::*;
use semaforo::backoff::{Backoff, Jitter};
use semaforo::classify::{Class, Permanent};
use semaforo::retry::Retry;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

fn class() -> impl Strategy<Value = Class> {
    let ra = prop::option::of((0u64..20_000).prop_map(Duration::from_millis));
    prop_oneof![
        2 => Just(Class::Success),
        1 => Just(Class::permanent(Permanent::Other)),
        2 => Just(Class::Transient),
        1 => Just(Class::Infrastructure),
        2 => ra.clone().prop_map(|retry_after| Class::Throttled { retry_after }),
        1 => ra.prop_map(|retry_after| Class::Overloaded { retry_after }),
    ]
}

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
        Just(Jitter::Proportional { min: 0.1, max: 0.3 }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn attempts_deadline_and_delays_hold(
        script in prop::collection::vec((class(), 0u64..3_000), 1..8),
        max_attempts in 1u32..7,
        deadline_ms in prop::option::of(1u64..60_000),
        base_ms in 0u64..3_000,
        cap_extra_ms in 0u64..10_000,
        jitter in jitter(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let base = Duration::from_millis(base_ms);
            let cap = base + Duration::from_millis(cap_extra_ms);
            let backoff = Backoff::exponential(base).cap(cap).jitter(jitter)
                .throttled(2.0, cap * 2).build().unwrap();
            let mut b = Retry::builder().max_attempts(max_attempts).backoff(backoff.clone())
                .retry_after_ceiling(Duration::from_secs(15)).no_budget();
            if let Some(d) = deadline_ms {
                b = b.deadline(Duration::from_millis(d));
            }
            let retry = b.build().unwrap();
            let t0 = Instant::now();
            let log: Arc<Mutex<Vec<(Duration, Duration, Class)>>> = Arc::default();
            let mut svc = ServiceBuilder::new()
                .layer(retry.layer().classify(|r: Result<&Class, &std::io::Error>| r.map_or(Class::Transient, |c| *c)))
                .service(tower::service_fn({
                    let log = log.clone();
                    let script = script.clone();
                    move |_: u32| {
                        let n = log.lock().unwrap().len();
                        let (class, work_ms) = script.get(n).copied().unwrap_or((Class::Success, 0));
                        let work = Duration::from_millis(work_ms);
                        log.lock().unwrap().push((t0.elapsed(), work, class));
                        async move {
                            tokio::time::sleep(work).await;
                            Ok::<_, std::io::Error>(class)
                        }
                    }
                }));
            let _ = svc.ready().await.unwrap().call(0).await;
            let elapsed = t0.elapsed();
            let log = log.lock().unwrap().clone();
            prop_assert!(log.len() as u32 <= max_attempts, "{} attempts > {max_attempts}", log.len());
            if let Some(d) = deadline_ms {
                prop_assert!(elapsed <= Duration::from_millis(d), "{elapsed:?} past the deadline {d} ms");
            }
            for w in log.windows(2) {
                let (start, work, class) = w[0];
                prop_assert!(class.is_retryable(), "retried a {class:?}");
                let delay = w[1].0 - (start + work);
                let ra = class.retry_after().unwrap_or(Duration::ZERO);
                prop_assert!(ra <= Duration::from_secs(15), "slept {ra:?} past the ceiling");
                let most = ra.max(backoff.cap_for(&class));
                prop_assert!(delay >= ra, "{delay:?} before Retry-After {ra:?}");
                prop_assert!(delay <= most, "{delay:?} above {most:?}");
            }
            Ok(())
        })?;
    }
}

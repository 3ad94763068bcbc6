//! Property: whatever the costs and arrivals, the admitted cost on each
//! dimension in any window W stays within `rate · W + burst`, and calls start
//! in arrival order.

use proptest::prelude::*;
use semaforo::pace::{Cost, Limit, Pace};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn admitted_cost_stays_within_rate_and_burst(
        calls in prop::collection::vec((0u64..20_000, 1u64..3_000), 1..60),
        tpm in 3_000u64..20_000,
        token_burst in 3_000u64..6_000,
        rpm in 10u64..120,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let pace = Pace::builder()
                .limit(Limit::tokens_per_minute(tpm).burst(token_burst))
                .limit(Limit::requests_per_minute(rpm).burst(5))
                .build().unwrap();
            let log: Arc<Mutex<Vec<(usize, Instant, u64)>>> = Arc::default();
            let svc = ServiceBuilder::new()
                .layer(pace.layer().weigh(|c: &(usize, u64)| Cost::tokens(c.1)))
                .service(tower::service_fn({
                    let log = log.clone();
                    move |(id, tokens): (usize, u64)| {
                        log.lock().unwrap().push((id, Instant::now(), tokens));
                        async move { Ok::<_, std::io::Error>(()) }
                    }
                }));
            let mut calls = calls;
            calls.sort_by_key(|c| c.0);
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for (id, (at_ms, tokens)) in calls.iter().enumerate() {
                tokio::time::sleep_until(t0 + Duration::from_millis(*at_ms)).await;
                let mut s = svc.clone();
                let fut = s.ready().await.unwrap().call((id, *tokens));
                tasks.push(tokio::spawn(fut));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            let log = log.lock().unwrap().clone();
            prop_assert_eq!(log.len(), calls.len());
            // FIFO: started in arrival order.
            let order: Vec<usize> = log.iter().map(|l| l.0).collect();
            prop_assert_eq!(order, (0..calls.len()).collect::<Vec<_>>());
            // Any window: admitted ≤ rate · W + burst, per dimension (1 µs rounding slack).
            let tps = tpm as f64 / 60.0;
            let rps = rpm as f64 / 60.0;
            for i in 0..log.len() {
                let (mut tokens, mut requests) = (0.0, 0.0);
                for j in i..log.len() {
                    tokens += log[j].2 as f64;
                    requests += 1.0;
                    let w = (log[j].1 - log[i].1).as_secs_f64() + 1e-6;
                    prop_assert!(tokens <= tps * w + token_burst as f64 + 1e-6, "tokens {tokens} in {w}s");
                    prop_assert!(requests <= rps * w + 5.0 + 1e-6, "requests {requests} in {w}s");
                }
            }
            Ok(())
        })?;
    }
}

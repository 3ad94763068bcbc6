//! One pacer per model behind one layer, with a limit the models share:
//! each model paced by its own budget, the sum by the shared one, and a model
//! at its limit holding back no other model (tokio time, paused).

use proptest::prelude::*;
use semaforo::pace::{Cost, KeyedPace, Pace, PaceBuilder};
use semaforo::shutdown::Close;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

type Call = (String, u64);
type Log = Arc<Mutex<Vec<(String, Instant, u64)>>>;

fn tpm(n: u64) -> PaceBuilder {
    Pace::builder().tokens_per_minute(n)
}

/// The keyed pacer over a service that logs each start.
fn stack(
    models: &KeyedPace,
    log: &Log,
) -> impl Service<Call, Response = (), Error = semaforo::BoxError, Future = impl Send> + Clone + Send
{
    let log = log.clone();
    ServiceBuilder::new()
        .layer(
            models
                .layer()
                .key(|(m, _): &Call| Some(m.clone()))
                .weigh(|(_, t): &Call| Cost::tokens(*t)),
        )
        .service(tower::service_fn(move |(m, t): Call| {
            log.lock().unwrap().push((m, Instant::now(), t));
            async { Ok::<_, std::io::Error>(()) }
        }))
}

/// Every window of the log within `rate·W + burst`, for the calls `pick` selects.
fn within(
    log: &[(String, Instant, u64)],
    pick: impl Fn(&str) -> bool,
    per_minute: u64,
    burst: u64,
) -> Result<(), String> {
    let calls: Vec<_> = log.iter().filter(|c| pick(&c.0)).collect();
    let rate = per_minute as f64 / 60.0;
    for i in 0..calls.len() {
        let mut sum = 0.0;
        for c in &calls[i..] {
            sum += c.2 as f64;
            let w = (c.1 - calls[i].1).as_secs_f64() + 1e-6;
            if sum > rate * w + burst as f64 + 1e-6 {
                return Err(format!(
                    "{sum} tokens in {w} s (rate {per_minute}/min, burst {burst})"
                ));
            }
        }
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn three_models_each_paced_by_its_own_budget_and_all_by_the_shared_one() {
    let models = KeyedPace::builder(tpm(5_000))
        .name("openai")
        .key("gpt-4o", tpm(10_000))
        .key("gpt-4o-mini", tpm(20_000))
        .shared(tpm(25_000))
        .build()
        .unwrap();
    let log: Log = Arc::default();
    let svc = stack(&models, &log);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for m in ["gpt-4o", "gpt-4o-mini", "o3-mini"] {
        for _ in 0..20 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(svc.oneshot((m.to_string(), 1_000))));
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 60);
    within(&log, |m| m == "gpt-4o", 10_000, 10_000).unwrap();
    within(&log, |m| m == "gpt-4o-mini", 20_000, 20_000).unwrap();
    within(&log, |m| m == "o3-mini", 5_000, 5_000).unwrap();
    within(&log, |_| true, 25_000, 25_000).unwrap();
    // The model not named got a pacer of its own from the template.
    assert_eq!(models.keys(), ["gpt-4o", "gpt-4o-mini", "o3-mini"]);
    assert_eq!(models.get(Some("o3-mini")).name(), Some("openai/o3-mini"));
    // 60,000 tokens against 25,000 a minute shared: at least 84 s.
    let last = log.iter().map(|c| c.1).max().unwrap() - t0;
    assert!(last >= Duration::from_secs(84), "{last:?}");
}

#[tokio::test(start_paused = true)]
async fn a_model_at_its_limit_holds_back_no_other_model() {
    let models = KeyedPace::builder(tpm(10_000))
        .shared(tpm(1_000_000))
        .build()
        .unwrap();
    let log: Log = Arc::default();
    let svc = stack(&models, &log);
    // 100 calls of a busy model: minutes of backlog in its line.
    let busy: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(("busy".to_string(), 1_000))))
        .collect();
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    for _ in 0..5 {
        svc.clone()
            .oneshot(("quiet".to_string(), 1_000))
            .await
            .unwrap();
    }
    assert_eq!(
        t0.elapsed(),
        Duration::ZERO,
        "the quiet model waited for the busy one"
    );
    for t in busy {
        t.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn keys_past_max_keys_and_requests_without_a_key_share_the_overflow_pacer() {
    let models = KeyedPace::builder(tpm(1_000)).max_keys(2).build().unwrap();
    // Held (by a caller, as a call in flight holds its pacer): not evicted.
    let held: Vec<_> = ["a", "b"].map(|k| models.get(Some(k))).into();
    for k in ["c", "d"] {
        let p = models.get(Some(k));
        p.snapshot();
    }
    assert_eq!(models.keys(), ["a", "b"]);
    // "c", "d" and no key: one pacer. Spending it through one spends it for all.
    let log: Log = Arc::default();
    let svc = stack(&models, &log);
    svc.clone().oneshot(("c".to_string(), 1_000)).await.unwrap();
    let t0 = Instant::now();
    svc.clone().oneshot(("d".to_string(), 1_000)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(60));
    assert!(models.get(None).snapshot().dims[0].available < 1.0);
    drop(held);
    // A key of its own is not touched.
    let t0 = Instant::now();
    svc.oneshot(("a".to_string(), 1_000)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

/// When every place is taken, a new key takes the place of idle ones (a
/// pacer like a new one, held by no call), looked for at most once a second;
/// a key that spent from the overflow pacer before it got a place starts as
/// spent as that pacer, not with a fresh budget.
#[tokio::test(start_paused = true)]
async fn idle_keys_give_their_place_and_a_late_key_keeps_what_it_spent() {
    let models = KeyedPace::builder(tpm(1_000)).max_keys(2).build().unwrap();
    let log: Log = Arc::default();
    let svc = stack(&models, &log);
    let t0 = Instant::now();
    for k in ["a", "b"] {
        svc.clone().oneshot((k.to_string(), 1_000)).await.unwrap();
    }
    // 59.5 s: "a" and "b" are not full yet: "x" finds no place (a sweep ran).
    tokio::time::sleep_until(t0 + Duration::from_millis(59_500)).await;
    svc.clone().oneshot(("x".to_string(), 10)).await.unwrap();
    assert_eq!(models.keys(), ["a", "b"]);
    // 60 s: "a" and "b" are idle, but a sweep ran half a second ago: "c"
    // spends 900 on the overflow pacer.
    tokio::time::sleep_until(t0 + Duration::from_secs(60)).await;
    svc.clone().oneshot(("c".to_string(), 900)).await.unwrap();
    assert_eq!(models.keys(), ["a", "b"]);
    // 61 s: the sweep frees both places; "c" gets one, as spent as the
    // overflow pacer (about 100 left and 17 refilled), not a fresh 1,000.
    tokio::time::sleep_until(t0 + Duration::from_secs(61)).await;
    let c = models.get(Some("c"));
    assert_eq!(models.keys(), ["c"]);
    let left = c.snapshot().dims[0].available;
    assert!((100.0..130.0).contains(&left), "c starts with {left} left");
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_closes_every_key_and_the_ones_built_after() {
    let models = KeyedPace::builder(tpm(1_000))
        .key("given", tpm(1_000))
        .build()
        .unwrap();
    let log: Log = Arc::default();
    let svc = stack(&models, &log);
    // One call spends each bucket; the next of each waits in its line.
    for m in ["given", "built"] {
        svc.clone().oneshot((m.to_string(), 1_000)).await.unwrap();
    }
    let waiting: Vec<_> = ["given", "built"]
        .map(|m| tokio::spawn(svc.clone().oneshot((m.to_string(), 1_000))))
        .into();
    tokio::task::yield_now().await;
    assert_eq!(models.close(), 2);
    for t in waiting {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(
            semaforo::Rejected::from_box(&e).unwrap().kind(),
            semaforo::RejectKind::ShuttingDown
        );
    }
    // A model first seen after the close is refused too.
    let e = svc.oneshot(("late".to_string(), 1)).await.unwrap_err();
    assert_eq!(
        semaforo::Rejected::from_box(&e).unwrap().kind(),
        semaforo::RejectKind::ShuttingDown
    );
    assert_eq!(models.close(), 0, "a second close releases nobody");
}

#[test]
fn bad_configuration_is_an_error() {
    let twice = KeyedPace::builder(tpm(1_000))
        .key("m", tpm(10))
        .key("m", tpm(20))
        .build();
    assert!(twice.is_err());
    assert!(
        KeyedPace::builder(Pace::builder()).build().is_err(),
        "a template without limits"
    );
    assert!(KeyedPace::builder(tpm(1_000))
        .key("m", tpm(0))
        .build()
        .is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the keys, costs and arrivals: each key's calls within its
    /// budget, all calls within the shared one.
    #[test]
    fn every_key_and_the_sum_stay_within_rate_and_burst(
        calls in prop::collection::vec((0usize..4, 0u64..20_000, 1u64..3_000), 1..50),
        per_key in 3_000u64..10_000,
        shared_tpm in 3_000u64..20_000,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let models = KeyedPace::builder(tpm(per_key))
                .max_keys(3)
                .shared(tpm(shared_tpm))
                .build()
                .unwrap();
            let log: Log = Arc::default();
            let svc = stack(&models, &log);
            let mut calls = calls;
            calls.sort_by_key(|c| c.1);
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for (k, at, tokens) in calls.iter().copied() {
                tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
                tasks.push(tokio::spawn(svc.clone().oneshot((format!("m{k}"), tokens))));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            let log = log.lock().unwrap().clone();
            prop_assert_eq!(log.len(), calls.len());
            // Three keys have pacers of their own at a time (idle ones give
            // their place; a key that spent on the overflow pacer keeps it).
            for k in 0..4 {
                let key = format!("m{k}");
                within(&log, |m| m == key, per_key, per_key).map_err(TestCaseError::fail)?;
            }
            within(&log, |_| true, shared_tpm, shared_tpm).map_err(TestCaseError::fail)?;
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn peek_builds_nothing_and_a_shared_refusal_names_the_shared_pacer() {
    let models = KeyedPace::builder(tpm(80_000))
        .name("org")
        .shared(tpm(50_000))
        .build()
        .unwrap();
    assert!(models.peek("haiku").is_none());
    assert!(models.keys().is_empty(), "peek took no place");
    let log: Log = Arc::default();
    let e = stack(&models, &log)
        .oneshot(("haiku".to_string(), 60_000))
        .await
        .unwrap_err();
    let r = semaforo::Rejected::from_box(&e).unwrap();
    assert_eq!(r.name(), Some("org#shared"), "{r}");
    assert!(
        models.peek("haiku").is_none(),
        "a call that could never be paid takes no place among max_keys"
    );
}

/// `start_for` answers when a call would start without reserving: now on a
/// full pacer, after its line and the shared cells otherwise; nothing for a
/// cost above a burst.
#[tokio::test(start_paused = true)]
async fn start_for_peeks_without_reserving() {
    let models = KeyedPace::builder(tpm(1_000))
        .shared(tpm(1_500))
        .build()
        .unwrap();
    let a = models.get(Some("a"));
    let t0 = Instant::now();
    assert_eq!(a.start_for(&Cost::tokens(1_000)), Some(t0));
    assert_eq!(
        a.start_for(&Cost::tokens(1_000)),
        Some(t0),
        "nothing reserved"
    );
    assert_eq!(a.start_for(&Cost::tokens(2_000)), None);
    let log: Log = Arc::default();
    let svc = stack(&models, &log);
    svc.clone().oneshot(("a".to_string(), 1_000)).await.unwrap();
    // "a" is spent: 500 tokens more refill in 30 s.
    assert_eq!(
        a.start_for(&Cost::tokens(500)),
        Some(t0 + Duration::from_secs(30))
    );
    // "b" is full, but the shared cells hold 500: the 500 more refill in 20 s.
    let b = models.get(Some("b"));
    assert_eq!(
        b.start_for(&Cost::tokens(1_000)),
        Some(t0 + Duration::from_secs(20))
    );
}

/// Found by the proptest above: a key that spent on the overflow pacer and
/// then got a pacer of its own stays within its budget, measured from the
/// calls' real starts.
#[tokio::test(start_paused = true)]
async fn a_key_moved_off_the_overflow_pacer_keeps_its_budget() {
    let models = KeyedPace::builder(tpm(3_000))
        .max_keys(3)
        .shared(tpm(3_987))
        .build()
        .unwrap();
    let log: Log = Arc::default();
    let svc = stack(&models, &log);
    let calls = [
        (2, 2_279, 1_568),
        (1, 2_279, 1_954),
        (3, 8_561, 13),
        (0, 8_561, 2_363),
        (0, 8_805, 1),
        (0, 9_805, 2_573),
    ];
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (k, at, tokens) in calls {
        tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
        tasks.push(tokio::spawn(svc.clone().oneshot((format!("m{k}"), tokens))));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let log = log.lock().unwrap().clone();
    for (m, at, n) in &log {
        println!("{m} {:?} {n}", *at - t0);
    }
    for k in 0..4 {
        let key = format!("m{k}");
        within(&log, |m| m == key, 3_000, 3_000).unwrap();
    }
    within(&log, |_| true, 3_987, 3_987).unwrap();
}

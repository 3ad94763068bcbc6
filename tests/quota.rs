//! Quotas under paused time: seeds 003 and 004, plan upgrades, the global limit
//! beside keyed ones, weighted costs, 429 headers, eviction of idle keys, and a
//! property test of the rate bound.

use proptest::prelude::*;
use semaforo::quota::{PlanId, Quota, Rate};
use semaforo::{BoxError, RejectKind, Rejected};
use std::time::Duration;
use tower::{Service, ServiceBuilder, ServiceExt};

type Req = (u32, PlanId, u32);

fn api(quota: &Quota<u32>) -> impl Service<Req, Response = (), Error = BoxError> {
    ServiceBuilder::new()
        .layer(quota.layer(|r: &Req| (r.0, r.1)).cost(|r: &Req| r.2))
        .service(tower::service_fn(|_: Req| async {
            Ok::<_, std::io::Error>(())
        }))
}

async fn hit<S: Service<Req, Response = (), Error = BoxError>>(
    svc: &mut S,
    user: u32,
    plan: PlanId,
) -> Result<(), Rejected> {
    svc.ready()
        .await
        .unwrap()
        .call((user, plan, 1))
        .await
        .map_err(|e| Rejected::from_box(&e).expect("rejection").clone())
}

fn seed_003() -> Quota<u32> {
    Quota::builder()
        .name("api")
        .plan("free", Rate::per_minute(60))
        .plan("pro", Rate::per_minute(1_000))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn seed_003_free_60_per_minute_pro_1000() {
    let quota = seed_003();
    let (free, pro) = (
        quota.plan_id("free").unwrap(),
        quota.plan_id("pro").unwrap(),
    );
    let mut svc = api(&quota);
    for _ in 0..60 {
        hit(&mut svc, 1, free).await.unwrap();
    }
    let r = hit(&mut svc, 1, free).await.unwrap_err();
    assert_eq!(r.kind(), RejectKind::QuotaExceeded);
    assert_eq!(
        r.retry_after(),
        Some(Duration::from_secs(1)),
        "one more token each second"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    hit(&mut svc, 1, free).await.unwrap();
    assert!(hit(&mut svc, 1, free).await.is_err());
    // Over a full minute, a Free key gets 60 more.
    tokio::time::advance(Duration::from_secs(60)).await;
    let mut admitted = 0;
    for _ in 0..100 {
        admitted += hit(&mut svc, 1, free).await.is_ok() as u32;
    }
    assert_eq!(admitted, 60);
    // A Pro key: 1000.
    let mut admitted = 0;
    for _ in 0..1_200 {
        admitted += hit(&mut svc, 2, pro).await.is_ok() as u32;
    }
    assert_eq!(admitted, 1_000);
    let snap = quota.snapshot();
    assert_eq!((snap.admitted, snap.keys), (60 + 1 + 60 + 1_000, 2));
}

#[tokio::test(start_paused = true)]
async fn seed_004_three_per_hour_per_user() {
    let quota: Quota<u32> = Quota::builder()
        .plan("architecture", Rate::per_hour(3))
        .plan("book", Rate::per_hour(2))
        .build()
        .unwrap();
    let (arch, book) = (
        quota.plan_id("architecture").unwrap(),
        quota.plan_id("book").unwrap(),
    );
    let mut svc = api(&quota);
    for _ in 0..3 {
        hit(&mut svc, 7, arch).await.unwrap();
    }
    let r = hit(&mut svc, 7, arch).await.unwrap_err();
    assert_eq!(r.retry_after(), Some(Duration::from_secs(20 * 60)));
    for _ in 0..2 {
        hit(&mut svc, 7, book).await.unwrap();
    }
    assert_eq!(
        hit(&mut svc, 7, book).await.unwrap_err().retry_after(),
        Some(Duration::from_secs(30 * 60))
    );
    hit(&mut svc, 8, arch).await.unwrap(); // another user is not affected
    tokio::time::advance(Duration::from_secs(20 * 60)).await;
    hit(&mut svc, 7, arch).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_plan_upgrade_takes_effect_on_the_next_call() {
    let quota = seed_003();
    let (free, pro) = (
        quota.plan_id("free").unwrap(),
        quota.plan_id("pro").unwrap(),
    );
    let mut svc = api(&quota);
    for _ in 0..60 {
        hit(&mut svc, 1, free).await.unwrap();
    }
    assert!(hit(&mut svc, 1, free).await.is_err());
    // The user upgrades: the lookup now says Pro.
    hit(&mut svc, 1, pro).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_global_limit_and_the_keyed_ones_never_consume_each_other() {
    let quota: Quota<u32> = Quota::builder()
        .plan("user", Rate::per_minute(2))
        .global(Rate::per_minute(3))
        .build()
        .unwrap();
    let user = quota.plan_id("user").unwrap();
    let mut svc = api(&quota);
    hit(&mut svc, 1, user).await.unwrap();
    hit(&mut svc, 1, user).await.unwrap();
    // User 1 is over its quota: refused, and the global limit is not charged.
    for _ in 0..5 {
        assert_eq!(
            hit(&mut svc, 1, user).await.unwrap_err().detail(),
            Some("plan 'user'")
        );
    }
    hit(&mut svc, 2, user).await.unwrap(); // the 3rd global token is still there
                                           // The global limit is spent: refused, and user 3's own quota is not charged.
    let r = hit(&mut svc, 3, user).await.unwrap_err();
    assert_eq!(r.detail(), Some("global limit"));
    assert_eq!(r.retry_after(), Some(Duration::from_secs(20)));
    tokio::time::advance(Duration::from_secs(40)).await; // 2 global tokens back
    hit(&mut svc, 3, user).await.unwrap();
    hit(&mut svc, 3, user).await.unwrap(); // user 3 still had both of its own
}

#[tokio::test(start_paused = true)]
async fn a_cost_that_can_never_fit_is_refused_clearly() {
    let quota = seed_003();
    let free = quota.plan_id("free").unwrap();
    let mut svc = api(&quota);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call((1, free, 61))
        .await
        .unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    assert_eq!(r.retry_after(), None);
    assert!(
        err.to_string().contains("can never fit plan 'free'"),
        "{err}"
    );
    svc.ready()
        .await
        .unwrap()
        .call((1, free, 60))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_rejection_gives_the_429_headers() {
    let quota = seed_003();
    let free = quota.plan_id("free").unwrap();
    let mut svc = api(&quota);
    for _ in 0..60 {
        hit(&mut svc, 1, free).await.unwrap();
    }
    let r = hit(&mut svc, 1, free).await.unwrap_err();
    assert_eq!(
        r.http_headers(),
        vec![
            ("retry-after", "1".to_string()),
            ("ratelimit-policy", "\"free\";q=60;w=60".to_string()),
            ("ratelimit", "\"free\";r=0;t=1".to_string()),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_million_idle_keys_are_evicted() {
    let quota: Quota<u32> = Quota::builder()
        .plan("user", Rate::per_second(10))
        .build()
        .unwrap();
    let user = quota.plan_id("user").unwrap();
    let mut svc = api(&quota);
    for k in 0..1_000_000u32 {
        hit(&mut svc, k, user).await.unwrap();
    }
    assert!(quota.snapshot().keys > 900_000, "{:?}", quota.snapshot());
    // Idle for longer than their refill period (1 s): swept by ordinary traffic.
    tokio::time::advance(Duration::from_secs(2)).await;
    for _ in 0..70_000 {
        let _ = hit(&mut svc, 42, user).await;
    }
    let keys = quota.snapshot().keys;
    assert!(keys <= 1, "the store still holds {keys} keys");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Admitted cost in any window W ≤ rate · W + burst, per key and globally,
    /// and a key's admissions do not depend on other keys' traffic.
    #[test]
    fn admitted_within_rate_and_burst(
        arrivals in prop::collection::vec((0u64..30_000, 0u32..4, 1u32..4), 1..150),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let (per_key, global) = (Rate::per_minute(30).burst(5), Rate::per_minute(60).burst(8));
            let run = |with_global: bool, only: Option<u32>| {
                let arrivals = arrivals.clone();
                async move {
                    let mut b = Quota::builder().plan("p", per_key);
                    if with_global {
                        b = b.global(global);
                    }
                    let quota: Quota<u32> = b.build().unwrap();
                    let p = quota.plan_id("p").unwrap();
                    let mut svc = api(&quota);
                    let mut sorted = arrivals;
                    sorted.sort_by_key(|a| a.0);
                    let t0 = tokio::time::Instant::now();
                    let mut admitted = Vec::new();
                    for (at, key, cost) in sorted {
                        if only.is_some_and(|k| k != key) {
                            continue;
                        }
                        tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
                        if svc.ready().await.unwrap().call((key, p, cost)).await.is_ok() {
                            admitted.push((at, key, cost));
                        }
                    }
                    admitted
                }
            };
            let check = |adm: &[(u64, u32, u32)], rate: Rate| -> Result<(), TestCaseError> {
                let per_ms = rate.count as f64 / rate.per.as_millis() as f64;
                for i in 0..adm.len() {
                    let mut sum = 0.0;
                    for j in i..adm.len() {
                        sum += adm[j].2 as f64;
                        let w = (adm[j].0 - adm[i].0) as f64;
                        prop_assert!(sum <= per_ms * w + rate.burst as f64 + 1e-9, "{sum} in {w} ms");
                    }
                }
                Ok(())
            };
            let with_global = run(true, None).await;
            check(&with_global, global)?;
            let alone = run(false, None).await;
            for key in 0..4 {
                let mine: Vec<_> = with_global.iter().copied().filter(|a| a.1 == key).collect();
                check(&mine, per_key)?;
                // Without the global limit, a key admits exactly what it admits alone.
                let in_crowd: Vec<_> = alone.iter().copied().filter(|a| a.1 == key).collect();
                let by_itself = run(false, Some(key)).await;
                prop_assert_eq!(in_crowd, by_itself, "key {} depends on others", key);
            }
            Ok(())
        })?;
    }
}

#[test]
fn bad_configuration_is_an_error() {
    let field = |b: semaforo::quota::QuotaBuilder| b.build::<u32>().unwrap_err().field;
    assert_eq!(field(Quota::builder()), "plan");
    assert_eq!(
        field(Quota::builder().plan("x", Rate::per_minute(0))),
        "plan"
    );
    assert_eq!(
        field(
            Quota::builder()
                .plan("x", Rate::per_minute(1))
                .plan("x", Rate::per_minute(2))
        ),
        "plan"
    );
    assert_eq!(
        field(
            Quota::builder()
                .plan("x", Rate::per_minute(1))
                .global(Rate::per_minute(1).burst(0))
        ),
        "global"
    );
}

//! Tower conventions every service of ours follows: `get_ref`, `get_mut` and
//! `into_inner` reach the wrapped service.

use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::pace::Pace;
use semaforo::quota::{Quota, Rate};
use semaforo::retry::Retry;
use semaforo::shutdown::Shutdown;
use semaforo::timeout::Timeout;
use tower::Layer;

/// A wrapped service with something to find.
#[derive(Clone, Debug, PartialEq)]
struct Marked(u32);

macro_rules! reaches_inner {
    ($svc:expr) => {{
        let mut svc = $svc;
        assert_eq!(svc.get_ref(), &Marked(7));
        svc.get_mut().0 = 8;
        assert_eq!(svc.into_inner(), Marked(8));
    }};
}

#[tokio::test]
async fn every_service_reaches_its_inner_service() {
    let inner = Marked(7);
    reaches_inner!(Bulkhead::builder(1)
        .build()
        .unwrap()
        .layer()
        .layer(inner.clone()));
    reaches_inner!(Breaker::builder()
        .consecutive_failures(1)
        .build()
        .unwrap()
        .layer()
        .layer(inner.clone()));
    reaches_inner!(Pace::builder()
        .requests_per_minute(1)
        .build()
        .unwrap()
        .layer()
        .layer(inner.clone()));
    reaches_inner!(Retry::builder()
        .build()
        .unwrap()
        .layer()
        .layer(inner.clone()));
    reaches_inner!(Timeout::builder()
        .attempt(std::time::Duration::from_secs(1))
        .build()
        .unwrap()
        .layer()
        .layer(inner.clone()));
    reaches_inner!(Shutdown::new().layer().layer(inner.clone()));
    let quota: Quota<u8> = Quota::builder()
        .plan("p", Rate::per_second(1))
        .build()
        .unwrap();
    let plan = quota.plan_id("p").unwrap();
    reaches_inner!(quota.layer(move |_: &()| (0u8, plan)).layer(inner.clone()));
    reaches_inner!(
        semaforo::coalesce::CoalesceLayer::<_, (), _>::new(|_: &()| Some(0u8)).layer(inner.clone())
    );
    reaches_inner!(
        semaforo::fallback::FallbackLayer::new(semaforo::fallback::value(0u8)).layer(inner.clone())
    );
    #[cfg(feature = "http")]
    reaches_inner!(semaforo::degrade::DegradeLayer::new(
        &semaforo::degrade::Degrade::builder().build().unwrap()
    )
    .layer(inner.clone()));
    #[cfg(feature = "cache")]
    {
        let cache: semaforo::cache::Cache<u8, u8> =
            semaforo::cache::Cache::builder().build().unwrap();
        reaches_inner!(cache.layer(|_: &()| Some(0u8)).layer(inner.clone()));
    }
    #[cfg(feature = "chaos")]
    {
        let chaos: semaforo::chaos::Chaos<u8> = semaforo::chaos::Chaos::builder().build().unwrap();
        reaches_inner!(chaos.layer().layer(inner.clone()));
    }
    #[cfg(feature = "http")]
    reaches_inner!(semaforo::route::FirstChunkLayer::new().layer(inner.clone()));
}

#[test]
fn every_handle_has_the_name_it_was_built_with() {
    use std::time::Duration;
    let b = Bulkhead::builder(1).name("db").build().unwrap();
    assert_eq!(b.name(), Some("db"));
    let br = Breaker::builder()
        .name("api")
        .consecutive_failures(1)
        .build()
        .unwrap();
    assert_eq!(br.name(), Some("api"));
    let p = Pace::builder()
        .name("openai")
        .requests_per_minute(1)
        .build()
        .unwrap();
    assert_eq!(p.name(), Some("openai"));
    let r = Retry::builder().name("openai").build().unwrap();
    assert_eq!(r.name(), Some("openai"));
    let t = Timeout::builder()
        .name("openai")
        .attempt(Duration::from_secs(1))
        .build()
        .unwrap();
    assert_eq!(t.name(), Some("openai"));
    let q: Quota<u8> = Quota::builder()
        .name("users")
        .plan("p", Rate::per_second(1))
        .build()
        .unwrap();
    assert_eq!(q.name(), Some("users"));
    assert_eq!(Retry::builder().build().unwrap().name(), None);
}

/// Every refusal maps to a documented status and headers in one call.
#[cfg(feature = "http")]
#[test]
fn every_reject_kind_maps_to_a_status_and_headers() {
    use semaforo::{RejectKind, Rejected};
    use std::time::Duration;
    let table = [
        (RejectKind::QueueFull, 503),
        (RejectKind::QueueTimeout, 503),
        (RejectKind::QuotaExceeded, 429),
        (RejectKind::BudgetExceeded, 503),
        (RejectKind::CircuitOpen, 503),
        (RejectKind::RetryBudgetExhausted, 503),
        (RejectKind::ShuttingDown, 503),
        (RejectKind::Timeout, 504),
        (RejectKind::BackendUnavailable, 503),
    ];
    for (kind, status) in table {
        let r = Rejected::new("layer", kind).with_retry_after(Duration::from_nanos(1));
        let res = r.http_response(());
        assert_eq!(res.status().as_u16(), status, "{kind:?}");
        assert_eq!(
            res.headers()["retry-after"],
            "1",
            "never 0 for a positive wait"
        );
        let res = Rejected::new("layer", kind).http_response(());
        assert!(res.headers().get("retry-after").is_none());
    }
}

/// The health report serializes as JSON objects of named fields.
#[cfg(feature = "serde")]
#[tokio::test]
async fn health_serializes_as_named_fields() {
    use semaforo::health::Health;
    let shutdown = Shutdown::new();
    let bulkhead = Bulkhead::builder(3).build().unwrap();
    let report = Health::new(&shutdown).bulkhead("db", &bulkhead).report();
    let json = serde_json::to_value(&report).unwrap();
    let details = &json["components"][0]["details"];
    assert!(details.is_object(), "{json}");
    assert_eq!(details["limit"], 3.0, "{json}");
    assert_eq!(json["ready"], true);
}

//! `semaforo::axum`: every refusal's documented status, headers and body,
//! the `HandleErrorLayer` handler behind a router, and the health handlers.

use axum::error_handling::HandleErrorLayer;
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt as _;
use semaforo::bulkhead::Bulkhead;
use semaforo::health::Health;
use semaforo::shutdown::Shutdown;
use semaforo::{BoxError, RateLimitPolicy, RejectKind, Rejected};
use std::sync::Arc;
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt};

async fn json(res: axum::response::Response) -> serde_json::Value {
    let body = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// The table of the module docs, row by row: (kind, retry_after, status,
/// retry-after header, kind label).
#[tokio::test]
async fn every_reject_kind_maps_to_its_documented_status_and_headers() {
    let s = Some(Duration::from_millis(1_500));
    type Row = (
        RejectKind,
        Option<Duration>,
        u16,
        Option<&'static str>,
        &'static str,
    );
    let table: &[Row] = &[
        (
            RejectKind::QuotaExceeded,
            s,
            429,
            Some("2"),
            "quota_exceeded",
        ),
        (RejectKind::QuotaExceeded, None, 413, None, "quota_exceeded"),
        (
            RejectKind::BudgetExceeded,
            s,
            503,
            Some("2"),
            "budget_exceeded",
        ),
        (
            RejectKind::BudgetExceeded,
            None,
            413,
            None,
            "budget_exceeded",
        ),
        (RejectKind::QueueFull, s, 503, Some("2"), "queue_full"),
        (RejectKind::QueueFull, None, 503, None, "queue_full"),
        (RejectKind::QueueTimeout, s, 503, Some("2"), "queue_timeout"),
        (RejectKind::CircuitOpen, s, 503, Some("2"), "circuit_open"),
        (RejectKind::CircuitOpen, None, 503, None, "circuit_open"),
        (
            RejectKind::RetryBudgetExhausted,
            None,
            503,
            None,
            "retry_budget_exhausted",
        ),
        (RejectKind::ShuttingDown, None, 503, None, "shutting_down"),
        (
            RejectKind::BackendUnavailable,
            s,
            503,
            Some("2"),
            "backend_unavailable",
        ),
        (RejectKind::Timeout, None, 504, None, "timeout"),
        (
            RejectKind::Timeout,
            Some(Duration::from_secs(3)),
            504,
            Some("3"),
            "timeout",
        ),
    ];
    for &(kind, after, status, header, label) in table {
        let mut r = Rejected::new("layer", kind).with_name("svc");
        if let Some(d) = after {
            r = r.with_retry_after(d);
        }
        let res = axum::response::IntoResponse::into_response(r.clone());
        assert_eq!(res.status(), status, "{kind:?} {after:?}");
        assert_eq!(
            res.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            header,
            "{kind:?} {after:?}"
        );
        assert_eq!(res.headers()["content-type"], "application/json");
        assert!(res.headers().get("ratelimit-policy").is_none());
        let body = json(res).await;
        assert_eq!(body["error"]["kind"], label);
        assert_eq!(body["error"]["layer"], "layer");
        assert_eq!(body["error"]["name"], "svc");
        assert_eq!(body["error"]["message"], r.to_string());
        assert_eq!(
            body["error"]["retry_after_ms"].as_u64(),
            after.map(|d| d.as_millis() as u64)
        );
    }
    // With the quota's policy: the IETF RateLimit fields.
    let r = Rejected::new("quota", RejectKind::QuotaExceeded)
        .with_retry_after(Duration::from_secs(20))
        .with_policy(Arc::new(RateLimitPolicy {
            name: "free".into(),
            quota: 60,
            window: Duration::from_secs(60),
        }));
    let res = axum::response::IntoResponse::into_response(r);
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "20");
    assert_eq!(res.headers()["ratelimit-policy"], "\"free\";q=60;w=60");
    assert_eq!(res.headers()["ratelimit"], "\"free\";r=0;t=20");
}

/// Behind a router: a full bulkhead answers 503 + `Retry-After` + JSON; a
/// tower timeout answers 504; any other error 500 without its text.
#[tokio::test(start_paused = true)]
async fn handle_error_behind_a_router() {
    let bulkhead = Bulkhead::builder(1)
        .max_queue(0)
        .name("backend")
        .expected_service_time(Duration::from_secs(2))
        .build()
        .unwrap();
    let held = bulkhead.try_permit().unwrap();
    let app: Router = Router::new()
        .route(
            "/work",
            post(|| async { "done" }).route_layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(semaforo::axum::handle_error))
                    .layer(bulkhead.layer()),
            ),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            })
            .route_layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(semaforo::axum::handle_error))
                    .timeout(Duration::from_secs(1)),
            ),
        )
        .route(
            "/broken",
            get(|| async { "never" }).route_layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(semaforo::axum::handle_error))
                    .layer(tower::layer::layer_fn(|_inner| {
                        tower::service_fn(|_req: axum::extract::Request| async {
                            Err::<axum::response::Response, BoxError>(
                                "db password is hunter2".into(),
                            )
                        })
                    })),
            ),
        );
    let req = |m: &str, p: &str| {
        http::Request::builder()
            .method(m)
            .uri(p)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let res = app.clone().oneshot(req("POST", "/work")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(json(res).await["error"]["kind"], "queue_full");
    drop(held);
    let res = app.clone().oneshot(req("POST", "/work")).await.unwrap();
    assert_eq!(res.status(), 200);

    let res = app.clone().oneshot(req("GET", "/slow")).await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(json(res).await["error"]["kind"], "timeout");

    let res = app.clone().oneshot(req("GET", "/broken")).await.unwrap();
    assert_eq!(res.status(), 500);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"internal server error");
}

/// `/healthz` is the report as JSON (200, then 503 once shutting down);
/// `/readyz` 200 then 503.
#[tokio::test]
async fn health_and_ready_handlers() {
    let shutdown = Shutdown::new();
    let bulkhead = Bulkhead::builder(4).build().unwrap();
    let health = Health::new(&shutdown).bulkhead("backend", &bulkhead);
    let app: Router = Router::new()
        .route("/healthz", get(semaforo::axum::health))
        .route("/readyz", get(semaforo::axum::ready))
        .with_state(health);
    let get = |p: &str| {
        http::Request::get(p)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let res = app.clone().oneshot(get("/healthz")).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = json(res).await;
    assert_eq!(body["status"], "ok");
    assert_eq!(body["ready"], true);
    assert_eq!(body["components"][0]["name"], "backend");
    assert_eq!(body["components"][0]["details"]["in_flight"], 0.0);
    let res = app.clone().oneshot(get("/readyz")).await.unwrap();
    assert_eq!(res.status(), 200);

    shutdown.trigger();
    let res = app.clone().oneshot(get("/healthz")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(json(res).await["ready"], false);
    let res = app.clone().oneshot(get("/readyz")).await.unwrap();
    assert_eq!(res.status(), 503);
}

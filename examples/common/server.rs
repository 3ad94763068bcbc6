//! The axum server of `examples/axum_server.rs`, shared with the tests: an
//! expensive backend of capacity K guarded by shutdown → per-API-key quota →
//! bulkhead (fail fast when the line is full) → timeout; and a degradation
//! switch (`Reduced` while the backend's line stays more than half full)
//! that `/lesson` reads to serve a simplified answer.
#![allow(dead_code)]

use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use semaforo::bulkhead::Bulkhead;
use semaforo::degrade::{self, Degrade, DegradeLayer, Level, Rule};
use semaforo::health::Health;
use semaforo::quota::{Quota, Rate};
use semaforo::shutdown::Shutdown;
use semaforo::timeout::Timeout;
use semaforo::BoxError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceBuilder;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Calls the backend handles at full speed; beyond that every call slows down
    /// in proportion (a CPU- or pool-bound backend).
    pub capacity: usize,
    /// One call's work at full speed.
    pub service_time: Duration,
    /// Callers allowed to wait for a slot.
    pub queue: u32,
    /// Calls per minute per API key.
    pub per_key_per_minute: u32,
    /// The whole call's limit.
    pub timeout: Duration,
    /// Without the semaforo layers (to show the collapse).
    pub unguarded: bool,
    /// An adaptive limit (the bulkhead's `max_concurrent` is then its
    /// maximum, `adaptive_max`) instead of the fixed `capacity`.
    pub adaptive: Option<semaforo::bulkhead::Limit>,
    pub adaptive_max: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            capacity: 50,
            service_time: Duration::from_millis(100),
            queue: 200,
            per_key_per_minute: 6_000,
            timeout: Duration::from_secs(10),
            unguarded: false,
            adaptive: None,
            adaptive_max: 500,
        }
    }
}

/// Handles on the guards, for health checks, shutdown and assertions.
#[derive(Clone)]
pub struct Guards {
    pub shutdown: Shutdown,
    pub bulkhead: Bulkhead,
    pub quota: Quota<String>,
    pub health: Health,
    /// The degradation switch `/lesson` reads.
    pub degrade: Degrade,
    /// `(status, time in the server)` of every `/work` answer.
    pub answers: Arc<std::sync::Mutex<Vec<(u16, Duration)>>>,
}

#[derive(Clone)]
struct Backend {
    busy: Arc<AtomicUsize>,
    cfg: ServerConfig,
}

/// The expensive backend: past its capacity, everyone slows down.
async fn work(State(b): State<Backend>) -> Response {
    let n = b.busy.fetch_add(1, Ordering::SeqCst) + 1;
    let slowdown = (n as f64 / b.cfg.capacity as f64).max(1.0);
    tokio::time::sleep(b.cfg.service_time.mul_f64(slowdown)).await;
    b.busy.fetch_sub(1, Ordering::SeqCst);
    (StatusCode::OK, "done").into_response()
}

/// A lesson plan: the full one (the backend's whole work) at `Normal`; at
/// `Reduced` or below, a simplified one for a quarter of the work. The
/// level comes from the request's extensions (the `DegradeLayer` puts it
/// there; the response carries it back in `x-degrade-level`).
async fn lesson(
    State(b): State<Backend>,
    axum::Extension(level): axum::Extension<Level>,
) -> Response {
    match level {
        Level::Normal => {
            tokio::time::sleep(b.cfg.service_time).await;
            (
                StatusCode::OK,
                "full lesson plan: objectives, activities, exercises, rubric",
            )
                .into_response()
        }
        Level::Reduced | Level::Minimal => {
            tokio::time::sleep(b.cfg.service_time / 4).await;
            (StatusCode::OK, "lesson plan: objectives and activities").into_response()
        }
    }
}

#[derive(serde::Deserialize)]
struct StreamParams {
    secs: u64,
}

/// `secs` SSE chunks, one a second.
async fn stream_answer(axum::extract::Query(p): axum::extract::Query<StreamParams>) -> Response {
    let chunks = futures::stream::unfold(0u64, move |i| async move {
        if i >= p.secs {
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some((
            Ok::<_, std::io::Error>(format!("data: {{\"chunk\": {i}}}\n\n")),
            i + 1,
        ))
    });
    (
        [("content-type", "text/event-stream")],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
}

pub fn app(cfg: ServerConfig) -> Result<(Router, Guards), BoxError> {
    let shutdown = Shutdown::new();
    let quota = Quota::builder()
        .name("api")
        .plan("default", Rate::per_minute(cfg.per_key_per_minute))
        .build::<String>()?;
    let plan = quota.plan_id("default").ok_or("no default plan")?;
    // One builder call switches to an adaptive limit.
    let bulkhead = match &cfg.adaptive {
        None => Bulkhead::builder(cfg.capacity as u32),
        Some(limit) => Bulkhead::builder(cfg.adaptive_max).limit(limit.clone()),
    }
    .name("backend")
    .max_queue(cfg.queue)
    .expected_service_time(cfg.service_time)
    .build()?;
    shutdown.watch(bulkhead.clone());
    shutdown.watch(quota.clone());
    let timeout = Timeout::builder()
        .name("backend")
        .total(cfg.timeout)
        .build()?;
    // `Reduced` once the backend's line has stayed more than half full for
    // 2 s, back 10 s after it has not (evaluated each second, on the
    // runtime `app` is called from).
    let degrade = Degrade::builder()
        .name("backend")
        .rule(
            Rule::new(Level::Reduced, degrade::line_above(&bulkhead, 0.5))
                .after(Duration::from_secs(2))
                .recover_after(Duration::from_secs(10)),
        )
        .build()?;
    // (Outside a runtime the rules are not evaluated; the level is set by hand.)
    let _ = degrade.spawn();
    let health = Health::new(&shutdown)
        .bulkhead("backend", &bulkhead)
        .quota("api", &quota)
        .degrade("backend", &degrade);
    let backend = Backend {
        busy: Arc::new(AtomicUsize::new(0)),
        cfg: cfg.clone(),
    };
    let work_route = if cfg.unguarded {
        post(work)
    } else {
        post(work).route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(semaforo::axum::handle_error))
                .layer(shutdown.layer())
                .layer(quota.layer(move |req: &axum::extract::Request| {
                    let key = req
                        .headers()
                        .get("x-api-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("anonymous")
                        .to_owned();
                    (key, plan)
                }))
                // Answers classified for an adaptive limit (a 5xx or a
                // timeout below is a drop).
                .layer(
                    bulkhead
                        .layer()
                        .classify(semaforo::classify::HttpClassifier),
                )
                .layer(timeout.layer()),
        )
    };
    let answers: Arc<std::sync::Mutex<Vec<(u16, Duration)>>> = Arc::default();
    let timing = {
        let answers = answers.clone();
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let answers = answers.clone();
            async move {
                let t0 = tokio::time::Instant::now();
                let res = next.run(req).await;
                answers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((res.status().as_u16(), t0.elapsed()));
                res
            }
        }
    };
    let work_route = work_route.layer(axum::middleware::from_fn(timing));
    // A streamed answer (`?secs=N` chunks, one a second), counted until its last
    // chunk and cut with an SSE error event at the drain deadline.
    let stream_route = get(stream_answer).route_layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(semaforo::axum::handle_error))
            .layer(tower::util::MapResponseLayer::new(
                |r: http::Response<
                    semaforo::guard::Tapped<axum::body::Body, semaforo::shutdown::DrainCut>,
                >| { r.map(axum::body::Body::new) },
            ))
            .layer(shutdown.layer().cut_bodies_at_deadline()),
    );
    let router = Router::new()
        .route("/work", work_route)
        .route("/lesson", get(lesson))
        .route("/stream", stream_route)
        .route(
            "/readyz",
            get(semaforo::axum::ready).with_state(health.clone()),
        )
        .route(
            "/healthz",
            get(semaforo::axum::health).with_state(health.clone()),
        )
        .layer(DegradeLayer::new(&degrade))
        .with_state(backend);
    Ok((
        router,
        Guards {
            shutdown,
            bulkhead,
            quota,
            health,
            degrade,
            answers,
        },
    ))
}

//! axum glue (feature `axum`): a refusal as a response, a ready
//! `HandleErrorLayer` handler, and health endpoints.
//!
//! Every axum server that puts our layers in front of its handlers needs the
//! same three things:
//!
//! - [`Rejected`] implements [`IntoResponse`]: the status and headers of
//!   [`Rejected::http_response`] (the one mapping, shared with every other
//!   adapter) and a JSON body (below);
//! - [`handle_error`] is the function `HandleErrorLayer::new` takes (axum
//!   routes need services that never fail — `Error = Infallible` — and our
//!   layers fail with a [`BoxError`], so `HandleErrorLayer` goes outermost
//!   in the `ServiceBuilder`; without it the compiler says `expected
//!   Infallible, found Box<dyn Error + Send + Sync>`): a
//!   refusal anywhere in the error's `source()` chain answers as above, a
//!   timeout of tower's own `Timeout` layer as 504, anything else as 500
//!   without the error's text (it is logged through `tracing` instead);
//! - [`health`] and [`ready`] are handlers for `/healthz` (the
//!   [`HealthReport`](crate::health::HealthReport) as JSON; 200 while ready
//!   and not `Down`, else 503) and `/readyz` (200 or 503).
//!
//! | [`RejectKind`] | status | headers |
//! |---|---|---|
//! | `QuotaExceeded` | 429 (413 without `retry_after`: the request can never fit) | `Retry-After`, `RateLimit-Policy`, `RateLimit` when the quota's policy is known |
//! | `BudgetExceeded` | 503 (413 without `retry_after`) | `Retry-After` |
//! | `QueueFull`, `QueueTimeout`, `CircuitOpen`, `RetryBudgetExhausted`, `ShuttingDown`, `BackendUnavailable` | 503 | `Retry-After` when known |
//! | `Timeout` | 504 | `Retry-After` when known |
//!
//! `Retry-After` is in whole seconds, rounded up. The body:
//!
//! ```json
//! {"error":{"kind":"queue_full","layer":"bulkhead","name":"backend",
//!           "message":"bulkhead 'backend': queue full (45/45 waiting), retry after 2 s",
//!           "retry_after_ms":1500}}
//! ```
//!
//! ```
//! use axum::{error_handling::HandleErrorLayer, routing::{get, post}, Router};
//! use semaforo::{bulkhead::Bulkhead, health::Health, shutdown::Shutdown};
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), semaforo::BoxError> {
//! let shutdown = Shutdown::new();
//! let bulkhead = Bulkhead::builder(32).max_queue(64).name("backend").build()?;
//! let health = Health::new(&shutdown).bulkhead("backend", &bulkhead);
//! let app: Router = Router::new()
//!     .route(
//!         "/work",
//!         post(|| async { "done" }).route_layer(
//!             ServiceBuilder::new()
//!                 .layer(HandleErrorLayer::new(semaforo::axum::handle_error))
//!                 .layer(shutdown.layer())
//!                 .layer(bulkhead.layer()),
//!         ),
//!     )
//!     .route("/healthz", get(semaforo::axum::health).with_state(health.clone()))
//!     .route("/readyz", get(semaforo::axum::ready).with_state(health));
//! # let _ = app; Ok(()) }
//! ```

use crate::error::{BoxError, RejectKind, Rejected};
use crate::health::{Health, Status};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

impl IntoResponse for Rejected {
    fn into_response(self) -> Response {
        (&self).into_response()
    }
}

impl IntoResponse for &Rejected {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "kind": crate::observe::reject_label(self.kind()),
                "layer": self.layer(),
                "name": self.name(),
                "message": self.to_string(),
                "retry_after_ms": self.retry_after().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            }
        });
        let mut res = self.http_response(axum::body::Body::from(body.to_string()));
        res.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        res
    }
}

/// The handler for `HandleErrorLayer::new`: a [`Rejected`] anywhere in the
/// error's `source()` chain answers with its status, headers and JSON body
/// (see the [module docs](self)); tower's `timeout::error::Elapsed` or
/// tokio's `Elapsed` answers 504; anything else 500 with a fixed body (the
/// error itself goes to `tracing` at `ERROR`, target `semaforo`, not to the
/// client).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use semaforo::{BoxError, RejectKind, Rejected};
/// let err: BoxError = Rejected::new("quota", RejectKind::QuotaExceeded)
///     .with_retry_after(std::time::Duration::from_millis(1_200))
///     .into();
/// let res = semaforo::axum::handle_error(err).await;
/// assert_eq!(res.status(), 429);
/// assert_eq!(res.headers()["retry-after"], "2");
/// # }
/// ```
pub async fn handle_error(err: BoxError) -> Response {
    error_response(&err)
}

fn error_response(err: &BoxError) -> Response {
    if let Some(r) = Rejected::find(err.as_ref()) {
        return r.into_response();
    }
    if is_elapsed(err.as_ref()) {
        return Rejected::new("timeout", RejectKind::Timeout).into_response();
    }
    tracing::error!(target: "semaforo", error = %err, "unhandled error behind semaforo::axum::handle_error");
    (StatusCode::INTERNAL_SERVER_ERROR, "internal server error").into_response()
}

/// tower's `Timeout` layer fails with an `Elapsed` of its own, tokio's
/// `timeout` with another.
fn is_elapsed(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<tokio::time::error::Elapsed>() || e.is::<tower::timeout::error::Elapsed>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// `/healthz`: the [`HealthReport`](crate::health::HealthReport) as JSON,
/// 200 while ready and not [`Status::Down`], 503 otherwise (state: the
/// [`Health`]).
pub async fn health(State(health): State<Health>) -> Response {
    let report = health.report();
    let code = if report.ready && report.status != Status::Down {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(report)).into_response()
}

/// `/readyz`: 200 `ready` until shutdown is triggered, then 503
/// `shutting down` (state: the [`Health`]).
pub async fn ready(State(health): State<Health>) -> Response {
    if health.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    }
}

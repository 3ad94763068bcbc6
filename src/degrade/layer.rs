//! The level on each request and response (feature `http`).

use super::{Degrade, Level};
use pin_project::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// The response header naming the level when it is not `Normal`
/// (`x-degrade-level: reduced`).
pub const LEVEL_HEADER: &str = "x-degrade-level";

/// Puts the level in force into each request's extensions (read it in a
/// handler with `req.extensions().get::<Level>()`, or axum's
/// `Extension<Level>`), and into each response's extensions and, when not
/// `Normal`, its [`LEVEL_HEADER`]. The level is read once per request, when
/// it arrives.
///
/// ```
/// use semaforo::degrade::{Degrade, DegradeLayer, Level};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let switch = Degrade::builder().build().unwrap();
/// let handler = service_fn(|req: http::Request<String>| async move {
///     let level = req.extensions().get::<Level>().copied().unwrap_or_default();
///     let body = match level {
///         Level::Normal => "the full lesson plan, with exercises",
///         Level::Reduced | Level::Minimal => "the lesson plan",
///     };
///     Ok::<_, std::convert::Infallible>(http::Response::new(body.to_string()))
/// });
/// let svc = DegradeLayer::new(&switch).layer(handler);
/// switch.set(Level::Reduced);
/// let res = svc.oneshot(http::Request::new(String::new())).await.unwrap();
/// assert_eq!(res.body(), "the lesson plan");
/// assert_eq!(res.headers()["x-degrade-level"], "reduced");
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct DegradeLayer {
    degrade: Degrade,
}

impl DegradeLayer {
    /// Tells each request and response `degrade`'s level.
    pub fn new(degrade: &Degrade) -> Self {
        DegradeLayer {
            degrade: degrade.clone(),
        }
    }
}

impl<S> Layer<S> for DegradeLayer {
    type Service = DegradeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DegradeService {
            inner,
            degrade: self.degrade.clone(),
        }
    }
}

/// The service of a [`DegradeLayer`].
#[derive(Debug, Clone)]
pub struct DegradeService<S> {
    inner: S,
    degrade: Degrade,
}

impl<S, B, RB> Service<http::Request<B>> for DegradeService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = DegradeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let level = self.degrade.level();
        req.extensions_mut().insert(level);
        DegradeFuture {
            fut: self.inner.call(req),
            level,
        }
    }
}

/// The future of [`DegradeService`]: the inner call, its response marked.
/// Cancel safety: dropping it drops the inner call. Polled again after its
/// answer, it polls the inner future again: its error type is the inner
/// service's (an axum service's is `Infallible`), so unlike the crate's
/// other futures it has no error of its own to answer with.
#[pin_project]
#[derive(Debug)]
pub struct DegradeFuture<F> {
    #[pin]
    fut: F,
    level: Level,
}

impl<F, RB, E> Future for DegradeFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let level = *this.level;
        this.fut.poll(cx).map_ok(|mut res| {
            res.extensions_mut().insert(level);
            if level != Level::Normal {
                res.headers_mut()
                    .insert(LEVEL_HEADER, http::HeaderValue::from_static(level.as_str()));
            }
            res
        })
    }
}

crate::inner_access!([S] DegradeService<S>);

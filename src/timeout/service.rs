use super::timed::Deadlines;
use super::{Limits, Packed};
use crate::error::{BoxError, RejectKind, Rejected};
use crate::guard::Tapped;
use crate::observe::Observer;
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

/// How the response is followed after it arrives.
pub trait Timed<Res>: crate::sealed::Sealed {
    /// What the caller receives.
    type Response;
    /// Wraps the response under the limits that still apply; `started` is when
    /// the call began (`None`: it answered at its first poll, i.e. now);
    /// `request_deadline`: `total` is the request's own limit (see
    /// [`TimeoutLayer::per_request`]), named so when it expires.
    fn wrap(
        res: Res,
        limits: Limits,
        started: Option<Instant>,
        obs: Option<Arc<Observer>>,
        request_deadline: bool,
    ) -> Self::Response;
}

/// The response is the whole answer: only `attempt` and `total` apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct Whole;

impl crate::sealed::Sealed for Whole {}
impl crate::sealed::Sealed for WholeStream {}
#[cfg(feature = "http")]
impl crate::sealed::Sealed for WholeBody {}

impl<Res> Timed<Res> for Whole {
    type Response = Res;
    #[inline]
    fn wrap(res: Res, _: Limits, _: Option<Instant>, _: Option<Arc<Observer>>, _: bool) -> Res {
        res
    }
}

/// The response is a `Stream` of `Result`s, followed to its end
/// (`Tapped<S, `[`Deadlines`]`>`).
#[derive(Debug, Clone, Copy, Default)]
pub struct WholeStream;

impl<S, T, E> Timed<S> for WholeStream
where
    S: futures_core::Stream<Item = Result<T, E>>,
    E: Into<BoxError>,
{
    type Response = Tapped<S, Deadlines>;
    fn wrap(
        res: S,
        limits: Limits,
        started: Option<Instant>,
        obs: Option<Arc<Observer>>,
        request_deadline: bool,
    ) -> Tapped<S, Deadlines> {
        let started = started.unwrap_or_else(Instant::now);
        Tapped::new(res, Deadlines::new(limits, started, obs, request_deadline))
    }
}

/// The response is an `http::Response<B>` whose body is followed to its end
/// (`Tapped<B, `[`Deadlines`]`>`, feature `http`).
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct WholeBody;

#[cfg(feature = "http")]
impl<B> Timed<http::Response<B>> for WholeBody
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Tapped<B, Deadlines>>;
    fn wrap(
        res: http::Response<B>,
        limits: Limits,
        started: Option<Instant>,
        obs: Option<Arc<Observer>>,
        request_deadline: bool,
    ) -> Self::Response {
        let started = started.unwrap_or_else(Instant::now);
        res.map(|b| Tapped::body(b, Deadlines::new(limits, started, obs, request_deadline)))
    }
}

/// The caller's own limit for one request, tighter than the layer's
/// `total` when it is sooner: gRPC's `grpc-timeout` header
/// ([`GrpcTimeout`](crate::grpc::GrpcTimeout), feature `grpc`), a deadline
/// the caller put in the request. Any `Fn(&Req) -> Option<Duration>` is one.
///
/// ```
/// use semaforo::timeout::Timeout;
/// use std::time::Duration;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), semaforo::BoxError> {
/// let timeout = Timeout::builder().total(Duration::from_secs(30)).build()?;
/// // The request is the caller's budget in ms.
/// let svc = ServiceBuilder::new()
///     .layer(timeout.layer().per_request(|ms: &u64| Some(Duration::from_millis(*ms))))
///     .service(service_fn(|_: u64| async {
///         tokio::time::sleep(Duration::from_secs(5)).await;
///         Ok::<_, std::io::Error>("done")
///     }));
/// let t0 = tokio::time::Instant::now();
/// assert!(svc.oneshot(1_500).await.is_err());
/// assert_eq!(t0.elapsed(), Duration::from_millis(1_500));
/// # Ok(()) }
/// ```
pub trait RequestLimit<Req> {
    /// This request's own limit from the call to its end, if it has one.
    fn limit(&self, req: &Req) -> Option<Duration>;
}

/// No request sets its own limit (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRequestLimit;

impl<Req> RequestLimit<Req> for NoRequestLimit {
    #[inline]
    fn limit(&self, _req: &Req) -> Option<Duration> {
        None
    }
}

impl<Req, F: Fn(&Req) -> Option<Duration>> RequestLimit<Req> for F {
    #[inline]
    fn limit(&self, req: &Req) -> Option<Duration> {
        self(req)
    }
}

/// The tower [`Layer`] of a [`Timeout`](super::Timeout).
#[must_use = "a layer does nothing until it wraps a service"]
pub struct TimeoutLayer<M = Whole, D = NoRequestLimit> {
    limits: Limits,
    obs: Option<Arc<Observer>>,
    per_request: D,
    _mode: PhantomData<fn() -> M>,
}

impl<M, D: Clone> Clone for TimeoutLayer<M, D> {
    fn clone(&self) -> Self {
        TimeoutLayer {
            limits: self.limits,
            obs: self.obs.clone(),
            per_request: self.per_request.clone(),
            _mode: PhantomData,
        }
    }
}

impl<M, D> fmt::Debug for TimeoutLayer<M, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutLayer")
            .field("limits", &self.limits)
            .field("name", &self.obs.as_ref().and_then(|o| o.name.clone()))
            .finish()
    }
}

impl<M> TimeoutLayer<M> {
    pub(crate) fn new(limits: Limits, obs: Option<Arc<Observer>>) -> Self {
        TimeoutLayer {
            limits,
            obs,
            per_request: NoRequestLimit,
            _mode: PhantomData,
        }
    }
}

impl<M, D> TimeoutLayer<M, D> {
    fn with<M2, D2>(self, per_request: impl FnOnce(D) -> D2) -> TimeoutLayer<M2, D2> {
        TimeoutLayer {
            limits: self.limits,
            obs: self.obs,
            per_request: per_request(self.per_request),
            _mode: PhantomData,
        }
    }

    /// Follow a `Stream` response to its end (first-chunk, idle and total limits).
    pub fn until_stream_end(self) -> TimeoutLayer<WholeStream, D> {
        self.with(|d| d)
    }

    /// Follow an `http::Response` body to its end (feature `http`).
    #[cfg(feature = "http")]
    pub fn until_body_end(self) -> TimeoutLayer<WholeBody, D> {
        self.with(|d| d)
    }

    /// Lets each request tighten `total` with its own limit (see
    /// [`RequestLimit`]): the call ends at the sooner of the two, with a
    /// `Timeout` refusal that says "request deadline".
    pub fn per_request<D2>(self, limit: D2) -> TimeoutLayer<M, D2> {
        self.with(|_| limit)
    }
}

impl<S, M, D: Clone> Layer<S> for TimeoutLayer<M, D> {
    type Service = TimeoutService<S, M, D>;

    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService {
            inner,
            limits: Packed::of(self.limits),
            obs: self.obs.clone(),
            per_request: self.per_request.clone(),
            _mode: PhantomData,
        }
    }
}

/// The service of a [`TimeoutLayer`].
pub struct TimeoutService<S, M = Whole, D = NoRequestLimit> {
    inner: S,
    limits: Packed,
    obs: Option<Arc<Observer>>,
    per_request: D,
    _mode: PhantomData<fn() -> M>,
}

impl<S: Clone, M, D: Clone> Clone for TimeoutService<S, M, D> {
    fn clone(&self) -> Self {
        TimeoutService {
            inner: self.inner.clone(),
            limits: self.limits,
            obs: self.obs.clone(),
            per_request: self.per_request.clone(),
            _mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, M, D> fmt::Debug for TimeoutService<S, M, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutService")
            .field("inner", &self.inner)
            .field("limits", &self.limits.limits())
            .finish()
    }
}

impl<S, M, D, Req> Service<Req> for TimeoutService<S, M, D>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    M: Timed<S::Response>,
    D: RequestLimit<Req>,
{
    type Response = M::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let mut limits = self.limits;
        let own = self
            .per_request
            .limit(&req)
            .is_some_and(|own| limits.tighten_total(Packed::nanos(Some(own))));
        ResponseFuture {
            fut: Some(self.inner.call(req)),
            sleep: None,
            limits,
            started: None,
            obs: self.obs.clone(),
            request_deadline: own,
            _mode: PhantomData,
        }
    }
}

/// The response future of [`TimeoutService`]. Once it has answered (the
/// response, or the timeout), the inner future is dropped — with whatever
/// it holds — and a later poll answers an error.
#[pin_project]
pub struct ResponseFuture<F, M> {
    /// `None` once answered.
    #[pin]
    fut: Option<F>,
    /// Armed at the first `Pending`: a call that answers at once reads no clock
    /// and registers no timer (the limit counts from that first poll).
    sleep: Option<Pin<Box<Sleep>>>,
    /// Packed: every layer above copies this future.
    limits: Packed,
    started: Option<Instant>,
    obs: Option<Arc<Observer>>,
    /// `total` is the request's own limit (named "request deadline").
    request_deadline: bool,
    _mode: PhantomData<fn() -> M>,
}

impl<F, M> fmt::Debug for ResponseFuture<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("timeout::ResponseFuture")
            .finish_non_exhaustive()
    }
}

impl<F, M, T, E> Future for ResponseFuture<F, M>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    M: Timed<T>,
{
    type Output = Result<M::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // Answered: polled again, an error (the timeout is not reported twice).
        let Some(fut) = this.fut.as_mut().as_pin_mut() else {
            return Poll::Ready(Err(crate::error::polled_after_done("timeout")));
        };
        if let Poll::Ready(result) = fut.poll(cx) {
            this.fut.set(None);
            return Poll::Ready(match result {
                Ok(res) => Ok(M::wrap(
                    res,
                    this.limits.limits(),
                    *this.started,
                    this.obs.clone(),
                    *this.request_deadline,
                )),
                Err(e) => Err(e.into()),
            });
        }
        let started = *this.started.get_or_insert_with(Instant::now);
        let until_response = this.limits.until_response();
        if this.sleep.is_none() {
            *this.sleep = until_response.map(|(d, _)| Box::pin(crate::time::sleep_for(started, d)));
        }
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                let (d, which) = match until_response {
                    Some((d, false)) => (d, "attempt"),
                    Some((d, true)) if *this.request_deadline => (d, "request deadline"),
                    Some((d, true)) => (d, "total"),
                    None => (Duration::ZERO, "attempt"),
                };
                let r = Rejected::new("timeout", RejectKind::Timeout)
                    .with_name_opt(this.obs.as_ref().and_then(|o| o.name.as_ref()))
                    .with_detail(format!("{which} {}", crate::time::Human(d)));
                super::timed::observe(this.obs.as_deref(), &r);
                // Given up: the inner call goes now, not when the caller
                // lets go of this future.
                this.fut.set(None);
                *this.sleep = None;
                return Poll::Ready(Err(r.into()));
            }
        }
        Poll::Pending
    }
}

crate::inner_access!([S, M, D] TimeoutService<S, M, D>);

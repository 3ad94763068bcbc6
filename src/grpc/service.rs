//! The gRPC layers: which requests may be retried (and their bodies read
//! whole), refusals as statuses, statuses in trailers watched to the end.

use super::body::ReplayBody;
use super::{code_class, header_code, listed, pushback, refusal_status};
use crate::classify::{BodyFailure, Class};
use crate::error::{BoxError, Rejected};
use crate::guard::{Flow, StreamEnd, Tap, Tapped};
use crate::retry::NoRetry;
use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt as _;
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// gRPC's default largest message (4 MiB): the default bound on a body
/// read whole for a retry.
pub const DEFAULT_MAX_BUFFER: usize = 4 * 1024 * 1024;

/// Which gRPC requests may be retried: the listed methods and requests
/// carrying [`Idempotent`](super::Idempotent) (see the
/// [module docs](super)). Their body is read whole, up to
/// [`max_buffer`](Self::max_buffer) bytes (a larger one is sent as it comes,
/// once); every other request gets [`NoRetry`].
///
/// ```
/// use semaforo::grpc::GrpcRequests;
/// let layer = GrpcRequests::new()
///     .method("/grpc.health.v1.Health/Check")
///     .method("/shop.Catalog/GetItem")
///     .max_buffer(1 << 20)
///     .layer();
/// # let _ = layer;
/// ```
#[derive(Debug, Clone)]
pub struct GrpcRequests {
    methods: Vec<Box<str>>,
    max_buffer: usize,
}

impl Default for GrpcRequests {
    fn default() -> Self {
        GrpcRequests::new()
    }
}

impl GrpcRequests {
    /// No method is retried until listed.
    pub fn new() -> Self {
        GrpcRequests {
            methods: Vec::new(),
            max_buffer: DEFAULT_MAX_BUFFER,
        }
    }

    /// Retries `path` (`/package.Service/Method`, the request's URI path).
    pub fn method(mut self, path: impl Into<String>) -> Self {
        self.methods.push(path.into().into_boxed_str());
        self
    }

    /// The largest body read whole for a retry (default 4 MiB); 0 reads
    /// none (nothing is retried).
    pub fn max_buffer(mut self, bytes: usize) -> Self {
        self.max_buffer = bytes;
        self
    }

    /// The layer.
    pub fn layer(&self) -> GrpcRequestsLayer {
        GrpcRequestsLayer {
            methods: Arc::from(self.methods.clone()),
            max_buffer: self.max_buffer,
        }
    }
}

/// The tower [`Layer`] of [`GrpcRequests`].
#[derive(Debug, Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct GrpcRequestsLayer {
    methods: Arc<[Box<str>]>,
    max_buffer: usize,
}

impl<S> Layer<S> for GrpcRequestsLayer {
    type Service = GrpcRequestsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcRequestsService {
            inner,
            methods: self.methods.clone(),
            max_buffer: self.max_buffer,
        }
    }
}

/// The service of a [`GrpcRequestsLayer`]: calls its inner service with an
/// `http::Request<`[`ReplayBody`]`>`.
#[derive(Debug, Clone)]
pub struct GrpcRequestsService<S> {
    inner: S,
    methods: Arc<[Box<str>]>,
    max_buffer: usize,
}

crate::inner_access!([S] GrpcRequestsService<S>);

impl<S, B> Service<http::Request<B>> for GrpcRequestsService<S>
where
    S: Service<http::Request<ReplayBody>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = GrpcRequestsFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let retryable = self.max_buffer > 0 && listed(&self.methods, &req);
        let (mut parts, body) = req.into_parts();
        let body = body.map_err(Into::into).boxed_unsync();
        if !retryable {
            parts.extensions.insert(NoRetry);
            let req = http::Request::from_parts(parts, ReplayBody::stream(None, body));
            return GrpcRequestsFuture {
                state: State::Calling(self.inner.call(req)),
            };
        }
        // The service polled ready goes with the future; a clone stays.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        GrpcRequestsFuture {
            state: State::Reading(Box::new(Reading {
                inner,
                parts: Some(parts),
                body,
                read: BytesMut::new(),
                max: self.max_buffer,
            })),
        }
    }
}

/// A retryable request's body being read whole.
struct Reading<S> {
    inner: S,
    parts: Option<http::request::Parts>,
    body: UnsyncBoxBody<Bytes, BoxError>,
    read: BytesMut,
    max: usize,
}

#[pin_project(project = StateProj)]
enum State<S: Service<http::Request<ReplayBody>>> {
    Reading(Box<Reading<S>>),
    Calling(#[pin] S::Future),
    Done,
}

/// The future of [`GrpcRequestsService`]. Cancel safety: dropping it drops
/// the body being read and the call.
#[pin_project]
pub struct GrpcRequestsFuture<S: Service<http::Request<ReplayBody>>> {
    #[pin]
    state: State<S>,
}

impl<S: Service<http::Request<ReplayBody>>> fmt::Debug for GrpcRequestsFuture<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcRequestsFuture").finish_non_exhaustive()
    }
}

impl<S> Future for GrpcRequestsFuture<S>
where
    S: Service<http::Request<ReplayBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reading(r) => {
                    let body = match ready!(Pin::new(&mut r.body).poll_frame(cx)) {
                        Some(Err(e)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                if r.read.len().saturating_add(data.len()) <= r.max {
                                    r.read.extend_from_slice(&data);
                                    continue;
                                }
                                // Too large to keep: sent as it comes, once.
                                let mut head = std::mem::take(&mut r.read);
                                head.extend_from_slice(&data);
                                let rest = std::mem::replace(
                                    &mut r.body,
                                    http_body_util::Empty::new()
                                        .map_err(|e| match e {})
                                        .boxed_unsync(),
                                );
                                Some((ReplayBody::stream(Some(head.freeze()), rest), false))
                            } else {
                                // Trailers in a request: gRPC sends none.
                                continue;
                            }
                        }
                        None => Some((
                            ReplayBody::whole(std::mem::take(&mut r.read).freeze()),
                            true,
                        )),
                    };
                    let Some((body, replayable)) = body else {
                        continue;
                    };
                    let Some(mut parts) = r.parts.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(crate::error::polled_after_done("grpc")));
                    };
                    if !replayable {
                        parts.extensions.insert(NoRetry);
                    }
                    let fut = r.inner.call(http::Request::from_parts(parts, body));
                    this.state.set(State::Calling(fut));
                }
                StateProj::Calling(fut) => {
                    let out = ready!(fut.poll(cx)).map_err(Into::into);
                    this.state.set(State::Done);
                    return Poll::Ready(out);
                }
                StateProj::Done => {
                    return Poll::Ready(Err(crate::error::polled_after_done("grpc")));
                }
            }
        }
    }
}

/// Answers a refusal (a [`Rejected`] anywhere in the error's chain) with a
/// trailers-only gRPC status ([`refusal_status`]: code and pushback), any
/// other error with `tonic::Status::from_error` (a `Status` in the chain,
/// else `UNKNOWN`), and boxes every answer's body as `tonic::body::Body`:
/// the outermost layer of a server stack (what tonic's `Server::layer`
/// takes) or of a client stack (tonic then returns the status).
#[derive(Debug, Clone, Copy, Default)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct RefusalLayer;

impl RefusalLayer {
    /// The layer.
    pub fn new() -> Self {
        RefusalLayer
    }
}

impl<S> Layer<S> for RefusalLayer {
    type Service = RefusalService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RefusalService { inner }
    }
}

/// The service of a [`RefusalLayer`].
#[derive(Debug, Clone)]
pub struct RefusalService<S> {
    inner: S,
}

crate::inner_access!([S] RefusalService<S>);

impl<S, Req, B> Service<Req> for RefusalService<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = RefusalFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        RefusalFuture {
            fut: self.inner.call(req),
        }
    }
}

/// The future of [`RefusalService`].
#[pin_project]
pub struct RefusalFuture<F> {
    #[pin]
    fut: F,
}

impl<F> fmt::Debug for RefusalFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefusalFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for RefusalFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<tonic::body::Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match ready!(self.project().fut.poll(cx)) {
            Ok(res) => res.map(tonic::body::Body::new),
            Err(e) => {
                let e: BoxError = e.into();
                match Rejected::find(e.as_ref()) {
                    Some(r) => refusal_status(r).into_http(),
                    None => tonic::Status::from_error(e).into_http(),
                }
            }
        }))
    }
}

/// The bottom of a gRPC client stack, right above the channel: sends each
/// request with tonic's body (a [`ReplayBody`] that [`GrpcRequests`] read
/// becomes one again), boxes the channel's errors (for the classifiers
/// above), and watches each answer's body for a gRPC status in its
/// trailers, leaving a failure's class in a [`BodyFailure`] (in the
/// response's extensions) for the layers that record at the body's end
/// (`breaker.layer().record_on_body_end()`); a body that ends without any
/// status (the stream was cut) is a `Transient` failure.
#[derive(Debug, Clone, Copy, Default)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct StatusWatchLayer;

impl StatusWatchLayer {
    /// The layer.
    pub fn new() -> Self {
        StatusWatchLayer
    }
}

impl<S> Layer<S> for StatusWatchLayer {
    type Service = StatusWatch<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StatusWatch { inner }
    }
}

/// The service of a [`StatusWatchLayer`].
#[derive(Debug, Clone)]
pub struct StatusWatch<S> {
    inner: S,
}

crate::inner_access!([S] StatusWatch<S>);

impl<S, Req, B> Service<http::Request<Req>> for StatusWatch<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    Req: Into<tonic::body::Body>,
    B: Body,
{
    type Response = http::Response<Tapped<B, TrailersTap>>;
    type Error = BoxError;
    type Future = StatusWatchFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Req>) -> Self::Future {
        StatusWatchFuture {
            fut: self.inner.call(req.map(Into::into)),
        }
    }
}

/// The future of [`StatusWatch`].
#[pin_project]
pub struct StatusWatchFuture<F> {
    #[pin]
    fut: F,
}

impl<F> fmt::Debug for StatusWatchFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusWatchFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for StatusWatchFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
    B: Body,
{
    type Output = Result<http::Response<Tapped<B, TrailersTap>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut res = ready!(self.project().fut.poll(cx)).map_err(Into::into)?;
        let failure = BodyFailure::new();
        res.extensions_mut().insert(failure.clone());
        // A trailers-only answer said its status in the head.
        let seen = header_code(res.headers()).is_some() || res.status() != http::StatusCode::OK;
        Poll::Ready(Ok(
            res.map(|b| Tapped::body(b, TrailersTap { failure, seen }))
        ))
    }
}

/// The [`Tap`] of [`StatusWatch`]: reads `grpc-status` and the pushback in
/// the trailers.
#[derive(Debug)]
pub struct TrailersTap {
    failure: BodyFailure,
    seen: bool,
}

impl<D, E> Tap<http_body::Frame<D>, E> for TrailersTap {
    type Error = E;

    fn item(&mut self, frame: &http_body::Frame<D>) -> Flow {
        // Trailers are the last frame: judged here, not at the end, which a
        // client that stops reading after them (tonic) reports as a drop.
        // Trailers without `grpc-status` are a success, as tonic reads them.
        if let Some(t) = frame.trailers_ref() {
            self.seen = true;
            if let Some(code) = header_code(t) {
                let class = code_class(code, pushback(t));
                if !class.is_success() {
                    self.failure.set(class);
                }
            }
        }
        Flow::Continue
    }

    fn error(&mut self, error: E) -> E {
        error
    }

    fn end(self, end: StreamEnd) {
        if end == StreamEnd::Completed && !self.seen {
            self.failure.set(Class::Transient);
        }
    }
}

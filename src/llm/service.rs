//! The preset's tower pieces: [`LlmLayer`] / [`LlmService`] / [`LlmFuture`]
//! for whole answers, [`LlmStreamLayer`] / [`LlmStreamService`] /
//! [`LlmStreamFuture`] / [`LlmStreamBody`] for streamed ones. Named types over
//! the stack of layers inside (no boxing): the stack is an implementation
//! detail, free to change without breaking a user's code.

use super::cost::usage_reported;
use super::prompt::{Asked, Prompt, TokenEstimator};
use super::PriceTable;
use super::{usage_cost, LlmStack, SseScan, SseWatch};
use crate::breaker::{BreakerOutcome, BreakerService};
use crate::bulkhead::{BulkheadPermit, BulkheadService, InfoFns};
use crate::classify::{LlmClassifier, LlmHeadClassifier, RateLimitInfo};
use crate::error::BoxError;
use crate::guard::{OnBodyEnd, OnResponse, Tapped};
use crate::hashing::HashMap;
use crate::pace::{Cost, KeyedPaceService, Observed, Reconcile, UsageFromBody};
use crate::quota::{HeaderKey, QuotaService, UnitCost};
use crate::retry::{HttpRequests, RetryService};
use crate::shutdown::{CutAtDeadline, DrainCut, ShutdownService};
use crate::timeout::{Deadlines, TimeoutService, Whole, WholeBody};
use bytes::Bytes;
use pin_project::pin_project;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;
use tower_layer::Layer;
use tower_service::Service;

/// Rate-limit headers only (for streamed answers: the usage comes in the body).
pub fn observe_headers<B>(res: &http::Response<B>) -> Observed {
    let info = RateLimitInfo::from_headers_with(res.headers(), SystemTime::now);
    Observed {
        usage: None,
        info: (!info.is_empty()).then_some(info),
    }
}

/// [`observe_headers`] for any body type (the streaming preset's).
#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveHeaders;

impl<B> crate::pace::Observe<http::Response<B>> for ObserveHeaders {
    fn observe(&self, res: &http::Response<B>) -> Observed {
        observe_headers(res)
    }
}

/// The real cost ([`usage_cost`] of a successful answer's body) and the
/// rate-limit headers of a response.
pub fn observe_response(res: &http::Response<Bytes>) -> Observed {
    let usage = res
        .status()
        .is_success()
        .then(|| usage_cost(res.body()))
        .flatten();
    let info = RateLimitInfo::from_headers_with(res.headers(), SystemTime::now);
    Observed {
        usage,
        info: (!info.is_empty()).then_some(info),
    }
}

/// The output a request without a maximum reserves, and its cap (see
/// [`LlmStackBuilder::model`](super::LlmStackBuilder::model)).
#[derive(Debug, Clone, Copy)]
pub(super) struct Unset {
    pub(super) max_output: u64,
    pub(super) cap: u64,
}

/// The preset's estimate of a request, for a pacer of your own around an
/// [`LlmService`] (see [`LlmStack::estimate`]): its input tokens from the
/// stack's estimator, its output from its model's profile (`max_tokens`, or
/// the profile's largest output when unset), its spend at its model's
/// price. Inside the preset the prompt is read once per call; around it,
/// once more.
#[derive(Debug, Clone)]
pub struct Estimate {
    pub(super) default: Unset,
    pub(super) models: Arc<HashMap<String, Unset>>,
    pub(super) estimator: Arc<dyn TokenEstimator>,
    pub(super) prices: Arc<PriceTable>,
}

/// The preset's name for it.
pub(super) type Weigh = Estimate;

impl Estimate {
    /// The [`Asked`] of a call: the prompt read once.
    pub(super) fn ask(&self, req: &http::Request<Bytes>) -> Asked {
        let prompt = Prompt::read_request(req);
        Asked {
            price: self.prices.for_model(prompt.model()),
            prompt,
            estimator: self.estimator.clone(),
        }
    }

    fn unset(&self, model: Option<&str>) -> Unset {
        model
            .and_then(|m| self.models.get(m))
            .copied()
            .unwrap_or(self.default)
    }
}

impl crate::pace::Weigh<http::Request<Bytes>> for Estimate {
    #[inline]
    fn weigh(&self, req: &http::Request<Bytes>) -> Cost {
        let cost = |a: &Asked| {
            let u = self.unset(a.prompt.model());
            a.priced(a.prompt.cost(&*self.estimator, u.max_output, u.cap))
        };
        match req.extensions().get::<Asked>() {
            Some(a) => cost(a),
            // Not through the preset's outer service (parts used alone).
            None => cost(&self.ask(req)),
        }
    }
}

/// The preset's pacer key: the request's `model` (read once, in [`Asked`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct AskedModel;

impl crate::pace::PaceKey<http::Request<Bytes>> for AskedModel {
    #[inline]
    fn key<'a>(&self, req: &'a http::Request<Bytes>) -> Option<Cow<'a, str>> {
        match req.extensions().get::<Asked>() {
            Some(a) => a.prompt.model().map(Cow::Borrowed),
            None => super::ModelField::read(req.body()),
        }
    }
}

/// The preset's reading of a whole answer, for a pacer of your own around
/// an [`LlmService`] (a per-user spend budget, see [`LlmStack::estimate`]):
/// the rate-limit headers and the real usage ([`observe_response`]), priced
/// at the model's price (the spend [`Limit::spend_per_day`](crate::pace::Limit::spend_per_day)
/// counts). The preset's own pacer also teaches its estimator here.
#[derive(Debug, Clone, Copy, Default)]
pub struct PricedUsage;

impl crate::pace::Observe<http::Response<Bytes>> for PricedUsage {
    fn observe(&self, res: &http::Response<Bytes>) -> Observed {
        let Some(asked) = res.extensions().get::<Asked>() else {
            return observe_response(res);
        };
        let reported = res
            .status()
            .is_success()
            .then(|| usage_reported(res.body()))
            .flatten();
        let usage = reported.map(|(usage, input_known)| {
            if input_known {
                asked.learn(&usage);
            }
            asked.priced(usage)
        });
        let info = RateLimitInfo::from_headers_with(res.headers(), SystemTime::now);
        Observed {
            usage,
            info: (!info.is_empty()).then_some(info),
        }
    }
}

/// The innermost piece of the preset: copies the request's [`Asked`] to the
/// response (where the usage is read). A request without one passes as is.
#[derive(Debug, Clone)]
pub(super) struct Stamp<S> {
    inner: S,
}

impl<S> Stamp<S> {
    pub(super) fn new(inner: S) -> Self {
        Stamp { inner }
    }
}

impl<S, B> Service<http::Request<Bytes>> for Stamp<S>
where
    S: Service<http::Request<Bytes>, Response = http::Response<B>>,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = StampFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: http::Request<Bytes>) -> Self::Future {
        // Without the body: the response may live long (a stream).
        let asked = req.extensions().get::<Asked>().map(Asked::light);
        StampFuture {
            fut: self.inner.call(req),
            asked,
        }
    }
}

/// The future of [`Stamp`].
#[pin_project]
#[derive(Debug)]
pub(super) struct StampFuture<F> {
    #[pin]
    fut: F,
    asked: Option<Asked>,
}

impl<F, B, E> Future for StampFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<B>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = std::task::ready!(this.fut.poll(cx))?;
        if let Some(a) = this.asked.take() {
            res.extensions_mut().insert(a);
        }
        Poll::Ready(Ok(res))
    }
}

/// The preset as one tower [`Layer`]: see [`LlmStack::layer`].
#[derive(Debug, Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct LlmLayer {
    pub(super) stack: LlmStack,
}

/// The preset's cache layer (see [`LlmStackBuilder::cache`](super::LlmStackBuilder::cache)).
pub(super) type LlmCacheLayer = crate::cache::CacheLayer<
    super::LlmKey,
    http::Request<Bytes>,
    super::LlmRequestKey,
    std::sync::Arc<crate::share::KeptResponse>,
    crate::share::WholeResponse,
    LlmClassifier,
>;

/// The preset's coalescing layer.
pub(super) type LlmCoalesceLayer = crate::coalesce::CoalesceLayer<
    super::LlmKey,
    http::Request<Bytes>,
    crate::share::WholeResponse,
>;

/// The preset's shared cache tier layer.
pub(super) type LlmTierLayer =
    crate::cache::TierLayer<super::LlmKey, crate::share::WholeResponse, LlmClassifier>;

/// The preset's fallback to the cache's stale answers (a `None` source
/// without `stale_if_error`).
pub(super) type LlmFallbackLayer = crate::fallback::FallbackLayer<
    Option<LlmStale>,
    crate::fallback::StaleIfError,
    LlmClassifier,
    crate::fallback::MarkHttp,
>;

/// The stale-answer source of [`LlmFallbackLayer`].
pub(super) type LlmStale = crate::fallback::Stale<
    super::LlmKey,
    super::LlmRequestKey,
    std::sync::Arc<crate::share::KeptResponse>,
    crate::share::WholeResponse,
>;

/// The cache, coalescing and shared-tier layers around a stack.
type Shared<S> = crate::cache::CacheService<
    crate::coalesce::CoalesceService<
        crate::cache::TierService<S, super::LlmKey, crate::share::WholeResponse, LlmClassifier>,
        super::LlmKey,
        http::Request<Bytes>,
        crate::share::WholeResponse,
    >,
    super::LlmKey,
    http::Request<Bytes>,
    super::LlmRequestKey,
    std::sync::Arc<crate::share::KeptResponse>,
    crate::share::WholeResponse,
    LlmClassifier,
>;

/// The stack inside [`LlmService`].
type Inner<S> = ShutdownService<
    crate::fallback::Fallback<
        Shared<
            QuotaService<
                BulkheadService<
                    RetryService<
                        BreakerService<
                            KeyedPaceService<
                                TimeoutService<Stamp<S>, Whole>,
                                AskedModel,
                                Weigh,
                                PricedUsage,
                                LlmClassifier,
                            >,
                            LlmClassifier,
                            OnResponse,
                        >,
                        LlmClassifier,
                        HttpRequests,
                    >,
                    InfoFns<http::Request<Bytes>>,
                    OnResponse,
                    LlmClassifier,
                >,
                String,
                HeaderKey,
                UnitCost,
            >,
        >,
        Option<LlmStale>,
        crate::fallback::StaleIfError,
        LlmClassifier,
        crate::fallback::MarkHttp,
    >,
    OnResponse,
>;

/// The service [`LlmLayer`] makes around an HTTP client `S` answering
/// `http::Response<Bytes>`: takes an `http::Request<Bytes>`, answers an
/// `http::Response<Bytes>` or a [`BoxError`] (a [`Rejected`](crate::Rejected)
/// when a layer refused the call).
///
/// To keep one in a struct, name it (`LlmService<MyClient>`), or box it
/// when the client's type is unnameable (a closure): tower's
/// `BoxCloneSyncService` gives one type for any stack, ours or not (one
/// allocation per call):
///
/// ```
/// use bytes::Bytes;
/// use semaforo::llm::{LlmStack, Tier};
/// use tower::util::BoxCloneSyncService;
/// use tower::{service_fn, Layer};
///
/// type Llm = BoxCloneSyncService<http::Request<Bytes>, http::Response<Bytes>, semaforo::BoxError>;
///
/// struct AppState {
///     llm: Llm,
/// }
///
/// # fn main() -> Result<(), semaforo::BoxError> {
/// let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 }).build()?;
/// let client = service_fn(|_req: http::Request<Bytes>| async {
///     Ok::<_, std::io::Error>(http::Response::new(Bytes::new()))
/// });
/// let state = AppState { llm: BoxCloneSyncService::new(stack.layer().layer(client)) };
/// # let _ = state.llm;
/// # Ok(()) }
/// ```
pub struct LlmService<S> {
    inner: Inner<S>,
    weigh: Weigh,
}

impl<S: Clone> Clone for LlmService<S> {
    fn clone(&self) -> Self {
        LlmService {
            inner: self.inner.clone(),
            weigh: self.weigh.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for LlmService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmService")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S> Service<http::Request<Bytes>> for LlmService<S>
where
    S: Service<http::Request<Bytes>, Response = http::Response<Bytes>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Bytes>;
    type Error = BoxError;
    type Future = LlmFuture<S>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: http::Request<Bytes>) -> Self::Future {
        let asked = self.weigh.ask(&req);
        req.extensions_mut().insert(asked);
        LlmFuture {
            inner: self.inner.call(req),
        }
    }
}

/// The response future of [`LlmService`]. Dropping it at any point
/// releases what the call holds (its place in a line, its permit); a call
/// dropped once its request was sent keeps its estimated cost, spend
/// included (the upstream may have done the work), as the pacer's
/// [`ResponseFuture`](crate::pace::ResponseFuture) says.
#[pin_project]
pub struct LlmFuture<S>
where
    S: Service<http::Request<Bytes>, Response = http::Response<Bytes>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    #[pin]
    inner: <Inner<S> as Service<http::Request<Bytes>>>::Future,
}

impl<S> Future for LlmFuture<S>
where
    S: Service<http::Request<Bytes>, Response = http::Response<Bytes>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Output = Result<http::Response<Bytes>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl<S> fmt::Debug for LlmFuture<S>
where
    S: Service<http::Request<Bytes>, Response = http::Response<Bytes>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmFuture").finish_non_exhaustive()
    }
}

impl<S: Clone> Layer<S> for LlmLayer {
    type Service = LlmService<S>;

    fn layer(&self, client: S) -> Self::Service {
        let s = &self.stack;
        let timed = s.timeout.layer().layer(Stamp::new(client));
        let paced = s
            .pace
            .layer()
            .key(AskedModel)
            .weigh(s.weigh.clone())
            .observe(PricedUsage)
            .classify(LlmClassifier::new())
            .layer(timed);
        let guarded = s
            .breaker
            .layer()
            .classify(LlmClassifier::new())
            .layer(paced);
        let retried = s
            .retry
            .layer()
            .classify(LlmClassifier::new())
            .requests(HttpRequests::default().allow_non_idempotent())
            .layer(guarded);
        // An adaptive limit reads each call's class as the breaker does.
        let limited = s
            .bulkhead
            .layer()
            .from_extensions()
            .classify(LlmClassifier::new())
            .layer(retried);
        // shutdown → fallback → cache → coalesce → shared tier → quota: a
        // cached or coalesced answer costs no quota and waits in no line; a
        // fallback answer is never cached.
        let shared = s.cache.layer(
            s.coalesce
                .layer(s.tier.layer(s.quota_layer().layer(limited))),
        );
        LlmService {
            inner: s.shutdown.layer().layer(s.fallback.layer(shared)),
            weigh: s.weigh.clone(),
        }
    }
}

/// The streaming preset as one tower [`Layer`]: see [`LlmStack::stream_layer`].
#[derive(Debug, Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct LlmStreamLayer {
    pub(super) stack: LlmStack,
}

/// The stack inside [`LlmStreamService`].
type StreamInner<S> = ShutdownService<
    QuotaService<
        BulkheadService<
            RetryService<
                BreakerService<
                    KeyedPaceService<
                        TimeoutService<SseWatch<Stamp<S>>, WholeBody>,
                        AskedModel,
                        Weigh,
                        ObserveHeaders,
                        LlmHeadClassifier,
                        UsageFromBody,
                    >,
                    LlmHeadClassifier,
                    OnBodyEnd,
                >,
                LlmHeadClassifier,
                HttpRequests,
            >,
            InfoFns<http::Request<Bytes>>,
            OnBodyEnd,
            LlmHeadClassifier,
        >,
        String,
        HeaderKey,
        UnitCost,
    >,
    CutAtDeadline,
>;

/// The body inside [`LlmStreamBody`], innermost first: the SSE watch, the
/// chunk timeouts, the pacer's reconciliation, the breaker's verdict, the
/// bulkhead's permit, the shutdown's in-flight count (which ends the stream
/// with an SSE error event at the drain deadline).
type StreamInnerBody<B> = Tapped<
    Tapped<
        Tapped<Tapped<Tapped<Tapped<B, SseScan>, Deadlines>, Option<Reconcile>>, BreakerOutcome>,
        BulkheadPermit,
    >,
    DrainCut,
>;

/// The service [`LlmStreamLayer`] makes around an HTTP client `S` answering
/// `http::Response<B>` with a streamed body `B` (any `http_body::Body<Data =
/// Bytes>` whose error converts into a [`BoxError`]). It answers
/// `http::Response<LlmStreamBody<B>>`.
pub struct LlmStreamService<S> {
    inner: StreamInner<S>,
    weigh: Weigh,
}

impl<S: Clone> Clone for LlmStreamService<S> {
    fn clone(&self) -> Self {
        LlmStreamService {
            inner: self.inner.clone(),
            weigh: self.weigh.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for LlmStreamService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmStreamService")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, B> Service<http::Request<Bytes>> for LlmStreamService<S>
where
    S: Service<http::Request<Bytes>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<LlmStreamBody<B>>;
    type Error = BoxError;
    type Future = LlmStreamFuture<S, B>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: http::Request<Bytes>) -> Self::Future {
        let asked = self.weigh.ask(&req);
        req.extensions_mut().insert(asked);
        LlmStreamFuture {
            inner: self.inner.call(req),
        }
    }
}

/// The response future of [`LlmStreamService`].
#[pin_project]
pub struct LlmStreamFuture<S, B>
where
    S: Service<http::Request<Bytes>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    #[pin]
    inner: <StreamInner<S> as Service<http::Request<Bytes>>>::Future,
}

impl<S, B> Future for LlmStreamFuture<S, B>
where
    S: Service<http::Request<Bytes>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<LlmStreamBody<B>>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .inner
            .poll(cx)
            .map_ok(|res| res.map(|inner| LlmStreamBody { inner }))
    }
}

impl<S, B> fmt::Debug for LlmStreamFuture<S, B>
where
    S: Service<http::Request<Bytes>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmStreamFuture").finish_non_exhaustive()
    }
}

/// The body of a streamed answer through [`LlmStreamService`]: the client's
/// body `B`, frame for frame, holding the bulkhead permit, the breaker's
/// verdict and the shutdown's in-flight count until its end (the last frame,
/// an error, or a drop), bounded by the first-chunk and idle timeouts, and
/// ending with a [`StreamFailed`](super::StreamFailed) error when the stream
/// reports a failure.
#[pin_project]
pub struct LlmStreamBody<B> {
    #[pin]
    inner: StreamInnerBody<B>,
}

impl<B> fmt::Debug for LlmStreamBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmStreamBody").finish_non_exhaustive()
    }
}

impl<B> http_body::Body for LlmStreamBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S: Clone> Layer<S> for LlmStreamLayer {
    type Service = LlmStreamService<S>;

    fn layer(&self, client: S) -> Self::Service {
        let s = &self.stack;
        let timed = s
            .stream_timeout
            .layer()
            .until_body_end()
            .layer(SseWatch::new(Stamp::new(client)));
        let paced = s
            .pace
            .layer()
            .key(AskedModel)
            .weigh(s.weigh.clone())
            .observe(ObserveHeaders)
            .classify(LlmHeadClassifier)
            .deliver(UsageFromBody)
            .layer(timed);
        let guarded = s
            .breaker
            .layer()
            .classify(LlmHeadClassifier)
            .record_on_body_end()
            .layer(paced);
        let retried = s
            .retry
            .layer()
            .classify(LlmHeadClassifier)
            .requests(HttpRequests::default().allow_non_idempotent())
            .layer(guarded);
        // An adaptive limit samples a stream's head: its time to first byte.
        let limited = s
            .bulkhead
            .layer()
            .from_extensions()
            .release_on_body_end()
            .classify(LlmHeadClassifier)
            .layer(retried);
        LlmStreamService {
            inner: s
                .shutdown
                .layer()
                .cut_bodies_at_deadline()
                .layer(s.quota_layer().layer(limited)),
            weigh: s.weigh.clone(),
        }
    }
}

//! Fallback: answer from somewhere else when the inner result has chosen
//! classes.
//!
//! When the upstream is down, a breaker's refusal keeps the caller fast, but
//! it is still a refusal. A [`FallbackLayer`] turns it into a degraded answer:
//! another service, a closure, a fixed value, or the last good answer for the
//! same request (the cache's stale-if-error retention, through its shared
//! [`Cache`](crate::cache::Cache) handle).
//!
//! - **When** ([`When`]): by default on an `Overloaded` or `Infrastructure`
//!   class, and on our own `CircuitOpen`, `QueueFull` and `BudgetExceeded`
//!   refusals — never on a `Permanent` class (a bad request stays a bad
//!   request; so is a `BudgetExceeded` without a `retry_after`, a cost above
//!   the budget's burst that no wait makes fit) and never on a quota's
//!   verdict on the caller (`QuotaExceeded`, `Throttled`). The inner result is classified by the layer's
//!   [`Classify`] (an `http::Response` with status 529 is a failure under
//!   [`HttpClassifier`](crate::classify::HttpClassifier) though it is `Ok`).
//!   `.when(f)` replaces the rule.
//! - **From where** ([`Source`]): [`value`], [`from_fn`], [`service`],
//!   [`stale`] (feature `cache`).
//! - **Marked**: the caller can tell a fallback answer from a real one.
//!   [`MarkHttp`] inserts a [`FellBack`] extension into an `http::Response`
//!   (a stale answer also keeps its
//!   [`Served::Cache { stale: true, .. }`](crate::share::Served)); for other
//!   response types `.mark(|res: &mut T, f: &FellBack| …)`.
//! - **Never counted as a success**: the layer sits outside the cache, the
//!   breaker and the pacer (see the [layer order](crate#layer-order)); they
//!   saw the failure, not the fallback answer, so it is never cached nor
//!   counted. Metrics and listeners get [`EventKind::Fallback`].
//! - **A fallback that fails** returns the original result (error or failed
//!   response), unchanged.
//! - **Types**: the service answers the inner service's response type, and
//!   errors as [`BoxError`] (the tower convention); a [`Rejected`] or an
//!   inner error stays findable in it (`Rejected::find`, `downcast_ref`).
//! - **With a retry inside** (the LLM preset), the failure reaches the
//!   fallback once the retry gives up: after its attempts, or at once when
//!   the wait asked for is above its ceiling.
//!
//! Cancel safety: dropping the future drops the inner call or the fallback
//! call it is waiting for; nothing is kept.
//!
//! ```
//! use semaforo::fallback::{self, FallbackLayer};
//! use semaforo::{Rejected, RejectKind};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // An upstream behind an open breaker.
//! let upstream = service_fn(|_: &'static str| async {
//!     Err::<String, _>(Rejected::new("breaker", RejectKind::CircuitOpen))
//! });
//! let svc = FallbackLayer::new(fallback::value("the upstream is resting".to_string()))
//!     .layer(upstream);
//! assert_eq!(svc.oneshot("hello").await.unwrap(), "the upstream is resting");
//! # }
//! ```

use crate::classify::{Class, Classify, ErrorClassifier};
use crate::error::{BoxError, RejectKind, Rejected};
use crate::observe::{Event, EventKind, ListenerSlot, Observer};
use pin_project::pin_project;
use std::fmt;
use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

mod source;
pub use source::{from_fn, service, value, FromFn, ServiceAnswer, ServiceSource, Value};
#[cfg(feature = "cache")]
pub use source::{stale, Stale};

/// What failed, as a [`When`] rule and a [`Source`] see it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    class: Class,
    rejected: Option<&'a Rejected>,
}

impl<'a> Failure<'a> {
    /// A failure of `class`, with the refusal found in its error (to test a
    /// [`When`] rule of your own).
    pub fn new(class: Class, rejected: Option<&'a Rejected>) -> Self {
        Failure { class, rejected }
    }

    /// The inner result's class.
    pub fn class(&self) -> Class {
        self.class
    }

    /// The semaforo refusal in the error's `source()` chain, if any.
    pub fn rejected(&self) -> Option<&'a Rejected> {
        self.rejected
    }
}

/// Whether a failure is answered by the fallback. Closures
/// `Fn(&Failure) -> bool` are rules.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a fallback rule",
    label = "give a `Fn(&fallback::Failure<'_>) -> bool + Clone + Send + Sync` (through `.when(…)`) or a type implementing `fallback::When`"
)]
pub trait When: Clone + Send + Sync + 'static {
    /// `true`: answer from the fallback.
    fn when(&self, failure: &Failure<'_>) -> bool;
}

impl<F> When for F
where
    F: Fn(&Failure<'_>) -> bool + Clone + Send + Sync + 'static,
{
    fn when(&self, failure: &Failure<'_>) -> bool {
        self(failure)
    }
}

/// The default rule: `Overloaded` and `Infrastructure` classes, and our own
/// `CircuitOpen`, `QueueFull` and `BudgetExceeded` refusals; never a
/// `Permanent` class (a `BudgetExceeded` without a `retry_after` is one:
/// see [`classify_error`](crate::classify::classify_error)).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultWhen;

impl When for DefaultWhen {
    fn when(&self, f: &Failure<'_>) -> bool {
        if matches!(f.class, Class::Permanent { .. } | Class::Success) {
            return false;
        }
        if let Some(r) = f.rejected {
            if r.kind().is_about_the_caller() {
                return false;
            }
            if matches!(
                r.kind(),
                RejectKind::CircuitOpen | RejectKind::QueueFull | RejectKind::BudgetExceeded
            ) {
                return true;
            }
        }
        matches!(f.class, Class::Overloaded { .. } | Class::Infrastructure)
    }
}

/// Stale-if-error's rule (RFC 5861 §4: a stale answer on 500, 502, 503,
/// 504): [`DefaultWhen`] and every `Transient` failure too (a 5xx, a
/// timeout, a stream cut); the LLM preset's
/// [`stale_if_error`](crate::llm::LlmStackBuilder::stale_if_error) uses it.
#[derive(Debug, Clone, Copy, Default)]
pub struct StaleIfError;

impl When for StaleIfError {
    fn when(&self, f: &Failure<'_>) -> bool {
        let about_the_caller = f.rejected.is_some_and(|r| r.kind().is_about_the_caller());
        DefaultWhen.when(f) || (f.class == Class::Transient && !about_the_caller)
    }
}

/// Where a fallback answer comes from.
///
/// [`memo`](Source::memo) runs before the inner call, with the request (a
/// service source clones it, a stale-cache source computes its key and may
/// leave it in the request for the cache inside);
/// [`answer`](Source::answer) runs only after a failure the rule accepts.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot answer a `{Req}` with a `{Res}`",
    label = "the fallback must give the inner service's response type `{Res}` (e.g. `fallback::value(x)` with `x: {Res}`)",
    note = "sources: `fallback::value`, `fallback::from_fn`, `fallback::service` (its `Req` must be `Clone`), `fallback::stale` (its cache's share must give `{Res}`)"
)]
pub trait Source<Req, Res>: Send + Sync + 'static {
    /// What is kept of the request until the inner call ends.
    type Memo;
    /// The fallback call.
    type Future: Future<Output = Result<Res, BoxError>>;

    /// What to keep of `req`; `None`: no fallback for this call.
    fn memo(&self, req: &mut Req) -> Option<Self::Memo>;

    /// The fallback answer for the failure.
    fn answer(&self, memo: Self::Memo, failure: &Failure<'_>) -> Self::Future;
}

/// `None`: no fallback (every call's result passes unchanged).
impl<Req, Res, Src: Source<Req, Res>> Source<Req, Res> for Option<Src> {
    type Memo = Src::Memo;
    type Future = MaybeAnswer<Src::Future>;

    fn memo(&self, req: &mut Req) -> Option<Self::Memo> {
        self.as_ref()?.memo(req)
    }

    fn answer(&self, memo: Self::Memo, failure: &Failure<'_>) -> Self::Future {
        match self {
            Some(s) => MaybeAnswer::Some(s.answer(memo, failure)),
            None => MaybeAnswer::None,
        }
    }
}

/// The answer of an `Option` source: the source's, or (without one) a
/// failed fallback.
#[pin_project(project = MaybeProj)]
#[derive(Debug)]
pub enum MaybeAnswer<F> {
    /// The source's answer.
    Some(#[pin] F),
    /// No source.
    None,
}

impl<F, Res> Future for MaybeAnswer<F>
where
    F: Future<Output = Result<Res, BoxError>>,
{
    type Output = Result<Res, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            MaybeProj::Some(f) => f.poll(cx),
            MaybeProj::None => Poll::Ready(Err("no fallback source".into())),
        }
    }
}

/// How the layer told a fallback answer apart: a [`MarkHttp`] response
/// extension, and what [`Mark`] gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FellBack {
    /// The class of the inner result that was replaced.
    pub class: Class,
}

/// Marks a fallback answer so its caller can tell it from a real one.
/// Closures `Fn(&mut Res, &FellBack)` are marks.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot mark a `{Res}`",
    label = "`MarkHttp` marks `http::Response`s; for `{Res}` use `.mark_fn(|res: &mut {Res}, f| …)` or leave answers unmarked"
)]
pub trait Mark<Res>: Send + Sync + 'static {
    /// Marks `res`.
    fn mark(&self, res: &mut Res, why: &FellBack);
}

impl<Res, F> Mark<Res> for F
where
    F: Fn(&mut Res, &FellBack) + Send + Sync + 'static,
{
    fn mark(&self, res: &mut Res, why: &FellBack) {
        self(res, why)
    }
}

/// A closure marking fallback answers (see [`FallbackLayer::mark_fn`]).
#[derive(Clone)]
pub struct MarkFn<F>(F);

impl<F> fmt::Debug for MarkFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MarkFn")
    }
}

impl<Res, F> Mark<Res> for MarkFn<F>
where
    F: Fn(&mut Res, &FellBack) + Send + Sync + 'static,
{
    fn mark(&self, res: &mut Res, why: &FellBack) {
        (self.0)(res, why)
    }
}

/// Leaves a fallback answer as it is (the default: for response types
/// without a place for a mark, the [`EventKind::Fallback`] event and a
/// value of your own are how to tell).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unmarked;

impl<Res> Mark<Res> for Unmarked {
    fn mark(&self, _: &mut Res, _: &FellBack) {}
}

/// Inserts a [`FellBack`] extension into an `http::Response` (feature
/// `http`).
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MarkHttp;

#[cfg(feature = "http")]
impl<B> Mark<http::Response<B>> for MarkHttp {
    fn mark(&self, res: &mut http::Response<B>, why: &FellBack) {
        res.extensions_mut().insert(*why);
    }
}

/// Answers from a [`Source`] when the inner result has chosen classes (see
/// the [module docs](self)).
#[must_use = "a layer does nothing until it wraps a service"]
pub struct FallbackLayer<Src, W = DefaultWhen, C = ErrorClassifier, M = Unmarked> {
    source: Arc<Src>,
    mark: Arc<M>,
    obs: Observer,
    when: W,
    classify: C,
}

/// What a service and its futures share (one per [`Layer::layer`]).
struct Shared<Src, M> {
    source: Arc<Src>,
    mark: Arc<M>,
    obs: Observer,
}

impl<Src, W: Clone, C: Clone, M> Clone for FallbackLayer<Src, W, C, M> {
    fn clone(&self) -> Self {
        FallbackLayer {
            source: self.source.clone(),
            mark: self.mark.clone(),
            obs: self.obs.clone(),
            when: self.when.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<Src, W: fmt::Debug, C: fmt::Debug, M> fmt::Debug for FallbackLayer<Src, W, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("when", &self.when)
            .field("classify", &self.classify)
            .field("obs", &self.obs)
            .finish_non_exhaustive()
    }
}

impl<Src> FallbackLayer<Src> {
    /// Answers from `source` on the default rule ([`DefaultWhen`]), results
    /// classified by [`ErrorClassifier`], answers unmarked ([`Unmarked`]).
    pub fn new(source: Src) -> Self {
        FallbackLayer {
            source: Arc::new(source),
            mark: Arc::new(Unmarked),
            obs: Observer::default(),
            when: DefaultWhen,
            classify: ErrorClassifier,
        }
    }
}

impl<Src, W, C, M> FallbackLayer<Src, W, C, M> {
    /// Which failures the fallback answers, as a closure (replaces
    /// [`DefaultWhen`]):
    /// `.when(|f| f.class() == Class::Transient || DefaultWhen.when(f))`.
    pub fn when<F>(self, f: F) -> FallbackLayer<Src, F, C, M>
    where
        F: Fn(&Failure<'_>) -> bool + Clone + Send + Sync + 'static,
    {
        self.when_rule(f)
    }

    /// Which failures the fallback answers, as a [`When`] of your own.
    pub fn when_rule<W2: When>(self, when: W2) -> FallbackLayer<Src, W2, C, M> {
        FallbackLayer {
            source: self.source,
            mark: self.mark,
            obs: self.obs,
            when,
            classify: self.classify,
        }
    }

    /// How the inner result is classified (e.g.
    /// [`HttpClassifier`](crate::classify::HttpClassifier), or the LLM
    /// preset's classifier, for `http::Response`s).
    pub fn classify<C2>(self, classify: C2) -> FallbackLayer<Src, W, C2, M> {
        FallbackLayer {
            source: self.source,
            mark: self.mark,
            obs: self.obs,
            when: self.when,
            classify,
        }
    }

    /// Marks a fallback answer with a closure of your own (for a response
    /// type without extensions: `.mark_fn(|res: &mut Answer, f|
    /// res.degraded = Some(f.class))`).
    pub fn mark_fn<Res, F>(self, f: F) -> FallbackLayer<Src, W, C, MarkFn<F>>
    where
        F: Fn(&mut Res, &FellBack) + Send + Sync + 'static,
    {
        self.mark(MarkFn(f))
    }

    /// How a fallback answer is marked: [`MarkHttp`] for `http::Response`,
    /// any [`Mark`] (see [`mark_fn`](Self::mark_fn) for a closure).
    pub fn mark<M2>(self, mark: M2) -> FallbackLayer<Src, W, C, M2> {
        FallbackLayer {
            source: self.source,
            mark: Arc::new(mark),
            obs: self.obs,
            when: self.when,
            classify: self.classify,
        }
    }

    /// The name in events and metrics.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.obs.name = Some(name.into());
        self
    }

    /// Calls `f` for each [`EventKind::Fallback`]. Listeners add up.
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let mut slot = ListenerSlot(self.obs.listener.take());
        slot.set(f);
        self.obs.listener = slot.0;
        self
    }
}

impl<S, Src, W: Clone, C: Clone, M> Layer<S> for FallbackLayer<Src, W, C, M> {
    type Service = Fallback<S, Src, W, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Fallback {
            inner,
            shared: Arc::new(Shared {
                source: self.source.clone(),
                mark: self.mark.clone(),
                obs: self.obs.clone(),
            }),
            when: self.when.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service of a [`FallbackLayer`].
pub struct Fallback<S, Src, W = DefaultWhen, C = ErrorClassifier, M = Unmarked> {
    inner: S,
    shared: Arc<Shared<Src, M>>,
    when: W,
    classify: C,
}

impl<S: Clone, Src, W: Clone, C: Clone, M> Clone for Fallback<S, Src, W, C, M> {
    fn clone(&self) -> Self {
        Fallback {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            when: self.when.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<S: fmt::Debug, Src, W: fmt::Debug, C: fmt::Debug, M> fmt::Debug for Fallback<S, Src, W, C, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("inner", &self.inner)
            .field("when", &self.when)
            .field("classify", &self.classify)
            .finish_non_exhaustive()
    }
}

impl<S, Req, Src, W, C, M> Service<Req> for Fallback<S, Src, W, C, M>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Src: Source<Req, S::Response>,
    W: When,
    C: Classify<S::Response, BoxError> + Clone,
    M: Mark<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = FallbackFuture<S::Future, Req, Src, S::Response, W, C, M>;

    /// The inner service's readiness (a failure to get ready is not
    /// answered by the fallback: there is no request yet to answer).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let memo = self.shared.source.memo(&mut req);
        let fut = self.inner.call(req);
        FallbackFuture {
            state: State::Call { fut, memo },
            shared: self.shared.clone(),
            when: self.when.clone(),
            classify: self.classify.clone(),
        }
    }
}

#[pin_project(project = StateProj)]
enum State<F, SF, Memo, Res> {
    Call {
        #[pin]
        fut: F,
        memo: Option<Memo>,
    },
    /// On the heap: a healthy call's future stays the inner one's size.
    Fallback(Pin<Box<Pending<SF, Res>>>),
    Done,
}

#[pin_project]
struct Pending<SF, Res> {
    #[pin]
    fut: SF,
    original: Option<Result<Res, BoxError>>,
    class: Class,
}

/// The future of [`Fallback`]: the inner call, then (after a failure the
/// rule accepts) the fallback call. Cancel safety: dropping it drops
/// whichever call it waits for.
#[pin_project]
pub struct FallbackFuture<F, Req, Src, Res, W, C, M>
where
    Src: Source<Req, Res>,
{
    #[pin]
    state: State<F, Src::Future, Src::Memo, Res>,
    shared: Arc<Shared<Src, M>>,
    when: W,
    classify: C,
}

impl<F, Req, Src: Source<Req, Res>, Res, W, C, M> fmt::Debug
    for FallbackFuture<F, Req, Src, Res, W, C, M>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Call { .. } => "call",
            State::Fallback { .. } => "fallback",
            State::Done => "done",
        };
        f.debug_struct("FallbackFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, E, Req, Src, Res, W, C, M> Future for FallbackFuture<F, Req, Src, Res, W, C, M>
where
    F: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
    Src: Source<Req, Res>,
    W: When,
    C: Classify<Res, BoxError>,
    M: Mark<Res>,
{
    type Output = Result<Res, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Call { fut, memo } => {
                    let result = match std::task::ready!(fut.poll(cx)) {
                        Ok(r) => Ok(r),
                        Err(e) => Err(e.into()),
                    };
                    let class = this.classify.classify(result.as_ref());
                    let failure = Failure {
                        class,
                        rejected: result
                            .as_ref()
                            .err()
                            .and_then(|e| Rejected::find(e.as_ref())),
                    };
                    let memo = match memo.take() {
                        Some(m) if class != Class::Success && this.when.when(&failure) => m,
                        _ => {
                            this.state.set(State::Done);
                            return Poll::Ready(result);
                        }
                    };
                    let fut = this.shared.source.answer(memo, &failure);
                    this.state.set(State::Fallback(Box::pin(Pending {
                        fut,
                        original: Some(result),
                        class,
                    })));
                }
                StateProj::Fallback(pending) => {
                    let p = pending.as_mut().project();
                    let answer = std::task::ready!(p.fut.poll(cx));
                    let (class, original) = (*p.class, p.original.take());
                    this.state.set(State::Done);
                    let obs = &this.shared.obs;
                    return Poll::Ready(match (answer, original) {
                        (Ok(mut res), _) => {
                            this.shared.mark.mark(&mut res, &FellBack { class });
                            obs.emit(
                                "fallback",
                                EventKind::Fallback {
                                    class,
                                    answered: true,
                                },
                            );
                            Ok(res)
                        }
                        (Err(_), Some(original)) => {
                            obs.emit(
                                "fallback",
                                EventKind::Fallback {
                                    class,
                                    answered: false,
                                },
                            );
                            original
                        }
                        (Err(e), None) => Err(e),
                    });
                }
                StateProj::Done => {
                    return Poll::Ready(Err(crate::error::polled_after_done("fallback")))
                }
            }
        }
    }
}

/// A [`Source`]'s ready answer.
pub type ReadyAnswer<Res> = Ready<Result<Res, BoxError>>;

crate::inner_access!([S, Src, W, C, M] Fallback<S, Src, W, C, M>);

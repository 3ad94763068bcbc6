use super::{Decision, RetryAfterTooLong, Shared};
use crate::classify::Classify;
use crate::error::{BoxError, RejectKind, Rejected};
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

/// How requests are retried: whether one may be, how to copy it, and how to
/// tell the inner service which attempt it is.
pub trait RequestPolicy<Req> {
    /// May this request be retried at all? (default: yes)
    fn retryable(&self, _req: &Req) -> bool {
        true
    }

    /// A copy for another attempt; `None` when it cannot be copied (no retry).
    fn clone_request(&self, req: &Req) -> Option<Req>;

    /// Called before each attempt (1-based), e.g. to mark the attempt number.
    fn on_attempt(&self, _req: &mut Req, _attempt: u32) {}
}

/// Retries any `Req: Clone`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloneRequests;

impl<Req: Clone> RequestPolicy<Req> for CloneRequests {
    #[inline]
    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

type CloneFn<Req> = Arc<dyn Fn(&Req) -> Option<Req> + Send + Sync>;
type PredFn<Req> = Arc<dyn Fn(&Req) -> bool + Send + Sync>;
type AttemptFn<Req> = Arc<dyn Fn(&mut Req, u32) + Send + Sync>;

/// A [`RequestPolicy`] from closures.
///
/// ```
/// use semaforo::retry::RequestFns;
///
/// #[derive(Debug)]
/// struct Job { id: u32, attempt: u32 }
/// let policy = RequestFns::new(|j: &Job| Some(Job { id: j.id, attempt: j.attempt }))
///     .retryable(|j: &Job| j.id != 0)
///     .on_attempt(|j: &mut Job, n| j.attempt = n);
/// # let _ = policy;
/// ```
pub struct RequestFns<Req> {
    clone: CloneFn<Req>,
    retryable: Option<PredFn<Req>>,
    on_attempt: Option<AttemptFn<Req>>,
}

impl<Req> Clone for RequestFns<Req> {
    fn clone(&self) -> Self {
        RequestFns {
            clone: self.clone.clone(),
            retryable: self.retryable.clone(),
            on_attempt: self.on_attempt.clone(),
        }
    }
}

impl<Req> fmt::Debug for RequestFns<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestFns").finish_non_exhaustive()
    }
}

impl<Req> RequestFns<Req> {
    /// Copies requests with `clone`.
    pub fn new(clone: impl Fn(&Req) -> Option<Req> + Send + Sync + 'static) -> Self {
        RequestFns {
            clone: Arc::new(clone),
            retryable: None,
            on_attempt: None,
        }
    }

    /// Only requests for which `f` is true are retried.
    pub fn retryable(mut self, f: impl Fn(&Req) -> bool + Send + Sync + 'static) -> Self {
        self.retryable = Some(Arc::new(f));
        self
    }

    /// Called before each attempt with the attempt number (1-based).
    pub fn on_attempt(mut self, f: impl Fn(&mut Req, u32) + Send + Sync + 'static) -> Self {
        self.on_attempt = Some(Arc::new(f));
        self
    }
}

impl<Req> RequestPolicy<Req> for RequestFns<Req> {
    fn retryable(&self, req: &Req) -> bool {
        self.retryable.as_ref().is_none_or(|f| f(req))
    }

    fn clone_request(&self, req: &Req) -> Option<Req> {
        (self.clone)(req)
    }

    fn on_attempt(&self, req: &mut Req, attempt: u32) {
        if let Some(f) = &self.on_attempt {
            f(req, attempt)
        }
    }
}

/// `http::Request` policy (feature `http`): retries idempotent methods, `POST`
/// and `PATCH` only with an `Idempotency-Key` header (or with
/// [`allow_non_idempotent`](Self::allow_non_idempotent)), never a request
/// carrying [`NoRetry`](super::NoRetry), and puts the attempt
/// number in the request extensions as [`Attempt`](crate::retry::Attempt).
/// With the `grpc` feature, a retry's `grpc-timeout` header is what is left
/// of the first attempt's (counted from the call's start), not the original
/// total.
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpRequests {
    allow_non_idempotent: bool,
}

#[cfg(feature = "http")]
impl HttpRequests {
    /// Retry every method (LLM completions: a `POST` is safe to retry before
    /// any output reached the caller).
    pub fn allow_non_idempotent(mut self) -> Self {
        self.allow_non_idempotent = true;
        self
    }
}

/// A `HeaderName` (a lookup by `&str` parses the name on every call).
#[cfg(feature = "http")]
static IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

#[cfg(feature = "http")]
impl<B: Clone> RequestPolicy<http::Request<B>> for HttpRequests {
    fn retryable(&self, req: &http::Request<B>) -> bool {
        use http::Method;
        if req.extensions().get::<super::NoRetry>().is_some() {
            return false;
        }
        self.allow_non_idempotent
            || matches!(
                *req.method(),
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            )
            || req.headers().contains_key(&IDEMPOTENCY_KEY)
    }

    fn clone_request(&self, req: &http::Request<B>) -> Option<http::Request<B>> {
        #[allow(unused_mut)]
        let mut copy = req.clone();
        // The first copy is taken as the call starts: when its gRPC
        // deadline runs out (retries send what is left of it).
        #[cfg(feature = "grpc")]
        crate::grpc::stamp_deadline(&mut copy);
        Some(copy)
    }

    fn on_attempt(&self, req: &mut http::Request<B>, attempt: u32) {
        req.extensions_mut().insert(super::Attempt(attempt));
        #[cfg(feature = "grpc")]
        if attempt > 1 {
            crate::grpc::rewrite_timeout(req);
        }
    }
}

/// The tower [`Layer`] of a [`Retry`](super::Retry).
#[must_use = "a layer does nothing until it wraps a service"]
pub struct RetryLayer<C = crate::classify::ErrorClassifier, P = CloneRequests> {
    shared: Arc<Shared>,
    classify: C,
    requests: P,
}

impl<C: Clone, P: Clone> Clone for RetryLayer<C, P> {
    fn clone(&self) -> Self {
        RetryLayer {
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            requests: self.requests.clone(),
        }
    }
}

impl<C, P> fmt::Debug for RetryLayer<C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("retry", &self.shared)
            .finish_non_exhaustive()
    }
}

impl<C, P> RetryLayer<C, P> {
    pub(crate) fn new(shared: Arc<Shared>, classify: C, requests: P) -> Self {
        RetryLayer {
            shared,
            classify,
            requests,
        }
    }

    /// Replaces the classifier.
    pub fn classify<C2>(self, classify: C2) -> RetryLayer<C2, P> {
        RetryLayer::new(self.shared, classify, self.requests)
    }

    /// Replaces the request policy (default [`CloneRequests`]).
    pub fn requests<P2>(self, requests: P2) -> RetryLayer<C, P2> {
        RetryLayer::new(self.shared, self.classify, requests)
    }
}

impl<S: Clone, C: Clone, P: Clone> Layer<S> for RetryLayer<C, P> {
    type Service = RetryService<S, C, P>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            config: CallConfig::of(&self.shared),
            spare: Arc::new(Spare::new(self.shared.clone(), &inner)),
            inner,
            classify: self.classify.clone(),
            requests: self.requests.clone(),
            own_spare_in: 0,
        }
    }
}

/// What a call's future keeps for its retries, one `Arc` for all the calls
/// of a service and its clones: the configuration, and a copy of the inner
/// service that the retries of a call clone when the first one fails. A call
/// that succeeds at once clones no service (tower's `Retry` clones the
/// service and the policy on every call).
struct Spare<S> {
    shared: Arc<Shared>,
    svc: std::sync::Mutex<S>,
}

impl<S: Clone> Spare<S> {
    fn new(shared: Arc<Shared>, svc: &S) -> Self {
        Spare {
            shared,
            svc: std::sync::Mutex::new(svc.clone()),
        }
    }

    /// A copy of the inner service for another attempt (to be polled ready).
    fn service(&self) -> S {
        self.svc.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The part of the configuration every call reads, kept by value in the
/// service (no pointer to follow on the way in).
#[derive(Debug, Clone, Copy)]
struct CallConfig {
    max_attempts: u32,
    deadline: Option<Duration>,
    budget: bool,
}

impl CallConfig {
    fn of(shared: &Shared) -> Self {
        CallConfig {
            max_attempts: shared.max_attempts,
            deadline: shared.deadline,
            budget: shared.budget.is_some(),
        }
    }
}

/// Calls a clone makes on the spare it shares with the service it was cloned
/// from before it takes one of its own (see [`RetryService`]).
const SHARED_SPARE_CALLS: u32 = 32;

/// The service of a [`RetryLayer`].
///
/// The first attempt of a call goes to the service this wraps; its retries
/// go to a clone of it, taken when the first attempt fails, from a spare
/// copy made when the layer wrapped it (refreshed after
/// [`get_mut`](Self::get_mut)). Every call's future holds that spare (one
/// `Arc` count up and down a call).
///
/// A clone shares its original's spare for its first 32 calls, then takes
/// one of its own (one allocation and one clone of the inner service, once):
/// a clone made for a single request (axum and tonic clone the service for
/// each) costs nothing more, and long-lived clones on different threads (a
/// worker each) do not contend on one shared count at every call.
pub struct RetryService<S, C = crate::classify::ErrorClassifier, P = CloneRequests> {
    inner: S,
    /// What `call` reads, copied out of the shared configuration.
    config: CallConfig,
    spare: Arc<Spare<S>>,
    classify: C,
    requests: P,
    /// Calls left before this service takes a spare of its own: 0 when it
    /// has one; a clone starts at [`SHARED_SPARE_CALLS`]; 1 after
    /// `get_mut` (the spare may differ from `inner`: replaced at the next
    /// call).
    own_spare_in: u32,
}

impl<S: Clone, C: Clone, P: Clone> Clone for RetryService<S, C, P> {
    fn clone(&self) -> Self {
        RetryService {
            inner: self.inner.clone(),
            config: self.config,
            spare: self.spare.clone(),
            classify: self.classify.clone(),
            requests: self.requests.clone(),
            own_spare_in: match self.own_spare_in {
                0 => SHARED_SPARE_CALLS,
                n => n,
            },
        }
    }
}

impl<S: fmt::Debug, C, P> fmt::Debug for RetryService<S, C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryService")
            .field("inner", &self.inner)
            .field("retry", &self.spare.shared)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, C, P> RetryService<S, C, P> {
    /// A spare of this service's own, a copy of `inner` as it is now: a
    /// clone's after its first calls, or anyone's after `get_mut` (later
    /// retries clone the service as changed; its clones keep theirs).
    #[cold]
    #[inline(never)]
    fn own_spare(&mut self) {
        self.spare = Arc::new(Spare::new(self.spare.shared.clone(), &self.inner));
        self.own_spare_in = 0;
    }
}

impl<S, C, P> RetryService<S, C, P> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably. Retries of later calls go to clones
    /// of it as changed.
    pub fn get_mut(&mut self) -> &mut S {
        self.own_spare_in = 1;
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, P, Req> Service<Req> for RetryService<S, C, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
    P: RequestPolicy<Req> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C, P>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut req: Req) -> Self::Future {
        if self.config.budget {
            deposit(&self.spare.shared);
        }
        let backup = if self.config.max_attempts > 1 && self.requests.retryable(&req) {
            self.requests.clone_request(&req)
        } else {
            None
        };
        self.requests.on_attempt(&mut req, 1);
        // Boxed: only calls with a deadline pay for (and allocate) the timer.
        let deadline = self.config.deadline.map(deadline_timer);
        match self.own_spare_in {
            0 => {}
            // Counted down once the spare is taken: if the inner service's
            // clone panics, the next call tries again.
            1 => self.own_spare(),
            n => self.own_spare_in = n - 1,
        }
        // A call with a deadline keeps the layer at hand (its refusal names
        // the layer) even if its request is not retried (`backup` none).
        let retry = (backup.is_some() || deadline.is_some()).then(|| Retrying {
            spare: self.spare.clone(),
            backup,
            requests: self.requests.clone(),
            attempt: 1,
            due: false,
            backing_off: None,
        });
        ResponseFuture {
            fut: Some(self.inner.call(req)),
            retry,
            deadline,
            classify: self.classify.clone(),
            _req: PhantomData,
        }
    }
}

/// A call's deposit into the retry budget, out of line: `call` stays small
/// enough to be inlined into the layer above.
#[inline(never)]
fn deposit(shared: &Shared) {
    if let Some(b) = &shared.budget {
        b.deposit();
    }
}

/// The timer of a call's overall deadline, out of line (as [`deposit`]).
#[inline(never)]
fn deadline_timer(d: Duration) -> Pin<Box<Sleep>> {
    Box::pin(tokio::time::sleep(d))
}

/// What a retryable call keeps between attempts (and a call with a
/// deadline, for the layer's name).
struct Retrying<S, Req, P> {
    spare: Arc<Spare<S>>,
    /// The request's copy: `None` from the start when it is not retried.
    backup: Option<Req>,
    requests: P,
    attempt: u32,
    /// A retry is due: set when an attempt failed and another one is
    /// decided, cleared when it is called (or cannot be). Only then does a
    /// poll without an attempt in flight make one.
    due: bool,
    /// Allocated at the first retry, so a call that does not fail carries
    /// (and moves, and drops) none of it — the inner service's clone
    /// included, which would otherwise sit in every call's future (and be
    /// copied with it through every layer above).
    backing_off: Option<Box<BackingOff<S, Req>>>,
}

/// The response future of [`RetryService`].
#[pin_project]
pub struct ResponseFuture<S: Service<Req>, Req, C, P> {
    #[pin]
    fut: Option<S::Future>,
    retry: Option<Retrying<S, Req, P>>,
    deadline: Option<Pin<Box<Sleep>>>,
    classify: C,
    _req: PhantomData<fn(Req)>,
}

impl<S: Service<Req>, Req, C, P> fmt::Debug for ResponseFuture<S, Req, C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("retry::ResponseFuture")
            .finish_non_exhaustive()
    }
}

/// The decision after `retry`'s latest attempt ended in `class`, with the
/// request of the next attempt if it is a retry: the kept copy itself for
/// the last attempt, a copy of it before (a policy that cannot copy it
/// ends the call with its last result).
fn decide<S, Req, P: RequestPolicy<Req>>(
    retry: &mut Retrying<S, Req, P>,
    class: &crate::classify::Class,
    left: Option<Duration>,
) -> Decision<Req> {
    let last = retry.attempt.saturating_add(1) >= retry.spare.shared.max_attempts;
    let (backup, requests) = (&mut retry.backup, &mut retry.requests);
    retry.spare.shared.decide(
        class,
        retry.attempt,
        retry
            .backing_off
            .as_ref()
            .map_or(Duration::ZERO, |b| b.prev_delay),
        left,
        &mut rand::rng(),
        || {
            if last {
                backup.take()
            } else {
                backup.as_ref().and_then(|b| requests.clone_request(b))
            }
        },
    )
}

/// The error returned when the upstream asks for a wait above the ceiling.
fn too_long<S, Req, P>(
    retry: &Retrying<S, Req, P>,
    retry_after: Duration,
    e: impl Into<BoxError>,
) -> BoxError {
    RetryAfterTooLong {
        retry_after,
        ceiling: retry.spare.shared.ceiling,
        source: e.into(),
    }
    .into()
}

/// What a call keeps once it has been retried: the backoff timer, the last
/// delay (decorrelated jitter grows from it), the `semaforo.retry` span and
/// the service of the retries (cloned from the spare at the first one, once
/// the backoff is over).
struct BackingOff<S, Req> {
    sleep: Pin<Box<Sleep>>,
    prev_delay: Duration,
    span: tracing::Span,
    svc: Option<S>,
    /// The request of the attempt due (decided with the retry).
    next: Option<Req>,
}

/// Counts the next attempt, keeps its request and arms the backoff timer
/// (allocated at the first retry, with the span).
fn start_sleep<S, Req, P>(retry: &mut Retrying<S, Req, P>, delay: Duration, next: Req) {
    retry.attempt += 1;
    retry.due = true;
    match retry.backing_off.as_mut() {
        Some(b) => {
            b.prev_delay = delay;
            b.next = Some(next);
            b.sleep
                .as_mut()
                .reset(crate::time::after(Instant::now(), delay));
        }
        None => {
            retry.backing_off = Some(Box::new(BackingOff {
                sleep: Box::pin(tokio::time::sleep(delay)),
                prev_delay: delay,
                span: retry.spare.shared.obs.span("retry", "retry"),
                svc: None,
                next: Some(next),
            }))
        }
    }
}

/// The call's deadline passed (`why`: more than its length, if any), named
/// and told. (Every call with a deadline keeps `Retrying`, hence `shared`.)
fn deadline_error(shared: Option<&Shared>, why: Option<&str>) -> BoxError {
    let Some(shared) = shared else {
        return Rejected::new("retry", RejectKind::Timeout).into();
    };
    let total = crate::time::Human(shared.deadline.unwrap_or_default());
    let detail = match why {
        Some(why) => format!("deadline {total}: {why}"),
        None => format!("deadline {total}"),
    };
    let r = Rejected::new("retry", RejectKind::Timeout)
        .with_name_opt(shared.obs.name.as_ref())
        .with_detail(detail);
    shared.obs.rejected(&r);
    r.into()
}

/// The call's answer: what it kept for retries (the request's copy, a
/// service readied for the next attempt, the backoff) and its deadline's
/// timer are let go of now, not when the caller drops the future; a later
/// poll calls nothing (no retry is due).
fn answer<R, T>(retry: &mut Option<R>, deadline: &mut Option<Pin<Box<Sleep>>>, out: T) -> Step<T> {
    *retry = None;
    *deadline = None;
    Step::Done(Poll::Ready(out))
}

/// What one pass of [`ResponseFuture::step`] came to.
enum Step<T> {
    Done(Poll<T>),
    /// A first retry was just decided outside the `semaforo.retry` span:
    /// step again inside it (the backoff and the new attempt are the retry's).
    EnterSpan,
}

impl<S, Req, C, P> Future for ResponseFuture<S, Req, C, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
    P: RequestPolicy<Req>,
{
    type Output = Result<S::Response, BoxError>;

    /// One state machine: each attempt's result is classified once (and the
    /// class carried outward, see [`Classify::classify_and_carry`]); a call
    /// that is not retryable returns its first result unclassified. Polled
    /// again once it has answered, it answers an error and calls nothing:
    /// the retry section runs only while a retry is due (`due`). Inside the
    /// `semaforo.retry` span once the call has been retried; a call that
    /// was not touches no span at all.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let retried = self.retry.as_ref().is_some_and(|r| r.backing_off.is_some());
            let step = if retried {
                let span = self
                    .retry
                    .as_ref()
                    .and_then(|r| r.backing_off.as_ref())
                    .map(|b| b.span.clone())
                    .unwrap_or_else(tracing::Span::none);
                let _in_span = span.enter();
                self.as_mut().step(cx, true)
            } else {
                self.as_mut().step(cx, false)
            };
            match step {
                Step::Done(p) => return p,
                Step::EnterSpan => continue,
            }
        }
    }
}

impl<S, Req, C, P> ResponseFuture<S, Req, C, P>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
    P: RequestPolicy<Req>,
{
    /// Polls the attempt in flight and makes the next one when it is due.
    /// `in_span`: the caller entered the retry span (else a first retry
    /// returns [`Step::EnterSpan`] as soon as it is decided).
    #[inline(always)]
    fn step(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        in_span: bool,
    ) -> Step<Result<S::Response, BoxError>> {
        use Step::Done;
        let mut this = self.project();
        // Answered already (no attempt in flight, none due): an error, no
        // call, no deadline reported.
        if this.fut.is_none() && !this.retry.as_ref().is_some_and(|r| r.due) {
            return Done(Poll::Ready(Err(crate::error::polled_after_done("retry"))));
        }
        loop {
            if let Some(d) = this.deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    let shared = this.retry.as_ref().map(|r| &*r.spare.shared);
                    let e = deadline_error(shared, None);
                    // Answered: no later poll reports the deadline again.
                    this.fut.set(None);
                    return answer(this.retry, this.deadline, Err(e));
                }
            }
            if let Some(fut) = this.fut.as_mut().as_pin_mut() {
                let Poll::Ready(mut result) = fut.poll(cx) else {
                    return Done(Poll::Pending);
                };
                this.fut.set(None);
                // Not retried (no copy of the request): returned as it came,
                // unclassified.
                let Some(retry) = this
                    .retry
                    .as_mut()
                    .filter(|r| r.backup.is_some() || r.backing_off.is_some())
                else {
                    return answer(this.retry, this.deadline, result.map_err(Into::into));
                };
                let class = this
                    .classify
                    .classify_and_carry(result.as_mut().map_err(|e| &*e));
                if !class.is_retryable() {
                    // The common case decides without a clock read or an RNG.
                    // Answered: the request's copy, the timers and a service
                    // readied for a retry go now (field by field: the
                    // healthy path stays inline; `due` is false, a later poll
                    // calls nothing).
                    retry.backup = None;
                    retry.backing_off = None;
                    *this.deadline = None;
                    return Done(Poll::Ready(result.map_err(Into::into)));
                }
                let left = this
                    .deadline
                    .as_ref()
                    .map(|d| d.deadline().saturating_duration_since(Instant::now()));
                match decide(retry, &class, left) {
                    Decision::Return => {
                        return answer(this.retry, this.deadline, result.map_err(Into::into));
                    }
                    Decision::TooLong(retry_after) => {
                        let out = result.map_err(|e| too_long(retry, retry_after, e));
                        return answer(this.retry, this.deadline, out);
                    }
                    Decision::Retry(delay, next) => {
                        start_sleep(retry, delay, next);
                        if !in_span {
                            return Step::EnterSpan;
                        }
                    }
                }
            }
            let Some(retry) = this.retry.as_mut().filter(|r| r.due) else {
                return Done(Poll::Ready(Err(crate::error::polled_after_done("retry"))));
            };
            // A retry is due only once `start_sleep` has armed the backoff.
            let Some(b) = retry.backing_off.as_mut() else {
                retry.due = false;
                return Done(Poll::Ready(Err(crate::error::polled_after_done("retry"))));
            };
            if !b.sleep.is_elapsed() && b.sleep.as_mut().poll(cx).is_pending() {
                return Done(Poll::Pending);
            }
            let svc = b.svc.get_or_insert_with(|| retry.spare.service());
            match svc.poll_ready(cx) {
                Poll::Pending => return Done(Poll::Pending),
                Poll::Ready(Err(e)) => {
                    let e = e.into();
                    return answer(this.retry, this.deadline, Err(e));
                }
                Poll::Ready(Ok(())) => {}
            }
            // Ready, perhaps long after the backoff: an attempt starts only
            // with `min_attempt_time` left before the deadline.
            if let Some(d) = this.deadline.as_ref() {
                let shared = &retry.spare.shared;
                let left = d.deadline().saturating_duration_since(Instant::now());
                if left < shared.min_attempt_time {
                    let why = format!(
                        "{} left, less than the {} an attempt needs",
                        crate::time::Human(left),
                        crate::time::Human(shared.min_attempt_time)
                    );
                    let e = deadline_error(Some(shared), Some(&why));
                    // The ready service (and what its readiness holds) goes too.
                    return answer(this.retry, this.deadline, Err(e));
                }
            }
            let Some(mut req) = b.next.take() else {
                let e = crate::error::polled_after_done("retry");
                return answer(this.retry, this.deadline, Err(e));
            };
            retry.requests.on_attempt(&mut req, retry.attempt);
            let fut = svc.call(req);
            retry.due = false;
            this.fut.set(Some(fut));
        }
    }
}

use super::state::Fit;
use super::{Cost, Shared};
use crate::classify::{Class, Classify, RateLimitInfo};
use crate::error::{BoxError, RejectKind, Rejected};
use pin_project::{pin_project, pinned_drop};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

/// What a request costs. Implemented for `Fn(&Req) -> Cost`.
pub trait Weigh<Req> {
    /// The estimated cost of `req`.
    fn weigh(&self, req: &Req) -> Cost;
}

impl<Req, F: Fn(&Req) -> Cost> Weigh<Req> for F {
    fn weigh(&self, req: &Req) -> Cost {
        self(req)
    }
}

/// Every request costs one request and no tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct OneRequest;

impl<Req> Weigh<Req> for OneRequest {
    fn weigh(&self, _req: &Req) -> Cost {
        Cost {
            requests: 1,
            tokens: 0,
        }
    }
}

/// What a response tells the pacer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// What the call really cost (`usage.total_tokens`), to replace the estimate.
    pub usage: Option<Cost>,
    /// The upstream's rate-limit headers.
    pub info: Option<RateLimitInfo>,
}

/// Reads usage and rate-limit headers from a response. Implemented for
/// `Fn(&Res) -> Observed`.
pub trait Observe<Res> {
    /// What `res` says.
    fn observe(&self, res: &Res) -> Observed;
}

impl<Res, F: Fn(&Res) -> Observed> Observe<Res> for F {
    fn observe(&self, res: &Res) -> Observed {
        self(res)
    }
}

/// Reads nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserve;

impl<Res> Observe<Res> for NoObserve {
    fn observe(&self, _res: &Res) -> Observed {
        Observed::default()
    }
}

/// The tower [`Layer`] of a [`Pace`](super::Pace).
#[derive(Clone)]
pub struct PaceLayer<W, O, C> {
    shared: Arc<Shared>,
    weigh: W,
    observe: O,
    classify: C,
}

impl<W, O, C> fmt::Debug for PaceLayer<W, O, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaceLayer")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl PaceLayer<OneRequest, NoObserve, crate::classify::ErrorClassifier> {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        PaceLayer {
            shared,
            weigh: OneRequest,
            observe: NoObserve,
            classify: crate::classify::ErrorClassifier,
        }
    }
}

impl<W, O, C> PaceLayer<W, O, C> {
    /// How much each request costs (an estimate is fine: see [`observe`](Self::observe)).
    pub fn weigh<W2>(self, weigh: W2) -> PaceLayer<W2, O, C> {
        PaceLayer {
            shared: self.shared,
            weigh,
            observe: self.observe,
            classify: self.classify,
        }
    }

    /// What each response says: real usage (reconciled against the estimate)
    /// and rate-limit headers.
    pub fn observe<O2>(self, observe: O2) -> PaceLayer<W, O2, C> {
        PaceLayer {
            shared: self.shared,
            weigh: self.weigh,
            observe,
            classify: self.classify,
        }
    }

    /// How results are classified (a `Throttled` one pauses and slows the pacer).
    pub fn classify<C2>(self, classify: C2) -> PaceLayer<W, O, C2> {
        PaceLayer {
            shared: self.shared,
            weigh: self.weigh,
            observe: self.observe,
            classify,
        }
    }
}

impl<S, W: Clone, O: Clone, C: Clone> Layer<S> for PaceLayer<W, O, C> {
    type Service = PaceService<S, W, O, C>;

    fn layer(&self, inner: S) -> Self::Service {
        PaceService {
            inner,
            shared: self.shared.clone(),
            weigh: self.weigh.clone(),
            observe: self.observe.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service of a [`PaceLayer`].
#[derive(Clone)]
pub struct PaceService<S, W, O, C> {
    inner: S,
    shared: Arc<Shared>,
    weigh: W,
    observe: O,
    classify: C,
}

impl<S: fmt::Debug, W, O, C> fmt::Debug for PaceService<S, W, O, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaceService")
            .field("inner", &self.inner)
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl<S, W, O, C, Req> Service<Req> for PaceService<S, W, O, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    W: Weigh<Req>,
    O: Observe<S::Response> + Clone,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, O, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let cost = self.weigh.weigh(&req);
        let decision = self.shared.admit(&cost, Instant::now());
        let state = match decision {
            Admit::Now => State::Calling {
                fut: self.inner.call(req),
            },
            Admit::Queued(slot, seq) => {
                // Keep the service polled ready for when our turn comes; leave
                // a clone for the next `poll_ready`.
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                State::Waiting {
                    waiting: Some(Box::new(Waiting {
                        slot,
                        seq,
                        svc,
                        req: Some(req),
                        sleep: None,
                    })),
                }
            }
            Admit::Rejected(r) => State::Rejected {
                rejected: Some(Box::new(r)),
            },
        };
        ResponseFuture {
            state,
            shared: self.shared.clone(),
            cost,
            observe: self.observe.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// What admission decided.
pub(crate) enum Admit {
    Now,
    Queued(u32, u64),
    Rejected(Rejected),
}

impl Shared {
    /// Reserve now, join the line, or refuse (cost above a burst, or a wait
    /// above `max_wait`, with the exact `retry_after`).
    pub(crate) fn admit(&self, cost: &Cost, now: Instant) -> Admit {
        let rejected = |detail: String| {
            Rejected::new("pace", RejectKind::BudgetExceeded)
                .with_name_opt(self.name.as_ref())
                .with_detail(detail)
        };
        let mut st = self.lock();
        for dim in &st.dims {
            let n = dim.amount(cost);
            if n > dim.capacity {
                let unit = match dim.unit {
                    super::Unit::Requests => "requests",
                    super::Unit::Tokens => "tokens",
                };
                return Admit::Rejected(rejected(format!(
                    "a cost of {n} {unit} can never fit a burst of {} per {:?}",
                    dim.capacity, dim.per
                )));
            }
        }
        match st.try_now(cost, now) {
            Fit::Now => Admit::Now,
            Fit::At(start) => {
                let wait = start.saturating_duration_since(now);
                match self.max_wait.filter(|m| wait > *m) {
                    Some(max) => Admit::Rejected(
                        rejected(format!("would wait {wait:?}, max_wait {max:?}"))
                            .with_retry_after(wait - max),
                    ),
                    None => {
                        let (slot, seq) = st.enqueue(*cost);
                        Admit::Queued(slot, seq)
                    }
                }
            }
        }
    }
}

struct Waiting<S, Req> {
    slot: u32,
    seq: u64,
    svc: S,
    req: Option<Req>,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The response future of [`PaceService`]. Dropped while waiting, it leaves the
/// line (holding nothing); dropped while calling, the tokens stay spent (the
/// upstream may have done the work).
#[pin_project(PinnedDrop)]
pub struct ResponseFuture<S: Service<Req>, Req, O, C> {
    #[pin]
    state: State<S, Req>,
    shared: Arc<Shared>,
    cost: Cost,
    observe: O,
    classify: C,
}

#[pin_project(project = StateProj)]
enum State<S: Service<Req>, Req> {
    Waiting {
        waiting: Option<Box<Waiting<S, Req>>>,
    },
    Calling {
        #[pin]
        fut: S::Future,
    },
    Rejected {
        rejected: Option<Box<Rejected>>,
    },
}

#[pinned_drop]
impl<S: Service<Req>, Req, O, C> PinnedDrop for ResponseFuture<S, Req, O, C> {
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        if let StateProj::Waiting { waiting: Some(w) } = this.state.project() {
            this.shared.lock().leave(w.slot, w.seq);
        }
    }
}

impl<S: Service<Req>, Req, O, C> fmt::Debug for ResponseFuture<S, Req, O, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("pace::ResponseFuture")
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl<S, Req, O, C> Future for ResponseFuture<S, Req, O, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    O: Observe<S::Response>,
    C: Classify<S::Response, S::Error>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Rejected { rejected } => {
                    return Poll::Ready(Err(match rejected.take() {
                        Some(r) => {
                            let boxed: BoxError = r;
                            boxed
                        }
                        None => "pace future polled after completion".into(),
                    }))
                }
                StateProj::Waiting { waiting } => {
                    let Some(w) = waiting.as_mut() else {
                        return Poll::Ready(Err("pace future polled after completion".into()));
                    };
                    let turn =
                        this.shared
                            .lock()
                            .poll_turn(w.slot, w.seq, cx.waker(), Instant::now());
                    match turn {
                        Ok(()) => {}
                        Err(None) => return Poll::Pending,
                        Err(Some(at)) => {
                            match w.sleep.as_mut() {
                                Some(s) => s.as_mut().reset(at),
                                None => w.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                            }
                            if let Some(s) = w.sleep.as_mut() {
                                ready!(s.as_mut().poll(cx));
                            }
                            continue;
                        }
                    }
                    // Reserved: the line is left; now the inner service.
                    if let Err(e) = ready!(w.svc.poll_ready(cx)) {
                        *waiting = None;
                        return Poll::Ready(Err(e.into()));
                    }
                    let Some(req) = w.req.take() else {
                        return Poll::Ready(Err("pace future polled after completion".into()));
                    };
                    let fut = w.svc.call(req);
                    *waiting = None;
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx));
                    let class = this.classify.classify(result.as_ref());
                    let observed = result.as_ref().ok().map(|r| this.observe.observe(r));
                    let nothing_to_learn = class.is_success()
                        && !this
                            .shared
                            .slowed
                            .load(std::sync::atomic::Ordering::Relaxed)
                        && observed.is_none_or(|o| o.usage.is_none() && o.info.is_none());
                    if nothing_to_learn {
                        // The healthy path takes no lock on the way out.
                        return Poll::Ready(result.map_err(Into::into));
                    }
                    let mut st = this.shared.lock();
                    match class {
                        Class::Throttled { retry_after } => {
                            st.throttled(retry_after, Instant::now())
                        }
                        Class::Success => st.succeeded(),
                        _ => {}
                    }
                    this.shared
                        .slowed
                        .store(st.is_slowed(), std::sync::atomic::Ordering::Relaxed);
                    if let Some(o) = observed {
                        if let Some(real) = o.usage {
                            st.reconcile(this.cost, &real);
                        }
                        if let Some(info) = o.info {
                            st.learn(&info, Instant::now());
                        }
                    }
                    drop(st);
                    return Poll::Ready(result.map_err(Into::into));
                }
            }
        }
    }
}

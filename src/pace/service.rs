use super::state::{Fit, Refusal, Turn};
use super::{Cost, Shared};
use crate::classify::{Class, Classify, RateLimitInfo};
use crate::error::{BoxError, RejectKind, Rejected};
use crate::observe::EventKind;
use pin_project::{pin_project, pinned_drop};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
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
        Cost::requests(1)
    }
}

/// What a response tells the pacer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// What the call really cost (the answer's `usage`), to replace the estimate.
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

/// A call whose real cost is not known yet (a streamed answer): reconcile it
/// when the usage shows up.
#[derive(Debug)]
pub struct Pending {
    shared: Arc<Shared>,
    estimate: Cost,
    /// When the call was charged (sent).
    charged: Instant,
}

impl Pending {
    /// Replaces the estimate by the real cost.
    pub fn reconcile(self, real: Cost) {
        self.shared
            .reconcile(&self.estimate, &real, Instant::now(), self.charged);
    }
}

/// A borrowed [`Pending`]: turned into one only by deliveries that need it, so
/// the default costs nothing.
#[derive(Debug)]
pub struct PendingRef<'a> {
    shared: &'a Arc<Shared>,
    estimate: Cost,
    charged: Instant,
}

impl PendingRef<'_> {
    /// Keeps the reconciliation for later.
    pub fn keep(self) -> Pending {
        Pending {
            shared: self.shared.clone(),
            estimate: self.estimate,
            charged: self.charged,
        }
    }
}

/// How the response is handed back.
pub trait Deliver<Res> {
    /// What the caller receives.
    type Response;
    /// Hands `res` back; `pending` can be kept to reconcile the cost later.
    fn deliver(&self, res: Res, pending: PendingRef<'_>) -> Self::Response;
}

/// As is: the usage, if any, was read from the response by `observe` (default).
#[derive(Debug, Clone, Copy, Default)]
pub struct AtResponse;

impl<Res> Deliver<Res> for AtResponse {
    type Response = Res;
    #[inline]
    fn deliver(&self, res: Res, _pending: PendingRef<'_>) -> Res {
        res
    }
}

/// Where the real cost of a streamed answer is left by whoever reads its body
/// (e.g. the LLM preset's SSE watch), for the pacer to reconcile when the
/// body ends. Cheap to clone; clones share the slot. Put one in the response's
/// extensions and [`UsageFromBody`] finds it.
///
/// ```
/// use semaforo::pace::{Cost, UsageCell};
/// let cell = UsageCell::new();
/// assert_eq!(cell.get(), None);
/// cell.clone().set(Cost::tokens(2_010));
/// assert_eq!(cell.get(), Some(Cost::tokens(2_010)));
/// ```
#[derive(Debug, Clone, Default)]
pub struct UsageCell(Arc<std::sync::Mutex<Option<Cost>>>);

impl UsageCell {
    /// An empty cell.
    pub fn new() -> Self {
        UsageCell::default()
    }

    /// Records the real cost (the last one set wins).
    pub fn set(&self, cost: Cost) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(cost);
    }

    /// The real cost, if one was set.
    pub fn get(&self) -> Option<Cost> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A streamed `http` answer whose usage arrives in its body: the pacer keeps
/// the call's estimate and, when the body ends, fails or is dropped (through
/// the one body tap, [`guard::Tapped`](crate::guard::Tapped)), reconciles it
/// with the cost left in the response's [`UsageCell`] extension (nothing to
/// reconcile when there is no cell or it stayed empty, or when the body did
/// not end whole: the estimate stands) (feature `http`).
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageFromBody;

/// The guard [`UsageFromBody`] holds until the body ends.
#[cfg(feature = "http")]
#[derive(Debug)]
pub struct Reconcile {
    pending: Pending,
    cell: UsageCell,
}

#[cfg(feature = "http")]
impl crate::guard::Guard for Reconcile {
    /// Only a body that ended whole has its final usage: one cut short
    /// (dropped, failed, timed out) may hold a placeholder (Anthropic's
    /// `message_start` says 1 output token) while the provider counts what it
    /// generated, so the estimate stands.
    fn finish(self, end: crate::guard::StreamEnd) {
        if end != crate::guard::StreamEnd::Completed {
            return;
        }
        if let Some(real) = self.cell.get() {
            self.pending.reconcile(real);
        }
    }
}

#[cfg(feature = "http")]
impl<B: http_body::Body> Deliver<http::Response<B>> for UsageFromBody {
    type Response = http::Response<crate::guard::Tapped<B, Option<Reconcile>>>;

    fn deliver(&self, res: http::Response<B>, pending: PendingRef<'_>) -> Self::Response {
        let guard = res.extensions().get::<UsageCell>().map(|cell| Reconcile {
            pending: pending.keep(),
            cell: cell.clone(),
        });
        res.map(|body| crate::guard::Tapped::body(body, guard))
    }
}

/// The tower [`Layer`] of a [`Pace`](super::Pace).
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct PaceLayer<
    W = OneRequest,
    O = NoObserve,
    C = crate::classify::ErrorClassifier,
    D = AtResponse,
> {
    shared: Arc<Shared>,
    weigh: W,
    observe: O,
    classify: C,
    deliver: D,
}

impl<W, O, C, D> fmt::Debug for PaceLayer<W, O, C, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaceLayer")
            .field("name", &self.shared.obs.name)
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
            deliver: AtResponse,
        }
    }
}

impl<W, O, C, D> PaceLayer<W, O, C, D> {
    /// How much each request costs (an estimate is fine: see [`observe`](Self::observe)).
    pub fn weigh<W2>(self, weigh: W2) -> PaceLayer<W2, O, C, D> {
        PaceLayer {
            shared: self.shared,
            weigh,
            observe: self.observe,
            classify: self.classify,
            deliver: self.deliver,
        }
    }

    /// What each response says: real usage (reconciled against the estimate)
    /// and rate-limit headers.
    pub fn observe<O2>(self, observe: O2) -> PaceLayer<W, O2, C, D> {
        PaceLayer {
            shared: self.shared,
            weigh: self.weigh,
            observe,
            classify: self.classify,
            deliver: self.deliver,
        }
    }

    /// How results are classified (a `Throttled` one pauses and slows the pacer).
    pub fn classify<C2>(self, classify: C2) -> PaceLayer<W, O, C2, D> {
        PaceLayer {
            shared: self.shared,
            weigh: self.weigh,
            observe: self.observe,
            classify,
            deliver: self.deliver,
        }
    }

    /// How the response is handed back (e.g. [`UsageFromBody`] for streamed
    /// answers whose usage comes last).
    pub fn deliver<D2>(self, deliver: D2) -> PaceLayer<W, O, C, D2> {
        PaceLayer {
            shared: self.shared,
            weigh: self.weigh,
            observe: self.observe,
            classify: self.classify,
            deliver,
        }
    }
}

impl<S, W: Clone, O: Clone, C: Clone, D: Clone> Layer<S> for PaceLayer<W, O, C, D> {
    type Service = PaceService<S, W, O, C, D>;

    fn layer(&self, inner: S) -> Self::Service {
        PaceService {
            inner,
            shared: self.shared.clone(),
            weigh: self.weigh.clone(),
            observe: self.observe.clone(),
            classify: self.classify.clone(),
            deliver: self.deliver.clone(),
        }
    }
}

/// The service of a [`PaceLayer`].
#[derive(Clone)]
pub struct PaceService<
    S,
    W = OneRequest,
    O = NoObserve,
    C = crate::classify::ErrorClassifier,
    D = AtResponse,
> {
    inner: S,
    shared: Arc<Shared>,
    weigh: W,
    observe: O,
    classify: C,
    deliver: D,
}

impl<S: fmt::Debug, W, O, C, D> fmt::Debug for PaceService<S, W, O, C, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaceService")
            .field("inner", &self.inner)
            .field("name", &self.shared.obs.name)
            .finish_non_exhaustive()
    }
}

impl<S, W, O, C, D, Req> Service<Req> for PaceService<S, W, O, C, D>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    W: Weigh<Req>,
    O: Observe<S::Response> + Clone,
    C: Classify<S::Response, S::Error> + Clone,
    D: Deliver<S::Response> + Clone,
{
    type Response = D::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, O, C, D>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let cost = self.weigh.weigh(&req);
        call_through(
            self.shared.clone(),
            &mut self.inner,
            cost,
            req,
            self.observe.clone(),
            self.classify.clone(),
            self.deliver.clone(),
        )
    }
}

/// Admits (or refuses) one call of `cost` through the pacer `shared` and
/// calls `inner` — the one call path of the single and the keyed pacer.
#[inline]
pub(crate) fn call_through<S, Req, O, C, D>(
    shared: Arc<Shared>,
    inner: &mut S,
    cost: Cost,
    req: Req,
    observe: O,
    classify: C,
    deliver: D,
) -> ResponseFuture<S, Req, O, C, D>
where
    S: Service<Req> + Clone,
{
    let now = Instant::now();
    let state = match shared.admit(&cost, now) {
        Admit::Now => State::Calling {
            fut: inner.call(req),
        },
        Admit::Queued(slot, seq) => waiting(&shared, inner, slot, seq, req, now),
        Admit::Rejected(r) => {
            shared.obs.rejected(&r);
            State::Rejected {
                rejected: Some(Box::new(r)),
            }
        }
    };
    ResponseFuture {
        state,
        shared,
        sent: now,
        cost,
        observe,
        classify,
        deliver,
    }
}

/// A place in line (out of line, so the reserve-and-go path stays small).
#[inline(never)]
fn waiting<S, Req>(
    shared: &Shared,
    inner: &S,
    slot: u32,
    seq: u64,
    req: Req,
    now: Instant,
) -> State<S, Req>
where
    S: Service<Req> + Clone,
{
    // A waiter must not hold the inner service's readiness: the service
    // polled ready stays for the next caller, and this call carries a fresh
    // clone that it polls ready once its turn has come. If that clone (the
    // caller's code) panics, the place in line goes with it: nobody would
    // ever take it out, and everyone behind would wait on it.
    let place = Place { shared, slot, seq };
    let svc = inner.clone();
    std::mem::forget(place);
    State::Waiting {
        waiting: Some(Box::new(Waiting {
            span: shared.obs.span("pace", "wait"),
            since: now,
            deadline: shared.max_wait.map(|m| crate::time::after(now, m)),
            admitted: false,
            slot,
            seq,
            svc,
            req: Some(req),
            sleep: None,
        })),
    }
}

/// A place in line not yet held by a future: left if dropped (a panic
/// before the future exists); forgotten once the future holds it.
struct Place<'a> {
    shared: &'a Shared,
    slot: u32,
    seq: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let mut parent = self.shared.parent.as_ref().map(|p| p.lock());
        st.leave(self.slot, self.seq, parent.as_deref_mut());
    }
}

/// What admission decided.
pub(crate) enum Admit {
    Now,
    Queued(u32, u64),
    Rejected(Rejected),
}

impl Shared {
    /// The refusal of a waiter past the pacer's `max_wait` (it has left the
    /// line): `retry_after` is how much longer than `max_wait` a call coming
    /// now would wait (1 µs when it would not).
    fn overdue(
        &self,
        st: &super::state::State,
        parent: Option<&super::state::State>,
        cost: &Cost,
        now: Instant,
        waited: Duration,
    ) -> Refusal {
        let max = self.max_wait.unwrap_or(Duration::ZERO);
        let fresh = st
            .peek_start(cost, now, parent)
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        Refusal {
            late: fresh.saturating_sub(max),
            parent: false,
            detail: format!(
                "waited {} in line, max_wait {}",
                crate::time::Human(waited),
                crate::time::Human(max)
            ),
        }
    }

    /// Reserve now, join the line, or refuse (cost above a burst, or a wait
    /// above `max_wait`, with the exact `retry_after`).
    pub(crate) fn admit(&self, cost: &Cost, now: Instant) -> Admit {
        let rejected = |detail: String| {
            Rejected::new("pace", RejectKind::BudgetExceeded)
                .with_name_opt(self.obs.name.as_ref())
                .with_detail(detail)
        };
        // The time since the epoch is converted before any lock: a critical
        // section is the cells' arithmetic, not the clock's.
        let since = now.saturating_duration_since(self.epoch);
        // The healthy path of a pacer of one or two cells: one
        // compare-and-swap, no lock (see `fast`).
        if self.try_lock_free(cost, since) {
            return Admit::Now;
        }
        // That of any other pacer without a parent: one pass under the lock.
        let n = self.parent.is_none().then(|| super::tick::of(since));
        let mut st = self.lock();
        if n.is_some_and(|n| !st.closed && st.try_rolling(cost, now, n)) {
            return Admit::Now;
        }
        if st.closed {
            return Admit::Rejected(
                Rejected::new("pace", RejectKind::ShuttingDown)
                    .with_name_opt(self.obs.name.as_ref()),
            );
        }
        // Events are emitted once the lock is released (a listener may call
        // back into the pacer).
        let resumed = st.resume_if_due(now);
        let mut queued_at = None;
        let decision = 'decide: {
            // Against the configured burst: a lower limit the upstream announced
            // makes a call wait longer, never refused for good (the next answer
            // may announce more).
            let mut parent = self.parent.as_ref().map(|p| p.lock());
            // Named after the pacer whose burst it is (a keyed pacer's own, or
            // the shared one).
            let never = st.never_fits(cost).map(|x| (x, self)).or_else(|| {
                let p = self.parent.as_deref()?;
                parent
                    .as_deref()
                    .and_then(|st| st.never_fits(cost))
                    .map(|x| (x, p))
            });
            if let Some(((n, dim), whose)) = never {
                let unit = dim.unit.as_str();
                break 'decide Admit::Rejected(
                    Rejected::new("pace", RejectKind::BudgetExceeded)
                        .with_name_opt(whose.obs.name.as_ref())
                        .with_detail(format!(
                            "a cost of {n} {unit} can never fit a burst of {} per {}",
                            dim.largest_cost,
                            crate::time::Human(dim.per)
                        )),
                );
            }
            // Nobody waiting and room now: reserved, nothing else to decide
            // (a call that waits for nothing passes every `max_wait`).
            if st.try_fast(cost, now, parent.as_deref_mut()) {
                break 'decide Admit::Now;
            }
            // A limit with a max wait of its own (a spend budget): refused
            // when it could not take the call soon enough — here or on the
            // shared cells, whichever keeps it longest.
            if let Some(r) = st.budget_refusal_with(cost, now, parent.as_deref()) {
                let whose = match (&self.parent, r.parent) {
                    (Some(p), true) => &**p,
                    _ => self,
                };
                break 'decide Admit::Rejected(
                    Rejected::new("pace", RejectKind::BudgetExceeded)
                        .with_name_opt(whose.obs.name.as_ref())
                        .with_detail(r.detail.clone())
                        .with_retry_after(r.retry_after()),
                );
            }
            match st.try_now(cost, now, parent.as_deref_mut()) {
                Fit::Now => Admit::Now,
                Fit::At(start) => {
                    let wait = start.saturating_duration_since(now);
                    match self.past_max_wait(wait) {
                        Some(max) => Admit::Rejected(
                            rejected(format!(
                                "would wait {}, max_wait {}",
                                crate::time::Human(wait),
                                crate::time::Human(max)
                            ))
                            .with_retry_after(wait - max),
                        ),
                        None => {
                            queued_at = Some(st.line_len());
                            let (slot, seq) = st.enqueue(*cost, now);
                            Admit::Queued(slot, seq)
                        }
                    }
                }
            }
        };
        drop(st);
        if resumed {
            self.obs.emit("pace", EventKind::PaceResumed);
        }
        if let Some(position) = queued_at {
            self.obs.emit("pace", EventKind::Queued { position });
        }
        decision
    }
}

struct Waiting<S, Req> {
    /// `semaforo.wait`, entered while this call waits.
    span: tracing::Span,
    /// When it arrived.
    since: Instant,
    /// `since + max_wait`: a call still in line then, or whose start is
    /// projected past it, is refused (what joined on an estimate may wait
    /// longer: a 429's pause, a debt, a calendar window that packs calls).
    deadline: Option<Instant>,
    admitted: bool,
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
pub struct ResponseFuture<S: Service<Req>, Req, O, C, D = AtResponse> {
    #[pin]
    state: State<S, Req>,
    shared: Arc<Shared>,
    /// When the call was sent (what the upstream's counts refer to).
    sent: Instant,
    cost: Cost,
    observe: O,
    classify: C,
    deliver: D,
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
impl<S: Service<Req>, Req, O, C, D> PinnedDrop for ResponseFuture<S, Req, O, C, D> {
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        if let StateProj::Waiting { waiting: Some(w) } = this.state.project() {
            let mut st = this.shared.lock();
            let mut parent = this.shared.parent.as_ref().map(|p| p.lock());
            st.leave(w.slot, w.seq, parent.as_deref_mut());
        }
    }
}

impl<S: Service<Req>, Req, O, C, D> fmt::Debug for ResponseFuture<S, Req, O, C, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("pace::ResponseFuture")
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl<S, Req, O, C, D> Future for ResponseFuture<S, Req, O, C, D>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    O: Observe<S::Response>,
    C: Classify<S::Response, S::Error>,
    D: Deliver<S::Response>,
{
    type Output = Result<D::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Rejected { rejected } => {
                    return Poll::Ready(Err(crate::error::take_rejection(rejected, "pace")))
                }
                StateProj::Waiting { waiting } => {
                    let Some(w) = waiting.as_mut() else {
                        return Poll::Ready(Err(crate::error::polled_after_done("pace")));
                    };
                    let _in_span = w.span.clone().entered();
                    let now = Instant::now();
                    let (turn, resumed) = {
                        let mut st = this.shared.lock();
                        // A caller that had its turn (reserved, now readying
                        // the inner service) is past the line: it goes on.
                        if st.closed && !w.admitted {
                            let mut parent = this.shared.parent.as_ref().map(|p| p.lock());
                            st.leave(w.slot, w.seq, parent.as_deref_mut());
                            drop(parent);
                            drop(st);
                            *waiting = None;
                            let r = Rejected::new("pace", RejectKind::ShuttingDown)
                                .with_name_opt(this.shared.obs.name.as_ref());
                            this.shared.obs.rejected(&r);
                            return Poll::Ready(Err(r.into()));
                        }
                        let mut parent = this.shared.parent.as_ref().map(|p| p.lock());
                        let mut turn =
                            st.poll_turn(w.slot, w.seq, cx.waker(), now, parent.as_deref_mut());
                        // The pacer's `max_wait` counts from arrival.
                        if let (Err(Turn::Wait(at)), Some(deadline)) = (&turn, w.deadline) {
                            let late = match at {
                                Some(at) => *at > deadline,
                                None => now >= deadline,
                            };
                            if late {
                                st.leave(w.slot, w.seq, parent.as_deref_mut());
                                turn = Err(Turn::Refused(this.shared.overdue(
                                    &st,
                                    parent.as_deref(),
                                    this.cost,
                                    now,
                                    now.saturating_duration_since(w.since),
                                )));
                            }
                        }
                        let resumed = turn.is_ok() && st.resume_if_due(now);
                        (turn, resumed)
                    };
                    if resumed {
                        this.shared.obs.emit("pace", EventKind::PaceResumed);
                    }
                    match turn {
                        Err(Turn::Refused(r)) => {
                            *waiting = None;
                            let whose = match (&this.shared.parent, r.parent) {
                                (Some(p), true) => &**p,
                                _ => &**this.shared,
                            };
                            let after = r.retry_after();
                            let rejected = Rejected::new("pace", RejectKind::BudgetExceeded)
                                .with_name_opt(whose.obs.name.as_ref())
                                .with_detail(r.detail)
                                .with_retry_after(after);
                            this.shared.obs.rejected(&rejected);
                            return Poll::Ready(Err(rejected.into()));
                        }
                        Ok(()) => {
                            if !w.admitted {
                                w.admitted = true;
                                // Reserved now: the window its cost is
                                // charged to (not when the inner service
                                // is ready, which may be later).
                                *this.sent = now;
                                this.shared.obs.emit(
                                    "pace",
                                    EventKind::Admitted {
                                        waited: now - w.since,
                                    },
                                );
                            }
                        }
                        Err(Turn::Wait(at)) => {
                            // Woken by the line, at its projected start (not
                            // past the deadline: refused above), or at the
                            // deadline.
                            let Some(at) = at.or(w.deadline) else {
                                return Poll::Pending;
                            };
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
                        return Poll::Ready(Err(crate::error::polled_after_done("pace")));
                    };
                    let fut = w.svc.call(req);
                    *waiting = None;
                    this.state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => {
                    let mut result = ready!(fut.poll(cx));
                    // Answered: polled again, an error — the call is not
                    // classified nor reconciled twice.
                    this.state.set(State::Rejected { rejected: None });
                    let class = this
                        .classify
                        .classify_and_carry(result.as_mut().map_err(|e| &*e));
                    let observed = result.as_ref().ok().map(|r| this.observe.observe(r));
                    let nothing_to_learn = class.is_success()
                        && !this
                            .shared
                            .slowed
                            .load(std::sync::atomic::Ordering::Relaxed)
                        && observed.is_none_or(|o| o.usage.is_none() && o.info.is_none());
                    let (shared, estimate, delivery) = (&*this.shared, *this.cost, &*this.deliver);
                    let charged = *this.sent;
                    // `estimate`: what the call stands charged for when the
                    // delivery reconciles it later (a streamed usage).
                    let deliver = |res, estimate| {
                        delivery.deliver(
                            res,
                            PendingRef {
                                shared,
                                estimate,
                                charged,
                            },
                        )
                    };
                    if nothing_to_learn {
                        // The healthy path takes no lock on the way out.
                        return Poll::Ready(
                            result.map(|r| deliver(r, estimate)).map_err(Into::into),
                        );
                    }
                    let mut st = this.shared.lock();
                    let mut paused = None;
                    let mut resumed = false;
                    let now = Instant::now();
                    // What the call really cost, settled once, here and on a
                    // parent: a 429 gives its tokens back (`throttled`); else
                    // the usage the response reports, or the estimate; a
                    // call that failed is not billed: no spend (its tokens
                    // stand: the upstream may have counted them). Settling
                    // a 429's usage too gave its tokens back twice.
                    let throttled = matches!(class, Class::Throttled { .. });
                    let settled = (!throttled)
                        .then(|| {
                            let real = observed.as_ref().and_then(|o| o.usage);
                            let cost = real.unwrap_or(*this.cost);
                            if class.is_success() {
                                cost
                            } else {
                                cost.with_spend(0)
                            }
                        })
                        .filter(|c| c != this.cost);
                    match class {
                        Class::Throttled { retry_after } => {
                            let info = observed.as_ref().and_then(|o| o.info.as_ref());
                            (resumed, paused) =
                                st.throttled(retry_after, this.cost, info, now, charged)
                        }
                        Class::Success => st.succeeded(now),
                        _ => {}
                    }
                    if let Some(real) = &settled {
                        st.reconcile(this.cost, real, now, charged);
                    }
                    this.shared
                        .slowed
                        .store(st.is_slowed(), std::sync::atomic::Ordering::Relaxed);
                    if let Some(info) = observed.as_ref().and_then(|o| o.info.as_ref()) {
                        st.learn(info, now, *this.sent);
                    }
                    drop(st);
                    // A pacer shared below keyed ones counts the same cost.
                    if let Some(parent) = &this.shared.parent {
                        let mut p = parent.lock();
                        if throttled {
                            p.reconcile(
                                this.cost,
                                &Cost::requests(this.cost.requests),
                                now,
                                charged,
                            );
                        } else if let Some(real) = &settled {
                            p.reconcile(this.cost, real, now, charged);
                        }
                    }
                    if resumed {
                        this.shared.obs.emit("pace", EventKind::PaceResumed);
                    }
                    if let Some(pause) = paused {
                        this.shared.obs.emit(
                            "pace",
                            EventKind::PacePaused {
                                pause,
                                reason: crate::observe::PauseReason::Throttled,
                            },
                        );
                    }
                    // A later reconcile starts from what was settled here,
                    // not from the estimate again.
                    let stands = if throttled {
                        Cost::requests(estimate.requests)
                    } else {
                        settled.unwrap_or(estimate)
                    };
                    return Poll::Ready(result.map(|r| deliver(r, stands)).map_err(Into::into));
                }
            }
        }
    }
}

crate::inner_access!([S, W, O, C, D] PaceService<S, W, O, C, D>);

use super::wait::Turn;
use super::{PlanId, Shared};
use crate::error::{BoxError, RejectKind, Rejected};
use crate::observe::EventKind;
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

/// Where a request's key and plan come from. Implemented for every
/// `Fn(&Req) -> (K, PlanId)` and for [`HeaderKey`].
pub trait QuotaKey<Req, K> {
    /// The key and plan of `req`.
    fn key(&self, req: &Req) -> (K, PlanId);
}

impl<Req, K, F: Fn(&Req) -> (K, PlanId)> QuotaKey<Req, K> for F {
    #[inline]
    fn key(&self, req: &Req) -> (K, PlanId) {
        self(req)
    }
}

/// The key is an `http::Request` header (an API key, a user id), every key on
/// one plan; requests without the header share the key `"anonymous"`. A
/// value that is not visible ASCII (obs-text bytes) is its own key too: its
/// bytes escaped after a NUL, which no header value holds, so it never
/// shares a key with another value.
#[cfg(feature = "http")]
#[derive(Debug, Clone)]
pub struct HeaderKey {
    header: http::HeaderName,
    plan: PlanId,
}

#[cfg(feature = "http")]
impl HeaderKey {
    /// Keys from `header` (e.g. `x-api-key`) on `plan`.
    pub fn new(header: http::HeaderName, plan: PlanId) -> Self {
        HeaderKey { header, plan }
    }
}

#[cfg(feature = "http")]
impl<B> QuotaKey<http::Request<B>, String> for HeaderKey {
    fn key(&self, req: &http::Request<B>) -> (String, PlanId) {
        let key = match req.headers().get(&self.header) {
            None => "anonymous".to_owned(),
            Some(v) => match v.to_str() {
                Ok(s) => s.to_owned(),
                Err(_) => format!("\0{}", v.as_bytes().escape_ascii()),
            },
        };
        (key, self.plan)
    }
}

/// Every call costs 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitCost;

/// What a call costs against its quota.
pub trait QuotaCost<Req> {
    /// The cost of `req` (0 is free: admitted without a check).
    fn cost(&self, req: &Req) -> u32;
}

impl<Req> QuotaCost<Req> for UnitCost {
    #[inline]
    fn cost(&self, _: &Req) -> u32 {
        1
    }
}

impl<Req, F: Fn(&Req) -> u32> QuotaCost<Req> for F {
    fn cost(&self, req: &Req) -> u32 {
        self(req)
    }
}

/// The tower [`Layer`] of a [`Quota`](super::Quota).
#[must_use = "a layer does nothing until it wraps a service"]
pub struct QuotaLayer<K: Hash + Eq + Clone, F, W> {
    /// `None`: a pass-through (a preset with its quota switched off).
    shared: Option<Arc<Shared<K>>>,
    key: F,
    cost: W,
}

impl<K: Hash + Eq + Clone, F: Clone, W: Clone> Clone for QuotaLayer<K, F, W> {
    fn clone(&self) -> Self {
        QuotaLayer {
            shared: self.shared.clone(),
            key: self.key.clone(),
            cost: self.cost.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone, F, W> fmt::Debug for QuotaLayer<K, F, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaLayer")
            .field("name", &self.shared.as_ref().map(|s| &s.obs.name))
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, F> QuotaLayer<K, F, UnitCost> {
    pub(crate) fn new(shared: Arc<Shared<K>>, key: F) -> Self {
        QuotaLayer {
            shared: Some(shared),
            key,
            cost: UnitCost,
        }
    }

    /// A layer that admits everything: the quota slot of a preset, switched off.
    pub fn pass_through(key: F) -> Self {
        QuotaLayer {
            shared: None,
            key,
            cost: UnitCost,
        }
    }
}

impl<K: Hash + Eq + Clone, F, W> QuotaLayer<K, F, W> {
    /// Weighs each request (e.g. tokens or items in a batch).
    pub fn cost<W2>(self, cost: W2) -> QuotaLayer<K, F, W2> {
        QuotaLayer {
            shared: self.shared,
            key: self.key,
            cost,
        }
    }
}

impl<S, K: Hash + Eq + Clone, F: Clone, W: Clone> Layer<S> for QuotaLayer<K, F, W> {
    type Service = QuotaService<S, K, F, W>;

    fn layer(&self, inner: S) -> Self::Service {
        QuotaService {
            inner,
            shared: self.shared.clone(),
            key: self.key.clone(),
            cost: self.cost.clone(),
        }
    }
}

/// The service of a [`QuotaLayer`].
pub struct QuotaService<S, K: Hash + Eq + Clone, F, W> {
    inner: S,
    shared: Option<Arc<Shared<K>>>,
    key: F,
    cost: W,
}

impl<S: Clone, K: Hash + Eq + Clone, F: Clone, W: Clone> Clone for QuotaService<S, K, F, W> {
    fn clone(&self) -> Self {
        QuotaService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            key: self.key.clone(),
            cost: self.cost.clone(),
        }
    }
}

impl<S: fmt::Debug, K: Hash + Eq + Clone, F, W> fmt::Debug for QuotaService<S, K, F, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
thread_local! {
    /// Run once by this thread's next [`Shared::check`] between the global
    /// limit's look and its key's take (tests: the race a lost global take
    /// comes from, made deterministic).
    pub(crate) static BETWEEN_LOOK_AND_TAKE: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

#[cfg(test)]
fn between_look_and_take() {
    if let Some(f) = BETWEEN_LOOK_AND_TAKE.with(|h| h.borrow_mut().take()) {
        f()
    }
}

/// Units a line holds for a key's plan and for the global limit (a call
/// whose key paid already counts in the second only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Units {
    pub(crate) key: u64,
    pub(crate) global: u64,
}

impl Units {
    /// These and a call of `cost` (`paid`: its key's units are taken).
    pub(crate) fn and(self, cost: u32, paid: bool) -> Units {
        let cost = u64::from(cost);
        Units {
            key: if paid {
                self.key
            } else {
                self.key.saturating_add(cost)
            },
            global: self.global.saturating_add(cost),
        }
    }
}

/// Why a cost does not fit now.
pub(crate) enum Refusal {
    /// It fits after this long (`true`: the global limit is the one short).
    Wait(Duration, bool),
    /// It can never fit (already counted and described).
    Never(Rejected),
    /// Its key's units were taken, then the global limit refused it for
    /// this long: another call took the global room between this one's
    /// look and its take. What is left to take is the global limit's
    /// ([`Shared::check_paid`]), never the key's again.
    Paid(Duration),
}

impl<K: Hash + Eq + Clone> Shared<K> {
    /// Admits `cost` for `key` on `plan` and the global limit, or refuses.
    #[inline]
    pub(crate) fn admit(&self, key: &K, plan: PlanId, cost: u32) -> Result<(), Rejected> {
        self.tick();
        match self.check(key, plan, cost) {
            Ok(()) => Ok(()),
            Err(Refusal::Wait(wait, global)) => {
                Err(self.told(self.refusal(plan, global, wait, "")))
            }
            Err(Refusal::Paid(wait)) => Err(self.told(self.refusal(plan, true, wait, ""))),
            Err(Refusal::Never(r)) => Err(self.told(r)),
        }
    }

    fn plan(&self, plan: PlanId) -> &super::Plan<K> {
        self.plans.get(plan.0).unwrap_or(&self.plans[0])
    }

    /// How long one unit of `plan` takes to refill.
    pub(crate) fn unit(&self, plan: PlanId) -> Duration {
        let rate = self.plan(plan).rate;
        let own = rate.per / rate.count;
        // A call of this key passes the global limit too: a line cannot
        // move faster than it refills (other keys take from it as well, so
        // this is still a floor).
        match &self.global {
            Some((_, cell)) => own.max(cell.unit()),
            None => own,
        }
    }

    /// A counted `QuotaExceeded` refusal of a cost that fits after `wait`.
    #[cold]
    pub(crate) fn refusal(
        &self,
        plan: PlanId,
        global: bool,
        wait: Duration,
        why: &'static str,
    ) -> Rejected {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let plan = self.plan(plan);
        let (policy, what) = match (&self.global, global) {
            (Some((policy, _)), true) => (policy, "global limit".to_owned()),
            _ => (&plan.policy, format!("plan '{}'", plan.name)),
        };
        let detail = if why.is_empty() {
            what
        } else {
            format!("{what}: {why}")
        };
        let r = Rejected::new("quota", RejectKind::QuotaExceeded)
            .with_name_opt(self.obs.name.as_ref())
            .with_policy(policy.clone())
            .with_detail(detail)
            .with_retry_after(wait);
        r
    }

    /// Tells the listeners of a refusal (never under a lock: a listener may
    /// call back into the quota) and hands it on.
    pub(crate) fn told(&self, r: Rejected) -> Rejected {
        self.obs.rejected(&r);
        r
    }

    /// Takes `cost` from `key`'s plan and the global limit, or refuses.
    ///
    /// The global limit is looked at first, taking nothing (a call it refuses
    /// touches no key), then the key's plan is taken, then the global limit
    /// (see the [module docs](super) for why nothing is ever given back). A
    /// call the global limit refuses is told the longer of its two waits:
    /// the key's plan is looked at too, taking nothing. The clock is read
    /// once, after the key's cell is found (see
    /// [`KeyedCells`](super::cell::KeyedCells) for why) — twice for a key
    /// without a cell, whose cell is made only once the global limit let
    /// the call through.
    #[inline]
    pub(crate) fn check(&self, key: &K, plan_id: PlanId, cost: u32) -> Result<(), Refusal> {
        if cost == 0 {
            return Ok(());
        }
        let plan = self.plan(plan_id);
        if cost > plan.rate.burst {
            return Err(self.never(plan, cost));
        }
        let cell = plan.cells.cell(key);
        let now = Instant::now();
        if let Some((policy, global)) = &self.global {
            if let Err(wait) = global.look(cost, now) {
                return Err(self.global_refusal(
                    policy,
                    global,
                    plan,
                    cell.as_ref(),
                    cost,
                    now,
                    wait,
                ));
            }
        }
        #[cfg(test)]
        between_look_and_take();
        match &cell {
            Some(held) => plan.cells.take(held, cost, now),
            None => {
                let held = plan.cells.cell_or_new(key);
                plan.cells.take(&held, cost, Instant::now())
            }
        }
        .map_err(|wait| Refusal::Wait(wait, false))?;
        drop(cell);
        if let Some((_, global)) = &self.global {
            global.take(cost, now).map_err(Refusal::Paid)?;
        }
        Ok(())
    }

    /// [`check`](Self::check), or for a call whose key's units were taken
    /// already (`paid`: [`Refusal::Paid`]) the global limit alone — refused
    /// as `Paid` again.
    pub(crate) fn check_paid(
        &self,
        key: &K,
        plan_id: PlanId,
        cost: u32,
        paid: bool,
    ) -> Result<(), Refusal> {
        match &self.global {
            Some((_, global)) if paid => global.take(cost, Instant::now()).map_err(Refusal::Paid),
            _ if paid => Ok(()),
            _ => self.check(key, plan_id, cost),
        }
    }

    /// `Err(Refusal::Never)` when no wait makes `cost` fit: above the
    /// plan's burst or the global limit's (counted and described).
    pub(crate) fn fits_ever(&self, plan_id: PlanId, cost: u32) -> Result<(), Refusal> {
        let plan = self.plan(plan_id);
        if cost > plan.rate.burst {
            return Err(self.never(plan, cost));
        }
        match &self.global {
            Some((policy, global)) if !global.fits(cost) => Err(self.never_global(policy, cost)),
            _ => Ok(()),
        }
    }

    /// How long until `units` fit `key`'s plan and the global limit, from
    /// their state now, taking nothing: the wait of a call behind `units`
    /// less its own cost in its key's line (exact for the key; for the
    /// global limit a floor, other keys take from it too). A call whose key
    /// paid already ([`Refusal::Paid`]) counts in the global units only.
    pub(crate) fn wait_for(&self, key: &K, plan_id: PlanId, units: Units) -> Duration {
        let plan = self.plan(plan_id);
        let n = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
        let cell = plan.cells.cell(key);
        let now = Instant::now();
        let own = plan.cells.look(cell.as_ref(), n(units.key), now).err();
        let global = self
            .global
            .as_ref()
            .and_then(|(_, g)| g.look(n(units.global), now).err());
        own.unwrap_or_default().max(global.unwrap_or_default())
    }

    /// The global limit's look refused `cost`: above its burst (never), or
    /// a wait — the longer of its own and the key's plan's (looked at,
    /// taking nothing), naming the limit that waits longer.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn global_refusal(
        &self,
        policy: &Arc<crate::error::RateLimitPolicy>,
        global: &super::cell::Cell,
        plan: &super::Plan<K>,
        cell: Option<&super::cell::Held<'_, K>>,
        cost: u32,
        now: Instant,
        wait: Duration,
    ) -> Refusal {
        // Above the global burst: no wait makes it fit.
        if !global.fits(cost) {
            return self.never_global(policy, cost);
        }
        match plan.cells.look(cell, cost, now) {
            Err(own) if own > wait => Refusal::Wait(own, false),
            _ => Refusal::Wait(wait, true),
        }
    }

    /// A cost above the global limit's burst: refused without `retry_after`.
    #[cold]
    fn never_global(&self, policy: &Arc<crate::error::RateLimitPolicy>, cost: u32) -> Refusal {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let r = Rejected::new("quota", RejectKind::QuotaExceeded)
            .with_name_opt(self.obs.name.as_ref())
            .with_policy(policy.clone())
            .with_detail(format!(
                "a cost of {cost} can never fit the global limit ({} per {})",
                policy.quota,
                crate::time::Human(policy.window)
            ));
        Refusal::Never(r)
    }

    #[cold]
    fn never(&self, plan: &super::Plan<K>, cost: u32) -> Refusal {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let r = Rejected::new("quota", RejectKind::QuotaExceeded)
            .with_name_opt(self.obs.name.as_ref())
            .with_policy(plan.policy.clone())
            .with_detail(format!(
                "a cost of {cost} can never fit plan '{}' (burst {})",
                plan.name, plan.rate.burst
            ));
        Refusal::Never(r)
    }
}

impl<S, K, F, W, Req> Service<Req> for QuotaService<S, K, F, W>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone,
    F: QuotaKey<Req, K>,
    W: QuotaCost<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, K>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let Some(shared) = &self.shared else {
            return ResponseFuture::called(self.inner.call(req));
        };
        let (key, plan) = self.key.key(&req);
        let cost = self.cost.cost(&req);
        let Some(max_wait) = shared.max_wait else {
            return match shared.admit(&key, plan, cost) {
                Ok(()) => ResponseFuture::called(self.inner.call(req)),
                Err(r) => ResponseFuture::rejected(r),
            };
        };
        self.call_waiting(req, key, plan, cost, max_wait)
    }
}

impl<S, K: Hash + Eq + Clone, F, W> QuotaService<S, K, F, W> {
    /// Wait mode, out of line so the fail-fast `call` stays small.
    #[inline(never)]
    fn call_waiting<Req>(
        &mut self,
        req: Req,
        key: K,
        plan: PlanId,
        cost: u32,
        max_wait: Duration,
    ) -> ResponseFuture<S, Req, K>
    where
        S: Service<Req> + Clone,
    {
        let Some(shared) = &self.shared else {
            return ResponseFuture::called(self.inner.call(req));
        };
        shared.tick();
        match shared
            .lines
            .admit_or_join(shared, &key, plan, cost, max_wait)
        {
            Ok(None) => ResponseFuture::called(self.inner.call(req)),
            Ok(Some(id)) => {
                // The ready service stays here; the waiter readies its own clone
                // once admitted (holding readiness through a wait could hold a
                // permit of an inner limiter).
                // If the clone (the caller's code) panics, the place in
                // line goes with it (nobody else would take it out).
                let place = Place {
                    shared,
                    key: &key,
                    id,
                };
                let svc = self.inner.clone();
                std::mem::forget(place);
                let now = Instant::now();
                ResponseFuture::waiting(Waiting {
                    span: shared.obs.span("quota", "wait"),
                    since: now,
                    shared: shared.clone(),
                    key,
                    plan,
                    id,
                    in_line: true,
                    svc,
                    req: Some(req),
                    sleep: crate::time::sleep_for(now, max_wait),
                    deadline: crate::time::after(now, max_wait),
                })
            }
            Err(r) => ResponseFuture::rejected(shared.told(r)),
        }
    }
}

/// The response future of [`QuotaService`].
///
/// Dropping it while it waits takes it out of its key's line (the next one
/// moves up).
#[pin_project]
pub struct ResponseFuture<S: Service<Req>, Req, K: Hash + Eq + Clone> {
    #[pin]
    state: State<S, Req, K>,
}

#[pin_project(project = Proj)]
enum State<S: Service<Req>, Req, K: Hash + Eq + Clone> {
    /// Admitted: the inner call.
    Called {
        #[pin]
        fut: S::Future,
    },
    /// In its key's line (boxed: the fast path's future stays small).
    Waiting {
        waiting: Pin<Box<Waiting<S, Req, K>>>,
    },
    /// Refused at once.
    Rejected { rejected: Option<Box<Rejected>> },
}

/// A call in its key's line.
#[pin_project(PinnedDrop)]
struct Waiting<S, Req, K: Hash + Eq + Clone> {
    /// `semaforo.wait`, entered while this call waits.
    span: tracing::Span,
    since: Instant,
    shared: Arc<Shared<K>>,
    key: K,
    plan: PlanId,
    id: u64,
    in_line: bool,
    svc: S,
    req: Option<Req>,
    deadline: Instant,
    /// Until the cost fits (at the front) or until the deadline (behind).
    #[pin]
    sleep: tokio::time::Sleep,
}

/// A place in a key's line not yet held by a [`Waiting`]: left if dropped
/// (a panic before the future exists); forgotten once the future holds it.
struct Place<'a, K: Hash + Eq + Clone> {
    shared: &'a Shared<K>,
    key: &'a K,
    id: u64,
}

impl<K: Hash + Eq + Clone> Drop for Place<'_, K> {
    fn drop(&mut self) {
        self.shared.lines.leave(self.key, self.id);
        self.shared.left.fetch_add(1, Ordering::Relaxed);
    }
}

#[pin_project::pinned_drop]
impl<S, Req, K: Hash + Eq + Clone> PinnedDrop for Waiting<S, Req, K> {
    fn drop(self: Pin<&mut Self>) {
        if self.in_line {
            // Left the line unanswered: neither admitted nor refused.
            self.shared.lines.leave(&self.key, self.id);
            self.shared.left.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<S: Service<Req>, Req, K: Hash + Eq + Clone> Waiting<S, Req, K> {
    /// Ready once admitted (`Ok`) or refused.
    fn poll_turn(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Rejected>> {
        let mut this = self.project();
        let _in_span = this.span.enter();
        loop {
            if !*this.in_line {
                return Poll::Ready(Ok(()));
            }
            let turn = this.shared.lines.poll_front(
                this.shared,
                this.key,
                *this.plan,
                *this.id,
                cx.waker(),
            );
            let now = Instant::now();
            match turn {
                Turn::Admitted => {
                    *this.in_line = false;
                    this.shared.obs.emit(
                        "quota",
                        EventKind::Admitted {
                            waited: now - *this.since,
                        },
                    );
                }
                Turn::Refused(r) => {
                    *this.in_line = false;
                    return Poll::Ready(Err(this.shared.told(r)));
                }
                Turn::Sleep(wait, global) => {
                    if crate::time::after(now, wait) > *this.deadline {
                        this.shared.lines.leave(this.key, *this.id);
                        *this.in_line = false;
                        let r = this
                            .shared
                            .refusal(*this.plan, global, wait, "max_wait reached");
                        return Poll::Ready(Err(this.shared.told(r)));
                    }
                    this.sleep.as_mut().reset(crate::time::after(now, wait));
                    if this.sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                Turn::Behind => {
                    if this.sleep.deadline() != *this.deadline {
                        this.sleep.as_mut().reset(*this.deadline);
                    }
                    if this.sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Its retry_after: when it would have been admitted
                    // (everything ahead of it and its own cost fitting).
                    let wait = this
                        .shared
                        .lines
                        .leave_behind(this.shared, this.key, *this.plan, *this.id)
                        .unwrap_or_else(|| this.shared.unit(*this.plan));
                    *this.in_line = false;
                    let r = this
                        .shared
                        .refusal(*this.plan, false, wait, "max_wait reached");
                    return Poll::Ready(Err(this.shared.told(r)));
                }
            }
        }
    }
}

impl<S: Service<Req>, Req, K: Hash + Eq + Clone> ResponseFuture<S, Req, K> {
    #[inline]
    fn called(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { fut },
        }
    }

    fn waiting(waiting: Waiting<S, Req, K>) -> Self {
        ResponseFuture {
            state: State::Waiting {
                waiting: Box::pin(waiting),
            },
        }
    }

    #[cold]
    fn rejected(r: Rejected) -> Self {
        ResponseFuture {
            state: State::Rejected {
                rejected: Some(Box::new(r)),
            },
        }
    }
}

impl<S: Service<Req>, Req, K: Hash + Eq + Clone> fmt::Debug for ResponseFuture<S, Req, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("quota::ResponseFuture")
            .finish_non_exhaustive()
    }
}

impl<S, Req, K> Future for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                Proj::Called { fut } => {
                    let out = ready!(fut.poll(cx));
                    // Answered: a later poll finds `Rejected` empty (an
                    // error; the inner future is not resumed).
                    state.set(State::Rejected { rejected: None });
                    return Poll::Ready(out.map_err(Into::into));
                }
                Proj::Waiting { waiting } => {
                    // A refusal or a failed readiness ends the call: the
                    // waiter goes (its request with it), and a later poll
                    // finds `Rejected` empty — an error, no call upstream.
                    if let Err(r) = ready!(waiting.as_mut().poll_turn(cx)) {
                        state.set(State::Rejected { rejected: None });
                        return Poll::Ready(Err(r.into()));
                    }
                    let w = waiting.as_mut().project();
                    if let Err(e) = ready!(w.svc.poll_ready(cx)) {
                        state.set(State::Rejected { rejected: None });
                        return Poll::Ready(Err(e.into()));
                    }
                    let Some(req) = w.req.take() else {
                        return Poll::Ready(Err(crate::error::polled_after_done("quota")));
                    };
                    let fut = w.svc.call(req);
                    state.set(State::Called { fut });
                }
                Proj::Rejected { rejected } => {
                    return Poll::Ready(Err(crate::error::take_rejection(rejected, "quota")))
                }
            }
        }
    }
}

crate::inner_access!([S, K: Hash + Eq + Clone, F, W] QuotaService<S, K, F, W>);

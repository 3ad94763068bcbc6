//! The router as a tower [`Service`] and its builder.

use super::Deployment;
use crate::backoff::{Backoff, Jitter};
use crate::classify::{Class, Classify, ErrorClassifier};
use crate::error::{BoxError, ConfigError, RejectKind, Rejected};
use crate::observe::{BreakerState, Event, EventKind, ListenerSlot, Observer, RouteReason};
use crate::pace::{NoKey, OneRequest, Outlook, PaceKey, Weigh};
use crate::retry::RetryBudget;
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower_service::Service;

/// Starts closer than this count as a tie (weights decide).
const TIE: Duration = Duration::from_millis(1);

/// The calls the hedge cap looks back on (both counts halve at it).
const HEDGE_WINDOW: u64 = 1_000;

/// Routes each call to the deployment that could start it soonest; see the
/// [module docs](super). Cheap to clone; clones share the deployments and
/// the weighted round robin.
pub struct Router<S, W = OneRequest, C = ErrorClassifier, K = NoKey> {
    inner: Arc<Inner<S>>,
    weigh: W,
    classify: C,
    key: K,
}

struct Inner<S> {
    name: Option<Arc<str>>,
    /// Every deployment is in one group (no group test per deployment).
    one_group: bool,
    observer: Observer,
    /// Before a retry of a deployment already tried.
    backoff: Option<Backoff>,
    /// What every attempt after a call's first draws from.
    budget: Option<Arc<RetryBudget>>,
    deployments: Vec<Deployment<S>>,
    /// Where a call starts.
    first_group: Arc<str>,
    /// A `Permanent` reason → the group its call moves to (once).
    fallbacks: Vec<(crate::classify::Permanent, Arc<str>)>,
    max_attempts: u32,
    deadline: Option<Duration>,
    /// Smooth weighted round robin among tied deployments (nginx's).
    current: Mutex<Vec<i64>>,
    hedge: Option<Hedge>,
    /// The largest share of calls hedged.
    hedge_share: f64,
    /// Calls, and hedges sent (for the hedge cap).
    calls: AtomicU64,
    hedged: AtomicU64,
    /// Recent latencies of successful attempts, per deployment (for a
    /// percentile hedge delay).
    latencies: Vec<Mutex<Latencies>>,
}

/// When a second attempt is sent to another deployment while the first has
/// not answered (see [`RouterBuilder::hedge`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hedge {
    /// After this long.
    After(Duration),
    /// After the deployment's latency at `quantile` (0 to 1) of its recent
    /// successful calls, once it has `warm_up` of them (before: no hedge).
    Percentile {
        /// E.g. 0.9 for the p90.
        quantile: f64,
        /// Calls seen before hedging starts.
        warm_up: u32,
    },
}

/// The last latencies of a deployment (a ring of 256).
#[derive(Debug, Default)]
struct Latencies {
    ring: Vec<Duration>,
    next: usize,
    seen: u64,
}

const LATENCIES: usize = 256;

impl Latencies {
    fn record(&mut self, d: Duration) {
        if self.ring.len() < LATENCIES {
            self.ring.push(d);
        } else {
            self.ring[self.next] = d;
        }
        self.next = (self.next + 1) % LATENCIES;
        self.seen = self.seen.saturating_add(1);
    }

    fn quantile(&self, q: f64) -> Option<Duration> {
        if self.ring.is_empty() {
            return None;
        }
        let mut v = self.ring.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * q.clamp(0.0, 1.0)).round() as usize;
        v.get(i).copied()
    }
}

impl<S, W: Clone, C: Clone, K: Clone> Clone for Router<S, W, C, K> {
    fn clone(&self) -> Self {
        Router {
            inner: self.inner.clone(),
            weigh: self.weigh.clone(),
            classify: self.classify.clone(),
            key: self.key.clone(),
        }
    }
}

impl<S, W, C, K> fmt::Debug for Router<S, W, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.inner.deployments.iter().map(|d| d.name()).collect();
        f.debug_struct("Router")
            .field("name", &self.inner.name)
            .field("deployments", &names)
            .finish_non_exhaustive()
    }
}

/// Builder for [`Router`]; [`build`](Self::build) validates it.
#[must_use = "call .build() to get a Router"]
pub struct RouterBuilder<S, W = OneRequest, C = ErrorClassifier, K = NoKey> {
    name: Option<Arc<str>>,
    deployments: Vec<Deployment<S>>,
    first_group: Option<Arc<str>>,
    fallbacks: Vec<(crate::classify::Permanent, Arc<str>)>,
    max_attempts: u32,
    deadline: Option<Duration>,
    hedge: Option<(Hedge, f64)>,
    backoff: Option<Option<Backoff>>,
    budget: Option<Arc<RetryBudget>>,
    listener: ListenerSlot,
    weigh: W,
    classify: C,
    key: K,
}

impl<S, W, C, K> fmt::Debug for RouterBuilder<S, W, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterBuilder")
            .field("name", &self.name)
            .field("deployments", &self.deployments.len())
            .finish_non_exhaustive()
    }
}

impl<S> Router<S> {
    /// Starts a builder: give it deployments, and how a request is weighed
    /// (the cost its pacers would charge) and a result classified.
    pub fn builder() -> RouterBuilder<S> {
        RouterBuilder {
            name: None,
            deployments: Vec::new(),
            first_group: None,
            fallbacks: Vec::new(),
            max_attempts: 3,
            deadline: None,
            hedge: None,
            backoff: None,
            budget: None,
            listener: ListenerSlot::default(),
            weigh: OneRequest,
            classify: ErrorClassifier,
            key: NoKey,
        }
    }
}

impl<S, W, C, K> RouterBuilder<S, W, C, K> {
    /// Names the router in errors.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` for every event of the router (layer `"route"`): each
    /// attempt sent ([`EventKind::Routed`](crate::observe::EventKind::Routed):
    /// which deployment, why — first, failed over, fell back, hedge), each
    /// hedged call answered (`HedgeSettled`: by the hedge or not), and its
    /// refusals. Listeners add up.
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// Adds a deployment.
    pub fn deployment(mut self, d: Deployment<S>) -> Self {
        self.deployments.push(d);
        self
    }

    /// The group calls start in (default: the first deployment's).
    pub fn group(mut self, group: impl Into<Arc<str>>) -> Self {
        self.first_group = Some(group.into());
        self
    }

    /// A `Permanent` answer of `reason` moves the call to the deployments
    /// of `group`, once per call (e.g. `ContextLengthExceeded` → a
    /// long-context group); any other `Permanent` answer is returned as
    /// it is. The move is one more attempt, within `max_attempts`.
    pub fn fallback(
        mut self,
        reason: crate::classify::Permanent,
        group: impl Into<Arc<str>>,
    ) -> Self {
        self.fallbacks.push((reason, group.into()));
        self
    }

    /// Attempts per call, the first included (default 3; at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The longest a call may take, from the router's `call` to its answer
    /// (for a stream: its response, or its first chunk with
    /// `FirstChunkLayer`, feature `http`; the rest of the stream is bounded
    /// by the deployment's own stream timeouts):
    /// waits in a deployment's line, attempts and failovers included
    /// (default: none). A call whose earliest start is beyond it is refused
    /// at once (`BudgetExceeded` with the exact `retry_after`: the time
    /// until that start); one still
    /// running at it ends with `Timeout`.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Hedging: when the first attempt has not answered after `when`, a
    /// second goes to another deployment of the group — only one whose
    /// breaker is closed and whose pacer can start it **now** (a hedge never
    /// waits, and never makes anyone wait) — and the first answer wins, the
    /// other is dropped (its reservation stays charged: the upstream counted
    /// it). A failed answer while the other attempt runs waits for that
    /// one. At most `max_share` (in (0, 1]) of the recent calls are hedged
    /// (plus one: a fresh router may hedge its first late call; the counts
    /// halve whenever the calls counted reach 1,000 — the cap looks back on
    /// the last 500 to 1,000 calls), and a hedge counts as an attempt (within
    /// `max_attempts`). Only a first attempt is hedged.
    ///
    /// Hedging as in Dean and Barroso, "The Tail at Scale" (CACM 2013):
    /// hedged requests sent after the 95th-percentile latency cut the tail
    /// for a few percent more calls.
    ///
    /// ```
    /// # use semaforo::route::{Hedge, Router, Deployment};
    /// # use std::time::Duration;
    /// # fn f<S: Clone>(a: Deployment<S>, b: Deployment<S>) {
    /// let router = Router::builder()
    ///     .deployment(a)
    ///     .deployment(b)
    ///     .hedge(Hedge::Percentile { quantile: 0.95, warm_up: 20 }, 0.05)
    ///     .build();
    /// # }
    /// ```
    pub fn hedge(mut self, when: Hedge, max_share: f64) -> Self {
        self.hedge = Some((when, max_share));
        self
    }

    /// The wait before an attempt goes back to a deployment already tried
    /// (every one of the group was): by the last failure's class, as the
    /// retry layer's (default: exponential from 100 ms, capped at 5 s, full
    /// jitter), and never before that deployment's own `Retry-After` (kept
    /// per deployment for the call; the deployment whose wait ends soonest
    /// is the one chosen). Failing over to a deployment not tried yet never
    /// waits but for its pacer. `None`: no backoff (a `Retry-After` is still
    /// waited for).
    pub fn backoff(mut self, backoff: Option<Backoff>) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// One retry budget for every attempt after a call's first — failover,
    /// fallback and retry alike (hedges have their own cap): each call
    /// deposits, each further attempt withdraws, and a call whose budget is
    /// spent ends with its last answer. Share the `Arc` with other layers to
    /// bound them together. A move off a deployment not ready by the hedge
    /// delay (see the [module docs](super)) sends nothing twice: it draws
    /// on neither this budget nor the hedge cap.
    pub fn retry_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The cost of a request, as the deployments' pacers weigh it (they
    /// are asked when a call of this cost could start).
    pub fn weigh<W2>(self, weigh: W2) -> RouterBuilder<S, W2, C, K> {
        self.retyped(|_, c, k| (weigh, c, k))
    }

    /// How a result is classified (what fails over).
    pub fn classify<C2>(self, classify: C2) -> RouterBuilder<S, W, C2, K> {
        self.retyped(|w, _, k| (w, classify, k))
    }

    /// The key of a request, for deployments paced by a
    /// [`KeyedPace`](crate::pace::KeyedPace) (one pacer per model): each is
    /// asked when a call could start under this key (or the deployment's
    /// own, [`Deployment::key`]). E.g. [`llm::ModelField`](crate::llm::ModelField)
    /// (feature `llm`).
    pub fn key<K2>(self, key: K2) -> RouterBuilder<S, W, C, K2> {
        self.retyped(|w, c, _| (w, c, key))
    }

    /// The same builder with other weigh / classify / key types.
    fn retyped<W2, C2, K2>(
        self,
        f: impl FnOnce(W, C, K) -> (W2, C2, K2),
    ) -> RouterBuilder<S, W2, C2, K2> {
        let (weigh, classify, key) = f(self.weigh, self.classify, self.key);
        RouterBuilder {
            name: self.name,
            deployments: self.deployments,
            first_group: self.first_group,
            fallbacks: self.fallbacks,
            max_attempts: self.max_attempts,
            deadline: self.deadline,
            hedge: self.hedge,
            backoff: self.backoff,
            budget: self.budget,
            listener: self.listener,
            weigh,
            classify,
            key,
        }
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] on `deployments` (none, or two of one name),
    /// `weight` (0), `max_attempts` (0), `group` / `fallback` naming a
    /// group without deployments, or `hedge` (a `max_share` outside
    /// (0, 1], a quantile outside [0, 1]).
    pub fn build(self) -> Result<Router<S, W, C, K>, ConfigError> {
        if self.deployments.is_empty() {
            return Err(ConfigError::new(
                "router",
                "deployments",
                "add at least one",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "router",
                "max_attempts",
                "must be at least 1",
            ));
        }
        for (i, d) in self.deployments.iter().enumerate() {
            if d.weight == 0 {
                return Err(ConfigError::new(
                    "router",
                    "weight",
                    format!("deployment '{}' has weight 0", d.name),
                ));
            }
            if self.deployments[..i].iter().any(|e| e.name == d.name) {
                return Err(ConfigError::new(
                    "router",
                    "deployments",
                    format!("'{}' is given twice", d.name),
                ));
            }
        }
        let first_group = self
            .first_group
            .unwrap_or_else(|| self.deployments[0].group.clone());
        let known = |g: &str| self.deployments.iter().any(|d| &*d.group == g);
        for g in std::iter::once(&first_group).chain(self.fallbacks.iter().map(|(_, g)| g)) {
            if !known(g) {
                return Err(ConfigError::new(
                    "router",
                    "group",
                    format!("no deployment in group '{g}'"),
                ));
            }
        }
        if let Some((when, share)) = self.hedge {
            if !(share.is_finite() && share > 0.0 && share <= 1.0) {
                return Err(ConfigError::new(
                    "router",
                    "hedge",
                    format!("max_share must be in (0, 1], got {share}"),
                ));
            }
            if let Hedge::Percentile { quantile, .. } = when {
                if !(quantile.is_finite() && (0.0..=1.0).contains(&quantile)) {
                    return Err(ConfigError::new(
                        "router",
                        "hedge",
                        format!("quantile must be in [0, 1], got {quantile}"),
                    ));
                }
            }
        }
        let backoff = match self.backoff {
            Some(b) => b,
            None => Some(
                Backoff::exponential(Duration::from_millis(100))
                    .cap(Duration::from_secs(5))
                    .jitter(Jitter::Full)
                    .build()?,
            ),
        };
        let n = self.deployments.len();
        Ok(Router {
            inner: Arc::new(Inner {
                one_group: self
                    .deployments
                    .iter()
                    .all(|d| d.group == self.deployments[0].group),
                observer: Observer::new(self.name.clone(), self.listener.0),
                backoff,
                budget: self.budget,
                name: self.name,
                deployments: self.deployments,
                first_group,
                fallbacks: self.fallbacks,
                hedge: self.hedge.map(|(h, _)| h),
                hedge_share: self.hedge.map_or(0.0, |(_, share)| share),
                calls: AtomicU64::new(0),
                hedged: AtomicU64::new(0),
                latencies: (0..n).map(|_| Mutex::new(Latencies::default())).collect(),
                max_attempts: self.max_attempts,
                deadline: self.deadline,
                current: Mutex::new(vec![0; n]),
            }),
            weigh: self.weigh,
            classify: self.classify,
            key: self.key,
        })
    }
}

impl<S, W, C, K> Router<S, W, C, K> {
    /// The deployments, in the order given.
    pub fn deployments(&self) -> &[Deployment<S>] {
        &self.inner.deployments
    }

    /// Registers every deployment's bulkhead, breaker and pacer with `health`, named
    /// `name/deployment` (a keyed pacer's parts as
    /// [`Health::keyed_pace`](crate::health::Health::keyed_pace) names them
    /// under that prefix).
    ///
    /// ```
    /// use semaforo::breaker::Breaker;
    /// use semaforo::health::Health;
    /// use semaforo::route::{Deployment, Router};
    /// use semaforo::shutdown::Shutdown;
    ///
    /// # fn main() -> Result<(), semaforo::BoxError> {
    /// let d = |name: &'static str| -> Result<_, semaforo::BoxError> {
    ///     let svc = tower::service_fn(|_: ()| async { Ok::<_, std::io::Error>(()) });
    ///     Ok(Deployment::new(name, svc).breaker(Breaker::builder().build()?))
    /// };
    /// let router = Router::builder().deployment(d("a")?).deployment(d("b")?).build()?;
    /// let health = router.register_health(Health::new(&Shutdown::new()), "llm");
    /// let names: Vec<String> = health.report().components.into_iter().map(|c| c.name).collect();
    /// assert_eq!(names, ["llm/a", "llm/b"]);
    /// # Ok(()) }
    /// ```
    pub fn register_health(
        &self,
        health: crate::health::Health,
        name: &str,
    ) -> crate::health::Health {
        let mut h = health;
        for d in &self.inner.deployments {
            let part = format!("{name}/{}", d.name);
            if let Some(b) = &d.bulkhead {
                h = h.bulkhead(&part, b);
            }
            if let Some(b) = &d.breaker {
                h = h.breaker(&part, b);
            }
            if let Some(p) = &d.pace {
                h = h.keyed_pace(&part, p);
            }
        }
        h
    }
}

/// The deployments a call has tried: a bit set (one word up to 64
/// deployments, no allocation).
#[derive(Debug, Clone)]
enum Tried {
    Word(u64),
    Words(Vec<u64>),
}

impl Tried {
    fn new(n: usize) -> Tried {
        if n <= 64 {
            Tried::Word(0)
        } else {
            Tried::Words(vec![0; n.div_ceil(64)])
        }
    }

    fn get(&self, i: usize) -> bool {
        match self {
            Tried::Word(w) => i < 64 && w & (1u64 << i) != 0,
            Tried::Words(v) => v.get(i / 64).is_some_and(|w| w & (1u64 << (i % 64)) != 0),
        }
    }

    fn set(&mut self, i: usize) {
        match self {
            Tried::Word(w) if i < 64 => *w |= 1u64 << i,
            Tried::Word(_) => {}
            Tried::Words(v) => {
                if let Some(w) = v.get_mut(i / 64) {
                    *w |= 1u64 << (i % 64);
                }
            }
        }
    }

    fn clear(&mut self) {
        match self {
            Tried::Word(w) => *w = 0,
            Tried::Words(v) => v.iter_mut().for_each(|w| *w = 0),
        }
    }
}

/// What a call met before its next attempt is chosen.
#[derive(Clone, Copy)]
struct Past<'a> {
    /// The deployments already tried.
    tried: &'a Tried,
    /// The one that just failed (it loses its ties).
    avoid: Option<usize>,
    /// Each deployment's own `Retry-After`, as an instant.
    held: Option<&'a [Option<Instant>]>,
}

/// Where the next attempt goes, or why none can.
enum Choice {
    /// To this deployment, starting then; `true`: every deployment would
    /// refuse the call now, this one (the soonest) answers its refusal.
    Go(usize, Instant, bool),
    /// Every deployment is open or refuses the cost: the soonest one opens
    /// again after this long, if known.
    None {
        /// The soonest reopen of an open breaker, if known.
        reopens: Option<Duration>,
        /// A breaker was open (else every pacer refused the cost).
        open: bool,
    },
}

impl<S> Inner<S> {
    /// The deployment that could start `cost` soonest among those not
    /// `tried` (all of them once every one was tried), breakers open
    /// skipped; ties by smooth weighted round robin.
    fn choose(
        &self,
        cost: &crate::pace::Cost,
        key: Option<&str>,
        past: Past<'_>,
        group: &Arc<str>,
        now: Instant,
    ) -> Choice {
        let Past { tried, avoid, held } = past;
        let one_group = self.one_group;
        let in_group = |i: usize| {
            let g = &self.deployments[i].group;
            one_group || Arc::ptr_eq(g, group) || g == group
        };
        let n = self.deployments.len();
        let all_tried = (0..n).filter(|i| in_group(*i)).all(|i| tried.get(i));
        // Once every one was tried, any may take the call again; the one
        // that just failed (`avoid`) loses its ties.
        let candidate = |i: usize| in_group(i) && (all_tried || !tried.get(i));
        // A deployment's own `Retry-After` delays its start: the full scan.
        if held.is_none() {
            if let Some(go) = self.choose_fast(cost, key, &candidate, avoid, now) {
                return go;
            }
        }
        let mut starts: Vec<Option<Instant>> = Vec::with_capacity(self.deployments.len());
        let mut busy: Vec<usize> = Vec::new();
        let mut reopens: Option<Duration> = None;
        let mut open = false;
        for (i, d) in self.deployments.iter().enumerate() {
            if !candidate(i) {
                starts.push(None);
                continue;
            }
            // One atomic load; the snapshot (a lock) only for an open one.
            // An open breaker whose open time is over takes the call (its
            // half-open probe): it turns half-open only when called.
            if let Some(b) = d
                .breaker
                .as_ref()
                .filter(|b| b.effective_state() == BreakerState::Open)
            {
                let snap = b.snapshot();
                let forced = snap.mode == crate::breaker::Mode::ForcedOpen;
                if forced || snap.retry_after.is_some() {
                    // A forced-open breaker reopens only when told.
                    if let Some(ra) = snap.retry_after.filter(|_| !forced) {
                        reopens = Some(reopens.map_or(ra, |r| r.min(ra)));
                    }
                    open = true;
                    starts.push(None);
                    continue;
                }
            }
            // Whether the deployment's own layers would refuse a call
            // coming now (its breaker half-open with every probe place
            // taken, its pacer's `max_wait`, its bulkhead's line): it goes
            // after every deployment that would take it.
            let probing = d
                .breaker
                .as_ref()
                .is_some_and(crate::breaker::Breaker::probes_full);
            let (start, mut refuses) = match &d.pace {
                Some(p) => match p.outlook_at(d.key.as_deref().or(key), cost, now) {
                    Outlook::Never => (None, false),
                    Outlook::At(at) => (Some(at), false),
                    Outlook::Late(at) | Outlook::Refused(at) => (Some(at), true),
                },
                None => (Some(now), false),
            };
            // A busy bulkhead: later by about its line's wait.
            let start = match (&d.bulkhead, start) {
                (Some(b), Some(s)) if !b.free_now() => {
                    let (wait, refused) = b.outlook();
                    refuses |= refused;
                    Some(s.max(crate::time::after(now, wait)))
                }
                (_, s) => s,
            };
            // Not before the time its own `Retry-After` asked for.
            let start = match (start, held.and_then(|h| h.get(i).copied().flatten())) {
                (Some(s), Some(h)) => Some(s.max(h)),
                (s, _) => s,
            };
            starts.push(start);
            refuses |= probing;
            if refuses && start.is_some() {
                busy.push(i);
            }
        }
        // Every deployment refusing: the soonest of them, whose own layer
        // answers its refusal; else only those that would take the call.
        let all_busy = busy.len() == starts.iter().flatten().count();
        let takes = |i: usize| all_busy || !busy.contains(&i);
        let Some(first) = starts
            .iter()
            .enumerate()
            .filter(|(i, _)| takes(*i))
            .filter_map(|(_, s)| *s)
            .min()
        else {
            return Choice::None { reopens, open };
        };
        let mut tied: Vec<usize> = starts
            .iter()
            .enumerate()
            .filter(|(i, _)| takes(*i))
            .filter_map(|(i, s)| s.filter(|s| *s <= first + TIE).map(|_| i))
            .collect();
        if tied.len() > 1 {
            tied.retain(|i| Some(*i) != avoid);
        }
        // Among ties, the most preferred (lowest `preference`) first.
        if let Some(best) = tied.iter().map(|i| self.deployments[*i].preference).min() {
            tied.retain(|i| self.deployments[*i].preference == best);
        }
        let pick = if tied.len() == 1 {
            tied[0]
        } else {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            let total: i64 = tied
                .iter()
                .map(|i| i64::from(self.deployments[*i].weight))
                .sum();
            let mut best = tied[0];
            for &i in &tied {
                current[i] = current[i].saturating_add(i64::from(self.deployments[i].weight));
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] = current[best].saturating_sub(total);
            best
        };
        Choice::Go(pick, starts[pick].unwrap_or(now), all_busy)
    }

    /// The fast path: the deployment smooth weighted round robin would pick
    /// among every candidate; if its breaker is closed and its pacer can
    /// start the call now, nothing can start sooner, and the ties it is
    /// among are every candidate that can start now — the same pick as the
    /// full scan when all of them can. One pacer asked instead of all.
    fn choose_fast(
        &self,
        cost: &crate::pace::Cost,
        key: Option<&str>,
        candidate: &dyn Fn(usize) -> bool,
        avoid: Option<usize>,
        now: Instant,
    ) -> Option<Choice> {
        // Only the most preferred candidates: nothing that could tie with
        // the pick is preferred to it.
        let preferred = self
            .deployments
            .iter()
            .enumerate()
            .filter(|(i, _)| candidate(*i))
            .map(|(_, d)| d.preference)
            .min()?;
        let candidate = |i: usize| candidate(i) && self.deployments[i].preference == preferred;
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut best: Option<(usize, i64)> = None;
        let mut total: i64 = 0;
        for (i, d) in self.deployments.iter().enumerate() {
            if !candidate(i) {
                continue;
            }
            let w = i64::from(d.weight);
            total = total.saturating_add(w);
            let c = current[i].saturating_add(w);
            if best.is_none_or(|(_, bc)| c > bc) {
                best = Some((i, c));
            }
        }
        let (pick, _) = best?;
        if Some(pick) == avoid {
            return None;
        }
        let d = &self.deployments[pick];
        if d.breaker
            .as_ref()
            .is_some_and(|b| b.effective_state() != BreakerState::Closed)
            || d.bulkhead.as_ref().is_some_and(|b| !b.free_now())
        {
            return None;
        }
        let start = match &d.pace {
            // A key without its pacer yet: asked by the full scan (it builds
            // one to ask; not under the round robin's lock).
            Some(p) if p.unbuilt(d.key.as_deref().or(key)) => return None,
            Some(p) => match p.outlook_at(d.key.as_deref().or(key), cost, now) {
                Outlook::At(at) => at,
                Outlook::Never | Outlook::Late(_) | Outlook::Refused(_) => return None,
            },
            None => now,
        };
        // Within the tie window of now (the pacer reads its own clock).
        if start > now + TIE {
            return None;
        }
        for (i, d) in self.deployments.iter().enumerate() {
            if candidate(i) {
                current[i] = current[i].saturating_add(i64::from(d.weight));
            }
        }
        current[pick] = current[pick].saturating_sub(total);
        Some(Choice::Go(pick, start, false))
    }

    /// When the call to deployment `i` started at `at` should be hedged.
    fn hedge_at(&self, i: usize, at: Instant) -> Option<Instant> {
        let delay = match self.hedge? {
            Hedge::After(d) => d,
            Hedge::Percentile { quantile, warm_up } => {
                let l = self.latencies[i].lock().unwrap_or_else(|e| e.into_inner());
                if l.seen < u64::from(warm_up) {
                    return None;
                }
                l.quantile(quantile)?
            }
        };
        Some(crate::time::after(at, delay))
    }

    /// Whether attempts' latencies are kept (for a percentile hedge).
    fn tracks_latency(&self) -> bool {
        matches!(self.hedge, Some(Hedge::Percentile { .. }))
    }

    /// Tells an attempt sent to deployment `i`.
    #[inline]
    fn routed(&self, i: usize, attempt: u32, why: RouteReason) {
        // A first attempt is told at the `trace` level: with nobody
        // listening, nothing is built.
        if matches!(why, RouteReason::First)
            && self.observer.listener.is_none()
            && !cfg!(feature = "metrics")
            && !tracing::enabled!(target: "semaforo", tracing::Level::TRACE)
        {
            return;
        }
        self.observer.emit(
            "route",
            EventKind::Routed {
                deployment: self.deployments[i].name.clone(),
                attempt,
                why,
            },
        );
    }

    /// Whether one more hedge stays within the cap (counted when sent): at
    /// most `max_share` of the recent calls, plus one (a fresh router may
    /// hedge its first late call).
    fn hedge_room(&self) -> bool {
        let calls = self.calls.load(Ordering::Relaxed) as f64;
        let hedged = self.hedged.load(Ordering::Relaxed) as f64;
        // After this one: `hedged + 1 ≤ max_share · calls + 1`.
        !crate::num::exceeds(hedged, self.hedge_share * calls)
    }

    /// A refusal of the router's own, built by `build` from its kind and
    /// name, then told to its listener (as the caller gets it: detail and
    /// `retry_after` included).
    fn rejected(&self, kind: RejectKind, build: impl FnOnce(Rejected) -> Rejected) -> BoxError {
        let r = match &self.name {
            Some(n) => Rejected::new("route", kind).with_name(n.clone()),
            None => Rejected::new("route", kind),
        };
        let r = build(r);
        self.observer.rejected(&r);
        r.into()
    }
}

fn into_box<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

/// What the router does after an attempt of this class.
fn fails_over(class: &Class) -> bool {
    matches!(
        class,
        Class::Overloaded { .. }
            | Class::Transient
            | Class::Infrastructure
            | Class::Throttled { .. }
    )
}

/// The response future of [`Router`]: the attempt loop — choose, ready the
/// chosen deployment's service, call it, fail over by class. Dropping it at
/// any point drops the attempt in flight (a deployment's layers give back
/// what it held); nothing else is held between attempts.
#[pin_project]
pub struct RouteFuture<S: Service<Req>, Req, C> {
    inner: Arc<Inner<S>>,
    req: Req,
    cost: crate::pace::Cost,
    /// The request's pacer key.
    key: Option<Box<str>>,
    classify: C,
    tried: Tried,
    attempts: u32,
    /// The total deadline, if any (allocated only then).
    deadline: Option<(Instant, Pin<Box<tokio::time::Sleep>>)>,
    svc: Option<(usize, S)>,
    last: Option<Result<S::Response, BoxError>>,
    /// The group the call is routed in now, and the fallbacks it used.
    group: Arc<str>,
    fell_back: Vec<crate::classify::Permanent>,
    /// `S::Error` into a [`BoxError`], made where `S::Error: Into<BoxError>`
    /// is known: the future needs no such bound (rustc cannot prove it for
    /// `S::Error = BoxError` inside a spawned async block).
    boxed: fn(S::Error) -> BoxError,
    /// The deployment of the call in flight, and when it was sent (only
    /// when latencies are tracked, for a percentile hedge).
    current: (usize, Option<Instant>),
    /// When to hedge the call in flight.
    hedge_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The deployment of the hedge in flight, and when it was sent.
    hedging: (usize, Option<Instant>),
    /// The deployments of the hedged attempt and of its hedge, once sent.
    hedge_pair: Option<(usize, usize)>,
    /// Why the next attempt is sent (told in its `Routed` event).
    why: RouteReason,
    /// A failed answer kept while the other attempt of a hedge runs: its
    /// class and deployment.
    parked: Option<(Class, usize)>,
    /// The deployment that failed last, and how (the next attempt avoids
    /// it; a retry of a deployment already tried backs off by the class).
    last_failed: Option<(usize, Class)>,
    /// Each deployment's own `Retry-After`: not called again before this
    /// instant (allocated at the first one a call meets).
    held: Option<Box<[Option<Instant>]>>,
    /// Retries of deployments already tried, and the last backoff.
    retries: u32,
    prev_delay: Duration,
    /// The backoff before the attempt being readied.
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The output was given.
    done: bool,
    #[pin]
    call: Option<S::Future>,
    #[pin]
    hedge: Option<S::Future>,
}

impl<S: Service<Req>, Req, C> fmt::Debug for RouteFuture<S, Req, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteFuture")
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// Attempts started within one poll before the future yields (a
/// deployment failing at once must not hold the executor for
/// `max_attempts` calls).
const ATTEMPTS_PER_POLL: u32 = 16;

impl<S, Req, C> Future for RouteFuture<S, Req, C>
where
    S: Service<Req> + Clone,
    Req: Clone,
    C: Classify<S::Response, BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.done {
            return Poll::Ready(Err(crate::error::polled_after_done("route")));
        }
        let out = self.as_mut().attempts(cx);
        if out.is_ready() {
            *self.project().done = true;
        }
        out
    }
}

impl<S, Req, C> RouteFuture<S, Req, C>
where
    S: Service<Req> + Clone,
    Req: Clone,
    C: Classify<S::Response, BoxError>,
{
    /// The attempt loop.
    fn attempts(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<S::Response, BoxError>> {
        let mut this = self.project();
        let mut started = 0u32;
        loop {
            // The total deadline, while an attempt readies or runs.
            if this.svc.is_some() || this.call.is_some() || this.hedge.is_some() {
                if let Some((_, sleep)) = this.deadline.as_mut() {
                    if sleep.as_mut().poll(cx).is_ready() {
                        this.call.set(None);
                        this.hedge.set(None);
                        *this.svc = None;
                        return Poll::Ready(Err(this.inner.rejected(RejectKind::Timeout, |r| {
                            r.with_detail("the call's deadline passed".to_owned())
                        })));
                    }
                }
            }
            if this.call.is_some() || this.hedge.is_some() {
                let mut finished = None;
                if let Some(h) = this.hedge.as_mut().as_pin_mut() {
                    if let Poll::Ready(r) = h.poll(cx) {
                        finished = Some((r, *this.hedging, true));
                    }
                }
                if finished.is_none() {
                    if let Some(fut) = this.call.as_mut().as_pin_mut() {
                        if let Poll::Ready(r) = fut.poll(cx) {
                            finished = Some((r, *this.current, false));
                        }
                    }
                }
                // Hedge: the first attempt is late (its answer not in yet),
                // another deployment can start now.
                if finished.is_none() && this.hedge.is_none() && this.call.is_some() {
                    let late = this
                        .hedge_timer
                        .as_mut()
                        .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                    if late {
                        *this.hedge_timer = None;
                        let mut others = this.tried.clone();
                        others.set(this.current.0);
                        let now = Instant::now();
                        let choice = this.inner.choose(
                            this.cost,
                            this.key.as_deref(),
                            Past {
                                tried: &others,
                                avoid: Some(this.current.0),
                                held: this.held.as_deref(),
                            },
                            this.group,
                            now,
                        );
                        if let Choice::Go(i, start, false) = choice {
                            // Only to a closed breaker (a half-open one
                            // would spend a probe on a hedge).
                            let closed = this.inner.deployments[i]
                                .breaker
                                .as_ref()
                                .is_none_or(|b| b.effective_state() == BreakerState::Closed);
                            if i != this.current.0
                                && closed
                                && start <= now + TIE
                                && *this.attempts < this.inner.max_attempts
                                && this.inner.hedge_room()
                            {
                                let mut svc = this.inner.deployments[i].service.clone();
                                if let Poll::Ready(Ok(())) = svc.poll_ready(cx) {
                                    this.inner.hedged.fetch_add(1, Ordering::Relaxed);
                                    this.tried.set(i);
                                    *this.attempts += 1;
                                    *this.hedging = (i, Some(now));
                                    *this.hedge_pair = Some((this.current.0, i));
                                    this.inner.routed(
                                        i,
                                        *this.attempts,
                                        RouteReason::Hedge {
                                            from: this.inner.deployments[this.current.0]
                                                .name
                                                .clone(),
                                        },
                                    );
                                    this.hedge.set(Some(svc.call(this.req.clone())));
                                    continue;
                                }
                            }
                        }
                    }
                }
                let Some((result, (mut from, sent), was_hedge)) = finished else {
                    return Poll::Pending;
                };
                if was_hedge {
                    this.hedge.set(None);
                } else {
                    this.call.set(None);
                }
                *this.hedge_timer = None;
                let mut result = result.map_err(*this.boxed);
                let mut class = classify_result(this.classify, &result);
                if matches!(class, Class::Success) {
                    if let Some((a, h)) = this.hedge_pair.take() {
                        if from == a || from == h {
                            this.inner.observer.emit(
                                "route",
                                EventKind::HedgeSettled {
                                    winner: this.inner.deployments[from].name.clone(),
                                    hedge_won: was_hedge,
                                },
                            );
                        }
                    }
                    if let Some(sent) = sent {
                        let took = Instant::now().saturating_duration_since(sent);
                        this.inner.latencies[from]
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(took);
                    }
                    // The first good answer wins; another attempt still
                    // running is dropped (its reservation stays charged).
                    this.call.set(None);
                    this.hedge.set(None);
                    return Poll::Ready(result);
                }
                hold(this.held, this.inner.deployments.len(), from, &class);
                if this.call.is_some() || this.hedge.is_some() {
                    // A failed answer while the other attempt still runs:
                    // wait for that one (the first failure that does not
                    // fail over is kept).
                    if this.parked.as_ref().is_none_or(|(c, _)| fails_over(c)) {
                        *this.parked = Some((class, from));
                        *this.last = Some(result);
                    }
                    continue;
                }
                // Both attempts of a hedge failed: an answer that does not
                // fail over (a 401, a context-length error) is the one that
                // decides.
                if let Some((pc, pfrom)) = this.parked.take() {
                    if !fails_over(&pc) && fails_over(&class) {
                        if let Some(parked) = this.last.take() {
                            result = parked;
                            class = pc;
                            from = pfrom;
                        }
                    }
                }
                if *this.attempts < this.inner.max_attempts {
                    if let Class::Permanent { reason } = class {
                        let to = this
                            .inner
                            .fallbacks
                            .iter()
                            .find(|(r, _)| *r == reason && !this.fell_back.contains(r));
                        if let Some((r, group)) = to {
                            *this.why = RouteReason::FellBack {
                                from: this.inner.deployments[from].name.clone(),
                                reason: *r,
                            };
                            this.fell_back.push(*r);
                            *this.group = group.clone();
                            this.tried.clear();
                            *this.last_failed = None;
                            *this.last = Some(result);
                            continue;
                        }
                    }
                }
                if !fails_over(&class) || *this.attempts >= this.inner.max_attempts {
                    return Poll::Ready(result);
                }
                *this.why = RouteReason::FailedOver {
                    from: this.inner.deployments[from].name.clone(),
                    class,
                };
                *this.last_failed = Some((from, class));
                *this.last = Some(result);
                continue;
            }
            if let Some((i, svc)) = this.svc.as_mut() {
                let i = *i;
                if let Some(b) = this.backoff.as_mut() {
                    if b.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    *this.backoff = None;
                }
                match svc.poll_ready(cx) {
                    Poll::Pending => {
                        // Not ready by the hedge delay: if another
                        // deployment can start the call now, it goes there
                        // instead (nothing was sent here).
                        let late = this
                            .hedge_timer
                            .as_mut()
                            .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                        if late && *this.attempts < this.inner.max_attempts {
                            *this.hedge_timer = None;
                            let mut others = this.tried.clone();
                            others.set(i);
                            let now = Instant::now();
                            let choice = this.inner.choose(
                                this.cost,
                                this.key.as_deref(),
                                Past {
                                    tried: &others,
                                    avoid: Some(i),
                                    held: this.held.as_deref(),
                                },
                                this.group,
                                now,
                            );
                            if let Choice::Go(j, start, false) = choice {
                                if j != i && start <= now + TIE {
                                    *this.why = RouteReason::FailedOver {
                                        from: this.inner.deployments[i].name.clone(),
                                        class: Class::Overloaded { retry_after: None },
                                    };
                                    this.tried.set(j);
                                    *this.attempts += 1;
                                    *this.svc =
                                        Some((j, this.inner.deployments[j].service.clone()));
                                    continue;
                                }
                            }
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(())) => {
                        let fut = svc.call(this.req.clone());
                        *this.svc = None;
                        let why = std::mem::replace(this.why, RouteReason::First);
                        this.inner.routed(i, *this.attempts, why);
                        let sent = this.inner.tracks_latency().then(Instant::now);
                        *this.current = (i, sent);
                        this.call.set(Some(fut));
                    }
                    Poll::Ready(Err(e)) => {
                        // The deployment could not take the call: classified
                        // as its answer would be.
                        *this.svc = None;
                        let result: Result<S::Response, BoxError> = Err((this.boxed)(e));
                        let class = classify_result(this.classify, &result);
                        if !fails_over(&class) || *this.attempts >= this.inner.max_attempts {
                            return Poll::Ready(result);
                        }
                        hold(this.held, this.inner.deployments.len(), i, &class);
                        *this.why = RouteReason::FailedOver {
                            from: this.inner.deployments[i].name.clone(),
                            class,
                        };
                        *this.last_failed = Some((i, class));
                        *this.last = Some(result);
                    }
                }
                continue;
            }
            // Choose the next deployment.
            if started >= ATTEMPTS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            started += 1;
            let now = Instant::now();
            let avoid = this.last_failed.as_ref().map(|(i, _)| *i);
            let choice = this.inner.choose(
                this.cost,
                this.key.as_deref(),
                Past {
                    tried: this.tried,
                    avoid,
                    held: this.held.as_deref(),
                },
                this.group,
                now,
            );
            let (i, start) = match choice {
                // Every deployment refuses now and this one was tried: its
                // answer (or another's) is in hand, trying again after a
                // backoff would meet the same refusal.
                Choice::Go(i, _, true) if this.tried.get(i) && this.last.is_some() => {
                    if let Some(last) = this.last.take() {
                        return Poll::Ready(last);
                    }
                    continue;
                }
                Choice::Go(i, start, _) => (i, start),
                Choice::None { reopens, open } => {
                    // Every deployment open or refusing: the last answer,
                    // else a refusal saying when one reopens, or that the
                    // cost fits none.
                    return Poll::Ready(match this.last.take() {
                        Some(r) => r,
                        None if open => Err(this.inner.rejected(RejectKind::CircuitOpen, |r| {
                            let r = r.with_detail("no deployment can take the call".to_owned());
                            match reopens {
                                Some(ra) => r.with_retry_after(ra),
                                None => r,
                            }
                        })),
                        None => Err(this.inner.rejected(RejectKind::BudgetExceeded, |r| {
                            r.with_detail(
                                "the call's cost is above what any deployment can ever admit"
                                    .to_owned(),
                            )
                        })),
                    });
                }
            };
            if let Some((dl, _)) = this.deadline.as_ref() {
                if start > *dl {
                    // An upstream's answer already in hand says more than
                    // "too late": it comes back.
                    if let Some(last) = this.last.take() {
                        return Poll::Ready(last);
                    }
                    let name = &this.inner.deployments[i].name;
                    return Poll::Ready(Err(this.inner.rejected(
                        RejectKind::BudgetExceeded,
                        |r| {
                            r.with_retry_after(start.saturating_duration_since(now))
                                .with_detail(format!(
                                    "the soonest deployment ('{name}') starts after the deadline"
                                ))
                        },
                    )));
                }
            }
            // A deployment tried before (every one was): back off by how
            // the last attempt failed.
            let mut back_off = None;
            if this.tried.get(i) {
                let drawn = match (this.inner.backoff.as_ref(), this.last_failed.as_ref()) {
                    (Some(backoff), Some((_, class))) => {
                        backoff.delay_for(class, *this.retries, *this.prev_delay)
                    }
                    _ => Duration::ZERO,
                };
                // As the retry layer: this deployment's own `Retry-After`
                // (whichever attempt it answered) is waited for (the longer
                // of the two, even with no backoff); one above the retry
                // layer's default ceiling, or a wait that would end past the
                // call's deadline, is not slept: the last answer comes back
                // now.
                let asked = this
                    .held
                    .as_deref()
                    .and_then(|h| h.get(i).copied().flatten())
                    .map(|h| h.saturating_duration_since(now));
                let delay = asked.map_or(drawn, |ra| ra.max(drawn));
                let too_long = asked
                    .is_some_and(|ra| ra > crate::retry::DEFAULT_RETRY_AFTER_CEILING)
                    || this
                        .deadline
                        .as_ref()
                        .is_some_and(|(dl, _)| crate::time::after(now, delay) >= *dl);
                if too_long {
                    if let Some(last) = this.last.take() {
                        return Poll::Ready(last);
                    }
                }
                back_off = Some((drawn, delay));
            }
            // Every attempt after the first draws from the retry budget —
            // once it is sure to be sent (not one the backoff above gave up).
            if *this.attempts > 0 {
                if let Some(budget) = &this.inner.budget {
                    if !budget.try_withdraw() {
                        if let Some(last) = this.last.take() {
                            return Poll::Ready(last);
                        }
                    }
                }
            }
            if let Some((drawn, delay)) = back_off {
                *this.retries = this.retries.saturating_add(1);
                *this.prev_delay = drawn;
                if !delay.is_zero() {
                    *this.backoff = Some(Box::pin(tokio::time::sleep_until(crate::time::after(
                        now, delay,
                    ))));
                }
            }
            this.tried.set(i);
            *this.attempts += 1;
            // Only a first attempt is hedged; its delay runs from now (a
            // deployment slow to get ready is hedged too).
            if *this.attempts == 1 {
                *this.hedge_timer = this
                    .inner
                    .hedge_at(i, now)
                    .map(|at| Box::pin(tokio::time::sleep_until(at)));
            }
            *this.svc = Some((i, this.inner.deployments[i].service.clone()));
        }
    }
}

/// Keeps deployment `i`'s `Retry-After` (the later of two) in the call's
/// `held` table, allocated at the first.
fn hold(held: &mut Option<Box<[Option<Instant>]>>, n: usize, i: usize, class: &Class) {
    let Some(ra) = class.retry_after() else {
        return;
    };
    let until = crate::time::after(Instant::now(), ra);
    let table = held.get_or_insert_with(|| vec![None; n].into_boxed_slice());
    if let Some(slot) = table.get_mut(i) {
        *slot = Some(slot.map_or(until, |h| h.max(until)));
    }
}

/// The class of an attempt's result. A deployment's own refusal (its
/// breaker, a quota or rate limit inside it) keeps its class and its
/// `retry_after` ([`classify_rejected`](crate::classify::classify_rejected):
/// the deployment is not asked again before then), except a `Permanent` one
/// (a cost above its burst, its shutdown, its retry budget), which is
/// `Transient`: another deployment may take the call.
fn classify_result<R, C: Classify<R, BoxError>>(
    classify: &C,
    result: &Result<R, BoxError>,
) -> Class {
    match result {
        Ok(res) => classify.classify(Ok(res)),
        Err(e) => match Rejected::find(e.as_ref()) {
            Some(r) => match crate::classify::classify_rejected(r) {
                Class::Permanent { .. } => Class::Transient,
                class => class,
            },
            None => classify.classify(Err(e)),
        },
    }
}

impl<S, W, C, K, Req> Service<Req> for Router<S, W, C, K>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
    W: Weigh<Req>,
    K: PaceKey<Req>,
    C: Classify<S::Response, BoxError> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RouteFuture<S, Req, C>;

    /// Always ready: each attempt readies the deployment it goes to.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let cost = self.weigh.weigh(&req);
        let key = self.key.key(&req).map(|k| Box::<str>::from(k.as_ref()));
        if self.inner.hedge.is_some() {
            // The cap counts recent calls: both counts halve when the calls
            // reach 1,000 (then 500 calls later, and so on: a window of the
            // last 500 to 1,000 calls; a quiet past does not pay for a slow
            // present).
            if self.inner.calls.fetch_add(1, Ordering::Relaxed) + 1 == HEDGE_WINDOW {
                self.inner
                    .calls
                    .fetch_sub(HEDGE_WINDOW / 2, Ordering::Relaxed);
                let _ = self
                    .inner
                    .hedged
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| Some(h / 2));
            }
        }
        if let Some(b) = &self.inner.budget {
            b.deposit();
        }
        let deadline = self.inner.deadline.map(|d| {
            let at = crate::time::after(Instant::now(), d);
            (at, Box::pin(tokio::time::sleep_until(at)))
        });
        RouteFuture {
            tried: Tried::new(self.inner.deployments.len()),
            inner: self.inner.clone(),
            req,
            cost,
            key,
            classify: self.classify.clone(),
            attempts: 0,
            deadline,
            svc: None,
            last: None,
            group: self.inner.first_group.clone(),
            fell_back: Vec::new(),
            current: (0, None),
            hedge_timer: None,
            hedging: (0, None),
            hedge_pair: None,
            why: RouteReason::First,
            parked: None,
            last_failed: None,
            held: None,
            retries: 0,
            prev_delay: Duration::ZERO,
            backoff: None,
            done: false,
            call: None,
            hedge: None,
            boxed: into_box::<S::Error>,
        }
    }
}

//! Fault injection for drills and tests (feature `chaos`): added latency,
//! errors of each class, provider-shaped refusals, hung calls — each with a
//! rate, a schedule and a seed, switched on and off at run time.
//!
//! Rehearse an outage against your own stack without a fake server: put a
//! [`ChaosLayer`] next to the client (innermost, where the network would
//! fail — see the [layer order](crate#layer-order)) and turn it on.
//!
//! - **Off unless switched on**: its own feature, and a built [`Chaos`] is
//!   disabled until [`Chaos::enable`]; while disabled a call costs one
//!   atomic load (measured in `benches/chaos.rs`).
//! - **Faults** ([`Fault`]): [`latency`](Fault::latency) ([`Latency`]:
//!   fixed, uniform, a log-normal long tail), [`error`](Fault::error) of a
//!   [`Class`] (a [`ClassError`] every classifier reads),
//!   [`connection_reset`](Fault::connection_reset) (an `io::Error` of kind
//!   `ConnectionReset`: `Infrastructure`), [`respond`](Fault::respond) with a
//!   response of your own (with feature `http`: [`rate_limited`], a 429 with
//!   `Retry-After` and `x-ratelimit-*` headers, and [`overloaded`],
//!   Anthropic's 529 `overloaded_error`), and [`hang`](Fault::hang) (a call
//!   that never answers: your timeout's job). Streams cut or stalled
//!   mid-way: [`Fault::cut_stream`] / [`Fault::stall_stream`] through
//!   [`Chaos::stream_layer`] (feature `http`: a service answering
//!   `http::Response<B>` then answers `http::Response<ChaosBody<B>>`).
//! - **Rate and schedule**: each fault hits a call with probability
//!   [`rate`](Fault::rate), only while the time since [`Chaos::enable`] is
//!   in [`between(from, until)`](Fault::between).
//! - **Repeatable**: call *n* since `enable()` draws from a generator keyed
//!   by the [`seed`](ChaosBuilder::seed) and *n* (rand's `StdRng`, ChaCha12,
//!   the pair as its 256-bit key), so the same seed gives the same fault on
//!   the same call — whatever the timing — with the same semaforo and rand
//!   versions, and different seeds give independent sequences. Each fault gets its own draw, so its rate does not depend on
//!   the faults before it.
//! - **Which fault**: the delays of every latency fault that hits add up;
//!   then the first outcome fault (error, response, hang) that hits, in the
//!   order given, answers instead of the inner service.
//!
//! The inner call is made at once (tower's readiness contract) and its
//! future polled after the delay: for a lazy future (an `async` block, a
//! reqwest call) the delay adds up; the work of a service that starts in
//! `call` overlaps it.
//!
//! ```
//! use semaforo::chaos::{Chaos, Fault, Latency};
//! use semaforo::classify::{classify_error, Class};
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let chaos = Chaos::builder()
//!     .seed(7)
//!     .fault(Fault::latency(Latency::Fixed(Duration::from_millis(200))))
//!     .fault(
//!         Fault::error(Class::Overloaded { retry_after: None })
//!             .between(Duration::from_secs(60), Duration::from_secs(90)),
//!     )
//!     .build()
//!     .unwrap();
//! let upstream = service_fn(|x: u32| async move { Ok::<_, std::io::Error>(x + 1) });
//! let svc = chaos.layer().layer(upstream);
//!
//! assert_eq!(svc.clone().oneshot(1).await.unwrap(), 2); // off: untouched
//! chaos.enable();
//! let t = tokio::time::Instant::now();
//! assert_eq!(svc.clone().oneshot(1).await.unwrap(), 2);
//! assert_eq!(t.elapsed(), Duration::from_millis(200));
//! tokio::time::sleep(Duration::from_secs(60)).await;
//! let e = svc.oneshot(1).await.unwrap_err();
//! assert_eq!(classify_error(&*e), Class::Overloaded { retry_after: None });
//! # }
//! ```

use crate::classify::{Class, ClassError};
use crate::error::{BoxError, ConfigError};
use crate::observe::{Event, EventKind, ListenerSlot, Observer};
use pin_project::pin_project;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

#[cfg(feature = "http")]
mod body;
#[cfg(feature = "http")]
pub use body::{
    overloaded, rate_limited, ChaosBody, ChaosStreamLayer, ChaosStreamService, StreamFault, Streams,
};

/// The most faults a [`Chaos`] holds.
pub const MAX_FAULTS: usize = 64;

/// The longest delay a [`Latency`] gives (a long tail's draw is capped here).
pub const MAX_LATENCY: Duration = Duration::from_secs(3600);

/// How long an injected delay is.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Latency {
    /// Always this long.
    Fixed(Duration),
    /// Uniform in `[min, max]`.
    Uniform {
        /// The shortest.
        min: Duration,
        /// The longest.
        max: Duration,
    },
    /// Log-normal with this median and 99th percentile (σ = ln(p99 /
    /// median) / 2.3263, the standard normal's 99th percentile), capped at
    /// [`MAX_LATENCY`]: most calls near the median, a few very slow.
    LongTail {
        /// Half the delays are shorter.
        median: Duration,
        /// 99 % of the delays are shorter.
        p99: Duration,
    },
}

impl Latency {
    fn check(&self) -> Result<(), ConfigError> {
        let bad = |why: &'static str| Err(ConfigError::new("chaos", "latency", why));
        match *self {
            Latency::Fixed(_) => Ok(()),
            Latency::Uniform { min, max } if min > max => bad("uniform: min is above max"),
            Latency::LongTail { median, p99 } if median.is_zero() || p99 < median => {
                bad("long tail: the median must be above 0 and the p99 at least the median")
            }
            _ => Ok(()),
        }
    }

    fn sample(&self, rng: &mut StdRng) -> Duration {
        let d = match *self {
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } => {
                let span = max.saturating_sub(min).as_nanos();
                let span = u64::try_from(span).unwrap_or(u64::MAX);
                min.saturating_add(Duration::from_nanos(rng.random_range(0..=span)))
            }
            Latency::LongTail { median, p99 } => {
                let sigma = (p99.as_secs_f64() / median.as_secs_f64()).ln() / 2.326_347_874;
                // Box–Muller: a standard normal from two uniforms.
                let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                let secs = median.as_secs_f64() * (sigma * z).exp();
                Duration::try_from_secs_f64(secs).unwrap_or(MAX_LATENCY)
            }
        };
        d.min(MAX_LATENCY)
    }
}

type MakeError = Arc<dyn Fn() -> BoxError + Send + Sync>;
type MakeResponse<Res> = Arc<dyn Fn() -> Res + Send + Sync>;

enum Kind<Res> {
    Latency(Latency),
    Error(MakeError),
    Respond(MakeResponse<Res>),
    Hang,
    #[cfg(feature = "http")]
    Stream(StreamFault),
}

impl<Res> Clone for Kind<Res> {
    fn clone(&self) -> Self {
        match self {
            Kind::Latency(l) => Kind::Latency(*l),
            Kind::Error(f) => Kind::Error(f.clone()),
            Kind::Respond(f) => Kind::Respond(f.clone()),
            Kind::Hang => Kind::Hang,
            #[cfg(feature = "http")]
            Kind::Stream(s) => Kind::Stream(*s),
        }
    }
}

impl<Res> Kind<Res> {
    fn label(&self) -> &'static str {
        match self {
            Kind::Latency(_) => "latency",
            Kind::Error(_) => "error",
            Kind::Respond(_) => "response",
            Kind::Hang => "hang",
            #[cfg(feature = "http")]
            Kind::Stream(StreamFault::Cut { .. }) => "cut_stream",
            #[cfg(feature = "http")]
            Kind::Stream(StreamFault::Stall { .. }) => "stall_stream",
        }
    }
}

/// One fault: what, how often, when.
pub struct Fault<Res> {
    kind: Kind<Res>,
    rate: f64,
    from: Duration,
    until: Option<Duration>,
}

impl<Res> Clone for Fault<Res> {
    fn clone(&self) -> Self {
        Fault {
            kind: self.kind.clone(),
            rate: self.rate,
            from: self.from,
            until: self.until,
        }
    }
}

impl<Res> fmt::Debug for Fault<Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fault")
            .field("kind", &self.kind.label())
            .field("rate", &self.rate)
            .field("from", &self.from)
            .field("until", &self.until)
            .finish()
    }
}

impl<Res> Fault<Res> {
    fn new(kind: Kind<Res>) -> Self {
        Fault {
            kind,
            rate: 1.0,
            from: Duration::ZERO,
            until: None,
        }
    }

    /// Delays calls.
    pub fn latency(latency: Latency) -> Self {
        Self::new(Kind::Latency(latency))
    }

    /// Fails calls with a [`ClassError`] of `class` (the inner service is
    /// not called).
    pub fn error(class: Class) -> Self {
        Self::error_with(move || Box::new(ClassError::new(class, "injected by chaos")))
    }

    /// Fails calls with an `io::Error` of kind `ConnectionReset`
    /// (`Infrastructure`).
    pub fn connection_reset() -> Self {
        Self::error_with(|| {
            Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset (injected by chaos)",
            ))
        })
    }

    /// Fails calls with `f()`.
    pub fn error_with(f: impl Fn() -> BoxError + Send + Sync + 'static) -> Self {
        Self::new(Kind::Error(Arc::new(f)))
    }

    /// Answers calls with `f()` instead of the inner service (e.g.
    /// [`rate_limited`], [`overloaded`]).
    pub fn respond(f: impl Fn() -> Res + Send + Sync + 'static) -> Self {
        Self::new(Kind::Respond(Arc::new(f)))
    }

    /// Calls that never answer (until dropped).
    pub fn hang() -> Self {
        Self::new(Kind::Hang)
    }

    /// The share of calls it hits, in [0, 1] (default 1: every call in its
    /// schedule).
    pub fn rate(mut self, p: f64) -> Self {
        self.rate = p;
        self
    }

    /// Only from `from` to `until` after [`Chaos::enable`] (default: from
    /// the start, for ever).
    pub fn between(mut self, from: Duration, until: Duration) -> Self {
        self.from = from;
        self.until = Some(until);
        self
    }

    /// Only from `from` after [`Chaos::enable`], for ever.
    pub fn since(mut self, from: Duration) -> Self {
        self.from = from;
        self.until = None;
        self
    }

    fn check(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.rate) {
            return Err(ConfigError::new("chaos", "rate", "must be within [0, 1]"));
        }
        if self.until.is_some_and(|u| u < self.from) {
            return Err(ConfigError::new(
                "chaos",
                "between",
                "the end is before the start",
            ));
        }
        if let Kind::Latency(l) = &self.kind {
            l.check()?;
        }
        #[cfg(feature = "http")]
        if let Kind::Stream(s) = &self.kind {
            s.check()?;
        }
        Ok(())
    }

    fn live(&self, since: Duration) -> bool {
        since >= self.from && self.until.is_none_or(|u| since < u)
    }
}

/// Builds a [`Chaos`].
#[must_use = "a builder does nothing until `build()`"]
pub struct ChaosBuilder<Res> {
    faults: Vec<Fault<Res>>,
    seed: u64,
    name: Option<Arc<str>>,
    listener: ListenerSlot,
}

impl<Res> fmt::Debug for ChaosBuilder<Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosBuilder")
            .field("faults", &self.faults)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl<Res> ChaosBuilder<Res> {
    /// Adds a fault (they are tried in the order given).
    pub fn fault(mut self, fault: Fault<Res>) -> Self {
        self.faults.push(fault);
        self
    }

    /// The seed (default 0): the same seed, the same faults on the same
    /// calls.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The name in events and metrics.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` for each fault injected ([`EventKind::Injected`]).
    /// Listeners add up.
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// The fault injector, disabled.
    ///
    /// # Errors
    /// [`ConfigError`] for a rate outside [0, 1] (or NaN), a schedule that
    /// ends before it starts, a uniform latency with `min > max`, a long
    /// tail with a zero median or a p99 below its median, a stream fault
    /// after 0 chunks, more than 64 faults.
    pub fn build(self) -> Result<Chaos<Res>, ConfigError> {
        if self.faults.len() > MAX_FAULTS {
            return Err(ConfigError::new("chaos", "fault", "at most 64 faults"));
        }
        for f in &self.faults {
            f.check()?;
        }
        Ok(Chaos {
            inner: Arc::new(Inner {
                enabled: AtomicBool::new(false),
                calls: AtomicU64::new(0),
                since: Mutex::new(None),
                faults: self.faults,
                seed: self.seed,
                obs: Observer::new(self.name, self.listener.0),
            }),
        })
    }
}

struct Inner<Res> {
    enabled: AtomicBool,
    /// Calls since `enable()`.
    calls: AtomicU64,
    /// When it was enabled.
    since: Mutex<Option<Instant>>,
    faults: Vec<Fault<Res>>,
    seed: u64,
    obs: Observer,
}

/// The fault injector (see the [module docs](self)): a handle shared by
/// its layers, cheap to clone.
pub struct Chaos<Res> {
    inner: Arc<Inner<Res>>,
}

impl<Res> Clone for Chaos<Res> {
    fn clone(&self) -> Self {
        Chaos {
            inner: self.inner.clone(),
        }
    }
}

impl<Res> fmt::Debug for Chaos<Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chaos")
            .field("enabled", &self.is_enabled())
            .field("faults", &self.inner.faults)
            .field("seed", &self.inner.seed)
            .finish()
    }
}

/// What chaos decided for one call.
pub(crate) struct Plan<Res> {
    delay: Duration,
    outcome: Option<Kind<Res>>,
}

impl<Res> Chaos<Res> {
    /// A builder: no faults, seed 0.
    pub fn builder() -> ChaosBuilder<Res> {
        ChaosBuilder {
            faults: Vec::new(),
            seed: 0,
            name: None,
            listener: ListenerSlot::default(),
        }
    }

    /// A layer injecting this chaos.
    pub fn layer(&self) -> ChaosLayer<Res> {
        ChaosLayer {
            chaos: self.clone(),
        }
    }

    /// Switches it on: the schedules start now and the call count (the
    /// seeded sequence) starts again at 0.
    pub fn enable(&self) {
        let mut since = self
            .inner
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *since = Some(Instant::now());
        self.inner.calls.store(0, Ordering::Relaxed);
        self.inner.enabled.store(true, Ordering::Release);
    }

    /// Switches it off: calls pass untouched (those already delayed or
    /// hung stay so).
    pub fn disable(&self) {
        self.inner.enabled.store(false, Ordering::Release);
    }

    /// Whether it is on.
    pub fn is_enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Acquire)
    }

    /// Calls seen since [`enable`](Self::enable).
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    /// Decides the faults of one call (`None`: pass untouched).
    #[inline(never)]
    fn plan(&self) -> Option<Plan<Res>> {
        if !self.inner.enabled.load(Ordering::Acquire) {
            return None;
        }
        let since = self
            .inner
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map_or(Duration::ZERO, |t| t.elapsed());
        let n = self.inner.calls.fetch_add(1, Ordering::Relaxed);
        // One generator per call, keyed by (seed, call number) as a
        // 256-bit ChaCha key: distinct pairs give independent draws (no
        // seed is another seed's sequence shifted).
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.inner.seed.to_le_bytes());
        key[8..16].copy_from_slice(&n.to_le_bytes());
        let mut rng = StdRng::from_seed(key);
        // Every fault's draw first, so a fault's rate never depends on
        // the others.
        let mut hits = [false; MAX_FAULTS];
        for (i, f) in self.inner.faults.iter().enumerate() {
            let u: f64 = rng.random();
            if let Some(h) = hits.get_mut(i) {
                *h = u < f.rate && f.live(since);
            }
        }
        let mut plan = Plan {
            delay: Duration::ZERO,
            outcome: None,
        };
        let obs = &self.inner.obs;
        for (f, _) in self
            .inner
            .faults
            .iter()
            .zip(hits.iter())
            .filter(|(_, &hit)| hit)
        {
            match &f.kind {
                Kind::Latency(l) => {
                    plan.delay = plan.delay.saturating_add(l.sample(&mut rng));
                    obs.emit_often("chaos", EventKind::Injected { fault: "latency" });
                }
                k if plan.outcome.is_none() => {
                    obs.emit_often("chaos", EventKind::Injected { fault: k.label() });
                    plan.outcome = Some(k.clone());
                }
                _ => {}
            }
        }
        Some(plan)
    }
}

/// The layer of a [`Chaos`].
pub struct ChaosLayer<Res> {
    chaos: Chaos<Res>,
}

impl<Res> Clone for ChaosLayer<Res> {
    fn clone(&self) -> Self {
        ChaosLayer {
            chaos: self.chaos.clone(),
        }
    }
}

impl<Res> fmt::Debug for ChaosLayer<Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosLayer")
            .field("chaos", &self.chaos)
            .finish()
    }
}

impl<S, Res> Layer<S> for ChaosLayer<Res> {
    type Service = ChaosService<S, Res>;

    fn layer(&self, inner: S) -> Self::Service {
        ChaosService {
            inner,
            chaos: self.chaos.clone(),
        }
    }
}

/// The service of a [`ChaosLayer`].
pub struct ChaosService<S, Res> {
    inner: S,
    chaos: Chaos<Res>,
}

impl<S: Clone, Res> Clone for ChaosService<S, Res> {
    fn clone(&self) -> Self {
        ChaosService {
            inner: self.inner.clone(),
            chaos: self.chaos.clone(),
        }
    }
}

impl<S: fmt::Debug, Res> fmt::Debug for ChaosService<S, Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChaosService")
            .field("inner", &self.inner)
            .field("chaos", &self.chaos)
            .finish()
    }
}

impl<S, Req, Res> Service<Req> for ChaosService<S, Res>
where
    S: Service<Req, Response = Res>,
    S::Error: Into<BoxError>,
{
    type Response = Res;
    type Error = BoxError;
    type Future = ChaosFuture<S::Future, Res, Plain>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if !self.chaos.inner.enabled.load(Ordering::Relaxed) {
            return ChaosFuture::pass(self.inner.call(req));
        }
        let plan = self.chaos.plan();
        ChaosFuture::new(plan, || self.inner.call(req))
    }
}

/// How an inner answer becomes the caller's: itself ([`Plain`]), or with
/// its body wrapped for stream faults (feature `http`). Named in the
/// futures' types; not for implementing.
pub trait Wrap<Inner, Res> {
    /// An inner answer, with a stream fault if one was drawn.
    #[doc(hidden)]
    fn wrap(inner: Inner, stream: Option<StreamFaultArg>) -> Res;
}

/// The answer as the inner service gave it.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl<T> Wrap<T, T> for Plain {
    fn wrap(inner: T, _: Option<StreamFaultArg>) -> T {
        inner
    }
}

#[cfg(feature = "http")]
#[doc(hidden)]
pub type StreamFaultArg = StreamFault;
#[cfg(not(feature = "http"))]
#[doc(hidden)]
pub type StreamFaultArg = std::convert::Infallible;

enum Then<F, Res> {
    Call(F, Option<StreamFaultArg>),
    Error(BoxError),
    Respond(Res),
    Hang,
}

#[pin_project(project = StateProj)]
enum State<F, Res> {
    Pass {
        #[pin]
        fut: F,
        stream: Option<StreamFaultArg>,
    },
    Delay {
        #[pin]
        sleep: Sleep,
        then: Option<Then<F, Res>>,
    },
    Ready(Option<Result<Res, BoxError>>),
    Hang,
}

impl<F, Res> State<F, Res> {
    fn from_then(then: Then<F, Res>) -> Self {
        match then {
            Then::Call(fut, stream) => State::Pass { fut, stream },
            Then::Error(e) => State::Ready(Some(Err(e))),
            Then::Respond(r) => State::Ready(Some(Ok(r))),
            Then::Hang => State::Hang,
        }
    }
}

/// The future of [`ChaosService`]: the inner call untouched, or delayed,
/// or replaced by an injected answer, or never done. Cancel safety:
/// dropping it drops the inner call and the delay.
#[pin_project]
pub struct ChaosFuture<F, Res, W> {
    #[pin]
    state: Outer<F, Res>,
    _wrap: std::marker::PhantomData<fn() -> W>,
}

/// An untouched call is the inner future alone (as small as a `MapErr`'s);
/// a call chaos touches has its state on the heap (chaos is for drills).
#[pin_project(project = OuterProj)]
enum Outer<F, Res> {
    Pass(#[pin] F),
    Faulty(Pin<Box<State<F, Res>>>),
    /// Answered: polled again, an error (the inner future is not resumed).
    Done,
}

impl<F, Res, W> ChaosFuture<F, Res, W> {
    /// The inner call, untouched.
    #[inline]
    pub(crate) fn pass(fut: F) -> Self {
        ChaosFuture {
            state: Outer::Pass(fut),
            _wrap: std::marker::PhantomData,
        }
    }

    /// The future of a call with `plan`; `call` makes the inner call
    /// (unless an injected answer replaces it).
    pub(crate) fn new(plan: Option<Plan<Res>>, call: impl FnOnce() -> F) -> Self {
        let Some(plan) = plan else {
            return ChaosFuture {
                state: Outer::Pass(call()),
                _wrap: std::marker::PhantomData,
            };
        };
        let then = match plan.outcome {
            None | Some(Kind::Latency(_)) => Then::Call(call(), None),
            Some(Kind::Error(f)) => Then::Error(f()),
            Some(Kind::Respond(f)) => Then::Respond(f()),
            Some(Kind::Hang) => Then::Hang,
            #[cfg(feature = "http")]
            Some(Kind::Stream(s)) => Then::Call(call(), Some(s)),
        };
        let state = if plan.delay.is_zero() {
            State::from_then(then)
        } else {
            State::Delay {
                sleep: tokio::time::sleep(plan.delay),
                then: Some(then),
            }
        };
        ChaosFuture {
            state: Outer::Faulty(Box::pin(state)),
            _wrap: std::marker::PhantomData,
        }
    }
}

impl<F, Res, W> fmt::Debug for ChaosFuture<F, Res, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            Outer::Pass(_) => "call",
            Outer::Done => "done",
            Outer::Faulty(s) => match &**s {
                State::Pass { .. } => "call",
                State::Delay { .. } => "delay",
                State::Ready(_) => "injected",
                State::Hang => "hang",
            },
        };
        f.debug_struct("ChaosFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, T, E, Res, W> Future for ChaosFuture<F, Res, W>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    W: Wrap<T, Res>,
{
    type Output = Result<Res, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        match state.as_mut().project() {
            OuterProj::Pass(fut) => {
                let out = std::task::ready!(fut.poll(cx));
                state.set(Outer::Done);
                Poll::Ready(out.map(|out| W::wrap(out, None)).map_err(Into::into))
            }
            OuterProj::Faulty(faulty) => poll_faulty::<F, T, E, Res, W>(faulty.as_mut(), cx),
            OuterProj::Done => Poll::Ready(Err(crate::error::polled_after_done("chaos"))),
        }
    }
}

fn poll_faulty<F, T, E, Res, W>(
    mut state: Pin<&mut State<F, Res>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Res, BoxError>>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    W: Wrap<T, Res>,
{
    loop {
        match state.as_mut().project() {
            StateProj::Pass { fut, stream } => {
                let out = std::task::ready!(fut.poll(cx));
                let stream = stream.take();
                // Answered: polled again, an error (see `State::Ready(None)`).
                state.set(State::Ready(None));
                return Poll::Ready(out.map(|out| W::wrap(out, stream)).map_err(Into::into));
            }
            StateProj::Delay { sleep, then } => {
                std::task::ready!(sleep.poll(cx));
                let Some(then) = then.take() else {
                    return Poll::Ready(Err(crate::error::polled_after_done("chaos")));
                };
                state.set(State::from_then(then));
            }
            StateProj::Ready(out) => {
                return Poll::Ready(match out.take() {
                    Some(r) => r,
                    None => Err(crate::error::polled_after_done("chaos")),
                });
            }
            StateProj::Hang => return Poll::Pending,
        }
    }
}

crate::inner_access!([S, Res] ChaosService<S, Res>);

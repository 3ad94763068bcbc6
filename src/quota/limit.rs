//! One rate limit for every call: a single lock-free GCRA cell, no key, no
//! map, no hashing.

use super::cell::Cell;
use super::Rate;
use crate::error::{BoxError, ConfigError, RateLimitPolicy, RejectKind, Rejected};
use crate::observe::{Event, ListenerSlot, Observer};
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

struct Shared {
    cell: Cell,
    policy: Arc<RateLimitPolicy>,
    obs: Observer,
}

/// A rate limit shared by every call through its layers (and every clone):
/// `count` calls per window with a burst, as one GCRA cell updated by a
/// compare-and-swap. A call over the limit is refused at once with
/// [`RejectKind::QuotaExceeded`] and the exact `retry_after` (the time
/// until it would fit, from the limit's clock read for this call: a thread
/// preempted between that read and its compare-and-swap may see a cell
/// other threads filled meanwhile, and wait that much longer), and the
/// limit's `RateLimit-Policy` (429 through
/// [`Rejected::http_response`]). The inner service is called only for
/// admitted calls.
///
/// For limits per user, tenant or plan use [`Quota`](super::Quota); for an
/// upstream's budget that callers wait for (requests and tokens per
/// minute) use [`Pace`](crate::pace::Pace).
///
/// The formula: GCRA (the generic cell rate algorithm of ATM networks, as
/// in governor): a theoretical arrival time `tat` moves `per / count` ahead
/// per call; a call at `now` is admitted while `tat − now ≤ burst · per /
/// count`. Time through `tokio::time` (tests run it paused).
///
/// ```
/// use semaforo::quota::{Rate, RateLimit};
/// use semaforo::{RejectKind, Rejected};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), semaforo::BoxError> {
/// let limit = RateLimit::builder(Rate::per_second(2).burst(2)).name("search").build()?;
/// let svc = ServiceBuilder::new()
///     .layer(limit.layer())
///     .service(service_fn(|q: &'static str| async move { Ok::<_, std::io::Error>(q.len()) }));
/// assert_eq!(svc.clone().oneshot("a").await?, 1);
/// assert_eq!(svc.clone().oneshot("bb").await?, 2);
/// let err = svc.clone().oneshot("ccc").await.unwrap_err();
/// let r = Rejected::from_box(&err).unwrap();
/// assert_eq!(r.kind(), RejectKind::QuotaExceeded);
/// assert_eq!(r.retry_after(), Some(std::time::Duration::from_millis(500)));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RateLimit {
    shared: Arc<Shared>,
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

/// Builder for [`RateLimit`].
#[must_use = "call .build() to get a RateLimit"]
pub struct RateLimitBuilder {
    rate: Rate,
    name: Option<Arc<str>>,
    listener: ListenerSlot,
}

impl fmt::Debug for RateLimitBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitBuilder")
            .field("rate", &self.rate)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RateLimitBuilder {
    /// Names the limit in errors, events and its `RateLimit-Policy`.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` for each refusal (see [`observe`](crate::observe)).
    /// Listeners add up.
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    /// A [`ConfigError`] when the rate's `count`, `per` or `burst` is zero.
    pub fn build(self) -> Result<RateLimit, ConfigError> {
        self.rate.validate("rate")?;
        let policy = RateLimitPolicy {
            name: self.name.clone().unwrap_or_else(|| Arc::from("rate")),
            quota: u64::from(self.rate.count),
            window: self.rate.per,
        };
        Ok(RateLimit {
            shared: Arc::new(Shared {
                cell: Cell::new(self.rate),
                policy: Arc::new(policy),
                obs: Observer::new(self.name, self.listener.0),
            }),
        })
    }
}

impl RateLimit {
    /// A limit of `rate` (`Rate::per_second(100)`, `.burst(n)`).
    pub fn builder(rate: Rate) -> RateLimitBuilder {
        RateLimitBuilder {
            rate,
            name: None,
            listener: ListenerSlot::default(),
        }
    }

    /// Takes one call's place now.
    ///
    /// # Errors
    /// [`RejectKind::QuotaExceeded`] with the exact `retry_after` when the
    /// limit is spent (nothing is taken then).
    #[inline]
    pub fn try_take(&self) -> Result<(), Rejected> {
        self.try_take_n(1)
    }

    /// Takes `n` units now (a call that weighs more than one).
    ///
    /// # Errors
    /// As [`try_take`](Self::try_take); a weight above the burst can never
    /// fit and is refused without `retry_after`.
    #[inline]
    pub fn try_take_n(&self, n: u32) -> Result<(), Rejected> {
        match self.shared.cell.take(n, Instant::now()) {
            Ok(()) => Ok(()),
            Err(wait) => Err(self.refused(n, wait)),
        }
    }

    /// The refusal of `n` units that fit after `wait` (out of line: the
    /// admitted call's path stays a clock read and a compare-and-swap).
    #[cold]
    #[inline(never)]
    fn refused(&self, n: u32, wait: std::time::Duration) -> Rejected {
        let s = &self.shared;
        let mut r = Rejected::new("quota", RejectKind::QuotaExceeded)
            .with_name_opt(s.obs.name.as_ref())
            .with_policy(s.policy.clone());
        if s.cell.fits(n) {
            r = r.with_retry_after(wait);
        } else {
            r = r.with_detail(format!("a weight of {n} is above the burst"));
        }
        s.obs.rejected(&r);
        r
    }

    /// [`refused`](Self::refused) for one unit, boxed (the layer's refusal).
    #[cold]
    #[inline(never)]
    fn refused_boxed(&self, wait: std::time::Duration) -> Box<Rejected> {
        Box::new(self.refused(1, wait))
    }

    /// The layer: every call takes one unit.
    pub fn layer(&self) -> RateLimitLayer {
        RateLimitLayer {
            limit: self.clone(),
        }
    }
}

/// The tower [`Layer`] of a [`RateLimit`].
#[derive(Debug, Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct RateLimitLayer {
    limit: RateLimit,
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limit: self.limit.clone(),
        }
    }
}

/// The service of a [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimitService<S> {
    inner: S,
    limit: RateLimit,
}

crate::inner_access!([S] RateLimitService<S>);

impl<S, Req> Service<Req> for RateLimitService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RateLimitFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        // The refusal is built out of line and boxed there: the admitted
        // path keeps no room for a `Rejected` on its stack.
        match self.limit.shared.cell.take(1, Instant::now()) {
            Ok(()) => RateLimitFuture::Admitted {
                fut: self.inner.call(req),
            },
            Err(wait) => RateLimitFuture::Refused {
                refusal: Some(self.limit.refused_boxed(wait)),
            },
        }
    }
}

/// The future of [`RateLimitService`]: the inner call's, or the refusal.
#[pin_project(project = RateLimitProj)]
pub enum RateLimitFuture<F> {
    /// Admitted: the inner call.
    Admitted {
        /// The inner future.
        #[pin]
        fut: F,
    },
    /// Refused (boxed: the rare state stays out of the hot future's size).
    Refused {
        /// The refusal, until polled.
        refusal: Option<Box<Rejected>>,
    },
}

impl<F> fmt::Debug for RateLimitFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for RateLimitFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.as_mut().project() {
            RateLimitProj::Admitted { fut } => {
                let out = ready!(fut.poll(cx));
                // Answered: polled again, an error (`Refused` with nothing
                // left); the inner future is not resumed.
                self.set(RateLimitFuture::Refused { refusal: None });
                Poll::Ready(out.map_err(Into::into))
            }
            RateLimitProj::Refused { refusal } => Poll::Ready(Err(match refusal.take() {
                Some(r) => r as BoxError,
                None => crate::error::polled_after_done("quota"),
            })),
        }
    }
}

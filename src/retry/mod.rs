//! Retry by error class, with backoff, `Retry-After`, a retry budget and a
//! total deadline.
//!
//! Decisions come from the [`Class`] of each result. An `Ok` response can
//! fail too — a `429` is `Ok(response)` classified `Throttled` — but only
//! with a classifier that reads responses: the layer's default
//! ([`ErrorClassifier`]) counts every `Ok`
//! as a success; for `http::Response`s give
//! `retry.layer().classify(HttpClassifier)` (or the
//! [`LlmClassifier`](crate::classify::LlmClassifier) for provider bodies):
//!
//! | class | decision |
//! |---|---|
//! | `Success` | return it |
//! | `Permanent` | return it at once, never retried |
//! | `Throttled` | wait `max(retry_after, backoff)`; a `retry_after` above the ceiling (default 60 s) is returned at once, with that `retry_after` attached ([`RetryAfterTooLong`]), instead of sleeping for an hour (when no attempt is left, the answer is returned as it came) |
//! | `Overloaded`, `Transient`, `Infrastructure` | backoff (per-class multipliers from [`Backoff`]); an `Overloaded` with a `retry_after` (a `503` with `Retry-After`, a breaker's open refusal) is waited like `Throttled`'s, ceiling included |
//!
//! - `max_attempts` counts every attempt (default 3). A total `deadline` bounds
//!   the whole call: no sleep ends past it, no attempt starts with less than
//!   `min_attempt_time` left, and a running attempt is cut at it
//!   ([`RejectKind::Timeout`]).
//! - A [`RetryBudget`] shared by every clone caps retries at a ratio of recent
//!   requests (default 20 % over 10 s) plus a floor (default 1/s of the
//!   window: 10 in any 10 s, usable at once): a failing
//!   upstream sees at most ~1.2× its normal load, not 3×. When it is spent the
//!   last real result is returned, not a new error, and counted.
//! - Retrying needs a copy of the request: `Req: Clone`, or your own
//!   [`RequestPolicy`] (which also says which requests may be retried and can
//!   tell the inner service the attempt number). Nothing is cloned when
//!   `max_attempts` is 1 or the request is not retryable.
//! - For `http::Request` ([`HttpRequests`], feature `http`): idempotent methods
//!   are retried, `POST` only with an `Idempotency-Key` header or when allowed.
//!   LLM completions are `POST` but safe to retry *before any output reached the
//!   caller* — which is all this layer ever retries: once it has returned a
//!   (streamed) response, a later failure in the stream is the caller's, never
//!   retried here.
//! - Dropping the future (during an attempt or a backoff sleep) stops everything.
//!
//! ```
//! use semaforo::backoff::{Backoff, Jitter};
//! use semaforo::retry::Retry;
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! // A job queue's policy: 3 attempts, exponential backoff from 2 s.
//! let retry = Retry::builder()
//!     .max_attempts(3)
//!     .backoff(Backoff::exponential(Duration::from_secs(2)).jitter(Jitter::None).build()?)
//!     .build()?;
//! let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
//! let mut svc = ServiceBuilder::new().layer(retry.layer()).service(service_fn({
//!     let attempts = attempts.clone();
//!     move |job: &'static str| {
//!         let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!         async move {
//!             if n < 2 { Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)) } else { Ok(job) }
//!         }
//!     }
//! }));
//! let t0 = tokio::time::Instant::now();
//! assert_eq!(svc.ready().await?.call("financial-analysis").await?, "financial-analysis");
//! assert_eq!(t0.elapsed(), Duration::from_secs(6)); // waited 2 s, then 4 s
//! # Ok(()) }
//! ```

mod budget;
mod service;

pub use budget::RetryBudget;
#[cfg(feature = "http")]
pub use service::HttpRequests;
pub use service::{
    CloneRequests, RequestFns, RequestPolicy, ResponseFuture, RetryLayer, RetryService,
};

use crate::backoff::{Backoff, Jitter};
use crate::classify::{Class, ErrorClassifier};
use crate::error::{ConfigError, RejectKind};
use crate::observe::{Event, EventKind, ListenerSlot, Observer};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The attempt number (1-based), put in `http::Request` extensions by
/// [`HttpRequests`] so the inner service can see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attempt(pub u32);

/// A request extension that forbids retrying this one request: the
/// [`HttpRequests`] policy (and so the LLM preset) never retries an
/// `http::Request` that carries it. The [`reqwest`](crate::reqwest) adapter
/// puts it on a request whose body is a stream (it cannot be sent twice);
/// a gRPC call marks a non-idempotent method with it.
///
/// ```
/// # #[cfg(feature = "http")] {
/// use semaforo::retry::{HttpRequests, NoRetry, RequestPolicy};
///
/// let mut req = http::Request::get("/report").body(()).unwrap();
/// assert!(HttpRequests::default().retryable(&req));
/// req.extensions_mut().insert(NoRetry);
/// assert!(!HttpRequests::default().retryable(&req));
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NoRetry;

pub use crate::error::RetryAfterTooLong;

/// What the layer decided after one attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Decision<T> {
    Return,
    TooLong(Duration),
    /// After this delay, with this request.
    Retry(Duration, T),
}

pub(crate) struct Shared {
    pub(crate) obs: Observer,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) ceiling: Duration,
    pub(crate) deadline: Option<Duration>,
    pub(crate) min_attempt_time: Duration,
    pub(crate) budget: Option<Arc<RetryBudget>>,
    pub(crate) retries: AtomicU64,
    pub(crate) gave_up_budget: AtomicU64,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("name", &self.obs.name)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("ceiling", &self.ceiling)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The decision after attempt `attempt` (1-based) ended in `class`.
    /// `left` is the time left before the deadline, if there is one.
    /// `next`: the request of the next attempt, asked for once every other
    /// rule allows a retry, before the budget is drawn on or the retry
    /// counted (`None`, no copy: the result is returned as it is).
    pub(crate) fn decide<R: rand::Rng + ?Sized, T>(
        &self,
        class: &Class,
        attempt: u32,
        prev_delay: Duration,
        left: Option<Duration>,
        rng: &mut R,
        next: impl FnOnce() -> Option<T>,
    ) -> Decision<T> {
        if !class.is_retryable() || attempt >= self.max_attempts {
            return Decision::Return;
        }
        let backoff = self.backoff.delay_for_drawn(
            class,
            attempt.saturating_sub(1),
            prev_delay,
            rng.random(),
        );
        let delay = match class.retry_after() {
            Some(ra) if ra > self.ceiling => return Decision::TooLong(ra),
            Some(ra) => ra.max(backoff),
            None => backoff,
        };
        if let Some(left) = left {
            // Never sleep past the deadline, never start an attempt without time for it.
            if delay.saturating_add(self.min_attempt_time) >= left {
                return Decision::Return;
            }
        }
        let Some(req) = next() else {
            return Decision::Return;
        };
        if let Some(b) = &self.budget {
            if !b.try_withdraw() {
                self.gave_up_budget.fetch_add(1, Ordering::Relaxed);
                self.obs.emit(
                    "retry",
                    EventKind::Rejected {
                        kind: RejectKind::RetryBudgetExhausted,
                        retry_after: None,
                    },
                );
                return Decision::Return;
            }
        }
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.obs.emit(
            "retry",
            EventKind::Retried {
                class: *class,
                attempt,
                delay,
            },
        );
        Decision::Retry(delay, req)
    }
}

/// A retry policy; make layers with [`Retry::layer`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Retry {
    shared: Arc<Shared>,
}

/// Builder for [`Retry`]; [`build`](Self::build) validates it.
#[must_use = "call .build() to get a Retry"]
pub struct RetryBuilder {
    name: Option<Arc<str>>,
    listener: ListenerSlot,
    max_attempts: u32,
    backoff: Option<Backoff>,
    ceiling: Duration,
    deadline: Option<Duration>,
    min_attempt_time: Duration,
    budget: BudgetChoice,
}

enum BudgetChoice {
    Default,
    None,
    Shared(Arc<RetryBudget>),
}

impl fmt::Debug for RetryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBuilder")
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// Default retry-after ceiling: a longer wait is returned to the caller.
pub const DEFAULT_RETRY_AFTER_CEILING: Duration = Duration::from_secs(60);

impl RetryBuilder {
    /// Names the layer in errors and events.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` for each of this layer's events (retried; rejected when the
    /// retry budget is spent or the deadline passes); see
    /// [`observe`](crate::observe).
    /// Listeners add up: a second `on_event` keeps the first (both are called, in order).
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// Attempts in total, the first included (default 3; 1 = no retry).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The backoff between attempts (default: exponential from 500 ms, ×2,
    /// full jitter, capped at 30 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// A `Retry-After` longer than this is returned at once (default 60 s).
    pub fn retry_after_ceiling(mut self, ceiling: Duration) -> Self {
        self.ceiling = ceiling;
        self
    }

    /// The most a call may take, all attempts and waits included; more than
    /// zero ([`build`](Self::build) refuses zero: no call could answer).
    pub fn deadline(mut self, total: Duration) -> Self {
        self.deadline = Some(total);
        self
    }

    /// Do not start an attempt with less time than this left before the
    /// deadline: looked at when a retry is decided (no retry: the last result
    /// is returned) and again once the service is ready for it (too late:
    /// the call ends with the deadline's `Timeout` refusal, saying why).
    pub fn min_attempt_time(mut self, d: Duration) -> Self {
        self.min_attempt_time = d;
        self
    }

    /// Share this budget (across layers too). Default: a budget of its own,
    /// 20 % of the last 10 s of requests plus a floor of 1 retry per second
    /// of the window — 10 retries in any 10 s, which a burst of failures
    /// may take at once.
    pub fn budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = BudgetChoice::Shared(budget);
        self
    }

    /// No budget: every failure may be retried up to `max_attempts`.
    pub fn no_budget(mut self) -> Self {
        self.budget = BudgetChoice::None;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] on `max_attempts` 0 or a zero `deadline`.
    pub fn build(self) -> Result<Retry, ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "retry",
                "max_attempts",
                "must be at least 1",
            ));
        }
        if self.deadline == Some(Duration::ZERO) {
            return Err(ConfigError::new(
                "retry",
                "deadline",
                "must be more than zero (no call could answer in time)",
            ));
        }
        let backoff = match self.backoff {
            Some(b) => b,
            None => Backoff::exponential(Duration::from_millis(500))
                .jitter(Jitter::Full)
                .cap(Duration::from_secs(30))
                .build()?,
        };
        let budget = match self.budget {
            BudgetChoice::Default => Some(Arc::new(RetryBudget::new(
                0.2,
                1.0,
                Duration::from_secs(10),
            )?)),
            BudgetChoice::None => None,
            BudgetChoice::Shared(b) => Some(b),
        };
        Ok(Retry {
            shared: Arc::new(Shared {
                obs: Observer::new(self.name, self.listener.0),
                max_attempts: self.max_attempts,
                backoff,
                ceiling: self.ceiling,
                deadline: self.deadline,
                min_attempt_time: self.min_attempt_time,
                budget,
                retries: AtomicU64::new(0),
                gave_up_budget: AtomicU64::new(0),
            }),
        })
    }
}

impl Retry {
    /// The name given to the builder.
    pub fn name(&self) -> Option<&str> {
        self.shared.obs.name.as_deref()
    }

    /// Starts a builder (3 attempts, exponential backoff from 500 ms with
    /// full jitter capped at 30 s, a retry budget of its own).
    ///
    /// ```
    /// use semaforo::backoff::Backoff;
    /// use semaforo::retry::Retry;
    /// use std::time::Duration;
    ///
    /// // A job queue's policy: 3 attempts, exponential backoff from 2 s, 1 min in all.
    /// let retry = Retry::builder()
    ///     .name("jobs")
    ///     .max_attempts(3)
    ///     .backoff(Backoff::exponential(Duration::from_secs(2)).build()?)
    ///     .deadline(Duration::from_secs(60))
    ///     .build()?;
    /// let layer = retry.layer(); // classify with `.classify(...)`, copy requests with `.requests(...)`
    /// # let _ = layer;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn builder() -> RetryBuilder {
        RetryBuilder {
            name: None,
            listener: ListenerSlot::default(),
            max_attempts: 3,
            backoff: None,
            ceiling: DEFAULT_RETRY_AFTER_CEILING,
            deadline: None,
            min_attempt_time: Duration::ZERO,
            budget: BudgetChoice::Default,
        }
    }

    crate::closure::call_method!("retry");

    /// A layer retrying `Clone` requests, classifying with [`ErrorClassifier`]
    /// (set another with [`RetryLayer::classify`], the request policy with
    /// [`RetryLayer::requests`]).
    pub fn layer(&self) -> RetryLayer<ErrorClassifier, CloneRequests> {
        RetryLayer::new(self.shared.clone(), ErrorClassifier, CloneRequests)
    }

    /// Retries decided so far — each told as [`EventKind::Retried`] (and
    /// counted in `semaforo_retries_total`) and, with a budget, paid for
    /// when decided, before its backoff: a retry whose caller went away
    /// during the backoff (a timeout above, a client gone) counts, though
    /// it was never sent.
    pub fn retries(&self) -> u64 {
        self.shared.retries.load(Ordering::Relaxed)
    }

    /// Failures returned without retry because the budget was spent.
    pub fn gave_up_on_budget(&self) -> u64 {
        self.shared.gave_up_budget.load(Ordering::Relaxed)
    }

    /// The budget, if any.
    pub fn budget(&self) -> Option<&Arc<RetryBudget>> {
        self.shared.budget.as_ref()
    }
}

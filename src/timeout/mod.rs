//! Timeouts for one attempt, for the whole call, for the first chunk of a
//! streamed answer and for the gaps between chunks.
//!
//! An LLM answer is finished when its last chunk arrives, and it can stall half
//! way. tower's `Timeout` stops at the response headers; this one can follow the
//! body. A long-generation pipeline runs with a 30 min read timeout and a 20 min
//! "no progress" timeout: that is [`TimeoutBuilder::total`] and
//! [`TimeoutBuilder::idle`].
//!
//! | limit | measured from | to |
//! |---|---|---|
//! | `attempt` | the call's first poll that waits | the response (headers) |
//! | `total` | the call's first poll that waits | the end of the body / stream |
//! | `first_chunk` | the response | the first chunk or frame |
//! | `idle` | a chunk | the next one |
//!
//! "The call" starts at the first poll of its future that has to wait, not
//! at `Service::call`: a call answered at its first poll reads no clock and
//! arms no timer (the healthy path's price). A caller that awaits the future
//! it was given (`svc.ready().await?.call(req).await`) sees no difference; a
//! future kept unpolled for a while (built now, awaited later) gets its
//! limits from when it is first awaited — unlike tower's `Timeout`, whose
//! timer starts in `call`. Bound the time before the first poll yourself
//! (or put the timeout where the future is awaited).
//!
//! Expiry is a [`Rejected`](crate::Rejected) of kind
//! [`Timeout`](crate::RejectKind::Timeout) (classified `Transient`) whose text
//! names the limit ("timeout 'openai': timed out (no progress for 20 min)"); inside a
//! stream it arrives as the stream's last item, an `Err`, so layers above (a
//! bulkhead holding its permit, a breaker recording at the end) see a failure.
//!
//! ```
//! use semaforo::timeout::Timeout;
//! use std::time::Duration;
//! use futures::{stream, StreamExt};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! let timeout = Timeout::builder()
//!     .name("openai")
//!     .attempt(Duration::from_secs(30))   // connect/response 30 s
//!     .idle(Duration::from_secs(20 * 60)) // no progress for 20 min
//!     .total(Duration::from_secs(30 * 60))
//!     .build()?;
//! let mut svc = ServiceBuilder::new()
//!     .layer(timeout.layer().until_stream_end())
//!     .service(service_fn(|_: ()| async {
//!         Ok::<_, std::io::Error>(stream::iter(vec![Ok::<_, std::io::Error>("hola")]))
//!     }));
//! let chunks: Vec<_> = svc.ready().await?.call(()).await?.collect().await;
//! assert_eq!(chunks.len(), 1);
//! # Ok(()) }
//! ```

mod service;
mod timed;

#[cfg(feature = "http")]
pub use service::WholeBody;
pub use service::{
    NoRequestLimit, RequestLimit, ResponseFuture, Timed, TimeoutLayer, TimeoutService, Whole,
    WholeStream,
};
pub use timed::Deadlines;

use crate::error::ConfigError;
use crate::observe::{Event, ListenerSlot, Observer};
use std::sync::Arc;
use std::time::Duration;

/// The configured limits (see the table in the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// From the call (its future's first poll that waits) to the response.
    pub attempt: Option<Duration>,
    /// From the call (its future's first poll that waits) to the end of the
    /// body or stream.
    pub total: Option<Duration>,
    /// From the response to its first chunk.
    pub first_chunk: Option<Duration>,
    /// Between two chunks.
    pub idle: Option<Duration>,
}

/// [`Limits`] as a call's future carries them: each limit in whole
/// nanoseconds, [`Packed::NONE`] for "no limit" (32 bytes where `Limits` takes
/// 64: every layer above copies the future, so its size is paid on every
/// call). A limit above ~584 years is kept as ~584 years, later than any
/// timer can fire (timers saturate at 30 years, see [`crate::time::FAR`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Packed {
    attempt: u64,
    total: u64,
    first_chunk: u64,
    idle: u64,
}

impl Packed {
    /// No limit (larger than any limit, so "sooner" is a plain `<`).
    pub(crate) const NONE: u64 = u64::MAX;

    #[inline]
    pub(crate) fn nanos(d: Option<Duration>) -> u64 {
        d.map_or(Self::NONE, |d| {
            u64::try_from(d.as_nanos()).map_or(Self::NONE - 1, |n| n.min(Self::NONE - 1))
        })
    }

    #[inline]
    fn duration(n: u64) -> Option<Duration> {
        (n != Self::NONE).then(|| Duration::from_nanos(n))
    }

    pub(crate) fn of(l: Limits) -> Self {
        Packed {
            attempt: Self::nanos(l.attempt),
            total: Self::nanos(l.total),
            first_chunk: Self::nanos(l.first_chunk),
            idle: Self::nanos(l.idle),
        }
    }

    pub(crate) fn limits(self) -> Limits {
        Limits {
            attempt: Self::duration(self.attempt),
            total: Self::duration(self.total),
            first_chunk: Self::duration(self.first_chunk),
            idle: Self::duration(self.idle),
        }
    }

    /// Tightens `total` to `own` nanoseconds when that is sooner.
    #[inline]
    pub(crate) fn tighten_total(&mut self, own: u64) -> bool {
        let sooner = own < self.total;
        if sooner {
            self.total = own;
        }
        sooner
    }

    /// The limit until the response: `attempt`, or `total` if sooner.
    #[inline]
    pub(crate) fn until_response(self) -> Option<(Duration, bool)> {
        if self.total < self.attempt {
            Some((Duration::from_nanos(self.total), true))
        } else {
            Self::duration(self.attempt).map(|d| (d, false))
        }
    }
}

/// A set of timeouts; make layers with [`Timeout::layer`].
#[derive(Debug, Clone)]
pub struct Timeout {
    limits: Limits,
    obs: Option<Arc<Observer>>,
}

/// Builder for [`Timeout`]; [`build`](Self::build) validates it.
#[derive(Debug, Clone, Default)]
#[must_use = "call .build() to get a Timeout"]
pub struct TimeoutBuilder {
    limits: Limits,
    name: Option<Arc<str>>,
    listener: ListenerSlot,
}

impl TimeoutBuilder {
    /// Names the layer in errors.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` each time a limit expires; see [`observe`](crate::observe).
    /// Listeners add up: a second `on_event` keeps the first (both are called, in order).
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// From the call (its future's first poll that waits, see the module
    /// docs) to the response.
    pub fn attempt(mut self, d: Duration) -> Self {
        self.limits.attempt = Some(d);
        self
    }

    /// From the call (its future's first poll that waits) to the end of the
    /// streamed body (or the response, for responses that are not streamed).
    pub fn total(mut self, d: Duration) -> Self {
        self.limits.total = Some(d);
        self
    }

    /// From the response to its first chunk (default: the idle limit).
    /// Applies only to a response followed to its end
    /// ([`TimeoutLayer::until_stream_end`], [`TimeoutLayer::until_body_end`]).
    pub fn first_chunk(mut self, d: Duration) -> Self {
        self.limits.first_chunk = Some(d);
        self
    }

    /// The longest gap between two chunks ("no progress"). Applies only to
    /// a response followed to its end ([`TimeoutLayer::until_stream_end`],
    /// [`TimeoutLayer::until_body_end`]).
    pub fn idle(mut self, d: Duration) -> Self {
        self.limits.idle = Some(d);
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] on `limits` (none of `attempt`, `total`,
    /// `first_chunk`, `idle` set) or on the limit that is zero.
    pub fn build(self) -> Result<Timeout, ConfigError> {
        let l = self.limits;
        if l == Limits::default() {
            return Err(ConfigError::new(
                "timeout",
                "limits",
                "set at least one of attempt, total, first_chunk, idle",
            ));
        }
        for (field, v) in [
            ("attempt", l.attempt),
            ("total", l.total),
            ("first_chunk", l.first_chunk),
            ("idle", l.idle),
        ] {
            if v == Some(Duration::ZERO) {
                return Err(ConfigError::new("timeout", field, "must be above zero"));
            }
        }
        // Unnamed and unheard: nothing to carry per call (tracing still sees
        // each expiry).
        let obs = match (self.name, self.listener.0) {
            (None, None) => None,
            (name, listener) => Some(Arc::new(Observer::new(name, listener))),
        };
        Ok(Timeout { limits: l, obs })
    }
}

impl Timeout {
    /// The name given to the builder.
    pub fn name(&self) -> Option<&str> {
        self.obs.as_ref().and_then(|o| o.name.as_deref())
    }

    /// Starts a builder; give it at least one limit.
    ///
    /// ```
    /// use semaforo::timeout::Timeout;
    /// use std::time::Duration;
    ///
    /// // A streamed generation: 30 s to the first chunk, 20 s of silence at most.
    /// let timeout = Timeout::builder()
    ///     .first_chunk(Duration::from_secs(30))
    ///     .idle(Duration::from_secs(20))
    ///     .build()?;
    /// let layer = timeout.layer().until_stream_end();
    /// # let _ = layer;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn builder() -> TimeoutBuilder {
        TimeoutBuilder::default()
    }

    crate::closure::call_method!("timeout");

    /// A layer for plain responses: `attempt` and `total` bound the call (to
    /// the response). Use [`TimeoutLayer::until_stream_end`] or
    /// [`TimeoutLayer::until_body_end`] to follow a streamed answer to its
    /// end: `first_chunk` and `idle` apply only there — a `Timeout` with
    /// only those limits bounds nothing through this layer as it is.
    pub fn layer(&self) -> TimeoutLayer<Whole> {
        TimeoutLayer::new(self.limits, self.obs.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::{Limits, Packed};
    use std::time::Duration;

    #[test]
    fn packed_limits_keep_what_a_timer_can_tell_apart() {
        let l = Limits {
            attempt: Some(Duration::from_nanos(1)),
            total: None,
            first_chunk: Some(Duration::ZERO),
            idle: Some(Duration::from_secs(20)),
        };
        assert_eq!(Packed::of(l).limits(), l);
        // Beyond ~584 years: kept as ~584 years (no timer fires before).
        let huge = Packed::of(Limits {
            attempt: Some(Duration::MAX),
            ..Limits::default()
        })
        .limits();
        let kept = huge.attempt.expect("still a limit");
        assert!(kept > Duration::from_secs(86_400 * 365 * 584), "{kept:?}");
        assert_eq!(huge.total, None);
    }

    #[test]
    fn the_limit_until_the_response_is_the_sooner_one() {
        let p = |attempt, total| {
            Packed::of(Limits {
                attempt,
                total,
                ..Limits::default()
            })
        };
        let s = Duration::from_secs;
        assert_eq!(p(None, None).until_response(), None);
        assert_eq!(p(Some(s(3)), None).until_response(), Some((s(3), false)));
        assert_eq!(p(None, Some(s(5))).until_response(), Some((s(5), true)));
        assert_eq!(
            p(Some(s(3)), Some(s(5))).until_response(),
            Some((s(3), false))
        );
        assert_eq!(
            p(Some(s(5)), Some(s(3))).until_response(),
            Some((s(3), true))
        );
        // Equal: the attempt names it (as before the packing).
        assert_eq!(
            p(Some(s(4)), Some(s(4))).until_response(),
            Some((s(4), false))
        );
        let mut q = p(Some(s(9)), Some(s(5)));
        assert!(!q.tighten_total(Packed::nanos(Some(s(5)))), "not sooner");
        assert!(q.tighten_total(Packed::nanos(Some(s(2)))));
        assert_eq!(q.until_response(), Some((s(2), true)));
        let mut none = p(None, None);
        assert!(none.tighten_total(Packed::nanos(Some(Duration::MAX))));
    }
}

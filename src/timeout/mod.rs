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
//! | `attempt` | the call | the response (headers) |
//! | `total` | the call | the end of the body / stream |
//! | `first_chunk` | the response | the first chunk or frame |
//! | `idle` | a chunk | the next one |
//!
//! Expiry is a [`Rejected`](crate::Rejected) of kind
//! [`Timeout`](crate::RejectKind::Timeout) (classified `Transient`) whose text
//! names the limit ("timeout 'openai': timed out (no progress for 1200s)"); inside a
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
    /// From the call to the response.
    pub attempt: Option<Duration>,
    /// From the call to the end of the body or stream.
    pub total: Option<Duration>,
    /// From the response to its first chunk.
    pub first_chunk: Option<Duration>,
    /// Between two chunks.
    pub idle: Option<Duration>,
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

    /// From the call to the response.
    pub fn attempt(mut self, d: Duration) -> Self {
        self.limits.attempt = Some(d);
        self
    }

    /// From the call to the end of the streamed body (or the response, for
    /// responses that are not streamed).
    pub fn total(mut self, d: Duration) -> Self {
        self.limits.total = Some(d);
        self
    }

    /// From the response to its first chunk (default: the idle limit).
    pub fn first_chunk(mut self, d: Duration) -> Self {
        self.limits.first_chunk = Some(d);
        self
    }

    /// The longest gap between two chunks ("no progress").
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

    /// A layer for plain responses: `attempt` and `total` bound the call.
    /// Use [`TimeoutLayer::until_stream_end`] or [`TimeoutLayer::until_body_end`] to follow a
    /// streamed answer to its end.
    pub fn layer(&self) -> TimeoutLayer<Whole> {
        TimeoutLayer::new(self.limits, self.obs.clone())
    }
}

//! Classify a result once, before anyone decides anything about it.
//!
//! Retry, breaker, pace and metrics all read the same [`Class`]; none of them
//! re-parses status codes or error bodies. A [`Classify`] implementation turns a
//! typed `Result<&Res, &Err>` into a `Class`; any `Fn(Result<&Res, &Err>) -> Class`
//! closure is one.
//!
//! Shipped classifiers:
//! - [`classify_error`] / [`ErrorClassifier`]: any error, by walking its `source()`
//!   chain for [`std::io::Error`], [`tokio::time::error::Elapsed`] and [`Rejected`];
//! - [`HttpClassifier`] (feature `http`): `http::Response` status and headers;
//! - [`LlmClassifier`] (feature `llm`): also reads OpenAI, Anthropic and Gemini
//!   error bodies (quota vs rate limit vs overload).
//!
//! Header parsing (`Retry-After`, `retry-after-ms`, `x-ratelimit-*`,
//! `anthropic-ratelimit-*`, Gemini `retryDelay`) lives in [`headers`].
//!
//! ```
//! use semaforo::classify::{Class, Classify, Permanent};
//!
//! // A closure is a classifier: here a status code in the Ok value.
//! let by_status = |r: Result<&u16, &std::io::Error>| match r {
//!     Ok(200..=299) => Class::Success,
//!     Ok(429) => Class::Throttled { retry_after: None },
//!     Ok(_) => Class::permanent(Permanent::InvalidRequest),
//!     Err(e) => semaforo::classify::classify_io_error(e),
//! };
//! assert_eq!(by_status.classify(Ok(&429)), Class::Throttled { retry_after: None });
//! ```

pub mod headers;
#[cfg(feature = "http")]
mod http;
#[cfg(feature = "llm")]
mod llm;

#[cfg(feature = "http")]
pub use self::http::{status_class, Classified, HttpClassifier};
#[cfg(feature = "llm")]
pub use self::llm::{LlmClassifier, LlmHeadClassifier, ProviderError, MAX_ERROR_BODY};
pub use headers::{RateLimitInfo, RateLimitWindow};

use crate::error::{RejectKind, Rejected};
use std::error::Error as StdError;
use std::io;
use std::time::Duration;

/// What a result means for everyone who reacts to it.
///
/// | class | retry | breaker (default) | pace |
/// |---|---|---|---|
/// | `Success` | no | success | reconcile |
/// | `Throttled` | after `retry_after` | **not** a failure | pause everyone |
/// | `Overloaded` | backoff (its own multiplier with [`Backoff::overloaded`](crate::backoff::BackoffBuilder::overloaded)), or its `retry_after` | failure | — |
/// | `Transient` | backoff | failure | — |
/// | `Infrastructure` | backoff | failure | — |
/// | `Permanent` | never | **not** a failure | — |
///
/// ```
/// use semaforo::classify::{Class, Permanent};
/// use std::time::Duration;
///
/// let throttled = Class::Throttled { retry_after: Some(Duration::from_secs(6)) };
/// assert!(throttled.is_retryable() && !throttled.is_upstream_failure());
/// assert_eq!(throttled.retry_after(), Some(Duration::from_secs(6)));
/// let refused = Class::permanent(Permanent::Authentication);
/// match refused {
///     Class::Permanent { reason: Permanent::Authentication } => { /* check the key */ }
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Class {
    /// The call did what was asked.
    Success,
    /// The upstream asks us to slow down (HTTP 429, `rate_limit_error`,
    /// `RESOURCE_EXHAUSTED` with a retry delay).
    Throttled {
        /// How long the upstream asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// The upstream is over capacity (HTTP 503, Anthropic 529 `overloaded_error`).
    Overloaded {
        /// How long the upstream asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// A passing failure: timeout, 500/502/504/408, a stream cut mid-way.
    Transient,
    /// The path to the upstream is broken: connection refused or reset, DNS, TLS,
    /// a pool or a local dependency down.
    Infrastructure,
    /// Retrying cannot help: bad request, auth, not found, quota used up for the
    /// billing period, context too long, content filtered. The
    /// [`reason`](Permanent) says which, so a router or a fallback can act on it
    /// (another model for a context too long, another key for a spent quota).
    Permanent {
        /// Why retrying the same call cannot help.
        reason: Permanent,
    },
}

/// Why a [`Class::Permanent`] result cannot be retried.
///
/// Grows with the providers' error vocabulary (`#[non_exhaustive]`): match
/// with a `_` arm.
///
/// ```
/// use semaforo::classify::{Class, Permanent};
///
/// let class = Class::permanent(Permanent::ContextLengthExceeded);
/// assert_eq!(class, Class::Permanent { reason: Permanent::ContextLengthExceeded });
/// assert_eq!(class.permanent_reason(), Some(Permanent::ContextLengthExceeded));
/// assert_eq!(class.permanent_reason().map(|r| r.as_str()), Some("context_length_exceeded"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Permanent {
    /// The request is malformed or names something invalid (HTTP 400, 422).
    InvalidRequest,
    /// The credentials are missing or wrong (HTTP 401).
    Authentication,
    /// The credentials may not do this (HTTP 403).
    PermissionDenied,
    /// The resource or model does not exist (HTTP 404).
    NotFound,
    /// The request is larger than the upstream accepts at all (HTTP 413;
    /// OpenAI's "Request too large" 429: one request above the whole
    /// tokens-per-minute limit).
    RequestTooLarge,
    /// The prompt is longer than the model's context window
    /// (`context_length_exceeded`, "maximum context length").
    ContextLengthExceeded,
    /// The content was refused by a safety filter (`content_policy_violation`,
    /// `content_filter`).
    ContentPolicy,
    /// The billing quota, credit or per-day quota is used up
    /// (`insufficient_quota`, `billing_error`, Gemini `…PerDay…`): retrying is
    /// useless until the period or the plan changes.
    QuotaExhausted,
    /// The upstream said not to retry (`x-should-retry: false`).
    DoNotRetry,
    /// This process is shutting down ([`RejectKind::ShuttingDown`]).
    ShuttingDown,
    /// The retry budget is spent ([`RejectKind::RetryBudgetExhausted`]).
    RetryBudgetExhausted,
    /// Any other permanent failure (another 4xx, an unsupported operation).
    Other,
}

impl Permanent {
    /// A short stable label for logs and metrics (`"context_length_exceeded"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Permanent::InvalidRequest => "invalid_request",
            Permanent::Authentication => "authentication",
            Permanent::PermissionDenied => "permission_denied",
            Permanent::NotFound => "not_found",
            Permanent::RequestTooLarge => "request_too_large",
            Permanent::ContextLengthExceeded => "context_length_exceeded",
            Permanent::ContentPolicy => "content_policy",
            Permanent::QuotaExhausted => "quota_exhausted",
            Permanent::DoNotRetry => "do_not_retry",
            Permanent::ShuttingDown => "shutting_down",
            Permanent::RetryBudgetExhausted => "retry_budget_exhausted",
            Permanent::Other => "other",
        }
    }
}

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Class {
    /// `Class::Permanent { reason }`.
    pub const fn permanent(reason: Permanent) -> Class {
        Class::Permanent { reason }
    }

    /// The reason of a [`Class::Permanent`]; `None` for every other class.
    pub fn permanent_reason(&self) -> Option<Permanent> {
        match self {
            Class::Permanent { reason } => Some(*reason),
            _ => None,
        }
    }

    /// `true` for [`Class::Success`].
    pub fn is_success(&self) -> bool {
        matches!(self, Class::Success)
    }

    /// `true` when another attempt may succeed (everything but `Success` and `Permanent`).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Class::Success | Class::Permanent { .. })
    }

    /// `true` for the classes a circuit breaker counts as upstream failures by
    /// default: `Overloaded`, `Transient`, `Infrastructure`. Throttling means
    /// "slow down", not "broken"; a permanent error is the caller's fault.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            Class::Overloaded { .. } | Class::Transient | Class::Infrastructure
        )
    }

    /// The wait the upstream asked for (`Throttled` and `Overloaded` only).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Class::Throttled { retry_after } | Class::Overloaded { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// A short stable label for logs and metrics (`"throttled"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Class::Success => "success",
            Class::Throttled { .. } => "throttled",
            Class::Overloaded { .. } => "overloaded",
            Class::Transient => "transient",
            Class::Infrastructure => "infrastructure",
            Class::Permanent { .. } => "permanent",
        }
    }
}

/// Maps a typed result to a [`Class`].
///
/// Implemented for every `Fn(Result<&Res, &Err>) -> Class`.
///
/// # Classified once
///
/// The layers call [`classify_and_carry`](Self::classify_and_carry) on the
/// result they pass outward. The shipped HTTP classifiers
/// ([`HttpClassifier`], [`LlmClassifier`], [`LlmHeadClassifier`]) record a
/// failure's class in the response's extensions as [`Classified`], and read
/// it back instead of classifying again: in a stack of retry, breaker and
/// pacer, an error body is parsed once, by the innermost layer, whatever the
/// number of layers that read its class. [`HttpClassifier`] and
/// [`LlmHeadClassifier`] do not record a success (its class costs a status
/// check; recording it would allocate on the healthy path);
/// [`LlmClassifier`] does when the response already carries extensions (the
/// LLM preset's always do), since a 2xx is a success only once its body has
/// been scanned for a top-level `error` — one boxed record in a map that is
/// already there, where every layer would otherwise scan the body again. An
/// `Err` is classified by its type (a `source()` walk, no parsing)
/// wherever it is read. A classifier of your own can do the same for its
/// response type by overriding `classify_and_carry`.
pub trait Classify<Res, Err> {
    /// Classifies one result.
    fn classify(&self, result: Result<&Res, &Err>) -> Class;

    /// Classifies a result on its way outward, and may record the class on the
    /// response so the layers outside read it instead of classifying again
    /// (see [the trait docs](Classify#classified-once)). The default is
    /// [`classify`](Self::classify).
    #[inline]
    fn classify_and_carry(&self, result: Result<&mut Res, &Err>) -> Class {
        self.classify(result.map(|r| &*r))
    }
}

impl<F, Res, Err> Classify<Res, Err> for F
where
    F: Fn(Result<&Res, &Err>) -> Class,
{
    fn classify(&self, result: Result<&Res, &Err>) -> Class {
        self(result)
    }
}

/// Any `Ok` is a success; an error is classified by [`classify_error`].
///
/// ```
/// use semaforo::classify::{Class, Classify, ErrorClassifier};
/// use std::io;
///
/// let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
/// assert_eq!(ErrorClassifier.classify(Err::<&(), _>(&refused)), Class::Infrastructure);
/// assert_eq!(ErrorClassifier.classify(Ok::<_, &io::Error>(&())), Class::Success);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorClassifier;

impl<Res, Err> Classify<Res, Err> for ErrorClassifier
where
    Err: AsErrorRef,
{
    fn classify(&self, result: Result<&Res, &Err>) -> Class {
        match result {
            Ok(_) => Class::Success,
            Err(e) => classify_error(e.as_error_ref()),
        }
    }
}

/// Borrow an error as `&dyn Error`, so one classifier serves `BoxError`,
/// `io::Error` and the crate's own errors.
///
/// Implemented for the boxed error types and the std/tokio errors the crate
/// classifies. For your own error type, implement it in one line
/// (`fn as_error_ref(&self) -> &(dyn Error + 'static) { self }`). A blanket impl
/// for every `E: Error` is impossible next to the one for `BoxError` (coherence).
pub trait AsErrorRef {
    /// The error as a trait object.
    fn as_error_ref(&self) -> &(dyn StdError + 'static);
}

macro_rules! as_error_ref_boxed {
    ($($t:ty),*) => {$(
        impl AsErrorRef for $t {
            fn as_error_ref(&self) -> &(dyn StdError + 'static) {
                self.as_ref()
            }
        }
    )*};
}
as_error_ref_boxed!(
    Box<dyn StdError + Send + Sync + 'static>,
    Box<dyn StdError + Send + 'static>,
    Box<dyn StdError + 'static>
);

macro_rules! as_error_ref_self {
    ($($t:ty),*) => {$(
        impl AsErrorRef for $t {
            fn as_error_ref(&self) -> &(dyn StdError + 'static) {
                self
            }
        }
    )*};
}
as_error_ref_self!(
    io::Error,
    tokio::time::error::Elapsed,
    Rejected,
    std::convert::Infallible
);
#[cfg(feature = "http")]
as_error_ref_self!(::http::Error);

/// Where a reader of a streamed body leaves the class of a failure it found
/// in the body after a successful status (an SSE `event: error` after a
/// `200`), for the layers that record the call when the body is over (the
/// breaker's `record_on_body_end`): the failure counts by its class — a
/// content-policy error is `Permanent` and never trips a breaker — and
/// counts also when the reader lets go of the body at the error, before
/// the body's own error reaches it. Cheap to clone; clones share the slot.
/// The LLM preset's SSE reader puts one in the response's extensions.
///
/// ```
/// use semaforo::classify::{BodyFailure, Class};
/// let seen = BodyFailure::new();
/// assert_eq!(seen.get(), None);
/// seen.clone().set(Class::Transient);
/// assert_eq!(seen.get(), Some(Class::Transient));
/// ```
#[derive(Debug, Clone, Default)]
pub struct BodyFailure(std::sync::Arc<std::sync::Mutex<Option<Class>>>);

impl BodyFailure {
    /// An empty slot.
    pub fn new() -> Self {
        BodyFailure::default()
    }

    /// Records the failure's class (the first one set stays: a body fails once).
    pub fn set(&self, class: Class) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(class);
        }
    }

    /// The class of the failure found, if any.
    pub fn get(&self) -> Option<Class> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A streamed answer that failed after its `200`: an SSE `event: error`, or a
/// `data:` payload whose JSON has a top-level `error` (the form
/// OpenAI-compatible servers such as vLLM and SGLang send), classified by
/// the LLM classifier's `classify_error_body` (the body error of the LLM
/// preset's streams, feature `llm`; [`classify_error`] answers its class).
#[derive(Debug, thiserror::Error)]
#[error("the stream failed mid-way ({class}): {data}", class = .class.as_str())]
pub struct StreamFailed {
    /// The error event's class.
    pub class: Class,
    /// Its data (at most the first 4 KiB, lossily decoded).
    pub data: String,
}

/// An error that states its own class: what [`classify_error`] answers for
/// it (the chaos layer's injected errors; usable for errors of your own).
///
/// ```
/// use semaforo::classify::{classify_error, Class, ClassError};
///
/// let e = ClassError::new(Class::Overloaded { retry_after: None }, "injected outage");
/// assert_eq!(classify_error(&e), Class::Overloaded { retry_after: None });
/// assert_eq!(e.to_string(), "injected outage (overloaded)");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} ({class})", class = .class.as_str())]
pub struct ClassError {
    /// Its class.
    pub class: Class,
    /// What happened.
    pub message: std::borrow::Cow<'static, str>,
}

impl ClassError {
    /// An error of `class`.
    pub fn new(class: Class, message: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        ClassError {
            class,
            message: message.into(),
        }
    }
}

/// Classifies an error by walking its `source()` chain.
///
/// - [`RetryAfterTooLong`](crate::error::RetryAfterTooLong) → `Throttled` with its wait.
/// - [`Rejected`] from a semaforo layer: `Timeout` → `Transient`; `CircuitOpen` →
///   `Overloaded` (with its retry_after); `QueueFull`, `QueueTimeout`,
///   `QuotaExceeded`, `BudgetExceeded` → `Throttled` (local back-pressure is
///   "slow down", never an upstream failure) — except a quota or budget
///   refusal without `retry_after`, a cost above a burst that can never fit:
///   `Permanent` (`RequestTooLarge`); `ShuttingDown` and
///   `RetryBudgetExhausted` → `Permanent` (trying again now cannot help).
/// - an [`std::io::Error`] → see [`classify_io_error`].
/// - a tokio [`Elapsed`](tokio::time::error::Elapsed) → `Transient`.
/// - a [`StreamFailed`] or a [`ClassError`] → its class.
/// - anything else: `Transient` (unknown failures are retried, within the retry budget).
pub fn classify_error(err: &(dyn StdError + 'static)) -> Class {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    for _ in 0..64 {
        let Some(e) = cur else { break };
        if let Some(r) = e.downcast_ref::<Rejected>() {
            return classify_rejected(r);
        }
        if let Some(r) = e.downcast_ref::<crate::error::RetryAfterTooLong>() {
            return Class::Throttled {
                retry_after: Some(r.retry_after),
            };
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return classify_io_error(io);
        }
        if e.is::<tokio::time::error::Elapsed>() {
            return Class::Transient;
        }
        if let Some(f) = e.downcast_ref::<StreamFailed>() {
            return f.class;
        }
        if let Some(f) = e.downcast_ref::<ClassError>() {
            return f.class;
        }
        #[cfg(feature = "redis")]
        if let Some(r) = e.downcast_ref::<redis::RedisError>() {
            return crate::redis::redis_error_class(r);
        }
        #[cfg(feature = "grpc")]
        if let Some(s) = e.downcast_ref::<tonic::Status>() {
            return crate::grpc::status_class(s);
        }
        // Both variants are `#[error(transparent)]`: their `source()` skips
        // what they wrap, so step into it here.
        #[cfg(feature = "reqwest")]
        if let Some(m) = e.downcast_ref::<reqwest_middleware::Error>() {
            cur = Some(match m {
                reqwest_middleware::Error::Middleware(a) => a.as_ref(),
                reqwest_middleware::Error::Reqwest(r) => r,
            });
            continue;
        }
        cur = e.source();
    }
    Class::Transient
}

/// The class of one of our own refusals (see [`classify_error`]).
pub(crate) fn classify_rejected(r: &Rejected) -> Class {
    let retry_after = r.retry_after();
    match r.kind() {
        RejectKind::Timeout => Class::Transient,
        RejectKind::BackendUnavailable => Class::Infrastructure,
        RejectKind::CircuitOpen => Class::Overloaded { retry_after },
        // No time after which it fits: a cost above a burst, refused for good.
        RejectKind::QuotaExceeded | RejectKind::BudgetExceeded if retry_after.is_none() => {
            Class::permanent(Permanent::RequestTooLarge)
        }
        RejectKind::QueueFull
        | RejectKind::QueueTimeout
        | RejectKind::QuotaExceeded
        | RejectKind::BudgetExceeded => Class::Throttled { retry_after },
        RejectKind::ShuttingDown => Class::permanent(Permanent::ShuttingDown),
        RejectKind::RetryBudgetExhausted => Class::permanent(Permanent::RetryBudgetExhausted),
    }
}

/// Classifies an I/O error.
///
/// Connection refused / reset / aborted, broken pipe, unreachable host or network,
/// address problems and DNS failures → `Infrastructure`; timed out, interrupted,
/// would-block and unexpected EOF (a stream cut mid-way) → `Transient`; invalid
/// input, permission denied, not found, unsupported → `Permanent`; anything else →
/// `Transient`.
///
/// DNS failures have no `ErrorKind` of their own in std; they are recognised by
/// the resolver's message ("failed to lookup address", "Name or service not known").
pub fn classify_io_error(err: &io::Error) -> Class {
    use io::ErrorKind as K;
    match err.kind() {
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected
        | K::BrokenPipe
        | K::AddrInUse
        | K::AddrNotAvailable => Class::Infrastructure,
        K::TimedOut | K::Interrupted | K::WouldBlock | K::UnexpectedEof => Class::Transient,
        K::InvalidInput => Class::permanent(Permanent::InvalidRequest),
        K::PermissionDenied => Class::permanent(Permanent::PermissionDenied),
        K::NotFound => Class::permanent(Permanent::NotFound),
        K::Unsupported => Class::permanent(Permanent::Other),
        _ => {
            if looks_like_dns_failure(err) || looks_like_unreachable(err) {
                Class::Infrastructure
            } else {
                Class::Transient
            }
        }
    }
}

fn looks_like_dns_failure(err: &io::Error) -> bool {
    let msg = err.to_string().to_ascii_lowercase();
    msg.contains("failed to lookup address")
        || msg.contains("name or service not known")
        || msg.contains("no such host")
        || msg.contains("temporary failure in name resolution")
        || msg.contains("dns")
}

fn looks_like_unreachable(err: &io::Error) -> bool {
    // `HostUnreachable`/`NetworkUnreachable`/`NetworkDown` are stable only since
    // Rust 1.83; match on the OS error code so older toolchains classify them too.
    #[cfg(unix)]
    {
        // ENETDOWN 100, ENETUNREACH 101, EHOSTUNREACH 113 on Linux; 50/51/65 on BSD/macOS.
        matches!(
            err.raw_os_error(),
            Some(100 | 101 | 113) if cfg!(target_os = "linux")
        ) || matches!(
            err.raw_os_error(),
            Some(50 | 51 | 65) if cfg!(any(target_os = "macos", target_os = "freebsd"))
        )
    }
    #[cfg(not(unix))]
    {
        let _ = err;
        false
    }
}

/// Lenient JSON readers (feature `llm`) skip a value of an unexpected type
/// instead of failing the whole document: the `visit_*` methods for the
/// scalar types, all answering `$out`.
#[cfg(feature = "llm")]
macro_rules! skip_others {
    ($out:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($out)
        }
    };
}

#[cfg(feature = "llm")]
pub(crate) use skip_others;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;

    #[test]
    fn io_errors_by_kind() {
        let c = |k| classify_io_error(&io::Error::from(k));
        assert_eq!(c(io::ErrorKind::ConnectionRefused), Class::Infrastructure);
        assert_eq!(c(io::ErrorKind::ConnectionReset), Class::Infrastructure);
        assert_eq!(c(io::ErrorKind::TimedOut), Class::Transient);
        assert_eq!(c(io::ErrorKind::UnexpectedEof), Class::Transient);
        assert_eq!(
            c(io::ErrorKind::PermissionDenied),
            Class::permanent(Permanent::PermissionDenied)
        );
        let dns =
            io::Error::other("failed to lookup address information: Name or service not known");
        assert_eq!(classify_io_error(&dns), Class::Infrastructure);
        #[cfg(target_os = "linux")]
        assert_eq!(
            classify_io_error(&io::Error::from_raw_os_error(113)),
            Class::Infrastructure
        );
    }

    #[tokio::test(start_paused = true)]
    async fn elapsed_is_transient() {
        let elapsed = tokio::time::timeout(Duration::from_millis(1), std::future::pending::<()>())
            .await
            .unwrap_err();
        let boxed: BoxError = Box::new(elapsed);
        assert_eq!(classify_error(boxed.as_ref()), Class::Transient);
    }

    #[test]
    fn rejections_are_not_upstream_failures_except_timeout() {
        let r = |k| classify_error(&Rejected::new("x", k).with_retry_after(Duration::from_secs(3)));
        let ra = Some(Duration::from_secs(3));
        assert_eq!(r(RejectKind::Timeout), Class::Transient);
        assert_eq!(
            r(RejectKind::QueueFull),
            Class::Throttled { retry_after: ra }
        );
        assert_eq!(
            r(RejectKind::CircuitOpen),
            Class::Overloaded { retry_after: ra }
        );
        assert_eq!(
            r(RejectKind::ShuttingDown),
            Class::permanent(Permanent::ShuttingDown)
        );
        assert!(!r(RejectKind::BudgetExceeded).is_upstream_failure());
        assert_eq!(
            r(RejectKind::QuotaExceeded),
            Class::Throttled { retry_after: ra }
        );
        // No retry_after: a cost that can never fit, not worth a retry.
        for k in [RejectKind::QuotaExceeded, RejectKind::BudgetExceeded] {
            assert_eq!(
                classify_error(&Rejected::new("x", k)),
                Class::permanent(Permanent::RequestTooLarge)
            );
        }
    }

    #[test]
    fn io_error_found_inside_a_wrapper() {
        #[derive(Debug, thiserror::Error)]
        #[error("request failed")]
        struct Wrap(#[source] io::Error);
        let e: BoxError = Box::new(Wrap(io::ErrorKind::ConnectionRefused.into()));
        assert_eq!(
            ErrorClassifier.classify(Err::<&(), _>(&e)),
            Class::Infrastructure
        );
    }

    #[test]
    fn class_helpers() {
        assert!(Class::Transient.is_retryable());
        assert!(!Class::permanent(Permanent::Other).is_retryable());
        assert!(!Class::Throttled { retry_after: None }.is_upstream_failure());
        assert!(Class::Infrastructure.is_upstream_failure());
        assert_eq!(
            Class::Overloaded {
                retry_after: Some(Duration::from_secs(1))
            }
            .retry_after(),
            Some(Duration::from_secs(1))
        );
    }
}

//! The error model shared by every layer.
//!
//! Layers are generic over the inner service's error and return [`BoxError`], the
//! tower convention. When a layer refuses a call *itself* (no work done, the inner
//! service never called) the boxed error is a [`Rejected`]: it says which layer
//! refused, why ([`RejectKind`]) and, when it knows, after how long a retry can
//! succeed — everything a server needs to answer `429`/`503` with `Retry-After`.
//!
//! Bad configuration is never a panic: builders return a [`ConfigError`].

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The boxed error every semaforo service returns (`Box<dyn Error + Send + Sync>`).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a layer refused a call without calling the inner service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectKind {
    /// The bulkhead's wait queue was full.
    QueueFull,
    /// The caller waited in the bulkhead queue longer than its `max_wait`.
    QueueTimeout,
    /// A keyed or global admission quota was spent.
    QuotaExceeded,
    /// The outbound budget (requests or tokens per minute) cannot serve the call in time.
    BudgetExceeded,
    /// The circuit breaker is open (or half-open with every probe slot taken).
    CircuitOpen,
    /// The retry budget is spent; the last real error is the source.
    RetryBudgetExhausted,
    /// The service is shutting down (or the bulkhead was closed).
    ShuttingDown,
    /// A deadline expired.
    Timeout,
    /// The shared limiter's backend (Redis) did not answer in time and the
    /// failure policy is `FailClosed`.
    BackendUnavailable,
}

impl RejectKind {
    /// The HTTP status a server answers this refusal with:
    ///
    /// | kind | status |
    /// |---|---|
    /// | `QuotaExceeded` (the caller's own limit) | 429 Too Many Requests |
    /// | `Timeout` | 504 Gateway Timeout |
    /// | every other kind (the server's capacity, budget, breaker, shutdown, backend) | 503 Service Unavailable |
    ///
    /// ```
    /// use semaforo::RejectKind;
    /// assert_eq!(RejectKind::QuotaExceeded.http_status(), 429);
    /// assert_eq!(RejectKind::QueueFull.http_status(), 503);
    /// ```
    pub fn http_status(self) -> u16 {
        match self {
            RejectKind::QuotaExceeded => 429,
            RejectKind::Timeout => 504,
            _ => 503,
        }
    }

    /// Whether the refusal is a verdict on who is calling (their own quota)
    /// rather than on the upstream or the shared capacity: such a refusal
    /// is not shared with other callers of an identical request
    /// ([`coalesce`](crate::coalesce)) and not answered by a
    /// [`fallback`](crate::fallback) (that would lift the caller's limit).
    ///
    /// ```
    /// use semaforo::RejectKind;
    /// assert!(RejectKind::QuotaExceeded.is_about_the_caller());
    /// assert!(!RejectKind::CircuitOpen.is_about_the_caller());
    /// ```
    pub fn is_about_the_caller(self) -> bool {
        matches!(self, RejectKind::QuotaExceeded)
    }

    /// A short lower-case description used in `Display` ("queue full").
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::QueueFull => "queue full",
            RejectKind::QueueTimeout => "queue wait timed out",
            RejectKind::QuotaExceeded => "quota exceeded",
            RejectKind::BudgetExceeded => "budget exceeded",
            RejectKind::CircuitOpen => "circuit open",
            RejectKind::RetryBudgetExhausted => "retry budget exhausted",
            RejectKind::ShuttingDown => "shutting down",
            RejectKind::Timeout => "timed out",
            RejectKind::BackendUnavailable => "limiter backend unavailable",
        }
    }
}

impl fmt::Display for RejectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call refused by a semaforo layer, before any work was done.
///
/// `Display` names the layer, its instance name and the limit, e.g.
/// `bulkhead 'openai': queue full (45/45)`.
///
/// ```
/// use semaforo::{BoxError, RejectKind, Rejected};
/// use std::time::Duration;
///
/// let err: BoxError = Rejected::new("bulkhead", RejectKind::QueueFull)
///     .with_name("openai")
///     .with_detail("45/45")
///     .with_retry_after(Duration::from_secs(2))
///     .into();
/// let rejected = Rejected::from_box(&err).expect("a rejection");
/// assert_eq!(rejected.kind(), RejectKind::QueueFull);
/// assert_eq!(rejected.retry_after(), Some(Duration::from_secs(2)));
/// assert_eq!(err.to_string(), "bulkhead 'openai': queue full (45/45), retry after 2 s");
/// ```
#[derive(Debug, Clone)]
pub struct Rejected {
    layer: &'static str,
    name: Option<Arc<str>>,
    kind: RejectKind,
    retry_after: Option<Duration>,
    detail: Option<Cow<'static, str>>,
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
    policy: Option<Arc<RateLimitPolicy>>,
}

/// The limit a rejection enforced, for `RateLimit-Policy` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// The policy's name (a plan: "free", "pro").
    pub name: Arc<str>,
    /// Calls (or units) allowed per window.
    pub quota: u64,
    /// The window.
    pub window: Duration,
}

impl Rejected {
    /// The whole HTTP answer to this refusal in one call (feature `http`): the
    /// status of [`RejectKind::http_status`] and the headers of
    /// [`http_headers`](Self::http_headers) (`Retry-After` in whole seconds,
    /// rounded up, never 0 for a positive wait; `RateLimit-Policy` and
    /// `RateLimit` when the policy is known), around `body`.
    ///
    /// ```
    /// use semaforo::{RejectKind, Rejected};
    /// use std::time::Duration;
    ///
    /// let r = Rejected::new("bulkhead", RejectKind::QueueFull).with_retry_after(Duration::from_millis(1));
    /// let res = r.http_response(r.to_string());
    /// assert_eq!(res.status(), 503);
    /// assert_eq!(res.headers()["retry-after"], "1");
    /// ```
    #[cfg(feature = "http")]
    pub fn http_response<B>(&self, body: B) -> http::Response<B> {
        let mut res = http::Response::new(body);
        *res.status_mut() = http::StatusCode::from_u16(self.http_status())
            .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
        for (name, value) in self.http_headers() {
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                res.headers_mut().insert(name, v);
            }
        }
        res
    }

    /// The HTTP status for this refusal: [`RejectKind::http_status`],
    /// except a quota or budget refusal without `retry_after` — a request
    /// that can never fit the limit (a cost above its whole burst): 413
    /// Content Too Large, for no wait would help.
    ///
    /// ```
    /// use semaforo::{RejectKind, Rejected};
    /// use std::time::Duration;
    ///
    /// let never = Rejected::new("pace", RejectKind::BudgetExceeded);
    /// assert_eq!(never.http_status(), 413);
    /// let later = never.with_retry_after(Duration::from_secs(1));
    /// assert_eq!(later.http_status(), 503);
    /// ```
    pub fn http_status(&self) -> u16 {
        match self.kind() {
            RejectKind::QuotaExceeded | RejectKind::BudgetExceeded
                if self.retry_after().is_none() =>
            {
                413
            }
            kind => kind.http_status(),
        }
    }

    /// A rejection by `layer` (e.g. `"bulkhead"`) for `kind`.
    pub fn new(layer: &'static str, kind: RejectKind) -> Self {
        Rejected {
            layer,
            name: None,
            kind,
            retry_after: None,
            detail: None,
            source: None,
            policy: None,
        }
    }

    /// Attaches the limit that was enforced (see [`http_headers`](Self::http_headers)).
    pub fn with_policy(mut self, policy: Arc<RateLimitPolicy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The limit that was enforced, if the layer said.
    pub fn policy(&self) -> Option<&RateLimitPolicy> {
        self.policy.as_deref()
    }

    /// The headers of a `429`/`503` answer: `Retry-After` (whole seconds, rounded
    /// up) and, when the policy is known, the IETF `RateLimit-Policy` and
    /// `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers).
    ///
    /// ```
    /// use semaforo::{RateLimitPolicy, RejectKind, Rejected};
    /// use std::{sync::Arc, time::Duration};
    ///
    /// let r = Rejected::new("quota", RejectKind::QuotaExceeded)
    ///     .with_retry_after(Duration::from_millis(1_500))
    ///     .with_policy(Arc::new(RateLimitPolicy { name: "free".into(), quota: 60, window: Duration::from_secs(60) }));
    /// assert_eq!(r.http_headers(), vec![
    ///     ("retry-after", "2".to_string()),
    ///     ("ratelimit-policy", "\"free\";q=60;w=60".to_string()),
    ///     ("ratelimit", "\"free\";r=0;t=2".to_string()),
    /// ]);
    /// ```
    pub fn http_headers(&self) -> Vec<(&'static str, String)> {
        let secs = self.retry_after.map(crate::time::ceil_secs);
        let mut h = Vec::with_capacity(3);
        if let Some(s) = secs {
            h.push(("retry-after", s.to_string()));
        }
        if let Some(p) = &self.policy {
            h.push((
                "ratelimit-policy",
                format!("\"{}\";q={};w={}", p.name, p.quota, p.window.as_secs()),
            ));
            h.push((
                "ratelimit",
                format!("\"{}\";r=0;t={}", p.name, secs.unwrap_or(0)),
            ));
        }
        h
    }

    /// Names the layer instance (`.name("openai")` on the layer's builder).
    pub fn with_name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the instance name from an optional shared name (no allocation).
    pub fn with_name_opt(mut self, name: Option<&Arc<str>>) -> Self {
        self.name = name.cloned();
        self
    }

    /// Says after how long a retry may succeed.
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Adds the limit that was hit, shown in parentheses (`"45/45"`).
    pub fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Attaches the underlying error (e.g. the last real error when a retry budget ran out).
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(Arc::from(source.into()));
        self
    }

    /// Why the call was refused.
    pub fn kind(&self) -> RejectKind {
        self.kind
    }

    /// After how long a retry may succeed, when the layer knows.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The kind of layer that refused (`"bulkhead"`, `"breaker"`, ...).
    pub fn layer(&self) -> &'static str {
        self.layer
    }

    /// The layer instance's name, if it was given one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The limit that was hit, as shown in `Display`.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// Finds a `Rejected` in a boxed error or anywhere in its `source()` chain.
    pub fn from_box(err: &BoxError) -> Option<&Rejected> {
        Self::find(err.as_ref())
    }

    /// Finds a `Rejected` in `err` or anywhere in its `source()` chain.
    pub fn find<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a Rejected> {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        // Bounded walk: a malicious or cyclic `source()` chain must not hang us.
        for _ in 0..64 {
            let e = cur?;
            if let Some(r) = e.downcast_ref::<Rejected>() {
                return Some(r);
            }
            // reqwest-middleware's error is `#[error(transparent)]`: its
            // `source()` skips what it wraps.
            #[cfg(feature = "reqwest")]
            if let Some(reqwest_middleware::Error::Middleware(a)) =
                e.downcast_ref::<reqwest_middleware::Error>()
            {
                cur = Some(a.as_ref());
                continue;
            }
            cur = e.source();
        }
        None
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.layer)?;
        if let Some(name) = &self.name {
            write!(f, " '{name}'")?;
        }
        write!(f, ": {}", self.kind)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        if let Some(ra) = self.retry_after {
            write!(f, ", retry after {}", crate::time::Human(ra))?;
        }
        Ok(())
    }
}

impl StdError for Rejected {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// Takes the rejection a refused call's future holds, unsized into a
/// `BoxError` without boxing it twice (so `Rejected::from_box` finds it); a
/// future polled again after it answered gets a plain error naming `layer`.
pub(crate) fn take_rejection(slot: &mut Option<Box<Rejected>>, layer: &'static str) -> BoxError {
    match slot.take() {
        Some(r) => r,
        None => polled_after_done(layer),
    }
}

/// A builder was given a configuration it cannot honour.
///
/// ```
/// use semaforo::backoff::Backoff;
/// let err = Backoff::exponential(std::time::Duration::from_secs(1)).factor(0.5).build().unwrap_err();
/// assert!(err.to_string().contains("factor"));
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {component} configuration: `{field}` {reason}")]
pub struct ConfigError {
    /// The component being built (`"backoff"`, `"bulkhead"`).
    pub component: &'static str,
    /// The offending setting.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: Cow<'static, str>,
}

impl ConfigError {
    pub(crate) fn new(
        component: &'static str,
        field: &'static str,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        ConfigError {
            component,
            field,
            reason: reason.into(),
        }
    }
}

/// The upstream, or a layer below the retry (a pacer's budget), asked to
/// wait longer than the retry ceiling: returned at once instead of
/// sleeping, with the wait it asked for (its error says who).
#[derive(Debug, thiserror::Error)]
#[error(
    "retry after {} is above the retry ceiling {}: {source}", crate::time::Human(*.retry_after), crate::time::Human(*.ceiling)
)]
pub struct RetryAfterTooLong {
    /// What the upstream (or the layer below) asked for.
    pub retry_after: Duration,
    /// The configured ceiling.
    pub ceiling: Duration,
    /// The upstream's error.
    #[source]
    pub source: BoxError,
}

/// The error of a future polled again after it completed (a caller's bug;
/// never a panic).
#[cold]
pub(crate) fn polled_after_done(layer: &'static str) -> BoxError {
    format!("{layer}: future polled after completion").into()
}

/// A future that answers once: polled again after its answer, it answers
/// [`polled_after_done`] instead of resuming what produced it (an `async`
/// block would panic, a state machine might call upstream again).
#[cfg(any(feature = "cache", feature = "redis", feature = "reqwest"))]
#[pin_project::pin_project]
pub(crate) struct AnswerOnce<F> {
    #[pin]
    fut: Option<F>,
    layer: &'static str,
}

#[cfg(any(feature = "cache", feature = "redis", feature = "reqwest"))]
impl<F> AnswerOnce<F> {
    pub(crate) fn new(layer: &'static str, fut: F) -> Self {
        AnswerOnce {
            fut: Some(fut),
            layer,
        }
    }
}

#[cfg(any(feature = "cache", feature = "redis", feature = "reqwest"))]
impl<F, T, E> std::future::Future for AnswerOnce<F>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: From<BoxError>,
{
    type Output = Result<T, E>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut this = self.project();
        let Some(fut) = this.fut.as_mut().as_pin_mut() else {
            return std::task::Poll::Ready(Err(E::from(polled_after_done(this.layer))));
        };
        let out = std::task::ready!(fut.poll(cx));
        this.fut.set(None);
        std::task::Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] Rejected);

    #[test]
    fn display_names_layer_instance_and_limit() {
        let r = Rejected::new("bulkhead", RejectKind::QueueFull)
            .with_name("openai")
            .with_detail("45/45");
        assert_eq!(r.to_string(), "bulkhead 'openai': queue full (45/45)");
        let r = Rejected::new("breaker", RejectKind::CircuitOpen)
            .with_retry_after(Duration::from_secs(300));
        assert_eq!(r.to_string(), "breaker: circuit open, retry after 5 min");
    }

    #[test]
    fn from_box_finds_rejection_in_source_chain() {
        let inner = Rejected::new("quota", RejectKind::QuotaExceeded)
            .with_retry_after(Duration::from_millis(1500));
        let err: BoxError = Box::new(Wrapper(inner));
        let found = Rejected::from_box(&err).expect("found in chain");
        assert_eq!(found.kind(), RejectKind::QuotaExceeded);
        assert_eq!(found.retry_after(), Some(Duration::from_millis(1500)));

        let other: BoxError = "plain".into();
        assert!(Rejected::from_box(&other).is_none());
    }

    #[test]
    fn source_is_kept() {
        let r =
            Rejected::new("retry", RejectKind::RetryBudgetExhausted).with_source("upstream 503");
        assert_eq!(
            r.source().map(|s| s.to_string()).as_deref(),
            Some("upstream 503")
        );
    }
}

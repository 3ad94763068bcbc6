//! gRPC (feature `grpc`, on tonic 0.13): status codes as classes, retry
//! rules, `grpc-timeout`, refusals answered as statuses with pushback.
//!
//! gRPC's codes already say what our [`Class`]es say; this module reads them
//! once, so the retry, the breaker and the pacer act on a tonic call as on
//! an HTTP one.
//!
//! | code | class | retried | breaker |
//! |---|---|---|---|
//! | `OK` | `Success` | — | success |
//! | `RESOURCE_EXHAUSTED` | `Throttled { retry_after: pushback }` | after the pushback | not a failure |
//! | `UNAVAILABLE` | `Overloaded { retry_after: pushback }` | backoff | failure |
//! | `DEADLINE_EXCEEDED`, `ABORTED`, `INTERNAL`, `UNKNOWN` | `Transient` | backoff | failure |
//! | `INVALID_ARGUMENT`, `OUT_OF_RANGE`, `FAILED_PRECONDITION` | `Class::permanent(Permanent::InvalidRequest)` | never | not a failure |
//! | `UNAUTHENTICATED` | `Class::permanent(Permanent::Authentication)` | never | not a failure |
//! | `PERMISSION_DENIED` | `Class::permanent(Permanent::PermissionDenied)` | never | not a failure |
//! | `NOT_FOUND` | `Class::permanent(Permanent::NotFound)` | never | not a failure |
//! | `CANCELLED`, `ALREADY_EXISTS`, `UNIMPLEMENTED`, `DATA_LOSS` | `Class::permanent(Permanent::Other)` | never | not a failure |
//! | any code with a negative or malformed pushback | `Class::permanent(Permanent::DoNotRetry)` | never | not a failure |
//!
//! (`Permanent` is [`classify::Permanent`](crate::classify::Permanent).)
//! A `grpc-status` is read as tonic reads it: exactly `0` to `16`, anything
//! else `UNKNOWN`; trailers without one are a success, as tonic takes them.
//!
//! The pushback is the `grpc-retry-pushback-ms` metadata of gRFC A6 (retry
//! design): milliseconds to wait; negative or not a number means "do not
//! retry". A response that is not HTTP 200 is read with the gRPC spec's
//! HTTP-to-code table (429, 502, 503, 504 → `UNAVAILABLE`; 401, 403, 404,
//! 400 → `UNAUTHENTICATED`, `PERMISSION_DENIED`, `UNIMPLEMENTED`, `INTERNAL`;
//! others `UNKNOWN`).
//!
//! The pieces:
//!
//! - [`GrpcClassifier`] classifies `http::Response`s (a trailers-only
//!   response carries its status in the headers; a status in the trailers,
//!   after the messages, is read by [`StatusWatchLayer`] when the body ends,
//!   for the layers that record at the body's end), and
//!   [`classify_error`](crate::classify::classify_error) reads a
//!   `tonic::Status` in any error chain — so `breaker.call(|| client.check(…))`
//!   classifies tonic's answers too;
//! - [`GrpcRequests`]: nothing on the wire says a method is idempotent, so
//!   only the methods you list (`/package.Service/Method`) or a request
//!   carrying [`Idempotent`] are retried; their body (one message) is read
//!   into memory, up to a bound (default 4 MiB, gRPC's default message
//!   limit), so the retry can send it again; every other request is sent as
//!   it comes, with [`NoRetry`]. List unary and server-streaming methods
//!   only: a client-streaming body is read to its end before it is sent.
//! - [`GrpcTimeout`]: a request's `grpc-timeout` header as its own limit,
//!   for [`TimeoutLayer::per_request`](crate::timeout::TimeoutLayer::per_request)
//!   (server side: the handler is cut at the caller's deadline with
//!   `DEADLINE_EXCEEDED`);
//! - [`RefusalLayer`] answers a [`Rejected`] as a trailers-only status
//!   ([`refusal_status`]: `RESOURCE_EXHAUSTED` for a full line or a spent
//!   quota, `UNAVAILABLE` for an open breaker or a shutdown,
//!   `DEADLINE_EXCEEDED` for a timeout) with the refusal's `retry_after` as
//!   pushback; on a client, tonic then returns that `Status`.
//!
//! A server behind shutdown → quota → bulkhead → timeout:
//!
//! ```
//! use semaforo::bulkhead::Bulkhead;
//! use semaforo::grpc::{GrpcTimeout, RefusalLayer};
//! use semaforo::shutdown::Shutdown;
//! use semaforo::timeout::Timeout;
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), semaforo::BoxError> {
//! let shutdown = Shutdown::new();
//! let bulkhead = Bulkhead::builder(64).max_queue(0).name("grpc").build()?;
//! let timeout = Timeout::builder().total(Duration::from_secs(30)).build()?;
//! let stack = ServiceBuilder::new()
//!     .layer(RefusalLayer::new())
//!     .layer(shutdown.layer())
//!     .layer(bulkhead.layer().release_on_body_end())
//!     .layer(timeout.layer().per_request(GrpcTimeout));
//! // tonic::transport::Server::builder().layer(stack).add_service(...)
//! # let _ = stack; Ok(()) }
//! ```
//!
//! A client behind retry + breaker (`HealthClient::new(stack.service(channel))`;
//! put `timeout.layer().per_request(GrpcTimeout)` above the retry and the
//! caller's deadline, `tonic::Request::set_timeout`, bounds all the attempts
//! together):
//!
//! ```
//! use semaforo::breaker::Breaker;
//! use semaforo::grpc::{GrpcClassifier, GrpcRequests, RefusalLayer, StatusWatchLayer};
//! use semaforo::retry::{HttpRequests, Retry};
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), semaforo::BoxError> {
//! let retry = Retry::builder().max_attempts(4).build()?;
//! let breaker = Breaker::builder().consecutive_failures(5).build()?;
//! let stack = ServiceBuilder::new()
//!     .layer(RefusalLayer::new())
//!     .layer(GrpcRequests::new().method("/grpc.health.v1.Health/Check").layer())
//!     .layer(retry.layer().classify(GrpcClassifier).requests(HttpRequests::default().allow_non_idempotent()))
//!     .layer(breaker.layer().classify(GrpcClassifier).record_on_body_end())
//!     .layer(StatusWatchLayer::new());
//! // let client = HealthClient::new(stack.service(channel));
//! # let _ = stack; Ok(()) }
//! ```

mod body;
mod service;

pub use body::ReplayBody;
pub use service::{
    GrpcRequests, GrpcRequestsFuture, GrpcRequestsLayer, GrpcRequestsService, RefusalFuture,
    RefusalLayer, RefusalService, StatusWatch, StatusWatchFuture, StatusWatchLayer, TrailersTap,
    DEFAULT_MAX_BUFFER,
};

use crate::classify::{AsErrorRef, Class, Classify, Permanent};
use crate::error::{RejectKind, Rejected};
use crate::retry::NoRetry;
use std::time::Duration;
use tonic::Code;

/// The pushback metadata of gRFC A6.
pub const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// What a server's `grpc-retry-pushback-ms` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// Wait this long before retrying.
    After(Duration),
    /// Do not retry (a negative or malformed value).
    DoNotRetry,
}

/// The pushback in `headers` (or trailers), if there is one.
///
/// ```
/// use semaforo::grpc::{pushback, Pushback};
/// use std::time::Duration;
/// let mut h = http::HeaderMap::new();
/// assert_eq!(pushback(&h), None);
/// h.insert("grpc-retry-pushback-ms", "1500".parse().unwrap());
/// assert_eq!(pushback(&h), Some(Pushback::After(Duration::from_millis(1_500))));
/// h.insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
/// assert_eq!(pushback(&h), Some(Pushback::DoNotRetry));
/// ```
pub fn pushback(headers: &http::HeaderMap) -> Option<Pushback> {
    let v = headers.get(PUSHBACK)?;
    let s = v.to_str().ok().map(str::trim).unwrap_or("");
    Some(match s.parse::<u64>() {
        Ok(ms) => Pushback::After(Duration::from_millis(ms)),
        Err(_) => Pushback::DoNotRetry,
    })
}

/// The class of a gRPC status code (the table of the [module docs](self)).
///
/// ```
/// use semaforo::classify::Class;
/// use semaforo::grpc::{code_class, Pushback};
/// use std::time::Duration;
/// let after = Some(Pushback::After(Duration::from_millis(1_500)));
/// assert_eq!(
///     code_class(tonic::Code::ResourceExhausted, after),
///     Class::Throttled { retry_after: Some(Duration::from_millis(1_500)) },
/// );
/// assert!(!code_class(tonic::Code::InvalidArgument, None).is_retryable());
/// ```
pub fn code_class(code: Code, pushback: Option<Pushback>) -> Class {
    let retry_after = match pushback {
        Some(Pushback::DoNotRetry) if code != Code::Ok => {
            return Class::permanent(Permanent::DoNotRetry)
        }
        Some(Pushback::After(d)) => Some(d),
        _ => None,
    };
    match code {
        Code::Ok => Class::Success,
        Code::ResourceExhausted => Class::Throttled { retry_after },
        Code::Unavailable => Class::Overloaded { retry_after },
        Code::DeadlineExceeded | Code::Aborted | Code::Internal | Code::Unknown => Class::Transient,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            Class::permanent(Permanent::InvalidRequest)
        }
        Code::Unauthenticated => Class::permanent(Permanent::Authentication),
        Code::PermissionDenied => Class::permanent(Permanent::PermissionDenied),
        Code::NotFound => Class::permanent(Permanent::NotFound),
        Code::Cancelled | Code::AlreadyExists | Code::Unimplemented | Code::DataLoss => {
            Class::permanent(Permanent::Other)
        }
    }
}

/// The class of a `tonic::Status` (its code and its pushback metadata).
pub fn status_class(status: &tonic::Status) -> Class {
    code_class(status.code(), pushback(status.metadata().as_ref()))
}

/// The gRPC code for an HTTP status that is not 200 (the gRPC spec's
/// "HTTP to gRPC Status Code Mapping").
pub fn http_code(status: http::StatusCode) -> Code {
    match status.as_u16() {
        200 => Code::Ok,
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

// The names as `HeaderName`s: a lookup by `&str` parses the name on every call.
static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The status a set of headers or trailers carries: `grpc-status`, read as
/// tonic reads it (`None` when missing; a malformed one is `UNKNOWN`).
pub fn header_code(headers: &http::HeaderMap) -> Option<Code> {
    // tonic's own reading (a malformed value is `UNKNOWN`), so a status
    // means here what it means to the caller.
    headers
        .get(&GRPC_STATUS)
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// Classifies gRPC `http::Response`s: `grpc-status` in the headers (a
/// trailers-only response) with its pushback, else the HTTP status through
/// [`http_code`]; a response whose status comes in its trailers is a
/// `Success` here (its messages are arriving) and is judged at the body's
/// end by [`StatusWatchLayer`]. Errors: [`classify_error`](crate::classify::classify_error),
/// which reads a `tonic::Status` anywhere in the chain.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcClassifier;

impl GrpcClassifier {
    /// The class of a response head.
    pub fn classify_head(&self, status: http::StatusCode, headers: &http::HeaderMap) -> Class {
        if let Some(code) = header_code(headers) {
            return code_class(code, pushback(headers));
        }
        match http_code(status) {
            Code::Ok => Class::Success,
            code => code_class(code, pushback(headers)),
        }
    }
}

impl<B, E: AsErrorRef> Classify<http::Response<B>, E> for GrpcClassifier {
    fn classify(&self, result: Result<&http::Response<B>, &E>) -> Class {
        match result {
            Ok(res) => self.classify_head(res.status(), res.headers()),
            Err(e) => crate::classify::classify_error(e.as_error_ref()),
        }
    }
}

/// The gRPC code a refusal is answered with:
///
/// | kind | code |
/// |---|---|
/// | `QueueFull`, `QueueTimeout`, `QuotaExceeded`, `BudgetExceeded` | `RESOURCE_EXHAUSTED` |
/// | `CircuitOpen`, `ShuttingDown`, `BackendUnavailable`, `RetryBudgetExhausted` | `UNAVAILABLE` |
/// | `Timeout` | `DEADLINE_EXCEEDED` |
pub fn reject_code(kind: RejectKind) -> Code {
    match kind {
        RejectKind::QueueFull
        | RejectKind::QueueTimeout
        | RejectKind::QuotaExceeded
        | RejectKind::BudgetExceeded => Code::ResourceExhausted,
        RejectKind::Timeout => Code::DeadlineExceeded,
        _ => Code::Unavailable,
    }
}

/// The status a refusal is answered with: [`reject_code`], the refusal's
/// text as the message, and `grpc-retry-pushback-ms` = its `retry_after` in
/// whole milliseconds, rounded up; a quota or budget refusal without
/// `retry_after` (a request that can never fit: HTTP's 413) says `-1`, do
/// not retry.
///
/// ```
/// use semaforo::{RejectKind, Rejected};
/// use std::time::Duration;
/// let r = Rejected::new("bulkhead", RejectKind::QueueFull).with_retry_after(Duration::from_micros(1_499_001));
/// let status = semaforo::grpc::refusal_status(&r);
/// assert_eq!(status.code(), tonic::Code::ResourceExhausted);
/// assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "1500");
/// ```
pub fn refusal_status(r: &Rejected) -> tonic::Status {
    let mut status = tonic::Status::new(reject_code(r.kind()), r.to_string());
    let ms = match r.retry_after() {
        Some(d) => {
            let ms = d
                .as_millis()
                .saturating_add(u128::from(d.subsec_nanos() % 1_000_000 > 0));
            u64::try_from(ms).unwrap_or(u64::MAX).to_string()
        }
        None if r.http_status() == 413 => "-1".to_string(),
        None => return status,
    };
    if let Ok(v) = ms.parse() {
        status.metadata_mut().insert(PUSHBACK, v);
    }
    status
}

/// A request extension: this gRPC call may be retried (its method is
/// idempotent), whatever [`GrpcRequests`] lists. Put it in the
/// `tonic::Request`'s extensions; tonic carries them to the `http::Request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Idempotent;

/// A request's `grpc-timeout` header as its own limit (a
/// [`RequestLimit`](crate::timeout::RequestLimit)): up to 8 digits and a
/// unit, `H` hours, `M` minutes, `S` seconds, `m` milliseconds, `u`
/// microseconds, `n` nanoseconds (the gRPC over HTTP/2 spec). A malformed
/// header is no limit.
///
/// ```
/// use semaforo::grpc::GrpcTimeout;
/// use semaforo::timeout::RequestLimit;
/// use std::time::Duration;
/// let req = http::Request::post("/x").header("grpc-timeout", "1500m").body(()).unwrap();
/// assert_eq!(GrpcTimeout.limit(&req), Some(Duration::from_millis(1_500)));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTimeout;

impl<B> crate::timeout::RequestLimit<http::Request<B>> for GrpcTimeout {
    fn limit(&self, req: &http::Request<B>) -> Option<Duration> {
        parse_timeout(req.headers().get(&GRPC_TIMEOUT)?.as_bytes())
    }
}

/// When a call's `grpc-timeout` runs out: stamped on the copy retry keeps
/// for later attempts, so each retry tells the server what is left.
#[derive(Debug, Clone, Copy)]
struct GrpcDeadline(tokio::time::Instant);

/// Stamps `req` (retry's copy, taken as the call starts) with the instant its
/// `grpc-timeout` runs out. Nothing without the header.
pub(crate) fn stamp_deadline<B>(req: &mut http::Request<B>) {
    if req.extensions().get::<GrpcDeadline>().is_some() {
        return;
    }
    let Some(t) = req
        .headers()
        .get(&GRPC_TIMEOUT)
        .and_then(|v| parse_timeout(v.as_bytes()))
    else {
        return;
    };
    let at = crate::time::after(tokio::time::Instant::now(), t);
    req.extensions_mut().insert(GrpcDeadline(at));
}

/// A retry's `grpc-timeout`: what is left of the call's (a server told the
/// original total would work past the moment the caller gives up).
pub(crate) fn rewrite_timeout<B>(req: &mut http::Request<B>) {
    let Some(&GrpcDeadline(at)) = req.extensions().get::<GrpcDeadline>() else {
        return;
    };
    let left = at.saturating_duration_since(tokio::time::Instant::now());
    if let Ok(v) = http::HeaderValue::from_str(&format_timeout(left)) {
        req.headers_mut().insert(GRPC_TIMEOUT.clone(), v);
    }
}

/// A `grpc-timeout` value for `d`: the finest unit whose count fits the
/// spec's 8 digits, rounded down (the server's deadline is never later than
/// the caller's). `"0n"` when nothing is left; past 99,999,999 hours, that.
///
/// ```
/// use semaforo::grpc::{format_timeout, parse_timeout};
/// use std::time::Duration;
/// assert_eq!(format_timeout(Duration::from_millis(1_500)), "1500000u");
/// assert_eq!(format_timeout(Duration::from_secs(3_600)), "3600000m");
/// assert_eq!(parse_timeout(format_timeout(Duration::from_secs(7)).as_bytes()), Some(Duration::from_secs(7)));
/// ```
pub fn format_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let nanos = d.as_nanos();
    for (per, unit) in units {
        let n = nanos / per;
        if n <= MAX {
            return format!("{n}{unit}");
        }
    }
    format!("{MAX}H")
}

/// Parses a `grpc-timeout` value (`"1500m"`, `"2S"`).
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n.saturating_mul(3_600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Whether `req` may be retried: its method is listed, or it carries
/// [`Idempotent`], and not [`NoRetry`].
fn listed<B>(methods: &[Box<str>], req: &http::Request<B>) -> bool {
    if req.extensions().get::<NoRetry>().is_some() {
        return false;
    }
    req.extensions().get::<Idempotent>().is_some()
        || methods.iter().any(|m| **m == *req.uri().path())
}

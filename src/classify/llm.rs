//! Classification of LLM provider responses: status, headers **and** error body
//! (feature `llm`).
//!
//! The status code alone lies about LLM errors: OpenAI answers `429` both for
//! "slow down" (`rate_limit_exceeded`, retry in 6 s) and for "your monthly quota is
//! spent" (`insufficient_quota`, retrying is useless until billing changes) and for
//! "this single request is larger than your whole TPM limit" (`Request too large`).
//! Gemini answers `429 RESOURCE_EXHAUSTED` for per-minute and per-day quotas alike.
//! Only the body tells them apart.

use super::headers::{
    parse_go_duration, retry_after_from_headers, throttle_wait_from_headers, HeaderSource,
};
use super::http::{status_class, Classified};
use super::{classify_error, AsErrorRef, Class, Classify, Permanent};
use std::time::{Duration, SystemTime};

/// Classifies OpenAI, Anthropic and Gemini responses, reading the error body.
///
/// Rules, in order:
/// 1. the status gives the base class ([`status_class`]), with `retry-after-ms` /
///    `Retry-After`;
/// 2. the error body refines it:
///    - OpenAI `insufficient_quota`, `Request too large…`, `context_length_exceeded`,
///      `content_policy_violation` / `content_filter` → `Permanent` (even on 429),
///      with its [`Permanent`] reason (`QuotaExhausted`, `RequestTooLarge`,
///      `ContextLengthExceeded`, `ContentPolicy`);
///      `rate_limit_exceeded` → `Throttled` (delay from headers, else from
///      "Please try again in 6s");
///    - Anthropic `overloaded_error` → `Overloaded`, `rate_limit_error` →
///      `Throttled`, `billing_error` or a credit/spend-limit message → `Permanent`,
///      `api_error` / `timeout_error` → `Transient`;
///    - Gemini `RESOURCE_EXHAUSTED` → `Throttled` with `RetryInfo.retryDelay`, but a
///      per-day quota violation (`…PerDay…`) → `Permanent`; `UNAVAILABLE` →
///      `Overloaded`;
/// 3. `x-should-retry: false` makes any failure `Permanent`; `x-should-retry: true`
///    makes a `Permanent` failure `Transient` (the header wins, as in OpenAI's SDKs).
///
/// A 2xx is a `Success` unless its body (at most [`MAX_ERROR_BODY`] bytes,
/// looked into only when it holds the bytes `"error"`) has a top-level
/// `error` that is not `null`: then it is classified as that error body
/// alone ([`classify_error_body`](Self::classify_error_body); an overloaded
/// model answered `200` is not kept by a cache, and is retried). A streamed
/// 2xx has no body here: its error events are read by the stream.
///
/// ```
/// use semaforo::classify::{Class, LlmClassifier, Permanent};
///
/// let body = br#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
/// let no_headers: [(&str, &str); 0] = [];
/// assert_eq!(
///     LlmClassifier::new().classify_parts(429, &no_headers[..], body),
///     Class::Permanent { reason: Permanent::QuotaExhausted }
/// );
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct LlmClassifier {
    _private: (),
}

/// The fields of a provider error body that classification reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderError {
    /// OpenAI `error.code`.
    pub code: Option<String>,
    /// OpenAI `error.type` or Anthropic `error.type`.
    pub kind: Option<String>,
    /// Gemini `error.status` (`RESOURCE_EXHAUSTED`).
    pub status: Option<String>,
    /// `error.message`.
    pub message: Option<String>,
    /// Gemini `RetryInfo.retryDelay`, or OpenAI's "Please try again in 6s".
    pub retry_delay: Option<Duration>,
    /// A Gemini quota violation whose id names a per-day quota.
    pub per_day_quota: bool,
}

/// The largest error body [`ProviderError::parse`] reads (64 KiB). A larger
/// body is not inspected: its response is classified from its status and
/// headers alone, and it still reaches the caller whole and untouched.
pub const MAX_ERROR_BODY: usize = 64 * 1024;

impl ProviderError {
    /// Parses an OpenAI, Anthropic or Gemini error body — a JSON object with an
    /// `error` field, or (Gemini) an array whose first element is one; `None`
    /// if it is not one, or if it is longer than [`MAX_ERROR_BODY`].
    ///
    /// Only the fields listed on this struct are read, borrowed from `body`
    /// (typed deserialization: the rest of the document is skipped, never
    /// built into a tree).
    ///
    /// ```
    /// use semaforo::classify::ProviderError;
    /// use std::time::Duration;
    ///
    /// let gemini = br#"[{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"0.5s"}]}}]"#;
    /// let e = ProviderError::parse(gemini).unwrap();
    /// assert_eq!(e.status.as_deref(), Some("RESOURCE_EXHAUSTED"));
    /// assert_eq!(e.retry_delay, Some(Duration::from_millis(500)));
    /// ```
    pub fn parse(body: &[u8]) -> Option<Self> {
        if body.len() > MAX_ERROR_BODY {
            return None;
        }
        let err = wire::error_of(body)?;
        let own = |t: wire::Text<'_>| t.0.map(std::borrow::Cow::into_owned);
        let mut pe = ProviderError {
            code: own(err.code),
            kind: own(err.kind),
            status: own(err.status),
            retry_delay: None,
            per_day_quota: false,
            message: own(err.message),
        };
        for d in err.details.0 {
            if let Some(delay) = d.retry_delay.0 {
                pe.retry_delay = parse_go_duration(&delay);
            }
            pe.per_day_quota |= d.violations.0.iter().any(|v| {
                [&v.quota_id.0, &v.quota_metric.0]
                    .into_iter()
                    .flatten()
                    .any(|id| id.contains("PerDay") || id.contains("per_day"))
            });
        }
        if pe.retry_delay.is_none() {
            pe.retry_delay = pe.message.as_deref().and_then(try_again_in);
        }
        Some(pe)
    }

    fn is(&self, field: &Option<String>, value: &str) -> bool {
        field.as_deref() == Some(value)
    }

    fn message_has(&self, lower: &Option<String>, needle: &str) -> bool {
        lower.as_deref().is_some_and(|m| m.contains(needle))
    }

    /// The class this body implies, given the class the status implied.
    fn refine(&self, base: Class, header_retry_after: Option<Duration>) -> Class {
        let ra = header_retry_after.or(self.retry_delay);
        let code_or_kind = |v: &str| self.is(&self.code, v) || self.is(&self.kind, v);
        let lower = self.message.as_deref().map(str::to_ascii_lowercase);

        // Permanent whatever the status: retrying cannot help.
        let permanent = if code_or_kind("insufficient_quota")
            || code_or_kind("billing_error")
            || self.message_has(&lower, "credit balance is too low")
            || self.message_has(&lower, "reached your specified api usage limits")
            || self.message_has(&lower, "spend limit")
            || self.per_day_quota
        {
            Some(Permanent::QuotaExhausted)
        } else if code_or_kind("context_length_exceeded")
            // OpenAI: "This model's maximum context length is 8192 tokens".
            || self.message_has(&lower, "maximum context length")
            // Anthropic: "prompt is too long: 215000 tokens > 200000 maximum".
            || self.message_has(&lower, "prompt is too long")
            // Gemini: "The input token count (…) exceeds the maximum number
            // of tokens allowed (…)".
            || self.message_has(&lower, "exceeds the maximum number of tokens")
        {
            Some(Permanent::ContextLengthExceeded)
        } else if code_or_kind("content_policy_violation") || code_or_kind("content_filter") {
            Some(Permanent::ContentPolicy)
        } else if self.message_has(&lower, "request too large") {
            Some(Permanent::RequestTooLarge)
        } else {
            None
        };
        if let Some(reason) = permanent {
            return Class::permanent(reason);
        }
        if code_or_kind("rate_limit_exceeded") || code_or_kind("rate_limit_error") {
            return Class::Throttled { retry_after: ra };
        }
        if code_or_kind("overloaded_error") || self.is(&self.status, "UNAVAILABLE") {
            return Class::Overloaded { retry_after: ra };
        }
        if self.is(&self.status, "RESOURCE_EXHAUSTED") {
            return Class::Throttled { retry_after: ra };
        }
        if code_or_kind("api_error")
            || code_or_kind("timeout_error")
            || code_or_kind("server_error")
            || self.is(&self.status, "INTERNAL")
            || self.is(&self.status, "DEADLINE_EXCEEDED")
        {
            return Class::Transient;
        }
        // Unknown body: keep what the status said, adding a delay the body gave.
        match base {
            Class::Throttled { retry_after } => Class::Throttled {
                retry_after: retry_after.or(ra),
            },
            Class::Overloaded { retry_after } => Class::Overloaded {
                retry_after: retry_after.or(ra),
            },
            other => other,
        }
    }
}

/// OpenAI's "Please try again in 6s." / "try again in 20ms" in a message.
fn try_again_in(message: &str) -> Option<Duration> {
    let idx = message.find("try again in ")?;
    let rest = &message[idx + "try again in ".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '\u{b5}' || c == '\u{3bc}'))
        .unwrap_or(rest.len());
    let token = rest[..end].trim_end_matches('.');
    parse_go_duration(token)
}

impl LlmClassifier {
    /// A classifier with the default rules.
    pub fn new() -> Self {
        LlmClassifier::default()
    }

    /// Classifies a response from its status, headers and (error) body bytes.
    pub fn classify_parts<H: HeaderSource + ?Sized>(
        &self,
        status: u16,
        headers: &H,
        body: &[u8],
    ) -> Class {
        if (100..400).contains(&status) {
            // No clock read, no header lookup.
            return self.success_unless_error_body(status, body);
        }
        self.classify_parts_at(status, headers, body, SystemTime::now())
    }

    /// As [`classify_parts`](Self::classify_parts), with an explicit wall-clock
    /// `now` for HTTP-date `Retry-After` values.
    pub fn classify_parts_at<H: HeaderSource + ?Sized>(
        &self,
        status: u16,
        headers: &H,
        body: &[u8],
        now: SystemTime,
    ) -> Class {
        if (100..400).contains(&status) {
            return self.success_unless_error_body(status, body);
        }
        let header_ra = if status == 429 {
            throttle_wait_from_headers(headers, now)
        } else {
            retry_after_from_headers(headers, now)
        };
        let base = status_class(status, header_ra);
        let class = if base.is_success() {
            base
        } else {
            match ProviderError::parse(body) {
                Some(pe) => pe.refine(base, header_ra),
                None => base,
            }
        };
        apply_should_retry(class, headers.header_bytes("x-should-retry"))
    }

    /// A 1xx–3xx: `Success`, unless a 2xx body has a top-level `error`
    /// (not `null`). A memchr scan first: a body without the bytes
    /// `"error"` is not parsed.
    #[inline]
    fn success_unless_error_body(&self, status: u16, body: &[u8]) -> Class {
        static ERROR_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"error\""));
        if (200..300).contains(&status)
            && body.len() <= MAX_ERROR_BODY
            && ERROR_KEY.find(body).is_some()
            && wire::error_of(body).is_some()
        {
            return self.classify_error_body(body);
        }
        Class::Success
    }

    /// Classifies an error payload on its own, e.g. the data of an SSE
    /// `event: error` that arrived mid-stream after a `200` (no status to go by:
    /// an unrecognised body is `Transient`).
    pub fn classify_error_body(&self, body: &[u8]) -> Class {
        match ProviderError::parse(body) {
            Some(pe) => pe.refine(Class::Transient, None),
            None => Class::Transient,
        }
    }
}

fn apply_should_retry(class: Class, header: Option<&[u8]>) -> Class {
    if class.is_success() {
        return class;
    }
    let value = header
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim);
    match value {
        Some(v) if v.eq_ignore_ascii_case("false") => match class {
            // A reason the body gave is more precise than the header's.
            Class::Permanent { .. } => class,
            _ => Class::permanent(Permanent::DoNotRetry),
        },
        Some(v) if v.eq_ignore_ascii_case("true") && !class.is_retryable() => Class::Transient,
        _ => class,
    }
}

/// Classifies a streamed `http::Response<B>` by its status and headers only
/// (its body has not arrived yet): [`LlmClassifier`] rules without the body.
/// A failure in the stream itself is recorded when the stream ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct LlmHeadClassifier;

impl<B, Err: AsErrorRef> Classify<http::Response<B>, Err> for LlmHeadClassifier {
    fn classify(&self, result: Result<&http::Response<B>, &Err>) -> Class {
        match result {
            Ok(res) => Classified::read::<Self, _>(res).unwrap_or_else(|| head(res)),
            Err(e) => classify_error(e.as_error_ref()),
        }
    }

    fn classify_and_carry(&self, result: Result<&mut http::Response<B>, &Err>) -> Class {
        match result {
            Ok(res) => Classified::carry::<Self, _>(res, false, head),
            Err(e) => classify_error(e.as_error_ref()),
        }
    }
}

fn head<B>(res: &http::Response<B>) -> Class {
    LlmClassifier::new().classify_parts(res.status().as_u16(), res.headers(), b"")
}

/// `http::Response<B>` with a body already in memory (`Bytes`, `Vec<u8>`, `String`).
impl<B: AsRef<[u8]>, Err: AsErrorRef> Classify<http::Response<B>, Err> for LlmClassifier {
    fn classify(&self, result: Result<&http::Response<B>, &Err>) -> Class {
        match result {
            Ok(res) => Classified::read::<Self, _>(res).unwrap_or_else(|| self.whole(res)),
            Err(e) => classify_error(e.as_error_ref()),
        }
    }

    fn classify_and_carry(&self, result: Result<&mut http::Response<B>, &Err>) -> Class {
        match result {
            Ok(res) => Classified::carry::<Self, _>(res, true, |res| self.whole(res)),
            Err(e) => classify_error(e.as_error_ref()),
        }
    }
}

impl LlmClassifier {
    fn whole<B: AsRef<[u8]>>(&self, res: &http::Response<B>) -> Class {
        self.classify_parts(res.status().as_u16(), res.headers(), res.body().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: [(&str, &str); 0] = [];

    fn perm(reason: Permanent) -> Class {
        Class::permanent(reason)
    }

    fn c(status: u16, headers: &[(&str, &str)], body: &str) -> Class {
        LlmClassifier::new().classify_parts_at(
            status,
            headers,
            body.as_bytes(),
            SystemTime::UNIX_EPOCH,
        )
    }

    // Bodies below are the samples from each provider's error documentation.

    #[test]
    fn openai_rate_limit_is_throttled_with_delay() {
        let body = r#"{"error":{"message":"Rate limit reached for gpt-4 in organization org-abc on tokens per min (TPM): Limit 10000, Used 9000, Requested 2000. Please try again in 6s. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            c(429, &NONE, body),
            Class::Throttled {
                retry_after: Some(Duration::from_secs(6))
            }
        );
        // headers win over the message
        assert_eq!(
            c(429, &[("retry-after-ms", "1200")], body),
            Class::Throttled {
                retry_after: Some(Duration::from_millis(1200))
            }
        );
        let body_ms = r#"{"error":{"message":"Rate limit reached for requests. Please try again in 20ms.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            c(429, &NONE, body_ms),
            Class::Throttled {
                retry_after: Some(Duration::from_millis(20))
            }
        );
    }

    #[test]
    fn openai_permanent_429s_and_400s() {
        let quota = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert_eq!(c(429, &NONE, quota), perm(Permanent::QuotaExhausted));
        let too_large = r#"{"error":{"message":"Request too large for gpt-4 in organization org-abc on tokens per min (TPM): Limit 10000, Requested 15000. The input or output tokens must be reduced in order to run successfully.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(c(429, &NONE, too_large), perm(Permanent::RequestTooLarge));
        let context = r#"{"error":{"message":"This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        assert_eq!(
            c(400, &NONE, context),
            perm(Permanent::ContextLengthExceeded)
        );
        let policy = r#"{"error":{"message":"Your request was rejected as a result of our safety system.","type":"invalid_request_error","param":null,"code":"content_policy_violation"}}"#;
        assert_eq!(c(400, &NONE, policy), perm(Permanent::ContentPolicy));
    }

    #[test]
    fn x_should_retry_wins() {
        let server = r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#;
        assert_eq!(c(500, &NONE, server), Class::Transient);
        assert_eq!(
            c(500, &[("x-should-retry", "false")], server),
            perm(Permanent::DoNotRetry)
        );
        assert_eq!(
            c(429, &[("x-should-retry", "false")], "{}"),
            perm(Permanent::DoNotRetry)
        );
        assert_eq!(
            c(409, &[("x-should-retry", "true")], "{}"),
            Class::Transient
        );
        assert_eq!(c(200, &[("x-should-retry", "false")], "{}"), Class::Success);
        // A reason the body gave is kept.
        let context = r#"{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        assert_eq!(
            c(400, &[("x-should-retry", "false")], context),
            perm(Permanent::ContextLengthExceeded)
        );
    }

    #[test]
    fn anthropic_errors() {
        let overloaded =
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            c(529, &NONE, overloaded),
            Class::Overloaded { retry_after: None }
        );
        let rate = r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#;
        assert_eq!(
            c(429, &[("retry-after", "30")], rate),
            Class::Throttled {
                retry_after: Some(Duration::from_secs(30))
            }
        );
        let credit = r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#;
        assert_eq!(c(400, &NONE, credit), perm(Permanent::QuotaExhausted));
        let spend = r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified API usage limits. You will regain access on 2025-01-01 at 00:00 UTC."}}"#;
        assert_eq!(c(429, &NONE, spend), perm(Permanent::QuotaExhausted));
        let billing = r#"{"type":"error","error":{"type":"billing_error","message":"There's an issue with your account's billing."}}"#;
        assert_eq!(c(402, &NONE, billing), perm(Permanent::QuotaExhausted));
        let long = r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 215000 tokens > 200000 maximum"}}"#;
        assert_eq!(c(400, &NONE, long), perm(Permanent::ContextLengthExceeded));
        let api =
            r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#;
        assert_eq!(c(500, &NONE, api), Class::Transient);
    }

    #[test]
    fn gemini_resource_exhausted() {
        let per_minute = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.0-flash"},"quotaValue":"15"}]},{"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"13s"}]}}"#;
        assert_eq!(
            c(429, &NONE, per_minute),
            Class::Throttled {
                retry_after: Some(Duration::from_secs(13))
            }
        );
        let per_day = per_minute.replace("PerMinutePerProject", "PerDayPerProject");
        assert_eq!(c(429, &NONE, &per_day), perm(Permanent::QuotaExhausted));
        let long = r#"{"error":{"code":400,"message":"The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(c(400, &NONE, long), perm(Permanent::ContextLengthExceeded));
        let unavailable = r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;
        assert_eq!(
            c(503, &NONE, unavailable),
            Class::Overloaded { retry_after: None }
        );
    }

    #[test]
    fn garbage_bodies_fall_back_to_status() {
        assert_eq!(
            c(429, &NONE, "<html>Too Many Requests</html>"),
            Class::Throttled { retry_after: None }
        );
        assert_eq!(c(502, &NONE, ""), Class::Transient);
        assert_eq!(c(404, &NONE, r#"{"error": 5}"#), perm(Permanent::NotFound));
    }

    #[test]
    fn mid_stream_error_event() {
        let data =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            LlmClassifier::new().classify_error_body(data),
            Class::Overloaded { retry_after: None }
        );
        assert_eq!(
            LlmClassifier::new().classify_error_body(b"garbage"),
            Class::Transient
        );
    }

    #[test]
    fn classify_trait_on_http_response() {
        let res = http::Response::builder()
            .status(429)
            .header("retry-after", "2")
            .body(br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#.to_vec())
            .unwrap();
        assert_eq!(
            LlmClassifier::new().classify(Ok::<_, &std::io::Error>(&res)),
            Class::Throttled {
                retry_after: Some(Duration::from_secs(2))
            }
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(status in 0u16..1000, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), h in ".{0,20}") {
            let headers = [("retry-after", h.as_str()), ("x-should-retry", h.as_str())];
            let _ = LlmClassifier::new().classify_parts_at(status, &headers[..], &body, SystemTime::UNIX_EPOCH);
            let _ = LlmClassifier::new().classify_error_body(&body);
        }
    }
}

/// The wire shapes of provider error bodies, borrowed from the bytes.
mod wire {
    use crate::classify::skip_others;
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;
    use std::borrow::Cow;
    use std::fmt;

    /// `{"error": …}`: an object, or (some proxies) a bare string.
    struct Envelope<'a> {
        error: Option<ErrorObject<'a>>,
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Envelope<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<'a>(std::marker::PhantomData<&'a ()>);
            impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
                type Value = Envelope<'a>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Envelope<'a>, A::Error> {
                    let mut error = None;
                    while let Some(key) = map.next_key::<Text<'de>>()? {
                        if key.0.as_deref() == Some("error") {
                            if let Some(e) = map.next_value::<Maybe<'a>>()?.0 {
                                error = Some(e);
                            }
                        } else {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    Ok(Envelope { error })
                }
            }
            d.deserialize_map(V(std::marker::PhantomData))
        }
    }

    /// The fields read from an error object; any of them of an unexpected
    /// type is skipped, never a reason to miss the others.
    #[derive(Deserialize, Default)]
    pub(super) struct ErrorObject<'a> {
        #[serde(borrow, default)]
        pub(super) code: Text<'a>,
        #[serde(borrow, default, rename = "type")]
        pub(super) kind: Text<'a>,
        #[serde(borrow, default)]
        pub(super) status: Text<'a>,
        #[serde(borrow, default)]
        pub(super) message: Text<'a>,
        #[serde(borrow, default)]
        pub(super) details: Seq<Detail<'a>>,
    }

    #[derive(Deserialize, Default)]
    pub(super) struct Detail<'a> {
        #[serde(borrow, default, rename = "retryDelay")]
        pub(super) retry_delay: Text<'a>,
        #[serde(borrow, default)]
        pub(super) violations: Seq<Violation<'a>>,
    }

    #[derive(Deserialize, Default)]
    pub(super) struct Violation<'a> {
        #[serde(borrow, default, rename = "quotaId")]
        pub(super) quota_id: Text<'a>,
        #[serde(borrow, default, rename = "quotaMetric")]
        pub(super) quota_metric: Text<'a>,
    }

    /// A string (borrowed unless it holds escapes), or nothing when the
    /// value is of another type (a number, an object…: skipped).
    #[derive(Default)]
    pub(super) struct Text<'a>(pub(super) Option<Cow<'a, str>>);

    impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<'a>(std::marker::PhantomData<&'a ()>);
            impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
                type Value = Text<'a>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                    Ok(Text(Some(Cow::Borrowed(v))))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                    Ok(Text(Some(Cow::Owned(v.to_owned()))))
                }
                skip_others!(Text(None));
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text<'a>, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Text(None))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text<'a>, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(Text(None))
                }
            }
            d.deserialize_any(V(std::marker::PhantomData))
        }
    }

    /// The `error` value: an object, a bare string (read as its `type`), or
    /// nothing for a value of another type.
    pub(super) struct Maybe<'a>(pub(super) Option<ErrorObject<'a>>);

    impl<'de: 'a, 'a> Deserialize<'de> for Maybe<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<'a>(std::marker::PhantomData<&'a ()>);
            impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
                type Value = Maybe<'a>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Maybe<'a>, A::Error> {
                    ErrorObject::deserialize(de::value::MapAccessDeserializer::new(map))
                        .map(|e| Maybe(Some(e)))
                }
                fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Maybe<'a>, E> {
                    Ok(Maybe(Some(ErrorObject {
                        kind: Text(Some(Cow::Borrowed(v))),
                        ..ErrorObject::default()
                    })))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Maybe<'a>, E> {
                    Ok(Maybe(Some(ErrorObject {
                        kind: Text(Some(Cow::Owned(v.to_owned()))),
                        ..ErrorObject::default()
                    })))
                }
                skip_others!(Maybe(None));
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Maybe<'a>, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Maybe(None))
                }
            }
            d.deserialize_any(V(std::marker::PhantomData))
        }
    }

    /// The objects of an array (other elements, or a value that is not an
    /// array, skipped).
    pub(super) struct Seq<T>(pub(super) Vec<T>);

    impl<T> Default for Seq<T> {
        fn default() -> Self {
            Seq(Vec::new())
        }
    }

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Seq<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = Seq<T>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Seq<T>, A::Error> {
                    let mut out = Vec::new();
                    while let Some(Elem(x)) = seq.next_element::<Elem<T>>()? {
                        out.extend(x);
                    }
                    Ok(Seq(out))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Seq<T>, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(Seq(Vec::new()))
                }
                fn visit_str<E: de::Error>(self, _: &str) -> Result<Seq<T>, E> {
                    Ok(Seq(Vec::new()))
                }
                skip_others!(Seq(Vec::new()));
            }
            d.deserialize_any(V(std::marker::PhantomData))
        }
    }

    /// One array element: an object read as `T`, anything else skipped.
    struct Elem<T>(Option<T>);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Elem<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = Elem<T>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Elem<T>, A::Error> {
                    T::deserialize(de::value::MapAccessDeserializer::new(map))
                        .map(|t| Elem(Some(t)))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Elem<T>, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Elem(None))
                }
                fn visit_str<E: de::Error>(self, _: &str) -> Result<Elem<T>, E> {
                    Ok(Elem(None))
                }
                skip_others!(Elem(None));
            }
            d.deserialize_any(V(std::marker::PhantomData))
        }
    }

    /// The first element of a JSON array, the rest skipped.
    struct First<T>(Option<T>);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for First<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = First<T>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an array")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First<T>, A::Error> {
                    let first = seq.next_element()?;
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(First(first))
                }
            }
            d.deserialize_seq(V(std::marker::PhantomData))
        }
    }

    /// The `error` object of a body: `{"error":{…}}` or `[{"error":{…}}, …]`.
    pub(super) fn error_of(body: &[u8]) -> Option<ErrorObject<'_>> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
        let envelope = if *first == b'[' {
            serde_json::from_slice::<First<Envelope<'_>>>(body)
                .ok()?
                .0?
        } else {
            serde_json::from_slice::<Envelope<'_>>(body).ok()?
        };
        envelope.error
    }
}

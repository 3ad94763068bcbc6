//! Parsing what upstreams say about their limits: `Retry-After`, `retry-after-ms`,
//! OpenAI `x-ratelimit-*`, Anthropic `anthropic-ratelimit-*`, Gemini `retryDelay`.
//!
//! Every parser is total: garbage, negative numbers, overflow (`10^30` seconds) or
//! non-UTF-8 bytes give `None` or a value clamped to [`MAX_HINT`] — never a panic.
//! A proptest feeds arbitrary bytes to each of them.
//!
//! Wall-clock formats (HTTP-date, RFC 3339 instants) need "now"; every function
//! that reads one takes `now: SystemTime` so tests are deterministic. This is the
//! only place the crate reads wall-clock time — all waiting goes through
//! `tokio::time`.
//!
//! We parse Go-style durations (`6m0s`, `1.5s`, `12ms`, `1h2m3.5s`, as OpenAI sends
//! them) ourselves: `humantime` rejects fractional units like `1.5s`. HTTP-dates go
//! through `httpdate` and RFC 3339 instants through `humantime`.
//!
//! ```
//! use semaforo::classify::headers::{RateLimitInfo, parse_go_duration};
//! use std::time::{Duration, SystemTime};
//!
//! let headers = [
//!     ("x-ratelimit-limit-tokens", "30000"),
//!     ("x-ratelimit-remaining-tokens", "27000"),
//!     ("x-ratelimit-reset-tokens", "6m0s"),
//!     ("retry-after-ms", "1500"),
//! ];
//! let info = RateLimitInfo::from_headers(&headers[..], SystemTime::now());
//! let tokens = info.tokens.unwrap();
//! assert_eq!(tokens.limit, Some(30_000));
//! assert_eq!(tokens.remaining, Some(27_000));
//! assert_eq!(tokens.reset, Some(Duration::from_secs(360)));
//! assert_eq!(info.retry_after, Some(Duration::from_millis(1500)));
//! assert_eq!(parse_go_duration("1h2m3.5s"), Some(Duration::from_millis(3_723_500)));
//! ```

use std::time::{Duration, SystemTime};

/// The longest wait any parser returns; larger values are clamped to it
/// (366 days — longer than any provider's quota period).
pub const MAX_HINT: Duration = Duration::from_secs(366 * 24 * 3600);

const MAX_HINT_NANOS: u128 = MAX_HINT.as_nanos();

/// Read access to response headers by case-insensitive name.
///
/// Implemented for `http::HeaderMap` (feature `http`) and for slices, arrays and
/// vectors of `(name, value)` pairs, so the parsers work with any HTTP client.
pub trait HeaderSource {
    /// The first value of header `name` (ASCII case-insensitive), as raw bytes.
    fn header_bytes(&self, name: &str) -> Option<&[u8]>;

    /// Calls `f` with every header in order (name, value), repeated names
    /// once per value, and returns `true`; or returns `false` without
    /// calling `f` when the source cannot list its headers (the default).
    ///
    /// The parsers that read many names ([`RateLimitInfo::from_headers`]
    /// reads 20) then take them in one pass over what is there instead of
    /// a lookup per name — on `http::HeaderMap` each lookup by `&str`
    /// parses the name first. Names may come in any case.
    fn each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8])) -> bool {
        let _ = f;
        false
    }
}

impl<T: HeaderSource + ?Sized> HeaderSource for &T {
    fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        (**self).header_bytes(name)
    }

    fn each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8])) -> bool {
        (**self).each_header(f)
    }
}

impl<K: AsRef<str>, V: AsRef<[u8]>> HeaderSource for [(K, V)] {
    fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }

    fn each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8])) -> bool {
        for (k, v) in self {
            f(k.as_ref(), v.as_ref());
        }
        true
    }
}

impl<K: AsRef<str>, V: AsRef<[u8]>, const N: usize> HeaderSource for [(K, V); N] {
    fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self[..].header_bytes(name)
    }

    fn each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8])) -> bool {
        self[..].each_header(f)
    }
}

impl<K: AsRef<str>, V: AsRef<[u8]>> HeaderSource for Vec<(K, V)> {
    fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self[..].header_bytes(name)
    }

    fn each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8])) -> bool {
        self[..].each_header(f)
    }
}

#[cfg(feature = "http")]
impl HeaderSource for http::HeaderMap {
    fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }

    fn each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8])) -> bool {
        for (k, v) in self {
            f(k.as_str(), v.as_bytes());
        }
        true
    }
}

/// The headers [`RateLimitInfo::from_headers`] reads, in the order of
/// [`Known`]'s slots: four windows of (limit, remaining, reset), then
/// `retry-after-ms` and `retry-after`.
const KNOWN: [&str; 20] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-limit",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
    "retry-after-ms",
    "retry-after",
];

/// The first value of each [`KNOWN`] header present.
struct Known<'a>([Option<&'a [u8]>; KNOWN.len()]);

impl<'a> Known<'a> {
    /// One pass over the headers when the source lists them, else a lookup
    /// per name.
    fn read<H: HeaderSource + ?Sized>(h: &'a H) -> Self {
        let mut slots = [None; KNOWN.len()];
        let listed = h.each_header(&mut |name, value| {
            // Every known name starts with `x-`, `a` or `r`: most headers
            // (content-type, date, server…) stop at their first byte.
            if !matches!(
                name.as_bytes().first(),
                Some(b'x' | b'X' | b'a' | b'A' | b'r' | b'R')
            ) {
                return;
            }
            if let Some(i) = KNOWN.iter().position(|k| k.eq_ignore_ascii_case(name)) {
                // The first value, as `header_bytes` gives.
                if slots[i].is_none() {
                    slots[i] = Some(value);
                }
            }
        });
        if !listed {
            for (slot, name) in slots.iter_mut().zip(KNOWN) {
                *slot = h.header_bytes(name);
            }
        }
        Known(slots)
    }
}

fn trimmed_str(value: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(value).ok()?.trim();
    (!s.is_empty()).then_some(s)
}

fn clamp_nanos(nanos: u128) -> Duration {
    if nanos >= MAX_HINT_NANOS {
        MAX_HINT
    } else {
        // < MAX_HINT_NANOS, so it fits: secs < 2^26, nanos part < 10^9.
        Duration::new(
            (nanos / 1_000_000_000) as u64,
            (nanos % 1_000_000_000) as u32,
        )
    }
}

/// Parses a non-negative decimal number (`"7"`, `"1.5"`) times `unit_nanos`.
/// Saturates at [`MAX_HINT`]; `None` for anything else (sign, exponent, garbage).
fn parse_decimal(s: &str, unit_nanos: u128) -> Option<Duration> {
    let s = s.strip_prefix('+').unwrap_or(s);
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(clamp_nanos(decimal_nanos(int, frac, unit_nanos)))
}

/// `int.frac × unit_nanos`, saturating (inputs are ASCII digits only).
fn decimal_nanos(int: &str, frac: &str, unit_nanos: u128) -> u128 {
    let mut total: u128 = 0;
    for b in int.bytes() {
        total = total
            .saturating_mul(10)
            .saturating_add(u128::from(b - b'0'));
        if total >= MAX_HINT_NANOS {
            return MAX_HINT_NANOS;
        }
    }
    total = total.saturating_mul(unit_nanos);
    // Fractional part: digits beyond nanosecond precision are ignored.
    let mut scale = unit_nanos;
    for b in frac.bytes().take(30) {
        scale /= 10;
        if scale == 0 {
            break;
        }
        total = total.saturating_add(u128::from(b - b'0') * scale);
    }
    total
}

/// `Retry-After` as delta-seconds (`"7"`; a decimal `"1.5"` is accepted too).
pub fn parse_delta_seconds(value: &[u8]) -> Option<Duration> {
    parse_decimal(trimmed_str(value)?, 1_000_000_000)
}

/// `retry-after-ms` (OpenAI, Azure): milliseconds, integer or decimal.
pub fn parse_retry_after_ms(value: &[u8]) -> Option<Duration> {
    parse_decimal(trimmed_str(value)?, 1_000_000)
}

/// `Retry-After` in either form: delta-seconds or an HTTP-date (RFC 9110), the
/// latter measured from `now` (a date in the past means "now": `Duration::ZERO`).
///
/// ```
/// use semaforo::classify::headers::parse_retry_after;
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
///
/// let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
/// assert_eq!(parse_retry_after(b"120", now), Some(Duration::from_secs(120)));
/// assert_eq!(
///     parse_retry_after(b"Sun, 06 Nov 1994 08:50:37 GMT", now),
///     Some(Duration::from_secs(60))
/// );
/// assert_eq!(parse_retry_after(b"soon", now), None);
/// ```
pub fn parse_retry_after(value: &[u8], now: SystemTime) -> Option<Duration> {
    parse_retry_after_with(value, &mut || now)
}

/// [`parse_retry_after`], reading the wall clock only for an HTTP-date.
fn parse_retry_after_with(value: &[u8], now: &mut dyn FnMut() -> SystemTime) -> Option<Duration> {
    let s = trimmed_str(value)?;
    if let Some(d) = parse_decimal(s, 1_000_000_000) {
        return Some(d);
    }
    match httpdate::parse_http_date(s) {
        Ok(at) => Some(until(at, now())),
        // `httpdate` refuses years before 1970; such a date is in the past,
        // and a date in the past means "now", as documented above.
        Err(_) if http_date_before_1970(s) => Some(Duration::ZERO),
        Err(_) => None,
    }
}

/// `true` for a well-formed IMF-fixdate (`Sun, 06 Nov 1900 08:49:37 GMT`)
/// whose year is before 1970.
fn http_date_before_1970(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 29 || !s.is_ascii() || &b[3..5] != b", " || !s.ends_with(" GMT") {
        return false;
    }
    let year = &s[12..16];
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    digits(12..16)
        && digits(5..7)
        && digits(17..19)
        && digits(20..22)
        && digits(23..25)
        && year.parse::<u32>().is_ok_and(|y| y < 1970)
}

fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now)
        .map(|d| d.min(MAX_HINT))
        .unwrap_or(Duration::ZERO)
}

/// A Go `time.Duration` string as OpenAI writes its reset headers and Gemini its
/// `retryDelay`: `"6m0s"`, `"1.5s"`, `"12ms"`, `"1h2m3.5s"`, `"500us"`, `"0"`.
/// Negative durations are `None`; huge ones clamp to [`MAX_HINT`].
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return None;
        }
        total = total.saturating_add(decimal_nanos(int, frac, unit_nanos));
        rest = next;
    }
    Some(clamp_nanos(total))
}

/// An RFC 3339 instant (`2024-05-01T12:00:30Z`, `…+02:00`, fractional seconds
/// allowed) as the time left until it, from `now` (past instants give zero).
pub fn parse_rfc3339_until(value: &[u8], now: SystemTime) -> Option<Duration> {
    parse_rfc3339_until_with(value, &mut || now)
}

/// [`parse_rfc3339_until`], reading the wall clock only for a valid instant.
fn parse_rfc3339_until_with(value: &[u8], now: &mut dyn FnMut() -> SystemTime) -> Option<Duration> {
    let s = trimmed_str(value)?;
    // humantime accepts only UTC (`Z`); apply a numeric offset ourselves.
    let (base, offset_secs): (std::borrow::Cow<'_, str>, i64) = match s.len().checked_sub(6) {
        Some(i)
            if s.is_char_boundary(i)
                && matches!(s.as_bytes()[i], b'+' | b'-')
                && s.as_bytes().get(i + 3) == Some(&b':') =>
        {
            let (head, off) = s.split_at(i);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let hh: i64 = off.get(1..3)?.parse().ok()?;
            let mm: i64 = off.get(4..6)?.parse().ok()?;
            if hh > 23 || mm > 59 {
                return None;
            }
            (format!("{head}Z").into(), sign * (hh * 3600 + mm * 60))
        }
        _ => (s.into(), 0),
    };
    let utc_as_if_local = humantime::parse_rfc3339_weak(&base).ok()?;
    // `12:00+02:00` is 10:00 UTC: subtract a positive offset.
    let at = if offset_secs >= 0 {
        utc_as_if_local.checked_sub(Duration::from_secs(offset_secs.unsigned_abs()))?
    } else {
        utc_as_if_local.checked_add(Duration::from_secs(offset_secs.unsigned_abs()))?
    };
    Some(until(at, now()))
}

/// A reset value in any of the forms providers use: a Go duration (OpenAI), an
/// RFC 3339 instant (Anthropic) or plain seconds.
pub fn parse_reset(value: &[u8], now: SystemTime) -> Option<Duration> {
    parse_reset_with(value, &mut || now)
}

/// [`parse_reset`], reading the wall clock only for an RFC 3339 instant.
fn parse_reset_with(value: &[u8], now: &mut dyn FnMut() -> SystemTime) -> Option<Duration> {
    let s = trimmed_str(value)?;
    parse_decimal(s, 1_000_000_000)
        .or_else(|| parse_go_duration(s))
        .or_else(|| parse_rfc3339_until_with(value, now))
}

/// The wait an upstream asked for: `retry-after-ms` when present (more precise),
/// else `Retry-After` (seconds or HTTP-date).
pub fn retry_after_from_headers<H: HeaderSource + ?Sized>(
    headers: &H,
    now: SystemTime,
) -> Option<Duration> {
    headers
        .header_bytes("retry-after-ms")
        .and_then(parse_retry_after_ms)
        .or_else(|| {
            headers
                .header_bytes("retry-after")
                .and_then(|v| parse_retry_after(v, now))
        })
}

/// The wait a `429` implies: `retry-after-ms` / `Retry-After` when present,
/// else the longest reset among the rate-limit windows its headers report as
/// spent (`x-ratelimit-remaining-tokens: 0` with `x-ratelimit-reset-tokens:
/// 1m30.5s` → 90.5 s; Anthropic's `anthropic-ratelimit-*` alike). A window's
/// reset is the time until it is full again (OpenAI's and Anthropic's
/// definition), so this errs on the long side; ceilings apply as for
/// `Retry-After`.
///
/// ```
/// use semaforo::classify::headers::throttle_wait_from_headers;
/// use std::time::{Duration, SystemTime};
///
/// let h = [("x-ratelimit-remaining-tokens", "0"), ("x-ratelimit-reset-tokens", "1m30.5s")];
/// assert_eq!(throttle_wait_from_headers(&h[..], SystemTime::now()), Some(Duration::from_millis(90_500)));
/// ```
pub fn throttle_wait_from_headers<H: HeaderSource + ?Sized>(
    headers: &H,
    now: SystemTime,
) -> Option<Duration> {
    retry_after_from_headers(headers, now)
        .or_else(|| RateLimitInfo::from_headers(headers, now).exhausted_reset())
}

fn parse_count(value: &[u8]) -> Option<u64> {
    let s = trimmed_str(value)?;
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// One limit window as an upstream reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitWindow {
    /// The window's capacity (`x-ratelimit-limit-tokens`).
    pub limit: Option<u64>,
    /// What is left now (`x-ratelimit-remaining-tokens`).
    pub remaining: Option<u64>,
    /// Time until the window is full again (`x-ratelimit-reset-tokens`).
    pub reset: Option<Duration>,
}

impl RateLimitWindow {
    /// The window from its three header values; `None` when none parses.
    fn from_values(
        [limit, remaining, reset]: [Option<&[u8]>; 3],
        now: &mut dyn FnMut() -> SystemTime,
    ) -> Option<Self> {
        let w = RateLimitWindow {
            limit: limit.and_then(parse_count),
            remaining: remaining.and_then(parse_count),
            reset: reset.and_then(|v| parse_reset_with(v, now)),
        };
        (w != RateLimitWindow::default()).then_some(w)
    }
}

/// What an upstream's headers say about its limits; the pacer uses it to stay
/// no more optimistic than the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitInfo {
    /// Requests window (OpenAI `x-ratelimit-*-requests`, Anthropic `anthropic-ratelimit-requests-*`).
    pub requests: Option<RateLimitWindow>,
    /// Tokens window (OpenAI `x-ratelimit-*-tokens`, Anthropic `anthropic-ratelimit-tokens-*`).
    pub tokens: Option<RateLimitWindow>,
    /// Anthropic input-tokens window (`anthropic-ratelimit-input-tokens-*`).
    pub input_tokens: Option<RateLimitWindow>,
    /// Anthropic output-tokens window (`anthropic-ratelimit-output-tokens-*`).
    pub output_tokens: Option<RateLimitWindow>,
    /// `retry-after-ms` or `Retry-After`.
    pub retry_after: Option<Duration>,
}

impl RateLimitInfo {
    /// Reads OpenAI and Anthropic rate-limit headers (whichever are present).
    pub fn from_headers<H: HeaderSource + ?Sized>(headers: &H, now: SystemTime) -> Self {
        Self::from_headers_with(headers, || now)
    }

    /// As [`from_headers`](Self::from_headers), reading the wall clock only
    /// when a value present needs it (an instant, an HTTP-date): the LLM
    /// preset reads every answer's headers, most of which carry none.
    pub(crate) fn from_headers_with<H: HeaderSource + ?Sized>(
        headers: &H,
        now: impl FnOnce() -> SystemTime,
    ) -> Self {
        let Known(k) = Known::read(headers);
        if k.iter().all(Option::is_none) {
            return RateLimitInfo::default();
        }
        let mut clock = Some(now);
        let mut read_at = None;
        let mut now =
            || *read_at.get_or_insert_with(|| clock.take().map_or(SystemTime::UNIX_EPOCH, |f| f()));
        let mut window =
            |i: usize| RateLimitWindow::from_values([k[i], k[i + 1], k[i + 2]], &mut now);
        RateLimitInfo {
            requests: window(0).or_else(|| window(3)),
            tokens: window(6).or_else(|| window(9)),
            input_tokens: window(12),
            output_tokens: window(15),
            retry_after: k[18]
                .and_then(parse_retry_after_ms)
                .or_else(|| k[19].and_then(|v| parse_retry_after_with(v, &mut now))),
        }
    }

    /// The longest `reset` among the windows with nothing `remaining`: when
    /// everything that is spent is back. `None` when no window is spent.
    pub fn exhausted_reset(&self) -> Option<Duration> {
        self.windows()
            .filter(|w| w.remaining == Some(0))
            .filter_map(|w| w.reset)
            .max()
    }

    fn windows(&self) -> impl Iterator<Item = &RateLimitWindow> {
        [
            &self.requests,
            &self.tokens,
            &self.input_tokens,
            &self.output_tokens,
        ]
        .into_iter()
        .flatten()
    }

    /// `true` when no header was recognised.
    pub fn is_empty(&self) -> bool {
        *self == RateLimitInfo::default()
    }
}

/// The directives of every `Cache-Control` header in `headers`, trimmed
/// and lowercased (`no-store`, `max-age=0`, `private="x"`; RFC 9111 §5.2),
/// for the cache and the answers it may keep.
#[cfg(feature = "http")]
pub(crate) fn cache_control_directives(
    headers: &http::HeaderMap,
) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_forms() {
        let now = at(784_111_777);
        assert_eq!(parse_retry_after(b"7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(b" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(b"1.5", now),
            Some(Duration::from_millis(1500))
        );
        // RFC 9110's own example date.
        assert_eq!(
            parse_retry_after(b"Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(b"Fri, 31 Dec 1999 23:59:59 GMT", at(946_684_799 - 30)),
            Some(Duration::from_secs(30))
        );
        // in the past: retry now
        assert_eq!(
            parse_retry_after(b"Sun, 06 Nov 1994 08:49:37 GMT", at(900_000_000)),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(b"-5", now), None);
        assert_eq!(parse_retry_after(b"", now), None);
        assert_eq!(parse_retry_after(b"1e3", now), None);
        assert_eq!(parse_retry_after(b"\xff\xfe", now), None);
        assert_eq!(
            parse_retry_after(b"1000000000000000000000000000000", now),
            Some(MAX_HINT)
        );
        assert_eq!(
            parse_retry_after(b"3600", now),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn retry_after_ms() {
        assert_eq!(
            parse_retry_after_ms(b"1500"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after_ms(b"12.5"),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(parse_retry_after_ms(b"abc"), None);
        let h = [("Retry-After", "7"), ("retry-after-ms", "6500")];
        assert_eq!(
            retry_after_from_headers(&h[..], at(0)),
            Some(Duration::from_millis(6500))
        );
        let h = [("Retry-After", "7")];
        assert_eq!(
            retry_after_from_headers(&h[..], at(0)),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn go_durations_as_openai_writes_them() {
        let d = parse_go_duration;
        assert_eq!(d("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(d("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(d("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(d("1h2m3.5s"), Some(Duration::from_millis(3_723_500)));
        assert_eq!(d("13s"), Some(Duration::from_secs(13)));
        assert_eq!(d("0.013s"), Some(Duration::from_millis(13)));
        assert_eq!(d("500us"), Some(Duration::from_micros(500)));
        assert_eq!(d("500µs"), Some(Duration::from_micros(500)));
        assert_eq!(d("7ns"), Some(Duration::from_nanos(7)));
        assert_eq!(d("0"), Some(Duration::ZERO));
        assert_eq!(d("-1s"), None);
        assert_eq!(d("1x"), None);
        assert_eq!(d("s"), None);
        assert_eq!(d("1.2.3s"), None);
        assert_eq!(d("12"), None);
        assert_eq!(d("99999999999999999999999999999h"), Some(MAX_HINT));
    }

    #[test]
    fn rfc3339_reset_instants() {
        // 2024-05-01T12:00:00Z = 1714564800
        let now = at(1_714_564_800);
        assert_eq!(
            parse_rfc3339_until(b"2024-05-01T12:00:30Z", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_rfc3339_until(b"2024-05-01T12:00:00.250Z", now),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_rfc3339_until(b"2024-05-01T14:01:00+02:00", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_rfc3339_until(b"2024-05-01T11:01:00-01:00", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_rfc3339_until(b"2024-05-01T11:00:00Z", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_rfc3339_until(b"yesterday", now), None);
        assert_eq!(parse_rfc3339_until(b"2024-05-01T14:01:00+99:00", now), None);
    }

    #[test]
    fn openai_headers_from_its_docs() {
        // The sample from OpenAI's rate-limit guide.
        let h = [
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ];
        let info = RateLimitInfo::from_headers(&h[..], at(0));
        assert_eq!(
            info.requests,
            Some(RateLimitWindow {
                limit: Some(60),
                remaining: Some(59),
                reset: Some(Duration::from_secs(1))
            })
        );
        assert_eq!(
            info.tokens,
            Some(RateLimitWindow {
                limit: Some(150_000),
                remaining: Some(149_984),
                reset: Some(Duration::from_secs(360))
            })
        );
        assert_eq!(info.retry_after, None);
        assert!(!info.is_empty());
    }

    #[test]
    fn anthropic_headers_from_its_docs() {
        let now = at(1_714_564_800); // 2024-05-01T12:00:00Z
        let h = vec![
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2024-05-01T12:00:01Z"),
            ("anthropic-ratelimit-tokens-limit", "40000"),
            ("anthropic-ratelimit-tokens-remaining", "39000"),
            ("anthropic-ratelimit-tokens-reset", "2024-05-01T12:00:45Z"),
            ("anthropic-ratelimit-input-tokens-limit", "30000"),
            ("anthropic-ratelimit-input-tokens-remaining", "29500"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2024-05-01T12:00:02Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-output-tokens-remaining", "7500"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2024-05-01T12:00:03Z",
            ),
            ("retry-after", "45"),
        ];
        let info = RateLimitInfo::from_headers(&h, now);
        let req = info.requests.unwrap();
        assert_eq!(
            (req.limit, req.remaining, req.reset),
            (Some(50), Some(49), Some(Duration::from_secs(1)))
        );
        let tok = info.tokens.unwrap();
        assert_eq!(
            (tok.limit, tok.remaining, tok.reset),
            (Some(40_000), Some(39_000), Some(Duration::from_secs(45)))
        );
        assert_eq!(
            info.input_tokens.unwrap().reset,
            Some(Duration::from_secs(2))
        );
        assert_eq!(info.output_tokens.unwrap().remaining, Some(7500));
        assert_eq!(info.retry_after, Some(Duration::from_secs(45)));
    }

    #[test]
    fn garbage_headers_give_nothing() {
        let h = [
            ("x-ratelimit-limit-tokens", "lots"),
            ("x-ratelimit-remaining-tokens", "-3"),
            ("x-ratelimit-reset-tokens", "whenever"),
            ("retry-after", "later"),
        ];
        assert!(RateLimitInfo::from_headers(&h[..], at(0)).is_empty());
        let h = [("x-ratelimit-limit-tokens", "99999999999999999999999999")];
        assert!(RateLimitInfo::from_headers(&h[..], at(0)).is_empty());
    }

    proptest! {
        #[test]
        fn every_parser_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..64), secs in any::<u64>()) {
            let now = UNIX_EPOCH.checked_add(Duration::from_secs(secs % (1u64 << 40))).unwrap_or(UNIX_EPOCH);
            for d in [
                parse_delta_seconds(&bytes),
                parse_retry_after_ms(&bytes),
                parse_retry_after(&bytes, now),
                parse_rfc3339_until(&bytes, now),
                parse_reset(&bytes, now),
                std::str::from_utf8(&bytes).ok().and_then(parse_go_duration),
            ].into_iter().flatten() {
                prop_assert!(d <= MAX_HINT);
            }
            let h = [("retry-after", &bytes[..]), ("x-ratelimit-reset-tokens", &bytes[..]),
                     ("anthropic-ratelimit-tokens-reset", &bytes[..]), ("x-ratelimit-limit-requests", &bytes[..])];
            let _ = RateLimitInfo::from_headers(&h[..], now);
        }

        #[test]
        fn structured_strings_are_total(s in "[0-9.hmsunµ+\\-:TZ ]{0,40}") {
            let now = UNIX_EPOCH;
            if let Some(d) = parse_go_duration(&s) { prop_assert!(d <= MAX_HINT); }
            if let Some(d) = parse_reset(s.as_bytes(), now) { prop_assert!(d <= MAX_HINT); }
            if let Some(d) = parse_retry_after(s.as_bytes(), now) { prop_assert!(d <= MAX_HINT); }
        }

        #[test]
        fn delta_seconds_roundtrip(n in 0u64..(366 * 24 * 3600)) {
            prop_assert_eq!(parse_delta_seconds(n.to_string().as_bytes()), Some(Duration::from_secs(n)));
            prop_assert_eq!(parse_retry_after_ms(n.to_string().as_bytes()), Some(Duration::from_millis(n)));
        }

        /// The one pass over listed headers reads what a lookup per name
        /// reads: first values, any case, repeated and unknown names, on
        /// pairs and on an `http::HeaderMap`.
        #[test]
        fn one_pass_reads_what_lookups_read(
            picks in proptest::collection::vec((0usize..KNOWN.len() + 3, any::<bool>(), 0usize..6), 0..24),
        ) {
            let values = ["7", "0", "1m30.5s", "2024-05-01T12:00:30Z", "Sun, 06 Nov 1994 08:49:37 GMT", "x"];
            let pairs: Vec<(String, &str)> = picks
                .iter()
                .map(|&(i, upper, v)| {
                    let name = KNOWN.get(i).copied().unwrap_or_else(|| ["content-type", "x-request-id", "age"][i - KNOWN.len()]);
                    (if upper { name.to_ascii_uppercase() } else { name.to_string() }, values[v])
                })
                .collect();
            /// The same pairs, seen only through `header_bytes`.
            struct Lookups<'a>(&'a [(String, &'a str)]);
            impl HeaderSource for Lookups<'_> {
                fn header_bytes(&self, name: &str) -> Option<&[u8]> {
                    self.0.header_bytes(name)
                }
            }
            let now = at(784_111_777);
            let looked_up = RateLimitInfo::from_headers(&Lookups(&pairs), now);
            prop_assert_eq!(RateLimitInfo::from_headers(&pairs[..], now), looked_up);
            #[cfg(feature = "http")]
            {
                let mut map = http::HeaderMap::new();
                for (k, v) in &pairs {
                    map.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), http::HeaderValue::from_static(v));
                }
                prop_assert_eq!(RateLimitInfo::from_headers(&map, now), looked_up);
            }
        }

        /// Durations and seconds (what OpenAI sends) need no wall clock; an
        /// instant or an HTTP-date reads it once.
        #[test]
        fn only_instants_and_dates_read_the_clock(secs in 0u64..100_000) {
            let go = format!("{}m{}s", secs / 60, secs % 60);
            let n = secs.to_string();
            let h = [("x-ratelimit-reset-tokens", go.as_str()), ("x-ratelimit-reset-requests", n.as_str()), ("retry-after", n.as_str())];
            let info = RateLimitInfo::from_headers_with(&h[..], || panic!("the clock was read"));
            prop_assert_eq!(info.tokens.unwrap().reset, Some(Duration::from_secs(secs)));
            prop_assert_eq!(info.retry_after, Some(Duration::from_secs(secs)));
            let reads = std::cell::Cell::new(0);
            let h = [("anthropic-ratelimit-tokens-reset", "2024-05-01T12:00:30Z"), ("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT"), ("x-ratelimit-reset-requests", n.as_str())];
            let info = RateLimitInfo::from_headers_with(&h[..], || { reads.set(reads.get() + 1); at(784_111_777) });
            prop_assert_eq!(reads.get(), 1, "read once, shared by both values");
            prop_assert!(info.tokens.is_some() && info.retry_after.is_some());
        }

        /// No header the parsers read: nothing else is read, the wall clock neither.
        #[test]
        fn no_known_header_reads_no_clock(n in 0usize..4) {
            let h: Vec<(&str, &str)> = [("content-type", "application/json"), ("date", "x"), ("server", "y"), ("x-request-id", "z")][..n].to_vec();
            let info = RateLimitInfo::from_headers_with(&h, || panic!("the clock was read"));
            prop_assert!(info.is_empty());
        }
    }
}

//! Outside attacks on `RateLimitInfo::from_headers`'s one pass over the
//! headers (`HeaderSource::each_header`): every source agrees with lookups by
//! name on duplicates, case, bad and huge values and near-miss names.

use proptest::prelude::*;
use semaforo::classify::headers::{
    throttle_wait_from_headers, HeaderSource, RateLimitInfo, MAX_HINT,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_714_564_800) // 2024-05-01T12:00:00Z
}

/// Only header_bytes: the default each_header (lookup per name, the old way).
struct Lookups<'a>(&'a [(String, Vec<u8>)]);
impl HeaderSource for Lookups<'_> {
    fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.0.header_bytes(name)
    }
}

/// Lists some headers, then says it cannot list (returns false).
struct LiesThenFalse<'a>(&'a [(String, Vec<u8>)]);
impl HeaderSource for LiesThenFalse<'_> {
    fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.0.header_bytes(name)
    }
    fn each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8])) -> bool {
        f("retry-after-ms", b"999999");
        f("x-ratelimit-limit-requests", b"12345");
        false
    }
}

fn all_agree(pairs: &[(String, Vec<u8>)]) -> RateLimitInfo {
    let reference = RateLimitInfo::from_headers(&Lookups(pairs), now());
    assert_eq!(
        RateLimitInfo::from_headers(pairs, now()),
        reference,
        "slice"
    );
    assert_eq!(
        RateLimitInfo::from_headers(&pairs.to_vec(), now()),
        reference,
        "vec"
    );
    // Through the `&T` impl on purpose.
    #[allow(clippy::redundant_slicing)]
    let forwarded = RateLimitInfo::from_headers(&&pairs[..], now());
    assert_eq!(forwarded, reference, "&&slice");
    assert_eq!(
        RateLimitInfo::from_headers(&LiesThenFalse(pairs), now()),
        reference,
        "false"
    );
    let as_str: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
    assert_eq!(
        RateLimitInfo::from_headers(&as_str[..], now()),
        reference,
        "&str pairs"
    );
    let mut map = http::HeaderMap::new();
    let mut map_ok = true;
    for (k, v) in pairs {
        match (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            (Ok(k), Ok(v)) => {
                map.append(k, v);
            }
            _ => map_ok = false,
        }
    }
    if map_ok {
        assert_eq!(
            RateLimitInfo::from_headers(&map, now()),
            reference,
            "HeaderMap"
        );
        assert_eq!(
            RateLimitInfo::from_headers(&&map, now()),
            reference,
            "&HeaderMap"
        );
    }
    reference
}

fn p(k: &str, v: &[u8]) -> (String, Vec<u8>) {
    (k.to_string(), v.to_vec())
}

#[test]
fn empty_sources() {
    assert!(all_agree(&[]).is_empty());
    assert!(RateLimitInfo::from_headers(&http::HeaderMap::new(), now()).is_empty());
    let arr: [(&str, &str); 0] = [];
    assert!(RateLimitInfo::from_headers(&arr, now()).is_empty());
    assert!(RateLimitInfo::from_headers(&Vec::<(String, String)>::new(), now()).is_empty());
}

#[test]
fn duplicates_first_value_wins() {
    let info = all_agree(&[
        p("x-ratelimit-remaining-tokens", b"5"),
        p("content-type", b"json"),
        p("x-ratelimit-remaining-tokens", b"0"),
        p("retry-after", b"7"),
        p("Retry-After", b"9"),
    ]);
    assert_eq!(info.tokens.unwrap().remaining, Some(5));
    assert_eq!(info.retry_after, Some(Duration::from_secs(7)));
}

#[test]
fn duplicate_with_garbage_first_value() {
    // First value garbage: as header_bytes gives it, the good one after is not read.
    let info = all_agree(&[
        p("retry-after-ms", b"soon"),
        p("retry-after-ms", b"1500"),
        p("retry-after", b"3"),
    ]);
    assert_eq!(info.retry_after, Some(Duration::from_secs(3)));
}

#[test]
fn mixed_case_names() {
    let info = all_agree(&[
        p("X-RateLimit-Limit-Requests", b"100"),
        p("X-RATELIMIT-REMAINING-REQUESTS", b"0"),
        p("x-RateLimit-reset-REQUESTS", b"1m30.5s"),
        p("ANTHROPIC-RATELIMIT-INPUT-TOKENS-LIMIT", b"10"),
        p("RETRY-AFTER-MS", b"250"),
    ]);
    let r = info.requests.unwrap();
    assert_eq!(r.limit, Some(100));
    assert_eq!(r.remaining, Some(0));
    assert_eq!(r.reset, Some(Duration::from_millis(90_500)));
    assert_eq!(info.input_tokens.unwrap().limit, Some(10));
    assert_eq!(info.retry_after, Some(Duration::from_millis(250)));
}

#[test]
fn non_utf8_and_huge_values() {
    let huge = vec![b'9'; 1 << 20];
    let info = all_agree(&[
        p("x-ratelimit-limit-requests", b"\xff\xfe"),
        p("x-ratelimit-remaining-requests", &huge),
        p("x-ratelimit-reset-requests", &huge),
        p("retry-after", &huge),
        p("x-ratelimit-limit-tokens", b"\x80"),
    ]);
    let r = info.requests.unwrap();
    assert_eq!(r.limit, None);
    assert_eq!(r.remaining, None, "u64 overflow is None");
    assert_eq!(r.reset, Some(MAX_HINT));
    assert_eq!(info.retry_after, Some(MAX_HINT));
    assert_eq!(info.tokens, None);
}

#[test]
fn near_miss_names_are_ignored() {
    let info = all_agree(&[
        p("retry-after-m", b"1"),
        p("retry-afte", b"1"),
        p("retry-after-ms-x", b"1"),
        p("retry-afterms", b"1"),
        p("x-ratelimit-limit-request", b"1"),
        p("x-ratelimit-limit-requestss", b"1"),
        p(" retry-after", b"1"),
        p("retry-after ", b"1"),
        p("anthropic-ratelimit-requests", b"1"),
        p("a", b"1"),
        p("r", b"1"),
        p("x", b"1"),
        p("", b"1"),
        p("retry_after", b"1"),
        p("r\u{e9}try-after", b"1"),
    ]);
    assert!(info.is_empty(), "{info:?}");
}

#[test]
fn http_date_and_instants_are_measured_from_now() {
    let info = all_agree(&[
        p("anthropic-ratelimit-tokens-reset", b"2024-05-01T12:00:30Z"),
        p("anthropic-ratelimit-tokens-remaining", b"0"),
        p("retry-after", b"Wed, 01 May 2024 12:01:00 GMT"),
    ]);
    assert_eq!(info.tokens.unwrap().reset, Some(Duration::from_secs(30)));
    assert_eq!(info.retry_after, Some(Duration::from_secs(60)));
    // The OpenAI window wins over the Anthropic one when it parses.
    let info = all_agree(&[
        p("anthropic-ratelimit-requests-limit", b"5"),
        p("x-ratelimit-limit-requests", b"9"),
    ]);
    assert_eq!(info.requests.unwrap().limit, Some(9));
    // ... and falls back when OpenAI's is present but garbage.
    let info = all_agree(&[
        p("x-ratelimit-limit-requests", b"nine"),
        p("anthropic-ratelimit-requests-limit", b"5"),
    ]);
    assert_eq!(info.requests.unwrap().limit, Some(5));
}

#[test]
fn throttle_wait_agrees() {
    let pairs = [
        p("x-ratelimit-remaining-tokens", b"0"),
        p("X-RATELIMIT-RESET-TOKENS", b"6m0s"),
    ];
    let w = throttle_wait_from_headers(&pairs[..], now());
    assert_eq!(w, throttle_wait_from_headers(&Lookups(&pairs), now()));
    assert_eq!(w, Some(Duration::from_secs(360)));
}

const NAMES: [&str; 26] = [
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
    "retry-after-m",
    "x-ratelimit-limit",
    "anthropic-ratelimit",
    "date",
    "Retry",
    "x-request-id",
];

const VALUES: [&[u8]; 10] = [
    b"7",
    b"0",
    b" 12 ",
    b"1m30.5s",
    b"2024-05-01T12:00:30Z",
    b"2024-05-01T14:00:30+02:00",
    b"Wed, 01 May 2024 12:01:00 GMT",
    b"\xff",
    b"",
    b"-1",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn every_source_agrees(
        picks in proptest::collection::vec((0usize..NAMES.len(), proptest::collection::vec(any::<bool>(), 48), 0usize..VALUES.len()), 0..30),
    ) {
        let pairs: Vec<(String, Vec<u8>)> = picks
            .iter()
            .map(|(i, case, v)| {
                let name: String = NAMES[*i]
                    .chars()
                    .zip(case.iter().cycle())
                    .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
                    .collect();
                (name, VALUES[*v].to_vec())
            })
            .collect();
        all_agree(&pairs);
    }
}

//! What the LLM preset reads from requests, headers and bodies: the cost
//! estimate counts every kind of prompt text, a 429's headers give its wait,
//! Gemini's array-wrapped errors are understood, past dates mean "now".

use bytes::Bytes;
use semaforo::classify::headers::parse_retry_after;
use semaforo::classify::{Class, HttpClassifier, LlmClassifier, Permanent};
use semaforo::llm::{estimate_cost, LlmStack, Tier};
use semaforo::pace::Cost;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower::{ServiceBuilder, ServiceExt};

const NONE: [(&str, &str); 0] = [];

fn chat(content: serde_json::Value, max_tokens: u64) -> Vec<u8> {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    })
    .to_string()
    .into_bytes()
}

#[test]
fn content_parts_count_like_plain_content() {
    let text = "a".repeat(40_000);
    let plain = chat(serde_json::json!(text), 100);
    let parts = chat(serde_json::json!([{"type": "text", "text": text}]), 100);
    assert_eq!(estimate_cost(&plain), Cost::split(10_000, 100));
    assert_eq!(estimate_cost(&parts), Cost::split(10_000, 100));
    // A system prompt and tool definitions count too.
    let with_system = serde_json::json!({
        "max_tokens": 100,
        "messages": [
            {"role": "system", "content": "b".repeat(4_000)},
            {"role": "user", "content": [{"type": "text", "text": text}]}
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "c".repeat(3_994)}}]
    });
    assert_eq!(
        estimate_cost(with_system.to_string().as_bytes()),
        Cost::split(10_000 + 1_000 + 1_000, 100)
    );
}

#[test]
fn request_numbers_never_wrap() {
    // `max_tokens` of u64::MAX: a cost no budget admits, not a wrapped tiny one.
    let body = chat(serde_json::json!("a".repeat(400)), u64::MAX);
    let cost = estimate_cost(&body);
    assert_eq!(
        (cost.output_tokens, cost.total_tokens()),
        (u64::MAX, u64::MAX)
    );
}

/// Twenty 40,000-character prompts in content parts on a 30k TPM tier: the
/// pacer sees 10,100 tokens each, so only two go out at once.
#[tokio::test(start_paused = true)]
async fn twenty_big_prompts_in_parts_do_not_go_out_at_once() {
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()
    .unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let client = tower::service_fn({
        let sent = sent.clone();
        move |_req: http::Request<Bytes>| {
            sent.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(1_000)).await;
                Ok::<_, std::io::Error>(http::Response::new(Bytes::new()))
            }
        }
    });
    let svc = ServiceBuilder::new().layer(stack.layer()).service(client);
    let text = "a".repeat(40_000);
    let body = Bytes::from(chat(
        serde_json::json!([{"type": "text", "text": text}]),
        100,
    ));
    for _ in 0..20 {
        let req = http::Request::post("/v1/chat/completions")
            .body(body.clone())
            .unwrap();
        let svc = svc.clone();
        tokio::spawn(svc.oneshot(req));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        sent.load(Ordering::SeqCst),
        2,
        "28,500-token burst / 10,100"
    );
}

/// A 429 with no `Retry-After` whose rate-limit headers say a window is spent
/// waits for that window's reset.
#[test]
fn a_spent_window_gives_the_429_its_wait() {
    let headers = [
        ("x-ratelimit-limit-tokens", "30000"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-tokens", "1m30.5s"),
        ("x-ratelimit-remaining-requests", "499"),
        ("x-ratelimit-reset-requests", "120ms"),
    ];
    let expected = Class::Throttled {
        retry_after: Some(Duration::from_millis(90_500)),
    };
    assert_eq!(
        LlmClassifier::new().classify_parts(429, &headers[..], b""),
        expected
    );
    let mut res = http::Response::builder().status(429);
    for (k, v) in headers {
        res = res.header(k, v);
    }
    let res = res.body(()).unwrap();
    assert_eq!(
        semaforo::classify::Classify::classify(&HttpClassifier, Ok::<_, &std::io::Error>(&res)),
        expected
    );
    // Anthropic's headers alike.
    let anthropic = [
        ("anthropic-ratelimit-output-tokens-remaining", "0"),
        ("anthropic-ratelimit-output-tokens-reset", "12"),
    ];
    assert_eq!(
        LlmClassifier::new().classify_parts(429, &anthropic[..], b""),
        Class::Throttled {
            retry_after: Some(Duration::from_secs(12))
        }
    );
    // Nothing spent: no wait invented.
    assert_eq!(
        LlmClassifier::new().classify_parts(429, &headers[3..], b""),
        Class::Throttled { retry_after: None }
    );
}

#[test]
fn gemini_errors_wrapped_in_an_array() {
    let per_minute = br#"[{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"0.5s"}]}}]"#;
    assert_eq!(
        LlmClassifier::new().classify_parts(429, &NONE[..], per_minute),
        Class::Throttled {
            retry_after: Some(Duration::from_millis(500))
        }
    );
    let per_day = br#"[{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"40s"}]}}]"#;
    assert_eq!(
        LlmClassifier::new().classify_parts(429, &NONE[..], per_day),
        Class::Permanent {
            reason: Permanent::QuotaExhausted
        }
    );
}

/// An HTTP date before 1970 is in the past: "retry now", as documented.
#[test]
fn a_date_in_the_past_means_now() {
    let now = UNIX_EPOCH + Duration::from_secs(1_764_000_000);
    assert_eq!(
        parse_retry_after(b"Mon, 01 Jan 1900 00:00:00 GMT", now),
        Some(Duration::ZERO)
    );
    assert_eq!(
        parse_retry_after(b"Thu, 01 Jan 1970 00:00:01 GMT", now),
        Some(Duration::ZERO)
    );
    // Still no hint for garbage.
    assert_eq!(
        parse_retry_after(b"Mon, 01 Jan 19x0 00:00:00 GMT", now),
        None
    );
    let _ = SystemTime::now();
}

/// One odd field does not hide what the rest of an error body says.
#[test]
fn provider_errors_are_read_leniently() {
    let permanent = [
        r#"{"error":{"type":"insufficient_quota","message":5}}"#,
        r#"{"error":{"type":"insufficient_quota","details":"x"}}"#,
        r#"{"error":{"type":"insufficient_quota","details":[5,{"retryDelay":5}]}}"#,
        r#"{"error":{"code":true,"type":"insufficient_quota","status":429}}"#,
        r#"{"error":"insufficient_quota"}"#,
    ];
    for body in permanent {
        assert_eq!(
            LlmClassifier::new().classify_parts(429, &NONE[..], body.as_bytes()),
            Class::Permanent {
                reason: Permanent::QuotaExhausted
            },
            "{body}"
        );
    }
    // "5μs" with a Greek mu, as some servers write it.
    let body = r#"{"error":{"code":"rate_limit_exceeded","message":"Please try again in 5μs."}}"#;
    assert_eq!(
        LlmClassifier::new().classify_parts(429, &NONE[..], body.as_bytes()),
        Class::Throttled {
            retry_after: Some(Duration::from_micros(5))
        }
    );
}

/// A `max_tokens` written as a string counts as the number it says.
#[test]
fn numbers_written_as_strings_count() {
    let body = br#"{"max_tokens":"100000","messages":[{"role":"user","content":"abcd"}]}"#;
    assert_eq!(estimate_cost(body), Cost::split(1, 100_000));
    // Read as a number is: floats rounded up, saturated; "NaN" is none.
    let out = |mt: &str| {
        let body = format!(r#"{{"max_tokens":{mt},"messages":[]}}"#);
        estimate_cost(body.as_bytes()).output_tokens
    };
    assert_eq!(out(r#""2000.5""#), 2_001);
    assert_eq!(out(r#""inf""#), u64::MAX);
    assert_eq!(out(r#""99999999999999999999""#), u64::MAX);
    assert_eq!(out(r#""NaN""#), out("null"), "not a number: the default");
}

/// A tier of 1 token per minute builds (its 95 % burst rounds to at least 1).
#[test]
fn a_tiny_tier_builds() {
    LlmStack::openai(Tier {
        requests_per_minute: 1,
        tokens_per_minute: 1,
    })
    .build()
    .unwrap();
}

/// An error body over the inspection cap (64 KiB) is not read: the answer is
/// classified by its status (a 400: `Permanent`, not retried) and reaches the
/// caller whole and untouched.
#[tokio::test(start_paused = true)]
async fn a_body_over_the_cap_reaches_the_caller_untouched() {
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    })
    .build()
    .unwrap();
    let huge = Bytes::from(format!(
        r#"{{"error":{{"type":"rate_limit_exceeded","message":"{}"}}}}"#,
        "x".repeat(100 * 1024)
    ));
    let calls = Arc::new(AtomicUsize::new(0));
    let client = tower::service_fn({
        let (huge, calls) = (huge.clone(), calls.clone());
        move |_req: http::Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let body = huge.clone();
            async move {
                Ok::<_, std::io::Error>(http::Response::builder().status(400).body(body).unwrap())
            }
        }
    });
    let req = http::Request::post("/v1/chat/completions")
        .body(Bytes::from_static(br#"{"max_tokens":10,"messages":[]}"#))
        .unwrap();
    let res = ServiceBuilder::new()
        .layer(stack.layer())
        .service(client)
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.body(), &huge, "whole and untouched");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "Permanent: not retried");
}

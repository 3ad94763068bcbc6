//! An in-process, OpenAI-compatible mock provider (axum), shared by the
//! `llm_client` example and the tests. Not a published API.
//!
//! `POST /v1/chat/completions` (and `/v1/messages`) enforces the limits of a
//! provider's account ([`Shape`]): OpenAI's requests- and tokens-per-minute
//! buckets (refilled continuously); Anthropic's requests, input tokens and
//! output tokens per minute (output charged at `max_tokens` on arrival, the
//! unused part given back at the end); Azure OpenAI's per-minute limits
//! evaluated over 10 s (each a bucket of a sixth of the limit refilling at
//! the per-minute rate). It answers `429` with the provider's error body and
//! rate-limit headers (`x-ratelimit-*` or `anthropic-ratelimit-*`, and
//! `retry-after`) when a request does not fit, sends those headers on every
//! answer, and can inject `529 overloaded_error`, `500`s and a full outage
//! (`503`) from a seeded RNG. `time_scale` makes "a minute" last
//! `60 / time_scale` seconds.
#![allow(dead_code)]

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// clap's parser for `--time-scale`: a finite number above 0.
pub fn time_scale(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("must be a number above 0, got {s}")),
    }
}

/// Whose account the mock enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// RPM and TPM (input + output), buckets of a whole minute.
    OpenAi,
    /// RPM, input tokens (ITPM) and output tokens (OTPM) per minute.
    Anthropic {
        input_tokens_per_minute: u64,
        output_tokens_per_minute: u64,
    },
    /// TPM and RPM = 6 per 1,000 TPM, each evaluated over 10 s: a bucket of
    /// a sixth of the limit (`requests_per_minute` is not used).
    Azure,
}

/// What a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counts {
    Requests,
    /// Input + output.
    Tokens,
    Input,
    Output,
}

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub tokens_per_minute: u64,
    pub requests_per_minute: u64,
    /// The provider's account shape (default: OpenAI).
    pub shape: Shape,
    /// A simulated minute lasts `60 / time_scale` real seconds.
    pub time_scale: f64,
    /// How long a completion takes, in simulated time.
    pub service_time: Duration,
    /// Share of admitted calls answered `529 overloaded_error`.
    pub overloaded_rate: f64,
    /// Share of admitted calls answered `500`.
    pub server_error_rate: f64,
    /// Share of answers that fail mid-way: a streamed one with an SSE
    /// `event: error` after a third of its chunks, a plain one cut mid-body.
    pub midstream_error_rate: f64,
    /// Share of answers whose first byte is late by `slow_first_byte` (simulated).
    pub slow_first_byte_rate: f64,
    pub slow_first_byte: Duration,
    /// Chunks in a streamed answer.
    pub chunks: u32,
    /// The share of `max_tokens` an answer really uses (its `usage`).
    pub completion_share: f64,
    /// Another client of the same account spent the whole token bucket just
    /// before our first request arrived (it refills from there).
    pub spent_before_first_request: bool,
    /// The model's context window (prompt + `max_tokens`, prompt as
    /// chars ÷ 4): a longer request is answered `400
    /// context_length_exceeded`, as OpenAI does.
    pub max_context: Option<u64>,
    pub seed: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            tokens_per_minute: 30_000,
            requests_per_minute: 500,
            shape: Shape::OpenAi,
            time_scale: 1.0,
            service_time: Duration::from_secs(5),
            overloaded_rate: 0.0,
            server_error_rate: 0.0,
            midstream_error_rate: 0.0,
            slow_first_byte_rate: 0.0,
            slow_first_byte: Duration::from_secs(30),
            chunks: 20,
            completion_share: 1.0,
            spent_before_first_request: false,
            max_context: None,
            seed: 0,
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub throttled: AtomicU64,
    pub overloaded: AtomicU64,
    pub server_errors: AtomicU64,
    pub unavailable: AtomicU64,
    pub midstream_errors: AtomicU64,
    /// Tokens of completed answers (what the provider bills).
    pub tokens: AtomicU64,
    /// Requests refused for their length (`context_length_exceeded`).
    pub too_long: AtomicU64,
    /// The `model` of each request received, with how many.
    pub models: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Stats {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::SeqCst)
    }
}

struct Bucket {
    counts: Counts,
    /// The limit per minute, as announced in headers.
    per_minute: u64,
    capacity: f64,
    per_sec: f64,
    level: f64,
    at: Instant,
}

/// Output reserved at `max_tokens` and not generated: back to the buckets
/// that count output (as Anthropic's OTPM does once the answer ends).
fn give_back(s: &Inner, unused: u64) {
    if unused == 0 {
        return;
    }
    let mut b = s.buckets.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    for x in b.iter_mut() {
        if matches!(x.counts, Counts::Output | Counts::Tokens) {
            x.refill(now);
            x.level = (x.level + unused as f64).min(x.capacity);
        }
    }
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        self.level = (self.level + (now - self.at).as_secs_f64() * self.per_sec).min(self.capacity);
        self.at = now;
    }
    fn secs_until(&self, n: f64) -> f64 {
        ((n - self.level) / self.per_sec).max(0.0)
    }
}

struct Inner {
    cfg: MockConfig,
    buckets: Mutex<Vec<Bucket>>,
    rng: Mutex<rand::rngs::SmallRng>,
    stats: Arc<Stats>,
    down: Arc<AtomicBool>,
    /// A request has been seen (for `spent_before_first_request`).
    seen: AtomicBool,
}

/// A running mock provider.
pub struct MockProvider {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    /// Set to answer every call `503` (a provider outage).
    pub down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl MockProvider {
    pub async fn start(cfg: MockConfig) -> std::io::Result<MockProvider> {
        let scale = cfg.time_scale;
        let now = Instant::now();
        // A bucket of `capacity` refilling `per_minute` a (simulated) minute.
        let bucket = |counts: Counts, per_minute: u64, capacity: u64| Bucket {
            counts,
            per_minute,
            capacity: capacity as f64,
            per_sec: per_minute as f64 / 60.0 * scale,
            level: capacity as f64,
            at: now,
        };
        let (tpm, rpm) = (cfg.tokens_per_minute, cfg.requests_per_minute);
        let buckets = match cfg.shape {
            Shape::OpenAi => vec![
                bucket(Counts::Tokens, tpm, tpm),
                bucket(Counts::Requests, rpm, rpm),
            ],
            Shape::Anthropic {
                input_tokens_per_minute: itpm,
                output_tokens_per_minute: otpm,
            } => vec![
                bucket(Counts::Requests, rpm, rpm),
                bucket(Counts::Input, itpm, itpm),
                bucket(Counts::Output, otpm, otpm),
            ],
            Shape::Azure => {
                let rpm = (tpm / 1_000 * 6).max(1);
                vec![
                    bucket(Counts::Tokens, tpm, (tpm / 6).max(1)),
                    bucket(Counts::Requests, rpm, (rpm / 6).max(1)),
                ]
            }
        };
        let stats = Arc::new(Stats::default());
        let down = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Inner {
            buckets: Mutex::new(buckets),
            rng: Mutex::new(rand::rngs::SmallRng::seed_from_u64(cfg.seed)),
            stats: stats.clone(),
            down: down.clone(),
            seen: AtomicBool::new(false),
            cfg,
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/messages", post(completions))
            .with_state(inner);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(MockProvider {
            addr,
            stats,
            down,
            task,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn millis(secs: f64) -> String {
    format!("{}ms", (secs * 1000.0).ceil() as u64)
}

/// Each bucket's limit, what is left and when it is full again, under the
/// provider's own header names.
fn rate_headers(h: &mut HeaderMap, shape: Shape, buckets: &[Bucket]) {
    let mut put = |k: String, v: String| {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            h.insert(k, v);
        }
    };
    for b in buckets {
        let remaining = format!("{}", b.level.max(0.0).floor() as u64);
        let full_in = b.secs_until(b.capacity);
        match shape {
            Shape::Anthropic { .. } => {
                let what = match b.counts {
                    Counts::Requests => "requests",
                    Counts::Input => "input-tokens",
                    Counts::Output => "output-tokens",
                    Counts::Tokens => "tokens",
                };
                let _ = full_in;
                put(
                    format!("anthropic-ratelimit-{what}-limit"),
                    b.per_minute.to_string(),
                );
                put(format!("anthropic-ratelimit-{what}-remaining"), remaining);
            }
            Shape::OpenAi | Shape::Azure => {
                let what = match b.counts {
                    Counts::Requests => "requests",
                    _ => "tokens",
                };
                put(
                    format!("x-ratelimit-limit-{what}"),
                    b.per_minute.to_string(),
                );
                put(format!("x-ratelimit-remaining-{what}"), remaining);
                put(format!("x-ratelimit-reset-{what}"), millis(full_in));
            }
        }
    }
}

fn error(status: u16, body: Value, headers: HeaderMap) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, headers, Json(body)).into_response()
}

async fn completions(State(s): State<Arc<Inner>>, Json(req): Json<Value>) -> Response {
    s.stats.requests.fetch_add(1, Ordering::SeqCst);
    if s.down.load(Ordering::SeqCst) {
        s.stats.unavailable.fetch_add(1, Ordering::SeqCst);
        let body = json!({"error": {"message": "The server is temporarily unavailable.", "type": "server_error", "param": null, "code": null}});
        return error(503, body, HeaderMap::new());
    }
    let max_tokens = req
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(1_000);
    let prompt_chars: usize = req
        .get("messages")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|x| x.get("content").and_then(Value::as_str))
                .map(str::len)
                .sum()
        })
        .unwrap_or(0);
    let prompt = prompt_chars as u64 / 4;
    if let Some(model) = req.get("model").and_then(Value::as_str) {
        *s.stats
            .models
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(model.to_owned())
            .or_default() += 1;
    }
    if let Some(max) = s.cfg.max_context {
        let asked = prompt.saturating_add(max_tokens);
        if asked > max {
            s.stats.too_long.fetch_add(1, Ordering::SeqCst);
            let body = json!({"error": {
                "message": format!("This model's maximum context length is {max} tokens. However, you requested {asked} tokens ({prompt} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion."),
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}});
            return error(400, body, HeaderMap::new());
        }
    }
    let amount = |c: Counts| match c {
        Counts::Requests => 1.0,
        Counts::Tokens => prompt.saturating_add(max_tokens) as f64,
        Counts::Input => prompt as f64,
        Counts::Output => max_tokens as f64,
    };
    let mut headers = HeaderMap::new();
    {
        let mut b = s.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for x in b.iter_mut() {
            x.refill(now);
        }
        if s.cfg.spent_before_first_request && !s.seen.swap(true, Ordering::SeqCst) {
            for x in b.iter_mut().filter(|x| x.counts != Counts::Requests) {
                x.level = 0.0;
            }
        }
        let short = b
            .iter()
            .find(|x| x.level < amount(x.counts))
            .map(|x| x.counts);
        if let Some(which) = short {
            let wait = b
                .iter()
                .map(|x| x.secs_until(amount(x.counts)))
                .fold(0.0, f64::max);
            rate_headers(&mut headers, s.cfg.shape, &b);
            drop(b);
            s.stats.throttled.fetch_add(1, Ordering::SeqCst);
            if let Ok(v) = HeaderValue::from_str(&format!("{}", (wait * 1000.0).ceil() as u64)) {
                headers.insert("retry-after-ms", v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("{}", wait.ceil() as u64)) {
                headers.insert("retry-after", v);
            }
            let body = match s.cfg.shape {
                Shape::Anthropic { .. } => {
                    json!({"type": "error", "error": {"type": "rate_limit_error",
                    "message": format!("This request would exceed the rate limit for your organization of {which:?} per minute. Please try again later.")}})
                }
                _ => json!({"error": {
                    "message": format!("Rate limit reached for gpt-4o-mini in organization org-mock on {which:?} per min: Limit {}, Requested {}. Please try again in {}.",
                        s.cfg.tokens_per_minute, amount(which) as u64, millis(wait)),
                    "type": "tokens", "param": null, "code": "rate_limit_exceeded"}}),
            };
            return error(429, body, headers);
        }
        for x in b.iter_mut() {
            x.level -= amount(x.counts);
        }
        rate_headers(&mut headers, s.cfg.shape, &b);
    }
    let roll: f64 = s.rng.lock().unwrap_or_else(|e| e.into_inner()).random();
    let real = Duration::from_secs_f64(s.cfg.service_time.as_secs_f64() / s.cfg.time_scale);
    if roll < s.cfg.overloaded_rate {
        s.stats.overloaded.fetch_add(1, Ordering::SeqCst);
        let body = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        return error(529, body, headers);
    }
    if roll < s.cfg.overloaded_rate + s.cfg.server_error_rate {
        s.stats.server_errors.fetch_add(1, Ordering::SeqCst);
        let body = json!({"error": {"message": "The server had an error while processing your request. Sorry about that!", "type": "server_error", "param": null, "code": null}});
        return error(500, body, headers);
    }
    let (slow, midstream) = {
        let mut rng = s.rng.lock().unwrap_or_else(|e| e.into_inner());
        (
            rng.random::<f64>() < s.cfg.slow_first_byte_rate,
            rng.random::<f64>() < s.cfg.midstream_error_rate,
        )
    };
    let first_byte_delay = if slow {
        Duration::from_secs_f64(s.cfg.slow_first_byte.as_secs_f64() / s.cfg.time_scale)
    } else {
        Duration::ZERO
    };
    let completion = (max_tokens as f64 * s.cfg.completion_share).round() as u64;
    if req.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        return stream(
            s,
            req,
            prompt,
            completion,
            max_tokens - completion.min(max_tokens),
            headers,
            real,
            first_byte_delay,
            midstream,
        );
    }
    tokio::time::sleep(real + first_byte_delay).await;
    if midstream {
        // The body is cut half-way: the client sees a broken response, not a 200.
        s.stats.midstream_errors.fetch_add(1, Ordering::SeqCst);
        let parts: Vec<Result<String, std::io::Error>> = vec![
            Ok("{\"id\": \"chatcmpl-mock\", \"choices\": [".into()),
            Err(std::io::Error::other("connection reset mid-body")),
        ];
        return (
            StatusCode::OK,
            headers,
            axum::body::Body::from_stream(futures::stream::iter(parts)),
        )
            .into_response();
    }
    s.stats.completed.fetch_add(1, Ordering::SeqCst);
    s.stats
        .tokens
        .fetch_add(prompt + completion, Ordering::SeqCst);
    give_back(&s, max_tokens - completion.min(max_tokens));
    let model = req.get("model").cloned().unwrap_or(json!("gpt-4o-mini"));
    let body = match s.cfg.shape {
        Shape::Anthropic { .. } => json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "Plan de clase: el ciclo del agua…"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": prompt, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": completion}
        }),
        _ => json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000u64,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Plan de clase: el ciclo del agua…"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        }),
    };
    (StatusCode::OK, headers, Json(body)).into_response()
}

/// An SSE answer: `chunks` deltas spread over the service time, the last one
/// with `usage` (as OpenAI sends with `stream_options.include_usage`), then
/// `data: [DONE]` — or an `event: error` a third of the way.
#[allow(clippy::too_many_arguments)]
fn stream(
    s: Arc<Inner>,
    req: Value,
    prompt: u64,
    max_tokens: u64,
    unused: u64,
    mut headers: HeaderMap,
    service: Duration,
    first_byte_delay: Duration,
    fail: bool,
) -> Response {
    let chunks = s.cfg.chunks.max(1);
    let gap = service / chunks;
    let model = req.get("model").cloned().unwrap_or(json!("gpt-4o-mini"));
    let body = futures::stream::unfold(0u32, move |i| {
        let s = s.clone();
        let model = model.clone();
        async move {
            if i > chunks {
                return None;
            }
            tokio::time::sleep(if i == 0 { first_byte_delay + gap } else { gap }).await;
            let text = if fail && i == chunks / 3 {
                s.stats.midstream_errors.fetch_add(1, Ordering::SeqCst);
                let err = json!({"error": {"message": "The server had an error while streaming.", "type": "server_error", "param": null, "code": null}});
                return Some((
                    Ok::<_, std::io::Error>(format!("event: error\ndata: {err}\n\n")),
                    chunks + 1,
                ));
            } else if i == chunks {
                s.stats.completed.fetch_add(1, Ordering::SeqCst);
                give_back(&s, unused);
                s.stats
                    .tokens
                    .fetch_add(prompt + max_tokens, Ordering::SeqCst);
                let last = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": model, "choices": [],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": max_tokens, "total_tokens": prompt + max_tokens}});
                format!("data: {last}\n\ndata: [DONE]\n\n")
            } else {
                let delta = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": model,
                    "choices": [{"index": 0, "delta": {"content": "agua "}}]});
                format!("data: {delta}\n\n")
            };
            Some((Ok(text), i + 1))
        }
    });
    headers.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    (StatusCode::OK, headers, axum::body::Body::from_stream(body)).into_response()
}

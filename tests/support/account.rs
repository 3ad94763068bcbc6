//! A simulated LLM provider account over HTTP types (in process, tokio
//! time): buckets for requests, all tokens, input tokens not read from the
//! cache and output tokens, each of a capacity refilling at its per-minute
//! rate; a request is admitted when it fits every bucket, charged the way
//! providers count (output at `max_tokens` on arrival, the unused part given
//! back when the answer ends), and answered with `usage` and the provider's
//! rate-limit headers — or a 429.

// Shared by several test files; each uses a part.
#![allow(dead_code)]

use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    Requests,
    /// Input (cached or not) + output.
    Tokens,
    /// Input not read from the cache.
    Input,
    Output,
}

#[derive(Debug)]
struct Bucket {
    /// The model whose requests it counts; `None`: every request.
    model: Option<String>,
    counts: Counts,
    capacity: f64,
    per_sec: f64,
    level: f64,
    at: Instant,
    /// Most charged at once over the run, as (instant, amount) admissions.
    charged: Vec<(Instant, f64)>,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        self.level = (self.level + (now - self.at).as_secs_f64() * self.per_sec).min(self.capacity);
        self.at = now;
    }
}

/// The shape of the answer's usage and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `prompt_tokens` / `completion_tokens` / `prompt_tokens_details.cached_tokens`, `x-ratelimit-*`.
    OpenAi,
    /// `input_tokens` / `cache_read_input_tokens` / `output_tokens`, `anthropic-ratelimit-*`.
    Anthropic,
}

#[derive(Debug, Clone)]
pub struct Account {
    inner: Arc<Mutex<Books>>,
    pub service_time: Duration,
    pub shape: Shape,
    /// Share of each prompt served from the cache.
    pub cached_share: f64,
    /// Share of `max_tokens` each answer uses.
    pub output_share: f64,
}

#[derive(Debug)]
struct Books {
    buckets: Vec<Bucket>,
    accepted: usize,
    throttled: usize,
    /// Characters per billed prompt token (rounded up).
    chars_per_token: f64,
    /// Admissions per model: (instant, model).
    admitted: Vec<(Instant, String)>,
}

/// What one request costs the provider.
#[derive(Debug, Clone, Copy)]
struct Charge {
    input: f64,
    cached: f64,
    output: f64,
}

impl Charge {
    fn amount(&self, c: Counts) -> f64 {
        match c {
            Counts::Requests => 1.0,
            Counts::Tokens => self.input + self.cached + self.output,
            Counts::Input => self.input,
            Counts::Output => self.output,
        }
    }
}

impl Account {
    /// Buckets of `(counts, capacity, per minute)`.
    pub fn new(shape: Shape, buckets: &[(Counts, u64, u64)], service_time: Duration) -> Self {
        let scoped: Vec<_> = buckets
            .iter()
            .map(|&(c, cap, n)| (None, c, cap, n))
            .collect();
        Account::per_model(shape, &scoped, service_time)
    }

    /// Buckets of `(model, counts, capacity, per minute)`: a bucket with a
    /// model counts only that model's requests.
    pub fn per_model(
        shape: Shape,
        buckets: &[(Option<&str>, Counts, u64, u64)],
        service_time: Duration,
    ) -> Self {
        let now = Instant::now();
        Account {
            inner: Arc::new(Mutex::new(Books {
                buckets: buckets
                    .iter()
                    .map(|&(model, counts, capacity, per_minute)| Bucket {
                        model: model.map(str::to_owned),
                        counts,
                        capacity: capacity as f64,
                        per_sec: per_minute as f64 / 60.0,
                        level: capacity as f64,
                        at: now,
                        charged: Vec::new(),
                    })
                    .collect(),
                accepted: 0,
                throttled: 0,
                chars_per_token: 4.0,
                admitted: Vec::new(),
            })),
            service_time,
            shape,
            cached_share: 0.0,
            output_share: 1.0,
        }
    }

    /// Bills each prompt `ceil(chars / ratio)` tokens from now on (4.0 at first).
    pub fn set_chars_per_token(&self, ratio: f64) {
        self.inner.lock().unwrap().chars_per_token = ratio;
    }

    /// When each call of `model` was admitted.
    pub fn admitted(&self, model: &str) -> Vec<Instant> {
        let b = self.inner.lock().unwrap();
        b.admitted
            .iter()
            .filter(|(_, m)| m == model)
            .map(|(t, _)| *t)
            .collect()
    }

    pub fn accepted(&self) -> usize {
        self.inner.lock().unwrap().accepted
    }

    pub fn throttled(&self) -> usize {
        self.inner.lock().unwrap().throttled
    }

    /// Units of `counts` charged (net of give-backs) over the run.
    pub fn charged(&self, counts: Counts) -> f64 {
        let b = self.inner.lock().unwrap();
        b.buckets
            .iter()
            .filter(|x| x.counts == counts)
            .map(|x| x.charged.iter().map(|(_, n)| n).sum::<f64>())
            .next()
            .unwrap_or(0.0)
    }

    /// The headers of the buckets counting `model`'s requests: its own, and
    /// the unscoped ones of a kind it has none of.
    fn headers(&self, b: &Books, model: &str, out: &mut http::response::Builder) {
        let own = |c: Counts| {
            b.buckets
                .iter()
                .any(|x| x.counts == c && x.model.as_deref() == Some(model))
        };
        for bucket in &b.buckets {
            let shown = match &bucket.model {
                Some(m) => m == model,
                None => !own(bucket.counts),
            };
            if !shown {
                continue;
            }
            let (limit, remaining) = match (self.shape, bucket.counts) {
                (Shape::OpenAi, Counts::Requests) => (
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                ),
                (Shape::OpenAi, _) => ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens"),
                (Shape::Anthropic, Counts::Requests) => (
                    "anthropic-ratelimit-requests-limit",
                    "anthropic-ratelimit-requests-remaining",
                ),
                (Shape::Anthropic, Counts::Input) => (
                    "anthropic-ratelimit-input-tokens-limit",
                    "anthropic-ratelimit-input-tokens-remaining",
                ),
                (Shape::Anthropic, Counts::Output) => (
                    "anthropic-ratelimit-output-tokens-limit",
                    "anthropic-ratelimit-output-tokens-remaining",
                ),
                (Shape::Anthropic, Counts::Tokens) => (
                    "anthropic-ratelimit-tokens-limit",
                    "anthropic-ratelimit-tokens-remaining",
                ),
            };
            // The per-minute limit, as providers announce it.
            let per_minute = (bucket.per_sec * 60.0).round() as u64;
            let o = std::mem::take(out);
            *out = o.header(limit, per_minute.to_string()).header(
                remaining,
                (bucket.level.max(0.0).floor() as u64).to_string(),
            );
        }
    }

    /// The provider as a tower service.
    pub fn service(
        &self,
    ) -> impl tower::Service<
        http::Request<Bytes>,
        Response = http::Response<Bytes>,
        Error = std::io::Error,
        Future = impl std::future::Future<Output = Result<http::Response<Bytes>, std::io::Error>> + Send,
    > + Clone
           + Send {
        let me = self.clone();
        tower::service_fn(move |req: http::Request<Bytes>| {
            let me = me.clone();
            async move {
                let body: serde_json::Value =
                    serde_json::from_slice(req.body()).map_err(std::io::Error::other)?;
                let chars: usize = body["messages"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(|m| m["content"].as_str())
                            .map(|s| s.chars().count())
                            .sum()
                    })
                    .unwrap_or(0);
                let model = body["model"].as_str().unwrap_or("").to_owned();
                let ratio = me.inner.lock().unwrap().chars_per_token;
                let prompt = (chars as f64 / ratio).ceil();
                let max_tokens = body["max_tokens"].as_u64().unwrap_or(0) as f64;
                let cached = (prompt * me.cached_share).floor();
                let asked = Charge {
                    input: prompt - cached,
                    cached,
                    output: max_tokens,
                };
                let now = Instant::now();
                let admitted = {
                    let mut b = me.inner.lock().unwrap();
                    for bucket in &mut b.buckets {
                        bucket.refill(now);
                    }
                    let counts = |x: &Bucket| x.model.as_deref().is_none_or(|m| m == model);
                    let fits = b
                        .buckets
                        .iter()
                        .filter(|x| counts(x))
                        .all(|x| x.level >= asked.amount(x.counts));
                    if fits {
                        for x in b.buckets.iter_mut().filter(|x| counts(x)) {
                            let n = asked.amount(x.counts);
                            x.level -= n;
                            x.charged.push((now, n));
                        }
                        b.accepted += 1;
                        b.admitted.push((now, model.clone()));
                    } else {
                        b.throttled += 1;
                    }
                    fits
                };
                if !admitted {
                    let b = me.inner.lock().unwrap();
                    let mut out = http::Response::builder()
                        .status(429)
                        .header("retry-after", "1");
                    me.headers(&b, &model, &mut out);
                    return Ok(out
                        .body(Bytes::from_static(
                            br#"{"error":{"type":"rate_limit_error","message":"rate limited"}}"#,
                        ))
                        .expect("a response"));
                }
                tokio::time::sleep(me.service_time).await;
                let used = (max_tokens * me.output_share).floor();
                let now = Instant::now();
                let mut b = me.inner.lock().unwrap();
                // The unused output is given back at the end.
                let back = Charge {
                    input: 0.0,
                    cached: 0.0,
                    output: max_tokens - used,
                };
                for x in &mut b.buckets {
                    x.refill(now);
                    if x.model.as_deref().is_some_and(|m| m != model) {
                        continue;
                    }
                    let n = back.amount(x.counts);
                    if x.counts != Counts::Requests && n > 0.0 {
                        x.level = (x.level + n).min(x.capacity);
                        x.charged.push((now, -n));
                    }
                }
                let (input, cached, output) =
                    (asked.input as u64, asked.cached as u64, used as u64);
                let usage = match me.shape {
                    Shape::OpenAi => format!(
                        r#"{{"usage":{{"prompt_tokens":{},"completion_tokens":{output},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{cached}}}}}}}"#,
                        input + cached,
                        input + cached + output
                    ),
                    Shape::Anthropic => format!(
                        r#"{{"type":"message","usage":{{"input_tokens":{input},"cache_creation_input_tokens":0,"cache_read_input_tokens":{cached},"output_tokens":{output}}}}}"#
                    ),
                };
                let mut out = http::Response::builder().status(200);
                me.headers(&b, &model, &mut out);
                Ok(out.body(Bytes::from(usage)).expect("a response"))
            }
        })
    }
}

//! The LLM client preset: every layer in the right order, configured for an
//! OpenAI-compatible API, an Azure OpenAI deployment, an Anthropic account or
//! a Gemini project ([`Profile`], feature `llm`).
//!
//! ```text
//! shutdown → fallback → cache → coalesce → quota → bulkhead → retry (with budget) → breaker → pace → attempt timeout → your HTTP client
//! ```
//!
//! Why this order (and what breaks if you change it):
//! - **shutdown outermost**, so draining sees every call and refuses new ones
//!   before they queue anywhere.
//! - **fallback next** (off unless [`LlmStackBuilder::stale_if_error`]): a
//!   failure is answered with the cache's last good answer for the same
//!   request. Outside the cache and every layer that counts, so a fallback
//!   answer is never cached and never a success for the breaker, the pacer
//!   or the metrics (they saw the failure).
//! - **cache, then coalesce** (both off unless [`LlmStackBuilder::cache`] /
//!   [`LlmStackBuilder::coalesce`] are set; whole answers only, a stream goes
//!   around them): a cached answer, or the answer of an identical request in
//!   flight, costs no quota, waits in no line and spends no token. The
//!   cache outside the singleflight: 50 identical misses at once are one
//!   call, stored once. Inside the quota, every hit would spend a user's
//!   quota; inside the pacer, every coalesced caller would reserve tokens
//!   for a call it never makes. Which requests are the same: [`LlmKey`]
//!   (identical deterministic requests of one credential by default). The
//!   request's key is one more read of its body (a JSON tree for the
//!   canonical form), only with a cache or coalescing on.
//! - **quota next** (off unless [`LlmStackBuilder::quota`] is set): a user over
//!   their quota is refused at once, before taking a place in line or a token of
//!   the shared budget.
//! - **bulkhead next**: it bounds concurrency across retries — a retry
//!   waits in the same line instead of adding a call. Inside retry, every retry
//!   would take a fresh slot and a failing upstream would see 3× the concurrency.
//! - **retry outside the breaker**: the breaker sees every attempt; an open
//!   breaker's refusal (`CircuitOpen`, with a retry-after) is what retry reads to
//!   stop. Inside the breaker, one logical call would be one outcome and a dying
//!   upstream would take 3× longer to trip it.
//! - **pace inside retry**: every attempt pays for its tokens. Outside, retries
//!   would be free and would blow the tokens-per-minute budget exactly when the
//!   upstream is already saying 429.
//! - **timeout innermost**: it bounds one attempt. The whole call is bounded
//!   by a retry [`deadline`](crate::retry::RetryBuilder::deadline), which the
//!   default retry does not set: its waits add up (the bulkhead's line up to
//!   600 s, then per attempt the pacer's up to 600 s and the attempt's
//!   timeout, 4 attempts, backoffs up to 30 s). For a bound, give
//!   [`LlmStackBuilder::retry`] a retry with `.deadline(…)`, or put a timeout
//!   around the stack.
//!
//! The request is an `http::Request<Bytes>` with an OpenAI-, Anthropic- or
//! Gemini-style JSON body; the response an `http::Response<Bytes>`. The body
//! is read once per call ([`Prompt`]: model, prompt, `max_tokens`, `n`;
//! typed and borrowed, never a JSON tree). Each model is paced by a pacer of
//! its own ([`LlmStackBuilder::model`]: providers limit every model on its
//! own), under the limits all models share
//! ([`LlmStackBuilder::shared_limit`]). The cost — input: the prompt's
//! tokens from a [`TokenEstimator`] (by default [`CharsPerToken`], learning
//! each model's characters per token from the answers); output:
//! `max_tokens`; spend: both at the model's [`Price`] — is charged to the
//! profile's limits as each provider counts (see [`Profile`] and
//! [`Cost`](crate::pace::Cost)) and reconciled with the answer's
//! [`usage_cost`]. The pacer learns from `x-ratelimit-*` and
//! `anthropic-ratelimit-*` headers (announced limits
//! lower the configured ones; a 429 the headers explain syncs the bucket
//! instead of cutting the rate); results are classified by
//! [`LlmClassifier`](crate::classify::LlmClassifier). A
//! [`QueueTicket`](crate::bulkhead::QueueTicket) in the request's extensions
//! reports its place in line, with an ETA from the pacer's projected starts
//! (the preset makes its pacer the bulkhead's [`EtaSource`](crate::eta::EtaSource)). Every part can be replaced with one you built
//! (`.bulkhead(...)`, `.retry(...)`...), and switched off by giving a pass-through
//! configuration (e.g. `Retry` with one attempt, `Breaker::disable`).
//!
//! For streamed answers (`"stream": true`, SSE), [`LlmStack::stream_layer`] keeps
//! the bulkhead permit and the breaker's verdict until the body's last chunk (a
//! failure mid-stream counts as one: an `event: error`, or a `data:` payload
//! with an `error` object as vLLM and SGLang send), bounds the time to the
//! first chunk and the gaps between chunks, and reconciles the pacer with the
//! stream's usage (OpenAI's `stream_options.include_usage`, Anthropic's
//! `message_start` + `message_delta`). The events are read once, by one
//! [`SseParser`] in [`SseWatch`]. A stream is never retried once its headers
//! reached the caller.
//!
//! ```
//! use semaforo::llm::{LlmStack, Tier};
//! use bytes::Bytes;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 }).build()?;
//! let http_client = service_fn(|_req: http::Request<Bytes>| async {
//!     let body = r#"{"choices":[],"usage":{"total_tokens":12}}"#;
//!     Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(body.as_bytes())))
//! });
//! let mut llm = ServiceBuilder::new().layer(stack.layer()).service(http_client);
//! let req = http::Request::post("/v1/chat/completions")
//!     .body(Bytes::from_static(br#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hola"}]}"#))?;
//! let res = llm.ready().await?.call(req).await?;
//! assert_eq!(res.status(), 200);
//! # Ok(()) }
//! ```

use crate::backoff::{Backoff, Jitter};
use crate::breaker::Breaker;
use crate::bulkhead::Bulkhead;
use crate::error::ConfigError;
use crate::observe::{Event, ListenerSlot};
use crate::pace::{KeyedPace, Limit, Pace, PaceBuilder, Unit};
use crate::quota::{HeaderKey, PlanId, Quota, QuotaLayer, UnitCost};
use crate::retry::Retry;
use crate::shutdown::Shutdown;
use crate::timeout::Timeout;

mod cost;
mod key;
mod model;
mod price;
mod profile;
mod prompt;
mod router;
mod service;
mod sse;
#[cfg(feature = "tiktoken")]
mod tiktoken;

pub use cost::{
    estimate_cost, estimate_cost_with, usage_cost, usage_tokens, DEFAULT_MAX_OUTPUT,
    NON_TEXT_PART_TOKENS,
};
pub use key::{LlmKey, LlmRequestKey};
pub use model::ModelField;
pub use price::{Price, PriceTable, DEFAULT_PRICES_DATE};
pub use profile::Profile;
pub use prompt::{CharsPerToken, Prompt, TokenEstimator};
pub use router::{
    LlmDeployment, LlmDeploymentFuture, LlmDeploymentService, LlmRouter, LlmRouterBody,
    LlmRouterBuilder, LlmStreamRouter,
};
pub use service::{
    observe_headers, observe_response, Estimate, LlmFuture, LlmLayer, LlmService, LlmStreamBody,
    LlmStreamFuture, LlmStreamLayer, LlmStreamService, ObserveHeaders, PricedUsage,
};
pub use sse::{
    SseEvent, SseParser, SseScan, SseWatch, StreamFailed, WatchFuture, DEFAULT_MAX_LINE,
};
#[cfg(feature = "tiktoken")]
pub use tiktoken::Tiktoken;

/// A provider tier: the limits of your API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// Requests per minute (RPM).
    pub requests_per_minute: u64,
    /// Tokens per minute (TPM).
    pub tokens_per_minute: u64,
}

/// The preset's parts. Build with [`LlmStack::openai`],
/// [`LlmStack::anthropic`], [`LlmStack::azure_openai`],
/// [`LlmStack::gemini`] or [`LlmStack::with_profile`]; read each part with
/// its getter (to watch it, or to register it with a
/// [`Health`](crate::health::Health)). The parts are fixed at `build()`
/// (the shutdown is wired to the bulkhead's and the pacer's lines, and the
/// pacer is the bulkhead's ETA source): give a part of your own to the
/// builder instead.
#[derive(Debug, Clone)]
pub struct LlmStack {
    /// The pacer's estimate of a request.
    weigh: service::Weigh,
    shutdown: Shutdown,
    quota: Option<(Quota<String>, HeaderKey)>,
    bulkhead: Bulkhead,
    retry: Retry,
    breaker: Breaker,
    pace: KeyedPace,
    timeout: Timeout,
    stream_timeout: Timeout,
    /// The answer cache (a pass-through layer without one).
    cache: service::LlmCacheLayer,
    /// Singleflight of identical requests (a pass-through layer when off).
    coalesce: service::LlmCoalesceLayer,
    /// The cache tier shared by a fleet (a pass-through layer without one).
    tier: service::LlmTierLayer,
    /// The last good answer on failure (a pass-through layer without
    /// `stale_if_error`).
    fallback: service::LlmFallbackLayer,
}

/// The preset's answer cache: keyed by [`LlmRequestKey`], keeping whole
/// answers ([`KeptResponse`](crate::share::KeptResponse)). Build one with
/// [`Cache::builder`](crate::cache::Cache::builder) and give it to
/// [`LlmStackBuilder::cache`].
pub type LlmCache = crate::cache::Cache<LlmRequestKey, std::sync::Arc<crate::share::KeptResponse>>;

impl LlmStack {
    /// The answer cache, if the stack has one.
    pub fn cache(&self) -> Option<&LlmCache> {
        self.cache.cache()
    }

    /// Graceful shutdown; it closes the bulkhead's and the pacer's lines when triggered.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// The per-user quota and the header it is keyed by, if one was given.
    pub fn quota(&self) -> Option<&Quota<String>> {
        self.quota.as_ref().map(|(q, _)| q)
    }

    /// Concurrency and the fair line.
    pub fn bulkhead(&self) -> &Bulkhead {
        &self.bulkhead
    }

    /// Classified retry with its budget.
    pub fn retry(&self) -> &Retry {
        &self.retry
    }

    /// The circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The pacer, one per model (the request's `model` field): the
    /// profile given for that model with [`LlmStackBuilder::model`], else
    /// the stack's profile (RPM and TPM for OpenAI; RPM, ITPM and OTPM for
    /// Anthropic…); requests without a model share the overflow pacer
    /// ([`KeyedPace::overflow`]). Read one model's with
    /// [`KeyedPace::peek`], every one with [`KeyedPace::pacers`].
    pub fn pace(&self) -> &KeyedPace {
        &self.pace
    }

    /// The estimator of the prompts' tokens. To read what a
    /// [`CharsPerToken`] learned, keep an `Arc` of it and give the builder
    /// a clone ([`LlmStackBuilder::estimator`] takes any
    /// `Arc<T: TokenEstimator>`).
    pub fn estimator(&self) -> &std::sync::Arc<dyn TokenEstimator> {
        &self.weigh.estimator
    }

    /// The stack's estimate of a request (input, output and spend, as its
    /// own pacer reserves them), for a pacer of your own around the stack;
    /// [`budget_layer`](Self::budget_layer) puts it in one.
    pub fn estimate(&self) -> Estimate {
        self.weigh.clone()
    }

    /// A budget of your own around the stack's [`layer`](Self::layer) —
    /// dollars a day per user, keyed by a request header — as the stack's
    /// own pacer does it: each call reserves its [`estimate`](Self::estimate)
    /// on the pacer of its key and is reconciled with its priced usage
    /// ([`PricedUsage`]); a call that failed is billed nothing (a 429 gives
    /// back everything) — a streamed answer that fails after its headers is
    /// cut short and keeps its estimate, as in
    /// [`stream_budget_layer`](Self::stream_budget_layer). Requests without the header share the budget of
    /// the overflow pacer; keep `max_keys` at least the users active in one
    /// window of the budget (idle keys give their place).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use semaforo::llm::{LlmStack, Price, PriceTable, Tier};
    /// use semaforo::pace::{KeyedPace, Limit, Pace};
    /// use tower::{service_fn, ServiceBuilder, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), semaforo::BoxError> {
    /// let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 10_000_000 })
    ///     .prices(PriceTable::new().price("m", Price::per_million_tokens(1.0, 0.5, 2.0)))
    ///     .build()?;
    /// // $1.00 a calendar day (UTC) for each value of `x-user-id`.
    /// let users = KeyedPace::builder(
    ///     Pace::builder().limit(Limit::spend_per_day(1_000_000).resets_daily("UTC")),
    /// )
    /// .max_keys(10_000)
    /// .build()?;
    /// let client = service_fn(|_req: http::Request<Bytes>| async {
    ///     let body = r#"{"usage":{"prompt_tokens":0,"completion_tokens":100000}}"#;
    ///     Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(body.as_bytes())))
    /// });
    /// let llm = ServiceBuilder::new()
    ///     .layer(stack.budget_layer(&users, http::HeaderName::from_static("x-user-id")))
    ///     .layer(stack.layer())
    ///     .service(client);
    /// let call = || {
    ///     http::Request::post("/v1/chat/completions")
    ///         .header("x-user-id", "ana")
    ///         .body(Bytes::from_static(br#"{"model":"m","max_tokens":100000,"messages":[]}"#))
    /// };
    /// for _ in 0..5 {
    ///     llm.clone().oneshot(call()?).await?; // $0.20 each
    /// }
    /// let refused = llm.clone().oneshot(call()?).await.unwrap_err();
    /// let r = semaforo::Rejected::from_box(&refused).unwrap();
    /// assert_eq!(r.kind(), semaforo::RejectKind::BudgetExceeded);
    /// assert!(r.retry_after().is_some()); // until midnight UTC
    /// # Ok(()) }
    /// ```
    pub fn budget_layer<K>(
        &self,
        budget: &KeyedPace,
        key: K,
    ) -> crate::pace::KeyedPaceLayer<K, Estimate, PricedUsage, crate::classify::LlmClassifier> {
        budget
            .layer()
            .key(key)
            .weigh(self.estimate())
            .observe(PricedUsage)
            .classify(crate::classify::LlmClassifier::new())
    }

    /// [`budget_layer`](Self::budget_layer) around the stack's
    /// [`stream_layer`](Self::stream_layer): a streamed answer is reconciled
    /// when its body ends whole (cut short, its estimate stands).
    pub fn stream_budget_layer<K>(
        &self,
        budget: &KeyedPace,
        key: K,
    ) -> crate::pace::KeyedPaceLayer<
        K,
        Estimate,
        ObserveHeaders,
        crate::classify::LlmHeadClassifier,
        crate::pace::UsageFromBody,
    > {
        budget
            .layer()
            .key(key)
            .weigh(self.estimate())
            .observe(ObserveHeaders)
            .classify(crate::classify::LlmHeadClassifier)
            .deliver(crate::pace::UsageFromBody)
    }

    /// Registers every part with `health` under `name`: the bulkhead, the
    /// breaker, the pacer of every model ([`Health::keyed_pace`](crate::health::Health::keyed_pace))
    /// and the quota and the cache, if there are. Build `health` from this stack's
    /// [`shutdown`](Self::shutdown) (the same one for every stack of a
    /// process: [`LlmStackBuilder::shutdown`]).
    ///
    /// ```
    /// use semaforo::health::Health;
    /// use semaforo::llm::{LlmStack, Tier};
    ///
    /// let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 }).build()?;
    /// let health = stack.register_health(Health::new(stack.shutdown()), "openai");
    /// let names: Vec<String> = health.report().components.into_iter().map(|c| c.name).collect();
    /// assert_eq!(names, ["openai", "openai", "openai#overflow"]);
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn register_health(
        &self,
        health: crate::health::Health,
        name: &str,
    ) -> crate::health::Health {
        let h = health
            .bulkhead(name, &self.bulkhead)
            .breaker(name, &self.breaker)
            .keyed_pace(name, &self.pace);
        let h = match self.quota() {
            Some(q) => h.quota(name, q),
            None => h,
        };
        match self.cache() {
            Some(c) => h.cache(name, c),
            None => h,
        }
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> &Timeout {
        &self.timeout
    }

    /// The timeouts of streamed answers: to the headers, to the first chunk,
    /// between chunks.
    pub fn stream_timeout(&self) -> &Timeout {
        &self.stream_timeout
    }
}

/// Builder for [`LlmStack`].
#[derive(Debug)]
#[must_use = "call .build() to get an LlmStack"]
pub struct LlmStackBuilder {
    name: String,
    profile: Profile,
    time_scale: f64,
    shutdown: Option<Shutdown>,
    quota: Option<(Quota<String>, HeaderKey)>,
    bulkhead: Option<Bulkhead>,
    adaptive: Option<(u32, crate::bulkhead::Limit)>,
    retry: Option<Retry>,
    breaker: Option<Breaker>,
    pace: Option<KeyedPace>,
    models: Vec<(String, Profile)>,
    shared: Vec<Limit>,
    estimator: Option<std::sync::Arc<dyn TokenEstimator>>,
    prices: PriceTable,
    timeout: Option<Timeout>,
    stream_timeout: Option<Timeout>,
    listener: ListenerSlot,
    cache: Option<LlmCache>,
    coalesce: bool,
    key: LlmKey,
    tier: Option<std::sync::Arc<dyn crate::cache::RemoteTier>>,
    stale_if_error: bool,
}

impl LlmStack {
    /// Defaults for an OpenAI-compatible API on `tier`: 8 concurrent calls and a
    /// line of 1,000 (waiting at most 10 min); 4 attempts with full-jitter backoff
    /// from 1 s (Retry-After honoured up to 60 s), a 20 % retry budget; a breaker
    /// opening after 5 consecutive upstream failures for 30 s; the tier's RPM and
    /// TPM paced with a 10 min `max_wait` (the token burst keeps 5 % headroom);
    /// 120 s per attempt.
    pub fn openai(tier: Tier) -> LlmStackBuilder {
        LlmStack::with_profile(Profile::openai(tier))
    }

    /// The same defaults for an Anthropic account: `rpm` requests, `itpm`
    /// input tokens (not read from the cache) and `otpm` output tokens per
    /// minute (see [`Profile::anthropic`]).
    pub fn anthropic(rpm: u64, itpm: u64, otpm: u64) -> LlmStackBuilder {
        LlmStack::with_profile(Profile::anthropic(rpm, itpm, otpm))
    }

    /// The same defaults for a Gemini API model: `rpm` requests and `tpm`
    /// input tokens per minute, `rpd` requests per day reset at midnight
    /// Pacific time (see [`Profile::gemini`]).
    pub fn gemini(rpm: u64, tpm: u64, rpd: u64) -> LlmStackBuilder {
        LlmStack::with_profile(Profile::gemini(rpm, tpm, rpd))
    }

    /// The same defaults for an Azure OpenAI deployment with
    /// `tokens_per_minute` of quota, paced over Azure's 10 s windows (see
    /// [`Profile::azure_openai`]).
    pub fn azure_openai(tokens_per_minute: u64) -> LlmStackBuilder {
        LlmStack::with_profile(Profile::azure_openai(tokens_per_minute))
    }

    /// The same defaults, pacing the limits of `profile` (named after its
    /// provider): every call must fit every limit, each call's output is
    /// reserved at its `max_tokens` (the profile's largest output when
    /// unset) and reconciled with the answer's `usage`, input read from the
    /// cache counted only where the provider counts it.
    pub fn with_profile(profile: Profile) -> LlmStackBuilder {
        LlmStackBuilder {
            name: profile.provider().into(),
            profile,
            time_scale: 1.0,
            shutdown: None,
            quota: None,
            bulkhead: None,
            adaptive: None,
            retry: None,
            breaker: None,
            pace: None,
            models: Vec::new(),
            shared: Vec::new(),
            estimator: None,
            prices: PriceTable::defaults(),
            timeout: None,
            stream_timeout: None,
            listener: ListenerSlot::default(),
            cache: None,
            coalesce: false,
            key: LlmKey::new(),
            tier: None,
            stale_if_error: false,
        }
    }

    /// The layer, in the order of the module docs.
    pub fn layer(&self) -> LlmLayer {
        LlmLayer {
            stack: self.clone(),
        }
    }

    fn quota_layer(&self) -> QuotaLayer<String, HeaderKey, UnitCost> {
        match &self.quota {
            Some((quota, key)) => quota.layer(key.clone()),
            None => QuotaLayer::pass_through(HeaderKey::new(
                http::HeaderName::from_static("x-api-key"),
                PlanId::FIRST,
            )),
        }
    }

    /// The layer for streamed answers (see the module docs). The client below
    /// answers `http::Response<B>` with **any** body `B: http_body::Body<Data =
    /// Bytes>` whose error converts into a [`BoxError`](crate::BoxError)
    /// (`http_body_util::Full`, `http_body_util::StreamBody`, hyper's
    /// `Incoming`, or `http_body_util::combinators::UnsyncBoxBody` when a client
    /// builds bodies of several kinds).
    /// The caller gets the same body wrapped: it holds the bulkhead permit,
    /// the breaker's verdict and the shutdown's in-flight count until its
    /// end, and ends with a [`StreamFailed`] error when the stream reports a
    /// failure. A drain waits for it; at the drain's deadline an event stream
    /// (`text/event-stream`) still open ends with
    /// [`DRAIN_EVENT`](crate::shutdown::DRAIN_EVENT), an SSE error event, and
    /// is counted `cancelled` (see
    /// [`ShutdownLayer::cut_bodies_at_deadline`](crate::shutdown::ShutdownLayer::cut_bodies_at_deadline)).
    ///
    /// A streamed completion, with an in-memory client:
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use semaforo::llm::{LlmStack, Tier};
    /// use tower::{service_fn, ServiceBuilder, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), semaforo::BoxError> {
    /// let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 }).build()?;
    /// let client = service_fn(|_req: http::Request<Bytes>| async {
    ///     let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"hola\"}}]}\n\n\
    ///                data: {\"usage\":{\"total_tokens\":12}}\n\ndata: [DONE]\n\n";
    ///     Ok::<_, std::io::Error>(http::Response::new(Full::new(Bytes::from(sse))))
    /// });
    /// let llm = ServiceBuilder::new().layer(stack.stream_layer()).service(client);
    /// let req = http::Request::post("/v1/chat/completions")
    ///     .body(Bytes::from_static(br#"{"model":"gpt-4o-mini","stream":true,"max_tokens":100,"messages":[]}"#))?;
    /// let res = llm.oneshot(req).await?;
    /// let text = res.into_body().collect().await?.to_bytes();
    /// assert!(text.ends_with(b"data: [DONE]\n\n"));
    /// # Ok(()) }
    /// ```
    ///
    /// With reqwest (its `stream` feature): the response's byte stream becomes
    /// the body.
    ///
    /// ```no_run
    /// use bytes::Bytes;
    /// use futures::TryStreamExt;
    /// use http_body_util::BodyExt as _;
    /// use semaforo::llm::{LlmStack, Tier};
    /// use tower::{service_fn, ServiceBuilder, ServiceExt};
    ///
    /// # async fn run() -> Result<(), semaforo::BoxError> {
    /// let http = reqwest::Client::new();
    /// let client = service_fn(move |req: http::Request<Bytes>| {
    ///     let http = http.clone();
    ///     async move {
    ///         let res = http
    ///             .post(format!("https://api.openai.com{}", req.uri().path()))
    ///             .bearer_auth(std::env::var("OPENAI_API_KEY")?)
    ///             .header("content-type", "application/json")
    ///             .body(req.into_body())
    ///             .send()
    ///             .await?;
    ///         let mut out = http::Response::builder().status(res.status().as_u16());
    ///         for (k, v) in res.headers() {
    ///             out = out.header(k.as_str(), v.as_bytes());
    ///         }
    ///         let frames = res.bytes_stream().map_ok(http_body::Frame::data);
    ///         // Any body of `Bytes` works; boxed, one type names every answer.
    ///         Ok::<_, semaforo::BoxError>(out.body(http_body_util::StreamBody::new(frames).boxed_unsync())?)
    ///     }
    /// });
    /// let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 }).build()?;
    /// let llm = ServiceBuilder::new().layer(stack.stream_layer()).service(client);
    /// let req = http::Request::post("/v1/chat/completions").body(Bytes::from_static(
    ///     br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hola"}]}"#,
    /// ))?;
    /// let mut body = llm.oneshot(req).await?.into_body();
    /// while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
    ///     if let Some(chunk) = frame?.data_ref() {
    ///         print!("{}", String::from_utf8_lossy(chunk));
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn stream_layer(&self) -> LlmStreamLayer {
        LlmStreamLayer {
            stack: self.clone(),
        }
    }
}

impl LlmStackBuilder {
    /// Names every part ("openai" by default) in errors.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Calls `f` for the events of every part this builder makes, and of the
    /// shutdown (parts given ready-made keep their own listeners); see
    /// [`observe`](crate::observe).
    /// Listeners add up: a second `on_event` keeps the first (both are called, in order).
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// Runs the default timings `factor` times faster (a mock provider whose
    /// "minute" lasts 6 s has a factor of 10). The limits then count per
    /// simulated minute: 60 RPM at a factor of 10 is 10 requests a real second.
    /// `build()` refuses a factor outside [0.001, 1,000,000] (or not finite).
    pub fn time_scale(mut self, factor: f64) -> Self {
        self.time_scale = factor;
        self
    }

    /// Uses this shutdown (e.g. the server's own) instead of a new one:
    /// give one `Shutdown` to every stack of a process, and the same to
    /// [`Health::new`](crate::health::Health::new), so one trigger drains
    /// them all and readiness and in-flight counts see every call.
    pub fn shutdown(mut self, s: Shutdown) -> Self {
        self.shutdown = Some(s);
        self
    }

    /// Adds a per-user quota, keyed by a request header (see [`HeaderKey`]).
    pub fn quota(mut self, quota: Quota<String>, key: HeaderKey) -> Self {
        self.quota = Some((quota, key));
        self
    }

    /// Replaces the bulkhead. The preset's bulkhead reads a request's
    /// [`Priority`](crate::bulkhead::Priority) and
    /// [`QueueTicket`](crate::bulkhead::QueueTicket) from its extensions,
    /// so a bulkhead built with
    /// [`min_share`](crate::bulkhead::BulkheadBuilder::min_share) keeps a
    /// class's share (interactive requests ahead of a batch backlog).
    pub fn bulkhead(mut self, b: Bulkhead) -> Self {
        self.bulkhead = Some(b);
        self
    }

    /// The preset's bulkhead with an adaptive limit: at most
    /// `max_concurrent` calls, the limit found by `limit` from the calls'
    /// latencies and drops (`529`, `5xx`, timeouts; `429`s are the pacer's
    /// and never lower it). For a streamed answer the sample is its time to
    /// first byte. Which to choose: [`Vegas`](crate::bulkhead::Vegas) when
    /// the upstream's latency grows with its load (a self-hosted model
    /// server); [`Aimd`](crate::bulkhead::Aimd) with a latency threshold
    /// when answers' lengths vary too much for a latency baseline (a hosted
    /// API: it then reacts to drops); [`Gradient2`](crate::bulkhead::Gradient2)
    /// between the two. Replaced by [`bulkhead`](Self::bulkhead) if both
    /// are given.
    pub fn adaptive_limit(
        mut self,
        max_concurrent: u32,
        limit: impl Into<crate::bulkhead::Limit>,
    ) -> Self {
        self.adaptive = Some((max_concurrent, limit.into()));
        self
    }

    /// Answers whole (not streamed) requests from `cache` while fresh, and
    /// keeps each successful answer (the [`LlmClassifier`](crate::classify::LlmClassifier)'s
    /// `Success`: a 2xx without an error body) — outside the quota, the
    /// bulkhead and the pacer, so a hit costs no quota, waits in no line
    /// and spends no tokens. Which requests are the same:
    /// [`cache_key`](Self::cache_key) (default [`LlmKey::new`]: identical
    /// deterministic requests of one credential). Streamed requests go
    /// around it.
    ///
    /// ```
    /// use semaforo::cache::Cache;
    /// use semaforo::llm::{LlmCache, LlmStack, Tier};
    /// use std::time::Duration;
    ///
    /// let cache: LlmCache = Cache::builder().ttl(Duration::from_secs(3_600)).max_bytes(256 << 20).build()?;
    /// let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 })
    ///     .cache(cache)
    ///     .coalesce(true)
    ///     .build()?;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn cache(mut self, cache: LlmCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Identical whole requests in flight at once make one call upstream;
    /// the others wait for its answer (see [`coalesce`](crate::coalesce)).
    /// Placed inside the cache and outside the quota: 50 identical misses
    /// at once are one call, one quota unit, one place in line. Keys:
    /// [`cache_key`](Self::cache_key). Default off.
    ///
    /// Streams: put a [`CoalesceLayer`](crate::coalesce::CoalesceLayer)
    /// sharing with [`FanOut`](crate::share::FanOut) around the
    /// [`stream_layer`](LlmStack::stream_layer) — identical streamed
    /// requests are then one call through the bulkhead, the pacer and the
    /// provider, and every caller reads the same chunks:
    ///
    /// ```
    /// use semaforo::coalesce::CoalesceLayer;
    /// use semaforo::llm::{LlmKey, LlmStack, Tier};
    /// use semaforo::share::FanOut;
    /// use tower::Layer;
    ///
    /// # fn main() -> Result<(), semaforo::BoxError> {
    /// let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 }).build()?;
    /// let client = tower::service_fn(|_req: http::Request<bytes::Bytes>| async {
    ///     Ok::<_, std::io::Error>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// });
    /// let llm = CoalesceLayer::new(LlmKey::new())
    ///     .share(FanOut::default()) // 1 MiB replay buffer for late joiners
    ///     .layer(stack.stream_layer().layer(client));
    /// # let _ = llm;
    /// # Ok(()) }
    /// ```
    pub fn coalesce(mut self, yes: bool) -> Self {
        self.coalesce = yes;
        self
    }

    /// Answers a failure with the cache's last good answer for the same
    /// request (stale-if-error, RFC 5861): a
    /// [`FallbackLayer`](crate::fallback::FallbackLayer) between the
    /// shutdown and the cache, on the
    /// [`StaleIfError`](crate::fallback::StaleIfError) rule (RFC 5861:
    /// `Overloaded`, `Infrastructure`, `Transient` — a 5xx, a timeout — an
    /// open breaker, a full line, a spent budget with a time; never a
    /// `Permanent` answer nor a quota's refusal), serving answers up to the
    /// cache's [`stale_for`](crate::cache::CacheBuilder::stale_for) past
    /// their TTL.
    /// The answer carries [`FellBack`](crate::fallback::FellBack) and
    /// [`Served::Cache`](crate::share::Served) (its age, `stale`) in its
    /// extensions, and an `age` header; it is never cached again and no
    /// layer inside counts it. A request with nothing kept gets the
    /// original failure. Default off.
    ///
    /// Only requests the cache keeps can be answered stale: by default
    /// those [`LlmKey`] gives a key, deterministic ones (`"temperature": 0`).
    /// For a last good answer to any request, sampled ones included, give
    /// [`cache_key(LlmKey::new().nondeterministic(true))`](Self::cache_key)
    /// (the fresh cache and coalescing then share sampled answers too).
    ///
    /// The retry inside honours a wait the upstream or the open breaker
    /// asks for up to its ceiling before the failure reaches the fallback:
    /// with this on, the preset's own retry caps it at 5 s instead of 60 s
    /// (a caller gets the stale answer now rather than a fresh one in 30 s);
    /// a [`retry`](Self::retry) of your own keeps its own ceiling.
    ///
    /// ```
    /// use semaforo::cache::Cache;
    /// use semaforo::llm::{LlmCache, LlmStack, Tier};
    /// use std::time::Duration;
    ///
    /// let cache: LlmCache = Cache::builder()
    ///     .ttl(Duration::from_secs(600))
    ///     .stale_for(Duration::from_secs(86_400)) // a day of last good answers
    ///     .build()?;
    /// let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 })
    ///     .cache(cache)
    ///     .stale_if_error(true)
    ///     .build()?;
    /// # let _ = stack;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn stale_if_error(mut self, yes: bool) -> Self {
        self.stale_if_error = yes;
        self
    }

    /// A cache tier shared by a fleet under the in-process cache (e.g.
    /// [`redis::CacheTier`](crate::redis::CacheTier)), in the order
    /// cache → coalesce → tier → quota: an instance's identical requests
    /// are one call to the tier, and across the fleet the first instance
    /// pays (its fill lock) while the others wait for its answer. A tier in
    /// trouble never fails a call. See [`TierLayer`](crate::cache::TierLayer).
    pub fn cache_tier(mut self, tier: impl crate::cache::RemoteTier) -> Self {
        self.tier = Some(std::sync::Arc::new(tier));
        self
    }

    /// Which requests the cache and coalescing treat as the same (default
    /// [`LlmKey::new`]).
    pub fn cache_key(mut self, key: LlmKey) -> Self {
        self.key = key;
        self
    }

    /// Replaces the retry policy (`max_attempts(1)` switches retries off).
    pub fn retry(mut self, r: Retry) -> Self {
        self.retry = Some(r);
        self
    }

    /// Replaces the breaker (`Breaker::disable` switches it off).
    pub fn breaker(mut self, b: Breaker) -> Self {
        self.breaker = Some(b);
        self
    }

    /// Replaces the pacer: a [`KeyedPace`] (one pacer per model, keyed by
    /// the request's `model`), or one [`Pace`] for every model. The profiles
    /// then only give each model's output reserved without `max_tokens`
    /// (capped at half the smallest burst counting output of the pacer that
    /// model goes through); give shared limits to your `KeyedPace`
    /// ([`KeyedPaceBuilder::shared`](crate::pace::KeyedPaceBuilder::shared)):
    /// `build()` refuses [`shared_limit`](Self::shared_limit) with it.
    pub fn pace(mut self, p: impl Into<KeyedPace>) -> Self {
        self.pace = Some(p.into());
        self
    }

    /// Paces the requests whose model is exactly `model` (the body's `model`
    /// field, or Gemini's path; a dated snapshot such as `gpt-4o-2024-08-06`
    /// is another model: give it too if it has these limits) by `profile`'s
    /// limits (and its output reserved without `max_tokens`), in a pacer of
    /// their own: providers limit each model on its own, and a model at its
    /// limit then holds back only its own callers. Every other model gets a
    /// pacer of its own with the stack's profile (up to 1,024 models; the
    /// rest, and requests without a model, share one more). A model given
    /// twice keeps the last profile.
    ///
    /// ```
    /// use semaforo::llm::{LlmStack, Profile, Tier};
    /// use semaforo::pace::Limit;
    ///
    /// let stack = LlmStack::openai(Tier { requests_per_minute: 500, tokens_per_minute: 30_000 })
    ///     .model("gpt-4o", Profile::openai(Tier { requests_per_minute: 5_000, tokens_per_minute: 450_000 }))
    ///     // The organisation's 600,000 tokens a minute, shared by every model.
    ///     .shared_limit(Limit::tokens_per_minute(600_000))
    ///     .build()?;
    /// assert!(stack.pace().peek("gpt-4o").is_some());
    /// assert!(stack.pace().shared().is_some());
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn model(mut self, model: impl Into<String>, profile: Profile) -> Self {
        let model = model.into();
        self.models.retain(|(m, _)| *m != model);
        self.models.push((model, profile));
        self
    }

    /// A limit every model's calls share (an org-wide TPM, a daily cap): a
    /// call reserves on it and on its model's limits at the same instant
    /// (see [`KeyedPaceBuilder::shared`](crate::pace::KeyedPaceBuilder::shared)).
    /// It is paced as given: the profiles keep 5 % headroom on their token
    /// limits, add `.headroom(5)` to yours for the same margin.
    pub fn shared_limit(mut self, limit: Limit) -> Self {
        self.shared.push(limit);
        self
    }

    /// Prices each call's model with `prices` (default:
    /// [`PriceTable::defaults`]): the spend a [`Limit::spend_per_day`]
    /// counts — per model when it is a limit of a profile (every model name,
    /// dated snapshots included, gets its own budget, as every limit of a
    /// profile), for the whole stack when it is a
    /// [`shared_limit`](Self::shared_limit). A call reserves its estimated
    /// spend (its prompt's estimate and its `max_tokens` at its model's
    /// prices: the output is an upper bound, the input an estimate) and is
    /// reconciled with the spend of its real usage — a debt above the
    /// estimate is owed in full; a call that failed (not a 429, which gives
    /// back everything) is billed nothing — but a streamed answer cut short
    /// after its headers (dropped, failed mid-way, timed out) keeps its
    /// estimate, as its tokens. A request whose model is not in
    /// the table costs nothing unless the table has a fallback.
    pub fn prices(mut self, prices: PriceTable) -> Self {
        self.prices = prices;
        self
    }

    /// Estimates the prompts' tokens with `estimator` (default:
    /// [`CharsPerToken`], learning each model's ratio from the answers).
    pub fn estimator(mut self, estimator: impl TokenEstimator) -> Self {
        self.estimator = Some(std::sync::Arc::new(estimator));
        self
    }

    /// Replaces the timeout.
    pub fn timeout(mut self, t: Timeout) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Replaces the timeout of streamed answers (use `first_chunk` and `idle`).
    pub fn stream_timeout(mut self, t: Timeout) -> Self {
        self.stream_timeout = Some(t);
        self
    }

    /// Builds the parts not given, and wires them: the shutdown closes the
    /// bulkhead's, the pacer's and the quota's lines; the pacer is the
    /// bulkhead's ETA source.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] on `time_scale` outside [0.001, 1,000,000] (or not
    /// finite), `shared_limit` given with a pacer of your own
    /// ([`pace`](Self::pace)), `stale_if_error` without a cache that keeps
    /// answers past their TTL, or the error of a part's builder (a tier of 0 requests or
    /// tokens per minute: the pacer's `limit`).
    pub fn build(self) -> Result<LlmStack, ConfigError> {
        let scale = self.time_scale;
        if !(MIN_SCALE..=MAX_SCALE).contains(&scale) {
            return Err(ConfigError::new(
                "llm stack",
                "time_scale",
                format!("must be in [{MIN_SCALE}, {MAX_SCALE}], got {scale}"),
            ));
        }
        let t = |secs: f64| crate::time::secs_f64(secs / scale);
        let name = self.name.as_str();
        let listener = self.listener.0.clone();
        // Passes the preset's listener to a part's builder.
        macro_rules! heard {
            ($builder:expr) => {
                match &listener {
                    Some(l) => {
                        let l = l.clone();
                        $builder.on_event(move |e: &Event<'_>| l(e))
                    }
                    None => $builder,
                }
            };
        }
        let bulkhead = match (self.bulkhead, self.adaptive) {
            (Some(b), _) => b,
            (None, None) => heard!(Bulkhead::builder(8))
                .name(name)
                .max_queue(1_000)
                .max_wait(t(600.0))
                .build()?,
            (None, Some((max, limit))) => heard!(Bulkhead::builder(max))
                .name(name)
                .limit(limit)
                .max_queue(1_000)
                .max_wait(t(600.0))
                .build()?,
        };
        let retry = match self.retry {
            Some(r) => r,
            None => heard!(Retry::builder())
                .name(name)
                .max_attempts(4)
                .backoff(
                    Backoff::exponential(t(1.0))
                        .cap(t(30.0))
                        .jitter(Jitter::Full)
                        .build()?,
                )
                // With a stale answer to give, a wait longer than 5 s (an
                // open breaker's, an upstream's) is answered stale at once.
                .retry_after_ceiling(if self.stale_if_error { t(5.0) } else { t(60.0) })
                .build()?,
        };
        let breaker = match self.breaker {
            Some(b) => b,
            None => heard!(Breaker::builder())
                .name(name)
                .consecutive_failures(5)
                .open_for(t(30.0))
                .open_jitter(0.1)
                .build()?,
        };
        // One pacer builder per profile, with the preset's waits.
        let paced = |limits: &[Limit]| -> PaceBuilder {
            let mut b = heard!(Pace::builder());
            for limit in profile::scale_limits(limits, scale) {
                b = b.limit(limit);
            }
            b.max_wait(t(600.0))
                .max_pause(t(60.0))
                // The provider announces its limits per (its) minute.
                .header_window(t(60.0))
        };
        let pace = match self.pace {
            Some(_) if !self.shared.is_empty() => {
                return Err(ConfigError::new(
                    "llm stack",
                    "shared_limit",
                    "applies to the pacer the stack builds; with a pacer of your own, \
                     give it to KeyedPaceBuilder::shared",
                ));
            }
            Some(p) => p,
            None => {
                let mut b = KeyedPace::builder(paced(self.profile.limits())).name(name);
                for (model, profile) in &self.models {
                    b = b.key(model.clone(), paced(profile.limits()));
                }
                if !self.shared.is_empty() {
                    b = b.shared(paced(&self.shared));
                }
                b.build()?
            }
        };
        let timeout = match self.timeout {
            Some(t) => t,
            None => heard!(Timeout::builder())
                .name(name)
                .attempt(t(120.0))
                .build()?,
        };
        let stream_timeout = match self.stream_timeout {
            Some(t) => t,
            None => heard!(Timeout::builder())
                .name(name)
                .attempt(t(120.0))
                .first_chunk(t(60.0))
                .idle(t(30.0))
                .build()?,
        };
        let shutdown = self.shutdown.unwrap_or_default();
        if let Some(l) = listener.clone() {
            shutdown.on_event(move |e: &Event<'_>| l(e));
        }
        shutdown.watch(bulkhead.clone());
        shutdown.watch(pace.clone());
        if let Some((quota, _)) = &self.quota {
            shutdown.watch(quota.clone());
        }
        // The pacer, not the permits, decides who goes next when tokens run
        // short: the queue tickets' ETAs come from its reservations.
        bulkhead.set_eta_source(Some(std::sync::Arc::new(pace.clone())));
        // A request without `max_tokens` reserves its model's largest
        // output (for all its choices), capped at half the smallest burst of
        // the pacers it goes through that counts output: a prompt of up to
        // the other half still fits (above a burst, a call could never be
        // paid).
        let shared_cap = pace.shared().map_or(u64::MAX, unset_cap);
        let cap = |p: &Pace| unset_cap(p).min(shared_cap);
        // Every model with a pacer of its own now (given to the builder, or
        // to a KeyedPace of the user's) caps at its own burst; models built
        // later from the template, at the template's (the overflow pacer's).
        let profile_of = |m: &str| {
            self.models
                .iter()
                .find(|(name, _)| name == m)
                .map_or(&self.profile, |(_, p)| p)
        };
        let mut models: crate::hashing::HashMap<String, service::Unset> = self
            .models
            .iter()
            .map(|(m, profile)| {
                let own = pace.peek(m).unwrap_or_else(|| pace.overflow().clone());
                let unset = service::Unset {
                    max_output: profile.unset_max_output(),
                    cap: cap(&own),
                };
                (m.clone(), unset)
            })
            .collect();
        for (m, own) in pace.pacers() {
            let unset = service::Unset {
                max_output: profile_of(&m).unset_max_output(),
                cap: cap(&own),
            };
            models.insert(m, unset);
        }
        let weigh = service::Weigh {
            default: service::Unset {
                max_output: self.profile.unset_max_output(),
                cap: cap(pace.overflow()),
            },
            models: std::sync::Arc::new(models),
            estimator: self
                .estimator
                .unwrap_or_else(|| std::sync::Arc::new(CharsPerToken::new())),
            prices: std::sync::Arc::new(self.prices),
        };
        if self.stale_if_error && self.cache.as_ref().is_none_or(|c| c.stale_for().is_zero()) {
            return Err(ConfigError::new(
                "llm",
                "stale_if_error",
                "needs a cache (`cache(…)`) that keeps answers past their TTL (`stale_for` above 0)",
            ));
        }
        let stale = match (&self.cache, self.stale_if_error) {
            (Some(c), true) => Some(crate::fallback::stale(
                c,
                self.key.clone(),
                crate::share::WholeResponse,
            )),
            _ => None,
        };
        let fallback = heard!(crate::fallback::FallbackLayer::new(stale)
            .when_rule(crate::fallback::StaleIfError)
            .classify(crate::classify::LlmClassifier::new())
            .mark(crate::fallback::MarkHttp)
            .name(name));
        let cache = match self.cache {
            Some(c) => c
                .layer(self.key.clone())
                .share(crate::share::WholeResponse)
                .classify(crate::classify::LlmClassifier::new())
                .control(crate::cache::http_cache_control),
            None => crate::cache::CacheLayer::off(
                self.key.clone(),
                crate::share::WholeResponse,
                crate::classify::LlmClassifier::new(),
            ),
        };
        let coalesce = {
            let l = heard!(crate::coalesce::CoalesceLayer::new(self.key.clone())
                .share(crate::share::WholeResponse)
                .name(name));
            if self.coalesce {
                l
            } else {
                l.off()
            }
        };
        let tier = crate::cache::TierLayer::new(
            self.tier,
            self.key.clone(),
            crate::share::WholeResponse,
            crate::classify::LlmClassifier::new(),
        )
        .observed(crate::observe::Observer::new(
            Some(std::sync::Arc::from(name)),
            listener.clone(),
        ));
        Ok(LlmStack {
            tier,
            fallback,
            cache,
            coalesce,
            weigh,
            shutdown,
            quota: self.quota,
            bulkhead,
            retry,
            breaker,
            pace,
            timeout,
            stream_timeout,
        })
    }
}

/// Half the smallest planned burst of `pace`'s limits that count output
/// (at least 1), `u64::MAX` when none does.
fn unset_cap(pace: &Pace) -> u64 {
    pace.snapshot()
        .dims
        .iter()
        .filter(|d| matches!(d.unit, Unit::Tokens | Unit::OutputTokens))
        .map(|d| (d.capacity / 2.0).floor().max(1.0) as u64)
        .min()
        .unwrap_or(u64::MAX)
}

/// The smallest and largest [`LlmStackBuilder::time_scale`].
const MIN_SCALE: f64 = 1e-3;
const MAX_SCALE: f64 = 1e6;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pace::Cost;
    use bytes::Bytes;

    #[test]
    fn observe_reads_usage_and_headers() {
        let res = http::Response::builder()
            .header("x-ratelimit-remaining-tokens", "100")
            .body(Bytes::from_static(br#"{"usage":{"total_tokens":42}}"#))
            .unwrap();
        let o = observe_response(&res);
        assert_eq!(o.usage, Some(Cost::tokens(42)));
        assert_eq!(o.info.unwrap().tokens.unwrap().remaining, Some(100));
    }

    #[test]
    fn bad_time_scale_is_an_error() {
        let tier = Tier {
            requests_per_minute: 1,
            tokens_per_minute: 1,
        };
        assert_eq!(
            LlmStack::openai(tier)
                .time_scale(0.0)
                .build()
                .unwrap_err()
                .field,
            "time_scale"
        );
    }
}

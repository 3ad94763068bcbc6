//! Tower middleware that keeps a service alive when what it calls — an LLM
//! API, a database, a payment provider — is slower, smaller or flakier than
//! the traffic it gets.
//!
//! Each capability is a tower [`Layer`](tower_layer::Layer) with a handle
//! that builds it, shares its state across clones and reports on it; a
//! refusal is a [`Rejected`] with a [`RejectKind`] and a `retry_after`, never a
//! panic; builders validate and return a [`ConfigError`]; all time goes through
//! `tokio::time`, so tests run hours of traffic on a paused clock.
//!
//! Every wait ends on a tokio timer, and tokio's timers fire on whole
//! milliseconds: a call due at `t` — to be admitted, refused at its
//! `max_wait`, timed out, retried after a backoff — is woken at `t` rounded
//! up to the timer's next millisecond, never before (later on a busy
//! runtime; a paused clock jumps whole milliseconds from where it stands, so
//! there up to 2 ms after `t`). A `max_wait` or a timeout can run over by
//! that much; what the layers decide (a start instant, a `retry_after`,
//! whether a wait fits `max_wait`) is exact to the nanosecond.
//!
//! A layer that gives up on a call still running below it — a timeout, the
//! drain deadline's cut, a retry's deadline — drops the inner future when it
//! answers, with whatever that future holds (a permit, a connection): not
//! when the caller lets go of the answered future. A future polled again
//! after its answer answers an error and resumes nothing. A completed inner
//! future goes with the layer's own future, as in tower's layers.
//!
//! | module | what it does |
//! |---|---|
//! | [`classify`] | the [`Class`](classify::Class) of a result (`Throttled`, `Overloaded`, `Transient`, `Infrastructure`, `Permanent`), HTTP and LLM-provider classifiers, rate-limit headers |
//! | [`bulkhead`] | concurrency limit with a fair bounded line, priorities, partitions, queue tickets with ETAs, a fixed or adaptive limit (AIMD, Vegas, Gradient2) |
//! | [`quota`] | keyed admission limits per user / tenant / plan, a global one beside them, and an unkeyed [`RateLimit`](quota::RateLimit) (one atomic cell) |
//! | [`pace`] | an upstream's budget (requests, tokens, spend per minute or day), reserved before the call, learned from its headers |
//! | [`breaker`] | a circuit breaker that counts only upstream failures |
//! | [`retry`] | retry by class with backoff, `Retry-After`, a budget and a deadline |
//! | [`timeout`] | attempt, total, first-chunk and idle limits that follow a stream to its end |
//! | [`route`] | one logical upstream over several deployments: soonest start, failover, fallback groups, hedging |
//! | [`coalesce`] | singleflight: identical calls in flight share one call and its answer (streams fanned out) |
//! | `cache` | a response cache for `Success` answers on moka, with a Redis tier (feature `cache`) |
//! | [`share`] | how an answer is keyed and shared by coalescing, caches and fallbacks |
//! | [`fallback`] | answer from elsewhere (a value, a service, the cache's last good answer) on chosen classes |
//! | [`degrade`] | a shared degradation level (`Normal`, `Reduced`, `Minimal`), by hand or by rules over our own signals |
//! | `chaos` | seeded, scheduled fault injection for drills and tests (feature `chaos`) |
//! | [`shutdown`] | stop admitting, drain with a deadline, release every line, report |
//! | [`health`] | shallow readiness and a deep report |
//! | [`observe`] | one event model: `tracing`, listeners, metrics |
//! | [`guard`] | the one body tap: hold something until a body or stream ends |
//! | [`eta`] | how a layer below tells a line above when calls will start |
//! | `llm` | the LLM client and router presets and their SSE reader (feature `llm`) |
//! | `redis` | a budget, a semaphore and a cache tier shared by a fleet (feature `redis`) |
//! | [`closure`] | any policy or stack around a plain `async` closure, without tower |
//! | `reqwest` | any stack (or the LLM preset) as a reqwest-middleware `Middleware` (feature `reqwest`) |
//! | `grpc` | tonic status codes as classes, pushback, gRPC retry rules, `grpc-timeout`, refusals as statuses (feature `grpc`) |
//! | `axum` | refusals as axum responses, a `HandleErrorLayer` handler, health handlers (feature `axum`) |
//!
//! # Layer order
//!
//! Client side, outermost first: `shutdown → fallback → cache → coalesce →
//! quota → bulkhead → retry → breaker → pace → attempt timeout → (chaos, in
//! drills) → client`. Shutdown outermost so draining sees every call; the
//! fallback outside the cache and everything that counts, so its answers are
//! never cached nor counted as successes; a cached or coalesced answer costs
//! no quota and waits in no line; the quota fails an over-quota caller before
//! it queues; the bulkhead bounds concurrency across retries; the breaker
//! sees every attempt; every attempt pays the pacer; the timeout bounds one
//! attempt; chaos stands where the network would fail. The LLM preset builds
//! this order (see the `llm` module docs); with several deployments, `route`
//! takes the place of `retry`.
//!
//! Start with `cargo run --example llm_client` (the Sunday-night classroom scenario
//! against an in-process mock provider, without and with the stack) and the
//! README's quick start; `examples/axum_server.rs` is the server template and
//! `cargo run --example drill` rehearses a provider outage.
//!
//! Features: none by default (the tower layers alone); `llm` (implies `http`
//! and `cache`), `http`, `cache`, `redis`, `metrics`, `serde`, `signal`,
//! `tiktoken`, `chaos`, `reqwest`, `grpc`, `axum` on request.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

// The README's examples run as doctests (the crate root has its own docs).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// `get_ref` / `get_mut` / `into_inner` on a service whose wrapped service
/// is its `inner` field (tower's convention), written once.
macro_rules! inner_access {
    ([$($g:tt)*] $ty:ty) => {
        impl<$($g)*> $ty {
            /// The wrapped service.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }

            /// The wrapped service, mutably.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.inner
            }

            /// The wrapped service, unwrapped.
            pub fn into_inner(self) -> S {
                self.inner
            }
        }
    };
}
pub(crate) use inner_access;

#[cfg(feature = "axum")]
pub mod axum;
pub mod backoff;
pub mod breaker;
pub mod bulkhead;
#[cfg(feature = "cache")]
pub mod cache;
#[cfg(feature = "chaos")]
pub mod chaos;
pub mod classify;
mod close;
pub mod closure;
pub mod coalesce;
pub mod degrade;
mod error;
pub mod eta;
pub mod fallback;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod guard;
mod hashing;
pub mod health;
#[cfg(feature = "llm")]
pub mod llm;
mod num;
pub mod observe;
pub mod pace;
pub mod quota;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "reqwest")]
pub mod reqwest;
pub mod retry;
pub mod route;
pub mod share;
pub mod shutdown;
mod striped;
/// The throwaway `redis-server` of the integration tests, for the scripts'
/// unit tests.
#[cfg(all(test, feature = "redis"))]
#[allow(unreachable_pub)]
#[path = "../tests/support/redis_server.rs"]
mod test_redis_server;

/// Traits that exist for the crate's own wiring (how a layer holds its
/// guard, times a response, counts a call in flight) are sealed: users pick
/// one of the types given, they do not implement them.
mod sealed {
    pub trait Sealed {}
}
mod time;
pub mod timeout;

pub use crate::error::{BoxError, ConfigError, RateLimitPolicy, RejectKind, Rejected};

//! One budget and one semaphore shared by a fleet, through Redis (feature
//! `redis`).
//!
//! Four instances each pacing 30k TPM send 120k TPM to a 30k account; a
//! [`Budget`] in Redis makes them one pacer, a [`Semaphore`] one concurrency
//! limit (500 slots shared across servers).
//!
//! - **One round trip per operation**: each acquire is one Lua script
//!   (`EVALSHA`, reloaded by itself after `SCRIPT FLUSH`), and Redis `TIME` is
//!   the only clock, so the instances' clocks do not matter.
//! - **The same semantics as the local layers**: a [`Budget`] is a set of
//!   GCRA cells with the same reservation rule as [`Pace`](crate::pace::Pace)
//!   (a call reserves its cost on every dimension at once and waits until its
//!   start; `max_wait` refuses with the exact `retry_after`; a refund or a
//!   debt moves the cells), keyed or not, so it also serves as a distributed
//!   [`Quota`](crate::quota::Quota). Idle cells expire (their TTL is the time
//!   until they are full again). A call through the layer that is dropped
//!   while it waits for its start gives its reservation back (in the
//!   background), so the next reservation is not held back by it.
//! - **A lease semaphore**: holders sit in a sorted set scored by lease expiry;
//!   a crashed holder's slot comes back when its lease runs out; a live holder
//!   renews every third of its lease; a dropped lease is released; an acquire
//!   that times out or is dropped while its script is in flight releases
//!   whatever that script took; a lease found gone at renewal is reported
//!   ([`Lease::is_lost`], and a WARN log).
//! - **When Redis is slow or down**: every call has a tight timeout (50 ms by
//!   default) and runs through a semaforo [`Breaker`] (3 failures open it for
//!   1 s), so an outage costs at most a few timeouts, then nothing per call.
//!   The [`FailurePolicy`] decides what the caller gets meanwhile.
//!
//! # Over-admission bound of each policy
//!
//! With `N` instances, a budget of `R` per window and a burst `B`, while Redis
//! is unreachable for a time `T`:
//!
//! | policy | admitted during `T` | refused |
//! |---|---|---|
//! | `FailOpen` | unbounded (everything) | nothing |
//! | `FailClosed` | nothing | everything, as `BackendUnavailable` (class `Infrastructure`) |
//! | `Local { share }` | at most `N · share · (R · T + B)` (each instance runs a local limiter with `share` of the budget; `share = 1/N` keeps the fleet within `R · T + B`) | the rest, as the local limiter refuses |
//!
//! When Redis comes back the cells it held are still there (or expired, i.e.
//! full): what was admitted locally is not charged to them, so the fleet may
//! admit up to one more burst right after the outage.
//!
//! # When Redis loses its state
//!
//! `FLUSHALL`, a restart without persistence, a replica promoted before it
//! had the latest writes: the cells are empty again, and hand out a fresh
//! burst. Over any window `W` the fleet then admits at most
//! `R · W + 2 · B` — what the old state allowed (`R · W + B`) and one more
//! burst — because a call that was waiting for a reservation made against
//! the old state does not start on the old schedule: each budget's state
//! carries a generation (made by the script when the budget has none), a
//! reservation remembers the one it was made against, and a call that had
//! to wait checks it before it starts; if it changed, the reservation is
//! made again against the new state (at most three times). If Redis does
//! not answer that check, the failure policy decides, as for a new call.
//! A refund (a dropped caller's, a reconciliation) applies only to the
//! state it was made for. Measured in `tests/redis.rs` (4 instances × 32
//! tasks, 10/s, burst 10): worst window excess over `R · W` 19.0 after a
//! `FLUSHALL` and 10.0 after a kill and an empty restart (bound 20); 49.9
//! and 34.1 without the check.
//!
//! | event | admitted over any window `W` |
//! |---|---|
//! | normal running | `R · W + B` |
//! | Redis unreachable for `T`, `Local { share }` | `R · W + B` + `N · share · (R · T + B)` |
//! | Redis loses its state (flush, empty restart, failover to a replica without the writes) | `R · W + 2 · B` |
//!
//! # Clean-up that survives an outage
//!
//! What a dropped caller gives back — a semaphore's lease, a budget's
//! reservation — is retried in the background every 250 ms while Redis is
//! slow, down or behind its open breaker, until it lands (each is
//! idempotent) or no longer matters (the lease ran out; a full burst's time
//! passed). A script whose reply never came (a timeout on a paused Redis:
//! it may still run when Redis resumes) is followed by its undo: the
//! semaphore releases the holder it may have added; the budget's reserve
//! leaves a marker (`…:r:<id>`, kept 10 s or 200 × the timeout) that the
//! undo reads to give the cost back if the reserve ran, or to stop it from
//! running if it has not yet. Redis `TIME` stays the only clock: no client
//! deadline is compared inside a script.
//!
//! ```no_run
//! use semaforo::pace::{Cost, Pace};
//! use semaforo::redis::{Budget, FailurePolicy, RedisBackend};
//! use tower::ServiceBuilder;
//!
//! # async fn run() -> Result<(), semaforo::BoxError> {
//! let redis = RedisBackend::connect("redis://127.0.0.1/").await?;
//! let budget = Budget::builder(
//!     &redis,
//!     "openai",
//!     Pace::builder().requests_per_minute(500).tokens_per_minute(30_000),
//! )
//! .failure_policy(FailurePolicy::Local { share: 0.25 }) // 4 instances
//! .build()?;
//! let client = ServiceBuilder::new()
//!     .layer(budget.layer().weigh(|prompt: &String| Cost::tokens(prompt.len() as u64 / 4 + 500)))
//!     .service(tower::service_fn(|_prompt: String| async { Ok::<_, std::io::Error>(()) }));
//! # Ok(()) }
//! ```
//!
//! The layers' futures are boxed `async` blocks: each call is a network round
//! trip, beside which one allocation does not show (see `benches/redis.rs`).

mod budget;
#[cfg(feature = "cache")]
mod cache_tier;
mod scripts;
mod semaphore;

pub use budget::{Budget, BudgetBuilder, BudgetKey, BudgetLayer, BudgetService, Grant, NoKey};
#[cfg(feature = "cache")]
pub use cache_tier::{CacheTier, CacheTierBuilder};
pub use scripts::RESERVE_LUA;
pub use semaphore::{Lease, Semaphore, SemaphoreBuilder, SemaphoreLayer, SemaphoreService};

use crate::breaker::{Breaker, BreakerService};
use crate::classify::ErrorClassifier;
use crate::error::{BoxError, ConfigError, RejectKind, Rejected};
use crate::timeout::{Timeout, TimeoutService, Whole};
use redis::aio::ConnectionManager;
use redis::Script;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower_layer::Layer;
use tower_service::Service;

/// What a caller gets while Redis does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Admit every call (availability first; no limit during the outage).
    FailOpen,
    /// Refuse every call with [`RejectKind::BackendUnavailable`].
    FailClosed,
    /// Fall back to a local limiter holding `share` of the budget (or of the
    /// semaphore's slots), e.g. `1/N` for `N` instances.
    Local {
        /// The part of the budget this instance may use alone (0 < share ≤ 1).
        share: f64,
    },
}

impl FailurePolicy {
    fn validate(self, layer: &'static str) -> Result<(), ConfigError> {
        match self {
            FailurePolicy::Local { share } if !(share > 0.0 && share <= 1.0) => {
                Err(ConfigError::new(
                    layer,
                    "failure_policy",
                    format!("share must be in (0, 1], got {share}"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// One script call: the script, its keys, its arguments.
pub(crate) struct Eval {
    script: &'static Script,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

/// Runs scripts over one multiplexed connection (concurrent calls are
/// pipelined on it).
#[derive(Clone)]
pub(crate) struct Runner {
    conn: ConnectionManager,
}

impl Service<Eval> for Runner {
    type Response = redis::Value;
    type Error = redis::RedisError;
    type Future = Pin<Box<dyn Future<Output = Result<redis::Value, redis::RedisError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Eval) -> Self::Future {
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let mut inv = req.script.prepare_invoke();
            for k in &req.keys {
                inv.key(k);
            }
            for a in &req.args {
                inv.arg(a);
            }
            inv.invoke_async(&mut conn).await
        })
    }
}

type Guarded = BreakerService<TimeoutService<Runner, Whole>, ErrorClassifier>;

/// A connection to Redis with a per-call timeout and a breaker around it;
/// shared by every [`Budget`] and [`Semaphore`] built on it. Cheap to clone.
#[derive(Clone)]
pub struct RedisBackend {
    svc: Guarded,
    breaker: Breaker,
    prefix: Arc<str>,
    timeout: Duration,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("breaker", &self.breaker.snapshot().state)
            .finish()
    }
}

/// Builder for [`RedisBackend`].
#[derive(Debug, Clone)]
#[must_use = "call .connect() to get a RedisBackend"]
pub struct RedisBackendBuilder {
    url: String,
    timeout: Duration,
    prefix: String,
    failures: u32,
    open_for: Duration,
}

impl RedisBackendBuilder {
    /// Each Redis call's deadline (default 50 ms); past it the call counts as
    /// failed and the failure policy answers.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Prefix of every key (default `"semaforo"`).
    pub fn prefix(mut self, p: impl Into<String>) -> Self {
        self.prefix = p.into();
        self
    }

    /// The breaker around Redis: open after `failures` failed calls in a row,
    /// for `open_for` (default 3 and 1 s); then one probe call.
    pub fn breaker(mut self, failures: u32, open_for: Duration) -> Self {
        self.failures = failures;
        self.open_for = open_for;
        self
    }

    /// Validates, connects (Redis must answer now) and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] (boxed) on `timeout` zero, or
    /// the connection's error when Redis does not answer.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the connection attempt; nothing is left
    /// behind.
    pub async fn connect(self) -> Result<RedisBackend, BoxError> {
        if self.timeout.is_zero() {
            return Err(ConfigError::new("redis", "timeout", "must be above zero").into());
        }
        let client = redis::Client::open(self.url.as_str())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout.max(Duration::from_millis(100)))
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            .set_max_delay(100);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        let breaker = Breaker::builder()
            .name("redis")
            .consecutive_failures(self.failures)
            .open_for(self.open_for)
            .build()?;
        let timeout = Timeout::builder()
            .name("redis")
            .attempt(self.timeout)
            .build()?;
        let svc = breaker
            .layer()
            .layer(timeout.layer().layer(Runner { conn }));
        Ok(RedisBackend {
            svc,
            breaker,
            prefix: self.prefix.into(),
            timeout: self.timeout,
        })
    }
}

impl RedisBackend {
    /// A builder for `url` (`redis://host:port/db`, `redis+unix:///path`).
    pub fn builder(url: impl Into<String>) -> RedisBackendBuilder {
        RedisBackendBuilder {
            url: url.into(),
            timeout: Duration::from_millis(50),
            prefix: "semaforo".into(),
            failures: 3,
            open_for: Duration::from_secs(1),
        }
    }

    /// Connects with the defaults (50 ms per call, breaker 3 failures / 1 s).
    pub async fn connect(url: &str) -> Result<RedisBackend, BoxError> {
        RedisBackend::builder(url).connect().await
    }

    /// The breaker guarding Redis (its snapshot says whether Redis is
    /// considered down).
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub(crate) fn key(&self, parts: &[&str]) -> String {
        let mut k = String::with_capacity(64);
        k.push_str(&self.prefix);
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// Runs `script`; any failure (timeout, breaker open, Redis error) is an
    /// `Err` for the failure policy to answer.
    pub(crate) async fn eval(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<redis::Value, BoxError> {
        self.eval_bytes(
            script,
            keys,
            args.into_iter().map(String::into_bytes).collect(),
        )
        .await
    }

    /// [`eval`](Self::eval) with binary arguments.
    pub(crate) async fn eval_bytes(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<Vec<u8>>,
    ) -> Result<redis::Value, BoxError> {
        let mut svc = self.svc.clone();
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
        svc.call(Eval { script, keys, args }).await
    }
}

/// Runs `work` on the current tokio runtime, if there is one: the clean-up a
/// `Drop` starts and cannot wait for (without a runtime, leases and
/// reservations run out by themselves).
fn in_background(work: impl Future<Output = ()> + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(work);
    }
}

/// How often a clean-up that failed (Redis slow, down, or its breaker open)
/// is tried again.
pub(crate) const RETRY_EVERY: Duration = Duration::from_millis(250);

/// Runs the idempotent clean-up `op` in the background until it succeeds,
/// trying again every [`RETRY_EVERY`] for at most `give_up_after` (past it
/// the clean-up no longer matters: the lease or the reservation has run
/// out by itself). Without a runtime nothing runs (see [`in_background`]).
fn in_background_until_done<F, Fut>(give_up_after: Duration, mut op: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send,
{
    in_background(async move {
        let until = crate::time::after(tokio::time::Instant::now(), give_up_after);
        loop {
            if op().await.is_ok() {
                return;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep(RETRY_EVERY.min(until - now)).await;
        }
    });
}

/// Whether a failed Redis call may have run its script: everything but
/// our own breaker's refusal (then nothing was sent).
fn may_have_run(err: &BoxError) -> bool {
    !Rejected::find(err.as_ref()).is_some_and(|r| r.kind() == RejectKind::CircuitOpen)
}

/// `{ok, n}` from a script (a longer reply: its first two).
fn pair(v: &redis::Value) -> Option<(i64, i64)> {
    match v {
        redis::Value::Array(items) if items.len() >= 2 => {
            let int = |v: &redis::Value| match v {
                redis::Value::Int(n) => Some(*n),
                _ => None,
            };
            Some((int(&items[0])?, int(&items[1])?))
        }
        _ => None,
    }
}

/// The refusal of a `FailClosed` policy.
fn unavailable(layer: &'static str, name: &str, cause: BoxError) -> Rejected {
    Rejected::new(layer, RejectKind::BackendUnavailable)
        .with_name(name.to_owned())
        .with_source(cause)
}

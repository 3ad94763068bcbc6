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
//! - **A 429 pauses the fleet**: with [`BudgetLayer::classify`], an answer
//!   classified `Throttled` [pauses](Budget::pause) the budget (the call's
//!   key, or the whole budget) in Redis for its `retry_after` — every
//!   instance's next reservation starts after it, so one upstream 429 does
//!   not become one per instance. **Not the same as the local pacer:** the
//!   rate is not cut after a 429 (no AIMD) and no limit is read from the
//!   answers' headers; reservations already made keep their start.
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
//! | `Local { share }` | at most `N · share · (R · T + B)` (each instance runs a local limiter with `share` of the budget; `share = 1/N` keeps the fleet within `R · T + B`) — but never less than one unit per window and a burst of one per instance (a local limit is at least 1: with `share · R` or `share · B` below 1, `N · (T / window + 1)`) | the rest, as the local limiter refuses |
//!
//! When Redis comes back the cells it held are still there (or expired, i.e.
//! full): what was admitted locally is not charged to them, so the fleet may
//! admit up to one more burst right after the outage.
//!
//! # When Redis loses its state
//!
//! `FLUSHALL`, a restart without persistence, a replica promoted before it
//! had the latest writes: the cells are empty again (or older), and hand
//! out a fresh burst. Over any window `W` the fleet then admits at most
//! `R · W + 2 · B` — what the old state allowed (`R · W + B`) and one more
//! burst — because a call that was waiting for a reservation made in the
//! old state does not start on the old schedule: each reservation leaves a
//! marker, written by the same script as the cells (a Redis that has the
//! marker has the reservation), and a call that had to wait checks it
//! before it starts; if it is gone, the reservation is made again in the
//! new state (at most three times). If Redis does not answer that check,
//! the failure policy decides, as for a new call. A refund goes through the
//! marker too: it applies once, and only to the state it was made in.
//! Measured in `tests/redis.rs` (4 instances × 32 tasks, 10/s, burst 10):
//! worst window excess over `R · W` 19.0 after a `FLUSHALL` and 10.0 after
//! a kill and an empty restart (bound 20); 49.9 and 34.1 without the check.
//!
//! A semaphore whose set is lost admits new holders beside the old ones
//! until each old holder's next renewal (every third of the lease): a
//! renewal that finds its lease gone takes it again while there is room,
//! else reports it lost ([`Lease::is_lost`]). So for up to a third of the
//! lease, up to `2 · max_concurrent` calls may run.
//!
//! | event | admitted over any window `W` |
//! |---|---|
//! | normal running | `R · W + B` |
//! | Redis unreachable for `T`, `Local { share }` | `R · W + B` + `N · share · (R · T + B)` |
//! | Redis loses its state (flush, empty restart, failover to a replica without the writes) | `R · W + 2 · B`; a semaphore up to `2 · max_concurrent` for a third of the lease |
//!
//! # High availability
//!
//! [`RedisBackend::builder`] (one server), [`RedisBackend::sentinel`] (the
//! primary a set of Sentinels names) or [`RedisBackend::cluster`] (a Redis
//! Cluster's seed nodes):
//!
//! - **Sentinel**: the primary is asked of the sentinels on first use and
//!   again when its connection breaks, when it refuses a write
//!   (`READONLY`: it was demoted) or after three calls in a row cut by
//!   their timeout (a primary that vanished without closing anything).
//!   Calls meanwhile fail fast (the breaker), and the failure policy
//!   answers. After a failover the new primary holds what the replica had
//!   received: with asynchronous replication, the last writes may be gone,
//!   which is a state loss as above (the marker check bounds it).
//!   Passwords: the sentinels' in their URLs, the servers' with
//!   [`node_auth`](RedisBackendBuilder::node_auth).
//! - **Cluster**: each script's keys share one hash tag (`{name}`, or
//!   `{key}` for a keyed budget), so each script runs on the one node that
//!   owns the slot; the client follows `MOVED` and `ASK` (a slot being
//!   moved), so resharding needs nothing from us. A script that meets a slot
//!   half-moved (`TRYAGAIN`) fails like any Redis error, for the failure
//!   policy to answer, and is retried by the next call.
//! - `NOSCRIPT` after a node restart or a failover: the script is loaded
//!   again and the call retried, by itself.
//!
//! Which to choose: one server when a Redis restart may cost a burst and a
//! few seconds of the failure policy; Sentinel when the budget must survive
//! the loss of its server; Cluster when one server cannot carry the calls
//! (many keyed budgets spread over the slots).
//!
//! # Clean-up that survives an outage
//!
//! What a dropped caller gives back — a semaphore's lease, a budget's
//! reservation — is retried in the background every 250 ms while Redis is
//! slow, down or behind its open breaker, until it lands or no longer
//! matters: for a lease, once Redis was reachable for the lease's length;
//! for a reservation, for its wait plus 10 s (time behind the open breaker
//! does not count; an hour out of reach ends the task). Each is applied
//! once: a release is a `ZREM`; a refund goes through the reservation's
//! marker (`…:r:<id>`, living until 10 s past the reservation's start),
//! which says whether it was already given back. A script whose reply
//! never came — a timeout on a paused Redis, a caller that dropped the
//! call in flight: it may still run when Redis resumes — is followed by its
//! undo: the budget's undo gives the cost back if the reserve ran, or marks
//! the marker `cancelled` so a late reserve takes nothing; the semaphore's
//! release leaves a tombstone (`…:gone:<holder>`, for a lease) so a late
//! acquire takes no slot. The undo of a reply that never came is tried for
//! `min(max_wait, 10 s) + 10 s` of Redis being reachable, at most 64 at once
//! per budget: past those, a late reserve that did run keeps its cost (the
//! budget admits a little less, never more). Redis `TIME` stays the only clock:
//! no client deadline is compared inside a script. A Redis error reply (a
//! value Redis refuses) is not an outage: it is `Permanent`, and does not
//! open the breaker the other budgets and semaphores share.
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
//!     .layer(
//!         budget
//!             .layer()
//!             .weigh(|prompt: &String| Cost::tokens(prompt.len() as u64 / 4 + 500))
//!             // A 429 (an error classified `Throttled`) pauses all 4 instances.
//!             .classify(semaforo::classify::ErrorClassifier),
//!     )
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

pub use budget::{
    Budget, BudgetBuilder, BudgetKey, BudgetLayer, BudgetService, Grant, NoKey, NoPause,
};
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
/// pipelined on it): to one server, to the primary a Sentinel set names
/// (found again after a failover), or to a cluster (the node owning each
/// script's slot; `MOVED` and `ASK` followed by the client).
#[derive(Clone)]
pub(crate) enum Runner {
    Single(ConnectionManager),
    Sentinel(Arc<SentinelConn>),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// The connection to the primary a Sentinel set names: resolved on first
/// use, and again after it broke, refused writes (`READONLY`: a demoted
/// primary) or stopped answering (three calls in a row cut by their
/// timeout): that is how a failover is followed without a restart.
pub(crate) struct SentinelConn {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    primary: std::sync::RwLock<Option<redis::aio::MultiplexedConnection>>,
    config: redis::AsyncConnectionConfig,
    /// Calls in a row that were cut before an answer.
    unanswered: std::sync::atomic::AtomicU32,
}

impl SentinelConn {
    async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        // One resolution at a time; the others wait for it.
        let mut client = self.client.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let c = client
            .get_async_connection_with_config(&self.config)
            .await?;
        *self
            .primary
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(c.clone());
        Ok(c)
    }

    fn current(&self) -> Option<redis::aio::MultiplexedConnection> {
        self.primary
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Forget the primary: the next call asks the sentinels again.
    fn forget(&self) {
        *self
            .primary
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.unanswered
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// What a call's outcome says about the primary.
    fn outcome(&self, r: &redis::RedisResult<redis::Value>) {
        use std::sync::atomic::Ordering;
        match r {
            Ok(_) => self.unanswered.store(0, Ordering::Relaxed),
            Err(e)
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.kind() == redis::ErrorKind::ReadOnly
                    || e.code() == Some("MASTERDOWN") =>
            {
                self.forget()
            }
            Err(_) => {}
        }
    }
}

/// Counts a sentinel call cut before its answer (by its timeout): three in
/// a row and the primary is looked up again.
struct Unanswered(Option<Arc<SentinelConn>>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            let n = s
                .unanswered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n + 1 >= 3 {
                s.forget();
            }
        }
    }
}

impl Service<Eval> for Runner {
    type Response = redis::Value;
    type Error = redis::RedisError;
    type Future = Pin<Box<dyn Future<Output = Result<redis::Value, redis::RedisError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Eval) -> Self::Future {
        let runner = self.clone();
        Box::pin(async move {
            let mut inv = req.script.prepare_invoke();
            for k in &req.keys {
                inv.key(k);
            }
            for a in &req.args {
                inv.arg(a);
            }
            match runner {
                Runner::Single(mut conn) => inv.invoke_async(&mut conn).await,
                Runner::Cluster(mut conn) => inv.invoke_async(&mut conn).await,
                Runner::Sentinel(s) => {
                    let mut cut = Unanswered(Some(s.clone()));
                    let r = match s.connection().await {
                        Ok(mut conn) => inv.invoke_async(&mut conn).await,
                        Err(e) => Err(e),
                    };
                    cut.0 = None;
                    s.outcome(&r);
                    r
                }
            }
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

/// Where the Redis of a [`RedisBackend`] is.
#[derive(Debug, Clone)]
enum Topology {
    Single(String),
    Sentinel {
        sentinels: Vec<String>,
        primary: String,
        username: Option<String>,
        password: Option<String>,
    },
    Cluster(Vec<String>),
}

/// Builder for [`RedisBackend`].
#[derive(Debug, Clone)]
#[must_use = "call .connect() to get a RedisBackend"]
pub struct RedisBackendBuilder {
    topology: Topology,
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

    /// The credentials of the Redis servers a Sentinel set names (its
    /// `requirepass` / ACL user); the sentinels' own go in their URLs
    /// (`redis://:password@host:26379`). Ignored for the other topologies,
    /// whose URLs carry theirs.
    pub fn node_auth(mut self, username: Option<String>, password: impl Into<String>) -> Self {
        if let Topology::Sentinel {
            username: u,
            password: p,
            ..
        } = &mut self.topology
        {
            *u = username;
            *p = Some(password.into());
        }
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
        let connect_timeout = self.timeout.max(Duration::from_millis(100));
        let runner = match &self.topology {
            Topology::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(100);
                Runner::Single(ConnectionManager::new_with_config(client, config).await?)
            }
            Topology::Sentinel {
                sentinels,
                primary,
                username,
                password,
            } => {
                if sentinels.is_empty() {
                    return Err(ConfigError::new("redis", "sentinels", "give at least one").into());
                }
                let node = redis::sentinel::SentinelNodeConnectionInfo {
                    tls_mode: None,
                    redis_connection_info: Some(redis::RedisConnectionInfo {
                        username: username.clone(),
                        password: password.clone(),
                        ..Default::default()
                    }),
                };
                let client = redis::sentinel::SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    primary.clone(),
                    Some(node),
                    redis::sentinel::SentinelServerType::Master,
                )?;
                let conn = Arc::new(SentinelConn {
                    client: tokio::sync::Mutex::new(client),
                    primary: std::sync::RwLock::new(None),
                    config: redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(connect_timeout)
                        .set_response_timeout(self.timeout),
                    unanswered: std::sync::atomic::AtomicU32::new(0),
                });
                // The primary must answer now, as a single server must.
                conn.connection().await?;
                Runner::Sentinel(conn)
            }
            Topology::Cluster(seeds) => {
                if seeds.is_empty() {
                    return Err(ConfigError::new("redis", "seeds", "give at least one").into());
                }
                let client = redis::cluster::ClusterClient::builder(seeds.clone())
                    .connection_timeout(connect_timeout)
                    .response_timeout(self.timeout)
                    .retries(2)
                    .build()?;
                Runner::Cluster(client.get_async_connection().await?)
            }
        };
        let breaker = Breaker::builder()
            .name("redis")
            .consecutive_failures(self.failures)
            .open_for(self.open_for)
            .build()?;
        let timeout = Timeout::builder()
            .name("redis")
            .attempt(self.timeout)
            .build()?;
        let svc = breaker.layer().layer(timeout.layer().layer(runner));
        Ok(RedisBackend {
            svc,
            breaker,
            prefix: self.prefix.into(),
            timeout: self.timeout,
        })
    }
}

impl RedisBackend {
    /// A builder for one server at `url` (`redis://host:port/db`,
    /// `redis://:password@host:port`, `redis+unix:///path`).
    pub fn builder(url: impl Into<String>) -> RedisBackendBuilder {
        RedisBackend::with_topology(Topology::Single(url.into()))
    }

    /// A builder for the primary that a set of Sentinels names `primary`
    /// (`redis://host:26379` each, with `:password@` for sentinels that
    /// require one; the servers' own credentials with
    /// [`node_auth`](RedisBackendBuilder::node_auth)). After a failover the
    /// new primary is found by asking the sentinels again, without a
    /// restart (see [High availability](self#high-availability)).
    pub fn sentinel(
        sentinels: impl IntoIterator<Item = impl Into<String>>,
        primary: impl Into<String>,
    ) -> RedisBackendBuilder {
        RedisBackend::with_topology(Topology::Sentinel {
            sentinels: sentinels.into_iter().map(Into::into).collect(),
            primary: primary.into(),
            username: None,
            password: None,
        })
    }

    /// A builder for a Redis Cluster reached through its seed nodes
    /// (`redis://host:port` each, with credentials in the URL). Every key
    /// of a budget, of a budget's key, or of a semaphore carries one hash
    /// tag (`{openai}`), so each script touches one slot; keyed budgets
    /// spread over the slots.
    pub fn cluster(seeds: impl IntoIterator<Item = impl Into<String>>) -> RedisBackendBuilder {
        RedisBackend::with_topology(Topology::Cluster(
            seeds.into_iter().map(Into::into).collect(),
        ))
    }

    fn with_topology(topology: Topology) -> RedisBackendBuilder {
        RedisBackendBuilder {
            topology,
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

/// The longest a clean-up is tried while Redis stays out of reach (its
/// breaker open): then the task ends whatever happens.
const CLEAN_UP_AT_MOST: Duration = Duration::from_secs(3_600);

/// Runs the idempotent clean-up `op` in the background until it succeeds,
/// trying again every [`RETRY_EVERY`]. It gives up once Redis has been
/// reachable (tried, not refused by the breaker) for `give_up_after` in all
/// — past it the clean-up no longer matters: the lease or the reservation
/// has run out by itself — or after an hour out of reach. Time behind an
/// open breaker does not count, so a late script (Redis paused, then
/// resuming) still meets its clean-up. Without a runtime nothing runs (see
/// [`in_background`]).
fn in_background_until_done<F, Fut>(give_up_after: Duration, mut op: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send,
{
    in_background(async move {
        let started = tokio::time::Instant::now();
        let mut reachable = Duration::ZERO;
        loop {
            match op().await {
                Ok(()) => return,
                Err(e) => {
                    let refused = Rejected::find(e.as_ref())
                        .is_some_and(|r| r.kind() == RejectKind::CircuitOpen);
                    if !refused {
                        reachable = reachable.saturating_add(RETRY_EVERY);
                    }
                }
            }
            if reachable >= give_up_after || started.elapsed() >= CLEAN_UP_AT_MOST {
                return;
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    });
}

/// Whether a failed Redis call may have run its script: a call cut by its
/// timeout or whose connection broke (the script may run, or have run,
/// without its reply reaching us). Not our breaker's refusal (nothing was
/// sent), not an error reply from Redis (`TRYAGAIN`, `NOSCRIPT`, `OOM`: it
/// did not run).
fn may_have_run(err: &BoxError) -> bool {
    if let Some(r) = Rejected::find(err.as_ref()) {
        return r.kind() != RejectKind::CircuitOpen;
    }
    match err.downcast_ref::<redis::RedisError>() {
        // A refused connection sent nothing.
        Some(e) if e.is_connection_refusal() => false,
        Some(e) => e.is_io_error() || e.is_connection_dropped() || e.is_timeout(),
        None => true,
    }
}

/// The class of a Redis error, for the backend's breaker and the failure
/// policy: the connection (refused, reset, cut by its timeout) is
/// `Infrastructure`; a busy, loading, out-of-memory or reorganising server
/// (`BUSY`, `LOADING`, `OOM`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`,
/// `READONLY`) is `Overloaded`; any other error reply (a script's argument
/// Redis refuses) is `Permanent`: Redis is fine, retrying the same call
/// cannot help, and it must not open the breaker the other budgets share.
pub(crate) fn redis_error_class(e: &redis::RedisError) -> crate::classify::Class {
    use crate::classify::{Class, Permanent};
    use redis::ErrorKind;
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return Class::Infrastructure;
    }
    match e.kind() {
        ErrorKind::BusyLoadingError
        | ErrorKind::TryAgain
        | ErrorKind::ClusterDown
        | ErrorKind::MasterDown
        | ErrorKind::ReadOnly
        | ErrorKind::Moved
        | ErrorKind::Ask => Class::Overloaded { retry_after: None },
        _ if e.code() == Some("OOM") || e.code() == Some("BUSY") => {
            Class::Overloaded { retry_after: None }
        }
        ErrorKind::ResponseError
        | ErrorKind::TypeError
        | ErrorKind::ExecAbortError
        | ErrorKind::ExtensionError
        | ErrorKind::CrossSlot => Class::permanent(Permanent::Other),
        _ => Class::Infrastructure,
    }
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

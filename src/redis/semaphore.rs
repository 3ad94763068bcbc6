//! A concurrency limit shared by a fleet: leases in a Redis sorted set.

use super::{in_background_until_done, pair, scripts, unavailable, FailurePolicy, RedisBackend};
use crate::bulkhead::Bulkhead;
use crate::error::{BoxError, ConfigError, RejectKind, Rejected};
use crate::guard::{Guard, Hold, OnResponse, OnStreamEnd, StreamEnd};
use rand::Rng;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

struct Inner {
    backend: RedisBackend,
    name: Arc<str>,
    key: String,
    max_concurrent: u32,
    lease: Duration,
    max_wait: Duration,
    policy: FailurePolicy,
    local: Option<Bulkhead>,
    /// Unique per process and semaphore: holder ids are `{instance}:{n}`.
    instance: u64,
    next: AtomicU64,
    /// Closed by a shutdown: waiting acquirers give up, nobody waits again.
    closing: crate::close::Closing,
}

/// `max_concurrent` slots shared by every instance using the same Redis and name.
/// Cheap to clone.
#[derive(Clone)]
pub struct Semaphore {
    inner: Arc<Inner>,
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("redis::Semaphore")
            .field("name", &self.inner.name)
            .field("max_concurrent", &self.inner.max_concurrent)
            .field("lease", &self.inner.lease)
            .finish()
    }
}

/// Builder for [`Semaphore`].
#[derive(Debug, Clone)]
#[must_use = "call .build() to get a Semaphore"]
pub struct SemaphoreBuilder {
    backend: RedisBackend,
    name: Arc<str>,
    max_concurrent: u32,
    lease: Duration,
    max_wait: Duration,
    policy: FailurePolicy,
}

/// The longest lease [`SemaphoreBuilder::build`] accepts.
const MAX_LEASE: Duration = Duration::from_secs(365 * 86_400);

impl SemaphoreBuilder {
    /// How long a slot stays taken without renewal (default 30 s): a crashed
    /// holder's slot comes back after it. Live holders renew every third.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }

    /// How long a caller may wait for a slot (default 0: fail fast). Waiting
    /// callers poll Redis with jittered backoff (not a FIFO line).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// What callers get while Redis does not answer (default `FailClosed`).
    pub fn failure_policy(mut self, p: FailurePolicy) -> Self {
        self.policy = p;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field: `max_concurrent` 0, `lease` below
    /// 30 ms or above 365 days, `name` empty, `failure_policy` (a `Local`
    /// share outside (0, 1]).
    pub fn build(self) -> Result<Semaphore, ConfigError> {
        let err =
            |field, msg: &str| Err(ConfigError::new("redis semaphore", field, msg.to_owned()));
        if self.max_concurrent == 0 {
            return err("max_concurrent", "must be at least 1");
        }
        if self.lease < Duration::from_millis(30) {
            return err(
                "lease",
                "must be at least 30 ms (it is renewed every third)",
            );
        }
        if self.lease > MAX_LEASE {
            // Redis keeps scores as doubles and `PEXPIRE` takes an i64 of ms:
            // a lease of years would overflow its arithmetic.
            return err("lease", "must be at most 365 days");
        }
        if self.name.is_empty() {
            return err("name", "must be non-empty");
        }
        self.policy.validate("redis semaphore")?;
        let local = match self.policy {
            FailurePolicy::Local { share } => Some(
                Bulkhead::builder(
                    (crate::num::floor_of(share, f64::from(self.max_concurrent)) as u32).max(1),
                )
                .name(self.name.clone())
                .max_queue(0)
                .build()?,
            ),
            _ => None,
        };
        let key = self.backend.key(&["sem", &format!("{{{}}}", self.name)]);
        Ok(Semaphore {
            inner: Arc::new(Inner {
                backend: self.backend,
                name: self.name,
                key,
                max_concurrent: self.max_concurrent,
                lease: self.lease,
                max_wait: self.max_wait,
                policy: self.policy,
                local,
                instance: rand::rng().random(),
                next: AtomicU64::new(0),
                closing: crate::close::Closing::default(),
            }),
        })
    }
}

/// A held slot. Renewed in the background while held; released when dropped
/// (or, if the process dies, when its lease runs out).
pub struct Lease {
    kind: LeaseKind,
}

enum LeaseKind {
    Redis {
        sem: Semaphore,
        holder: String,
        renew: tokio::task::JoinHandle<()>,
        /// Set by the renewal task when the lease was found gone.
        lost: Arc<AtomicBool>,
    },
    /// `FailOpen` while Redis was down: holds nothing.
    Open,
    /// `FailurePolicy::Local`: a permit of the local bulkhead.
    Local {
        _permit: crate::bulkhead::BulkheadPermit,
    },
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            LeaseKind::Redis { holder, .. } => holder.as_str(),
            LeaseKind::Open => "open (Redis unavailable)",
            LeaseKind::Local { .. } => "local (Redis unavailable)",
        };
        f.debug_struct("Lease").field("holder", &kind).finish()
    }
}

impl Lease {
    /// `true` if the slot is held in Redis (not a failure-policy stand-in).
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, LeaseKind::Redis { .. })
    }
}

impl Lease {
    /// `true` once a renewal found the lease gone (it ran out while Redis was
    /// unreachable or paused, and the slot may now be someone else's): the
    /// limit no longer counts this holder. Logged at WARN (target `semaforo`).
    pub fn is_lost(&self) -> bool {
        match &self.kind {
            LeaseKind::Redis { lost, .. } => lost.load(Ordering::Relaxed),
            _ => false,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let LeaseKind::Redis {
            sem, holder, renew, ..
        } = &mut self.kind
        {
            renew.abort();
            // Give the slot back now, and again while Redis is away; with no
            // runtime left, the lease expires by itself.
            sem.release_in_background(std::mem::take(holder));
        }
    }
}

/// A holder id whose acquire script may have run without its reply reaching
/// us (the call timed out, failed, or was dropped in flight): released unless
/// [`settled`](Self::settled), so no slot stays taken by nobody for a lease.
struct InFlight<'a> {
    sem: &'a Semaphore,
    holder: &'a str,
    settled: bool,
}

impl InFlight<'_> {
    fn settled(mut self) {
        self.settled = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.sem.release_in_background(self.holder.to_owned());
        }
    }
}

impl Semaphore {
    /// The name given to the builder (it also names the Redis keys).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Answers every acquirer waiting for a slot `ShuttingDown` now, and
    /// refuses every acquire from now on, as [`Bulkhead::close`] does (held
    /// leases are kept until released; one whose script was running at the
    /// close is given back and its acquirer refused). Returns how many were
    /// asleep between two tries at that instant (one in a round trip to
    /// Redis then is refused too when its reply comes, not counted). (A
    /// [`Shutdown`](crate::shutdown::Shutdown) calls it at its trigger once
    /// given the semaphore with [`watch`](crate::shutdown::Shutdown::watch).)
    pub fn close(&self) -> u64 {
        self.inner.closing.close()
    }

    fn shutting_down(&self) -> Rejected {
        Rejected::new("bulkhead", RejectKind::ShuttingDown)
            .with_name(self.inner.name.clone())
            .with_detail("the semaphore is closed")
    }

    /// A semaphore of `max_concurrent` slots named `name` (instances sharing a name
    /// share the slots).
    pub fn builder(
        backend: &RedisBackend,
        name: impl Into<Arc<str>>,
        max_concurrent: u32,
    ) -> SemaphoreBuilder {
        SemaphoreBuilder {
            backend: backend.clone(),
            name: name.into(),
            max_concurrent,
            lease: Duration::from_secs(30),
            max_wait: Duration::ZERO,
            policy: FailurePolicy::FailClosed,
        }
    }

    /// Takes a slot, waiting up to `max_wait`; `QueueFull` (or `QueueTimeout`
    /// after a wait) with a `retry_after` when none frees up. While Redis does
    /// not answer, the failure policy decides.
    pub async fn acquire(&self) -> Result<Lease, Rejected> {
        let inner = &self.inner;
        let holder = format!(
            "{:x}:{}",
            inner.instance,
            inner.next.fetch_add(1, Ordering::Relaxed)
        );
        let lease_ms = inner.lease.as_millis().to_string();
        let deadline = crate::time::after(Instant::now(), inner.max_wait);
        let mut pause = Duration::from_millis(2);
        loop {
            if inner.closing.is_closed() {
                return Err(self.shutting_down());
            }
            let in_flight = InFlight {
                sem: self,
                holder: &holder,
                settled: false,
            };
            let reply = self.try_acquire(&holder, &lease_ms).await;
            if reply.is_ok() {
                in_flight.settled();
            } else {
                drop(in_flight);
            }
            match reply {
                Ok(None) => {
                    let lease = self.held(holder);
                    // Closed while the script ran: refused as promised (the
                    // slot goes back as the lease drops).
                    if inner.closing.is_closed() {
                        drop(lease);
                        return Err(self.shutting_down());
                    }
                    return Ok(lease);
                }
                Ok(Some(free_in)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let kind = if inner.max_wait.is_zero() {
                            RejectKind::QueueFull
                        } else {
                            RejectKind::QueueTimeout
                        };
                        return Err(Rejected::new("bulkhead", kind)
                            .with_name(inner.name.clone())
                            .with_detail(format!(
                                "{} of {} slots held",
                                inner.max_concurrent, inner.max_concurrent
                            ))
                            .with_retry_after(free_in));
                    }
                    // Jittered, growing pauses, never past the deadline nor
                    // past the earliest lease expiry.
                    let jitter = rand::rng().random_range(0.5..1.5);
                    let sleep = crate::time::mul(pause, jitter)
                        .min(free_in)
                        .min(deadline.saturating_duration_since(now));
                    if !inner.closing.sleep(sleep).await {
                        return Err(self.shutting_down());
                    }
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(cause) => return self.on_failure(cause).await,
            }
        }
    }

    /// The key of `holder`'s tombstone (same hash tag as the set).
    fn tombstone(&self, holder: &str) -> String {
        format!("{}:gone:{holder}", self.inner.key)
    }

    /// One acquire script call: `Ok(None)` held, `Ok(Some(d))` full (the
    /// earliest lease ends in `d`).
    async fn try_acquire(
        &self,
        holder: &str,
        lease_ms: &str,
    ) -> Result<Option<Duration>, BoxError> {
        let v = self
            .inner
            .backend
            .eval(
                &scripts::ACQUIRE,
                vec![self.inner.key.clone(), self.tombstone(holder)],
                vec![
                    self.inner.max_concurrent.to_string(),
                    lease_ms.to_owned(),
                    holder.to_owned(),
                ],
            )
            .await?;
        match pair(&v) {
            Some((1, _)) => Ok(None),
            Some((0, ms)) => Ok(Some(Duration::from_millis(ms.max(1) as u64))),
            // Released before it ran: its caller is gone (a holder id is
            // used once, so this reply reaches nobody).
            Some(_) => Err("the acquire ran after its release".into()),
            None => Err("unexpected script reply".into()),
        }
    }

    fn held(&self, holder: String) -> Lease {
        let sem = self.clone();
        let h = holder.clone();
        let lost = Arc::new(AtomicBool::new(false));
        let lost_flag = lost.clone();
        let renew = tokio::spawn(async move {
            let every = sem.inner.lease / 3;
            let lease_ms = sem.inner.lease.as_millis().to_string();
            let limit = sem.inner.max_concurrent.to_string();
            loop {
                tokio::time::sleep(every).await;
                let renewed = sem
                    .inner
                    .backend
                    .eval(
                        &scripts::RENEW,
                        vec![sem.inner.key.clone()],
                        vec![lease_ms.clone(), h.clone(), limit.clone()],
                    )
                    .await;
                // An error (Redis slow or down) may leave the lease valid:
                // the next renewal tries again. A `0` is final.
                if let Ok(redis::Value::Int(0)) = renewed {
                    lost_flag.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        target: "semaforo",
                        layer = "redis_semaphore",
                        name = &*sem.inner.name,
                        holder = %h,
                        "lease lost: gone (it ran out, or Redis lost its state) and no room to take it again",
                    );
                    return;
                }
            }
        });
        Lease {
            kind: LeaseKind::Redis {
                sem: self.clone(),
                holder,
                renew,
                lost,
            },
        }
    }

    /// Removes `holder`'s lease (if Redis has one) without waiting; tried
    /// again every [`RETRY_EVERY`](super::RETRY_EVERY) while Redis is slow,
    /// down or behind its open breaker, until it lands or the lease has run
    /// out by itself (a release is idempotent).
    fn release_in_background(&self, holder: String) {
        let sem = self.clone();
        in_background_until_done(self.inner.lease, move || {
            let (sem, holder) = (sem.clone(), holder.clone());
            async move {
                let keys = vec![sem.inner.key.clone(), sem.tombstone(&holder)];
                let lease_ms = sem.inner.lease.as_millis().to_string();
                sem.inner
                    .backend
                    .eval(&scripts::RELEASE, keys, vec![holder, lease_ms])
                    .await
                    .map(|_| ())
            }
        });
    }

    async fn on_failure(&self, cause: BoxError) -> Result<Lease, Rejected> {
        match self.inner.policy {
            FailurePolicy::FailOpen => Ok(Lease {
                kind: LeaseKind::Open,
            }),
            FailurePolicy::FailClosed => Err(unavailable("bulkhead", &self.inner.name, cause)),
            FailurePolicy::Local { .. } => match &self.inner.local {
                Some(b) => b.try_permit().map(|p| Lease {
                    kind: LeaseKind::Local { _permit: p },
                }),
                None => Err(unavailable("bulkhead", &self.inner.name, cause)),
            },
        }
    }

    /// Holders now, read from Redis (expired leases not counted).
    pub async fn holders(&self) -> Result<u64, BoxError> {
        let v = self
            .inner
            .backend
            .eval(&scripts::COUNT, vec![self.inner.key.clone()], Vec::new())
            .await?;
        match v {
            redis::Value::Int(n) => Ok(n.max(0) as u64),
            _ => Err("unexpected script reply".into()),
        }
    }

    /// A layer holding a slot for each call until its response (see
    /// [`SemaphoreLayer::release_on_stream_end`] for streamed answers).
    pub fn layer(&self) -> SemaphoreLayer {
        SemaphoreLayer {
            sem: self.clone(),
            _hold: PhantomData,
        }
    }
}

/// The tower layer of a [`Semaphore`]: each call holds a slot until its
/// response (default) or, with [`release_on_stream_end`](Self::release_on_stream_end)
/// / [`release_on_body_end`](Self::release_on_body_end), until its streamed
/// answer ends, fails or is dropped — an LLM answer is not over at its headers.
#[must_use = "a layer does nothing until it wraps a service"]
pub struct SemaphoreLayer<H = OnResponse> {
    sem: Semaphore,
    _hold: PhantomData<fn() -> H>,
}

impl<H> Clone for SemaphoreLayer<H> {
    fn clone(&self) -> Self {
        SemaphoreLayer {
            sem: self.sem.clone(),
            _hold: PhantomData,
        }
    }
}

impl<H> fmt::Debug for SemaphoreLayer<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphoreLayer")
            .field("sem", &self.sem)
            .finish()
    }
}

impl<H> SemaphoreLayer<H> {
    fn with_hold<H2>(self) -> SemaphoreLayer<H2> {
        SemaphoreLayer {
            sem: self.sem,
            _hold: PhantomData,
        }
    }

    /// Hold each slot until the response `Stream` ends, fails or is dropped.
    pub fn release_on_stream_end(self) -> SemaphoreLayer<OnStreamEnd> {
        self.with_hold()
    }

    /// Hold each slot until the `http::Response` body ends, fails or is
    /// dropped (feature `http`).
    #[cfg(feature = "http")]
    pub fn release_on_body_end(self) -> SemaphoreLayer<crate::guard::OnBodyEnd> {
        self.with_hold()
    }
}

impl<S, H> Layer<S> for SemaphoreLayer<H> {
    type Service = SemaphoreService<S, H>;

    fn layer(&self, inner: S) -> Self::Service {
        SemaphoreService {
            inner,
            sem: self.sem.clone(),
            _hold: PhantomData,
        }
    }
}

/// The service of a [`SemaphoreLayer`].
pub struct SemaphoreService<S, H = OnResponse> {
    inner: S,
    sem: Semaphore,
    _hold: PhantomData<fn() -> H>,
}

impl<S: Clone, H> Clone for SemaphoreService<S, H> {
    fn clone(&self) -> Self {
        SemaphoreService {
            inner: self.inner.clone(),
            sem: self.sem.clone(),
            _hold: PhantomData,
        }
    }
}

impl<S: fmt::Debug, H> fmt::Debug for SemaphoreService<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphoreService")
            .field("inner", &self.inner)
            .field("sem", &self.sem)
            .finish()
    }
}

/// A lease is released when the guarded response is over, however it ended.
impl Guard for Lease {
    fn finish(self, _end: StreamEnd) {}
}

impl<S, H, Req> Service<Req> for SemaphoreService<S, H>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
    H: Hold<S::Response>,
    H::Response<Lease>: Send + 'static,
    Req: Send + 'static,
{
    type Response = H::Response<Lease>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let sem = self.sem.clone();
        let mut svc = self.inner.clone();
        Box::pin(crate::error::AnswerOnce::new(
            "redis semaphore",
            async move {
                let lease = sem.acquire().await?;
                std::future::poll_fn(|cx| svc.poll_ready(cx))
                    .await
                    .map_err(Into::into)?;
                let res = svc.call(req).await.map_err(Into::into)?;
                Ok(H::hold(res, lease))
            },
        ))
    }
}

crate::inner_access!([S, H] SemaphoreService<S, H>);

impl crate::close::Close for Semaphore {
    fn close(&self) -> u64 {
        Semaphore::close(self)
    }
}

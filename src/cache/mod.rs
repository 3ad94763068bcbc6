//! A response cache for successful answers (feature `cache`).
//!
//! The classroom scenario's arithmetic: 50 teachers ask for "El ciclo del
//! agua"; the first answer is kept, and the next 49 who ask within the TTL
//! cost nothing (98 % saved).
//!
//! - **What is kept**: answers whose class is `Success` (the layer's
//!   [`Classify`]; never a refusal or an error) and that their
//!   [`Share::storable`] allows ([`WholeResponse`](crate::share::WholeResponse):
//!   2xx without `Cache-Control: no-store` or `private`), no larger
//!   than [`max_entry_bytes`](CacheBuilder::max_entry_bytes).
//! - **Readiness**: with a store, the service is always ready; a hit waits
//!   for nothing, a miss polls a clone of the inner service ready in its
//!   future. Streamed
//!   answers are not cached (a stream is shared while it runs by
//!   [`coalesce`](crate::coalesce) instead).
//! - **Keys**: a [`RequestKey`] (a closure, or the LLM preset's
//!   [`LlmKey`](crate::llm::LlmKey)); `None` bypasses the cache (neither
//!   read nor written). With `http` requests, [`http_cache_control`] honours
//!   the caller's `Cache-Control: no-store` (bypass) and `no-cache` (not
//!   served from the cache; the fresh answer is stored).
//! - **Time**: every entry carries its own `tokio::time::Instant`s (fresh
//!   until `ttl`, kept for errors until `ttl + stale_for`), checked on read
//!   — the crate's one clock, so paused-time tests are exact. An answer
//!   past its TTL is a miss; until `ttl + stale_for` it is still there for
//!   [`Cache::stale`], which a fallback reads to answer with the last good
//!   answer when the upstream fails (through this shared handle, not by
//!   one layer calling another).
//! - **Size**: the store is [moka](https://docs.rs/moka)'s (a well-kept
//!   concurrent cache, TinyLFU admission, size-bounded by weight): each
//!   entry weighs its bytes (the key's and the answer's, from
//!   [`RequestKey::key_size`] and [`Share::size`]) and at least
//!   `max_bytes / max_entries`, so both bounds hold. moka's own clock is
//!   not used (no moka TTL): it only bounds the size. Heap beyond the
//!   weighed bytes: moka's bookkeeping, about 350 B an entry (measured in
//!   `tests/cache.rs`: 1,000,000 keys into 10,000 entries / 4 MiB held
//!   3.6 MB, 356 B an entry with its short key and answer; the test holds
//!   it to `max_bytes` + 512 B an entry).
//! - **Served answers** are marked: [`Served::Cache`] in the response's
//!   extensions and an `age` header with [`WholeResponse`](crate::share::WholeResponse).
//!
//! Order: put it outside a [`CoalesceLayer`](crate::coalesce::CoalesceLayer)
//! (a miss then goes through the singleflight: 50 identical misses at once
//! are one call) and outside quotas, bulkheads and pacers (a hit costs no
//! quota and waits in no line). The LLM preset does both. A miss looks the
//! key up again at its first poll, just after it joined (or started) the
//! key's flight below: an answer that came and is not stored yet is still
//! the flight's (it stays joinable until the caller whose call ran drops
//! its future, after storing it), and one stored already is a hit — so
//! identical calls go upstream once however they interleave (64 tasks ×
//! 100 calls on 16 keys, 4 workers: 16 upstream calls).
//!
//! ```
//! use semaforo::cache::Cache;
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! let cache: Cache<String, String> = Cache::builder()
//!     .ttl(Duration::from_secs(300))
//!     .max_entries(10_000)
//!     .build()?;
//! let svc = cache
//!     .layer(|topic: &String| Some(topic.clone()))
//!     .layer(service_fn(|topic: String| async move {
//!         Ok::<_, std::io::Error>(format!("plan: {topic}"))
//!     }));
//! assert_eq!(svc.clone().oneshot("el ciclo del agua".into()).await?, "plan: el ciclo del agua");
//! assert_eq!(svc.oneshot("el ciclo del agua".into()).await?, "plan: el ciclo del agua");
//! assert_eq!(cache.snapshot().hits, 1);
//! # Ok(()) }
//! ```

mod tier;

pub use tier::{RemoteTier, TierCall, TierFuture, TierLayer, TierService};

use crate::classify::{Class, Classify, ErrorClassifier};
use crate::error::{BoxError, ConfigError};
use crate::observe::{Event, EventKind, ListenerSlot, Observer, ShareOutcome};
use crate::share::{Cloned, RequestKey, Served, Share};
use pin_project::pin_project;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

/// What a request says about caching (see [`http_cache_control`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CacheControl {
    /// Read and write the cache.
    #[default]
    Use,
    /// Do not serve from the cache; store the fresh answer.
    Refresh,
    /// Neither read nor write.
    Bypass,
}

/// Reads a request's `Cache-Control`: `no-store` → [`CacheControl::Bypass`],
/// `no-cache` or `max-age=0` → [`CacheControl::Refresh`] (RFC 9111 §5.2.1).
#[cfg(feature = "http")]
pub fn http_cache_control<B>(req: &http::Request<B>) -> CacheControl {
    http_cache_control_headers(req.headers())
}

/// [`http_cache_control`] of a header map.
#[cfg(feature = "http")]
pub fn http_cache_control_headers(headers: &http::HeaderMap) -> CacheControl {
    let mut out = CacheControl::Use;
    for d in crate::classify::headers::cache_control_directives(headers) {
        match d.as_str() {
            "no-store" => return CacheControl::Bypass,
            "no-cache" | "max-age=0" => out = CacheControl::Refresh,
            _ => {}
        }
    }
    out
}

/// An answer and its times (moka clones it on each read: keep `V` cheap to
/// clone, e.g. an `Arc`).
#[derive(Clone)]
struct Entry<V> {
    value: V,
    /// Its size: the key's and the answer's bytes.
    bytes: u64,
    stored: Instant,
    fresh_until: Instant,
    keep_until: Instant,
}

#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    bypassed: AtomicU64,
    stale_served: AtomicU64,
    evicted: AtomicU64,
}

struct Inner<K, V> {
    store: moka::sync::Cache<K, Entry<V>>,
    ttl: Duration,
    stale_for: Duration,
    max_entry_bytes: usize,
    /// Bytes per unit of moka's weight (a `u32`): 1 up to 4 GiB of
    /// `max_bytes`, more above, so every weight — the floor of
    /// `max_bytes / max_entries` included — fits and both bounds hold.
    unit: u64,
    obs: Observer,
    stats: Arc<Stats>,
}

/// A response cache: the store and its settings, shared by every layer it
/// makes (cheap to clone). `K` is the key type, `V` what is kept (a
/// [`Share::Kept`]: the answer itself with [`Cloned`], an
/// `Arc<KeptResponse>` with [`WholeResponse`](crate::share::WholeResponse)).
pub struct Cache<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

impl<K, V> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.inner.obs.name)
            .field("ttl", &self.inner.ttl)
            .field("stale_for", &self.inner.stale_for)
            .finish()
    }
}

/// Builder for a [`Cache`]; [`build`](Self::build) validates it.
#[derive(Debug, Clone)]
#[must_use = "call .build() to get a Cache"]
pub struct CacheBuilder {
    name: Option<Arc<str>>,
    listener: ListenerSlot,
    ttl: Duration,
    stale_for: Duration,
    max_entries: u64,
    max_bytes: u64,
    max_entry_bytes: usize,
}

/// A counts-only view of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheSnapshot {
    /// Entries held (moka's count: pending insertions and evictions may
    /// lag a little; see [`Cache::run_pending_tasks`]).
    pub entries: u64,
    /// Bytes held, as weighed (each entry at least `max_bytes / max_entries`).
    pub bytes: u64,
    /// Calls answered from the cache.
    pub hits: u64,
    /// Calls that went on (not there, or past their TTL).
    pub misses: u64,
    /// Answers stored.
    pub stores: u64,
    /// Calls that bypassed the cache.
    pub bypassed: u64,
    /// Stale answers handed out by [`Cache::stale`].
    pub stale_served: u64,
    /// Entries evicted: to keep the size bounds, or found past their keep
    /// time (TTL, plus `stale_for`).
    pub evicted: u64,
}

impl Cache<(), ()> {
    /// Starts a builder: TTL 5 minutes, nothing kept past it, 10,000
    /// entries, 64 MiB, 1 MiB per answer.
    pub fn builder() -> CacheBuilder {
        CacheBuilder {
            name: None,
            listener: ListenerSlot::default(),
            ttl: Duration::from_secs(300),
            stale_for: Duration::ZERO,
            max_entries: 10_000,
            max_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
        }
    }
}

impl CacheBuilder {
    /// Names the cache in events.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Calls `f` for each event ([`EventKind::Shared`]: hit, miss, bypassed,
    /// stale served, evicted). Listeners add up.
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// How long an answer is served (default 5 minutes).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long past its TTL an answer is kept for [`Cache::stale`]
    /// (stale-if-error, RFC 5861; default 0: not kept).
    pub fn stale_for(mut self, d: Duration) -> Self {
        self.stale_for = d;
        self
    }

    /// The most entries held (default 10,000).
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// The most bytes held, keys and answers (default 64 MiB).
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }

    /// The largest answer stored (default 1 MiB; larger ones are passed on
    /// and not kept).
    pub fn max_entry_bytes(mut self, n: usize) -> Self {
        self.max_entry_bytes = n;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field: `ttl` zero, `max_entries` or
    /// `max_bytes` zero, `max_entry_bytes` zero or above `max_bytes`.
    pub fn build<K, V>(self) -> Result<Cache<K, V>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let err = |field, reason: &str| Err(ConfigError::new("cache", field, reason.to_owned()));
        if self.ttl.is_zero() {
            return err("ttl", "must be above zero");
        }
        if self.max_entries == 0 {
            return err("max_entries", "must be at least 1");
        }
        if self.max_bytes == 0 {
            return err("max_bytes", "must be at least 1");
        }
        if self.max_entry_bytes == 0 || self.max_entry_bytes as u64 > self.max_bytes {
            return err("max_entry_bytes", "must be between 1 and max_bytes");
        }
        // moka weighs in `u32`: above 4 GiB, weigh in units of `unit`
        // bytes (a capacity of at most `u32::MAX` units, so no weight is
        // clamped and the entry floor keeps `max_entries`).
        let unit = self.max_bytes.div_ceil(u64::from(u32::MAX)).max(1);
        let capacity = (self.max_bytes / unit).max(1);
        let floor = capacity.div_ceil(self.max_entries).max(1);
        let stats = Arc::new(Stats::default());
        let obs = Observer::new(self.name, self.listener.0);
        let (s, o) = (stats.clone(), obs.clone());
        let store = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(move |_k: &K, e: &Entry<V>| {
                let units = e.bytes.div_ceil(unit).max(floor);
                u32::try_from(units).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_k, _v, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    s.evicted.fetch_add(1, Ordering::Relaxed);
                    o.emit(
                        "cache",
                        EventKind::Shared {
                            outcome: ShareOutcome::Evicted,
                        },
                    );
                }
            })
            .build();
        Ok(Cache {
            inner: Arc::new(Inner {
                store,
                ttl: self.ttl,
                stale_for: self.stale_for,
                max_entry_bytes: self.max_entry_bytes,
                unit,
                obs,
                stats,
            }),
        })
    }
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A layer reading and filling this cache, keyed by `key`, sharing
    /// answers by cloning ([`Cloned`]); see [`CacheLayer::share`] and
    /// [`CacheLayer::classify`].
    pub fn layer<RK, Req>(&self, key: RK) -> CacheLayer<RK, Req, K, V>
    where
        RK: RequestKey<Req, Key = K>,
    {
        CacheLayer {
            cache: Some(self.clone()),
            key,
            share: Cloned,
            classify: ErrorClassifier,
            control: None,
            _req: std::marker::PhantomData,
        }
    }

    /// How long an answer is served fresh.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// How long past its TTL an answer is kept for [`stale`](Self::stale).
    pub fn stale_for(&self) -> Duration {
        self.inner.stale_for
    }

    /// The answer kept for `key` even past its TTL (until `ttl +
    /// stale_for`), with its age — for a fallback that answers with the
    /// last good answer when the upstream fails. Counted as stale served
    /// when past its TTL.
    pub fn stale(&self, key: &K) -> Option<(V, Duration)> {
        let e = self.inner.store.get(key)?;
        let now = Instant::now();
        if now >= e.keep_until && now >= e.fresh_until {
            self.expire(key, now);
            return None;
        }
        if now >= e.fresh_until {
            self.inner
                .stats
                .stale_served
                .fetch_add(1, Ordering::Relaxed);
            self.inner.obs.emit(
                "cache",
                EventKind::Shared {
                    outcome: ShareOutcome::StaleServed,
                },
            );
        }
        Some((e.value, now.saturating_duration_since(e.stored)))
    }

    /// The fresh answer for `key`, if any (no counters moved).
    pub fn get(&self, key: &K) -> Option<V> {
        let e = self.inner.store.get(key)?;
        (Instant::now() < e.fresh_until).then_some(e.value)
    }

    /// Removes `key`'s answer.
    pub fn invalidate(&self, key: &K) {
        self.inner.store.invalidate(key);
    }

    /// Removes every answer.
    pub fn clear(&self) {
        self.inner.store.invalidate_all();
    }

    /// Runs moka's pending maintenance (insertions, evictions) now; the
    /// counts in [`snapshot`](Self::snapshot) are exact after it.
    pub fn run_pending_tasks(&self) {
        self.inner.store.run_pending_tasks();
    }

    /// Counts for a health endpoint.
    pub fn snapshot(&self) -> CacheSnapshot {
        let s = &self.inner.stats;
        CacheSnapshot {
            entries: self.inner.store.entry_count(),
            bytes: self
                .inner
                .store
                .weighted_size()
                .saturating_mul(self.inner.unit),
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            stores: s.stores.load(Ordering::Relaxed),
            bypassed: s.bypassed.load(Ordering::Relaxed),
            stale_served: s.stale_served.load(Ordering::Relaxed),
            evicted: s.evicted.load(Ordering::Relaxed),
        }
    }

    /// A fresh hit for `key`: the kept answer and its age (0 unless
    /// `with_age`).
    #[inline]
    fn lookup(&self, key: &K, with_age: bool) -> Option<(V, Duration)> {
        let e = self.inner.store.get(key)?;
        let now = Instant::now();
        if now < e.fresh_until {
            let age = if with_age {
                now.saturating_duration_since(e.stored)
            } else {
                Duration::ZERO
            };
            return Some((e.value, age));
        }
        if now >= e.keep_until {
            self.expire(key, now);
        }
        None
    }

    /// Removes `key`'s entry if it is still past its keep time (an answer
    /// stored for it meanwhile stays), told as [`ShareOutcome::Evicted`].
    #[cold]
    fn expire(&self, key: &K, now: Instant) {
        use moka::ops::compute::{CompResult, Op};
        let done = self
            .inner
            .store
            .entry_by_ref(key)
            .and_compute_with(|e| match e {
                Some(e) if now >= e.value().keep_until && now >= e.value().fresh_until => {
                    Op::Remove
                }
                _ => Op::Nop,
            });
        if matches!(done, CompResult::Removed(_)) {
            self.inner.stats.evicted.fetch_add(1, Ordering::Relaxed);
            self.inner.obs.emit(
                "cache",
                EventKind::Shared {
                    outcome: ShareOutcome::Evicted,
                },
            );
        }
    }

    /// Keeps `value`, `age` old already (a lower tier's answer).
    fn store(&self, key: K, value: V, bytes: usize, age: Duration) {
        if bytes > self.inner.max_entry_bytes || age >= self.inner.ttl {
            return;
        }
        let now = Instant::now();
        let stored = now.checked_sub(age).unwrap_or(now);
        let fresh_until = crate::time::after(now, self.inner.ttl - age);
        let entry = Entry {
            value,
            // At most `max_entry_bytes`, which is at most `max_bytes`.
            bytes: u64::try_from(bytes).unwrap_or(u64::MAX),
            stored,
            fresh_until,
            keep_until: crate::time::after(fresh_until, self.inner.stale_for),
        };
        self.inner.stats.stores.fetch_add(1, Ordering::Relaxed);
        self.inner.store.insert(key, entry);
    }

    fn count(&self, outcome: ShareOutcome) {
        let s = &self.inner.stats;
        let c = match outcome {
            ShareOutcome::Hit => &s.hits,
            ShareOutcome::Miss => &s.misses,
            ShareOutcome::Bypassed => &s.bypassed,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.inner
            .obs
            .emit_often("cache", EventKind::Shared { outcome });
    }
}

type ControlFn<Req> = Arc<dyn Fn(&Req) -> CacheControl + Send + Sync>;

/// The layer of a [`Cache`].
#[must_use = "a layer does nothing until it wraps a service"]
pub struct CacheLayer<RK, Req, K, V, Sh = Cloned, C = ErrorClassifier> {
    /// `None`: passes every call on (a preset without a cache).
    cache: Option<Cache<K, V>>,
    key: RK,
    share: Sh,
    classify: C,
    control: Option<ControlFn<Req>>,
    _req: std::marker::PhantomData<fn(Req)>,
}

impl<RK: Clone, Req, K, V, Sh: Clone, C: Clone> Clone for CacheLayer<RK, Req, K, V, Sh, C> {
    fn clone(&self) -> Self {
        CacheLayer {
            cache: self.cache.clone(),
            key: self.key.clone(),
            share: self.share.clone(),
            classify: self.classify.clone(),
            control: self.control.clone(),
            _req: std::marker::PhantomData,
        }
    }
}

impl<RK, Req, K, V, Sh, C> fmt::Debug for CacheLayer<RK, Req, K, V, Sh, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("cache", &self.cache)
            .finish()
    }
}

impl<RK, Req, K, V, Sh, C> CacheLayer<RK, Req, K, V, Sh, C> {
    /// The cache it reads and fills (`None` for a pass-through layer).
    pub fn cache(&self) -> Option<&Cache<K, V>> {
        self.cache.as_ref()
    }

    /// A layer that passes every call on, untouched.
    #[cfg(feature = "llm")]
    pub(crate) fn off(key: RK, share: Sh, classify: C) -> Self {
        CacheLayer {
            cache: None,
            key,
            share,
            classify,
            control: None,
            _req: std::marker::PhantomData,
        }
    }

    /// How answers are kept and handed out (e.g.
    /// [`WholeResponse`](crate::share::WholeResponse) for
    /// `http::Response<Bytes>`; its `Kept` must be the cache's `V`).
    pub fn share<Sh2>(self, share: Sh2) -> CacheLayer<RK, Req, K, V, Sh2, C> {
        CacheLayer {
            cache: self.cache,
            key: self.key,
            share,
            classify: self.classify,
            control: self.control,
            _req: std::marker::PhantomData,
        }
    }

    /// Which answers are kept: those classified `Success` (default
    /// [`ErrorClassifier`]: every `Ok`; use
    /// [`HttpClassifier`](crate::classify::HttpClassifier) or the LLM
    /// classifier to keep only good statuses).
    pub fn classify<C2>(self, classify: C2) -> CacheLayer<RK, Req, K, V, Sh, C2> {
        CacheLayer {
            cache: self.cache,
            key: self.key,
            share: self.share,
            classify,
            control: self.control,
            _req: std::marker::PhantomData,
        }
    }

    /// What each request says about caching (e.g. [`http_cache_control`]).
    pub fn control(mut self, f: impl Fn(&Req) -> CacheControl + Send + Sync + 'static) -> Self {
        self.control = Some(Arc::new(f));
        self
    }
}

impl<S, RK: Clone, Req, K, V, Sh: Clone, C: Clone> Layer<S> for CacheLayer<RK, Req, K, V, Sh, C> {
    type Service = CacheService<S, RK, Req, K, V, Sh, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CacheService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`CacheLayer`].
pub struct CacheService<S, RK, Req, K, V, Sh = Cloned, C = ErrorClassifier> {
    inner: S,
    layer: CacheLayer<RK, Req, K, V, Sh, C>,
}

impl<S: Clone, RK: Clone, Req, K, V, Sh: Clone, C: Clone> Clone
    for CacheService<S, RK, Req, K, V, Sh, C>
{
    fn clone(&self) -> Self {
        CacheService {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, RK, Req, K, V, Sh, C> fmt::Debug for CacheService<S, RK, Req, K, V, Sh, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheService")
            .field("inner", &self.inner)
            .field("cache", &self.layer.cache)
            .finish()
    }
}

impl<S, RK, Req, K, V, Sh, C> Service<Req> for CacheService<S, RK, Req, K, V, Sh, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    RK: RequestKey<Req, Key = K>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    Sh: Share<S::Response, Kept = V>,
    C: Classify<S::Response, BoxError> + Clone,
{
    type Response = Sh::Output;
    type Error = BoxError;
    type Future = CacheFuture<S, Req, K, V, Sh, C>;

    /// Always ready (with a cache): a hit waits for nothing; a miss polls a
    /// clone of the inner service ready in its future.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.layer.cache.is_none() {
            return self.inner.poll_ready(cx).map_err(Into::into);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let l = &self.layer;
        let Some(cache) = &l.cache else {
            let fut = self.inner.call(req);
            return CacheFuture::new(CacheState::Pass { fut }, None, &self.layer);
        };
        let control = l.control.as_ref().map_or(CacheControl::Use, |f| f(&req));
        let key = match control {
            CacheControl::Bypass => None,
            _ => l.key.key(&req),
        };
        let Some(key) = key else {
            cache.count(ShareOutcome::Bypassed);
            let state = CacheState::Miss(Box::pin(Miss::Ready {
                svc: self.inner.clone(),
                req: Some(req),
                key: None,
                look: false,
            }));
            return CacheFuture::new(state, Some(cache.clone()), &self.layer);
        };
        if control == CacheControl::Use {
            if let Some((kept, age)) = cache.lookup(&key, Sh::READS_SERVED) {
                cache.count(ShareOutcome::Hit);
                let out = l.share.give(&kept, Served::Cache { age, stale: false });
                return CacheFuture::new(CacheState::Hit { out: Some(out) }, None, &self.layer);
            }
        }
        // A miss for a caller that reads the cache looks again at its
        // first poll (and is counted then): an identical call in flight
        // may have stored the answer in between.
        let look = control == CacheControl::Use;
        if !look {
            cache.count(ShareOutcome::Miss);
        }
        l.key.remember(&mut req, &key);
        let key_size = l.key.key_size(&key);
        let state = CacheState::Miss(Box::pin(Miss::Ready {
            svc: self.inner.clone(),
            req: Some(req),
            key: Some(key),
            look,
        }));
        let mut fut = CacheFuture::new(state, Some(cache.clone()), &self.layer);
        fut.key_size = key_size;
        fut
    }
}

#[pin_project(project = CacheStateProj)]
enum CacheState<S: Service<Req>, Req, K, O> {
    Hit {
        out: Option<O>,
    },
    /// No cache (a preset without one): the inner call, nothing kept.
    Pass {
        #[pin]
        fut: S::Future,
    },
    /// On the heap: a hit's future stays as small as its answer (a miss
    /// goes upstream, where an allocation is noise).
    Miss(Pin<Box<Miss<S, Req, K>>>),
    /// Answered: polled again, an error (no second call).
    Done,
}

#[pin_project(project = MissProj)]
enum Miss<S: Service<Req>, Req, K> {
    Ready {
        svc: S,
        req: Option<Req>,
        key: Option<K>,
        /// Look the key up again before calling (done at the first poll).
        look: bool,
    },
    Call {
        #[pin]
        fut: S::Future,
        key: Option<K>,
    },
}

/// The future of [`CacheService`]: a hit is ready at once; a miss gets a
/// clone of the inner service ready, calls it, and stores a `Success`.
/// Cancel safety: dropping it drops the inner call; nothing is stored.
#[pin_project]
pub struct CacheFuture<S: Service<Req>, Req, K, V, Sh: Share<S::Response>, C> {
    #[pin]
    state: CacheState<S, Req, K, Sh::Output>,
    share: Sh,
    classify: C,
    cache: Option<Cache<K, V>>,
    key_size: usize,
}

impl<S: Service<Req>, Req, K, V, Sh: Share<S::Response>, C> fmt::Debug
    for CacheFuture<S, Req, K, V, Sh, C>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            CacheState::Hit { .. } => "hit",
            CacheState::Pass { .. } => "call",
            CacheState::Miss(m) => match &**m {
                Miss::Ready { .. } => "getting ready",
                Miss::Call { .. } => "call",
            },
            CacheState::Done => "done",
        };
        f.debug_struct("CacheFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S: Service<Req>, Req, K, V, Sh, C> CacheFuture<S, Req, K, V, Sh, C>
where
    Sh: Share<S::Response> + Clone,
    C: Clone,
{
    fn new<RK>(
        state: CacheState<S, Req, K, Sh::Output>,
        cache: Option<Cache<K, V>>,
        l: &CacheLayer<RK, Req, K, V, Sh, C>,
    ) -> Self {
        CacheFuture {
            state,
            share: l.share.clone(),
            classify: l.classify.clone(),
            cache,
            key_size: 0,
        }
    }
}

impl<S, Req, K, V, Sh, C> Future for CacheFuture<S, Req, K, V, Sh, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    Sh: Share<S::Response, Kept = V>,
    C: Classify<S::Response, BoxError>,
{
    type Output = Result<Sh::Output, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let out = self.as_mut().poll_state(cx);
        if out.is_ready() {
            self.project().state.set(CacheState::Done);
        }
        out
    }
}

impl<S, Req, K, V, Sh, C> CacheFuture<S, Req, K, V, Sh, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    Sh: Share<S::Response, Kept = V>,
    C: Classify<S::Response, BoxError>,
{
    fn poll_state(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Sh::Output, BoxError>> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                CacheStateProj::Done => {
                    return Poll::Ready(Err(crate::error::polled_after_done("cache")))
                }
                CacheStateProj::Hit { out } => {
                    return Poll::Ready(
                        out.take()
                            .ok_or_else(|| crate::error::polled_after_done("cache")),
                    )
                }
                CacheStateProj::Pass { fut } => {
                    let res = std::task::ready!(fut.poll(cx)).map_err(Into::into)?;
                    return Poll::Ready(Ok(this.share.pass(res)));
                }
                CacheStateProj::Miss(miss) => match miss.as_mut().project() {
                    MissProj::Ready {
                        svc,
                        req,
                        key,
                        look,
                    } => {
                        std::task::ready!(svc.poll_ready(cx)).map_err(Into::into)?;
                        let Some(r) = req.take() else {
                            return Poll::Ready(Err(crate::error::polled_after_done("cache")));
                        };
                        let key = key.take();
                        // The inner call first: under a coalescing layer it
                        // joins the key's flight (an answer that came and is
                        // not yet stored is still there) or, if none is left,
                        // the answer was stored before — and this look finds
                        // it (the inner future is then dropped unpolled).
                        let fut = svc.call(r);
                        if std::mem::take(look) {
                            if let (Some(k), Some(cache)) = (key.as_ref(), this.cache.as_ref()) {
                                if let Some((kept, age)) = cache.lookup(k, Sh::READS_SERVED) {
                                    drop(fut);
                                    cache.count(ShareOutcome::Hit);
                                    let served = Served::Cache { age, stale: false };
                                    return Poll::Ready(Ok(this.share.give(&kept, served)));
                                }
                                cache.count(ShareOutcome::Miss);
                            }
                        }
                        miss.set(Miss::Call { fut, key });
                    }
                    MissProj::Call { fut, key } => {
                        let res = std::task::ready!(fut.poll(cx)).map_err(Into::into)?;
                        let (Some(key), Some(cache)) = (key.take(), this.cache.as_ref()) else {
                            return Poll::Ready(Ok(this.share.pass(res)));
                        };
                        // A coalesced copy was stored by the caller whose call
                        // ran; a lower tier's hit is kept for what is left of
                        // its TTL.
                        let age = match this.share.served(&res) {
                            None => Duration::ZERO,
                            Some(Served::Cache { age, stale: false }) => age,
                            Some(_) => return Poll::Ready(Ok(this.share.pass(res))),
                        };
                        if !this.share.storable(&res)
                            || !matches!(this.classify.classify(Ok(&res)), Class::Success)
                        {
                            return Poll::Ready(Ok(this.share.pass(res)));
                        }
                        let (out, kept) = this.share.keep(res);
                        let bytes = this.share.size(&kept).saturating_add(*this.key_size);
                        cache.store(key, kept, bytes, age);
                        return Poll::Ready(Ok(out));
                    }
                },
            }
        }
    }
}

crate::inner_access!([S, RK, Req, K, V, Sh, C] CacheService<S, RK, Req, K, V, Sh, C>);

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller that found an entry expired removes it only if it is still
    /// expired when it gets there: an answer stored meanwhile (by another
    /// caller) stays, and nothing is told.
    #[tokio::test(start_paused = true)]
    async fn expire_keeps_an_answer_stored_meanwhile() {
        let cache: Cache<String, String> = Cache::builder()
            .ttl(Duration::from_secs(1))
            .build()
            .expect("a cache");
        let key = "a".to_owned();
        cache.store(key.clone(), "old".into(), 3, Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Found expired at `seen`; another caller stores a fresh answer
        // before this one removes it.
        let seen = Instant::now();
        cache.store(key.clone(), "new".into(), 3, Duration::ZERO);
        cache.expire(&key, seen);
        assert_eq!(cache.get(&key).as_deref(), Some("new"));
        assert_eq!(cache.snapshot().evicted, 0);
        // Still expired when removed: removed and counted once.
        tokio::time::sleep(Duration::from_secs(2)).await;
        cache.expire(&key, Instant::now());
        cache.expire(&key, Instant::now());
        cache.run_pending_tasks();
        assert_eq!(cache.snapshot().entries, 0);
        assert_eq!(cache.snapshot().evicted, 1);
    }
}

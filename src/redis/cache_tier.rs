//! The cache's shared tier in Redis ([`CacheTier`], features `redis` and
//! `cache`).

use super::RedisBackend;
use crate::cache::{RemoteTier, TierFuture};
use crate::error::{BoxError, ConfigError};
use redis::Script;
use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

/// `{value, pttl}`, or `false`.
static GET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('PTTL', KEYS[1])}",
    )
});

static SET: LazyLock<Script> =
    LazyLock::new(|| Script::new(r"redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1"));

static LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0",
    )
});

static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0",
    )
});

/// A cache tier in Redis, shared by a fleet: put it under each instance's
/// in-process [`Cache`](crate::cache::Cache) with a
/// [`TierLayer`](crate::cache::TierLayer) (the LLM preset:
/// [`LlmStackBuilder::cache_tier`](crate::llm::LlmStackBuilder::cache_tier)).
///
/// - **Entries**: `{prefix}:cache:{name}:{128-bit hash of the key}`, each
///   value holding the whole key (compared on read: two requests never
///   share an answer on a hash), set with `PX` = the TTL; values above
///   `max_value_bytes` are not stored.
/// - **Fill lock**: `SET NX PX lock_for` on `…:lock:…`, so across the fleet
///   only the first instance calls; the others wait for its value (looking
///   every 50 ms, at most `lock_for`), then call on their own. The lock is
///   given back (if still its own) after the store, or expires.
/// - **Redis trouble never fails a call**: every command goes through the
///   backend's timeout and breaker; an error is a miss (no lock, no store),
///   and the instance serves from its own tier and upstream.
/// - The age of an answer is the TTL minus Redis' `PTTL` (Redis' clock, not
///   the instances').
///
/// ```no_run
/// use semaforo::redis::{CacheTier, RedisBackend};
/// use std::time::Duration;
///
/// # async fn run() -> Result<(), semaforo::BoxError> {
/// let redis = RedisBackend::connect("redis://127.0.0.1/").await?;
/// let tier = CacheTier::builder(&redis, "plans").ttl(Duration::from_secs(3_600)).build()?;
/// # let _ = tier;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CacheTier {
    backend: RedisBackend,
    name: String,
    ttl: Duration,
    lock_for: Duration,
    max_value_bytes: usize,
}

impl fmt::Debug for CacheTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheTier")
            .field("name", &self.name)
            .field("ttl", &self.ttl)
            .field("lock_for", &self.lock_for)
            .finish()
    }
}

/// Builder for a [`CacheTier`].
#[derive(Debug, Clone)]
#[must_use = "call .build() to get a CacheTier"]
pub struct CacheTierBuilder {
    backend: RedisBackend,
    name: String,
    ttl: Duration,
    lock_for: Duration,
    max_value_bytes: usize,
}

impl CacheTier {
    /// A tier named `name` on `backend`: TTL 5 minutes, fill lock 60 s,
    /// values up to 1 MiB.
    pub fn builder(backend: &RedisBackend, name: &str) -> CacheTierBuilder {
        CacheTierBuilder {
            backend: backend.clone(),
            name: name.to_owned(),
            ttl: Duration::from_secs(300),
            lock_for: Duration::from_secs(60),
            max_value_bytes: 1 << 20,
        }
    }

    fn entry(&self, kind: &str, key: &[u8]) -> String {
        let (a, b) = crate::share::sip128(key);
        self.backend
            .key(&["cache", &self.name, kind, &format!("{a:016x}{b:016x}")])
    }
}

impl CacheTierBuilder {
    /// How long an answer is served (default 5 minutes; whole milliseconds).
    pub fn ttl(mut self, d: Duration) -> Self {
        self.ttl = d;
        self
    }

    /// The fill lock's longest hold (default 60 s): one call's time with
    /// margin.
    pub fn lock_for(mut self, d: Duration) -> Self {
        self.lock_for = d;
        self
    }

    /// The largest value stored (default 1 MiB).
    pub fn max_value_bytes(mut self, n: usize) -> Self {
        self.max_value_bytes = n;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] on a `ttl` or `lock_for` below 1 ms or above
    /// 2⁴⁶ ms (about 2,000 years), or `max_value_bytes` 0.
    pub fn build(self) -> Result<CacheTier, ConfigError> {
        const MAX_MS: u128 = 1 << 46;
        for (field, d) in [("ttl", self.ttl), ("lock_for", self.lock_for)] {
            if d.as_millis() == 0 || d.as_millis() > MAX_MS {
                return Err(ConfigError::new(
                    "redis cache tier",
                    field,
                    "must be between 1 ms and 2^46 ms".to_owned(),
                ));
            }
        }
        if self.max_value_bytes == 0 {
            return Err(ConfigError::new(
                "redis cache tier",
                "max_value_bytes",
                "must be at least 1".to_owned(),
            ));
        }
        Ok(CacheTier {
            backend: self.backend,
            name: self.name,
            ttl: self.ttl,
            lock_for: self.lock_for,
            max_value_bytes: self.max_value_bytes,
        })
    }
}

/// The stored value: the key's length, the key, then the answer.
fn wrap(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len() + value.len());
    out.extend_from_slice(&(key.len() as u64).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

/// The answer in `stored` if it was stored for `key`.
fn unwrap_for(key: &[u8], stored: &[u8]) -> Option<Vec<u8>> {
    let len = usize::try_from(u64::from_le_bytes(stored.get(..8)?.try_into().ok()?)).ok()?;
    let end = 8usize.checked_add(len)?;
    (stored.get(8..end)? == key).then(|| stored[end..].to_vec())
}

impl RemoteTier for CacheTier {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock_for(&self) -> Duration {
        self.lock_for
    }

    fn max_value_bytes(&self) -> usize {
        self.max_value_bytes
    }

    fn get(&self, key: &[u8]) -> TierFuture<Option<(Vec<u8>, Duration)>> {
        let (me, key) = (self.clone(), key.to_vec());
        Box::pin(async move {
            let v = me
                .backend
                .eval_bytes(&GET, vec![me.entry("v", &key)], Vec::new())
                .await?;
            let redis::Value::Array(items) = v else {
                return Ok(None);
            };
            let (Some(redis::Value::BulkString(stored)), Some(redis::Value::Int(pttl))) =
                (items.first(), items.get(1))
            else {
                return Ok(None);
            };
            let left = Duration::from_millis(u64::try_from(*pttl).unwrap_or(0));
            Ok(unwrap_for(&key, stored).map(|v| (v, me.ttl.saturating_sub(left))))
        })
    }

    fn set(&self, key: &[u8], value: Vec<u8>) -> TierFuture<()> {
        let (me, key) = (self.clone(), key.to_vec());
        Box::pin(async move {
            // Above the bound: not stored (whoever calls, not only the layer).
            if value.len() > me.max_value_bytes {
                return Ok(());
            }
            let stored = wrap(&key, &value);
            let ms = me.ttl.as_millis().to_string().into_bytes();
            me.backend
                .eval_bytes(&SET, vec![me.entry("v", &key)], vec![stored, ms])
                .await?;
            Ok(())
        })
    }

    fn lock(&self, key: &[u8]) -> TierFuture<Option<u64>> {
        let (me, key) = (self.clone(), key.to_vec());
        Box::pin(async move {
            let token: u64 = rand::random();
            let ms = me.lock_for.as_millis().to_string().into_bytes();
            let v = me
                .backend
                .eval_bytes(
                    &LOCK,
                    vec![me.entry("lock", &key)],
                    vec![token.to_string().into_bytes(), ms],
                )
                .await?;
            Ok(matches!(v, redis::Value::Int(1)).then_some(token))
        })
    }

    fn unlock(&self, key: &[u8], token: u64) -> TierFuture<()> {
        let (me, key) = (self.clone(), key.to_vec());
        Box::pin(async move {
            me.backend
                .eval_bytes(
                    &UNLOCK,
                    vec![me.entry("lock", &key)],
                    vec![token.to_string().into_bytes()],
                )
                .await
                .map(|_| ())
                .map_err(|e: BoxError| e)
        })
    }
}

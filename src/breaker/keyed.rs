//! One breaker per key: an upstream host, a model name, a region.
//!
//! When one model or host of a provider is down, the others keep working; a
//! single breaker would cut them all. The map is bounded: past `max_keys`, a new
//! key evicts a closed breaker in normal mode that nothing else holds. An
//! open or half-open one is never forgotten (a failing upstream could be
//! retried at full rate just by being evicted), nor one an operator set to a
//! manual mode, nor one held elsewhere — a call in flight through it (a
//! failing upstream's calls often end late, by a timeout: their failures
//! must open the key's breaker, not a forgotten one) or a handle from
//! [`KeyedBreaker::get`] (an operator's `force_open` on it must hold the
//! key): when every breaker tracked is such, the new key shares the
//! overflow breaker ([`KeyedBreaker::overflow`]) until a place frees.

use super::service::{call_through, ResponseFuture};
use super::{Breaker, BreakerBuilder, BreakerSnapshot, BreakerState};
use crate::classify::{Classify, ErrorClassifier};
use crate::error::{BoxError, ConfigError};
use crate::guard::OnResponse;
use crate::hashing::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

struct Map<K> {
    template: BreakerBuilder,
    max_keys: usize,
    breakers: RwLock<HashMap<K, Breaker>>,
    /// Shared by the keys that found no place.
    overflow: Breaker,
}

/// A bounded set of breakers, one per key, all configured alike.
///
/// ```
/// use semaforo::breaker::{Breaker, BreakerState};
///
/// let per_model = Breaker::builder().consecutive_failures(3).keyed::<String>(1_000)?;
/// let gpt = per_model.get(&"gpt-4o".to_string());
/// assert_eq!(gpt.state(), BreakerState::Closed);
/// assert_eq!(per_model.len(), 1);
/// # Ok::<(), semaforo::ConfigError>(())
/// ```
pub struct KeyedBreaker<K> {
    map: Arc<Map<K>>,
}

impl<K> Clone for KeyedBreaker<K> {
    fn clone(&self) -> Self {
        KeyedBreaker {
            map: self.map.clone(),
        }
    }
}

impl<K> fmt::Debug for KeyedBreaker<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreaker")
            .field("max_keys", &self.map.max_keys)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> KeyedBreaker<K> {
    pub(crate) fn new(template: BreakerBuilder, max_keys: usize) -> Result<Self, ConfigError> {
        if max_keys == 0 {
            return Err(ConfigError::new(
                "breaker",
                "keyed",
                "max_keys must be at least 1",
            ));
        }
        // Validated once, here, so `get` cannot fail later.
        template.validate()?;
        Ok(KeyedBreaker {
            map: Arc::new(Map {
                overflow: template.clone().assemble(),
                template,
                max_keys,
                breakers: RwLock::new(HashMap::default()),
            }),
        })
    }

    /// The breaker for `key`, created on first use — or, past `max_keys`
    /// with no breaker to evict (closed, in normal mode, held by nothing
    /// but the map), the shared [`overflow`](Self::overflow)
    /// breaker (a `force_open` on it holds every key that shares it; once a
    /// place frees, such a key gets a breaker of its own, closed).
    /// [`snapshots`](Self::snapshots) lists the keys' own breakers only.
    pub fn get(&self, key: &K) -> Breaker {
        if let Some(b) = self
            .map
            .breakers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            return b.clone();
        }
        let mut map = self.map.breakers.write().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(key) {
            return b.clone();
        }
        if map.len() >= self.map.max_keys {
            // Only a closed breaker in normal mode that only the map holds
            // is forgotten: an open or half-open one holds back a failing
            // upstream, one in a manual mode an operator's `force_open` or
            // `disable`, one held elsewhere a call in flight (its outcome is
            // recorded on it) or a handle someone may set. With none, the
            // key shares the overflow breaker (`max_keys` bounds the memory
            // whatever the keys' states).
            let victim = map
                .iter()
                .find(|(_, b)| {
                    Arc::strong_count(&b.shared) == 1
                        && b.is_normal()
                        && b.state() == BreakerState::Closed
                })
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    map.remove(&k);
                }
                None => return self.map.overflow.clone(),
            }
        }
        let breaker = self.map.template.clone().assemble();
        map.insert(key.clone(), breaker.clone());
        breaker
    }

    /// The breaker shared by keys that found no place: past `max_keys`,
    /// when every breaker tracked is open, half-open or in a manual mode
    /// (none may be forgotten).
    pub fn overflow(&self) -> &Breaker {
        &self.map.overflow
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.map
            .breakers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// `true` when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key's snapshot (for a deep health check).
    pub fn snapshots(&self) -> Vec<(K, BreakerSnapshot)> {
        self.map
            .breakers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, b)| (k.clone(), b.snapshot()))
            .collect()
    }

    /// A layer that picks each request's breaker with `key`.
    pub fn layer<Req, F>(&self, key: F) -> KeyedBreakerLayer<K, F, ErrorClassifier>
    where
        F: Fn(&Req) -> K + Clone,
    {
        KeyedBreakerLayer {
            keyed: self.clone(),
            key,
            classify: ErrorClassifier,
        }
    }
}

/// The layer of a [`KeyedBreaker`].
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct KeyedBreakerLayer<K, F, C> {
    keyed: KeyedBreaker<K>,
    key: F,
    classify: C,
}

impl<K, F, C> KeyedBreakerLayer<K, F, C> {
    /// Replaces the classifier (see [`BreakerLayer::classify`](super::BreakerLayer::classify)).
    pub fn classify<C2>(self, classify: C2) -> KeyedBreakerLayer<K, F, C2> {
        KeyedBreakerLayer {
            keyed: self.keyed,
            key: self.key,
            classify,
        }
    }
}

impl<K, F, C> fmt::Debug for KeyedBreakerLayer<K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreakerLayer").finish_non_exhaustive()
    }
}

impl<S, K, F: Clone, C: Clone> Layer<S> for KeyedBreakerLayer<K, F, C> {
    type Service = KeyedBreakerService<S, K, F, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedBreakerService {
            inner,
            keyed: self.keyed.clone(),
            key: self.key.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service of a [`KeyedBreakerLayer`].
#[derive(Clone)]
pub struct KeyedBreakerService<S, K, F, C> {
    inner: S,
    keyed: KeyedBreaker<K>,
    key: F,
    classify: C,
}

impl<S: fmt::Debug, K, F, C> fmt::Debug for KeyedBreakerService<S, K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreakerService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, K, F, C, Req> Service<Req> for KeyedBreakerService<S, K, F, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    F: Fn(&Req) -> K,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C, OnResponse>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let breaker = self.keyed.get(&(self.key)(&req));
        call_through(&breaker.shared, &mut self.inner, &self.classify, req)
    }
}

crate::inner_access!([S, K, F, C] KeyedBreakerService<S, K, F, C>);

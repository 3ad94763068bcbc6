//! One pacer per key — a model, a deployment — given per key or built from a
//! template, behind one layer.
//!
//! Providers limit each model on its own: one API key, three models, three
//! budgets. A [`KeyedPace`] keeps one [`Pace`] per key, read from each request
//! by a [`PaceKey`], so a model at its limit makes only its own callers wait.
//! A limit the models share (an org-wide TPM) is given with
//! [`KeyedPaceBuilder::shared`]: a call reserves on its model's cells and the
//! shared cells at the same instant. It waits in its model's line until its
//! model's cells have room (holding none of the shared budget meanwhile),
//! then in one line across models for the shared cells, first come first
//! served — a large call is not passed for ever by a stream of small ones of
//! another model, and a refund on the shared cells wakes whoever is next.
//! `max_wait` counts the wait for both. Two pacers layered one below the
//! other would not do: the lower one's line releases a model's calls bunched,
//! past the model's own limit.
//!
//! ```
//! use semaforo::pace::{Cost, KeyedPace, Pace};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! // 10,000 tokens a minute for each model not named, 30,000 for gpt-4o,
//! // and 50,000 a minute for all of them together.
//! let models = KeyedPace::builder(Pace::builder().tokens_per_minute(10_000))
//!     .key("gpt-4o", Pace::builder().tokens_per_minute(30_000))
//!     .shared(Pace::builder().tokens_per_minute(50_000))
//!     .build()?;
//! let llm = ServiceBuilder::new()
//!     .layer(
//!         models
//!             .layer()
//!             .key(|(model, _): &(&'static str, u64)| Some(model.to_string()))
//!             .weigh(|(_, tokens): &(&'static str, u64)| Cost::tokens(*tokens)),
//!     )
//!     .service(service_fn(|(_, n): (&'static str, u64)| async move { Ok::<_, std::io::Error>(n) }));
//! assert_eq!(llm.clone().oneshot(("gpt-4o", 25_000)).await?, 25_000);
//! assert_eq!(models.keys(), vec!["gpt-4o".to_string()]);
//! # Ok(()) }
//! ```

use super::service::{call_through, AtResponse, NoObserve, OneRequest, ResponseFuture};
use super::{Deliver, Observe, Pace, PaceBuilder, Shared, Weigh};
use crate::classify::Classify;
use crate::error::{BoxError, ConfigError};
use crate::hashing::HashMap;
use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// Reads the key of a request (its model). Implemented for every
/// `Fn(&Req) -> Option<String>`; `None` (no key) is paced by the overflow
/// pacer (see [`KeyedPaceBuilder::max_keys`]), which also reserves on the
/// shared limits. Implement it to borrow the key instead of allocating:
///
/// ```
/// use semaforo::pace::PaceKey;
/// use std::borrow::Cow;
///
/// struct Chat { model: String, prompt: String }
///
/// #[derive(Clone)]
/// struct ByModel;
/// impl PaceKey<Chat> for ByModel {
///     fn key<'a>(&self, req: &'a Chat) -> Option<Cow<'a, str>> {
///         Some(Cow::Borrowed(&req.model))
///     }
/// }
/// let chat = Chat { model: "gpt-4o".into(), prompt: String::new() };
/// assert_eq!(ByModel.key(&chat).as_deref(), Some("gpt-4o"));
/// # let _ = chat.prompt;
/// ```
pub trait PaceKey<Req> {
    /// The key of `req`, borrowed from it where it can be.
    fn key<'a>(&self, req: &'a Req) -> Option<Cow<'a, str>>;
}

impl<Req, F: Fn(&Req) -> Option<String>> PaceKey<Req> for F {
    #[inline]
    fn key<'a>(&self, req: &'a Req) -> Option<Cow<'a, str>> {
        self(req).map(Cow::Owned)
    }
}

/// The value of a request header as the key (e.g. `x-user-id` for a
/// per-user budget); no header, or a value that is not visible ASCII, has
/// no key (feature `http`).
#[cfg(feature = "http")]
impl<B> PaceKey<http::Request<B>> for http::HeaderName {
    #[inline]
    fn key<'a>(&self, req: &'a http::Request<B>) -> Option<Cow<'a, str>> {
        req.headers()
            .get(self)
            .and_then(|v| v.to_str().ok())
            .map(Cow::Borrowed)
    }
}

/// No key: every request is paced by the overflow pacer.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKey;

impl<Req> PaceKey<Req> for NoKey {
    #[inline]
    fn key<'a>(&self, _req: &'a Req) -> Option<Cow<'a, str>> {
        None
    }
}

/// One [`Pace`] per key; cheap to clone, clones share the pacers.
#[derive(Clone)]
pub struct KeyedPace {
    inner: Arc<Keyed>,
}

struct Keyed {
    name: Option<Arc<str>>,
    /// Given per key at build time.
    given: HashMap<String, Pace>,
    /// Built from the template on first use.
    /// Read on every call (many readers), written once per new key.
    built: RwLock<HashMap<String, Pace>>,
    /// `None`: one pacer for every request (`From<Pace>`).
    template: Option<PaceBuilder>,
    max_keys: usize,
    /// Requests without a key, and keys past `max_keys`.
    overflow: Pace,
    /// The cells every key's calls also reserve on.
    shared: Option<Pace>,
    closed: std::sync::atomic::AtomicBool,
    /// When the keys were last swept for idle ones (at most once a second).
    swept: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// A key was sent to the overflow pacer for want of a place: a key
    /// built later may have spent from it.
    overflowed: std::sync::atomic::AtomicBool,
    /// Every pacer here records its starts (see `stats`): one flag for
    /// all, the keys built later included.
    watched: Arc<std::sync::atomic::AtomicBool>,
}

impl fmt::Debug for KeyedPace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedPace")
            .field("name", &self.inner.name)
            .field("keys", &self.keys())
            .finish_non_exhaustive()
    }
}

/// Builder for [`KeyedPace`]; [`build`](Self::build) validates it.
#[derive(Debug, Clone)]
#[must_use = "call .build() to get a KeyedPace"]
pub struct KeyedPaceBuilder {
    name: Option<Arc<str>>,
    template: PaceBuilder,
    given: Vec<(String, PaceBuilder)>,
    max_keys: usize,
    shared: Option<PaceBuilder>,
}

/// Keys longer than this (bytes) get no pacer of their own (the overflow
/// pacer): memory stays bounded by `max_keys` times this.
const MAX_KEY_LEN: usize = 256;

/// How many keys a [`KeyedPace`] builds from its template, by default.
const DEFAULT_MAX_KEYS: usize = 1_024;

impl KeyedPaceBuilder {
    /// Names the keyed pacer in errors (each key's pacer is named
    /// `name/key`, unless its builder has a name).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The pacer of `key` (a model with limits of its own).
    pub fn key(mut self, key: impl Into<String>, pace: PaceBuilder) -> Self {
        self.given.push((key.into(), pace));
        self
    }

    /// Limits every key's calls share (an org-wide TPM): each call reserves
    /// on them and on its key's limits at the same instant. Its `max_wait`,
    /// pause and header learning are not used (a key's own apply).
    pub fn shared(mut self, limits: PaceBuilder) -> Self {
        self.shared = Some(limits);
        self
    }

    /// How many keys not given get a pacer of their own from the template
    /// (default 1,024). When they are all taken, a new key takes the place
    /// of keys whose pacer is idle — like a new one: nothing in line, every
    /// cell full again, nothing learned from the upstream, no call holding
    /// it — looked for at most once a second; the keys past it, keys longer
    /// than 256 bytes, and requests without a key share one more pacer built
    /// from the template.
    /// A call that could never be paid builds none. Memory stays bounded
    /// whatever keys the requests carry (1,024 × 256 bytes of names at most,
    /// each kept twice: the key and its pacer's name).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// The [`ConfigError`] of the template's or a key's pacer builder, or
    /// `key` when a key is given twice.
    pub fn build(self) -> Result<KeyedPace, ConfigError> {
        let watched = Arc::<std::sync::atomic::AtomicBool>::default();
        let template = self.template.watched_by(watched.clone());
        let shared = match self.shared {
            Some(b) => Some(
                match &self.name {
                    Some(n) if !b.has_name() => b.name(format!("{n}#shared")),
                    _ => b,
                }
                .watched_by(watched.clone())
                .build()?,
            ),
            None => None,
        };
        let parent = shared.as_ref().map(|p| p.shared.clone());
        let named = |b: PaceBuilder, key: &str| {
            match (&self.name, b.has_name()) {
                (Some(n), false) => b.name(format!("{n}/{key}")),
                _ => b,
            }
            .with_parent(parent.clone())
            .watched_by(watched.clone())
        };
        // Named apart from every key (a key is always after a `/`).
        let overflow = match (&self.name, template.has_name()) {
            (Some(n), false) => template.clone().name(format!("{n}#overflow")),
            _ => template.clone(),
        }
        .with_parent(parent.clone())
        .build()?;
        let mut given = HashMap::with_capacity_and_hasher(self.given.len(), Default::default());
        for (key, b) in self.given {
            let pace = named(b, &key).build()?;
            if given.insert(key.clone(), pace).is_some() {
                return Err(ConfigError::new(
                    "keyed pace",
                    "key",
                    format!("'{key}' is given twice"),
                ));
            }
        }
        Ok(KeyedPace {
            inner: Arc::new(Keyed {
                name: self.name,
                given,
                built: RwLock::new(HashMap::default()),
                template: Some(template),
                max_keys: self.max_keys,
                overflow,
                shared,
                closed: std::sync::atomic::AtomicBool::new(false),
                swept: std::sync::Mutex::new(None),
                overflowed: std::sync::atomic::AtomicBool::new(false),
                watched,
            }),
        })
    }
}

impl KeyedPace {
    /// A keyed pacer whose keys not given are paced by a pacer built from
    /// `template`.
    pub fn builder(template: PaceBuilder) -> KeyedPaceBuilder {
        KeyedPaceBuilder {
            name: None,
            template,
            given: Vec::new(),
            max_keys: DEFAULT_MAX_KEYS,
            shared: None,
        }
    }

    /// The name given to the builder.
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// The pacer `key`'s calls use, as a call would get it: built from the
    /// template on first use (taking one of the `max_keys` places); `None`,
    /// and keys past `max_keys`, get the overflow pacer. To look without
    /// building, use [`peek`](Self::peek).
    pub fn get(&self, key: Option<&str>) -> Pace {
        self.pick(key, None)
    }

    /// The pacer of `key` if it has one of its own (given, or built by a
    /// call), without building one.
    pub fn peek(&self, key: &str) -> Option<Pace> {
        if let Some(p) = self.inner.given.get(key) {
            return Some(p.clone());
        }
        self.built().get(key).cloned()
    }

    /// The shared limits, if given (to watch them, or for a health check).
    pub fn shared(&self) -> Option<&Pace> {
        self.inner.shared.as_ref()
    }

    /// The keys with a pacer of their own (the given ones, and the ones
    /// built by calls), sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.inner.given.keys().cloned().collect();
        keys.extend(self.built().keys().cloned());
        keys.sort();
        keys
    }

    /// A layer pacing every request by the pacer of its key; set the key with
    /// [`KeyedPaceLayer::key`] and the cost with [`KeyedPaceLayer::weigh`].
    pub fn layer(&self) -> KeyedPaceLayer {
        KeyedPaceLayer {
            keyed: self.clone(),
            key: NoKey,
            weigh: OneRequest,
            observe: NoObserve,
            classify: crate::classify::ErrorClassifier,
            deliver: AtResponse,
        }
    }

    fn built(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Pace>> {
        self.inner.built.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The pacer of `key`; a key without one gets one built from the
    /// template — kept, unless `cost` could never be paid or a budget of the
    /// shared cells refuses it now: then the new pacer only refuses this
    /// call (under the key's name) and is dropped, since a call that never
    /// reaches the upstream takes no place among `max_keys`.
    fn pick(&self, key: Option<&str>, cost: Option<&super::Cost>) -> Pace {
        let Some(key) = key else {
            return self.inner.overflow.clone();
        };
        if let Some(p) = self.inner.given.get(key) {
            return p.clone();
        }
        let Some(template) = &self.inner.template else {
            return self.inner.overflow.clone();
        };
        // A key seen before: a shared read, no writer in the way.
        {
            let built = self.built();
            if let Some(p) = built.get(key) {
                return p.clone();
            }
            if key.len() > MAX_KEY_LEN
                || (built.len() >= self.inner.max_keys && !self.may_sweep(false))
            {
                self.inner
                    .overflowed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return self.inner.overflow.clone();
            }
        }
        let mut built = self.inner.built.write().unwrap_or_else(|e| e.into_inner());
        // Built by another caller between the read and the write.
        if let Some(p) = built.get(key) {
            return p.clone();
        }
        if built.len() >= self.inner.max_keys && self.may_sweep(true) {
            // Keys whose pacer is like a new one (nothing in line, every
            // cell full, nothing learned) and held by no call: forgetting
            // them changes nothing.
            let now = tokio::time::Instant::now();
            built.retain(|_, p| Arc::strong_count(&p.shared) > 1 || !p.shared.lock().is_idle(now));
        }
        if built.len() >= self.inner.max_keys {
            self.inner
                .overflowed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return self.inner.overflow.clone();
        }
        if self.overflow_waits() {
            return self.inner.overflow.clone();
        }
        let Some(pace) = self.fresh(template, key) else {
            return self.inner.overflow.clone();
        };
        // Refused whatever pacer takes it: its own refuses it (the refusal
        // and its events name this key's pacer), and is not kept.
        if !self.refused_anyway(cost) {
            built.insert(key.to_owned(), pace.clone());
        }
        pace
    }

    /// When a call of `cost` under `key` could start, reserving nothing and
    /// keeping no pacer ([`Pace::start_for`] on the key's pacer, with the
    /// shared limits): a key without a pacer yet is asked of the pacer its
    /// first call would get (a new one from the template, under the shared
    /// limits; the overflow pacer when no place is left, a place that the
    /// sweep due at that call would free counting as left), no key of the
    /// overflow pacer. `None` when the call would be refused (a cost above
    /// the template's burst included). The pacer's own `max_wait` is not
    /// applied (compare the answer with it).
    pub fn start_for(&self, key: Option<&str>, cost: &super::Cost) -> Option<tokio::time::Instant> {
        self.start_for_at(key, cost, tokio::time::Instant::now())
    }

    /// [`start_for`](Self::start_for) with the time read by the caller.
    pub(crate) fn start_for_at(
        &self,
        key: Option<&str>,
        cost: &super::Cost,
        now: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        match self.outlook_at(key, cost, now) {
            super::Outlook::Never | super::Outlook::Refused(_) => None,
            super::Outlook::At(at) | super::Outlook::Late(at) => Some(at),
        }
    }

    /// Whether asking about `key` would build a pacer to ask (a key of the
    /// template without a pacer yet): a router's fast path leaves it to the
    /// full scan, which holds no lock of its own meanwhile.
    pub(crate) fn unbuilt(&self, key: Option<&str>) -> bool {
        match key {
            Some(k) if self.inner.template.is_some() => self.peek(k).is_none(),
            _ => false,
        }
    }

    /// [`start_for_at`](Self::start_for_at), and whether the pacer that
    /// would take it refuses it at once for its `max_wait`.
    pub(crate) fn outlook_at(
        &self,
        key: Option<&str>,
        cost: &super::Cost,
        now: tokio::time::Instant,
    ) -> super::Outlook {
        let overflow = || self.inner.overflow.outlook_at(cost, now);
        let Some(key) = key else {
            return overflow();
        };
        if let Some(p) = self.peek(key) {
            return p.outlook_at(cost, now);
        }
        // A key without a pacer yet: the one its first call would get —
        // the overflow pacer (no template, a key too long, no place left,
        // or `pick`'s other reasons), else a new one from the template,
        // built here to be asked and dropped.
        let Some(template) = &self.inner.template else {
            return overflow();
        };
        if key.len() > MAX_KEY_LEN
            || (self.built().len() >= self.inner.max_keys && !self.sweep_frees_a_place(now))
            || self.overflow_waits()
        {
            return overflow();
        }
        match self.fresh(template, key) {
            Some(p) => p.outlook_at(cost, now),
            None => overflow(),
        }
    }

    /// The overflow pacer: requests without a key, and keys past
    /// `max_keys` (the only pacer of one made `From<Pace>`).
    pub fn overflow(&self) -> &Pace {
        &self.inner.overflow
    }

    /// Every key's pacer (the given keys and the ones built by calls),
    /// sorted by key; the overflow pacer and the shared limits are
    /// [`overflow`](Self::overflow) and [`shared`](Self::shared).
    pub fn pacers(&self) -> Vec<(String, Pace)> {
        let mut all: Vec<(String, Pace)> = self
            .inner
            .given
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        all.extend(self.built().iter().map(|(k, p)| (k.clone(), p.clone())));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Whether a key that has room for a pacer of its own still goes to
    /// the overflow pacer: calls that went there for want of a place still
    /// wait in its line (this key may be among them: a pacer of its own now
    /// would count their tokens as spent now, while they start later, and
    /// its next calls could start early).
    fn overflow_waits(&self) -> bool {
        self.inner
            .overflowed
            .load(std::sync::atomic::Ordering::Relaxed)
            && self.inner.overflow.shared.lock().line_len() > 0
    }

    /// Whether `cost` is refused whatever pacer takes it: it could never
    /// be paid (the template's limits, or the shared cells'), or a budget
    /// of the shared cells refuses it now. Such a call never reaches the
    /// upstream, so it takes no place among `max_keys`.
    fn refused_anyway(&self, cost: Option<&super::Cost>) -> bool {
        let Some(cost) = cost else {
            return false;
        };
        let never = |p: &Pace| p.shared.lock().never_fits(cost).is_some();
        let now = tokio::time::Instant::now();
        let over = |p: &Pace| {
            p.shared
                .lock()
                .budget_refusal_with(cost, now, None)
                .is_some()
        };
        // The overflow pacer has the template's limits.
        never(&self.inner.overflow)
            || self
                .inner
                .shared
                .as_ref()
                .is_some_and(|p| never(p) || over(p))
    }

    /// A new pacer for `key` from the template, as its first call gets it:
    /// under the shared cells, closed if the keyed pacer is, and as spent as
    /// the overflow pacer when keys went there (never more than its budget).
    fn fresh(&self, template: &PaceBuilder, key: &str) -> Option<Pace> {
        let b = match (&self.inner.name, template.has_name()) {
            (Some(n), false) => template.clone().name(format!("{n}/{key}")),
            _ => template.clone(),
        }
        .with_parent(self.inner.shared.as_ref().map(|p| p.shared.clone()));
        // The template was built once already (the overflow pacer): it builds.
        let pace = b.build().ok()?;
        if self.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            pace.close();
        }
        if self
            .inner
            .overflowed
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let now = tokio::time::Instant::now();
            let from = self.inner.overflow.shared.lock();
            pace.shared.lock().spend_like(&from, now);
        }
        Some(pace)
    }

    /// Whether a sweep of idle keys is due (one a second at most); `take`
    /// records one.
    /// Whether the next key to be built would find a place: a sweep is due
    /// and would forget a key ([`pick`](Self::pick)'s rule: a pacer like a
    /// new one, held by no call). Only asked when every place is taken.
    fn sweep_frees_a_place(&self, now: tokio::time::Instant) -> bool {
        self.may_sweep(false)
            && self
                .built()
                .values()
                .any(|p| Arc::strong_count(&p.shared) == 1 && p.shared.lock().is_idle(now))
    }

    fn may_sweep(&self, take: bool) -> bool {
        let now = tokio::time::Instant::now();
        let mut last = self.inner.swept.lock().unwrap_or_else(|e| e.into_inner());
        let due = last
            .is_none_or(|t| now.saturating_duration_since(t) >= std::time::Duration::from_secs(1));
        if due && take {
            *last = Some(now);
        }
        due
    }

    fn shared_for(&self, key: Option<&str>, cost: &super::Cost) -> Arc<Shared> {
        self.pick(key, Some(cost)).shared
    }
}

/// One pacer for every request, whatever its key: what a preset keyed by
/// model does with a [`Pace`] given whole.
impl From<Pace> for KeyedPace {
    fn from(pace: Pace) -> KeyedPace {
        KeyedPace {
            inner: Arc::new(Keyed {
                watched: pace.shared.stats.watched_flag(),
                name: pace.name().map(Arc::from),
                given: HashMap::default(),
                built: RwLock::new(HashMap::default()),
                template: None,
                max_keys: 0,
                overflow: pace,
                shared: None,
                closed: std::sync::atomic::AtomicBool::new(false),
                swept: std::sync::Mutex::new(None),
                overflowed: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }
}

impl crate::eta::EtaSource for KeyedPace {
    /// From now on, every pacer here records its starts, the keys built
    /// later too (one flag for all).
    fn watch(&self) {
        self.inner
            .watched
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every key's line and the shared cells, played forward: the calls
    /// waiting in any key's line count as waiting (not running upstream),
    /// the starts of every key count as started, and each further call is
    /// played as one of the busiest key (the longest line; ties: the one
    /// that started a call last) that must also fit the shared cells. A
    /// bulkhead above sees one line for every model: exact with one model
    /// in use, an estimate with several.
    fn projection(&self, now: tokio::time::Instant) -> Box<dyn crate::eta::Projection + '_> {
        use crate::eta::Projection as _;
        let mut pacers: Vec<Pace> = self.inner.given.values().cloned().collect();
        pacers.extend(self.built().values().cloned());
        pacers.push(self.inner.overflow.clone());
        let mut waiting = 0usize;
        let mut started = Vec::new();
        let mut best: Option<super::state::Projection> = None;
        for p in &pacers {
            let proj = p.shared.lock().projection(now);
            waiting = waiting.saturating_add(proj.waiting());
            started.extend_from_slice(proj.started());
            let rank = |x: &super::state::Projection| (x.waiting(), x.started().last().copied());
            if best.as_ref().is_none_or(|b| rank(&proj) > rank(b)) {
                best = Some(proj);
            }
        }
        started.sort();
        let keep = started.len().saturating_sub(256);
        started.drain(..keep);
        let key = match best {
            Some(b) => b,
            None => self.inner.overflow.shared.lock().projection(now),
        };
        Box::new(KeyedProjection {
            key,
            shared: self
                .inner
                .shared
                .as_ref()
                .map(|s| s.shared.lock().projection(now)),
            waiting,
            started,
        })
    }
}

/// [`KeyedPace`]'s projection: the busiest key's cells and the shared ones.
struct KeyedProjection {
    key: super::state::Projection,
    shared: Option<super::state::Projection>,
    waiting: usize,
    started: Vec<tokio::time::Instant>,
}

impl crate::eta::Projection for KeyedProjection {
    fn started(&self) -> &[tokio::time::Instant] {
        &self.started
    }

    fn waiting(&self) -> usize {
        self.waiting
    }

    fn next_start(&mut self, not_before: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let cost = self.key.pop_cost()?;
        let mut start = self.key.start_at(&cost, not_before)?;
        if let Some(shared) = &mut self.shared {
            // The calls in the shared line are in their key's line too: they
            // are played from there (the busiest key's), not twice.
            start = start.max(shared.start_at(&cost, start)?);
            shared.reserve_from(&cost, start);
        }
        self.key.reserve_from(&cost, start);
        Some(start)
    }
}

impl crate::close::Close for KeyedPace {
    /// Closes every key's pacer (and the ones built later); returns how many
    /// waiters were released.
    fn close(&self) -> u64 {
        // Set first: a pacer built from now on is closed when built.
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let mut released = self.inner.overflow.close();
        for p in self.inner.given.values() {
            released = released.saturating_add(p.close());
        }
        let built: Vec<Pace> = self.built().values().cloned().collect();
        for p in built {
            released = released.saturating_add(p.close());
        }
        released
    }
}

/// The tower [`Layer`] of a [`KeyedPace`]: the same adapters as
/// [`PaceLayer`](super::PaceLayer), and [`key`](Self::key).
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct KeyedPaceLayer<
    K = NoKey,
    W = OneRequest,
    O = NoObserve,
    C = crate::classify::ErrorClassifier,
    D = AtResponse,
> {
    keyed: KeyedPace,
    key: K,
    weigh: W,
    observe: O,
    classify: C,
    deliver: D,
}

impl<K, W, O, C, D> fmt::Debug for KeyedPaceLayer<K, W, O, C, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedPaceLayer")
            .field("name", &self.keyed.inner.name)
            .finish_non_exhaustive()
    }
}

impl<K, W, O, C, D> KeyedPaceLayer<K, W, O, C, D> {
    /// How the key (the model) is read from each request.
    pub fn key<K2>(self, key: K2) -> KeyedPaceLayer<K2, W, O, C, D> {
        KeyedPaceLayer {
            keyed: self.keyed,
            key,
            weigh: self.weigh,
            observe: self.observe,
            classify: self.classify,
            deliver: self.deliver,
        }
    }

    /// How much each request costs (see [`PaceLayer::weigh`](super::PaceLayer::weigh)).
    pub fn weigh<W2>(self, weigh: W2) -> KeyedPaceLayer<K, W2, O, C, D> {
        KeyedPaceLayer {
            keyed: self.keyed,
            key: self.key,
            weigh,
            observe: self.observe,
            classify: self.classify,
            deliver: self.deliver,
        }
    }

    /// What each response says (see [`PaceLayer::observe`](super::PaceLayer::observe)).
    pub fn observe<O2>(self, observe: O2) -> KeyedPaceLayer<K, W, O2, C, D> {
        KeyedPaceLayer {
            keyed: self.keyed,
            key: self.key,
            weigh: self.weigh,
            observe,
            classify: self.classify,
            deliver: self.deliver,
        }
    }

    /// How results are classified (see [`PaceLayer::classify`](super::PaceLayer::classify)).
    pub fn classify<C2>(self, classify: C2) -> KeyedPaceLayer<K, W, O, C2, D> {
        KeyedPaceLayer {
            keyed: self.keyed,
            key: self.key,
            weigh: self.weigh,
            observe: self.observe,
            classify,
            deliver: self.deliver,
        }
    }

    /// How the response is handed back (see [`PaceLayer::deliver`](super::PaceLayer::deliver)).
    pub fn deliver<D2>(self, deliver: D2) -> KeyedPaceLayer<K, W, O, C, D2> {
        KeyedPaceLayer {
            keyed: self.keyed,
            key: self.key,
            weigh: self.weigh,
            observe: self.observe,
            classify: self.classify,
            deliver,
        }
    }
}

impl<S, K: Clone, W: Clone, O: Clone, C: Clone, D: Clone> Layer<S>
    for KeyedPaceLayer<K, W, O, C, D>
{
    type Service = KeyedPaceService<S, K, W, O, C, D>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedPaceService {
            inner,
            keyed: self.keyed.clone(),
            key: self.key.clone(),
            weigh: self.weigh.clone(),
            observe: self.observe.clone(),
            classify: self.classify.clone(),
            deliver: self.deliver.clone(),
        }
    }
}

/// The service of a [`KeyedPaceLayer`]; its future is the pacer's own
/// [`ResponseFuture`] (the same waiting, cancel safety and learning).
#[derive(Clone)]
pub struct KeyedPaceService<
    S,
    K = NoKey,
    W = OneRequest,
    O = NoObserve,
    C = crate::classify::ErrorClassifier,
    D = AtResponse,
> {
    inner: S,
    keyed: KeyedPace,
    key: K,
    weigh: W,
    observe: O,
    classify: C,
    deliver: D,
}

impl<S: fmt::Debug, K, W, O, C, D> fmt::Debug for KeyedPaceService<S, K, W, O, C, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedPaceService")
            .field("inner", &self.inner)
            .field("name", &self.keyed.inner.name)
            .finish_non_exhaustive()
    }
}

impl<S, K, W, O, C, D, Req> Service<Req> for KeyedPaceService<S, K, W, O, C, D>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: PaceKey<Req>,
    W: Weigh<Req>,
    O: Observe<S::Response> + Clone,
    C: Classify<S::Response, S::Error> + Clone,
    D: Deliver<S::Response> + Clone,
{
    type Response = D::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, O, C, D>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let cost = self.weigh.weigh(&req);
        let shared = self.keyed.shared_for(self.key.key(&req).as_deref(), &cost);
        call_through(
            shared,
            &mut self.inner,
            cost,
            req,
            self.observe.clone(),
            self.classify.clone(),
            self.deliver.clone(),
        )
    }
}

crate::inner_access!([S, K, W, O, C, D] KeyedPaceService<S, K, W, O, C, D>);

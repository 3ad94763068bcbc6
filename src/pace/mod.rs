//! Pace outbound calls to an upstream's budget: requests **and** tokens per
//! minute at once, with reservations, reconciliation and feedback.
//!
//! The classroom scenario: 50 teachers × 2,000 tokens against a 30,000 tokens/min, 500
//! requests/min tier. A concurrency cap does not respect a tokens-per-minute
//! budget — 100,000 tokens need at least ~3.3 minutes whatever the concurrency.
//! The pacer does:
//!
//! - **Several dimensions at once** (requests, all tokens, input tokens not
//!   read from the cache, output tokens — per minute, per 10 s, per day…), each
//!   a GCRA cell whose burst is the whole window by default (as OpenAI's buckets
//!   are) or what [`Limit::burst`] says (Azure's 10 s windows). A call's
//!   [`Cost`] (`weigh(&Req)`: one request, input estimate, output at
//!   `max_tokens`) is reserved on all of them together, then the call goes.
//!   Provider profiles (`llm::Profile`, feature `llm`) give each provider's set.
//! - **A FIFO line**: when the budget is spent, callers wait in arrival order and
//!   each reserves when it reaches the head and fits, so the upstream sees a
//!   smooth rate within its burst. A caller that leaves the line held nothing and
//!   everyone behind it moves up.
//! - **Spend and calendars**: a [`Unit::Spend`] limit counts money
//!   ([`Cost::spend`], micro-dollars) and refuses at once what it cannot pay
//!   now ([`Limit::spend_per_day`]: a limit's own [`Limit::max_wait`]); a
//!   window can reset at a time zone's midnight or first of the month
//!   ([`Limit::resets_daily`]: Gemini's requests per day, a daily budget)
//!   instead of rolling.
//! - **`max_wait`**: a call that would start later than that is refused at once
//!   with [`RejectKind::BudgetExceeded`](crate::RejectKind::BudgetExceeded) and the
//!   exact `retry_after`, reserving nothing. A cost larger than a dimension's
//!   whole burst can never fit: refused at once too, without `retry_after`.
//! - **Reconcile**: when the response says what the call really cost (its
//!   `usage`: input, cached input, output), the estimate is replaced on every
//!   dimension — refund or debt. A debt of requests or tokens can at most
//!   empty a cell (a usage of `u64::MAX` tokens must not stall the pacer for
//!   ages: what is above empty is forgotten); a spend debt is owed in full.
//!   A refund moves the cell back by the
//!   difference: exact while the cell has stayed busy since the call was
//!   sent; when it ran full in between (the refill of that time was lost
//!   whatever the call cost), the refund can leave up to the difference more
//!   room than a replay with the real cost would. Exactness would need each
//!   call's history; the Redis budget's undo and the quota's global check
//!   (which never gives back) say more.
//! - **Learn from the upstream**: a `Throttled` result pauses every dispatch until
//!   its `retry_after` (1 s when the answer gives none; none for a `Retry-After`
//!   of 0; one 429 must not become 50) and cuts the rate ×0.75 (not
//!   below 25 %); each success gives back 2 % — AIMD, as TCP does, because a
//!   configured budget can be optimistic (a shared org key, a tier that changed).
//!   Rate-limit headers (`x-ratelimit-remaining-*`) lower our count of what is
//!   left whenever the upstream knows better.
//!
//! - **Exact time**: a cell counts in whole ticks of 1/16 ns since the
//!   pacer was built (integers, not `f64` seconds), so its sums are exact at
//!   any uptime: a burst of `C` units at one instant fits exactly `C` a
//!   year in as a second in. A unit's time is rounded up to a whole tick
//!   (never faster than the limit: at most 1/16 ns a unit slower); where it
//!   was rounded, a start within 1/1024 of a unit's time of now counts as
//!   now, so that a burst refilled after exactly its window fits again. The
//!   clock's range is 36 years from the pacer's build; past it, times
//!   saturate and the pacer stops holding calls back.
//! - **No lock on the healthy path** of a pacer of one or two rolling cells
//!   (RPM + TPM, the common shape; no parent, no calendar window): while
//!   nobody waits and nothing is paused, a call is reserved on both cells by
//!   one 128-bit compare-and-swap of a word holding both cells' `tat`s — both
//!   or neither, so no roll-back another caller could have seen. Anything
//!   else (the line, a pause, a learned limit, a refund, a snapshot) takes
//!   the state's lock, which takes the `tat`s out of the word for as long as
//!   it is held; while anyone waits they stay there, so a newcomer always
//!   joins the end of the line. Pacers of three cells or more take the lock
//!   for one short pass. The record of recent starts and of the typical cost
//!   (for ETAs and a router's outlook) is kept in atomics beside it: an
//!   estimate that two calls at one instant may enter out of order.
//!
//! Why our own GCRA and not governor: governor cannot reserve a future slot for
//! a waiter, refund an estimate or take a debt, and its cells are independent —
//! checking RPM then TPM can consume one and fail the other.
//!
//! ```
//! use semaforo::pace::{Cost, Pace};
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), semaforo::BoxError> {
//! let pace = Pace::builder()
//!     .name("openai")
//!     .requests_per_minute(500)
//!     .tokens_per_minute(30_000)
//!     .max_wait(Duration::from_secs(300))
//!     .build()?;
//! let mut llm = ServiceBuilder::new()
//!     .layer(pace.layer().weigh(|max_tokens: &u64| Cost::tokens(*max_tokens)))
//!     .service(service_fn(|n: u64| async move { Ok::<_, std::io::Error>(n) }));
//! let t0 = tokio::time::Instant::now();
//! for _ in 0..16 {
//!     llm.ready().await?.call(2_000).await?; // 15 fit in the burst, the 16th waits 4 s
//! }
//! assert_eq!(t0.elapsed(), Duration::from_secs(4));
//! # Ok(()) }
//! ```

mod calendar;
mod fast;
mod keyed;
mod service;
pub(crate) mod state;
mod stats;
mod tick;

pub use keyed::{KeyedPace, KeyedPaceBuilder, KeyedPaceLayer, KeyedPaceService, NoKey, PaceKey};

pub use service::{
    AtResponse, Deliver, NoObserve, Observe, Observed, OneRequest, PaceLayer, PaceService, Pending,
    PendingRef, ResponseFuture, UsageCell, Weigh,
};
#[cfg(feature = "http")]
pub use service::{Reconcile, UsageFromBody};

use crate::classify::RateLimitInfo;
use crate::error::ConfigError;
use crate::observe::{Event, ListenerSlot, Observer};
use state::{Dim, State};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// What one call costs on each kind of dimension: requests, and tokens split
/// the way providers count them — input not read from a cache, input read
/// from a cache, and output.
///
/// Which parts a dimension counts is its [`Unit`]: OpenAI's TPM counts every
/// token (cached input included); Anthropic's ITPM counts input not read from
/// the cache (`input_tokens` + `cache_creation_input_tokens`: "cache read
/// tokens no longer count towards ITPM" for current models, Anthropic's "Rate
/// limits" page) and its OTPM the output. An estimate reserves output at the
/// request's `max_tokens`; the answer's `usage` replaces it.
///
/// Every sum saturates at `u64::MAX`: such a cost fits only a limit whose
/// burst is `u64::MAX` itself, and is refused by any other (never fits).
///
/// ```
/// use semaforo::pace::{Cost, Unit};
///
/// // 1,200 prompt tokens of which 1,000 from the cache, 300 output.
/// let real = Cost::split(200, 300).with_cached_input(1_000);
/// assert_eq!(real.amount(Unit::Tokens), 1_500);      // OpenAI TPM
/// assert_eq!(real.amount(Unit::InputTokens), 200);   // Anthropic ITPM
/// assert_eq!(real.amount(Unit::OutputTokens), 300);  // Anthropic OTPM
/// assert_eq!(Cost::tokens(700).amount(Unit::Tokens), 700);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub struct Cost {
    /// Requests (usually 1).
    pub requests: u32,
    /// Input (prompt) tokens not read from the provider's prompt cache;
    /// also tokens of a [`Cost::tokens`] estimate that does not split.
    pub input_tokens: u64,
    /// Input tokens read from the provider's prompt cache.
    pub cached_input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// What the call costs in money, in micro-dollars (1,000,000 = $1.00):
    /// what a [`Unit::Spend`] limit counts. The LLM preset prices each call
    /// from its model's price (`llm::Price`).
    pub spend: u64,
}

impl Cost {
    /// One request of `tokens` tokens, not split between input and output
    /// (counted as input: a per-output dimension sees none of them).
    pub fn tokens(tokens: u64) -> Self {
        Cost {
            requests: 1,
            input_tokens: tokens,
            ..Cost::default()
        }
    }

    /// One request of `input` input tokens (not from a cache) and `output`
    /// output tokens.
    pub fn split(input: u64, output: u64) -> Self {
        Cost {
            requests: 1,
            input_tokens: input,
            output_tokens: output,
            ..Cost::default()
        }
    }

    /// `n` requests and no tokens.
    pub fn requests(n: u32) -> Self {
        Cost {
            requests: n,
            ..Cost::default()
        }
    }

    /// The same with `n` input tokens read from the prompt cache.
    pub fn with_cached_input(mut self, n: u64) -> Self {
        self.cached_input_tokens = n;
        self
    }

    /// The same costing `micro_dollars` (1,000,000 = $1.00).
    pub fn with_spend(mut self, micro_dollars: u64) -> Self {
        self.spend = micro_dollars;
        self
    }

    /// Every token: input (cached or not) and output, saturating.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cached_input_tokens)
            .saturating_add(self.output_tokens)
    }

    /// How many of `unit` this cost counts.
    pub fn amount(&self, unit: Unit) -> u64 {
        match unit {
            Unit::Requests => u64::from(self.requests),
            Unit::Tokens => self.total_tokens(),
            Unit::InputTokens => self.input_tokens,
            Unit::PromptTokens => self.input_tokens.saturating_add(self.cached_input_tokens),
            Unit::OutputTokens => self.output_tokens,
            Unit::Spend => self.spend,
        }
    }
}

/// What a dimension counts (see [`Cost`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unit {
    /// Requests.
    Requests,
    /// Every token: input, cached input and output (OpenAI's TPM).
    Tokens,
    /// Input tokens not read from the prompt cache (Anthropic's ITPM).
    InputTokens,
    /// Output tokens (Anthropic's OTPM).
    OutputTokens,
    /// Every input token, read from the cache or not (Gemini's TPM, which
    /// counts input).
    PromptTokens,
    /// Money, in micro-dollars (1,000,000 = $1.00): [`Cost::spend`].
    Spend,
}

impl Unit {
    /// `"requests"`, `"tokens"`, `"input_tokens"`, `"output_tokens"`,
    /// `"prompt_tokens"` or `"spend_micro_dollars"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
            Unit::InputTokens => "input_tokens",
            Unit::OutputTokens => "output_tokens",
            Unit::PromptTokens => "prompt_tokens",
            Unit::Spend => "spend_micro_dollars",
        }
    }

    /// The window of this unit in an upstream's rate-limit headers.
    pub(crate) fn window(self, info: &RateLimitInfo) -> Option<crate::classify::RateLimitWindow> {
        match self {
            Unit::Requests => info.requests,
            Unit::Tokens => info.tokens,
            Unit::InputTokens => info.input_tokens,
            Unit::OutputTokens => info.output_tokens,
            Unit::PromptTokens | Unit::Spend => None,
        }
    }
}

/// One dimension's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DimSnapshot {
    /// What it counts.
    pub unit: Unit,
    /// Its window (a minute, a day).
    pub per: Duration,
    /// The burst it plans with: the limit's burst less its
    /// [headroom](Limit::headroom) (a call may still cost the whole burst).
    pub capacity: f64,
    /// Units available now (never below 0: a debt, left by a call above the
    /// planned burst or a usage above its estimate, shows as 0 and as a later
    /// `full_at`; a usage's debt of requests or tokens at most empties the
    /// cell, a spend debt is owed in full).
    pub available: f64,
    /// When it is full again.
    pub full_at: Instant,
}

/// The pacer's state at one instant.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PaceSnapshot {
    /// Each dimension, in the order the limits were given (a profile's
    /// order: see `llm::Profile`); find one by its `unit` and `per`.
    pub dims: Vec<DimSnapshot>,
    /// Callers in line.
    pub waiting: u64,
    /// When the head of the line can go.
    pub next_start: Option<Instant>,
    /// Dispatch paused after a 429 until then.
    pub paused_until: Option<Instant>,
    /// The AIMD share of the configured rate in use (1.0 = all of it).
    pub rate_factor: f64,
    /// Throttled results seen.
    pub throttled: u64,
}

/// What a pacer would do with a call coming now, reserving nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outlook {
    /// Its cost can never be paid.
    Never,
    /// It would start then.
    At(Instant),
    /// Refused at once: it would start then, later than `max_wait`.
    Late(Instant),
    /// Refused at once until about then: a budget; or (now) the pacer is
    /// closed.
    Refused(Instant),
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) obs: Observer,
    pub(crate) max_wait: Option<Duration>,
    state: Mutex<State>,
    /// The state's epoch, read without its lock: the healthy path turns its
    /// clock reading into seconds before it locks.
    pub(crate) epoch: Instant,
    /// The AIMD factor is below 1: successes must be recorded to recover.
    pub(crate) slowed: std::sync::atomic::AtomicBool,
    /// A pacer shared below this one (a [`KeyedPace`]'s shared limits): a
    /// call reserves on both at the same instant. Locked after this one's
    /// state, never the other way round.
    pub(crate) parent: Option<Arc<Shared>>,
    /// The lock-free healthy path (a pacer of one or two rolling cells and
    /// no parent; see [`fast`]).
    pub(crate) fast: Option<fast::Fast>,
    /// The state's record of started calls, written without its lock by the
    /// lock-free path.
    pub(crate) stats: Arc<stats::Stats>,
}

/// The state under its lock, with the cells' `tat`s taken back from the
/// lock-free path for as long as it is held, and handed back when it is let
/// go and the pacer is free (see [`fast`]).
pub(crate) struct Locked<'a> {
    st: MutexGuard<'a, State>,
    fast: Option<&'a fast::Fast>,
}

impl Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.st
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.st
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if let Some(fast) = self.fast {
            self.st.hand_over(fast);
        }
    }
}

impl Shared {
    /// The pacer's `max_wait` when a call would wait longer than it
    /// (refused at once): the admission's rule, and the outlook's.
    #[inline]
    pub(crate) fn past_max_wait(&self, wait: Duration) -> Option<Duration> {
        self.max_wait.filter(|m| wait > *m)
    }

    pub(crate) fn lock(&self) -> Locked<'_> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &self.fast {
            st.take_back(f);
        }
        Locked {
            st,
            fast: self.fast.as_ref(),
        }
    }

    /// The healthy path without the lock: `cost` reserved `since` the epoch
    /// when nobody waits and it fits now (see [`fast`]); `false` decides
    /// nothing.
    #[inline]
    pub(crate) fn try_lock_free(&self, cost: &Cost, since: Duration) -> bool {
        match &self.fast {
            Some(f) if f.try_take(cost, tick::of(since)) => {
                self.stats.started(cost, since);
                true
            }
            _ => false,
        }
    }

    /// Replaces an estimate by the real cost, here and on the parent.
    pub(crate) fn reconcile(&self, estimate: &Cost, real: &Cost, now: Instant, charged: Instant) {
        self.lock().reconcile(estimate, real, now, charged);
        if let Some(p) = &self.parent {
            p.lock().reconcile(estimate, real, now, charged);
        }
    }
}

/// An outbound budget. Cheap to clone; clones and layers share it.
#[derive(Debug, Clone)]
pub struct Pace {
    shared: Arc<Shared>,
}

/// Builder for [`Pace`]; [`build`](Self::build) validates it.
#[derive(Debug, Clone, Default)]
#[must_use = "call .build() to get a Pace"]
pub struct PaceBuilder {
    name: Option<Arc<str>>,
    listener: ListenerSlot,
    dims: Vec<Limit>,
    max_wait: Option<Duration>,
    max_pause: Option<Duration>,
    header_window: Option<Duration>,
    parent: Option<Arc<Shared>>,
    /// The flag saying its starts are recorded, shared with other pacers
    /// (a keyed pacer's; see [`stats`]).
    watched: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// One limit of a pacer: `n` units per period, with a burst (default `n`:
/// a whole period's worth at once). GCRA: a unit becomes available every
/// `per / n`, and at most `burst` accumulate.
///
/// ```
/// use semaforo::pace::{Limit, Unit};
/// use std::time::Duration;
///
/// let tpm = Limit::tokens_per_minute(30_000).burst(28_500);
/// let rps = Limit::new(Unit::Requests, 10, Duration::from_secs(1)).burst(1);
/// # let _ = (tpm, rps);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub(crate) unit: Unit,
    pub(crate) n: u64,
    pub(crate) per: Duration,
    pub(crate) burst: Option<u64>,
    /// Percent of the burst kept unused when planning.
    pub(crate) headroom: u8,
    /// A window that resets on the calendar instead of rolling.
    pub(crate) resets: Option<calendar::Resets>,
    /// Refuse a call that would wait longer than this for this limit.
    pub(crate) max_wait: Option<Duration>,
}

impl Limit {
    /// `n` units per `per`; [`PaceBuilder::build`] refuses `n` = 0 and a zero
    /// period.
    pub fn new(unit: Unit, n: u64, per: Duration) -> Limit {
        Limit {
            unit,
            n,
            per,
            burst: None,
            headroom: 0,
            resets: None,
            max_wait: None,
        }
    }

    /// `n` requests per minute.
    pub fn requests_per_minute(n: u64) -> Limit {
        Limit::new(Unit::Requests, n, Duration::from_secs(60))
    }

    /// `n` tokens per minute.
    pub fn tokens_per_minute(n: u64) -> Limit {
        Limit::new(Unit::Tokens, n, Duration::from_secs(60))
    }

    /// `n` input tokens (not read from the prompt cache) per minute:
    /// Anthropic's ITPM.
    pub fn input_tokens_per_minute(n: u64) -> Limit {
        Limit::new(Unit::InputTokens, n, Duration::from_secs(60))
    }

    /// `n` output tokens per minute: Anthropic's OTPM.
    pub fn output_tokens_per_minute(n: u64) -> Limit {
        Limit::new(Unit::OutputTokens, n, Duration::from_secs(60))
    }

    /// `n` requests per day.
    pub fn requests_per_day(n: u64) -> Limit {
        Limit::new(Unit::Requests, n, Duration::from_secs(86_400))
    }

    /// `n` tokens per day.
    pub fn tokens_per_day(n: u64) -> Limit {
        Limit::new(Unit::Tokens, n, Duration::from_secs(86_400))
    }

    /// `n` micro-dollars of spend a day (1,000,000 = $1.00): see
    /// [`Cost::spend`]. A call that cannot be paid now is refused at once (a
    /// budget, not a pace: [`max_wait`](Self::max_wait) of zero), with the
    /// exact time until enough is back.
    ///
    /// Rolling, it is a bucket of `n` refilled continuously at `n` a day: a
    /// full bucket spent at once, then the refill, lets up to about 2 × `n`
    /// through in 24 hours (never more than `n` plus what 24 h refill). For
    /// a hard cap per calendar day, add [`resets_daily`](Self::resets_daily).
    pub fn spend_per_day(micro_dollars: u64) -> Limit {
        Limit::new(Unit::Spend, micro_dollars, Duration::from_secs(86_400)).max_wait(Duration::ZERO)
    }

    /// `n` micro-dollars of spend a month (30 rolling days unless
    /// [`resets_monthly`](Self::resets_monthly)); refused at once as
    /// [`spend_per_day`](Self::spend_per_day).
    pub fn spend_per_month(micro_dollars: u64) -> Limit {
        Limit::new(Unit::Spend, micro_dollars, Duration::from_secs(30 * 86_400))
            .max_wait(Duration::ZERO)
    }

    /// Counts per calendar day in the IANA time zone `zone` (e.g.
    /// `"America/Los_Angeles"`, `"UTC"`) a per-day limit
    /// ([`requests_per_day`](Self::requests_per_day),
    /// [`spend_per_day`](Self::spend_per_day), or any limit `per` one day):
    /// the whole of `n` (or the burst) is available from each midnight
    /// there, daylight saving included, instead of refilling continuously.
    /// A call that does not fit waits for the next midnight — or is refused
    /// at once, with the time until then, when that is beyond its
    /// `max_wait`. A call that would wait for a later window than the next is
    /// estimated as if the line's calls could be split between windows.
    ///
    /// The wall clock is read once, when the pacer is built; from there the
    /// pacer follows `tokio::time` (a monotonic clock: after the machine
    /// sleeps or its clock is stepped, midnights drift until the pacer is
    /// built again). The LLM preset's `time_scale`
    /// does not scale a calendar window.
    /// [`PaceBuilder::build`] refuses an unknown zone and a limit whose
    /// period is not a day.
    ///
    /// ```
    /// use semaforo::pace::{Limit, Pace};
    ///
    /// // Gemini: requests per day reset at midnight Pacific time.
    /// let rpd = Limit::requests_per_day(1_000).resets_daily("America/Los_Angeles");
    /// let pace = Pace::builder().limit(rpd).build()?;
    /// assert_eq!(pace.snapshot().dims[0].available, 1_000.0);
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn resets_daily(mut self, zone: impl Into<Arc<str>>) -> Limit {
        self.resets = Some(calendar::Resets {
            every: calendar::Every::Day,
            zone: zone.into(),
        });
        self
    }

    /// Counts per calendar month in the IANA time zone `zone` a per-month
    /// limit (`per` 30 days: [`spend_per_month`](Self::spend_per_month)):
    /// all of it is available from the first of each month at midnight
    /// there; as [`resets_daily`](Self::resets_daily) otherwise.
    pub fn resets_monthly(mut self, zone: impl Into<Arc<str>>) -> Limit {
        self.resets = Some(calendar::Resets {
            every: calendar::Every::Month,
            zone: zone.into(),
        });
        self
    }

    /// Refuses at once a call that would wait longer than `d` for this
    /// limit ([`RejectKind::BudgetExceeded`](crate::RejectKind::BudgetExceeded)
    /// with the exact `retry_after`: how long until this limit could take
    /// it, less `d`), whatever the pacer's own
    /// [`max_wait`](PaceBuilder::max_wait). Zero: a budget, never waited for.
    pub fn max_wait(mut self, d: Duration) -> Limit {
        self.max_wait = Some(d);
        self
    }

    /// At most `burst` units at once (default `n`); at least 1, checked by
    /// [`PaceBuilder::build`]. A cost above the burst can never be paid.
    pub fn burst(mut self, burst: u64) -> Limit {
        self.burst = Some(burst);
        self
    }

    /// Plans with `percent` % of the burst kept unused (default 0, at most 50;
    /// the planned burst is rounded down, at least 1), for the
    /// skew between our reservation and the moment the upstream counts the
    /// call (it arrives later; the first calls of a burst latest): the long-run
    /// rate stays `n` per window. A single call costing more than the rest,
    /// up to the whole burst, is not refused: it waits for a full bucket and
    /// leaves a debt (the upstream would take it).
    ///
    /// ```
    /// use semaforo::pace::{Limit, Pace, Unit};
    ///
    /// // 8,000 output tokens a minute; plan with 7,600 at once.
    /// let pace = Pace::builder().limit(Limit::output_tokens_per_minute(8_000).headroom(5)).build()?;
    /// assert_eq!(pace.snapshot().dims[0].capacity, 7_600.0);
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn headroom(mut self, percent: u8) -> Limit {
        self.headroom = percent;
        self
    }

    /// What it counts.
    pub fn unit(&self) -> Unit {
        self.unit
    }

    /// Whether its window resets on the calendar
    /// ([`resets_daily`](Self::resets_daily), [`resets_monthly`](Self::resets_monthly))
    /// rather than rolling.
    pub fn resets_on_calendar(&self) -> bool {
        self.resets.is_some()
    }

    /// The share of the burst kept unused when planning, in percent.
    pub fn headroom_percent(&self) -> u8 {
        self.headroom
    }

    /// The burst planned with: the burst less the headroom, at least 1.
    pub(crate) fn planned(&self) -> u64 {
        let b = self.capacity();
        let kept = u128::from(b) * u128::from(100 - self.headroom.min(50)) / 100;
        u64::try_from(kept).unwrap_or(u64::MAX).max(1)
    }

    /// Units per window (`n`).
    pub fn rate(&self) -> u64 {
        self.n
    }

    /// The window.
    pub fn per(&self) -> Duration {
        self.per
    }

    /// The burst, headroom included (`n` unless set): the largest cost one
    /// call may have.
    pub fn capacity(&self) -> u64 {
        self.burst.unwrap_or(self.n)
    }
}

impl PaceBuilder {
    /// Names the pacer in errors.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub(crate) fn has_name(&self) -> bool {
        self.name.is_some()
    }

    /// Reserves every call on `parent` too, at the same instant.
    pub(crate) fn with_parent(mut self, parent: Option<Arc<Shared>>) -> Self {
        self.parent = parent;
        self
    }

    /// The pacer records its starts while `flag` is set (see [`stats`]).
    pub(crate) fn watched_by(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.watched = Some(flag);
        self
    }

    /// Calls `f` for each of this pacer's events (queued, admitted after a
    /// wait, rejected, paused by the upstream, resumed); see
    /// [`observe`](crate::observe).
    /// Listeners add up: a second `on_event` keeps the first (both are called, in order).
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.listener.set(f);
        self
    }

    /// `n` requests per minute (burst: `n`); shorthand for
    /// `.limit(Limit::requests_per_minute(n))`.
    pub fn requests_per_minute(self, n: u64) -> Self {
        self.limit(Limit::requests_per_minute(n))
    }

    /// `n` tokens per minute (burst: `n`).
    pub fn tokens_per_minute(self, n: u64) -> Self {
        self.limit(Limit::tokens_per_minute(n))
    }

    /// `n` input tokens (not from the prompt cache) per minute (burst: `n`):
    /// Anthropic's ITPM.
    pub fn input_tokens_per_minute(self, n: u64) -> Self {
        self.limit(Limit::input_tokens_per_minute(n))
    }

    /// `n` output tokens per minute (burst: `n`): Anthropic's OTPM.
    pub fn output_tokens_per_minute(self, n: u64) -> Self {
        self.limit(Limit::output_tokens_per_minute(n))
    }

    /// `n` requests per day (burst: `n`).
    pub fn requests_per_day(self, n: u64) -> Self {
        self.limit(Limit::requests_per_day(n))
    }

    /// `n` tokens per day (burst: `n`).
    pub fn tokens_per_day(self, n: u64) -> Self {
        self.limit(Limit::tokens_per_day(n))
    }

    /// Adds a limit (any unit, period and burst): every call must fit all of
    /// them.
    ///
    /// ```
    /// use semaforo::pace::{Limit, Pace};
    ///
    /// // 30,000 tokens a minute, at most 28,500 in one burst; 500 requests a minute.
    /// let pace = Pace::builder()
    ///     .limit(Limit::tokens_per_minute(30_000).burst(28_500))
    ///     .requests_per_minute(500)
    ///     .build()?;
    /// # let _ = pace;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn limit(mut self, limit: Limit) -> Self {
        self.dims.push(limit);
        self
    }

    /// The longest pause one `429` imposes on every caller (default 60 s). A
    /// longer `Retry-After` (a daily quota, a date a year away) still reaches
    /// the caller that got it, through its own error or the retry layer's
    /// ceiling; everyone else waits at most this long.
    pub fn max_pause(mut self, d: Duration) -> Self {
        self.max_pause = Some(d);
        self
    }

    /// The window the upstream's announced limits (`x-ratelimit-limit-*`)
    /// count over (default 60 s, as OpenAI and Anthropic report them). A mock
    /// provider whose minute lasts 6 s has a window of 6 s.
    pub fn header_window(mut self, d: Duration) -> Self {
        self.header_window = Some(d);
        self
    }

    /// Refuse a call that would wait longer than this (default: wait as long
    /// as it takes). The start it is compared with is exact; the wake-up at
    /// that start is tokio's timer, a millisecond or so later (see
    /// the [crate docs](crate)).
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = Some(d);
        self
    }

    /// The limits, in the order given.
    #[cfg(feature = "redis")]
    pub(crate) fn dims(&self) -> &[Limit] {
        &self.dims
    }

    #[cfg(feature = "redis")]
    pub(crate) fn max_wait_value(&self) -> Option<Duration> {
        self.max_wait
    }

    /// The same limits times `share` (each at least 1): one instance's part.
    #[cfg(feature = "redis")]
    pub(crate) fn scaled(&self, share: f64) -> PaceBuilder {
        let mut b = self.clone();
        let part = |n: u64| (crate::num::floor_of(share, n as f64) as u64).max(1);
        for d in &mut b.dims {
            d.burst = Some(part(d.planned()));
            d.headroom = 0;
            d.n = part(d.n);
        }
        b
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] on `limits` (none given), `limit` (a rate of 0 or a
    /// zero period), `burst` (0), `headroom` (above 50 %) or `header_window`
    /// (zero).
    pub fn build(self) -> Result<Pace, ConfigError> {
        if self.header_window.is_some_and(|w| w.is_zero()) {
            return Err(ConfigError::new(
                "pace",
                "header_window",
                "must be above zero",
            ));
        }
        if self.dims.is_empty() {
            return Err(ConfigError::new(
                "pace",
                "limits",
                "set at least one limit (e.g. tokens_per_minute)",
            ));
        }
        let mut dims = Vec::with_capacity(self.dims.len());
        let epoch = Instant::now();
        for limit in self.dims {
            let calendar = match &limit.resets {
                Some(r) => {
                    // A calendar window is the day (or the month): a limit
                    // of another period would silently mean something else.
                    let window = match r.every {
                        calendar::Every::Day => Duration::from_secs(86_400),
                        calendar::Every::Month => Duration::from_secs(30 * 86_400),
                    };
                    if limit.per != window {
                        return Err(ConfigError::new(
                            "pace",
                            "resets",
                            format!(
                                "a limit of {} per {} cannot reset on the calendar: \
                                 give resets_daily a per-day limit and resets_monthly \
                                 a per-month one (Limit::requests_per_day, spend_per_month…)",
                                limit.n,
                                crate::time::Human(limit.per)
                            ),
                        ));
                    }
                    Some(
                        r.resolve(epoch)
                            .map_err(|e| ConfigError::new("pace", "resets", e))?,
                    )
                }
                None => None,
            };
            let (planned, largest) = (limit.planned(), limit.capacity());
            let Limit {
                unit,
                n,
                per,
                burst,
                headroom,
                resets: _,
                max_wait,
            } = limit;
            if n == 0 || per.is_zero() {
                return Err(ConfigError::new(
                    "pace",
                    "limit",
                    format!(
                        "{n} per {} can never admit anything",
                        crate::time::Human(per)
                    ),
                ));
            }
            if burst == Some(0) {
                return Err(ConfigError::new("pace", "burst", "must be at least 1"));
            }
            if headroom > 50 {
                return Err(ConfigError::new(
                    "pace",
                    "headroom",
                    format!("at most 50 %, got {headroom} %"),
                ));
            }
            let capacity = planned as f64;
            let (ticks_per_unit, exact) = tick::per_unit(per, n);
            dims.push(Dim {
                unit,
                per,
                capacity,
                burst: planned,
                ticks_per_unit,
                exact,
                configured_capacity: capacity,
                configured_tpu: ticks_per_unit,
                configured_exact: exact,
                largest_cost: largest,
                calendar,
                max_wait: max_wait.map(tick::of),
            });
        }
        let mut st = State::new(dims);
        if let Some(flag) = self.watched {
            st.stats = Arc::new(stats::Stats::watched_by(flag));
        }
        st.max_pause = self.max_pause.unwrap_or(state::DEFAULT_MAX_PAUSE);
        st.header_window = self.header_window.unwrap_or(state::DEFAULT_HEADER_WINDOW);
        Ok(Pace {
            shared: Arc::new(Shared {
                obs: Observer::new(self.name, self.listener.0),
                max_wait: self.max_wait,
                epoch: st.epoch(),
                fast: self
                    .parent
                    .is_none()
                    .then(|| fast::Fast::new(&st.dims))
                    .flatten(),
                stats: st.stats.clone(),
                state: Mutex::new(st),
                slowed: std::sync::atomic::AtomicBool::new(false),
                parent: self.parent,
            }),
        })
    }
}

impl crate::eta::EtaSource for Pace {
    /// The pacer's line and cells played forward: when each call waiting in
    /// it, then each further call of the typical (smoothed) cost, could start.
    fn projection(&self, now: Instant) -> Box<dyn crate::eta::Projection + '_> {
        Box::new(self.shared.lock().projection(now))
    }

    /// From now on, the pacer records its starts (the calls it sees run).
    fn watch(&self) {
        self.shared.stats.watch();
    }
}

impl Pace {
    /// The name given to the builder.
    pub fn name(&self) -> Option<&str> {
        self.shared.obs.name.as_deref()
    }

    /// Starts a builder; give it at least one limit.
    ///
    /// ```
    /// use semaforo::pace::{Cost, Pace};
    /// use std::time::Duration;
    ///
    /// // A 500 RPM / 30,000 TPM tier; a call waits at most 2 minutes for its turn.
    /// let pace = Pace::builder()
    ///     .name("openai")
    ///     .requests_per_minute(500)
    ///     .tokens_per_minute(30_000)
    ///     .max_wait(Duration::from_secs(120))
    ///     .build()?;
    /// // Each request weighs its estimated tokens.
    /// let layer = pace.layer().weigh(|prompt: &String| Cost::tokens(prompt.len() as u64 / 4 + 500));
    /// # let _ = layer;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn builder() -> PaceBuilder {
        PaceBuilder::default()
    }

    /// A layer weighing every request as one request of zero tokens; set the
    /// weight with [`PaceLayer::weigh`].
    pub fn layer(
        &self,
    ) -> PaceLayer<service::OneRequest, service::NoObserve, crate::classify::ErrorClassifier> {
        PaceLayer::new(self.shared.clone())
    }

    /// When a call of `cost` arriving now could start, reserving nothing:
    /// now when nobody waits and it fits, else after everyone in line
    /// (here and on the shared cells of a [`KeyedPace`]'s key). `None` when
    /// it would be refused: a cost above a burst, a budget
    /// ([`Limit::max_wait`]) that could not take it, or a closed pacer. The
    /// pacer's own `max_wait` is not applied (compare the answer with it).
    /// For routers: ask several pacers, send to the soonest.
    ///
    /// ```
    /// use semaforo::pace::{Cost, Pace};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), semaforo::BoxError> {
    /// let pace = Pace::builder().tokens_per_minute(1_000).build()?;
    /// let now = tokio::time::Instant::now();
    /// assert_eq!(pace.start_for(&Cost::tokens(1_000)), Some(now));
    /// assert_eq!(pace.start_for(&Cost::tokens(1_001)), None, "above the burst");
    /// # Ok(()) }
    /// ```
    pub fn start_for(&self, cost: &Cost) -> Option<Instant> {
        self.start_for_at(cost, Instant::now())
    }

    /// [`start_for`](Self::start_for) with the time read by the caller.
    pub(crate) fn start_for_at(&self, cost: &Cost, now: Instant) -> Option<Instant> {
        let st = self.shared.lock();
        match &self.shared.parent {
            Some(p) => st.peek_start(cost, now, Some(&p.lock())),
            None => st.peek_start(cost, now, None),
        }
    }

    /// [`outlook_at`](Self::outlook_at) for a call of the typical
    /// (smoothed) cost coming now: its start behind the line, the cells'
    /// debt at a cut rate, a pause.
    pub(crate) fn typical_outlook_at(&self, now: Instant) -> Outlook {
        let cost = self.shared.lock().typical_cost();
        self.outlook_at(&cost, now)
    }

    /// [`start_for_at`](Self::start_for_at), and whether a call coming now
    /// would be refused at once for starting later than `max_wait` (the
    /// pacer's own admission rule).
    pub(crate) fn outlook_at(&self, cost: &Cost, now: Instant) -> Outlook {
        let peek = {
            let st = self.shared.lock();
            match &self.shared.parent {
                Some(p) => st.peek(cost, now, Some(&p.lock())),
                None => st.peek(cost, now, None),
            }
        };
        match peek {
            state::Peek::Never => Outlook::Never,
            // Closed: refused now and for good (`ShuttingDown`).
            state::Peek::RefusedFor(Duration::MAX) => Outlook::Refused(now),
            state::Peek::RefusedFor(d) => Outlook::Refused(crate::time::after(now, d)),
            state::Peek::At(at) => {
                let wait = at.saturating_duration_since(now);
                if self.shared.past_max_wait(wait).is_some() {
                    Outlook::Late(at)
                } else {
                    Outlook::At(at)
                }
            }
        }
    }

    /// The state now, per dimension.
    pub fn snapshot(&self) -> PaceSnapshot {
        self.shared.lock().snapshot(Instant::now())
    }

    /// Answers every caller in line `ShuttingDown` at once and refuses new
    /// calls (a [`Shutdown`](crate::shutdown::Shutdown) calls it at its
    /// trigger once given the pacer with
    /// [`watch`](crate::shutdown::Shutdown::watch)). Returns how many waiters
    /// were released.
    pub fn close(&self) -> u64 {
        self.shared.lock().close() as u64
    }

    /// Tell the pacer what the upstream's headers said (for code that calls the
    /// upstream outside the layer).
    pub fn learn(&self, info: &crate::classify::RateLimitInfo) {
        let now = Instant::now();
        self.shared.lock().learn(info, now, now);
    }
}

impl crate::close::Close for Pace {
    fn close(&self) -> u64 {
        Pace::close(self)
    }
}

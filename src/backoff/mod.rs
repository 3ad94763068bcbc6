//! Exponential backoff with jitter, a hard cap and per-class overrides.
//!
//! `delay(n) = jitter(min(ceiling, base · factorⁿ))`, then `min(cap, ·)`, then for
//! a class with an override `min(class_cap, · × multiplier)`. `n` counts retries
//! from 0 (the first retry waits about `base`).
//!
//! **The cap holds after jitter.** Some crates add jitter on top of the cap, so a
//! "5-minute cap" waits 6.5 minutes; here no delay is ever above the cap you set.
//! To reproduce a schedule that deliberately goes past its exponential ceiling
//! (a job pipeline's `min(300 s, 2ⁿ·60 s)` plus 10–30 %), set the ceiling and the cap
//! separately:
//!
//! ```
//! use semaforo::backoff::{Backoff, Jitter};
//! use semaforo::classify::Class;
//! use std::time::Duration;
//!
//! let pipeline = Backoff::exponential(Duration::from_secs(60))
//!     .factor(2.0)
//!     .ceiling(Duration::from_secs(300)) // min(300, 2^n · 60) before jitter
//!     .cap(Duration::from_secs(390))     // 300 + 30 %: the most it ever waits
//!     .jitter(Jitter::Proportional { min: 0.10, max: 0.30 })
//!     .throttled(2.0, Duration::from_secs(900))   // rate limit ×2, max 15 min
//!     .overloaded(1.5, Duration::from_secs(600))  // overloaded ×1.5, max 10 min
//!     .build()?;
//!
//! let first = pipeline.delay(0, Duration::ZERO);
//! assert!(first >= Duration::from_secs(66) && first <= Duration::from_secs(78));
//! // The longest first wait: the jitter's random number at its top.
//! assert_eq!(pipeline.delay_drawn(0, Duration::ZERO, 1.0), Duration::from_secs(78));
//! let throttled = pipeline.delay_for(&Class::Throttled { retry_after: None }, 5, Duration::ZERO);
//! assert!(throttled >= Duration::from_secs(660) && throttled <= Duration::from_secs(780));
//! # Ok::<(), semaforo::ConfigError>(())
//! ```
//!
//! Delays have microsecond resolution (timers do not resolve finer) and never
//! overflow: attempt 10,000 or a base of years gives the cap, not a panic.

use crate::classify::Class;
use crate::error::ConfigError;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// How randomness is added to the exponential delay `d = min(ceiling, base·factorⁿ)`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// Exactly `d`.
    None,
    /// Uniform in `[0, d]` ("full jitter"): spreads a herd the most.
    #[default]
    Full,
    /// Uniform in `[d/2, d]`: never less than half the exponential delay.
    Equal,
    /// Uniform in `[base, 3 × previous delay]` (AWS "decorrelated jitter");
    /// always within `[base, cap]`. Needs the previous delay: pass it to
    /// [`Backoff::delay`] or use [`Backoff::delays`].
    Decorrelated,
    /// `d` plus a uniform `[min, max]` fraction of `d` (e.g. 10–30 %).
    Proportional {
        /// Smallest added fraction (0.10 = +10 %).
        min: f64,
        /// Largest added fraction.
        max: f64,
    },
}

/// A per-class adjustment applied after jitter and cap: `min(cap, delay × multiplier)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassOverride {
    /// Multiplies the delay (e.g. rate limit ×2, overloaded ×1.5).
    pub multiplier: f64,
    /// The cap for this class (replaces the general cap).
    pub cap: Duration,
}

/// A validated backoff policy. Build one with [`Backoff::exponential`].
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    base: f64,
    factor: f64,
    ceiling: f64,
    cap: Duration,
    jitter: Jitter,
    /// Overrides for Throttled, Overloaded, Transient, Infrastructure.
    overrides: [Option<ClassOverride>; 4],
}

/// Builder for [`Backoff`]; [`build`](BackoffBuilder::build) validates it.
#[derive(Debug, Clone)]
#[must_use = "call .build() to get a Backoff"]
pub struct BackoffBuilder {
    base: Duration,
    factor: f64,
    ceiling: Option<Duration>,
    cap: Option<Duration>,
    jitter: Jitter,
    overrides: [Option<ClassOverride>; 4],
}

/// The default cap when none is set: 5 minutes (or `base`, if larger).
pub const DEFAULT_CAP: Duration = Duration::from_secs(300);

fn override_index(class: &Class) -> Option<usize> {
    match class {
        Class::Throttled { .. } => Some(0),
        Class::Overloaded { .. } => Some(1),
        Class::Transient => Some(2),
        Class::Infrastructure => Some(3),
        Class::Success | Class::Permanent { .. } => None,
    }
}

impl BackoffBuilder {
    /// Growth per retry (default 2.0). Must be finite and ≥ 1.
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Ceiling of the exponential *before* jitter (default: the cap).
    pub fn ceiling(mut self, ceiling: Duration) -> Self {
        self.ceiling = Some(ceiling);
        self
    }

    /// The most any delay can be, jitter included (default [`DEFAULT_CAP`]).
    pub fn cap(mut self, cap: Duration) -> Self {
        self.cap = Some(cap);
        self
    }

    /// The jitter kind (default [`Jitter::Full`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Delays for `Throttled` results: `min(cap, delay × multiplier)`.
    pub fn throttled(self, multiplier: f64, cap: Duration) -> Self {
        self.with_override(0, multiplier, cap)
    }

    /// Delays for `Overloaded` results: `min(cap, delay × multiplier)`.
    pub fn overloaded(self, multiplier: f64, cap: Duration) -> Self {
        self.with_override(1, multiplier, cap)
    }

    /// Delays for `Transient` results: `min(cap, delay × multiplier)`.
    pub fn transient(self, multiplier: f64, cap: Duration) -> Self {
        self.with_override(2, multiplier, cap)
    }

    /// Delays for `Infrastructure` results: `min(cap, delay × multiplier)`.
    pub fn infrastructure(self, multiplier: f64, cap: Duration) -> Self {
        self.with_override(3, multiplier, cap)
    }

    fn with_override(mut self, i: usize, multiplier: f64, cap: Duration) -> Self {
        self.overrides[i] = Some(ClassOverride { multiplier, cap });
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] when the factor is not finite or below 1, the cap or
    /// the ceiling is below the base, proportional jitter bounds are negative, not finite,
    /// `min > max` or `max > 100`, or a class multiplier is not finite or ≤ 0.
    pub fn build(self) -> Result<Backoff, ConfigError> {
        let err = |field, reason: String| Err(ConfigError::new("backoff", field, reason));
        if !self.factor.is_finite() || self.factor < 1.0 {
            return err(
                "factor",
                format!("must be a finite number >= 1, got {}", self.factor),
            );
        }
        let cap = self.cap.unwrap_or(DEFAULT_CAP.max(self.base));
        if cap < self.base {
            return err(
                "cap",
                format!(
                    "({}) is below base ({})",
                    crate::time::Human(cap),
                    crate::time::Human(self.base)
                ),
            );
        }
        if let Jitter::Proportional { min, max } = self.jitter {
            if !(min.is_finite() && max.is_finite()) || min < 0.0 || min > max || max > 100.0 {
                return err(
                    "jitter",
                    format!("proportional bounds must satisfy 0 <= min <= max <= 100, got min {min}, max {max}"),
                );
            }
        }
        for o in self.overrides.iter().flatten() {
            if !o.multiplier.is_finite() || o.multiplier <= 0.0 {
                return err(
                    "multiplier",
                    format!("must be a finite number > 0, got {}", o.multiplier),
                );
            }
        }
        let ceiling = self.ceiling.unwrap_or(cap);
        // As the cap: a ceiling below the base would flatten every delay
        // to it, the growth gone.
        if ceiling < self.base {
            return err(
                "ceiling",
                format!(
                    "({}) is below base ({})",
                    crate::time::Human(ceiling),
                    crate::time::Human(self.base)
                ),
            );
        }
        Ok(Backoff {
            base: self.base.as_secs_f64(),
            factor: self.factor,
            ceiling: ceiling.as_secs_f64(),
            cap,
            jitter: self.jitter,
            overrides: self.overrides,
        })
    }
}

/// Converts seconds to a `Duration` rounded to the microsecond, clamped to `[0, cap]`.
fn to_duration(secs: f64, cap: Duration) -> Duration {
    if secs.is_nan() {
        return cap;
    }
    if secs <= 0.0 {
        return Duration::ZERO;
    }
    let micros = (secs * 1e6).round();
    if micros >= cap.as_micros() as f64 {
        return cap;
    }
    if micros < u64::MAX as f64 {
        // Below 2⁶⁴ µs: exact in a u64.
        Duration::from_micros(micros as u64).min(cap)
    } else {
        // Beyond 584,942 years an f64 holds no microseconds anyway: the
        // seconds as they are (not the u64 µs limit, which is below `secs`).
        crate::time::secs_f64(secs).min(cap)
    }
}

impl Backoff {
    /// Starts an exponential backoff whose first retry waits about `base`.
    pub fn exponential(base: Duration) -> BackoffBuilder {
        BackoffBuilder {
            base,
            factor: 2.0,
            ceiling: None,
            cap: None,
            jitter: Jitter::default(),
            overrides: [None; 4],
        }
    }

    /// The general cap: no delay is ever above it (unless a class override
    /// sets a larger one for that class).
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The jitter kind.
    pub fn jitter_kind(&self) -> Jitter {
        self.jitter
    }

    /// The un-jittered delay of retry `n`: `min(ceiling, cap, base · factorⁿ)`.
    pub fn exponential_delay(&self, retry: u32) -> Duration {
        to_duration(self.exp_secs(retry), self.cap)
    }

    fn exp_secs(&self, retry: u32) -> f64 {
        if self.base == 0.0 {
            return 0.0;
        }
        let n = i32::try_from(retry).unwrap_or(i32::MAX);
        (self.base * self.factor.powi(n)).min(self.ceiling)
    }

    /// The delay before retry `n` (0-based), jittered with a draw from the
    /// thread's random generator. `prev` is the previous delay (only
    /// [`Jitter::Decorrelated`] reads it; pass `Duration::ZERO` the first time).
    pub fn delay(&self, retry: u32, prev: Duration) -> Duration {
        self.delay_drawn(retry, prev, rand::random())
    }

    /// [`delay`](Self::delay) with the jitter's random number given: `draw` is
    /// uniform in `[0, 1]` (clamped; NaN counts as 0) — 0 gives the shortest
    /// delay of the jitter's range, 1 the longest. For reproducible schedules
    /// and tests.
    pub fn delay_drawn(&self, retry: u32, prev: Duration, draw: f64) -> Duration {
        let u = if draw.is_nan() {
            0.0
        } else {
            draw.clamp(0.0, 1.0)
        };
        let d = self.exp_secs(retry);
        let secs = match self.jitter {
            Jitter::None => d,
            Jitter::Full => d * u,
            Jitter::Equal => d / 2.0 + d / 2.0 * u,
            Jitter::Proportional { min, max } => d * (1.0 + min + (max - min) * u),
            Jitter::Decorrelated => {
                let hi = (prev.as_secs_f64() * 3.0).max(self.base);
                self.base + (hi - self.base) * u
            }
        };
        to_duration(secs, self.cap)
    }

    /// [`delay`](Self::delay) adjusted for the class of the failure (its
    /// multiplier and cap, when one was configured).
    pub fn delay_for(&self, class: &Class, retry: u32, prev: Duration) -> Duration {
        self.delay_for_drawn(class, retry, prev, rand::random())
    }

    /// [`delay_for`](Self::delay_for) with the jitter's random number given
    /// (see [`delay_drawn`](Self::delay_drawn)).
    pub fn delay_for_drawn(
        &self,
        class: &Class,
        retry: u32,
        prev: Duration,
        draw: f64,
    ) -> Duration {
        let d = self.delay_drawn(retry, prev, draw);
        match override_index(class).and_then(|i| self.overrides[i]) {
            Some(o) => to_duration(d.as_secs_f64() * o.multiplier, o.cap),
            None => d,
        }
    }

    /// The cap that applies to `class` (its override's cap, else the general cap).
    pub fn cap_for(&self, class: &Class) -> Duration {
        override_index(class)
            .and_then(|i| self.overrides[i])
            .map_or(self.cap, |o| o.cap)
    }

    /// The endless sequence of delays for failures of one class, threading the
    /// previous delay through (for decorrelated jitter), with draws from a
    /// generator seeded by the thread's.
    ///
    /// ```
    /// use semaforo::backoff::{Backoff, Jitter};
    /// use semaforo::classify::Class;
    /// use std::time::Duration;
    ///
    /// // 3 attempts, exponential from 2 s: waits of 2 s then 4 s.
    /// let b = Backoff::exponential(Duration::from_secs(2)).jitter(Jitter::None).build()?;
    /// let waits: Vec<_> = b.delays(Class::Transient).take(2).collect();
    /// assert_eq!(waits, [Duration::from_secs(2), Duration::from_secs(4)]);
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn delays(&self, class: Class) -> Delays<'_> {
        self.delays_seeded(class, rand::random())
    }

    /// [`delays`](Self::delays), reproducible: the same `seed` gives the same
    /// sequence (on the same version of this crate).
    pub fn delays_seeded(&self, class: Class, seed: u64) -> Delays<'_> {
        Delays {
            backoff: self,
            class,
            retry: 0,
            prev: Duration::ZERO,
            rng: SmallRng::seed_from_u64(seed),
        }
    }
}

/// Iterator returned by [`Backoff::delays`]: endless.
#[derive(Debug)]
pub struct Delays<'a> {
    backoff: &'a Backoff,
    class: Class,
    retry: u32,
    prev: Duration,
    rng: SmallRng,
}

impl Iterator for Delays<'_> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self
            .backoff
            .delay_for_drawn(&self.class, self.retry, self.prev, self.rng.random());
        self.retry = self.retry.saturating_add(1);
        self.prev = d;
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn seed_001_schedule_exact() {
        // BullMQ: attempts 3, backoff { type: "exponential", delay: 2000 }.
        let b = Backoff::exponential(secs(2))
            .jitter(Jitter::None)
            .build()
            .unwrap();
        let waits: Vec<_> = b.delays_seeded(Class::Transient, 1).take(2).collect();
        assert_eq!(waits, vec![secs(2), secs(4)]);
        // Attempts start at 0 s, 2 s and 6 s.
        let starts: Vec<_> = waits
            .iter()
            .scan(Duration::ZERO, |t, w| {
                *t += *w;
                Some(*t)
            })
            .collect();
        assert_eq!(starts, vec![secs(2), secs(6)]);
    }

    fn seed_004(cap: Duration) -> Backoff {
        Backoff::exponential(secs(60))
            .factor(2.0)
            .ceiling(secs(300))
            .cap(cap)
            .jitter(Jitter::Proportional {
                min: 0.10,
                max: 0.30,
            })
            .throttled(2.0, secs(900))
            .overloaded(1.5, secs(600))
            .build()
            .unwrap()
    }

    #[test]
    fn seed_004_schedule_at_its_bounds() {
        // As the seed wrote it: min(300, 2^n·60) + 10–30 %, so up to 390 s.
        let b = seed_004(secs(390));
        let bounds = |class: Class, n| {
            (
                b.delay_for_drawn(&class, n, Duration::ZERO, 0.0),
                b.delay_for_drawn(&class, n, Duration::ZERO, 1.0),
            )
        };
        let t = Class::Transient;
        assert_eq!(bounds(t, 0), (secs(66), secs(78)));
        assert_eq!(bounds(t, 1), (secs(132), secs(156)));
        assert_eq!(bounds(t, 2), (secs(264), secs(312)));
        assert_eq!(bounds(t, 3), (secs(330), secs(390)));
        assert_eq!(bounds(t, 10_000), (secs(330), secs(390)));
        // Rate limit ×2, max 15 min.
        let th = Class::Throttled { retry_after: None };
        assert_eq!(bounds(th, 0), (secs(132), secs(156)));
        assert_eq!(bounds(th, 3), (secs(660), secs(780)));
        // Overloaded ×1.5, max 10 min.
        let ov = Class::Overloaded { retry_after: None };
        assert_eq!(bounds(ov, 0), (secs(99), secs(117)));
        assert_eq!(bounds(ov, 3), (secs(495), secs(585)));

        // With the cap at 300 s, jitter never lifts a delay above it.
        let b = seed_004(secs(300));
        assert_eq!(b.delay_drawn(2, Duration::ZERO, 0.0), secs(264));
        assert_eq!(b.delay_drawn(2, Duration::ZERO, 1.0), secs(300));
        assert_eq!(b.delay_drawn(3, Duration::ZERO, 0.0), secs(300));
    }

    #[test]
    fn class_cap_applies_after_multiplier() {
        let b = Backoff::exponential(secs(400))
            .cap(secs(600))
            .jitter(Jitter::None)
            .throttled(2.0, secs(900))
            .build()
            .unwrap();
        let th = Class::Throttled { retry_after: None };
        assert_eq!(b.delay_for_drawn(&th, 0, Duration::ZERO, 0.0), secs(800));
        assert_eq!(b.delay_for_drawn(&th, 1, Duration::ZERO, 0.0), secs(900));
        assert_eq!(b.cap_for(&th), secs(900));
        assert_eq!(b.cap_for(&Class::Transient), secs(600));
    }

    #[test]
    fn builder_rejects_bad_configuration() {
        let e = |b: BackoffBuilder| b.build().unwrap_err().field;
        assert_eq!(e(Backoff::exponential(secs(1)).factor(0.5)), "factor");
        assert_eq!(e(Backoff::exponential(secs(1)).factor(f64::NAN)), "factor");
        assert_eq!(
            e(Backoff::exponential(secs(1)).factor(f64::INFINITY)),
            "factor"
        );
        assert_eq!(e(Backoff::exponential(secs(10)).cap(secs(1))), "cap");
        assert_eq!(
            e(Backoff::exponential(secs(1)).jitter(Jitter::Proportional { min: 0.3, max: 0.1 })),
            "jitter"
        );
        assert_eq!(
            e(Backoff::exponential(secs(1)).jitter(Jitter::Proportional {
                min: -0.1,
                max: 0.1
            })),
            "jitter"
        );
        assert_eq!(
            e(Backoff::exponential(secs(1)).throttled(f64::NAN, secs(5))),
            "multiplier"
        );
        let msg = Backoff::exponential(secs(1))
            .factor(0.5)
            .build()
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "invalid backoff configuration: `factor` must be a finite number >= 1, got 0.5"
        );
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut rng = SmallRng::seed_from_u64(3);
        for jitter in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            let huge = Backoff::exponential(Duration::from_secs(u64::MAX / 4))
                .cap(Duration::MAX)
                .factor(1e300)
                .jitter(jitter)
                .build()
                .unwrap();
            for n in [0, 1, 10_000, u32::MAX] {
                let _ = huge.delay_drawn(n, Duration::MAX, rng.random());
            }
            let zero = Backoff::exponential(Duration::ZERO)
                .jitter(jitter)
                .build()
                .unwrap();
            assert_eq!(
                zero.delay_drawn(10_000, Duration::ZERO, rng.random()),
                Duration::ZERO
            );
            let normal = Backoff::exponential(secs(1))
                .jitter(jitter)
                .build()
                .unwrap();
            assert!(normal.delay_drawn(10_000, Duration::MAX, rng.random()) <= DEFAULT_CAP);
        }
    }

    #[test]
    fn seeded_rng_is_deterministic() {
        let b = Backoff::exponential(secs(1))
            .jitter(Jitter::Full)
            .build()
            .unwrap();
        let a: Vec<_> = b.delays_seeded(Class::Transient, 42).take(10).collect();
        let c: Vec<_> = b.delays_seeded(Class::Transient, 42).take(10).collect();
        assert_eq!(a, c);
    }

    fn jitter_strategy() -> impl Strategy<Value = Jitter> {
        prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Equal),
            Just(Jitter::Decorrelated),
            (0.0f64..2.0, 0.0f64..2.0).prop_map(|(a, b)| Jitter::Proportional {
                min: a.min(b),
                max: a.max(b)
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_delay_within_zero_and_cap(
            base_ms in 0u64..10_000_000,
            extra_cap_ms in 0u64..100_000_000,
            factor in 1.0f64..10.0,
            jitter in jitter_strategy(),
            retry in any::<u32>(),
            prev_ms in any::<u64>(),
            seed in any::<u64>(),
        ) {
            let base = Duration::from_millis(base_ms);
            let cap = base + Duration::from_millis(extra_cap_ms);
            let b = Backoff::exponential(base).factor(factor).cap(cap).jitter(jitter).build().unwrap();
            let mut rng = SmallRng::seed_from_u64(seed);
            let d = b.delay_drawn(retry, Duration::from_millis(prev_ms), rng.random());
            prop_assert!(d <= cap, "{d:?} > cap {cap:?}");
            let exp = b.exponential_delay(retry);
            match jitter {
                Jitter::None => prop_assert_eq!(d, exp),
                Jitter::Full => prop_assert!(d <= exp),
                Jitter::Equal => {
                    // >= half of min(cap, base·factor^n), up to µs rounding.
                    prop_assert!(d + Duration::from_micros(1) >= exp / 2, "{d:?} < {exp:?}/2");
                    prop_assert!(d <= exp);
                }
                Jitter::Decorrelated => {
                    prop_assert!(d + Duration::from_micros(1) >= base.min(cap), "{d:?} < base {base:?}");
                }
                Jitter::Proportional { min, .. } => {
                    let lo = (exp.as_secs_f64() * (1.0 + min)).min(cap.as_secs_f64());
                    prop_assert!(d.as_secs_f64() + 1e-6 >= lo);
                }
            }
        }

        #[test]
        fn decorrelated_sequence_stays_in_base_cap(base_ms in 1u64..100_000, extra in 0u64..10_000_000, seed in any::<u64>()) {
            let base = Duration::from_millis(base_ms);
            let cap = base + Duration::from_millis(extra);
            let b = Backoff::exponential(base).cap(cap).jitter(Jitter::Decorrelated).build().unwrap();
            for d in b.delays_seeded(Class::Transient, seed).take(50) {
                prop_assert!(d >= base && d <= cap, "{d:?} not in [{base:?}, {cap:?}]");
            }
        }

        #[test]
        fn seed_004_within_bounds_for_every_class(n in 0u32..64, seed in any::<u64>()) {
            let b = seed_004(secs(300));
            let mut rng = SmallRng::seed_from_u64(seed);
            let exp = (60.0 * 2f64.powi(n as i32)).min(300.0);
            for (class, mult, class_cap) in [
                (Class::Transient, 1.0, 300.0),
                (Class::Throttled { retry_after: None }, 2.0, 900.0),
                (Class::Overloaded { retry_after: None }, 1.5, 600.0),
            ] {
                let d = b.delay_for_drawn(&class, n, Duration::ZERO, rng.random()).as_secs_f64();
                let lo = ((exp * 1.1).min(300.0) * mult).min(class_cap);
                let hi = ((exp * 1.3).min(300.0) * mult).min(class_cap);
                prop_assert!(d + 1e-6 >= lo && d <= hi + 1e-6, "{class:?} n={n}: {d} not in [{lo}, {hi}]");
            }
        }
    }
}

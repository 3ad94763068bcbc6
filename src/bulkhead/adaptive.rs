//! Adaptive limits: the controllers that move a bulkhead's `max_concurrent`
//! from samples of its calls (latency, and whether the upstream dropped
//! the call).
//!
//! The formulas are Netflix's `concurrency-limits` (Apache 2.0,
//! `com.netflix.concurrency.limits.limit`): [`Aimd`] (`AIMDLimit`),
//! [`Vegas`] (`VegasLimit`, TCP Vegas' queue estimate), [`Gradient2`]
//! (`Gradient2Limit`, the same gradient Envoy's adaptive concurrency filter
//! uses). A sample is one call: its latency, whether it was dropped
//! (`Overloaded`, or a `Transient` failure such as a timeout), and how many
//! calls were in flight when it ended. `Throttled` (a rate limit: a budget,
//! the pacer's business), `Permanent` (says nothing about load) and our own
//! refusals are not samples.

use std::time::Duration;

/// How a bulkhead's limit is set: fixed, or moved by a controller from the
/// calls' latencies and drops.
///
/// The formulas are Netflix's `concurrency-limits` (`AIMDLimit`,
/// `VegasLimit`, `Gradient2Limit`), each run once per window of samples
/// (Netflix's `WindowedLimit`: `max(10, limit / sample_every)` samples, their
/// average latency, any drop, the most in flight) — moving on every sample
/// overshoots, as the calls in flight when the limit moved all report the
/// same load. Vegas and Gradient2 compare latencies with the upstream's
/// unloaded latency, measured as Envoy's adaptive concurrency filter does:
/// the limit is pinned to 3 calls (or the strategy's `min`, if higher)
/// until 10 calls ended with no more than that in flight, their median
/// latency is the baseline (Envoy's minRTT is that window's aggregate
/// percentile, 50 by default: one fast outlier, a cache hit upstream, does
/// not collapse the limit), and the limit goes back where it was — at the
/// start, then every 60 s. With a `min` of 10 or more a probe lasts about
/// one latency; with 3, about four (a storm arriving at a fresh bulkhead
/// finds a narrow door for that long). Choose `min` at or under what the
/// upstream surely handles. A drop is an `Overloaded` or
/// `Transient` answer (a timeout below included); `Throttled`, `Permanent`
/// and this crate's own refusals are not samples.
///
/// Where they settle with a latency of 100 ms up to a capacity `C` and
/// proportional to the load above it (`tests/adaptive.rs`, which asserts
/// 0.8 to 1.3 × C — 40 to 65 for C = 50, 16 to 26 for C = 20 — within 30 s
/// of each change): AIMD with a 120 ms threshold at 61 / 25 (C = 50 / 20);
/// Vegas with α, β = 2, 4 (× log₁₀ limit; its defaults are 3, 6) at 54 /
/// 24; Gradient2 with tolerance 1.15 and a queue of 2 at 60 / 25 — each
/// with goodput at the upstream's 500 calls/s and p99 108–122 ms.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Limit {
    /// A fixed `max_concurrent` (the builder's).
    Fixed,
    /// Additive increase, multiplicative decrease.
    Aimd(Aimd),
    /// TCP Vegas' queue estimate.
    Vegas(Vegas),
    /// The gradient of a short to a long latency average.
    Gradient2(Gradient2),
}

impl From<Aimd> for Limit {
    fn from(a: Aimd) -> Limit {
        Limit::Aimd(a)
    }
}

impl From<Vegas> for Limit {
    fn from(v: Vegas) -> Limit {
        Limit::Vegas(v)
    }
}

impl From<Gradient2> for Limit {
    fn from(g: Gradient2) -> Limit {
        Limit::Gradient2(g)
    }
}

/// AIMD (Netflix `AIMDLimit`): a window with a drop, or whose average
/// latency is above `latency_threshold`, multiplies the limit by
/// `backoff_ratio`; any other window while at least half the limit is in
/// use adds 1. Settles in a saw-tooth just under the concurrency `L` whose
/// latency crosses the threshold: between `backoff_ratio × L` and `L`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    pub(crate) min: u32,
    pub(crate) initial: Option<u32>,
    pub(crate) backoff_ratio: f64,
    pub(crate) latency_threshold: Duration,
}

impl Aimd {
    /// Defaults: min 1, initial the bulkhead's `max_concurrent`, backoff
    /// ratio 0.9, latency threshold 5 s (Netflix's defaults but the initial).
    pub fn new() -> Self {
        Aimd {
            min: 1,
            initial: None,
            backoff_ratio: 0.9,
            latency_threshold: Duration::from_secs(5),
        }
    }

    /// The lowest limit (at least 1).
    pub fn min(mut self, n: u32) -> Self {
        self.min = n;
        self
    }

    /// The limit to start from (default: the bulkhead's `max_concurrent`).
    pub fn initial(mut self, n: u32) -> Self {
        self.initial = Some(n);
        self
    }

    /// The factor a drop multiplies the limit by, in (0, 1).
    pub fn backoff_ratio(mut self, r: f64) -> Self {
        self.backoff_ratio = r;
        self
    }

    /// A sample slower than this counts as a drop.
    pub fn latency_threshold(mut self, d: Duration) -> Self {
        self.latency_threshold = d;
        self
    }
}

impl Default for Aimd {
    fn default() -> Self {
        Aimd::new()
    }
}

/// Vegas (Netflix `VegasLimit`): with `rtt₀` the baseline latency (the
/// upstream unloaded, measured by the probes below) and `rtt` a sample's, the calls queued upstream are
/// `queue = ⌈limit × (1 − rtt₀ / rtt)⌉`; with `α = a·log₁₀ limit`,
/// `β = b·log₁₀ limit` (a = 3, b = 6 by default, [`Vegas::queue`]): a drop takes `log₁₀ limit` off; `queue ≤ log₁₀ limit`
/// adds `β`; `queue < α` adds `log₁₀ limit`; `queue > β` takes `log₁₀ limit`
/// off; otherwise no change — then the limit moves by `smoothing` of that
/// step. A drop multiplies the limit by 0.9 (Netflix's default takes
/// `log₁₀ limit` off: from far above the capacity that takes minutes).
/// Settles at the upstream's capacity plus `α … β` queued calls (capacity
/// 50: about 55 to 60). `rtt₀` is measured by probes (see [`Limit`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vegas {
    pub(crate) min: u32,
    pub(crate) initial: Option<u32>,
    pub(crate) smoothing: f64,
    pub(crate) alpha: f64,
    pub(crate) beta: f64,
}

impl Vegas {
    /// Defaults: min 1, initial the bulkhead's `max_concurrent`, smoothing
    /// 1.0, α = 3 and β = 6 times `log₁₀ limit` (Netflix's defaults but the
    /// initial).
    pub fn new() -> Self {
        Vegas {
            min: 1,
            initial: None,
            smoothing: 1.0,
            alpha: 3.0,
            beta: 6.0,
        }
    }

    /// The lowest limit (at least 1).
    pub fn min(mut self, n: u32) -> Self {
        self.min = n;
        self
    }

    /// The limit to start from (default: the bulkhead's `max_concurrent`).
    pub fn initial(mut self, n: u32) -> Self {
        self.initial = Some(n);
        self
    }

    /// The share of each step taken, in (0, 1].
    pub fn smoothing(mut self, s: f64) -> Self {
        self.smoothing = s;
        self
    }

    /// The queued calls Vegas aims for, as multiples of `log₁₀ limit`: it
    /// grows below `alpha`, shrinks above `beta` (0 < alpha < beta; default
    /// 3 and 6). Smaller values settle closer to the capacity.
    pub fn queue(mut self, alpha: f64, beta: f64) -> Self {
        self.alpha = alpha;
        self.beta = beta;
        self
    }
}

impl Default for Vegas {
    fn default() -> Self {
        Vegas::new()
    }
}

/// Gradient2: Netflix's `Gradient2Limit` step with Envoy's baseline
/// (the adaptive concurrency filter's gradient controller). Each window:
/// `gradient = clamp(tolerance × base / rtt, 0.5, 1)`,
/// `new = limit × gradient + queue_size`, and the limit moves by
/// `smoothing` toward it; a drop counts as twice the baseline's latency;
/// while fewer than half the limit are in use it does not move. `base` is
/// the upstream's unloaded latency, measured by probes (see
/// [`Limit`]'s docs) — Netflix compares with a long average of the
/// latency instead, which follows the load up under a sustained overload
/// and lets the limit drift above the capacity; Envoy's measured baseline
/// does not. Settles where the latency is `tolerance × base`: with a
/// latency proportional to the load above the capacity, at about
/// `tolerance ×` capacity (tolerance 1.2, capacity 50: about 60).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gradient2 {
    pub(crate) min: u32,
    pub(crate) initial: Option<u32>,
    pub(crate) smoothing: f64,
    pub(crate) tolerance: f64,
    pub(crate) queue_size: u32,
}

impl Gradient2 {
    /// Defaults: min 1, initial the bulkhead's `max_concurrent`, smoothing
    /// 0.2, tolerance 1.5, queue size 4 (Netflix's defaults but the
    /// initial).
    pub fn new() -> Self {
        Gradient2 {
            min: 1,
            initial: None,
            smoothing: 0.2,
            tolerance: 1.5,
            queue_size: 4,
        }
    }

    /// The lowest limit (at least 1).
    pub fn min(mut self, n: u32) -> Self {
        self.min = n;
        self
    }

    /// The limit to start from (default: the bulkhead's `max_concurrent`).
    pub fn initial(mut self, n: u32) -> Self {
        self.initial = Some(n);
        self
    }

    /// The share of each step taken, in (0, 1].
    pub fn smoothing(mut self, s: f64) -> Self {
        self.smoothing = s;
        self
    }

    /// How much slower than the baseline a window may be before the limit
    /// falls, at least 1.
    pub fn tolerance(mut self, t: f64) -> Self {
        self.tolerance = t;
        self
    }

    /// Calls added to the limit each step (room to grow).
    pub fn queue_size(mut self, n: u32) -> Self {
        self.queue_size = n;
        self
    }
}

impl Default for Gradient2 {
    fn default() -> Self {
        Gradient2::new()
    }
}

/// Checks a strategy's parameters for a bulkhead of at most `max`.
pub(crate) fn validate(limit: &Limit, max: u32) -> Result<(), crate::ConfigError> {
    let err = |reason: String| Err(crate::ConfigError::new("bulkhead", "limit", reason));
    let (min, initial) = match limit {
        Limit::Fixed => return Ok(()),
        Limit::Aimd(a) => {
            if !(a.backoff_ratio > 0.0 && a.backoff_ratio < 1.0) {
                return err(format!(
                    "AIMD backoff_ratio must be in (0, 1), got {}",
                    a.backoff_ratio
                ));
            }
            if a.latency_threshold.is_zero() {
                return err("AIMD latency_threshold must be above zero".into());
            }
            (a.min, a.initial)
        }
        Limit::Vegas(v) => {
            if !(v.smoothing > 0.0 && v.smoothing <= 1.0) {
                return err(format!(
                    "Vegas smoothing must be in (0, 1], got {}",
                    v.smoothing
                ));
            }
            if !(v.alpha.is_finite() && v.beta.is_finite() && v.alpha > 0.0 && v.alpha < v.beta) {
                return err(format!(
                    "Vegas queue needs 0 < alpha < beta, got {} and {}",
                    v.alpha, v.beta
                ));
            }
            (v.min, v.initial)
        }
        Limit::Gradient2(g) => {
            if !(g.smoothing > 0.0 && g.smoothing <= 1.0) {
                return err(format!(
                    "Gradient2 smoothing must be in (0, 1], got {}",
                    g.smoothing
                ));
            }
            if !(g.tolerance.is_finite() && g.tolerance >= 1.0) {
                return err(format!(
                    "Gradient2 tolerance must be at least 1, got {}",
                    g.tolerance
                ));
            }
            (g.min, g.initial)
        }
    };
    if min == 0 || min > max {
        return err(format!(
            "min must be between 1 and max_concurrent ({max}), got {min}"
        ));
    }
    if let Some(i) = initial {
        if i < min || i > max {
            return err(format!(
                "initial must be between min ({min}) and max_concurrent ({max}), got {i}"
            ));
        }
    }
    Ok(())
}

/// One call, as a controller sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Its latency.
    pub(crate) rtt: Duration,
    /// Dropped by the upstream (`Overloaded`, a `Transient` failure).
    pub(crate) dropped: bool,
    /// Calls in flight when it ended (itself included).
    pub(crate) in_flight: u32,
    /// When it ended.
    pub(crate) at: tokio::time::Instant,
}

/// How a Vegas or Gradient2 controller learns the upstream's unloaded
/// latency (Envoy's adaptive concurrency filter, "minRTT calculation"): the
/// limit is pinned to `PROBE_CONCURRENCY` until `MIN_WINDOW` calls ended
/// with no more than that many in flight; their median latency is the
/// baseline; the limit goes back where it was. At the start, then every
/// `PROBE_INTERVAL`.
pub(crate) const PROBE_CONCURRENCY: u32 = 3;
/// See [`PROBE_CONCURRENCY`].
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(60);

/// A running controller: the strategy, its state and the current limit.
#[derive(Debug)]
pub(crate) struct Controller {
    limit: f64,
    min: f64,
    max: f64,
    state: State,
    window: Window,
    /// The baseline latency (Vegas, Gradient2), and how it is measured.
    probe: Probe,
    reason: crate::observe::LimitReason,
}

/// The samples of one window (Netflix's `WindowedLimit`): the limit moves
/// once per window of `max(MIN_WINDOW, limit / sample_every)` samples, from
/// their average latency, whether any was dropped and the most in flight —
/// the calls in flight when the limit moved report the same load, and
/// moving on each of them would overshoot.
#[derive(Debug, Default)]
struct Window {
    samples: u32,
    rtt_sum: f64,
    dropped: bool,
    max_in_flight: u32,
}

/// The fewest samples a window takes.
pub(crate) const MIN_WINDOW: u32 = 10;

#[derive(Debug)]
enum Probe {
    /// AIMD needs no baseline.
    None,
    /// Pinned low: `seen` calls ended with few in flight, their latencies
    /// in `rtts`; then back to `restore`.
    Measuring {
        restore: f64,
        seen: u32,
        rtts: [f64; MIN_WINDOW as usize],
    },
    /// Measured `base`; measured again from `next`.
    Known {
        base: f64,
        next: tokio::time::Instant,
    },
}

#[derive(Debug)]
enum State {
    Aimd { cfg: Aimd },
    Vegas { cfg: Vegas },
    Gradient2 { cfg: Gradient2 },
}

impl Controller {
    /// The controller of `limit` for a bulkhead of at most `max`; `None`
    /// for a fixed limit. The parameters are checked by the builder.
    pub(crate) fn new(limit: &Limit, max: u32) -> Option<Controller> {
        let (min, initial, state) = match *limit {
            Limit::Fixed => return None,
            Limit::Aimd(a) => (a.min, a.initial, State::Aimd { cfg: a }),
            Limit::Vegas(v) => (v.min, v.initial, State::Vegas { cfg: v }),
            Limit::Gradient2(g) => (g.min, g.initial, State::Gradient2 { cfg: g }),
        };
        let (min, max) = (f64::from(min.max(1)), f64::from(max.max(1)));
        let max = max.max(min);
        let initial = initial.map_or(max, f64::from).clamp(min, max);
        let probe = match state {
            State::Aimd { .. } => Probe::None,
            _ => Probe::Measuring {
                restore: initial,
                seen: 0,
                rtts: [0.0; MIN_WINDOW as usize],
            },
        };
        Some(Controller {
            limit: initial,
            min,
            max,
            state,
            window: Window::default(),
            probe,
            reason: crate::observe::LimitReason::Probe,
        })
    }

    /// The current limit, a whole number of calls in `[min, max]` (while
    /// measuring the baseline: the probe's concurrency).
    pub(crate) fn limit(&self) -> u32 {
        if let Probe::Measuring { .. } = self.probe {
            return (PROBE_CONCURRENCY as f64).clamp(self.min, self.max) as u32;
        }
        self.limit.round().clamp(self.min, self.max) as u32
    }

    /// The limit outside a probe (what the line is sized for).
    pub(crate) fn nominal(&self) -> u32 {
        let l = match self.probe {
            Probe::Measuring { restore, .. } => restore,
            _ => self.limit,
        };
        l.round().clamp(self.min, self.max) as u32
    }

    /// A new maximum (`set_max_concurrent`): the limit stays below it.
    pub(crate) fn set_max(&mut self, max: u32) {
        self.max = f64::from(max.max(1)).max(self.min);
        self.limit = self.limit.clamp(self.min, self.max);
        if let Probe::Measuring { restore, .. } = &mut self.probe {
            *restore = restore.clamp(self.min, self.max);
        }
    }

    /// Why the limit last moved.
    pub(crate) fn reason(&self) -> crate::observe::LimitReason {
        self.reason
    }

    /// Takes one sample of 1 in `sample_every` calls; returns the limit
    /// (moved when the sample ends a window).
    pub(crate) fn sample(&mut self, s: Sample, sample_every: u32) -> u32 {
        let rtt = s.rtt.as_secs_f64();
        match &mut self.probe {
            Probe::None => {}
            Probe::Measuring {
                restore,
                seen,
                rtts,
            } => {
                let probe = (PROBE_CONCURRENCY as f64).clamp(self.min, self.max) as u32;
                if s.in_flight <= probe && !s.dropped {
                    if let Some(slot) = rtts.get_mut(*seen as usize) {
                        *slot = rtt;
                    }
                    *seen += 1;
                }
                if *seen < MIN_WINDOW {
                    return self.limit();
                }
                // The median of the window, as Envoy's minRTT (its
                // `sample_aggregate_percentile`, 50 by default): one fast
                // outlier (a cache hit upstream) is not the baseline.
                rtts.sort_by(f64::total_cmp);
                let median = rtts[(MIN_WINDOW as usize - 1) / 2];
                let (base, restore) = (median.max(1e-9), *restore);
                self.limit = restore;
                self.reason = crate::observe::LimitReason::Probe;
                self.probe = Probe::Known {
                    base,
                    next: crate::time::after(s.at, PROBE_INTERVAL),
                };
                self.window = Window::default();
                return self.limit();
            }
            Probe::Known { next, .. } => {
                if s.at >= *next {
                    self.probe = Probe::Measuring {
                        restore: self.limit,
                        seen: 0,
                        rtts: [0.0; MIN_WINDOW as usize],
                    };
                    self.reason = crate::observe::LimitReason::Probe;
                    return self.limit();
                }
            }
        }
        let w = &mut self.window;
        w.samples += 1;
        w.rtt_sum += rtt;
        w.dropped |= s.dropped;
        w.max_in_flight = w.max_in_flight.max(s.in_flight);
        let size = ((self.limit / f64::from(sample_every.max(1))).ceil() as u32).max(MIN_WINDOW);
        if w.samples < size {
            return self.limit();
        }
        let w = std::mem::take(&mut self.window);
        self.update(
            w.rtt_sum / f64::from(w.samples.max(1)),
            w.dropped,
            w.max_in_flight,
        )
    }

    /// Moves the limit from one window's average latency (seconds), drop
    /// and most in flight.
    fn update(&mut self, rtt: f64, dropped: bool, in_flight: u32) -> u32 {
        let rtt = rtt.max(1e-9);
        let limit = self.limit;
        let in_flight = f64::from(in_flight);
        let base = match self.probe {
            Probe::Known { base, .. } => base,
            _ => rtt,
        };
        let next = match &mut self.state {
            State::Aimd { cfg } => {
                if dropped || rtt > cfg.latency_threshold.as_secs_f64() {
                    limit * cfg.backoff_ratio
                } else if in_flight * 2.0 >= limit {
                    limit + 1.0
                } else {
                    limit
                }
            }
            State::Vegas { cfg } => {
                let log = limit.max(1.0).log10().max(1.0);
                let (alpha, beta) = (cfg.alpha * log, cfg.beta * log);
                let next = if dropped {
                    // Netflix's default takes log₁₀ limit off a drop: from
                    // far above the capacity that takes minutes; a drop
                    // multiplies by 0.9, as AIMD's.
                    limit * 0.9
                } else if in_flight * 2.0 < limit {
                    limit
                } else {
                    let queue = (limit * (1.0 - base / rtt)).ceil();
                    if queue <= log {
                        limit + beta
                    } else if queue < alpha {
                        limit + log
                    } else if queue > beta {
                        limit - log
                    } else {
                        limit
                    }
                };
                limit + (next - limit) * cfg.smoothing
            }
            State::Gradient2 { cfg } => {
                if !dropped && in_flight * 2.0 < limit {
                    limit
                } else {
                    // A drop counts as twice the baseline's latency (or
                    // more): the limit falls by half the step.
                    let short = if dropped { (2.0 * base).max(rtt) } else { rtt };
                    let gradient = (cfg.tolerance * base / short).clamp(0.5, 1.0);
                    let target = limit * gradient + f64::from(cfg.queue_size);
                    limit * (1.0 - cfg.smoothing) + target * cfg.smoothing
                }
            }
        };
        self.limit = if next.is_finite() {
            next.clamp(self.min, self.max)
        } else {
            limit
        };
        self.reason = if dropped {
            crate::observe::LimitReason::Dropped
        } else if self.limit >= limit {
            crate::observe::LimitReason::Grew
        } else {
            crate::observe::LimitReason::Slower
        };
        self.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn strategies() -> Vec<Limit> {
        vec![
            Aimd::new()
                .min(2)
                .latency_threshold(Duration::from_millis(120))
                .into(),
            Vegas::new().min(2).into(),
            Gradient2::new().min(2).tolerance(1.2).into(),
        ]
    }

    proptest! {
        /// Whatever the samples, the limit stays in [min, max].
        #[test]
        fn the_limit_stays_within_min_and_max(
            samples in prop::collection::vec((0u64..10_000_000, any::<bool>(), 0u32..2_000, 0u64..100_000), 1..300),
            max in 2u32..1_000,
        ) {
            for s in strategies() {
                let mut c = Controller::new(&s, max).unwrap();
                let mut at = tokio::time::Instant::now();
                for (rtt_us, dropped, in_flight, gap_ms) in &samples {
                    at += Duration::from_millis(*gap_ms);
                    let l = c.sample(Sample {
                        rtt: Duration::from_micros(*rtt_us),
                        dropped: *dropped,
                        in_flight: *in_flight,
                        at,
                    }, 1);
                    prop_assert!((2..=max).contains(&l), "{l} outside [2, {max}] for {s:?}");
                }
            }
        }
    }

    /// Rounds of a saturated upstream of capacity `cap`: each round the
    /// `limit` calls in flight end with latency 100 ms × max(1, limit / cap)
    /// (dropped above 2 × cap); the limits after each round.
    fn rounds(s: &Limit, start: u32, cap: f64, n: usize) -> Vec<u32> {
        let mut c = Controller::new(s, start).unwrap();
        let mut out = Vec::new();
        let mut at = tokio::time::Instant::now();
        for _ in 0..n {
            let l = c.limit();
            let rtt = Duration::from_secs_f64(0.1 * (f64::from(l) / cap).max(1.0));
            at += rtt;
            for _ in 0..l {
                c.sample(
                    Sample {
                        rtt,
                        dropped: f64::from(l) > 2.0 * cap,
                        in_flight: l,
                        at,
                    },
                    1,
                );
            }
            out.push(c.limit());
        }
        out
    }

    #[test]
    fn each_strategy_settles_near_the_capacity() {
        let mut bad = Vec::new();
        for s in strategies() {
            let r = rounds(&s, 500, 50.0, 200);
            let tail = &r[150..];
            let (lo, hi) = (*tail.iter().min().unwrap(), *tail.iter().max().unwrap());
            println!("{s:?}: first {:?}, settled [{lo}, {hi}]", &r[..10]);
            if !(lo >= 40 && hi <= 65) {
                bad.push(format!("{s:?}: [{lo}, {hi}]"));
            }
        }
        assert!(bad.is_empty(), "{bad:?}");
    }

    #[test]
    fn fixed_has_no_controller() {
        assert!(Controller::new(&Limit::Fixed, 10).is_none());
    }
}

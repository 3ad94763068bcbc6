//! The pacer's clock: whole **ticks of 1/16 ns** since the pacer's epoch, in
//! a `u64` — exact sums, the same precision at any uptime.
//!
//! Why not `f64` seconds (what the pacer used before): a cell's `tat` is a
//! sum of one addition a call, and a float sum rounds by half a step of its
//! magnitude at each addition. Weeks after the epoch, at tens of thousands of
//! units a minute, that rounding grew past a thousandth of a unit, both ways:
//! 999,999 a minute admitted 1,000,000 at one instant after 30 days, a steady
//! window ran 8.7 calls over after a year, and the last call of an exact burst
//! waited 10 µs at 60,000 a minute after 30 days. In integer ticks a sum is
//! exact: a burst of `C` units at one instant fits exactly `C`, whatever the
//! uptime.
//!
//! What is rounded, and which way:
//! - the time a unit takes is rounded **up** to a whole tick (a rate is never
//!   faster than configured: at most 1/16 ns a unit slower — 0.02 % at
//!   180,000,000 a minute, the fastest per-minute rate a provider lists);
//! - a start is converted to an instant rounded up to the nanosecond (never
//!   early); `now` is exact (an `Instant` counts nanoseconds).
//!
//! Range: 2⁶⁴ ticks are 36.5 years after the pacer was built. A `tat` past
//! that is kept at [`LAST`] and compared exactly (in `u128`), so a limit
//! whose next unit falls past the range (1 per `Duration::MAX`) still
//! refuses the second call. What the range costs (an outside trial's
//! cases): a unit's time beyond it is kept at the last tick and so is the
//! burst's, so such a limit's burst collapses to one call (1,000 per
//! `Duration::MAX`: 1); a burst of 2⁶⁴ ticks (`tokens_per_day(u64::MAX − 1)`,
//! one tick a token) lets one token over; within a burst's time of the
//! range's end a `tat` kept at the last tick loses the debt beyond it (7 a
//! minute, 30 s before the end: 12 at once); once `now` itself passes the
//! range, times saturate and the pacer stops holding calls back.

use std::time::Duration;

/// Ticks in a nanosecond.
pub(crate) const PER_NS: u64 = 16;

/// The latest time a cell holds (one below all ones: the lock-free word of
/// two all-ones halves means "owned", see `fast`).
pub(crate) const LAST: u64 = u64::MAX - 1;

/// Ticks in `d`, saturated at [`LAST`].
#[inline]
pub(crate) fn of(d: Duration) -> u64 {
    clamp(d.as_nanos().saturating_mul(u128::from(PER_NS)))
}

/// `t` ticks as a duration, rounded up to the nanosecond.
#[inline]
pub(crate) fn duration(t: u64) -> Duration {
    Duration::from_nanos(t.div_ceil(PER_NS))
}

/// The ticks a unit takes when `n` units are allowed per `per`: rounded up
/// (never faster than the limit), at least one; and whether that is exact.
pub(crate) fn per_unit(per: Duration, n: u64) -> (u64, bool) {
    let total = per.as_nanos().saturating_mul(u128::from(PER_NS));
    let n = u128::from(n.max(1));
    let t = clamp(total.div_ceil(n)).max(1);
    (t, total % n == 0 && u128::from(t) * n == total)
}

/// `x` ticks scaled by a float `k` (a rate cut, a learned limit), rounded up.
pub(crate) fn scale(x: u64, k: f64) -> u64 {
    saturate((x as f64 * k).ceil())
}

/// `units` (a float count: a share of a burst) times `t` ticks a unit,
/// rounded down, saturated. Whole counts are multiplied exactly.
pub(crate) fn units(units: f64, t: u64) -> u64 {
    if units > 0.0 && units.fract() == 0.0 && units < u64::MAX as f64 {
        return clamp(u128::from(units as u64) * u128::from(t));
    }
    saturate((units * t as f64).floor())
}

/// A float count of ticks, already rounded by the caller, as ticks: 0 for
/// none (or NaN), at most [`LAST`].
fn saturate(y: f64) -> u64 {
    if y.is_nan() || y <= 0.0 {
        0
    } else if y >= LAST as f64 {
        LAST
    } else {
        y as u64
    }
}

/// `a` whole units of `t` ticks, saturated.
#[inline(always)]
pub(crate) fn times(a: u64, t: u64) -> u64 {
    clamp(u128::from(a) * u128::from(t))
}

/// How early a start may be taken by when a unit's time `t` was rounded up
/// to a whole tick (none when it is exact): 1/1024 of a unit, at most a
/// microsecond. A start within it of now counts as now. Sums of ticks are exact; what the slack absorbs is the
/// rounding of a unit's time up to a whole tick: a cell kept busy runs
/// behind the exact schedule by up to a tick a unit, so after a burst and
/// exactly its refill time the last unit of the next burst would wait a
/// few ticks (7 a minute: 6 of 7 fitted a minute later). A start within the
/// slack counts as now: a cell is never more than 1/1024 of a unit's time
/// ahead of the exact schedule (never a whole unit), and the slack covers
/// the rounding of the first `min(t / 1024, 16,000)` units of a busy spell
/// (7 a minute: 16,000 at least; 999,999 a minute: 937 — past that, the
/// last unit of a refilled burst at one frozen instant waits up to a tick a
/// unit, 28 µs for a burst of 450,000).
#[inline(always)]
pub(crate) fn slack(t: u64) -> u64 {
    (t >> 10).min(SLACK_CAP)
}

/// The most a slack is: a microsecond (16,000 ticks), so that a slow rate's
/// 1/1024 of a unit (8 ms at 7 a minute) does not let a call through
/// visibly early; it covers the rounding of at least 16,000 units of a busy
/// spell.
const SLACK_CAP: u64 = 16_000;

#[inline(always)]
fn clamp(x: u128) -> u64 {
    if x >= u128::from(LAST) {
        LAST
    } else {
        x as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_the_safe_way_and_saturate() {
        assert_eq!(of(Duration::from_nanos(3)), 48);
        assert_eq!(of(Duration::MAX), LAST);
        assert_eq!(duration(1), Duration::from_nanos(1));
        assert_eq!(duration(32), Duration::from_nanos(2));
        assert_eq!(duration(33), Duration::from_nanos(3));
        // 500 a minute: exact.
        assert_eq!(
            per_unit(Duration::from_secs(60), 500),
            (120_000_000 * 16, true)
        );
        // 7 a minute: rounded up, never faster.
        let (t, exact) = per_unit(Duration::from_secs(60), 7);
        assert!(!exact);
        assert!(t * 7 >= 60 * 1_000_000_000 * 16 && (t - 1) * 7 < 60 * 1_000_000_000 * 16);
        assert_eq!(per_unit(Duration::MAX, 1), (LAST, false));
        assert_eq!(per_unit(Duration::from_nanos(1), u64::MAX), (1, false));
        assert_eq!(times(u64::MAX, u64::MAX), LAST);
        assert_eq!(units(7.0, 3), 21);
        assert_eq!(units(2.5, 3), 7);
        assert_eq!(units(f64::NAN, 3), 0);
        assert_eq!(units(1e300, 3), LAST);
        assert_eq!(scale(10, 1.0 / 0.75), 14);
        assert_eq!(scale(10, f64::INFINITY), LAST);
        assert_eq!(slack(2048), 2);
        assert_eq!(slack(u64::MAX), 16_000);
    }
}

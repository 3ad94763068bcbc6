//! Saturating time arithmetic, the one place the crate turns a duration that a
//! user, a classifier or a server chose into an instant or a scaled duration.
//!
//! `Duration::MAX` is how many users spell "no limit", and a `Retry-After` can
//! come from anywhere: `Instant + Duration` and `Duration::mul_f64` panic on
//! overflow, so every such sum goes through here. An instant that would
//! overflow saturates to about 30 years from now, as `tokio::time::sleep` does.

use std::time::Duration;
use tokio::time::Instant;

/// About 30 years: what "never" means for a deadline (tokio's own choice).
pub(crate) const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + d`, saturated to `now + 30 years` (or `now`, on a clock that close to
/// its own end) instead of panicking.
#[inline]
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now.checked_add(FAR).unwrap_or(now))
}

/// A sleep until `now + d`, saturated as [`after`].
#[inline]
pub(crate) fn sleep_for(now: Instant, d: Duration) -> tokio::time::Sleep {
    tokio::time::sleep_until(after(now, d))
}

/// `d × factor` for a finite, non-negative factor, saturated at
/// `Duration::MAX` (a NaN or negative factor gives zero).
#[cfg(any(feature = "redis", test))]
#[inline]
pub(crate) fn mul(d: Duration, factor: f64) -> Duration {
    secs_f64(d.as_secs_f64() * factor)
}

/// Seconds as a `Duration`: negative or NaN → zero, too large or infinite →
/// `Duration::MAX`.
#[inline]
pub(crate) fn secs_f64(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// A duration for people: `250 ns`, `40 µs`, `0.64 s`, `7 ms`, `3 min 5 s`,
/// `2 h 1 min` — rounded up at the last digit shown so a positive wait never
/// reads as zero.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if d.is_zero() {
        return "0 s".into();
    }
    if d < Duration::from_micros(1) {
        return format!("{} ns", d.subsec_nanos());
    }
    let us = d.as_nanos().div_ceil(1_000);
    if us < 1_000 {
        return format!("{us} µs");
    }
    if ms < 10 {
        // Below 10 ms: whole milliseconds, at least 1.
        let up = d.as_nanos().div_ceil(1_000_000).max(1);
        return format!("{up} ms");
    }
    let secs = d.as_secs();
    if secs < 60 {
        // Hundredths of a second, rounded up.
        let cs = d.as_nanos().div_ceil(10_000_000);
        // (Rounded up to 60 s: written in minutes below.)
        if cs < 6_000 {
            let (whole, frac) = (cs / 100, cs % 100);
            return match frac {
                0 => format!("{whole} s"),
                f if f % 10 == 0 => format!("{whole}.{} s", f / 10),
                f => format!("{whole}.{f:02} s"),
            };
        }
    }
    let up = ceil_secs(d);
    if up < 3_600 {
        let (m, s) = (up / 60, up % 60);
        return if s == 0 {
            format!("{m} min")
        } else {
            format!("{m} min {s} s")
        };
    }
    if up >= 86_400 * 365 {
        return format!("{} days", up.div_ceil(86_400));
    }
    // Whole minutes rounded up first: 1 h 59 min 30 s reads `2 h`.
    let minutes = up.div_ceil(60);
    let (h, m) = (minutes / 60, minutes % 60);
    if m == 0 {
        format!("{h} h")
    } else {
        format!("{h} h {m} min")
    }
}

/// [`human`] as a `Display`, for format strings: `format!("{}", Human(d))`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Human(pub(crate) Duration);

impl std::fmt::Display for Human {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&human(self.0))
    }
}

/// `d` in whole seconds, rounded up (a `Retry-After` header's unit: never 0
/// for a positive wait), saturating at `u64::MAX`.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_saturates() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) >= now + Duration::from_secs(86_400 * 365));
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn mul_and_secs_saturate() {
        assert_eq!(mul(Duration::MAX, 2.0), Duration::MAX);
        assert_eq!(mul(Duration::from_secs(2), 1.5), Duration::from_secs(3));
        assert_eq!(mul(Duration::from_secs(2), f64::NAN), Duration::ZERO);
        assert_eq!(mul(Duration::from_secs(2), -1.0), Duration::ZERO);
        assert_eq!(secs_f64(f64::INFINITY), Duration::MAX);
    }

    #[test]
    fn human_rounds_up_for_people() {
        assert_eq!(human(Duration::from_nanos(632_159_703)), "0.64 s");
        assert_eq!(human(Duration::from_nanos(1)), "1 ns");
        assert_eq!(human(Duration::from_nanos(999)), "999 ns");
        assert_eq!(human(Duration::from_nanos(1_001)), "2 µs");
        assert_eq!(human(Duration::from_micros(250)), "250 µs");
        assert_eq!(human(Duration::from_nanos(999_001)), "1 ms");
        assert_eq!(human(Duration::from_nanos(1_000_001)), "2 ms");
        assert_eq!(human(Duration::from_millis(1_632)), "1.64 s");
        assert_eq!(human(Duration::from_millis(1_500)), "1.5 s");
        assert_eq!(human(Duration::from_secs(4)), "4 s");
        assert_eq!(human(Duration::from_secs(90)), "1 min 30 s");
        assert_eq!(human(Duration::from_secs(3_600)), "1 h");
        assert_eq!(human(Duration::from_secs(7_170)), "2 h");
        assert_eq!(human(Duration::from_nanos(59_999_000_001)), "1 min");
        assert_eq!(human(Duration::from_secs(59)), "59 s");
        assert_eq!(human(Duration::from_secs(86_400 * 400 + 1)), "401 days");
        assert_eq!(human(Duration::from_secs(7_141)), "2 h");
        assert_eq!(human(Duration::from_secs(7_139)), "1 h 59 min");
        assert_eq!(human(Duration::from_secs(3_601)), "1 h 1 min");
        assert_eq!(human(Duration::ZERO), "0 s");
        assert!(human(Duration::MAX).ends_with("days"));
    }
}

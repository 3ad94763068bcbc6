//! Windows that reset on the calendar: at midnight, or on the first of the
//! month, in a time zone (Gemini's requests per day reset at midnight
//! Pacific time; a daily spend budget at the team's midnight).
//!
//! Time zones and their daylight-saving rules come from `jiff` (the IANA
//! database: the system's, or the copy bundled with the crate) — a
//! well-kept library, not ours. Our clock stays `tokio::time`: the wall time
//! is read once, when the pacer is built, and follows the pacer's clock
//! from there (so paused-time tests cross midnights in milliseconds).

use super::tick;
use std::fmt;
use std::sync::Arc;
use tokio::time::Instant;

/// How often a calendar window resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Every {
    Day,
    Month,
}

/// A window's reset rule as configured: a time zone by its IANA name
/// (`"America/Los_Angeles"`, `"UTC"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Resets {
    pub(crate) every: Every,
    pub(crate) zone: Arc<str>,
}

/// A reset rule resolved against a clock: the time zone, and the wall time
/// at the pacer's epoch.
#[derive(Clone)]
pub(crate) struct Calendar {
    every: Every,
    tz: jiff::tz::TimeZone,
    /// The wall time at `epoch`.
    wall0: jiff::Timestamp,
}

impl fmt::Debug for Calendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Calendar")
            .field("every", &self.every)
            .field("tz", &self.tz.iana_name())
            .finish()
    }
}

impl Resets {
    /// Resolves the time zone; the wall time now is the pacer's epoch.
    pub(crate) fn resolve(&self, epoch: Instant) -> Result<Calendar, String> {
        let tz = jiff::tz::TimeZone::get(&self.zone)
            .map_err(|e| format!("unknown time zone '{}': {e}", self.zone))?;
        // The wall clock at `epoch` (read now, moved back by the time since).
        let since = Instant::now().saturating_duration_since(epoch);
        let now = jiff::Timestamp::now();
        let wall0 = jiff::SignedDuration::try_from(since)
            .ok()
            .and_then(|d| now.checked_sub(d).ok())
            .unwrap_or(now);
        Ok(Calendar {
            every: self.every,
            tz,
            wall0,
        })
    }
}

impl Calendar {
    /// The window's nominal length, in ticks (for projecting windows
    /// beyond the next: a day of 24 h, a month of 30 days).
    pub(crate) fn nominal(&self) -> u64 {
        let days = match self.every {
            Every::Day => 1,
            Every::Month => 30,
        };
        tick::of(std::time::Duration::from_secs(days * 86_400))
    }

    /// The end of the window holding `at` (ticks since the epoch): the
    /// next midnight (or first of the month) in the time zone, daylight
    /// saving included (a day may last 23 or 25 hours). Past the calendar's
    /// range, a nominal window from `at`.
    pub(crate) fn next_end(&self, at: u64) -> u64 {
        self.boundary_after(at)
            .unwrap_or_else(|| at.saturating_add(self.nominal()).min(tick::LAST))
    }

    fn boundary_after(&self, at: u64) -> Option<u64> {
        let ns = i64::try_from(at / tick::PER_NS).ok()?;
        let offset = jiff::SignedDuration::from_nanos(ns);
        let wall = self.wall0.checked_add(offset).ok()?;
        let zoned = wall.to_zoned(self.tz.clone());
        let start = match self.every {
            Every::Day => zoned.start_of_day().ok()?,
            Every::Month => zoned.first_of_month().ok()?.start_of_day().ok()?,
        };
        let next = match self.every {
            Every::Day => start.checked_add(jiff::Span::new().days(1)).ok()?,
            Every::Month => start.checked_add(jiff::Span::new().months(1)).ok()?,
        };
        // A midnight that does not exist (a zone jumping over it) is
        // resolved by jiff to the first instant of the day.
        let next = match self.every {
            Every::Day => next.start_of_day().ok()?,
            Every::Month => next.first_of_month().ok()?.start_of_day().ok()?,
        };
        let end = next.timestamp().duration_since(self.wall0);
        let end = tick::of(std::time::Duration::try_from(end).ok()?);
        // Never a window ending at or before `at`.
        Some(end.max(at.saturating_add(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` hours in ticks.
    fn h(n: u64) -> u64 {
        tick::of(std::time::Duration::from_secs(n * 3_600))
    }

    fn calendar(zone: &str, every: Every, wall0: &str) -> Calendar {
        Calendar {
            every,
            tz: jiff::tz::TimeZone::get(zone).unwrap(),
            wall0: wall0.parse().unwrap(),
        }
    }

    #[test]
    fn midnight_pacific_across_daylight_saving() {
        // 2026-03-07 23:00 PST (UTC−8) = 2026-03-08 07:00Z: midnight in 1 h.
        let c = calendar("America/Los_Angeles", Every::Day, "2026-03-08T07:00:00Z");
        assert_eq!(c.next_end(0), h(1));
        // 2026-03-08 (clocks jump at 02:00 to 03:00): a day of 23 hours.
        assert_eq!(c.next_end(h(1)) - h(1), h(23));
        // Within the day: the same end.
        assert_eq!(c.next_end(h(2)), c.next_end(h(1)));
    }

    #[test]
    fn first_of_the_month_in_utc() {
        let c = calendar("UTC", Every::Month, "2026-02-28T12:00:00Z");
        assert_eq!(c.next_end(0), h(12));
        // March has 31 days.
        assert_eq!(c.next_end(h(12)) - h(12), h(31 * 24));
    }

    #[test]
    fn unknown_zone_is_an_error() {
        let r = Resets {
            every: Every::Day,
            zone: "Mars/Olympus_Mons".into(),
        };
        assert!(r
            .resolve(Instant::now())
            .unwrap_err()
            .contains("Mars/Olympus_Mons"));
    }
}

//! The wall clock's distance to the next midnight UTC, for the tests of
//! calendar windows (a daily budget refills at midnight UTC).
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, by the wall clock now.
fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the wall clock is after 1970")
        .as_secs_f64()
}

/// Seconds until the next midnight UTC (fractional).
pub fn until_utc_midnight() -> f64 {
    86_400.0 - now_secs() % 86_400.0
}

/// Whole seconds until the next midnight UTC, counted from the current
/// whole second (1 ..= 86,400).
pub fn secs_to_utc_midnight() -> u64 {
    86_400 - now_secs() as u64 % 86_400
}

//! Expected waits across layers: a small interface through which a layer
//! that decides when calls really start (the pacer) tells a line above it
//! (the bulkhead) what it would do with the calls that line will send.
//!
//! It knows no layer: the bulkhead asks any [`EtaSource`] it was given for a
//! [`Projection`], and the LLM preset wires its pacer in (the classroom case,
//! where the token budget, not the number of permits, decides who goes next).
//! A projection reserves nothing: it plays the source's rules forward on a
//! copy of its state.

use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// Something below a line that decides when calls start.
pub trait EtaSource: Send + Sync + fmt::Debug + 'static {
    /// A copy of the source's state at `now`, to play forward.
    fn projection(&self, now: Instant) -> Box<dyn Projection + '_>;

    /// A line starts asking this source for projections (a bulkhead's
    /// [`set_eta_source`](crate::bulkhead::Bulkhead::set_eta_source) calls
    /// it): a source may record what its projections need from here on
    /// only. The pacers do — the instants calls start, which nobody reads
    /// otherwise; a first [`projection`](Self::projection) also starts
    /// them, and does not see the calls that started before. By default,
    /// nothing.
    fn watch(&self) {}
}

/// What an [`EtaSource`] would do with more calls, played on a copy of its
/// state (nothing is reserved).
pub trait Projection {
    /// Calls that passed the source and may still be running upstream: the
    /// instants they started at, oldest first (at most the most recent few
    /// hundred).
    fn started(&self) -> &[Instant];

    /// Calls waiting in the source's own line now.
    fn waiting(&self) -> usize;

    /// When the next call would start if it arrived at `not_before` (or
    /// later): first the calls already waiting in the source's line, in their
    /// order, then calls of a typical cost. `None` when the source cannot
    /// tell (e.g. it would refuse the call).
    fn next_start(&mut self, not_before: Instant) -> Option<Instant>;
}

/// When the caller at 1-based `position` in a line of `permits` concurrent
/// calls, `in_flight` of them taken now, gets a permit, if every call holds
/// its permit until `service` after it starts at the source: a simulation of
/// the permits freeing up and the source's projected starts. `None` when the
/// simulation would take more than `max_steps` steps.
pub(crate) fn admission(
    projection: &mut dyn Projection,
    now: Instant,
    permits: u32,
    in_flight: u32,
    position: u32,
    service: Duration,
    max_steps: u32,
) -> Option<Instant> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    if position > max_steps {
        return None;
    }
    let mut frees: BinaryHeap<Reverse<Instant>> = BinaryHeap::new();
    // Permits not taken (a partition's cap held the line back): free now.
    for _ in in_flight..permits {
        frees.push(Reverse(now));
    }
    let waiting_below = u32::try_from(projection.waiting()).unwrap_or(u32::MAX);
    let running = in_flight.saturating_sub(waiting_below);
    // Calls running upstream end `service` after they started.
    let started = projection.started();
    let known = started.len().min(running as usize);
    for at in &started[started.len() - known..] {
        let ends = crate::time::after(*at, service);
        frees.push(Reverse(ends.max(now)));
    }
    for _ in known..running as usize {
        frees.push(Reverse(crate::time::after(now, service)));
    }
    // Calls that hold a permit and wait in the source's line.
    for _ in 0..in_flight.saturating_sub(running) {
        let start = projection.next_start(now)?;
        frees.push(Reverse(crate::time::after(start, service)));
    }
    // The callers ahead, then this one.
    for q in 1..=position {
        let Reverse(admitted) = frees.pop()?;
        if q == position {
            return Some(admitted);
        }
        let start = projection.next_start(admitted)?;
        frees.push(Reverse(crate::time::after(start, service)));
    }
    None
}

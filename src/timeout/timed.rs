//! Deadlines on a streamed response: time to first chunk, idle gap between
//! chunks, and a total deadline — a [`Tap`] on the one body wrapper,
//! [`Tapped`](crate::guard::Tapped), for `Stream`s of `Result`s and for
//! `http_body::Body` (feature `http`).
//!
//! One timer per stream, re-armed lazily: a chunk only records the time it
//! arrived; the timer is moved when it fires early (the deadline moved on since)
//! or must fire sooner. A steady stream pays one clock read per chunk, not a
//! timer re-registration.

use super::Limits;
use crate::error::{BoxError, RejectKind, Rejected};
use crate::guard::{Flow, Tap};
use crate::observe::Observer;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Which deadline expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    FirstChunk(Duration),
    Idle(Duration),
    Total(Duration),
    /// `total` tightened by the request's own limit.
    RequestDeadline(Duration),
}

/// The [`Tap`] of a timeout that follows a streamed answer
/// (`Tapped<S, Deadlines>`): the first-chunk, idle and total deadlines of one
/// response. A deadline that passes while the stream waits yields one `Err` (a
/// [`Rejected`] of kind `Timeout`, classified `Transient`) and ends the stream.
///
/// The deadlines are looked at when the stream is polled, after the
/// upstream (as `tokio::time::timeout` does): an item the upstream has ready
/// by then is handed over even if the poll comes after a deadline, and
/// counts as progress. A stream polled late cannot tell an upstream that
/// stalled from a reader (or a runtime) that was slow, and a slow reader
/// must not lose an item that came in time; a stream that still has nothing
/// when polled past its deadline ends at once.
///
/// The timer is boxed (one allocation per streamed response) so the tapped
/// stream stays `Unpin` when the inner one is: `.next().await` just works.
#[derive(Debug)]
pub struct Deadlines {
    timer: Pin<Box<Sleep>>,
    limits: Limits,
    /// When the whole call must be over (from the call's start).
    total_at: Option<Instant>,
    /// When the response arrived or the last chunk did.
    last_progress: Instant,
    got_first: bool,
    obs: Option<Arc<Observer>>,
    /// `total` is the request's own limit ("request deadline").
    request_deadline: bool,
}

impl Deadlines {
    pub(crate) fn new(
        limits: Limits,
        started: Instant,
        obs: Option<Arc<Observer>>,
        request_deadline: bool,
    ) -> Self {
        let now = Instant::now();
        let total_at = limits.total.map(|t| crate::time::after(started, t));
        let first = [
            limits
                .first_chunk
                .or(limits.idle)
                .map(|d| crate::time::after(now, d)),
            total_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now);
        Deadlines {
            timer: Box::pin(tokio::time::sleep_until(first)),
            limits,
            total_at,
            last_progress: now,
            got_first: false,
            obs,
            request_deadline,
        }
    }

    /// The earliest deadline now, and what it is.
    fn deadline(&self) -> Option<(Instant, Expired)> {
        let gap = if self.got_first {
            self.limits.idle.map(|d| (d, Expired::Idle(d)))
        } else {
            self.limits
                .first_chunk
                .or(self.limits.idle)
                .map(|d| (d, Expired::FirstChunk(d)))
        };
        let gap = gap.map(|(d, e)| (crate::time::after(self.last_progress, d), e));
        let total = self.total_at.zip(self.limits.total).map(|(at, d)| {
            let what = if self.request_deadline {
                Expired::RequestDeadline(d)
            } else {
                Expired::Total(d)
            };
            (at, what)
        });
        match (gap, total) {
            (Some(g), Some(t)) => Some(if t.0 <= g.0 { t } else { g }),
            (g, t) => g.or(t),
        }
    }

    fn progress(&mut self) {
        self.got_first = true;
        if self.limits.idle.is_some() || self.limits.first_chunk.is_some() {
            self.last_progress = Instant::now();
        }
    }

    /// Called when the inner stream is pending: `Some(error)` once a deadline passed.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<BoxError> {
        loop {
            let (at, what) = self.deadline()?;
            if Instant::now() >= at {
                return Some(timeout_error(self.obs.as_ref(), what));
            }
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
    }
}

/// Tells the layer's observers (or, unnamed and unheard, tracing alone).
pub(crate) fn observe(obs: Option<&Observer>, r: &Rejected) {
    match obs {
        Some(o) => o.rejected(r),
        None => Observer::default().rejected(r),
    }
}

fn timeout_error(obs: Option<&Arc<Observer>>, what: Expired) -> BoxError {
    let detail = match what {
        Expired::FirstChunk(d) => format!("no first chunk within {}", crate::time::Human(d)),
        Expired::Idle(d) => format!("no progress for {}", crate::time::Human(d)),
        Expired::Total(d) => format!("total {}", crate::time::Human(d)),
        Expired::RequestDeadline(d) => format!("request deadline {}", crate::time::Human(d)),
    };
    let r = Rejected::new("timeout", RejectKind::Timeout)
        .with_name_opt(obs.and_then(|o| o.name.as_ref()))
        .with_detail(detail);
    observe(obs.map(|o| &**o), &r);
    r.into()
}

impl<D, E: Into<BoxError>> Tap<D, E> for Deadlines {
    type Error = BoxError;

    #[inline]
    fn item(&mut self, _item: &D) -> Flow {
        self.progress();
        Flow::Continue
    }

    #[inline]
    fn error(&mut self, error: E) -> BoxError {
        error.into()
    }

    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<D, BoxError>>> {
        match self.poll_expired(cx) {
            Some(err) => Poll::Ready(Some(Err(err))),
            None => Poll::Pending,
        }
    }
}

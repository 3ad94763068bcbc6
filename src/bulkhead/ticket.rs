//! Watching a caller's place in line ("you are 12th of 45, about 40 s").
//!
//! A [`QueueTicket`] is created by the code that sends a request and travels
//! with it (in a field, or in `http::Request` extensions). The bulkhead links it
//! to the caller's place in line; anyone holding a clone can ask for the status
//! at any time — the pull model of seed 000's front end, which polled every 3 s.
//! Asking costs one lock and O(log n): nothing is pushed to every waiter each time
//! the line moves, so 100,000 waiters cost nothing until someone looks.

use super::queue::Shared;
use crate::error::RejectKind;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// A caller's place in the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStatus {
    /// 1-based position: 1 is served next.
    pub position: u64,
    /// How many callers wait in all.
    pub waiting: u64,
    /// Expected wait from here. By default `ceil(position / max_concurrent) ×
    /// service time`, where the service time is the smoothed duration of calls
    /// admitted from the line (or the configured `expected_service_time` until
    /// one finished). With an ETA source below the bulkhead
    /// ([`Bulkhead::set_eta_source`](super::Bulkhead::set_eta_source), which
    /// the LLM preset sets to its pacer): when the permit this caller waits
    /// for frees, i.e. one service time after the call ahead of it starts at
    /// the source, as the source projects its starts.
    pub eta: Option<Duration>,
}

impl fmt::Display for QueueStatus {
    /// `"you are 12th of 45, about 40 s"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.position;
        let suffix = match (p % 10, p % 100) {
            (1, n) if n != 11 => "st",
            (2, n) if n != 12 => "nd",
            (3, n) if n != 13 => "rd",
            _ => "th",
        };
        write!(f, "you are {p}{suffix} of {}", self.waiting)?;
        if let Some(eta) = self.eta {
            write!(f, ", about {}", crate::time::Human(eta))?;
        }
        Ok(())
    }
}

/// What a ticket knows about its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TicketStatus {
    /// Not (yet) seen by a bulkhead.
    Idle,
    /// Waiting in line.
    Waiting(QueueStatus),
    /// Holding a permit (the call is running or ran).
    Admitted,
    /// Refused by the bulkhead.
    Rejected(RejectKind),
    /// The caller went away while waiting.
    Cancelled,
}

#[derive(Debug)]
enum Link {
    Idle,
    Queued {
        shared: Weak<Shared>,
        slot: u32,
        seq: u64,
    },
    Done(TicketStatus),
}

/// A handle to watch one request's place in a bulkhead's line.
///
/// ```
/// use semaforo::bulkhead::{QueueTicket, TicketStatus};
/// let ticket = QueueTicket::new();
/// assert_eq!(ticket.status(), TicketStatus::Idle);
/// ```
#[derive(Debug, Clone)]
pub struct QueueTicket {
    link: Arc<Mutex<Link>>,
}

impl Default for QueueTicket {
    fn default() -> Self {
        QueueTicket::new()
    }
}

impl QueueTicket {
    /// A new, unlinked ticket.
    pub fn new() -> Self {
        QueueTicket {
            link: Arc::new(Mutex::new(Link::Idle)),
        }
    }

    fn set(&self, link: Link) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = link;
    }

    pub(crate) fn queued(&self, shared: &Arc<Shared>, (slot, seq): (u32, u64)) {
        self.set(Link::Queued {
            shared: Arc::downgrade(shared),
            slot,
            seq,
        });
    }

    pub(crate) fn finished(&self, status: TicketStatus) {
        self.set(Link::Done(status));
    }

    /// The request's status now.
    pub fn status(&self) -> TicketStatus {
        let (shared, slot, seq) = {
            let link = self.link.lock().unwrap_or_else(|e| e.into_inner());
            match &*link {
                Link::Idle => return TicketStatus::Idle,
                Link::Done(s) => return *s,
                Link::Queued { shared, slot, seq } => (shared.clone(), *slot, *seq),
            }
        };
        shared
            .upgrade()
            .and_then(|s| s.status(slot, seq))
            .unwrap_or(TicketStatus::Cancelled)
    }

    /// The place in line, while waiting.
    pub fn queue_status(&self) -> Option<QueueStatus> {
        match self.status() {
            TicketStatus::Waiting(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_reads_like_a_sentence() {
        let s = |position, waiting, eta: Option<u64>| QueueStatus {
            position,
            waiting,
            eta: eta.map(Duration::from_secs),
        };
        assert_eq!(
            s(12, 45, Some(40)).to_string(),
            "you are 12th of 45, about 40 s"
        );
        assert_eq!(s(1, 3, None).to_string(), "you are 1st of 3");
        assert_eq!(s(22, 30, None).to_string(), "you are 22nd of 30");
        assert_eq!(s(13, 30, None).to_string(), "you are 13th of 30");
        assert_eq!(s(103, 300, None).to_string(), "you are 103rd of 300");
    }
}

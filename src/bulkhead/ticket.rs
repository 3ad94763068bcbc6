//! Watching a caller's place in line ("you are 12th of 45, about 40 s").
//!
//! A [`QueueTicket`] is created by the code that sends a request and travels
//! with it (in a field, or in `http::Request` extensions). The bulkhead links it
//! to the caller's place in line; anyone holding a clone can ask for the status
//! at any time — the pull model of a web front end polling every 3 s.
//! Asking costs one lock and O(log n): nothing is pushed to every waiter each time
//! the line moves, so 100,000 waiters cost nothing until someone looks.

use super::queue::{in_flight, Config, Queue, Shared, Slot, SlotState, ETA_STEPS};
use crate::error::RejectKind;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

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
        /// Says when it was granted (its slot is then gone).
        node: Arc<super::queue::Node>,
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

    pub(crate) fn queued(
        &self,
        shared: &Arc<Shared>,
        (slot, seq): (u32, u64),
        node: &Arc<super::queue::Node>,
    ) {
        self.set(Link::Queued {
            shared: Arc::downgrade(shared),
            slot,
            seq,
            node: node.clone(),
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
                Link::Queued {
                    shared,
                    slot,
                    seq,
                    node,
                } => {
                    let n = node.state.load(std::sync::atomic::Ordering::Acquire);
                    if n == super::queue::NODE_GRANTED || n == super::queue::NODE_PICKED {
                        return TicketStatus::Admitted;
                    }
                    (shared.clone(), *slot, *seq)
                }
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

/// Positions and ETAs: what a ticket reads from the line.
impl Shared {
    /// Retry-after hint for a full queue: the time between two admissions.
    #[inline]
    pub(super) fn drain_interval(q: &Queue, cfg: &Config, limit: u32) -> Option<Duration> {
        let s = q
            .service_ewma
            .or(cfg.expected_service.map(|d| d.as_secs_f64()))?;
        Duration::try_from_secs_f64(s / f64::from(limit.max(1))).ok()
    }

    /// How long a caller arriving now would wait (the line's own ETA for
    /// the place after the last waiter, 1 s a round when no service time is
    /// known yet), and whether it would be refused: closed (`ShuttingDown`), the line
    /// full (`QueueFull` at once), the line's known ETA past `max_wait`
    /// (`QueueTimeout` after waiting it), or admissions paused (limit 0: it
    /// would wait until the limit rises). One lock.
    pub(crate) fn outlook(&self) -> (Duration, bool) {
        let q = self.lock();
        let waiting = (q.line.len() as u32).saturating_add(q.parked_total);
        let pos = waiting.saturating_add(1);
        let limit = self.limit();
        let known = Self::eta(&q, &self.cfg, limit, pos);
        let closed = self.state.load(Ordering::Acquire) & super::queue::CLOSED != 0;
        // Paused (`set_max_concurrent(0)`): a caller would wait until the
        // limit rises, whenever that is.
        let full = closed || limit == 0 || waiting >= self.line_bound();
        let late = matches!((known, self.cfg.max_wait), (Some(eta), Some(max)) if eta > max);
        let estimate =
            known.unwrap_or_else(|| Duration::from_secs(u64::from(pos.div_ceil(limit.max(1)))));
        (estimate, full || late)
    }

    /// ETA for position `pos` (1-based): `ceil(pos / limit) × service time`.
    #[inline]
    pub(super) fn eta(q: &Queue, cfg: &Config, limit: u32, pos: u32) -> Option<Duration> {
        // Admissions paused (`set_max_concurrent(0)`): no time to say.
        if limit == 0 {
            return None;
        }
        let s = q
            .service_ewma
            .or(cfg.expected_service.map(|d| d.as_secs_f64()))?;
        let rounds = pos.div_ceil(limit.max(1));
        Duration::try_from_secs_f64(s * f64::from(rounds)).ok()
    }

    #[inline]
    pub(super) fn position(q: &Queue, slot: &Slot, slot_id: u32) -> u32 {
        if slot.promoted {
            q.line.rank(&(slot.rank, slot.seq, slot_id)) as u32 + 1
        } else {
            // Parked behind its partition's cap: everyone in the line, then its
            // partition's waiters ahead of it.
            let ahead = slot
                .partition
                .and_then(|k| q.partitions.get(&k))
                .map_or(0, |p| p.parked.range(..(slot.rank, slot.seq)).count());
            q.line.len() as u32 + ahead as u32 + 1
        }
    }

    pub(crate) fn status(&self, slot_id: u32, seq: u64) -> Option<TicketStatus> {
        let q = self.lock();
        let slot = q.slots.get(slot_id as usize).filter(|s| s.seq == seq)?;
        let mut status = match slot.state {
            SlotState::Waiting => {
                let position = Self::position(&q, slot, slot_id);
                let limit = self.limit.load(Ordering::Relaxed);
                QueueStatus {
                    position: u64::from(position),
                    waiting: q.line.len() as u64 + u64::from(q.parked_total),
                    eta: Self::eta(&q, &self.cfg, limit, position),
                }
            }
            SlotState::Rejected(kind) => return Some(TicketStatus::Rejected(kind)),
            SlotState::Shed => return Some(TicketStatus::Rejected(RejectKind::QueueFull)),
        };
        let service = self.cfg.expected_service.or(q
            .service_ewma
            .and_then(|s| Duration::try_from_secs_f64(s).ok()));
        drop(q);
        // With a source below (a pacer), its projected starts decide; asked
        // without our lock held (the source takes its own). Paused
        // (limit 0): no time to say.
        let paused = self.limit.load(Ordering::Relaxed) == 0;
        if let (Some(service), Some(source), false) = (service, self.eta_source(), paused) {
            let now = Instant::now();
            let mut projection = source.projection(now);
            let in_flight = in_flight(self.state.load(Ordering::Acquire));
            let limit = self.limit.load(Ordering::Relaxed);
            if let Some(at) = crate::eta::admission(
                &mut *projection,
                now,
                limit,
                in_flight,
                u32::try_from(status.position).unwrap_or(u32::MAX),
                service,
                ETA_STEPS,
            ) {
                status.eta = Some(at.saturating_duration_since(now));
            }
        }
        Some(TicketStatus::Waiting(status))
    }

    fn eta_source(&self) -> Option<Arc<dyn crate::eta::EtaSource>> {
        self.eta_source
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
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

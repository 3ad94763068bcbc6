//! A caller's place in a bulkhead's line.

use super::permit::BulkheadPermit;
use super::queue::{Shared, SlotState};
use crate::error::{RejectKind, Rejected};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// A caller's place in line. Dropping it leaves the line (or gives back a
/// permit that was granted but not yet taken).
#[derive(Debug)]
pub(crate) struct Waiter {
    pub(super) shared: Arc<Shared>,
    pub(super) slot: u32,
    pub(super) seq: u64,
    pub(super) done: bool,
    /// Granted while earlier grants were not yet picked up: yield once
    /// before taking the permit, so that they start first.
    pub(super) defer: bool,
    pub(crate) deadline: Option<Instant>,
}

impl Waiter {
    #[inline]
    pub(crate) fn id(&self) -> (u32, u64) {
        (self.slot, self.seq)
    }

    #[inline]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Ready with a permit once granted, or with the rejection (closed).
    pub(crate) fn poll_permit(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<BulkheadPermit, Rejected>> {
        if self.done {
            return Poll::Ready(Err(self.shared.rejection(RejectKind::ShuttingDown)));
        }
        let mut q = self.shared.lock();
        let Some(slot) = q
            .slots
            .get_mut(self.slot as usize)
            .filter(|s| s.seq == self.seq)
        else {
            self.done = true;
            return Poll::Ready(Err(self.shared.rejection(RejectKind::ShuttingDown)));
        };
        match slot.state {
            SlotState::Waiting => {
                match &mut slot.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    w => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            SlotState::Granted if self.defer => {
                self.defer = false;
                drop(q);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            SlotState::Granted => {
                // Picked up: no longer counted as waiting (see `dispatch`).
                self.shared
                    .state
                    .fetch_sub(super::queue::WAITER, Ordering::AcqRel);
                let holder = super::queue::Holder {
                    partition: slot.partition,
                    class: slot.class,
                };
                q.slots.remove(self.slot as usize);
                self.done = true;
                drop(q);
                Poll::Ready(Ok(BulkheadPermit::new(
                    self.shared.clone(),
                    holder,
                    Some(Instant::now()),
                )))
            }
            SlotState::Rejected(kind) => {
                q.slots.remove(self.slot as usize);
                self.done = true;
                drop(q);
                Poll::Ready(Err(self.shared.refuse(self.shared.rejection(kind))))
            }
            SlotState::Shed => {
                q.slots.remove(self.slot as usize);
                self.done = true;
                let r = self.shared.shed_rejection(&q);
                drop(q);
                Poll::Ready(Err(self.shared.refuse(r)))
            }
        }
    }

    /// The `max_wait` deadline passed: leave the line with `QueueTimeout` — unless
    /// a permit was granted in the meantime, which is then taken.
    pub(crate) fn expire(&mut self, waited: Duration) -> Result<BulkheadPermit, Rejected> {
        let shared = self.shared.clone();
        let mut q = shared.lock();
        let position = q
            .slots
            .get(self.slot as usize)
            .filter(|s| s.seq == self.seq)
            .map_or(1, |slot| Shared::position(&q, slot, self.slot));
        let before = shared.remove_waiter(&mut q, self.slot, self.seq);
        self.done = true;
        match before {
            Some((SlotState::Granted, holder)) => {
                drop(q);
                Ok(BulkheadPermit::new(shared, holder, Some(Instant::now())))
            }
            Some((SlotState::Rejected(kind), _)) => {
                drop(q);
                Err(shared.refuse(shared.rejection(kind)))
            }
            Some((SlotState::Shed, _)) => {
                let r = shared.shed_rejection(&q);
                drop(q);
                Err(shared.refuse(r))
            }
            _ => {
                let eta = Shared::eta(&q, &shared.cfg, shared.limit(), position);
                shared.dispatch(&mut q);
                drop(q);
                shared.stats.queue_timeout.fetch_add(1, Ordering::Relaxed);
                let mut r = shared
                    .rejection(RejectKind::QueueTimeout)
                    .with_detail(format!(
                        "waited {}, position {position}",
                        crate::time::Human(waited)
                    ));
                if let Some(eta) = eta {
                    r = r.with_retry_after(eta);
                }
                Err(shared.refuse(r))
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut q = self.shared.lock();
        match self.shared.remove_waiter(&mut q, self.slot, self.seq) {
            // Granted but never taken: give the permit back.
            Some((SlotState::Granted, holder)) => self.shared.release_locked(&mut q, holder),
            _ => self.shared.dispatch(&mut q),
        }
    }
}

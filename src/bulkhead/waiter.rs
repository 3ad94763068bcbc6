//! A caller's place in a bulkhead's line.

use super::permit::BulkheadPermit;
use super::queue::{Shared, SlotState, NODE_GRANTED, NODE_PICKED, NODE_WAITING};
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
    /// Its grant, read without the lock.
    pub(super) node: Arc<super::queue::Node>,
    /// Whose permit it takes.
    pub(super) holder: super::queue::Holder,
    pub(crate) deadline: Option<Instant>,
    /// When it took its place (the clock read of its arrival).
    pub(crate) enqueued_at: Instant,
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

    #[inline]
    pub(crate) fn node(&self) -> &Arc<super::queue::Node> {
        &self.node
    }

    /// Ready with a permit once granted, or with the rejection (closed).
    pub(crate) fn poll_permit(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<BulkheadPermit, Rejected>> {
        if self.done {
            return Poll::Ready(Err(self.shared.rejection(RejectKind::ShuttingDown)));
        }
        // Granted: taken without the line's lock (its slot was freed at the
        // grant). Registered before the second look, so a grant in between
        // wakes this task.
        let mut node = self.node.state.load(Ordering::Acquire);
        if node == NODE_WAITING {
            self.node.waker.register(cx.waker());
            node = self.node.state.load(Ordering::Acquire);
            if node == NODE_WAITING {
                return Poll::Pending;
            }
        }
        if node == NODE_GRANTED {
            if self.defer {
                self.defer = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            return Poll::Ready(Ok(self.take_granted()));
        }
        // Rejected or shed: why is read under the lock.
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
            // Not reached: the node is settled together with the slot,
            // under the lock.
            SlotState::Waiting => Poll::Pending,
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

    /// Takes the permit granted to this waiter (its node says `GRANTED`;
    /// with or without the lock: only this waiter changes that state).
    fn take_granted(&mut self) -> BulkheadPermit {
        // No longer counted as waiting (see `Shared::dispatch`).
        self.shared
            .state
            .fetch_sub(super::queue::WAITER, Ordering::AcqRel);
        self.node.state.store(NODE_PICKED, Ordering::Release);
        self.done = true;
        BulkheadPermit::new(self.shared.clone(), self.holder, Some(Instant::now()))
    }

    /// The `max_wait` deadline passed: leave the line with `QueueTimeout` — unless
    /// a permit was granted in the meantime, which is then taken.
    pub(crate) fn expire(&mut self, waited: Duration) -> Result<BulkheadPermit, Rejected> {
        let shared = self.shared.clone();
        let mut q = shared.lock();
        // Grants are made under the lock: this look is final.
        if self.node.state.load(Ordering::Acquire) == NODE_GRANTED {
            drop(q);
            return Ok(self.take_granted());
        }
        let position = q
            .slots
            .get(self.slot as usize)
            .filter(|s| s.seq == self.seq)
            .map_or(1, |slot| Shared::position(&q, slot, self.slot));
        let before = shared.remove_waiter(&mut q, self.slot, self.seq);
        self.done = true;
        match before {
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
        // Granted but never taken: give the permit back. Grants are made
        // under the lock, so this look is final.
        if self.node.state.load(Ordering::Acquire) == NODE_GRANTED {
            // Not admitted after all: a ticket reads `Cancelled`.
            self.node
                .state
                .store(super::queue::NODE_SETTLED, Ordering::Release);
            self.shared
                .state
                .fetch_sub(super::queue::WAITER, Ordering::AcqRel);
            self.shared.release_locked(&mut q, self.holder);
            return;
        }
        self.shared.remove_waiter(&mut q, self.slot, self.seq);
        self.shared.dispatch(&mut q);
    }
}

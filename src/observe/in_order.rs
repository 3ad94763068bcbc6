//! Events told in the order they happened, outside every lock.
//!
//! A layer decides a change under its own lock (a breaker's transition, an
//! adaptive limit's move, a degradation level) but must tell its listeners
//! with no lock held: a listener may call back into the layer. Told after
//! the lock is released, two changes made one after the other on two
//! threads could reach the listeners in the opposite order — a listener
//! would end on the older state. So each change is queued while the layer's
//! lock is held (the queue is in the order of the changes), and told by one
//! thread at a time: the one that finds nobody telling tells everything
//! queued, including what other threads (or its own listeners) queue
//! meanwhile.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// A queue of changes to tell, in order, one teller at a time.
#[derive(Debug)]
pub(crate) struct InOrder<T> {
    queue: Mutex<VecDeque<T>>,
    /// A thread is telling the queue.
    telling: AtomicBool,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        InOrder {
            queue: Mutex::new(VecDeque::new()),
            telling: AtomicBool::new(false),
        }
    }
}

impl<T> InOrder<T> {
    fn queue(&self) -> MutexGuard<'_, VecDeque<T>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a change: call it under the lock the change was made under.
    pub(crate) fn push(&self, change: T) {
        self.queue().push_back(change);
    }

    /// Tells every queued change with `tell`, in order — unless another
    /// thread (or a caller up this very stack: a listener that changed the
    /// layer) is telling them, which then tells these too. Call it with no
    /// lock held. A `tell` that panics leaves the queue to the next caller
    /// (the layers' `emit` catches listeners' panics).
    pub(crate) fn tell(&self, mut tell: impl FnMut(T)) {
        loop {
            if self.telling.swap(true, Ordering::AcqRel) {
                return;
            }
            let guard = Unflag(&self.telling);
            loop {
                // Popped in a statement of its own: the queue's lock is not
                // held while a listener runs.
                let next = self.queue().pop_front();
                let Some(change) = next else {
                    break;
                };
                tell(change);
            }
            drop(guard);
            // A change queued between the last pop and the release.
            if self.queue().is_empty() {
                return;
            }
        }
    }
}

/// Clears the telling flag when dropped (a panicking `tell` included).
struct Unflag<'a>(&'a AtomicBool);

impl Drop for Unflag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn changes_queued_while_telling_are_told_after_in_order() {
        let q: Arc<InOrder<u32>> = Arc::default();
        let seen = std::cell::RefCell::new(Vec::new());
        q.push(1);
        q.tell(|c| {
            seen.borrow_mut().push(c);
            if c == 1 {
                // A listener that changes the layer: queued, told next.
                q.push(2);
                q.tell(|_| panic!("not told by a second teller"));
            }
        });
        assert_eq!(*seen.borrow(), vec![1, 2]);
    }

    #[test]
    fn threads_telling_at_once_tell_each_change_once_in_queue_order() {
        let q: Arc<InOrder<u32>> = Arc::default();
        let told: Arc<Mutex<Vec<u32>>> = Arc::default();
        let order = Arc::new(Mutex::new(0u32));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (q, told, order) = (q.clone(), told.clone(), order.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        {
                            // The layer's lock: changes numbered in order.
                            let mut n = order.lock().unwrap();
                            *n += 1;
                            q.push(*n);
                        }
                        q.tell(|c| told.lock().unwrap().push(c));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        // Whatever a last teller left (none in practice).
        q.tell(|c| told.lock().unwrap().push(c));
        let told = told.lock().unwrap();
        assert_eq!(*told, (1..=2_000).collect::<Vec<_>>());
    }
}

//! A bulkhead permit: one of its `max_concurrent` slots.

use super::queue::{Holder, Shared};
use std::sync::Arc;
use tokio::time::Instant;

/// A bulkhead permit: one of the `max_concurrent` slots. Released on drop.
///
/// With [`OnStreamEnd`](crate::guard::OnStreamEnd) / `OnBodyEnd` the
/// permit rides inside the response body until its last chunk.
#[derive(Debug)]
pub struct BulkheadPermit {
    shared: Arc<Shared>,
    /// Only permits from the slow path carry more (boxed, so the fast path's
    /// permit — and the response future holding it — stays two words).
    slow: Option<Box<SlowPermit>>,
}

#[derive(Debug)]
struct SlowPermit {
    holder: Holder,
    granted_at: Option<Instant>,
}

impl BulkheadPermit {
    /// A permit taken on the lock-free path.
    #[inline]
    pub(crate) fn fast(shared: Arc<Shared>) -> Self {
        BulkheadPermit { shared, slow: None }
    }

    pub(crate) fn new(shared: Arc<Shared>, holder: Holder, granted_at: Option<Instant>) -> Self {
        let slow = (!holder.is_plain() || granted_at.is_some())
            .then(|| Box::new(SlowPermit { holder, granted_at }));
        BulkheadPermit { shared, slow }
    }
}

impl BulkheadPermit {
    /// When a waiter was granted this permit (none for one taken at once).
    #[inline]
    pub(crate) fn granted_at(&self) -> Option<Instant> {
        self.slow.as_ref().and_then(|s| s.granted_at)
    }

    /// When the call under this permit starts, if it is a sample of an
    /// adaptive limit.
    #[inline]
    pub(crate) fn sampling(&self) -> Option<Instant> {
        self.shared.sampling()
    }

    /// The sampled call under this permit ended with `result`.
    pub(crate) fn sample<Res, C>(
        &self,
        started: Instant,
        classify: &C,
        result: &Result<Res, crate::BoxError>,
    ) where
        C: crate::classify::Classify<Res, crate::BoxError>,
    {
        use crate::classify::Class;
        let class = match result {
            Ok(res) => Some(classify.classify(Ok(res))),
            // Our own refusals are no sample — but a timeout below is.
            Err(e) => match crate::Rejected::find(e.as_ref()) {
                Some(r) if r.kind() == crate::RejectKind::Timeout => Some(Class::Transient),
                Some(_) => None,
                None => Some(classify.classify(Err(e))),
            },
        };
        self.shared.sample(started, class.as_ref());
    }
}

impl Drop for BulkheadPermit {
    #[inline]
    fn drop(&mut self) {
        match self.slow.take() {
            None => self.shared.release(),
            Some(s) => self.shared.release_slow(s.holder, s.granted_at),
        }
    }
}

impl crate::guard::Guard for BulkheadPermit {
    fn finish(self, _end: crate::guard::StreamEnd) {
        drop(self);
    }
}

//! The only way other threads reach a scheduler: a shared queue of ids to abort, drained by the
//! owner at the start of each step.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::request::RequestId;

/// Cheap to clone; clones share one queue.
#[derive(Debug, Clone, Default)]
pub struct AbortHandle {
    pending: Arc<Mutex<VecDeque<RequestId>>>,
}

impl AbortHandle {
    /// Queues an abort. Idempotent: repeated, unknown or already finished ids are ignored when
    /// the queue is drained.
    pub fn abort(&self, id: RequestId) {
        self.lock().push_back(id);
    }

    /// Pops queued ids in order while `apply` returns `true` for fewer than `max_applied` of them
    /// (ids it ignores cost nothing against the limit).
    pub(crate) fn drain(&self, max_applied: usize, mut apply: impl FnMut(RequestId) -> bool) {
        let mut pending = self.lock();
        let mut applied = 0;
        while applied < max_applied {
            let Some(id) = pending.pop_front() else { break };
            if apply(id) {
                applied += 1;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<RequestId>> {
        // The queue holds plain ids and is consistent after any panic, so poisoning is harmless.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_in_order_up_to_the_limit() {
        let handle = AbortHandle::default();
        for id in [1, 99, 2, 3] {
            handle.clone().abort(id);
        }
        let mut seen = Vec::new();
        handle.drain(2, |id| {
            seen.push(id);
            id != 99
        });
        assert_eq!(
            seen,
            [1, 99, 2],
            "an ignored id does not count against the limit"
        );
        let mut rest = Vec::new();
        handle.drain(10, |id| {
            rest.push(id);
            true
        });
        assert_eq!(rest, [3]);
    }

    #[test]
    fn shared_across_threads() {
        let handle = AbortHandle::default();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = handle.clone();
                std::thread::spawn(move || (0..100).for_each(|i| h.abort(t * 100 + i)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let mut count = 0;
        handle.drain(usize::MAX, |_| {
            count += 1;
            true
        });
        assert_eq!(count, 400);
    }
}

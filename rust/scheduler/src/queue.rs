//! The waiting queue, ordered by (priority, readmit rank, arrival).
//!
//! One ordered map serves both policies: under FCFS every priority is 0, so the order is
//! "preempted requests first, then arrival". An ordered map (rather than a deque or a heap) lets
//! admission walk the first few entries for skip-ahead and lets an abort remove a waiting request
//! in O(log n), so no step ever touches more than the entries it looks at.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::config::Policy;
use crate::request::Request;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueKey {
    priority: i64,
    /// 0 for a preempted request, 1 for one that never ran: a preempted request goes back to the
    /// front of its priority class, so preemption never lets a newcomer overtake it.
    readmit_rank: u8,
    arrival: u64,
}

impl QueueKey {
    pub fn of(req: &Request, policy: Policy) -> Self {
        Self {
            priority: match policy {
                Policy::Fcfs => 0,
                Policy::Priority => req.priority,
            },
            readmit_rank: if req.preempted { 0 } else { 1 },
            arrival: req.arrival,
        }
    }
}

/// Slots of waiting requests in admission order.
#[derive(Debug, Default)]
pub struct WaitingQueue {
    entries: BTreeMap<QueueKey, u32>,
}

impl WaitingQueue {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn push(&mut self, key: QueueKey, slot: u32) {
        let previous = self.entries.insert(key, slot);
        debug_assert!(previous.is_none(), "queue keys are unique by arrival");
    }

    pub fn remove(&mut self, key: &QueueKey) -> Option<u32> {
        self.entries.remove(key)
    }

    /// The first entry after `after`, or the head when `after` is `None`.
    pub fn next_after(&self, after: Option<&QueueKey>) -> Option<(QueueKey, u32)> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.entries
            .range((lower, Bound::Unbounded))
            .next()
            .map(|(k, s)| (*k, *s))
    }

    pub fn get(&self, key: &QueueKey) -> Option<u32> {
        self.entries.get(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::NewRequest;

    fn key(priority: i64, arrival: u64, preempted: bool, policy: Policy) -> QueueKey {
        let mut req = Request::new(NewRequest::new(0, vec![1], 1), arrival, 0);
        req.priority = priority;
        req.preempted = preempted;
        QueueKey::of(&req, policy)
    }

    fn order(policy: Policy, reqs: &[(i64, u64, bool)]) -> Vec<u32> {
        let mut q = WaitingQueue::default();
        for (slot, &(prio, arrival, preempted)) in reqs.iter().enumerate() {
            q.push(key(prio, arrival, preempted, policy), slot as u32);
        }
        let mut out = Vec::new();
        let mut after = None;
        while let Some((k, slot)) = q.next_after(after.as_ref()) {
            out.push(slot);
            after = Some(k);
        }
        out
    }

    #[test]
    fn fcfs_orders_by_arrival_with_preempted_first() {
        let reqs = [(5, 0, false), (-5, 1, false), (0, 2, true), (0, 3, false)];
        assert_eq!(order(Policy::Fcfs, &reqs), [2, 0, 1, 3]);
    }

    #[test]
    fn priority_orders_by_priority_then_readmit_rank() {
        let reqs = [(5, 0, false), (-5, 1, false), (5, 2, true), (0, 3, false)];
        assert_eq!(order(Policy::Priority, &reqs), [1, 3, 2, 0]);
    }

    #[test]
    fn remove_by_key() {
        let mut q = WaitingQueue::default();
        let (a, b) = (
            key(0, 0, false, Policy::Fcfs),
            key(0, 1, false, Policy::Fcfs),
        );
        q.push(a, 0);
        q.push(b, 1);
        assert_eq!(q.remove(&a), Some(0));
        assert_eq!(q.remove(&a), None);
        assert_eq!(q.next_after(None), Some((b, 1)));
        assert_eq!(q.len(), 1);
    }
}

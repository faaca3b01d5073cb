//! Requests and their slab. A request lives in one slot from `add_request` until it finishes or
//! is aborted; the hot path addresses it by slot, the external id is looked up only at intake,
//! abort and finish.
//!
//! State machine:
//! ```text
//! add ─► Waiting ─admit─► Running ─finish/abort─► (slot freed)
//!           ▲                │
//!           └───preempt──────┘   (tokens so far become the prompt to recompute)
//! ```
//! Waiting requests may also be aborted or finished; every exit frees the slot.

use std::collections::HashMap;

use crate::pool::PageId;
use crate::prefix_cache::{chain_hash, ROOT};

/// External request id, assigned by Python (int64 in the step buffers).
pub type RequestId = i64;

/// Why a request ended in `update()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token after `min_tokens`.
    Stop,
    /// `max_tokens` or the longest sequence (`SchedulerConfig::max_seq_len`) reached.
    Length,
}

impl FinishReason {
    /// The name Python reports (OpenAI's `finish_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What `add_request` receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    pub id: RequestId,
    pub prompt: Vec<i32>,
    pub max_tokens: u32,
    pub min_tokens: u32,
    pub stop_token_ids: Vec<i32>,
    /// Lower runs first under `Policy::Priority`; ignored under FCFS.
    pub priority: i64,
    /// Whether the request may take and publish prefix-cache pages (when the cache is on). A
    /// request that needs its prompt's logits (prompt logprobs) computes every token.
    pub cache_prefix: bool,
}

impl NewRequest {
    pub fn new(id: RequestId, prompt: Vec<i32>, max_tokens: u32) -> Self {
        Self {
            id,
            prompt,
            max_tokens,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            priority: 0,
            cache_prefix: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Waiting,
    Running,
}

#[derive(Debug)]
pub struct Request {
    pub id: RequestId,
    pub status: Status,
    /// Prompt followed by the outputs so far.
    pub tokens: Vec<i32>,
    /// Length of the original prompt; outputs are `tokens[num_prompt..]`.
    pub num_prompt: u32,
    /// Tokens to (re)compute before decoding: the prompt, or every token after a preemption.
    pub prefill_len: u32,
    /// Tokens whose KV is in the cache (advanced when a step is planned).
    pub num_computed: u32,
    pub max_tokens: u32,
    pub min_tokens: u32,
    pub stop_token_ids: Box<[i32]>,
    pub priority: i64,
    /// Intake order, unique; ties in every ordering are broken by it.
    pub arrival: u64,
    /// Step at which the request (re)entered the waiting queue, for head-of-line aging.
    pub enqueued_step: u64,
    /// Preempted requests are readmitted ahead of never-started ones of equal priority.
    pub preempted: bool,
    /// Persistent batch row while running.
    pub row: u32,
    /// Position in the scheduler's list of decoding requests while there (O(1) removal).
    pub decode_idx: u32,
    /// Dense page table: page `i` holds positions `[i * page_size, (i + 1) * page_size)`.
    pub pages: Vec<PageId>,
    /// Streaming table (sinks + local ring + 1, `SchedulerConfig::stream_table_len`), allocated
    /// whole at admission.
    pub stream_pages: Vec<PageId>,
    /// Dense pages promised at admission for the rest of the prefill, not yet allocated.
    pub reserved_pages: u32,
    /// Decode steps before the next sparse page selection: 0 makes the next decode step select
    /// (so the first one after a prefill chunk does).
    pub steps_to_select: u32,
    pub cache_prefix: bool,
    /// Chain hashes (`prefix_cache::chain_hash`) of the first full pages of `tokens`, as far as
    /// they were needed; tokens only grow, so they stay valid through preemption.
    pub page_hashes: Vec<u64>,
    /// Leading entries of `pages` that came from the prefix cache or were offered to it.
    pub num_published: u32,
    /// Tokens that planned steps will sample for the request and `update()` has not appended
    /// yet (at most one per step in flight; always 0 between steps without async scheduling).
    pub num_in_flight: u32,
}

impl Request {
    pub fn new(req: NewRequest, arrival: u64, step: u64) -> Self {
        let num_prompt = req.prompt.len() as u32;
        Self {
            id: req.id,
            status: Status::Waiting,
            tokens: req.prompt,
            num_prompt,
            prefill_len: num_prompt,
            num_computed: 0,
            max_tokens: req.max_tokens,
            min_tokens: req.min_tokens,
            stop_token_ids: req.stop_token_ids.into_boxed_slice(),
            priority: req.priority,
            arrival,
            enqueued_step: step,
            preempted: false,
            row: 0,
            decode_idx: 0,
            pages: Vec::new(),
            stream_pages: Vec::new(),
            reserved_pages: 0,
            steps_to_select: 0,
            cache_prefix: req.cache_prefix,
            page_hashes: Vec::new(),
            num_published: 0,
            num_in_flight: 0,
        }
    }

    /// Makes `page_hashes` cover the first `num_pages` pages of `page_size` tokens (all known).
    pub fn hash_pages(&mut self, num_pages: u32, page_size: u32) {
        let size = page_size as usize;
        for i in self.page_hashes.len()..num_pages as usize {
            let parent = self.page_hashes.last().copied().unwrap_or(ROOT);
            let hash = chain_hash(parent, &self.tokens[i * size..(i + 1) * size]);
            self.page_hashes.push(hash);
        }
    }

    /// The parent hash and tokens of full page `i`, whose hash is `page_hashes[i]`.
    pub fn page_key(&self, i: usize, page_size: u32) -> (u64, &[i32]) {
        let size = page_size as usize;
        let parent = if i == 0 {
            ROOT
        } else {
            self.page_hashes[i - 1]
        };
        (parent, &self.tokens[i * size..(i + 1) * size])
    }

    /// The most tokens the request can hold: its prompt and `max_tokens` outputs, within
    /// `max_seq_len`.
    pub fn max_len(&self, max_seq_len: u32) -> u32 {
        self.num_prompt
            .saturating_add(self.max_tokens)
            .min(max_seq_len)
    }

    pub fn num_tokens(&self) -> u32 {
        self.tokens.len() as u32
    }

    pub fn num_outputs(&self) -> u32 {
        self.num_tokens() - self.num_prompt
    }

    /// Tokens known or being sampled: what the request will hold once every planned step is in.
    pub fn num_planned(&self) -> u32 {
        self.num_tokens() + self.num_in_flight
    }

    /// Whether the planned tokens reach the length limit: the request is planned no further and
    /// finishes when the steps in flight are updated (only ever true with a step in flight).
    pub fn fully_planned(&self, max_seq_len: u32) -> bool {
        self.num_planned() >= self.max_len(max_seq_len)
    }

    /// Planned tokens not yet in the KV cache: 1 for a decode step, more for a prefill.
    pub fn num_uncomputed(&self) -> u32 {
        self.num_planned() - self.num_computed
    }

    /// The `FINISH_*` code after `token` was appended: a stop token counts once `min_tokens`
    /// outputs exist; the length limits are `max_tokens` and `max_seq_len` tokens in all.
    pub fn finish_reason(&self, token: i32, max_seq_len: u32) -> Option<FinishReason> {
        if self.stop_token_ids.contains(&token) && self.num_outputs() >= self.min_tokens {
            Some(FinishReason::Stop)
        } else if self.num_outputs() >= self.max_tokens || self.num_tokens() >= max_seq_len {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

/// Slot-addressed storage of live requests with an id index.
#[derive(Debug, Default)]
pub struct RequestSlab {
    slots: Vec<Option<Request>>,
    free_slots: Vec<u32>,
    by_id: HashMap<RequestId, u32>,
}

impl RequestSlab {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn contains_id(&self, id: RequestId) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn slot_of(&self, id: RequestId) -> Option<u32> {
        self.by_id.get(&id).copied()
    }

    /// Stores a request whose id is not live (checked by the caller) and returns its slot.
    pub fn insert(&mut self, req: Request) -> u32 {
        let id = req.id;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(req);
                slot
            }
            None => {
                self.slots.push(Some(req));
                self.slots.len() as u32 - 1
            }
        };
        let previous = self.by_id.insert(id, slot);
        debug_assert!(previous.is_none(), "duplicate request id {id}");
        slot
    }

    pub fn remove(&mut self, slot: u32) -> Request {
        let req = self.slots[slot as usize]
            .take()
            .expect("remove of an empty slot");
        self.by_id.remove(&req.id);
        self.free_slots.push(slot);
        req
    }

    /// Whether `slot` currently holds request `id` (a slot may be reused by a later request).
    pub fn holds(&self, slot: u32, id: RequestId) -> bool {
        matches!(self.slots.get(slot as usize), Some(Some(req)) if req.id == id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &Request)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i as u32, r)))
    }
}

impl std::ops::Index<u32> for RequestSlab {
    type Output = Request;

    fn index(&self, slot: u32) -> &Request {
        self.slots[slot as usize]
            .as_ref()
            .expect("access to an empty request slot")
    }
}

impl std::ops::IndexMut<u32> for RequestSlab {
    fn index_mut(&mut self, slot: u32) -> &mut Request {
        self.slots[slot as usize]
            .as_mut()
            .expect("access to an empty request slot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: RequestId) -> Request {
        Request::new(NewRequest::new(id, vec![1, 2, 3], 4), id as u64, 0)
    }

    #[test]
    fn slots_are_reused_and_ids_indexed() {
        let mut slab = RequestSlab::default();
        let a = slab.insert(req(10));
        let b = slab.insert(req(20));
        assert_eq!((a, b, slab.len()), (0, 1, 2));
        assert_eq!(slab.slot_of(20), Some(b));
        assert_eq!(slab.remove(a).id, 10);
        assert!(!slab.contains_id(10) && !slab.holds(a, 10));
        let c = slab.insert(req(30));
        assert_eq!(c, a, "freed slot is reused");
        assert!(slab.holds(c, 30));
        assert_eq!(slab.iter().map(|(_, r)| r.id).collect::<Vec<_>>(), [30, 20]);
    }

    #[test]
    fn finish_reasons() {
        let mut r = Request::new(
            NewRequest {
                min_tokens: 2,
                stop_token_ids: vec![9],
                ..NewRequest::new(1, vec![1], 3)
            },
            0,
            0,
        );
        r.tokens.push(9);
        assert_eq!(r.finish_reason(9, 100), None, "stop before min_tokens");
        r.tokens.push(9);
        assert_eq!(r.finish_reason(9, 100), Some(FinishReason::Stop));
        assert_eq!(r.finish_reason(5, 100), None);
        assert_eq!(
            r.finish_reason(5, 3),
            Some(FinishReason::Length),
            "sequence limit"
        );
        r.tokens.push(5);
        assert_eq!(
            r.finish_reason(5, 100),
            Some(FinishReason::Length),
            "max_tokens"
        );
    }

    #[test]
    fn token_counts() {
        let mut r = req(1);
        assert_eq!(
            (r.num_tokens(), r.num_outputs(), r.num_uncomputed()),
            (3, 0, 3)
        );
        r.num_computed = 3;
        r.tokens.push(7);
        assert_eq!((r.num_outputs(), r.num_uncomputed()), (1, 1));
    }
}

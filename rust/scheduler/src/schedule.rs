//! The scheduler: intake, the per-step plan (`schedule`), and token intake (`update`).
//!
//! One step hands out up to `max_num_batched_tokens` tokens, with no prefill/decode phases:
//! 1. apply pending aborts (at most `max_num_seqs`);
//! 2. if the decode requests need more dense pages than are free and unpromised, preempt victims
//!    (recompute) until they fit;
//! 3. every decode request gets its one token;
//! 4. partial prefills continue, oldest first, each chunk capped by `long_prefill_token_threshold`;
//! 5. unless step 2 preempted, waiting requests are admitted in queue order while budget and rows
//!    last, each only if its whole prompt fits, with bounded skip-ahead and head-of-line aging.
//!
//! Dense pages are allocated lazily, chunk by chunk. Admission reserves (counts, does not take)
//! the pages of the whole prompt, so a started prefill never runs out of pages; only decode
//! growth can, and that is what preemption is for.
//!
//! With the prefix cache on, admission first takes references to the cached pages that begin the
//! request's tokens (always leaving at least one token to compute, whose logits it samples from)
//! and starts the prefill after them; `update` publishes every page a step filled.
//!
//! With `async_scheduling`, `schedule()` may plan step n+1 before `update()` has taken step n's
//! tokens. A decode whose input is such a token gets a placeholder input id; a request whose
//! planned tokens already reach its length limit is not planned again. A request that stops on
//! a token of step n has also been planned in step n+1: `update()` drops that token, since the
//! request is gone. Pages freed at step n are reused from step n+2 on, after the device (one
//! ordered stream) has finished what step n+1 writes to them.

use std::collections::VecDeque;

use crate::abort::AbortHandle;
use crate::config::{Policy, SchedulerConfig};
use crate::error::{Result, SchedulerError};
use crate::pool::{PageId, PagePool};
use crate::prefix_cache::PrefixCache;
use crate::queue::{QueueKey, WaitingQueue};
use crate::request::{NewRequest, Request, RequestId, RequestSlab, Status};
use crate::step_io::{
    finish_code, placeholder, ScheduledReq, StepIo, FLAG_NEEDS_LOGITS, FLAG_NEW_ROW, FLAG_PREFILL,
    FLAG_RESELECT,
};

macro_rules! step_counts {
    ($( $(#[doc = $doc:literal])* $field:ident, )*) => {
        /// What `schedule()` returns: the filled length of each schedule buffer is one of these
        /// (see `Buffer::count`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        #[cfg_attr(
            feature = "python",
            pyo3::pyclass(module = "omniserve._scheduler", frozen, get_all, eq, skip_from_py_object)
        )]
        pub struct StepCounts {
            $( $(#[doc = $doc])* pub $field: usize, )*
        }

        impl StepCounts {
            /// Every field name, as `Buffer::count` names them.
            pub const FIELDS: &'static [&'static str] = &[$( stringify!($field), )*];

            /// One field by name.
            pub fn get(&self, name: &str) -> Option<usize> {
                match name {
                    $( stringify!($field) => Some(self.$field), )*
                    _ => None,
                }
            }

            /// One field by name, to set.
            pub fn get_mut(&mut self, name: &str) -> Option<&mut usize> {
                match name {
                    $( stringify!($field) => Some(&mut self.$field), )*
                    _ => None,
                }
            }
        }
    };
}

step_counts! {
    /// Requests scheduled.
    num_reqs,
    /// Tokens scheduled (all requests).
    num_tokens,
    /// `(row, column, page)` triples for the dense page table.
    num_page_updates,
    /// `(row, column, page)` triples for the streaming page table.
    num_stream_updates,
    /// Requests aborted at this step boundary.
    num_aborted,
    /// Requests preempted this step.
    num_preempted,
}

/// Totals and gauges for metrics; `*_pages_total` exclude the null page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub running: usize,
    pub waiting: usize,
    pub dense_pages_used: u32,
    pub dense_pages_total: u32,
    pub stream_pages_used: u32,
    pub stream_pages_total: u32,
    pub num_preemptions: u64,
    pub num_steps: u64,
    pub num_finished: u64,
    /// Prompt tokens of admitted requests that could use the prefix cache (recomputes included).
    pub prefix_cache_queries: u64,
    /// Of those, the tokens found in the cache.
    pub prefix_cache_hits: u64,
    /// Pages the prefix cache holds (in use or free).
    pub prefix_cache_pages: u32,
}

/// How a waiting request would be admitted now.
#[derive(Debug)]
struct Admission {
    /// Tokens of the first chunk.
    chunk: u32,
    /// Leading pages taken from the prefix cache, in order.
    cached: Vec<PageId>,
}

/// What `update()` needs of one request a step planned.
#[derive(Debug, Clone, Copy)]
struct Planned {
    /// `Planned::VOID` once the request is preempted: what the step did for it is dropped.
    slot: u32,
    id: RequestId,
    flags: i32,
    /// Tokens in the KV cache once the step has run.
    end: u32,
}

impl Planned {
    /// A slot no request is in.
    const VOID: u32 = u32::MAX;
}

#[derive(Debug)]
pub struct Scheduler {
    pub(crate) cfg: SchedulerConfig,
    /// `cfg.max_seq_len()` and `cfg.watermark_pages()`, read on the hot path.
    pub(crate) max_seq_len: u32,
    watermark_pages: u32,
    pub(crate) requests: RequestSlab,
    pub(crate) waiting: WaitingQueue,
    /// Running requests whose next step is one token: decodes, and prefills with one token left.
    pub(crate) decoding: Vec<u32>,
    /// Running requests with more than one token left to prefill, in admission order.
    pub(crate) prefilling: Vec<u32>,
    pub(crate) dense: PagePool,
    pub(crate) stream: PagePool,
    /// `None` when `enable_prefix_caching` is off.
    pub(crate) cache: Option<PrefixCache>,
    /// Dense pages promised to running prefills but not yet allocated (sum over requests).
    pub(crate) reserved_pages: u32,
    pub(crate) free_rows: Vec<u32>,
    aborts: AbortHandle,
    pub(crate) io: StepIo,
    /// Steps planned whose `update()` has not come yet, oldest first (at most
    /// `cfg.max_steps_in_flight()`; a step that planned nothing is not one).
    in_flight: VecDeque<Vec<Planned>>,
    /// Record lists of updated steps, reused so that a step allocates nothing.
    spare: Vec<Vec<Planned>>,
    next_arrival: u64,
    num_steps: u64,
    num_preemptions: u64,
    num_finished: u64,
    prefix_cache_queries: u64,
    prefix_cache_hits: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            max_seq_len: cfg.max_seq_len(),
            watermark_pages: cfg.watermark_pages(),
            requests: RequestSlab::default(),
            waiting: WaitingQueue::default(),
            decoding: Vec::with_capacity(cfg.max_num_seqs as usize),
            prefilling: Vec::with_capacity(cfg.max_partial_prefills as usize),
            dense: PagePool::new(cfg.num_dense_pages),
            stream: PagePool::new(cfg.num_stream_pages),
            cache: cfg
                .enable_prefix_caching
                .then(|| PrefixCache::new(cfg.num_dense_pages)),
            reserved_pages: 0,
            // Popped from the back: row 0 is handed out first.
            free_rows: (0..cfg.max_num_seqs).rev().collect(),
            aborts: AbortHandle::default(),
            io: StepIo::new(&cfg),
            in_flight: VecDeque::with_capacity(cfg.max_steps_in_flight()),
            spare: Vec::new(),
            next_arrival: 0,
            num_steps: 0,
            num_preemptions: 0,
            num_finished: 0,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            cfg,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The buffers of the last step.
    pub fn io(&self) -> &StepIo {
        &self.io
    }

    /// Where the caller writes the sampled token of each schedule index before `update()`.
    pub fn sampled_mut(&mut self) -> &mut [i32] {
        self.io.sampled_mut()
    }

    pub fn abort_handle(&self) -> AbortHandle {
        self.aborts.clone()
    }

    pub fn num_unfinished(&self) -> usize {
        self.requests.len()
    }

    pub fn has_unfinished(&self) -> bool {
        self.num_unfinished() > 0
    }

    pub fn stats(&self) -> Stats {
        Stats {
            running: self.decoding.len() + self.prefilling.len(),
            waiting: self.waiting.len(),
            dense_pages_used: self.dense.num_used(),
            dense_pages_total: self.dense.capacity(),
            stream_pages_used: self.stream.num_used(),
            stream_pages_total: self.stream.capacity(),
            num_preemptions: self.num_preemptions,
            num_steps: self.num_steps,
            num_finished: self.num_finished,
            prefix_cache_queries: self.prefix_cache_queries,
            prefix_cache_hits: self.prefix_cache_hits,
            prefix_cache_pages: self.cache.as_ref().map_or(0, |c| c.len() as u32),
        }
    }

    /// Queues a request, or says why it is malformed or can never be served.
    pub fn add_request(&mut self, req: NewRequest) -> Result<()> {
        let id = req.id;
        let invalid = |reason: String| Err(SchedulerError::InvalidRequest { id, reason });
        let rejected = |reason: String| Err(SchedulerError::Rejected { id, reason });
        if self.requests.contains_id(id) {
            return invalid("a request with this id is already queued or running".into());
        }
        if req.prompt.is_empty() {
            return invalid("the prompt is empty".into());
        }
        if let Some(tok) = req.prompt.iter().find(|&&t| t < 0) {
            return invalid(format!("the prompt holds a negative token id {tok}"));
        }
        if req.max_tokens < 1 {
            return invalid("max_tokens must be >= 1".into());
        }
        if req.min_tokens > req.max_tokens {
            return invalid(format!(
                "min_tokens ({}) exceeds max_tokens ({})",
                req.min_tokens, req.max_tokens
            ));
        }
        let len = req.prompt.len();
        if len >= self.cfg.max_model_len as usize {
            return rejected(format!(
                "the prompt has {len} tokens; max_model_len {} leaves room for at most {}",
                self.cfg.max_model_len,
                self.cfg.max_model_len - 1
            ));
        }
        if len >= self.max_seq_len as usize {
            let usable = self.dense.capacity().saturating_sub(self.watermark_pages);
            return rejected(format!(
                "the prompt needs {} KV pages of {} tokens; the dense pool admits at most {usable} \
                 ({} pages minus a watermark of {})",
                len.div_ceil(self.cfg.page_size as usize),
                self.cfg.page_size,
                self.dense.capacity(),
                self.watermark_pages
            ));
        }
        let request = Request::new(req, self.next_arrival, self.num_steps);
        let table_len = self.stream_table_len(&request);
        if table_len > self.stream.capacity() {
            return rejected(format!(
                "the request's streaming table needs {table_len} pages; the streaming pool has {} \
                 (raise num_stream_pages or lower the streaming windows)",
                self.stream.capacity()
            ));
        }
        self.next_arrival += 1;
        let key = QueueKey::of(&request, self.cfg.scheduling_policy);
        let slot = self.requests.insert(request);
        self.hash_cacheable_pages(slot);
        self.waiting.push(key, slot);
        Ok(())
    }

    /// Applies pending aborts, then plans one step into the buffers (see the module docs).
    pub fn schedule(&mut self) -> Result<StepCounts> {
        if self.in_flight.len() >= self.cfg.max_steps_in_flight() {
            return Err(SchedulerError::StepOrder(if self.cfg.async_scheduling {
                "schedule() called with two steps awaiting update()"
            } else {
                "schedule() called before update() consumed the previous step"
            }));
        }
        self.num_steps += 1;
        self.io.begin_schedule();
        let mut planned = self.spare.pop().unwrap_or_default();
        planned.clear();
        self.in_flight.push_back(planned);
        self.apply_aborts();
        let preempted = self.make_room_for_decodes();
        let mut budget = self.cfg.max_num_batched_tokens;
        self.schedule_decodes(&mut budget)?;
        self.continue_prefills(&mut budget)?;
        // Admitting right after preempting would hand the freed pages to a newcomer and
        // oscillate; the preempted requests are at the queue front for the next step instead.
        if !preempted {
            self.admit_waiting(&mut budget)?;
        }
        if self.io.num_scheduled() == 0 {
            self.spare.extend(self.in_flight.pop_back());
        }
        Ok(StepCounts {
            num_reqs: self.io.num_scheduled(),
            num_tokens: self.io.num_tokens() as usize,
            num_page_updates: self.io.page_updates().len() / 3,
            num_stream_updates: self.io.stream_updates().len() / 3,
            num_aborted: self.io.aborted_ids().len(),
            num_preempted: self.io.preempted_ids().len(),
        })
    }

    /// Consumes `sampled` for the oldest step in flight: appends a token to every request
    /// flagged `FLAG_NEEDS_LOGITS`, checks stop and length, frees finished requests. Returns the
    /// number of `out_*` entries.
    pub fn update(&mut self) -> Result<usize> {
        self.io.begin_update();
        let Some(planned) = self.in_flight.pop_front() else {
            return Ok(0);
        };
        for (sched_idx, p) in planned.iter().enumerate() {
            // `finish()` or an abort may have ended the request since it was planned, or a later
            // `schedule()` preempted it (which voided the record).
            if !self.requests.holds(p.slot, p.id) {
                continue;
            }
            self.publish_full_pages(p.slot, p.end);
            if p.flags & FLAG_NEEDS_LOGITS == 0 {
                continue;
            }
            let token = self.io.sampled()[sched_idx];
            let req = &mut self.requests[p.slot];
            req.num_in_flight -= 1;
            req.tokens.push(token);
            let finish = req.finish_reason(token, self.max_seq_len);
            self.io
                .push_output(p.id, token, sched_idx, finish_code(finish));
            if finish.is_some() {
                self.remove_request(p.slot);
                self.num_finished += 1;
            }
        }
        self.spare.push(planned);
        Ok(self.io.out_req_ids().len())
    }

    /// Steps in flight that sample a token for the request `id` in `slot`.
    pub(crate) fn num_sampling(&self, slot: u32, id: RequestId) -> u32 {
        let sampling =
            |p: &&Planned| p.slot == slot && p.id == id && p.flags & FLAG_NEEDS_LOGITS != 0;
        self.in_flight
            .iter()
            .map(|step| step.iter().filter(sampling).count() as u32)
            .sum()
    }

    /// Ends a request now (e.g. a stop string matched) and frees its pages; `false` if unknown.
    pub fn finish(&mut self, id: RequestId) -> bool {
        let Some(slot) = self.requests.slot_of(id) else {
            return false;
        };
        self.remove_request(slot);
        self.num_finished += 1;
        true
    }

    fn apply_aborts(&mut self) {
        let handle = self.aborts.clone();
        handle.drain(self.cfg.max_num_seqs as usize, |id| {
            let Some(slot) = self.requests.slot_of(id) else {
                return false;
            };
            self.remove_request(slot);
            self.io.push_aborted(id);
            true
        });
    }

    /// Takes a request out of the scheduler, whatever its state, and frees what it holds.
    fn remove_request(&mut self, slot: u32) {
        match self.requests[slot].status {
            Status::Waiting => {
                let key = QueueKey::of(&self.requests[slot], self.cfg.scheduling_policy);
                self.waiting.remove(&key);
            }
            Status::Running => self.stop_running(slot),
        }
        self.requests.remove(slot);
    }

    /// Releases the row, pages and reservation of a running request and unlists it.
    fn stop_running(&mut self, slot: u32) {
        let req = &mut self.requests[slot];
        for page in req.pages.drain(..) {
            let cached = self.cache.as_ref().is_some_and(|c| c.holds(page));
            self.dense.release(page, cached);
        }
        for page in req.stream_pages.drain(..) {
            self.stream.release(page, false);
        }
        req.num_published = 0;
        self.reserved_pages -= std::mem::take(&mut req.reserved_pages);
        self.free_rows.push(req.row);
        if let Some(i) = self.prefilling.iter().position(|&s| s == slot) {
            self.prefilling.remove(i);
        } else {
            let idx = req.decode_idx as usize;
            self.decoding.swap_remove(idx);
            if let Some(&moved) = self.decoding.get(idx) {
                self.requests[moved].decode_idx = idx as u32;
            }
        }
    }

    fn push_decoding(&mut self, slot: u32) {
        self.requests[slot].decode_idx = self.decoding.len() as u32;
        self.decoding.push(slot);
    }

    /// Dense pages neither allocated nor promised to a prefill.
    fn unreserved_free_pages(&self) -> u32 {
        self.dense.num_free() - self.reserved_pages
    }

    /// Whether the next token of this decode request starts a page its reservation doesn't cover.
    /// Never for one whose planned tokens reach its length limit: it is not planned again, and
    /// counting it would preempt it (or another) for a page nobody writes.
    fn needs_unreserved_page(&self, slot: u32) -> bool {
        let req = &self.requests[slot];
        !req.fully_planned(self.max_seq_len)
            && self.cfg.pages_for(req.num_computed + 1)
                > req.pages.len() as u32 + req.reserved_pages
    }

    /// Preempts until every decode request can get the page its token needs. Returns whether
    /// anything was preempted.
    fn make_room_for_decodes(&mut self) -> bool {
        // Fast path: each decode needs at most one page.
        if self.unreserved_free_pages() as usize >= self.decoding.len() {
            return false;
        }
        let mut demand = self
            .decoding
            .iter()
            .filter(|&&s| self.needs_unreserved_page(s))
            .count();
        let mut preempted = false;
        while demand > self.unreserved_free_pages() as usize {
            let victim = self.pick_victim();
            // A victim's pages go back to the pool, and so does its own demand, if any.
            if self.needs_unreserved_page(victim) {
                demand -= 1;
            }
            self.preempt(victim);
            preempted = true;
        }
        preempted
    }

    /// The running request to preempt: lowest priority (largest value), then fewest computed
    /// tokens (cheapest to recompute), then latest arrival.
    fn pick_victim(&self) -> u32 {
        let policy = self.cfg.scheduling_policy;
        let rank = |&slot: &u32| {
            let req = &self.requests[slot];
            let priority = if policy == Policy::Priority {
                req.priority
            } else {
                0
            };
            (priority, std::cmp::Reverse(req.num_computed), req.arrival)
        };
        *self
            .decoding
            .iter()
            .chain(&self.prefilling)
            .max_by_key(|slot| rank(slot))
            .expect("preemption needs a running request")
    }

    /// Recompute preemption: frees everything the request holds and sends it back to the front
    /// of its priority class with all its tokens as the prompt.
    fn preempt(&mut self, slot: u32) {
        self.stop_running(slot);
        let step = self.num_steps;
        let req = &mut self.requests[slot];
        req.status = Status::Waiting;
        req.prefill_len = req.num_tokens();
        req.num_computed = 0;
        req.preempted = true;
        req.enqueued_step = step;
        req.steps_to_select = 0;
        // Tokens still being sampled for it are dropped; the recompute samples them again.
        req.num_in_flight = 0;
        // So is everything the steps in flight do for it, even if it runs again before their
        // update: a preempting step that plans nothing is not in flight, so the next
        // `schedule()` may come first and readmit it.
        for p in self.in_flight.iter_mut().flatten() {
            if p.slot == slot {
                p.slot = Planned::VOID;
            }
        }
        self.io.push_preempted(req.id);
        self.waiting
            .push(QueueKey::of(req, self.cfg.scheduling_policy), slot);
        self.num_preemptions += 1;
        // Its tokens now include outputs, which readmission may find cached too.
        self.hash_cacheable_pages(slot);
    }

    fn schedule_decodes(&mut self, budget: &mut u32) -> Result<()> {
        // `max_num_batched_tokens >= max_num_seqs` (validated), so every decode fits.
        for i in 0..self.decoding.len() {
            let slot = self.decoding[i];
            if self.requests[slot].fully_planned(self.max_seq_len) {
                continue;
            }
            self.schedule_chunk(slot, 1, 0)?;
            *budget -= 1;
        }
        Ok(())
    }

    fn continue_prefills(&mut self, budget: &mut u32) -> Result<()> {
        for i in 0..self.prefilling.len() {
            if *budget == 0 {
                break;
            }
            let slot = self.prefilling[i];
            let chunk = self.chunk_len(self.requests[slot].num_uncomputed(), *budget);
            self.schedule_chunk(slot, chunk, 0)?;
            *budget -= chunk;
        }
        // A request with at most one token left is scheduled with the decodes from now on.
        let mut i = 0;
        while i < self.prefilling.len() {
            let slot = self.prefilling[i];
            if self.requests[slot].num_uncomputed() <= 1 {
                self.prefilling.remove(i);
                self.push_decoding(slot);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Tokens of the next prefill chunk: the rest, within budget and the per-request cap.
    fn chunk_len(&self, remaining: u32, budget: u32) -> u32 {
        let cap = match self.cfg.long_prefill_token_threshold {
            0 => u32::MAX,
            cap => cap,
        };
        remaining.min(budget).min(cap)
    }

    /// Admits waiting requests in queue order. A request that does not fit is skipped, but only
    /// `skip_limit` more requests are looked at after the first one skipped, and a head that has
    /// waited more than `hol_age_steps` is not skipped at all: admission stops so that the pages
    /// freed by finishing requests accumulate for it.
    fn admit_waiting(&mut self, budget: &mut u32) -> Result<()> {
        let mut last_skipped: Option<QueueKey> = None;
        let mut looked_past_skipped = 0;
        while *budget > 0 && !self.free_rows.is_empty() {
            let Some((key, slot)) = self.waiting.next_after(last_skipped.as_ref()) else {
                break;
            };
            if last_skipped.is_some() {
                if looked_past_skipped == self.cfg.skip_limit {
                    break;
                }
                looked_past_skipped += 1;
            }
            match self.admission(slot, *budget) {
                Some(admission) => {
                    self.waiting.remove(&key);
                    *budget -= admission.chunk;
                    self.admit(slot, admission)?;
                }
                None => {
                    let head_age = self.num_steps - self.requests[slot].enqueued_step;
                    if last_skipped.is_none() && head_age > u64::from(self.cfg.hol_age_steps) {
                        break;
                    }
                    last_skipped = Some(key);
                }
            }
        }
        Ok(())
    }

    /// How a waiting request can be admitted now, if it can: the pages of its whole prompt that
    /// the prefix cache does not hold, and the free cached pages it revives, fit in the
    /// unpromised dense pages minus the watermark, a streaming table is free, and it does not
    /// exceed the partial-prefill limit.
    fn admission(&self, slot: u32, budget: u32) -> Option<Admission> {
        let req = &self.requests[slot];
        let cached = self.cached_prefix(req);
        let revived = cached
            .iter()
            .filter(|&&page| self.dense.ref_count(page) == 0)
            .count() as u32;
        let cached_pages = cached.len() as u32;
        let dense_room = self
            .unreserved_free_pages()
            .saturating_sub(self.watermark_pages);
        if self.cfg.pages_for(req.prefill_len) - cached_pages + revived > dense_room
            || self.stream_table_len(req) > self.stream.num_free()
        {
            return None;
        }
        let remaining = req.prefill_len - cached_pages * self.cfg.page_size;
        let chunk = self.chunk_len(remaining, budget);
        let stays_partial = remaining - chunk > 1;
        if stays_partial && self.prefilling.len() >= self.cfg.max_partial_prefills as usize {
            return None;
        }
        Some(Admission { chunk, cached })
    }

    fn caches(&self, req: &Request) -> bool {
        self.cache.is_some() && req.cache_prefix
    }

    /// Leading pages of a waiting request that the cache may supply: full pages only, and never
    /// the last prompt token, whose logits the first step samples from.
    fn cacheable_pages(&self, req: &Request) -> u32 {
        (req.prefill_len - 1) / self.cfg.page_size
    }

    /// Hashes the pages of a waiting request that admission may look up.
    fn hash_cacheable_pages(&mut self, slot: u32) {
        let req = &self.requests[slot];
        if self.caches(req) {
            let pages = self.cacheable_pages(req);
            self.requests[slot].hash_pages(pages, self.cfg.page_size);
        }
    }

    /// The cached pages that begin a waiting request's tokens, in order.
    fn cached_prefix(&self, req: &Request) -> Vec<PageId> {
        let Some(cache) = self.cache.as_ref().filter(|_| self.caches(req)) else {
            return Vec::new();
        };
        let known = self.cacheable_pages(req).min(req.page_hashes.len() as u32);
        (0..known as usize)
            .map_while(|i| {
                let (parent, tokens) = req.page_key(i, self.cfg.page_size);
                cache.find(parent, req.page_hashes[i], tokens)
            })
            .collect()
    }

    /// Offers the cache the pages a step filled: those below `end`, the tokens in the KV cache
    /// once it has run (a later step in flight may be computing more).
    fn publish_full_pages(&mut self, slot: u32, end: u32) {
        let page_size = self.cfg.page_size;
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let req = &mut self.requests[slot];
        let full = end / page_size;
        if !req.cache_prefix || req.num_published >= full {
            return;
        }
        req.hash_pages(full, page_size);
        for i in req.num_published as usize..full as usize {
            let (parent, tokens) = req.page_key(i, page_size);
            cache.publish(req.pages[i], parent, req.page_hashes[i], tokens);
        }
        req.num_published = full;
    }

    fn stream_table_len(&self, req: &Request) -> u32 {
        self.cfg.stream_table_len(req.max_len(self.max_seq_len))
    }

    fn admit(&mut self, slot: u32, admission: Admission) -> Result<()> {
        let row = self
            .free_rows
            .pop()
            .expect("admission checks for a free row");
        let Admission { chunk, cached } = admission;
        let cached_pages = cached.len() as u32;
        if self.caches(&self.requests[slot]) {
            self.prefix_cache_queries += u64::from(self.requests[slot].prefill_len);
            self.prefix_cache_hits += (cached.len() * self.cfg.page_size as usize) as u64;
        }
        for (column, &page) in cached.iter().enumerate() {
            self.dense.acquire(page);
            self.io.push_page_update(row, column as u32, page);
        }
        let table_len = self.stream_table_len(&self.requests[slot]);
        let req = &mut self.requests[slot];
        let reserve = self.cfg.pages_for(req.prefill_len) - cached_pages;
        req.num_computed = cached_pages * self.cfg.page_size;
        req.num_published = cached_pages;
        req.pages = cached;
        req.status = Status::Running;
        req.row = row;
        req.reserved_pages = reserve;
        self.reserved_pages += reserve;
        for column in 0..table_len {
            let page = self.stream.alloc().ok_or_else(|| {
                SchedulerError::Internal("streaming pool ran dry during admission".into())
            })?;
            req.stream_pages.push(page);
            self.io.push_stream_update(row, column, page);
        }
        self.schedule_chunk(slot, chunk, FLAG_NEW_ROW)?;
        if self.requests[slot].num_uncomputed() <= 1 {
            self.push_decoding(slot);
        } else {
            self.prefilling.push(slot);
        }
        Ok(())
    }

    /// Plans `num_new` tokens of a running request: allocates the dense pages they land in,
    /// writes the step record and its input ids, and advances `num_computed`.
    fn schedule_chunk(&mut self, slot: u32, num_new: u32, extra_flags: i32) -> Result<()> {
        let cfg = &self.cfg;
        let req = &mut self.requests[slot];
        let pos0 = req.num_computed;
        let end = pos0 + num_new;
        while (req.pages.len() as u32) < cfg.pages_for(end) {
            let page = self.dense.alloc().ok_or_else(|| {
                SchedulerError::Internal(format!("dense pool ran dry for request {}", req.id))
            })?;
            if let Some(cache) = self.cache.as_mut() {
                cache.forget(page);
            }
            if req.reserved_pages > 0 {
                req.reserved_pages -= 1;
                self.reserved_pages -= 1;
            }
            self.io
                .push_page_update(req.row, req.pages.len() as u32, page);
            req.pages.push(page);
        }
        let mut flags = extra_flags;
        if end == req.num_planned() {
            flags |= FLAG_NEEDS_LOGITS;
        }
        // A prefill chunk changes the page statistics, so the first decode step after it
        // selects; later selections are reused for `selector_interval` steps.
        if pos0 < req.prefill_len {
            flags |= FLAG_PREFILL;
            req.steps_to_select = 0;
        } else if req.steps_to_select == 0 {
            flags |= FLAG_RESELECT;
            req.steps_to_select = cfg.selector_interval - 1;
        } else {
            req.steps_to_select -= 1;
        }
        if pos0 < req.num_tokens() {
            self.io
                .push_input_ids(&req.tokens[pos0 as usize..end as usize]);
        } else {
            // A decode of the token a step in flight is sampling.
            self.io.push_input_ids(&[placeholder(req.row)]);
        }
        if flags & FLAG_NEEDS_LOGITS != 0 {
            req.num_in_flight += 1;
        }
        self.in_flight
            .back_mut()
            .expect("schedule() opens the step's record list")
            .push(Planned {
                slot,
                id: req.id,
                flags,
                end,
            });
        self.io.push_scheduled(ScheduledReq {
            id: req.id,
            row: req.row,
            pos0,
            num_new,
            flags,
            select_pages: (end - 1) / cfg.page_size,
        });
        req.num_computed = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(num_dense_pages: u32) -> SchedulerConfig {
        SchedulerConfig {
            page_size: 4,
            watermark: 0.0,
            max_num_seqs: 4,
            max_num_batched_tokens: 16,
            long_prefill_token_threshold: 4,
            ..SchedulerConfig::new(num_dense_pages, 256)
        }
    }

    fn run_step(s: &mut Scheduler) -> StepCounts {
        let counts = s.schedule().unwrap();
        s.update().unwrap();
        s.check_invariants().unwrap();
        counts
    }

    #[test]
    fn admission_reserves_the_whole_prompt() {
        // 4 pages. 1 needs 3 for its 12 tokens but computes 4 tokens (1 page) per step.
        let mut s = Scheduler::new(config(5)).unwrap();
        s.add_request(NewRequest::new(1, vec![1; 12], 4)).unwrap();
        s.add_request(NewRequest::new(2, vec![1; 8], 4)).unwrap();
        run_step(&mut s);
        assert_eq!((s.dense.num_used(), s.reserved_pages), (1, 2));
        // Three pages are physically free, but two are promised to 1: 2 must wait.
        assert_eq!(s.unreserved_free_pages(), 1);
        assert_eq!(s.waiting.len(), 1);
        run_step(&mut s);
        run_step(&mut s);
        assert_eq!((s.dense.num_used(), s.reserved_pages), (3, 0));
    }

    #[test]
    fn decode_needs_a_page_only_at_page_boundaries() {
        let mut s = Scheduler::new(config(16)).unwrap();
        s.add_request(NewRequest::new(1, vec![1; 3], 8)).unwrap();
        run_step(&mut s); // 3 computed, 4 tokens: the next token still fits page 0
        assert!(!s.needs_unreserved_page(s.decoding[0]));
        run_step(&mut s); // 4 computed: position 4 starts page 1
        assert!(s.needs_unreserved_page(s.decoding[0]));
    }

    #[test]
    fn chunks_respect_budget_and_cap() {
        let mut s = Scheduler::new(config(16)).unwrap();
        assert_eq!(s.chunk_len(10, 16), 4);
        assert_eq!(s.chunk_len(10, 3), 3);
        assert_eq!(s.chunk_len(2, 16), 2);
        s.cfg.long_prefill_token_threshold = 0;
        assert_eq!(s.chunk_len(10, 16), 10);
    }

    #[test]
    fn victims_rank_by_priority_then_progress_then_arrival() {
        let cfg = SchedulerConfig {
            scheduling_policy: Policy::Priority,
            ..config(64)
        };
        let mut s = Scheduler::new(cfg).unwrap();
        for (id, len, priority) in [(1, 2, 0), (2, 2, 0), (3, 3, 0), (4, 4, -1)] {
            let req = NewRequest {
                priority,
                ..NewRequest::new(id, vec![1; len], 8)
            };
            s.add_request(req).unwrap();
        }
        run_step(&mut s);
        let victims: Vec<RequestId> = (0..4)
            .map(|_| {
                let victim = s.pick_victim();
                let id = s.requests[victim].id;
                s.preempt(victim);
                id
            })
            .collect();
        // Equal priority: fewest computed first, the later arrival on a tie; priority -1 last.
        assert_eq!(victims, [2, 1, 3, 4]);
        s.check_invariants().unwrap();
    }
}

//! Random operation sequences against a reference model of what the scheduler must emit.
//!
//! After every operation the scheduler's own `check_invariants` must pass, and every step is
//! checked against the model: budget and seat limits, positions, flags, input ids, and a model
//! of the runner's device page tables fed only by the emitted updates (so a missing or stale
//! update that would make two rows share a page is caught). With the prefix cache on, prompts
//! share prefixes and rows may share pages, but only pages nobody writes, and a model of every
//! page's contents, fed by what each step computes, must show that a row starting after cached
//! pages got exactly its own tokens' pages. At the end, a fair runner must finish every accepted
//! request within a bound, leaving both pools empty.
//!
//! Every case runs twice: stepped in order, and with `async_scheduling` as an async engine
//! drives it (`schedule()` of step n+1, then `update()` of step n). Sampling is a function of
//! the request and the token's position, like greedy decoding, so the model knows the true token
//! behind a placeholder input id, a recompute samples what the dropped step would have, and
//! both modes must end every request with the same tokens.

use std::collections::{HashMap, HashSet, VecDeque};

use _scheduler::{
    placeholder, Buffer, NewRequest, Phase, Policy, RequestId, Scheduler, SchedulerConfig,
    SchedulerError, FINISH_LENGTH, FINISH_NONE, FINISH_STOP, FLAG_NEEDS_LOGITS, FLAG_NEW_ROW,
    FLAG_PREFILL, FLAG_RESELECT,
};
use proptest::prelude::*;

/// Sampled tokens are drawn from 0..VOCAB; requests that stop at all stop on token 0.
const VOCAB: u64 = 16;

/// The fake sampler: the token that makes request `id` `len` tokens long (a stop token, 0,
/// about once in VOCAB), fixed by the case's `salt`.
fn sampled_token(salt: u64, id: RequestId, len: usize) -> i32 {
    // splitmix64 of the three.
    let mut z = salt ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (len as u64) << 32;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % VOCAB) as i32
}

#[derive(Debug, Clone)]
struct AddOp {
    prompt_len: usize,
    max_tokens: u32,
    min_tokens: u32,
    priority: i64,
    stops: bool,
    /// Requests of one family share their prompts' prefixes; `None`: a prompt of its own.
    family: Option<u8>,
    cache_prefix: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Add(AddOp),
    /// A step as an engine runs it.
    Step,
    /// `schedule()` alone, so that other operations come before its `update()`.
    Plan,
    Abort(usize),
    Finish(usize),
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    let pages = (
        prop::sample::select(vec![4u32, 8, 16]),
        prop::sample::select(vec![1u32, 2, 4]),
        3u32..24,
    );
    let seats = (1u32..8, 0u32..40, 1u32..4, 0u32..12);
    let queue = (
        0u32..4,
        0u32..6,
        any::<bool>(),
        prop::sample::select(vec![0.0, 0.05, 0.2]),
    );
    let misc = (
        8u32..200,
        1u32..4,
        prop::option::of((2u32..20, 0u32..3, 0u32..3)),
        any::<bool>(),
    );
    (pages, seats, queue, misc).prop_map(
        |(
            (page_size, logical, num_dense_pages),
            (max_num_seqs, extra_budget, max_partial_prefills, threshold),
            (skip_limit, hol_age_steps, priority, watermark),
            (max_model_len, selector_interval, stream, prefix_caching),
        )| {
            let (num_stream_pages, stream_sink_pages, stream_local_pages) =
                stream.unwrap_or((0, 0, 0));
            SchedulerConfig {
                page_size,
                logical_pages_per_page: logical,
                max_num_seqs,
                max_num_batched_tokens: max_num_seqs + extra_budget,
                max_partial_prefills,
                long_prefill_token_threshold: threshold,
                watermark,
                skip_limit,
                hol_age_steps,
                scheduling_policy: if priority {
                    Policy::Priority
                } else {
                    Policy::Fcfs
                },
                num_stream_pages,
                stream_sink_pages,
                stream_local_pages,
                selector_interval,
                enable_prefix_caching: prefix_caching && stream.is_none(),
                ..SchedulerConfig::new(num_dense_pages, max_model_len)
            }
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    let prompt = (
        1usize..40,
        prop::option::of(0u8..3),
        prop::bool::weighted(0.9),
    );
    let add = (prompt, 1u32..40, 0u32..5, -2i64..3, any::<bool>()).prop_map(
        |((prompt_len, family, cache_prefix), max_tokens, min_tokens, priority, stops)| {
            Op::Add(AddOp {
                prompt_len,
                max_tokens,
                min_tokens: min_tokens.min(max_tokens),
                priority,
                stops,
                family,
                cache_prefix,
            })
        },
    );
    prop_oneof![
        3 => add,
        5 => Just(Op::Step),
        1 => Just(Op::Plan),
        1 => any::<usize>().prop_map(Op::Abort),
        1 => any::<usize>().prop_map(Op::Finish),
    ]
}

/// What the scheduler must know about one live request.
#[derive(Debug)]
struct ModelReq {
    tokens: Vec<i32>,
    num_prompt: usize,
    prefill_len: usize,
    computed: usize,
    max_tokens: u32,
    min_tokens: u32,
    stops: bool,
    cache_prefix: bool,
    /// Decode steps since the last page selection; None until the first decode after a
    /// prefill chunk.
    since_select: Option<u32>,
    /// The batch row while running.
    row: Option<usize>,
    /// Tokens that planned steps sample for it and `update()` has not appended yet.
    in_flight: usize,
    /// Times it was preempted.
    preemptions: usize,
}

impl ModelReq {
    /// Tokens it will hold once every planned step is updated.
    fn planned(&self) -> usize {
        self.tokens.len() + self.in_flight
    }

    fn max_len(&self, cfg: &SchedulerConfig) -> usize {
        (self.num_prompt as u32 + self.max_tokens).min(cfg.max_seq_len()) as usize
    }
}

/// What the harness keeps of one request a step planned, for that step's `update()`.
#[derive(Debug, Clone, Copy)]
struct Planned {
    id: RequestId,
    flags: i32,
    /// `pos0 + num_new`: with `FLAG_NEEDS_LOGITS`, the position of the token it samples.
    end: usize,
    /// The request's `preemptions` when planned: a step planned before a preemption gives it
    /// nothing, even once it runs again.
    preemptions: usize,
}

struct Harness {
    sched: Scheduler,
    cfg: SchedulerConfig,
    salt: u64,
    live: HashMap<RequestId, ModelReq>,
    ids: Vec<RequestId>,
    pending_aborts: VecDeque<RequestId>,
    /// The runner's device page tables, row -> column -> page, fed by the emitted updates.
    dense_table: Vec<Vec<i32>>,
    stream_table: Vec<Vec<i32>>,
    /// The token whose KV each dense page slot holds, as the steps computed them.
    contents: HashMap<i32, Vec<Option<i32>>>,
    /// Steps planned and not updated yet, oldest first, each in schedule order.
    in_flight: VecDeque<Vec<Planned>>,
    /// The tokens of every request that finished in `update()`.
    finished: HashMap<RequestId, Vec<i32>>,
}

impl Harness {
    fn new(cfg: SchedulerConfig, salt: u64) -> Self {
        let rows = cfg.max_num_seqs as usize;
        Self {
            sched: Scheduler::new(cfg.clone()).unwrap(),
            salt,
            in_flight: VecDeque::new(),
            finished: HashMap::new(),
            live: HashMap::new(),
            ids: Vec::new(),
            pending_aborts: VecDeque::new(),
            dense_table: vec![Vec::new(); rows],
            stream_table: vec![Vec::new(); rows],
            contents: HashMap::new(),
            cfg,
        }
    }

    fn check(&self) {
        if let Err(e) = self.sched.check_invariants() {
            panic!("{e}");
        }
    }

    fn add(&mut self, op: &AddOp) {
        let AddOp {
            prompt_len,
            max_tokens,
            min_tokens,
            priority,
            stops,
            family,
            cache_prefix,
        } = *op;
        let id = self.ids.len() as RequestId;
        self.ids.push(id);
        let seed = family.map_or(id as usize + 3, usize::from);
        let prompt: Vec<i32> = (0..prompt_len)
            .map(|i| 1 + ((seed * 7 + i) % 100) as i32)
            .collect();
        let req = NewRequest {
            id,
            prompt: prompt.clone(),
            max_tokens,
            min_tokens,
            stop_token_ids: if stops { vec![0] } else { vec![] },
            priority,
            cache_prefix,
        };
        let cfg = &self.cfg;
        let max_len = (prompt_len as u32 + max_tokens).min(cfg.max_seq_len());
        let never_fits = prompt_len as u32 >= cfg.max_seq_len()
            || cfg.stream_table_len(max_len) > cfg.num_stream_pages.saturating_sub(1);
        match self.sched.add_request(req) {
            Ok(()) => {
                assert!(!never_fits, "request {id} should have been rejected");
                let model = ModelReq {
                    tokens: prompt,
                    num_prompt: prompt_len,
                    prefill_len: prompt_len,
                    computed: 0,
                    max_tokens,
                    min_tokens,
                    stops,
                    cache_prefix,
                    since_select: None,
                    row: None,
                    in_flight: 0,
                    preemptions: 0,
                };
                self.live.insert(id, model);
            }
            Err(SchedulerError::Rejected { .. }) => {
                assert!(never_fits, "request {id} was rejected")
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }

    /// Plans a step, after updating the oldest one if as many as may be are in flight; returns
    /// whether it planned anything.
    fn plan(&mut self) -> bool {
        if self.in_flight.len() == self.cfg.max_steps_in_flight() {
            self.update_step();
        }
        self.schedule_step()
    }

    /// One engine step: plans a step, then updates the steps before it; an async engine keeps
    /// the one just planned in flight (and waits on the older one when it planned nothing).
    fn step(&mut self) {
        let keep = if self.plan() {
            self.cfg.max_steps_in_flight() - 1
        } else {
            0
        };
        while self.in_flight.len() > keep {
            self.update_step();
        }
    }

    /// `schedule()` and every check of what it planned; returns whether it planned anything.
    fn schedule_step(&mut self) -> bool {
        let counts = self.sched.schedule().unwrap();
        self.check();
        let cfg = &self.cfg;
        let io = self.sched.io();
        assert!(
            counts.num_tokens <= cfg.max_num_batched_tokens as usize,
            "budget exceeded"
        );
        assert!(counts.num_reqs <= cfg.max_num_seqs as usize);
        // The description Python slices the buffers by.
        for &buf in Buffer::ALL.iter().filter(|b| b.phase() == Phase::Schedule) {
            let count = counts.get(buf.count()).expect("a StepCounts field");
            assert_eq!(
                io.data(buf).len(),
                count * buf.width() + buf.extra(),
                "{}",
                buf.name()
            );
        }

        // Aborts: queue order, at most max_num_seqs applied, unknown ids dropped.
        let mut expected_aborts = Vec::new();
        while expected_aborts.len() < cfg.max_num_seqs as usize {
            let Some(id) = self.pending_aborts.pop_front() else {
                break;
            };
            if self.live.remove(&id).is_some() {
                expected_aborts.push(id);
            }
        }
        assert_eq!(io.aborted_ids(), expected_aborts);
        // A preempted request recomputes the tokens it has; those in flight are dropped.
        for id in io.preempted_ids() {
            let req = self.live.get_mut(id).expect("preempted a live request");
            req.prefill_len = req.tokens.len();
            req.computed = 0;
            req.since_select = None;
            req.row = None;
            req.in_flight = 0;
            req.preemptions += 1;
        }
        // Running requests with one token to compute (decodes, and prefills down to their last
        // token) are all planned, unless their planned tokens reach the length limit already.
        let due_decodes: Vec<RequestId> = self
            .live
            .iter()
            .filter(|(_, r)| {
                r.row.is_some() && r.planned() == r.computed + 1 && r.planned() < r.max_len(cfg)
            })
            .map(|(&id, _)| id)
            .collect();

        // The runner applies page updates after resetting new rows.
        for (i, &flags) in io.flags().iter().enumerate() {
            if flags & FLAG_NEW_ROW != 0 {
                let row = io.rows()[i] as usize;
                self.dense_table[row].clear();
                self.stream_table[row].clear();
            }
        }
        for (table, updates) in [
            (&mut self.dense_table, io.page_updates()),
            (&mut self.stream_table, io.stream_updates()),
        ] {
            for u in updates.chunks_exact(3) {
                let row = &mut table[u[0] as usize];
                let col = u[1] as usize;
                if row.len() <= col {
                    row.resize(col + 1, 0);
                }
                row[col] = u[2];
            }
        }

        // A row that starts after cached pages must find its own tokens in them, as computed by
        // earlier steps (checked before this step's writes).
        for i in 0..counts.num_reqs {
            if io.flags()[i] & FLAG_NEW_ROW == 0 {
                continue;
            }
            let (id, pos0) = (io.req_ids()[i], io.pos0()[i] as usize);
            let req = &self.live[&id];
            let page_size = cfg.page_size as usize;
            assert!(
                pos0 == 0 || (cfg.enable_prefix_caching && req.cache_prefix),
                "request {id}: a new row starts at {pos0} without the prefix cache"
            );
            assert!(
                pos0 % page_size == 0 && pos0 < req.prefill_len,
                "request {id}: a new row starts at {pos0}"
            );
            let table = &self.dense_table[io.rows()[i] as usize];
            for (p, &token) in req.tokens[..pos0].iter().enumerate() {
                let page = table[p / page_size];
                let held = self.contents.get(&page).and_then(|c| c[p % page_size]);
                assert_eq!(
                    held,
                    Some(token),
                    "request {id}: cached page {page} slot {p}"
                );
            }
        }

        // Pages this step writes, by the request and column writing them.
        let mut written: HashMap<i32, (RequestId, usize)> = HashMap::new();
        let mut stream_in_use = HashSet::new();
        let mut planned = Vec::with_capacity(counts.num_reqs);
        for i in 0..counts.num_reqs {
            let id = io.req_ids()[i];
            let (pos0, num_new, flags) = (
                io.pos0()[i] as usize,
                io.num_new()[i] as usize,
                io.flags()[i],
            );
            let req = self.live.get_mut(&id).expect("scheduled a live request");
            let end = pos0 + num_new;
            let row = io.rows()[i] as usize;
            assert_eq!(
                flags & FLAG_NEW_ROW != 0,
                req.row.is_none(),
                "request {id}: NEW_ROW"
            );
            if flags & FLAG_NEW_ROW != 0 {
                req.row = Some(row);
                req.computed = pos0;
            }
            assert_eq!(req.row, Some(row), "request {id}: row");
            assert_eq!(pos0, req.computed, "request {id}: pos0");
            assert!(num_new >= 1 && end <= req.planned());
            assert_eq!(
                flags & FLAG_PREFILL != 0,
                pos0 < req.prefill_len,
                "request {id}: PREFILL"
            );
            assert_eq!(flags & FLAG_NEEDS_LOGITS != 0, end == req.planned());
            // A selection at the first decode after a prefill chunk, then every interval.
            let reselect = if flags & FLAG_PREFILL != 0 {
                req.since_select = None;
                false
            } else {
                let due = req
                    .since_select
                    .is_none_or(|n| n + 1 >= cfg.selector_interval);
                req.since_select = Some(if due {
                    0
                } else {
                    req.since_select.unwrap() + 1
                });
                due
            };
            assert_eq!(
                flags & FLAG_RESELECT != 0,
                reselect,
                "request {id}: RESELECT"
            );
            // Positions past the known tokens hold what a step in flight samples: only a decode
            // reads one, as the placeholder of its row.
            let known = req.tokens.len();
            assert!(
                end <= known || (num_new == 1 && flags & FLAG_PREFILL == 0),
                "request {id}: a chunk of {num_new} reads unsampled tokens"
            );
            let q = io.qstart()[i] as usize;
            let expected_ids: Vec<i32> = (pos0..end)
                .map(|p| match req.tokens.get(p) {
                    Some(&token) => token,
                    None => placeholder(row as u32),
                })
                .collect();
            assert_eq!(
                io.input_ids()[q..q + num_new],
                expected_ids,
                "request {id}: input ids"
            );
            assert_eq!(
                io.select_pages()[i] as u32,
                (end as u32 - 1) / cfg.page_size
            );
            req.computed = end;
            if flags & FLAG_NEEDS_LOGITS != 0 {
                assert!(
                    req.planned() < req.max_len(cfg),
                    "request {id}: planned past its length limit"
                );
                req.in_flight += 1;
            }
            planned.push(Planned {
                id,
                flags,
                end,
                preemptions: req.preemptions,
            });

            let pages = cfg.pages_for(end as u32) as usize;
            let dense = &self.dense_table[row];
            assert!(dense.len() >= pages, "request {id}: page table too short");
            let page_size = cfg.page_size as usize;
            for p in pos0..end {
                let token = match req.tokens.get(p) {
                    Some(&token) => token,
                    None => sampled_token(self.salt, id, p + 1),
                };
                let (column, page) = (p / page_size, dense[p / page_size]);
                assert!(page > 0, "request {id}: writes the null page");
                let writer = *written.entry(page).or_insert((id, column));
                assert_eq!(writer, (id, column), "page {page} written twice");
                let slots = self
                    .contents
                    .entry(page)
                    .or_insert_with(|| vec![None; page_size]);
                slots[p % page_size] = Some(token);
            }
            let stream = &self.stream_table[row];
            assert_eq!(
                stream.len(),
                cfg.stream_table_len(req.max_len(cfg) as u32) as usize
            );
            for &page in stream {
                assert!(
                    page > 0 && stream_in_use.insert(page),
                    "request {id}: stream page {page} shared"
                );
            }
        }
        for id in due_decodes {
            assert!(
                planned.iter().any(|p| p.id == id),
                "request {id}: a decode was left out"
            );
        }

        // No other running request holds a page being written, nor the writer elsewhere.
        for (&id, req) in &self.live {
            let Some(row) = req.row else { continue };
            let pages = cfg.pages_for(req.computed as u32) as usize;
            for (column, &page) in self.dense_table[row][..pages].iter().enumerate() {
                assert!(page > 0, "request {id}: null page in its table");
                if let Some(&writer) = written.get(&page) {
                    assert_eq!(writer, (id, column), "page {page} is shared while written");
                }
            }
        }
        if planned.is_empty() {
            return false;
        }
        self.in_flight.push_back(planned);
        true
    }

    /// Samples the oldest step in flight, `update()`s it and checks its outputs.
    fn update_step(&mut self) {
        let planned = self.in_flight.pop_front().expect("a step in flight");
        for (i, p) in planned.iter().enumerate() {
            self.sched.sampled_mut()[i] = sampled_token(self.salt, p.id, p.end + 1);
        }
        let n_out = self.sched.update().unwrap();
        for &buf in Buffer::ALL.iter().filter(|b| b.phase() == Phase::Update) {
            assert_eq!(
                (buf.count(), self.sched.io().data(buf).len()),
                ("num_outputs", n_out)
            );
        }
        self.check();
        let cfg = &self.cfg;
        let io = self.sched.io();
        // A request that finished, was aborted or was preempted since the step was planned gets
        // nothing from it.
        let sampling: Vec<usize> = (0..planned.len())
            .filter(|&i| {
                let p = planned[i];
                p.flags & FLAG_NEEDS_LOGITS != 0
                    && self
                        .live
                        .get(&p.id)
                        .is_some_and(|r| r.row.is_some() && r.preemptions == p.preemptions)
            })
            .collect();
        assert_eq!(n_out, sampling.len());
        for (k, &i) in sampling.iter().enumerate() {
            let Planned { id, end, .. } = planned[i];
            assert_eq!(
                (io.out_req_ids()[k], io.out_sched_idx()[k] as usize),
                (id, i)
            );
            let token = io.out_tokens()[k];
            assert_eq!(
                token,
                sampled_token(self.salt, id, end + 1),
                "request {id}: token"
            );
            let req = self.live.get_mut(&id).unwrap();
            assert_eq!(req.tokens.len(), end, "request {id}: token out of order");
            req.tokens.push(token);
            req.in_flight -= 1;
            let outputs = (req.tokens.len() - req.num_prompt) as u32;
            let expected = if req.stops && token == 0 && outputs >= req.min_tokens {
                FINISH_STOP
            } else if outputs >= req.max_tokens || req.tokens.len() as u32 >= cfg.max_seq_len() {
                FINISH_LENGTH
            } else {
                FINISH_NONE
            };
            assert_eq!(io.out_finish()[k], expected, "request {id}: finish");
            if expected != FINISH_NONE {
                let req = self.live.remove(&id).unwrap();
                self.finished.insert(id, req.tokens);
            }
        }
        assert_eq!(self.sched.num_unfinished(), self.live.len());
    }

    fn pick(&self, index: usize) -> Option<RequestId> {
        (!self.ids.is_empty()).then(|| self.ids[index % self.ids.len()])
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Add(ref add) => self.add(add),
            Op::Step => self.step(),
            Op::Plan => {
                self.plan();
            }
            Op::Abort(index) => {
                if let Some(id) = self.pick(index) {
                    self.sched.abort_handle().abort(id);
                    self.pending_aborts.push_back(id);
                }
            }
            Op::Finish(index) => {
                if let Some(id) = self.pick(index) {
                    assert_eq!(self.sched.finish(id), self.live.remove(&id).is_some());
                }
            }
        }
        self.check();
    }

    /// Steps a fair runner until everything has finished; panics if that takes too long.
    fn drain(&mut self) {
        let work: usize = self
            .live
            .values()
            .map(|r| r.tokens.len() + r.max_tokens as usize)
            .sum();
        let bound = 20 * work + 10 * (self.cfg.hol_age_steps as usize + 2) + 100;
        let mut steps = 0;
        while self.sched.has_unfinished() || !self.pending_aborts.is_empty() {
            assert!(
                steps < bound,
                "{} requests still unfinished after {bound} steps",
                self.live.len()
            );
            self.step();
            steps += 1;
        }
        // What is still in flight planned only requests that have ended since.
        while !self.in_flight.is_empty() {
            self.update_step();
        }
        assert!(self.live.is_empty());
        let stats = self.sched.stats();
        assert_eq!((stats.running, stats.waiting), (0, 0));
        assert_eq!(
            (stats.dense_pages_used, stats.stream_pages_used),
            (0, 0),
            "pages leaked"
        );
    }
}

/// `cfg` stepped in order, or as an async engine steps it.
fn with_async(cfg: &SchedulerConfig, async_scheduling: bool) -> SchedulerConfig {
    SchedulerConfig {
        async_scheduling,
        ..cfg.clone()
    }
}

/// Runs `ops` and drains; returns the tokens each request finished with.
fn run(cfg: SchedulerConfig, salt: u64, ops: &[Op]) -> HashMap<RequestId, Vec<i32>> {
    let mut h = Harness::new(cfg, salt);
    for op in ops {
        h.apply(op);
    }
    h.drain();
    h.finished
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_invariants_and_finish(
        cfg in config(),
        ops in prop::collection::vec(op(), 1..150),
        salt in any::<u64>(),
    ) {
        for async_scheduling in [false, true] {
            run(with_async(&cfg, async_scheduling), salt, &ops);
        }
    }

    /// Planning ahead changes when tokens are computed, never which: with no request ended
    /// from outside, every request finishes with the same tokens in both modes.
    #[test]
    fn async_scheduling_yields_the_same_tokens(
        cfg in config(),
        ops in prop::collection::vec(op(), 1..150),
        salt in any::<u64>(),
    ) {
        let ops: Vec<Op> = ops
            .into_iter()
            .filter(|op| matches!(op, Op::Add(_) | Op::Step | Op::Plan))
            .collect();
        let in_order = run(with_async(&cfg, false), salt, &ops);
        let ahead = run(with_async(&cfg, true), salt, &ops);
        prop_assert_eq!(in_order, ahead);
    }
}

/// Many requests through a tight pool: exercises preemption storms and readmission.
#[test]
fn tight_pool_liveness() {
    for (policy, async_scheduling) in [Policy::Fcfs, Policy::Priority]
        .into_iter()
        .flat_map(|policy| [(policy, false), (policy, true)])
    {
        let cfg = SchedulerConfig {
            page_size: 4,
            logical_pages_per_page: 2,
            max_num_seqs: 8,
            max_num_batched_tokens: 16,
            long_prefill_token_threshold: 6,
            watermark: 0.1,
            scheduling_policy: policy,
            async_scheduling,
            ..SchedulerConfig::new(12, 64)
        };
        let mut h = Harness::new(cfg, 0);
        for i in 0..40 {
            h.add(&AddOp {
                prompt_len: 1 + (i * 7) % 30,
                max_tokens: 5 + (i as u32 * 3) % 30,
                min_tokens: 0,
                priority: (i % 3) as i64,
                stops: false,
                family: Some((i % 2) as u8),
                cache_prefix: true,
            });
        }
        h.drain();
        let stats = h.sched.stats();
        assert!(
            stats.num_preemptions > 0,
            "{policy:?}, async {async_scheduling}: the pool should have been tight"
        );
        assert!(
            stats.prefix_cache_hits > 0,
            "{policy:?}, async {async_scheduling}: prompts share prefixes"
        );
    }
}

//! A fake model runner for the integration tests: runs one step and snapshots what the
//! scheduler emitted, in plain structs that are easy to assert on.

#![allow(dead_code)] // each test binary uses a different part

use _scheduler::{NewRequest, RequestId, Scheduler, SchedulerConfig, StepCounts};

/// A small config for hand-checked traces: 4-token pages of 2 logical pages, no watermark, and
/// no prefix cache (the traces' prompts are all alike; `prefix_cache.rs` turns it on).
pub fn small_config(num_dense_pages: u32) -> SchedulerConfig {
    SchedulerConfig {
        page_size: 4,
        logical_pages_per_page: 2,
        watermark: 0.0,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        selector_interval: 2,
        enable_prefix_caching: false,
        ..SchedulerConfig::new(num_dense_pages, 1024)
    }
}

/// A prompt of `shared` tokens common to every request, then `own` tokens of request `id`.
pub fn prompt(id: RequestId, shared: usize, own: usize) -> Vec<i32> {
    let own_tokens = (0..own).map(|t| 5000 + 100 * id as i32 + t as i32);
    (1000..1000 + shared as i32).chain(own_tokens).collect()
}

pub fn add(sched: &mut Scheduler, id: RequestId, prompt_len: usize, max_tokens: u32) {
    let prompt = (0..prompt_len as i32).map(|t| 1000 + t).collect();
    sched
        .add_request(NewRequest::new(id, prompt, max_tokens))
        .unwrap();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sched {
    pub id: RequestId,
    pub row: i32,
    pub pos0: i32,
    pub num_new: i32,
    pub flags: i32,
    pub select_pages: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub id: RequestId,
    pub token: i32,
    pub sched_idx: i32,
    pub finish: i32,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub counts: StepCounts,
    pub reqs: Vec<Sched>,
    pub input_ids: Vec<i32>,
    pub page_updates: Vec<[i32; 3]>,
    pub stream_updates: Vec<[i32; 3]>,
    pub aborted: Vec<RequestId>,
    pub preempted: Vec<RequestId>,
    pub outputs: Vec<Output>,
}

impl Step {
    pub fn ids(&self) -> Vec<RequestId> {
        self.reqs.iter().map(|r| r.id).collect()
    }

    pub fn get(&self, id: RequestId) -> Sched {
        *self
            .reqs
            .iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("{id} not scheduled"))
    }
}

/// `schedule()` and a snapshot of what it planned (no outputs yet); checks the invariants.
pub fn schedule(sched: &mut Scheduler) -> Step {
    let counts = sched.schedule().unwrap();
    sched.check_invariants().unwrap();
    let io = sched.io();
    let reqs: Vec<Sched> = (0..counts.num_reqs)
        .map(|i| Sched {
            id: io.req_ids()[i],
            row: io.rows()[i],
            pos0: io.pos0()[i],
            num_new: io.num_new()[i],
            flags: io.flags()[i],
            select_pages: io.select_pages()[i],
        })
        .collect();
    let triples = |flat: &[i32]| flat.chunks_exact(3).map(|t| [t[0], t[1], t[2]]).collect();
    Step {
        counts,
        input_ids: io.input_ids().to_vec(),
        page_updates: triples(io.page_updates()),
        stream_updates: triples(io.stream_updates()),
        aborted: io.aborted_ids().to_vec(),
        preempted: io.preempted_ids().to_vec(),
        outputs: Vec::new(),
        reqs,
    }
}

/// `update()` of `step`, which must be the oldest step awaiting it: `sample(id, sched_idx)` is
/// the token of each of its requests; fills `step.outputs` and checks the invariants.
pub fn update(
    sched: &mut Scheduler,
    step: &mut Step,
    mut sample: impl FnMut(RequestId, usize) -> i32,
) {
    for (i, r) in step.reqs.iter().enumerate() {
        sched.sampled_mut()[i] = sample(r.id, i);
    }
    let n_out = sched.update().unwrap();
    sched.check_invariants().unwrap();
    let io = sched.io();
    step.outputs = (0..n_out)
        .map(|i| Output {
            id: io.out_req_ids()[i],
            token: io.out_tokens()[i],
            sched_idx: io.out_sched_idx()[i],
            finish: io.out_finish()[i],
        })
        .collect();
}

/// `schedule()`, then `update()` with `sample(id, sched_idx)` as the token of every request
/// that needs one; checks the invariants on both sides.
pub fn step_with(sched: &mut Scheduler, sample: impl FnMut(RequestId, usize) -> i32) -> Step {
    let mut step = schedule(sched);
    update(sched, &mut step, sample);
    step
}

/// One step whose sampled tokens are never stop tokens (tests use no stop ids unless they say).
pub fn step(sched: &mut Scheduler) -> Step {
    step_with(sched, |_, i| 7 + i as i32)
}

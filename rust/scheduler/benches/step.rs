//! Per-step CPU cost of the scheduler core at batch 256 (docs/architecture.md#cpu-budget:
//! schedule() + update() ≤ 50 µs in steady decode). Run with `cargo bench -p omniserve-scheduler`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use _scheduler::{NewRequest, Scheduler, SchedulerConfig};
use criterion::{criterion_group, criterion_main, Criterion};

const BATCH: u32 = 256;

/// One step of a fake runner that samples token 1 for everyone (no stop tokens are set).
fn step(s: &mut Scheduler) {
    let n = s.schedule().unwrap().num_reqs;
    s.sampled_mut()[..n].fill(1);
    s.update().unwrap();
}

fn add(s: &mut Scheduler, id: i64, prompt: &[i32], max_tokens: u32) {
    s.add_request(NewRequest::new(id, prompt.to_vec(), max_tokens))
        .unwrap();
}

/// 256 requests past their prefill, decoding; they can grow by 1024 tokens before any ends.
fn decoding_batch() -> Scheduler {
    let mut s = Scheduler::new(SchedulerConfig::new(8192, 4096)).unwrap();
    let prompt = vec![1; 128];
    for id in 0..BATCH {
        add(&mut s, id.into(), &prompt, 1 << 20);
    }
    while s.stats().running < BATCH as usize {
        step(&mut s);
    }
    s
}

/// Times `timed` over `iters` steps, rebuilding the batch (untimed) every 1000 steps so that it
/// stays in steady decode.
fn steady_decode(iters: u64, mut timed: impl FnMut(&mut Scheduler) -> Duration) -> Duration {
    let mut total = Duration::ZERO;
    let mut s = decoding_batch();
    for i in 0..iters {
        if i % 1000 == 999 {
            s = decoding_batch();
        }
        total += timed(&mut s);
    }
    total
}

fn decode(c: &mut Criterion) {
    c.bench_function("decode_step_bs256 (schedule+update)", |b| {
        b.iter_custom(|iters| {
            steady_decode(iters, |s| {
                let t = Instant::now();
                step(black_box(s));
                t.elapsed()
            })
        })
    });
    c.bench_function("schedule_bs256", |b| {
        b.iter_custom(|iters| {
            steady_decode(iters, |s| {
                let t = Instant::now();
                let n = black_box(s.schedule().unwrap()).num_reqs;
                let elapsed = t.elapsed();
                s.sampled_mut()[..n].fill(1);
                s.update().unwrap();
                elapsed
            })
        })
    });
    c.bench_function("update_bs256", |b| {
        b.iter_custom(|iters| {
            steady_decode(iters, |s| {
                let n = s.schedule().unwrap().num_reqs;
                s.sampled_mut()[..n].fill(1);
                let t = Instant::now();
                black_box(s.update().unwrap());
                t.elapsed()
            })
        })
    });
}

/// A stationary mix: 2048-token prompts keep arriving and each decodes 64 tokens, so every step
/// holds a batch near its 256 seats of decodes plus admissions and prefill chunks (at most 2048
/// tokens each) filling the 8192-token budget.
fn mixed(c: &mut Criterion) {
    let cfg = SchedulerConfig {
        long_prefill_token_threshold: 2048,
        ..SchedulerConfig::new(16384, 4096)
    };
    let mut s = Scheduler::new(cfg).unwrap();
    let prompt: Vec<i32> = (0..2048).collect();
    let mut next_id = 0;
    let mut top_up = |s: &mut Scheduler| {
        while s.stats().waiting < 8 {
            add(s, next_id, &prompt, 64);
            next_id += 1;
        }
    };
    for _ in 0..200 {
        top_up(&mut s);
        step(&mut s);
    }
    c.bench_function("mixed_admissions_prefill", |b| {
        b.iter(|| {
            top_up(&mut s);
            step(black_box(&mut s));
        })
    });
    println!("mixed_admissions_prefill: {} running", s.stats().running);
}

/// 256 requests in a pool that holds about 1.2 pages each, with staggered lengths so that some
/// cross a page boundary every step: every step preempts, preempted requests come back as others
/// finish (after 48 tokens), and the queue is topped up to keep 256 requests in the system.
fn preempt_storm(c: &mut Criterion) {
    let cfg = SchedulerConfig {
        page_size: 16,
        watermark: 0.0,
        ..SchedulerConfig::new(BATCH * 6 / 5 + 1, 4096)
    };
    let mut s = Scheduler::new(cfg).unwrap();
    let mut next_id = 0;
    let mut top_up = |s: &mut Scheduler| {
        while s.num_unfinished() < BATCH as usize {
            let len = 1 + (next_id % 16) as usize;
            add(s, next_id, &vec![1; len], 48);
            next_id += 1;
        }
    };
    for _ in 0..200 {
        top_up(&mut s);
        step(&mut s);
    }
    let (steps0, preempted0) = (s.stats().num_steps, s.stats().num_preemptions);
    c.bench_function("preempt_storm_bs256", |b| {
        b.iter(|| {
            top_up(&mut s);
            step(black_box(&mut s));
        })
    });
    let stats = s.stats();
    let per_step = (stats.num_preemptions - preempted0) as f64 / (stats.num_steps - steps0) as f64;
    println!(
        "preempt_storm_bs256: {per_step:.1} preemptions per step, {} running",
        stats.running
    );
}

criterion_group!(benches, decode, mixed, preempt_storm);
criterion_main!(benches);

//! Hand-checked traces of the scheduling rules. Pages are 4 tokens (2 logical pages of 2) unless
//! a test says otherwise; page counts in comments exclude the null page.

mod common;

use _scheduler::{
    NewRequest, Policy, Scheduler, SchedulerConfig, SchedulerError, FINISH_LENGTH, FINISH_NONE,
    FINISH_STOP, FLAG_NEEDS_LOGITS, FLAG_NEW_ROW, FLAG_PREFILL, FLAG_RESELECT,
};
use common::{add, small_config, step, step_with, Output, Sched};

const NEW_PREFILL: i32 = FLAG_NEW_ROW | FLAG_PREFILL;

fn scheduler(cfg: SchedulerConfig) -> Scheduler {
    Scheduler::new(cfg).unwrap()
}

#[test]
fn prefill_then_decode_with_lazy_pages_and_reselect() {
    let mut s = scheduler(small_config(16));
    add(&mut s, 1, 10, 5);

    let st = step(&mut s);
    let sched = Sched {
        id: 1,
        row: 0,
        pos0: 0,
        num_new: 10,
        flags: 0,
        select_pages: 2,
    };
    assert_eq!(
        st.reqs,
        [Sched {
            flags: NEW_PREFILL | FLAG_NEEDS_LOGITS,
            ..sched
        }]
    );
    assert_eq!(st.input_ids, (1000..1010).collect::<Vec<_>>());
    assert_eq!(st.page_updates, [[0, 0, 1], [0, 1, 2], [0, 2, 3]]);
    assert_eq!(
        st.outputs,
        [Output {
            id: 1,
            token: 7,
            sched_idx: 0,
            finish: FINISH_NONE
        }]
    );
    assert_eq!(st.counts.num_tokens, 10);

    // Decode: the sampled token is the input; a page only when position 12 is reached; the
    // selection is made at the first decode step, then every `selector_interval` (2) steps.
    let st = step(&mut s);
    assert_eq!(
        st.reqs,
        [Sched {
            pos0: 10,
            num_new: 1,
            flags: FLAG_NEEDS_LOGITS | FLAG_RESELECT,
            ..sched
        }]
    );
    assert_eq!((st.input_ids, st.page_updates.len()), (vec![7], 0));
    let st = step(&mut s);
    assert_eq!(st.get(1).flags, FLAG_NEEDS_LOGITS);
    assert_eq!(st.get(1).select_pages, 2);
    let st = step(&mut s);
    assert_eq!(
        (st.get(1).pos0, st.get(1).flags),
        (12, FLAG_NEEDS_LOGITS | FLAG_RESELECT)
    );
    assert_eq!(st.get(1).select_pages, 3, "position 12 opens page 3");
    assert_eq!(st.page_updates, [[0, 3, 4]]);
    let st = step(&mut s);
    assert_eq!(
        st.outputs[0].finish, FINISH_LENGTH,
        "max_tokens = 5 reached"
    );
    assert!(!s.has_unfinished());
    let stats = s.stats();
    assert_eq!(
        (stats.dense_pages_used, stats.num_finished, stats.num_steps),
        (0, 1, 5)
    );
}

#[test]
fn chunked_prefill_respects_cap_and_partial_limit() {
    let cfg = SchedulerConfig {
        long_prefill_token_threshold: 4,
        max_partial_prefills: 1,
        ..small_config(64)
    };
    let mut s = scheduler(cfg);
    add(&mut s, 1, 10, 10);
    add(&mut s, 2, 10, 10);
    add(&mut s, 3, 3, 10);

    // 1 starts a capped chunk and is now the one partial prefill; 2 would be a second one, so it
    // is skipped; 3 fits whole.
    let st = step(&mut s);
    assert_eq!(st.ids(), [1, 3]);
    assert_eq!((st.get(1).num_new, st.get(1).flags), (4, NEW_PREFILL));
    assert_eq!(st.get(3).flags, NEW_PREFILL | FLAG_NEEDS_LOGITS);

    let st = step(&mut s);
    assert_eq!(st.ids(), [3, 1], "decodes first, then partial prefills");
    assert_eq!((st.get(1).pos0, st.get(1).num_new), (4, 4));
    assert_eq!(st.get(1).flags, FLAG_PREFILL);

    // 1 finishes its prefill, which frees the partial slot for 2 in the same step.
    let st = step(&mut s);
    assert_eq!(st.ids(), [3, 1, 2]);
    assert_eq!(st.get(1).flags, FLAG_PREFILL | FLAG_NEEDS_LOGITS);
    assert_eq!((st.get(2).num_new, st.get(2).row), (4, 2));
}

#[test]
fn token_budget_splits_admissions() {
    let cfg = SchedulerConfig {
        max_num_seqs: 2,
        max_num_batched_tokens: 6,
        ..small_config(64)
    };
    let mut s = scheduler(cfg);
    add(&mut s, 1, 5, 10);
    add(&mut s, 2, 5, 10);
    let st = step(&mut s);
    assert_eq!(
        (st.get(1).num_new, st.get(2).num_new, st.counts.num_tokens),
        (5, 1, 6)
    );
    assert_eq!(
        st.outputs.len(),
        1,
        "the 1-token chunk of 2 samples nothing"
    );
    let st = step(&mut s);
    assert_eq!((st.get(2).pos0, st.get(2).num_new), (1, 4));
    assert_eq!(st.counts.num_tokens, 5);
}

#[test]
fn preemption_picks_fewest_computed_and_blocks_admission() {
    // 6 pages: 1 (8 tokens, 2 pages), 2 (4 tokens, 1 page), 3 (7 tokens, 2 pages); 1 page free.
    let mut s = scheduler(small_config(7));
    add(&mut s, 1, 8, 100);
    add(&mut s, 2, 4, 100);
    add(&mut s, 3, 7, 100);
    let st = step(&mut s);
    assert_eq!(st.ids(), [1, 2, 3]);
    let token_of_2 = st.outputs[1].token;
    add(&mut s, 4, 1, 100);

    // 1 and 2 both cross into a new page, one page is free: 2 has the fewest computed tokens.
    let st = step(&mut s);
    assert_eq!(st.preempted, [2]);
    assert_eq!(
        st.ids(),
        [1, 3],
        "4 would fit but nothing is admitted in a preempting step"
    );
    assert_eq!(s.stats().num_preemptions, 1);

    // Free pages for both waiting requests: the preempted one goes first, recomputing its
    // prompt and its output so far.
    assert!(s.finish(1));
    let st = step(&mut s);
    assert_eq!(st.ids(), [3, 2, 4]);
    let resumed = st.get(2);
    assert_eq!(
        (resumed.pos0, resumed.num_new, resumed.flags),
        (0, 5, NEW_PREFILL | FLAG_NEEDS_LOGITS)
    );
    let q = st.reqs.iter().position(|r| r.id == 2).unwrap();
    let start: usize = st.reqs[..q].iter().map(|r| r.num_new as usize).sum();
    assert_eq!(
        st.input_ids[start..start + 5],
        [1000, 1001, 1002, 1003, token_of_2]
    );
}

#[test]
fn preemption_ties_go_to_the_latest_arrival() {
    let mut s = scheduler(small_config(3));
    add(&mut s, 1, 4, 100);
    add(&mut s, 2, 4, 100);
    step(&mut s);
    let st = step(&mut s);
    assert_eq!((&st.preempted[..], st.ids()), (&[2][..], vec![1]));
}

#[test]
fn priority_preempts_the_lowest_priority_first() {
    let mut s = scheduler(SchedulerConfig {
        scheduling_policy: Policy::Priority,
        ..small_config(7)
    });
    for (id, len, priority) in [(1, 4, 0), (2, 8, 5), (3, 7, 0)] {
        let prompt = vec![1; len];
        s.add_request(NewRequest {
            priority,
            ..NewRequest::new(id, prompt, 100)
        })
        .unwrap();
    }
    step(&mut s);
    // 1 and 2 need a page, one is free: 2 has the most computed tokens but the lowest priority.
    let st = step(&mut s);
    assert_eq!((&st.preempted[..], st.ids()), (&[2][..], vec![1, 3]));
}

#[test]
fn a_request_may_preempt_itself() {
    // 4 pages. 10 (priority 0, 12 tokens) reserves 3 pages, prefilling 4 tokens per step;
    // 20 (priority 5) takes the last page, then needs another one for its first decode.
    let cfg = SchedulerConfig {
        scheduling_policy: Policy::Priority,
        long_prefill_token_threshold: 4,
        ..small_config(5)
    };
    let mut s = scheduler(cfg);
    let low = NewRequest {
        priority: 5,
        ..NewRequest::new(20, vec![1; 4], 10)
    };
    s.add_request(low).unwrap();
    s.add_request(NewRequest::new(10, vec![1; 12], 2)).unwrap();
    let st = step(&mut s);
    assert_eq!(st.ids(), [10, 20]);

    // The only pages left are promised to 10's prefill, and 20 ranks below it.
    let st = step(&mut s);
    assert_eq!((&st.preempted[..], st.ids()), (&[20][..], vec![10]));
    let st = step(&mut s);
    assert_eq!(st.ids(), [10]);
    let st = step(&mut s);
    assert_eq!(st.outputs[0].finish, FINISH_LENGTH);
    // Back with its prompt and first output to recompute, in chunks of at most 4.
    let st = step(&mut s);
    assert_eq!(
        (st.get(20).pos0, st.get(20).num_new, st.get(20).flags),
        (0, 4, NEW_PREFILL)
    );
}

#[test]
fn head_of_line_aging_stops_skip_ahead() {
    let cfg = SchedulerConfig {
        hol_age_steps: 2,
        ..small_config(9)
    };
    let mut s = scheduler(cfg);
    add(&mut s, 1, 16, 100); // 4 of the 8 pages
    step(&mut s);
    add(&mut s, 2, 20, 100); // needs 5 pages: blocked while 1 runs
    add(&mut s, 3, 2, 100);
    assert_eq!(step(&mut s).ids(), [1, 3], "2 has waited 1 step: skipped");
    add(&mut s, 4, 2, 100);
    assert_eq!(
        step(&mut s).ids(),
        [1, 3, 4],
        "2 has waited 2 steps: skipped"
    );
    add(&mut s, 5, 2, 100);
    assert_eq!(
        step(&mut s).ids(),
        [1, 3, 4],
        "2 has waited 3 steps: 5 must not pass it"
    );
    // Once 1 is gone, 2 gets its pages first; the one page left is not enough for 5.
    assert!(s.finish(1));
    let ids = step(&mut s).ids();
    assert_eq!((ids.len(), ids.last()), (3, Some(&2)));
}

#[test]
fn skip_ahead_is_bounded() {
    for (skip_limit, expected) in [(1, vec![1]), (2, vec![1, 4])] {
        let mut s = scheduler(SchedulerConfig {
            skip_limit,
            ..small_config(9)
        });
        add(&mut s, 1, 16, 100);
        step(&mut s);
        add(&mut s, 2, 20, 100); // blocked
        add(&mut s, 3, 20, 100); // blocked
        add(&mut s, 4, 2, 100); // fits, two places behind the head
        assert_eq!(step(&mut s).ids(), expected, "skip_limit {skip_limit}");
    }
}

#[test]
fn priority_policy_orders_admission() {
    for (policy, expected) in [(Policy::Priority, [2, 3, 1]), (Policy::Fcfs, [1, 2, 3])] {
        let cfg = SchedulerConfig {
            scheduling_policy: policy,
            max_num_seqs: 1,
            ..small_config(64)
        };
        let mut s = scheduler(cfg);
        for (id, priority) in [(1, 5), (2, -1), (3, 0)] {
            s.add_request(NewRequest {
                priority,
                ..NewRequest::new(id, vec![1; 3], 1)
            })
            .unwrap();
        }
        let order: Vec<_> = (0..3).flat_map(|_| step(&mut s).ids()).collect();
        assert_eq!(order, expected, "{policy:?}");
    }
}

#[test]
fn abort_waiting_and_running() {
    let mut s = scheduler(SchedulerConfig {
        max_num_seqs: 2,
        ..small_config(16)
    });
    for id in 1..=3 {
        add(&mut s, id, 4, 100);
    }
    assert_eq!(step(&mut s).ids(), [1, 2]);
    let handle = s.abort_handle();
    for id in [1, 3, 99, 1] {
        handle.abort(id);
    }
    let st = step(&mut s);
    assert_eq!((&st.aborted[..], st.ids()), (&[1, 3][..], vec![2]));
    let stats = s.stats();
    assert_eq!(
        (stats.running, stats.waiting, stats.dense_pages_used),
        (1, 0, 2)
    );
    assert_eq!(s.num_unfinished(), 1);
    assert!(
        step(&mut s).aborted.is_empty(),
        "repeated and unknown aborts are dropped"
    );
}

#[test]
fn aborts_are_capped_per_step() {
    let mut s = scheduler(SchedulerConfig {
        max_num_seqs: 2,
        ..small_config(16)
    });
    for id in 1..=5 {
        add(&mut s, id, 4, 100);
    }
    let handle = s.abort_handle();
    (1..=5).for_each(|id| handle.abort(id));
    let aborted: Vec<_> = (0..3).map(|_| step(&mut s).aborted).collect();
    assert_eq!(aborted, [vec![1, 2], vec![3, 4], vec![5]]);
}

#[test]
fn intake_rejects_what_can_never_run() {
    // 8 pages of 4 tokens: a prompt may use all 32 tokens.
    let mut s = scheduler(small_config(9));
    let too_long = |id, len| NewRequest::new(id, vec![1; len], 1);
    s.add_request(too_long(1, 32)).unwrap();
    assert!(matches!(
        s.add_request(too_long(2, 33)),
        Err(SchedulerError::Rejected { id: 2, .. })
    ));

    let mut s = scheduler(SchedulerConfig {
        watermark: 0.25,
        ..small_config(9)
    }); // keeps 3 free
    s.add_request(too_long(1, 20)).unwrap();
    assert!(matches!(
        s.add_request(too_long(2, 21)),
        Err(SchedulerError::Rejected { .. })
    ));

    let mut s = scheduler(SchedulerConfig {
        max_model_len: 16,
        ..small_config(64)
    });
    s.add_request(too_long(1, 15)).unwrap();
    assert!(matches!(
        s.add_request(too_long(2, 16)),
        Err(SchedulerError::Rejected { .. })
    ));

    let streaming = SchedulerConfig {
        num_stream_pages: 4,
        stream_sink_pages: 2,
        stream_local_pages: 1,
        ..small_config(64)
    };
    // A table of 2 sink + 1 local + 1 pages; the pool holds 3 besides the null page.
    let mut s = scheduler(streaming);
    assert!(matches!(
        s.add_request(too_long(1, 16)),
        Err(SchedulerError::Rejected { .. })
    ));
    assert!(!s.has_unfinished());
    // A request too short to wrap the ring needs only the pages it reaches.
    s.add_request(too_long(2, 7)).unwrap();
    let out = step(&mut s);
    assert_eq!(out.counts.num_stream_updates, 2);
}

#[test]
fn intake_rejects_malformed_requests() {
    let mut s = scheduler(small_config(64));
    add(&mut s, 1, 3, 1);
    let cases = [
        NewRequest::new(1, vec![1], 1),
        NewRequest::new(2, vec![], 1),
        NewRequest::new(3, vec![1], 0),
        NewRequest {
            min_tokens: 3,
            ..NewRequest::new(4, vec![1], 2)
        },
        NewRequest::new(5, vec![1, -1], 2),
    ];
    for req in cases {
        let id = req.id;
        let err = s.add_request(req).unwrap_err();
        assert!(
            matches!(err, SchedulerError::InvalidRequest { id: got, .. } if got == id),
            "{err}"
        );
    }
    assert_eq!(s.num_unfinished(), 1);
}

#[test]
fn stop_tokens_respect_min_tokens_and_lengths_cap() {
    let mut s = scheduler(SchedulerConfig {
        max_model_len: 8,
        ..small_config(64)
    });
    let stop = NewRequest {
        stop_token_ids: vec![5],
        min_tokens: 2,
        ..NewRequest::new(1, vec![1], 10)
    };
    s.add_request(stop).unwrap();
    add(&mut s, 2, 6, 100);
    let finishes = |st: &common::Step| {
        st.outputs
            .iter()
            .map(|o| (o.id, o.finish))
            .collect::<Vec<_>>()
    };
    let st = step_with(&mut s, |_, _| 5);
    assert_eq!(finishes(&st), [(1, FINISH_NONE), (2, FINISH_NONE)]);
    let st = step_with(&mut s, |_, _| 5);
    // 1: second output is a stop token; 2: 8 tokens = max_model_len.
    assert_eq!(finishes(&st), [(1, FINISH_STOP), (2, FINISH_LENGTH)]);

    // The dense pool (2 pages = 8 tokens) caps the sequence at 9 tokens, so that a preempted
    // request always fits again.
    let mut s = scheduler(small_config(3));
    add(&mut s, 1, 7, 100);
    assert_eq!(step(&mut s).outputs[0].finish, FINISH_NONE);
    assert_eq!(step(&mut s).outputs[0].finish, FINISH_LENGTH);
}

#[test]
fn streaming_tables_are_allocated_at_admission() {
    let cfg = SchedulerConfig {
        num_stream_pages: 7,
        stream_sink_pages: 1,
        stream_local_pages: 1,
        ..small_config(64)
    };
    let mut s = scheduler(cfg);
    for id in 1..=3 {
        add(&mut s, id, 2, 100);
    }
    let st = step(&mut s);
    assert_eq!(st.ids(), [1, 2], "3 finds no streaming table");
    assert_eq!(
        st.stream_updates,
        [
            [0, 0, 1],
            [0, 1, 2],
            [0, 2, 3],
            [1, 0, 4],
            [1, 1, 5],
            [1, 2, 6]
        ]
    );
    assert_eq!(
        step(&mut s).stream_updates.len(),
        0,
        "tables never change while running"
    );
    assert!(s.finish(1));
    let st = step(&mut s);
    assert_eq!(st.ids(), [2, 3]);
    assert_eq!(
        (st.get(3).row, st.get(3).flags & FLAG_NEW_ROW),
        (0, FLAG_NEW_ROW)
    );
    let mut pages: Vec<_> = st.stream_updates.iter().map(|u| u[2]).collect();
    pages.sort_unstable();
    assert_eq!(pages, [1, 2, 3], "3 reuses the table of 1");
    assert_eq!(s.stats().stream_pages_used, 6);
}

#[test]
fn finish_between_schedule_and_update() {
    let mut s = scheduler(small_config(16));
    add(&mut s, 1, 4, 100);
    s.schedule().unwrap();
    assert!(s.finish(1));
    assert!(!s.finish(1));
    assert_eq!(s.update().unwrap(), 0);
    s.check_invariants().unwrap();
    assert_eq!(s.stats().dense_pages_used, 0);
}

#[test]
fn step_protocol_is_enforced() {
    let mut s = scheduler(small_config(16));
    assert_eq!(s.update().unwrap(), 0, "nothing to consume");
    assert_eq!(s.schedule().unwrap().num_reqs, 0);
    assert_eq!(
        s.schedule().unwrap().num_reqs,
        0,
        "an empty step needs no update()"
    );
    add(&mut s, 1, 4, 100);
    s.schedule().unwrap();
    assert!(matches!(s.schedule(), Err(SchedulerError::StepOrder(_))));
    assert_eq!(s.update().unwrap(), 1);
}

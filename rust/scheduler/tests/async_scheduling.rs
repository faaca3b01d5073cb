//! Hand-checked traces of async scheduling: `schedule()` of step n+1 comes before `update()` of
//! step n. Pages are 4 tokens (2 logical pages of 2); page counts in comments exclude the null
//! page.

mod common;

use _scheduler::{
    placeholder, NewRequest, Scheduler, SchedulerConfig, SchedulerError, FINISH_LENGTH,
    FINISH_NONE, FINISH_STOP, FLAG_NEEDS_LOGITS, FLAG_NEW_ROW, FLAG_PREFILL, FLAG_RESELECT,
};
use common::{add, prompt, schedule, small_config, step, update, Output, Sched};

const NEW_PREFILL: i32 = FLAG_NEW_ROW | FLAG_PREFILL;

fn scheduler(cfg: SchedulerConfig) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        async_scheduling: true,
        ..cfg
    })
    .unwrap()
}

fn output(id: i64, token: i32, sched_idx: i32, finish: i32) -> Output {
    Output {
        id,
        token,
        sched_idx,
        finish,
    }
}

/// Steps in order until every request has finished; the pools must end empty.
fn drain(s: &mut Scheduler) {
    for _ in 0..100 {
        if !s.has_unfinished() {
            let stats = s.stats();
            assert_eq!((stats.dense_pages_used, stats.stream_pages_used), (0, 0));
            return;
        }
        step(s);
    }
    panic!("requests still unfinished after 100 steps");
}

#[test]
fn a_decode_planned_ahead_reads_a_placeholder() {
    let mut s = scheduler(small_config(16));
    add(&mut s, 1, 10, 5);
    let mut st1 = schedule(&mut s);
    let prefill = Sched {
        id: 1,
        row: 0,
        pos0: 0,
        num_new: 10,
        flags: NEW_PREFILL | FLAG_NEEDS_LOGITS,
        select_pages: 2,
    };
    assert_eq!(st1.reqs, [prefill]);
    assert_eq!(st1.input_ids, (1000..1010).collect::<Vec<_>>());

    // Step 2 decodes the token step 1 is still sampling: position 10, input the row's
    // placeholder; it samples the token after it.
    let mut st2 = schedule(&mut s);
    assert_eq!(
        st2.reqs,
        [Sched {
            pos0: 10,
            num_new: 1,
            flags: FLAG_NEEDS_LOGITS | FLAG_RESELECT,
            ..prefill
        }]
    );
    assert_eq!(st2.input_ids, [placeholder(0)]);
    assert_eq!(placeholder(0), -1);
    assert!(st2.page_updates.is_empty());

    update(&mut s, &mut st1, |_, _| 7);
    assert_eq!(st1.outputs, [output(1, 7, 0, FINISH_NONE)]);
    // Step 3 comes after step 1's update, so its input (step 2's token) is a placeholder too.
    let st3 = schedule(&mut s);
    assert_eq!(
        (st3.get(1).pos0, st3.get(1).flags, &st3.input_ids[..]),
        (11, FLAG_NEEDS_LOGITS, &[placeholder(0)][..])
    );
    update(&mut s, &mut st2, |_, _| 8);
    assert_eq!(st2.outputs, [output(1, 8, 0, FINISH_NONE)]);
}

#[test]
fn a_request_is_not_planned_past_its_length_limit() {
    let mut s = scheduler(small_config(16));
    add(&mut s, 1, 4, 2);
    let mut st1 = schedule(&mut s);
    let mut st2 = schedule(&mut s);
    assert_eq!(st2.get(1).pos0, 4);
    update(&mut s, &mut st1, |_, _| 7);
    assert_eq!(st1.outputs, [output(1, 7, 0, FINISH_NONE)]);
    // Steps 1 and 2 sample both of its tokens: step 3 has nothing to plan.
    let st3 = schedule(&mut s);
    assert_eq!(st3.counts.num_reqs, 0);
    update(&mut s, &mut st2, |_, _| 8);
    assert_eq!(st2.outputs, [output(1, 8, 0, FINISH_LENGTH)]);
    assert!(!s.has_unfinished());
    assert_eq!(s.stats().dense_pages_used, 0);
}

#[test]
fn a_stop_token_voids_the_step_planned_after_it() {
    let mut s = scheduler(small_config(16));
    let req = NewRequest {
        stop_token_ids: vec![0],
        ..NewRequest::new(1, prompt(1, 0, 6), 10)
    };
    s.add_request(req).unwrap();
    let mut st1 = schedule(&mut s);
    let mut st2 = schedule(&mut s);
    assert_eq!(st2.ids(), [1]);
    assert_eq!(s.stats().dense_pages_used, 2);
    update(&mut s, &mut st1, |_, _| 0);
    assert_eq!(st1.outputs, [output(1, 0, 0, FINISH_STOP)]);
    // Its pages are free now, while step 2 still computes for it; its update frees nothing more.
    assert_eq!(s.stats().dense_pages_used, 0);
    update(&mut s, &mut st2, |_, _| 7);
    assert!(st2.outputs.is_empty());
    let stats = s.stats();
    assert_eq!(
        (
            stats.dense_pages_used,
            stats.num_finished,
            s.num_unfinished()
        ),
        (0, 1, 0)
    );
    assert_eq!(schedule(&mut s).counts.num_reqs, 0);
}

#[test]
fn preemption_drops_what_the_steps_in_flight_do_for_the_victim() {
    // 2 pages, one per prompt. After step 1, 1 has all its tokens planned (max_tokens 1) and
    // needs no page; 2 needs a second page for position 4: it is preempted (the later arrival
    // of equal progress), and step 2 plans nothing.
    let mut s = scheduler(small_config(3));
    add(&mut s, 1, 4, 1);
    add(&mut s, 2, 4, 8);
    let mut st1 = schedule(&mut s);
    assert_eq!(st1.ids(), [1, 2]);
    let st2 = schedule(&mut s);
    assert_eq!((&st2.preempted[..], st2.counts.num_reqs), (&[2][..], 0));
    // A step that plans nothing is not in flight, so step 3 comes before step 1's update and
    // readmits 2 into its freed page and row.
    let mut st3 = schedule(&mut s);
    assert_eq!(
        st3.reqs,
        [Sched {
            id: 2,
            row: 1,
            pos0: 0,
            num_new: 4,
            flags: NEW_PREFILL | FLAG_NEEDS_LOGITS,
            select_pages: 0,
        }]
    );
    assert_eq!(st3.page_updates.len(), 1);
    // Step 1's token for 2 was dropped at the preemption: only 1 gets one.
    update(&mut s, &mut st1, |_, i| 10 + i as i32);
    assert_eq!(st1.outputs, [output(1, 10, 0, FINISH_LENGTH)]);
    update(&mut s, &mut st3, |_, _| 20);
    assert_eq!(st3.outputs, [output(2, 20, 0, FINISH_NONE)]);
    drain(&mut s);
}

#[test]
fn an_abort_voids_the_step_in_flight() {
    let mut s = scheduler(small_config(16));
    add(&mut s, 1, 4, 10);
    add(&mut s, 2, 4, 10);
    let mut st1 = schedule(&mut s);
    s.abort_handle().abort(1);
    let mut st2 = schedule(&mut s);
    assert_eq!((&st2.aborted[..], st2.ids()), (&[1][..], vec![2]));
    assert_eq!(st2.input_ids, [placeholder(1)]);
    assert_eq!(
        s.stats().dense_pages_used,
        2,
        "2's page and the one it decodes into"
    );
    update(&mut s, &mut st1, |_, i| 10 + i as i32);
    assert_eq!(st1.outputs, [output(2, 11, 1, FINISH_NONE)]);
    update(&mut s, &mut st2, |_, _| 12);
    assert_eq!(st2.outputs, [output(2, 12, 0, FINISH_NONE)]);
    drain(&mut s);
}

#[test]
fn a_third_step_must_wait_for_an_update() {
    let mut s = scheduler(small_config(16));
    add(&mut s, 1, 4, 10);
    let mut st1 = schedule(&mut s);
    schedule(&mut s);
    assert!(matches!(s.schedule(), Err(SchedulerError::StepOrder(_))));
    update(&mut s, &mut st1, |_, _| 7);
    assert_eq!(schedule(&mut s).get(1).pos0, 5);
}

#[test]
fn a_page_is_cached_only_once_the_step_computing_it_is_updated() {
    let mut s = scheduler(SchedulerConfig {
        enable_prefix_caching: true,
        long_prefill_token_threshold: 4,
        ..small_config(16)
    });
    s.add_request(NewRequest::new(1, prompt(1, 8, 1), 4))
        .unwrap();
    let mut st1 = schedule(&mut s);
    let mut st2 = schedule(&mut s);
    assert_eq!((st1.get(1).num_new, st2.get(1).pos0), (4, 4));
    // Step 1's update publishes the page step 1 computed, not the one step 2 is computing.
    update(&mut s, &mut st1, |_, _| 7);
    assert_eq!(s.stats().prefix_cache_pages, 1);
    s.add_request(NewRequest::new(2, prompt(2, 8, 1), 4))
        .unwrap();
    let mut st3 = schedule(&mut s);
    assert_eq!(st3.get(1).pos0, 8);
    assert_eq!(
        (st3.get(2).flags & FLAG_NEW_ROW, st3.get(2).pos0),
        (FLAG_NEW_ROW, 4)
    );
    update(&mut s, &mut st2, |_, _| 7);
    assert_eq!(s.stats().prefix_cache_pages, 2);
    s.add_request(NewRequest::new(3, prompt(3, 8, 1), 4))
        .unwrap();
    let st4 = schedule(&mut s);
    assert_eq!(st4.get(3).pos0, 8);
    update(&mut s, &mut st3, |_, _| 7);
    assert_eq!(s.stats().prefix_cache_hits, 4 + 8);
}

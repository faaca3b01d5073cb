//! Hand-checked traces of the prefix cache: 4-token pages, so a page is `[4k, 4k + 4)`; page
//! counts in comments exclude the null page.

mod common;

use _scheduler::{NewRequest, Scheduler, SchedulerConfig, FLAG_NEW_ROW, FLAG_PREFILL};
use common::{prompt, small_config, step, Sched};

fn scheduler(num_dense_pages: u32) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        enable_prefix_caching: true,
        ..small_config(num_dense_pages)
    })
    .unwrap()
}

fn add(s: &mut Scheduler, req: NewRequest) {
    s.add_request(req).unwrap();
}

fn pages_of(updates: &[[i32; 3]], row: i32) -> Vec<i32> {
    updates
        .iter()
        .filter(|u| u[0] == row)
        .map(|u| u[2])
        .collect()
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let mut s = scheduler(16);
    add(&mut s, NewRequest::new(1, prompt(1, 8, 2), 4));
    let st = step(&mut s);
    assert_eq!(st.page_updates, [[0, 0, 1], [0, 1, 2], [0, 2, 3]]);

    // 2 shares the two full pages: it starts at position 8, on its own third page.
    add(&mut s, NewRequest::new(2, prompt(2, 8, 3), 4));
    let st = step(&mut s);
    let two = st.get(2);
    assert_eq!(
        two,
        Sched {
            pos0: 8,
            num_new: 3,
            flags: two.flags,
            ..two
        }
    );
    assert_eq!(
        two.flags & (FLAG_NEW_ROW | FLAG_PREFILL),
        FLAG_NEW_ROW | FLAG_PREFILL
    );
    assert_eq!(pages_of(&st.page_updates, two.row), [1, 2, 4]);
    assert_eq!(
        st.input_ids[1..],
        [5200, 5201, 5202],
        "after 1's decode token"
    );
    let stats = s.stats();
    assert_eq!(
        (stats.prefix_cache_queries, stats.prefix_cache_hits),
        (10 + 11, 8)
    );
    assert_eq!(stats.dense_pages_used, 4, "pages 1 and 2 are shared");
}

#[test]
fn the_last_prompt_token_is_always_computed() {
    let mut s = scheduler(16);
    add(&mut s, NewRequest::new(1, prompt(1, 8, 0), 4));
    step(&mut s);
    // The whole prompt is cached, but its last token's logits are needed: page 1 is taken,
    // page 2 is recomputed into a page of 2's own.
    add(&mut s, NewRequest::new(2, prompt(2, 8, 0), 4));
    let st = step(&mut s);
    assert_eq!((st.get(2).pos0, st.get(2).num_new), (4, 4));
    assert_eq!(pages_of(&st.page_updates, st.get(2).row), [1, 4]);
}

#[test]
fn pages_are_published_after_the_step_that_computes_them() {
    let mut s = scheduler(16);
    add(&mut s, NewRequest::new(1, prompt(1, 8, 1), 4));
    add(&mut s, NewRequest::new(2, prompt(2, 8, 1), 4));
    // Both start in the same step: neither can read what the other is computing.
    let st = step(&mut s);
    assert_eq!((st.get(1).pos0, st.get(2).pos0), (0, 0));
    assert_eq!(s.stats().prefix_cache_hits, 0);
    // The first copy of each page is the cached one.
    add(&mut s, NewRequest::new(3, prompt(3, 8, 1), 4));
    let st = step(&mut s);
    assert_eq!(pages_of(&st.page_updates, st.get(3).row), [1, 2, 7]);
}

#[test]
fn finished_requests_leave_their_pages_cached_until_the_pool_needs_them() {
    // 6 pages.
    let mut s = scheduler(7);
    add(&mut s, NewRequest::new(1, prompt(1, 8, 1), 1));
    let st = step(&mut s);
    assert_eq!(st.outputs[0].finish, _scheduler::FINISH_LENGTH);
    let stats = s.stats();
    assert_eq!((stats.dense_pages_used, stats.prefix_cache_pages), (0, 2));

    // 2 revives both cached pages from the free list; its partial page 3 is not cached, so it
    // is the first to be reused.
    add(&mut s, NewRequest::new(2, prompt(2, 8, 1), 1));
    let st = step(&mut s);
    assert_eq!(pages_of(&st.page_updates, st.get(2).row), [1, 2, 3]);
    add(&mut s, NewRequest::new(3, prompt(3, 0, 16), 1));
    let st = step(&mut s);
    assert_eq!(pages_of(&st.page_updates, st.get(3).row), [3, 4, 5, 6]);
    assert_eq!(s.stats().prefix_cache_pages, 6);

    // Every free page is cached now: 4 evicts the least recently released first (1 and 2,
    // then 3's pages in the order 3 released them).
    add(&mut s, NewRequest::new(4, prompt(4, 0, 17), 1));
    let st = step(&mut s);
    assert_eq!(pages_of(&st.page_updates, st.get(4).row), [1, 2, 3, 4, 5]);
    assert_eq!(
        s.stats().prefix_cache_pages,
        1 + 4,
        "3's page 6 and 4's full pages"
    );
    // The shared prefix went with pages 1 and 2: a new request computes it again.
    add(&mut s, NewRequest::new(5, prompt(5, 8, 1), 1));
    assert_eq!(step(&mut s).get(5).pos0, 0);
}

#[test]
fn a_preempted_request_resumes_from_its_cached_pages() {
    // 5 pages. Both prompts take 2; at position 8 both decodes need a third page, one is free,
    // so 2 is preempted with 8 tokens computed: two full pages, which it published.
    let mut s = scheduler(6);
    add(&mut s, NewRequest::new(1, prompt(1, 0, 5), 7));
    add(&mut s, NewRequest::new(2, prompt(2, 0, 5), 10));
    let mut preempted_at = None;
    for n in 0..20 {
        let st = step(&mut s);
        if st.preempted == [2] {
            preempted_at = Some(n);
        }
        let Some(two) = st.reqs.iter().find(|r| r.id == 2 && preempted_at.is_some()) else {
            continue;
        };
        // Readmitted once 1 finished: only its last token is computed again.
        assert_eq!(
            (two.flags & FLAG_NEW_ROW, two.pos0, two.num_new),
            (FLAG_NEW_ROW, 8, 1)
        );
        assert_eq!(s.stats().prefix_cache_hits, 8);
        return;
    }
    panic!("2 was not preempted and readmitted (preempted at step {preempted_at:?})");
}

#[test]
fn a_request_may_opt_out() {
    let mut s = scheduler(16);
    add(&mut s, NewRequest::new(1, prompt(1, 8, 1), 4));
    step(&mut s);
    add(
        &mut s,
        NewRequest {
            cache_prefix: false,
            ..NewRequest::new(2, prompt(2, 8, 1), 4)
        },
    );
    let st = step(&mut s);
    assert_eq!(st.get(2).pos0, 0);
    assert_eq!(s.stats().prefix_cache_queries, 9, "2 does not count");
}

//! The flat per-step buffers (see the module docstring of `_scheduler.pyi`). Each is a `Vec`
//! allocated once at its full capacity and cleared, never shrunk, so a step allocates nothing.
//! The Python binding copies the filled prefixes into its bytearrays.

use crate::config::SchedulerConfig;
use crate::request::RequestId;

/// The chunk computes prompt (or recompute) tokens.
pub const FLAG_PREFILL: i32 = 1 << 0;
/// The chunk ends at the last known token: sample one.
pub const FLAG_NEEDS_LOGITS: i32 = 1 << 1;
/// Refresh the sparse page selection of this request.
pub const FLAG_RESELECT: i32 = 1 << 2;
/// The row was (re)assigned this step: reset per-row state.
pub const FLAG_NEW_ROW: i32 = 1 << 3;

pub const FINISH_NONE: i32 = 0;
/// A stop token after `min_tokens`.
pub const FINISH_STOP: i32 = 1;
/// `max_tokens` or the longest sequence (`SchedulerConfig::max_seq_len`) reached.
pub const FINISH_LENGTH: i32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    I32,
    I64,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }
}

/// Every step buffer, in the order of the `.pyi` docstring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    ReqIds,
    Rows,
    Pos0,
    NumNew,
    Qstart,
    Flags,
    NSelPages,
    InputIds,
    PageUpdates,
    StreamUpdates,
    AbortedIds,
    PreemptedIds,
    Sampled,
    OutReqIds,
    OutTokens,
    OutSchedIdx,
    OutFinish,
}

impl Buffer {
    pub const ALL: [Buffer; 17] = [
        Buffer::ReqIds,
        Buffer::Rows,
        Buffer::Pos0,
        Buffer::NumNew,
        Buffer::Qstart,
        Buffer::Flags,
        Buffer::NSelPages,
        Buffer::InputIds,
        Buffer::PageUpdates,
        Buffer::StreamUpdates,
        Buffer::AbortedIds,
        Buffer::PreemptedIds,
        Buffer::Sampled,
        Buffer::OutReqIds,
        Buffer::OutTokens,
        Buffer::OutSchedIdx,
        Buffer::OutFinish,
    ];
    /// What `schedule()` writes.
    pub const SCHEDULE_OUTPUTS: [Buffer; 12] = [
        Buffer::ReqIds,
        Buffer::Rows,
        Buffer::Pos0,
        Buffer::NumNew,
        Buffer::Qstart,
        Buffer::Flags,
        Buffer::NSelPages,
        Buffer::InputIds,
        Buffer::PageUpdates,
        Buffer::StreamUpdates,
        Buffer::AbortedIds,
        Buffer::PreemptedIds,
    ];
    /// What `update()` writes.
    pub const UPDATE_OUTPUTS: [Buffer; 4] = [
        Buffer::OutReqIds,
        Buffer::OutTokens,
        Buffer::OutSchedIdx,
        Buffer::OutFinish,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Buffer::ReqIds => "req_ids",
            Buffer::Rows => "rows",
            Buffer::Pos0 => "pos0",
            Buffer::NumNew => "num_new",
            Buffer::Qstart => "qstart",
            Buffer::Flags => "flags",
            Buffer::NSelPages => "n_sel_pages",
            Buffer::InputIds => "input_ids",
            Buffer::PageUpdates => "page_updates",
            Buffer::StreamUpdates => "stream_updates",
            Buffer::AbortedIds => "aborted_ids",
            Buffer::PreemptedIds => "preempted_ids",
            Buffer::Sampled => "sampled",
            Buffer::OutReqIds => "out_req_ids",
            Buffer::OutTokens => "out_tokens",
            Buffer::OutSchedIdx => "out_sched_idx",
            Buffer::OutFinish => "out_finish",
        }
    }

    pub fn dtype(self) -> Dtype {
        match self {
            Buffer::ReqIds | Buffer::AbortedIds | Buffer::PreemptedIds | Buffer::OutReqIds => {
                Dtype::I64
            }
            _ => Dtype::I32,
        }
    }

    /// Capacity in elements.
    pub fn capacity(self, cfg: &SchedulerConfig) -> usize {
        let seqs = cfg.max_num_seqs as usize;
        match self {
            Buffer::Qstart => seqs + 1,
            Buffer::InputIds => cfg.max_num_batched_tokens as usize,
            Buffer::PageUpdates => 3 * cfg.num_dense_pages as usize,
            Buffer::StreamUpdates => 3 * cfg.num_stream_pages.max(1) as usize,
            _ => seqs,
        }
    }
}

/// The filled part of one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufData<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl BufData<'_> {
    pub fn len(&self) -> usize {
        match self {
            BufData::I32(d) => d.len(),
            BufData::I64(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One scheduled request, as `schedule()` records it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScheduledReq {
    pub slot: u32,
    pub id: RequestId,
    pub row: u32,
    pub pos0: u32,
    pub num_new: u32,
    pub flags: i32,
    pub n_sel_pages: u32,
}

#[derive(Debug)]
pub struct StepIo {
    req_ids: Vec<i64>,
    rows: Vec<i32>,
    pos0: Vec<i32>,
    num_new: Vec<i32>,
    qstart: Vec<i32>,
    flags: Vec<i32>,
    n_sel_pages: Vec<i32>,
    input_ids: Vec<i32>,
    page_updates: Vec<i32>,
    stream_updates: Vec<i32>,
    aborted_ids: Vec<i64>,
    preempted_ids: Vec<i64>,
    sampled: Vec<i32>,
    out_req_ids: Vec<i64>,
    out_tokens: Vec<i32>,
    out_sched_idx: Vec<i32>,
    out_finish: Vec<i32>,
    /// Slot of each scheduled request, for `update()`.
    slots: Vec<u32>,
}

impl StepIo {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        let cap = |buf: Buffer| buf.capacity(cfg);
        let mut io = Self {
            req_ids: Vec::with_capacity(cap(Buffer::ReqIds)),
            rows: Vec::with_capacity(cap(Buffer::Rows)),
            pos0: Vec::with_capacity(cap(Buffer::Pos0)),
            num_new: Vec::with_capacity(cap(Buffer::NumNew)),
            qstart: Vec::with_capacity(cap(Buffer::Qstart)),
            flags: Vec::with_capacity(cap(Buffer::Flags)),
            n_sel_pages: Vec::with_capacity(cap(Buffer::NSelPages)),
            input_ids: Vec::with_capacity(cap(Buffer::InputIds)),
            page_updates: Vec::with_capacity(cap(Buffer::PageUpdates)),
            stream_updates: Vec::with_capacity(cap(Buffer::StreamUpdates)),
            aborted_ids: Vec::with_capacity(cap(Buffer::AbortedIds)),
            preempted_ids: Vec::with_capacity(cap(Buffer::PreemptedIds)),
            sampled: vec![0; cap(Buffer::Sampled)],
            out_req_ids: Vec::with_capacity(cap(Buffer::OutReqIds)),
            out_tokens: Vec::with_capacity(cap(Buffer::OutTokens)),
            out_sched_idx: Vec::with_capacity(cap(Buffer::OutSchedIdx)),
            out_finish: Vec::with_capacity(cap(Buffer::OutFinish)),
            slots: Vec::with_capacity(cap(Buffer::ReqIds)),
        };
        io.begin_schedule();
        io
    }

    /// The filled prefix of `buf` (`sampled` is always whole).
    pub fn data(&self, buf: Buffer) -> BufData<'_> {
        use BufData::{I32, I64};
        match buf {
            Buffer::ReqIds => I64(&self.req_ids),
            Buffer::Rows => I32(&self.rows),
            Buffer::Pos0 => I32(&self.pos0),
            Buffer::NumNew => I32(&self.num_new),
            Buffer::Qstart => I32(&self.qstart),
            Buffer::Flags => I32(&self.flags),
            Buffer::NSelPages => I32(&self.n_sel_pages),
            Buffer::InputIds => I32(&self.input_ids),
            Buffer::PageUpdates => I32(&self.page_updates),
            Buffer::StreamUpdates => I32(&self.stream_updates),
            Buffer::AbortedIds => I64(&self.aborted_ids),
            Buffer::PreemptedIds => I64(&self.preempted_ids),
            Buffer::Sampled => I32(&self.sampled),
            Buffer::OutReqIds => I64(&self.out_req_ids),
            Buffer::OutTokens => I32(&self.out_tokens),
            Buffer::OutSchedIdx => I32(&self.out_sched_idx),
            Buffer::OutFinish => I32(&self.out_finish),
        }
    }

    pub fn req_ids(&self) -> &[i64] {
        &self.req_ids
    }
    pub fn rows(&self) -> &[i32] {
        &self.rows
    }
    pub fn pos0(&self) -> &[i32] {
        &self.pos0
    }
    pub fn num_new(&self) -> &[i32] {
        &self.num_new
    }
    pub fn qstart(&self) -> &[i32] {
        &self.qstart
    }
    pub fn flags(&self) -> &[i32] {
        &self.flags
    }
    pub fn n_sel_pages(&self) -> &[i32] {
        &self.n_sel_pages
    }
    pub fn input_ids(&self) -> &[i32] {
        &self.input_ids
    }
    /// Flat `(row, column, page)` triples.
    pub fn page_updates(&self) -> &[i32] {
        &self.page_updates
    }
    /// Flat `(row, column, page)` triples.
    pub fn stream_updates(&self) -> &[i32] {
        &self.stream_updates
    }
    pub fn aborted_ids(&self) -> &[i64] {
        &self.aborted_ids
    }
    pub fn preempted_ids(&self) -> &[i64] {
        &self.preempted_ids
    }
    pub fn out_req_ids(&self) -> &[i64] {
        &self.out_req_ids
    }
    pub fn out_tokens(&self) -> &[i32] {
        &self.out_tokens
    }
    pub fn out_sched_idx(&self) -> &[i32] {
        &self.out_sched_idx
    }
    pub fn out_finish(&self) -> &[i32] {
        &self.out_finish
    }
    /// Where the caller writes the token sampled for each schedule index before `update()`.
    pub fn sampled_mut(&mut self) -> &mut [i32] {
        &mut self.sampled
    }

    pub(crate) fn sampled(&self, sched_idx: usize) -> i32 {
        self.sampled[sched_idx]
    }

    pub(crate) fn num_scheduled(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn scheduled(&self, sched_idx: usize) -> (u32, RequestId, i32) {
        (
            self.slots[sched_idx],
            self.req_ids[sched_idx],
            self.flags[sched_idx],
        )
    }

    pub(crate) fn num_tokens(&self) -> u32 {
        self.qstart.last().map_or(0, |&t| t as u32)
    }

    pub(crate) fn begin_schedule(&mut self) {
        self.slots.clear();
        self.req_ids.clear();
        self.rows.clear();
        self.pos0.clear();
        self.num_new.clear();
        self.qstart.clear();
        self.qstart.push(0);
        self.flags.clear();
        self.n_sel_pages.clear();
        self.input_ids.clear();
        self.page_updates.clear();
        self.stream_updates.clear();
        self.aborted_ids.clear();
        self.preempted_ids.clear();
    }

    /// Records one scheduled request; its tokens go to `input_ids` separately.
    pub(crate) fn push_scheduled(&mut self, s: ScheduledReq) {
        self.slots.push(s.slot);
        self.req_ids.push(s.id);
        self.rows.push(s.row as i32);
        self.pos0.push(s.pos0 as i32);
        self.num_new.push(s.num_new as i32);
        self.qstart
            .push(self.num_tokens() as i32 + s.num_new as i32);
        self.flags.push(s.flags);
        self.n_sel_pages.push(s.n_sel_pages as i32);
    }

    pub(crate) fn push_input_ids(&mut self, tokens: &[i32]) {
        self.input_ids.extend_from_slice(tokens);
    }

    pub(crate) fn push_page_update(&mut self, row: u32, column: u32, page: u32) {
        self.page_updates
            .extend_from_slice(&[row as i32, column as i32, page as i32]);
    }

    pub(crate) fn push_stream_update(&mut self, row: u32, column: u32, page: u32) {
        self.stream_updates
            .extend_from_slice(&[row as i32, column as i32, page as i32]);
    }

    pub(crate) fn push_aborted(&mut self, id: RequestId) {
        self.aborted_ids.push(id);
    }

    pub(crate) fn push_preempted(&mut self, id: RequestId) {
        self.preempted_ids.push(id);
    }

    pub(crate) fn begin_update(&mut self) {
        self.out_req_ids.clear();
        self.out_tokens.clear();
        self.out_sched_idx.clear();
        self.out_finish.clear();
    }

    pub(crate) fn push_output(&mut self, id: RequestId, token: i32, sched_idx: usize, finish: i32) {
        self.out_req_ids.push(id);
        self.out_tokens.push(token);
        self.out_sched_idx.push(sched_idx as i32);
        self.out_finish.push(finish);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_capacities_follow_the_config() {
        let cfg = SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 32,
            ..SchedulerConfig::new(10, 128)
        };
        let caps: Vec<_> = Buffer::ALL
            .iter()
            .map(|b| (b.name(), b.capacity(&cfg)))
            .collect();
        assert_eq!(caps[4], ("qstart", 9));
        assert_eq!(caps[7], ("input_ids", 32));
        assert_eq!(caps[8], ("page_updates", 30));
        assert_eq!(
            caps[9],
            ("stream_updates", 3),
            "a disabled streaming pool still has one triple"
        );
        assert_eq!(Buffer::ReqIds.dtype().size(), 8);
        assert_eq!(Buffer::Sampled.dtype(), Dtype::I32);
        let mut names: Vec<_> = Buffer::ALL.iter().map(|b| b.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 17);
        for b in Buffer::SCHEDULE_OUTPUTS
            .iter()
            .chain(&Buffer::UPDATE_OUTPUTS)
        {
            assert!(Buffer::ALL.contains(b));
        }
    }

    #[test]
    fn push_scheduled_keeps_prefix_sums() {
        let cfg = SchedulerConfig {
            max_num_seqs: 4,
            ..SchedulerConfig::new(10, 128)
        };
        let mut io = StepIo::new(&cfg);
        io.begin_schedule();
        for (slot, n) in [(0, 5), (1, 1), (2, 3)] {
            io.push_scheduled(ScheduledReq {
                slot,
                id: slot.into(),
                row: slot,
                pos0: 0,
                num_new: n,
                flags: 0,
                n_sel_pages: 0,
            });
        }
        assert_eq!(io.qstart(), [0, 5, 6, 9]);
        assert_eq!(io.num_tokens(), 9);
        io.begin_schedule();
        assert_eq!((io.qstart(), io.num_scheduled()), (&[0][..], 0));
        assert_eq!(io.data(Buffer::Sampled), BufData::I32(&[0; 4]));
    }
}

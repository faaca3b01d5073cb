//! The step protocol: the flat per-step buffers, the flag bits and the finish codes. The Python
//! binding exports this description (`STEP_BUFFERS`, `FLAGS`, `FINISH_REASONS`) and copies the
//! filled prefixes into its bytearrays; Python builds its views from the description.

use crate::config::SchedulerConfig;
use crate::request::{FinishReason, RequestId};

/// The chunk computes prompt (or recompute) tokens.
pub const FLAG_PREFILL: i32 = 1 << 0;
/// The chunk ends at the last known token: sample one.
pub const FLAG_NEEDS_LOGITS: i32 = 1 << 1;
/// Refresh the sparse page selection of this request: set on the first decode step after a
/// prefill chunk, then every `selector_interval` decode steps.
pub const FLAG_RESELECT: i32 = 1 << 2;
/// The row was (re)assigned this step: reset per-row state.
pub const FLAG_NEW_ROW: i32 = 1 << 3;
/// Every flag by name, as the binding exports them.
pub const FLAGS: [(&str, i32); 4] = [
    ("FLAG_PREFILL", FLAG_PREFILL),
    ("FLAG_NEEDS_LOGITS", FLAG_NEEDS_LOGITS),
    ("FLAG_RESELECT", FLAG_RESELECT),
    ("FLAG_NEW_ROW", FLAG_NEW_ROW),
];

/// The request runs on.
pub const FINISH_NONE: i32 = 0;
/// `FinishReason::Stop` on the wire.
pub const FINISH_STOP: i32 = 1;
/// `FinishReason::Length` on the wire.
pub const FINISH_LENGTH: i32 = 2;
/// Every finish code but `FINISH_NONE`, with its reason.
pub const FINISH_REASONS: [(i32, FinishReason); 2] = [
    (FINISH_STOP, FinishReason::Stop),
    (FINISH_LENGTH, FinishReason::Length),
];

/// The wire code of an outcome.
pub fn finish_code(reason: Option<FinishReason>) -> i32 {
    match reason {
        None => FINISH_NONE,
        Some(FinishReason::Stop) => FINISH_STOP,
        Some(FinishReason::Length) => FINISH_LENGTH,
    }
}

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

    /// The numpy/torch name.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::I32 => "int32",
            Dtype::I64 => "int64",
        }
    }
}

/// When a buffer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// By `schedule()`; cleared at its start.
    Schedule,
    /// By `update()`; cleared at its start.
    Update,
    /// By the caller, between `schedule()` and `update()`; always whole.
    Input,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Schedule => "schedule",
            Phase::Update => "update",
            Phase::Input => "input",
        }
    }
}

/// Who consumes a buffer on the Python side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// The model runner (part of its step plan).
    Runner,
    /// The engine (request bookkeeping), or the scheduler itself for inputs.
    Engine,
}

impl Reader {
    pub fn as_str(self) -> &'static str {
        match self {
            Reader::Runner => "runner",
            Reader::Engine => "engine",
        }
    }
}

/// The element types a buffer may have.
trait Element: Copy {
    const DTYPE: Dtype;
    fn data(v: &[Self]) -> BufData<'_>;
}

impl Element for i32 {
    const DTYPE: Dtype = Dtype::I32;
    fn data(v: &[Self]) -> BufData<'_> {
        BufData::I32(v)
    }
}

impl Element for i64 {
    const DTYPE: Dtype = Dtype::I64;
    fn data(v: &[Self]) -> BufData<'_> {
        BufData::I64(v)
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

/// The input id of a token that a step still in flight samples for `row` (async scheduling):
/// `-(row + 1)`. The caller substitutes the token that step sampled for the row.
pub fn placeholder(row: u32) -> i32 {
    -(row as i32) - 1
}

/// One scheduled request, as `schedule()` records it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScheduledReq {
    pub id: RequestId,
    pub row: u32,
    pub pos0: u32,
    pub num_new: u32,
    pub flags: i32,
    pub select_pages: u32,
}

macro_rules! or_default {
    ($value:literal; $default:literal) => {
        $value
    };
    (; $default:literal) => {
        $default
    };
}

/// Declares the step buffers once. For each: its doc, `Variant name: element type`, when it is
/// written and who reads it, its filled length as `count [* width] [+ extra]` where `count`
/// names a `StepCounts` field (`num_outputs`: what `update()` returns), and its capacity in
/// elements. The `Buffer` enum, `StepIo`'s storage and accessors, the phase resets and the
/// description the binding exports (`STEP_BUFFERS`) all come from this list, so a new buffer
/// is one entry here plus the code in `schedule.rs` that fills it.
macro_rules! step_buffers {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident $name:ident: $ty:ty, $phase:ident, $reader:ident,
        count $count:ident $(* $width:literal)? $(+ $extra:literal)?,
        capacity $cap:expr;
    )*) => {
        /// Every step buffer, in declaration order.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Buffer {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Buffer {
            pub const ALL: &'static [Buffer] = &[$( Buffer::$variant, )*];

            pub fn name(self) -> &'static str {
                match self {
                    $( Buffer::$variant => stringify!($name), )*
                }
            }

            pub fn doc(self) -> &'static str {
                match self {
                    $( Buffer::$variant => concat!($( $doc ),*).trim_ascii(), )*
                }
            }

            pub fn dtype(self) -> Dtype {
                match self {
                    $( Buffer::$variant => <$ty as Element>::DTYPE, )*
                }
            }

            pub fn phase(self) -> Phase {
                match self {
                    $( Buffer::$variant => Phase::$phase, )*
                }
            }

            pub fn reader(self) -> Reader {
                match self {
                    $( Buffer::$variant => Reader::$reader, )*
                }
            }

            /// The filled length is `count * width + extra` elements, where `count` names a
            /// `StepCounts` field (or `num_outputs`, what `update()` returns).
            pub fn count(self) -> &'static str {
                match self {
                    $( Buffer::$variant => stringify!($count), )*
                }
            }

            /// Elements per counted item (3 for `(row, column, page)` triples).
            pub fn width(self) -> usize {
                match self {
                    $( Buffer::$variant => or_default!($($width)?; 1), )*
                }
            }

            /// Elements beyond `count * width` (the leading 0 of a prefix sum).
            pub fn extra(self) -> usize {
                match self {
                    $( Buffer::$variant => or_default!($($extra)?; 0), )*
                }
            }

            /// Capacity in elements.
            pub fn capacity(self, cfg: &SchedulerConfig) -> usize {
                match self {
                    $( Buffer::$variant => {
                        let capacity: fn(&SchedulerConfig) -> usize = $cap;
                        capacity(cfg)
                    } )*
                }
            }
        }

        /// The buffers, each a `Vec` allocated once at its full capacity and cleared, never
        /// shrunk, so a step allocates nothing.
        #[derive(Debug)]
        pub struct StepIo {
            $( $name: Vec<$ty>, )*
        }

        impl StepIo {
            pub fn new(cfg: &SchedulerConfig) -> Self {
                let mut io = Self {
                    $( $name: {
                        let capacity = Buffer::$variant.capacity(cfg);
                        match Phase::$phase {
                            Phase::Input => vec![0; capacity],
                            Phase::Schedule | Phase::Update => Vec::with_capacity(capacity),
                        }
                    }, )*
                };
                io.begin_schedule();
                io
            }

            /// The filled prefix of `buf` (an input buffer is always whole).
            pub fn data(&self, buf: Buffer) -> BufData<'_> {
                match buf {
                    $( Buffer::$variant => Element::data(&self.$name), )*
                }
            }

            $(
                $(#[doc = $doc])*
                pub fn $name(&self) -> &[$ty] {
                    &self.$name
                }
            )*

            fn clear(&mut self, phase: Phase) {
                $( if Phase::$phase == phase { self.$name.clear(); } )*
            }
        }
    };
}

step_buffers! {
    /// Request id of each scheduled request, in schedule order.
    ReqIds req_ids: i64, Schedule, Engine, count num_reqs, capacity |c| c.max_num_seqs as usize;
    /// Persistent batch row in [0, max_num_seqs), stable while the request runs.
    Rows rows: i32, Schedule, Runner, count num_reqs, capacity |c| c.max_num_seqs as usize;
    /// Tokens already in the KV cache (= the first position computed this step).
    Pos0 pos0: i32, Schedule, Runner, count num_reqs, capacity |c| c.max_num_seqs as usize;
    /// Tokens computed this step.
    NumNew num_new: i32, Schedule, Runner, count num_reqs, capacity |c| c.max_num_seqs as usize;
    /// Prefix sums of `num_new` (cu_seqlens of the queries).
    Qstart qstart: i32, Schedule, Runner, count num_reqs + 1,
        capacity |c| c.max_num_seqs as usize + 1;
    /// Bit set of the `FLAG_*` values.
    Flags flags: i32, Schedule, Runner, count num_reqs, capacity |c| c.max_num_seqs as usize;
    /// Dense pages before the one holding the request's last token this step: the page-table
    /// columns a page selection chooses among (the newest page is always attended).
    SelectPages select_pages: i32, Schedule, Runner, count num_reqs,
        capacity |c| c.max_num_seqs as usize;
    /// Token ids of every scheduled token, request after request; with async scheduling, a
    /// decode whose previous token is still being sampled has `-(row + 1)` (`placeholder`).
    InputIds input_ids: i32, Schedule, Runner, count num_tokens,
        capacity |c| c.max_num_batched_tokens as usize;
    /// `(row, column, page)` writes into the dense page table, applied before the forward pass;
    /// column c of a row holds the page of positions [c*page_size, (c+1)*page_size). One per
    /// page allocated, plus one per cached page an admitted row starts with.
    PageUpdates page_updates: i32, Schedule, Runner, count num_page_updates * 3,
        capacity |c| 3 * (c.num_dense_pages as usize + c.max_cached_columns_per_step());
    /// `(row, column, page)` writes into the streaming page table.
    StreamUpdates stream_updates: i32, Schedule, Runner, count num_stream_updates * 3,
        capacity |c| 3 * c.num_stream_pages.max(1) as usize;
    /// Requests aborted at this step boundary (their pages are free); at most max_num_seqs
    /// aborts are applied per step, the rest on the next.
    AbortedIds aborted_ids: i64, Schedule, Engine, count num_aborted,
        capacity |c| c.max_num_seqs as usize;
    /// Requests preempted this step (back to waiting, their pages free).
    PreemptedIds preempted_ids: i64, Schedule, Engine, count num_preempted,
        capacity |c| c.max_num_seqs as usize;
    /// Written by the caller before `update()`: the token sampled for schedule index i.
    Sampled sampled: i32, Input, Engine, count num_reqs, capacity |c| c.max_num_seqs as usize;
    /// The request that received a token.
    OutReqIds out_req_ids: i64, Update, Engine, count num_outputs,
        capacity |c| c.max_num_seqs as usize;
    /// The token appended.
    OutTokens out_tokens: i32, Update, Engine, count num_outputs,
        capacity |c| c.max_num_seqs as usize;
    /// The schedule index the token came from.
    OutSchedIdx out_sched_idx: i32, Update, Engine, count num_outputs,
        capacity |c| c.max_num_seqs as usize;
    /// `FINISH_*` code (`FINISH_NONE` while the request runs on).
    OutFinish out_finish: i32, Update, Engine, count num_outputs,
        capacity |c| c.max_num_seqs as usize;
}

impl StepIo {
    /// Where the caller writes the token sampled for each schedule index before `update()`.
    pub fn sampled_mut(&mut self) -> &mut [i32] {
        &mut self.sampled
    }

    pub(crate) fn num_scheduled(&self) -> usize {
        self.req_ids.len()
    }

    pub(crate) fn num_tokens(&self) -> u32 {
        self.qstart.last().map_or(0, |&t| t as u32)
    }

    pub(crate) fn begin_schedule(&mut self) {
        self.clear(Phase::Schedule);
        self.qstart.push(0);
    }

    /// Records one scheduled request; its tokens go to `input_ids` separately.
    pub(crate) fn push_scheduled(&mut self, s: ScheduledReq) {
        self.req_ids.push(s.id);
        self.rows.push(s.row as i32);
        self.pos0.push(s.pos0 as i32);
        self.num_new.push(s.num_new as i32);
        self.qstart
            .push(self.num_tokens() as i32 + s.num_new as i32);
        self.flags.push(s.flags);
        self.select_pages.push(s.select_pages as i32);
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
        self.clear(Phase::Update);
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
        let cap = |b: Buffer| (b.name(), b.capacity(&cfg));
        assert_eq!(cap(Buffer::Qstart), ("qstart", 9));
        assert_eq!(cap(Buffer::InputIds), ("input_ids", 32));
        // A triple per page, and per row up to 2 cached pages (128 tokens).
        assert_eq!(cap(Buffer::PageUpdates), ("page_updates", 3 * (10 + 8 * 2)));
        let uncached = SchedulerConfig {
            enable_prefix_caching: false,
            ..cfg.clone()
        };
        assert_eq!(Buffer::PageUpdates.capacity(&uncached), 30);
        assert_eq!(
            cap(Buffer::StreamUpdates),
            ("stream_updates", 3),
            "a disabled streaming pool still has one triple"
        );
        assert_eq!(Buffer::ReqIds.dtype().size(), 8);
        assert_eq!(Buffer::Sampled.dtype(), Dtype::I32);
        assert_eq!(
            (Buffer::PageUpdates.count(), Buffer::PageUpdates.width()),
            ("num_page_updates", 3)
        );
        assert_eq!(
            (Buffer::Qstart.count(), Buffer::Qstart.extra()),
            ("num_reqs", 1)
        );
        assert_eq!(
            Buffer::Rows.doc(),
            "Persistent batch row in [0, max_num_seqs), stable while the request runs."
        );
        let mut names: Vec<_> = Buffer::ALL.iter().map(|b| b.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Buffer::ALL.len());
        for b in Buffer::ALL {
            assert!(!b.doc().is_empty(), "{} has no doc", b.name());
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
        for (row, n) in [(0, 5), (1, 1), (2, 3)] {
            io.push_scheduled(ScheduledReq {
                id: row.into(),
                row,
                pos0: 0,
                num_new: n,
                flags: 0,
                select_pages: 0,
            });
        }
        assert_eq!(io.qstart(), [0, 5, 6, 9]);
        assert_eq!(io.num_tokens(), 9);
        io.begin_schedule();
        assert_eq!((io.qstart(), io.num_scheduled()), (&[0][..], 0));
        assert_eq!(io.data(Buffer::Sampled), BufData::I32(&[0; 4]));
        assert_eq!(io.data(Buffer::OutFinish), BufData::I32(&[]));
    }

    #[test]
    fn placeholders_are_negative_and_name_their_row() {
        assert_eq!([placeholder(0), placeholder(5)], [-1, -6]);
    }
}

//! Scheduler core of omniserve: request lifecycles, the unified token budget, admission,
//! recompute preemption, the dense and streaming KV page pools, page tables and the
//! sparse-attention page bookkeeping. It knows pages and tokens, never tensors.
//!
//! The logic is plain Rust; `python.rs` (cargo feature `python`) is a thin PyO3 wrapper that
//! exposes it as `omniserve._scheduler` (see `python/omniserve/_scheduler.pyi`).
//!
//! ```
//! use _scheduler::{NewRequest, Scheduler, SchedulerConfig};
//!
//! let mut sched = Scheduler::new(SchedulerConfig::new(64, 1024)).unwrap();
//! sched.add_request(NewRequest::new(7, vec![1, 2, 3], 2)).unwrap();
//! let step = sched.schedule().unwrap();
//! assert_eq!((step.num_reqs, step.num_tokens), (1, 3));
//! sched.sampled_mut()[0] = 42;
//! assert_eq!(sched.update().unwrap(), 1);
//! assert_eq!(sched.io().out_tokens(), [42]);
//! ```

mod abort;
mod config;
mod error;
mod invariants;
mod pool;
mod prefix_cache;
mod queue;
mod request;
mod schedule;
mod step_io;

#[cfg(feature = "python")]
mod python;

pub use abort::AbortHandle;
pub use config::{ConfigValue, Policy, SchedulerConfig};
pub use error::{Result, SchedulerError};
pub use request::{FinishReason, NewRequest, RequestId};
pub use schedule::{Scheduler, Stats, StepCounts};
pub use step_io::{
    finish_code, placeholder, BufData, Buffer, Dtype, Phase, Reader, StepIo, FINISH_LENGTH,
    FINISH_NONE, FINISH_REASONS, FINISH_STOP, FLAGS, FLAG_NEEDS_LOGITS, FLAG_NEW_ROW, FLAG_PREFILL,
    FLAG_RESELECT,
};

//! The one error type of the crate; `python.rs` maps each variant onto a Python exception.

use crate::request::RequestId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// A configuration value makes no sense (Python: `InvalidRequestError`, a `ValueError`).
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    /// A malformed request: duplicate id, empty prompt, bad limits.
    #[error("invalid request {id}: {reason}")]
    InvalidRequest { id: RequestId, reason: String },
    /// A well-formed request that can never be served with this configuration.
    #[error("request {id} rejected: {reason}")]
    Rejected { id: RequestId, reason: String },
    /// `schedule()` and `update()` were called out of turn.
    #[error("step protocol violated: {0}")]
    StepOrder(&'static str),
    /// An invariant broke: a bug in the scheduler.
    #[error("scheduler invariant broken: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, SchedulerError>;

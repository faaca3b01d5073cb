//! Scheduler configuration: plain values, validated once, then read-only.

use crate::error::{Result, SchedulerError};

/// Order of the waiting queue and of preemption victims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// First come, first served: every request has the same priority.
    Fcfs,
    /// Lower `priority` values are admitted first and preempted last.
    Priority,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Fcfs => "fcfs",
            Policy::Priority => "priority",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fcfs" => Ok(Policy::Fcfs),
            "priority" => Ok(Policy::Priority),
            other => Err(SchedulerError::InvalidConfig(format!(
                "policy must be 'fcfs' or 'priority', got {other:?}"
            ))),
        }
    }
}

/// Field meanings are those of `SchedulerConfig` in `_scheduler.pyi`.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub page_size: u32,
    /// Dense pages including the null page 0.
    pub num_dense_pages: u32,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    pub max_model_len: u32,
    pub max_partial_prefills: u32,
    /// Per-request cap on one prefill chunk; 0 = no cap below the step budget.
    pub long_prefill_token_threshold: u32,
    /// Fraction of the dense pool that admission keeps free so running requests can grow.
    pub watermark: f64,
    pub skip_limit: u32,
    pub hol_age_steps: u32,
    pub policy: Policy,
    /// Streaming pages including the null page 0; 0 turns the streaming pool off.
    pub num_stream_pages: u32,
    pub stream_sink_pages: u32,
    pub stream_local_pages: u32,
    pub logical_pages_per_page: u32,
    pub select_interval: u32,
}

impl SchedulerConfig {
    /// The defaults of the Python constructor for everything but the two required values.
    pub fn new(num_dense_pages: u32, max_model_len: u32) -> Self {
        Self {
            page_size: 64,
            num_dense_pages,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len,
            max_partial_prefills: 4,
            long_prefill_token_threshold: 0,
            watermark: 0.01,
            skip_limit: 8,
            hol_age_steps: 64,
            policy: Policy::Fcfs,
            num_stream_pages: 0,
            stream_sink_pages: 0,
            stream_local_pages: 0,
            logical_pages_per_page: 4,
            select_interval: 4,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let at_least = |name: &str, value: u32, min: u32| {
            if value < min {
                Err(invalid(format!("{name} must be >= {min}, got {value}")))
            } else {
                Ok(())
            }
        };
        at_least("page_size", self.page_size, 1)?;
        at_least("num_dense_pages", self.num_dense_pages, 2)?;
        at_least("max_num_seqs", self.max_num_seqs, 1)?;
        at_least("max_model_len", self.max_model_len, 2)?;
        at_least("max_partial_prefills", self.max_partial_prefills, 1)?;
        at_least("logical_pages_per_page", self.logical_pages_per_page, 1)?;
        at_least("select_interval", self.select_interval, 1)?;
        // Decode requests are scheduled before anything else and never split, so every running
        // request must be able to get its token in the same step.
        if self.max_num_batched_tokens < self.max_num_seqs {
            return Err(invalid(format!(
                "max_num_batched_tokens ({}) must be >= max_num_seqs ({})",
                self.max_num_batched_tokens, self.max_num_seqs
            )));
        }
        if self.page_size % self.logical_pages_per_page != 0 {
            return Err(invalid(format!(
                "page_size ({}) must be a multiple of logical_pages_per_page ({})",
                self.page_size, self.logical_pages_per_page
            )));
        }
        if !(0.0..1.0).contains(&self.watermark) {
            return Err(invalid(format!(
                "watermark must be in [0, 1), got {}",
                self.watermark
            )));
        }
        // The step buffers are int32: page ids, positions and token counts must fit.
        let limits = [
            self.num_dense_pages,
            self.num_stream_pages,
            self.max_model_len,
            self.max_num_batched_tokens,
        ];
        if limits.iter().any(|&v| v > i32::MAX as u32) {
            return Err(invalid(
                "num_dense_pages, num_stream_pages, max_model_len and max_num_batched_tokens \
                 must be < 2^31"
                    .to_string(),
            ));
        }
        Ok(())
    }

    pub fn stream_enabled(&self) -> bool {
        self.num_stream_pages > 0
    }

    /// Pages of one request's streaming table: sinks, the local ring, and one page being filled.
    pub fn stream_table_len(&self) -> u32 {
        if self.stream_enabled() {
            self.stream_sink_pages + self.stream_local_pages + 1
        } else {
            0
        }
    }

    /// Dense pages admission leaves free: ceil(watermark * num_dense_pages).
    pub fn watermark_pages(&self) -> u32 {
        (self.watermark * f64::from(self.num_dense_pages)).ceil() as u32
    }

    /// Tokens in one logical (selection) page.
    pub fn logical_page_tokens(&self) -> u32 {
        self.page_size / self.logical_pages_per_page
    }

    /// Dense pages needed to hold `tokens` tokens of KV.
    pub fn pages_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.page_size)
    }

    /// The longest sequence a request may reach (prompt + outputs). Besides `max_model_len`, a
    /// preempted request must be able to come back: its recompute prompt (all its tokens) must
    /// pass admission into an otherwise empty dense pool, i.e. fit in the pool minus the
    /// watermark. The last sampled token needs no KV, hence the `+ 1`.
    pub fn max_seq_len(&self) -> u32 {
        let usable = (self.num_dense_pages - 1).saturating_sub(self.watermark_pages());
        let cache_tokens = u64::from(usable) * u64::from(self.page_size) + 1;
        self.max_model_len
            .min(cache_tokens.min(u64::from(u32::MAX)) as u32)
    }
}

fn invalid(msg: String) -> SchedulerError {
    SchedulerError::InvalidConfig(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SchedulerConfig::new(1024, 4096).validate().unwrap();
    }

    #[test]
    fn rejects_nonsense() {
        let breakages: [fn(&mut SchedulerConfig); 10] = [
            |c| c.num_dense_pages = 1,
            |c| c.page_size = 0,
            |c| c.max_model_len = 1,
            |c| c.max_num_batched_tokens = c.max_num_seqs - 1,
            |c| c.logical_pages_per_page = 5,
            |c| c.watermark = 1.0,
            |c| c.watermark = -0.1,
            |c| c.watermark = f64::NAN,
            |c| c.select_interval = 0,
            |c| c.num_dense_pages = u32::MAX,
        ];
        for (i, breakage) in breakages.iter().enumerate() {
            let mut cfg = SchedulerConfig::new(1024, 4096);
            breakage(&mut cfg);
            assert!(
                matches!(cfg.validate(), Err(SchedulerError::InvalidConfig(_))),
                "case {i}: {cfg:?} should be invalid"
            );
        }
    }

    #[test]
    fn derived_values() {
        let cfg = SchedulerConfig {
            page_size: 64,
            watermark: 0.01,
            num_stream_pages: 100,
            stream_sink_pages: 2,
            stream_local_pages: 4,
            ..SchedulerConfig::new(101, 100_000)
        };
        assert_eq!(cfg.watermark_pages(), 2); // ceil(1.01)
        assert_eq!(cfg.stream_table_len(), 7);
        assert_eq!(cfg.logical_page_tokens(), 16);
        assert_eq!(cfg.pages_for(0), 0);
        assert_eq!(cfg.pages_for(64), 1);
        assert_eq!(cfg.pages_for(65), 2);
        // 100 usable pages minus 2 watermark pages, plus the last token that needs no KV.
        assert_eq!(cfg.max_seq_len(), 98 * 64 + 1);
        assert_eq!(
            SchedulerConfig {
                max_model_len: 512,
                ..cfg
            }
            .max_seq_len(),
            512
        );
    }

    #[test]
    fn policy_parses() {
        assert_eq!("fcfs".parse::<Policy>().unwrap(), Policy::Fcfs);
        assert_eq!("priority".parse::<Policy>().unwrap(), Policy::Priority);
        assert!("lifo".parse::<Policy>().is_err());
    }
}

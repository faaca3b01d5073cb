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
                "scheduling_policy must be 'fcfs' or 'priority', got {other:?}"
            ))),
        }
    }
}

/// A configuration value as it crosses a by-name boundary (the Python binding).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl std::fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigValue::Bool(v) => write!(f, "{v}"),
            ConfigValue::Int(v) => write!(f, "{v}"),
            ConfigValue::Float(v) => write!(f, "{v}"),
            ConfigValue::Str(v) => write!(f, "{v:?}"),
        }
    }
}

/// How a field's type converts from and to a `ConfigValue`.
trait ConfigField: Sized {
    fn from_value(name: &str, value: ConfigValue) -> Result<Self>;
    fn to_value(&self) -> ConfigValue;
}

impl ConfigField for u32 {
    fn from_value(name: &str, value: ConfigValue) -> Result<Self> {
        match value {
            ConfigValue::Int(v) => u32::try_from(v)
                .map_err(|_| invalid(format!("{name} must be in [0, 2^32), got {v}"))),
            other => Err(invalid(format!("{name} must be an integer, got {other}"))),
        }
    }
    fn to_value(&self) -> ConfigValue {
        ConfigValue::Int(i64::from(*self))
    }
}

impl ConfigField for bool {
    fn from_value(name: &str, value: ConfigValue) -> Result<Self> {
        match value {
            ConfigValue::Bool(v) => Ok(v),
            other => Err(invalid(format!("{name} must be a bool, got {other}"))),
        }
    }
    fn to_value(&self) -> ConfigValue {
        ConfigValue::Bool(*self)
    }
}

impl ConfigField for f64 {
    fn from_value(name: &str, value: ConfigValue) -> Result<Self> {
        match value {
            ConfigValue::Float(v) => Ok(v),
            ConfigValue::Int(v) => Ok(v as f64),
            other => Err(invalid(format!("{name} must be a number, got {other}"))),
        }
    }
    fn to_value(&self) -> ConfigValue {
        ConfigValue::Float(*self)
    }
}

impl ConfigField for Policy {
    fn from_value(name: &str, value: ConfigValue) -> Result<Self> {
        match value {
            ConfigValue::Str(s) => s.parse(),
            other => Err(invalid(format!("{name} must be a string, got {other}"))),
        }
    }
    fn to_value(&self) -> ConfigValue {
        ConfigValue::Str(self.as_str().to_string())
    }
}

/// Declares `SchedulerConfig` once: each field's doc, type and (for options) default. The
/// struct, `new`, the by-name `FIELDS`/`get`/`set` the binding uses, and the binding's getters
/// all come from this list, so adding an option is one line here (plus its check in `validate`).
///
/// `sizes` are what the engine derives (pool sizes, the model's length) and `new` takes;
/// `options` are the user's knobs, with their one default.
macro_rules! scheduler_config {
    (
        sizes { $( $(#[doc = $sdoc:literal])* $size:ident: $sty:ty, )* }
        options { $( $(#[doc = $odoc:literal])* $opt:ident: $oty:ty = $default:expr, )* }
    ) => {
        #[derive(Debug, Clone, PartialEq)]
        #[cfg_attr(
            feature = "python",
            pyo3::pyclass(module = "omniserve._scheduler", frozen, get_all, skip_from_py_object)
        )]
        pub struct SchedulerConfig {
            $( $(#[doc = $sdoc])* pub $size: $sty, )*
            $( $(#[doc = $odoc])* pub $opt: $oty, )*
        }

        impl SchedulerConfig {
            /// Every field name, sizes first.
            pub const FIELDS: &'static [&'static str] =
                &[$( stringify!($size), )* $( stringify!($opt), )*];
            /// The fields with a default, i.e. what `SchedulerConfig::new` does not take.
            pub const OPTIONS: &'static [&'static str] = &[$( stringify!($opt), )*];

            /// The given sizes and every option at its default.
            pub fn new($( $size: $sty ),*) -> Self {
                Self { $( $size, )* $( $opt: $default, )* }
            }

            /// One field by name.
            pub fn get(&self, name: &str) -> Option<ConfigValue> {
                match name {
                    $( stringify!($size) => Some(self.$size.to_value()), )*
                    $( stringify!($opt) => Some(self.$opt.to_value()), )*
                    _ => None,
                }
            }

            /// Sets one field by name; the whole config is checked by `validate`.
            pub fn set(&mut self, name: &str, value: ConfigValue) -> Result<()> {
                match name {
                    $( stringify!($size) => self.$size = ConfigField::from_value(name, value)?, )*
                    $( stringify!($opt) => self.$opt = ConfigField::from_value(name, value)?, )*
                    _ => {
                        return Err(invalid(format!(
                            "unknown scheduler option {name:?}; known: {}",
                            Self::FIELDS.join(", ")
                        )))
                    }
                }
                Ok(())
            }
        }
    };
}

scheduler_config! {
    sizes {
        /// Dense pages including the null page 0.
        num_dense_pages: u32,
        /// Longest sequence (prompt + outputs) the model takes.
        max_model_len: u32,
    }
    options {
        /// Tokens per KV page.
        page_size: u32 = 64,
        /// Rows of the persistent batch: requests running at once.
        max_num_seqs: u32 = 256,
        /// Token budget of one step.
        max_num_batched_tokens: u32 = 8192,
        /// Prefills that may be in progress (split over steps) at once.
        max_partial_prefills: u32 = 4,
        /// Per-request cap on one prefill chunk; 0 = no cap below the step budget.
        long_prefill_token_threshold: u32 = 0,
        /// Fraction of the dense pool that admission keeps free so running requests can grow.
        watermark: f64 = 0.01,
        /// How many later waiting requests may be admitted past a head that does not fit.
        skip_limit: u32 = 8,
        /// Steps after which the head of the queue stops being skipped.
        hol_age_steps: u32 = 64,
        /// Order of the waiting queue and of preemption victims.
        scheduling_policy: Policy = Policy::Fcfs,
        /// Streaming pages including the null page 0; 0 turns the streaming pool off.
        num_stream_pages: u32 = 0,
        /// Sink pages of a streaming table.
        stream_sink_pages: u32 = 0,
        /// Pages of a streaming table's local ring.
        stream_local_pages: u32 = 0,
        /// Logical (selection) pages per physical page.
        logical_pages_per_page: u32 = 4,
        /// Decode steps between two page selections of a request.
        selector_interval: u32 = 4,
        /// Share the full pages of identical prompt prefixes between requests
        /// (`prefix_cache.rs`); needs the streaming pool off.
        enable_prefix_caching: bool = true,
        /// Let `schedule()` plan a step before `update()` has taken the previous one's tokens,
        /// so that the caller prepares step n+1 while its device computes step n. A decode
        /// whose previous token is still being sampled reads it as a placeholder input id
        /// (`step_io::placeholder`).
        async_scheduling: bool = false,
    }
}

impl SchedulerConfig {
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
        at_least("selector_interval", self.selector_interval, 1)?;
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
        if self.enable_prefix_caching && self.stream_enabled() {
            return Err(invalid(
                "enable_prefix_caching needs the streaming pool off: a streaming head's KV lives \
                 in its request's own table, which no later request can share"
                    .to_string(),
            ));
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

    /// Pages of the streaming table of a request that holds at most `max_tokens` tokens: the
    /// sinks and a ring of `stream_local_pages + 1` pages (the local pages and the one being
    /// filled), or only the pages the request can reach when it is too short to wrap the ring.
    pub fn stream_table_len(&self, max_tokens: u32) -> u32 {
        if self.stream_enabled() {
            (self.stream_sink_pages + self.stream_local_pages + 1).min(self.pages_for(max_tokens))
        } else {
            0
        }
    }

    /// Dense pages admission leaves free: ceil(watermark * num_dense_pages).
    pub fn watermark_pages(&self) -> u32 {
        (self.watermark * f64::from(self.num_dense_pages)).ceil() as u32
    }

    /// Steps `schedule()` may have planned that `update()` has not consumed.
    pub fn max_steps_in_flight(&self) -> usize {
        if self.async_scheduling {
            2
        } else {
            1
        }
    }

    /// Tokens in one logical (selection) page.
    pub fn logical_page_tokens(&self) -> u32 {
        self.page_size / self.logical_pages_per_page
    }

    /// Dense pages needed to hold `tokens` tokens of KV.
    pub fn pages_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.page_size)
    }

    /// The most page-table entries one step may point at cached pages: a cached prefix for every
    /// row admitted (each admission computes at least one token).
    pub fn max_cached_columns_per_step(&self) -> usize {
        if !self.enable_prefix_caching {
            return 0;
        }
        let rows = self.max_num_seqs.min(self.max_num_batched_tokens) as usize;
        rows * self.pages_for(self.max_seq_len()).min(self.num_dense_pages) as usize
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
        let breakages: [fn(&mut SchedulerConfig); 11] = [
            |c| c.num_dense_pages = 1,
            |c| c.page_size = 0,
            |c| c.max_model_len = 1,
            |c| c.max_num_batched_tokens = c.max_num_seqs - 1,
            |c| c.logical_pages_per_page = 5,
            |c| c.watermark = 1.0,
            |c| c.watermark = -0.1,
            |c| c.watermark = f64::NAN,
            |c| c.selector_interval = 0,
            |c| c.num_dense_pages = u32::MAX,
            |c| c.num_stream_pages = 8, // with the prefix cache on
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
            enable_prefix_caching: false,
            ..SchedulerConfig::new(101, 100_000)
        };
        assert_eq!(cfg.watermark_pages(), 2); // ceil(1.01)
        assert_eq!(cfg.stream_table_len(10_000), 7);
        assert_eq!(
            cfg.stream_table_len(65),
            2,
            "a short request gets the pages it can reach"
        );
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
    fn fields_by_name() {
        let mut cfg = SchedulerConfig::new(100, 4096);
        assert_eq!(SchedulerConfig::FIELDS.len(), 18);
        assert_eq!(
            &SchedulerConfig::FIELDS[..2],
            ["num_dense_pages", "max_model_len"]
        );
        for name in SchedulerConfig::FIELDS {
            let value = cfg.get(name).unwrap();
            cfg.set(name, value).unwrap();
        }
        assert_eq!(
            cfg,
            SchedulerConfig::new(100, 4096),
            "get then set is the identity"
        );
        cfg.set("watermark", ConfigValue::Int(0)).unwrap();
        cfg.set("scheduling_policy", ConfigValue::Str("priority".into()))
            .unwrap();
        assert_eq!(
            (cfg.watermark, cfg.scheduling_policy),
            (0.0, Policy::Priority)
        );
        for (name, value) in [
            ("max_num_seqs", ConfigValue::Int(-1)),
            ("max_num_seqs", ConfigValue::Int(1 << 32)),
            ("max_num_seqs", ConfigValue::Float(2.0)),
            ("scheduling_policy", ConfigValue::Int(0)),
            ("scheduling_policy", ConfigValue::Str("lifo".into())),
            ("policy", ConfigValue::Str("fcfs".into())),
            ("max_num_seqs", ConfigValue::Bool(true)),
            ("enable_prefix_caching", ConfigValue::Int(1)),
        ] {
            assert!(
                matches!(
                    cfg.set(name, value.clone()),
                    Err(SchedulerError::InvalidConfig(_))
                ),
                "{name} = {value}"
            );
        }
        assert_eq!(cfg.get("policy"), None);
    }

    #[test]
    fn policy_parses() {
        assert_eq!("fcfs".parse::<Policy>().unwrap(), Policy::Fcfs);
        assert_eq!("priority".parse::<Policy>().unwrap(), Policy::Priority);
        assert!("lifo".parse::<Policy>().is_err());
    }
}

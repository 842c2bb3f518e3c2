//! Why a step produced no output: every failure has a kind that clients and metrics see, and a
//! message that names the limit or cause and the fix. The executor prefixes the step and plugin.

use std::sync::{Mutex, PoisonError};

use serde::Serialize;

/// The kind of a step's failure, as clients see it (`error_kind`) and metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The plugin trapped: a panic, an `unreachable`, an out-of-bounds access, a stack overflow.
    Trap,
    /// `timeout_ms` passed.
    Timeout,
    /// The plugin tried to grow its memory beyond `memory_mb`.
    OutOfMemory,
    /// The plugin used up its `fuel`.
    OutOfFuel,
    /// The step's output passed `max_output_bytes`.
    OutputTooLarge,
    /// The step made more than `max_host_calls` host calls.
    HostCallLimit,
    /// The plugin tried to reach something its capabilities do not allow.
    Denied,
    /// The plugin returned `step-error`.
    PluginError,
    /// The plugin returned something the host refuses (not a PNG, the wrong size).
    BadOutput,
    /// Too many steps were waiting for an instance of the plugin (`max_queued`).
    AtCapacity,
    /// The host's memory for runs (`max_run_memory_mb`) is full.
    RunMemoryFull,
    /// The run was cancelled and the plugin stopped.
    Cancelled,
    /// The run was cancelled and the plugin was stopped after the grace period.
    Stopped,
    /// A host function failed (the ledger, typically).
    HostFailure,
}

impl FailureKind {
    /// The kebab-case name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::OutOfMemory => "out-of-memory",
            FailureKind::OutOfFuel => "out-of-fuel",
            FailureKind::OutputTooLarge => "output-too-large",
            FailureKind::HostCallLimit => "host-call-limit",
            FailureKind::Denied => "denied",
            FailureKind::PluginError => "plugin-error",
            FailureKind::BadOutput => "bad-output",
            FailureKind::AtCapacity => "at-capacity",
            FailureKind::RunMemoryFull => "run-memory-full",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Stopped => "stopped",
            FailureKind::HostFailure => "host-failure",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a step produced no output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepFailure {
    /// The plugin returned `step-error`.
    #[error("the plugin returned an error: {0}")]
    Plugin(String),
    /// The plugin returned `step-error::cancelled`.
    #[error("the plugin stopped because the run was cancelled")]
    Cancelled,
    /// The plugin trapped.
    #[error("the plugin trapped: {0}")]
    Trap(String),
    /// A `memory.grow` beyond `memory_mb` was refused and the plugin then failed.
    #[error(
        "the plugin exceeded its memory limit of {limit_mb} MiB (it asked for {asked_mb} MiB); raise memory_mb or make it use less"
    )]
    Memory {
        /// The configured limit.
        limit_mb: u64,
        /// The size it tried to grow to.
        asked_mb: u64,
    },
    /// The plugin used up its fuel.
    #[error("the plugin used up its fuel ({0} units); raise fuel or make it do less work")]
    Fuel(u64),
    /// `timeout_ms` passed.
    #[error("timed out after {0} ms; raise timeout_ms or make the plugin faster")]
    Timeout(u128),
    /// The run was cancelled and the plugin did not return within the grace period.
    #[error("stopped: it did not return within {0} ms of the run being cancelled")]
    Stopped(u128),
    /// The step's streamed chunks and final output passed `max_output_bytes`.
    #[error(
        "its output passed max_output_bytes ({limit} bytes: the final output and every streamed chunk together); \
         raise max_output_bytes or produce less"
    )]
    OutputTooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The step made more than `max_host_calls` calls.
    #[error(
        "it made more than max_host_calls ({limit}) host calls (status.report, output.emit, log.log, \
         credits.charge, HTTP requests); raise max_host_calls or make fewer, larger calls"
    )]
    HostCallLimit {
        /// The configured limit.
        limit: u32,
    },
    /// The plugin tried to reach something it may not.
    #[error("denied: {0}")]
    Denied(String),
    /// The plugin returned something the host refuses.
    #[error("bad output: {0}")]
    BadOutput(String),
    /// Too many steps were waiting for an instance of the plugin.
    #[error("{0}")]
    AtCapacity(String),
    /// The host's memory for runs is full.
    #[error(
        "the host's memory for runs (max_run_memory_mb = {0}) is full of runs still running; \
         retry later, or raise max_run_memory_mb"
    )]
    RunMemoryFull(u64),
    /// A host function failed (the ledger, typically) and ended the call.
    #[error("host failure: {0}")]
    Host(String),
}

impl StepFailure {
    /// The failure's kind.
    pub fn kind(&self) -> FailureKind {
        match self {
            StepFailure::Plugin(_) => FailureKind::PluginError,
            StepFailure::Cancelled => FailureKind::Cancelled,
            StepFailure::Trap(_) => FailureKind::Trap,
            StepFailure::Memory { .. } => FailureKind::OutOfMemory,
            StepFailure::Fuel(_) => FailureKind::OutOfFuel,
            StepFailure::Timeout(_) => FailureKind::Timeout,
            StepFailure::Stopped(_) => FailureKind::Stopped,
            StepFailure::OutputTooLarge { .. } => FailureKind::OutputTooLarge,
            StepFailure::HostCallLimit { .. } => FailureKind::HostCallLimit,
            StepFailure::Denied(_) => FailureKind::Denied,
            StepFailure::BadOutput(_) => FailureKind::BadOutput,
            StepFailure::AtCapacity(_) => FailureKind::AtCapacity,
            StepFailure::RunMemoryFull(_) => FailureKind::RunMemoryFull,
            StepFailure::Host(_) => FailureKind::HostFailure,
        }
    }
}

/// The first thing the host refused a step while its plugin ran (a limit, a denied request).
/// Shared with the callbacks that refuse (the socket check, outbound HTTP); once the plugin
/// fails, it explains why.
#[derive(Debug, Default)]
pub struct Incident(Mutex<Option<StepFailure>>);

impl Incident {
    /// Records `failure` unless an earlier one is recorded.
    pub fn record(&self, failure: StepFailure) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(failure);
    }

    /// The recorded failure.
    pub fn get(&self) -> Option<StepFailure> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

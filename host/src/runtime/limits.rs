//! One step's limits, enforced while its plugin runs: linear memory (`memory_mb`), host calls
//! (`max_host_calls`), output (`max_output_bytes`) and log volume (`max_log_bytes`). Time
//! (`timeout_ms`) and fuel are enforced by the invocation, outbound HTTP by its policy.
//!
//! A limit that ends the step records its failure in the step's [`Incident`] and traps the
//! plugin; the invocation then reports that failure rather than a bare trap. The log limit
//! does not end the step: the lines beyond it are dropped and counted.

use std::sync::Arc;

use tokio::sync::Semaphore;
use wasmtime::ResourceLimiter;

use super::failure::{Incident, StepFailure};
use super::plugin::PluginSettings;
use crate::pipeline::RunContext;

/// Most table elements a plugin may have.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// What one step has used of its plugin's limits.
pub struct StepLimits {
    /// The step's run, where its plugin's settings are.
    context: Arc<RunContext>,
    step_index: usize,
    host_calls: u32,
    output_bytes: u64,
    log_bytes: u64,
    log_dropped: u64,
    /// Linear memory of the instance: memories only grow, so this is also its peak.
    memory_bytes: u64,
    pub(crate) incident: Arc<Incident>,
    /// The step's open outbound HTTP requests, created with the first one.
    pub(crate) http_open: Option<Arc<Semaphore>>,
}

impl StepLimits {
    /// Fresh limits of step `step_index` of the run of `context`.
    pub(crate) fn new(context: Arc<RunContext>, step_index: usize) -> StepLimits {
        StepLimits {
            context,
            step_index,
            host_calls: 0,
            output_bytes: 0,
            log_bytes: 0,
            log_dropped: 0,
            memory_bytes: 0,
            incident: Arc::default(),
            http_open: None,
        }
    }

    /// The step's run context, where its plugin's settings are.
    pub(crate) fn context(&self) -> Arc<RunContext> {
        Arc::clone(&self.context)
    }

    /// The step's index in its pipeline.
    pub(crate) fn step_index(&self) -> usize {
        self.step_index
    }

    /// The settings of the step's plugin.
    pub(crate) fn settings(&self) -> &PluginSettings {
        self.context.plugin(self.step_index)
    }

    /// Records `failure` and returns the error that traps the plugin with it.
    pub fn fail(&self, failure: StepFailure) -> wasmtime::Error {
        let message = failure.to_string();
        self.incident.record(failure);
        wasmtime::Error::msg(message)
    }

    /// Counts one call to a host function that keeps or writes something.
    pub fn host_call(&mut self) -> wasmtime::Result<()> {
        self.host_calls += 1;
        if self.host_calls > self.settings().max_host_calls {
            return Err(self.fail(StepFailure::HostCallLimit { limit: self.settings().max_host_calls }));
        }
        Ok(())
    }

    /// Counts `bytes` of output (a streamed chunk, or the final output).
    pub fn output(&mut self, bytes: usize) -> Result<(), StepFailure> {
        self.output_bytes = self.output_bytes.saturating_add(bytes as u64);
        if self.output_bytes > self.settings().max_output_bytes {
            return Err(StepFailure::OutputTooLarge { limit: self.settings().max_output_bytes });
        }
        Ok(())
    }

    /// Whether a log line of `bytes` may still be written; the rest is counted as dropped.
    pub fn log(&mut self, bytes: usize) -> bool {
        let bytes = bytes as u64;
        if self.log_bytes + bytes > self.settings().max_log_bytes {
            self.log_dropped += bytes;
            return false;
        }
        self.log_bytes += bytes;
        true
    }

    /// Bytes of log dropped beyond `max_log_bytes`.
    pub fn log_dropped(&self) -> u64 {
        self.log_dropped
    }

    /// The most linear memory the instance had, in bytes, over all its memories.
    pub fn memory_peak(&self) -> u64 {
        self.memory_bytes
    }
}

impl ResourceLimiter for StepLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let limit = self.settings().memory_bytes;
        if desired as u64 > limit {
            self.incident.record(StepFailure::Memory { limit_mb: limit >> 20, asked_mb: (desired as u64).div_ceil(1 << 20) });
            return Ok(false);
        }
        self.memory_bytes += desired.saturating_sub(current) as u64;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

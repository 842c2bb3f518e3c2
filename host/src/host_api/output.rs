//! `output`: the step streams text chunks to the run's subscribers.

use crate::runtime::bindings::output::Host;
use crate::runtime::{StepFailure, StepState};

impl Host for StepState {
    fn emit(&mut self, chunk: String) -> wasmtime::Result<()> {
        self.limits.host_call()?;
        if chunk.is_empty() {
            return Ok(());
        }
        if let Err(failure) = self.limits.output(chunk.len()) {
            return Err(self.limits.fail(failure));
        }
        let chunk = self.plugin().redact(chunk);
        self.run().step_text(self.step_index, chunk).map_err(|full| self.limits.fail(StepFailure::RunMemoryFull(full.limit_mb)))
    }
}

//! `status`: the step reports its stage, progress and message; it asks whether the run was
//! cancelled.

use crate::runtime::bindings::status::{Host, Stage as WitStage};
use crate::runtime::{StepFailure, StepState};
use crate::state::runs::Stage;

impl Host for StepState {
    fn report(&mut self, stage: WitStage, progress: f32, message: String) -> wasmtime::Result<()> {
        self.limits.host_call()?;
        let stage = match stage {
            WitStage::Preparing => Stage::Preparing,
            WitStage::Generating => Stage::Generating,
            WitStage::Finishing => Stage::Finishing,
        };
        let progress = if progress.is_nan() { 0.0 } else { progress.clamp(0.0, 1.0) };
        let message = self.plugin().redact(super::truncate(message));
        self.run()
            .step_progress(self.step_index, stage, progress, message)
            .map_err(|full| self.limits.fail(StepFailure::RunMemoryFull(full.limit_mb)))
    }

    fn cancelled(&mut self) -> wasmtime::Result<bool> {
        Ok(self.run().cancel_token().is_cancelled())
    }
}

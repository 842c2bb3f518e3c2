//! `status`: the step reports its stage, progress and message; it asks whether the run was
//! cancelled.

use crate::runtime::StepState;
use crate::runtime::bindings::status::{Host, Stage as WitStage};
use crate::state::runs::Stage;

impl Host for StepState {
    fn report(&mut self, stage: WitStage, progress: f32, message: String) {
        let stage = match stage {
            WitStage::Preparing => Stage::Preparing,
            WitStage::Generating => Stage::Generating,
            WitStage::Finishing => Stage::Finishing,
        };
        let progress = if progress.is_nan() { 0.0 } else { progress.clamp(0.0, 1.0) };
        self.run.step_progress(self.step_index, stage, progress, super::truncate(message));
    }

    fn cancelled(&mut self) -> bool {
        self.run.cancel_token().is_cancelled()
    }
}

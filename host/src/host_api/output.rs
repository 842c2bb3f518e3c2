//! `output`: the step streams text chunks to the run's subscribers.

use crate::runtime::StepState;
use crate::runtime::bindings::output::Host;

impl Host for StepState {
    fn emit(&mut self, chunk: String) {
        if !chunk.is_empty() {
            self.run.step_text(self.step_index, chunk);
        }
    }
}

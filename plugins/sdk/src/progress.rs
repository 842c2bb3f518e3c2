//! Reporting the step's progress: shown to API clients in the run's status and event stream.
//! The host keeps only each step's latest report, so report as often as is useful.

use crate::status::{self, Stage};

/// Validating input, loading, connecting; `message` says what.
pub fn preparing(message: &str) {
    status::report(Stage::Preparing, 0.0, message);
}

/// `done` units of `total` produced (tokens, rows, attempts...).
pub fn generating(done: usize, total: usize, message: &str) {
    let fraction = if total == 0 { 0.0 } else { done as f32 / total as f32 };
    status::report(Stage::Generating, fraction, message);
}

/// Encoding or cleaning up after generation.
pub fn finishing(message: &str) {
    status::report(Stage::Finishing, 1.0, message);
}

/// True once the run was cancelled: stop and return `StepError::Cancelled`.
pub fn cancelled() -> bool {
    status::cancelled()
}

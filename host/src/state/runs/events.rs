//! A run's event log: what happened, in order, for late readers and for resuming streams.
//!
//! Rules:
//! - every event gets a sequence number greater than every earlier one;
//! - a step's log keeps only its latest progress report: a new report removes the step's
//!   previous one, wherever it is, and is appended with a new number. Readers connected at the
//!   time received the earlier report; a reader that resumes after a removed number simply
//!   continues with the next event. So the numbers may have gaps, never repeats;
//! - every event is counted in bytes ([`event_bytes`]), so that what a run keeps is bounded.

use std::sync::Arc;

use serde::Serialize;

use super::{RunStatus, Stage, StepStatus};
use crate::runtime::FailureKind;

/// What happened in a run, in order.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A step's plugin started.
    StepStarted {
        /// Step id.
        #[schema(value_type = String)]
        step: Arc<str>,
        /// The digest of the plugin's component that serves it, `sha256:HEX`.
        #[schema(value_type = String)]
        digest: Arc<str>,
    },
    /// A step reported its stage and progress (only its latest report stays in the log).
    Progress {
        /// Step id.
        #[schema(value_type = String)]
        step: Arc<str>,
        /// Reported stage.
        stage: Stage,
        /// Reported progress, 0 to 1.
        progress: f32,
        /// Reported message.
        message: String,
    },
    /// A text chunk a step streamed.
    Text {
        /// Step id.
        #[schema(value_type = String)]
        step: Arc<str>,
        /// The chunk.
        chunk: String,
    },
    /// A step ended.
    StepEnded {
        /// Step id.
        #[schema(value_type = String)]
        step: Arc<str>,
        /// How it ended.
        status: StepStatus,
        /// Credits it charged.
        charged: u64,
        /// Why it failed.
        error: Option<String>,
        /// The kind of its failure.
        error_kind: Option<FailureKind>,
    },
    /// The run ended; no event follows.
    RunEnded {
        /// Terminal status.
        status: RunStatus,
        /// Credits posted to the account.
        charged: u64,
        /// Why it failed.
        error: Option<String>,
    },
}

/// An event with its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RunEvent {
    /// Position in the run's event log, from 1, increasing (with gaps where progress reports
    /// were coalesced).
    pub seq: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What every event is counted as before its text: its own size and an allocation's overhead.
pub(super) const EVENT_BASE_BYTES: u64 = (size_of::<RunEvent>() + 32) as u64;

/// What an event is counted as in the run's memory: its own size, its text, and an allocation's
/// overhead.
pub fn event_bytes(kind: &EventKind) -> u64 {
    let text = match kind {
        EventKind::Progress { message, .. } => message.len(),
        EventKind::Text { chunk, .. } => chunk.len(),
        EventKind::StepEnded { error, .. } | EventKind::RunEnded { error, .. } => error.as_ref().map_or(0, String::len),
        EventKind::StepStarted { .. } => 0,
    };
    EVENT_BASE_BYTES + text as u64
}

/// The log of one run.
#[derive(Debug, Default)]
pub(super) struct EventLog {
    events: Vec<RunEvent>,
    last_seq: u64,
    /// For each step, the number of its progress report still in the log.
    progress: Vec<Option<u64>>,
}

impl EventLog {
    /// An empty log for `steps` steps.
    pub fn new(steps: usize) -> EventLog {
        // Room for the events every run has: each step's start and end, and the run's end.
        EventLog { events: Vec::with_capacity(2 * steps + 1), last_seq: 0, progress: vec![None; steps] }
    }

    /// Appends an event and returns its number.
    pub fn push(&mut self, kind: EventKind) -> u64 {
        self.last_seq += 1;
        self.events.push(RunEvent { seq: self.last_seq, kind });
        self.last_seq
    }

    /// Appends a progress report of step `index`, removing its previous one; returns the bytes
    /// of the removed report.
    pub fn push_progress(&mut self, index: usize, kind: EventKind) -> u64 {
        let mut freed = 0;
        if let Some(previous) = self.progress[index].take()
            && let Ok(at) = self.events.binary_search_by_key(&previous, |e| e.seq)
        {
            freed = event_bytes(&self.events.remove(at).kind);
        }
        let seq = self.push(kind);
        self.progress[index] = Some(seq);
        freed
    }

    /// The events numbered after `after`.
    pub fn after(&self, after: u64) -> &[RunEvent] {
        &self.events[self.events.partition_point(|e| e.seq <= after)..]
    }

    /// Takes every event out (a forgotten run).
    pub fn take(&mut self) -> Vec<RunEvent> {
        self.progress.iter_mut().for_each(|p| *p = None);
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(step: &str, message: &str) -> EventKind {
        EventKind::Progress { step: step.into(), stage: Stage::Generating, progress: 0.5, message: message.into() }
    }

    fn text(step: &str) -> EventKind {
        EventKind::Text { step: step.into(), chunk: "x".into() }
    }

    #[test]
    fn a_step_keeps_only_its_latest_progress_report() {
        let mut log = EventLog::new(2);
        log.push(EventKind::StepStarted { step: "a".into(), digest: "sha256:00".into() });
        assert_eq!(log.push_progress(0, progress("a", "one")), 0, "nothing to replace");
        log.push(text("a"));
        log.push_progress(1, progress("b", "other step"));
        let freed = log.push_progress(0, progress("a", "two"));
        assert_eq!(freed, event_bytes(&progress("a", "one")));
        let seqs: Vec<u64> = log.after(0).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 3, 4, 5], "the earlier report of `a` (2) is gone, `b`'s stays");
        assert_eq!(log.after(2).first().map(|e| e.seq), Some(3), "resuming after a removed number goes on");
        assert!(log.after(5).is_empty());
    }

    #[test]
    fn a_flood_of_reports_keeps_one_event_per_step() {
        let mut log = EventLog::new(1);
        let freed: u64 = (0..10_000).map(|i| log.push_progress(0, progress("a", &format!("report {i}")))).sum();
        assert_eq!(log.after(0).len(), 1);
        assert!(freed > 10_000 * size_of::<RunEvent>() as u64);
    }
}

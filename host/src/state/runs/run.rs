//! One run: identity, cancellation, and its state behind a short-held mutex.
//!
//! Only the executor and the calling step's host functions write a run; readers get snapshots.
//! What the run keeps (events, outputs) is counted against the store's memory before it is
//! kept: a chunk, a report or an output that finds no room is refused with [`RunMemoryFull`],
//! and the step fails. The events every run has (a step started or ended, the run ended) are
//! always kept: their sizes are counted once, when the run is created, and their texts (an
//! error) when they come.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::changes::ChangeFeed;
use super::events::{EVENT_BASE_BYTES, EventLog, event_bytes};
use super::{EventKind, Retention, RunEvent, RunSnapshot, RunStatus, Stage, StepOutput, StepPlan, StepStatus, StepView};
use crate::per_thread::Share;
use crate::runtime::FailureKind;

/// The store's memory for runs is full of runs still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the host's memory for runs ({limit_mb} MiB) is full")]
pub struct RunMemoryFull {
    /// `max_run_memory_mb`.
    pub limit_mb: u64,
}

/// One run.
#[derive(Debug)]
pub struct Run {
    id: Arc<str>,
    pipeline: Arc<str>,
    account: String,
    held: u64,
    started: Instant,
    cancel: CancellationToken,
    retention: Share<Retention>,
    /// Its steps and the plugin versions serving them: the pipeline's, shared by its runs.
    plan: Arc<[StepPlan]>,
    state: Mutex<RunState>,
    /// Woken at a new event while a reader waits for one (`RunState::watchers`); readers
    /// register before they look.
    changed: Notify,
    /// Woken once, when the run ends: a caller waiting for the end is not woken by every event.
    ended: Notify,
    /// Told of every change, when the store is mirrored.
    feed: Option<Arc<ChangeFeed>>,
    /// Set once its end is in the shared store (`SharedRuns::copy_end`).
    end_copied: tokio::sync::OnceCell<()>,
    /// Set once a copy put its row in the shared store: later copies only update that row, so a
    /// row another replica deleted stays deleted.
    row_copied: AtomicBool,
    /// The thread slot that created it, which drops it once evicted (see [`super::handback`]).
    creator: usize,
}

/// Counts a reader in `RunState::watchers` until dropped, however its wait ends.
struct Watching<'a>(&'a Run);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.lock().watchers -= 1;
    }
}

/// The events and outputs a forgotten run kept, taken out whole.
#[derive(Debug)]
pub(super) struct Kept {
    _events: Vec<RunEvent>,
    _outputs: Vec<Option<Arc<StepOutput>>>,
}

#[derive(Debug)]
struct RunState {
    status: RunStatus,
    steps: Vec<StepProgress>,
    outputs: Vec<Option<Arc<StepOutput>>>,
    events: EventLog,
    posted: Option<u64>,
    error: Option<String>,
    ended: Option<Instant>,
    /// Bytes counted against the store's memory for this run.
    kept: u64,
    /// Its events and outputs were dropped to make room (it reads as gone).
    forgotten: bool,
    /// Readers waiting for the next event: with none, an event wakes nobody.
    watchers: usize,
}

/// What changes of a step as it runs; its names are in the run's plan.
#[derive(Debug, Default)]
struct StepProgress {
    status: StepStatus,
    stage: Option<Stage>,
    progress: f32,
    message: String,
    charged: u64,
    memory_peak_bytes: u64,
    error: Option<String>,
    error_kind: Option<FailureKind>,
}

impl StepProgress {
    /// The step as readers see it.
    fn view(&self, plan: &StepPlan) -> StepView {
        StepView {
            id: Arc::clone(&plan.id),
            plugin: Arc::clone(&plan.plugin),
            digest: Arc::clone(&plan.digest),
            plugin_loaded_at_ms: plan.loaded_at_ms,
            status: self.status,
            stage: self.stage,
            progress: self.progress,
            message: self.message.clone(),
            charged: self.charged,
            memory_peak_bytes: self.memory_peak_bytes,
            error: self.error.clone(),
            error_kind: self.error_kind,
        }
    }
}

impl Run {
    /// A new running run with the steps of `plan` waiting.
    pub(super) fn new(
        id: Arc<str>,
        pipeline: Arc<str>,
        account: String,
        held: u64,
        plan: Arc<[StepPlan]>,
        retention: Share<Retention>,
        feed: Option<Arc<ChangeFeed>>,
    ) -> Run {
        // Each step's start and end, and the run's end.
        let fixed = EVENT_BASE_BYTES * (2 * plan.len() as u64 + 1);
        retention.charge(fixed);
        let state = RunState {
            status: RunStatus::Running,
            steps: plan.iter().map(|_| StepProgress::default()).collect(),
            outputs: vec![None; plan.len()],
            events: EventLog::new(plan.len()),
            posted: None,
            error: None,
            ended: None,
            kept: fixed,
            forgotten: false,
            watchers: 0,
        };
        Run {
            id,
            pipeline,
            account,
            held,
            started: Instant::now(),
            cancel: CancellationToken::new(),
            retention,
            plan,
            state: Mutex::new(state),
            changed: Notify::new(),
            ended: Notify::new(),
            feed,
            end_copied: tokio::sync::OnceCell::new(),
            row_copied: AtomicBool::new(false),
            creator: crate::per_thread::slot(),
        }
    }

    /// Wakes waiting readers and tells the mirror, after a new event in `state`.
    fn changed(&self, state: &RunState) {
        if state.watchers > 0 {
            self.changed.notify_waiters();
        }
        self.tell_feed();
    }

    /// Tells the mirror of a change, if there is one.
    fn tell_feed(&self) {
        if let Some(feed) = &self.feed {
            feed.mark(&self.id);
        }
    }

    /// Set once the run's end is in the shared store.
    pub(crate) fn end_copied(&self) -> &tokio::sync::OnceCell<()> {
        &self.end_copied
    }

    /// Whether a copy already put the run's row in the shared store.
    pub(crate) fn row_copied(&self) -> bool {
        self.row_copied.load(Ordering::Acquire)
    }

    /// Records that the run's row is in the shared store.
    pub(crate) fn set_row_copied(&self) {
        self.row_copied.store(true, Ordering::Release);
    }

    /// Run id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Run id, shared.
    pub(super) fn shared_id(&self) -> &Arc<str> {
        &self.id
    }

    /// The account that started the run.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The id of step `index`.
    pub fn step_id(&self, index: usize) -> &str {
        &self.plan[index].id
    }

    /// The run's cancellation token: cancelled when the client, a failed step or shutdown ends it.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Asks the run to stop; its plugins see it through `status.cancelled()`.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        // Every update below leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves `bytes` of the store's memory for this run.
    fn reserve(&self, bytes: u64) -> Result<(), RunMemoryFull> {
        if self.retention.reserve(bytes) { Ok(()) } else { Err(RunMemoryFull { limit_mb: self.retention.max_bytes() >> 20 }) }
    }

    /// Appends an event whose bytes are already counted, then wakes subscribers.
    fn push(&self, state: &mut RunState, kind: EventKind) {
        state.events.push(kind);
        self.changed(state);
    }

    /// Appends an event every run has (always kept; its size is already counted).
    fn push_fixed(&self, state: &mut RunState, kind: EventKind) {
        let text = event_bytes(&kind) - EVENT_BASE_BYTES;
        if text > 0 {
            self.retention.charge(text);
            state.kept += text;
        }
        self.push(state, kind);
    }

    /// Marks step `index` running.
    pub fn step_started(&self, index: usize) {
        let mut state = self.lock();
        state.steps[index].status = StepStatus::Running;
        let step = Arc::clone(&self.plan[index].id);
        let digest = Arc::clone(&self.plan[index].digest);
        self.push_fixed(&mut state, EventKind::StepStarted { step, digest });
    }

    /// Records a progress report of step `index` (replacing its previous one in the log).
    pub fn step_progress(&self, index: usize, stage: Stage, progress: f32, message: String) -> Result<(), RunMemoryFull> {
        let kind = EventKind::Progress { step: Arc::clone(&self.plan[index].id), stage, progress, message };
        let bytes = event_bytes(&kind);
        self.reserve(bytes)?;
        let freed = {
            let mut state = self.lock();
            let view = &mut state.steps[index];
            view.stage = Some(stage);
            view.progress = progress;
            if let EventKind::Progress { message, .. } = &kind {
                view.message.clone_from(message);
            }
            let freed = state.events.push_progress(index, kind);
            state.kept = state.kept + bytes - freed;
            self.changed(&state);
            freed
        };
        self.retention.release(freed);
        Ok(())
    }

    /// Records a text chunk streamed by step `index`.
    pub fn step_text(&self, index: usize, chunk: String) -> Result<(), RunMemoryFull> {
        let kind = EventKind::Text { step: Arc::clone(&self.plan[index].id), chunk };
        let bytes = event_bytes(&kind);
        self.reserve(bytes)?;
        let mut state = self.lock();
        state.kept += bytes;
        self.push(&mut state, kind);
        Ok(())
    }

    /// Records the most linear memory step `index`'s plugin instance had.
    pub fn step_memory_peak(&self, index: usize, bytes: u64) {
        self.lock().steps[index].memory_peak_bytes = bytes;
    }

    /// Adds a charge of step `index` to its total.
    pub fn step_charged(&self, index: usize, amount: u64) {
        self.lock().steps[index].charged += amount;
        self.tell_feed();
    }

    /// Ends step `index` with its status, output and error. Later calls for the same step are
    /// ignored: a step ends once. An output that finds no room is refused, and the step is not
    /// ended.
    pub fn step_ended(
        &self,
        index: usize,
        status: StepStatus,
        output: Option<StepOutput>,
        error: Option<(FailureKind, String)>,
    ) -> Result<(), RunMemoryFull> {
        let output_bytes = output.as_ref().map_or(0, StepOutput::bytes);
        self.reserve(output_bytes)?;
        let mut state = self.lock();
        let view = &mut state.steps[index];
        if matches!(view.status, StepStatus::Completed | StepStatus::Failed | StepStatus::Cancelled) {
            drop(state);
            self.retention.release(output_bytes);
            return Ok(());
        }
        view.status = status;
        let (error_kind, error) = error.unzip();
        view.error.clone_from(&error);
        view.error_kind = error_kind;
        let charged = view.charged;
        let step = Arc::clone(&self.plan[index].id);
        // A forgotten run has no outputs (a run is forgotten only once it ended).
        if let Some(kept) = state.outputs.get_mut(index) {
            *kept = output.map(Arc::new);
        }
        state.kept += output_bytes;
        self.push_fixed(&mut state, EventKind::StepEnded { step, status, charged, error, error_kind });
        Ok(())
    }

    /// Ends the run with its terminal status and what was posted. Returns false (and changes
    /// nothing) when the run had already ended.
    pub fn finish(&self, status: RunStatus, posted: u64, error: Option<String>) -> bool {
        assert_ne!(status, RunStatus::Running, "finish takes a terminal status");
        let mut state = self.lock();
        if state.status != RunStatus::Running {
            return false;
        }
        state.status = status;
        state.posted = Some(posted);
        state.error.clone_from(&error);
        state.ended = Some(Instant::now());
        self.push_fixed(&mut state, EventKind::RunEnded { status, charged: posted, error });
        drop(state);
        self.ended.notify_waiters();
        true
    }

    /// Takes the run's events and outputs out and returns the bytes they were counted as, and
    /// them; the run then reads as having no events and no outputs.
    pub(super) fn forget(&self) -> (u64, Kept) {
        let mut state = self.lock();
        state.forgotten = true;
        let kept = Kept { _events: state.events.take(), _outputs: std::mem::take(&mut state.outputs) };
        (std::mem::take(&mut state.kept), kept)
    }

    /// The thread slot that created the run.
    pub(super) fn creator(&self) -> usize {
        self.creator
    }

    /// Whether the run's events and outputs were dropped to make room.
    pub fn is_forgotten(&self) -> bool {
        self.lock().forgotten
    }

    /// Bytes of the store's memory this run holds.
    pub fn kept_bytes(&self) -> u64 {
        self.lock().kept
    }

    /// The run's current status.
    pub fn status(&self) -> RunStatus {
        self.lock().status
    }

    /// A copy of the run's state.
    pub fn snapshot(&self) -> RunSnapshot {
        let state = self.lock();
        RunSnapshot {
            id: self.id.to_string(),
            pipeline: self.pipeline.to_string(),
            account: self.account.clone(),
            status: state.status,
            held: self.held,
            charged: state.steps.iter().map(|s| s.charged).sum(),
            posted: state.posted,
            steps: state.steps.iter().zip(&*self.plan).map(|(step, plan)| step.view(plan)).collect(),
            error: state.error.clone(),
            duration_ms: state.ended.map(|end| end.duration_since(self.started).as_millis() as u64),
        }
    }

    /// The output of step `step_id`, once that step completed.
    pub fn output(&self, step_id: &str) -> Option<Arc<StepOutput>> {
        let state = self.lock();
        let index = self.plan.iter().position(|step| *step.id == *step_id)?;
        state.outputs.get(index)?.clone()
    }

    /// Events after sequence number `after` (0 for all), and whether the log is complete.
    pub fn events_after(&self, after: u64) -> (Vec<RunEvent>, bool) {
        Self::events_in(&self.lock(), after)
    }

    fn events_in(state: &RunState, after: u64) -> (Vec<RunEvent>, bool) {
        (state.events.after(after).to_vec(), state.status != RunStatus::Running || state.forgotten)
    }

    /// Waits for the events after `after` and returns them, or an empty list once the log is
    /// complete and nothing follows `after`. Every event still in the log is delivered once, in
    /// order, to a caller that passes the last `seq` it received.
    pub async fn next_events(&self, after: u64) -> Vec<RunEvent> {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            {
                // Counted as a watcher under the same lock as the look: an event pushed after the
                // look sees the watcher and wakes it.
                let mut state = self.lock();
                let (events, complete) = Self::events_in(&state, after);
                if !events.is_empty() || complete {
                    return events;
                }
                state.watchers += 1;
            }
            let _watching = Watching(self);
            changed.await;
        }
    }

    /// Waits until the run has ended and returns its final snapshot.
    pub async fn wait(&self) -> RunSnapshot {
        let ended = self.ended.notified();
        let mut ended = std::pin::pin!(ended);
        ended.as_mut().enable();
        if self.status() == RunStatus::Running {
            ended.await;
        }
        self.snapshot()
    }

    /// The run's outcome once every step ended: its terminal status and the error of its first
    /// failed step.
    pub fn outcome(&self) -> (RunStatus, Option<String>) {
        let state = self.lock();
        match state.steps.iter().find(|s| s.status == StepStatus::Failed) {
            Some(failed) => (RunStatus::Failed, failed.error.clone()),
            None if state.steps.iter().all(|s| s.status == StepStatus::Completed) => (RunStatus::Completed, None),
            None => (RunStatus::Cancelled, None),
        }
    }
}

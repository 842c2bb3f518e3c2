//! The run store: every run's status, steps, outputs and event log, readable by any task.
//!
//! Ownership: the store is a `DashMap` from run id to `Arc<Run>`; each `Run` guards its mutable
//! state with one mutex that is held only to copy or update a few fields, never across an
//! `.await`. Only the executor writes a run (through the methods here); readers get snapshots.
//!
//! Lifecycle rules:
//! - a run enters the store in `running` before any step starts ([`RunStore::insert`]);
//! - it leaves `running` exactly once, through [`Run::finish`], which appends the final event;
//! - events get consecutive sequence numbers from 1, in the order they happened;
//! - a run that ended is kept readable for the retention window ([`RunStore::evict_ended`]) and
//!   while fewer than the store's cap of ended runs ended after it ([`RunStore::ended`] drops the
//!   oldest beyond the cap); a running run is never evicted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Status of a run; every state but `running` is terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Steps are still working.
    Running,
    /// Every step completed; the hold was settled.
    Completed,
    /// A step failed; its siblings were cancelled.
    Failed,
    /// The run was cancelled by its client or by shutdown.
    Cancelled,
}

/// Status of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Waiting for the steps in its `after`, or for a free instance.
    Waiting,
    /// The plugin is running.
    Running,
    /// The plugin returned an output the host accepted.
    Completed,
    /// The plugin failed (error, trap, timeout, bad output).
    Failed,
    /// The run ended before the step could finish.
    Cancelled,
}

/// The phase a plugin reports through `status.report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Validating input, loading, connecting.
    Preparing,
    /// Producing output.
    Generating,
    /// Encoding or cleaning up.
    Finishing,
}

/// `as_str` and `Display`: the snake_case name clients see in JSON (a test checks they agree).
macro_rules! names {
    ($t:ident { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $t {
            /// The name clients see in JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$variant => $name),*
                }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
names!(RunStatus { Running => "running", Completed => "completed", Failed => "failed", Cancelled => "cancelled" });
names!(StepStatus {
    Waiting => "waiting",
    Running => "running",
    Completed => "completed",
    Failed => "failed",
    Cancelled => "cancelled",
});
names!(Stage { Preparing => "preparing", Generating => "generating", Finishing => "finishing" });

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    /// An LLM step's text and token usage.
    Text {
        /// The whole text.
        text: String,
        /// Tokens in the prompt, as the plugin counted them.
        prompt_tokens: u32,
        /// Tokens generated.
        completion_tokens: u32,
    },
    /// An image step's encoded image.
    Image {
        /// The encoded bytes.
        bytes: Vec<u8>,
        /// Their MIME type.
        mime_type: String,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

impl StepOutput {
    /// The text of a text output.
    pub fn text(&self) -> Option<&str> {
        match self {
            StepOutput::Text { text, .. } => Some(text),
            StepOutput::Image { .. } => None,
        }
    }
}

/// A step as readers see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StepView {
    /// Step id from the pipeline.
    pub id: String,
    /// Plugin name.
    pub plugin: String,
    /// Current status.
    pub status: StepStatus,
    /// Last reported stage.
    pub stage: Option<Stage>,
    /// Last reported progress, 0 to 1.
    pub progress: f32,
    /// Last reported message.
    pub message: String,
    /// Credits charged so far.
    pub charged: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// What happened in a run, in order.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A step's plugin started.
    StepStarted {
        /// Step id.
        step: String,
    },
    /// A step reported its stage and progress.
    Progress {
        /// Step id.
        step: String,
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
        step: String,
        /// The chunk.
        chunk: String,
    },
    /// A step ended.
    StepEnded {
        /// Step id.
        step: String,
        /// How it ended.
        status: StepStatus,
        /// Credits it charged.
        charged: u64,
        /// Why it failed.
        error: Option<String>,
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

/// An event with its sequence number (from 1).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RunEvent {
    /// Position in the run's event log, from 1.
    pub seq: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A run as readers see it (without its event log and outputs).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunSnapshot {
    /// Run id.
    pub id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Account that started it.
    pub account: String,
    /// Current status.
    pub status: RunStatus,
    /// Credits reserved for the run.
    pub held: u64,
    /// Credits charged by its steps so far (posted when the run completes).
    pub charged: u64,
    /// Credits posted to the account once the run ended.
    pub posted: Option<u64>,
    /// The steps in pipeline order.
    pub steps: Vec<StepView>,
    /// Why the run failed.
    pub error: Option<String>,
    /// Milliseconds from start to end, once ended.
    pub duration_ms: Option<u64>,
}

/// One run: identity, cancellation, and its state behind a short-held mutex.
#[derive(Debug)]
pub struct Run {
    id: String,
    pipeline: String,
    account: String,
    held: u64,
    started: Instant,
    cancel: CancellationToken,
    state: Mutex<RunState>,
    /// Number of events so far; subscribers wait on it.
    events_len: watch::Sender<u64>,
}

#[derive(Debug)]
struct RunState {
    status: RunStatus,
    steps: Vec<StepView>,
    outputs: Vec<Option<Arc<StepOutput>>>,
    events: Vec<RunEvent>,
    posted: Option<u64>,
    error: Option<String>,
    ended: Option<Instant>,
}

impl Run {
    /// A new running run with its steps waiting, as (step id, plugin) pairs.
    pub fn new(id: String, pipeline: String, account: String, held: u64, steps: &[(String, String)]) -> Run {
        let steps: Vec<StepView> = steps
            .iter()
            .map(|(id, plugin)| StepView {
                id: id.clone(),
                plugin: plugin.clone(),
                status: StepStatus::Waiting,
                stage: None,
                progress: 0.0,
                message: String::new(),
                charged: 0,
                error: None,
            })
            .collect();
        let state = RunState {
            status: RunStatus::Running,
            outputs: vec![None; steps.len()],
            steps,
            events: Vec::new(),
            posted: None,
            error: None,
            ended: None,
        };
        Run {
            id,
            pipeline,
            account,
            held,
            started: Instant::now(),
            cancel: CancellationToken::new(),
            state: Mutex::new(state),
            events_len: watch::Sender::new(0),
        }
    }

    /// Run id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The account that started the run.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// Pipeline name.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
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

    /// Appends an event while the caller holds the lock, then wakes subscribers.
    fn push(&self, state: &mut RunState, kind: EventKind) {
        let seq = state.events.len() as u64 + 1;
        state.events.push(RunEvent { seq, kind });
        self.events_len.send_replace(seq);
    }

    /// Marks step `index` running.
    pub fn step_started(&self, index: usize) {
        let mut state = self.lock();
        state.steps[index].status = StepStatus::Running;
        let step = state.steps[index].id.clone();
        self.push(&mut state, EventKind::StepStarted { step });
    }

    /// Records a progress report of step `index`.
    pub fn step_progress(&self, index: usize, stage: Stage, progress: f32, message: String) {
        let mut state = self.lock();
        let view = &mut state.steps[index];
        view.stage = Some(stage);
        view.progress = progress;
        view.message.clone_from(&message);
        let step = view.id.clone();
        self.push(&mut state, EventKind::Progress { step, stage, progress, message });
    }

    /// Records a text chunk streamed by step `index`.
    pub fn step_text(&self, index: usize, chunk: String) {
        let mut state = self.lock();
        let step = state.steps[index].id.clone();
        self.push(&mut state, EventKind::Text { step, chunk });
    }

    /// Adds a charge of step `index` to its total.
    pub fn step_charged(&self, index: usize, amount: u64) {
        self.lock().steps[index].charged += amount;
    }

    /// Ends step `index` with its status, output and error. Later calls for the same step are
    /// ignored: a step ends once.
    pub fn step_ended(&self, index: usize, status: StepStatus, output: Option<StepOutput>, error: Option<String>) {
        let mut state = self.lock();
        let view = &mut state.steps[index];
        if matches!(view.status, StepStatus::Completed | StepStatus::Failed | StepStatus::Cancelled) {
            return;
        }
        view.status = status;
        view.error.clone_from(&error);
        let (step, charged) = (view.id.clone(), view.charged);
        state.outputs[index] = output.map(Arc::new);
        self.push(&mut state, EventKind::StepEnded { step, status, charged, error });
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
        self.push(&mut state, EventKind::RunEnded { status, charged: posted, error });
        true
    }

    /// The run's current status.
    pub fn status(&self) -> RunStatus {
        self.lock().status
    }

    /// A copy of the run's state.
    pub fn snapshot(&self) -> RunSnapshot {
        let state = self.lock();
        RunSnapshot {
            id: self.id.clone(),
            pipeline: self.pipeline.clone(),
            account: self.account.clone(),
            status: state.status,
            held: self.held,
            charged: state.steps.iter().map(|s| s.charged).sum(),
            posted: state.posted,
            steps: state.steps.clone(),
            error: state.error.clone(),
            duration_ms: state.ended.map(|end| end.duration_since(self.started).as_millis() as u64),
        }
    }

    /// The output of step `step_id`, once that step completed.
    pub fn output(&self, step_id: &str) -> Option<Arc<StepOutput>> {
        let state = self.lock();
        let index = state.steps.iter().position(|s| s.id == step_id)?;
        state.outputs[index].clone()
    }

    /// Events after sequence number `after` (0 for all), and whether the log is complete.
    pub fn events_after(&self, after: u64) -> (Vec<RunEvent>, bool) {
        let state = self.lock();
        let start = (after as usize).min(state.events.len());
        (state.events[start..].to_vec(), state.status != RunStatus::Running)
    }

    /// Waits for the events after `after` and returns them, or an empty list once the log is
    /// complete and nothing follows `after`. Every event is delivered once, in order, to a
    /// caller that passes the last `seq` it received.
    pub async fn next_events(&self, after: u64) -> Vec<RunEvent> {
        let mut len = self.events_len.subscribe();
        loop {
            let (events, complete) = self.events_after(after);
            if !events.is_empty() || complete {
                return events;
            }
            // The sender lives as long as `self`, so `changed` only returns Ok here.
            let _ = len.changed().await;
        }
    }

    /// Waits until the run has ended and returns its final snapshot.
    pub async fn wait(&self) -> RunSnapshot {
        let mut len = self.events_len.subscribe();
        while self.status() == RunStatus::Running {
            let _ = len.changed().await;
        }
        self.snapshot()
    }
}

/// Every run the host knows, by id.
#[derive(Debug)]
pub struct RunStore {
    /// Hashed with foldhash: run ids are the host's own, never a client's choice.
    runs: DashMap<String, Arc<Run>, foldhash::fast::RandomState>,
    /// The ids of the ended runs still held, in the order they ended, with when.
    ended: Mutex<VecDeque<(Instant, String)>>,
    /// Most ended runs held.
    max_ended: usize,
}

impl RunStore {
    /// An empty store that holds at most `max_ended` ended runs (at least one).
    pub fn new(max_ended: usize) -> Self {
        RunStore {
            runs: DashMap::with_hasher(Default::default()),
            ended: Mutex::new(VecDeque::new()),
            max_ended: max_ended.max(1),
        }
    }

    /// Records that `run` ended (once it is finished), evicting the oldest ended runs beyond
    /// the store's cap.
    pub fn ended(&self, run: &Run) {
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        ended.push_back((Instant::now(), run.id().to_string()));
        while ended.len() > self.max_ended {
            if let Some((_, id)) = ended.pop_front() {
                self.runs.remove(&id);
            }
        }
    }

    /// Adds a run; ids are unique, so an existing entry is never replaced.
    pub fn insert(&self, run: Arc<Run>) {
        let previous = self.runs.insert(run.id().to_string(), run);
        debug_assert!(previous.is_none(), "run ids are unique");
    }

    /// The run with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Run>> {
        self.runs.get(id).map(|r| Arc::clone(&r))
    }

    /// Number of runs held.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// True when no run is held.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Cancels every run still running; returns how many.
    pub fn cancel_running(&self) -> usize {
        let running: Vec<Arc<Run>> =
            self.runs.iter().filter(|r| r.status() == RunStatus::Running).map(|r| Arc::clone(&r)).collect();
        running.iter().for_each(|run| run.cancel());
        running.len()
    }

    /// Runs of `account`, newest first, at most `limit`.
    pub fn of_account(&self, account: &str, limit: usize) -> Vec<Arc<Run>> {
        let mut runs: Vec<Arc<Run>> = self.runs.iter().filter(|r| r.account() == account).map(|r| Arc::clone(&r)).collect();
        // Run ids are UUIDv7: they sort by creation time.
        runs.sort_unstable_by(|a, b| b.id().cmp(a.id()));
        runs.truncate(limit);
        runs
    }

    /// Removes the runs that ended more than `retention` ago and returns how many. Runs still
    /// running are kept whatever their age.
    pub fn evict_ended(&self, retention: Duration) -> usize {
        let Some(deadline) = Instant::now().checked_sub(retention) else { return 0 };
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        let mut evicted = 0;
        while let Some((_, id)) = ended.pop_front_if(|(at, _)| *at <= deadline) {
            self.runs.remove(&id);
            evicted += 1;
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(store: &RunStore, id: &str) -> Arc<Run> {
        let run = Arc::new(Run::new(id.into(), "p".into(), "acme".into(), 1, &[("s".into(), "plugin".into())]));
        store.insert(Arc::clone(&run));
        run
    }

    fn end(store: &RunStore, run: &Run) {
        run.finish(RunStatus::Completed, 0, None);
        store.ended(run);
    }

    #[test]
    fn names_are_the_json_names() {
        let json = |value: serde_json::Value| value.as_str().map(str::to_string);
        for status in [RunStatus::Running, RunStatus::Completed, RunStatus::Failed, RunStatus::Cancelled] {
            assert_eq!(json(serde_json::to_value(status).unwrap()).as_deref(), Some(status.as_str()));
        }
        for status in [StepStatus::Waiting, StepStatus::Running, StepStatus::Completed, StepStatus::Failed, StepStatus::Cancelled]
        {
            assert_eq!(json(serde_json::to_value(status).unwrap()).as_deref(), Some(status.as_str()));
        }
        for stage in [Stage::Preparing, Stage::Generating, Stage::Finishing] {
            assert_eq!(json(serde_json::to_value(stage).unwrap()).as_deref(), Some(stage.as_str()));
            assert_eq!(stage.to_string(), stage.as_str());
        }
    }

    #[test]
    fn beyond_its_cap_the_store_drops_the_oldest_ended_runs_and_never_a_running_one() {
        let store = RunStore::new(2);
        let running = run(&store, "running");
        let [first, second, third] = ["first", "second", "third"].map(|id| run(&store, id));
        end(&store, &first);
        end(&store, &second);
        assert_eq!(store.len(), 4, "two ended runs fit");
        end(&store, &third);
        assert!(store.get("first").is_none(), "the oldest ended run went first");
        assert!(["running", "second", "third"].iter().all(|id| store.get(id).is_some()));
        // The retention window only ever takes ended runs, oldest first.
        assert_eq!(store.evict_ended(Duration::from_secs(3600)), 0);
        assert_eq!(store.evict_ended(Duration::ZERO), 2);
        assert_eq!(store.len(), 1);
        assert_eq!(store.get("running").map(|r| r.status()), Some(RunStatus::Running));
        end(&store, &running);
        assert_eq!(store.evict_ended(Duration::ZERO), 1);
        assert!(store.is_empty());
    }
}

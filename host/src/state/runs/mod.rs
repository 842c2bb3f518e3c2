//! The run store: every run's status, steps, outputs and event log, readable by any task.
//!
//! Ownership: the store maps run ids to `Arc<Run>`; each [`Run`] guards its mutable state with
//! one mutex that is held only to copy or update a few fields, never across an `.await`. Only
//! the executor and the run's own steps write a run; readers get snapshots.
//!
//! Lifecycle rules:
//! - a run enters the store in `running` before any step starts ([`RunStore::create`]);
//! - it leaves `running` exactly once, through [`Run::finish`], which appends the final event;
//! - events get increasing sequence numbers in the order they happened ([`events`]);
//! - a run that ended is kept readable for the retention window ([`RunStore::evict_ended`]),
//!   while fewer than `max_kept_runs` ended runs ended after it, and while the memory of all
//!   runs stays under `max_run_memory_mb`: a run that needs room first takes it from the oldest
//!   ended runs. A running run is never evicted.
//!
//! Memory: every event and output a run keeps is counted before it is kept ([`Retention`]);
//! each thread counts a few KiB ahead for its next runs, and those count against the limit too.
//! The whole store holds at most `max_run_memory_mb`, plus the fixed-size events (a step
//! started or ended, a run ended: about 100 bytes each) of the runs in flight. Evicted runs are
//! no longer counted, and are freed by the threads that made them ([`handback`]): at most
//! 16 MiB of them wait for it.

mod changes;
mod events;
mod handback;
mod run;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use dashmap::DashMap;
use serde::Serialize;

pub use changes::ChangeFeed;
pub use events::{EventKind, RunEvent, event_bytes};
pub use run::{Run, RunMemoryFull};

use crate::per_thread::{Shares, Stock};
use crate::runtime::FailureKind;

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Waiting for the steps in its `after`, or for a free instance.
    #[default]
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

/// A step of a new run: its id and the plugin version that will serve it.
#[derive(Debug, Clone)]
pub struct StepPlan {
    /// Step id.
    pub id: Arc<str>,
    /// Plugin name.
    pub plugin: Arc<str>,
    /// The plugin's digest, `sha256:HEX`.
    pub digest: Arc<str>,
    /// When the plugin's component was loaded, in milliseconds since the Unix epoch.
    pub loaded_at_ms: u64,
}

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
    /// What the output is counted as in the run's memory.
    pub fn bytes(&self) -> u64 {
        let payload = match self {
            StepOutput::Text { text, .. } => text.len(),
            StepOutput::Image { bytes, mime_type, .. } => bytes.len() + mime_type.len(),
        };
        (size_of::<StepOutput>() + payload) as u64
    }

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
    #[schema(value_type = String)]
    pub id: Arc<str>,
    /// Plugin name.
    #[schema(value_type = String)]
    pub plugin: Arc<str>,
    /// The SHA-256 of the plugin's component that serves the step, `sha256:HEX`.
    #[schema(value_type = String)]
    pub digest: Arc<str>,
    /// When that component was loaded, in milliseconds since the Unix epoch.
    pub plugin_loaded_at_ms: u64,
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
    /// The most linear memory its plugin instance had, in bytes (once it ran).
    pub memory_peak_bytes: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// The kind of its failure.
    pub error_kind: Option<FailureKind>,
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

/// The map of runs by id. Hashed with foldhash: run ids are the host's own, never a client's.
type RunMap = DashMap<Arc<str>, Arc<Run>, foldhash::fast::RandomState>;

/// Ended runs in the order they ended, with when.
type EndedRuns = VecDeque<(Instant, Arc<Run>)>;

/// What the store keeps of ended runs, and the memory of every run's events and outputs.
#[derive(Debug)]
pub(crate) struct Retention {
    /// The store's map, to drop the runs evicted to make room.
    runs: Weak<RunMap>,
    /// The ended runs still held. (This and `used`, which every run writes, each on a cache
    /// line of its own.)
    ended: CachePadded<Mutex<EndedRuns>>,
    /// Most ended runs held.
    max_ended: usize,
    /// Bytes counted for all runs, and those the threads keep at hand.
    used: CachePadded<AtomicU64>,
    /// Bytes counted in `used` that each thread keeps at hand for its next runs, so that most
    /// reservations and releases write no line another core writes.
    at_hand: Stock,
    /// Bytes a thread counts in `used` at once when its hand is short: at most 1/256 of
    /// `max_bytes`, so that what every hand holds stays a small part of it.
    batch: u64,
    /// Most bytes counted for all runs.
    max_bytes: u64,
    /// Evicted runs waiting to be dropped by the threads that created them.
    handback: handback::Handback,
}

impl Retention {
    /// Deletes an ended run at once: see [`RunStore::delete`].
    fn delete(&self, run: &Arc<Run>) {
        debug_assert!(run.status() != RunStatus::Running, "only ended runs are deleted");
        self.ended.lock().unwrap_or_else(PoisonError::into_inner).retain(|(_, kept)| !Arc::ptr_eq(kept, run));
        if let Some(runs) = self.runs.upgrade() {
            runs.remove(run.id());
        }
        self.release(run.forget().0);
    }

    /// Counts `bytes` more, making room by evicting the oldest ended runs if needed; false when
    /// even that leaves no room.
    pub(crate) fn reserve(&self, bytes: u64) -> bool {
        if bytes == 0 || self.at_hand.take(bytes) {
            return true;
        }
        let batch = bytes.max(self.batch);
        if self.count(batch) {
            self.keep(batch - bytes);
            return true;
        }
        // The room left may be in other threads' hands.
        self.used.fetch_sub(self.at_hand.take_all(), Ordering::AcqRel);
        while !self.count(bytes) {
            if self.evict(|_| true, 1) == 0 {
                return false;
            }
        }
        true
    }

    /// Counts `bytes` more in `used` if that stays within the limit.
    fn count(&self, bytes: u64) -> bool {
        let fits = |used: u64| used.checked_add(bytes).filter(|&total| total <= self.max_bytes);
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, fits).is_ok()
    }

    /// Keeps `bytes`, counted in `used`, at this thread's hand, or uncounts them if its hand
    /// is full.
    fn keep(&self, bytes: u64) {
        if bytes > 0 && !self.at_hand.put(bytes, 2 * self.batch) {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Counts `bytes` more, whatever the limit (fixed-size events).
    pub(crate) fn charge(&self, bytes: u64) {
        if !self.at_hand.take(bytes) {
            self.used.fetch_add(bytes, Ordering::AcqRel);
        }
    }

    /// Counts `bytes` less.
    pub(crate) fn release(&self, bytes: u64) {
        self.keep(bytes);
    }

    /// Bytes counted for all runs.
    fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire).saturating_sub(self.at_hand.total())
    }

    /// Most bytes counted for all runs.
    pub(crate) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Evicts up to `limit` of the oldest ended runs while `evict(when it ended)` says so;
    /// returns how many. An evicted run's events and outputs are gone at once, even for a reader
    /// that still holds the run.
    fn evict(&self, evict: impl Fn(Instant) -> bool, limit: usize) -> usize {
        let mut gone = Vec::new();
        {
            let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
            while gone.len() < limit
                && let Some((_, run)) = ended.pop_front_if(|(at, _)| evict(*at))
            {
                gone.push(run);
            }
        }
        let count = gone.len();
        self.drop_runs(gone);
        count
    }

    /// Drops runs taken out of the retention queue: their entries and their bytes at once, their
    /// memory where they were made ([`handback`]).
    fn drop_runs(&self, gone: impl IntoIterator<Item = Arc<Run>>) {
        let runs = self.runs.upgrade();
        for run in gone {
            let (bytes, kept) = run.forget();
            self.release(bytes);
            if let Some(runs) = &runs {
                runs.remove(run.id());
            }
            self.handback.give(run, kept, bytes);
        }
    }
}

/// Most bytes a thread counts for its runs at once (see [`Retention::batch`]).
const MAX_BATCH: u64 = 16 << 10;

/// Finds and deletes a store's runs by id without keeping the store alive.
#[derive(Debug, Clone)]
pub struct RunLookup(Weak<Retention>);

impl RunLookup {
    /// The run `id`, if the store still has it.
    pub fn get(&self, id: &str) -> Option<Arc<Run>> {
        self.0.upgrade()?.runs.upgrade()?.get(id).map(|entry| Arc::clone(entry.value()))
    }

    /// Deletes an ended run, as [`RunStore::delete`] does.
    pub fn delete(&self, run: &Arc<Run>) {
        if let Some(retention) = self.0.upgrade() {
            retention.delete(run);
        }
    }
}

/// Every run the host knows, by id.
#[derive(Debug)]
pub struct RunStore {
    runs: Arc<RunMap>,
    /// Its runs each hold their thread's share.
    retention: Shares<Retention>,
    /// The feed of changed runs, once the store is mirrored ([`RunStore::follow`]).
    feed: std::sync::OnceLock<Arc<ChangeFeed>>,
}

impl RunStore {
    /// An empty store that holds at most `max_ended` ended runs (at least one), and at most
    /// `max_bytes` of events and outputs.
    pub fn new(max_ended: usize, max_bytes: u64) -> Self {
        let runs = Arc::new(RunMap::with_hasher(Default::default()));
        let retention = Arc::new(Retention {
            runs: Arc::downgrade(&runs),
            ended: CachePadded::new(Mutex::new(VecDeque::new())),
            max_ended: max_ended.max(1),
            used: CachePadded::new(AtomicU64::new(0)),
            at_hand: Stock::default(),
            batch: (max_bytes / 256).min(MAX_BATCH),
            max_bytes,
            handback: handback::Handback::default(),
        });
        RunStore { runs, retention: Shares::new(retention), feed: std::sync::OnceLock::new() }
    }

    /// A handle that finds runs by id for as long as the store lives.
    pub fn lookup(&self) -> RunLookup {
        RunLookup(Arc::downgrade(self.retention.arc()))
    }

    /// The feed of the runs that change from now on (the same feed for every caller).
    pub fn follow(&self) -> Arc<ChangeFeed> {
        Arc::clone(self.feed.get_or_init(Arc::default))
    }

    /// Creates a running run with the steps of `plan` waiting, and adds it. Run ids are unique,
    /// so an existing entry is never replaced.
    pub fn create(&self, id: Arc<str>, pipeline: Arc<str>, account: String, held: u64, plan: Arc<[StepPlan]>) -> Arc<Run> {
        let run = Arc::new(Run::new(id, pipeline, account, held, plan, self.retention.share(), self.feed.get().cloned()));
        let previous = self.runs.insert(Arc::clone(run.shared_id()), Arc::clone(&run));
        debug_assert!(previous.is_none(), "run ids are unique");
        run
    }

    /// Records that `run` ended (once it is finished), evicting the oldest ended runs beyond
    /// the store's cap, and drops the evicted runs this thread made.
    pub fn ended(&self, run: &Arc<Run>) {
        // Each call adds one run to a queue it leaves at most full: at most one goes.
        let gone = {
            let mut ended = self.retention.ended.lock().unwrap_or_else(PoisonError::into_inner);
            ended.push_back((Instant::now(), Arc::clone(run)));
            let over = ended.len() > self.retention.max_ended;
            over.then(|| ended.pop_front()).flatten().map(|(_, oldest)| oldest)
        };
        self.retention.drop_runs(gone);
        self.retention.handback.collect();
    }

    /// Deletes an ended run at once, whatever the retention: it leaves the store, and its events
    /// and outputs are dropped (a reader still holding it sees them gone).
    pub fn delete(&self, run: &Arc<Run>) {
        self.retention.delete(run);
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

    /// Bytes of events and outputs the store holds.
    pub fn memory_used(&self) -> u64 {
        self.retention.used()
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
        self.retention.evict(|at| at <= deadline, usize::MAX)
    }
}

impl Drop for RunStore {
    /// Lets the ended runs go: each holds a share of the retention that holds it, so a store
    /// dropped with runs kept would otherwise never free them.
    fn drop(&mut self) {
        std::mem::take(&mut *self.retention.ended.lock().unwrap_or_else(PoisonError::into_inner));
        self.retention.handback.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(store: &RunStore, id: &str) -> Arc<Run> {
        let step = StepPlan { id: "s".into(), plugin: "plugin".into(), digest: "sha256:00".into(), loaded_at_ms: 0 };
        store.create(id.into(), "p".into(), "acme".into(), 1, Arc::new([step]))
    }

    fn end(store: &RunStore, run: &Arc<Run>) {
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
        let store = RunStore::new(2, u64::MAX);
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

    #[test]
    fn a_run_that_needs_room_takes_it_from_the_oldest_ended_runs_and_never_from_running_ones() {
        let chunk = "x".repeat(1000);
        let one = event_bytes(&EventKind::Text { step: "s".into(), chunk: chunk.clone() });
        let store = RunStore::new(100, 10 * one);
        let [old, newer] = ["old", "newer"].map(|id| run(&store, id));
        for r in [&old, &newer] {
            for _ in 0..3 {
                r.step_text(0, chunk.clone()).unwrap();
            }
            end(&store, r);
        }
        let running = run(&store, "running");
        for _ in 0..4 {
            running.step_text(0, chunk.clone()).unwrap();
        }
        assert!(store.get("old").is_none(), "the oldest ended run made room");
        assert!(old.is_forgotten() && old.events_after(0).0.is_empty(), "its events were dropped at once");
        assert!(store.get("newer").is_some());
        // Once every ended run is gone, a running run finds no room: it is refused, never evicted.
        let full = loop {
            match running.step_text(0, chunk.clone()) {
                Ok(()) => continue,
                Err(full) => break full,
            }
        };
        assert_eq!(full, RunMemoryFull { limit_mb: 0 });
        assert!(store.get("newer").is_none() && store.get("running").is_some());
        assert!(store.memory_used() <= 10 * one, "the limit holds");
        end(&store, &running);
        assert_eq!(store.evict_ended(Duration::ZERO), 1);
        assert_eq!(store.memory_used(), 0, "every byte counted was given back");
    }

    #[test]
    fn a_deleted_run_is_gone_with_its_memory_whenever_it_ended() {
        let store = RunStore::new(100, u64::MAX);
        let [early, late] = ["early", "late"].map(|id| run(&store, id));
        early.step_text(0, "words".into()).unwrap();
        end(&store, &early);
        store.delete(&early);
        // Deleted between its end and the executor's `ended` call: that call changes nothing.
        late.finish(RunStatus::Cancelled, 0, None);
        store.delete(&late);
        store.ended(&late);
        assert!(store.is_empty() && early.events_after(0).0.is_empty());
        assert_eq!(store.memory_used(), 0);
        assert_eq!(store.evict_ended(Duration::ZERO), 1, "the late run's place in the retention queue");
        assert_eq!(store.memory_used(), 0);
    }

    /// Readers on other threads wait for each event, which one thread writes once every reader
    /// has seen the one before: every event is written while the readers wait for it, and
    /// wakes each of them.
    #[test]
    fn readers_waiting_on_other_threads_are_woken_by_every_event() {
        const EVENTS: u64 = 500;
        let store = RunStore::new(100, u64::MAX);
        let run = run(&store, "read");
        let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
        let seen: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let readers: Vec<_> = (0..4)
            .map(|reader| {
                let (run, seen) = (Arc::clone(&run), Arc::clone(&seen));
                tokio.spawn(async move {
                    loop {
                        let events = run.next_events(seen[reader].load(Ordering::SeqCst)).await;
                        match events.last() {
                            Some(last) => seen[reader].store(last.seq, Ordering::SeqCst),
                            None => return,
                        }
                    }
                })
            })
            .collect();
        for written in 1..=EVENTS {
            run.step_text(0, "w".into()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while seen.iter().any(|reader| reader.load(Ordering::SeqCst) < written) {
                assert!(Instant::now() < deadline, "a reader slept through event {written}");
                std::thread::yield_now();
            }
        }
        run.finish(RunStatus::Completed, 0, None);
        tokio.block_on(async {
            for reader in readers {
                tokio::time::timeout(Duration::from_secs(30), reader).await.expect("a reader missed the run's end").unwrap();
            }
        });
        assert!(seen.iter().all(|reader| reader.load(Ordering::SeqCst) == EVENTS + 1), "every text and the run's end");
    }

    /// Runs on several threads write and end at once in a small store: the limit holds, and
    /// once every run is gone every byte is given back, none lost in a thread's hand.
    #[test]
    fn runs_written_on_several_threads_stay_within_the_limit_and_give_every_byte_back() {
        let chunk = "x".repeat(100);
        let one = event_bytes(&EventKind::Text { step: "s".into(), chunk: chunk.clone() });
        let limit = 300 * one;
        let store = RunStore::new(8, limit);
        // Fixed-size events are counted whatever the limit: three for each run in flight.
        let most = limit + 4 * 3 * events::EVENT_BASE_BYTES;
        let refused = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (store, chunk, refused) = (&store, &chunk, &refused);
                scope.spawn(move || {
                    for n in 0..300 {
                        let run = run(store, &format!("{thread}-{n}"));
                        for _ in 0..n % 9 {
                            if run.step_text(0, chunk.clone()).is_err() {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            assert!(store.retention.used.load(Ordering::Acquire) <= most, "over the limit");
                        }
                        end(store, &run);
                    }
                });
            }
        });
        assert_eq!(refused.load(Ordering::Relaxed), 0, "ended runs always made room");
        store.evict_ended(Duration::ZERO);
        assert!(store.is_empty());
        assert_eq!(store.memory_used(), 0, "every byte came back");
        assert_eq!(store.retention.used.load(Ordering::Acquire), store.retention.at_hand.total(), "what is left is at hand");
    }
}

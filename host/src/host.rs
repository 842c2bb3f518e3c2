//! The host: the loaded registry, the run store and the ledger, and the entry point that starts
//! runs.
//!
//! Admission rules for [`Host::start_run`], in order; a refusal starts nothing and charges
//! nothing:
//! 1. the pipeline exists in the registry;
//! 2. the run's parameters pass the same checks as the pipeline's;
//! 3. the ledger reserves a hold of the pipeline's summed `max_cost` from the account, for
//!    `[ledger] hold_ttl_secs`;
//! 4. the run enters the run store in `running`, and only then do its steps start.
//!
//! A caller that goes away during step 3 leaves nothing behind: the reservation is released in
//! the background and the run is never created.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::config::{AccountConfig, Config, FailurePolicy};
use crate::metrics::Metrics;
use crate::per_thread::Shares;
use crate::pipeline::request::StepParams;
use crate::pipeline::{self, LoadError, Registry};
use crate::runtime::Runtime;
use crate::state::ledger::{self, Ledger, LedgerError};
use crate::state::runs::{Run, RunStore};
use crate::state::shared::SharedRuns;

/// How often, at most, the ledger is swept for abandoned and expired holds.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// What a client asks a pipeline for.
#[derive(Debug, Clone, Default)]
pub struct RunInput {
    /// The prompt, available to step templates as `{prompt}`.
    pub prompt: String,
    /// Parameters that override the pipeline's for every step (seed, max_tokens, width...).
    pub params: BTreeMap<String, String>,
}

/// Why a run was not started. Nothing was reserved or charged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// No such pipeline.
    #[error("no pipeline named '{name}'; available: {available}")]
    UnknownPipeline {
        /// The name asked for.
        name: String,
        /// The pipelines there are, comma-separated.
        available: String,
    },
    /// A parameter is out of range for a step.
    #[error("step '{step}': {message}")]
    InvalidParams {
        /// The step whose parameters failed.
        step: String,
        /// What is wrong.
        message: String,
    },
    /// The account cannot cover the run's hold.
    #[error("not enough credits: this pipeline holds {needed}, the account has {available} available")]
    InsufficientCredits {
        /// The pipeline's hold.
        needed: u64,
        /// What the account could reserve.
        available: u64,
    },
    /// No such account.
    #[error("no account '{0}'")]
    UnknownAccount(String),
    /// The host is running as many runs as it may.
    #[error("the server is running its maximum of {limit} runs")]
    AtCapacity {
        /// The configured `max_runs_in_flight`.
        limit: usize,
    },
    /// The ledger failed.
    #[error("the ledger failed: {0}")]
    Ledger(String),
}

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The configuration or a plugin is wrong.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The wasm engine could not be created.
    #[error("creating the wasm engine: {0}")]
    Engine(String),
    /// Resolving the holds that ended processes left failed.
    #[error("recovering the ledger's abandoned holds: {0}")]
    Recover(LedgerError),
    /// Granting the configured accounts their credits failed.
    #[error("granting account '{account}' its credits: {source}")]
    Grant {
        /// The account.
        account: String,
        /// The ledger's error.
        source: LedgerError,
    },
}

/// The running host. Aligned to a cache line pair, so that the reference count each run takes
/// shares no line with the fields every run reads.
#[repr(align(128))]
pub struct Host {
    runtime: Arc<Runtime>,
    /// The registry in service; a reload replaces it in one store.
    registry: ArcSwap<Registry>,
    /// The configuration in service; its lock makes reloads take turns.
    pub(crate) config: tokio::sync::Mutex<Config>,
    runs: RunStore,
    /// The runs of every replica, with a ledger replicas share.
    shared: Option<Arc<SharedRuns>>,
    ledger: Arc<dyn Ledger>,
    policy: FailurePolicy,
    hold_ttl: Duration,
    cancel_grace: Duration,
    metrics: Metrics,
    /// On a cache line of its own: every run writes it, and the fields beside it are read.
    in_flight: CachePadded<InFlight>,
}

impl Host {
    /// Creates a runtime for `config`, then the host as [`Host::with_runtime`] does.
    pub async fn new(config: &Config, ledger: Arc<dyn Ledger>) -> Result<Arc<Host>, HostError> {
        let runtime = Runtime::new(&config.runtime).map_err(|e| HostError::Engine(e.to_string()))?;
        Host::with_runtime(Arc::new(runtime), config, ledger).await
    }

    /// Loads `config`'s plugins into `runtime`, resolves the holds that ended processes left in
    /// the ledger, grants each configured account its initial credits (once: the grant id is
    /// `config:ACCOUNT`), and starts the periodic sweep of abandoned and expired holds.
    pub async fn with_runtime(runtime: Arc<Runtime>, config: &Config, ledger: Arc<dyn Ledger>) -> Result<Arc<Host>, HostError> {
        let registry = Registry::load(&runtime, config, None)?;
        let policy = config.credits.on_failure;
        let recovery = ledger.recover(policy).await.map_err(HostError::Recover)?;
        if recovery.holds > 0 {
            tracing::warn!(
                holds = recovery.holds,
                posted = recovery.posted,
                released = recovery.released,
                "recovered the holds of runs that ended with their process"
            );
        }
        grant_initial_credits(&ledger, &config.accounts).await?;
        let hold_ttl = config.ledger.hold_ttl();
        let runs = RunStore::new(config.server.max_kept_runs, config.server.max_run_memory_mb << 20);
        let replica = ledger.replica();
        // A replica sweeps every third of a lease, so a dead one's holds and runs are resolved
        // within a lease of its death.
        let sweep_every = match &replica {
            Some(_) => ledger::postgres_lease_renewal(&config.ledger),
            None => hold_ttl.min(SWEEP_EVERY),
        };
        ledger::spawn_sweeper(&ledger, policy, sweep_every);
        let shared = replica.map(|replica| SharedRuns::start(replica, runs.follow(), runs.lookup(), policy, sweep_every));
        Ok(Arc::new(Host {
            runtime,
            registry: ArcSwap::from_pointee(registry),
            config: tokio::sync::Mutex::new(config.clone()),
            runs,
            shared,
            ledger,
            policy,
            hold_ttl,
            cancel_grace: Duration::from_millis(config.runtime.cancel_grace_ms),
            metrics: Metrics::default(),
            in_flight: CachePadded::new(InFlight {
                count: AtomicUsize::new(0),
                limit: config.server.max_runs_in_flight,
                idle: Notify::new(),
            }),
        }))
    }

    /// Starts a run of `pipeline` for `account` (see the admission rules above) and returns it
    /// once each of its steps has ended or has to wait (a plugin that computes yields within an
    /// epoch tick); what waits goes on in the background.
    pub async fn start_run(self: &Arc<Self>, account: &str, pipeline: &str, input: RunInput) -> Result<Arc<Run>, StartError> {
        let registry = self.registry.load();
        let Some(pipeline) = registry.pipelines.get(pipeline).map(Shares::share) else {
            let available = registry.pipelines.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
            return Err(StartError::UnknownPipeline { name: pipeline.to_string(), available });
        };
        let mut params = Vec::with_capacity(pipeline.steps.len());
        for step in &pipeline.steps {
            if input.params.is_empty() {
                params.push(step.checked_params.clone());
                continue;
            }
            let mut merged = step.params.clone();
            merged.extend(input.params.iter().map(|(k, v)| (k.clone(), v.clone())));
            let checked = StepParams::from_strings(step.plugin.world(), &merged)
                .map_err(|message| StartError::InvalidParams { step: step.id.to_string(), message })?;
            params.push(checked);
        }
        let hold = pipeline.hold().expect("Config::load checks that a pipeline's hold fits in u64");
        if !self.in_flight.try_enter() {
            return Err(StartError::AtCapacity { limit: self.in_flight.limit });
        }
        // If the caller goes away (a client that disconnects) while the hold is being
        // reserved, the guard releases it and frees the slot: no hold without a run.
        let id = new_run_id();
        let mut admission = Admission { host: self, hold_id: Some(Arc::clone(&id)) };
        if let Err(e) = self.ledger.reserve(&id, account, hold, self.hold_ttl).await {
            admission.hold_id = None;
            self.in_flight.leave();
            return Err(match e {
                LedgerError::Insufficient { needed, available } => StartError::InsufficientCredits { needed, available },
                LedgerError::UnknownAccount(account) => StartError::UnknownAccount(account),
                other => StartError::Ledger(other.to_string()),
            });
        }
        admission.hold_id = None;
        self.metrics.run_admitted(hold);
        let plan = pipeline.plan.get();
        let run = self.runs.create(id, Arc::clone(&plan.name), account.to_string(), hold, Arc::clone(&plan.steps));
        let span = tracing::info_span!("run", run = %run.id(), pipeline = %pipeline.name, account = %account);
        // The run starts on the caller's task and continues on its own once it has to wait, so
        // a run whose steps all end within their first poll costs no task and no handoff.
        let execution = pipeline::execute(Arc::clone(self), Arc::clone(&run), pipeline, input.prompt, params).instrument(span);
        // Once on its own task, the run goes on without the caller (its handle is not needed).
        let _ = pipeline::start_here(execution).await;
        if let Some(shared) = &self.shared
            && let Err(e) = shared.copy_now(&run).await
        {
            // The mirror copies it once the database answers again.
            tracing::warn!(run = %run.id(), "{e}");
        }
        Ok(run)
    }

    /// Called by the executor once a run has ended.
    pub(crate) fn run_ended(&self) {
        self.in_flight.leave();
    }

    /// Runs admitted and not yet ended.
    pub fn runs_in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::Acquire)
    }

    /// Lets the runs in flight finish for up to `grace`, then cancels the rest and waits until
    /// every run has ended (and so every hold is settled or released).
    pub async fn drain(&self, grace: Duration) {
        if tokio::time::timeout(grace, self.in_flight.until_idle()).await.is_err() {
            let cancelled = self.runs.cancel_running();
            tracing::warn!(cancelled, "shutdown grace period over: cancelled the runs still in flight");
            self.in_flight.until_idle().await;
        }
    }

    /// The run store.
    pub fn runs(&self) -> &RunStore {
        &self.runs
    }

    /// The runs of every replica, with a ledger replicas share.
    pub fn shared(&self) -> Option<&Arc<SharedRuns>> {
        self.shared.as_ref()
    }

    /// Whether this host may admit runs: false once a replica lost its lease.
    pub fn ready(&self) -> bool {
        self.shared.as_ref().is_none_or(|shared| shared.lease_held())
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The plugins and pipelines in service.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.load_full()
    }

    /// Puts `registry` in service: runs admitted from now on use it.
    pub(crate) fn swap_registry(&self, registry: Registry) {
        self.registry.store(Arc::new(registry));
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The wasm runtime: engine, linker, compile cache, instance pool.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub(crate) fn runtime_arc(&self) -> Arc<Runtime> {
        Arc::clone(&self.runtime)
    }

    pub(crate) fn policy(&self) -> FailurePolicy {
        self.policy
    }

    pub(crate) fn cancel_grace(&self) -> Duration {
        self.cancel_grace
    }
}

/// Runs admitted and not yet ended, at most `max_runs_in_flight`.
struct InFlight {
    count: AtomicUsize,
    limit: usize,
    /// Woken when the count falls to zero.
    idle: Notify,
}

impl InFlight {
    /// Counts one more run, unless the limit is reached.
    fn try_enter(&self) -> bool {
        self.count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.limit).then_some(n + 1)).is_ok()
    }

    /// Counts one run less.
    fn leave(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until no run is in flight.
    async fn until_idle(&self) {
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// An admission between its slot and its run: dropped while it still names a hold (the caller
/// went away mid-reservation), it releases that hold, in the background, and frees the slot.
struct Admission<'a> {
    host: &'a Arc<Host>,
    hold_id: Option<Arc<str>>,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let Some(hold_id) = self.hold_id.take() else { return };
        let host = Arc::clone(self.host);
        // The ledger handles a release after the reservation it may still be processing; a
        // hold that was never reserved is simply not found.
        tokio::spawn(async move {
            match host.ledger.release(&hold_id).await {
                Ok(_) | Err(LedgerError::UnknownHold(_)) => {}
                Err(e) => tracing::warn!(hold = %hold_id, "releasing the hold of an abandoned admission failed: {e}"),
            }
            host.in_flight.leave();
        });
    }
}

/// Grants each account of `accounts` its initial credits, once: the grant id is
/// `config:ACCOUNT`, so a repeat (a restart, a reload) grants nothing more.
pub(crate) async fn grant_initial_credits(ledger: &Arc<dyn Ledger>, accounts: &[AccountConfig]) -> Result<(), HostError> {
    for account in accounts {
        match ledger.grant(&format!("config:{}", account.id), &account.id, account.credits).await {
            Ok(_) | Err(LedgerError::InvalidAmount(0)) => {}
            Err(LedgerError::Conflict(_)) => tracing::warn!(
                account = %account.id,
                "the account's initial credits changed in the config since they were granted; the change is ignored"
            ),
            Err(source) => return Err(HostError::Grant { account: account.id.clone(), source }),
        }
    }
    Ok(())
}

/// A new, unique, time-ordered run id: a UUIDv7 from the calling thread's context, so that
/// threads do not take turns at one shared counter. Ids from one thread increase; ids from
/// several threads sort by when they were made, to within 1/4096 ms (the counter's top bits
/// carry the time below the millisecond), so the ledger's hold index appends them in order.
fn new_run_id() -> Arc<str> {
    use uuid::timestamp::context::{ContextV7, ThreadLocalContext};
    thread_local! {
        static CONTEXT: ContextV7 = ContextV7::new().with_additional_precision();
    }
    let mut id = *b"run_00000000000000000000000000000000";
    let uuid = uuid::Uuid::new_v7(uuid::Timestamp::now(ThreadLocalContext::new(&CONTEXT)));
    uuid.simple().encode_lower(&mut id["run_".len()..]);
    std::str::from_utf8(&id).expect("a UUID's hex digits are ASCII").into()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn run_ids_are_unique_across_threads_and_increase_on_each() {
        let per_thread: Vec<Vec<Arc<str>>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4).map(|_| scope.spawn(|| (0..10_000).map(|_| new_run_id()).collect())).collect();
            threads.into_iter().map(|thread| thread.join().unwrap()).collect()
        });
        for ids in &per_thread {
            assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "a thread's ids increase");
            assert!(ids.iter().all(|id| id.len() == 36 && id.starts_with("run_")));
        }
        let unique: HashSet<&Arc<str>> = per_thread.iter().flatten().collect();
        assert_eq!(unique.len(), 40_000);
    }

    #[test]
    fn run_ids_made_one_after_another_on_different_threads_sort_in_that_order() {
        let mut previous = new_run_id();
        for _ in 0..500 {
            // More than the 1/4096 ms the ids resolve.
            let next_tick = std::time::Instant::now() + Duration::from_micros(1);
            while std::time::Instant::now() < next_tick {}
            let id = std::thread::spawn(new_run_id).join().unwrap();
            assert!(previous < id, "{previous} was made before {id}");
            previous = id;
        }
    }
}

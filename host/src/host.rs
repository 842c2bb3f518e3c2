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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use crate::config::{Config, FailurePolicy};
use crate::metrics::Metrics;
use crate::pipeline::request::StepParams;
use crate::pipeline::{self, LoadError, Registry};
use crate::runtime::Runtime;
use crate::state::ledger::{self, Ledger, LedgerError};
use crate::state::runs::{Run, RunStore};

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

/// The running host.
pub struct Host {
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    runs: RunStore,
    ledger: Arc<dyn Ledger>,
    policy: FailurePolicy,
    hold_ttl: Duration,
    cancel_grace: Duration,
    metrics: Metrics,
    max_runs_in_flight: usize,
    /// Runs admitted and not yet ended.
    in_flight: watch::Sender<usize>,
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
        let registry = Registry::load(&runtime, config)?;
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
        for account in &config.accounts {
            match ledger.grant(&format!("config:{}", account.id), &account.id, account.credits).await {
                Ok(_) | Err(LedgerError::InvalidAmount(0)) => {}
                Err(LedgerError::Conflict(_)) => tracing::warn!(
                    account = %account.id,
                    "the account's initial credits changed in the config since they were granted; the change is ignored"
                ),
                Err(source) => return Err(HostError::Grant { account: account.id.clone(), source }),
            }
        }
        let hold_ttl = config.ledger.hold_ttl();
        ledger::spawn_sweeper(&ledger, policy, hold_ttl.min(SWEEP_EVERY));
        Ok(Arc::new(Host {
            runtime,
            registry: Arc::new(registry),
            runs: RunStore::new(config.server.max_kept_runs, config.server.max_run_memory_mb << 20),
            ledger,
            policy,
            hold_ttl,
            cancel_grace: Duration::from_millis(config.runtime.cancel_grace_ms),
            metrics: Metrics::default(),
            max_runs_in_flight: config.server.max_runs_in_flight,
            in_flight: watch::Sender::new(0),
        }))
    }

    /// Starts a run of `pipeline` for `account` (see the admission rules above) and returns it
    /// at once; its steps run in the background.
    pub async fn start_run(self: &Arc<Self>, account: &str, pipeline: &str, input: RunInput) -> Result<Arc<Run>, StartError> {
        let Some(pipeline) = self.registry.pipelines.get(pipeline).cloned() else {
            let available = self.registry.pipelines.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
            return Err(StartError::UnknownPipeline { name: pipeline.to_string(), available });
        };
        let mut params = Vec::with_capacity(pipeline.steps.len());
        for step in &pipeline.steps {
            let mut merged = step.params.clone();
            merged.extend(input.params.iter().map(|(k, v)| (k.clone(), v.clone())));
            let checked = StepParams::from_strings(step.plugin.world(), &merged)
                .map_err(|message| StartError::InvalidParams { step: step.id.to_string(), message })?;
            params.push(checked);
        }
        let hold = pipeline.hold().expect("Config::load checks that a pipeline's hold fits in u64");
        let limit = self.max_runs_in_flight;
        if !self.in_flight.send_if_modified(|n| {
            *n < limit && {
                *n += 1;
                true
            }
        }) {
            return Err(StartError::AtCapacity { limit });
        }
        // From here on the admission must finish even if the caller goes away (a client that
        // disconnects): it runs on its own task, which goes on to execute the run, and hands the
        // run (or the refusal) back through a channel.
        let (admitted, admission) = oneshot::channel();
        let (host, account) = (Arc::clone(self), account.to_string());
        tokio::spawn(async move {
            let id = new_run_id();
            if let Err(e) = host.ledger.reserve(&id, &account, hold, host.hold_ttl).await {
                host.in_flight.send_modify(|n| *n -= 1);
                let _ = admitted.send(Err(match e {
                    LedgerError::Insufficient { needed, available } => StartError::InsufficientCredits { needed, available },
                    LedgerError::UnknownAccount(account) => StartError::UnknownAccount(account),
                    other => StartError::Ledger(other.to_string()),
                }));
                return;
            }
            host.metrics.run_admitted(hold);
            let steps: Vec<(String, String)> =
                pipeline.steps.iter().map(|s| (s.id.to_string(), s.plugin.name().to_string())).collect();
            let run = host.runs.create(id, pipeline.name.clone(), account.clone(), hold, &steps);
            let _ = admitted.send(Ok(Arc::clone(&run)));
            let span = tracing::info_span!("run", run = %run.id(), pipeline = %pipeline.name, account = %account);
            pipeline::execute(host, run, pipeline, input.prompt, params).instrument(span).await;
        });
        admission.await.unwrap_or_else(|_| Err(StartError::Ledger("the admission task failed".into())))
    }

    /// Called by the executor once a run has ended.
    pub(crate) fn run_ended(&self) {
        self.in_flight.send_modify(|n| *n -= 1);
    }

    /// Runs admitted and not yet ended.
    pub fn runs_in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    /// Lets the runs in flight finish for up to `grace`, then cancels the rest and waits until
    /// every run has ended (and so every hold is settled or released).
    pub async fn drain(&self, grace: Duration) {
        let mut in_flight = self.in_flight.subscribe();
        if tokio::time::timeout(grace, in_flight.wait_for(|n| *n == 0)).await.is_err() {
            let cancelled = self.runs.cancel_running();
            tracing::warn!(cancelled, "shutdown grace period over: cancelled the runs still in flight");
            let _ = in_flight.wait_for(|n| *n == 0).await;
        }
    }

    /// The run store.
    pub fn runs(&self) -> &RunStore {
        &self.runs
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The loaded plugins and pipelines.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub(crate) fn policy(&self) -> FailurePolicy {
        self.policy
    }

    pub(crate) fn cancel_grace(&self) -> Duration {
        self.cancel_grace
    }
}

/// A new, unique, time-ordered run id.
fn new_run_id() -> String {
    format!("run_{}", uuid::Uuid::now_v7().simple())
}

//! Prometheus metrics of the host: runs, steps, credits and plugin failures. The executor and
//! the admission path record into them; `GET /metrics` renders them in the text format.

mod sharded;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::runtime::{CacheStats, FailureKind};
use crate::state::runs::{RunStatus, StepStatus};

/// A plugin or pipeline name as a label value, shared with what it names: recording a metric
/// copies no string.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Name(Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    pipeline: Name,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    plugin: Name,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    plugin: Name,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: Name,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The terminal statuses of a run, and the end statuses of a step, in the order of their
/// metric handles below.
const ENDED: [(RunStatus, StepStatus); 3] = [
    (RunStatus::Completed, StepStatus::Completed),
    (RunStatus::Failed, StepStatus::Failed),
    (RunStatus::Cancelled, StepStatus::Cancelled),
];

/// A pipeline's run counters, one per terminal status, looked up once: recording a run's end
/// then takes no lock and copies no label.
#[derive(Debug, Clone)]
pub struct PipelineMetrics {
    runs: [sharded::Counter; 3],
}

/// A plugin's step durations, one histogram per end status, looked up once.
#[derive(Debug, Clone)]
pub struct StepMetrics {
    plugin: Arc<str>,
    seconds: [sharded::DurationHistogram; 3],
}

/// The host's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    runs: Family<RunLabels, sharded::Counter>,
    runs_in_flight: Gauge,
    run_memory_bytes: Gauge,
    step_seconds: Family<StepLabels, sharded::DurationHistogram>,
    plugin_failures: Family<FailureLabels, Counter>,
    log_dropped_bytes: Family<PluginLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    compile_cache: Family<OutcomeLabels, Counter>,
    render_turn: std::sync::Mutex<()>,
    credits_reserved: sharded::Counter,
    credits_posted: sharded::Counter,
    credits_released: sharded::Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("genpipe");
        let runs = Family::<RunLabels, sharded::Counter>::default();
        registry.register("runs", "Runs ended, by pipeline and terminal status", runs.clone());
        let runs_in_flight = Gauge::default();
        registry.register(
            "runs_in_flight",
            "Runs admitted and not yet ended (at most [server] max_runs_in_flight)",
            runs_in_flight.clone(),
        );
        let run_memory_bytes = Gauge::default();
        registry.register(
            "run_memory_bytes",
            "Bytes the host keeps for runs' events and outputs (at most [server] max_run_memory_mb)",
            run_memory_bytes.clone(),
        );
        let step_seconds = Family::<StepLabels, sharded::DurationHistogram>::default();
        registry.register(
            "step_duration_seconds",
            "Time from a step's start to its end, by plugin and status",
            step_seconds.clone(),
        );
        let plugin_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "plugin_failures",
            "Steps that did not complete, by plugin and kind (trap, timeout, out-of-memory, output-too-large, ...)",
            plugin_failures.clone(),
        );
        let log_dropped_bytes = Family::<PluginLabels, Counter>::default();
        registry.register(
            "plugin_log_dropped_bytes",
            "Bytes of plugin log dropped beyond max_log_bytes, by plugin",
            log_dropped_bytes.clone(),
        );
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "reloads",
            "Configuration reloads, by outcome: applied, unchanged or failed (the old configuration kept serving)",
            reloads.clone(),
        );
        let compile_cache = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "compile_cache",
            "Plugin components by how they were obtained: hit (from the compile cache), miss (compiled), rejected (a damaged cache file, rebuilt)",
            compile_cache.clone(),
        );
        let credits_reserved = sharded::Counter::default();
        registry.register("credits_reserved", "Credits reserved by run holds", credits_reserved.clone());
        let credits_posted = sharded::Counter::default();
        registry.register("credits_posted", "Credits posted (charged for good) when holds closed", credits_posted.clone());
        let credits_released = sharded::Counter::default();
        registry.register("credits_released", "Credits returned when holds closed", credits_released.clone());
        Metrics {
            registry,
            runs,
            runs_in_flight,
            run_memory_bytes,
            step_seconds,
            plugin_failures,
            log_dropped_bytes,
            reloads,
            compile_cache,
            render_turn: std::sync::Mutex::new(()),
            credits_reserved,
            credits_posted,
            credits_released,
        }
    }
}

impl Metrics {
    /// A run was admitted with a hold of `held` credits.
    pub fn run_admitted(&self, held: u64) {
        self.credits_reserved.inc_by(held);
    }

    /// The run counters of `pipeline`.
    pub fn pipeline(&self, pipeline: &Arc<str>) -> PipelineMetrics {
        PipelineMetrics {
            runs: ENDED.map(|(status, _)| {
                self.runs.get_or_create(&RunLabels { pipeline: Name(Arc::clone(pipeline)), status: status.as_str() }).clone()
            }),
        }
    }

    /// A run of the pipeline of `pipeline` ended with the terminal `status`; its hold posted
    /// `posted` and released `released`.
    pub fn run_ended(&self, pipeline: &PipelineMetrics, status: RunStatus, posted: u64, released: u64) {
        if let Some(at) = ENDED.iter().position(|(ended, _)| *ended == status) {
            pipeline.runs[at].inc();
        }
        self.credits_posted.inc_by(posted);
        self.credits_released.inc_by(released);
    }

    /// The step durations of `plugin`.
    pub fn plugin(&self, plugin: &Arc<str>) -> StepMetrics {
        StepMetrics {
            plugin: Arc::clone(plugin),
            seconds: ENDED.map(|(_, status)| {
                self.step_seconds.get_or_create(&StepLabels { plugin: Name(Arc::clone(plugin)), status: status.as_str() }).clone()
            }),
        }
    }

    /// A step of the plugin of `step` ran for `elapsed` and ended with `status`; `failure` is
    /// the kind of a failure.
    pub fn step_ended(&self, step: &StepMetrics, status: StepStatus, elapsed: Duration, failure: Option<FailureKind>) {
        if let Some(at) = ENDED.iter().position(|(_, ended)| *ended == status) {
            step.seconds[at].observe(elapsed.as_secs_f64());
        }
        if let Some(kind) = failure {
            let labels = FailureLabels { plugin: Name(Arc::clone(&step.plugin)), kind: kind.as_str() };
            self.plugin_failures.get_or_create(&labels).inc();
        }
    }

    /// A step of `plugin` had `bytes` of its log dropped.
    pub fn log_dropped(&self, plugin: &Arc<str>, bytes: u64) {
        self.log_dropped_bytes.get_or_create(&PluginLabels { plugin: Name(Arc::clone(plugin)) }).inc_by(bytes);
    }

    /// A reload ended: `applied`, `unchanged` or `failed`.
    pub fn reload(&self, outcome: &'static str) {
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// The metrics in Prometheus' text format, with the runs in flight and the run memory in
    /// use now (the host counts both), and what the compile cache did so far.
    pub fn render(&self, runs_in_flight: usize, run_memory_bytes: u64, cache: &CacheStats) -> String {
        self.runs_in_flight.set(i64::try_from(runs_in_flight).unwrap_or(i64::MAX));
        self.run_memory_bytes.set(i64::try_from(run_memory_bytes).unwrap_or(i64::MAX));
        {
            // Renders take turns here, so that each brings the counters up to the cache's once.
            let _turn = self.render_turn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (outcome, count) in [("hit", &cache.hits), ("miss", &cache.misses), ("rejected", &cache.rejected)] {
                let counter = self.compile_cache.get_or_create(&OutcomeLabels { outcome });
                counter.inc_by(count.load(Ordering::Relaxed).saturating_sub(counter.get()));
            }
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

//! Pipelines: the registry of plugins and pipelines loaded from a configuration, and the
//! lifecycle of one run.

mod context;
mod executor;
mod registry;
pub mod request;
pub mod template;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

pub(crate) use context::RunContext;
pub(crate) use executor::{execute, start_here};
pub use registry::{Change, Registry, RegistryChanges};

use crate::config::{ConfigError, PipelineConfig};
use crate::metrics::{Metrics, PipelineMetrics, StepMetrics};
use crate::per_thread::PerThread;
use crate::runtime::{Plugin, PluginError};
use crate::state::runs::StepPlan;
use request::StepParams;
use template::Template;

/// A pipeline with its plugins resolved.
pub struct Pipeline {
    /// Pipeline name.
    pub name: Arc<str>,
    /// What it makes.
    pub description: String,
    /// Steps in declaration order.
    pub steps: Vec<Step>,
    /// What each run records of it, shared by the runs each thread starts.
    pub plan: PerThread<RunPlan>,
    /// Its run counters in the host that runs it (a registry is one host's), looked up on its
    /// first run's end.
    metrics: OnceLock<PipelineMetrics>,
    /// How it was configured, to tell whether a reload changes it.
    config: PipelineConfig,
}

/// What a run records of its pipeline: the pipeline's name and its steps.
#[derive(Debug)]
pub struct RunPlan {
    /// Pipeline name.
    pub name: Arc<str>,
    /// Its steps and the plugin versions serving them.
    pub steps: Arc<[StepPlan]>,
}

impl RunPlan {
    /// A copy that shares no allocation with this one.
    fn deep_copy(&self) -> RunPlan {
        let steps = self
            .steps
            .iter()
            .map(|step| StepPlan {
                id: Arc::from(&*step.id),
                plugin: Arc::from(&*step.plugin),
                digest: Arc::from(&*step.digest),
                loaded_at_ms: step.loaded_at_ms,
            })
            .collect();
        RunPlan { name: Arc::from(&*self.name), steps }
    }
}

/// A step with its plugin resolved.
pub struct Step {
    /// Step id.
    pub id: Arc<str>,
    /// Its plugin.
    pub plugin: Arc<Plugin>,
    /// Most credits it may charge.
    pub max_cost: u64,
    /// Its prompt template.
    pub prompt: Template,
    /// Indexes of the steps it waits for.
    pub after: Vec<usize>,
    /// Whether another step waits for it.
    pub awaited: bool,
    /// Its parameters as strings (checked at load).
    pub params: BTreeMap<String, String>,
    /// Its parameters, checked: the request's when a run brings no parameters of its own.
    pub checked_params: StepParams,
    /// Its plugin's step durations in the host that runs it, looked up on its first end.
    metrics: OnceLock<StepMetrics>,
}

impl Pipeline {
    /// The credits a run of this pipeline holds: the sum of its steps' `max_cost`, or None if
    /// that overflows.
    pub fn hold(&self) -> Option<u64> {
        self.steps.iter().try_fold(0u64, |sum, step| sum.checked_add(step.max_cost))
    }

    /// Its run counters in `metrics`, the host's.
    fn metrics(&self, metrics: &Metrics) -> &PipelineMetrics {
        self.metrics.get_or_init(|| metrics.pipeline(&self.name))
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration itself is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A plugin could not be loaded.
    #[error("{file}: plugins.{}: {}", source.name, source.message)]
    Plugin {
        /// The config file.
        file: String,
        /// What went wrong.
        source: PluginError,
    },
    /// Loading itself failed (a panic while loading).
    #[error("{0}")]
    Internal(String),
}

impl Step {
    /// Its plugin's step durations in `metrics`, the host's.
    fn metrics(&self, metrics: &Metrics) -> &StepMetrics {
        self.metrics.get_or_init(|| metrics.plugin(&self.plugin.settings().name))
    }

    /// The step as a new run records it: its id and the plugin version that will serve it.
    fn plan(&self) -> StepPlan {
        StepPlan {
            id: Arc::clone(&self.id),
            plugin: Arc::clone(&self.plugin.settings().name),
            digest: Arc::clone(self.plugin.digest_text()),
            loaded_at_ms: self.plugin.loaded_at_ms(),
        }
    }
}

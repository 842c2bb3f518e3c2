//! Pipelines: the loaded registry of plugins and pipelines, and the lifecycle of one run.

mod executor;
pub mod request;
pub mod template;

use std::collections::BTreeMap;
use std::sync::Arc;

pub(crate) use executor::execute;

use crate::config::{Config, ConfigError};
use crate::runtime::{Plugin, PluginError, Runtime};
use request::StepParams;
use template::Template;

/// Plugins and pipelines loaded from one configuration. Runs hold an `Arc` to their pipeline,
/// so replacing the registry never changes a started run.
pub struct Registry {
    /// Loaded plugins by name.
    pub plugins: BTreeMap<String, Arc<Plugin>>,
    /// Pipelines by name.
    pub pipelines: BTreeMap<String, Arc<Pipeline>>,
}

/// A pipeline with its plugins resolved.
pub struct Pipeline {
    /// Pipeline name.
    pub name: String,
    /// What it makes.
    pub description: String,
    /// Steps in declaration order.
    pub steps: Vec<Step>,
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
    /// Its parameters as strings (checked at load).
    pub params: BTreeMap<String, String>,
    /// Its parameters, checked: the request's when a run brings no parameters of its own.
    pub checked_params: StepParams,
}

impl Pipeline {
    /// The credits a run of this pipeline holds: the sum of its steps' `max_cost`, or None if
    /// that overflows.
    pub fn hold(&self) -> Option<u64> {
        self.steps.iter().try_fold(0u64, |sum, step| sum.checked_add(step.max_cost))
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
}

impl Registry {
    /// Loads every plugin of `config` into `runtime` and resolves its pipelines.
    pub fn load(runtime: &Runtime, config: &Config) -> Result<Registry, LoadError> {
        let mut plugins = BTreeMap::new();
        for (name, plugin_config) in &config.plugins {
            let bytes = config.plugin_bytes(name)?;
            let plugin = Plugin::load(runtime, name, plugin_config, &bytes)
                .map_err(|source| LoadError::Plugin { file: config.source.clone(), source })?;
            plugins.insert(name.clone(), Arc::new(plugin));
        }
        let pipelines = config
            .pipelines
            .iter()
            .map(|(name, pipeline)| {
                let steps = pipeline
                    .steps
                    .iter()
                    .map(|step| {
                        let plugin: &Arc<Plugin> = &plugins[&step.plugin];
                        Step {
                            id: step.id.as_str().into(),
                            plugin: Arc::clone(plugin),
                            max_cost: step.max_cost,
                            prompt: Template::parse(&step.prompt).expect("checked by Config::load"),
                            after: step.after.iter().filter_map(|a| pipeline.steps.iter().position(|s| &s.id == a)).collect(),
                            params: step.params.iter().map(|(k, v)| (k.clone(), crate::config::value_to_string(v))).collect(),
                            checked_params: StepParams::from_toml(plugin.world(), &step.params).expect("checked by Config::load"),
                        }
                    })
                    .collect();
                let resolved = Pipeline { name: name.clone(), description: pipeline.description.clone(), steps };
                (name.clone(), Arc::new(resolved))
            })
            .collect();
        Ok(Registry { plugins, pipelines })
    }
}

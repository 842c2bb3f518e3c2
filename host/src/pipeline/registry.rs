//! The registry: the plugins and pipelines of one configuration, loaded and linked.
//!
//! A registry is immutable once loaded; the host serves one at a time and replaces it whole on
//! a reload. Loading against the registry in service reuses what did not change: a plugin with
//! the same component (by digest) and the same settings is the loaded plugin itself; a changed
//! one reuses the compiled component when only its settings changed.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use super::request::StepParams;
use super::template::Template;
use super::{LoadError, Pipeline, RunPlan, Step};
use crate::config::Config;
use crate::per_thread::{PerThread, Shares};
use crate::runtime::{Digest, Plugin, Runtime};

/// Plugins and pipelines loaded from one configuration. Runs hold a share of their pipeline,
/// so replacing the registry never changes a started run.
pub struct Registry {
    /// Loaded plugins by name.
    pub plugins: BTreeMap<String, Arc<Plugin>>,
    /// Pipelines by name.
    pub pipelines: BTreeMap<String, Shares<Pipeline>>,
}

/// How a plugin or pipeline changed from one registry to the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// It is new.
    Added {
        /// Its name.
        name: String,
    },
    /// It is gone.
    Removed {
        /// Its name.
        name: String,
    },
    /// Its component, settings or steps changed.
    Updated {
        /// Its name.
        name: String,
        /// A plugin's digest before, if it changed.
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        /// A plugin's digest after, if it changed.
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
}

/// What a new registry changes from the one before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RegistryChanges {
    /// Plugins added, removed or updated.
    pub plugins: Vec<Change>,
    /// Pipelines added, removed or updated.
    pub pipelines: Vec<Change>,
}

impl RegistryChanges {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty() && self.pipelines.is_empty()
    }
}

impl Registry {
    /// Loads every plugin of `config` into `runtime` and resolves its pipelines, reusing what
    /// `previous` already loaded. Loading against a registry in service (a reload) compiles on
    /// one core, leaving the others to the runs.
    pub fn load(runtime: &Runtime, config: &Config, previous: Option<&Registry>) -> Result<Registry, LoadError> {
        match previous {
            Some(_) => runtime.in_background(|| Registry::load_plugins(runtime, config, previous)),
            None => Registry::load_plugins(runtime, config, None),
        }
    }

    fn load_plugins(runtime: &Runtime, config: &Config, previous: Option<&Registry>) -> Result<Registry, LoadError> {
        let mut plugins = BTreeMap::new();
        for (name, plugin_config) in &config.plugins {
            let bytes = config.plugin_bytes(name)?;
            let loaded = previous.and_then(|registry| registry.plugins.get(name));
            let plugin = match loaded {
                Some(loaded) if loaded.is_loaded_as(plugin_config, &Digest::of(&bytes)) => Arc::clone(loaded),
                _ => Arc::new(
                    Plugin::load(runtime, name, plugin_config, &bytes, loaded.map(Arc::as_ref))
                        .map_err(|source| LoadError::Plugin { file: config.source.clone(), source })?,
                ),
            };
            plugins.insert(name.clone(), plugin);
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
                            awaited: pipeline.steps.iter().any(|s| s.after.contains(&step.id)),
                            params: step.params.iter().map(|(k, v)| (k.clone(), crate::config::value_to_string(v))).collect(),
                            checked_params: StepParams::from_toml(plugin.world(), &step.params).expect("checked by Config::load"),
                            metrics: OnceLock::new(),
                        }
                    })
                    .collect::<Vec<Step>>();
                let plan = RunPlan { name: name.as_str().into(), steps: steps.iter().map(Step::plan).collect() };
                let resolved = Pipeline {
                    name: Arc::clone(&plan.name),
                    description: pipeline.description.clone(),
                    plan: PerThread::new(plan, RunPlan::deep_copy),
                    steps,
                    metrics: OnceLock::new(),
                    config: pipeline.clone(),
                };
                (name.clone(), Shares::new(Arc::new(resolved)))
            })
            .collect();
        Ok(Registry { plugins, pipelines })
    }

    /// What this registry changes from `previous`.
    pub fn changes_from(&self, previous: &Registry) -> RegistryChanges {
        let plugins = diff(&previous.plugins, &self.plugins, |old, new| {
            if Arc::ptr_eq(old, new) {
                None
            } else if old.digest() == new.digest() {
                Some((None, None))
            } else {
                Some((Some(old.digest().to_string()), Some(new.digest().to_string())))
            }
        });
        let pipelines = diff(&previous.pipelines, &self.pipelines, |old, new| {
            let same_plugins = old.steps.iter().zip(&new.steps).all(|(a, b)| Arc::ptr_eq(&a.plugin, &b.plugin));
            (old.config != new.config || !same_plugins).then_some((None, None))
        });
        RegistryChanges { plugins, pipelines }
    }
}

/// The changes from `old` to `new`; `updated` says whether (and between which digests) an
/// entry in both changed.
fn diff<V>(
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
    updated: impl Fn(&V, &V) -> Option<(Option<String>, Option<String>)>,
) -> Vec<Change> {
    let mut changes: Vec<Change> =
        old.keys().filter(|name| !new.contains_key(*name)).map(|name| Change::Removed { name: name.clone() }).collect();
    for (name, entry) in new {
        match old.get(name) {
            None => changes.push(Change::Added { name: name.clone() }),
            Some(before) => {
                if let Some((from, to)) = updated(before, entry) {
                    changes.push(Change::Updated { name: name.clone(), from, to });
                }
            }
        }
    }
    changes
}

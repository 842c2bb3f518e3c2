//! `genpipe.toml`: the operator's declaration of accounts, plugins, limits and pipelines.
//!
//! Parsing is strict (unknown keys are errors) and every error names the file, the key and the
//! fix. [`Config::load`] checks everything that needs no wasm: references between sections,
//! step graphs, numbers and files. Loading the plugins themselves (world, exports) is the
//! runtime's job, see [`crate::runtime::Plugin`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::builtin;
use crate::pipeline::template::Template;

/// The configuration shipped in the repository, used when no file is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../genpipe.toml");
const DEFAULT_CONFIG_NAME: &str = "<built-in genpipe.toml>";

/// A validated configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, or `<built-in genpipe.toml>`.
    pub source: String,
    /// Folder that relative plugin paths are resolved against.
    pub base_dir: PathBuf,
    /// Wasm runtime limits.
    pub runtime: RuntimeConfig,
    /// Charging policy.
    pub credits: CreditsConfig,
    /// Accounts created at startup.
    pub accounts: Vec<AccountConfig>,
    /// Plugins by name.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Pipelines by name.
    pub pipelines: BTreeMap<String, PipelineConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    runtime: RuntimeConfig,
    #[serde(default)]
    credits: CreditsConfig,
    #[serde(default)]
    accounts: Vec<AccountConfig>,
    #[serde(default)]
    plugins: BTreeMap<String, PluginConfig>,
    #[serde(default)]
    pipelines: BTreeMap<String, PipelineConfig>,
}

/// `[runtime]`: limits of the wasm runtime shared by every plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Plugin instances alive at once (the size of the instance pool); further steps wait.
    pub max_concurrent_steps: u32,
    /// Milliseconds a cancelled plugin may take to return before the host stops it.
    pub cancel_grace_ms: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { max_concurrent_steps: 256, cancel_grace_ms: 250 }
    }
}

/// `[credits]`: what a run that does not complete pays.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CreditsConfig {
    /// Policy for failed and cancelled runs.
    pub on_failure: FailurePolicy,
}

/// What a failed or cancelled run posts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Post nothing: the whole hold is released.
    #[default]
    Release,
    /// Post what the steps charged before the run ended.
    PostCharged,
}

/// `[[accounts]]`: an account created at startup with its initial credits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// Account id.
    pub id: String,
    /// API key in clear (demo setups).
    pub api_key: Option<String>,
    /// SHA-256 of the API key, hex (production setups).
    pub api_key_sha256: Option<String>,
    /// Credits granted at startup.
    pub credits: u64,
}

/// `[plugins.NAME]`: one plugin, its limits and its settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Path of the `.wasm` component (relative to the config file) or `builtin:NAME`.
    pub path: String,
    /// The world the component implements.
    pub world: World,
    /// Linear memory limit in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u32,
    /// Wall-clock limit of one `generate` call in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Settings the plugin reads through the `config` interface.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
}

fn default_memory_mb() -> u32 {
    64
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// Largest `memory_mb` a plugin may ask for.
pub const MAX_MEMORY_MB: u32 = 4096;

/// The plugin worlds of `wit/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    /// `llm-step`: prompt in, text out.
    LlmStep,
    /// `image-step`: prompt in, image out.
    ImageStep,
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            World::LlmStep => "llm-step",
            World::ImageStep => "image-step",
        })
    }
}

/// `[pipelines.NAME]`: steps that run concurrently unless `after` orders them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// What the pipeline makes, for listings.
    #[serde(default)]
    pub description: String,
    /// The steps.
    pub steps: Vec<StepConfig>,
}

/// One step of a pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Step id, unique in the pipeline.
    pub id: String,
    /// Name of a plugin in `[plugins]`.
    pub plugin: String,
    /// Most credits the step may charge; the run holds the sum of its steps'.
    pub max_cost: u64,
    /// Prompt template: `{prompt}` is the run's prompt, `{steps.ID.output}` an earlier step's text.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// Steps that must complete first.
    #[serde(default)]
    pub after: Vec<String>,
    /// Request parameters (max_tokens, temperature, seed, width, height, or plugin-specific).
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
}

fn default_prompt() -> String {
    "{prompt}".to_string()
}

/// A configuration error: the file, the key and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The config file (or `<built-in genpipe.toml>`).
    pub file: String,
    /// The dotted key at fault (`pipelines.story.steps[1].after`), or `(syntax)`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Config {
    /// Reads and checks `path`, or the built-in configuration when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Config::parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME, Path::new(".")),
            Some(path) => {
                let file = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    file: file.clone(),
                    key: "(file)".into(),
                    message: format!("cannot read the config file: {e}; check the path given to --config"),
                })?;
                let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                Config::parse(&text, &file, &base_dir)
            }
        }
    }

    /// Parses and checks config text; `file` names it in errors, `base_dir` anchors plugin paths.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let parsed: ConfigFile = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            key: "(syntax)".into(),
            message: e.to_string().trim_end().replace('\n', "\n    "),
        })?;
        let config = Config {
            source: file.to_string(),
            base_dir: base_dir.to_path_buf(),
            runtime: parsed.runtime,
            credits: parsed.credits,
            accounts: parsed.accounts,
            plugins: parsed.plugins,
            pipelines: parsed.pipelines,
        };
        config.check()?;
        Ok(config)
    }

    fn error(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.source.clone(), key: key.into(), message: message.into() }
    }

    /// The bytes of plugin `name`'s component: a bundled one or the file at its path.
    pub fn plugin_bytes(&self, name: &str) -> Result<Vec<u8>, ConfigError> {
        let plugin = &self.plugins[name];
        let key = format!("plugins.{name}.path");
        if let Some(builtin) = plugin.path.strip_prefix("builtin:") {
            return builtin::plugin(builtin).map(<[u8]>::to_vec).ok_or_else(|| {
                self.error(key, format!("no bundled plugin named '{builtin}'; bundled: {}", builtin::names().join(", ")))
            });
        }
        let path = self.base_dir.join(&plugin.path);
        std::fs::read(&path).map_err(|e| {
            self.error(
                key,
                format!(
                    "cannot read '{}': {e}; paths are relative to the config file's folder, \
                     and bundled plugins are named \"builtin:NAME\"",
                    path.display()
                ),
            )
        })
    }

    fn check(&self) -> Result<(), ConfigError> {
        let runtime = &self.runtime;
        if runtime.max_concurrent_steps == 0 {
            return Err(self.error("runtime.max_concurrent_steps", "must be at least 1"));
        }
        let mut ids = BTreeSet::new();
        for (i, account) in self.accounts.iter().enumerate() {
            if account.id.is_empty() || !ids.insert(account.id.as_str()) {
                return Err(self.error(format!("accounts[{i}].id"), "account ids must be non-empty and unique"));
            }
        }
        for (name, plugin) in &self.plugins {
            if !(1..=MAX_MEMORY_MB).contains(&plugin.memory_mb) {
                return Err(self.error(
                    format!("plugins.{name}.memory_mb"),
                    format!("{} is out of range; give 1 to {MAX_MEMORY_MB}", plugin.memory_mb),
                ));
            }
            if plugin.timeout_ms == 0 {
                return Err(self.error(format!("plugins.{name}.timeout_ms"), "must be at least 1"));
            }
            self.plugin_bytes(name)?;
        }
        for (name, pipeline) in &self.pipelines {
            self.check_pipeline(name, pipeline)?;
        }
        Ok(())
    }

    fn check_pipeline(&self, name: &str, pipeline: &PipelineConfig) -> Result<(), ConfigError> {
        if pipeline.steps.is_empty() {
            return Err(self.error(format!("pipelines.{name}.steps"), "a pipeline needs at least one step"));
        }
        let mut ids = BTreeSet::new();
        for (i, step) in pipeline.steps.iter().enumerate() {
            let key = format!("pipelines.{name}.steps[{i}]");
            if step.id.is_empty() || !ids.insert(step.id.as_str()) {
                return Err(self.error(format!("{key}.id"), format!("step id '{}' must be non-empty and unique", step.id)));
            }
            let Some(plugin) = self.plugins.get(&step.plugin) else {
                let known: Vec<_> = self.plugins.keys().map(String::as_str).collect();
                return Err(self.error(
                    format!("{key}.plugin"),
                    format!(
                        "no plugin named '{}'; declare [plugins.{}] or use one of: {}",
                        step.plugin,
                        step.plugin,
                        known.join(", ")
                    ),
                ));
            };
            if step.max_cost == 0 {
                return Err(self.error(format!("{key}.max_cost"), "must be at least 1 (the credits the step may spend)"));
            }
            for dep in &step.after {
                if !pipeline.steps.iter().any(|s| &s.id == dep) {
                    return Err(self.error(format!("{key}.after"), format!("no step with id '{dep}' in this pipeline")));
                }
            }
            let template = Template::parse(&step.prompt).map_err(|e| self.error(format!("{key}.prompt"), e))?;
            if let Some(missing) = template.step_refs().find(|r| !step.after.iter().any(|a| a == r)) {
                return Err(self.error(
                    format!("{key}.prompt"),
                    format!("uses the output of step '{missing}', which is not in `after`; add after = [\"{missing}\"]"),
                ));
            }
            crate::pipeline::request::StepParams::from_toml(plugin.world, &step.params)
                .map_err(|e| self.error(format!("{key}.params"), e))?;
        }
        if pipeline.steps.iter().try_fold(0u64, |sum, step| sum.checked_add(step.max_cost)).is_none() {
            return Err(
                self.error(format!("pipelines.{name}.steps"), "the steps' max_cost add up to more than 2^64-1; lower them")
            );
        }
        if let Some(cycle) = find_cycle(&pipeline.steps) {
            return Err(self.error(
                format!("pipelines.{name}.steps"),
                format!("`after` forms a cycle: {}; remove one of these dependencies", cycle.join(" -> ")),
            ));
        }
        Ok(())
    }
}

/// A cycle in the steps' `after` graph, as the ids along it (first id repeated at the end).
fn find_cycle(steps: &[StepConfig]) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(i: usize, steps: &[StepConfig], marks: &mut [Mark], path: &mut Vec<usize>) -> Option<Vec<String>> {
        marks[i] = Mark::Active;
        path.push(i);
        for dep in &steps[i].after {
            let Some(j) = steps.iter().position(|s| &s.id == dep) else { continue };
            match marks[j] {
                Mark::Active => {
                    let start = path.iter().position(|&p| p == j).unwrap_or(0);
                    let mut cycle: Vec<String> = path[start..].iter().map(|&p| steps[p].id.clone()).collect();
                    cycle.push(steps[j].id.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(j, steps, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; steps.len()];
    (0..steps.len()).find_map(|i| if marks[i] == Mark::New { visit(i, steps, &mut marks, &mut Vec::new()) } else { None })
}

/// The string form of a TOML value as plugins and templates see it: strings bare, the rest in TOML.
pub fn value_to_string(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

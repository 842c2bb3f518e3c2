//! Loading a plugin: compile its component, link it against the host functions, and check that
//! it implements the world the operator declared. Every refusal names the plugin and the fix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use wasmtime::component::{Component, InstancePre};

use super::Runtime;
use super::bindings::{VERSIONS, image::ImageStepPre, llm::LlmStepPre, v0_2};
use super::cache::Origin;
use super::digest::Digest;
use super::gate::Gate;
use super::step::StepState;
use crate::config::{PluginConfig, Setting, World};
use crate::host_api::http::{AllowedHosts, HttpPolicy};

/// A loaded plugin, ready to instantiate once per step.
pub struct Plugin {
    settings: Arc<PluginSettings>,
    pub(crate) pre: PluginPre,
    /// Admits at most `max_concurrency` of its steps at once.
    pub(crate) gate: Arc<Gate>,
    /// The SHA-256 of its component.
    digest: Digest,
    /// The same, as shown: `sha256:HEX`.
    digest_text: Arc<str>,
    /// When this component was first loaded by this process.
    loaded_at: SystemTime,
    /// How it was configured, to tell whether a reload changes it.
    config: PluginConfig,
    /// How its component was obtained.
    origin: Origin,
}

/// The linked component, typed by world and contract version.
pub(crate) enum PluginPre {
    Llm(LlmStepPre<StepState>),
    Image(ImageStepPre<StepState>),
    Llm2(v0_2::llm::LlmStepPre<StepState>),
    Image2(v0_2::image::ImageStepPre<StepState>),
}

impl PluginPre {
    /// `pre` typed as `world` of `genpipe:plugin@version`.
    fn new(pre: &InstancePre<StepState>, world: World, version: &str) -> wasmtime::Result<PluginPre> {
        let pre = pre.clone();
        match (world, version) {
            (World::LlmStep, "0.2.0") => v0_2::llm::LlmStepPre::new(pre).map(PluginPre::Llm2),
            (World::ImageStep, "0.2.0") => v0_2::image::ImageStepPre::new(pre).map(PluginPre::Image2),
            (World::LlmStep, _) => LlmStepPre::new(pre).map(PluginPre::Llm),
            (World::ImageStep, _) => ImageStepPre::new(pre).map(PluginPre::Image),
        }
    }
}

/// Whether `pre` implements `world` of `genpipe:plugin@version`.
pub fn typed_as(pre: &InstancePre<StepState>, world: World, version: &str) -> bool {
    PluginPre::new(pre, world, version).is_ok()
}

/// The version of `genpipe:plugin` a component targets: the one its genpipe imports name
/// (a component that imports none matches any; the newest is used).
pub(crate) fn contract_version(engine: &wasmtime::Engine, component: &Component) -> Option<String> {
    component
        .component_type()
        .imports(engine)
        .find_map(|(name, _)| name.strip_prefix("genpipe:plugin/").and_then(|n| n.split_once('@')).map(|(_, v)| v.to_string()))
}

/// What the operator configured for a plugin, shared by all its steps.
#[derive(Debug)]
pub struct PluginSettings {
    /// Plugin name from genpipe.toml.
    pub name: Arc<str>,
    /// Its world.
    pub world: World,
    /// Linear memory limit in bytes.
    pub memory_bytes: u64,
    /// Wall-clock limit of one `generate` call.
    pub timeout: Duration,
    /// Fuel of one `generate` call, if metered.
    pub fuel: Option<u64>,
    /// Most bytes of output (streamed and final together) of one step.
    pub max_output_bytes: u64,
    /// Most host calls of one step.
    pub max_host_calls: u32,
    /// Most log bytes of one step.
    pub max_log_bytes: u64,
    /// Where and how it may send HTTP requests.
    pub http: HttpPolicy,
    /// Its `config` table, sorted by key, secrets resolved.
    pub config: BTreeMap<String, Setting>,
    /// The secret values of `config`, longest first, to be kept out of what the host shows.
    secrets: Secrets,
}

/// Secret values, never printed.
struct Secrets(Vec<String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} secrets>", self.0.len())
    }
}

/// What replaces a secret in text the host keeps or shows.
const REDACTED: &str = "[secret]";

impl PluginSettings {
    /// The settings of plugin `name` as `config` declares them; the error says which setting
    /// could not be resolved.
    pub fn new(name: &str, config: &PluginConfig) -> Result<PluginSettings, String> {
        let settings = config.settings().map_err(|(key, message)| format!("config.{key}: {message}"))?;
        let mut secrets: Vec<String> =
            settings.values().filter(|s| s.secret && !s.value.is_empty()).map(|s| s.value.clone()).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(PluginSettings {
            name: name.into(),
            world: config.world,
            memory_bytes: u64::from(config.memory_mb) << 20,
            timeout: Duration::from_millis(config.timeout_ms),
            fuel: config.fuel,
            max_output_bytes: config.max_output_bytes,
            max_host_calls: config.max_host_calls,
            max_log_bytes: config.max_log_bytes,
            http: HttpPolicy {
                allowed: AllowedHosts::parse(&config.allowed_hosts)?,
                timeout: Duration::from_millis(config.http_timeout_ms),
                max_response_bytes: config.max_http_response_bytes,
                max_connections: config.max_http_connections,
            },
            config: settings,
            secrets: Secrets(secrets),
        })
    }

    /// `text` with every secret value of this plugin replaced by `[secret]`.
    pub fn redact(&self, text: String) -> String {
        let secrets = &self.secrets.0;
        if secrets.iter().any(|secret| text.contains(secret.as_str())) {
            secrets.iter().fold(text, |text, secret| text.replace(secret.as_str(), REDACTED))
        } else {
            text
        }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("plugin '{name}': {message}")]
pub struct PluginError {
    /// Plugin name.
    pub name: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// The magic number and version of a component binary (a core module has version 1, layer 0).
const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
const CORE_MODULE_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

impl Plugin {
    /// Compiles (or loads from the cache) and links `bytes` as plugin `name` configured by
    /// `config`. `previous`, the plugin of that name already loaded, lends its load time when
    /// the component is the same, and its gate when the concurrency limits are too.
    pub fn load(
        runtime: &Runtime,
        name: &str,
        config: &PluginConfig,
        bytes: &[u8],
        previous: Option<&Plugin>,
    ) -> Result<Plugin, PluginError> {
        let fail = |message: String| PluginError { name: name.to_string(), message };
        let digest = Digest::of(bytes);
        if let Some(pin) = &config.digest
            && Digest::parse(pin).ok() != Some(digest)
        {
            return Err(fail(format!(
                "the component's digest is {digest} but `digest` pins {pin}; if this file is the version \
                 you meant, set digest = \"{digest}\", else restore the pinned file"
            )));
        }
        match bytes.get(..8) {
            Some(header) if header == COMPONENT_HEADER => {}
            Some(header) if header == CORE_MODULE_HEADER => {
                return Err(fail(
                    "this is a core wasm module, not a component; build it for wasm32-wasip2 \
                     (or wrap it with `wasm-tools component new`)"
                        .into(),
                ));
            }
            _ => return Err(fail("this is not a WebAssembly component (bad header); check the path".into())),
        }
        let (component, origin) =
            runtime.component(&digest, bytes).map_err(|e| fail(format!("the component does not compile: {e}")))?;
        let supported = VERSIONS.join(", ");
        let version = contract_version(runtime.engine(), &component).unwrap_or_else(|| VERSIONS[VERSIONS.len() - 1].into());
        if !VERSIONS.contains(&version.as_str()) {
            return Err(fail(format!(
                "it targets genpipe:plugin@{version}, which this host does not support (it supports {supported}); \
                 build it against one of those (wit/)"
            )));
        }
        let instance_pre = runtime.linker().instantiate_pre(&component).map_err(|e| {
            fail(format!(
                "it imports something the host does not provide ({e}); build it against wit/ \
                 (genpipe:plugin {supported}) and WASI 0.2"
            ))
        })?;
        let pre = PluginPre::new(&instance_pre, config.world, &version).map_err(|e| {
            let other = match config.world {
                World::LlmStep => World::ImageStep,
                World::ImageStep => World::LlmStep,
            };
            let actual = PluginPre::new(&instance_pre, other, &version).is_ok().then_some(other);
            match actual {
                Some(actual) => fail(format!(
                    "declared world = \"{}\" but the component implements {actual}; set world = \"{actual}\"",
                    config.world
                )),
                None => fail(format!(
                    "the component does not export the `generate` function of world {} ({e}); \
                     implement that world from wit/",
                    config.world
                )),
            }
        })?;
        let settings = PluginSettings::new(name, config).map_err(fail)?;
        let same_limits =
            |p: &&Plugin| (p.config.concurrency(), p.config.max_queued) == (config.concurrency(), config.max_queued);
        let gate = match previous.filter(same_limits) {
            Some(previous) => Arc::clone(&previous.gate),
            None => Arc::new(Gate::new(config.concurrency(), config.max_queued)),
        };
        let loaded_at = previous.filter(|p| p.digest == digest).map_or_else(SystemTime::now, |p| p.loaded_at);
        let digest_text = digest.to_string().into();
        Ok(Plugin { settings: Arc::new(settings), pre, gate, digest, digest_text, loaded_at, config: config.clone(), origin })
    }

    /// Whether this plugin is exactly what `config` with a component of `digest` would load.
    pub fn is_loaded_as(&self, config: &PluginConfig, digest: &Digest) -> bool {
        self.digest == *digest && self.config == *config
    }

    /// The SHA-256 of its component.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Its digest as shown: `sha256:HEX`.
    pub fn digest_text(&self) -> &Arc<str> {
        &self.digest_text
    }

    /// When its component was first loaded by this process.
    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// The same, in milliseconds since the Unix epoch.
    pub fn loaded_at_ms(&self) -> u64 {
        self.loaded_at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    /// How its component was obtained: compiled, from the compile cache, or already loaded.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The plugin's world.
    pub fn world(&self) -> World {
        self.settings.world
    }

    /// The plugin's settings.
    pub fn settings(&self) -> &Arc<PluginSettings> {
        &self.settings
    }
}

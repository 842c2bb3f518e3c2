//! Loading a plugin: compile its component, link it against the host functions, and check that
//! it implements the world the operator declared. Every refusal names the plugin and the fix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::Runtime;
use super::bindings::{image::ImageStepPre, llm::LlmStepPre};
use super::step::StepState;
use crate::config::{PluginConfig, World, value_to_string};

/// A loaded plugin, ready to instantiate once per step.
pub struct Plugin {
    settings: Arc<PluginSettings>,
    pub(crate) pre: PluginPre,
}

/// The linked component, typed by world.
pub(crate) enum PluginPre {
    Llm(LlmStepPre<StepState>),
    Image(ImageStepPre<StepState>),
}

/// What the operator configured for a plugin, shared by all its steps.
#[derive(Debug)]
pub struct PluginSettings {
    /// Plugin name from genpipe.toml.
    pub name: String,
    /// Its world.
    pub world: World,
    /// Linear memory limit in bytes.
    pub memory_bytes: usize,
    /// Wall-clock limit of one `generate` call.
    pub timeout: Duration,
    /// Its `config` table as strings, sorted by key.
    pub config: BTreeMap<String, String>,
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
    /// Compiles and links `bytes` as plugin `name` configured by `config`.
    pub fn load(runtime: &Runtime, name: &str, config: &PluginConfig, bytes: &[u8]) -> Result<Plugin, PluginError> {
        let fail = |message: String| PluginError { name: name.to_string(), message };
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
        let component = runtime.compile(bytes).map_err(|e| fail(format!("the component does not compile: {e}")))?;
        let instance_pre = runtime.linker().instantiate_pre(&component).map_err(|e| {
            fail(format!(
                "it imports something the host does not provide ({e}); build it against wit/ \
                 (genpipe:plugin@0.1.0) and WASI 0.2"
            ))
        })?;
        let pre = match config.world {
            World::LlmStep => LlmStepPre::new(instance_pre.clone()).map(PluginPre::Llm),
            World::ImageStep => ImageStepPre::new(instance_pre.clone()).map(PluginPre::Image),
        };
        let pre = pre.map_err(|e| {
            let actual = match config.world {
                World::LlmStep => ImageStepPre::new(instance_pre).is_ok().then_some(World::ImageStep),
                World::ImageStep => LlmStepPre::new(instance_pre).is_ok().then_some(World::LlmStep),
            };
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
        let settings = PluginSettings {
            name: name.to_string(),
            world: config.world,
            memory_bytes: config.memory_mb as usize * 1024 * 1024,
            timeout: Duration::from_millis(config.timeout_ms),
            config: config.config.iter().map(|(k, v)| (k.clone(), value_to_string(v))).collect(),
        };
        Ok(Plugin { settings: Arc::new(settings), pre })
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

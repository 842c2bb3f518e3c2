//! `[plugins.NAME]`: one plugin's component, its limits, its capabilities and its settings.
//!
//! Every limit has a default that protects a host which sets nothing (see the README's table);
//! the operator raises a limit for a plugin that needs more. Settings may be secret: given
//! inline as `{ secret = "..." }` or read from the operator's environment as `{ env = "VAR" }`,
//! a secret reaches only its own plugin and is never printed.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// `[plugins.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Path of the `.wasm` component (relative to the config file) or `builtin:NAME`.
    pub path: String,
    /// Pins the component: `sha256:HEX`; a file with another digest is refused.
    #[serde(default)]
    pub digest: Option<String>,
    /// The world the component implements.
    pub world: World,
    /// Linear memory limit in MiB.
    #[serde(default = "defaults::memory_mb")]
    pub memory_mb: u32,
    /// Wall-clock limit of one `generate` call in milliseconds.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Wasm instructions (roughly) one `generate` call may execute; none by default.
    #[serde(default)]
    pub fuel: Option<u64>,
    /// Bytes a step may produce: its final text or image and every chunk it streamed, together.
    #[serde(default = "defaults::max_output_bytes")]
    pub max_output_bytes: u64,
    /// Calls a step may make to the host functions that keep or write something
    /// (`status.report`, `output.emit`, `log.log`, `credits.charge`, outbound HTTP requests).
    #[serde(default = "defaults::max_host_calls")]
    pub max_host_calls: u32,
    /// Bytes of log a step may write to the host's log; the rest is dropped and counted.
    #[serde(default = "defaults::max_log_bytes")]
    pub max_log_bytes: u64,
    /// Instances of this plugin alive at once; further steps wait in a queue. Unset, it is
    /// [`defaults::max_concurrency`] or `runtime.max_concurrent_steps`, whichever is smaller
    /// (always set once the configuration is loaded).
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// Steps that may wait for an instance of this plugin; beyond it a step is refused.
    #[serde(default = "defaults::max_queued")]
    pub max_queued: u32,
    /// Hosts the plugin may call over HTTP (`host`, `host:port`, `host:*`, `*.example.com`).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Time limit of one outbound HTTP request (connect, first byte, and between bytes), ms.
    #[serde(default = "defaults::http_timeout_ms")]
    pub http_timeout_ms: u64,
    /// Largest outbound HTTP response body a step may read, in bytes.
    #[serde(default = "defaults::max_http_response_bytes")]
    pub max_http_response_bytes: u64,
    /// Outbound HTTP requests a step may have open at once.
    #[serde(default = "defaults::max_http_connections")]
    pub max_http_connections: u32,
    /// Settings the plugin reads through the `config` interface.
    #[serde(default)]
    pub config: BTreeMap<String, SettingValue>,
}

/// The defaults of a plugin's limits.
pub mod defaults {
    /// `memory_mb`.
    pub const fn memory_mb() -> u32 {
        64
    }
    /// `timeout_ms`.
    pub const fn timeout_ms() -> u64 {
        30_000
    }
    /// `max_output_bytes`: 4 MiB.
    pub const fn max_output_bytes() -> u64 {
        4 << 20
    }
    /// `max_host_calls`.
    pub const fn max_host_calls() -> u32 {
        50_000
    }
    /// `max_log_bytes`: 16 KiB.
    pub const fn max_log_bytes() -> u64 {
        16 << 10
    }
    /// `max_concurrency` (when `runtime.max_concurrent_steps` is not smaller).
    pub const fn max_concurrency() -> u32 {
        64
    }
    /// `max_queued`.
    pub const fn max_queued() -> u32 {
        1024
    }
    /// `http_timeout_ms`.
    pub const fn http_timeout_ms() -> u64 {
        30_000
    }
    /// `max_http_response_bytes`: 8 MiB.
    pub const fn max_http_response_bytes() -> u64 {
        8 << 20
    }
    /// `max_http_connections`.
    pub const fn max_http_connections() -> u32 {
        8
    }
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

/// A value of a plugin's `config` table as written in genpipe.toml.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SettingValue {
    /// `{ secret = "..." }`: a secret given inline.
    Secret(InlineSecret),
    /// `{ env = "VAR" }`: a secret read from the operator's environment at load.
    Env(EnvSecret),
    /// Anything else: passed to the plugin as its string form.
    Plain(toml::Value),
}

/// `{ secret = "..." }`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlineSecret {
    secret: String,
}

/// `{ env = "VAR" }`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvSecret {
    env: String,
}

impl fmt::Debug for SettingValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettingValue::Secret(_) => f.write_str("<secret>"),
            SettingValue::Env(e) => write!(f, "<secret from ${}>", e.env),
            SettingValue::Plain(value) => write!(f, "{value}"),
        }
    }
}

/// A resolved setting: its value as the plugin reads it, and whether it is secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Setting {
    /// The value.
    pub value: String,
    /// Secret values are shown to nobody but the plugin.
    pub secret: bool,
}

impl fmt::Debug for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.secret { f.write_str("<secret>") } else { write!(f, "{:?}", self.value) }
    }
}

impl PluginConfig {
    /// `max_concurrency`, as loaded.
    pub fn concurrency(&self) -> u32 {
        self.max_concurrency.unwrap_or(defaults::max_concurrency())
    }

    /// The plugin's settings, secrets resolved; the error names the key and the fix, never a
    /// secret's value.
    pub fn settings(&self) -> Result<BTreeMap<String, Setting>, (String, String)> {
        self.config
            .iter()
            .map(|(key, value)| {
                let setting = match value {
                    SettingValue::Plain(value) => Setting { value: value_to_string(value), secret: false },
                    SettingValue::Secret(inline) => Setting { value: inline.secret.clone(), secret: true },
                    SettingValue::Env(EnvSecret { env }) => match std::env::var(env) {
                        Ok(value) if !value.is_empty() => Setting { value, secret: true },
                        _ => {
                            return Err((
                                key.clone(),
                                format!(
                                    "the environment variable {env} is not set (or is empty); export it before \
                                     starting genpipe, or give the value inline as {{ secret = \"...\" }}"
                                ),
                            ));
                        }
                    },
                };
                Ok((key.clone(), setting))
            })
            .collect()
    }
}

/// The string form of a TOML value as plugins and templates see it: strings bare, the rest in TOML.
pub fn value_to_string(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

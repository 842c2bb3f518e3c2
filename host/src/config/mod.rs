//! `genpipe.toml`: the operator's declaration of accounts, plugins, limits and pipelines.
//!
//! Parsing is strict (unknown keys are errors) and every error names the file, the key and the
//! fix. [`Config::load`] checks everything that needs no wasm: references between sections,
//! step graphs, numbers and files. Loading the plugins themselves (world, exports) is the
//! runtime's job, see [`crate::runtime::Plugin`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod plugin;

pub use plugin::{MAX_MEMORY_MB, PluginConfig, Setting, SettingValue, World, defaults, value_to_string};

use crate::builtin;
use crate::host_api::http::AllowedHosts;
use crate::pipeline::template::Template;
use crate::runtime::Digest;

/// The configuration shipped in the repository, used when no file is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../../genpipe.toml");
const DEFAULT_CONFIG_NAME: &str = "<built-in genpipe.toml>";

/// A validated configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, or `<built-in genpipe.toml>`.
    pub source: String,
    /// Folder that relative plugin paths are resolved against.
    pub base_dir: PathBuf,
    /// The HTTP service.
    pub server: ServerConfig,
    /// Wasm runtime limits.
    pub runtime: RuntimeConfig,
    /// Charging policy.
    pub credits: CreditsConfig,
    /// Where credits are kept.
    pub ledger: LedgerConfig,
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
    server: ServerConfig,
    #[serde(default)]
    runtime: RuntimeConfig,
    #[serde(default)]
    credits: CreditsConfig,
    #[serde(default)]
    ledger: LedgerConfig,
    #[serde(default)]
    accounts: Vec<AccountConfig>,
    #[serde(default)]
    plugins: BTreeMap<String, PluginConfig>,
    #[serde(default)]
    pipelines: BTreeMap<String, PipelineConfig>,
}

/// `[server]`: the HTTP service of `genpipe serve`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (`--listen` overrides it).
    pub listen: String,
    /// Key of the admin routes, in clear (demo setups).
    pub admin_key: Option<String>,
    /// SHA-256 of the admin key, hex (production setups).
    pub admin_key_sha256: Option<String>,
    /// Runs in flight at once; beyond it, new runs get 429 with Retry-After.
    pub max_runs_in_flight: usize,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Longest `Prefer: wait=N` honoured, in seconds.
    pub max_wait_secs: u64,
    /// Time limit of one request (event streams excepted), in seconds.
    pub request_timeout_secs: u64,
    /// On shutdown, how long in-flight runs may take to finish before they are cancelled.
    pub shutdown_grace_secs: u64,
    /// How long ended runs stay readable, in seconds.
    pub run_retention_secs: u64,
    /// Most ended runs kept readable: beyond it the oldest go first, however recent.
    pub max_kept_runs: usize,
    /// Memory the host keeps for all runs' events and outputs, in MiB: beyond it the oldest ended
    /// runs are forgotten first, and a step that still finds no room fails.
    pub max_run_memory_mb: u64,
    /// How long an Idempotency-Key is remembered, in seconds (at least 24 hours).
    pub idempotency_ttl_secs: u64,
    /// Connections open at once; beyond it, new connections wait in the listen queue.
    pub max_connections: usize,
    /// Seconds a client may take to send a request's line and headers, and an idle keep-alive
    /// connection may wait for its next request; then the connection is closed.
    pub header_read_timeout_secs: u64,
    /// Seconds a client may take to send a request's body (408 beyond).
    pub body_read_timeout_secs: u64,
    /// Event streams open at once on one run (429 beyond).
    pub max_streams_per_run: usize,
    /// Event streams open at once for one account (429 beyond).
    pub max_streams_per_account: usize,
    /// Requests an account may make per second, on average (429 with Retry-After beyond).
    pub rate_limit_per_sec: u32,
    /// Requests an account may make at once, on top of that rate (the token bucket's size).
    pub rate_limit_burst: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_key: None,
            admin_key_sha256: None,
            max_runs_in_flight: 1024,
            max_body_bytes: 64 * 1024,
            max_wait_secs: 60,
            request_timeout_secs: 90,
            shutdown_grace_secs: 10,
            run_retention_secs: 3600,
            max_kept_runs: 100_000,
            max_run_memory_mb: 1024,
            idempotency_ttl_secs: 24 * 3600,
            max_connections: 10_000,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 10,
            max_streams_per_run: 64,
            max_streams_per_account: 256,
            rate_limit_per_sec: 1000,
            rate_limit_burst: 2000,
        }
    }
}

/// `[runtime]`: limits of the wasm runtime shared by every plugin.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Plugin instances alive at once (the size of the instance pool); further steps wait.
    pub max_concurrent_steps: u32,
    /// Milliseconds a cancelled plugin may take to return before the host stops it.
    pub cancel_grace_ms: u64,
    /// Whether the engine meters fuel. Not a key of the file: set when a plugin declares `fuel`.
    #[serde(skip)]
    pub fuel: bool,
    /// Folder of the compile cache, relative to the config file's folder (to the current
    /// folder for the built-in config); empty or none turns the cache off.
    pub compile_cache_dir: Option<PathBuf>,
}

/// Where compiled plugins are cached when `[runtime] compile_cache_dir` is not given.
pub const DEFAULT_COMPILE_CACHE_DIR: &str = "data/compiled";

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_concurrent_steps: 256,
            cancel_grace_ms: 250,
            fuel: false,
            compile_cache_dir: Some(PathBuf::from(DEFAULT_COMPILE_CACHE_DIR)),
        }
    }
}

/// `[credits]`: what a run that does not complete pays.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CreditsConfig {
    /// Policy for failed and cancelled runs.
    pub on_failure: FailurePolicy,
}

/// What a failed or cancelled run posts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Post nothing: the whole hold is released.
    #[default]
    Release,
    /// Post what the steps charged before the run ended.
    PostCharged,
}

/// `[ledger]`: where credits are kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// The backend.
    pub kind: LedgerKind,
    /// The SQLite file, relative to the config file's folder (to the current folder for the
    /// built-in config); [`DEFAULT_LEDGER_PATH`] when not given. Only for `kind = "sqlite"`.
    pub path: Option<PathBuf>,
    /// The PostgreSQL server and database, as a `postgres://` URL (or `key=value` settings)
    /// without a password. Only for `kind = "postgres"`, which requires it.
    pub url: Option<String>,
    /// The environment variable holding the PostgreSQL password; `PGPASSWORD` when not given.
    /// Only for `kind = "postgres"`.
    pub password_env: Option<String>,
    /// Seconds a run's hold lives: past it, the hold takes no more charges and is resolved.
    pub hold_ttl_secs: u64,
}

/// Where the SQLite ledger is kept when `[ledger] path` is not given.
pub const DEFAULT_LEDGER_PATH: &str = "data/genpipe.db";

/// Longest `hold_ttl_secs` (30 days).
pub const MAX_HOLD_TTL_SECS: u64 = 30 * 24 * 3600;

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig { kind: LedgerKind::default(), path: None, url: None, password_env: None, hold_ttl_secs: 3600 }
    }
}

impl LedgerConfig {
    /// The SQLite file, as configured (relative paths are relative to the config's folder).
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(DEFAULT_LEDGER_PATH))
    }

    /// How long a run's hold lives.
    pub fn hold_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.hold_ttl_secs)
    }
}

/// The ledger's backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LedgerKind {
    /// A SQLite file: durable across crashes and restarts.
    #[default]
    Sqlite,
    /// Process memory: forgotten when genpipe exits (tests, demos).
    Memory,
    /// A PostgreSQL database, shared by several genpipe processes (replicas).
    Postgres,
}

/// `[[accounts]]`: an account created at startup with its initial credits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

/// The longest step id.
pub const MAX_STEP_ID_LEN: usize = 64;

/// `[pipelines.NAME]`: steps that run concurrently unless `after` orders them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// What the pipeline makes, for listings.
    #[serde(default)]
    pub description: String,
    /// The steps.
    pub steps: Vec<StepConfig>,
}

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

    /// The file this configuration was read from; none for the built-in one.
    pub fn source_path(&self) -> Option<PathBuf> {
        (self.source != DEFAULT_CONFIG_NAME).then(|| PathBuf::from(&self.source))
    }

    /// Parses and checks config text; `file` names it in errors, `base_dir` anchors plugin paths.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let parsed: ConfigFile = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            key: "(syntax)".into(),
            message: e.to_string().trim_end().replace('\n', "\n    "),
        })?;
        let mut runtime = parsed.runtime;
        runtime.fuel = parsed.plugins.values().any(|plugin| plugin.fuel.is_some());
        let mut plugins = parsed.plugins;
        for plugin in plugins.values_mut() {
            plugin.max_concurrency.get_or_insert(defaults::max_concurrency().min(runtime.max_concurrent_steps));
        }
        runtime.compile_cache_dir =
            runtime.compile_cache_dir.filter(|dir| !dir.as_os_str().is_empty()).map(|dir| base_dir.join(dir));
        let config = Config {
            source: file.to_string(),
            base_dir: base_dir.to_path_buf(),
            server: parsed.server,
            runtime,
            credits: parsed.credits,
            ledger: parsed.ledger,
            accounts: parsed.accounts,
            plugins,
            pipelines: parsed.pipelines,
        };
        config.check()?;
        Ok(config)
    }

    /// The keys whose change from `self` to `new` a reload cannot apply: everything outside
    /// plugins, pipelines and accounts (the listen address, the ledger, [runtime] ...).
    pub fn restart_changes(&self, new: &Config) -> Vec<String> {
        fn table<T: Serialize>(value: &T) -> toml::Table {
            toml::Table::try_from(value).unwrap_or_default()
        }
        let sections = [
            ("server", table(&self.server), table(&new.server)),
            ("runtime", table(&self.runtime), table(&new.runtime)),
            ("credits", table(&self.credits), table(&new.credits)),
            ("ledger", table(&self.ledger), table(&new.ledger)),
        ];
        let mut changed = Vec::new();
        for (section, old, new) in sections {
            let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
            changed.extend(keys.into_iter().filter(|key| old.get(*key) != new.get(*key)).map(|key| format!("{section}.{key}")));
        }
        if new.runtime.fuel && !self.runtime.fuel {
            changed.push("plugins.*.fuel (the engine meters fuel only when a plugin declares it at start)".into());
        }
        changed
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
        self.check_server()?;
        self.check_ledger()?;
        let runtime = &self.runtime;
        if runtime.max_concurrent_steps == 0 {
            return Err(self.error("runtime.max_concurrent_steps", "must be at least 1"));
        }
        let mut ids = BTreeSet::new();
        for (i, account) in self.accounts.iter().enumerate() {
            if account.id.is_empty() || !ids.insert(account.id.as_str()) {
                return Err(self.error(format!("accounts[{i}].id"), "account ids must be non-empty and unique"));
            }
            self.check_key(&format!("accounts[{i}]"), &account.api_key, &account.api_key_sha256)?;
        }
        for (name, plugin) in &self.plugins {
            self.check_plugin(name, plugin)?;
            self.plugin_bytes(name)?;
        }
        for (name, pipeline) in &self.pipelines {
            self.check_pipeline(name, pipeline)?;
        }
        Ok(())
    }

    /// Checks a plugin's limits, its `allowed_hosts` and its settings.
    fn check_plugin(&self, name: &str, plugin: &PluginConfig) -> Result<(), ConfigError> {
        let key = |field: &str| format!("plugins.{name}.{field}");
        if !(1..=MAX_MEMORY_MB).contains(&plugin.memory_mb) {
            return Err(self.error(key("memory_mb"), format!("{} is out of range; give 1 to {MAX_MEMORY_MB}", plugin.memory_mb)));
        }
        for (field, value) in [
            ("timeout_ms", plugin.timeout_ms),
            ("max_output_bytes", plugin.max_output_bytes),
            ("max_host_calls", u64::from(plugin.max_host_calls)),
            ("max_concurrency", u64::from(plugin.concurrency())),
            ("http_timeout_ms", plugin.http_timeout_ms),
            ("max_http_response_bytes", plugin.max_http_response_bytes),
            ("max_http_connections", u64::from(plugin.max_http_connections)),
        ] {
            if value == 0 {
                return Err(self.error(key(field), "must be at least 1"));
            }
        }
        if plugin.fuel == Some(0) {
            return Err(self.error(key("fuel"), "must be at least 1; remove it to run without a fuel limit"));
        }
        if plugin.concurrency() > self.runtime.max_concurrent_steps {
            return Err(self.error(
                key("max_concurrency"),
                format!(
                    "{} is more than runtime.max_concurrent_steps ({}), the instances the whole host may run; \
                     lower it or raise runtime.max_concurrent_steps",
                    plugin.concurrency(),
                    self.runtime.max_concurrent_steps
                ),
            ));
        }
        AllowedHosts::parse(&plugin.allowed_hosts).map_err(|e| self.error(key("allowed_hosts"), e))?;
        if let Some(pin) = &plugin.digest {
            Digest::parse(pin).map_err(|e| self.error(key("digest"), e))?;
        }
        plugin.settings().map_err(|(setting, message)| self.error(key(&format!("config.{setting}")), message))?;
        Ok(())
    }

    fn check_server(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        if server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(self.error(
                "server.listen",
                format!("'{}' is not an address; write it as IP:PORT, e.g. 127.0.0.1:8080", server.listen),
            ));
        }
        self.check_key("server", &server.admin_key, &server.admin_key_sha256)?;
        for (key, value) in [
            ("max_runs_in_flight", server.max_runs_in_flight as u64),
            ("max_body_bytes", server.max_body_bytes as u64),
            ("request_timeout_secs", server.request_timeout_secs),
            ("max_kept_runs", server.max_kept_runs as u64),
            ("max_run_memory_mb", server.max_run_memory_mb),
            ("max_connections", server.max_connections as u64),
            ("header_read_timeout_secs", server.header_read_timeout_secs),
            ("body_read_timeout_secs", server.body_read_timeout_secs),
            ("max_streams_per_run", server.max_streams_per_run as u64),
            ("max_streams_per_account", server.max_streams_per_account as u64),
            ("rate_limit_per_sec", u64::from(server.rate_limit_per_sec)),
            ("rate_limit_burst", u64::from(server.rate_limit_burst)),
        ] {
            if value == 0 {
                return Err(self.error(format!("server.{key}"), "must be at least 1"));
            }
        }
        if server.idempotency_ttl_secs < 24 * 3600 {
            return Err(
                self.error("server.idempotency_ttl_secs", "must be at least 86400 (24 hours): clients retry for that long")
            );
        }
        for (key, value) in [
            ("header_read_timeout_secs", server.header_read_timeout_secs),
            ("body_read_timeout_secs", server.body_read_timeout_secs),
        ] {
            if value > 3600 {
                return Err(self.error(format!("server.{key}"), format!("{value} is out of range; give 1 to 3600")));
            }
        }
        Ok(())
    }

    /// Checks a clear/hashed key pair at `key` (`api_key`/`api_key_sha256` or `admin_key`/...).
    fn check_key(&self, key: &str, clear: &Option<String>, hashed: &Option<String>) -> Result<(), ConfigError> {
        let prefix = if key == "server" { "admin_key" } else { "api_key" };
        if clear.is_some() && hashed.is_some() {
            return Err(self.error(format!("{key}.{prefix}"), format!("give {prefix} or {prefix}_sha256, not both")));
        }
        if clear.as_deref() == Some("") {
            return Err(self.error(format!("{key}.{prefix}"), "must not be empty"));
        }
        if let Some(hash) = hashed
            && (hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(self.error(
                format!("{key}.{prefix}_sha256"),
                "must be 64 hex digits, the SHA-256 of the key (e.g. `printf %s KEY | sha256sum`)",
            ));
        }
        Ok(())
    }

    fn check_ledger(&self) -> Result<(), ConfigError> {
        let ledger = &self.ledger;
        match (&ledger.path, ledger.kind) {
            (Some(_), LedgerKind::Memory | LedgerKind::Postgres) => {
                return Err(self.error("ledger.path", "is only used with kind = \"sqlite\"; remove it, or set kind = \"sqlite\""));
            }
            (Some(path), LedgerKind::Sqlite)
                if path.as_os_str().is_empty() || path.ends_with("..") || path.to_string_lossy().ends_with('/') =>
            {
                return Err(self.error("ledger.path", "must name a file, such as \"data/genpipe.db\""));
            }
            _ => {}
        }
        self.check_ledger_postgres()?;
        if !(1..=MAX_HOLD_TTL_SECS).contains(&ledger.hold_ttl_secs) {
            return Err(self.error(
                "ledger.hold_ttl_secs",
                format!("{} is out of range; give 1 to {MAX_HOLD_TTL_SECS} (longer than your longest run)", ledger.hold_ttl_secs),
            ));
        }
        Ok(())
    }

    /// `[ledger] url` and `password_env`: only with kind = "postgres", which needs a URL that
    /// parses and holds no password.
    fn check_ledger_postgres(&self) -> Result<(), ConfigError> {
        let ledger = &self.ledger;
        let only = "is only used with kind = \"postgres\"; remove it, or set kind = \"postgres\"";
        if ledger.kind != LedgerKind::Postgres {
            return match (&ledger.url, &ledger.password_env) {
                (Some(_), _) => Err(self.error("ledger.url", only)),
                (None, Some(_)) => Err(self.error("ledger.password_env", only)),
                (None, None) => Ok(()),
            };
        }
        let Some(url) = &ledger.url else {
            return Err(self.error(
                "ledger.url",
                "is required with kind = \"postgres\", such as \"postgres://genpipe@127.0.0.1:5432/genpipe\" (the \
                 password comes from the environment: PGPASSWORD, or the variable password_env names)",
            ));
        };
        let parsed = url.parse::<tokio_postgres::Config>().map_err(|e| {
            self.error(
                "ledger.url",
                format!(
                    "is not a PostgreSQL URL ({e}); write it as \"postgres://USER@HOST:PORT/DATABASE\", or \
                     \"postgres:///DATABASE?host=/SOCKET/DIR&user=USER\" for a Unix socket"
                ),
            )
        })?;
        if parsed.get_password().is_some() {
            return Err(self.error(
                "ledger.url",
                "holds a password; remove it from the URL and put it in the environment: PGPASSWORD, or the variable \
                 that [ledger] password_env names",
            ));
        }
        if let Some(name) = &ledger.password_env
            && (name.is_empty() || name.contains(['=', '\0']))
        {
            return Err(self.error("ledger.password_env", "must name an environment variable, such as \"GENPIPE_PGPASSWORD\""));
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
            if step.id.len() > MAX_STEP_ID_LEN || !step.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(self.error(
                    format!("{key}.id"),
                    format!(
                        "step id '{}' may hold only letters, digits, '-' and '_', at most {MAX_STEP_ID_LEN} of them \
                         (it names the step in URLs and in the credit journal)",
                        step.id
                    ),
                ));
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

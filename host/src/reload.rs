//! Reloading the configuration while traffic flows.
//!
//! Rules:
//! - reloads take turns (the host's configuration lock is held for the whole reload);
//! - the new registry is built off the request path, on a blocking thread: every plugin is
//!   read, checked against its pin, compiled (or taken from the compile cache, or reused when
//!   its component and settings did not change), linked against the host functions and checked
//!   against its world; the pipelines are resolved against it;
//! - any error leaves the registry in service untouched, and is returned;
//! - success replaces the registry in one atomic store: runs admitted before keep the plugins
//!   they were admitted with (they hold them), runs admitted after use the new ones;
//! - plugins, their limits and settings, pipelines and accounts reload. A new account gets its
//!   configured credits once, as at startup; no balance and no open hold is ever touched;
//! - settings a reload cannot apply (the listen address, the ledger, `[runtime]`...) are
//!   named in the report as needing a restart, and left as they are.

use std::sync::Arc;

use serde::Serialize;

use crate::config::{AccountConfig, Config};
use crate::host::{Host, HostError, grant_initial_credits};
use crate::pipeline::{Change, LoadError, Registry};

/// What a reload did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// Whether anything changed (the registry or the accounts).
    pub changed: bool,
    /// Plugins added, removed or updated (with their digests before and after).
    pub plugins: Vec<Change>,
    /// Pipelines added, removed or updated.
    pub pipelines: Vec<Change>,
    /// Accounts the configuration added (granted their initial credits).
    pub accounts_added: Vec<String>,
    /// Accounts whose API key the configuration changed.
    pub accounts_rekeyed: Vec<String>,
    /// Settings that changed but take effect only after a restart.
    pub needs_restart: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration or a plugin is wrong.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Granting a new account its credits failed.
    #[error(transparent)]
    Grant(#[from] HostError),
}

impl Host {
    /// Loads `config` and puts it in service (see the module's rules).
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        let mut current = self.config.lock().await;
        let in_service = self.registry();
        let (runtime, loading, previous) = (self.runtime_arc(), config.clone(), Arc::clone(&in_service));
        let registry = tokio::task::spawn_blocking(move || Registry::load(&runtime, &loading, Some(&previous)))
            .await
            .map_err(|e| LoadError::Internal(format!("loading the plugins failed: {e}")))??;
        let changes = registry.changes_from(&in_service);
        let accounts_added: Vec<AccountConfig> =
            config.accounts.iter().filter(|a| !current.accounts.iter().any(|c| c.id == a.id)).cloned().collect();
        grant_initial_credits(self.ledger(), &accounts_added).await?;
        let accounts_rekeyed = config
            .accounts
            .iter()
            .filter(|a| {
                current.accounts.iter().any(|c| c.id == a.id && (c.api_key != a.api_key || c.api_key_sha256 != a.api_key_sha256))
            })
            .map(|a| a.id.clone())
            .collect::<Vec<_>>();
        let needs_restart = current.restart_changes(&config);
        if !changes.is_empty() {
            self.swap_registry(registry);
        }
        let report = ReloadReport {
            changed: !changes.is_empty() || !accounts_added.is_empty() || !accounts_rekeyed.is_empty(),
            plugins: changes.plugins,
            pipelines: changes.pipelines,
            accounts_added: accounts_added.into_iter().map(|a| a.id).collect(),
            accounts_rekeyed,
            needs_restart,
        };
        // What needs a restart stays as it is in service, and keeps being reported.
        let mut applied = config;
        applied.server = current.server.clone();
        applied.runtime = current.runtime.clone();
        applied.credits = current.credits.clone();
        applied.ledger = current.ledger.clone();
        *current = applied;
        Ok(report)
    }
}

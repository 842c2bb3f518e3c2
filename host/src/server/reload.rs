//! Reloading the configuration file of `genpipe serve`: `POST /v1/admin/reload`, `SIGHUP` and
//! `--watch` all come here.
//!
//! A reload reads the file again and hands it to [`Host::reload`] (which states what reloads
//! and how); once the host took it, the accounts' API keys follow. A failed reload changes
//! nothing, is logged, counted in `genpipe_reloads_total{outcome="failed"}`, and answered
//! with its reason.
//!
//! Watching: the folders of the config file and of every plugin file are watched; a change to
//! one of those files (writes settle for [`DEBOUNCE`]) triggers a reload, after which the set
//! of watched files follows the new configuration.
//!
//! [`Host::reload`]: crate::Host::reload

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use notify_debouncer_mini::notify::{RecursiveMode, Watcher};
use notify_debouncer_mini::{DebounceEventResult, new_debouncer};

use super::AppState;
use super::auth::Admin;
use super::problem::Problem;
use crate::ReloadReport;
use crate::config::Config;

/// How long file changes must settle before `--watch` reloads.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Reads the configuration file again and puts it in service; `trigger` names what asked, for
/// the log.
pub async fn reload(state: &AppState, trigger: &str) -> Result<ReloadReport, String> {
    let outcome = load_and_apply(state).await;
    let metrics = state.host.metrics();
    match &outcome {
        Ok(report) if report.changed || !report.needs_restart.is_empty() => {
            metrics.reload("applied");
            tracing::info!(
                trigger,
                plugins = ?report.plugins,
                pipelines = ?report.pipelines,
                accounts_added = ?report.accounts_added,
                needs_restart = ?report.needs_restart,
                "configuration reloaded"
            );
        }
        Ok(_) => {
            metrics.reload("unchanged");
            tracing::info!(trigger, "configuration reloaded: nothing changed");
        }
        Err(error) => {
            metrics.reload("failed");
            tracing::warn!(trigger, "reload refused, the configuration in service goes on: {error}");
        }
    }
    outcome
}

async fn load_and_apply(state: &AppState) -> Result<ReloadReport, String> {
    let Some(path) = &state.config_path else {
        return Err("the server runs the built-in configuration, which cannot change; start it with \
                    --config FILE to reload"
            .into());
    };
    let config = Config::load(Some(path)).map_err(|e| e.to_string())?;
    let report = state.host.reload(config).await.map_err(|e| e.to_string())?;
    state.keys.reload(&*state.host.config.lock().await);
    Ok(report)
}

/// Reloads the configuration file and answers with what changed (admin key).
///
/// Any error (a syntax error, a missing or broken plugin, a digest that does not match) keeps
/// the configuration in service and is answered 422 with the reason.
#[utoipa::path(post, path = "/v1/admin/reload", tag = "admin", operation_id = "reloadConfig",
    responses((status = 200, description = "What the reload changed", body = ReloadReport),
        (status = 422, description = "The reload was refused", body = Problem)),
    security(("admin_key" = [])))]
pub async fn route(State(state): State<AppState>, _: Admin) -> Result<Json<ReloadReport>, Problem> {
    reload(&state, "POST /v1/admin/reload")
        .await
        .map(Json)
        .map_err(|error| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "reload-refused", error))
}

/// The files a reload of `config` reads: the file itself and every plugin file.
fn watched_files(path: &Path, config: &Config) -> BTreeSet<PathBuf> {
    let plugins = config.plugins.values().filter(|p| !p.path.starts_with("builtin:")).map(|p| config.base_dir.join(&p.path));
    std::iter::once(path.to_path_buf()).chain(plugins).map(|file| absolute(&file)).collect()
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Watches the configuration file and its plugin files, reloading on every change, until the
/// process ends. Fails if the file system cannot be watched.
pub fn watch(state: AppState) -> Result<(), String> {
    let Some(path) = state.config_path.clone() else {
        return Err("--watch needs --config FILE: the built-in configuration cannot change".into());
    };
    let (changes, mut changed) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut debouncer = new_debouncer(DEBOUNCE, move |events: DebounceEventResult| match events {
        Ok(events) => {
            let _ = changes.send(events.into_iter().map(|e| e.path).collect());
        }
        Err(error) => tracing::warn!("watching the configuration failed: {error}"),
    })
    .map_err(|e| format!("cannot watch files: {e}"))?;
    // The first watches are in place before this returns (before the server answers), so no
    // change made from then on is missed.
    let mut watched = Watched::default();
    watched.follow(&path, debouncer.watcher());
    tokio::spawn(async move {
        loop {
            loop {
                let Some(paths) = changed.recv().await else { return };
                if paths.iter().any(|p| watched.files.contains(&absolute(p))) {
                    break;
                }
            }
            let _ = reload(&state, "--watch").await;
            watched.follow(&path, debouncer.watcher());
        }
    });
    Ok(())
}

/// The files a reload reads, and the folders watched to see them change.
#[derive(Default)]
struct Watched {
    files: BTreeSet<PathBuf>,
    folders: BTreeSet<PathBuf>,
}

impl Watched {
    /// Follows the files of the configuration at `path` (the last known ones while it does not
    /// load): watches the folders newly needed and stops watching those no longer needed.
    fn follow(&mut self, path: &Path, watcher: &mut dyn Watcher) {
        if let Ok(config) = Config::load(Some(path)) {
            self.files = watched_files(path, &config);
        } else if self.files.is_empty() {
            self.files.insert(absolute(path));
        }
        let wanted: BTreeSet<PathBuf> = self.files.iter().filter_map(|f| f.parent().map(Path::to_path_buf)).collect();
        for folder in wanted.difference(&self.folders) {
            if let Err(e) = watcher.watch(folder, RecursiveMode::NonRecursive) {
                tracing::warn!(folder = %folder.display(), "cannot watch this folder: {e}");
            }
        }
        for folder in self.folders.difference(&wanted) {
            let _ = watcher.unwatch(folder);
        }
        self.folders = wanted;
    }
}

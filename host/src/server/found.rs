//! Finding a caller's run: in this replica's store, or, with a ledger replicas share, in the
//! database (a run another replica executes or executed), and waiting for such a run to end.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::time::Instant;

use super::AppState;
use super::auth::Caller;
use super::openapi::is_id;
use super::problem::Problem;
use crate::state::runs::Run;
use crate::state::shared::{RECHECK, SharedError, SharedRun, SharedRuns};

/// A caller's run.
pub enum FoundRun {
    /// Executing, or executed, here.
    Local(Arc<Run>),
    /// Another replica's, as the database has it.
    Shared(SharedRun),
}

impl FoundRun {
    /// The run as clients read it.
    pub fn snapshot(&self) -> serde_json::Value {
        match self {
            FoundRun::Local(run) => serde_json::to_value(run.snapshot()).unwrap_or_default(),
            FoundRun::Shared(run) => run.snapshot.clone(),
        }
    }
}

/// 503 for a database that cannot be used.
pub fn unavailable(error: &SharedError) -> Problem {
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "shared-store-unavailable", format!("{error}; retry in a moment"))
        .retry_after(1)
}

/// The caller's run `id`, here or in the shared store; 400 for a malformed id, 404 for a run
/// that is not the caller's or does not exist.
pub async fn find_run(state: &AppState, caller: &Caller, id: &str) -> Result<FoundRun, Problem> {
    if !is_id(id) {
        return Err(Problem::bad_request(format!(
            "'{id}' is not a run id: run ids are 1 to 64 letters, digits, '-' or '_' (as in the `id` of POST /v1/runs)"
        )));
    }
    let not_found = || {
        Problem::not_found(format!(
            "no run '{id}' for this account (ended runs are kept for a while, then forgotten; a deleted run is gone)"
        ))
    };
    if let Some(run) = state.host.runs().get(id) {
        return if run.account() == caller.0 { Ok(FoundRun::Local(run)) } else { Err(not_found()) };
    }
    let Some(shared) = state.host.shared() else { return Err(not_found()) };
    match shared.run(id).await {
        Ok(Some(run)) if run.account == caller.0 => Ok(FoundRun::Shared(run)),
        Ok(_) => Err(not_found()),
        Err(e) => Err(unavailable(&e)),
    }
}

/// Waits until another replica's run `id` is no longer running, or `deadline`; returns it as
/// it then is (`None` once deleted).
pub async fn wait_shared(shared: &SharedRuns, id: &str, deadline: Instant) -> Result<Option<SharedRun>, SharedError> {
    let mut changes = shared.changes();
    loop {
        let run = shared.run(id).await?;
        if run.as_ref().is_none_or(|run| !run.running) || Instant::now() >= deadline {
            return Ok(run);
        }
        let wake = Instant::now() + RECHECK;
        let _ = tokio::time::timeout_at(wake.min(deadline), next_change(&mut changes, id)).await;
    }
}

/// Waits for a notification about run `id` (or one that any run may have changed).
pub async fn next_change(changes: &mut tokio::sync::broadcast::Receiver<Arc<str>>, id: &str) {
    loop {
        match changes.recv().await {
            Ok(changed) if &*changed == id || &*changed == "*" => return,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// How long a remote cancellation may take before the run is answered as it stands.
pub const CANCEL_WAIT: Duration = Duration::from_secs(30);

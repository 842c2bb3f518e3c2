//! `/v1/runs`: start a run, read it, cancel it, fetch its outputs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::auth::Caller;
use super::extract::{IdempotencyKey, JsonBody, PreferWait};
use super::problem::Problem;
use crate::RunInput;
use crate::state::runs::{Run, RunSnapshot, StepOutput};

/// Body of `POST /v1/runs`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// Name of a pipeline (see `GET /v1/pipelines`).
    pub pipeline: String,
    /// What to generate from.
    pub input: RunInputBody,
    /// Parameters for every step: numbers, strings or booleans (seed, max_tokens, width...).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// The run's input.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInputBody {
    /// The prompt.
    pub prompt: String,
}

impl StartRun {
    fn into_input(self) -> Result<(String, RunInput), Problem> {
        let mut params = BTreeMap::new();
        for (key, value) in self.params {
            let text = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => {
                    return Err(Problem::bad_request(format!(
                        "params.{key} must be a number, a string or a boolean, not {other}"
                    )));
                }
            };
            params.insert(key, text);
        }
        Ok((self.pipeline, RunInput { prompt: self.input.prompt, params }))
    }
}

/// The caller's run `id`, or 404 (another account's run is not found either).
pub fn owned_run(state: &AppState, caller: &Caller, id: &str) -> Result<Arc<Run>, Problem> {
    state.host.runs().get(id).filter(|run| run.account() == caller.0).ok_or_else(|| {
        Problem::not_found(format!("no run '{id}' for this account (ended runs are kept for a while, then forgotten)"))
    })
}

/// Starts a run.
///
/// Answers 202 with the run at once, or with `Prefer: wait=N`, when the run ends (200) or after
/// N seconds with the run as it stands (202). With `Idempotency-Key`, a retry with the same
/// body returns the same run and starts nothing.
#[utoipa::path(post, path = "/v1/runs", tag = "runs", request_body = StartRun,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and body return the first run"),
        ("Prefer" = Option<String>, Header, description = "`wait=N`: answer when the run ends, or after N seconds"),
    ),
    responses(
        (status = 200, description = "The run ended (with Prefer: wait)", body = RunSnapshot),
        (status = 202, description = "The run started", body = RunSnapshot),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 402, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 413, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem),
    ),
    security(("api_key" = [])))]
pub async fn start(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKey(key): IdempotencyKey,
    PreferWait(wait): PreferWait,
    body: JsonBody<StartRun>,
) -> Result<Response, Problem> {
    let (pipeline, input) = body.value.into_input()?;
    let admit = {
        let (host, account) = (Arc::clone(&state.host), caller.0.clone());
        async move {
            let run = host.start_run(&account, &pipeline, input).await?;
            Ok(serde_json::Value::String(run.id().to_string()))
        }
    };
    let (outcome, replayed) = match key {
        Some(key) => state.idempotency.run_once(&format!("{}/runs", caller.0), &key, body.hash, admit).await,
        None => (admit.await, false),
    };
    let id = outcome?;
    let id = id.as_str().unwrap_or_default();
    let run = owned_run(&state, &caller, id)?;
    let wait = wait.map(|seconds| Duration::from_secs(seconds.min(state.config.max_wait_secs)));
    // 200 only for a caller who waited for the end: without `Prefer: wait` the answer does not
    // depend on how fast the run was.
    let (snapshot, ended) = match wait {
        Some(wait) => match tokio::time::timeout(wait, run.wait()).await {
            Ok(ended) => (ended, true),
            Err(_) => (run.snapshot(), false),
        },
        None => (run.snapshot(), false),
    };
    let status = if ended { StatusCode::OK } else { StatusCode::ACCEPTED };
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/runs/{id}")) {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok((status, headers, Json(snapshot)).into_response())
}

/// Reads a run: status, steps, credits, errors.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = RunSnapshot), (status = 401, body = Problem), (status = 404, body = Problem)),
    security(("api_key" = [])))]
pub async fn get(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Json<RunSnapshot>, Problem> {
    Ok(Json(owned_run(&state, &caller, &id)?.snapshot()))
}

/// Cancels a run: its plugins see it through `status.cancelled()` and are stopped if they
/// ignore it; the credits follow the charging policy. Answers once the run has ended.
#[utoipa::path(delete, path = "/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, description = "The run as it ended", body = RunSnapshot), (status = 401, body = Problem), (status = 404, body = Problem)),
    security(("api_key" = [])))]
pub async fn cancel(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Json<RunSnapshot>, Problem> {
    let run = owned_run(&state, &caller, &id)?;
    run.cancel();
    Ok(Json(run.wait().await))
}

/// A step's output: its text (`text/plain`) or its image (`image/png`).
#[utoipa::path(get, path = "/v1/runs/{id}/outputs/{step}", tag = "runs",
    params(("id" = String, Path, description = "Run id"), ("step" = String, Path, description = "Step id")),
    responses(
        (status = 200, description = "The output", content((String = "text/plain"), (Vec<u8> = "image/png"))),
        (status = 401, body = Problem), (status = 404, body = Problem),
    ),
    security(("api_key" = [])))]
pub async fn output(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, step)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let run = owned_run(&state, &caller, &id)?;
    let snapshot = run.snapshot();
    let Some(view) = snapshot.steps.iter().find(|s| *s.id == *step) else {
        let steps: Vec<_> = snapshot.steps.iter().map(|s| &*s.id).collect();
        return Err(Problem::not_found(format!("run '{id}' has no step '{step}'; its steps: {}", steps.join(", "))));
    };
    match run.output(&step).as_deref() {
        Some(StepOutput::Text { text, .. }) => {
            Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text.clone()).into_response())
        }
        Some(StepOutput::Image { bytes, mime_type, .. }) => {
            Ok(([(header::CONTENT_TYPE, mime_type.clone())], bytes.clone()).into_response())
        }
        None => Err(Problem::not_found(format!("step '{step}' has no output (it is {})", view.status))),
    }
}

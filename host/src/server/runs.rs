//! `/v1/runs`: start a run, read it, cancel it, fetch its outputs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::auth::Caller;
use super::extract::{IdempotencyKey, JsonBytes, PreferWait, json_whole_number};
use super::found::{CANCEL_WAIT, FoundRun, find_run, unavailable, wait_shared};
use super::idempotency;
use super::openapi::{ID_PATTERN, is_id};
use super::problem::Problem;
use crate::RunInput;
use crate::pipeline::request::{MAX_IMAGE_SIDE, MAX_TOKENS};
use crate::state::runs::{Run, RunSnapshot, StepOutput};
use crate::state::shared::AfterCancel;

/// Body of `POST /v1/runs`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// Name of a pipeline (see `GET /v1/pipelines`).
    pub pipeline: String,
    /// What to generate from.
    pub input: RunInputBody,
    /// Parameters for every step (see [`PARAMS`]).
    #[serde(default)]
    #[schema(schema_with = params_schema)]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// The run's input.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInputBody {
    /// The prompt.
    pub prompt: String,
}

/// A run parameter the host reads itself, with the values it takes.
#[derive(Debug, Clone, Copy)]
pub struct KnownParam {
    /// Its name.
    pub name: &'static str,
    /// Its values: a whole number (`Some` bounds) or any number from 0 to `max_number`.
    pub whole: Option<(u64, u64)>,
    /// Largest value of a number parameter.
    pub max_number: f64,
}

/// The parameters the host reads (for the steps whose world has them; `seed` for every step).
/// Any other parameter takes a string, a number or a boolean, and reaches the plugins as text.
pub const PARAMS: [KnownParam; 5] = [
    KnownParam { name: "max_tokens", whole: Some((1, MAX_TOKENS as u64)), max_number: 0.0 },
    KnownParam { name: "temperature", whole: None, max_number: 5.0 },
    KnownParam { name: "seed", whole: Some((0, u64::MAX)), max_number: 0.0 },
    KnownParam { name: "width", whole: Some((1, MAX_IMAGE_SIDE as u64)), max_number: 0.0 },
    KnownParam { name: "height", whole: Some((1, MAX_IMAGE_SIDE as u64)), max_number: 0.0 },
];

/// The schema of `params`: [`PARAMS`] with their ranges; other names match [`ID_PATTERN`] and
/// take a string, a number or a boolean.
fn params_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, SchemaType, Type};
    let mut schema = ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::Object))
        .description(Some(
            "Parameters for every step, overriding the pipeline's: the ones listed here are checked by the host; \
             any other name (letters, digits, `-`, `_`) takes a string, a number or a boolean, passed to the plugins as text",
        ))
        .property_names(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some(ID_PATTERN))))
        .additional_properties(Some(AdditionalProperties::RefOr(
            ObjectBuilder::new().schema_type(SchemaType::from_iter([Type::String, Type::Number, Type::Boolean])).build().into(),
        )));
    for param in PARAMS {
        let property = match param.whole {
            Some((min, max)) => ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(min)).maximum(Some(max)),
            None => ObjectBuilder::new().schema_type(Type::Number).minimum(Some(0)).maximum(Some(param.max_number)),
        };
        schema = schema.property(param.name, property);
    }
    schema.build()
}

/// Reads a body of `POST /v1/runs`: the pipeline's name and the run's input, or a 400 problem
/// that names what does not fit. Used for every request, and by the fuzz target of the body.
pub fn parse_start_run(body: &[u8]) -> Result<(String, RunInput, [u8; 32]), Problem> {
    let (start, hash) = super::extract::parse_json::<StartRun>(body)?;
    let (pipeline, input) = start.into_input()?;
    Ok((pipeline, input, hash))
}

impl StartRun {
    /// The run's input, its parameters checked as [`PARAMS`] says and turned into text.
    pub fn into_input(self) -> Result<(String, RunInput), Problem> {
        let mut params = BTreeMap::new();
        for (key, value) in self.params {
            if !is_id(&key) {
                return Err(Problem::bad_request(format!(
                    "params: the name '{key}' must be 1 to 64 letters, digits, '-' or '_'"
                )));
            }
            let text = match PARAMS.iter().find(|p| p.name == key) {
                Some(known) => known_param(known, &value)?,
                None => match value {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(Problem::bad_request(format!(
                            "params.{key} must be a number, a string or a boolean, not {other}"
                        )));
                    }
                },
            };
            params.insert(key, text);
        }
        Ok((self.pipeline, RunInput { prompt: self.input.prompt, params }))
    }
}

/// The text of a known parameter's value, if it is in range.
fn known_param(param: &KnownParam, value: &serde_json::Value) -> Result<String, Problem> {
    let name = param.name;
    let Some(number) = value.as_number() else {
        let expected = match param.whole {
            Some((min, max)) => format!("a whole number from {min} to {max}"),
            None => format!("from 0 to {}", param.max_number),
        };
        return Err(Problem::bad_request(format!("params.{name} must be a number ({expected}), not {value}")));
    };
    match param.whole {
        Some((min, max)) => match json_whole_number(number) {
            Some(n) if (min..=max).contains(&n) => Ok(n.to_string()),
            _ => Err(Problem::bad_request(format!("params.{name} must be a whole number from {min} to {max}, got '{number}'"))),
        },
        None => match number.as_f64() {
            Some(x) if (0.0..=param.max_number).contains(&x) => Ok(x.to_string()),
            _ => Err(Problem::bad_request(format!(
                "params.{name} must be a number from 0 to {}, got '{number}'",
                param.max_number
            ))),
        },
    }
}

/// Starts a run.
///
/// Answers 202 with the run at once, or with `Prefer: wait=N`, when the run ends (200) or after
/// N seconds with the run as it stands (202). With `Idempotency-Key`, a retry with the same
/// body returns the same run and starts nothing.
#[utoipa::path(post, path = "/v1/runs", tag = "runs", operation_id = "startRun", request_body = StartRun,
    params(
        ("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,255}$",
            description = "Makes retries safe: the same key and body return the first run (1 to 255 visible ASCII characters)"),
        ("Prefer" = Option<String>, Header,
            description = "`wait=N`: answer when the run ends, or after N seconds (at most `max_wait_secs`); other \
                preferences, and a `wait` that is not a whole number of at most 9 digits, are ignored (RFC 7240)"),
    ),
    responses(
        (status = 200, description = "The run ended (with `Prefer: wait`)", body = RunSnapshot,
            headers(("Location" = String, description = "The run's URL"))),
        (status = 202, description = "The run started", body = RunSnapshot,
            headers(("Location" = String, description = "The run's URL"))),
        (status = 402, description = "Not enough credits for the pipeline's hold", body = Problem),
        (status = 404, description = "No such pipeline", body = Problem),
        (status = 409, description = "A request with this Idempotency-Key is still in flight", body = Problem),
        (status = 422, description = "This Idempotency-Key was used with another body", body = Problem),
        (status = 429, description = "Over the request rate, or `max_runs_in_flight` runs are in flight", body = Problem),
    ),
    security(("api_key" = [])))]
pub async fn start(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKey(key): IdempotencyKey,
    PreferWait(wait): PreferWait,
    JsonBytes(body): JsonBytes,
) -> Result<Response, Problem> {
    let (pipeline, input, hash) = parse_start_run(&body)?;
    let admit = {
        let (host, account) = (Arc::clone(&state.host), caller.0.clone());
        async move {
            let run = host.start_run(&account, &pipeline, input).await?;
            Ok(serde_json::Value::String(run.id().to_string()))
        }
    };
    let (outcome, replayed) = match (key, state.host.shared()) {
        (Some(key), Some(shared)) => {
            idempotency::run_once_shared(Arc::clone(shared), &format!("{}/runs", caller.0), &key, hash, admit).await
        }
        (Some(key), None) => state.idempotency.run_once(&format!("{}/runs", caller.0), &key, hash, admit).await,
        (None, _) => (admit.await, false),
    };
    let id = outcome?;
    let id = id.as_str().unwrap_or_default();
    let run = find_run(&state, &caller, id).await?;
    let wait = wait.map(|seconds| Duration::from_secs(seconds.min(state.config.max_wait_secs)));
    // 200 only for a caller who waited for the end: without `Prefer: wait` the answer does not
    // depend on how fast the run was.
    let (snapshot, ended) = match (wait, run) {
        (None, run) => (run.snapshot(), false),
        (Some(wait), FoundRun::Local(run)) => match tokio::time::timeout(wait, run.wait()).await {
            Ok(ended) => {
                copied_to_shared(&state, &run).await;
                (serde_json::to_value(ended).unwrap_or_default(), true)
            }
            Err(_) => (serde_json::to_value(run.snapshot()).unwrap_or_default(), false),
        },
        (Some(wait), FoundRun::Shared(run)) => {
            let shared = state.host.shared().expect("a shared run comes from the shared store");
            match wait_shared(shared, id, Instant::now() + wait).await.map_err(|e| unavailable(&e))? {
                Some(now) => (now.snapshot, !now.running),
                None => (run.snapshot, false),
            }
        }
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

/// With a shared store, copies `run` (which ended) there before its end is answered, so that a
/// client who reads it next on another replica finds it ended too.
pub async fn copied_to_shared(state: &AppState, run: &Arc<Run>) {
    if let Some(shared) = state.host.shared()
        && let Err(e) = shared.copy_end(run).await
    {
        // The mirror copies it once the database answers again.
        tracing::warn!(run = %run.id(), "{e}");
    }
}

/// Reads a run: status, steps, credits, errors.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs", operation_id = "getRun",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Run id")),
    responses((status = 200, body = RunSnapshot), (status = 404, description = "No such run for this account", body = Problem)),
    security(("api_key" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Problem> {
    Ok(Json(find_run(&state, &caller, &id).await?.snapshot()))
}

/// Cancels a run and keeps it: its plugins see the cancellation through `status.cancelled()`
/// and are stopped if they ignore it; the credits follow the charging policy. Answers with the
/// run as it ended (a run that had already ended is answered as it is); the run, its events
/// and its outputs stay readable.
#[utoipa::path(post, path = "/v1/runs/{id}/cancel", tag = "runs", operation_id = "cancelRun",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Run id")),
    responses((status = 200, description = "The run as it ended", body = RunSnapshot),
        (status = 404, description = "No such run for this account", body = Problem)),
    security(("api_key" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Problem> {
    Ok(Json(cancelled(&state, &caller, &id, AfterCancel::Keep).await?))
}

/// Cancels a run (as `POST /v1/runs/{id}/cancel` does) and deletes it. Answers with the run as
/// it ended; afterwards the run, its events and its outputs are gone (404).
#[utoipa::path(delete, path = "/v1/runs/{id}", tag = "runs", operation_id = "deleteRun",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Run id")),
    responses((status = 200, description = "The run as it ended, now deleted", body = RunSnapshot),
        (status = 404, description = "No such run for this account", body = Problem)),
    security(("api_key" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Problem> {
    let ended = cancelled(&state, &caller, &id, AfterCancel::Delete).await?;
    if let Some(shared) = state.host.shared() {
        shared.delete(&id).await.map_err(|e| unavailable(&e))?;
    }
    Ok(Json(ended))
}

/// Cancels the caller's run `id`, here or on the replica that executes it, and returns it as it
/// ended, after `then`.
async fn cancelled(state: &AppState, caller: &Caller, id: &str, then: AfterCancel) -> Result<serde_json::Value, Problem> {
    match find_run(state, caller, id).await? {
        FoundRun::Local(run) => {
            run.cancel();
            let ended = run.wait().await;
            match then {
                AfterCancel::Keep => copied_to_shared(state, &run).await,
                AfterCancel::Delete => state.host.runs().delete(&run),
            }
            Ok(serde_json::to_value(ended).unwrap_or_default())
        }
        FoundRun::Shared(run) => {
            let shared = state.host.shared().expect("a shared run comes from the shared store");
            shared.request_cancel(id, then).await.map_err(|e| unavailable(&e))?;
            let ended = wait_shared(shared, id, Instant::now() + CANCEL_WAIT).await.map_err(|e| unavailable(&e))?;
            Ok(ended.map_or(run.snapshot, |ended| ended.snapshot))
        }
    }
}

/// A step's output: its text (`text/plain`) or its image (`image/png`).
#[utoipa::path(get, path = "/v1/runs/{id}/outputs/{step}", tag = "runs", operation_id = "getRunOutput",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Run id"),
        ("step" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Step id")),
    responses(
        (status = 200, description = "The output", content((String = "text/plain"), (Vec<u8> = "image/png"))),
        (status = 404, description = "No such run for this account, no such step, or no output (yet)", body = Problem),
    ),
    security(("api_key" = [])))]
pub async fn output(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, step)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let run = find_run(&state, &caller, &id).await?;
    if !is_id(&step) {
        return Err(Problem::bad_request(format!("'{step}' is not a step id: step ids are 1 to 64 letters, digits, '-' or '_'")));
    }
    let snapshot = run.snapshot();
    let steps: Vec<&str> = snapshot["steps"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_str()).collect();
    let Some(index) = steps.iter().position(|s| *s == step) else {
        return Err(Problem::not_found(format!("run '{id}' has no step '{step}'; its steps: {}", steps.join(", "))));
    };
    let output = match &run {
        FoundRun::Local(run) => run.output(&step).map(|output| match &*output {
            StepOutput::Text { text, .. } => ("text/plain; charset=utf-8".to_string(), text.clone().into_bytes()),
            StepOutput::Image { bytes, mime_type, .. } => (mime_type.clone(), bytes.clone()),
        }),
        FoundRun::Shared(_) => {
            let shared = state.host.shared().expect("a shared run comes from the shared store");
            shared.output(&id, &step).await.map_err(|e| unavailable(&e))?
        }
    };
    match output {
        Some((mime_type, bytes)) => Ok(([(header::CONTENT_TYPE, mime_type)], bytes).into_response()),
        None => {
            let status = snapshot["steps"][index]["status"].as_str().unwrap_or("unknown");
            Err(Problem::not_found(format!("step '{step}' has no output (it is {status})")))
        }
    }
}

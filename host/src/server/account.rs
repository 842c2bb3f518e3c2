//! The caller's account, the catalogue (pipelines, plugins) and the admin routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::{Admin, Caller};
use super::extract::{IdempotencyKey, JsonBody, QueryParams, optional_whole_number, whole_json_number};
use super::openapi::is_id;
use super::problem::Problem;
use crate::state::ledger::{Entry, HistoryQuery, Ledger, LedgerError, MAX_CREDITS};
use crate::state::runs::RunStatus;

/// How many recent runs `GET /v1/account` lists.
const RECENT_RUNS: usize = 20;

/// The caller's account.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccountView {
    /// Account id.
    pub id: String,
    /// Credits owned (held ones included).
    pub balance: u64,
    /// Credits reserved by runs in flight.
    pub held: u64,
    /// Credits a new run may reserve.
    pub available: u64,
    /// The latest runs, newest first.
    pub recent_runs: Vec<RunSummary>,
}

/// A run in a listing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunSummary {
    /// Run id.
    pub id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Status.
    pub status: RunStatus,
    /// Credits posted, once ended.
    pub posted: Option<u64>,
}

/// A pipeline in the catalogue.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PipelineView {
    /// Name to start it by.
    pub name: String,
    /// What it makes.
    pub description: String,
    /// Credits a run reserves (the sum of its steps' max_cost).
    pub hold: u64,
    /// Its steps.
    pub steps: Vec<StepInfo>,
}

/// A step in the catalogue.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StepInfo {
    /// Step id.
    pub id: String,
    /// Its plugin.
    pub plugin: String,
    /// Most credits it may charge.
    pub max_cost: u64,
    /// Steps it waits for.
    pub after: Vec<String>,
}

/// A plugin in the catalogue.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PluginView {
    /// Name.
    pub name: String,
    /// World: llm-step or image-step.
    pub world: String,
    /// The SHA-256 of its component, `sha256:HEX`.
    pub digest: String,
    /// When this component was loaded, in milliseconds since the Unix epoch.
    pub loaded_at_ms: u64,
    /// Memory limit in MiB.
    pub memory_mb: u64,
    /// Time limit of one call in milliseconds.
    pub timeout_ms: u128,
    /// Fuel of one call, if metered.
    pub fuel: Option<u64>,
    /// Most bytes of output of one step (streamed and final together).
    pub max_output_bytes: u64,
    /// Most host calls of one step.
    pub max_host_calls: u32,
    /// Most bytes one step may write to the host's log.
    pub max_log_bytes: u64,
}

fn ledger_problem(error: LedgerError) -> Problem {
    match error {
        LedgerError::Conflict(_) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "this Idempotency-Key was already used for another grant; use a new key",
        ),
        LedgerError::InvalidAmount(amount) => Problem::new(
            StatusCode::CONFLICT,
            "credits-overflow",
            format!("granting {amount} would take the credits of all accounts past {MAX_CREDITS}; grant less"),
        ),
        other => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "ledger-unavailable", other.to_string()).retry_after(1),
    }
}

/// The caller's balance, held credits and recent runs.
#[utoipa::path(get, path = "/v1/account", tag = "account", operation_id = "getAccount",
    responses((status = 200, body = AccountView)), security(("api_key" = [])))]
pub async fn get(State(state): State<AppState>, caller: Caller) -> Result<Json<AccountView>, Problem> {
    let balance = match state.host.ledger().balance(&caller.0).await {
        Ok(balance) => balance,
        Err(LedgerError::UnknownAccount(_)) => Default::default(),
        Err(other) => return Err(ledger_problem(other)),
    };
    let recent_runs = state
        .host
        .runs()
        .of_account(&caller.0, RECENT_RUNS)
        .iter()
        .map(|run| {
            let snapshot = run.snapshot();
            RunSummary { id: snapshot.id, pipeline: snapshot.pipeline, status: snapshot.status, posted: snapshot.posted }
        })
        .collect();
    Ok(Json(AccountView {
        id: caller.0,
        balance: balance.balance,
        held: balance.held,
        available: balance.available(),
        recent_runs,
    }))
}

/// Query of `GET /v1/account/ledger`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LedgerQuery {
    /// Only entries after this id: the `next_after` of the previous page (default: from the start).
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[param(value_type = Option<u64>, minimum = 0)]
    pub after: Option<u64>,
    /// Entries per page, 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[param(value_type = Option<u64>, minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
    /// Only the entries of this run.
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub run: Option<String>,
}

/// A page of the caller's journal.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LedgerPage {
    /// Entries in journal order.
    pub entries: Vec<Entry>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<u64>,
}

/// Pages through the caller's journal: grants, holds, charges, posts and releases.
#[utoipa::path(get, path = "/v1/account/ledger", tag = "account", operation_id = "getAccountLedger", params(LedgerQuery),
    responses((status = 200, body = LedgerPage)), security(("api_key" = [])))]
pub async fn ledger(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<LedgerQuery>,
) -> Result<Json<LedgerPage>, Problem> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_request(format!("limit must be from 1 to 1000, got {limit}")));
    }
    if let Some(run) = query.run.as_deref().filter(|run| !is_id(run)) {
        return Err(Problem::bad_request(format!("run '{run}' is not a run id: 1 to 64 letters, digits, '-' or '_'")));
    }
    let limit = limit as usize;
    let history = HistoryQuery { run: query.run, after: query.after.unwrap_or(0), limit };
    let entries = state.host.ledger().history(&caller.0, &history).await.map_err(ledger_problem)?;
    let next_after = (entries.len() == limit).then(|| entries.last().map(|e| e.id)).flatten();
    Ok(Json(LedgerPage { entries, next_after }))
}

/// The pipelines this server runs.
#[utoipa::path(get, path = "/v1/pipelines", tag = "catalogue", operation_id = "listPipelines",
    responses((status = 200, body = [PipelineView])), security(("api_key" = [])))]
pub async fn pipelines(State(state): State<AppState>, _: Caller) -> Json<Vec<PipelineView>> {
    let registry = state.host.registry();
    Json(
        registry
            .pipelines
            .values()
            .map(|p| PipelineView {
                name: p.name.to_string(),
                description: p.description.clone(),
                hold: p.hold().unwrap_or(u64::MAX),
                steps: p
                    .steps
                    .iter()
                    .map(|s| StepInfo {
                        id: s.id.to_string(),
                        plugin: s.plugin.name().to_string(),
                        max_cost: s.max_cost,
                        after: s.after.iter().map(|&i| p.steps[i].id.to_string()).collect(),
                    })
                    .collect(),
            })
            .collect(),
    )
}

/// The plugins this server has loaded.
#[utoipa::path(get, path = "/v1/plugins", tag = "catalogue", operation_id = "listPlugins",
    responses((status = 200, body = [PluginView])), security(("api_key" = [])))]
pub async fn plugins(State(state): State<AppState>, _: Caller) -> Json<Vec<PluginView>> {
    let registry = state.host.registry();
    let plugins = registry.plugins.values().map(|p| {
        let settings = p.settings();
        PluginView {
            name: settings.name.to_string(),
            world: settings.world.to_string(),
            digest: p.digest().to_string(),
            loaded_at_ms: p.loaded_at_ms(),
            memory_mb: settings.memory_bytes >> 20,
            timeout_ms: settings.timeout.as_millis(),
            fuel: settings.fuel,
            max_output_bytes: settings.max_output_bytes,
            max_host_calls: settings.max_host_calls,
            max_log_bytes: settings.max_log_bytes,
        }
    });
    Json(plugins.collect())
}

/// Body of `POST /v1/admin/accounts`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    /// Account id: 1 to 64 letters, digits, `-` or `_`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub id: String,
    /// Initial credits.
    #[serde(default, deserialize_with = "whole_json_number")]
    #[schema(maximum = 9223372036854775807_u64)]
    pub credits: u64,
}

/// A created account and its API key (shown once).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedAccount {
    /// Account id.
    pub id: String,
    /// Its API key: keep it, it is not shown again.
    pub api_key: String,
    /// Its balance.
    pub balance: u64,
}

/// Creates an account with an API key and initial credits (admin; idempotent with
/// `Idempotency-Key`).
#[utoipa::path(post, path = "/v1/admin/accounts", tag = "admin", operation_id = "createAccount", request_body = CreateAccount,
    params(("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,255}$", description = "Makes retries safe")),
    responses((status = 201, body = CreatedAccount),
        (status = 409, description = "The account exists, an earlier request with this key is in flight, or the credits would overflow", body = Problem),
        (status = 422, description = "This Idempotency-Key was used with another body", body = Problem)),
    security(("admin_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    _: Admin,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<CreateAccount>,
) -> Result<(StatusCode, Json<serde_json::Value>), Problem> {
    let request = body.value;
    if !is_id(&request.id) {
        return Err(Problem::bad_request("id must be 1 to 64 letters, digits, '-' or '_'"));
    }
    if request.credits > MAX_CREDITS {
        return Err(Problem::bad_request(format!("credits must be at most {MAX_CREDITS}")));
    }
    let work = {
        let state = state.clone();
        async move {
            if state.keys.has_account(&request.id) {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "account-exists",
                    format!("account '{}' already exists", request.id),
                ));
            }
            let ledger: &Arc<dyn Ledger> = state.host.ledger();
            let balance = if request.credits > 0 {
                ledger
                    .grant(&format!("create:{}", request.id), &request.id, request.credits)
                    .await
                    .map_err(ledger_problem)?
                    .balance
            } else {
                0
            };
            // Issued once the credits are granted: a refused grant leaves no account behind.
            let api_key = state.keys.issue(&request.id);
            serde_json::to_value(CreatedAccount { id: request.id, api_key, balance })
                .map_err(|e| Problem::bad_request(e.to_string()))
        }
    };
    let (outcome, _) = match key {
        Some(key) => state.idempotency.run_once("admin/accounts", &key, body.hash, work).await,
        None => (work.await, false),
    };
    Ok((StatusCode::CREATED, Json(outcome?)))
}

/// Body of `POST /v1/admin/accounts/{id}/grants`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Credits to add (at least 1).
    #[serde(deserialize_with = "whole_json_number")]
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub amount: u64,
}

/// An account's credits after a grant.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GrantResult {
    /// Account id.
    pub account: String,
    /// Its balance now.
    pub balance: u64,
    /// Its held credits now.
    pub held: u64,
}

/// Adds credits to an account (admin). With `Idempotency-Key`, the grant happens once: the
/// ledger records it under that key, so a retry, even after a restart, changes nothing.
#[utoipa::path(post, path = "/v1/admin/accounts/{id}/grants", tag = "admin", operation_id = "grantCredits", request_body = Grant,
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Account id"),
        ("Idempotency-Key" = Option<String>, Header, pattern = r"^[!-~]{1,255}$", description = "Makes retries safe")),
    responses((status = 200, body = GrantResult),
        (status = 409, description = "The credits of all accounts would pass 2^63-1", body = Problem),
        (status = 422, description = "This Idempotency-Key was used for another grant", body = Problem)),
    security(("admin_key" = [])))]
pub async fn grant(
    State(state): State<AppState>,
    _: Admin,
    Path(account): Path<String>,
    IdempotencyKey(key): IdempotencyKey,
    body: JsonBody<Grant>,
) -> Result<Json<GrantResult>, Problem> {
    if !is_id(&account) {
        return Err(Problem::bad_request(format!("'{account}' is not an account id: 1 to 64 letters, digits, '-' or '_'")));
    }
    let amount = body.value.amount;
    if !(1..=MAX_CREDITS).contains(&amount) {
        return Err(Problem::bad_request(format!("amount {amount} is not valid: give 1 to {MAX_CREDITS}")));
    }
    // The ledger keeps the grant under this id: reusing the key for another account or
    // amount is a conflict (422), repeating it exactly changes nothing.
    let grant_id = match key {
        Some(key) => format!("grant:{key}"),
        None => format!("grant:{}", uuid::Uuid::new_v4()),
    };
    let balance = state.host.ledger().grant(&grant_id, &account, amount).await.map_err(ledger_problem)?;
    Ok(Json(GrantResult { account, balance: balance.balance, held: balance.held }))
}

//! The OpenAPI 3.1 document, `GET /openapi.json`: the contract of the service.
//!
//! The routes' annotations (utoipa) declare each operation, its parameters with their exact
//! schemas, its successes and the refusals only it makes. [`contract`] then applies the rules
//! every operation shares, so that the document lists every status a route can answer:
//! - every operation with a parameter or a body may answer 400; with a key, 401; with a JSON
//!   body, 408 (body too slow), 413 and 415; with an account's key, 429 (its request rate);
//!   every route but the event stream, 503 (`request_timeout_secs`, or the ledger unavailable);
//! - every error is `application/problem+json` ([`Problem`](super::Problem)); 429 and 503 carry `Retry-After`;
//! - integers are as wide as the Rust types behind them (`uint64` up to 2^64-1), so that a
//!   tester probing the bounds finds the ones the server enforces;
//! - the run's routes are linked from `POST /v1/runs`, so that a stateful tester can follow a run;
//! - the `pipeline` of a new run is one of the pipelines this server serves now (set per
//!   request by [`document`]).
//!
//! `scripts/api-contract.sh` runs schemathesis against a live server to hold the server to it.

use std::sync::OnceLock;

use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use super::{account, events, reload, runs};

/// What ids (runs, steps, accounts) and parameter names look like in URLs and bodies.
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// True when `id` matches [`ID_PATTERN`].
pub fn is_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The routes' annotations, before [`contract`].
#[derive(OpenApi)]
#[openapi(
    info(title = "genpipe", description = "Runs AI generation pipelines made of WebAssembly component plugins."),
    paths(
        runs::start, runs::get, runs::cancel, runs::delete, runs::output, events::stream,
        account::get, account::ledger, account::pipelines, account::plugins, account::create, account::grant, reload::route,
        super::healthz, super::readyz, super::metrics, super::openapi_json,
    ),
    components(schemas(crate::state::runs::EventKind)),
    tags((name = "runs"), (name = "account"), (name = "catalogue"), (name = "admin"), (name = "operations")),
)]
pub struct ApiDoc;

/// The document for a server that serves `pipelines`.
pub fn document<'a>(pipelines: impl IntoIterator<Item = &'a str>) -> Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    let mut doc = DOCUMENT
        .get_or_init(|| {
            let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
            contract(&mut doc);
            doc
        })
        .clone();
    let names: Vec<Value> = pipelines.into_iter().map(|name| Value::String(name.to_string())).collect();
    if !names.is_empty()
        && let Some(pipeline) = doc.pointer_mut("/components/schemas/StartRun/properties/pipeline")
    {
        pipeline["enum"] = Value::Array(names);
    }
    doc
}

/// The route the request time limit does not cover.
const EVENTS_PATH: &str = "/v1/runs/{id}/events";

/// Applies the rules in the module docs to a document generated from the annotations.
pub fn contract(doc: &mut Value) {
    doc["components"]["securitySchemes"] = json!({
        "api_key": { "type": "http", "scheme": "bearer", "description": "An account's API key: `Authorization: Bearer KEY`" },
        "admin_key": { "type": "http", "scheme": "bearer", "description": "The admin key: `Authorization: Bearer ADMIN_KEY`" },
    });
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            for operation in item.as_object_mut().into_iter().flat_map(|item| item.values_mut()) {
                shared_refusals(path, operation);
            }
        }
        if let Some(events) = paths.get_mut(EVENTS_PATH).and_then(|item| item.get_mut("get")) {
            events["responses"]["200"]["content"] = json!({ "text/event-stream": { "schema": sse_event() } });
        }
        if let Some(start) = paths.get_mut("/v1/runs").and_then(|item| item.get_mut("post")) {
            for status in ["200", "202"] {
                start["responses"][status]["links"] = run_links();
                start["responses"][status]["headers"]["Location"]["required"] = json!(true);
            }
        }
    }
    exact_integers(doc);
}

/// Adds the refusals `operation` shares with others (module docs), and makes every error a
/// problem document.
fn shared_refusals(path: &str, operation: &mut Value) {
    // An optional parameter is absent or a value, never `null`: no header or query carries one.
    for parameter in operation.get_mut("parameters").and_then(Value::as_array_mut).into_iter().flatten() {
        if let Some(kinds) = parameter["schema"]["type"].as_array_mut() {
            kinds.retain(|kind| kind != "null");
            if let [kind] = kinds.as_slice() {
                parameter["schema"]["type"] = kind.clone();
            }
        }
    }
    let schemes: Vec<String> = operation["security"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|requirement| requirement.keys().cloned())
        .collect();
    let has_body = operation.get("requestBody").is_some();
    let has_params = operation["parameters"].as_array().is_some_and(|p| !p.is_empty());
    let mut shared = Vec::new();
    if has_params || has_body {
        shared.push(("400", "Malformed: a parameter or the body does not fit its schema; `detail` says which and why"));
    }
    if !schemes.is_empty() {
        shared.push(("401", "No key, or not a key of this route's scheme"));
    }
    if has_body {
        shared.push(("408", "The body did not arrive within `body_read_timeout_secs`"));
        shared.push(("413", "The body is larger than `max_body_bytes`"));
        shared.push(("415", "The body is not `Content-Type: application/json`"));
    }
    if schemes.iter().any(|scheme| scheme == "api_key") {
        shared.push(("429", "The account is over its request rate (`rate_limit_per_sec`); retry after `Retry-After`"));
    }
    if path != EVENTS_PATH {
        shared.push(("503", "Took longer than `request_timeout_secs`, or the ledger is unavailable; retry after `Retry-After`"));
    }
    let responses = operation["responses"].as_object_mut().expect("every operation has responses");
    for (status, description) in shared {
        responses.entry(status).or_insert_with(|| json!({ "description": description }));
    }
    for (status, response) in responses.iter_mut() {
        if status.as_str() < "400" {
            continue;
        }
        response["content"] = json!({ "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } });
        if matches!(status.as_str(), "429" | "503") {
            response["headers"] = json!({ "Retry-After": {
                "description": "Seconds to wait before retrying",
                "required": true,
                "schema": { "type": "integer", "minimum": 1 },
            } });
        }
    }
}

/// The routes of a run, reached from the run `POST /v1/runs` answers with.
fn run_links() -> Value {
    let id = json!({ "id": "$response.body#/id" });
    json!({
        "GetRun": { "operationId": "getRun", "parameters": id, "description": "Read the run" },
        "StreamRunEvents": { "operationId": "streamRunEvents", "parameters": id, "description": "Follow its events" },
        "GetRunOutput": {
            "operationId": "getRunOutput",
            "parameters": { "id": "$response.body#/id", "step": "$response.body#/steps/0/id" },
            "description": "Fetch its first step's output",
        },
        "CancelRun": { "operationId": "cancelRun", "parameters": id, "description": "Cancel it" },
        "DeleteRun": { "operationId": "deleteRun", "parameters": id, "description": "Cancel and delete it" },
    })
}

/// One event of the stream as a client's SSE parser sees it: its `id` is the sequence number,
/// its `event` the type, its `data` the JSON of a `RunEvent`.
fn sse_event() -> Value {
    let types = ["step_started", "progress", "text", "step_ended", "run_ended"];
    json!({
        "type": "object",
        "required": ["id", "event", "data"],
        "properties": {
            "id": { "type": "string", "pattern": "^[0-9]{1,20}$" },
            "event": { "type": "string", "enum": types },
            "data": { "type": "string", "contentMediaType": "application/json", "contentSchema": { "$ref": "#/components/schemas/RunEvent" } },
        },
    })
}

/// Widens utoipa's `int32`/`int64` to the unsigned Rust types behind a `minimum: 0`, with
/// their maximum unless a tighter one is declared.
fn exact_integers(value: &mut Value) {
    match value {
        Value::Object(object) => {
            unsigned(object);
            object.values_mut().for_each(exact_integers);
        }
        Value::Array(items) => items.iter_mut().for_each(exact_integers),
        _ => {}
    }
}

fn unsigned(schema: &mut Map<String, Value>) {
    let is_integer = match schema.get("type") {
        Some(Value::String(kind)) => kind == "integer",
        Some(Value::Array(kinds)) => kinds.iter().any(|k| k == "integer"),
        _ => false,
    };
    let unsigned_min = schema.get("minimum").and_then(Value::as_f64).is_some_and(|min| min >= 0.0);
    if !is_integer || !unsigned_min {
        return;
    }
    let (format, max) = match schema.get("format").and_then(Value::as_str) {
        Some("int32") => ("uint32", json!(u32::MAX)),
        Some("int64") => ("uint64", json!(u64::MAX)),
        _ => return,
    };
    schema.insert("format".into(), json!(format));
    schema.entry("maximum").or_insert(max);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_a_problem_document_and_integers_are_exact() {
        let doc = document(["noop"]);
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                assert!(operation["operationId"].is_string(), "{method} {path} has an operationId");
                for (status, response) in operation["responses"].as_object().unwrap() {
                    if status.as_str() >= "400" {
                        let content = response["content"].as_object().unwrap();
                        assert_eq!(content.keys().collect::<Vec<_>>(), ["application/problem+json"], "{method} {path} {status}");
                    }
                }
                if path != EVENTS_PATH {
                    assert!(operation["responses"]["503"].is_object(), "{method} {path} documents its time limit");
                }
            }
        }
        assert_eq!(doc["components"]["schemas"]["StartRun"]["properties"]["pipeline"]["enum"], json!(["noop"]));
        let amount = &doc["components"]["schemas"]["Grant"]["properties"]["amount"];
        assert_eq!((amount["format"].as_str(), amount["minimum"].as_u64()), (Some("uint64"), Some(1)));
        let links = &doc["paths"]["/v1/runs"]["post"]["responses"]["202"]["links"];
        assert_eq!(links["GetRun"]["parameters"]["id"], "$response.body#/id");
    }

    #[test]
    fn ids_are_what_the_pattern_says() {
        assert!(is_id("run_0195f3") && is_id("a-b_C9") && is_id(&"x".repeat(64)));
        assert!(!is_id("") && !is_id("a b") && !is_id("ü") && !is_id(&"x".repeat(65)) && !is_id("a/b"));
    }
}

//! The HTTP service of `genpipe serve`: the runs API, live events, accounts, metrics.
//!
//! What a client can make the service spend is bounded (see [`connections`] and [`limits`]):
//! open connections, the time to send a request's head and body, the body's size, event streams
//! per run and per account, and each account's request rate. Every refusal is a problem
//! document, and the OpenAPI document ([`openapi`]) lists every status each route answers.
//!
//! Shutdown rules ([`serve`]): on the shutdown signal the listener stops accepting and
//! `/readyz` turns 503; runs in flight get `shutdown_grace_secs` to finish, the rest are
//! cancelled; once every run has ended (every hold settled or released), the open connections
//! (event streams, waiting requests) complete and `serve` returns.

mod account;
mod auth;
pub mod connections;
mod events;
mod extract;
mod found;
mod idempotency;
pub mod limits;
pub mod openapi;
mod problem;
pub mod reload;
mod runs;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

pub use auth::hash_key;
pub use events::resume_after;
pub use openapi::ApiDoc;
pub use problem::Problem;
pub use runs::{PARAMS, StartRun, parse_start_run};

use crate::Host;
use crate::config::{Config, ServerConfig};

/// Shared state of the routes.
#[derive(Clone)]
pub struct AppState {
    host: Arc<Host>,
    config: Arc<ServerConfig>,
    keys: Arc<auth::Keys>,
    idempotency: Arc<idempotency::IdempotencyStore>,
    draining: Arc<AtomicBool>,
    /// The configuration file, reread by reloads; none for the built-in configuration.
    config_path: Option<Arc<Path>>,
    limits: Arc<limits::Limits>,
    connections: Arc<connections::Connections>,
}

impl AppState {
    /// State for `host` configured by `config`, read from `config_path` (none: built in).
    pub fn new(host: Arc<Host>, config: &Config, config_path: Option<&Path>) -> AppState {
        AppState {
            host,
            config: Arc::new(config.server.clone()),
            keys: Arc::new(auth::Keys::from_config(config)),
            idempotency: Arc::default(),
            draining: Arc::default(),
            config_path: config_path.map(Arc::from),
            limits: Arc::new(limits::Limits::new(&config.server)),
            connections: Arc::new(connections::Connections::new(config.server.max_connections)),
        }
    }
}

/// The router of the service.
pub fn router(state: AppState) -> Router {
    let timeout = Duration::from_secs(state.config.request_timeout_secs);
    let api = Router::new()
        .route("/v1/runs", post(runs::start))
        .route("/v1/runs/{id}", get(runs::get).delete(runs::delete))
        .route("/v1/runs/{id}/cancel", post(runs::cancel))
        .route("/v1/runs/{id}/outputs/{step}", get(runs::output))
        .route("/v1/account", get(account::get))
        .route("/v1/account/ledger", get(account::ledger))
        .route("/v1/pipelines", get(account::pipelines))
        .route("/v1/plugins", get(account::plugins))
        .route("/v1/admin/accounts", post(account::create))
        .route("/v1/admin/accounts/{id}/grants", post(account::grant))
        .route("/v1/admin/reload", post(reload::route))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .layer(middleware::from_fn_with_state(timeout, time_limit));
    // Event streams last as long as their run: no request time limit.
    let streams = Router::new().route("/v1/runs/{id}/events", get(events::stream));
    api.merge(streams)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(CatchPanicLayer::custom(|_| {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the server failed on this request; it has been logged")
                .into_response()
        }))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("the request took longer than {} s; any run it started goes on and settles its credits", limit.as_secs()),
        )
        .retry_after(1)
        .into_response(),
    }
}

async fn not_found(request: Request) -> Problem {
    Problem::not_found(format!("no route {} {}; see /openapi.json", request.method(), request.uri().path()))
}

async fn method_not_allowed(request: Request) -> Problem {
    let detail = format!("{} is not allowed on {}; see /openapi.json", request.method(), request.uri().path());
    Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", detail)
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", operation_id = "getHealth",
    responses((status = 200, description = "Alive", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: 200 while accepting runs; 503 once shutting down, or once a replica lost its lease.
#[utoipa::path(get, path = "/readyz", tag = "operations", operation_id = "getReadiness",
    responses((status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "Shutting down, a replica that lost its lease, or the request took too long", body = Problem)))]
async fn readyz(State(state): State<AppState>) -> Result<&'static str, Problem> {
    if state.draining.load(Ordering::Acquire) {
        return Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "the server is shutting down").retry_after(5));
    }
    if !state.host.ready() {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "lease-lost",
            "this replica lost its ledger lease (the database was out of reach for longer than the lease); it admits no \
             runs: restart it",
        )
        .retry_after(5));
    }
    Ok("ready")
}

/// Prometheus metrics: runs by pipeline and status, step latencies by plugin, credits, plugin
/// failures, runs in flight, open connections and event streams, requests refused by a limit.
#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "getMetrics",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let host = state.host.metrics().render(
        state.host.runs_in_flight(),
        state.host.runs().memory_used(),
        state.host.runtime().cache_stats(),
    );
    let mut text = host.strip_suffix("# EOF\n").unwrap_or(&host).to_string();
    for (name, kind, help, value) in [
        ("genpipe_http_connections", "gauge", "HTTP connections open.", state.connections.open() as u64),
        ("genpipe_event_streams", "gauge", "Event streams open.", state.limits.streams_open() as u64),
        (
            "genpipe_http_limited",
            "counter",
            "Requests refused for an account's rate or stream caps.",
            state.limits.limited_total(),
        ),
    ] {
        let sample = if kind == "counter" { format!("{name}_total") } else { name.to_string() };
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{sample} {value}\n"));
    }
    text.push_str("# EOF\n");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", operation_id = "getOpenApi",
    responses((status = 200, description = "The OpenAPI document", body = Object, content_type = "application/json")))]
async fn openapi_json(State(state): State<AppState>) -> Json<serde_json::Value> {
    let registry = state.host.registry();
    Json(openapi::document(registry.pipelines.keys().map(String::as_str)))
}

/// How often ended runs and old idempotency keys are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Serves `state` on `listener` until `shutdown` resolves, then drains (see the module docs).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sweeper = tokio::spawn(sweep(state.clone()));
    let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = router(state.clone());
    let header_read_timeout = Duration::from_secs(state.config.header_read_timeout_secs);
    let server = tokio::spawn(connections::serve(listener, app, Arc::clone(&state.connections), header_read_timeout, async {
        let _ = stopped.await;
    }));
    shutdown.await;
    state.draining.store(true, Ordering::Release);
    let _ = stop_accepting.send(());
    let grace = Duration::from_secs(state.config.shutdown_grace_secs);
    tracing::info!(runs_in_flight = state.host.runs_in_flight(), "shutting down: draining runs for up to {grace:?}");
    state.host.drain(grace).await;
    sweeper.abort();
    server.await.map_err(std::io::Error::other)?;
    tracing::info!("shut down: every run ended and every hold was settled or released");
    Ok(())
}

async fn sweep(state: AppState) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        every.tick().await;
        let runs = state.host.runs().evict_ended(Duration::from_secs(state.config.run_retention_secs));
        let keys = state.idempotency.sweep(Duration::from_secs(state.config.idempotency_ttl_secs));
        state.limits.sweep();
        if let Some(shared) = state.host.shared() {
            let (retention, ttl) = (state.config.run_retention_secs, state.config.idempotency_ttl_secs);
            if let Err(e) = shared.sweep(Duration::from_secs(retention), Duration::from_secs(ttl)).await {
                tracing::warn!("sweeping the shared run store failed: {e}");
            }
        }
        if runs + keys > 0 {
            tracing::debug!(runs, keys, "swept ended runs and expired idempotency keys");
        }
    }
}

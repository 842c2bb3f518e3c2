//! The HTTP service of `genpipe serve`: the runs API, live events, accounts, metrics.
//!
//! Shutdown rules ([`serve`]): on the shutdown signal the listener stops accepting and
//! `/readyz` turns 503; runs in flight get `shutdown_grace_secs` to finish, the rest are
//! cancelled; once every run has ended (every hold settled or released), the open connections
//! (event streams, waiting requests) complete and `serve` returns.

mod account;
mod auth;
mod events;
mod extract;
mod idempotency;
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
use utoipa::OpenApi;

pub use auth::hash_key;
pub use problem::Problem;

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
        }
    }
}

/// The OpenAPI document of the service, generated from the route annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "genpipe", description = "Runs AI generation pipelines made of WebAssembly component plugins."),
    paths(
        runs::start, runs::get, runs::cancel, runs::output, events::stream,
        account::get, account::ledger, account::pipelines, account::plugins, account::create, account::grant, reload::route,
        healthz, readyz, metrics, openapi_json,
    ),
    components(schemas(crate::state::runs::EventKind)),
    modifiers(&SecuritySchemes),
    tags((name = "runs"), (name = "account"), (name = "catalogue"), (name = "admin"), (name = "operations")),
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, description) in [("api_key", "An account's API key"), ("admin_key", "The admin key")] {
            let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(description)).build();
            components.add_security_scheme(name, SecurityScheme::Http(scheme));
        }
    }
}

/// The router of the service.
pub fn router(state: AppState) -> Router {
    let timeout = Duration::from_secs(state.config.request_timeout_secs);
    let api = Router::new()
        .route("/v1/runs", post(runs::start))
        .route("/v1/runs/{id}", get(runs::get).delete(runs::cancel))
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
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: 200 while accepting runs, 503 once shutting down.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready"), (status = 503, body = Problem)))]
async fn readyz(State(state): State<AppState>) -> Result<&'static str, Problem> {
    if state.draining.load(Ordering::Acquire) {
        return Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "the server is shutting down").retry_after(5));
    }
    Ok("ready")
}

/// Prometheus metrics: runs by pipeline and status, step latencies by plugin, credits, plugin
/// failures, runs in flight.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.host.metrics().render(state.host.runs().memory_used(), state.host.runtime().cache_stats()),
    )
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
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
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    shutdown.await;
    state.draining.store(true, Ordering::Release);
    let _ = stop_accepting.send(());
    let grace = Duration::from_secs(state.config.shutdown_grace_secs);
    tracing::info!(runs_in_flight = state.host.runs_in_flight(), "shutting down: draining runs for up to {grace:?}");
    state.host.drain(grace).await;
    sweeper.abort();
    server.await.map_err(std::io::Error::other)??;
    tracing::info!("shut down: every run ended and every hold was settled or released");
    Ok(())
}

async fn sweep(state: AppState) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        every.tick().await;
        let runs = state.host.runs().evict_ended(Duration::from_secs(state.config.run_retention_secs));
        let keys = state.idempotency.sweep(Duration::from_secs(state.config.idempotency_ttl_secs));
        if runs + keys > 0 {
            tracing::debug!(runs, keys, "swept ended runs and expired idempotency keys");
        }
    }
}

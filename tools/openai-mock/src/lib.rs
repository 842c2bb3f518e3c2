//! A local OpenAI-compatible server for genpipe's tests and for a demo without a key.
//!
//! Routes:
//! - `POST /v1/chat/completions`: a deterministic completion ([`completion`]) of the last user
//!   message, streamed as server-sent events (`stream: true`, one token per event, the usage
//!   event when `stream_options.include_usage` is set, then `data: [DONE]`) or answered whole with
//!   its `usage`;
//! - `POST /v1/images/generations`: a real PNG of the requested `size`, as `b64_json`;
//! - `GET /stats`: the counters of [`StatsSnapshot`], as JSON.
//!
//! Tokens are whitespace-separated words ([`count_tokens`]): a prompt's usage counts the words of
//! every message, a completion's its tokens. With an API key set ([`Options::api_key`]), a request
//! without `Authorization: Bearer <key>` gets 401.
//!
//! The `model` of a request chooses what goes wrong ([`Mode`]) by its prefix (`never-ends-2`
//! behaves as `never-ends`, with counters of its own); attempts are counted per endpoint and
//! model since the server started, so "fail twice, then succeed" is deterministic:
//!
//! | model starts with | chat completions | image generations |
//! |---|---|---|
//! | `missing` | 404, model not found | same |
//! | `fail-429-then-ok` | first attempt 429 with `Retry-After: 1`, then normal | same |
//! | `fail-500-then-ok` | first two attempts 500, then normal | same |
//! | `fail-500` | always 500 | same |
//! | `slow-first-byte` | waits [`Options::first_byte_delay`] before answering, then normal | same |
//! | `cut-stream` | closes the connection halfway through the body (tokens at least 10 ms apart) | normal |
//! | `malformed-stream` | an event (or body) that is not JSON after two tokens | normal |
//! | `stall` | one token, then silence with the connection open | normal |
//! | `never-ends` | tokens forever (at least 10 ms apart), never `[DONE]` | normal |
//! | `no-usage` | normal, but never sends `usage` | normal |
//! | `wrong-size` | normal | a PNG of half the requested width and height |
//! | anything else | normal | normal |

mod chat;
mod images;
mod stats;
mod text;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

pub use stats::{ModelStats, Stats, StatsSnapshot};
pub use text::{completion, count_tokens};

/// How the server behaves beyond what the model name chooses.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// When set, every request must carry `Authorization: Bearer <api_key>` (401 otherwise).
    pub api_key: Option<String>,
    /// Pause before each streamed token (the demo uses it so that tokens visibly stream).
    pub delay_per_token: Duration,
    /// How long the `slow-first-byte` model waits before answering.
    pub first_byte_delay: Duration,
}

/// What a request's model asks the server to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer normally.
    Normal,
    /// 404: the model does not exist.
    Missing,
    /// 429 with `Retry-After: 1` on the model's first attempt, then normal.
    Fail429ThenOk,
    /// 500 on the model's first two attempts, then normal.
    Fail500ThenOk,
    /// 500, always.
    Fail500,
    /// Wait [`Options::first_byte_delay`] before answering.
    SlowFirstByte,
    /// Close the connection halfway through the body.
    CutStream,
    /// Send an event (or body) that is not JSON.
    MalformedStream,
    /// One token, then silence.
    Stall,
    /// Tokens forever.
    NeverEnds,
    /// Never send `usage`.
    NoUsage,
    /// An image of half the requested size.
    WrongSize,
}

impl Mode {
    /// The mode a model name chooses, by its prefix: `never-ends-2` streams forever too, and
    /// keeps counters of its own.
    pub fn of(model: &str) -> Mode {
        const PREFIXES: [(&str, Mode); 11] = [
            ("missing", Mode::Missing),
            ("fail-429-then-ok", Mode::Fail429ThenOk),
            ("fail-500-then-ok", Mode::Fail500ThenOk),
            ("fail-500", Mode::Fail500),
            ("slow-first-byte", Mode::SlowFirstByte),
            ("cut-stream", Mode::CutStream),
            ("malformed-stream", Mode::MalformedStream),
            ("stall", Mode::Stall),
            ("never-ends", Mode::NeverEnds),
            ("no-usage", Mode::NoUsage),
            ("wrong-size", Mode::WrongSize),
        ];
        PREFIXES.iter().find(|(prefix, _)| model.starts_with(prefix)).map_or(Mode::Normal, |&(_, mode)| mode)
    }
}

/// The routes' shared state.
#[derive(Clone)]
struct AppState {
    options: Arc<Options>,
    stats: Arc<Stats>,
}

/// The server's routes, counting into `stats`.
pub fn router(options: Options, stats: Arc<Stats>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/images/generations", post(images::generations))
        .route("/stats", get(|state: axum::extract::State<AppState>| async move { axum::Json(state.stats.snapshot()) }))
        .with_state(AppState { options: Arc::new(options), stats })
}

/// Serves the routes on `listener` (with `TCP_NODELAY`, so streamed tokens leave at once),
/// counting connections into `stats`, until the returned future is dropped.
pub async fn serve(listener: TcpListener, options: Options, stats: Arc<Stats>) -> std::io::Result<()> {
    let app = router(options, Arc::clone(&stats));
    let listener = listener.tap_io(move |tcp: &mut TcpStream| {
        let _ = tcp.set_nodelay(true);
        stats.connection();
    });
    axum::serve(listener, app).await
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "message": message.into(), "type": kind, "code": null } });
    (status, axum::Json(body)).into_response()
}

/// The refusal a request gets before any work: a bad key, then what its model's mode and
/// attempt number call for. `None` lets the request through.
fn refusal(state: &AppState, headers: &HeaderMap, model: &str, attempt: u64) -> Option<Response> {
    if let Some(key) = &state.options.api_key {
        let expected = format!("Bearer {key}");
        if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return Some(error(StatusCode::UNAUTHORIZED, "invalid_request_error", "Incorrect API key provided."));
        }
    }
    match Mode::of(model) {
        Mode::Missing => Some(error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )),
        Mode::Fail429ThenOk if attempt == 1 => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "Rate limit reached; retry later.");
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Some(response)
        }
        Mode::Fail500ThenOk if attempt <= 2 => {
            Some(error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "The server had an error."))
        }
        Mode::Fail500 => Some(error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "The server had an error.")),
        _ => None,
    }
}

//! Running one step: a fresh `Store` and instance from the plugin's `InstancePre`, one call to
//! its `generate`, and the host's checks on what comes back.
//!
//! Stop rules, in order of precedence:
//! - the call returns (output or error) → that outcome;
//! - `timeout_ms` passes → [`StepFailure::Timeout`];
//! - the run is cancelled and the plugin has not returned within the grace period →
//!   [`StepFailure::Stopped`]. The instance is dropped mid-call; that is safe because the
//!   store is dropped with it and nothing else shares its memory.
//!
//! A plugin that loops without calling the host still yields at every epoch tick, so these
//! rules apply to it too.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wasmtime::Store;

use super::bindings::image::{ImageRequest, ImageResponse};
use super::bindings::llm::{LlmRequest, LlmResponse};
use super::bindings::types::StepError;
use super::plugin::{Plugin, PluginPre};
use super::step::StepState;
use crate::config::World;
use crate::pipeline::request::StepParams;
use crate::state::runs::StepOutput;

/// The request a step sends to its plugin's `generate`.
#[derive(Debug, Clone)]
pub enum StepRequest {
    /// For an `llm-step` plugin.
    Llm(LlmRequest),
    /// For an `image-step` plugin.
    Image(ImageRequest),
}

impl StepRequest {
    /// The request for a plugin of `world` with this prompt and these checked parameters.
    pub fn new(world: World, prompt: String, params: StepParams) -> StepRequest {
        match world {
            World::LlmStep => StepRequest::Llm(LlmRequest {
                prompt,
                max_tokens: params.max_tokens,
                temperature: params.temperature,
                seed: params.seed,
                params: params.extra,
            }),
            World::ImageStep => StepRequest::Image(ImageRequest {
                prompt,
                width: params.width,
                height: params.height,
                seed: params.seed,
                params: params.extra,
            }),
        }
    }
}

/// Why a step produced no output. The executor prefixes the step and plugin names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepFailure {
    /// The plugin returned `step-error`.
    #[error("the plugin returned an error: {0}")]
    Plugin(String),
    /// The plugin returned `step-error::cancelled`.
    #[error("the plugin stopped because the run was cancelled")]
    Cancelled,
    /// The plugin trapped (a panic, an `unreachable`, an out-of-bounds access).
    #[error("the plugin trapped: {0}")]
    Trap(String),
    /// A `memory.grow` beyond `memory_mb` was refused and the plugin then trapped.
    #[error(
        "the plugin exceeded its memory limit of {limit_mb} MiB (it asked for {asked_mb} MiB); raise memory_mb or make it use less"
    )]
    Memory {
        /// The configured limit.
        limit_mb: usize,
        /// The size it tried to grow to.
        asked_mb: usize,
    },
    /// `timeout_ms` passed.
    #[error("timed out after {0} ms; raise timeout_ms or make the plugin faster")]
    Timeout(u128),
    /// The run was cancelled and the plugin did not return within the grace period.
    #[error("stopped: it did not return within {0} ms of the run being cancelled")]
    Stopped(u128),
    /// The plugin returned something the host refuses.
    #[error("bad output: {0}")]
    BadOutput(String),
    /// A host function failed (the ledger, typically) and ended the call.
    #[error("host failure: {0}")]
    Host(String),
}

impl StepFailure {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StepFailure::Plugin(_) => "error",
            StepFailure::Cancelled => "cancelled",
            StepFailure::Trap(_) => "trap",
            StepFailure::Memory { .. } => "memory",
            StepFailure::Timeout(_) => "timeout",
            StepFailure::Stopped(_) => "stopped",
            StepFailure::BadOutput(_) => "bad_output",
            StepFailure::Host(_) => "host",
        }
    }
}

enum Response {
    Llm(LlmResponse),
    Image(ImageResponse),
}

/// Runs `plugin` on `request` in a fresh store holding `state`.
pub(crate) async fn invoke(
    plugin: &Plugin,
    engine: &wasmtime::Engine,
    state: StepState,
    request: StepRequest,
    cancel: &CancellationToken,
    grace: Duration,
) -> Result<StepOutput, StepFailure> {
    let timeout = plugin.settings().timeout;
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limits);
    store.set_epoch_deadline(1);
    store.epoch_deadline_async_yield_and_update(1);

    let expected_size = match &request {
        StepRequest::Image(r) => Some((r.width, r.height)),
        StepRequest::Llm(_) => None,
    };
    let outcome = {
        let call = call(&mut store, &plugin.pre, request);
        let stop = async {
            cancel.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            biased;
            outcome = tokio::time::timeout(timeout, call) => outcome.map_err(|_| StepFailure::Timeout(timeout.as_millis())),
            () = stop => Err(StepFailure::Stopped(grace.as_millis())),
        }
    };
    let state = store.data();
    match outcome? {
        Ok(Ok(Response::Llm(r))) => Ok(StepOutput::Text {
            text: r.text,
            prompt_tokens: r.usage.prompt_tokens,
            completion_tokens: r.usage.completion_tokens,
        }),
        Ok(Ok(Response::Image(r))) => {
            let (width, height) = expected_size.expect("an image response answers an image request");
            check_image(&r, width, height)?;
            Ok(StepOutput::Image { bytes: r.bytes, mime_type: r.mime_type, width, height })
        }
        Ok(Err(StepError::Cancelled)) => Err(StepFailure::Cancelled),
        Ok(Err(error)) => Err(StepFailure::Plugin(describe(&error))),
        Err(_) if state.host_failure.is_some() => Err(StepFailure::Host(state.host_failure.clone().unwrap_or_default())),
        Err(_) if state.limits.denied.is_some() => Err(StepFailure::Memory {
            limit_mb: state.plugin.memory_bytes >> 20,
            asked_mb: state.limits.denied.unwrap_or_default() >> 20,
        }),
        Err(trap) => {
            let cause = trap.root_cause().to_string();
            Err(StepFailure::Trap(match state.stderr_tail() {
                Some(tail) => format!("{cause} (plugin stderr: {tail})"),
                None => cause,
            }))
        }
    }
}

async fn call(
    store: &mut Store<StepState>,
    pre: &PluginPre,
    request: StepRequest,
) -> wasmtime::Result<Result<Response, StepError>> {
    match (pre, request) {
        (PluginPre::Llm(pre), StepRequest::Llm(request)) => {
            let instance = pre.instantiate_async(&mut *store).await?;
            Ok(instance.call_generate(&mut *store, &request).await?.map(Response::Llm))
        }
        (PluginPre::Image(pre), StepRequest::Image(request)) => {
            let instance = pre.instantiate_async(&mut *store).await?;
            Ok(instance.call_generate(&mut *store, &request).await?.map(Response::Image))
        }
        _ => wasmtime::bail!("the request does not match the plugin's world"),
    }
}

fn describe(error: &StepError) -> String {
    match error {
        StepError::InvalidInput(m) => format!("invalid input: {m}"),
        StepError::OutOfCredits(m) => format!("out of credits: {m}"),
        StepError::Cancelled => "cancelled".into(),
        StepError::Upstream(m) => format!("upstream service failed: {m}"),
        StepError::Internal(m) => format!("internal error: {m}"),
    }
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// Checks that an image response is a PNG of the requested size.
fn check_image(response: &ImageResponse, width: u32, height: u32) -> Result<(), StepFailure> {
    if response.mime_type != "image/png" {
        return Err(StepFailure::BadOutput(format!("MIME type '{}' is not supported; return image/png", response.mime_type)));
    }
    let bytes = &response.bytes;
    if bytes.len() < 24 || bytes[..8] != PNG_SIGNATURE || &bytes[12..16] != b"IHDR" {
        return Err(StepFailure::BadOutput(format!("the {} bytes returned are not a PNG image", bytes.len())));
    }
    let size = |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let (w, h) = (size(16), size(20));
    if (w, h) != (width, height) {
        return Err(StepFailure::BadOutput(format!("the PNG is {w}x{h} but {width}x{height} was requested")));
    }
    Ok(())
}

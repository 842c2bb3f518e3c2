//! Running one step: a fresh `Store` and instance from the plugin's `InstancePre`, one call to
//! its `generate`, and the host's checks on what comes back.
//!
//! Stop rules, in order of precedence:
//! - the call returns (output or error) → that outcome, where a limit the host enforced while
//!   the plugin ran (memory, host calls, a denied request) names the cause of a failure;
//! - `timeout_ms` passes → [`StepFailure::Timeout`];
//! - the run is cancelled and the plugin has not returned within the grace period →
//!   [`StepFailure::Stopped`]. The instance is dropped mid-call; that is safe because the
//!   store is dropped with it and nothing else shares its memory.
//!
//! A plugin that loops without calling the host still yields at every epoch tick, so these
//! rules apply to it too.

use std::task::Poll;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmtime::Store;

use super::Runtime;
use super::bindings::image::{ImageRequest, ImageResponse};
use super::bindings::llm::{LlmRequest, LlmResponse, TokenUsage};
use super::bindings::types::StepError;
use super::bindings::v0_2 as v2;
use super::failure::StepFailure;
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

enum Response {
    Llm(LlmResponse),
    Image(ImageResponse),
}

/// What one call of a plugin gave, and what it cost beyond its output.
pub(crate) struct Invocation {
    /// The output, or why there is none.
    pub outcome: Result<StepOutput, StepFailure>,
    /// Bytes of log dropped beyond `max_log_bytes`.
    pub log_dropped: u64,
    /// The most linear memory the instance had, in bytes.
    pub memory_peak: u64,
}

/// Runs `plugin` on `request` in a fresh store of `runtime` holding `state`; its timeout counts
/// from `started`.
pub(crate) async fn invoke(
    plugin: &Plugin,
    runtime: &Runtime,
    state: StepState,
    request: StepRequest,
    cancel: &CancellationToken,
    grace: Duration,
    started: Instant,
) -> Invocation {
    let settings = plugin.settings();
    let timeout = settings.timeout;
    let mut store = Store::new(runtime.engine(), state);
    store.limiter(|state| &mut state.limits);
    store.set_epoch_deadline(1);
    store.epoch_deadline_async_yield_and_update(1);
    if runtime.meters_fuel() {
        store.set_fuel(settings.fuel.unwrap_or(u64::MAX)).expect("the engine meters fuel");
    }

    let expected_size = match &request {
        StepRequest::Image(r) => Some((r.width, r.height)),
        StepRequest::Llm(_) => None,
    };
    let outcome = {
        // Boxed: wasmtime's futures are large, and the step's future, kept small, moves to a task
        // of its own when it has to wait.
        let mut call = Box::pin(call(&mut store, &plugin.pre, request));
        let deadline = tokio::time::Instant::from_std(started + timeout);
        let mut stop = std::pin::pin!(async {
            cancel.cancelled().await;
            tokio::time::sleep(grace).await;
        });
        // The timer is armed only once the call has to wait: a call that returns within its
        // first poll costs no timer, and the call's outcome always comes first.
        let mut timer = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(outcome) = call.as_mut().poll(cx) {
                return Poll::Ready(Ok(outcome));
            }
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(StepFailure::Timeout(timeout.as_millis())));
            }
            stop.as_mut().poll(cx).map(|()| Err(StepFailure::Stopped(grace.as_millis())))
        })
        .await
    };
    let state = store.data_mut();
    let (log_dropped, memory_peak) = (state.limits.log_dropped(), state.limits.memory_peak());
    let incident = state.limits.incident.get();
    let outcome = match outcome {
        Err(failure) => Err(failure),
        Ok(Ok(response)) => accept(response, expected_size, state),
        Ok(Err(trap)) if trap.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::OutOfFuel) => {
            Err(StepFailure::Fuel(settings.fuel.unwrap_or(u64::MAX)))
        }
        Ok(Err(trap)) => Err(incident.clone().unwrap_or_else(|| {
            let cause = trap.root_cause().to_string();
            StepFailure::Trap(match state.stderr_tail() {
                Some(tail) => format!("{cause} (plugin stderr: {tail})"),
                None => cause,
            })
        })),
    };
    let outcome = outcome.map_err(|failure| match failure {
        StepFailure::Plugin(message) => match incident {
            Some(StepFailure::Denied(why)) => StepFailure::Denied(format!("{why}; the plugin then returned: {message}")),
            Some(other) => other,
            None => StepFailure::Plugin(message),
        },
        other => other,
    });
    Invocation { outcome, log_dropped, memory_peak }
}

/// The host's checks on what `generate` returned: the plugin's own error, the output limit,
/// an image's format and size. Secrets are kept out of text and errors.
fn accept(
    response: Result<Response, StepError>,
    expected_size: Option<(u32, u32)>,
    state: &mut StepState,
) -> Result<StepOutput, StepFailure> {
    match response {
        Ok(Response::Llm(r)) => {
            state.limits.output(r.text.len())?;
            Ok(StepOutput::Text {
                text: state.plugin().redact(r.text),
                prompt_tokens: r.usage.prompt_tokens,
                completion_tokens: r.usage.completion_tokens,
            })
        }
        Ok(Response::Image(r)) => {
            state.limits.output(r.bytes.len())?;
            let (width, height) = expected_size.expect("an image response answers an image request");
            check_image(&r, width, height)?;
            Ok(StepOutput::Image { bytes: r.bytes, mime_type: r.mime_type, width, height })
        }
        Err(StepError::Cancelled) => Err(StepFailure::Cancelled),
        Err(error) => Err(StepFailure::Plugin(state.plugin().redact(describe(&error)))),
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
        (PluginPre::Llm2(pre), StepRequest::Llm(r)) => {
            let instance = pre.instantiate_async(&mut *store).await?;
            let request = v2::llm::LlmRequest {
                prompt: r.prompt,
                max_tokens: r.max_tokens,
                temperature: r.temperature,
                seed: r.seed,
                params: r.params,
            };
            let response = instance.call_generate(&mut *store, &request).await?;
            Ok(response.map_err(from_v2).map(|r| {
                let usage = TokenUsage { prompt_tokens: r.usage.prompt_tokens, completion_tokens: r.usage.completion_tokens };
                Response::Llm(LlmResponse { text: r.text, usage })
            }))
        }
        (PluginPre::Image2(pre), StepRequest::Image(r)) => {
            let instance = pre.instantiate_async(&mut *store).await?;
            let request =
                v2::image::ImageRequest { prompt: r.prompt, width: r.width, height: r.height, seed: r.seed, params: r.params };
            let response = instance.call_generate(&mut *store, &request).await?;
            Ok(response.map_err(from_v2).map(|r| Response::Image(ImageResponse { bytes: r.bytes, mime_type: r.mime_type })))
        }
        _ => wasmtime::bail!("the request does not match the plugin's world"),
    }
}

/// A 0.2.0 `step-error` as the host handles it (the same cases as 0.1.0's).
fn from_v2(error: v2::types::StepError) -> StepError {
    match error {
        v2::types::StepError::InvalidInput(m) => StepError::InvalidInput(m),
        v2::types::StepError::OutOfCredits(m) => StepError::OutOfCredits(m),
        v2::types::StepError::Cancelled => StepError::Cancelled,
        v2::types::StepError::Upstream(m) => StepError::Upstream(m),
        v2::types::StepError::Internal(m) => StepError::Internal(m),
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

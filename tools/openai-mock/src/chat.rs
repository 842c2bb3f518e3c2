//! `POST /v1/chat/completions`, streamed (server-sent events) or whole.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::stats::{Endpoint, Stats};
use crate::text::{completion, count_tokens, hash, word};
use crate::{AppState, Mode, error, refusal};

/// Shortest pause between the tokens of a `never-ends` or `cut-stream` stream, so that its
/// client has read the answer's head and some tokens before the stream goes wrong.
const MIN_PAUSE: Duration = Duration::from_millis(10);

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The handler.
pub(crate) async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", format!("invalid request body: {e}")),
    };
    let stats = &state.stats;
    let model = request.model.as_str();
    let attempt = stats.request(Endpoint::Chat, model);
    if let Some(refused) = refusal(&state, &headers, model, attempt) {
        stats.failed(Endpoint::Chat, model);
        return refused;
    }
    let max_tokens = request.max_completion_tokens.or(request.max_tokens).unwrap_or(64);
    let Some(prompt) = request.messages.iter().rev().find(|m| m.role == "user") else {
        stats.failed(Endpoint::Chat, model);
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "messages must include a user message");
    };
    if max_tokens == 0 {
        stats.failed(Endpoint::Chat, model);
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "max_tokens must be at least 1");
    }
    let mode = Mode::of(model);
    if mode == Mode::SlowFirstByte {
        tokio::time::sleep(state.options.first_byte_delay).await;
    }
    let tokens = completion(&prompt.content, max_tokens);
    let prompt_tokens: u32 = request.messages.iter().map(|m| count_tokens(&m.content)).sum();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": tokens.len(),
        "total_tokens": prompt_tokens as usize + tokens.len(),
    });
    let usage = (mode != Mode::NoUsage).then_some(usage);
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        let frames = script(mode, hash(&prompt.content), tokens, usage.filter(|_| include_usage));
        stream(Arc::clone(stats), model.to_string(), mode, frames, state.options.delay_per_token)
    } else {
        whole(stats, model, mode, &tokens.concat(), usage)
    }
}

/// One step of a streamed answer.
enum Frame {
    /// A chunk event with this JSON.
    Event(Value),
    /// A chunk event carrying this token, sent after the per-token pause.
    Token(String),
    /// An event whose data is not JSON.
    Malformed,
    /// `data: [DONE]`, the end.
    Done,
    /// Close the connection without ending the body.
    Cut,
    /// Keep the connection open and send nothing more.
    Stall,
}

/// The frames of a streamed answer in `mode`.
fn script(mode: Mode, seed: u64, tokens: Vec<String>, usage: Option<Value>) -> Box<dyn Iterator<Item = Frame> + Send> {
    let role = std::iter::once(Frame::Event(chunk(json!({ "role": "assistant", "content": "" }), None)));
    let half = tokens.len() / 2;
    let tokens = tokens.into_iter().map(Frame::Token);
    match mode {
        Mode::NeverEnds => Box::new(role.chain((0..).map(move |i| Frame::Token(word(seed, i))))),
        Mode::Stall => Box::new(role.chain(tokens.take(1)).chain([Frame::Stall])),
        Mode::CutStream => Box::new(role.chain(tokens.take(half)).chain([Frame::Cut])),
        Mode::MalformedStream => Box::new(role.chain(tokens.take(2)).chain([Frame::Malformed, Frame::Done])),
        _ => {
            let finish = Frame::Event(chunk(json!({}), Some("stop")));
            let usage = usage.map(|usage| {
                Frame::Event(json!({ "id": "chatcmpl-mock", "object": "chat.completion.chunk", "choices": [], "usage": usage }))
            });
            let frames: Vec<Frame> = role.chain(tokens).chain([finish]).chain(usage).chain([Frame::Done]).collect();
            Box::new(frames.into_iter())
        }
    }
}

/// A `chat.completion.chunk` with one choice.
fn chunk(delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish_reason }],
    })
}

/// Counts a streamed answer: open while it is being sent, and closed early when the client
/// went away before its end.
struct OpenStream {
    stats: Arc<Stats>,
    model: String,
    ended: bool,
}

impl OpenStream {
    fn new(stats: Arc<Stats>, model: String) -> OpenStream {
        stats.stream_opened();
        OpenStream { stats, model, ended: false }
    }

    /// The server ended the stream, successfully or on purpose with an error.
    fn end(&mut self, completed: bool) {
        self.ended = true;
        match completed {
            true => self.stats.completed(Endpoint::Chat, &self.model),
            false => self.stats.failed(Endpoint::Chat, &self.model),
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.stats.stream_closed(&self.model, !self.ended);
    }
}

/// A streamed answer: the frames as server-sent events.
fn stream(
    stats: Arc<Stats>,
    model: String,
    mode: Mode,
    frames: Box<dyn Iterator<Item = Frame> + Send>,
    pause: Duration,
) -> Response {
    let pause = match mode {
        Mode::NeverEnds | Mode::CutStream => pause.max(MIN_PAUSE),
        _ => pause,
    };
    let open = OpenStream::new(stats, model);
    let body = futures::stream::unfold((frames, open), move |(mut frames, mut open)| async move {
        let data = match frames.next()? {
            Frame::Event(json) => json.to_string(),
            Frame::Token(token) => {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                chunk(json!({ "content": token }), None).to_string()
            }
            Frame::Malformed => r#"{"choices": [{"delta": "#.to_string(),
            Frame::Done => {
                open.end(mode != Mode::MalformedStream);
                "[DONE]".to_string()
            }
            Frame::Cut => {
                open.end(false);
                return Some((Err(std::io::Error::other("the mock cut the stream on purpose")), (frames, open)));
            }
            Frame::Stall => std::future::pending().await,
        };
        Some((Ok(Bytes::from(format!("data: {data}\n\n"))), (frames, open)))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(body)).into_response()
}

/// A whole answer: the completion with its usage, or the body `mode` breaks.
fn whole(stats: &Stats, model: &str, mode: Mode, text: &str, usage: Option<Value>) -> Response {
    let mut answer = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop" }],
    });
    if let Some(usage) = usage {
        answer["usage"] = usage;
    }
    let answer = answer.to_string();
    let body = match mode {
        Mode::MalformedStream => Body::from(r#"{"choices": [{"message": "#),
        Mode::CutStream => {
            let half = Bytes::from(answer[..answer.len() / 2].to_string());
            let cut = std::io::Error::other("the mock cut the body on purpose");
            Body::from_stream(futures::stream::iter([Ok(half), Err(cut)]))
        }
        Mode::Stall | Mode::NeverEnds => Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>().boxed()),
        _ => {
            stats.completed(Endpoint::Chat, model);
            return ([(header::CONTENT_TYPE, "application/json")], answer).into_response();
        }
    };
    stats.failed(Endpoint::Chat, model);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

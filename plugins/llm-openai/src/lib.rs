//! An `llm-step` plugin that calls an OpenAI-compatible Chat Completions endpoint
//! (`POST {base_url}/v1/chat/completions`: OpenAI, vLLM, Ollama, llama.cpp's server, most
//! gateways) through `wasi:http`, so only where the operator's `allowed_hosts` lets it.
//!
//! Config (`[plugins.NAME] config = {...}`; any other key is an error):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `base_url` | required | the server's root, e.g. `https://api.openai.com` (a trailing `/v1` is dropped) |
//! | `model` | required | the model asked for |
//! | `api_key` | none | sent as `Authorization: Bearer`; give it as `{ env = "VAR" }` or `{ secret = "..." }` |
//! | `system_prompt` | none | sent as a `system` message before the prompt |
//! | `max_tokens` | none | a ceiling on the step's `max_tokens` |
//! | `stream` | `true` | stream the answer token by token, or ask for it whole |
//! | `request_timeout_ms` | the host's `http_timeout_ms` | limit of each wait: connecting, the first byte, between chunks |
//! | `price_prompt_per_1k`, `price_completion_per_1k` | 0 | credits per 1,000 prompt / completion tokens |
//! | `max_retries`, `retry_base_ms`, `retry_max_ms` | 3, 200, 5000 | retries of 429 and 5xx answers (see `upstream`) |
//!
//! The request: the step's prompt as the `user` message, `max_tokens` (the step's, lowered to the
//! config's ceiling and to what the budget can pay for), `temperature` and `seed` (its low 63
//! bits) as the step gives them (the host fills in its defaults, so the plugin has none of its
//! own: a `temperature` config key is refused, pointing at the step's `params`), and, when
//! streaming, `stream_options.include_usage` so that the server reports usage.
//!
//! Streaming: the server-sent events are parsed as they arrive; the content of each network chunk's
//! deltas is forwarded at once with one `output.emit`, and progress is reported every 5% of
//! `max_tokens`. `status.cancelled()` is checked between chunks: a cancelled step drops the
//! response, which closes the connection. The stream must end with `data: [DONE]`; a stream
//! that ends before it, or an event that is not JSON, fails the step.
//!
//! Charging, once per step after its one successful upstream call (failed attempts and failed
//! steps charge nothing):
//! - the tokens are the server's `usage` when it sends one; otherwise the content deltas counted
//!   (one token each) for the completion, and an estimate of one token per 4 bytes of the
//!   messages for the prompt (for a whole answer without `usage`, the same estimate of its text);
//! - cost = ⌈prompt tokens × `price_prompt_per_1k` / 1000⌉ + ⌈completion tokens ×
//!   `price_completion_per_1k` / 1000⌉: each part rounded up to a whole credit;
//! - never more than the step's budget (`credits.remaining()` at the start): the plugin asks for
//!   no more tokens than the budget can pay for after the prompt's estimated cost, and while
//!   streaming it stops reading before a delta whose cost would pass the budget (or one past
//!   `max_tokens`, from a server that ignores it), then ends cleanly with the text paid for. If
//!   the server's usage still costs more than the budget, the budget is what is charged.

mod sse;
mod upstream;

use genpipe_plugin_sdk::credits::ChargeError;
use genpipe_plugin_sdk::http::{HttpError, Response};
use genpipe_plugin_sdk::llm::{Guest, LlmRequest, LlmResponse, TokenUsage};
use genpipe_plugin_sdk::log::{self, Level};
use genpipe_plugin_sdk::status::{self, Stage};
use genpipe_plugin_sdk::{StepError, config, credits, output};
use serde::Deserialize;
use serde_json::json;

use sse::SseParser;
use upstream::{SERVER_KEYS, Server, error_message, number};

const PATH: &str = "/v1/chat/completions";
/// Config keys of this plugin besides the server's.
const KEYS: [&str; 5] = ["system_prompt", "max_tokens", "stream", "price_prompt_per_1k", "price_completion_per_1k"];

/// Credits per 1,000 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prices {
    prompt_per_1k: u64,
    completion_per_1k: u64,
}

impl Prices {
    /// What `prompt` and `completion` tokens cost, each part rounded up to a whole credit.
    fn cost(&self, prompt: u32, completion: u32) -> u64 {
        per_1k(prompt, self.prompt_per_1k).saturating_add(per_1k(completion, self.completion_per_1k))
    }

    /// The most completion tokens `budget` pays for after `prompt` tokens (`u32::MAX` when
    /// completions are free): the largest `n` with `cost(prompt, n) <= budget`.
    fn affordable_completion(&self, budget: u64, prompt: u32) -> u32 {
        let Some(left) = budget.checked_sub(per_1k(prompt, self.prompt_per_1k)) else { return 0 };
        match self.completion_per_1k {
            0 => u32::MAX,
            price => u32::try_from(u128::from(left) * 1000 / u128::from(price)).unwrap_or(u32::MAX),
        }
    }
}

/// ⌈tokens × price / 1000⌉, saturating.
fn per_1k(tokens: u32, price: u64) -> u64 {
    u64::try_from((u128::from(tokens) * u128::from(price)).div_ceil(1000)).unwrap_or(u64::MAX)
}

/// The estimate of a text's tokens when the server reports none: one per 4 bytes, rounded up.
fn estimate_tokens(text: &str) -> u32 {
    u32::try_from(text.len().div_ceil(4)).unwrap_or(u32::MAX)
}

/// This plugin's config.
struct Settings {
    server: Server,
    system_prompt: Option<String>,
    max_tokens: Option<u32>,
    stream: bool,
    prices: Prices,
}

impl Settings {
    fn from_config() -> Result<Settings, StepError> {
        if config::get("temperature").is_some() {
            return Err(StepError::InvalidInput(
                "config `temperature` is not read: the temperature is a step parameter (`params = { temperature = 0.7 }` \
                 in the pipeline, or --param temperature=0.7), and the host always sends one (1 by default)"
                    .into(),
            ));
        }
        let known: Vec<&str> = SERVER_KEYS.iter().chain(&KEYS).copied().collect();
        upstream::check_keys("llm-openai", &known)?;
        let max_tokens = number::<u32>("max_tokens")?;
        if max_tokens == Some(0) {
            return Err(StepError::InvalidInput("config `max_tokens` must be at least 1".into()));
        }
        Ok(Settings {
            server: Server::from_config()?,
            system_prompt: config::get("system_prompt").filter(|s| !s.is_empty()),
            max_tokens,
            stream: number("stream")?.unwrap_or(true),
            prices: Prices {
                prompt_per_1k: number("price_prompt_per_1k")?.unwrap_or(0),
                completion_per_1k: number("price_completion_per_1k")?.unwrap_or(0),
            },
        })
    }
}

/// Token counts as the server reports them.
#[derive(Debug, Clone, Copy, Deserialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// One streamed event (`chat.completion.chunk`), or an error the server reports mid-stream.
#[derive(Deserialize)]
struct StreamEvent {
    #[serde(default)]
    choices: Option<Vec<StreamChoice>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

/// A whole answer (`chat.completion`).
#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

/// What the server gave.
#[derive(Debug, Default)]
struct Generated {
    text: String,
    /// Completion tokens counted (content deltas, or the estimate of a whole answer).
    counted: u32,
    usage: Option<Usage>,
    /// Why reading stopped before the end, if it did.
    stopped: Option<String>,
}

/// What the step may spend while it reads a stream.
struct Meter {
    prices: Prices,
    budget: u64,
    prompt_estimate: u32,
    max_tokens: u32,
}

impl Meter {
    /// Why the `n`th completion token may not be taken, if it may not.
    fn refuses(&self, n: u32) -> Option<String> {
        let cost = self.prices.cost(self.prompt_estimate, n);
        if cost > self.budget {
            Some(format!("{n} tokens would cost {cost} credits, more than the step's budget of {}", self.budget))
        } else if n > self.max_tokens {
            Some(format!("the server sent more than the {} tokens asked for", self.max_tokens))
        } else {
            None
        }
    }
}

struct OpenAiLlm;

impl Guest for OpenAiLlm {
    fn generate(request: LlmRequest) -> Result<LlmResponse, StepError> {
        status::report(Stage::Preparing, 0.0, "preparing the request");
        let settings = Settings::from_config()?;
        if request.prompt.trim().is_empty() {
            return Err(StepError::InvalidInput("the prompt is empty; give the run a prompt".into()));
        }
        let system = settings.system_prompt.as_deref().unwrap_or("");
        let prompt_estimate = estimate_tokens(system).saturating_add(estimate_tokens(&request.prompt));
        let (prices, budget) = (settings.prices, credits::remaining());
        let affordable = prices.affordable_completion(budget, prompt_estimate);
        let max_tokens = request.max_tokens.min(settings.max_tokens.unwrap_or(u32::MAX)).min(affordable);
        if max_tokens == 0 {
            return Err(StepError::OutOfCredits(format!(
                "the step may spend {budget} credits, not enough for the prompt (about {prompt_estimate} tokens) and one \
                 completion token at the configured prices; raise the step's max_cost"
            )));
        }

        let server = &settings.server;
        let body = request_body(&settings, &request, max_tokens);
        status::report(Stage::Preparing, 0.0, &format!("asking {} at {}", server.model, server.base_url));
        let response = server.post(PATH, &body)?;
        status::report(Stage::Generating, 0.0, "generating");
        let meter = Meter { prices, budget, prompt_estimate, max_tokens };
        let generated = match settings.stream {
            true => read_stream(response, server, &meter)?,
            false => read_whole(response, server)?,
        };

        let (prompt_tokens, completion_tokens) = match generated.usage {
            Some(usage) => (usage.prompt_tokens, usage.completion_tokens),
            None => (prompt_estimate, generated.counted),
        };
        if let Some(why) = &generated.stopped {
            log::log(Level::Warn, &format!("stopped reading after {}: {why}", tokens(generated.counted)));
        }
        let cost = prices.cost(prompt_tokens, completion_tokens);
        if cost > budget {
            log::log(Level::Warn, &format!("the usage costs {cost} credits, more than the step's budget; charging {budget}"));
        }
        let charged = charge(cost.min(budget), prompt_tokens, completion_tokens)?;
        let message = format!("{completion_tokens} tokens, {charged} credits");
        status::report(Stage::Finishing, 1.0, &message);
        Ok(LlmResponse { text: generated.text, usage: TokenUsage { prompt_tokens, completion_tokens } })
    }
}

/// The JSON of the request.
fn request_body(settings: &Settings, request: &LlmRequest, max_tokens: u32) -> String {
    let mut messages = Vec::new();
    if let Some(system) = &settings.system_prompt {
        messages.push(json!({ "role": "system", "content": system }));
    }
    messages.push(json!({ "role": "user", "content": request.prompt }));
    // f32 -> f64 would send 0.800000011920929 for 0.8.
    let temperature = (f64::from(request.temperature) * 1000.0).round() / 1000.0;
    let mut body = json!({
        "model": settings.server.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": request.seed & (i64::MAX as u64),
        "stream": settings.stream,
    });
    if settings.stream {
        body["stream_options"] = json!({ "include_usage": true });
    }
    body.to_string()
}

/// Reads a streamed answer, forwarding its text as it arrives.
fn read_stream(mut response: Response, server: &Server, meter: &Meter) -> Result<Generated, StepError> {
    let url = server.url(PATH);
    let malformed = |why: String| StepError::Upstream(format!("the stream from {url} is malformed: {why}"));
    let mut parser = SseParser::default();
    let mut out = Generated::default();
    let mut reported = 0;
    loop {
        if status::cancelled() {
            return Err(StepError::Cancelled);
        }
        let bytes = match response.next_chunk() {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return Err(StepError::Upstream(format!(
                    "the stream from {url} ended before `data: [DONE]`, after {}: the server closed it early",
                    tokens(out.counted)
                )));
            }
            Err(HttpError::Failed(why)) => {
                return Err(StepError::Upstream(format!(
                    "the stream from {url} broke after {}, before `data: [DONE]` ({why})",
                    tokens(out.counted)
                )));
            }
            Err(e) => {
                return Err(match server.failure(&url, e) {
                    StepError::Upstream(why) => StepError::Upstream(format!("after {} streamed, {why}", tokens(out.counted))),
                    other => other,
                });
            }
        };
        let mut piece = String::new();
        let mut ended = false;
        'events: for data in parser.push(&bytes).map_err(malformed)? {
            if data == "[DONE]" {
                ended = true;
                break;
            }
            let event: StreamEvent = serde_json::from_str(&data)
                .map_err(|e| malformed(format!("{e} in `data: {}`", data.chars().take(80).collect::<String>())))?;
            if let Some(error) = event.error {
                return Err(StepError::Upstream(format!(
                    "{url} reported an error mid-stream: {}",
                    error_message(&json!({ "error": error }))
                )));
            }
            if event.usage.is_some() {
                out.usage = event.usage;
            }
            let deltas = event.choices.unwrap_or_default().into_iter().filter_map(|c| c.delta?.content);
            for content in deltas.filter(|content| !content.is_empty()) {
                if let Some(why) = meter.refuses(out.counted + 1) {
                    out.stopped = Some(why);
                    ended = true;
                    break 'events;
                }
                out.counted += 1;
                piece.push_str(&content);
            }
        }
        if !piece.is_empty() {
            output::emit(&piece);
            out.text.push_str(&piece);
            let twentieths = u64::from(out.counted) * 20 / u64::from(meter.max_tokens);
            if twentieths > reported {
                reported = twentieths;
                let message = format!("{} of at most {} tokens", out.counted, meter.max_tokens);
                status::report(Stage::Generating, out.counted as f32 / meter.max_tokens as f32, &message);
            }
        }
        if ended {
            return Ok(out);
        }
    }
}

/// "1 token", "2 tokens".
fn tokens(n: u32) -> String {
    if n == 1 { "1 token".into() } else { format!("{n} tokens") }
}

/// Reads a whole answer and forwards its text at once.
fn read_whole(response: Response, server: &Server) -> Result<Generated, StepError> {
    let url = server.url(PATH);
    let body = response.bytes().map_err(|e| server.failure(&url, e))?;
    let answer: Completion = serde_json::from_slice(&body)
        .map_err(|e| StepError::Upstream(format!("the answer from {url} is not a chat completion: {e}")))?;
    let text = answer.choices.into_iter().next().and_then(|c| c.message.content).unwrap_or_default();
    if status::cancelled() {
        return Err(StepError::Cancelled);
    }
    if !text.is_empty() {
        output::emit(&text);
    }
    Ok(Generated { counted: estimate_tokens(&text), text, usage: answer.usage, stopped: None })
}

/// Charges `amount` once, or what the step may still spend if the host refuses it; returns
/// what was charged.
fn charge(amount: u64, prompt_tokens: u32, completion_tokens: u32) -> Result<u64, StepError> {
    if amount == 0 {
        return Ok(0);
    }
    let reason = format!("{prompt_tokens} prompt + {completion_tokens} completion tokens");
    match credits::charge(amount, &reason) {
        Ok(_) => Ok(amount),
        Err(ChargeError::Insufficient(0)) => Ok(0),
        Err(ChargeError::Insufficient(left)) => match credits::charge(left, &reason) {
            Ok(_) => Ok(left),
            Err(ChargeError::RunEnded) => Err(StepError::Cancelled),
            Err(e) => Err(StepError::Internal(format!("the host refused to charge {left} credits: {e:?}"))),
        },
        Err(ChargeError::RunEnded) => Err(StepError::Cancelled),
        Err(ChargeError::InvalidAmount) => Err(StepError::Internal(format!("the host refused a charge of {amount}"))),
    }
}

genpipe_plugin_sdk::llm::export!(OpenAiLlm);

#[cfg(test)]
mod tests {
    use super::*;

    const PRICES: Prices = Prices { prompt_per_1k: 150, completion_per_1k: 2000 };

    #[test]
    fn each_part_of_a_cost_rounds_up_to_a_whole_credit() {
        assert_eq!(PRICES.cost(0, 0), 0);
        assert_eq!(PRICES.cost(1, 0), 1, "0.15 rounds up");
        assert_eq!(PRICES.cost(10, 0), 2, "1.5 rounds up");
        assert_eq!(PRICES.cost(20, 0), 3);
        assert_eq!(PRICES.cost(10, 1), 4, "1.5 -> 2, plus 2");
        assert_eq!(PRICES.cost(1000, 500), 150 + 1000);
        assert_eq!(Prices { prompt_per_1k: u64::MAX, completion_per_1k: u64::MAX }.cost(u32::MAX, u32::MAX), u64::MAX);
    }

    #[test]
    fn the_affordable_completion_is_the_most_the_budget_pays_for() {
        for budget in 0..40 {
            for prompt in [0, 1, 10, 100] {
                let n = PRICES.affordable_completion(budget, prompt);
                if PRICES.cost(prompt, 0) > budget {
                    assert_eq!(n, 0);
                } else {
                    assert!(PRICES.cost(prompt, n) <= budget, "{budget} {prompt} {n}");
                    assert!(PRICES.cost(prompt, n + 1) > budget, "{budget} {prompt} {n}");
                }
            }
        }
        let free = Prices { prompt_per_1k: 0, completion_per_1k: 0 };
        assert_eq!(free.affordable_completion(0, 1000), u32::MAX);
    }

    #[test]
    fn a_meter_refuses_tokens_beyond_the_budget_or_max_tokens() {
        let meter =
            Meter { prices: Prices { prompt_per_1k: 0, completion_per_1k: 1000 }, budget: 5, prompt_estimate: 9, max_tokens: 8 };
        assert_eq!(meter.refuses(5), None);
        assert_eq!(meter.refuses(6).unwrap(), "6 tokens would cost 6 credits, more than the step's budget of 5");
        let meter = Meter { budget: 100, ..meter };
        assert_eq!(meter.refuses(9).unwrap(), "the server sent more than the 8 tokens asked for");
    }

    #[test]
    fn the_estimate_is_one_token_per_four_bytes() {
        assert_eq!((estimate_tokens(""), estimate_tokens("abcd"), estimate_tokens("abcde")), (0, 1, 2));
    }
}

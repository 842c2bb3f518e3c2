//! Talking to an OpenAI-compatible server: the settings every endpoint shares, one request with
//! its retries, and the mapping of every failure to a [`StepError`] that says what to fix.
//! `image-openai` includes this file too.
//!
//! Rules:
//! - the plugin's `config` keys are checked against the keys it reads: an unknown key (a typo in
//!   a price, say) is an error naming it, not a silent default;
//! - `base_url` is the server's root (`https://api.openai.com`); a trailing `/` or `/v1` is
//!   dropped, and the endpoint's path (`/v1/...`) is appended;
//! - `api_key`, when set, is sent as `Authorization: Bearer <key>` and never written anywhere
//!   else (not in errors, logs or status messages);
//! - only 429 and 5xx answers are retried, at most `max_retries` times. Nothing else is: 401/403
//!   and 404 would fail the same way again, and a timeout, a failed connection or a stream that
//!   broke once it began may already have been billed by the provider;
//! - before retry `n` (0 for the first) the plugin waits `Retry-After` seconds when the answer
//!   gives them (a wait beyond `retry_max_ms` ends the step instead: retrying sooner would not
//!   honour it), otherwise half of `min(retry_max_ms, retry_base_ms * 2^n)` plus a random part
//!   of up to the other half (equal jitter), checking `status.cancelled()` while it waits;
//! - failed attempts charge nothing: the caller charges once, after a success.

use std::fmt::Display;
use std::hash::{BuildHasher, RandomState};
use std::str::FromStr;
use std::time::Duration;

use genpipe_plugin_sdk::http::{HttpError, Request, Response};
use genpipe_plugin_sdk::log::{self, Level};
use genpipe_plugin_sdk::status::{self, Stage};
use genpipe_plugin_sdk::{StepError, config};
use serde_json::Value;

/// The config keys every endpoint reads.
pub const SERVER_KEYS: [&str; 7] =
    ["base_url", "model", "api_key", "request_timeout_ms", "max_retries", "retry_base_ms", "retry_max_ms"];

/// Most retries `max_retries` may ask for.
const MAX_RETRIES: u32 = 10;
/// How long a wait sleeps before it checks `status.cancelled()` again.
const CANCEL_CHECK: Duration = Duration::from_millis(50);
/// Most characters of a server's error message quoted in a step error.
const MAX_DETAIL_CHARS: usize = 300;

/// Fails on a config key that is not one of `known`, naming it and the keys the plugin reads.
pub fn check_keys(plugin: &str, known: &[&str]) -> Result<(), StepError> {
    match config::all().into_iter().find(|(key, _)| !known.contains(&key.as_str())) {
        None => Ok(()),
        Some((key, _)) => Err(StepError::InvalidInput(format!(
            "{plugin} does not read the config key `{key}`; remove it or fix its spelling (it reads: {})",
            known.join(", ")
        ))),
    }
}

/// The value of config `key`, which must be set.
pub fn required(key: &str) -> Result<String, StepError> {
    config::get(key)
        .filter(|value| !value.trim().is_empty())
        .ok_or_else(|| StepError::InvalidInput(format!("config `{key}` is not set; add it to this plugin's config")))
}

/// The number at config `key`, or `None` when it is not set.
pub fn number<T: FromStr<Err: Display>>(key: &str) -> Result<Option<T>, StepError> {
    config::get(key)
        .map(|value| {
            value.trim().parse().map_err(|e| StepError::InvalidInput(format!("config `{key}` = '{value}' is not usable: {e}")))
        })
        .transpose()
}

/// How failed attempts are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (`max_retries`, default 3).
    pub max_retries: u32,
    /// The first backoff before jitter (`retry_base_ms`, default 200).
    pub base: Duration,
    /// The longest wait (`retry_max_ms`, default 5000).
    pub max: Duration,
}

impl RetryPolicy {
    /// The wait before retry `n` (0 for the first) without `Retry-After`: half of the capped
    /// exponential backoff, plus `random` modulo the other half.
    pub fn backoff(&self, n: u32, random: u64) -> Duration {
        let exponential = self.base.saturating_mul(1 << n.min(30)).min(self.max);
        let half = exponential / 2;
        let jitter = random % (u64::try_from((exponential - half).as_micros()).unwrap_or(u64::MAX) + 1);
        half + Duration::from_micros(jitter)
    }
}

/// The server a plugin talks to, from its config.
#[derive(Debug, Clone)]
pub struct Server {
    /// The server's root, without a trailing `/` or `/v1`.
    pub base_url: String,
    /// The model asked for.
    pub model: String,
    api_key: Option<String>,
    /// Limit of each wait of a request (`request_timeout_ms`); the host's `http_timeout_ms`
    /// applies too.
    timeout: Option<Duration>,
    retry: RetryPolicy,
}

impl Server {
    /// Reads `base_url`, `model`, `api_key`, `request_timeout_ms`, `max_retries`,
    /// `retry_base_ms` and `retry_max_ms`.
    pub fn from_config() -> Result<Server, StepError> {
        let base_url = required("base_url")?;
        let root = base_url.trim().trim_end_matches('/');
        let root = root.strip_suffix("/v1").unwrap_or(root);
        if !(root.starts_with("http://") || root.starts_with("https://")) {
            return Err(StepError::InvalidInput(format!(
                "config `base_url` = '{base_url}' must start with http:// or https://, e.g. https://api.openai.com"
            )));
        }
        let max_retries = number("max_retries")?.unwrap_or(3);
        if max_retries > MAX_RETRIES {
            return Err(StepError::InvalidInput(format!("config `max_retries` = {max_retries} is more than {MAX_RETRIES}")));
        }
        let millis = |key: &str, default: u64| Ok::<_, StepError>(Duration::from_millis(number(key)?.unwrap_or(default)));
        let timeout = number::<u64>("request_timeout_ms")?.map(Duration::from_millis);
        if timeout == Some(Duration::ZERO) {
            return Err(StepError::InvalidInput("config `request_timeout_ms` must be at least 1".into()));
        }
        Ok(Server {
            base_url: root.to_string(),
            model: required("model")?,
            api_key: config::get("api_key").filter(|key| !key.is_empty()),
            timeout,
            retry: RetryPolicy { max_retries, base: millis("retry_base_ms", 200)?, max: millis("retry_max_ms", 5000)? },
        })
    }

    /// The URL of `path` (`/v1/...`) on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// POSTs the JSON `body` to `path` and returns the first successful (2xx) answer, retrying
    /// as the module's rules say.
    pub fn post(&self, path: &str, body: &str) -> Result<Response, StepError> {
        let url = self.url(path);
        let attempts = self.retry.max_retries + 1;
        let random = RandomState::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            if status::cancelled() {
                return Err(StepError::Cancelled);
            }
            let mut request = Request::post(&url).header("content-type", "application/json").body(body.as_bytes().to_vec());
            if let Some(key) = &self.api_key {
                request = request.header("authorization", &format!("Bearer {key}"));
            }
            if let Some(timeout) = self.timeout {
                request = request.timeout(timeout);
            }
            let response = request.send().map_err(|e| self.failure(&url, e))?;
            let code = response.status();
            if (200..300).contains(&code) {
                return Ok(response);
            }
            let retry_after = response.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
            let answer = format!("HTTP {code}: {}", server_message(response));
            match code {
                401 | 403 => return Err(StepError::Upstream(format!("{url} refused the API key ({answer}); check api_key"))),
                404 => {
                    return Err(StepError::Upstream(format!(
                        "{url} does not know model '{}' ({answer}); check model, and that base_url is the server's root",
                        self.model
                    )));
                }
                429 | 500..=599 => {}
                _ => return Err(StepError::Upstream(format!("{url} refused the request ({answer})"))),
            }
            if attempt == attempts {
                let hint = match code {
                    429 => "the server is rate limiting: lower the load or raise max_retries",
                    _ => "the server is failing: try again later",
                };
                return Err(StepError::Upstream(format!("{url} answered {answer} to all {attempts} attempts; {hint}")));
            }
            let wait = match retry_after {
                Some(wait) if wait > self.retry.max => {
                    return Err(StepError::Upstream(format!(
                        "{url} answered {answer} and asks to wait {} s (Retry-After), longer than retry_max_ms ({} ms); \
                         try again later or raise retry_max_ms",
                        wait.as_secs(),
                        self.retry.max.as_millis()
                    )));
                }
                Some(wait) => wait,
                None => self.retry.backoff(attempt - 1, random.hash_one(attempt)),
            };
            let message = format!(
                "{url} answered HTTP {code}; retrying in {} ms (attempt {} of {attempts})",
                wait.as_millis(),
                attempt + 1
            );
            log::log(Level::Warn, &message);
            status::report(Stage::Preparing, 0.0, &message);
            pause(wait)?;
        }
    }

    /// The step error for a request to `url` that failed without an HTTP answer.
    pub fn failure(&self, url: &str, error: HttpError) -> StepError {
        match error {
            HttpError::Denied(why) => StepError::Upstream(format!(
                "the host refused the request to {url} ({why}); add the server to this plugin's allowed_hosts"
            )),
            HttpError::InvalidUrl(why) => StepError::InvalidInput(format!("config `base_url` gives an unusable URL: {why}")),
            HttpError::Timeout => {
                let limit = match self.timeout {
                    Some(timeout) => format!("request_timeout_ms = {}", timeout.as_millis()),
                    None => "the plugin's http_timeout_ms".into(),
                };
                StepError::Upstream(format!(
                    "{url} timed out: it sent nothing within {limit}; the server is slow or unreachable (raise the limit if it is just slow)"
                ))
            }
            HttpError::TooLarge => StepError::Upstream(format!(
                "the answer from {url} is larger than this plugin's max_http_response_bytes; raise it"
            )),
            HttpError::Failed(why) => {
                StepError::Upstream(format!("the request to {url} failed ({why}); check base_url and that the server is running"))
            }
        }
    }
}

/// Sleeps for `wait`, returning `Cancelled` as soon as the run is cancelled.
fn pause(wait: Duration) -> Result<(), StepError> {
    let mut left = wait;
    while !left.is_zero() {
        if status::cancelled() {
            return Err(StepError::Cancelled);
        }
        let slice = left.min(CANCEL_CHECK);
        std::thread::sleep(slice);
        left -= slice;
    }
    Ok(())
}

/// What an error answer says: its `error.message` (or `error`, or `message`), else its body,
/// shortened.
fn server_message(response: Response) -> String {
    match response.text() {
        Ok(body) => match serde_json::from_str::<Value>(&body) {
            Ok(json) => error_message(&json),
            Err(_) => shorten(body.trim()),
        },
        Err(e) => format!("its body could not be read: {e}"),
    }
}

/// The message of an OpenAI-style error object (`{"error": {"message": ...}}` and the
/// variants servers use), shortened.
pub fn error_message(json: &Value) -> String {
    let message = json
        .pointer("/error/message")
        .or_else(|| json.get("error").filter(|e| e.is_string()))
        .or_else(|| json.get("message"))
        .and_then(Value::as_str)
        .map_or_else(|| json.to_string(), str::to_string);
    shorten(message.trim())
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_DETAIL_CHARS) {
        None if text.is_empty() => "no details".into(),
        None => text.to_string(),
        Some((end, _)) => format!("{}...", &text[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_to_its_cap_with_bounded_jitter() {
        let policy = RetryPolicy { max_retries: 5, base: Duration::from_millis(200), max: Duration::from_millis(1000) };
        assert_eq!(policy.backoff(0, 0), Duration::from_millis(100));
        assert_eq!(policy.backoff(0, u64::MAX), Duration::from_millis(100) + Duration::from_micros(u64::MAX % 100_001));
        assert_eq!(policy.backoff(1, 0), Duration::from_millis(200));
        assert_eq!(policy.backoff(2, 0), Duration::from_millis(400));
        assert_eq!(policy.backoff(3, 0), Duration::from_millis(500), "capped at retry_max_ms");
        assert_eq!(policy.backoff(40, 0), Duration::from_millis(500));
        for random in [1, 7_777, 99_999, 100_000, u64::MAX] {
            let wait = policy.backoff(3, random);
            assert!(wait >= Duration::from_millis(500) && wait <= Duration::from_millis(1000), "{wait:?}");
        }
    }

    #[test]
    fn error_messages_are_found_in_the_shapes_servers_use() {
        let openai = serde_json::json!({ "error": { "message": "Incorrect API key provided.", "type": "x" } });
        assert_eq!(error_message(&openai), "Incorrect API key provided.");
        assert_eq!(error_message(&serde_json::json!({ "error": "model not found" })), "model not found");
        assert_eq!(error_message(&serde_json::json!({ "detail": 3 })), r#"{"detail":3}"#);
        assert_eq!(shorten(&"é".repeat(400)), format!("{}...", "é".repeat(300)));
        assert_eq!(shorten(""), "no details");
    }
}

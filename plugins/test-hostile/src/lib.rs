//! A hostile test plugin for the `llm-step` world: each `behaviour` param attacks one of the
//! host's limits or capabilities, and must fail alone with a clear error.
//!
//! - `loop`: loops forever without calling the host (and ignores cancellation);
//! - `memory-bomb`: allocates 1 MiB blocks until the host refuses to grow its memory;
//! - `trap`: panics;
//! - `recursion`: recurses until the stack is exhausted;
//! - `big-output`: returns `bytes` (default 50,000,000) bytes of text;
//! - `emit-flood`: streams `bytes` (default 1 MiB) chunks forever;
//! - `report-flood`: reports progress with a 1 KiB message forever;
//! - `log-flood`: logs `bytes` (default 1 MiB) messages forever;
//! - `overcharge`: charges u64::MAX, then 1 credit at a time until refused, and returns
//!   `out-of-credits` saying how much it got;
//! - `escape`: reads the environment, the filesystem and a TCP socket to `port`; returns what
//!   it saw as an error when all were refused, and as its text if anything leaked;
//! - `http-get`: GETs `url` and returns the body; with `follow = true` it follows one redirect;
//! - `leak-secret`: puts its `api_key` setting in a log line, a status message, a streamed
//!   chunk and its error.

use genpipe_plugin_sdk::http::Request;
use genpipe_plugin_sdk::llm::{Guest, LlmRequest, LlmResponse, TokenUsage};
use genpipe_plugin_sdk::{StepError, config, credits, log, output, param, status};

struct TestHostile;

fn recurse(depth: u64) -> u64 {
    if std::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    // The opaque result keeps the compiler from turning the recursion into a loop.
    std::hint::black_box(recurse(depth + 1)) + 1
}

fn escape(port: &str) -> Result<String, String> {
    let mut leaks = Vec::new();
    let vars: Vec<(String, String)> = std::env::vars().collect();
    if !vars.is_empty() {
        leaks.push(format!("env: {vars:?}"));
    }
    match std::fs::read_dir("/") {
        Ok(entries) => leaks.push(format!("fs: {:?}", entries.flatten().map(|e| e.path()).collect::<Vec<_>>())),
        Err(e) => log::log(log::Level::Info, &format!("fs refused: {e}")),
    }
    let fs = std::fs::read("/etc/passwd").map(|b| b.len());
    if let Ok(len) = &fs {
        leaks.push(format!("read /etc/passwd: {len} bytes"));
    }
    let tcp = std::net::TcpStream::connect(format!("127.0.0.1:{port}"));
    if tcp.is_ok() {
        leaks.push(format!("tcp to 127.0.0.1:{port} connected"));
    }
    if leaks.is_empty() {
        Err(format!("no environment variables, no filesystem ({}), tcp refused ({})", fs.unwrap_err(), tcp.unwrap_err()))
    } else {
        Ok(leaks.join("; "))
    }
}

fn http_get(url: &str, follow: bool) -> Result<String, StepError> {
    let upstream = |e: genpipe_plugin_sdk::http::HttpError| StepError::Upstream(e.to_string());
    let response = Request::get(url).send().map_err(upstream)?;
    if follow
        && (300..400).contains(&response.status())
        && let Some(location) = response.header("location").map(str::to_string)
    {
        return Request::get(&location).send().map_err(upstream)?.text().map_err(upstream);
    }
    response.text().map_err(upstream)
}

impl Guest for TestHostile {
    fn generate(request: LlmRequest) -> Result<LlmResponse, StepError> {
        let size = |default: usize| param(&request.params, "bytes").and_then(|v| v.parse().ok()).unwrap_or(default);
        let text = match param(&request.params, "behaviour").unwrap_or("loop") {
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "memory-bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
                }
            }
            "trap" => panic!("test-hostile trapped on purpose"),
            "recursion" => format!("{}", recurse(0)),
            "big-output" => "x".repeat(size(50_000_000)),
            "emit-flood" => {
                let chunk = "y".repeat(size(1 << 20));
                loop {
                    output::emit(&chunk);
                }
            }
            "report-flood" => {
                let message = "z".repeat(1024);
                let mut i = 0u32;
                loop {
                    status::report(status::Stage::Generating, (i % 100) as f32 / 100.0, &message);
                    i = i.wrapping_add(1);
                }
            }
            "log-flood" => {
                let message = "w".repeat(size(1 << 20));
                loop {
                    log::log(log::Level::Warn, &message);
                }
            }
            "overcharge" => {
                let mut charged = 0u64;
                if credits::charge(u64::MAX, "everything").is_ok() {
                    return Ok(response("charged u64::MAX".into()));
                }
                while credits::charge(1, "one more").is_ok() {
                    charged += 1;
                }
                return Err(StepError::OutOfCredits(format!("refused after {charged} credits")));
            }
            "escape" => escape(param(&request.params, "port").unwrap_or("1")).map_err(StepError::Internal)?,
            "http-get" => {
                let url = param(&request.params, "url").ok_or(StepError::InvalidInput("give a url".into()))?;
                http_get(url, param(&request.params, "follow") == Some("true"))?
            }
            "leak-secret" => {
                let key = config::get("api_key").unwrap_or_default();
                log::log(log::Level::Warn, &format!("my key is {key}"));
                status::report(status::Stage::Preparing, 0.1, &format!("using key {key}"));
                output::emit(&format!("key={key};"));
                return Err(StepError::Upstream(format!("the server refused key {key}")));
            }
            other => return Err(StepError::InvalidInput(format!("unknown behaviour '{other}'"))),
        };
        Ok(response(text))
    }
}

fn response(text: String) -> LlmResponse {
    LlmResponse { text, usage: TokenUsage { prompt_tokens: 0, completion_tokens: 0 } }
}

genpipe_plugin_sdk::llm::export!(TestHostile);

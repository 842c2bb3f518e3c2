//! End-to-end: the bundled `llm-openai` and `image-openai` plugins in a real `genpipe serve`,
//! against the local OpenAI-compatible server (`tools/openai-mock`, run inside this test
//! process) over loopback HTTP:
//! - a story (text streamed, then an image drawn from the text) arrives as SSE chunks in order,
//!   equal to the server's completion, with a PNG that decodes, charged exactly the usage-based
//!   prices;
//! - 200 stories at once all complete, each step made exactly one successful upstream call, and
//!   the ledger verifies;
//! - every failure mode ends as it should (retried then recovered, or failed with its error
//!   after the right number of attempts) and failed attempts charge nothing; a cancelled run
//!   closes its upstream connection, a spent budget stops the stream cleanly, and a server that
//!   `allowed_hosts` does not name never sees a connection;
//! - the API key appears nowhere: the server's log, events, run status and errors,
//!   `/v1/plugins`, `genpipe validate`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use openai_mock::{ModelStats, Options, Stats, completion, count_tokens};
use serde_json::{Value, json};

/// The key the server accepts, given to genpipe through this environment variable.
const KEY: &str = "sk-genpipe-test-7f3a9c1e5b2d";
const KEY_VAR: &str = "GENPIPE_TEST_OPENAI_KEY";
/// A key the server refuses, given inline as a secret.
const WRONG_KEY: &str = "sk-wrong-key-0d4e8a2b6c9f";
const SYSTEM_PROMPT: &str = "You write very short stories.";
/// Credits per 1,000 prompt and completion tokens, and per image.
const PROMPT_PRICE: u64 = 150;
const COMPLETION_PRICE: u64 = 2000;
const IMAGE_PRICE: u64 = 7;
const MAX_TOKENS: u32 = 40;
const WIDTH: u32 = 64;
const HEIGHT: u32 = 48;
const CREDITS: u64 = 10_000_000;

/// Starts the server in this process; returns its address and counters.
async fn mock(options: Options) -> (SocketAddr, Arc<Stats>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stats = Arc::new(Stats::default());
    tokio::spawn(openai_mock::serve(listener, options, Arc::clone(&stats)));
    (address, stats)
}

/// Options of a server that requires [`KEY`].
fn keyed(delay_per_token: Duration) -> Options {
    Options { api_key: Some(KEY.into()), delay_per_token, first_byte_delay: Duration::from_secs(3) }
}

const HEAD: &str = r#"
[[accounts]]
id = "demo"
api_key = "demo-key"
credits = 10000000
"#;

/// The test's prices per 1,000 prompt and completion tokens.
const PRICES: (u64, u64) = (PROMPT_PRICE, COMPLETION_PRICE);

/// An `llm-openai` plugin section for `model` at `server`, at `prices` per 1,000 prompt and
/// completion tokens, with `extra` config entries.
fn llm_plugin(name: &str, server: SocketAddr, model: &str, (prompt, completion): (u64, u64), extra: &str) -> String {
    format!(
        r#"
[plugins.{name}]
path = "builtin:llm-openai"
world = "llm-step"
allowed_hosts = ["{server}"]
config = {{ base_url = "http://{server}", model = "{model}", api_key = {{ env = "{KEY_VAR}" }}, system_prompt = "{SYSTEM_PROMPT}", price_prompt_per_1k = {prompt}, price_completion_per_1k = {completion}, retry_base_ms = 10{extra} }}
"#
    )
}

/// An `image-openai` plugin section for `model` at `server` (its `base_url` ends with `/v1`,
/// which the plugin drops).
fn image_plugin(name: &str, server: SocketAddr, model: &str) -> String {
    format!(
        r#"
[plugins.{name}]
path = "builtin:image-openai"
world = "image-step"
allowed_hosts = ["{server}"]
config = {{ base_url = "http://{server}/v1", model = "{model}", api_key = {{ secret = "{KEY}" }}, price_per_image = {IMAGE_PRICE}, retry_base_ms = 10 }}
"#
    )
}

/// A one-step pipeline `name` of `plugin`.
fn pipeline(name: &str, plugin: &str, max_cost: u64, params: &str) -> String {
    format!(
        "\n[pipelines.{name}]\n[[pipelines.{name}.steps]]\nid = \"step\"\nplugin = \"{plugin}\"\nmax_cost = {max_cost}\nparams = {{ {params} }}\n"
    )
}

/// The story: text from `llm`, then an image of it from `image`.
fn story_config(server: SocketAddr) -> String {
    format!(
        r#"{HEAD}
[ledger]
kind = "sqlite"
path = "ledger.db"
{llm}{image}
[pipelines.story]
[[pipelines.story.steps]]
id = "text"
plugin = "llm"
max_cost = 1000
params = {{ max_tokens = {MAX_TOKENS}, temperature = 0.7 }}

[[pipelines.story.steps]]
id = "image"
plugin = "image"
after = ["text"]
prompt = "An illustration of: {{steps.text.output}}"
max_cost = 50
params = {{ width = {WIDTH}, height = {HEIGHT} }}
"#,
        llm = llm_plugin("llm", server, "mock-chat", PRICES, ""),
        image = image_plugin("image", server, "mock-image"),
    )
}

/// The server's completion of `prompt` and what it costs at the test's prices, by the usage
/// the server reports (the system prompt's words count as prompt tokens).
fn expected(prompt: &str, max_tokens: u32) -> (String, u64) {
    let tokens = completion(prompt, max_tokens);
    let prompt_tokens = u64::from(count_tokens(SYSTEM_PROMPT) + count_tokens(prompt));
    let cost = (prompt_tokens * PROMPT_PRICE).div_ceil(1000) + (tokens.len() as u64 * COMPLETION_PRICE).div_ceil(1000);
    (tokens.concat(), cost)
}

/// A `genpipe serve` process in a folder of its own, its log (stderr) in `server.log`.
struct Genpipe {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Genpipe {
    fn start(config: &str) -> Genpipe {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("genpipe.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_genpipe"))
            .args(["serve", "--config", "genpipe.toml", "--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .env(KEY_VAR, KEY)
            .env("RUST_LOG", "info,genpipe=debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let Some(base) = line.trim().strip_prefix("genpipe listening on ") else {
            panic!("genpipe did not start: {}", std::fs::read_to_string(dir.path().join("server.log")).unwrap());
        };
        Genpipe { base: base.to_string(), child, dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Stops it with SIGTERM and checks that it exits 0; returns its log.
    async fn stop(&mut self) -> String {
        let killed = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "genpipe did not exit within 30 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "genpipe exited with {status}");
        std::fs::read_to_string(self.path().join("server.log")).unwrap()
    }

    /// Runs `genpipe ARGS --config genpipe.toml` in its folder; returns whether it succeeded and
    /// its stdout and stderr.
    fn command(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_genpipe"))
            .args(args)
            .args(["--config", "genpipe.toml"])
            .current_dir(self.path())
            .env(KEY_VAR, KEY)
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    }
}

impl Drop for Genpipe {
    fn drop(&mut self) {
        // Already exited when `stop` ran; otherwise (a failed assertion) this ends it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a run of `pipeline`; with `wait`, waits for its end (`Prefer: wait=60`).
async fn start_run(client: &reqwest::Client, base: &str, pipeline: &str, prompt: &str, wait: bool) -> Value {
    let mut request = client
        .post(format!("{base}/v1/runs"))
        .bearer_auth("demo-key")
        .json(&json!({ "pipeline": pipeline, "input": { "prompt": prompt } }));
    if wait {
        request = request.header("Prefer", "wait=60");
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), if wait { 200 } else { 202 }, "{pipeline}");
    response.json().await.unwrap()
}

/// GETs `path` as the demo account.
async fn get(client: &reqwest::Client, base: &str, path: &str) -> reqwest::Response {
    let response = client.get(format!("{base}{path}")).bearer_auth("demo-key").send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response
}

/// A run's event stream, read event by event as it arrives.
struct Events {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Events {
    async fn open(client: &reqwest::Client, base: &str, id: &str) -> Events {
        let response = get(client, base, &format!("/v1/runs/{id}/events")).await;
        Events { body: Box::pin(response.bytes_stream()), buffer: String::new() }
    }

    /// The next event's data, or `None` once the stream ended.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(data) = block.lines().find_map(|line| line.strip_prefix("data:")) {
                    return Some(serde_json::from_str(data.trim()).unwrap());
                }
                continue;
            }
            let bytes = self.body.next().await?.unwrap();
            self.buffer.push_str(std::str::from_utf8(&bytes).unwrap());
        }
    }

    /// Every event until the stream ends.
    async fn all(mut self) -> Vec<Value> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// Waits until `condition` holds, failing after `limit`.
async fn until(what: &str, limit: Duration, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the mock should have counted for a model whose streams all ended as the server meant.
fn counts(requests: u64, completed: u64, failed: u64) -> ModelStats {
    ModelStats { requests, completed, failed, closed_early: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_story_streams_its_text_live_and_is_charged_by_usage() {
    let (server, stats) = mock(keyed(Duration::from_millis(5))).await;
    let mut genpipe = Genpipe::start(&story_config(server));
    let client = reqwest::Client::new();
    let prompt = "A lighthouse keeper finds a letter in a bottle";
    let run = start_run(&client, &genpipe.base, "story", prompt, false).await;
    let id = run["id"].as_str().unwrap();
    let events = Events::open(&client, &genpipe.base, id).await.all().await;

    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "events out of order: {seqs:?}");
    let chunks: Vec<&str> =
        events.iter().filter(|e| e["type"] == "text" && e["step"] == "text").map(|e| e["chunk"].as_str().unwrap()).collect();
    let (text, text_cost) = expected(prompt, MAX_TOKENS);
    assert_eq!(chunks.concat(), text);
    assert!(chunks.len() > 1, "the text should arrive token by token, not whole: {chunks:?}");
    let at = |kind: &str, step: &str| events.iter().position(|e| e["type"] == kind && e["step"] == step).unwrap();
    assert!(at("step_ended", "text") < at("step_started", "image"), "the image waits for the text");
    let last = events.last().unwrap();
    assert_eq!((&last["type"], &last["status"]), (&json!("run_ended"), &json!("completed")), "{last}");

    let run: Value = get(&client, &genpipe.base, &format!("/v1/runs/{id}")).await.json().await.unwrap();
    assert_eq!(run["steps"][0]["charged"], text_cost, "{run}");
    assert_eq!(run["steps"][1]["charged"], IMAGE_PRICE, "{run}");
    assert_eq!(run["posted"], text_cost + IMAGE_PRICE, "{run}");
    let output = get(&client, &genpipe.base, &format!("/v1/runs/{id}/outputs/text")).await.text().await.unwrap();
    assert_eq!(output, text);
    let png = get(&client, &genpipe.base, &format!("/v1/runs/{id}/outputs/image")).await.bytes().await.unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
    assert_eq!((reader.info().width, reader.info().height), (WIDTH, HEIGHT));

    assert_eq!(stats.chat("mock-chat"), counts(1, 1, 0));
    assert_eq!(stats.images("mock-image"), counts(1, 1, 0));
    genpipe.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_stories_at_once_make_one_upstream_call_per_step() {
    const RUNS: usize = 200;
    let (server, stats) = mock(keyed(Duration::ZERO)).await;
    let mut genpipe = Genpipe::start(&story_config(server));
    let client = reqwest::Client::new();
    let runs: Vec<_> = (0..RUNS)
        .map(|i| {
            let (client, base) = (client.clone(), genpipe.base.clone());
            tokio::spawn(async move {
                let prompt = format!("Story number {i} about a fox and a crow");
                let run = start_run(&client, &base, "story", &prompt, true).await;
                (prompt, run)
            })
        })
        .collect();
    let mut posted = 0;
    for run in runs {
        let (prompt, run) = run.await.unwrap();
        assert_eq!(run["status"], "completed", "{run}");
        let (_, text_cost) = expected(&prompt, MAX_TOKENS);
        assert_eq!(run["posted"], text_cost + IMAGE_PRICE, "{run}");
        posted += text_cost + IMAGE_PRICE;
    }
    assert_eq!(stats.chat("mock-chat"), counts(RUNS as u64, RUNS as u64, 0), "one successful call per text step");
    assert_eq!(stats.images("mock-image"), counts(RUNS as u64, RUNS as u64, 0), "one successful call per image step");
    let account: Value = get(&client, &genpipe.base, "/v1/account").await.json().await.unwrap();
    assert_eq!((account["balance"].as_u64(), account["held"].as_u64()), (Some(CREDITS - posted), Some(0)), "{account}");
    genpipe.stop().await;
    let (verified, report) = genpipe.command(&["credits", "verify"]);
    assert!(verified, "{report}");
}

/// How a failure-mode run must end.
enum Outcome {
    /// Completed, charged this much.
    Completed(u64),
    /// Failed with this kind and a message containing this.
    Failed(&'static str, &'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_modes_end_as_they_should_and_the_key_stays_secret() {
    let (server, stats) = mock(keyed(Duration::ZERO)).await;
    let (unlisted, unlisted_stats) = mock(keyed(Duration::ZERO)).await;
    let prompt = "A dragon who collects teacups";
    let (text, cost) = expected(prompt, 20);
    let estimate = |s: &str| s.len().div_ceil(4) as u64;
    let counted_cost = ((estimate(SYSTEM_PROMPT) + estimate(prompt)) * PROMPT_PRICE).div_ceil(1000)
        + (completion(prompt, 20).len() as u64 * COMPLETION_PRICE).div_ceil(1000);
    let timeout = ", request_timeout_ms = 300";
    let mut config = format!("{HEAD}\n[ledger]\nkind = \"memory\"\n");
    // (name, model, extra plugin config, the mock's counts for the model, how the run ends)
    let llm_cases: [(&str, &str, &str, Option<ModelStats>, Outcome); 12] = [
        ("rate-limited", "fail-429-then-ok", "", Some(counts(2, 1, 1)), Outcome::Completed(cost)),
        ("server-error-then-ok", "fail-500-then-ok", "", Some(counts(3, 1, 2)), Outcome::Completed(cost)),
        ("server-error", "fail-500", "", Some(counts(4, 0, 4)), Outcome::Failed("plugin-error", "to all 4 attempts")),
        ("whole", "mock-chat-whole", ", stream = false", Some(counts(1, 1, 0)), Outcome::Completed(cost)),
        ("no-usage", "no-usage", "", Some(counts(1, 1, 0)), Outcome::Completed(counted_cost)),
        ("unknown-model", "missing-model", "", Some(counts(1, 0, 1)), Outcome::Failed("plugin-error", "(HTTP 404: ")),
        ("cut", "cut-stream", "", Some(counts(1, 0, 1)), Outcome::Failed("plugin-error", "before `data: [DONE]`")),
        ("malformed", "malformed-stream", "", Some(counts(1, 0, 1)), Outcome::Failed("plugin-error", "is malformed: ")),
        ("slow", "slow-first-byte", timeout, None, Outcome::Failed("plugin-error", "within request_timeout_ms = 300")),
        (
            "stall",
            "stall",
            timeout,
            None,
            Outcome::Failed("plugin-error", "broke after 1 token, before `data: [DONE]` (connection read timeout)"),
        ),
        ("budget", "never-ends-budget", "", None, Outcome::Completed(5)),
        (
            "misconfigured",
            "mock-chat-misconfigured",
            ", temperature = 0.5",
            Some(counts(0, 0, 0)),
            Outcome::Failed("plugin-error", "config `temperature` is not read: the temperature is a step parameter"),
        ),
    ];
    for (name, model, extra, _, _) in &llm_cases {
        // The budget case pays 1 credit a token, for at most 5 tokens.
        let (prices, max_cost) = if *name == "budget" { ((0, 1000), 5) } else { (PRICES, 1000) };
        config.push_str(&llm_plugin(name, server, model, prices, extra));
        config.push_str(&pipeline(name, name, max_cost, "max_tokens = 20"));
    }
    // The wrong key, inline; the right one from the environment; a server not in allowed_hosts.
    config.push_str(
        &llm_plugin("bad-key", server, "mock-chat-bad-key", PRICES, "")
            .replace(&format!("{{ env = \"{KEY_VAR}\" }}"), &format!("{{ secret = \"{WRONG_KEY}\" }}")),
    );
    config.push_str(&pipeline("bad-key", "bad-key", 1000, "max_tokens = 20"));
    config.push_str(&llm_plugin("cancel", server, "never-ends-cancel", PRICES, ""));
    config.push_str(&pipeline("cancel", "cancel", 1000, "max_tokens = 20"));
    config.push_str(&llm_plugin("unlisted", unlisted, "mock-chat", PRICES, "").replace(&format!("[\"{unlisted}\"]"), "[]"));
    config.push_str(&pipeline("unlisted", "unlisted", 1000, "max_tokens = 20"));
    let image_cases: [(&str, &str, ModelStats, Outcome); 3] = [
        ("image-retried", "fail-500-then-ok-image", counts(3, 1, 2), Outcome::Completed(IMAGE_PRICE)),
        ("image-missing", "missing-image", counts(1, 0, 1), Outcome::Failed("plugin-error", "(HTTP 404: ")),
        ("image-resized", "wrong-size-image", counts(1, 1, 0), Outcome::Completed(IMAGE_PRICE)),
    ];
    for (name, model, _, _) in &image_cases {
        config.push_str(&image_plugin(name, server, model));
        config.push_str(&pipeline(name, name, 50, &format!("width = {WIDTH}, height = {HEIGHT}")));
    }
    let mut genpipe = Genpipe::start(&config);
    let client = reqwest::Client::new();
    let base = genpipe.base.clone();

    let start = |name: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move { start_run(&client, &base, name, prompt, true).await })
    };
    let llm_runs: Vec<_> = llm_cases.iter().map(|case| start(case.0)).collect();
    let image_runs: Vec<_> = image_cases.iter().map(|case| start(case.0)).collect();
    let (bad_key, unlisted_run) = (start("bad-key"), start("unlisted"));

    // A cancelled run closes its upstream connection.
    let cancelled = start_run(&client, &base, "cancel", prompt, false).await;
    let id = cancelled["id"].as_str().unwrap().to_string();
    let mut events = Events::open(&client, &base, &id).await;
    while events.next().await.expect("the run streams text before it ends")["type"] != "text" {}
    let cancelled: Value =
        client.delete(format!("{base}/v1/runs/{id}")).bearer_auth("demo-key").send().await.unwrap().json().await.unwrap();
    assert_eq!((&cancelled["status"], &cancelled["posted"]), (&json!("cancelled"), &json!(0)), "{cancelled}");
    let closed = || stats.chat("never-ends-cancel").closed_early == 1;
    until("the cancelled run's upstream connection to close", Duration::from_secs(10), closed).await;
    let gone = client.get(format!("{base}/v1/runs/{id}/events")).bearer_auth("demo-key").send().await.unwrap();
    assert_eq!(gone.status(), 404, "a deleted run's events are gone");

    // Every run but the deleted one is searched for the key, with its events.
    let mut shown = cancelled.to_string();
    let mut runs = Vec::new();
    let mut check = |name: &str, run: Value, outcome: &Outcome| {
        match outcome {
            Outcome::Completed(charged) => {
                assert_eq!((&run["status"], &run["posted"]), (&json!("completed"), &json!(charged)), "{name}: {run}");
            }
            Outcome::Failed(kind, message) => {
                assert_eq!((&run["status"], &run["posted"]), (&json!("failed"), &json!(0)), "{name}: {run}");
                assert_eq!(run["steps"][0]["charged"], 0, "{name}: {run}");
                assert_eq!(run["steps"][0]["error_kind"], *kind, "{name}: {run}");
                let error = run["error"].as_str().unwrap();
                let named = format!("step 'step' (plugin {name}) failed");
                assert!(error.contains(message) && error.contains(&named), "{name}: {error}");
            }
        }
        runs.push(run);
    };
    for ((name, model, _, expected_counts, outcome), run) in llm_cases.iter().zip(llm_runs) {
        let run = run.await.unwrap();
        if let Some(expected_counts) = expected_counts {
            assert_eq!(stats.chat(model), *expected_counts, "{name}");
        }
        if *name == "rate-limited" {
            assert!(run["duration_ms"].as_u64().unwrap() >= 1000, "Retry-After: 1 was not honoured: {run}");
        }
        match *name {
            "budget" => {
                let id = run["id"].as_str().unwrap();
                let text = get(&client, &base, &format!("/v1/runs/{id}/outputs/step")).await.text().await.unwrap();
                assert_eq!(count_tokens(&text), 5, "the 5 tokens paid for: {text}");
                until("the budget's stream to close", Duration::from_secs(10), || stats.chat(model).closed_early == 1).await;
            }
            "whole" | "rate-limited" | "server-error-then-ok" => {
                let id = run["id"].as_str().unwrap();
                assert_eq!(get(&client, &base, &format!("/v1/runs/{id}/outputs/step")).await.text().await.unwrap(), text);
            }
            _ => {}
        }
        check(name, run, outcome);
    }
    for model in ["slow-first-byte", "stall"] {
        assert_eq!(stats.chat(model).requests, 1, "a timeout is not retried");
    }
    for ((name, model, expected_counts, outcome), run) in image_cases.iter().zip(image_runs) {
        let run = run.await.unwrap();
        assert_eq!(stats.images(model), *expected_counts, "{name}");
        if *name == "image-resized" {
            let id = run["id"].as_str().unwrap();
            let png = get(&client, &base, &format!("/v1/runs/{id}/outputs/step")).await.bytes().await.unwrap();
            let reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
            assert_eq!((reader.info().width, reader.info().height), (WIDTH, HEIGHT), "resized to the size asked");
        }
        check(name, run, outcome);
    }
    let bad_key = bad_key.await.unwrap();
    assert_eq!(stats.chat("mock-chat-bad-key"), counts(1, 0, 1), "401 is not retried");
    check("bad-key", bad_key, &Outcome::Failed("plugin-error", "(HTTP 401: Incorrect API key provided.); check api_key"));
    let unlisted_run = unlisted_run.await.unwrap();
    check("unlisted", unlisted_run, &Outcome::Failed("denied", "allowed_hosts is empty"));
    assert_eq!(unlisted_stats.snapshot().connections, 0, "the server not listed never saw a connection");
    assert_eq!(stats.snapshot().open_streams, 0, "every stream ended");

    // The key appears nowhere.
    for run in &runs {
        let id = run["id"].as_str().unwrap();
        shown.push_str(&run.to_string());
        let events = Events::open(&client, &base, id).await.all().await;
        shown.push_str(&serde_json::to_string(&events).unwrap());
    }
    shown.push_str(&get(&client, &base, "/v1/plugins").await.text().await.unwrap());
    let (valid, validated) = genpipe.command(&["validate"]);
    assert!(valid, "{validated}");
    shown.push_str(&validated);
    let log = genpipe.stop().await;
    assert!(
        log.contains("HTTP 401") && shown.contains("check api_key") && validated.contains("bad-key"),
        "searched the right things"
    );
    shown.push_str(&log);
    for secret in [KEY, WRONG_KEY] {
        assert!(
            !shown.contains(secret),
            "the key {secret} leaked: {}",
            &shown[shown.find(secret).unwrap().saturating_sub(300)..]
        );
    }
}

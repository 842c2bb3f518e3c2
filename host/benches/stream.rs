//! What genpipe adds to a streamed completion: time to first token, total stream time and the
//! latency of each streamed chunk, at a genpipe client against a client of the model server
//! itself, at 1 and 100 concurrent streams.
//!
//! The model server is the local OpenAI-compatible mock (`openai-mock`, its router served in
//! this process with `TCP_NODELAY`, as `openai_mock::serve` does), streaming each completion as
//! 40 tokens, one every 20 ms (`delay_per_token`), at the pace of a real model. Two cases:
//! - **direct**: a reqwest client POSTs `/v1/chat/completions` (`stream: true`) to the server and
//!   reads the server-sent events; the first token is the first event with non-empty content,
//!   the end is `data: [DONE]`;
//! - **genpipe**: the same client POSTs `/v1/runs` of a one-step pipeline (the bundled
//!   `builtin:llm-openai`, `allowed_hosts` naming exactly the server) to genpipe's HTTP service
//!   and follows `GET /v1/runs/{id}/events`; the first token is the first `text` event, the end
//!   is `run_ended` (after the plugin charged by usage and the host settled the hold).
//!
//! under three loads: one stream at a time (20 per round); 100 in flight (100 clients, each
//! starting a stream when its previous one ended, their first starts spread over one stream's
//! duration, so that streams start one by one as on a busy service; 2 kept per client and
//! round, each of them run among 99 others); 100 started at the same moment (a burst, the
//! worst case for the first token; 2 bursts per round). The cases take turns, load by load,
//! over three rounds, after a warm-up. Every stream has a prompt of its own whose completion
//! has at least 40 tokens, so all streams are alike, and each streamed text is checked against
//! the server's; at the end, the server must have seen one request per stream, each answered to
//! its end.
//!
//! The genpipe client goes through the HTTP service rather than `Run::next_events` in process:
//! that is what an operator's users see (admission by `POST /v1/runs`, the SSE encoding, the
//! TCP hop to the client), and both clients then share the same HTTP client and SSE reader, so
//! the difference between them is genpipe alone. The service is `genpipe::server::serve` (what
//! `genpipe serve` runs, without its signal handling and its log lines: no tracing subscriber
//! is installed) on a loopback port, with a memory ledger, on a tokio runtime of its own with the
//! binary's settings, so that it does not share worker threads with the clients and the server
//! (which share another runtime), as separate processes would not.
//!
//! Everything runs in one process, so every time comes from one monotonic clock. A layer around
//! the mock's router records when each request arrived and when each piece of its answer was
//! handed to the connection (the time a model server sends a token). A chunk's latency is then
//! the time it arrived at the client minus the time the server sent its last token: for the
//! direct client, the floor of loopback HTTP and the client; for the genpipe client, also the
//! plugin reading the server's stream through the host's `wasi:http`, parsing it and calling
//! `output.emit`, the run's event log, and the service's SSE stream. The host's added latency
//! per chunk is the difference between the two. (Comparing gaps between arrivals instead would
//! hide a constant delay, and comparing to the 20 ms pace would count the timer's jitter.)
//!
//! Printed: for each load and measure, the median and p99 (nearest rank) of each case, what
//! genpipe adds (the difference of the medians, and of the p99s: the samples are not paired),
//! and the targets of issue 13 on the medians: at most 2 ms added to the first token, at most
//! 10% to the total stream time. Then where the first token's time goes. Nothing is asserted
//! about the figures. `GENPIPE_BENCH_QUICK=1` runs one short round at 5 ms per token (CI keeps
//! the benchmark building and working).
//!
//! The service sets `TCP_NODELAY` on every connection it accepts, so an event leaves as soon as
//! it is written rather than waiting for the client's delayed acknowledgement of the previous one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::serve::ListenerExt;
use futures::{Stream, StreamExt};
use genpipe::server::{self, AppState};
use genpipe::state::ledger::MemoryLedger;
use genpipe::{Config, Host};
use openai_mock::{ModelStats, Options, Stats, completion};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Tokens per completion, and the server's pause before each.
const TOKENS: u32 = 40;
const PER_TOKEN: Duration = Duration::from_millis(20);
const MODEL: &str = "bench-chat";
/// The model server's key, and the genpipe account's.
const SERVER_KEY: &str = "sk-bench-0123456789";
const ACCOUNT_KEY: &str = "bench-key";
const FIRST_TOKEN_TARGET: Duration = Duration::from_millis(2);
const TOTAL_TARGET: f64 = 0.10;

/// genpipe's configuration; `{server}` is the model server's address.
const CONFIG: &str = r#"
[server]
max_kept_runs = 1024

[[accounts]]
id = "bench"
api_key = "bench-key"
credits = 1000000000000

[plugins.llm-openai]
path = "builtin:llm-openai"
world = "llm-step"
allowed_hosts = ["{server}"]
max_concurrency = 128
timeout_ms = 60000
config = { base_url = "http://{server}", model = "bench-chat", api_key = { secret = "sk-bench-0123456789" }, price_prompt_per_1k = 100, price_completion_per_1k = 400 }

[pipelines.chat]
[[pipelines.chat.steps]]
id = "text"
plugin = "llm-openai"
max_cost = 1000
params = { max_tokens = 40, temperature = 0.7 }
"#;

/// What the server saw of one request: when it arrived, and each piece of its answer with the
/// time it was handed to the connection.
struct Upstream {
    arrived: Instant,
    frames: Vec<(Instant, Bytes)>,
}

/// Every request the server saw, by its prompt (each stream has a prompt of its own).
type UpstreamLog = Arc<Mutex<HashMap<String, Arc<Mutex<Upstream>>>>>;

/// The layer around the server's router that fills the log. It only takes the time and keeps
/// the bytes on the way; the events are parsed after the stream.
async fn record(State(log): State<UpstreamLog>, request: Request, next: Next) -> Response {
    let arrived = Instant::now();
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let request: Value = serde_json::from_slice(&body).unwrap();
    let prompt = request["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap();
    let upstream = Arc::new(Mutex::new(Upstream { arrived, frames: Vec::new() }));
    log.lock().unwrap().insert(prompt.to_string(), Arc::clone(&upstream));
    let (parts, body) = next.run(Request::from_parts(parts, Body::from(body))).await.into_parts();
    let body = body.into_data_stream().map(move |frame| {
        if let Ok(bytes) = &frame {
            upstream.lock().unwrap().frames.push((Instant::now(), bytes.clone()));
        }
        frame
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// Starts the model server on the current runtime; returns its address, counters, count of
/// connections and log.
async fn model_server(per_token: Duration) -> (SocketAddr, Arc<Stats>, Arc<AtomicU64>, UpstreamLog) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stats = Arc::new(Stats::default());
    let log = UpstreamLog::default();
    let options = Options { api_key: Some(SERVER_KEY.into()), delay_per_token: per_token, first_byte_delay: Duration::ZERO };
    let app = openai_mock::router(options, Arc::clone(&stats)).layer(middleware::from_fn_with_state(Arc::clone(&log), record));
    let connections = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&connections);
    let listener = listener.tap_io(move |tcp| {
        let _ = tcp.set_nodelay(true);
        counted.fetch_add(1, Ordering::Relaxed);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (address, stats, connections, log)
}

/// Starts genpipe's HTTP service on the current runtime; returns its base URL and what stops it
/// (the service then drains and the returned task ends).
async fn genpipe_service(model_server: SocketAddr) -> (String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let config = Config::parse(&CONFIG.replace("{server}", &model_server.to_string()), "stream.toml", Path::new(".")).unwrap();
    let host = Host::new(&config, Arc::new(MemoryLedger::new())).await.unwrap();
    // As `genpipe serve` binds.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = AppState::new(host, &config, None);
    let service = tokio::spawn(async move {
        server::serve(listener, state, async {
            let _ = stopped.await;
        })
        .await
        .unwrap()
    });
    (base, stop, service)
}

/// A server-sent event stream, read event by event as its bytes arrive.
struct Events {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: Vec<u8>,
    /// When the bytes that completed the latest event arrived.
    at: Instant,
}

impl Events {
    fn new(response: reqwest::Response) -> Events {
        Events { body: Box::pin(response.bytes_stream()), buffer: Vec::new(), at: Instant::now() }
    }

    /// The next event's data, with the time its last bytes arrived; `None` at the end.
    async fn next(&mut self) -> Option<(Instant, String)> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let data = sse_data(std::str::from_utf8(&block).unwrap());
                if let Some(data) = data {
                    return Some((self.at, data));
                }
                continue;
            }
            let bytes = self.body.next().await?.unwrap();
            self.at = Instant::now();
            self.buffer.extend_from_slice(&bytes);
        }
    }
}

/// The data of one event block (`None` for a comment or keep-alive).
fn sse_data(block: &str) -> Option<String> {
    let lines: Vec<&str> =
        block.lines().filter_map(|line| line.strip_prefix("data:")).map(|data| data.strip_prefix(' ').unwrap_or(data)).collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// The content of a `chat.completion.chunk` event (empty when it has none).
fn delta_content(data: &str) -> String {
    let event: Value = serde_json::from_str(data).unwrap();
    event["choices"][0]["delta"]["content"].as_str().unwrap_or_default().to_string()
}

/// What one client saw of one stream.
struct Observed {
    prompt: String,
    start: Instant,
    /// genpipe only: when `POST /v1/runs` was answered.
    admitted: Option<Instant>,
    /// Each chunk of text with the time it arrived.
    chunks: Vec<(Instant, String)>,
    end: Instant,
}

/// A stream straight from the model server.
async fn direct(client: &reqwest::Client, server: SocketAddr, prompt: String) -> Observed {
    let start = Instant::now();
    let body = json!({
        "model": MODEL,
        "messages": [{ "role": "user", "content": prompt }],
        "max_tokens": TOKENS,
        "temperature": 0.7,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let response = client.post(format!("http://{server}/v1/chat/completions")).bearer_auth(SERVER_KEY).json(&body).send().await;
    let response = response.unwrap();
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    let mut chunks = Vec::new();
    let end = loop {
        let (at, data) = events.next().await.expect("the stream ended before [DONE]");
        if data == "[DONE]" {
            break at;
        }
        let content = delta_content(&data);
        if !content.is_empty() {
            chunks.push((at, content));
        }
    };
    Observed { prompt, start, admitted: None, chunks, end }
}

/// The same completion as a genpipe run, followed over its event stream.
async fn through_genpipe(client: &reqwest::Client, base: &str, prompt: String) -> Observed {
    let start = Instant::now();
    let body = json!({ "pipeline": "chat", "input": { "prompt": prompt } });
    let response = client.post(format!("{base}/v1/runs")).bearer_auth(ACCOUNT_KEY).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let admitted = Instant::now();
    let run: Value = response.json().await.unwrap();
    let id = run["id"].as_str().unwrap();
    let response = client.get(format!("{base}/v1/runs/{id}/events")).bearer_auth(ACCOUNT_KEY).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    let mut chunks = Vec::new();
    let end = loop {
        let (at, data) = events.next().await.expect("the event stream ended before run_ended");
        let event: Value = serde_json::from_str(&data).unwrap();
        match event["type"].as_str() {
            Some("text") => chunks.push((at, event["chunk"].as_str().unwrap().to_string())),
            Some("run_ended") => {
                assert_eq!(event["status"], "completed", "{event}");
                break at;
            }
            _ => {}
        }
    };
    Observed { prompt, start, admitted: Some(admitted), chunks, end }
}

/// The measures of one stream.
struct Sample {
    first_token: Duration,
    total: Duration,
    /// From the client's request to the server's arrival of the upstream request.
    upstream_request: Duration,
    /// From the client's request to the server's sending of the first token.
    first_sent: Duration,
    /// genpipe only: from the client's request to the answer of `POST /v1/runs`.
    admitted: Option<Duration>,
    /// Each chunk's arrival at the client minus the sending of its last token by the server.
    chunk_latencies: Vec<Duration>,
}

/// Checks a stream's text against the server's completion and measures it against what the
/// server recorded.
fn measure(observed: &Observed, log: &UpstreamLog) -> Sample {
    let tokens = completion(&observed.prompt, TOKENS);
    let text: String = observed.chunks.iter().map(|(_, chunk)| chunk.as_str()).collect();
    assert_eq!(text, tokens.concat(), "the streamed text differs from the server's completion");
    let upstream = Arc::clone(&log.lock().unwrap()[&observed.prompt]);
    let upstream = upstream.lock().unwrap();
    // When the server sent each token: each event of each frame with content.
    let mut sent = Vec::new();
    for (at, frame) in &upstream.frames {
        for block in std::str::from_utf8(frame).unwrap().split("\n\n") {
            if let Some(data) = sse_data(block).filter(|data| data != "[DONE]")
                && !delta_content(&data).is_empty()
            {
                sent.push(*at);
            }
        }
    }
    assert_eq!(sent.len(), tokens.len());
    // The byte offset at which each token ends, to find each chunk's last token.
    let ends: Vec<usize> = tokens.iter().scan(0, |end, token| Some(*end + token.len()).inspect(|e| *end = *e)).collect();
    let mut offset = 0;
    let chunk_latencies = observed
        .chunks
        .iter()
        .map(|(at, chunk)| {
            offset += chunk.len();
            let last = ends.iter().position(|&end| end == offset).expect("a chunk ends inside a token");
            at.saturating_duration_since(sent[last])
        })
        .collect();
    Sample {
        first_token: observed.chunks[0].0 - observed.start,
        total: observed.end - observed.start,
        upstream_request: upstream.arrived - observed.start,
        first_sent: sent[0] - observed.start,
        admitted: observed.admitted.map(|at| at - observed.start),
        chunk_latencies,
    }
}

/// A prompt no stream had, whose completion has at least [`TOKENS`] tokens.
fn next_prompt() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let prompt = format!("Story {}: a lighthouse keeper finds a letter in a bottle", NEXT.fetch_add(1, Ordering::Relaxed));
        if completion(&prompt, u32::MAX).len() >= TOKENS as usize {
            return prompt;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Case {
    Direct,
    Genpipe,
}

/// How many streams are in flight, and how they start.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Load {
    /// One stream at a time.
    One,
    /// [`CLIENTS`] clients, each starting a stream as soon as its previous one ended, their first
    /// starts spread over one stream's duration: about [`CLIENTS`] streams always in flight,
    /// starting one by one, as a busy service sees them.
    InFlight,
    /// [`CLIENTS`] streams started at the same moment: a burst, the worst case.
    Burst,
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::One => "1",
            Load::InFlight => "100 in flight",
            Load::Burst => "100 started at once",
        }
    }
}

/// The concurrency of [`Load::InFlight`] and [`Load::Burst`].
const CLIENTS: usize = 100;
const LOADS: [Load; 3] = [Load::One, Load::InFlight, Load::Burst];

/// Where the clients go.
#[derive(Clone)]
struct Target {
    client: reqwest::Client,
    server: SocketAddr,
    genpipe: String,
    log: UpstreamLog,
    /// The server's pause before each token.
    per_token: Duration,
    /// Streams started, measured or not.
    started: Arc<AtomicU64>,
}

impl Target {
    async fn stream(&self, case: Case) -> Observed {
        self.started.fetch_add(1, Ordering::Relaxed);
        let prompt = next_prompt();
        match case {
            Case::Direct => direct(&self.client, self.server, prompt).await,
            Case::Genpipe => through_genpipe(&self.client, &self.genpipe, prompt).await,
        }
    }

    /// `streams` streams of `case` under `load` (for [`Load::InFlight`], `streams` per client),
    /// measured once they all ended, so that no measuring runs beside a stream.
    async fn run(&self, case: Case, load: Load, streams: usize) -> Vec<Sample> {
        let observed = match load {
            Load::One => {
                let mut observed = Vec::new();
                for _ in 0..streams {
                    observed.push(self.stream(case).await);
                }
                observed
            }
            Load::Burst => {
                let mut observed = Vec::new();
                for _ in 0..streams.div_ceil(CLIENTS) {
                    let tasks: Vec<_> = (0..CLIENTS)
                        .map(|_| {
                            let target = self.clone();
                            tokio::spawn(async move { target.stream(case).await })
                        })
                        .collect();
                    for task in tasks {
                        observed.push(task.await.unwrap());
                    }
                }
                observed
            }
            Load::InFlight => self.in_flight(case, streams).await,
        };
        observed.iter().map(|observed| measure(observed, &self.log)).collect()
    }

    /// [`Load::InFlight`]: each client's first stream (the ramp-up) is not kept, then it keeps
    /// `each` streams, then it goes on with streams that are not kept until every client kept
    /// its own, so that every kept stream ran among [`CLIENTS`] others.
    async fn in_flight(&self, case: Case, each: usize) -> Vec<Observed> {
        let done = Arc::new(AtomicUsize::new(0));
        let spread = self.per_token * TOKENS / CLIENTS as u32;
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (target, done) = (self.clone(), Arc::clone(&done));
                tokio::spawn(async move {
                    tokio::time::sleep(spread * i as u32).await;
                    target.stream(case).await;
                    let mut kept = Vec::new();
                    while kept.len() < each {
                        kept.push(target.stream(case).await);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    while done.load(Ordering::Relaxed) < CLIENTS {
                        target.stream(case).await;
                    }
                    kept
                })
            })
            .collect();
        let mut observed = Vec::new();
        for task in tasks {
            observed.extend(task.await.unwrap());
        }
        observed
    }
}

/// The value at quantile `q` (nearest rank) of `values`.
fn quantile(values: &[Duration], q: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One row of the table: a measure of both cases.
fn row(load: Load, measure: &str, direct: &[Duration], genpipe: &[Duration], verdict: impl Fn(Duration, Duration) -> String) {
    let (d50, d99, g50, g99) = (quantile(direct, 0.5), quantile(direct, 0.99), quantile(genpipe, 0.5), quantile(genpipe, 0.99));
    let added = |g: Duration, d: Duration| ms(g) - ms(d);
    println!(
        "| {} | {measure} | {:.2} | {:.2} | {:.2} | {:.2} | {:+.2} | {:+.2} | {} |",
        load.label(),
        ms(d50),
        ms(d99),
        ms(g50),
        ms(g99),
        added(g50, d50),
        added(g99, d99),
        verdict(g50, d50),
    );
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn main() {
    // SAFETY: no other thread exists yet. (As `genpipe` itself does.)
    unsafe { genpipe::runtime::skip_library_backtraces() };
    let quick = std::env::var_os("GENPIPE_BENCH_QUICK").is_some();
    // Rounds; streams per case and round under each load (per client for `InFlight`); the
    // server's pace.
    let (rounds, streams, per_token) =
        if quick { (1, [2, 1, CLIENTS], Duration::from_millis(5)) } else { (3, [20, 2, 2 * CLIENTS], PER_TOKEN) };

    // The clients and the model server on one runtime, genpipe on another (see the module docs).
    let world = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let genpipe_runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (server, stats, connections, log) = world.block_on(model_server(per_token));
    let (base, stop, service) = genpipe_runtime.block_on(genpipe_service(server));
    let target =
        Target { client: reqwest::Client::new(), server, genpipe: base, log, per_token, started: Arc::new(AtomicU64::new(0)) };

    let cases = [Case::Direct, Case::Genpipe];
    let mut samples: HashMap<(Load, Case), Vec<Sample>> = HashMap::new();
    let began = Instant::now();
    world.block_on(async {
        // Warm-up: connections, the plugin's first instances.
        for case in cases {
            target.run(case, Load::One, 2).await;
            if !quick {
                target.run(case, Load::Burst, CLIENTS).await;
            }
        }
        // The cases take turns, so that a spell of machine noise hits them alike.
        for _ in 0..rounds {
            for (load, streams) in LOADS.into_iter().zip(streams) {
                for case in cases {
                    let run = target.run(case, load, streams).await;
                    samples.entry((load, case)).or_default().extend(run);
                }
            }
        }
    });
    let elapsed = began.elapsed();
    let _ = stop.send(());
    genpipe_runtime.block_on(service).unwrap();
    // Every stream made exactly one upstream request, and each went to its end.
    let count = target.started.load(Ordering::Relaxed);
    assert_eq!(stats.chat(MODEL), ModelStats { requests: count, completed: count, failed: 0, closed_early: 0 });

    let kept = |load: Load| samples[&(load, Case::Genpipe)].len();
    println!(
        "stream: openai-mock streams {TOKENS} tokens, one every {} ms; a direct client vs a genpipe client (POST /v1/runs, then its SSE events); streams per case: {} at concurrency 1, {} among 100 in flight, {} started 100 at once; {rounds} alternating rounds; {count} streams in {:.0} s, {} connections to the model server",
        per_token.as_millis(),
        kept(Load::One),
        kept(Load::InFlight),
        kept(Load::Burst),
        elapsed.as_secs_f64(),
        connections.load(Ordering::Relaxed),
    );
    println!();
    println!(
        "| concurrency | ms | direct p50 | direct p99 | genpipe p50 | genpipe p99 | added p50 | added p99 | target (on p50) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|");
    for load in LOADS {
        let direct = &samples[&(load, Case::Direct)];
        let genpipe = &samples[&(load, Case::Genpipe)];
        let of = |samples: &[Sample], f: fn(&Sample) -> Duration| samples.iter().map(f).collect::<Vec<_>>();
        let chunks = |samples: &[Sample]| samples.iter().flat_map(|s| s.chunk_latencies.iter().copied()).collect::<Vec<_>>();
        row(load, "time to first token", &of(direct, |s| s.first_token), &of(genpipe, |s| s.first_token), |g, d| {
            format!("<= +2 ms: {}", met(g.saturating_sub(d) <= FIRST_TOKEN_TARGET))
        });
        row(load, "total stream time", &of(direct, |s| s.total), &of(genpipe, |s| s.total), |g, d| {
            let added = g.as_secs_f64() / d.as_secs_f64() - 1.0;
            format!("<= +10%: {:+.1}%, {}", added * 100.0, met(added <= TOTAL_TARGET))
        });
        row(load, "latency per chunk", &chunks(direct), &chunks(genpipe), |_, _| String::new());
    }
    println!();
    println!("where the first token's time goes (medians, ms from the client's first request):");
    for load in LOADS {
        let median =
            |case: Case, f: fn(&Sample) -> Duration| ms(quantile(&samples[&(load, case)].iter().map(f).collect::<Vec<_>>(), 0.5));
        let genpipe = &samples[&(load, Case::Genpipe)];
        let chunks: usize = genpipe.iter().map(|s| s.chunk_latencies.len()).sum();
        println!(
            "  {}: POST /v1/runs answered {:.2}; upstream request at the server: direct {:.2}, genpipe {:.2}; first token sent: direct {:.2}, genpipe {:.2}; at the client: direct {:.2}, genpipe {:.2}; genpipe text events per stream {:.1}",
            load.label(),
            ms(quantile(&genpipe.iter().map(|s| s.admitted.unwrap()).collect::<Vec<_>>(), 0.5)),
            median(Case::Direct, |s| s.upstream_request),
            median(Case::Genpipe, |s| s.upstream_request),
            median(Case::Direct, |s| s.first_sent),
            median(Case::Genpipe, |s| s.first_sent),
            median(Case::Direct, |s| s.first_token),
            median(Case::Genpipe, |s| s.first_token),
            chunks as f64 / genpipe.len() as f64,
        );
    }
}

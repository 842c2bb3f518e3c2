//! `genpipe serve` against slow and greedy clients, over loopback TCP (README, "Slow and greedy
//! clients"): each bound holds, the service keeps serving others meanwhile, and the memory that
//! idle connections cost stays within the bounds stated here and in the README.
//!
//! Runs that must stay open while clients gather wait at a [`Gate`] (a loopback server the test
//! opens), so nothing here depends on timing but generous deadlines.

mod clients;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clients::{Gate, Server, Subscriber, exchange, get_request, metric, raise_open_file_limit, read_reply, slow_clients, within};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const SLOW_CLIENTS: usize = 2000;
const SUBSCRIBERS: usize = 5000;
/// Subscribers connecting at once, each until its first event: the listen queue (1,024) never
/// holds more.
const CONNECTING: usize = 128;
/// `header_read_timeout_secs` of the slow-client test: long enough for the other clients to be
/// served while every slow one is still open, on a machine busy with the other tests.
const HEADER_TIMEOUT_SECS: u64 = 15;
/// Resident memory the server may take per slow connection (README: "Slow and greedy clients").
const SLOW_CONNECTION_BYTES: u64 = 32 << 10;
/// Resident memory the server may take per idle event stream (README: "Slow and greedy clients").
const SUBSCRIBER_BYTES: u64 = 32 << 10;

/// The two-step no-op pipeline, a memory ledger, and account `demo`.
const NOOP: &str = r#"
[ledger]
kind = "memory"

[[accounts]]
id = "demo"
api_key = "demo-key"
credits = 1000000000

[plugins.test-llm]
path = "builtin:test-llm"
world = "llm-step"

[plugins.test-image]
path = "builtin:test-image"
world = "image-step"

[pipelines.noop]
[[pipelines.noop.steps]]
id = "text"
plugin = "test-llm"
max_cost = 10

[[pipelines.noop.steps]]
id = "image"
plugin = "test-image"
max_cost = 10
params = { width = 1, height = 1 }
"#;

/// A pipeline whose first step waits at the gate at `{gate}`, then streams the prompt word by
/// word; accounts are added by each test.
const GATED: &str = r#"
[ledger]
kind = "memory"

[plugins.gatekeeper]
path = "builtin:test-hostile"
world = "llm-step"
allowed_hosts = ["{gate}"]
timeout_ms = 600000
http_timeout_ms = 600000

[plugins.test-llm]
path = "builtin:test-llm"
world = "llm-step"

[pipelines.gated]
[[pipelines.gated.steps]]
id = "gate"
plugin = "gatekeeper"
max_cost = 1
params = { behaviour = "http-get", url = "http://{gate}/gate" }

[[pipelines.gated.steps]]
id = "words"
plugin = "test-llm"
after = ["gate"]
max_cost = 100
params = { behaviour = "chunks" }
"#;

fn gated(gate: &Gate, server: &str, accounts: &[&str]) -> String {
    let mut toml = format!("[server]\n{server}\n{}", GATED.replace("{gate}", &gate.address.to_string()));
    for account in accounts {
        toml.push_str(&format!("\n[[accounts]]\nid = \"{account}\"\napi_key = \"{account}-key\"\ncredits = 1000000\n"));
    }
    toml
}

/// Starts a run of `pipeline` for `key` without waiting; returns its id.
async fn start_run(client: &reqwest::Client, server: &Server, key: &str, pipeline: &str, prompt: &str) -> String {
    let response = client
        .post(format!("{}/v1/runs", server.base))
        .bearer_auth(key)
        .json(&json!({ "pipeline": pipeline, "input": { "prompt": prompt } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let run: Value = response.json().await.unwrap();
    run["id"].as_str().unwrap().to_string()
}

/// Runs the noop pipeline to its end; panics unless it completed.
async fn noop_run(client: &reqwest::Client, server: &Server, prompt: &str) {
    let response = client
        .post(format!("{}/v1/runs", server.base))
        .bearer_auth("demo-key")
        .header("Prefer", "wait=60")
        .json(&json!({ "pipeline": "noop", "input": { "prompt": prompt } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let run: Value = response.json().await.unwrap();
    assert_eq!(run["status"], "completed", "{run}");
}

/// Asserts that `response` is a problem document of `status` and `kind`, whose detail contains
/// `detail`; returns its `Retry-After`, if any.
async fn problem(response: reqwest::Response, status: u16, kind: &str, detail: &str) -> Option<String> {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let problem: Value = response.json().await.unwrap();
    assert_eq!((problem["status"].as_u64(), problem["type"].as_str()), (Some(status.into()), Some(kind)), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains(detail), "{problem}");
    retry_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_at_the_header_timeout_while_others_are_served() {
    raise_open_file_limit();
    let server = Server::start(&format!("[server]\nheader_read_timeout_secs = {HEADER_TIMEOUT_SECS}\n{NOOP}"));
    let client = reqwest::Client::new();
    noop_run(&client, &server, "warm-up").await;
    let before = server.resident_bytes();

    let slow = within(60, "the slow clients connected", slow_clients(server.address, SLOW_CLIENTS)).await;
    let slow: Vec<_> = slow.into_iter().map(|client| tokio::spawn(client.dribble_until_closed())).collect();
    // Connected is not yet accepted: the kernel's listen queue holds some for a moment.
    let accepted = async {
        while server.metric("genpipe_http_connections").await <= SLOW_CLIENTS as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    within(HEADER_TIMEOUT_SECS / 2, "the server accepting every slow client", accepted).await;
    let during = server.resident_bytes();

    // Other clients are served meanwhile: runs complete, and the server counts every slow client
    // still open when it answers (on the connection the runs used).
    for i in 0..20 {
        noop_run(&client, &server, &format!("served {i}")).await;
    }
    let metrics = client.get(format!("{}/metrics", server.base)).send().await.unwrap().text().await.unwrap();
    let open = metric(&metrics, "genpipe_http_connections");
    assert!(open > SLOW_CLIENTS as u64, "{open} connections open: slow clients were closed before the others were served");

    let timeout = Duration::from_secs(HEADER_TIMEOUT_SECS);
    let mut lasted = Vec::new();
    for client in slow {
        lasted.push(within(HEADER_TIMEOUT_SECS + 60, "a slow client was closed", client).await.unwrap());
    }
    let (first, last) = (*lasted.iter().min().unwrap(), *lasted.iter().max().unwrap());
    let grown = during.saturating_sub(before);
    println!(
        "{SLOW_CLIENTS} slow clients closed after {:.2} to {:.2} s (header_read_timeout_secs = {HEADER_TIMEOUT_SECS}); resident memory {} MiB before, {} MiB with them: {} bytes per connection",
        first.as_secs_f64(),
        last.as_secs_f64(),
        before >> 20,
        during >> 20,
        grown / SLOW_CLIENTS as u64
    );
    assert!(first >= timeout, "a slow client was closed after {first:?}, before the header timeout");
    assert!(last <= timeout + Duration::from_secs(10), "a slow client was still open after {last:?}");
    assert!(
        grown <= SLOW_CLIENTS as u64 * SLOW_CONNECTION_BYTES,
        "{SLOW_CLIENTS} slow connections took {} bytes each, over the bound of {SLOW_CONNECTION_BYTES}",
        grown / SLOW_CLIENTS as u64
    );
    // The service is whole afterwards.
    noop_run(&client, &server, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_subscribers_of_one_run_each_receive_every_event_in_order() {
    raise_open_file_limit();
    const PROMPT: &str =
        "every subscriber hears each of these twenty words in the order they were streamed by the plugin at the end of this run";
    let gate = Gate::start().await;
    let limits =
        "max_streams_per_run = 6000\nmax_streams_per_account = 6000\nrate_limit_per_sec = 100000\nrate_limit_burst = 100000";
    let server = Server::start(&gated(&gate, limits, &["viewer"]));
    let client = reqwest::Client::new();
    let id = start_run(&client, &server, "viewer-key", "gated", PROMPT).await;
    within(60, "the run reached the gate", gate.arrivals(1)).await;
    let before = server.resident_bytes();

    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let ready = Arc::new(Semaphore::new(0));
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            let (connecting, ready, address, id) = (Arc::clone(&connecting), Arc::clone(&ready), server.address, id.clone());
            tokio::spawn(async move {
                let permit = connecting.acquire().await.unwrap();
                let subscriber = Subscriber::connect(address, "viewer-key", &id).await;
                drop(permit);
                ready.add_permits(1);
                subscriber.events().await
            })
        })
        .collect();
    within(120, "every subscriber received the first event", ready.acquire_many(SUBSCRIBERS as u32)).await.unwrap().forget();
    assert_eq!(server.metric("genpipe_event_streams").await, SUBSCRIBERS as u64);
    let with = server.resident_bytes();

    // The rest of the run flows to all of them at once.
    gate.open();
    let mut received = Vec::new();
    for subscriber in subscribers {
        received.push(within(120, "a stream ended", subscriber).await.unwrap());
    }

    // The whole log, read after the end: what every subscriber must have received.
    let log = Subscriber::connect(server.address, "viewer-key", &id).await.events().await;
    let words = PROMPT.split_inclusive(' ').count();
    let mut expected = vec!["step_started", "step_ended", "step_started"];
    expected.extend(std::iter::repeat_n("text", words));
    expected.extend(["step_ended", "run_ended"]);
    assert_eq!(log.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(), expected);
    let mut text = String::new();
    for (at, event) in log.iter().enumerate() {
        let data: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!((data["seq"].as_u64(), data["type"].as_str()), (Some(event.id), Some(event.event.as_str())));
        assert!(at == 0 || log[at - 1].id < event.id, "numbers increase: {log:?}");
        if event.event == "text" {
            text.push_str(data["chunk"].as_str().unwrap());
        }
    }
    assert_eq!(text, PROMPT);
    assert!(log.last().unwrap().data.contains(r#""status":"completed""#), "{log:?}");
    for (i, events) in received.iter().enumerate() {
        assert_eq!(events, &log, "subscriber {i}");
    }

    let per_subscriber = with.saturating_sub(before) / SUBSCRIBERS as u64;
    println!(
        "{SUBSCRIBERS} subscribers each received all {} events in order; resident memory {} MiB before, {} MiB with them: {per_subscriber} bytes per subscriber",
        log.len(),
        before >> 20,
        with >> 20
    );
    assert!(
        per_subscriber <= SUBSCRIBER_BYTES,
        "an idle event stream took {per_subscriber} bytes, over the bound of {SUBSCRIBER_BYTES}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_over_its_rate_gets_429_with_retry_after_and_another_is_unaffected() {
    raise_open_file_limit();
    const BURST: u64 = 10;
    let accounts = r#"
[[accounts]]
id = "greedy"
api_key = "greedy-key"
credits = 1000

[[accounts]]
id = "modest"
api_key = "modest-key"
credits = 1000
"#;
    let server = Server::start(&format!("[server]\nrate_limit_per_sec = 1\nrate_limit_burst = {BURST}\n{NOOP}\n{accounts}"));
    let client = reqwest::Client::new();
    let account = |key: &'static str| client.get(format!("{}/v1/account", server.base)).bearer_auth(key).send();

    let began = Instant::now();
    let (mut served, mut refused, mut retry_after) = (0, 0, None);
    for i in 0..3 * BURST {
        let response = account("greedy-key").await.unwrap();
        if response.status() == 429 {
            refused += 1;
            let wait = problem(response, 429, "urn:genpipe:problem:rate-limited", "over its request rate").await;
            retry_after = Some(wait.expect("a 429 has Retry-After"));
        } else {
            assert_eq!(response.status(), 200);
            served += 1;
        }
        // Meanwhile another account makes as many requests as its own burst allows, all served.
        if i % 3 == 0 {
            assert_eq!(account("modest-key").await.unwrap().status(), 200, "the other account is unaffected");
        }
    }
    let elapsed = began.elapsed().as_secs();
    assert!(served >= BURST && served <= BURST + elapsed + 1, "{served} served in {elapsed} s with a burst of {BURST} and 1/s");
    assert!(refused > 0);
    assert_eq!(retry_after.as_deref(), Some("1"), "a token is back within a second");
    let metrics = client.get(format!("{}/metrics", server.base)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&metrics, "genpipe_http_limited_total"), refused);

    // A client that honours Retry-After is served again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(account("greedy-key").await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_per_run_and_per_account_and_a_trickled_body_gets_408() {
    raise_open_file_limit();
    let gate = Gate::start().await;
    let limits = "max_streams_per_run = 2\nmax_streams_per_account = 3\nbody_read_timeout_secs = 1";
    let server = Server::start(&gated(&gate, limits, &["streamer", "bystander", "trickler"]));
    let client = reqwest::Client::new();
    let a = start_run(&client, &server, "streamer-key", "gated", "run a").await;
    let b = start_run(&client, &server, "streamer-key", "gated", "run b").await;
    let c = start_run(&client, &server, "bystander-key", "gated", "run c").await;
    let open = |key: &'static str, run: &str| client.get(format!("{}/v1/runs/{run}/events", server.base)).bearer_auth(key).send();

    let mut streams = Vec::new();
    for run in [&a, &a, &b] {
        let stream = open("streamer-key", run).await.unwrap();
        assert_eq!(stream.status(), 200);
        streams.push(stream);
    }
    let refused = open("streamer-key", &a).await.unwrap();
    let wait = problem(refused, 429, "urn:genpipe:problem:too-many-streams", "max_streams_per_run").await;
    assert_eq!(wait.as_deref(), Some("5"));
    let refused = open("streamer-key", &b).await.unwrap();
    let wait = problem(refused, 429, "urn:genpipe:problem:too-many-streams", "max_streams_per_account").await;
    assert_eq!(wait.as_deref(), Some("5"));
    let bystander = open("bystander-key", &c).await.unwrap();
    assert_eq!(bystander.status(), 200, "another account is unaffected");
    streams.push(bystander);
    assert_eq!(server.metric("genpipe_event_streams").await, 4);

    // A body that trickles in slower than body_read_timeout_secs (1 s) gets 408, and no run.
    let body = json!({ "pipeline": "gated", "input": { "prompt": "never sent whole" } }).to_string();
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let head = format!(
        "POST /v1/runs HTTP/1.1\r\nHost: genpipe\r\nAuthorization: Bearer trickler-key\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let (mut read, mut write) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for byte in body.bytes() {
            if write.write_all(&[byte]).await.is_err() {
                break;
            }
            // The client's pace: a byte every 200 ms, some 14 s for the whole body.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let reply = within(60, "an answer to the trickled body", read_reply(&mut read, &mut Vec::new())).await;
    let waited = sent.elapsed();
    trickle.abort();
    assert_eq!(reply.status, 408, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/problem+json"));
    let problem: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(problem["type"], "urn:genpipe:problem:body-timeout", "{problem}");
    assert!(waited >= Duration::from_secs(1) && waited < Duration::from_secs(30), "answered after {waited:?}");
    let account: Value =
        client.get(format!("{}/v1/account", server.base)).bearer_auth("trickler-key").send().await.unwrap().json().await.unwrap();
    assert_eq!(account["recent_runs"], json!([]), "{account}");

    // The runs end; their streams end, and give their slots back.
    gate.open();
    for stream in streams {
        let text = within(60, "a stream ended", stream.text()).await.unwrap();
        assert!(text.contains("event: run_ended"), "{text}");
    }
    assert_eq!(server.metric("genpipe_event_streams").await, 0);
    let again = open("streamer-key", &a).await.unwrap();
    assert_eq!(again.status(), 200, "room again once streams ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_a_connection_waits_until_one_closes() {
    raise_open_file_limit();
    const CAP: usize = 4;
    let server = Server::start(&format!("[server]\nmax_connections = {CAP}\nheader_read_timeout_secs = 600\n{NOOP}"));
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(connected_and_served(server.address).await);
    }
    // The kernel completes the handshake (the listen queue), but genpipe does not accept it.
    let mut waiting = TcpStream::connect(server.address).await.unwrap();
    waiting.write_all(get_request("/healthz", None).as_bytes()).await.unwrap();
    let metrics = exchange(&mut held[0], &get_request("/metrics", None)).await;
    assert_eq!(metric(&metrics.text(), "genpipe_http_connections"), CAP as u64, "the server holds only its cap");
    let mut scratch = [0u8; 1];
    assert!(
        matches!(waiting.try_read(&mut scratch), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the connection beyond the cap was answered"
    );

    // One closes: the waiting connection is accepted and answered.
    drop(held.pop());
    let reply = within(30, "the waiting connection served", read_reply(&mut waiting, &mut Vec::new())).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
    let metrics = exchange(&mut held[0], &get_request("/metrics", None)).await;
    assert_eq!(metric(&metrics.text(), "genpipe_http_connections"), CAP as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_64_kib_gets_431_and_its_connection_is_closed() {
    raise_open_file_limit();
    let server = Server::start(&format!("[server]\n{NOOP}"));
    let head = |padding: usize| format!("GET /healthz HTTP/1.1\r\nHost: genpipe\r\nX-Padding: {}\r\n\r\n", "p".repeat(padding));
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let reply = exchange(&mut stream, &head(60_000)).await;
    assert_eq!(reply.status, 200, "a head under the bound is served");

    // Whole, in one write: the server may stop reading, answer and close before the client has
    // sent it all, so a failed write is expected; the answer is still there to read.
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let _ = stream.write_all(head(70_000).as_bytes()).await;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = within(30, "the connection closed", stream.read(&mut chunk)).await {
        answer.extend_from_slice(&chunk[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

/// A connection on which one request was answered, kept open.
async fn connected_and_served(address: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let reply = exchange(&mut stream, &get_request("/healthz", None)).await;
    assert_eq!(reply.status, 200);
    stream
}

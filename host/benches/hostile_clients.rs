//! Runs per second of the two-step `noop` pipeline while 2,000 slow clients and 5,000 event-stream
//! subscribers hold connections, against the same load without them (target: at least 0.8x).
//!
//! `genpipe serve` (the built binary) runs on a memory ledger with the default connection
//! bounds (`max_connections` 10,000, `header_read_timeout_secs` 10); the account's rate limit and
//! the stream caps are raised, so that one account can drive the load and 5,000 streams can
//! follow one run. In this process, on one tokio runtime:
//! - the load: 64 clients, each on its own keep-alive connection, POSTing `/v1/runs` of `noop`
//!   with `Prefer: wait=10` one after another; a run counts once its 200 says `completed`;
//! - the crowd: 5,000 subscribers of one run that waits at a gate (idle event streams of a run
//!   in progress), and 2,000 slow clients sending a request head one byte a second, each
//!   reconnecting when the server closes it at the header timeout.
//!
//! Rounds alternate between the load alone and the load among the crowd (gathered before its
//! round is measured, dispersed after), three of each after a warm-up, so that a spell of
//! machine noise hits both alike. Printed: runs/s of every round, the medians and their ratio,
//! and what the first crowd costs the server in resident memory, per idle event stream and per
//! slow connection. The crowd's own clients run on
//! the same cores as the server and the load, so their cost is part of the figure. Every
//! subscriber must receive its run's whole log. `GENPIPE_BENCH_QUICK=1` runs one short round of
//! each with a small crowd (CI keeps it building and working).

#[path = "../tests/clients/mod.rs"]
mod clients;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clients::{Gate, Server, SlowClient, SseEvent, Subscriber, raise_open_file_limit, slow_clients};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

/// Clients of the load, each with a run in flight at a time.
const LOAD_CLIENTS: usize = 64;
/// Subscribers connecting at once, each until its first event: the listen queue (1,024) never
/// holds more.
const CONNECTING: usize = 128;

const CONFIG: &str = r#"
[server]
max_runs_in_flight = 4096
max_kept_runs = 1024            # a steady state within the benchmark's runs, as a server reaches one
max_streams_per_run = 6000
max_streams_per_account = 6000
rate_limit_per_sec = 1000000
rate_limit_burst = 1000000

[runtime]
max_concurrent_steps = 256

[ledger]
kind = "memory"

[[accounts]]
id = "bench"
api_key = "bench-key"
credits = 1000000000000000

[plugins.test-llm]
path = "builtin:test-llm"
world = "llm-step"

[plugins.test-image]
path = "builtin:test-image"
world = "image-step"

[plugins.gatekeeper]
path = "builtin:test-hostile"
world = "llm-step"
allowed_hosts = ["{gate}"]
timeout_ms = 600000
http_timeout_ms = 600000

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

/// Runs `noop` from [`LOAD_CLIENTS`] clients for `measure`; returns runs completed per second.
async fn load(client: &reqwest::Client, base: &str, measure: Duration) -> f64 {
    let runs = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let deadline = began + measure;
    let clients: Vec<_> = (0..LOAD_CLIENTS)
        .map(|_| {
            let (client, url, runs) = (client.clone(), format!("{base}/v1/runs"), Arc::clone(&runs));
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let response = client
                        .post(&url)
                        .bearer_auth("bench-key")
                        .header("Prefer", "wait=10")
                        .json(&json!({ "pipeline": "noop", "input": { "prompt": "hello" } }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    let run: Value = response.json().await.unwrap();
                    assert_eq!(run["status"], "completed", "{run}");
                    runs.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    runs.load(Ordering::Relaxed) as f64 / began.elapsed().as_secs_f64()
}

/// Slow clients and subscribers holding connections.
struct Crowd {
    slow: Vec<JoinHandle<u64>>,
    stop: watch::Sender<bool>,
    subscribers: Vec<JoinHandle<Vec<SseEvent>>>,
    /// The server's resident memory before the crowd, with the subscribers, then with all.
    resident: [u64; 3],
}

impl Crowd {
    /// Starts a run that waits at `gate`, subscribes `subscribers` clients to it (each has its
    /// first event), then connects `slow` slow clients.
    async fn gather(server: &Server, client: &reqwest::Client, gate: &Gate, slow: usize, subscribers: usize) -> Crowd {
        gate.close();
        let response = client
            .post(format!("{}/v1/runs", server.base))
            .bearer_auth("bench-key")
            .json(&json!({ "pipeline": "gated", "input": { "prompt": "words for every subscriber to hear" } }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let run: Value = response.json().await.unwrap();
        let id = run["id"].as_str().unwrap().to_string();
        gate.arrivals(1).await;
        let mut resident = [server.resident_bytes(), 0, 0];

        let connecting = Arc::new(Semaphore::new(CONNECTING));
        let ready = Arc::new(Semaphore::new(0));
        let subscribers: Vec<_> = (0..subscribers)
            .map(|_| {
                let (connecting, ready, address, id) = (Arc::clone(&connecting), Arc::clone(&ready), server.address, id.clone());
                tokio::spawn(async move {
                    let permit = connecting.acquire().await.unwrap();
                    let subscriber = Subscriber::connect(address, "bench-key", &id).await;
                    drop(permit);
                    ready.add_permits(1);
                    subscriber.events().await
                })
            })
            .collect();
        ready.acquire_many(subscribers.len() as u32).await.unwrap().forget();
        resident[1] = server.resident_bytes();
        let (stop, stopped) = watch::channel(false);
        let slow: Vec<_> = slow_clients(server.address, slow)
            .await
            .into_iter()
            .map(|client| tokio::spawn(keep_slow(client, server.address, stopped.clone())))
            .collect();
        resident[2] = server.resident_bytes();
        Crowd { slow, stop, subscribers, resident }
    }

    /// Closes the slow clients, opens the gate and reads every subscriber's stream to its end;
    /// returns how often the server closed a slow client.
    async fn disperse(self, gate: &Gate) -> u64 {
        self.stop.send_replace(true);
        let mut closed = 0;
        for slow in self.slow {
            closed += slow.await.unwrap();
        }
        gate.open();
        let mut logs = Vec::new();
        for subscriber in self.subscribers {
            logs.push(subscriber.await.unwrap());
        }
        for log in &logs {
            assert_eq!(log, &logs[0], "every subscriber receives the whole log");
        }
        assert_eq!(logs[0].last().map(|e| e.event.as_str()), Some("run_ended"));
        closed
    }
}

/// Keeps a slow client connected, reconnecting whenever the server closes it, until `stopped`;
/// returns how often the server closed it.
async fn keep_slow(mut client: SlowClient, address: SocketAddr, mut stopped: watch::Receiver<bool>) -> u64 {
    let mut closed = 0;
    loop {
        tokio::select! {
            () = async { drop(stopped.wait_for(|stop| *stop).await) } => return closed,
            _ = client.dribble_until_closed() => {
                closed += 1;
                client = SlowClient::connect(address).await;
            }
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn main() {
    // SAFETY: no other thread exists yet. (As `genpipe` itself does.)
    unsafe { genpipe::runtime::skip_library_backtraces() };
    let quick = std::env::var_os("GENPIPE_BENCH_QUICK").is_some();
    let (rounds, measure, slow, subscribers) =
        if quick { (1, Duration::from_millis(500), 100, 200) } else { (3, Duration::from_secs(5), 2000, 5000) };
    raise_open_file_limit();
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    tokio.block_on(async {
        let gate = Gate::start().await;
        let server = Server::start(&CONFIG.replace("{gate}", &gate.address.to_string()));
        let client = reqwest::Client::new();
        if !quick {
            load(&client, &server.base, measure).await;
        }
        let (mut alone, mut among) = (Vec::new(), Vec::new());
        let (mut per_subscriber, mut per_slow, mut closed) = (Vec::new(), Vec::new(), 0);
        for round in 0..rounds {
            let runs = load(&client, &server.base, measure).await;
            alone.push(runs);
            let crowd = Crowd::gather(&server, &client, &gate, slow, subscribers).await;
            let [before, subscribed, all] = crowd.resident;
            per_subscriber.push(subscribed.saturating_sub(before) as f64 / subscribers as f64);
            per_slow.push(all.saturating_sub(subscribed) as f64 / slow as f64);
            let runs_among = load(&client, &server.base, measure).await;
            among.push(runs_among);
            closed += crowd.disperse(&gate).await;
            println!(
                "round {}: {runs:.0} runs/s alone, {runs_among:.0} among the crowd; resident memory {} MiB before the crowd, {} MiB with the subscribers, {} MiB with the slow clients too",
                round + 1,
                before >> 20,
                subscribed >> 20,
                all >> 20
            );
        }
        let (alone, among) = (median(&alone), median(&among));
        println!(
            "hostile_clients: noop runs/s from {LOAD_CLIENTS} clients, {rounds} alternating rounds of {:.1} s; crowd: {subscribers} subscribers of one run and {slow} slow clients (closed by the server {closed} times)",
            measure.as_secs_f64()
        );
        println!();
        println!("| | runs/s (median) |");
        println!("|---|---:|");
        println!("| load alone | {alone:.0} |");
        println!("| load among the crowd | {among:.0} |");
        println!("| ratio | **{:.2}x** (target: at least 0.8x) |", among / alone);
        println!();
        // The first crowd's: later ones may reuse memory the allocator kept from earlier ones.
        println!(
            "server resident memory, first crowd: {:.1} KiB per idle event stream, {:.1} KiB per slow connection",
            per_subscriber[0] / 1024.0,
            per_slow[0] / 1024.0
        );
    });
}

//! How late a run's events reach a client of another replica: two genpipe services in one
//! process (each with its own PostgreSQL ledger, lease and shared run store, on one database,
//! as two replicas would be), a run started on replica A, and two clients following its events
//! over SSE, one on A (served from A's memory) and one on B (served from the database, woken by
//! LISTEN/NOTIFY). For every event both receive, the delay is B's arrival time minus A's.
//!
//! Two loads: one run at a time, and 50 runs at once (each followed on both replicas). Each run
//! streams 20 words as `text` events, back to back, after a 100 ms pause that lets both clients
//! connect first. Printed: the median, p99 and largest delay per load. Nothing is asserted about
//! the figures. PostgreSQL: the server in `GENPIPE_TEST_POSTGRES_URL`, or the one
//! `scripts/postgres.sh start` starts. `cargo bench --bench replica_events`;
//! `GENPIPE_BENCH_QUICK=1` runs two runs per load (CI keeps the benchmark working).

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use genpipe::Host;
use genpipe::config::Config;
use genpipe::server::{self, AppState};
use tokio::net::TcpListener;

#[path = "../tests/common/postgres.rs"]
mod postgres;

const CONFIG: &str = r#"
[ledger]
kind = "postgres"
url = "{url}"

[[accounts]]
id = "bench"
api_key = "bench-key"
credits = 1000000000

[plugins.test-llm]
path = "builtin:test-llm"
world = "llm-step"

[pipelines.words]
[[pipelines.words.steps]]
id = "text"
plugin = "test-llm"
max_cost = 100
params = { behaviour = "chunks", delay_ms = 100 }
"#;

/// Twenty words: twenty `text` events.
const PROMPT: &str = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen \
                      sixteen seventeen eighteen nineteen twenty";

/// Starts a replica on the database at `url`; returns its base URL.
async fn replica(url: &str) -> String {
    let config = Config::parse(&CONFIG.replace("{url}", url), "replica.toml", Path::new(".")).unwrap();
    let ledger = genpipe::state::ledger::open(&config.ledger, Path::new(".")).await.unwrap();
    let host = Host::new(&config, ledger).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(host, &config, None);
    tokio::spawn(async move { server::serve(listener, state, std::future::pending()).await.unwrap() });
    base
}

/// Follows run `id` on `base` to its end: each event's number and when it arrived.
async fn follow(client: reqwest::Client, base: String, id: String) -> Vec<(u64, Instant)> {
    let response = client
        .get(format!("{base}/v1/runs/{id}/events"))
        .bearer_auth("bench-key")
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let mut body = response.bytes_stream();
    let (mut pending, mut arrivals) = (String::new(), Vec::new());
    while let Some(bytes) = body.next().await {
        let at = Instant::now();
        pending.push_str(std::str::from_utf8(&bytes.unwrap()).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            if let Some(seq) = block.lines().find_map(|line| line.strip_prefix("id: ")) {
                arrivals.push((seq.parse().unwrap(), at));
            }
        }
    }
    arrivals
}

/// Starts one run on `a`, follows it on `a` and `b`, and returns the delay of each event on `b`.
async fn one_run(client: &reqwest::Client, a: &str, b: &str) -> Vec<Duration> {
    let run: serde_json::Value = client
        .post(format!("{a}/v1/runs"))
        .bearer_auth("bench-key")
        .json(&serde_json::json!({ "pipeline": "words", "input": { "prompt": PROMPT } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = run["id"].as_str().unwrap().to_string();
    let on_a = tokio::spawn(follow(client.clone(), a.to_string(), id.clone()));
    let on_b = tokio::spawn(follow(client.clone(), b.to_string(), id));
    let (on_a, on_b) = (on_a.await.unwrap(), on_b.await.unwrap());
    assert_eq!(on_a.iter().map(|e| e.0).collect::<Vec<_>>(), on_b.iter().map(|e| e.0).collect::<Vec<_>>(), "same events");
    on_a.iter().zip(&on_b).map(|((_, at_a), (_, at_b))| at_b.saturating_duration_since(*at_a)).collect()
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() {
    let quick = std::env::var_os("GENPIPE_BENCH_QUICK").is_some();
    let (sequential, concurrent) = if quick { (2, 2) } else { (50, 50) };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let database = postgres::TestDatabase::create().await;
        let (a, b) = (replica(&database.url).await, replica(&database.url).await);
        let client = reqwest::Client::new();
        one_run(&client, &a, &b).await; // warm-up
        println!("replica event delay: a run on replica A followed over SSE on A and on B; B's arrival minus A's, per event");
        println!("| load | events | median ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|");
        for (label, runs, at_once) in [("1 run at a time", sequential, false), ("50 runs at once", concurrent, true)] {
            let mut delays = Vec::new();
            if at_once {
                let all = (0..runs).map(|_| {
                    let (client, a, b) = (client.clone(), a.clone(), b.clone());
                    tokio::spawn(async move { one_run(&client, &a, &b).await })
                });
                for run in futures::future::join_all(all).await {
                    delays.extend(run.unwrap());
                }
            } else {
                for _ in 0..runs {
                    delays.extend(one_run(&client, &a, &b).await);
                }
            }
            delays.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "| {label} | {} | {:.2} | {:.2} | {:.2} |",
                delays.len(),
                ms(quantile(&delays, 0.5)),
                ms(quantile(&delays, 0.99)),
                ms(*delays.last().unwrap())
            );
        }
    });
}

//! End-to-end: `genpipe serve` with the default limits, 200 hostile runs mixed with 200 good
//! ones, all at once. Every good run completes with the right output and charge, every hostile
//! one fails with its kind, the server's resident memory afterwards stays within a stated bound
//! of before, its log stays small, and the ledger verifies.
//!
//! Bounds asserted (README, "Isolation"): resident memory grows by at most what the host keeps
//! for runs (`genpipe_run_memory_bytes`, itself at most `max_run_memory_mb`) plus 192 MiB of
//! allocator and instance-pool slack; the log holds at most 2 KiB per run plus `max_log_bytes`
//! per log-flooding step.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use serde_json::{Value, json};

/// Each hostile behaviour, its params, and the kind and message its run must fail with.
const HOSTILE: &[(&str, &str, &str, &str)] = &[
    ("loop", r#"behaviour = "loop""#, "timeout", "timed out after 30000 ms"),
    ("memory-bomb", r#"behaviour = "memory-bomb""#, "out-of-memory", "memory limit of 64 MiB"),
    ("trap", r#"behaviour = "trap""#, "trap", "trapped on purpose"),
    ("recursion", r#"behaviour = "recursion""#, "trap", "call stack exhausted"),
    ("big-output", r#"behaviour = "big-output""#, "output-too-large", "max_output_bytes (4194304"),
    ("emit-flood", r#"behaviour = "emit-flood""#, "output-too-large", "max_output_bytes (4194304"),
    ("report-flood", r#"behaviour = "report-flood""#, "host-call-limit", "max_host_calls (50000)"),
    ("log-flood", r#"behaviour = "log-flood", bytes = 65536"#, "host-call-limit", "max_host_calls (50000)"),
    ("overcharge", r#"behaviour = "overcharge""#, "plugin-error", "refused after 10 credits"),
    ("escape", r#"behaviour = "escape""#, "plugin-error", "no environment variables"),
    ("http-denied", r#"behaviour = "http-get", url = "http://{server}/hello""#, "denied", "allowed_hosts is empty"),
    (
        "http-redirect",
        r#"behaviour = "http-get", follow = "true", url = "http://{server}/redirect""#,
        "denied",
        "is not in this plugin's allowed_hosts",
    ),
];

const GOOD: usize = 200;
const HOSTILE_RUNS: usize = 200;
/// Resident memory the host may keep beyond what it counts for runs.
const RSS_SLACK: u64 = 192 << 20;

fn config(server: SocketAddr) -> String {
    let mut toml = format!(
        r#"
[ledger]
kind = "sqlite"
path = "ledger.db"

[[accounts]]
id = "demo"
api_key = "demo-key"
credits = 10000000

[plugins.good-llm]
path = "builtin:test-llm"
world = "llm-step"

[plugins.good-image]
path = "builtin:test-image"
world = "image-step"

[plugins.hostile]
path = "builtin:test-hostile"
world = "llm-step"

[plugins.redirector]
path = "builtin:test-hostile"
world = "llm-step"
allowed_hosts = ["{server}"]

[pipelines.good]
[[pipelines.good.steps]]
id = "text"
plugin = "good-llm"
max_cost = 100
params = {{ behaviour = "chunks" }}

[[pipelines.good.steps]]
id = "image"
plugin = "good-image"
max_cost = 1
params = {{ width = 8, height = 8 }}
"#
    );
    for (name, params, _, _) in HOSTILE {
        let plugin = if *name == "http-redirect" { "redirector" } else { "hostile" };
        let params = params.replace("{server}", &server.to_string());
        toml.push_str(&format!(
            "[pipelines.{name}]\n[[pipelines.{name}.steps]]\nid = \"evil\"\nplugin = \"{plugin}\"\nmax_cost = 10\nparams = {{ {params} }}\n"
        ));
    }
    toml
}

/// The loopback server the HTTP attacks aim at.
async fn loopback() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app =
        Router::new().route("/hello", get(|| async { "hello" })).route(
            "/redirect",
            get(move || async move {
                (StatusCode::FOUND, [(header::LOCATION, format!("http://localhost:{}/hello", address.port()))])
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

fn resident_bytes(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
}

async fn start(client: &reqwest::Client, base: &str, pipeline: &str, prompt: &str) -> Value {
    let response = client
        .post(format!("{base}/v1/runs"))
        .bearer_auth("demo-key")
        .header("Prefer", "wait=120")
        .json(&json!({ "pipeline": pipeline, "input": { "prompt": prompt } }))
        .timeout(Duration::from_secs(150))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{pipeline}");
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_runs_fail_alone_with_the_default_limits() {
    let server = loopback().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("genpipe.toml"), config(server)).unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_genpipe"))
        .args(["serve", "--config", "genpipe.toml", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().strip_prefix("genpipe listening on ").expect("the address line").to_string();
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    // Warm-up: as many good runs at once as the mix has, so that the instance pool and the
    // allocator are as warm before as after.
    let warm: Vec<_> = (0..GOOD + HOSTILE_RUNS)
        .map(|i| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move { start(&client, &base, "good", &format!("warm {i}")).await })
        })
        .collect();
    let mut posted = 0;
    for run in warm {
        posted += run.await.unwrap()["posted"].as_u64().unwrap();
    }
    let before = resident_bytes(&child);

    let mut runs = Vec::new();
    for i in 0..GOOD.max(HOSTILE_RUNS) {
        for kind in ["good", "hostile"] {
            let (client, base) = (client.clone(), base.clone());
            let (pipeline, prompt) = match kind {
                "good" => ("good".to_string(), format!("good run {i} says hello")),
                _ => (HOSTILE[i % HOSTILE.len()].0.to_string(), String::new()),
            };
            runs.push(tokio::spawn(async move { (i, kind, start(&client, &base, &pipeline, &prompt).await) }));
        }
    }
    for run in runs {
        let (i, kind, run) = run.await.unwrap();
        if kind == "good" {
            assert_eq!(run["status"], "completed", "{run}");
            let words = 5;
            assert_eq!(run["posted"], words, "a credit a word, the image free of charge: {run}");
            posted += words;
            let id = run["id"].as_str().unwrap();
            let text = client.get(format!("{base}/v1/runs/{id}/outputs/text")).bearer_auth("demo-key").send().await.unwrap();
            assert_eq!(text.text().await.unwrap(), format!("good run {i} says hello"));
        } else {
            let (name, _, expected_kind, cause) = HOSTILE[i % HOSTILE.len()];
            assert_eq!(run["status"], "failed", "{name}: {run}");
            assert_eq!(run["steps"][0]["error_kind"], expected_kind, "{name}: {run}");
            let error = run["error"].as_str().unwrap();
            let plugin_named = error.contains("(plugin hostile)") || error.contains("(plugin redirector)");
            assert!(error.contains(cause) && plugin_named, "{name}: {error}");
            assert_eq!(run["posted"], 0, "{name}");
        }
    }

    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let kept = metric(&metrics, "genpipe_run_memory_bytes");
    let after = resident_bytes(&child);
    assert!(
        after <= before + kept + RSS_SLACK,
        "resident memory grew from {} MiB to {} MiB; the runs account for {} MiB",
        before >> 20,
        after >> 20,
        kept >> 20
    );
    let account: Value =
        client.get(format!("{base}/v1/account")).bearer_auth("demo-key").send().await.unwrap().json().await.unwrap();
    assert_eq!((account["balance"].as_u64(), account["held"].as_u64()), (Some(10_000_000 - posted), Some(0)));

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert!(tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap().success());
    let verify = Command::new(env!("CARGO_BIN_EXE_genpipe"))
        .args(["credits", "verify", "--config", "genpipe.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));

    let log_bytes = std::fs::metadata(dir.path().join("server.log")).unwrap().len();
    let floods = HOSTILE_RUNS.div_ceil(HOSTILE.len()) as u64;
    let bound = (2 * (GOOD + HOSTILE_RUNS) as u64 + GOOD as u64) * 2048 + floods * (16 << 10);
    assert!(log_bytes <= bound, "the server's log is {log_bytes} bytes, over its bound of {bound}");
    println!(
        "resident memory {} MiB before, {} MiB after ({} MiB kept for runs); log {} KiB",
        before >> 20,
        after >> 20,
        kept >> 20,
        log_bytes >> 10
    );
}

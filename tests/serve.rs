//! End-to-end: `genpipe serve` as a process, stopped with SIGTERM while runs are in flight.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const CONFIG: &str = r#"
[server]
shutdown_grace_secs = 5

[[accounts]]
id = "demo"
api_key = "demo-key"
credits = 1000

[plugins.slow]
path = "builtin:test-llm"
world = "llm-step"

[pipelines.slow]
[[pipelines.slow.steps]]
id = "words"
plugin = "slow"
max_cost = 10
params = { delay_ms = 400, amount = 3 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_runs_in_flight_finish_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("genpipe.toml"), CONFIG).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_genpipe"))
        .args(["serve", "--config", "genpipe.toml", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().strip_prefix("genpipe listening on ").expect("the address line").to_string();

    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let request = client
                .post(format!("{base}/v1/runs"))
                .bearer_auth("demo-key")
                .header("Prefer", "wait=30")
                .json(&json!({ "pipeline": "slow", "input": { "prompt": "in flight" } }));
            tokio::spawn(request.send())
        })
        .collect();
    // Every run is admitted (it shows in the account's recent runs) before the signal.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        assert!(std::time::Instant::now() < deadline, "the runs were not all admitted");
        let account: Value =
            client.get(format!("{base}/v1/account")).bearer_auth("demo-key").send().await.unwrap().json().await.unwrap();
        if account["recent_runs"].as_array().unwrap().len() == 8 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());

    for run in runs {
        let run: Value = run.await.unwrap().unwrap().json().await.unwrap();
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(run["posted"], 3);
    }
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

/// `genpipe serve --config genpipe.toml` in `dir` with `extra` arguments; returns the process and
/// its base URL.
fn spawn_server(dir: &std::path::Path, extra: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_genpipe"))
        .args(["serve", "--config", "genpipe.toml", "--listen", "127.0.0.1:0"])
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().strip_prefix("genpipe listening on ").expect("the address line").to_string();
    (child, base)
}

const RELOADABLE: &str = r#"
[server]
admin_key = "admin-key"

[[accounts]]
id = "demo"
api_key = "demo-key"
credits = 1000

[plugins.versioned]
path = "plugin.wasm"
world = "llm-step"

[pipelines.version]
[[pipelines.version.steps]]
id = "which"
plugin = "versioned"
max_cost = 1
params = { behaviour = "version" }
"#;

/// The digest of plugin `versioned` as `GET /v1/plugins` shows it.
async fn served_digest(client: &reqwest::Client, base: &str) -> String {
    let plugins: Value =
        client.get(format!("{base}/v1/plugins")).bearer_auth("demo-key").send().await.unwrap().json().await.unwrap();
    plugins.as_array().unwrap().iter().find(|p| p["name"] == "versioned").unwrap()["digest"].as_str().unwrap().to_string()
}

fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// test-llm, and a copy whose `version` behaviour answers "... version B".
fn versions() -> (Vec<u8>, Vec<u8>) {
    let a = genpipe::builtin::plugin("test-llm").unwrap().to_vec();
    let mut b = a.clone();
    let marker = b"test-llm version A";
    let at = b.windows(marker.len()).position(|w| w == marker).expect("the version marker");
    b[at + marker.len() - 1] = b'B';
    (a, b)
}

async fn until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !condition().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_the_admin_route_reload_and_the_server_goes_on() {
    let (a, b) = versions();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plugin.wasm"), &a).unwrap();
    std::fs::write(dir.path().join("genpipe.toml"), RELOADABLE).unwrap();
    let (mut child, base) = spawn_server(dir.path(), &[]);
    let client = reqwest::Client::new();
    assert_eq!(served_digest(&client, &base).await, digest(&a));

    std::fs::write(dir.path().join("plugin.wasm"), &b).unwrap();
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    until("SIGHUP swapped the plugin", async || served_digest(&client, &base).await == digest(&b)).await;
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP does not end the server");

    std::fs::write(dir.path().join("plugin.wasm"), b"not wasm").unwrap();
    let refused = client.post(format!("{base}/v1/admin/reload")).bearer_auth("admin-key").send().await.unwrap();
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("not a WebAssembly component"), "{problem}");
    std::fs::write(dir.path().join("plugin.wasm"), &a).unwrap();
    let report: Value =
        client.post(format!("{base}/v1/admin/reload")).bearer_auth("admin-key").send().await.unwrap().json().await.unwrap();
    assert_eq!(report["plugins"][0]["to"], digest(&a), "{report}");
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("genpipe_reloads_total{outcome=\"failed\"} 1"), "{metrics}");
    assert!(metrics.contains("genpipe_reloads_total{outcome=\"applied\"} 2"), "{metrics}");

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_swaps_a_replaced_plugin_file_without_a_request_or_a_signal() {
    let (a, b) = versions();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plugin.wasm"), &a).unwrap();
    std::fs::write(dir.path().join("genpipe.toml"), RELOADABLE).unwrap();
    let (mut child, base) = spawn_server(dir.path(), &["--watch"]);
    let client = reqwest::Client::new();
    assert_eq!(served_digest(&client, &base).await, digest(&a));

    // Replaced as a build tool does: written aside, then renamed over the old file.
    std::fs::write(dir.path().join("plugin.wasm.new"), &b).unwrap();
    std::fs::rename(dir.path().join("plugin.wasm.new"), dir.path().join("plugin.wasm")).unwrap();
    until("--watch swapped the plugin", async || served_digest(&client, &base).await == digest(&b)).await;
    let run: Value = client
        .post(format!("{base}/v1/runs"))
        .bearer_auth("demo-key")
        .header("Prefer", "wait=30")
        .json(&json!({ "pipeline": "version", "input": { "prompt": "" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["steps"][0]["digest"], digest(&b), "{run}");

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap().success());
}

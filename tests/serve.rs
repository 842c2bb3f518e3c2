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

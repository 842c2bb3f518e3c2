//! Hostile plugins fail alone: each attack on a limit or a capability ends its own step with
//! the expected kind and a message that names the cause, the host keeps serving good runs, and
//! the ledger stays exact (`verify`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use genpipe::runtime::FailureKind;
use genpipe::state::runs::{EventKind, RunSnapshot, RunStatus, StepStatus};
use genpipe::{Host, RunInput};

/// The hostile plugin with the default limits, variants with tighter ones (so that the tests
/// that wait for a limit are quick), and a good pipeline to prove the host still serves.
const CONFIG: &str = r#"
[[accounts]]
id = "acme"
credits = 100000

[plugins.hostile]
path = "builtin:test-hostile"
world = "llm-step"

[plugins.hostile-quick]
path = "builtin:test-hostile"
world = "llm-step"
timeout_ms = 500

[plugins.one-at-a-time]
path = "builtin:test-llm"
world = "llm-step"
max_concurrency = 1
max_queued = 0

[pipelines.good]
[[pipelines.good.steps]]
id = "text"
plugin = "test-llm"
max_cost = 10
params = { behaviour = "chunks" }

[[pipelines.good.steps]]
id = "image"
plugin = "test-image"
max_cost = 1
params = { width = 4, height = 4 }
"#;

/// A one-step pipeline `name` of `plugin` with `params`.
fn pipeline(name: &str, plugin: &str, params: &str) -> String {
    format!(
        "[pipelines.{name}]\n[[pipelines.{name}.steps]]\nid = \"evil\"\nplugin = \"{plugin}\"\nmax_cost = 10\nparams = {{ {params} }}\n"
    )
}

async fn host(extra: &str) -> Arc<Host> {
    common::host(&format!("{CONFIG}\n{extra}")).await
}

async fn run(host: &Arc<Host>, pipeline: &str) -> RunSnapshot {
    host.start_run("acme", pipeline, RunInput { prompt: "all is well".into(), ..Default::default() }).await.unwrap().wait().await
}

/// Checks that the hostile run failed with `kind` and `cause`, that a good run still
/// completes, and that the ledger is exact with nothing posted for the hostile run.
async fn assert_failed_alone(host: &Arc<Host>, hostile: &RunSnapshot, kind: FailureKind, cause: &str) {
    assert_eq!(hostile.status, RunStatus::Failed, "{hostile:?}");
    let step = &hostile.steps[0];
    assert_eq!((step.status, step.error_kind), (StepStatus::Failed, Some(kind)), "{step:?}");
    let error = hostile.error.as_deref().unwrap_or_default();
    assert!(error.starts_with("step 'evil' (plugin "), "the error names the step and plugin: {error}");
    assert!(error.contains(cause), "expected '{cause}' in: {error}");
    assert_eq!(hostile.posted, Some(0), "a failed run posts nothing");

    let posted_before = host.ledger().totals().await.unwrap().posted;
    let good = run(host, "good").await;
    assert_eq!(good.status, RunStatus::Completed, "the host still serves: {good:?}");
    let audit = host.ledger().verify().await.unwrap();
    assert!(audit.is_ok() && audit.open_holds == 0, "{audit:?}");
    assert_eq!(audit.posted, posted_before + good.posted.unwrap(), "only good runs posted");
}

/// Waits until the run's first step has started.
async fn step_started(run: &genpipe::state::runs::Run) {
    let mut seen = 0;
    loop {
        let events = run.next_events(seen).await;
        if events.iter().any(|e| matches!(e.kind, EventKind::StepStarted { .. })) {
            return;
        }
        seen = events.last().expect("the run ended before its step started").seq;
    }
}

async fn case(params: &str, plugin: &str, kind: FailureKind, cause: &str) {
    let host = host(&pipeline("evil", plugin, params)).await;
    let hostile = run(&host, "evil").await;
    assert_failed_alone(&host, &hostile, kind, cause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_times_out() {
    case(r#"behaviour = "loop""#, "hostile-quick", FailureKind::Timeout, "timed out after 500 ms; raise timeout_ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_hits_memory_mb() {
    let cause = "exceeded its memory limit of 64 MiB";
    case(r#"behaviour = "memory-bomb""#, "hostile", FailureKind::OutOfMemory, cause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_and_a_deep_recursion_trap() {
    case(r#"behaviour = "trap""#, "hostile", FailureKind::Trap, "test-hostile trapped on purpose").await;
    case(r#"behaviour = "recursion""#, "hostile", FailureKind::Trap, "call stack exhausted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_beyond_max_output_bytes_are_refused_and_not_kept() {
    let cause = "its output passed max_output_bytes (4194304 bytes";
    let host = host(&format!(
        "{}{}",
        pipeline("big", "hostile", r#"behaviour = "big-output""#),
        pipeline("flood", "hostile", r#"behaviour = "emit-flood""#)
    ))
    .await;
    for name in ["big", "flood"] {
        let hostile = run(&host, name).await;
        assert_failed_alone(&host, &hostile, FailureKind::OutputTooLarge, cause).await;
    }
    // What the host keeps of the two floods is bounded by their limits.
    assert!(host.runs().memory_used() < 2 * (4 << 20) + (1 << 20), "{} bytes kept", host.runs().memory_used());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_report_flood_is_stopped_and_keeps_one_report() {
    let host = host(&pipeline("evil", "hostile", r#"behaviour = "report-flood""#)).await;
    let started = host.start_run("acme", "evil", RunInput::default()).await.unwrap();
    let hostile = started.wait().await;
    assert_failed_alone(&host, &hostile, FailureKind::HostCallLimit, "more than max_host_calls (50000) host calls").await;
    let (events, _) = started.events_after(0);
    let reports = events.iter().filter(|e| matches!(e.kind, EventKind::Progress { .. })).count();
    assert_eq!(reports, 1, "consecutive reports are coalesced: {} events", events.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_is_cut_at_max_log_bytes_then_stopped() {
    // 64 KiB lines: the log keeps what fits in 16 KiB (a line is cut to 1 KiB), counts the rest.
    let host = host(&pipeline("evil", "hostile", r#"behaviour = "log-flood", bytes = 65536"#)).await;
    let hostile = run(&host, "evil").await;
    assert_failed_alone(&host, &hostile, FailureKind::HostCallLimit, "max_host_calls").await;
    let metrics = host.metrics().render(host.runs_in_flight(), host.runs().memory_used(), &Default::default());
    let dropped = metrics
        .lines()
        .find(|l| l.starts_with("genpipe_plugin_log_dropped_bytes_total{plugin=\"hostile\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no dropped-log counter in:\n{metrics}"));
    assert_eq!(dropped, (50_000 - 16) * 1024, "all but the first 16 lines of 1 KiB were dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charging_beyond_the_hold_is_refused() {
    let cause = "out of credits: refused after 10 credits";
    case(r#"behaviour = "overcharge""#, "hostile", FailureKind::PluginError, cause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_environment_no_filesystem_no_sockets() {
    // SAFETY: set before the host starts any plugin; nothing else reads this variable.
    unsafe { std::env::set_var("GENPIPE_TEST_SECRET", "do-not-leak") };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let params = format!(r#"behaviour = "escape", port = "{port}""#);
    let cause = "no environment variables, no filesystem";
    case(&params, "hostile", FailureKind::PluginError, cause).await;
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "nothing connected to the loopback listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ignored_cancellation_is_stopped_after_the_grace_period() {
    let host = host(&pipeline("evil", "hostile", r#"behaviour = "loop""#)).await;
    let started = host.start_run("acme", "evil", RunInput::default()).await.unwrap();
    step_started(&started).await;
    started.cancel();
    let cancelled = tokio::time::timeout(Duration::from_secs(10), started.wait()).await.expect("stopped promptly");
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert_eq!(cancelled.steps[0].error_kind, Some(FailureKind::Stopped));
    assert!(cancelled.steps[0].error.as_deref().unwrap().contains("did not return within 250 ms"));
    assert_eq!(run(&host, "good").await.status, RunStatus::Completed);
    assert!(host.ledger().verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_stops_a_loop_with_its_own_kind() {
    let text = format!(
        "{}\n{CONFIG}\n[plugins.metered]\npath = \"builtin:test-hostile\"\nworld = \"llm-step\"\nfuel = 5000000\n{}",
        common::PLUGINS,
        pipeline("evil", "metered", r#"behaviour = "loop""#)
    );
    let config = genpipe::Config::parse(&text, "fuel.toml", std::path::Path::new(".")).unwrap();
    assert!(config.runtime.fuel, "a plugin with fuel makes the engine meter it");
    let host = Host::new(&config, Arc::new(genpipe::state::ledger::MemoryLedger::new())).await.unwrap();
    let hostile = run(&host, "evil").await;
    assert_failed_alone(&host, &hostile, FailureKind::OutOfFuel, "used up its fuel (5000000 units)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_queued_a_step_is_refused_at_once() {
    let host = host(&pipeline("busy", "one-at-a-time", r#"behaviour = "wait-cancel""#)).await;
    let inside = host.start_run("acme", "busy", RunInput::default()).await.unwrap();
    step_started(&inside).await;
    // With max_queued = 0, a second step finds no room to wait.
    let refused = run(&host, "busy").await;
    assert_eq!(refused.steps[0].error_kind, Some(FailureKind::AtCapacity));
    assert!(refused.error.unwrap().contains("plugin 'one-at-a-time' is running its max_concurrency of 1"));
    inside.cancel();
    assert_eq!(inside.wait().await.status, RunStatus::Cancelled);
    assert!(host.ledger().verify().await.unwrap().is_ok());
}

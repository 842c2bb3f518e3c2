//! The status invariants under concurrency: a run's entry exists from admission until eviction,
//! eviction never takes a running run, and every subscriber sees every event once, in order,
//! ending with exactly one `run_ended` (or, when the run was evicted as it ended, a gap-free
//! beginning of them).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use genpipe::RunInput;
use genpipe::state::runs::{EventKind, Run, RunStatus};

const PIPELINES: &str = r#"
[[accounts]]
id = "acme"
credits = 1000000

[pipelines.hang]
[[pipelines.hang.steps]]
id = "wait"
plugin = "test-llm"
max_cost = 5
params = { amount = 2, behaviour = "wait-cancel" }

[pipelines.quick]
[[pipelines.quick.steps]]
id = "words"
plugin = "test-llm"
max_cost = 50
params = { behaviour = "chunks" }

[[pipelines.quick.steps]]
id = "echo"
plugin = "test-llm"
max_cost = 5
"#;

/// Reads a run's whole event stream as a client would, checking order as it goes.
async fn read_all(run: Arc<Run>) -> Vec<EventKind> {
    let mut seen = 0;
    let mut kinds = Vec::new();
    loop {
        let events = run.next_events(seen).await;
        if events.is_empty() {
            return kinds;
        }
        for event in events {
            assert_eq!(event.seq, seen + 1, "events arrive without gaps or repeats");
            seen = event.seq;
            kinds.push(event.kind);
        }
    }
}

/// Evicts ended runs until `expected` were evicted in all (`so_far` already were), and returns
/// how many were: a run is recorded as ended just after its final status is set, so the last
/// ones may come a moment after their clients saw them end.
async fn evict_until(host: &genpipe::Host, so_far: usize, expected: usize) -> usize {
    let mut evicted = so_far;
    let collect = async {
        while evicted < expected {
            evicted += host.runs().evict_ended(Duration::ZERO);
            tokio::task::yield_now().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), collect).await.is_err() {
        panic!("only {evicted} of {expected} ended runs were recorded as ended");
    }
    evicted + host.runs().evict_ended(Duration::ZERO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_never_takes_a_running_run_and_streams_stay_ordered() {
    let host = common::host(PIPELINES).await;
    let mut hanging = Vec::new();
    for _ in 0..50 {
        hanging.push(host.start_run("acme", "hang", RunInput::default()).await.unwrap());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let evictor = {
        let (host, stop) = (Arc::clone(&host), Arc::clone(&stop));
        let hanging: Vec<String> = hanging.iter().map(|r| r.id().to_string()).collect();
        tokio::spawn(async move {
            let mut evicted = 0;
            while !stop.load(Ordering::Acquire) {
                evicted += host.runs().evict_ended(Duration::ZERO);
                for id in &hanging {
                    let Some(run) = host.runs().get(id) else { panic!("running run {id} was evicted") };
                    assert_eq!(run.status(), RunStatus::Running, "{:?}", run.snapshot());
                }
                tokio::task::yield_now().await;
            }
            evicted
        })
    };
    let mut readers = Vec::new();
    for i in 0..300 {
        let input = RunInput { prompt: format!("run {i} says hello to everyone"), ..Default::default() };
        let run = host.start_run("acme", "quick", input).await.unwrap();
        readers.push((Arc::clone(&run), tokio::spawn(read_all(run))));
    }
    let mut whole = 0;
    for (run, reader) in readers {
        let kinds = reader.await.unwrap();
        let ends: Vec<_> = kinds.iter().filter(|k| matches!(k, EventKind::RunEnded { .. })).collect();
        if ends.is_empty() && run.is_forgotten() {
            // Evicted (retention zero) before its reader reached the end: the stream ends, what
            // came was in order without gaps (checked by read_all), and the run reads as gone.
            assert_ne!(run.status(), RunStatus::Running, "only an ended run is evicted");
            continue;
        }
        whole += 1;
        assert_eq!(ends.len(), 1, "exactly one run_ended");
        assert!(matches!(kinds.last(), Some(EventKind::RunEnded { status: RunStatus::Completed, .. })));
        let text: String = kinds
            .iter()
            .filter_map(|k| if let EventKind::Text { chunk, .. } = k { Some(chunk.as_str()) } else { None })
            .collect();
        assert!(text.ends_with(" says hello to everyone"), "chunks arrive in order: {text}");
    }
    assert!(whole > 0, "some readers read a whole stream before its run was evicted");
    stop.store(true, Ordering::Release);
    let evicted = evict_until(&host, evictor.await.unwrap(), 300).await;
    assert_eq!(evicted, 300, "every ended run, and only those, was evicted");
    for run in &hanging {
        assert_eq!(run.status(), RunStatus::Running);
        run.cancel();
    }
    for run in &hanging {
        assert_eq!(run.wait().await.status, RunStatus::Cancelled);
    }
    assert_eq!(evict_until(&host, 0, 50).await, 50);
    assert!(host.runs().is_empty());
    let totals = common::conserved_totals(&host).await;
    assert_eq!((totals.open_holds, totals.settled_holds, totals.released_holds), (0, 300, 50));
}

#[tokio::test]
async fn retention_keeps_ended_runs_readable_for_the_window() {
    let host = common::host(PIPELINES).await;
    let run = host.start_run("acme", "quick", RunInput::default()).await.unwrap();
    run.wait().await;
    assert_eq!(host.runs().evict_ended(Duration::from_secs(3600)), 0);
    assert!(host.runs().get(run.id()).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_mid_admission_leaves_no_hold_no_run_and_no_slot_behind() {
    use futures::FutureExt;
    // The SQLite ledger makes the reservation wait on its writer, so a caller polled once and
    // dropped leaves mid-admission, like a client disconnecting.
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}\n{PIPELINES}\n[ledger]\nkind = \"sqlite\"\npath = \"ledger.db\"\n", common::PLUGINS);
    let config = genpipe::Config::parse(&text, "t.toml", dir.path()).unwrap();
    let ledger = genpipe::state::ledger::open(&config.ledger, &config.base_dir).await.unwrap();
    let host = genpipe::Host::with_runtime(common::runtime(), &config, ledger).await.unwrap();
    for _ in 0..50 {
        drop(host.start_run("acme", "quick", RunInput { prompt: "gone".into(), ..Default::default() }).now_or_never());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while host.runs_in_flight() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{} runs still counted in flight", host.runs_in_flight());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(host.runs().is_empty(), "an admission whose caller went away starts no run");
    let totals = common::conserved_totals(&host).await;
    assert_eq!((totals.open_holds, totals.settled_holds), (0, 0), "every hold reserved was released: {totals:?}");
    assert_eq!(common::balance(&host, "acme").await.held, 0);
    let run = host.start_run("acme", "quick", RunInput { prompt: "still here".into(), ..Default::default() }).await.unwrap();
    assert_eq!(run.wait().await.status, genpipe::state::runs::RunStatus::Completed);
}

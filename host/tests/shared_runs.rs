//! The shared run store on a real PostgreSQL (see `common/postgres.rs`): what a replica copies of
//! its runs, and that a run another replica deleted is never copied back, whatever copy of it
//! comes late.

use std::sync::Arc;
use std::time::Duration;

use genpipe::config::FailurePolicy;
use genpipe::state::ledger::{Ledger, PostgresLedger, PostgresOptions};
use genpipe::state::runs::{Run, RunStatus, RunStore, StepOutput, StepPlan, StepStatus};
use genpipe::state::shared::SharedRuns;

#[path = "common/postgres.rs"]
mod postgres;
use postgres::TestDatabase;

/// A replica's shared run store on `database`, and the store its runs are created in. The mirror
/// follows a store of its own that stays empty, so only the test's `copy_now` copies runs.
async fn replica(database: &TestDatabase) -> (Arc<SharedRuns>, RunStore, PostgresLedger) {
    let ledger = PostgresLedger::open(&database.url, PostgresOptions::default()).await.unwrap();
    let mirrored = RunStore::new(16, 1 << 20);
    let shared = SharedRuns::start(
        ledger.replica().expect("a PostgreSQL ledger is shared"),
        mirrored.follow(),
        mirrored.lookup(),
        FailurePolicy::Release,
        Duration::from_secs(3600),
    );
    (shared, RunStore::new(16, 1 << 20), ledger)
}

/// A run of one text step, `id`, in `runs`.
fn one_step_run(runs: &RunStore, id: &str) -> Arc<Run> {
    let step = StepPlan { id: "text".into(), plugin: "llm".into(), digest: "sha256:00".into(), loaded_at_ms: 0 };
    runs.create(id.into(), "p".into(), "acme".into(), 10, Arc::new([step]))
}

/// Ends `run`'s step with `text` and the run as `status`.
fn end(run: &Run, text: &str, status: RunStatus) {
    run.step_started(0);
    let output = StepOutput::Text { text: text.into(), prompt_tokens: 0, completion_tokens: 0 };
    run.step_ended(0, StepStatus::Completed, Some(output), None).unwrap();
    run.finish(status, 0, None);
}

#[tokio::test]
async fn a_run_deleted_from_the_database_is_not_copied_back_by_a_late_copy() {
    let database = TestDatabase::create().await;
    let (shared, runs, _ledger) = replica(&database).await;

    // Copied while running, so every replica finds it.
    let run = one_step_run(&runs, "deleted");
    shared.copy_now(&run).await.unwrap();
    let seen = shared.run("deleted").await.unwrap().expect("copied");
    assert!(seen.running);

    // Another replica deletes its rows (DELETE /v1/runs/{id} there); then the run ends here, and
    // its end is copied late: the run stays deleted, with no events or outputs left behind.
    shared.delete("deleted").await.unwrap();
    end(&run, "late", RunStatus::Cancelled);
    shared.copy_now(&run).await.unwrap();
    assert!(shared.run("deleted").await.unwrap().is_none(), "the late copy brought the run back");
    assert_eq!(shared.events_after("deleted", 0, 100).await.unwrap(), Vec::new());
    assert_eq!(shared.output("deleted", "text").await.unwrap(), None);

    // A run whose first copy is its end is copied whole: row, events and output.
    let quick = one_step_run(&runs, "quick");
    end(&quick, "done", RunStatus::Completed);
    shared.copy_now(&quick).await.unwrap();
    let seen = shared.run("quick").await.unwrap().expect("copied");
    assert!(!seen.running);
    assert_eq!(seen.snapshot["status"], "completed");
    assert!(!shared.events_after("quick", 0, 100).await.unwrap().is_empty());
    let (mime_type, body) = shared.output("quick", "text").await.unwrap().expect("its output");
    assert_eq!((mime_type.as_str(), body.as_slice()), ("text/plain; charset=utf-8", &b"done"[..]));

    // A later copy of a run still in the database updates it.
    let later = one_step_run(&runs, "later");
    shared.copy_now(&later).await.unwrap();
    end(&later, "ok", RunStatus::Completed);
    shared.copy_now(&later).await.unwrap();
    let seen = shared.run("later").await.unwrap().expect("still there");
    assert_eq!(seen.snapshot["status"], "completed");
    assert_eq!(shared.output("later", "text").await.unwrap().map(|(_, body)| body), Some(b"ok".to_vec()));
}

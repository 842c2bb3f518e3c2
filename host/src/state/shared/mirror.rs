//! The mirror: copies this replica's changed runs into the database, many runs per transaction.
//!
//! Rules:
//! - it reads each run's snapshot before its events, so the events copied are at least as new as
//!   the snapshot, and a snapshot that says the run ended comes with its `run_ended` event;
//! - it remembers, per run, the last event and the outputs the database has, and forgets a run
//!   once its end is copied;
//! - a run's row is updated only while it is `running` and this replica's (a dead replica's run
//!   that another ended stays as that one wrote it);
//! - only a run's first copy inserts its row; later copies update it, and add events and outputs
//!   only while it is there (a run another replica deleted stays deleted);
//! - on a database error the runs stay marked and are copied again after a pause: nothing a
//!   run keeps in memory is lost, it only reaches other replicas late.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use super::SharedError;
use crate::state::runs::{ChangeFeed, EventKind, Run, RunLookup, RunStatus, StepOutput};

/// The pause after a failed copy.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// What the database has of each run being copied.
#[derive(Debug, Default)]
pub(super) struct Copied(HashMap<String, RunCopied>);

#[derive(Debug, Default)]
struct RunCopied {
    last_seq: u64,
    outputs: Vec<bool>,
}

/// Copies the runs `feed` marks until the task is aborted.
pub(super) async fn run(pool: Pool, lease: Arc<str>, feed: Arc<ChangeFeed>, runs: RunLookup) {
    let mut copied = Copied::default();
    let mut failing = false;
    loop {
        let ids = feed.take().await;
        let batch: Vec<Arc<Run>> = ids.iter().filter_map(|id| runs.get(id)).collect();
        match copy(&pool, &lease, &mut copied, &batch).await {
            Ok(()) if failing => {
                tracing::info!("copying runs to the shared run store works again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::error!("copying runs to the shared run store failed, retrying: {e}");
                    failing = true;
                }
                batch.iter().for_each(|run| feed.mark(run.id()));
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// Copies what the database does not have yet of `runs`, in one transaction.
pub(super) async fn copy(pool: &Pool, lease: &str, copied: &mut Copied, runs: &[Arc<Run>]) -> Result<(), SharedError> {
    if runs.is_empty() {
        return Ok(());
    }
    let mut rows = RunRows::default();
    let mut events = EventRows::default();
    let mut outputs = Vec::new();
    let mut progress = ProgressRows::default();
    let mut next = Vec::with_capacity(runs.len());
    for run in runs {
        let snapshot = run.snapshot();
        let known = copied.0.get(run.id());
        let (last_seq, outputs_copied) = known.map_or((0, &[][..]), |c| (c.last_seq, &c.outputs[..]));
        let (new_events, _) = run.events_after(last_seq);
        let mut seq = last_seq;
        for event in &new_events {
            let progress_of = match &event.kind {
                EventKind::Progress { step, .. } => {
                    progress.add(run.id(), step, event.seq);
                    Some(step.to_string())
                }
                _ => None,
            };
            events.add(run.id(), event.seq, progress_of, serde_json::to_string(event).unwrap_or_default());
            seq = event.seq;
        }
        let mut has_output = outputs_copied.to_vec();
        has_output.resize(snapshot.steps.len(), false);
        for (index, step) in snapshot.steps.iter().enumerate() {
            if has_output[index] {
                continue;
            }
            if let Some(output) = run.output(&step.id) {
                has_output[index] = true;
                outputs.push((run.id().to_string(), step.id.to_string(), output));
            }
        }
        let ended = snapshot.status != RunStatus::Running;
        rows.add(run, snapshot.status, serde_json::to_string(&snapshot).unwrap_or_default(), seq, !run.row_copied());
        next.push((run.id().to_string(), ended, RunCopied { last_seq: seq, outputs: has_output }));
    }

    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "WITH r AS (SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bool[]) \
                    AS r(id, account, status, snapshot, last_seq, first)), \
         updated AS (UPDATE ledger.runs SET status = r.status, snapshot = r.snapshot::jsonb, \
                         last_seq = GREATEST(ledger.runs.last_seq, r.last_seq), \
                         ended_at = CASE WHEN r.status = 'running' THEN NULL ELSE now() END \
                     FROM r WHERE NOT r.first AND ledger.runs.id = r.id \
                         AND ledger.runs.lease = $1 AND ledger.runs.status = 'running') \
         INSERT INTO ledger.runs (id, account, lease, status, snapshot, last_seq, ended_at) \
         SELECT r.id, r.account, $1, r.status, r.snapshot::jsonb, r.last_seq, \
                CASE WHEN r.status = 'running' THEN NULL ELSE now() END \
         FROM r WHERE r.first \
         ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, snapshot = EXCLUDED.snapshot, \
             last_seq = GREATEST(ledger.runs.last_seq, EXCLUDED.last_seq), ended_at = EXCLUDED.ended_at \
         WHERE ledger.runs.lease = EXCLUDED.lease AND ledger.runs.status = 'running'",
        &[&lease, &rows.ids, &rows.accounts, &rows.statuses, &rows.snapshots, &rows.last_seqs, &rows.first],
    )
    .await?;
    if !events.runs.is_empty() {
        tx.execute(
            "INSERT INTO ledger.run_events (run, seq, progress_of, body) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[]) AS e(run, seq, progress_of, body) \
             WHERE EXISTS (SELECT 1 FROM ledger.runs WHERE id = e.run) ON CONFLICT DO NOTHING",
            &[&events.runs, &events.seqs, &events.progress_of, &events.bodies],
        )
        .await?;
    }
    if !progress.runs.is_empty() {
        // A step's new progress report replaces its earlier ones.
        tx.execute(
            "DELETE FROM ledger.run_events e USING unnest($1::text[], $2::text[], $3::bigint[]) AS p(run, step, seq) \
             WHERE e.run = p.run AND e.progress_of = p.step AND e.seq < p.seq",
            &[&progress.runs, &progress.steps, &progress.seqs],
        )
        .await?;
    }
    for (run, step, output) in &outputs {
        let (mime_type, body): (&str, &[u8]) = match &**output {
            StepOutput::Text { text, .. } => ("text/plain; charset=utf-8", text.as_bytes()),
            StepOutput::Image { bytes, mime_type, .. } => (mime_type, bytes),
        };
        tx.execute(
            "INSERT INTO ledger.run_outputs (run, step, mime_type, body) SELECT $1, $2, $3, $4 \
             WHERE EXISTS (SELECT 1 FROM ledger.runs WHERE id = $1) ON CONFLICT DO NOTHING",
            &[run, step, &mime_type, &body],
        )
        .await?;
    }
    tx.execute("SELECT pg_notify('genpipe_run', id) FROM unnest($1::text[]) AS id", &[&rows.ids]).await?;
    tx.commit().await?;

    runs.iter().for_each(|run| run.set_row_copied());
    for (id, ended, state) in next {
        if ended {
            copied.0.remove(&id);
        } else {
            copied.0.insert(id, state);
        }
    }
    Ok(())
}

/// The `ledger.runs` rows of a copy, column by column.
#[derive(Default)]
struct RunRows {
    ids: Vec<String>,
    accounts: Vec<String>,
    statuses: Vec<&'static str>,
    snapshots: Vec<String>,
    last_seqs: Vec<i64>,
    /// Whether this is the run's first copy, the one that inserts its row.
    first: Vec<bool>,
}

impl RunRows {
    fn add(&mut self, run: &Run, status: RunStatus, snapshot: String, last_seq: u64, first: bool) {
        self.ids.push(run.id().to_string());
        self.accounts.push(run.account().to_string());
        self.statuses.push(status.as_str());
        self.snapshots.push(snapshot);
        self.last_seqs.push(stored(last_seq));
        self.first.push(first);
    }
}

/// The `ledger.run_events` rows of a copy, column by column.
#[derive(Default)]
struct EventRows {
    runs: Vec<String>,
    seqs: Vec<i64>,
    progress_of: Vec<Option<String>>,
    bodies: Vec<String>,
}

impl EventRows {
    fn add(&mut self, run: &str, seq: u64, progress_of: Option<String>, body: String) {
        self.runs.push(run.to_string());
        self.seqs.push(stored(seq));
        self.progress_of.push(progress_of);
        self.bodies.push(body);
    }
}

/// The latest progress report of each (run, step) in a copy.
#[derive(Default)]
struct ProgressRows {
    runs: Vec<String>,
    steps: Vec<String>,
    seqs: Vec<i64>,
}

impl ProgressRows {
    fn add(&mut self, run: &str, step: &str, seq: u64) {
        let at = self.runs.iter().zip(&self.steps).position(|(r, s)| r == run && s == step);
        match at {
            Some(at) => self.seqs[at] = stored(seq),
            None => {
                self.runs.push(run.to_string());
                self.steps.push(step.to_string());
                self.seqs.push(stored(seq));
            }
        }
    }
}

/// An event number as the database stores it.
fn stored(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

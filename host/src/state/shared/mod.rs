//! Runs shared by replicas: with the PostgreSQL ledger, each run's status, events and outputs
//! are copied into the database, so that any replica answers for any run, and the idempotency
//! keys of run requests are claimed there, so that replicas never start one request twice.
//!
//! Rules:
//! - the replica that admitted a run executes it and alone writes its rows (`ledger.runs.lease`
//!   is its lease); the one exception is the end of a dead replica's run, below;
//! - every change of a local run marks it in the store's [`ChangeFeed`]; the [`mirror`] writes
//!   the marked runs' new events, snapshots and outputs in one transaction, then notifies
//!   `genpipe_run` with their ids (delivered at commit), so a reader on another replica wakes
//!   up one transaction after the change, not a poll interval later;
//! - events keep their numbers; a step's new progress report replaces its earlier one, as in
//!   memory ([`crate::state::runs`]);
//! - a replica follows another's run from the tables, woken by the notifications ([`listen`]),
//!   and also looks every [`RECHECK`] in case a notification was lost with its connection;
//! - a run still `running` whose replica's lease lapsed is ended `failed` by the first replica
//!   to sweep ([`SharedRuns::end_orphans`]; row locks with SKIP LOCKED make that happen once),
//!   with a `run_ended` event that says why; the ledger's recovery resolves its hold;
//! - cancelling another replica's run notifies `genpipe_cancel`, deleting it `genpipe_delete`;
//!   its replica cancels it and, for a delete, forgets it once it ended;
//! - ended runs are deleted once older than the retention window, and idempotency keys once
//!   older than their time to live, by whichever replica sweeps.

mod listen;
mod mirror;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

use crate::config::FailurePolicy;
use crate::state::ledger::{Replica, describe_postgres, describe_postgres_pool};
use crate::state::runs::{ChangeFeed, RunLookup};

/// How often a follower looks at a run's rows without a notification.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The database could not be used; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the shared run store (PostgreSQL) is unavailable: {0}")]
pub struct SharedError(pub String);

impl From<tokio_postgres::Error> for SharedError {
    fn from(error: tokio_postgres::Error) -> Self {
        SharedError(describe_postgres(&error))
    }
}

impl From<deadpool_postgres::PoolError> for SharedError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        SharedError(describe_postgres_pool(&error))
    }
}

/// What becomes of a cancelled run once it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCancel {
    /// It stays readable, as any ended run.
    Keep,
    /// It is forgotten, with its events and outputs.
    Delete,
}

/// A run as the database has it.
#[derive(Debug, Clone)]
pub struct SharedRun {
    /// The account that started it.
    pub account: String,
    /// Whether it is still running.
    pub running: bool,
    /// The run as clients read it (a `RunSnapshot`).
    pub snapshot: Value,
}

/// What a claim of an idempotency key found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The key is this request's: do the work, then record its outcome.
    Won,
    /// Another request has it, with this body hash and, once recorded, this outcome.
    Taken {
        /// SHA-256 of the first request's body.
        body_hash: Vec<u8>,
        /// Its outcome, once recorded.
        outcome: Option<Value>,
    },
}

/// The runs of every replica, in the ledger's database.
pub struct SharedRuns {
    pool: Pool,
    lease: Arc<str>,
    held: watch::Receiver<bool>,
    changed: broadcast::Sender<Arc<str>>,
    tasks: [tokio::task::JoinHandle<()>; 3],
}

impl Drop for SharedRuns {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

impl SharedRuns {
    /// Starts copying the runs of `feed` (found through `runs`) into the database of `replica`,
    /// listening for the changes and cancellations of every replica's runs, and ending the runs
    /// of dead replicas every `sweep_every`, as `policy` says.
    pub fn start(
        replica: Replica,
        feed: Arc<ChangeFeed>,
        runs: RunLookup,
        policy: FailurePolicy,
        sweep_every: Duration,
    ) -> Arc<SharedRuns> {
        let (changed, _) = broadcast::channel(listen::CHANNEL_CAPACITY);
        let mirror = tokio::spawn(mirror::run(replica.pool.clone(), Arc::clone(&replica.lease), feed, runs.clone()));
        let owner = listen::Owner { runs, pool: replica.pool.clone(), lease: Arc::clone(&replica.lease) };
        let listener = tokio::spawn(listen::run(replica.config, changed.clone(), owner));
        Arc::new_cyclic(|me: &std::sync::Weak<SharedRuns>| {
            let orphans = tokio::spawn(end_orphans_every(me.clone(), policy, sweep_every));
            SharedRuns {
                pool: replica.pool,
                lease: replica.lease,
                held: replica.held,
                changed,
                tasks: [mirror, listener, orphans],
            }
        })
    }

    /// Whether this replica still holds its lease (and so may admit runs).
    pub fn lease_held(&self) -> bool {
        *self.held.borrow()
    }

    /// Ids of runs that changed, as notified (`*` after a reconnection: anything may have).
    pub fn changes(&self) -> broadcast::Receiver<Arc<str>> {
        self.changed.subscribe()
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SharedError> {
        Ok(self.pool.get().await?)
    }

    /// The run `id`, if the database has it.
    pub async fn run(&self, id: &str) -> Result<Option<SharedRun>, SharedError> {
        let client = self.client().await?;
        let row = client.query_opt("SELECT account, status, snapshot::text FROM ledger.runs WHERE id = $1", &[&id]).await?;
        row.map(|row| {
            let snapshot: String = row.get(2);
            let snapshot = serde_json::from_str(&snapshot).map_err(|e| SharedError(format!("run '{id}' is unreadable: {e}")))?;
            Ok(SharedRun { account: row.get(0), running: row.get::<_, &str>(1) == "running", snapshot })
        })
        .transpose()
    }

    /// Up to `limit` events of run `id` after `after`, as (number, JSON of the `RunEvent`).
    pub async fn events_after(&self, id: &str, after: u64, limit: i64) -> Result<Vec<(u64, String)>, SharedError> {
        let client = self.client().await?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT seq, body FROM ledger.run_events WHERE run = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&id, &after, &limit],
            )
            .await?;
        Ok(rows.iter().map(|row| (row.get::<_, i64>(0).unsigned_abs(), row.get(1))).collect())
    }

    /// Step `step`'s output of run `id`, as (MIME type, bytes).
    pub async fn output(&self, id: &str, step: &str) -> Result<Option<(String, Vec<u8>)>, SharedError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT mime_type, body FROM ledger.run_outputs WHERE run = $1 AND step = $2", &[&id, &step])
            .await?;
        Ok(row.map(|row| (row.get(0), row.get(1))))
    }

    /// Asks the replica that has run `id` to cancel it, then keep or forget it as `then` says.
    pub async fn request_cancel(&self, id: &str, then: AfterCancel) -> Result<(), SharedError> {
        let channel = match then {
            AfterCancel::Keep => listen::CANCEL,
            AfterCancel::Delete => listen::DELETE,
        };
        self.client().await?.execute("SELECT pg_notify($1, $2)", &[&channel, &id]).await?;
        Ok(())
    }

    /// Deletes run `id`'s rows.
    pub async fn delete(&self, id: &str) -> Result<(), SharedError> {
        self.client().await?.execute("DELETE FROM ledger.runs WHERE id = $1", &[&id]).await?;
        Ok(())
    }

    /// Copies `run`, which ended, so that its end is in the database before a client is told of
    /// it; once for all callers (every subscriber of a run sees its end at the same moment):
    /// those that come while it is being copied wait for that copy, and after a failure the
    /// next one copies again.
    pub async fn copy_end(&self, run: &Arc<crate::state::runs::Run>) -> Result<(), SharedError> {
        run.end_copied().get_or_try_init(|| self.copy_now(run)).await.map(drop)
    }

    /// Copies `run` now, for a reader on another replica that must find it at once (a new run
    /// named in an idempotency record).
    pub async fn copy_now(&self, run: &Arc<crate::state::runs::Run>) -> Result<(), SharedError> {
        mirror::copy(&self.pool, &self.lease, &mut mirror::Copied::default(), std::slice::from_ref(run)).await
    }

    /// Ends `failed` every run still `running` whose replica's lease lapsed, with an event that
    /// says why; returns how many. What their steps had charged is posted or not as `policy`
    /// says (the ledger's recovery does it; this says so in the run).
    pub async fn end_orphans(&self, policy: FailurePolicy) -> Result<usize, SharedError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT id, snapshot::text, last_seq FROM ledger.runs r WHERE status = 'running' AND lease <> $1 \
                 AND NOT EXISTS (SELECT 1 FROM ledger.leases l WHERE l.id = r.lease AND l.expires_at > now()) \
                 ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED",
                &[&&*self.lease],
            )
            .await?;
        let error = "the replica running this run stopped (its lease lapsed); the run's hold was resolved as \
                     [credits] on_failure says";
        for row in &rows {
            let id: &str = row.get(0);
            let mut snapshot: Value = serde_json::from_str(row.get(1)).unwrap_or_else(|_| Value::Object(Default::default()));
            let seq = row.get::<_, i64>(2) + 1;
            let charged = snapshot["charged"].as_u64().unwrap_or(0);
            let posted = if policy == FailurePolicy::PostCharged { charged } else { 0 };
            snapshot["status"] = "failed".into();
            snapshot["error"] = error.into();
            snapshot["posted"] = posted.into();
            for step in snapshot["steps"].as_array_mut().into_iter().flatten() {
                if matches!(step["status"].as_str(), Some("running" | "waiting")) {
                    step["status"] = "cancelled".into();
                }
            }
            let event =
                serde_json::json!({ "seq": seq, "type": "run_ended", "status": "failed", "charged": posted, "error": error });
            tx.execute(
                "INSERT INTO ledger.run_events (run, seq, body) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&id, &seq, &event.to_string()],
            )
            .await?;
            tx.execute(
                "UPDATE ledger.runs SET status = 'failed', snapshot = $2::text::jsonb, last_seq = $3, ended_at = now() \
                 WHERE id = $1",
                &[&id, &snapshot.to_string(), &seq],
            )
            .await?;
            tx.execute("SELECT pg_notify('genpipe_run', $1)", &[&id]).await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Deletes the runs that ended more than `retention` ago, and the idempotency keys older
    /// than `ttl` (and claims whose request never recorded an outcome, after [`STALE_CLAIM`]).
    pub async fn sweep(&self, retention: Duration, ttl: Duration) -> Result<u64, SharedError> {
        let client = self.client().await?;
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let runs = client
            .execute("DELETE FROM ledger.runs WHERE ended_at < now() - $1::bigint * interval '1 second'", &[&secs(retention)])
            .await?;
        let keys = client
            .execute(
                "DELETE FROM ledger.idempotency WHERE created_at < now() - $1::bigint * interval '1 second' \
                 OR (outcome IS NULL AND created_at < now() - $2::bigint * interval '1 second')",
                &[&secs(ttl), &secs(STALE_CLAIM)],
            )
            .await?;
        Ok(runs + keys)
    }

    /// Claims idempotency key `key` of `scope` for a request whose body hashes to `body_hash`.
    pub async fn claim(&self, scope: &str, key: &str, body_hash: &[u8]) -> Result<Claim, SharedError> {
        let client = self.client().await?;
        loop {
            let inserted = client
                .execute(
                    "INSERT INTO ledger.idempotency (scope, key, body_hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&scope, &key, &body_hash],
                )
                .await?;
            if inserted == 1 {
                return Ok(Claim::Won);
            }
            if let Some(found) = self.claimed(&client, scope, key).await? {
                return Ok(found);
            }
            // Forgotten in between (a retryable outcome): claim again.
        }
    }

    /// What the claim of `key` holds now, if it is still there.
    pub async fn claimed_now(&self, scope: &str, key: &str) -> Result<Option<Claim>, SharedError> {
        self.claimed(&*self.client().await?, scope, key).await
    }

    async fn claimed(&self, client: &tokio_postgres::Client, scope: &str, key: &str) -> Result<Option<Claim>, SharedError> {
        let row = client
            .query_opt("SELECT body_hash, outcome::text FROM ledger.idempotency WHERE scope = $1 AND key = $2", &[&scope, &key])
            .await?;
        Ok(row.map(|row| Claim::Taken {
            body_hash: row.get(0),
            outcome: row.get::<_, Option<&str>>(1).and_then(|text| serde_json::from_str(text).ok()),
        }))
    }

    /// Records the outcome of the request that won `key`, or forgets the key (`None`), so that
    /// a retry can claim it again.
    pub async fn record(&self, scope: &str, key: &str, outcome: Option<&Value>) -> Result<(), SharedError> {
        let client = self.client().await?;
        match outcome {
            Some(outcome) => {
                client
                    .execute(
                        "UPDATE ledger.idempotency SET outcome = $3::text::jsonb WHERE scope = $1 AND key = $2",
                        &[&scope, &key, &outcome.to_string()],
                    )
                    .await?
            }
            None => client.execute("DELETE FROM ledger.idempotency WHERE scope = $1 AND key = $2", &[&scope, &key]).await?,
        };
        Ok(())
    }
}

/// Runs [`SharedRuns::end_orphans`] every `every` while `shared` lives.
async fn end_orphans_every(shared: std::sync::Weak<SharedRuns>, policy: FailurePolicy, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else { break };
        match shared.end_orphans(policy).await {
            Ok(0) => {}
            Ok(ended) => tracing::warn!(ended, "ended the runs of replicas whose lease lapsed"),
            Err(e) => tracing::warn!("ending the runs of dead replicas failed: {e}"),
        }
    }
}

/// How long a claim may go without an outcome before it is taken for abandoned (its replica
/// died mid-admission) and swept.
pub const STALE_CLAIM: Duration = Duration::from_secs(60);

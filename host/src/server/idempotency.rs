//! Idempotency keys: the first request with a key does the work; every request with the same
//! key and body, concurrent or later, gets its outcome; the same key with another body is 422.
//!
//! Rules:
//! - keys are scoped by caller and route, so two accounts never share a key;
//! - the work of the first request runs on its own task and always records its outcome, even if
//!   that request's connection goes away, so a retry can never start the work a second time;
//! - a request that finds the work still running waits for it (admission takes microseconds)
//!   and gets 409 only if it takes longer than [`WAIT_FOR_FIRST`];
//! - outcomes that invite a retry (429, 5xx) are forgotten, so a retry can go through;
//! - keys are kept for the configured TTL (at least 24 hours), then swept.
//!
//! With a ledger replicas share, [`run_once_shared`] follows the same rules across replicas: the
//! key is claimed by a row of the database (its primary key lets one request win), and the
//! outcome is recorded in that row, where a request on any replica finds it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use tokio::sync::watch;

use super::found::unavailable;
use super::problem::Problem;
use crate::state::shared::{Claim, SharedRuns};

/// How long a request waits for the first request with its key before answering 409.
pub const WAIT_FOR_FIRST: Duration = Duration::from_secs(10);

/// The outcome the first request recorded: a JSON value the route turns into its answer.
pub type Outcome = Result<serde_json::Value, Problem>;

/// Whether an outcome invites a retry, and so is forgotten.
fn retryable(outcome: &Outcome) -> bool {
    outcome.as_ref().is_err_and(|p| p.status() == StatusCode::TOO_MANY_REQUESTS || p.status().is_server_error())
}

fn reused() -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        "this Idempotency-Key was already used with a different body; use a new key for a new request",
    )
}

fn in_flight() -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "idempotent-request-in-flight",
        "a request with this Idempotency-Key is still being processed; retry in a moment",
    )
    .retry_after(1)
}

/// How often a request on one replica looks for the outcome of the first request, on another.
const POLL_SHARED: Duration = Duration::from_millis(20);

/// [`IdempotencyStore::run_once`] across replicas, through `shared`.
pub async fn run_once_shared<F>(shared: Arc<SharedRuns>, scope: &str, key: &str, body_hash: [u8; 32], work: F) -> (Outcome, bool)
where
    F: Future<Output = Outcome> + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + WAIT_FOR_FIRST;
    let mut work = Some(work);
    loop {
        let claim = match shared.claim(scope, key, &body_hash).await {
            Ok(claim) => claim,
            Err(e) => return (Err(unavailable(&e)), false),
        };
        let Claim::Taken { body_hash: first, mut outcome } = claim else {
            let Some(work) = work.take() else { return (Err(in_flight()), false) };
            // The work and its record run on their own task: a caller that goes away leaves
            // the outcome recorded all the same.
            let (scope, key) = (scope.to_string(), key.to_string());
            let recorded = tokio::spawn(async move {
                let outcome = work.await;
                let record = (!retryable(&outcome)).then(|| match &outcome {
                    Ok(value) => serde_json::json!({ "ok": value }),
                    Err(problem) => serde_json::json!({ "problem": problem }),
                });
                if let Err(e) = shared.record(&scope, &key, record.as_ref()).await {
                    tracing::error!(scope, key, "recording an idempotent outcome failed: {e}");
                }
                outcome
            });
            return (recorded.await.unwrap_or_else(|_| Err(in_flight())), false);
        };
        if first != body_hash {
            return (Err(reused()), true);
        }
        loop {
            if let Some(recorded) = outcome {
                let replayed = match (recorded.get("ok"), recorded.get("problem")) {
                    (Some(value), _) => Ok(value.clone()),
                    (None, Some(problem)) => Err(serde_json::from_value(problem.clone()).unwrap_or_else(|_| in_flight())),
                    (None, None) => Err(in_flight()),
                };
                return (replayed, true);
            }
            if tokio::time::Instant::now() >= deadline {
                return (Err(in_flight()), true);
            }
            tokio::time::sleep(POLL_SHARED).await;
            match shared.claimed_now(scope, key).await {
                Ok(Some(Claim::Taken { outcome: now, .. })) => outcome = now,
                // Forgotten (a retryable outcome): claim it again.
                Ok(_) => break,
                Err(e) => return (Err(unavailable(&e)), true),
            }
        }
    }
}

struct Entry {
    body_hash: [u8; 32],
    created: Instant,
    outcome: watch::Receiver<Option<Outcome>>,
}

/// Outcomes by (scope, key).
#[derive(Default)]
pub struct IdempotencyStore {
    entries: Arc<DashMap<(String, String), Entry>>,
}

impl IdempotencyStore {
    /// Runs `work` once for (`scope`, `key`) and body `body_hash`; returns its outcome and
    /// whether this request was a replay.
    pub async fn run_once<F>(&self, scope: &str, key: &str, body_hash: [u8; 32], work: F) -> (Outcome, bool)
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        let id = (scope.to_string(), key.to_string());
        let (mut outcome, replay) = match self.entries.entry(id.clone()) {
            MapEntry::Occupied(entry) if entry.get().body_hash != body_hash => return (Err(reused()), true),
            MapEntry::Occupied(entry) => (entry.get().outcome.clone(), true),
            MapEntry::Vacant(slot) => {
                let (tx, rx) = watch::channel(None);
                slot.insert(Entry { body_hash, created: Instant::now(), outcome: rx.clone() });
                let entries = Arc::clone(&self.entries);
                tokio::spawn(async move {
                    let outcome = work.await;
                    if retryable(&outcome) {
                        entries.remove(&id);
                    }
                    tx.send_replace(Some(outcome));
                });
                (rx, false)
            }
        };
        let waited = tokio::time::timeout(WAIT_FOR_FIRST, outcome.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(recorded)) => (recorded.clone().expect("waited for Some"), replay),
            _ => (Err(in_flight()), replay),
        }
    }

    /// Forgets keys older than `ttl`; returns how many.
    pub fn sweep(&self, ttl: Duration) -> usize {
        let mut swept = 0;
        self.entries.retain(|_, entry| {
            let keep = entry.created.elapsed() < ttl;
            swept += usize::from(!keep);
            keep
        });
        swept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_retries_run_the_work_once_and_share_its_outcome() {
        let store = Arc::new(IdempotencyStore::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let requests: Vec<_> = (0..50)
            .map(|_| {
                let (store, calls) = (Arc::clone(&store), Arc::clone(&calls));
                tokio::spawn(async move {
                    let work = async move { Ok(serde_json::json!({ "call": calls.fetch_add(1, Ordering::SeqCst) })) };
                    store.run_once("acme", "k1", [1; 32], work).await
                })
            })
            .collect();
        let mut replays = 0;
        for request in requests {
            let (outcome, replay) = request.await.unwrap();
            assert_eq!(outcome.unwrap(), serde_json::json!({ "call": 0 }));
            replays += usize::from(replay);
        }
        assert_eq!((calls.load(Ordering::SeqCst), replays), (1, 49));

        let (other_body, _) = store.run_once("acme", "k1", [2; 32], async { Ok(serde_json::Value::Null) }).await;
        assert_eq!(other_body.unwrap_err().status, 422);
        let (other_scope, replay) = store.run_once("globex", "k1", [2; 32], async { Ok(serde_json::json!(7)) }).await;
        assert_eq!((other_scope.unwrap(), replay), (serde_json::json!(7), false));
    }

    #[tokio::test]
    async fn retryable_failures_are_forgotten_and_old_keys_swept() {
        let store = IdempotencyStore::default();
        let busy = async { Err(Problem::new(StatusCode::TOO_MANY_REQUESTS, "at-capacity", "busy")) };
        assert_eq!(store.run_once("a", "k", [0; 32], busy).await.0.unwrap_err().status, 429);
        let (retried, replay) = store.run_once("a", "k", [0; 32], async { Ok(serde_json::json!(1)) }).await;
        assert_eq!((retried.unwrap(), replay), (serde_json::json!(1), false));
        assert_eq!(store.sweep(Duration::from_secs(3600)), 0);
        assert_eq!(store.sweep(Duration::ZERO), 1);
    }
}

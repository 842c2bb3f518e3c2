//! This process's lease: a row of `ledger.leases` that says it is alive, which it renews.
//!
//! Rules:
//! - a process inserts its lease (a fresh id, expiring `ttl` from the server's clock) before it
//!   writes anything, and records that id as the owner of every hold it reserves;
//! - every `ttl / 3` it renews the lease with `UPDATE ... SET expires_at = now() + ttl WHERE id =
//!   $1 AND expires_at > now()`: a conditional statement, so a lease that lapsed stays lapsed
//!   (the survivors may already have resolved its holds) and the process learns it lost it;
//! - a lease lapses at its `expires_at`, on the server's clock; [`Ledger::recover`] anywhere then
//!   resolves the open holds it owns;
//! - the process counts its lease as lost once it has gone `ttl` without a confirmed renewal
//!   (counted from the moment the renewal was sent, which is no later than the server's), or a
//!   renewal finds it lapsed; lost is for good: the process should stop taking new work and be
//!   restarted, and its ledger refuses new holds.
//!
//! [`Ledger::recover`]: super::super::Ledger::recover

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::watch;

/// The lease, and its renewal task (stopped when this is dropped; the lease then lapses).
#[derive(Debug)]
pub(super) struct Lease {
    id: Arc<str>,
    held: watch::Receiver<bool>,
    renewal: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Inserts a new lease for `ttl` and starts renewing it.
    pub(super) async fn acquire(pool: &Pool, ttl: Duration) -> Result<Lease, String> {
        let id: Arc<str> = uuid::Uuid::now_v7().simple().to_string().into();
        let client = pool.get().await.map_err(|e| super::describe_pool(&e))?;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        client
            .execute(
                "INSERT INTO ledger.leases (id, expires_at) VALUES ($1, now() + $2::bigint * interval '1 millisecond')",
                &[&&*id, &ttl_ms],
            )
            .await
            .map_err(|e| super::describe(&e))?;
        drop(client);
        let (tell, held) = watch::channel(true);
        let renewal = tokio::spawn(renew(pool.clone(), Arc::clone(&id), ttl, tell));
        Ok(Lease { id, held, renewal })
    }

    pub(super) fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// Whether the lease is still held.
    pub(super) fn ok(&self) -> bool {
        *self.held.borrow()
    }

    /// A receiver that turns `false` when the lease is lost.
    pub(super) fn watch(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Renews the lease every `ttl / 3` until it is lost, then says so on `tell`.
async fn renew(pool: Pool, id: Arc<str>, ttl: Duration, tell: watch::Sender<bool>) {
    let every = ttl / 3;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let mut confirmed = Instant::now();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let sent = Instant::now();
        let renewal = async {
            let client = pool.get().await.map_err(|e| super::describe_pool(&e))?;
            client
                .execute(
                    "UPDATE ledger.leases SET expires_at = now() + $2::bigint * interval '1 millisecond' \
                     WHERE id = $1 AND expires_at > now()",
                    &[&&*id, &ttl_ms],
                )
                .await
                .map_err(|e| super::describe(&e))
        };
        match tokio::time::timeout(every, renewal).await {
            Ok(Ok(1)) => confirmed = sent,
            Ok(Ok(_)) => {
                tracing::error!(lease = %id, "this process's ledger lease lapsed; other processes resolve its holds");
                break;
            }
            Ok(Err(e)) => tracing::warn!(lease = %id, "renewing the ledger lease failed: {e}"),
            Err(_) => tracing::warn!(lease = %id, "renewing the ledger lease took longer than {every:?}"),
        }
        if confirmed.elapsed() >= ttl {
            tracing::error!(lease = %id, "the ledger lease could not be renewed for {ttl:?}: it has lapsed");
            break;
        }
    }
    let _ = tell.send(false);
}

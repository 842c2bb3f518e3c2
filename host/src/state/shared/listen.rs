//! The listener: one connection of its own that LISTENs for every replica's notifications,
//! reconnecting after a failure.
//!
//! `genpipe_run` (a run's rows changed) is passed on to this replica's followers through a
//! broadcast channel; after a (re)connection it sends `*`, since notifications sent while it was
//! away are lost. [`CANCEL`] cancels the named run if this replica has it (a cancel asked on
//! another replica); [`DELETE`] also deletes it here once it ended (a delete asked there).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;

use crate::state::ledger::describe_postgres;
use crate::state::runs::{Run, RunLookup};

/// The channel that asks the replica of a run to cancel it.
pub(super) const CANCEL: &str = "genpipe_cancel";
/// The channel that asks the replica of a run to cancel it, then delete it once it ended.
pub(super) const DELETE: &str = "genpipe_delete";

/// Notifications a slow follower may fall behind by before it is told to look again.
pub(super) const CHANNEL_CAPACITY: usize = 1024;

/// The pause before reconnecting.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// What a replica needs to act on another's request about one of its runs.
pub(super) struct Owner {
    /// Its runs.
    pub runs: RunLookup,
    /// The database, to copy a run's end before it forgets the run.
    pub pool: Pool,
    /// Its lease id.
    pub lease: Arc<str>,
}

/// Listens until the task is aborted.
pub(super) async fn run(config: tokio_postgres::Config, changed: broadcast::Sender<Arc<str>>, owner: Owner) {
    let owner = Arc::new(owner);
    let mut failing = false;
    loop {
        match listen(&config, &changed, &owner).await {
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!("listening for other replicas' run changes failed, reconnecting: {e}");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(RECONNECT_AFTER).await;
    }
}

/// One connection's life: LISTEN, then pass notifications on until it fails.
async fn listen(
    config: &tokio_postgres::Config,
    changed: &broadcast::Sender<Arc<str>>,
    owner: &Arc<Owner>,
) -> Result<(), String> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| describe_postgres(&e))?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statements = format!("LISTEN genpipe_run; LISTEN {CANCEL}; LISTEN {DELETE}");
    let subscribe = client.batch_execute(&statements);
    let mut subscribe = std::pin::pin!(subscribe);
    let mut subscribed = false;
    loop {
        tokio::select! {
            done = &mut subscribe, if !subscribed => {
                done.map_err(|e| describe_postgres(&e))?;
                subscribed = true;
                let _ = changed.send(Arc::from("*"));
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(notice))) => match notice.channel() {
                    "genpipe_run" => {
                        let _ = changed.send(Arc::from(notice.payload()));
                    }
                    CANCEL => {
                        if let Some(run) = owner.runs.get(notice.payload()) {
                            run.cancel();
                        }
                    }
                    DELETE => {
                        if let Some(run) = owner.runs.get(notice.payload()) {
                            run.cancel();
                            tokio::spawn(delete_once_copied(Arc::clone(owner), run));
                        }
                    }
                    _ => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(describe_postgres(&e)),
                None => return Err("the server closed the connection".into()),
            },
        }
    }
}

/// Forgets `run` once it ended and its end is in the database, where the replica that asked for
/// the delete waits for it before answering (and then deletes the rows).
async fn delete_once_copied(owner: Arc<Owner>, run: Arc<Run>) {
    run.wait().await;
    let copied = super::mirror::copy(&owner.pool, &owner.lease, &mut Default::default(), std::slice::from_ref(&run)).await;
    if let Err(e) = copied {
        // The other replica answers with the run as the database last had it.
        tracing::warn!(run = %run.id(), "{e}");
    }
    owner.runs.delete(&run);
}

//! The listener: one connection of its own that LISTENs for every replica's notifications,
//! reconnecting after a failure.
//!
//! `genpipe_run` (a run's rows changed) is passed on to this replica's followers through a
//! broadcast channel; after a (re)connection it sends `*`, since notifications sent while it was
//! away are lost. `genpipe_cancel` cancels the named run if this replica has it, and deletes it
//! here once it ended (a delete asked on another replica).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::AsyncMessage;

use crate::state::ledger::describe_postgres;
use crate::state::runs::RunLookup;

/// Notifications a slow follower may fall behind by before it is told to look again.
pub(super) const CHANNEL_CAPACITY: usize = 1024;

/// The pause before reconnecting.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Listens until the task is aborted.
pub(super) async fn run(config: tokio_postgres::Config, changed: broadcast::Sender<Arc<str>>, runs: RunLookup) {
    let mut failing = false;
    loop {
        match listen(&config, &changed, &runs).await {
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
async fn listen(config: &tokio_postgres::Config, changed: &broadcast::Sender<Arc<str>>, runs: &RunLookup) -> Result<(), String> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| describe_postgres(&e))?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let subscribe = client.batch_execute("LISTEN genpipe_run; LISTEN genpipe_cancel");
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
                    "genpipe_cancel" => {
                        if let Some(run) = runs.get(notice.payload()) {
                            run.cancel();
                            let runs = runs.clone();
                            tokio::spawn(async move {
                                run.wait().await;
                                runs.delete(&run);
                            });
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

//! Accepting connections and serving HTTP/1.1 on them, with bounds a slow or greedy client
//! cannot pass.
//!
//! Rules:
//! - at most `max_connections` connections are open at once: the listener accepts only while it
//!   holds a free slot (a `Semaphore` permit that the connection gives back when it closes), so
//!   beyond the cap new connections wait in the kernel's listen queue and cost nothing here;
//! - a client has `header_read_timeout_secs` to send a request's line and headers, and an idle
//!   keep-alive connection waits that long for its next request; then hyper closes the
//!   connection. A slowloris client dribbling a header a byte at a time thus holds its slot for
//!   at most that long;
//! - a request head (line and headers) larger than [`MAX_HEAD_BYTES`] is refused with 431;
//! - every connection has `TCP_NODELAY`, so that a streamed event leaves as soon as it is written;
//! - on shutdown the listener closes, idle connections are closed, and the others end once their
//!   response is complete (event streams end with their run).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest request head (request line and headers) a client may send, in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The open connections of a service, at most `max` of them.
#[derive(Debug)]
pub struct Connections {
    slots: Arc<Semaphore>,
    max: usize,
}

impl Connections {
    /// Room for `max` connections.
    pub fn new(max: usize) -> Connections {
        Connections { slots: Arc::new(Semaphore::new(max)), max }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Waits for a free slot, then for a connection.
    async fn accept(&self, listener: &mut TcpListener) -> (OwnedSemaphorePermit, TcpStream) {
        let slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .unwrap_or_else(|_: tokio::sync::AcquireError| unreachable!("the semaphore is never closed"));
        // axum's accept retries on errors (a full file table, a connection reset in the queue).
        let (stream, _) = axum::serve::Listener::accept(listener).await;
        // Events are small writes that must leave at once: without this, one written before the
        // client acknowledged the previous one waits for its delayed ACK (Nagle's algorithm).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {error}");
        }
        (slot, stream)
    }
}

/// Serves `app` on the connections `listener` accepts, within `connections`' cap, until `stop`
/// resolves; then closes the listener and returns once every connection has closed.
pub async fn serve(
    mut listener: TcpListener,
    app: Router,
    connections: Arc<Connections>,
    header_read_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    // `max_header_size` refuses a head that arrived whole in one read too, which `max_buf_size`
    // alone (the read buffer's bound) lets through.
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (slot, stream) = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = connections.accept(&mut listener) => accepted,
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // Timeouts, resets and malformed requests: the client's business, not the log's.
                tracing::debug!("connection closed: {error}");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

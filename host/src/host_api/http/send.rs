//! Sending one checked outbound request: connect to the addresses the policy vetted (never to a
//! second resolution of the name), TLS by name for https, HTTP/1.1, and a response body that
//! stops at the byte cap and at the time limit between frames.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, WasiBody};

/// Where and how one request goes.
pub(super) struct Target {
    /// The vetted addresses, tried in order.
    pub addresses: Vec<SocketAddr>,
    /// The name to verify the server's certificate against, for https.
    pub tls_name: Option<ServerName<'static>>,
    /// Limit of the connection, of the first byte of the answer, and between its frames.
    pub timeout: Duration,
    /// The largest response body the plugin may read.
    pub max_response_bytes: u64,
}

/// The process's TLS client configuration: the Mozilla root certificates.
static TLS: LazyLock<TlsConnector> = LazyLock::new(|| {
    let roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
    TlsConnector::from(Arc::new(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()))
});

/// A connection's I/O: the future that drives it after the response head arrived.
pub(super) type Connection = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Sends `request` to `target`; `permit` (one of the step's open requests) is held until the
/// response body is dropped.
pub(super) async fn send(
    mut request: http::Request<WasiBody>,
    target: Target,
    permit: OwnedSemaphorePermit,
) -> Result<(http::Response<WasiBody>, Connection), Error> {
    let timeout = target.timeout;
    let stream = tokio::time::timeout(timeout, connect(&target.addresses)).await.map_err(|_| Error::ConnectionTimeout)??;
    let io: Box<dyn Stream> = match target.tls_name {
        Some(name) => Box::new(
            tokio::time::timeout(timeout, TLS.connect(name, stream))
                .await
                .map_err(|_| Error::ConnectionTimeout)?
                .map_err(Error::Tls)?,
        ),
        None => Box::new(stream),
    };
    let (mut sender, connection) = tokio::time::timeout(timeout, hyper::client::conn::http1::handshake(TokioIo::new(io)))
        .await
        .map_err(|_| Error::ConnectionTimeout)??;
    // The request line carries only the path: the authority is in the Host header.
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri = http::Uri::builder().path_and_query(path).build().map_err(|_| Error::HttpRequestUriInvalid)?;
    *request.uri_mut() = uri;

    let mut connection: Connection = Box::pin(async move { connection.await.map_err(Error::from) });
    // Biased: a response head that arrived wins over the connection ending right after it.
    let response = tokio::select! {
        biased;
        response = tokio::time::timeout(timeout, sender.send_request(request)) => {
            response.map_err(|_| Error::ConnectionReadTimeout)??
        }
        ended = &mut connection => {
            ended?;
            return Err(Error::HttpResponseIncomplete);
        }
    };
    let limit = target.max_response_bytes;
    let response = response.map(|incoming| {
        let mut idle = tokio::time::interval(timeout);
        idle.reset();
        CappedBody { incoming, remaining: limit, limit, idle, _permit: permit }.boxed_unsync()
    });
    Ok((response, connection))
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Connects to the first address that answers.
async fn connect(addresses: &[SocketAddr]) -> Result<TcpStream, Error> {
    let mut last = None;
    for address in addresses {
        match TcpStream::connect(address).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or(Error::DestinationNotFound, Error::Connect))
}

/// A response body that fails once it passes `limit` bytes, or when no frame arrives for the
/// time limit.
struct CappedBody {
    incoming: hyper::body::Incoming,
    remaining: u64,
    limit: u64,
    idle: tokio::time::Interval,
    _permit: OwnedSemaphorePermit,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let size = frame.data_ref().map_or(0, |data| data.len() as u64);
                if size > self.remaining {
                    self.remaining = 0;
                    return Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(self.limit)))));
                }
                self.remaining -= size;
                self.idle.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Error::from(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                ready!(self.idle.poll_tick(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

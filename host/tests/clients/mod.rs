//! Slow and greedy clients of a real `genpipe serve`, for `tests/hostile_clients.rs` and
//! `benches/hostile_clients.rs`: the server process, a gate a step can wait at, clients that
//! send a request's head a byte a second, event-stream subscribers, and raw HTTP/1.1 on
//! `TcpStream`s (so that a test controls every byte and every connection).

#![allow(dead_code)] // the test and the benchmark each use their own subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Raises this process's soft limit of open files to its hard limit: the clients hold thousands
/// of sockets.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// A `genpipe serve` process on a loopback port, on a memory ledger, killed when dropped.
pub struct Server {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    /// Where it listens.
    pub address: SocketAddr,
    /// `http://` and the address.
    pub base: String,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `genpipe serve` on `toml` (a whole genpipe.toml) in a fresh folder.
    pub fn start(toml: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("genpipe.toml"), toml).unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_genpipe"))
            .args(["serve", "--config", "genpipe.toml", "--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let Some(base) = line.trim().strip_prefix("genpipe listening on ") else {
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            panic!("genpipe serve did not start: {line:?}\n{log}");
        };
        let address = base.strip_prefix("http://").unwrap().parse().unwrap();
        Server { base: base.to_string(), address, child, _stdout: stdout, dir }
    }

    /// The process's resident memory (VmRSS), in bytes.
    pub fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// The value of metric `name` in `/metrics`, read on a new connection.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.base)).await.unwrap().text().await.unwrap();
        metric(&text, name)
    }

    /// The server's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of metric `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Awaits `future`, or panics saying what did not happen within `secs` seconds.
pub async fn within<F: Future>(secs: u64, what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), future).await.unwrap_or_else(|_| panic!("{what}: not within {secs} s"))
}

/// A loopback HTTP server whose `GET /gate` answers only once the gate is open: a step that
/// calls it (`test-hostile`'s `http-get`) waits there, holding its run open, at no CPU cost.
pub struct Gate {
    /// Where it listens; `allowed_hosts` of the step's plugin names it.
    pub address: SocketAddr,
    arrived: Arc<Semaphore>,
    open: watch::Sender<bool>,
}

impl Gate {
    /// Starts a closed gate on the current runtime.
    pub async fn start() -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let arrived = Arc::new(Semaphore::new(0));
        let (open, opened) = watch::channel(false);
        let knock = Arc::clone(&arrived);
        let app = Router::new().route(
            "/gate",
            get(move || {
                let (knock, mut opened) = (Arc::clone(&knock), opened.clone());
                async move {
                    knock.add_permits(1);
                    let _ = opened.wait_for(|open| *open).await;
                    "through the gate"
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Gate { address, arrived, open }
    }

    /// Waits until `n` more requests are waiting at the gate.
    pub async fn arrivals(&self, n: u32) {
        self.arrived.acquire_many(n).await.unwrap().forget();
    }

    /// Opens the gate: waiting requests and later ones are answered.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Closes it again (for later requests).
    pub fn close(&self) {
        self.open.send_replace(false);
    }
}

/// Finds `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Status line and header fields.
    pub head: String,
    /// The body, decoded if it was chunked.
    pub body: Vec<u8>,
}

impl Reply {
    /// The value of header field `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads more bytes of `stream` into `buffer`; panics if the server closed it.
async fn fill(stream: &mut (impl AsyncRead + Unpin), buffer: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await.unwrap();
    assert!(n > 0, "the server closed the connection; it had sent {:?}", String::from_utf8_lossy(buffer));
    buffer.extend_from_slice(&chunk[..n]);
}

/// Reads a response head off `stream` (what follows it stays in `buffer`).
pub async fn read_head(stream: &mut (impl AsyncRead + Unpin), buffer: &mut Vec<u8>) -> Reply {
    let end = loop {
        if let Some(at) = find(buffer, b"\r\n\r\n") {
            break at + 4;
        }
        fill(stream, buffer).await;
    };
    let head = String::from_utf8(buffer.drain(..end).collect()).unwrap();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a status line: {head:?}"));
    Reply { status, head, body: Vec::new() }
}

/// Reads one whole response off `stream` (its body by `Content-Length` or chunked); what
/// follows it stays in `buffer`.
pub async fn read_reply(stream: &mut (impl AsyncRead + Unpin), buffer: &mut Vec<u8>) -> Reply {
    let mut reply = read_head(stream, buffer).await;
    if let Some(length) = reply.header("content-length") {
        let length: usize = length.parse().unwrap();
        while buffer.len() < length {
            fill(stream, buffer).await;
        }
        reply.body = buffer.drain(..length).collect();
    } else if reply.header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        reply.body = loop {
            if let Some((body, used)) = dechunk(buffer) {
                buffer.drain(..used);
                break body;
            }
            fill(stream, buffer).await;
        };
    }
    reply
}

/// Sends `request` (a whole request, head and body) on `stream` and reads its response.
pub async fn exchange(stream: &mut TcpStream, request: &str) -> Reply {
    stream.write_all(request.as_bytes()).await.unwrap();
    read_reply(stream, &mut Vec::new()).await
}

/// A GET of `path` with `key` (if any), keeping the connection open.
pub fn get_request(path: &str, key: Option<&str>) -> String {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: genpipe\r\n{auth}\r\n")
}

/// Decodes a chunked body at the start of `bytes`: the body and the bytes it took, or none
/// while it is incomplete.
pub fn dechunk(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + find(&bytes[at..], b"\r\n")?;
        let size = std::str::from_utf8(&bytes[at..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        at = line_end + 2;
        if bytes.len() < at + size + 2 {
            return None;
        }
        if size == 0 {
            return Some((body, at + 2));
        }
        body.extend_from_slice(&bytes[at..at + size]);
        at += size + 2;
    }
}

/// The request a slow client dribbles; it never gets to its end.
const SLOW_REQUEST: &[u8] =
    b"GET /v1/account HTTP/1.1\r\nHost: genpipe\r\nAuthorization: Bearer slow-and-steady\r\nAccept: */*\r\n\r\n";

/// A client that sends a request's head one byte a second (slowloris).
pub struct SlowClient {
    stream: TcpStream,
    connected: Instant,
}

impl SlowClient {
    /// Connects to `address` and sends the first byte.
    pub async fn connect(address: SocketAddr) -> SlowClient {
        // Taken before the handshake starts, so that it precedes the server's accept.
        let connected = Instant::now();
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(&SLOW_REQUEST[..1]).await.unwrap();
        SlowClient { stream, connected }
    }

    /// Sends the next byte every second until the server closes the connection; returns how
    /// long after the connection began that was.
    pub async fn dribble_until_closed(self) -> Duration {
        let (mut read, mut write) = self.stream.into_split();
        let mut sent = 1;
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
        let mut scratch = [0u8; 1024];
        loop {
            tokio::select! {
                read = read.read(&mut scratch) => match read {
                    Ok(0) | Err(_) => return self.connected.elapsed(),
                    // The server may answer the request it never got whole; it closes next.
                    Ok(_) => {}
                },
                _ = every.tick() => {
                    // A write to a connection the server closed fails or is reset: the read
                    // above then sees the end.
                    let _ = write.write_all(&SLOW_REQUEST[sent % SLOW_REQUEST.len()..][..1]).await;
                    sent += 1;
                }
            }
        }
    }
}

/// Slow clients connected per batch by [`slow_clients`]: well within the listen queue (1,024).
const ACCEPT_BATCH: usize = 500;

/// Connects `n` slow clients to `address`, [`ACCEPT_BATCH`] at a time. After each batch it waits
/// until the server has accepted all of it (a request on a new connection, queued behind them,
/// is answered), so that the listen queue never overflows: an overflow holds a connection back by
/// the client's SYN retransmissions (1 s, then 3 s...), while `connect` may already have returned.
pub async fn slow_clients(address: SocketAddr, n: usize) -> Vec<SlowClient> {
    let mut clients = Vec::with_capacity(n);
    while clients.len() < n {
        let batch: Vec<_> =
            (0..(n - clients.len()).min(ACCEPT_BATCH)).map(|_| tokio::spawn(SlowClient::connect(address))).collect();
        for client in batch {
            clients.push(client.await.unwrap());
        }
        let mut probe = TcpStream::connect(address).await.unwrap();
        assert_eq!(exchange(&mut probe, &get_request("/healthz", None)).await.status, 200);
    }
    clients
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// `id`: the event's number.
    pub id: u64,
    /// `event`: its type.
    pub event: String,
    /// `data`: its JSON.
    pub data: String,
}

/// The events of an SSE body, keep-alive comments left out.
pub fn sse_events(body: &str) -> Vec<SseEvent> {
    body.split("\n\n")
        .filter(|block| block.lines().any(|line| !line.starts_with(':')))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim_start().to_string()))
                    .unwrap_or_else(|| panic!("no {name} in event {block:?}"))
            };
            SseEvent { id: field("id").parse().unwrap(), event: field("event"), data: field("data") }
        })
        .collect()
}

/// A client following a run's event stream on a connection of its own.
pub struct Subscriber {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Subscriber {
    /// Opens the event stream of `run` with `key` and reads until its first event arrived
    /// (so the stream was admitted and is being served); panics on any status but 200.
    pub async fn connect(address: SocketAddr, key: &str, run: &str) -> Subscriber {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let request = format!(
            "GET /v1/runs/{run}/events HTTP/1.1\r\nHost: genpipe\r\nAuthorization: Bearer {key}\r\n\
             Accept: text/event-stream\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buffer = Vec::new();
        let body = loop {
            if let Some(at) = find(&buffer, b"\r\n\r\n") {
                break at + 4;
            }
            fill(&mut stream, &mut buffer).await;
        };
        if !buffer.starts_with(b"HTTP/1.1 200 ") {
            let _ = stream.read_to_end(&mut buffer).await;
            panic!("the event stream was refused: {}", String::from_utf8_lossy(&buffer));
        }
        while find(&buffer[body..], b"\n\n").is_none() {
            fill(&mut stream, &mut buffer).await;
        }
        Subscriber { stream, buffer }
    }

    /// Reads the stream to its end (the server closes it after `run_ended`); returns its events.
    pub async fn events(mut self) -> Vec<SseEvent> {
        self.stream.read_to_end(&mut self.buffer).await.unwrap();
        let body = find(&self.buffer, b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&self.buffer[..body]).to_ascii_lowercase();
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        let (events, used) = dechunk(&self.buffer[body..]).unwrap_or_else(|| panic!("the stream ended mid-chunk"));
        assert_eq!(body + used, self.buffer.len(), "bytes after the stream's end");
        sse_events(std::str::from_utf8(&events).unwrap())
    }
}

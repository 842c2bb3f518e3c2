//! Outbound HTTP from plugins, against a real server on loopback: an allowed request gets the
//! server's answer; anything `allowed_hosts` does not list is refused before a byte is sent,
//! redirects included; response bodies are capped; secrets stay with their plugin.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use genpipe::runtime::FailureKind;
use genpipe::state::runs::{EventKind, RunSnapshot, RunStatus};
use genpipe::{Host, RunInput};

/// A loopback server that counts the requests it receives.
async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/hello", get(|| async { "hello from loopback" }))
        .route(
            "/redirect",
            get(move || async move {
                (StatusCode::FOUND, [(header::LOCATION, format!("http://localhost:{}/hello", address.port()))])
            }),
        )
        .route("/big", get(|| async { "b".repeat(3 << 20) }))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&hits), count))
        .with_state(());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (address, hits)
}

async fn count(
    State(hits): State<Arc<AtomicUsize>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> impl IntoResponse {
    hits.fetch_add(1, Ordering::SeqCst);
    next.run(request).await
}

async fn host(address: SocketAddr) -> Arc<Host> {
    common::host(&format!(
        r#"
        [[accounts]]
        id = "acme"
        credits = 1000

        [plugins.caller]
        path = "builtin:test-hostile"
        world = "llm-step"
        allowed_hosts = ["127.0.0.1:{port}"]
        max_http_response_bytes = 1048576

        [plugins.closed]
        path = "builtin:test-hostile"
        world = "llm-step"

        [plugins.keeper]
        path = "builtin:test-hostile"
        world = "llm-step"
        config = {{ api_key = {{ secret = "sk-test-0123456789" }}, model = "m1" }}

        [pipelines.get]
        [[pipelines.get.steps]]
        id = "fetch"
        plugin = "caller"
        max_cost = 1
        params = {{ behaviour = "http-get", follow = "true" }}

        [pipelines.closed]
        [[pipelines.closed.steps]]
        id = "fetch"
        plugin = "closed"
        max_cost = 1
        params = {{ behaviour = "http-get" }}

        [pipelines.leak]
        [[pipelines.leak.steps]]
        id = "leak"
        plugin = "keeper"
        max_cost = 1
        params = {{ behaviour = "leak-secret" }}
        "#,
        port = address.port()
    ))
    .await
}

async fn fetch(host: &Arc<Host>, pipeline: &str, url: String) -> RunSnapshot {
    let params = [("url".to_string(), url)].into();
    host.start_run("acme", pipeline, RunInput { prompt: String::new(), params }).await.unwrap().wait().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_request_gets_the_servers_answer() {
    let (address, hits) = server().await;
    let host = host(address).await;
    let snapshot = fetch(&host, "get", format!("http://{address}/hello")).await;
    assert_eq!(snapshot.status, RunStatus::Completed, "{snapshot:?}");
    let run = host.runs().get(&snapshot.id).unwrap();
    assert_eq!(run.output("fetch").unwrap().text(), Some("hello from loopback"));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_not_listed_is_refused_before_a_byte_is_sent() {
    let (address, hits) = server().await;
    let host = host(address).await;
    let snapshot = fetch(&host, "closed", format!("http://{address}/hello")).await;
    assert_eq!(snapshot.status, RunStatus::Failed);
    assert_eq!(snapshot.steps[0].error_kind, Some(FailureKind::Denied));
    let error = snapshot.error.unwrap();
    let expected = format!(
        "denied: http://127.0.0.1:{port} is not allowed: this plugin's allowed_hosts is empty; add \"127.0.0.1:{port}\"",
        port = address.port()
    );
    assert!(error.contains(&expected), "{error}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached the server");
    assert!(host.ledger().verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_host_not_listed_is_refused() {
    let (address, hits) = server().await;
    let host = host(address).await;
    let snapshot = fetch(&host, "get", format!("http://{address}/redirect")).await;
    assert_eq!(snapshot.steps[0].error_kind, Some(FailureKind::Denied), "{snapshot:?}");
    let error = snapshot.error.unwrap();
    assert!(error.contains(&format!("http://localhost:{} is not in this plugin's allowed_hosts", address.port())), "{error}");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "only the redirect itself was served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_beyond_max_http_response_bytes_is_cut() {
    let (address, _) = server().await;
    let host = host(address).await;
    let snapshot = fetch(&host, "get", format!("http://{address}/big")).await;
    assert_eq!(snapshot.steps[0].error_kind, Some(FailureKind::PluginError), "{snapshot:?}");
    let error = snapshot.error.unwrap();
    assert!(error.contains("response body size exceeds limit: 1048576 bytes"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_setting_reaches_its_plugin_and_nothing_else() {
    let (address, _) = server().await;
    let host = host(address).await;
    let started = host.start_run("acme", "leak", RunInput::default()).await.unwrap();
    let snapshot = started.wait().await;
    assert_eq!(snapshot.status, RunStatus::Failed);
    let error = snapshot.error.clone().unwrap();
    assert!(error.contains("the server refused key [secret]"), "the plugin read it, the error hides it: {error}");
    let (events, _) = started.events_after(0);
    let shown = format!("{events:?} {:?} {:?}", started.snapshot(), host.registry().plugins["keeper"].settings());
    assert!(!shown.contains("sk-test-0123456789"), "the secret leaked: {shown}");
    assert!(events.iter().any(|e| matches!(&e.kind, EventKind::Text { chunk, .. } if chunk == "key=[secret];")));
    assert!(shown.contains("\"m1\""), "plain settings stay readable: {shown}");
}

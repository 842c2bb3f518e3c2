//! The HTTP service over real TCP on loopback: the runs API, live events, idempotency,
//! authentication, bad input, backpressure, metrics, OpenAPI and graceful shutdown.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use genpipe::server::{self, AppState};
use genpipe::{Config, Host};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

const CONFIG: &str = r#"
[server]
admin_key = "admin-key"
max_body_bytes = 4096
max_runs_in_flight = 400
shutdown_grace_secs = 1

[[accounts]]
id = "acme"
api_key = "acme-key"
credits = 10000000

[[accounts]]
id = "globex"
# sha256("globex-key")
api_key_sha256 = "GLOBEX_HASH"
credits = 1000

[pipelines.story]
[[pipelines.story.steps]]
id = "text"
plugin = "llm-markov"
max_cost = 100
params = { max_tokens = 40 }

[[pipelines.story.steps]]
id = "image"
plugin = "image-procedural"
max_cost = 5
params = { width = 64, height = 48 }

[pipelines.slow-words]
[[pipelines.slow-words.steps]]
id = "words"
plugin = "test-llm"
max_cost = 100
params = { delay_ms = 300, behaviour = "chunks" }

# Stays running until cancelled, however loaded the machine is.
[plugins.test-llm-patient]
path = "builtin:test-llm"
world = "llm-step"
timeout_ms = 600000

[pipelines.stubborn]
[[pipelines.stubborn.steps]]
id = "polite"
plugin = "test-llm-patient"
max_cost = 10
params = { amount = 3, behaviour = "wait-cancel" }

[[pipelines.stubborn.steps]]
id = "rude"
plugin = "test-llm-patient"
max_cost = 10
params = { behaviour = "spin" }
"#;

struct TestServer {
    base: String,
    host: Arc<Host>,
    client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    async fn start() -> TestServer {
        TestServer::launch(CONFIG).await
    }

    async fn launch(config: &str) -> TestServer {
        let hash = genpipe::server::hash_key("globex-key");
        let text = format!("{}\n{}", common::PLUGINS, config.replace("GLOBEX_HASH", &hash));
        let config = Config::parse(&text, "http-test.toml", Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        let host =
            Host::with_runtime(common::runtime(), &config, Arc::new(genpipe::state::ledger::MemoryLedger::new())).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, stop) = oneshot::channel::<()>();
        let state = AppState::new(Arc::clone(&host), &config, None);
        let served = tokio::spawn(server::serve(listener, state, async {
            let _ = stop.await;
        }));
        TestServer { base, host, client: reqwest::Client::new(), shutdown: Some(shutdown), served }
    }

    fn request(&self, method: reqwest::Method, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn post_run(&self, key: &str, body: Value, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let mut request = self.request(reqwest::Method::POST, "/v1/runs", Some(key)).json(&body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn get_json(&self, path: &str, key: &str) -> (StatusCode, Value) {
        let response = self.request(reqwest::Method::GET, path, Some(key)).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn stop(mut self) -> Arc<Host> {
        self.shutdown.take().unwrap().send(()).unwrap();
        self.served.await.unwrap().unwrap();
        self.host
    }
}

/// Parses an SSE body into (id, event, data) triples.
fn parse_sse(body: &str) -> Vec<(u64, String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let (mut id, mut event, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).ok();
                }
            }
            Some((id?, event?, data?))
        })
        .collect()
}

fn metric(metrics: &str, name_and_labels: &str) -> f64 {
    metrics.lines().find_map(|line| line.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_runs_over_http_add_up() {
    let server = TestServer::start().await;
    let (_, account) = server.get_json("/v1/account", "acme-key").await;
    let start = account["balance"].as_u64().unwrap();

    let results: Vec<(StatusCode, Value)> = futures::stream::iter(0..1000)
        .map(|i| {
            let body = json!({ "pipeline": "story", "input": { "prompt": "the Queen of Hearts" }, "params": { "seed": i } });
            server.post_run("acme-key", body, &[("Prefer", "wait=60")])
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let mut posted = 0;
    for (status, run) in &results {
        assert_eq!(*status, StatusCode::OK, "{run}");
        assert_eq!(run["status"], "completed", "{run}");
        posted += run["posted"].as_u64().unwrap();
    }
    let (_, account) = server.get_json("/v1/account", "acme-key").await;
    assert_eq!(account["balance"].as_u64().unwrap(), start - posted);
    assert_eq!(account["held"], 0);

    let metrics = server.request(reqwest::Method::GET, "/metrics", None).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&metrics, r#"genpipe_runs_total{pipeline="story",status="completed"}"#), 1000.0, "{metrics}");
    assert_eq!(metric(&metrics, "genpipe_credits_posted_total") as u64, posted);
    assert_eq!(metric(&metrics, "genpipe_credits_reserved_total") as u64, 1000 * 105);
    assert_eq!(metric(&metrics, "genpipe_runs_in_flight"), 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_with_one_idempotency_key_make_one_run() {
    let server = TestServer::start().await;
    let body = json!({ "pipeline": "story", "input": { "prompt": "a caterpillar" } });
    let answers: Vec<(StatusCode, Value)> = futures::future::join_all(
        (0..20).map(|_| server.post_run("acme-key", body.clone(), &[("Idempotency-Key", "order-42"), ("Prefer", "wait=30")])),
    )
    .await;
    assert!(answers.iter().all(|a| a == &answers[0]), "20 identical answers");
    assert_eq!(answers[0].0, StatusCode::OK);
    assert_eq!(server.host.runs().len(), 1, "one run");
    let (_, account) = server.get_json("/v1/account", "acme-key").await;
    assert_eq!(account["balance"].as_u64().unwrap(), 10_000_000 - answers[0].1["posted"].as_u64().unwrap(), "one charge");

    let other = json!({ "pipeline": "story", "input": { "prompt": "another body" } });
    let (status, problem) = server.post_run("acme-key", other, &[("Idempotency-Key", "order-42")]).await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("urn:genpipe:problem:idempotency-key-reused"))
    );
    // Keys are per account: globex's order-42 is its own.
    let (status, _) = server.post_run("globex-key", body, &[("Idempotency-Key", "order-42")]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_ordered_complete_and_resumable() {
    let server = TestServer::start().await;
    let prompt = "one two three four five six seven eight nine ten";
    let (status, run) =
        server.post_run("acme-key", json!({ "pipeline": "slow-words", "input": { "prompt": prompt } }), &[]).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let path = format!("/v1/runs/{}/events", run["id"].as_str().unwrap());

    // Live: connected while the plugin is still sleeping.
    let live = server.request(reqwest::Method::GET, &path, Some("acme-key")).send().await.unwrap();
    assert_eq!(live.headers()["content-type"], "text/event-stream");
    let live = parse_sse(&live.text().await.unwrap());
    let text: String = live.iter().filter(|(_, e, _)| e == "text").map(|(_, _, d)| d["chunk"].as_str().unwrap()).collect();
    assert_eq!(text, prompt, "every chunk, in order");
    assert_eq!(live.iter().map(|(id, _, _)| *id).collect::<Vec<_>>(), (1..=live.len() as u64).collect::<Vec<_>>());
    let (_, last_event, last_data) = live.last().unwrap();
    assert_eq!((last_event.as_str(), last_data["status"].as_str()), ("run_ended", Some("completed")));

    // Late: the whole history. Resuming: exactly what follows Last-Event-ID.
    let late = server.request(reqwest::Method::GET, &path, Some("acme-key")).send().await.unwrap().text().await.unwrap();
    assert_eq!(parse_sse(&late), live);
    let resumed =
        server.request(reqwest::Method::GET, &path, Some("acme-key")).header("Last-Event-ID", "5").send().await.unwrap();
    assert_eq!(parse_sse(&resumed.text().await.unwrap()), live[5..].to_vec());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_mid_run_stops_the_plugins_and_releases_the_hold() {
    let server = TestServer::start().await;
    let (_, run) = server.post_run("acme-key", json!({ "pipeline": "stubborn", "input": { "prompt": "" } }), &[]).await;
    let path = format!("/v1/runs/{}", run["id"].as_str().unwrap());
    // Wait until both plugins run (the polite one has charged) before cancelling.
    let events = format!("{path}/events");
    let mut stream = server.request(reqwest::Method::GET, &events, Some("acme-key")).send().await.unwrap().bytes_stream();
    let mut seen = String::new();
    while seen.matches("event: step_started").count() < 2 {
        seen.push_str(&String::from_utf8_lossy(&stream.next().await.unwrap().unwrap()));
    }
    let response = server.request(reqwest::Method::POST, &format!("{path}/cancel"), Some("acme-key")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let ended: Value = response.json().await.unwrap();
    assert_eq!(ended["status"], "cancelled");
    assert_eq!(ended["posted"], 0);
    let rude = &ended["steps"][1];
    assert_eq!(rude["status"], "cancelled");
    assert!(rude["error"].as_str().unwrap().contains("did not return within 250 ms"), "{rude}");
    let (_, account) = server.get_json("/v1/account", "acme-key").await;
    assert_eq!((account["balance"].as_u64(), account["held"].as_u64()), (Some(10_000_000), Some(0)));

    // A cancelled run stays readable, its stream included; cancelling it again changes nothing.
    assert_eq!(server.get_json(&path, "acme-key").await.1, ended);
    let log = server.request(reqwest::Method::GET, &events, Some("acme-key")).send().await.unwrap().text().await.unwrap();
    let (_, kind, data) = parse_sse(&log).pop().unwrap();
    assert_eq!((kind.as_str(), &data["status"]), ("run_ended", &json!("cancelled")), "{data}");
    let again = server.request(reqwest::Method::POST, &format!("{path}/cancel"), Some("acme-key")).send().await.unwrap();
    assert_eq!(again.json::<Value>().await.unwrap(), ended);

    // DELETE answers with the ended run, then it is gone.
    let deleted = server.request(reqwest::Method::DELETE, &path, Some("acme-key")).send().await.unwrap();
    assert_eq!(deleted.json::<Value>().await.unwrap(), ended);
    for gone in [&path, &events] {
        let response = server.request(reqwest::Method::GET, gone, Some("acme-key")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{gone}");
    }
    server.stop().await;
}

#[tokio::test]
async fn runs_are_private_and_keys_are_checked() {
    let server = TestServer::start().await;
    let (_, run) =
        server.post_run("acme-key", json!({ "pipeline": "story", "input": { "prompt": "x" } }), &[("Prefer", "wait=30")]).await;
    let path = format!("/v1/runs/{}", run["id"].as_str().unwrap());
    for sub in ["", "/events", "/outputs/text"] {
        let response = server.request(reqwest::Method::GET, &format!("{path}{sub}"), Some("globex-key")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{sub}");
    }
    let response = server.request(reqwest::Method::DELETE, &path, Some("globex-key")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let text = server.request(reqwest::Method::GET, &format!("{path}/outputs/text"), Some("acme-key")).send().await.unwrap();
    assert_eq!(text.headers()["content-type"], "text/plain; charset=utf-8");
    assert!(!text.text().await.unwrap().is_empty());
    let image = server.request(reqwest::Method::GET, &format!("{path}/outputs/image"), Some("acme-key")).send().await.unwrap();
    assert_eq!(image.headers()["content-type"], "image/png");
    let decoder = png::Decoder::new(std::io::Cursor::new(image.bytes().await.unwrap()));
    let info = decoder.read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (64, 48));

    let missing = server.request(reqwest::Method::GET, &path, None).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let bad = server.request(reqwest::Method::GET, &path, Some("nope")).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let not_admin = server
        .request(reqwest::Method::POST, "/v1/admin/accounts", Some("acme-key"))
        .json(&json!({ "id": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(not_admin.status(), StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test]
async fn malformed_and_hostile_input_gets_a_4xx_problem() {
    let server = TestServer::start().await;
    let post = |body: reqwest::Body, content_type: &str| {
        server.request(reqwest::Method::POST, "/v1/runs", Some("acme-key")).header("content-type", content_type).body(body)
    };
    let run = |body: Value| post(body.to_string().into(), "application/json");
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("bad JSON", post("{\"pipeline\": ".into(), "application/json"), 400, "not valid JSON"),
        ("wrong type", run(json!({ "pipeline": 5, "input": { "prompt": "x" } })), 400, "invalid type"),
        ("missing field", run(json!({ "pipeline": "story" })), 400, "missing field `input`"),
        (
            "unknown field",
            run(json!({ "pipeline": "story", "input": { "prompt": "x" }, "colour": 1 })),
            400,
            "unknown field `colour`",
        ),
        ("unknown pipeline", run(json!({ "pipeline": "nope", "input": { "prompt": "x" } })), 404, "no pipeline named 'nope'"),
        (
            "negative number",
            run(json!({ "pipeline": "story", "input": { "prompt": "x" }, "params": { "width": -5 } })),
            400,
            "width must be a whole number from 1 to 4096, got '-5'",
        ),
        (
            "absurd number",
            run(json!({ "pipeline": "story", "input": { "prompt": "x" }, "params": { "max_tokens": 1e300 } })),
            400,
            "max_tokens must be a whole number",
        ),
        (
            "nested param",
            run(json!({ "pipeline": "story", "input": { "prompt": "x" }, "params": { "seed": [1] } })),
            400,
            "params.seed must be a number",
        ),
        (
            "huge body",
            run(json!({ "pipeline": "story", "input": { "prompt": "x".repeat(10_000) } })),
            413,
            "larger than the server accepts",
        ),
        ("invalid UTF-8", post(vec![b'{', 0xff, 0xfe, b'}'].into(), "application/json"), 400, "not valid JSON"),
        (
            "unicode garbage name",
            run(json!({ "pipeline": "\u{202e}\u{0}\u{fffd}🦀", "input": { "prompt": "\u{0}" } })),
            404,
            "no pipeline named",
        ),
        ("not JSON", post("pipeline=story".into(), "application/x-www-form-urlencoded"), 415, "Content-Type: application/json"),
        (
            "bad idempotency key",
            run(json!({ "pipeline": "story", "input": { "prompt": "x" } })).header("Idempotency-Key", ""),
            400,
            "Idempotency-Key must be",
        ),
        ("unknown run", server.request(reqwest::Method::GET, "/v1/runs/run_0000", Some("acme-key")), 404, "no run 'run_0000'"),
        ("unknown step", server.request(reqwest::Method::GET, "/v1/runs/zzz/outputs/x", Some("acme-key")), 404, "no run"),
        (
            "unknown route",
            server.request(reqwest::Method::GET, "/v2/everything", Some("acme-key")),
            404,
            "no route GET /v2/everything",
        ),
        (
            "bad query",
            server.request(reqwest::Method::GET, "/v1/account/ledger?limit=many", Some("acme-key")),
            400,
            "the query string does not fit",
        ),
        (
            "unknown query field",
            server.request(reqwest::Method::GET, "/v1/account/ledger?colour=red", Some("acme-key")),
            400,
            "unknown field `colour`",
        ),
        (
            "wrong method",
            server.request(reqwest::Method::PUT, "/v1/runs", Some("acme-key")),
            405,
            "PUT is not allowed on /v1/runs",
        ),
        (
            "zero grant",
            server
                .request(reqwest::Method::POST, "/v1/admin/accounts/acme/grants", Some("admin-key"))
                .json(&json!({ "amount": 0 })),
            400,
            "amount 0 is not valid",
        ),
        (
            "bad account id",
            server.request(reqwest::Method::POST, "/v1/admin/accounts", Some("admin-key")).json(&json!({ "id": "a b" })),
            400,
            "id must be",
        ),
    ];
    for (name, request, status, detail) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{name}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["status"], status, "{name}");
        assert!(problem["detail"].as_str().unwrap().contains(detail), "{name}: {problem}");
    }
    assert!(server.host.runs().is_empty(), "no bad request started a run");
    server.stop().await;
}

#[tokio::test]
async fn beyond_the_in_flight_cap_runs_get_429_with_retry_after() {
    let capped = TestServer::launch(&CONFIG.replace("max_runs_in_flight = 400", "max_runs_in_flight = 2")).await;
    let stubborn = json!({ "pipeline": "stubborn", "input": { "prompt": "" } });
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, run) = capped.post_run("acme-key", stubborn.clone(), &[]).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        ids.push(run["id"].as_str().unwrap().to_string());
    }
    let response = capped.request(reqwest::Method::POST, "/v1/runs", Some("acme-key")).json(&stubborn).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    for id in ids {
        capped.request(reqwest::Method::DELETE, &format!("/v1/runs/{id}"), Some("acme-key")).send().await.unwrap();
    }
    let (status, _) = capped.post_run("acme-key", json!({ "pipeline": "story", "input": { "prompt": "" } }), &[]).await;
    assert_eq!(status, StatusCode::ACCEPTED, "room again once runs ended");
    capped.stop().await;
}

#[tokio::test]
async fn a_request_over_its_time_limit_gets_503_and_leaves_no_hold_behind() {
    let server =
        TestServer::launch(&CONFIG.replace("max_runs_in_flight = 400", "max_runs_in_flight = 400\nrequest_timeout_secs = 1"))
            .await;
    let stubborn = json!({ "pipeline": "stubborn", "input": { "prompt": "" } });
    let (status, problem) = server.post_run("acme-key", stubborn, &[("Prefer", "wait=30")]).await;
    assert_eq!((status, problem["type"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("urn:genpipe:problem:timeout")));
    // The run goes on without the request; ending it settles its hold as usual.
    let (_, account) = server.get_json("/v1/account", "acme-key").await;
    let id = account["recent_runs"][0]["id"].as_str().unwrap().to_string();
    let ended: Value = server
        .request(reqwest::Method::DELETE, &format!("/v1/runs/{id}"), Some("acme-key"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ended["status"], "cancelled");
    let host = server.stop().await;
    let totals = common::conserved_totals(&host).await;
    assert_eq!((totals.open_holds, totals.released_holds, totals.posted), (0, 1, 0));
}

#[tokio::test]
async fn admin_creates_accounts_and_grants_idempotently() {
    let server = TestServer::start().await;
    let admin = |path: &str, body: Value, key: &str| {
        server.request(reqwest::Method::POST, path, Some("admin-key")).header("Idempotency-Key", key).json(&body)
    };
    let created = admin("/v1/admin/accounts", json!({ "id": "initech", "credits": 50 }), "c1").send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let again: Value =
        admin("/v1/admin/accounts", json!({ "id": "initech", "credits": 50 }), "c1").send().await.unwrap().json().await.unwrap();
    assert_eq!(created, again, "a retried creation returns the same account and key");
    let key = created["api_key"].as_str().unwrap();
    for _ in 0..3 {
        let granted = admin("/v1/admin/accounts/initech/grants", json!({ "amount": 25 }), "g1").send().await.unwrap();
        assert_eq!(granted.status(), StatusCode::OK);
    }
    let (_, account) = server.get_json("/v1/account", key).await;
    assert_eq!(account["balance"], 75, "the grant happened once");

    // The journal shows both grants, a page at a time.
    let (status, page) = server.get_json("/v1/account/ledger?limit=1", key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((page["entries"][0]["kind"].as_str(), page["entries"][0]["amount"].as_u64()), (Some("grant"), Some(50)));
    let next = page["next_after"].as_u64().unwrap();
    let (_, page) = server.get_json(&format!("/v1/account/ledger?limit=1&after={next}"), key).await;
    assert_eq!(page["entries"][0]["amount"], 25);
    let (_, last) = server.get_json(&format!("/v1/account/ledger?after={}", page["next_after"]), key).await;
    assert_eq!((last["entries"].as_array().unwrap().len(), last["next_after"].is_null()), (0, true));
    let (status, _) = server.get_json("/v1/account/ledger?limit=0", key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let conflict = admin("/v1/admin/accounts/initech/grants", json!({ "amount": 26 }), "g1").send().await.unwrap();
    assert_eq!(conflict.status(), StatusCode::UNPROCESSABLE_ENTITY);
    server.stop().await;
}

#[tokio::test]
async fn openapi_document_is_openapi_3_and_lists_every_route() {
    let server = TestServer::start().await;
    let doc: Value = server.request(reqwest::Method::GET, "/openapi.json", None).send().await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let expected = [
        ("post", "/v1/runs"),
        ("get", "/v1/runs/{id}"),
        ("delete", "/v1/runs/{id}"),
        ("get", "/v1/runs/{id}/events"),
        ("get", "/v1/runs/{id}/outputs/{step}"),
        ("post", "/v1/runs/{id}/cancel"),
        ("get", "/v1/account"),
        ("get", "/v1/account/ledger"),
        ("get", "/v1/pipelines"),
        ("get", "/v1/plugins"),
        ("post", "/v1/admin/accounts"),
        ("post", "/v1/admin/accounts/{id}/grants"),
        ("post", "/v1/admin/reload"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];
    let mut listed = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            assert!(operation["responses"].is_object(), "{method} {path} documents its responses");
            listed.insert((method.clone(), path.clone()));
        }
    }
    let expected: BTreeSet<_> = expected.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(listed, expected);
    // Every schema reference resolves.
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &reference[..reference.find('"').unwrap()];
        assert!(doc["components"]["schemas"][name].is_object(), "schema {name} is defined");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_runs_in_flight_and_settles_every_hold() {
    let server = TestServer::start().await;
    let mut waiting = Vec::new();
    for i in 0..10 {
        let pipeline = if i % 2 == 0 { "slow-words" } else { "stubborn" };
        let body = json!({ "pipeline": pipeline, "input": { "prompt": "a b c" } });
        let request = server.request(reqwest::Method::POST, "/v1/runs", Some("acme-key")).header("Prefer", "wait=60").json(&body);
        waiting.push(tokio::spawn(request.send()));
    }
    // Wait until all ten are admitted (the slow ones may already have completed).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while server.host.runs().len() < 10 {
        assert!(tokio::time::Instant::now() < deadline, "only {} of 10 runs were admitted", server.host.runs().len());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let host = server.stop().await;
    let totals = common::conserved_totals(&host).await;
    assert_eq!(totals.open_holds, 0, "every hold settled or released");
    assert_eq!((totals.settled_holds, totals.released_holds), (5, 5));
    for request in waiting {
        let run: Value = request.await.unwrap().unwrap().json().await.unwrap();
        assert!(run["status"] == "completed" || run["status"] == "cancelled", "{run}");
    }
}

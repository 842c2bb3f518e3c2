//! A plain axum server that runs no wasm: the "what HTTP alone costs" row of
//! `scripts/bench-http.sh`. It answers `POST /v1/runs` (the body is parsed as JSON, as
//! genpipe's is) and `GET /` with a small JSON document, on the same tokio multi-thread runtime
//! and axum version as `genpipe serve`.
//!
//! ```sh
//! cargo run --release --example plain_axum -- 127.0.0.1:8091
//! ```

use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

async fn run(Json(body): Json<Value>) -> Json<Value> {
    let pipeline = body.get("pipeline").cloned().unwrap_or(Value::Null);
    Json(json!({ "pipeline": pipeline, "status": "completed" }))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8091".to_string());
    let app = Router::new().route("/", get(|| async { Json(json!({ "status": "ok" })) })).route("/v1/runs", post(run));
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("plain axum listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}

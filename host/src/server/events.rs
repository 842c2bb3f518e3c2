//! `GET /v1/runs/{id}/events`: the run's events as Server-Sent Events, in order.
//!
//! A client connecting late first receives what already happened; `Last-Event-ID` (or
//! `?after=N`) resumes after that event, without gaps or duplicates. Each event's SSE `id` is its
//! sequence number, its `event` its type, its `data` the JSON of the event. The stream closes
//! after `run_ended`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;

use super::AppState;
use super::auth::Caller;
use super::extract::QueryParams;
use super::problem::Problem;
use super::runs::owned_run;
use crate::state::runs::{Run, RunEvent};

/// Query of the event stream.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Start after this sequence number (like `Last-Event-ID`, which wins when both are given).
    pub after: Option<u64>,
}

/// Streams a run's events.
#[utoipa::path(get, path = "/v1/runs/{id}/events", tag = "runs",
    params(("id" = String, Path, description = "Run id"), EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event")),
    responses(
        (status = 200, description = "An SSE stream of RunEvent, one per `data:` line", content_type = "text/event-stream", body = RunEvent),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
    ),
    security(("api_key" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    let run = owned_run(&state, &caller, &id)?;
    let after = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| Problem::bad_request("Last-Event-ID must be the number of the last event received"))?,
        None => query.after.unwrap_or(0),
    };
    Ok(Sse::new(events(run, after)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn events(run: Arc<Run>, after: u64) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((run, after), |(run, after)| async move {
        let batch = run.next_events(after).await;
        let last = batch.last()?.seq;
        let events: Vec<Result<Event, Infallible>> = batch.iter().map(|e| Ok(to_sse(e))).collect();
        Some((futures::stream::iter(events), (run, last)))
    })
    .flatten()
}

fn to_sse(event: &RunEvent) -> Event {
    let json = serde_json::to_value(event).unwrap_or_default();
    let kind = json.get("type").and_then(|t| t.as_str()).unwrap_or("event").to_string();
    Event::default().id(event.seq.to_string()).event(kind).data(json.to_string())
}

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
use axum::http::{HeaderMap, HeaderValue, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;

use super::AppState;
use super::auth::Caller;
use super::extract::{optional_whole_number, whole_number};
use super::found::{FoundRun, find_run, next_change};
use super::limits::StreamSlot;
use super::problem::Problem;
use super::runs::copied_to_shared;
use crate::state::runs::{EventKind, Run, RunEvent};
use crate::state::shared::{RECHECK, SharedRuns};

/// Query of the event stream.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Start after this sequence number (like `Last-Event-ID`, which wins when both are given).
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[param(value_type = Option<u64>, minimum = 0)]
    pub after: Option<u64>,
}

/// Where a stream starts: after `Last-Event-ID` if given (it wins), else after `?after=N`, else
/// from the first event. Each must be a whole number from 0 to 2^64-1; anything else is 400.
pub fn resume_after(last_event_id: Option<&HeaderValue>, uri: &Uri) -> Result<u64, Problem> {
    let query = match axum::extract::Query::<EventsQuery>::try_from_uri(uri) {
        Ok(axum::extract::Query(query)) => query,
        Err(rejection) => return Err(Problem::bad_request(format!("the query string does not fit: {}", rejection.body_text()))),
    };
    match last_event_id {
        Some(value) => value.to_str().ok().and_then(whole_number).ok_or_else(|| {
            Problem::bad_request(format!(
                "Last-Event-ID must be the number of the last event received, a whole number from 0 to {}",
                u64::MAX
            ))
        }),
        None => Ok(query.after.unwrap_or(0)),
    }
}

/// Streams a run's events.
#[utoipa::path(get, path = "/v1/runs/{id}/events", tag = "runs", operation_id = "streamRunEvents",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Run id"), EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, minimum = 0, description = "Resume after this event")),
    responses(
        (status = 200, description = "Server-Sent Events: `id` the event's number, `event` its type, `data` the JSON of a RunEvent", body = RunEvent),
        (status = 404, description = "No such run for this account", body = Problem),
        (status = 429, description = "Over the request rate, or the run or the account has its most event streams open", body = Problem),
    ),
    security(("api_key" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    let run = find_run(&state, &caller, &id).await?;
    let after = resume_after(headers.get("last-event-id"), &uri)?;
    let slot = state.limits.open_stream(&caller.0, &id)?;
    let events = match run {
        FoundRun::Local(run) => local_events(state, run, after, slot).left_stream(),
        FoundRun::Shared(_) => {
            let shared = Arc::clone(state.host.shared().expect("a shared run comes from the shared store"));
            shared_events(shared, id, after, slot).right_stream()
        }
    };
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The run's events after `after`, holding the stream's `slot` until the stream is dropped.
/// With a shared store, the run's end is copied there before `run_ended` is sent.
fn local_events(state: AppState, run: Arc<Run>, after: u64, slot: StreamSlot) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((state, run, after, slot), |(state, run, after, slot)| async move {
        let batch = run.next_events(after).await;
        let last = batch.last()?;
        if matches!(last.kind, EventKind::RunEnded { .. }) {
            copied_to_shared(&state, &run).await;
        }
        let last = last.seq;
        let events: Vec<Result<Event, Infallible>> = batch.iter().map(|e| Ok(to_sse(e))).collect();
        Some((futures::stream::iter(events), (state, run, last, slot)))
    })
    .flatten()
}

/// Most events read from the shared store at once.
const SHARED_PAGE: i64 = 500;

/// Another replica's run's events after `after`, from the shared store, woken by its
/// notifications; ends after `run_ended`, or once the run is gone. A database that fails is
/// retried: the stream waits, it does not break.
fn shared_events(
    shared: Arc<SharedRuns>,
    id: String,
    after: u64,
    slot: StreamSlot,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let changes = shared.changes();
    futures::stream::unfold(Some((shared, id, after, slot, changes)), |follow| async move {
        let (shared, id, mut after, slot, mut changes) = follow?;
        loop {
            match shared.events_after(&id, after, SHARED_PAGE).await {
                Ok(batch) if !batch.is_empty() => {
                    let mut ended = false;
                    let events: Vec<Result<Event, Infallible>> = batch
                        .iter()
                        .map(|(seq, body)| {
                            let data: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                            ended |= data["type"] == "run_ended";
                            Ok(sse_event(*seq, &data))
                        })
                        .collect();
                    after = batch.last().map_or(after, |(seq, _)| *seq);
                    let next = (!ended).then_some((shared, id, after, slot, changes));
                    return Some((futures::stream::iter(events), next));
                }
                Ok(_) => match shared.run(&id).await {
                    Ok(None) => return None,
                    Ok(Some(run)) if !run.running => {
                        // Ended: its last events may have landed since the read above.
                        if shared.events_after(&id, after, 1).await.is_ok_and(|rest| rest.is_empty()) {
                            return None;
                        }
                        continue;
                    }
                    _ => {}
                },
                Err(_) => {}
            }
            let _ = tokio::time::timeout(RECHECK, next_change(&mut changes, &id)).await;
        }
    })
    .flatten()
}

fn to_sse(event: &RunEvent) -> Event {
    sse_event(event.seq, &serde_json::to_value(event).unwrap_or_default())
}

/// An event as SSE: `id` its number, `event` its type, `data` its JSON.
fn sse_event(seq: u64, json: &serde_json::Value) -> Event {
    let kind = json.get("type").and_then(|t| t.as_str()).unwrap_or("event");
    Event::default().id(seq.to_string()).event(kind).data(json.to_string())
}

//! What the server saw, for tests to assert on: connections, requests per endpoint and model
//! (and the streams the client closed before their end), and the streams open now.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

/// The counters, shared by every request.
#[derive(Debug, Default)]
pub struct Stats {
    counters: Mutex<StatsSnapshot>,
}

/// A copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// TCP connections accepted.
    pub connections: u64,
    /// `POST /v1/chat/completions`, by model.
    pub chat: BTreeMap<String, ModelStats>,
    /// `POST /v1/images/generations`, by model.
    pub images: BTreeMap<String, ModelStats>,
    /// Streamed chat responses being sent now.
    pub open_streams: u64,
}

/// The requests for one model at one endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ModelStats {
    /// Requests received (attempts).
    pub requests: u64,
    /// Requests answered with a whole, successful response (a stream that reached `[DONE]`).
    pub completed: u64,
    /// Requests answered with an error status, or whose body the server broke on purpose.
    pub failed: u64,
    /// Streamed responses the client closed before their end.
    pub closed_early: u64,
}

/// The two endpoints that count per model.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Endpoint {
    Chat,
    Images,
}

impl Stats {
    /// A copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.lock().clone()
    }

    /// The counters of `model` at the chat endpoint (zero when it was never asked for).
    pub fn chat(&self, model: &str) -> ModelStats {
        self.lock().chat.get(model).copied().unwrap_or_default()
    }

    /// The counters of `model` at the images endpoint (zero when it was never asked for).
    pub fn images(&self, model: &str) -> ModelStats {
        self.lock().images.get(model).copied().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatsSnapshot> {
        self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn model(&self, endpoint: Endpoint, model: &str, update: impl FnOnce(&mut ModelStats) -> u64) -> u64 {
        let mut counters = self.lock();
        let map = match endpoint {
            Endpoint::Chat => &mut counters.chat,
            Endpoint::Images => &mut counters.images,
        };
        update(map.entry(model.to_string()).or_default())
    }

    pub(crate) fn connection(&self) {
        self.lock().connections += 1;
    }

    /// Counts a request and returns its attempt number for this endpoint and model, from 1.
    pub(crate) fn request(&self, endpoint: Endpoint, model: &str) -> u64 {
        self.model(endpoint, model, |m| {
            m.requests += 1;
            m.requests
        })
    }

    pub(crate) fn completed(&self, endpoint: Endpoint, model: &str) {
        self.model(endpoint, model, |m| {
            m.completed += 1;
            0
        });
    }

    pub(crate) fn failed(&self, endpoint: Endpoint, model: &str) {
        self.model(endpoint, model, |m| {
            m.failed += 1;
            0
        });
    }

    pub(crate) fn stream_opened(&self) {
        self.lock().open_streams += 1;
    }

    pub(crate) fn stream_closed(&self, model: &str, early: bool) {
        self.lock().open_streams -= 1;
        self.model(Endpoint::Chat, model, |m| {
            m.closed_early += u64::from(early);
            0
        });
    }
}

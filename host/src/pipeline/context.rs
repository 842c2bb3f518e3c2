//! What the steps of one run share: the host, the run, the pipeline version it runs, its
//! prompt, and how each awaited step ended.
//!
//! A run's steps, and their stores, hold this one context, whose reference count only that
//! run touches, rather than references of their own to the host, the pipeline, the ledger or
//! a plugin's settings, whose counts every run on every core would write. The context itself
//! holds its thread's share of the pipeline ([`crate::per_thread::Shares`]).

use std::sync::Arc;

use tokio::sync::watch;

use super::Pipeline;
use crate::host::Host;
use crate::per_thread::Share;
use crate::runtime::PluginSettings;
use crate::state::ledger::Ledger;
use crate::state::runs::Run;

/// How a step ended, as the steps waiting for it see it.
pub(crate) type Done = watch::Sender<Option<bool>>;

/// The context of one run.
pub(crate) struct RunContext {
    pub(crate) host: Arc<Host>,
    pub(crate) run: Arc<Run>,
    pub(crate) pipeline: Share<Pipeline>,
    pub(crate) prompt: String,
    /// For each step that another step waits for, how it ended (empty when no step waits).
    done: Box<[Option<Done>]>,
}

impl RunContext {
    /// The context of `run`, a run of `pipeline` on `host`.
    pub(crate) fn new(host: Arc<Host>, run: Arc<Run>, pipeline: Share<Pipeline>, prompt: String) -> RunContext {
        let done = if pipeline.steps.iter().any(|step| step.awaited) {
            pipeline.steps.iter().map(|step| step.awaited.then(|| watch::Sender::new(None))).collect()
        } else {
            Box::default()
        };
        RunContext { host, run, pipeline, prompt, done }
    }

    /// How step `index` ended, if another step waits for it.
    pub(crate) fn done(&self, index: usize) -> Option<&Done> {
        self.done.get(index)?.as_ref()
    }

    /// The settings of step `index`'s plugin.
    pub(crate) fn plugin(&self, index: usize) -> &PluginSettings {
        self.pipeline.steps[index].plugin.settings()
    }

    /// The ledger.
    pub(crate) fn ledger(&self) -> &dyn Ledger {
        self.host.ledger().as_ref()
    }
}

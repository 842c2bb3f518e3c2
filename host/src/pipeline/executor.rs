//! One run's lifecycle, from its admission (see [`crate::host`]) to its single terminal status.
//!
//! - Every step starts at once, concurrently: the run's task polls each step once, in pipeline
//!   order, and a step that has to wait (for its inputs, an instance, I/O, or a plugin that
//!   yields at an epoch tick) continues on a tokio task of its own. So steps that take time run
//!   in parallel, and a step that finishes within its first poll costs no task. A step with
//!   `after` waits until those steps completed; if one of them did not, the step ends
//!   `cancelled` without running.
//! - A step enters its plugin's gate (`max_concurrency`, then a bounded queue) and takes an
//!   instance slot (the pool's size) only once its inputs are ready, so waiting steps never
//!   hold slots that the steps they wait for need. A step refused by a full queue fails
//!   (`at-capacity`).
//! - The first step that fails cancels the run's token: its siblings see `status.cancelled()`,
//!   and are stopped after the grace period if they ignore it.
//! - When every step task has ended (no plugin can charge any more), the hold is settled or
//!   released exactly once, then the run takes exactly one terminal status.

use std::any::Any;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Pipeline;
use super::context::{Done, RunContext};
use super::request::StepParams;
use crate::config::FailurePolicy;
use crate::host::Host;
use crate::per_thread::Share;
use crate::runtime::invoke::invoke;
use crate::runtime::{FailureKind, StepFailure, StepRequest, StepState};
use crate::state::ledger::{LedgerError, Settlement};
use crate::state::runs::{Run, RunStatus, StepOutput, StepStatus};

/// Runs every step of `run` and ends it.
pub(crate) async fn execute(host: Arc<Host>, run: Arc<Run>, pipeline: Share<Pipeline>, prompt: String, params: Vec<StepParams>) {
    let context = Arc::new(RunContext::new(host, run, pipeline, prompt));
    let mut started = Vec::with_capacity(params.len());
    for (index, params) in params.into_iter().enumerate() {
        let step = &context.pipeline.steps[index];
        let span = tracing::info_span!("step", step = %step.id, plugin = %step.plugin.name());
        let task = run_step(Arc::clone(&context), index, params);
        started.push(start_here(AssertUnwindSafe(task.instrument(span)).catch_unwind()).await);
    }
    // The steps that went on in tasks of their own are awaited in place: each entry then holds
    // its step's outcome.
    for step in &mut started {
        if let Err(task) = step {
            *step = Ok(task.await.unwrap_or_else(|join_error| Err(Box::new(join_error.to_string()))));
        }
    }
    let run = &context.run;
    for (index, step) in started.into_iter().enumerate() {
        if let Ok(Err(panic)) = step {
            // A bug in the host, not the plugin: still end the step and the run properly.
            let message = format!("internal host error: the step panicked: {}", panic_message(&*panic));
            tracing::error!(step = index, "{message}");
            let _ = run.step_ended(index, StepStatus::Failed, None, Some((FailureKind::HostFailure, message)));
        }
    }
    finish(&context).await;
}

/// Polls `future` once on the calling task: its output if it is done, or else the task it
/// goes on in, where it moves as it is (boxed), with what it has done so far. The future is
/// boxed at once, so the caller's own future never holds it.
pub(crate) fn start_here<F>(future: F) -> impl Future<Output = Result<F::Output, JoinHandle<F::Output>>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut future = Box::pin(future);
    async move {
        match futures::poll!(future.as_mut()) {
            Poll::Ready(output) => Ok(output),
            Poll::Pending => Err(tokio::spawn(future)),
        }
    }
}

async fn run_step(context: Arc<RunContext>, index: usize, params: StepParams) {
    let RunContext { host, run, pipeline, prompt, .. } = &*context;
    let step = &pipeline.steps[index];
    let plugin = &step.plugin;
    let cancel = run.cancel_token();
    let mut ended = Ended { done: context.done(index), cancel, completed: false };
    let cancelled = |why: &str| {
        let _ = run.step_ended(index, StepStatus::Cancelled, None, Some((FailureKind::Cancelled, why.to_string())));
    };

    let mut inputs = HashMap::new();
    for &dep in &step.after {
        let mut rx = context.done(dep).expect("a step waited for has a channel").subscribe();
        let completed = tokio::select! {
            ended = rx.wait_for(Option::is_some) => ended.map(|v| *v == Some(true)).unwrap_or(false),
            () = cancel.cancelled() => false,
        };
        if !completed {
            cancelled(&format!("step '{}' did not complete", pipeline.steps[dep].id));
            return;
        }
        if let Some(output) = run.output(&pipeline.steps[dep].id) {
            inputs.insert(pipeline.steps[dep].id.clone(), output);
        }
    }
    // Admission is polled first, so a step admitted at once registers no waiter; a cancellation
    // that came meanwhile still stops the step before its plugin runs.
    let admitted = tokio::select! {
        biased;
        admitted = async {
            let turn = plugin.gate.enter(plugin.name()).await?;
            Ok((turn, host.runtime().instance_slot().await))
        } => Some(admitted),
        () = cancel.cancelled() => None,
    };
    let Some(admitted) = admitted.filter(|_| !cancel.is_cancelled()) else {
        cancelled("the run was cancelled before the step started");
        return;
    };
    let started = Instant::now();
    let outcome = match admitted {
        Err(refused) => Err(refused),
        Ok((_turn, _slot)) => {
            let text = step.prompt.render(prompt, |id| inputs.get(id).and_then(|o: &Arc<StepOutput>| o.text()));
            let request = StepRequest::new(plugin.world(), text, params);
            let state = StepState::new(Arc::clone(&context), index, step.max_cost);
            run.step_started(index);
            let invocation = invoke(plugin, host.runtime(), state, request, cancel, host.cancel_grace(), started).await;
            run.step_memory_peak(index, invocation.memory_peak);
            if invocation.log_dropped > 0 {
                tracing::warn!(
                    dropped_bytes = invocation.log_dropped,
                    "the plugin's log passed max_log_bytes ({}); the rest was dropped",
                    plugin.settings().max_log_bytes
                );
                host.metrics().log_dropped(&plugin.settings().name, invocation.log_dropped);
            }
            invocation.outcome
        }
    };
    // A completed step's output still needs room in the host's memory for runs.
    let outcome = outcome.and_then(|output| {
        run.step_ended(index, StepStatus::Completed, Some(output), None).map_err(|full| StepFailure::RunMemoryFull(full.limit_mb))
    });

    ended.completed = outcome.is_ok();
    let (status, failure) = match outcome {
        Ok(()) => (StepStatus::Completed, None),
        Err(failure) if cancel.is_cancelled() && !matches!(failure, StepFailure::Plugin(_) | StepFailure::Trap(_)) => {
            let _ = run.step_ended(index, StepStatus::Cancelled, None, Some((failure.kind(), failure.to_string())));
            (StepStatus::Cancelled, (failure != StepFailure::Cancelled).then(|| failure.kind()))
        }
        Err(failure) => {
            let message = format!("step '{}' (plugin {}) failed: {failure}", step.id, plugin.name());
            tracing::warn!(kind = %failure.kind(), "{message}");
            let _ = run.step_ended(index, StepStatus::Failed, None, Some((failure.kind(), message)));
            cancel.cancel();
            (StepStatus::Failed, Some(failure.kind()))
        }
    };
    host.metrics().step_ended(step.metrics(host.metrics()), status, started.elapsed(), failure);
}

/// Tells the steps waiting for this one how it ended, however it ends: returning, being
/// dropped, or panicking (which also cancels the run, since the step could not report).
struct Ended<'a> {
    /// None when no step waits for this one.
    done: Option<&'a Done>,
    cancel: &'a CancellationToken,
    completed: bool,
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.cancel.cancel();
        }
        if let Some(done) = self.done {
            done.send_replace(Some(self.completed));
        }
    }
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn Any + Send)) -> String {
    let text = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied());
    text.unwrap_or_default().to_string()
}

/// Settles or releases the hold (exactly once: the ledger makes a retry return the first
/// outcome) and ends the run. A ledger that fails, or panics, leaves the hold open for
/// recovery and the run failed; the run ends either way.
async fn finish(context: &RunContext) {
    let RunContext { host, run, pipeline, .. } = context;
    let metrics = pipeline.metrics(host.metrics());
    let (status, error) = run.outcome();
    let post = status == RunStatus::Completed || host.policy() == FailurePolicy::PostCharged;
    let closed = AssertUnwindSafe(close_hold(host, run.id(), post))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(LedgerError::Backend(format!("the ledger panicked: {}", panic_message(&*panic)))));
    match closed {
        Ok(settlement) => {
            host.metrics().run_ended(metrics, status, settlement.posted, settlement.released);
            run.finish(status, settlement.posted, error);
        }
        Err(e) => {
            let message = format!("settling the run's credits failed: {e}; the hold stays open for recovery");
            tracing::error!("{message}");
            host.metrics().run_ended(metrics, RunStatus::Failed, 0, 0);
            run.finish(RunStatus::Failed, 0, Some(error.map_or(message.clone(), |err| format!("{err}; {message}"))));
        }
    }
    host.runs().ended(run);
    host.run_ended();
    tracing::info!(status = %run.status(), "run ended");
}

/// How long closing a hold is retried after it first fails for the ledger's backend (a database
/// restarting), before the hold is left to recovery.
const CLOSE_HOLD_PATIENCE: Duration = Duration::from_secs(30);

async fn close_hold(host: &Host, hold: &str, post: bool) -> Result<Settlement, LedgerError> {
    // The clock is read only once an attempt failed: a hold that closes at once costs no read.
    let mut give_up = None;
    let mut delay = Duration::from_millis(10);
    let mut attempt = 1;
    loop {
        let result = if post { host.ledger().settle(hold).await } else { host.ledger().release(hold).await };
        match result {
            Err(LedgerError::Backend(e)) => {
                let now = tokio::time::Instant::now();
                if now + delay >= *give_up.get_or_insert(now + CLOSE_HOLD_PATIENCE) {
                    return Err(LedgerError::Backend(e));
                }
                tracing::warn!(attempt, "closing hold failed, retrying: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 4).min(Duration::from_secs(2));
                attempt += 1;
            }
            other => return other,
        }
    }
}

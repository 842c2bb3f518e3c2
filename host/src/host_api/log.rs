//! `log`: plugin messages go into the host's tracing, inside the step's span and tagged with
//! the plugin, run and step. A step writes at most `max_log_bytes`; the rest is dropped and
//! counted (the executor reports the count when the step ends).

use crate::runtime::StepState;
use crate::runtime::bindings::log::{Host, Level};

impl Host for StepState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.limits.host_call()?;
        let message = super::truncate(message);
        if !self.limits.log(message.len()) {
            return Ok(());
        }
        let message = self.plugin().redact(message);
        let (plugin, run, step) = (&self.plugin().name, self.run().id(), self.step_id());
        macro_rules! event {
            ($level:expr) => {
                tracing::event!(target: "genpipe::plugin", $level, plugin = %plugin, run = %run, step = %step, "{message}")
            };
        }
        match level {
            Level::Trace => event!(tracing::Level::TRACE),
            Level::Debug => event!(tracing::Level::DEBUG),
            Level::Info => event!(tracing::Level::INFO),
            Level::Warn => event!(tracing::Level::WARN),
            Level::Error => event!(tracing::Level::ERROR),
        }
        Ok(())
    }
}

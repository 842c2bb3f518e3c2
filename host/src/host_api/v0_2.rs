//! The host interfaces of `genpipe:plugin@0.2.0`: those 0.2.0 shares with 0.1.0 delegate to the
//! 0.1.0 implementations (their types convert one to one); `log.log-fields` is 0.2.0's own.

use crate::runtime::StepState;
use crate::runtime::bindings::v0_2::{config, credits, log, output, status, types};
use crate::runtime::bindings::{config as config1, credits as credits1, log as log1, output as output1, status as status1};

impl types::Host for StepState {}

impl status::Host for StepState {
    fn report(&mut self, stage: status::Stage, progress: f32, message: String) -> wasmtime::Result<()> {
        let stage = match stage {
            status::Stage::Preparing => status1::Stage::Preparing,
            status::Stage::Generating => status1::Stage::Generating,
            status::Stage::Finishing => status1::Stage::Finishing,
        };
        status1::Host::report(self, stage, progress, message)
    }

    fn cancelled(&mut self) -> wasmtime::Result<bool> {
        status1::Host::cancelled(self)
    }
}

impl credits::Host for StepState {
    async fn charge(&mut self, amount: u64, reason: String) -> wasmtime::Result<Result<u64, credits::ChargeError>> {
        Ok(credits1::Host::charge(self, amount, reason).await?.map_err(|error| match error {
            credits1::ChargeError::Insufficient(remaining) => credits::ChargeError::Insufficient(remaining),
            credits1::ChargeError::InvalidAmount => credits::ChargeError::InvalidAmount,
            credits1::ChargeError::RunEnded => credits::ChargeError::RunEnded,
        }))
    }

    fn remaining(&mut self) -> wasmtime::Result<u64> {
        credits1::Host::remaining(self)
    }
}

impl output::Host for StepState {
    fn emit(&mut self, chunk: String) -> wasmtime::Result<()> {
        output1::Host::emit(self, chunk)
    }
}

fn level(level: log::Level) -> log1::Level {
    match level {
        log::Level::Trace => log1::Level::Trace,
        log::Level::Debug => log1::Level::Debug,
        log::Level::Info => log1::Level::Info,
        log::Level::Warn => log1::Level::Warn,
        log::Level::Error => log1::Level::Error,
    }
}

impl log::Host for StepState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        log1::Host::log(self, self::level(level), message)
    }

    fn log_fields(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) -> wasmtime::Result<()> {
        let fields: Vec<String> = fields.iter().map(|(key, value)| format!("{key}={value:?}")).collect();
        log1::Host::log(self, self::level(level), format!("{message} {}", fields.join(" ")))
    }
}

impl config::Host for StepState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        config1::Host::get(self, key)
    }

    fn all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        config1::Host::all(self)
    }
}

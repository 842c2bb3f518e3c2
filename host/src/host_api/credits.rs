//! `credits`: the step charges against the run's hold, within its own `max_cost`.
//!
//! A charge is checked against the step's budget here, then applied by the ledger against the
//! hold, atomically; its op id (`STEP#N`) is unique in the run, so a ledger retry is recognised.
//! A ledger failure traps the plugin, failing the step with the cause: the plugin is never told
//! a charge succeeded when it did not.

use crate::runtime::bindings::credits::{ChargeError, Host};
use crate::runtime::{StepFailure, StepState};
use crate::state::ledger::{LedgerError, charge_id};

impl Host for StepState {
    async fn charge(&mut self, amount: u64, reason: String) -> wasmtime::Result<Result<u64, ChargeError>> {
        self.limits.host_call()?;
        if amount == 0 {
            return Ok(Err(ChargeError::InvalidAmount));
        }
        if self.run().cancel_token().is_cancelled() {
            return Ok(Err(ChargeError::RunEnded));
        }
        if amount > self.budget {
            return Ok(Err(ChargeError::Insufficient(self.budget)));
        }
        self.charges += 1;
        let op_id = charge_id(self.step_id(), self.charges);
        let reason = super::truncate(reason);
        match self.ledger().charge(self.run().id(), &op_id, amount, &reason).await {
            Ok(_) => {
                self.budget -= amount;
                self.run().step_charged(self.step_index, amount);
                Ok(Ok(self.budget))
            }
            // Another step of the run spent the rest of the hold.
            Err(LedgerError::ExceedsHold { remaining, .. }) => Ok(Err(ChargeError::Insufficient(remaining.min(self.budget)))),
            Err(LedgerError::HoldClosed(_)) => Ok(Err(ChargeError::RunEnded)),
            Err(error) => Err(self.limits.fail(StepFailure::Host(format!("charging {amount} credits failed: {error}")))),
        }
    }

    fn remaining(&mut self) -> wasmtime::Result<u64> {
        Ok(self.budget)
    }
}

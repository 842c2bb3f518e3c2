//! Shared state the host owns: the run store and the credit ledger.

pub mod ledger;
pub mod runs;

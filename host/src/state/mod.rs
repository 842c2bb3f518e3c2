//! Shared state the host owns: the run store, the credit ledger, and the runs replicas share.

pub mod ledger;
pub mod runs;
pub mod shared;

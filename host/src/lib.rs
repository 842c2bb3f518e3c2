//! genpipe runs AI generation pipelines made of WebAssembly component plugins.
//!
//! Start at [`Host`]: it loads a [`Config`] (genpipe.toml) into a wasm [`runtime`], and
//! [`Host::start_run`] admits a run, reserves its credits in the [`state::ledger`], runs its
//! steps concurrently ([`pipeline`]) and keeps its status in the [`state::runs`] store. Plugins
//! reach status and credits only through the host functions of [`host_api`].

pub mod builtin;
pub mod cli;
pub mod config;
mod host;
mod host_api;
pub mod metrics;
pub mod pipeline;
mod reload;
pub mod runtime;
pub mod server;
pub mod state;

pub use config::Config;
pub use host::{Host, HostError, RunInput, StartError};
pub use reload::{ReloadError, ReloadReport};

/// Every genpipe binary (the CLI, tests, benchmarks) allocates with mimalloc: a run allocates
/// and frees many small objects across tokio's threads, where glibc's allocator spends its time
/// consolidating free lists.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed memory before it gives it back to the system, in milliseconds.
/// With its default (10 ms), memory that runs free is given back between two bursts of runs and
/// taken again by the next, a page fault per page or the zeroing of a transparent huge page.
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 1000;
/// `mi_option_purge_delay` in mimalloc.h (v2), which libmimalloc-sys does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = libmimalloc_sys::mi_option_eager_commit_delay + 1;

/// Sets the allocator's purge delay to [`ALLOCATOR_PURGE_DELAY_MS`]; every runtime calls it.
pub(crate) fn tune_allocator() {
    // SAFETY: sets one of mimalloc's options, a plain integer it reads each time it purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
}

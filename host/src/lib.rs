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
mod per_thread;
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
/// consolidating free lists. mimalloc is built without asking for transparent huge pages
/// (`no_thp`): the heap grows a few kilobytes at a time, and a huge-page fault stalls the worker
/// that takes it while the kernel finds and zeroes 2 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

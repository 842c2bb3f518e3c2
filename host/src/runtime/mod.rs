//! The wasm runtime: one wasmtime `Engine` for the process, plugin loading and step invocation.
//!
//! - The engine uses the pooling allocator, sized by `runtime.max_concurrent_steps`, with
//!   copy-on-write memory images, and epoch interruption driven by one ticker thread. Where the
//!   kernel can scan page maps (Linux 6.7+), a finished instance's dirty pages are reset in place
//!   rather than unmapped, which saves the next instance its page faults and every core a TLB flush.
//! - A plugin is compiled once (identical bytes, by SHA-256, are compiled once per runtime, and
//!   once per machine through the on-disk compile cache) and linked into an `InstancePre` at
//!   load; each step then gets a fresh `Store` and instance from it.
//! - Every running plugin yields to tokio at each epoch tick, so a plugin that never returns
//!   still lets the host time it out or stop it.

pub mod bindings;
mod cache;
mod digest;
mod failure;
mod gate;
pub(crate) mod invoke;
pub(crate) mod limits;
mod permits;
pub mod plugin;
pub(crate) mod step;

use std::time::Duration;

use dashmap::DashMap;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config as EngineConfig, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use cache::{CacheStats, Origin};
pub use digest::Digest;
pub use failure::{FailureKind, Incident, StepFailure};
pub use invoke::StepRequest;
pub use permits::Permit;
pub use plugin::{Plugin, PluginError, PluginSettings, typed_as};
pub use step::StepState;

use crate::config::{MAX_MEMORY_MB, RuntimeConfig};
use cache::CompileCache;
use permits::Permits;

/// How often the epoch advances: the granularity of timeouts, stops and cooperative yields.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The engine, the linker of host functions and the compiled-component cache.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StepState>,
    /// Components compiled or loaded so far, by digest: a plugin whose wasm did not change is
    /// never compiled twice by one process.
    compiled: DashMap<Digest, Component>,
    cache: CompileCache,
    /// One permit per instance slot of the pool: a step holds one while its plugin is alive, so
    /// instantiation never fails for want of a slot, however many hosts share the runtime.
    instance_slots: Permits,
    /// Whether the engine meters fuel (some plugin declares `fuel`).
    fuel: bool,
    /// One thread for compiles that must not take every core from the runs being served.
    background: rayon::ThreadPool,
}

impl Runtime {
    /// Creates the engine, the host-function linker and the epoch ticker.
    pub fn new(config: &RuntimeConfig) -> anyhow::Result<Runtime> {
        let n = config.max_concurrent_steps;
        // Kernels before Linux 6.7 lack the page-map scan: there, keeping memory resident would
        // mean a `memset` of the whole resident size after every step.
        let fuel = config.fuel;
        let engine = Engine::new(&engine_config(n, fuel, true)).or_else(|_| Engine::new(&engine_config(n, fuel, false)))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        bindings::add_genpipe_to_linker(&mut linker)?;
        bindings::v0_2::add_genpipe_to_linker(&mut linker)?;
        start_epoch_ticker(&engine);
        let cache = CompileCache::new(config.compile_cache_dir.clone(), &engine);
        Ok(Runtime {
            engine,
            linker,
            compiled: DashMap::new(),
            cache,
            background: rayon::ThreadPoolBuilder::new().num_threads(1).thread_name(|_| "genpipe-compile".into()).build()?,
            instance_slots: Permits::new(config.max_concurrent_steps as usize),
            fuel,
        })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether the engine meters fuel: every store then gets its plugin's `fuel`, or no limit.
    pub fn meters_fuel(&self) -> bool {
        self.fuel
    }

    /// The linker with WASI and genpipe's host interfaces.
    pub fn linker(&self) -> &Linker<StepState> {
        &self.linker
    }

    /// Waits for a free instance slot; the slot is free again when the permit is dropped.
    pub async fn instance_slot(&self) -> Permit<'_> {
        self.instance_slots.acquire().await
    }

    /// The component of `bytes` (whose digest is `digest`): one this runtime already has, one
    /// from the compile cache, or a fresh compile.
    pub fn component(&self, digest: &Digest, bytes: &[u8]) -> wasmtime::Result<(Component, Origin)> {
        if let Some(component) = self.compiled.get(digest) {
            return Ok((component.clone(), Origin::Reused));
        }
        let (component, origin) = self.cache.component(&self.engine, digest, bytes)?;
        self.compiled.insert(*digest, component.clone());
        Ok((component, origin))
    }

    /// Runs `work` with the engine's compiles on one core: a reload compiles that way, so that
    /// the other cores keep serving runs (at startup, compiles use every core).
    pub fn in_background<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        self.background.install(work)
    }

    /// Compiles `bytes`, or returns the component compiled earlier from the same bytes.
    pub fn compile(&self, bytes: &[u8]) -> wasmtime::Result<Component> {
        Ok(self.component(&Digest::of(bytes), bytes)?.0)
    }

    /// What the compile cache did so far.
    pub fn cache_stats(&self) -> &CacheStats {
        self.cache.stats()
    }
}

/// Most memory of a linear memory kept resident (its dirty pages reset with `memset`) when its
/// instance ends.
const MEMORY_KEEP_RESIDENT: usize = 1 << 20;
/// Most memory of a table kept resident when its instance ends.
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// The engine's configuration. With `pagemap_scan` (Linux 6.7 and later), an instance's dirty
/// pages are found by a page-map scan and reset in place, so the slot's next instance takes no
/// page faults, and no `madvise` makes every core flush its TLB; the setting fails the engine
/// where the kernel cannot scan.
fn engine_config(max_concurrent_steps: u32, fuel: bool, pagemap_scan: bool) -> EngineConfig {
    let n = max_concurrent_steps;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        .total_stacks(n)
        // A Rust wasip2 component holds a few core instances, memories and tables (main module,
        // WASI adapter, shims); leave room for other toolchains' components too.
        .total_core_instances(n.saturating_mul(8))
        .total_memories(n.saturating_mul(2))
        .total_tables(n.saturating_mul(4))
        .max_memories_per_component(4)
        .max_memory_size(MAX_MEMORY_MB as usize * 1024 * 1024);
    if pagemap_scan {
        pool.pagemap_scan(Enabled::Yes)
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
            .table_keep_resident(TABLE_KEEP_RESIDENT);
    }
    let mut config = EngineConfig::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .consume_fuel(fuel)
        .memory_init_cow(true)
        // Plugins' worlds export synchronous functions: without the component model's
        // concurrency machinery, a call is a plain call on a fiber, with no task bookkeeping
        // and no wake-up of the calling task.
        .concurrency_support(false);
    config
}

/// Turns off backtraces for library errors (`RUST_LIB_BACKTRACE=0`) unless the environment sets
/// them: genpipe reports errors as messages, and an exported `RUST_BACKTRACE=1` would otherwise
/// make wasmtime capture a backtrace each time a step's store is dropped, a cost on every step.
/// Panics still print theirs.
///
/// # Safety
///
/// Changes the environment: call it before the process starts any other thread.
pub unsafe fn skip_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the caller guarantees no other thread reads the environment meanwhile.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("genpipe-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch ticker thread");
}

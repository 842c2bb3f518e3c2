//! The data of one step's wasmtime `Store`: who is calling (run, step, account, hold), its
//! budget, its limits and its WASI context. Host functions read identity from here and never
//! from arguments, so a plugin cannot name another run, account or plugin.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::runtime::plugin::PluginSettings;
use crate::state::ledger::Ledger;
use crate::state::runs::Run;

/// How much of a plugin's stderr is kept to explain a trap.
const STDERR_CAPACITY: usize = 8 * 1024;
/// How many of its last stderr lines a trap's error quotes.
const STDERR_TAIL_LINES: usize = 3;

/// Store data of one step's plugin instance.
pub struct StepState {
    pub(crate) run: Arc<Run>,
    pub(crate) step_index: usize,
    pub(crate) step_id: Arc<str>,
    pub(crate) plugin: Arc<PluginSettings>,
    pub(crate) ledger: Arc<dyn Ledger>,
    /// Credits this step may still charge (its `max_cost` minus its charges).
    pub(crate) budget: u64,
    /// Charges made so far, numbering their op ids.
    pub(crate) charges: u64,
    /// Why the host trapped the plugin from a host function, if it did.
    pub(crate) host_failure: Option<String>,
    pub(crate) limits: MemoryLimit,
    stderr: MemoryOutputPipe,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl StepState {
    /// State for step `step_index` of `run`, which may charge up to `budget` credits.
    pub fn new(
        run: Arc<Run>,
        step_index: usize,
        step_id: Arc<str>,
        plugin: Arc<PluginSettings>,
        ledger: Arc<dyn Ledger>,
        budget: u64,
    ) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtx::builder().stderr(stderr.clone()).build();
        let limits = MemoryLimit { max_bytes: plugin.memory_bytes, denied: None };
        StepState {
            run,
            step_index,
            step_id,
            plugin,
            ledger,
            budget,
            charges: 0,
            host_failure: None,
            limits,
            stderr,
            wasi,
            table: ResourceTable::new(),
        }
    }

    /// The end of what the plugin wrote to stderr (a Rust panic message, typically), on one
    /// line, without the backtrace hint.
    pub fn stderr_tail(&self) -> Option<String> {
        let bytes = self.stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE")).collect();
        let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join(" / ");
        (!tail.is_empty()).then(|| tail.chars().take(500).collect())
    }
}

impl WasiView for StepState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Enforces a plugin's `memory_mb` and remembers a refused growth, so the step's error can say
/// the plugin ran out of memory rather than just that it trapped.
#[derive(Debug)]
pub struct MemoryLimit {
    max_bytes: usize,
    /// The size a refused `memory.grow` asked for.
    pub(crate) denied: Option<usize>,
}

/// Most table elements a plugin may have.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.denied = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

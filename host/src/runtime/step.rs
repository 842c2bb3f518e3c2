//! The data of one step's wasmtime `Store`: who is calling (run, step, account, hold), its
//! budget, its limits and its WASI and HTTP contexts. Host functions read identity from here and never
//! from arguments, so a plugin cannot name another run, account or plugin.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::pipeline::RunContext;
use crate::runtime::limits::StepLimits;
use crate::runtime::plugin::PluginSettings;
use crate::state::ledger::Ledger;
use crate::state::runs::Run;

/// How much of a plugin's stderr is kept to explain a trap.
const STDERR_CAPACITY: usize = 8 * 1024;
/// How many of its last stderr lines a trap's error quotes.
const STDERR_TAIL_LINES: usize = 3;

/// Store data of one step's plugin instance.
pub struct StepState {
    /// The step's run, and what its steps share.
    context: Arc<RunContext>,
    pub(crate) step_index: usize,
    /// Credits this step may still charge (its `max_cost` minus its charges).
    pub(crate) budget: u64,
    /// Charges made so far, numbering their op ids.
    pub(crate) charges: u64,
    pub(crate) limits: StepLimits,
    /// Made at the plugin's first WASI call: a plugin that makes none costs no WASI context.
    wasi: Option<Wasi>,
    http: WasiHttpCtx,
    table: ResourceTable,
}

/// A step's WASI context (two seeded random generators, clocks, stdio) and the stderr the
/// plugin writes to.
struct Wasi {
    ctx: WasiCtx,
    stderr: MemoryOutputPipe,
}

impl Wasi {
    /// No environment, no files and no sockets (the WASI defaults); stderr kept in memory.
    fn new() -> Wasi {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        Wasi { ctx: WasiCtx::builder().stderr(stderr.clone()).build(), stderr }
    }
}

impl StepState {
    /// State for step `step_index` of the run of `context`, which may charge up to `budget`
    /// credits. The plugin gets no environment, no files and no sockets (the WASI defaults), and
    /// outbound HTTP through its policy only.
    pub(crate) fn new(context: Arc<RunContext>, step_index: usize, budget: u64) -> Self {
        StepState {
            limits: StepLimits::new(Arc::clone(&context), step_index),
            context,
            step_index,
            budget,
            charges: 0,
            wasi: None,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
        }
    }

    /// The step's run.
    pub(crate) fn run(&self) -> &Run {
        &self.context.run
    }

    /// The ledger.
    pub(crate) fn ledger(&self) -> &dyn Ledger {
        self.context.ledger()
    }

    /// The step's plugin's settings.
    pub(crate) fn plugin(&self) -> &PluginSettings {
        self.context.plugin(self.step_index)
    }

    /// The step's id.
    pub(crate) fn step_id(&self) -> &str {
        self.context.run.step_id(self.step_index)
    }

    /// The end of what the plugin wrote to stderr (a Rust panic message, typically), on one
    /// line, without the backtrace hint.
    pub fn stderr_tail(&self) -> Option<String> {
        let bytes = self.wasi.as_ref()?.stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> =
            text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE")).collect();
        let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join(" / ");
        (!tail.is_empty()).then(|| self.plugin().redact(tail.chars().take(500).collect()))
    }
}

impl WasiView for StepState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let Wasi { ctx, .. } = self.wasi.get_or_insert_with(Wasi::new);
        WasiCtxView { ctx, table: &mut self.table }
    }
}

impl WasiHttpView for StepState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.limits }
    }
}

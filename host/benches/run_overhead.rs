//! What a genpipe run costs on top of wasm's own cost.
//!
//! One pipeline of two no-op plugins (test-llm echoing, test-image returning a 1x1 PNG), and in
//! the same process, on the same engine:
//! - (a) plain wasmtime: a store, an instance of each plugin from its `InstancePre`, one
//!   `generate` call each, the two side by side as in a run, nothing else;
//! - (b) genpipe's bookkeeping alone, native: run entry, hold, status events, a charge, settle;
//! - (c) a whole genpipe run: admission, hold, store, step tasks, instances, events, settlement.
//!
//! Prints microseconds per run at concurrency 1, runs per second at concurrency 64, and the
//! ratio (c)/(a). `GENPIPE_BENCH_QUICK=1` runs few iterations (CI keeps it building and working).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use genpipe::runtime::Runtime;
use genpipe::runtime::bindings::image::{ImageRequest, ImageStepPre};
use genpipe::runtime::bindings::llm::{LlmRequest, LlmStepPre};
use genpipe::state::ledger::{Ledger, MemoryLedger};
use genpipe::state::runs::{RunStatus, RunStore, Stage, StepOutput, StepStatus};
use genpipe::{Config, Host, RunInput};
use wasmtime::Store;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

const CONFIG: &str = r#"
[runtime]
max_concurrent_steps = 256

[[accounts]]
id = "bench"
credits = 1000000000000

[plugins.noop-llm]
path = "builtin:test-llm"
world = "llm-step"

[plugins.noop-image]
path = "builtin:test-image"
world = "image-step"

[pipelines.noop]
[[pipelines.noop.steps]]
id = "text"
plugin = "noop-llm"
max_cost = 10

[[pipelines.noop.steps]]
id = "image"
plugin = "noop-image"
max_cost = 10
params = { width = 1, height = 1 }
"#;

const CONCURRENCY: usize = 64;

/// Store data of the plain-wasmtime baseline: WASI and `wasi:http`, as genpipe links them,
/// and nothing else.
struct Plain {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
}

impl WasiView for Plain {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for Plain {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: Default::default() }
    }
}

struct Baseline {
    engine: wasmtime::Engine,
    llm: LlmStepPre<Plain>,
    image: ImageStepPre<Plain>,
}

impl Baseline {
    fn new(runtime: &Runtime) -> Baseline {
        let engine = runtime.engine().clone();
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).unwrap();
        let pre = |name: &str| {
            let component = runtime.compile(genpipe::builtin::plugin(name).unwrap()).unwrap();
            let mut linker = linker.clone();
            linker.define_unknown_imports_as_traps(&component).unwrap();
            linker.instantiate_pre(&component).unwrap()
        };
        Baseline { llm: LlmStepPre::new(pre("test-llm")).unwrap(), image: ImageStepPre::new(pre("test-image")).unwrap(), engine }
    }

    fn store(&self) -> Store<Plain> {
        let mut store = Store::new(
            &self.engine,
            Plain { wasi: WasiCtx::builder().build(), http: WasiHttpCtx::new(), table: ResourceTable::new() },
        );
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        store
    }

    async fn llm(&self) {
        let mut store = self.store();
        let instance = self.llm.instantiate_async(&mut store).await.unwrap();
        let request = LlmRequest { prompt: String::new(), max_tokens: 1, temperature: 1.0, seed: 0, params: Vec::new() };
        instance.call_generate(&mut store, &request).await.unwrap().unwrap();
    }

    async fn image(&self) {
        let mut store = self.store();
        let instance = self.image.instantiate_async(&mut store).await.unwrap();
        let request = ImageRequest { prompt: String::new(), width: 1, height: 1, seed: 0, params: Vec::new() };
        instance.call_generate(&mut store, &request).await.unwrap().unwrap();
    }

    /// Mean (instantiate, call) time of each plugin, in sequence: where wasm's own cost goes.
    async fn breakdown(&self, n: u32) -> [(Duration, Duration); 2] {
        let llm_request = LlmRequest { prompt: String::new(), max_tokens: 1, temperature: 1.0, seed: 0, params: Vec::new() };
        let image_request = ImageRequest { prompt: String::new(), width: 1, height: 1, seed: 0, params: Vec::new() };
        let (mut llm, mut image) = ((Duration::ZERO, Duration::ZERO), (Duration::ZERO, Duration::ZERO));
        for _ in 0..n {
            let start = Instant::now();
            let mut store = self.store();
            let instance = self.llm.instantiate_async(&mut store).await.unwrap();
            let instantiated = Instant::now();
            instance.call_generate(&mut store, &llm_request).await.unwrap().unwrap();
            llm.0 += instantiated - start;
            llm.1 += instantiated.elapsed();

            let start = Instant::now();
            let mut store = self.store();
            let instance = self.image.instantiate_async(&mut store).await.unwrap();
            let instantiated = Instant::now();
            instance.call_generate(&mut store, &image_request).await.unwrap().unwrap();
            image.0 += instantiated - start;
            image.1 += instantiated.elapsed();
        }
        [(llm.0 / n, llm.1 / n), (image.0 / n, image.1 / n)]
    }

    /// Both plugins side by side, as a run's two steps.
    async fn run(self: &Arc<Self>) {
        let image = tokio::spawn({
            let this = Arc::clone(self);
            async move { this.image().await }
        });
        self.llm().await;
        image.await.unwrap();
    }
}

/// genpipe's bookkeeping for one two-step run, without wasm.
async fn bookkeeping(runs: &RunStore, ledger: &MemoryLedger, n: u64) {
    let id = format!("native-{n}");
    let steps = [("text".to_string(), "noop-llm".to_string()), ("image".to_string(), "noop-image".to_string())];
    let run = runs.create(id.clone(), "noop".into(), "bench".into(), 20, &steps);
    ledger.reserve(&id, "bench", 20, Duration::from_secs(3600)).await.unwrap();
    for index in 0..2 {
        run.step_started(index);
        run.step_progress(index, Stage::Generating, 0.5, String::new()).unwrap();
        ledger.charge(&id, &format!("{index}#1"), 1, "unit").await.unwrap();
        run.step_charged(index, 1);
        let output = StepOutput::Text { text: String::new(), prompt_tokens: 0, completion_tokens: 0 };
        run.step_ended(index, StepStatus::Completed, Some(output), None).unwrap();
    }
    let settlement = ledger.settle(&id).await.unwrap();
    run.finish(RunStatus::Completed, settlement.posted, None);
    runs.ended(&run);
}

async fn genpipe_run(host: &Arc<Host>) {
    let run = host.start_run("bench", "noop", RunInput::default()).await.unwrap();
    assert_eq!(run.wait().await.status, RunStatus::Completed);
}

/// Mean time per call of `f` run `n` times in sequence, after a warm-up.
async fn sequential<F: AsyncFnMut(u64)>(n: u64, mut f: F) -> Duration {
    for i in 0..n / 10 + 1 {
        f(u64::MAX - i).await;
    }
    let start = Instant::now();
    for i in 0..n {
        f(i).await;
    }
    start.elapsed() / n as u32
}

/// Calls per second of `f` with `CONCURRENCY` tasks sharing `n` calls.
async fn concurrent<F, Fut>(n: u64, f: F) -> f64
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY as u64)
        .map(|t| {
            let f = Arc::clone(&f);
            tokio::spawn(async move {
                let mut i = t;
                while i < n {
                    f(i).await;
                    i += CONCURRENCY as u64;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // SAFETY: no other thread exists yet. (As `genpipe` itself does.)
    unsafe { genpipe::runtime::skip_library_backtraces() };
    let quick = std::env::var_os("GENPIPE_BENCH_QUICK").is_some();
    let (seq_n, conc_n) = if quick { (200, 1_000) } else { (5_000, 50_000) };
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    tokio.block_on(async {
        let config = Config::parse(CONFIG, "bench.toml", Path::new(".")).unwrap();
        let runtime = Arc::new(Runtime::new(&config.runtime).unwrap());
        let host = Host::with_runtime(Arc::clone(&runtime), &config, Arc::new(MemoryLedger::new())).await.unwrap();
        let baseline = Arc::new(Baseline::new(&runtime));
        let runs = Arc::new(RunStore::new(1024, 1 << 30));
        let ledger = Arc::new(MemoryLedger::new());
        ledger.grant("g", "bench", u64::MAX / 2).await.unwrap();

        let a1 = sequential(seq_n, async |_| baseline.run().await).await;
        let b1 = sequential(seq_n, async |i| bookkeeping(&runs, &ledger, i).await).await;
        let c1 = sequential(seq_n, async |_| genpipe_run(&host).await).await;

        let b = Arc::clone(&baseline);
        let a64 = concurrent(conc_n, move |_| {
            let b = Arc::clone(&b);
            async move { b.run().await }
        })
        .await;
        let (r, l) = (Arc::clone(&runs), Arc::clone(&ledger));
        let b64 = concurrent(conc_n, move |i| {
            let (r, l) = (Arc::clone(&r), Arc::clone(&l));
            async move { bookkeeping(&r, &l, i + (1 << 40)).await }
        })
        .await;
        let h = Arc::clone(&host);
        let c64 = concurrent(conc_n, move |_| {
            let h = Arc::clone(&h);
            async move { genpipe_run(&h).await }
        })
        .await;

        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!("run overhead: two-step no-op pipeline ({seq_n} sequential runs, {conc_n} at concurrency {CONCURRENCY})");
        println!("{:<38} {:>14} {:>16}", "", "us/run (c=1)", "runs/s (c=64)");
        println!("{:<38} {:>14.1} {:>16.0}", "(a) plain wasmtime, same engine", us(a1), a64);
        println!("{:<38} {:>14.1} {:>16.0}", "(b) native bookkeeping, no wasm", us(b1), b64);
        println!("{:<38} {:>14.1} {:>16.0}", "(c) genpipe run", us(c1), c64);
        let [llm, image] = baseline.breakdown(seq_n as u32).await;
        println!("where (a) goes, per plugin in sequence: test-llm instantiate {:.1} us + call {:.1} us; test-image instantiate {:.1} us + call {:.1} us", us(llm.0), us(llm.1), us(image.0), us(image.1));
        println!("ratio (c)/(a): {:.2}x latency at c=1, {:.2}x throughput cost at c=64 (target <= 1.25x)", us(c1) / us(a1), a64 / c64);
    });
}

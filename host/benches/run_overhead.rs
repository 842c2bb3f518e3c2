//! What a genpipe run costs on top of wasm's own cost, and what its isolation costs.
//!
//! One pipeline of two no-op plugins (test-llm echoing, test-image returning a 1x1 PNG), and in
//! the same process:
//! - (a) plain wasmtime: a store, an instance of each plugin from its `InstancePre`, one
//!   `generate` call each, the two side by side as in a run, with the same limits as genpipe's
//!   (the engine's fuel metering, epoch interruption, a memory limiter), nothing else;
//! - (b) genpipe's bookkeeping alone, native: run entry, hold, status events, a charge, settle;
//! - (c) a whole genpipe run with every limit on (fuel metered, the default limits,
//!   `allowed_hosts` set): admission, hold, store, step tasks, instances, events, settlement;
//! - (d) the same genpipe run with every limit off: no fuel metering, every limit at its most.
//!
//! Prints microseconds per run at concurrency 1, runs per second at concurrency 64, the ratio
//! (c)/(a) and the cost of isolation (c)/(d). `GENPIPE_BENCH_QUICK=1` runs few iterations (CI
//! keeps it building and working); `GENPIPE_BENCH_PROFILE=1` runs only (c) at concurrency 64
//! and `=baseline-concurrent` and `=bookkeeping-concurrent` only (a) and (b),
//! `GENPIPE_BENCH_PROFILE=sequential`, `=baseline` and
//! `=bookkeeping` only (c), (a) and (b) one run at a time, for a profiler, and `=inline` (a)
//! with its two plugins one after the other on one task, as a genpipe run whose steps end within
//! their first poll runs them.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use genpipe::runtime::Runtime;
use genpipe::runtime::bindings::image::{ImageRequest, ImageStepPre};
use genpipe::runtime::bindings::llm::{LlmRequest, LlmStepPre};
use genpipe::state::ledger::{Ledger, MemoryLedger};
use genpipe::state::runs::{RunStatus, RunStore, Stage, StepOutput, StepPlan, StepStatus};
use genpipe::{Config, Host, RunInput};
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// The pipeline; `{limits}` is replaced by each plugin's limits.
const CONFIG: &str = r#"
[server]
max_kept_runs = 1024  # a steady state within the benchmark's runs, as a server reaches one

[runtime]
max_concurrent_steps = 256

[[accounts]]
id = "bench"
credits = 1000000000000

[plugins.noop-llm]
path = "builtin:test-llm"
world = "llm-step"
{limits}

[plugins.noop-image]
path = "builtin:test-image"
world = "image-step"
{limits}

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

/// Every limit on: fuel metered, the defaults, an allowlist.
const LIMITS_ON: &str = r#"fuel = 1000000000
allowed_hosts = ["api.example.com"]"#;

/// Every limit off (at its most).
const LIMITS_OFF: &str = r#"memory_mb = 4096
timeout_ms = 3600000
max_output_bytes = 18446744073709551615
max_host_calls = 4294967295
max_log_bytes = 18446744073709551615
max_concurrency = 256
max_queued = 4294967295"#;

const CONCURRENCY: usize = 64;

/// Store data of the plain-wasmtime baseline: WASI and `wasi:http`, as genpipe links them,
/// and nothing else.
struct Plain {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    memory: MemoryLimit,
}

/// The genpipe imports of the baseline's plugins: the no-op plugins never call them.
mod unused_imports {
    use genpipe::runtime::bindings::{config, credits, log, output, status, types};

    use super::Plain;

    impl types::Host for Plain {}

    impl status::Host for Plain {
        fn report(&mut self, _: status::Stage, _: f32, _: String) -> wasmtime::Result<()> {
            wasmtime::bail!("unused")
        }
        fn cancelled(&mut self) -> wasmtime::Result<bool> {
            wasmtime::bail!("unused")
        }
    }

    impl credits::Host for Plain {
        async fn charge(&mut self, _: u64, _: String) -> wasmtime::Result<Result<u64, credits::ChargeError>> {
            wasmtime::bail!("unused")
        }
        fn remaining(&mut self) -> wasmtime::Result<u64> {
            wasmtime::bail!("unused")
        }
    }

    impl output::Host for Plain {
        fn emit(&mut self, _: String) -> wasmtime::Result<()> {
            wasmtime::bail!("unused")
        }
    }

    impl log::Host for Plain {
        fn log(&mut self, _: log::Level, _: String) -> wasmtime::Result<()> {
            wasmtime::bail!("unused")
        }
    }

    impl config::Host for Plain {
        fn get(&mut self, _: String) -> wasmtime::Result<Option<String>> {
            wasmtime::bail!("unused")
        }
        fn all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
            wasmtime::bail!("unused")
        }
    }
}

/// The baseline's memory limit: genpipe's default `memory_mb`.
struct MemoryLimit;

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 64 << 20)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
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
    fuel: bool,
    llm: LlmStepPre<Plain>,
    image: ImageStepPre<Plain>,
}

impl Baseline {
    fn new(runtime: &Runtime) -> Baseline {
        let engine = runtime.engine().clone();
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).unwrap();
        genpipe::runtime::bindings::add_genpipe_to_linker(&mut linker).unwrap();
        let pre = |name: &str| {
            let component = runtime.compile(genpipe::builtin::plugin(name).unwrap()).unwrap();
            linker.instantiate_pre(&component).unwrap()
        };
        Baseline {
            llm: LlmStepPre::new(pre("test-llm")).unwrap(),
            image: ImageStepPre::new(pre("test-image")).unwrap(),
            engine,
            fuel: runtime.meters_fuel(),
        }
    }

    fn store(&self) -> Store<Plain> {
        let plain = Plain {
            wasi: WasiCtx::builder().build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            memory: MemoryLimit,
        };
        let mut store = Store::new(&self.engine, plain);
        store.limiter(|plain| &mut plain.memory);
        if self.fuel {
            store.set_fuel(1_000_000_000).unwrap();
        }
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

/// The steps of the pipeline, as genpipe keeps them loaded.
static STEPS: LazyLock<Arc<[StepPlan]>> = LazyLock::new(|| {
    let plan =
        |id: &str, plugin: &str| StepPlan { id: id.into(), plugin: plugin.into(), digest: "sha256:00".into(), loaded_at_ms: 0 };
    Arc::new([plan("text", "noop-llm"), plan("image", "noop-image")])
});

/// genpipe's bookkeeping for one two-step run, without wasm.
async fn bookkeeping(runs: &RunStore, ledger: &MemoryLedger) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Ids that sort by creation, as genpipe's run ids (UUIDv7) do.
    let id = format!("native-{:020}", NEXT.fetch_add(1, Ordering::Relaxed));
    let run = runs.create(id.as_str().into(), "noop".into(), "bench".into(), 20, Arc::clone(&STEPS));
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

/// Mean time per call of `f` run `n` times in sequence, after a warm-up, on one of the
/// runtime's workers (where an HTTP handler would call it).
async fn sequential<F, Fut>(n: u64, f: F) -> Duration
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let caller = tokio::spawn(async move {
        for i in 0..n / 10 + 1 {
            f(u64::MAX - i).await;
        }
        let start = Instant::now();
        for i in 0..n {
            f(i).await;
        }
        start.elapsed() / n as u32
    });
    caller.await.unwrap()
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

/// A host (and its runtime) for the pipeline with `limits`.
async fn host(limits: &str) -> (Arc<Runtime>, Arc<Host>) {
    let config = Config::parse(&CONFIG.replace("{limits}", limits), "bench.toml", Path::new(".")).unwrap();
    let runtime = Arc::new(Runtime::new(&config.runtime).unwrap());
    let host = Host::with_runtime(Arc::clone(&runtime), &config, Arc::new(MemoryLedger::new())).await.unwrap();
    (runtime, host)
}

/// Mean time of a whole genpipe run on `host`, one after the other.
async fn genpipe_sequential(host: &Arc<Host>, n: u64) -> Duration {
    let host = Arc::clone(host);
    sequential(n, move |_| {
        let host = Arc::clone(&host);
        async move { genpipe_run(&host).await }
    })
    .await
}

/// Runs per second of whole genpipe runs on `host` at the benchmark's concurrency.
async fn genpipe_concurrent(host: &Arc<Host>, n: u64) -> f64 {
    let host = Arc::clone(host);
    concurrent(n, move |_| {
        let host = Arc::clone(&host);
        async move { genpipe_run(&host).await }
    })
    .await
}

fn main() {
    // SAFETY: no other thread exists yet. (As `genpipe` itself does.)
    unsafe { genpipe::runtime::skip_library_backtraces() };
    let quick = std::env::var_os("GENPIPE_BENCH_QUICK").is_some();
    let (seq_n, conc_n) = if quick { (200, 1_000) } else { (5_000, 50_000) };
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    tokio.block_on(async {
        let (runtime, on) = host(LIMITS_ON).await;
        assert!(runtime.meters_fuel());
        let (_, off) = host(LIMITS_OFF).await;
        let baseline = Arc::new(Baseline::new(&runtime));
        let runs = Arc::new(RunStore::new(1024, 1 << 30));
        let ledger = Arc::new(MemoryLedger::new());
        ledger.grant("g", "bench", u64::MAX / 2).await.unwrap();

        if let Some(profile) = std::env::var_os("GENPIPE_BENCH_PROFILE") {
            // One case alone, for a profiler to look at.
            let per_run = match profile.to_str() {
                Some("sequential") => genpipe_sequential(&on, 20 * seq_n).await,
                Some("bookkeeping") => {
                    sequential(20 * seq_n, move |_| {
                        let (runs, ledger) = (Arc::clone(&runs), Arc::clone(&ledger));
                        async move { bookkeeping(&runs, &ledger).await }
                    })
                    .await
                }
                Some(mode @ ("baseline" | "inline")) => {
                    let side_by_side = mode == "baseline";
                    sequential(20 * seq_n, move |_| {
                        let baseline = Arc::clone(&baseline);
                        async move {
                            if side_by_side {
                                baseline.run().await
                            } else {
                                baseline.llm().await;
                                baseline.image().await;
                            }
                        }
                    })
                    .await
                }
                concurrently => {
                    let runs_per_second = if concurrently == Some("baseline-concurrent") {
                        concurrent(20 * conc_n, move |_| {
                            let baseline = Arc::clone(&baseline);
                            async move { baseline.run().await }
                        })
                        .await
                    } else if concurrently == Some("bookkeeping-concurrent") {
                        concurrent(20 * conc_n, move |_| {
                            let (runs, ledger) = (Arc::clone(&runs), Arc::clone(&ledger));
                            async move { bookkeeping(&runs, &ledger).await }
                        })
                        .await
                    } else {
                        genpipe_concurrent(&on, 20 * conc_n).await
                    };
                    println!("{runs_per_second:.0} runs/s");
                    return;
                }
            };
            println!("{:.1} us/run", per_run.as_secs_f64() * 1e6);
            return;
        }
        // The cases take turns, three rounds, and each figure is the median of its three: a
        // spell of machine noise then hits every case alike.
        let mut rounds = Vec::new();
        for _ in 0..3 {
            let latencies = [
                sequential(seq_n, {
                    let baseline = Arc::clone(&baseline);
                    move |_| {
                        let baseline = Arc::clone(&baseline);
                        async move { baseline.run().await }
                    }
                })
                .await,
                sequential(seq_n, {
                    let (runs, ledger) = (Arc::clone(&runs), Arc::clone(&ledger));
                    move |_| {
                        let (runs, ledger) = (Arc::clone(&runs), Arc::clone(&ledger));
                        async move { bookkeeping(&runs, &ledger).await }
                    }
                })
                .await,
                genpipe_sequential(&on, seq_n).await,
                genpipe_sequential(&off, seq_n).await,
            ];
            let b = Arc::clone(&baseline);
            let a64 = concurrent(conc_n, move |_| {
                let b = Arc::clone(&b);
                async move { b.run().await }
            })
            .await;
            let (r, l) = (Arc::clone(&runs), Arc::clone(&ledger));
            let b64 = concurrent(conc_n, move |_| {
                let (r, l) = (Arc::clone(&r), Arc::clone(&l));
                async move { bookkeeping(&r, &l).await }
            })
            .await;
            let c64 = genpipe_concurrent(&on, conc_n).await;
            let d64 = genpipe_concurrent(&off, conc_n).await;
            rounds.push((latencies, [a64, b64, c64, d64]));
        }
        let median = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let latency = |case: usize| Duration::from_secs_f64(median(rounds.iter().map(|r| r.0[case].as_secs_f64()).collect()));
        let throughput = |case: usize| median(rounds.iter().map(|r| r.1[case]).collect());
        let (a1, b1, c1, d1) = (latency(0), latency(1), latency(2), latency(3));
        let (a64, b64, c64, d64) = (throughput(0), throughput(1), throughput(2), throughput(3));

        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "run overhead: two-step no-op pipeline ({seq_n} sequential runs, {conc_n} at concurrency {CONCURRENCY}; medians of 3 rounds)"
        );
        println!("{:<44} {:>14} {:>16}", "", "us/run (c=1)", "runs/s (c=64)");
        println!("{:<44} {:>14.1} {:>16.0}", "(a) plain wasmtime, same engine and limits", us(a1), a64);
        println!("{:<44} {:>14.1} {:>16.0}", "(b) native bookkeeping, no wasm", us(b1), b64);
        println!("{:<44} {:>14.1} {:>16.0}", "(c) genpipe run, every limit on", us(c1), c64);
        println!("{:<44} {:>14.1} {:>16.0}", "(d) genpipe run, every limit off", us(d1), d64);
        let [llm, image] = baseline.breakdown(seq_n as u32).await;
        println!("where (a) goes, per plugin in sequence: test-llm instantiate {:.1} us + call {:.1} us; test-image instantiate {:.1} us + call {:.1} us", us(llm.0), us(llm.1), us(image.0), us(image.1));
        println!("ratio (c)/(a): {:.2}x latency at c=1, {:.2}x throughput cost at c=64 (target <= 1.25x)", us(c1) / us(a1), a64 / c64);
        println!("isolation (c)/(d): {:+.1}% latency at c=1, {:+.1}% throughput cost at c=64 (target <= 10%)", (us(c1) / us(d1) - 1.0) * 100.0, (d64 / c64 - 1.0) * 100.0);
    });
}

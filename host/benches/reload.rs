//! What reloading costs.
//!
//! 1. Loading a plugin cold (compiling it) and from the compile cache, for a small Rust plugin
//!    (`test-llm`), a bigger one (`llm-markov`) and, when it is built, the Python example
//!    (componentize-py, about 18 MB; `GENPIPE_BENCH_PYTHON_PLUGIN` names another file).
//! 2. The p99 latency of no-op runs at concurrency 64, without a reload, and while reloads of a
//!    changed plugin happen back to back (its component alternates between two versions); the
//!    two phases take turns over three rounds, and each figure is the median of its three.
//!
//! `GENPIPE_BENCH_QUICK=1` runs a short version (CI keeps it building and working).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use genpipe::config::RuntimeConfig;
use genpipe::runtime::{Digest, Origin, Runtime};
use genpipe::state::ledger::MemoryLedger;
use genpipe::state::runs::RunStatus;
use genpipe::{Config, Host, RunInput};

const CONFIG: &str = r#"
[server]
max_kept_runs = 1024

[runtime]
compile_cache_dir = ""

[[accounts]]
id = "bench"
credits = 1000000000000

[plugins.noop-llm]
path = "plugin.wasm"
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

/// Where the test command builds the Python example.
fn python_plugin() -> Option<PathBuf> {
    let path = std::env::var_os("GENPIPE_BENCH_PYTHON_PLUGIN").map(PathBuf::from).unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from);
        target.join("guest-examples/python_llm.wasm")
    });
    path.exists().then_some(path)
}

/// Milliseconds to load `wasm` cold, then from the cache (the median of `n` loads each).
fn load_times(wasm: &[u8], n: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let digest = Digest::of(wasm);
    let runtime =
        |cache: Option<PathBuf>| Runtime::new(&RuntimeConfig { compile_cache_dir: cache, ..RuntimeConfig::default() }).unwrap();
    let time = |cache: Option<PathBuf>, expected: Origin| {
        let mut times: Vec<f64> = (0..n)
            .map(|_| {
                let runtime = runtime(cache.clone());
                let start = Instant::now();
                let (_, origin) = runtime.component(&digest, wasm).unwrap();
                assert_eq!(origin, expected);
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[n / 2]
    };
    let cold = time(None, Origin::Compiled);
    runtime(Some(dir.path().to_path_buf())).component(&digest, wasm).unwrap();
    let cached = time(Some(dir.path().to_path_buf()), Origin::Cached);
    (cold, cached)
}

/// The p99 latency of runs at concurrency 64 for `duration`, while `during` runs alongside.
async fn p99(host: &Arc<Host>, duration: Duration, during: impl Future<Output = ()> + Send + 'static) -> (Duration, usize) {
    let deadline = Instant::now() + duration;
    let side = tokio::spawn(async move {
        tokio::select! {
            () = during => {}
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    });
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let host = Arc::clone(host);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    let run = host.start_run("bench", "noop", RunInput::default()).await.unwrap();
                    assert_eq!(run.wait().await.status, RunStatus::Completed);
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    side.await.unwrap();
    all.sort();
    (all[all.len() * 99 / 100], all.len())
}

/// Version `n` of test-llm: its version marker patched, so that every `n` is another
/// component, compiled anew.
fn version(n: u16) -> Vec<u8> {
    let mut wasm = genpipe::builtin::plugin("test-llm").unwrap().to_vec();
    let marker = b"test-llm version A";
    let at = wasm.windows(marker.len()).position(|w| w == marker).expect("the version marker") + marker.len();
    wasm[at - 2] = b'A' + (n / 26 % 26) as u8;
    wasm[at - 1] = b'A' + (n % 26) as u8;
    wasm
}

fn main() {
    // SAFETY: no other thread exists yet. (As `genpipe` itself does.)
    unsafe { genpipe::runtime::skip_library_backtraces() };
    let quick = std::env::var_os("GENPIPE_BENCH_QUICK").is_some();

    println!("plugin load time: cold (compiling) and from the compile cache, medians of 3 (ms)");
    let mut plugins: Vec<(String, Vec<u8>)> = ["test-llm", "llm-markov"]
        .iter()
        .map(|name| (format!("{name} (Rust)"), genpipe::builtin::plugin(name).unwrap().to_vec()))
        .collect();
    match python_plugin() {
        Some(path) => plugins.push((format!("{} (Python)", path.display()), std::fs::read(&path).unwrap())),
        None => println!(
            "  (the Python example is not built: run ./scripts/build-guest-examples.sh, or set GENPIPE_BENCH_PYTHON_PLUGIN)"
        ),
    }
    for (name, wasm) in &plugins {
        let (cold, cached) = load_times(wasm, if quick { 1 } else { 3 });
        println!(
            "  {name:<48} {:>6.1} MB  cold {cold:>9.1}  cached {cached:>7.1}  {:>6.0}x",
            wasm.len() as f64 / 1e6,
            cold / cached
        );
    }

    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    tokio.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("plugin.wasm"), version(0)).unwrap();
        let path = dir.path().join("genpipe.toml");
        std::fs::write(&path, CONFIG).unwrap();
        let config = Config::load(Some(&path)).unwrap();
        let host = Host::new(&config, Arc::new(MemoryLedger::new())).await.unwrap();
        let phase = Duration::from_millis(if quick { 300 } else { 3000 });
        let mut rounds = Vec::new();
        let reloads_done = Arc::new(std::sync::atomic::AtomicU16::new(0));
        for _ in 0..if quick { 1 } else { 3 } {
            let quiet = p99(&host, phase, async {}).await;
            let reloads = {
                let (host, path, dir, done) =
                    (Arc::clone(&host), path.clone(), dir.path().to_path_buf(), Arc::clone(&reloads_done));
                async move {
                    loop {
                        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        std::fs::write(dir.join("plugin.wasm"), version(n)).unwrap();
                        let report = host.reload(Config::load(Some(&path)).unwrap()).await.unwrap();
                        assert_eq!(report.plugins.len(), 1, "each reload swaps a newly compiled plugin");
                    }
                }
            };
            let reloading = p99(&host, phase, reloads).await;
            rounds.push((quiet, reloading));
        }
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let quiet = median(rounds.iter().map(|r| r.0.0).collect());
        let reloading = median(rounds.iter().map(|r| r.1.0).collect());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "p99 latency of no-op runs at concurrency 64 ({} ms phases, medians of {} rounds)",
            phase.as_millis(),
            rounds.len()
        );
        println!(
            "  without a reload                  {:>8.2} ms ({} runs in the last round)",
            ms(quiet),
            rounds.last().unwrap().0.1
        );
        println!(
            "  reloading a changed plugin        {:>8.2} ms ({} runs in the last round)",
            ms(reloading),
            rounds.last().unwrap().1.1
        );
        println!("  ratio                             {:>8.2}x (target <= 2x)", ms(reloading) / ms(quiet));
        println!(
            "  ({} reloads, each compiling a new version of test-llm, back to back)",
            reloads_done.load(std::sync::atomic::Ordering::Relaxed)
        );
    });
}

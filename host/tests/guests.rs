//! The Python and JavaScript example plugins run in one pipeline next to the Rust ones,
//! concurrently, with exact credits.
//!
//! They are built by `scripts/build-guest-examples.sh` (which the test command runs) into
//! `GENPIPE_GUEST_EXAMPLES`; without it this test is skipped with a note, unless
//! `GENPIPE_REQUIRE_GUEST_EXAMPLES=1` makes that a failure.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use genpipe::config::RuntimeConfig;
use genpipe::runtime::Runtime;
use genpipe::state::ledger::MemoryLedger;
use genpipe::state::runs::{RunStatus, StepOutput};
use genpipe::{Config, Host, RunInput};

fn guest_examples() -> Option<PathBuf> {
    match std::env::var_os("GENPIPE_GUEST_EXAMPLES") {
        Some(dir) => Some(PathBuf::from(dir)),
        None if std::env::var_os("GENPIPE_REQUIRE_GUEST_EXAMPLES").is_some() => {
            panic!("GENPIPE_GUEST_EXAMPLES is not set: scripts/build-guest-examples.sh must run first")
        }
        None => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_javascript_and_rust_steps_run_side_by_side_with_exact_credits() {
    let Some(guests) = guest_examples() else {
        eprintln!("note: the Python and JavaScript examples are not built (run ./scripts/test.sh); skipping");
        return;
    };
    let config = format!(
        r#"
[[accounts]]
id = "acme"
credits = 1000000

[plugins.python-llm]
path = "{python}"
world = "llm-step"
config = {{ credits_per_token = 2, chunk_tokens = 5 }}

[plugins.js-image]
path = "{js}"
world = "image-step"
config = {{ credits_per_megapixel = 400 }}

[plugins.llm-markov]
path = "builtin:llm-markov"
world = "llm-step"

[plugins.image-procedural]
path = "builtin:image-procedural"
world = "image-step"

[pipelines.mixed]
[[pipelines.mixed.steps]]
id = "fable"
plugin = "python-llm"
max_cost = 200
params = {{ max_tokens = 40 }}

[[pipelines.mixed.steps]]
id = "night"
plugin = "js-image"
max_cost = 10
params = {{ width = 96, height = 64 }}

[[pipelines.mixed.steps]]
id = "markov"
plugin = "llm-markov"
max_cost = 100
params = {{ max_tokens = 30 }}

[[pipelines.mixed.steps]]
id = "landscape"
plugin = "image-procedural"
max_cost = 10
params = {{ width = 96, height = 64 }}
"#,
        python = guests.join("python_llm.wasm").display(),
        js = guests.join("js_image.wasm").display(),
    );
    let config = Config::parse(&config, "guests.toml", std::path::Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    // The compile cache saves the next run of this test compiling CPython and the JS engine again.
    let cache = std::env::var_os("CARGO_TARGET_DIR").map(|dir| PathBuf::from(dir).join("test-compiled"));
    let runtime =
        Runtime::new(&RuntimeConfig { max_concurrent_steps: 256, compile_cache_dir: cache, ..RuntimeConfig::default() }).unwrap();
    let host = Host::with_runtime(Arc::new(runtime), &config, Arc::new(MemoryLedger::new())).await.unwrap();

    let runs: Vec<_> = futures::future::join_all((0..40).map(|i| {
        let input = RunInput { prompt: format!("the lighthouse keeper and the golden moon number {i}"), ..Default::default() };
        host.start_run("acme", "mixed", input)
    }))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();

    let mut posted = 0;
    for run in runs {
        let snapshot = run.wait().await;
        assert_eq!(snapshot.status, RunStatus::Completed, "{snapshot:?}");
        let charged = |id: &str| snapshot.steps.iter().find(|s| &*s.id == id).unwrap().charged;
        let Some(StepOutput::Text { completion_tokens, text, .. }) = run.output("fable").as_deref().cloned() else {
            panic!("the Python step returns text")
        };
        assert_eq!(charged("fable"), 2 * u64::from(completion_tokens), "two credits a word: {text}");
        assert_eq!(completion_tokens, 40, "max_tokens words of the fable");
        assert_eq!(charged("night"), 3, "96x64 pixels at 400 credits a megapixel, rounded up");
        let Some(StepOutput::Image { width, height, bytes, .. }) = run.output("night").as_deref().cloned() else {
            panic!("the JavaScript step returns an image")
        };
        assert_eq!((width, height), (96, 64));
        assert!(bytes.starts_with(b"\x89PNG"));
        assert_eq!(snapshot.posted, Some(snapshot.steps.iter().map(|s| s.charged).sum()), "every charge posted once");
        posted += snapshot.posted.unwrap();
    }
    let totals = common::conserved_totals(&host).await;
    assert_eq!((totals.posted, totals.open_holds), (posted, 0));
    assert_eq!(common::balance(&host, "acme").await.balance, 1_000_000 - posted);
    assert!(host.ledger().verify().await.unwrap().is_ok());
}

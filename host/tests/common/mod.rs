//! Helpers shared by the host's integration tests: one wasm runtime per test binary (so each
//! plugin is compiled once), a host per test on a fresh in-memory ledger.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::sync::{Arc, OnceLock};

use genpipe::config::RuntimeConfig;
use genpipe::runtime::Runtime;
use genpipe::state::ledger::{Ledger, LedgerTotals, MemoryLedger};
use genpipe::{Config, Host};

/// The test binary's runtime.
pub fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let config = RuntimeConfig { max_concurrent_steps: 512, compile_cache_dir: None, ..RuntimeConfig::default() };
            Arc::new(Runtime::new(&config).unwrap())
        })
        .clone()
}

/// Plugins every test config can use: the bundled test and example plugins.
pub const PLUGINS: &str = r#"
[plugins.test-llm]
path = "builtin:test-llm"
world = "llm-step"
timeout_ms = 60000

[plugins.test-image]
path = "builtin:test-image"
world = "image-step"

[plugins.llm-markov]
path = "builtin:llm-markov"
world = "llm-step"

[plugins.image-procedural]
path = "builtin:image-procedural"
world = "image-step"
"#;

/// A host on a fresh in-memory ledger for `toml` (which is appended to [`PLUGINS`]).
pub async fn host(toml: &str) -> Arc<Host> {
    host_with_ledger(toml, Arc::new(MemoryLedger::new())).await
}

/// A host on `ledger` for `toml` (which is appended to [`PLUGINS`]).
pub async fn host_with_ledger(toml: &str, ledger: Arc<dyn Ledger>) -> Arc<Host> {
    let text = format!("{PLUGINS}\n{toml}");
    let config = Config::parse(&text, "test.toml", Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    Host::with_runtime(runtime(), &config, ledger).await.unwrap()
}

/// The ledger's totals, after checking conservation.
pub async fn conserved_totals(host: &Host) -> LedgerTotals {
    let totals = host.ledger().totals().await.unwrap();
    assert_eq!(totals.balances + totals.posted, totals.granted, "conservation: {totals:?}");
    assert!(totals.held <= totals.balances, "more held than owned: {totals:?}");
    totals
}

/// Reads `account`'s balance.
pub async fn balance(host: &Host, account: &str) -> genpipe::state::ledger::Balance {
    host.ledger().balance(account).await.unwrap()
}

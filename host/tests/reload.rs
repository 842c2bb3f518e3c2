//! Reloading while traffic flows: runs keep the plugin version they were admitted with, a
//! broken new version is refused while the old one keeps serving, accounts and pipelines
//! arrive without a restart, and compiled plugins come from the compile cache.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use genpipe::pipeline::Change;
use genpipe::runtime::Digest;
use genpipe::state::ledger::MemoryLedger;
use genpipe::state::runs::{EventKind, RunStatus};
use genpipe::{Config, Host, RunInput};

/// The test-llm component answering "test-llm version A", and a copy answering "... B".
fn versions() -> (Vec<u8>, Vec<u8>) {
    let a = genpipe::builtin::plugin("test-llm").unwrap().to_vec();
    let mut b = a.clone();
    let marker = b"test-llm version A";
    let mut patched = 0;
    for at in 0..b.len() - marker.len() {
        if &b[at..at + marker.len()] == marker {
            b[at + marker.len() - 1] = b'B';
            patched += 1;
        }
    }
    assert!(patched > 0, "the version marker is in the component");
    (a, b)
}

fn config_text(extra: &str) -> String {
    format!(
        r#"
[runtime]
compile_cache_dir = ""

[[accounts]]
id = "acme"
credits = 1000000

[plugins.versioned]
path = "plugin.wasm"
world = "llm-step"
{extra}

[pipelines.version]
[[pipelines.version.steps]]
id = "which"
plugin = "versioned"
max_cost = 3
params = {{ behaviour = "version", amount = 1, delay_ms = 100 }}

[pipelines.hang]
[[pipelines.hang.steps]]
id = "wait"
plugin = "versioned"
max_cost = 5
params = {{ amount = 2, behaviour = "wait-cancel" }}
"#
    )
}

/// A folder with `genpipe.toml` (`config`) and `plugin.wasm` (`plugin`).
fn folder(config: &str, plugin: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plugin.wasm"), plugin).unwrap();
    let path = dir.path().join("genpipe.toml");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}

async fn start(path: &Path) -> Arc<Host> {
    let config = Config::load(Some(path)).unwrap();
    Host::with_runtime(common::runtime(), &config, Arc::new(MemoryLedger::new())).await.unwrap()
}

async fn reload(host: &Host, path: &Path) -> Result<genpipe::ReloadReport, String> {
    let config = Config::load(Some(path)).map_err(|e| e.to_string())?;
    host.reload(config).await.map_err(|e| e.to_string())
}

async fn version_of(host: &Arc<Host>) -> String {
    let run = host.start_run("acme", "version", RunInput::default()).await.unwrap();
    let snapshot = run.wait().await;
    assert_eq!(snapshot.status, RunStatus::Completed, "{snapshot:?}");
    run.output("which").unwrap().text().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_in_flight_across_a_swap_keep_their_version_and_later_runs_use_the_new_one() {
    let (a, b) = versions();
    let (dir, path) = folder(&config_text(""), &a);
    let host = start(&path).await;
    let before: Vec<_> =
        futures::future::join_all((0..500).map(|_| host.start_run("acme", "version", RunInput::default())).collect::<Vec<_>>())
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();

    std::fs::write(dir.path().join("plugin.wasm"), &b).unwrap();
    let report = reload(&host, &path).await.unwrap();
    let (from, to) = (Digest::of(&a).to_string(), Digest::of(&b).to_string());
    assert_eq!(
        report.plugins,
        vec![Change::Updated { name: "versioned".into(), from: Some(from.clone()), to: Some(to.clone()) }]
    );
    assert_eq!(report.pipelines.len(), 2, "both pipelines now use the new plugin");
    let after: Vec<_> =
        futures::future::join_all((0..100).map(|_| host.start_run("acme", "version", RunInput::default())).collect::<Vec<_>>())
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();

    for (runs, version, digest) in [(&before, "A", &from), (&after, "B", &to)] {
        for run in runs {
            let snapshot = run.wait().await;
            assert_eq!(snapshot.status, RunStatus::Completed, "{snapshot:?}");
            assert_eq!(run.output("which").unwrap().text(), Some(format!("test-llm version {version}").as_str()));
            assert_eq!(&*snapshot.steps[0].digest, digest.as_str(), "the status names the version that served it");
            let (events, _) = run.events_after(0);
            assert!(events.iter().any(|e| matches!(&e.kind, EventKind::StepStarted { digest: d, .. } if &**d == digest)));
        }
    }
    let totals = common::conserved_totals(&host).await;
    assert_eq!((totals.posted, totals.open_holds), (600, 0), "a credit a run, each run charged once");
    assert!(host.ledger().verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_version_is_refused_and_the_old_one_keeps_serving() {
    let (a, _) = versions();
    let (dir, path) = folder(&config_text(""), &a);
    let host = start(&path).await;
    let plugin = dir.path().join("plugin.wasm");
    let unknown_import = wat::parse_str(r#"(component (import "acme:secret/vault" (instance (export "open" (func)))))"#).unwrap();
    type Breakage<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);
    let cases: [Breakage; 5] = [
        (
            "not wasm",
            Box::new(|| std::fs::write(&plugin, b"#!/bin/sh\necho hi\n").unwrap()),
            "this is not a WebAssembly component (bad header)",
        ),
        ("missing file", Box::new(|| std::fs::remove_file(&plugin).unwrap()), "plugins.versioned.path: cannot read"),
        (
            "wrong world",
            Box::new(|| std::fs::write(&plugin, genpipe::builtin::plugin("test-image").unwrap()).unwrap()),
            "declared world = \"llm-step\" but the component implements image-step",
        ),
        (
            "an import the host does not provide",
            Box::new(|| std::fs::write(&plugin, &unknown_import).unwrap()),
            "it imports something the host does not provide",
        ),
        (
            "a digest that does not match",
            Box::new({
                let (dir, a) = (dir.path().to_path_buf(), a.clone());
                move || {
                    std::fs::write(dir.join("plugin.wasm"), &a).unwrap();
                    std::fs::write(dir.join("genpipe.toml"), config_text(&format!("digest = \"{}\"", Digest::of(b"other"))))
                        .unwrap();
                }
            }),
            "but `digest` pins",
        ),
    ];
    for (case, break_it, expected) in cases {
        break_it();
        let error = reload(&host, &path).await.expect_err(case);
        assert!(error.contains(expected), "{case}: {error}");
        assert_eq!(version_of(&host).await, "test-llm version A", "{case}: the old version keeps serving");
    }
    // Pinning the right digest is accepted and changes nothing that serves.
    std::fs::write(&path, config_text(&format!("digest = \"{}\"", Digest::of(&a)))).unwrap();
    let report = reload(&host, &path).await.unwrap();
    assert_eq!(
        report.plugins,
        vec![Change::Updated { name: "versioned".into(), from: None, to: None }],
        "only its settings changed"
    );
    assert_eq!(version_of(&host).await, "test-llm version A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_an_account_and_a_pipeline_and_leaves_balances_and_holds_alone() {
    let (a, _) = versions();
    let (_dir, path) = folder(&config_text(""), &a);
    let host = start(&path).await;
    let hanging = host.start_run("acme", "hang", RunInput::default()).await.unwrap();
    while hanging.snapshot().steps[0].charged < 2 {
        hanging.next_events(0).await;
    }
    let before = host.ledger().balance("acme").await.unwrap();
    assert_eq!(before.held, 5, "the hanging run holds its credits");

    let extra = r#"
[[accounts]]
id = "newcomer"
api_key = "newcomer-key"
credits = 77

[pipelines.echo]
[[pipelines.echo.steps]]
id = "say"
plugin = "versioned"
max_cost = 1
"#;
    std::fs::write(&path, format!("{}{extra}", config_text(""))).unwrap();
    let report = reload(&host, &path).await.unwrap();
    assert_eq!(report.accounts_added, vec!["newcomer".to_string()]);
    assert_eq!(report.pipelines, vec![Change::Added { name: "echo".into() }]);
    assert!(report.plugins.is_empty(), "the plugin is unchanged and reused: {:?}", report.plugins);

    assert_eq!(host.ledger().balance("acme").await.unwrap(), before, "balances and holds untouched");
    assert_eq!(host.ledger().balance("newcomer").await.unwrap().balance, 77);
    let echoed = host.start_run("newcomer", "echo", RunInput { prompt: "hi there".into(), ..Default::default() }).await.unwrap();
    assert_eq!(echoed.wait().await.status, RunStatus::Completed);
    // Reloading the same file again grants nothing more.
    let again = reload(&host, &path).await.unwrap();
    assert!(!again.changed && again.accounts_added.is_empty(), "{again:?}");
    assert_eq!(host.ledger().balance("newcomer").await.unwrap().balance, 77);

    hanging.cancel();
    assert_eq!(hanging.wait().await.status, RunStatus::Cancelled);
    assert!(host.ledger().verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_a_reload_cannot_apply_are_named_as_needing_a_restart() {
    let (a, _) = versions();
    let (_dir, path) = folder(&config_text(""), &a);
    let host = start(&path).await;
    let text =
        config_text("").replace("[runtime]\n", "[server]\nlisten = \"127.0.0.1:9999\"\n\n[runtime]\ncancel_grace_ms = 5\n");
    std::fs::write(&path, text).unwrap();
    let report = reload(&host, &path).await.unwrap();
    assert_eq!(report.needs_restart, vec!["server.listen".to_string(), "runtime.cancel_grace_ms".to_string()]);
    assert!(!report.changed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_start_loads_its_plugins_from_the_compile_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("genpipe.toml");
    let pipeline = "[[accounts]]\nid = \"acme\"\ncredits = 10\n[pipelines.p]\n[[pipelines.p.steps]]\nid = \"s\"\nplugin = \"test-llm\"\nmax_cost = 1\n";
    std::fs::write(&path, format!("{}\n{pipeline}\n[runtime]\ncompile_cache_dir = \"cache\"\n", common::PLUGINS)).unwrap();
    let config = Config::load(Some(&path)).unwrap();
    let stats = |host: &Host| {
        let stats = host.runtime().cache_stats();
        (stats.hits.load(Ordering::Relaxed), stats.misses.load(Ordering::Relaxed), stats.rejected.load(Ordering::Relaxed))
    };
    let first = Host::new(&config, Arc::new(MemoryLedger::new())).await.unwrap();
    assert_eq!(stats(&first), (0, 4, 0), "the first start compiles its four plugins");
    let second = Host::new(&config, Arc::new(MemoryLedger::new())).await.unwrap();
    assert_eq!(stats(&second), (4, 0, 0), "the second loads them from the cache");

    // Damage every cache file: the next start rebuilds them and the plugins still work.
    for (i, file) in std::fs::read_dir(dir.path().join("cache")).unwrap().enumerate() {
        let file = file.unwrap().path();
        let bytes = std::fs::read(&file).unwrap();
        let damaged = if i % 2 == 0 {
            bytes[..bytes.len() / 3].to_vec()
        } else {
            [&bytes[..bytes.len() - 1], &[bytes[bytes.len() - 1] ^ 0x55]].concat()
        };
        std::fs::write(&file, damaged).unwrap();
    }
    let third = Host::new(&config, Arc::new(MemoryLedger::new())).await.unwrap();
    assert_eq!(stats(&third), (0, 4, 4), "every damaged file was rejected and rebuilt");
    let run = third.start_run("acme", "p", RunInput { prompt: "still works".into(), ..Default::default() }).await.unwrap();
    assert_eq!(run.wait().await.status, RunStatus::Completed);
    assert_eq!(run.output("s").unwrap().text(), Some("still works"));
}

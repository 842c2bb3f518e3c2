//! Versions of the plugin contract: a plugin built against `genpipe:plugin@0.1.0` and one built
//! against `0.2.0` run side by side in one pipeline, and a plugin built against a version this
//! host does not support is refused with the versions it supports.

mod common;

use std::sync::Arc;

use genpipe::state::ledger::MemoryLedger;
use genpipe::state::runs::RunStatus;
use genpipe::{Config, Host, RunInput};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_of_both_versions_run_in_one_pipeline() {
    let host = common::host(
        r#"
        [[accounts]]
        id = "acme"
        credits = 1000

        [plugins.test-v2]
        path = "builtin:test-v2"
        world = "llm-step"

        [pipelines.both]
        [[pipelines.both.steps]]
        id = "old"
        plugin = "test-llm"
        max_cost = 10
        params = { behaviour = "chunks" }

        [[pipelines.both.steps]]
        id = "new"
        plugin = "test-v2"
        max_cost = 10
        "#,
    )
    .await;
    let runs: Vec<_> = futures::future::join_all(
        (0..20).map(|_| host.start_run("acme", "both", RunInput { prompt: "hello there".into(), ..Default::default() })),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    for run in runs {
        let snapshot = run.wait().await;
        assert_eq!(snapshot.status, RunStatus::Completed, "{snapshot:?}");
        assert_eq!(run.output("old").unwrap().text(), Some("hello there"));
        assert_eq!(run.output("new").unwrap().text(), Some("v2: hello there"));
        assert_eq!(snapshot.posted, Some(3), "two words at 0.1.0, one answer at 0.2.0");
    }
    let totals = common::conserved_totals(&host).await;
    assert_eq!((totals.posted, totals.open_holds), (60, 0));
}

#[tokio::test]
async fn an_unknown_version_is_refused_with_the_versions_supported() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = wat::parse_str(r#"(component (import "genpipe:plugin/log@0.9.0" (instance (export "log" (func)))))"#).unwrap();
    std::fs::write(dir.path().join("future.wasm"), wasm).unwrap();
    let config = Config::parse("[plugins.future]\npath = \"future.wasm\"\nworld = \"llm-step\"\n", "v.toml", dir.path()).unwrap();
    let error = match Host::with_runtime(common::runtime(), &config, Arc::new(MemoryLedger::new())).await {
        Ok(_) => panic!("a plugin of an unknown contract version must be refused"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("it targets genpipe:plugin@0.9.0, which this host does not support (it supports 0.1.0, 0.2.0)"),
        "{error}"
    );
}

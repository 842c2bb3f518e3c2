//! The seed scenario and the scarcity scenario: many concurrent runs against one account, with
//! the DESIGN.md invariants checked while they run and after.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use genpipe::state::runs::{RunStatus, StepStatus};
use genpipe::{RunInput, StartError};

const STORY: &str = r#"
[[accounts]]
id = "acme"
credits = 10000000

[pipelines.story]
[[pipelines.story.steps]]
id = "text"
plugin = "llm-markov"
max_cost = 100
params = { max_tokens = 40, temperature = 0.8 }

[[pipelines.story.steps]]
id = "image"
plugin = "image-procedural"
max_cost = 5
params = { width = 64, height = 48 }
"#;

fn input(prompt: &str, seed: usize) -> RunInput {
    RunInput { prompt: prompt.into(), params: BTreeMap::from([("seed".into(), seed.to_string())]) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_story_runs_keep_every_invariant() {
    let host = common::host(STORY).await;
    let start = common::balance(&host, "acme").await;

    // Start all runs concurrently; an observer checks conservation and that every started run
    // stays in the store, the whole time.
    let starts: Vec<_> = (0..1000)
        .map(|i| {
            let host = Arc::clone(&host);
            tokio::spawn(async move { host.start_run("acme", "story", input("Alice and the white rabbit", i)).await })
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let observer = {
        let (host, done) = (Arc::clone(&host), Arc::clone(&done));
        tokio::spawn(async move {
            let mut observations = 0u32;
            while !done.load(Ordering::Acquire) {
                common::conserved_totals(&host).await;
                observations += 1;
                tokio::task::yield_now().await;
            }
            observations
        })
    };
    let mut runs = Vec::new();
    for start in starts {
        runs.push(start.await.unwrap().expect("every run is admitted"));
    }
    let ids: Vec<String> = runs.iter().map(|r| r.id().to_string()).collect();
    let mut posted_sum = 0;
    for run in &runs {
        for id in &ids {
            assert!(host.runs().get(id).is_some(), "run {id} left the store while runs were still going");
        }
        let snapshot = run.wait().await;
        assert_eq!(snapshot.status, RunStatus::Completed, "{snapshot:?}");
        assert!(snapshot.steps.iter().all(|s| s.status == StepStatus::Completed));
        let text = run.output("text").unwrap();
        assert!(!text.text().unwrap().is_empty());
        assert_eq!(snapshot.posted, Some(snapshot.charged), "a completed run posts what its steps charged");
        assert!(snapshot.charged > 0 && snapshot.charged <= snapshot.held);
        posted_sum += snapshot.posted.unwrap();
    }
    done.store(true, Ordering::Release);
    assert!(observer.await.unwrap() > 0);

    let end = common::balance(&host, "acme").await;
    assert_eq!(end.balance, start.balance - posted_sum, "balance = start - sum of what the runs report");
    assert_eq!(end.held, 0);
    let totals = common::conserved_totals(&host).await;
    assert_eq!((totals.settled_holds, totals.released_holds, totals.open_holds), (1000, 0, 0));
    assert_eq!(host.runs().len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scarce_credits_admit_exactly_the_runs_the_account_can_hold() {
    // Each run holds 30 and charges all of it, so after K runs nothing is left, whatever the
    // order in which admissions and settlements interleave.
    const K: u64 = 25;
    const N: usize = 100;
    let host = common::host(&format!(
        r#"
        [[accounts]]
        id = "lean"
        credits = {credits}

        [pipelines.pricey]
        [[pipelines.pricey.steps]]
        id = "a"
        plugin = "test-llm"
        max_cost = 20
        params = {{ amount = 20 }}

        [[pipelines.pricey.steps]]
        id = "b"
        plugin = "test-llm"
        max_cost = 10
        params = {{ amount = 10 }}
        "#,
        credits = K * 30
    ))
    .await;

    let done = Arc::new(AtomicBool::new(false));
    let observer = {
        let (host, done) = (Arc::clone(&host), Arc::clone(&done));
        tokio::spawn(async move {
            while !done.load(Ordering::Acquire) {
                let balance = common::balance(&host, "lean").await;
                assert!(balance.held <= balance.balance, "available went below zero: {balance:?}");
                common::conserved_totals(&host).await;
                tokio::task::yield_now().await;
            }
        })
    };
    let attempts: Vec<_> = (0..N)
        .map(|i| {
            let host = Arc::clone(&host);
            tokio::spawn(async move { host.start_run("lean", "pricey", input("x", i)).await })
        })
        .collect();
    let (mut admitted, mut refused) = (Vec::new(), 0);
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(run) => admitted.push(run),
            Err(StartError::InsufficientCredits { needed: 30, .. }) => refused += 1,
            Err(other) => panic!("unexpected refusal: {other}"),
        }
    }
    for run in &admitted {
        assert_eq!(run.wait().await.status, RunStatus::Completed);
    }
    done.store(true, Ordering::Release);
    observer.await.unwrap();

    assert_eq!(admitted.len() as u64, K);
    assert_eq!(refused, N - K as usize);
    assert_eq!(host.runs().len() as u64, K, "a refused run never enters the store");
    let balance = common::balance(&host, "lean").await;
    assert_eq!((balance.balance, balance.held), (0, 0));
}

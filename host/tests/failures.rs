//! A failing, trapping, hostile or cancelled step fails only its own run, with an error that
//! names the plugin, the step and the cause, and the credits follow the charging policy.

mod common;

use std::sync::Arc;
use std::time::Duration;

use genpipe::RunInput;
use genpipe::config::FailurePolicy;
use genpipe::state::ledger::{
    Audit, Balance, Entry, HistoryQuery, Ledger, LedgerError, LedgerTotals, MemoryLedger, Recovery, Settlement,
};
use genpipe::state::runs::{EventKind, RunSnapshot, RunStatus, StepStatus};

const ACCOUNT: &str = r#"
[[accounts]]
id = "acme"
credits = 1000

[plugins.test-llm-slow]
path = "builtin:test-llm"
world = "llm-step"
timeout_ms = 300

[plugins.test-llm-small]
path = "builtin:test-llm"
world = "llm-step"
memory_mb = 8
"#;

/// A pipeline of two test-llm steps with the given params; `b` runs after `a` when `ordered`.
fn pipeline(a: &str, b: &str, ordered: bool) -> String {
    let after = if ordered { r#"after = ["a"]"# } else { "" };
    format!(
        r#"
        [pipelines.p]
        [[pipelines.p.steps]]
        id = "a"
        plugin = "test-llm"
        max_cost = 10
        params = {{ {a} }}

        [[pipelines.p.steps]]
        id = "b"
        plugin = "test-llm"
        max_cost = 10
        {after}
        params = {{ {b} }}
        "#
    )
}

async fn run_once(toml: &str) -> (Arc<genpipe::Host>, RunSnapshot) {
    let host = common::host(&format!("{ACCOUNT}\n{toml}")).await;
    let run = host.start_run("acme", "p", RunInput::default()).await.unwrap();
    let snapshot = run.wait().await;
    (host, snapshot)
}

fn step<'a>(snapshot: &'a RunSnapshot, id: &str) -> &'a genpipe::state::runs::StepView {
    snapshot.steps.iter().find(|s| &*s.id == id).unwrap()
}

#[tokio::test]
async fn a_failing_step_fails_the_run_cancels_its_sibling_and_posts_nothing() {
    let (host, snapshot) =
        run_once(&pipeline(r#"behaviour = "fail", delay_ms = 50"#, r#"amount = 4, behaviour = "wait-cancel""#, false)).await;
    assert_eq!(snapshot.status, RunStatus::Failed);
    let error = snapshot.error.as_deref().unwrap();
    assert!(error.contains("step 'a' (plugin test-llm)") && error.contains("test-llm failed on purpose"), "{error}");
    assert_eq!(step(&snapshot, "a").status, StepStatus::Failed);
    assert_eq!(step(&snapshot, "b").status, StepStatus::Cancelled);
    assert_eq!(snapshot.posted, Some(0));
    let balance = common::balance(&host, "acme").await;
    assert_eq!((balance.balance, balance.held), (1000, 0), "the account is exactly as before");
    assert_eq!(common::conserved_totals(&host).await.released_holds, 1);
}

#[tokio::test]
async fn charges_of_a_failed_run_follow_the_policy() {
    // `a` charges 7 and completes; `b` then fails.
    let steps = pipeline("amount = 7", r#"behaviour = "fail""#, true);
    let (host, released) = run_once(&steps).await;
    assert_eq!((released.status, released.charged, released.posted), (RunStatus::Failed, 7, Some(0)));
    assert_eq!(common::balance(&host, "acme").await.balance, 1000);

    let (host, posted) = run_once(&format!("[credits]\non_failure = \"post-charged\"\n{steps}")).await;
    assert_eq!((posted.status, posted.posted), (RunStatus::Failed, Some(7)));
    assert_eq!(common::balance(&host, "acme").await.balance, 993);
}

#[tokio::test]
async fn a_step_waits_for_its_after_and_uses_its_output() {
    let host = common::host(&format!(
        r#"{ACCOUNT}
        [pipelines.p]
        [[pipelines.p.steps]]
        id = "first"
        plugin = "test-llm"
        max_cost = 5
        prompt = "one two"

        [[pipelines.p.steps]]
        id = "second"
        plugin = "test-llm"
        max_cost = 5
        after = ["first"]
        prompt = "{{steps.first.output}} three"
        "#
    ))
    .await;
    let run = host.start_run("acme", "p", RunInput::default()).await.unwrap();
    assert_eq!(run.wait().await.status, RunStatus::Completed);
    assert_eq!(run.output("second").unwrap().text(), Some("one two three"));
    let (events, complete) = run.events_after(0);
    assert!(complete);
    let order: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepStarted { step, .. } => Some(format!("start {step}")),
            EventKind::StepEnded { step, .. } => Some(format!("end {step}")),
            _ => None,
        })
        .collect();
    assert_eq!(order, ["start first", "end first", "start second", "end second"]);
    assert!(events.windows(2).all(|w| w[1].seq == w[0].seq + 1), "events are numbered in order");
}

#[tokio::test]
async fn plugin_misbehaviour_is_named_and_isolated() {
    let cases = [
        ("test-llm", r#"behaviour = "trap""#, "the plugin trapped"),
        ("test-llm", r#"behaviour = "trap""#, "test-llm trapped on purpose"),
        ("test-llm-slow", r#"behaviour = "spin""#, "timed out after 300 ms"),
        ("test-llm-small", r#"behaviour = "oom""#, "exceeded its memory limit of 8 MiB"),
        ("test-image", r#"behaviour = "bad-output""#, "bad output: the 9 bytes returned are not a PNG image"),
    ];
    let mut toml = String::from(ACCOUNT);
    for (i, (plugin, params, _)) in cases.iter().enumerate() {
        toml.push_str(&format!(
            "[pipelines.case{i}]\n[[pipelines.case{i}.steps]]\nid = \"s\"\nplugin = \"{plugin}\"\nmax_cost = 1\nparams = {{ {params} }}\n"
        ));
    }
    toml.push_str("[pipelines.ok]\n[[pipelines.ok.steps]]\nid = \"s\"\nplugin = \"test-llm\"\nmax_cost = 1\nparams = { behaviour = \"chunks\" }\n");
    let host = common::host(&toml).await;

    // The hostile runs and healthy runs go at once; the healthy ones are unaffected.
    let mut hostile = Vec::new();
    for i in 0..cases.len() {
        hostile.push(host.start_run("acme", &format!("case{i}"), RunInput::default()).await.unwrap());
    }
    let mut healthy = Vec::new();
    for _ in 0..20 {
        healthy.push(host.start_run("acme", "ok", RunInput { prompt: "fine".into(), ..Default::default() }).await.unwrap());
    }
    for (run, (plugin, _, cause)) in hostile.iter().zip(&cases) {
        let snapshot = run.wait().await;
        assert_eq!(snapshot.status, RunStatus::Failed);
        let error = snapshot.error.unwrap();
        let plugin = plugin.trim_end_matches("-slow").trim_end_matches("-small");
        assert!(error.contains(&format!("step 's' (plugin {plugin}")), "{error}");
        assert!(error.contains(cause), "expected '{cause}' in: {error}");
    }
    for run in healthy {
        assert_eq!(run.wait().await.status, RunStatus::Completed);
    }
    let totals = common::conserved_totals(&host).await;
    assert_eq!((totals.open_holds, totals.posted), (0, 20));
}

#[tokio::test]
async fn cancelling_stops_cooperative_and_ignoring_plugins_and_releases_the_hold() {
    let host = common::host(&format!(
        "{ACCOUNT}\n{}",
        pipeline(r#"amount = 3, behaviour = "wait-cancel""#, r#"behaviour = "spin""#, false)
    ))
    .await;
    let run = host.start_run("acme", "p", RunInput::default()).await.unwrap();
    // Cancel once both plugins are running.
    let mut seen = 0;
    let mut started = 0;
    while started < 2 {
        let events = run.next_events(seen).await;
        seen = events.last().unwrap().seq;
        started += events.iter().filter(|e| matches!(e.kind, EventKind::StepStarted { .. })).count();
    }
    run.cancel();
    let snapshot = run.wait().await;
    assert_eq!(snapshot.status, RunStatus::Cancelled);
    assert_eq!(step(&snapshot, "a").status, StepStatus::Cancelled);
    let b = step(&snapshot, "b");
    assert_eq!(b.status, StepStatus::Cancelled);
    assert!(b.error.as_deref().unwrap().contains("did not return within 250 ms"), "{b:?}");
    assert_eq!(snapshot.posted, Some(0));
    assert_eq!(common::balance(&host, "acme").await.balance, 1000);
}

/// A memory ledger that panics when a hold is settled or released: a bug in a ledger backend.
struct PanicsOnClose(MemoryLedger);

#[async_trait::async_trait]
impl Ledger for PanicsOnClose {
    async fn grant(&self, grant_id: &str, account: &str, amount: u64) -> Result<Balance, LedgerError> {
        self.0.grant(grant_id, account, amount).await
    }
    async fn reserve(&self, hold_id: &str, account: &str, amount: u64, ttl: Duration) -> Result<(), LedgerError> {
        self.0.reserve(hold_id, account, amount, ttl).await
    }
    async fn charge(&self, hold_id: &str, op_id: &str, amount: u64, reason: &str) -> Result<u64, LedgerError> {
        self.0.charge(hold_id, op_id, amount, reason).await
    }
    async fn settle(&self, _: &str) -> Result<Settlement, LedgerError> {
        panic!("settle broke")
    }
    async fn release(&self, _: &str) -> Result<Settlement, LedgerError> {
        panic!("release broke")
    }
    async fn balance(&self, account: &str) -> Result<Balance, LedgerError> {
        self.0.balance(account).await
    }
    async fn totals(&self) -> Result<LedgerTotals, LedgerError> {
        self.0.totals().await
    }
    async fn history(&self, account: &str, query: &HistoryQuery) -> Result<Vec<Entry>, LedgerError> {
        self.0.history(account, query).await
    }
    async fn recover(&self, policy: FailurePolicy) -> Result<Recovery, LedgerError> {
        self.0.recover(policy).await
    }
    async fn verify(&self) -> Result<Audit, LedgerError> {
        self.0.verify().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_that_panics_in_settlement_fails_the_run_and_frees_its_slot() {
    // Steps that end at once settle on the caller's task, steps that wait on their own: the
    // panic reaches neither the caller nor a lost task.
    for params in ["amount = 3", "amount = 3, delay_ms = 20"] {
        let ledger = Arc::new(PanicsOnClose(MemoryLedger::new()));
        let host = common::host_with_ledger(&format!("{ACCOUNT}\n{}", pipeline(params, params, false)), ledger).await;
        let run = host.start_run("acme", "p", RunInput::default()).await.expect("the run starts and its caller goes on");
        let snapshot = run.wait().await;
        assert_eq!(snapshot.status, RunStatus::Failed, "{params}: {snapshot:?}");
        let error = snapshot.error.unwrap_or_default();
        assert!(error.contains("the ledger panicked: settle broke") && error.contains("the hold stays open"), "{error}");
        assert_eq!(snapshot.posted, Some(0));
        // The slot is freed just after the run ends: the host goes idle (a lost slot never would).
        let idle = tokio::time::timeout(Duration::from_secs(10), host.drain(Duration::from_secs(10))).await;
        assert!(idle.is_ok(), "{params}: the run's slot was not freed");
        // The hold stays open for recovery.
        assert_eq!(common::balance(&host, "acme").await, Balance { balance: 1000, held: 20 }, "{params}");
    }
}

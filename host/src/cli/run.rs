//! `genpipe run` (one run of a pipeline, streamed to the terminal) and `genpipe validate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::display::RunDisplay;
use super::{EXIT_RUN_FAILED, load};
use crate::RunInput;
use crate::runtime::Origin;
use crate::state::runs::{EventKind, RunStatus, StepOutput};

pub(super) async fn validate(config: Option<&Path>) -> Result<ExitCode, String> {
    let (config, host) = load(config).await?;
    println!("{}: ok", config.source);
    let registry = host.registry();
    for (name, plugin) in &registry.plugins {
        let origin = match plugin.origin() {
            Origin::Compiled => "compiled",
            Origin::Cached | Origin::Reused => "from the compile cache",
        };
        println!("  plugin   {name:<20} {:<10} {}  {origin}", plugin.world(), plugin.digest());
    }
    for (name, pipeline) in &registry.pipelines {
        let steps: Vec<_> = pipeline.steps.iter().map(|s| s.id.to_string()).collect();
        println!("  pipeline {name:<20} steps: {}  hold: {}", steps.join(", "), pipeline.hold().unwrap_or(u64::MAX));
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn run(
    pipeline: &str,
    input: RunInput,
    config: Option<&Path>,
    out: &Path,
    account: Option<String>,
) -> Result<ExitCode, String> {
    let (config, host) = load(config).await?;
    let account = match account.or_else(|| config.accounts.first().map(|a| a.id.clone())) {
        Some(account) => account,
        None => return Err(format!("{}: declares no [[accounts]]; add one or pass --account", config.source)),
    };
    let run = host.start_run(&account, pipeline, input).await.map_err(|e| e.to_string())?;
    eprintln!("run {} of pipeline '{pipeline}' started", run.id());

    let steps: Vec<String> = run.snapshot().steps.iter().map(|s| s.id.to_string()).collect();
    let mut display = RunDisplay::new(&steps);
    let stream = async {
        let mut seen = 0;
        loop {
            let events = run.next_events(seen).await;
            let Some(last) = events.last() else { break };
            seen = last.seq;
            for event in events {
                match event.kind {
                    EventKind::Text { chunk, .. } => display.text(&chunk),
                    EventKind::Progress { step, stage, progress, message } => display.progress(&step, stage, progress, &message),
                    EventKind::StepEnded { step, status, error, .. } => display.step_ended(&step, status, error.as_deref()),
                    _ => {}
                }
            }
        }
    };
    tokio::select! {
        () = stream => {}
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: cancelling the run");
            run.cancel();
        }
    }
    let snapshot = run.wait().await;
    display.finish();

    std::fs::create_dir_all(out).map_err(|e| format!("cannot create the output folder '{}': {e}", out.display()))?;
    eprintln!("run {} {} in {} ms", snapshot.id, snapshot.status, snapshot.duration_ms.unwrap_or(0));
    for step in &snapshot.steps {
        let written = match run.output(&step.id).as_deref() {
            Some(StepOutput::Text { text, .. }) => Some(write_output(out, &step.id, "txt", text.as_bytes())?),
            Some(StepOutput::Image { bytes, .. }) => Some(write_output(out, &step.id, "png", bytes)?),
            None => None,
        };
        let written = written.map(|p| format!("  -> {}", p.display())).unwrap_or_default();
        eprintln!("  {:<10} {:<18} {:<10} charged {:>6}{written}", step.id, step.plugin, step.status.as_str(), step.charged);
    }
    if let Some(error) = &snapshot.error {
        eprintln!("error: {error}");
    }
    let balance = host.ledger().balance(&account).await.map_err(|e| e.to_string())?;
    eprintln!("credits: {} posted, {} left (account {account})", snapshot.posted.unwrap_or(0), balance.balance);
    Ok(if snapshot.status == RunStatus::Completed { ExitCode::SUCCESS } else { ExitCode::from(EXIT_RUN_FAILED) })
}

fn write_output(out: &Path, step: &str, extension: &str, bytes: &[u8]) -> Result<PathBuf, String> {
    let path = out.join(format!("{step}.{extension}"));
    std::fs::write(&path, bytes).map_err(|e| format!("cannot write '{}': {e}", path.display()))?;
    Ok(path)
}

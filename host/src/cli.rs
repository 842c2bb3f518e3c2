//! The `genpipe` command line: `run` a pipeline once, `validate` a configuration.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::state::ledger::{Ledger, MemoryLedger};
use crate::state::runs::{EventKind, RunStatus, Stage, StepOutput};
use crate::{Host, RunInput};

/// Runs AI generation pipelines made of WebAssembly component plugins.
#[derive(Debug, Parser)]
#[command(name = "genpipe", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a pipeline once: streams its text, writes its outputs, prints a summary.
    Run {
        /// The pipeline to run (see `genpipe validate`).
        pipeline: String,
        /// The prompt.
        #[arg(long, short)]
        prompt: String,
        /// The configuration file (default: the built-in one).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Folder for the outputs (`STEP.txt`, `STEP.png`); created if needed.
        #[arg(long, short, default_value = "out")]
        out: PathBuf,
        /// The account to charge (default: the first in the configuration).
        #[arg(long)]
        account: Option<String>,
        /// Parameters for every step, as KEY=VALUE (seed, max_tokens, temperature, width, height).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// Checks a configuration and loads every plugin in it, without running anything.
    Validate {
        /// The configuration file (default: the built-in one).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

/// Exit code of a run that did not complete.
const EXIT_RUN_FAILED: u8 = 1;
/// Exit code of a configuration or usage error.
const EXIT_BAD_INPUT: u8 = 2;

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { pipeline, prompt, config, out, account, params } => {
                let input = RunInput { prompt, params: params.into_iter().collect::<BTreeMap<_, _>>() };
                run(&pipeline, input, config.as_deref(), &out, account).await
            }
            Command::Validate { config } => validate(config.as_deref()).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

async fn load(config: Option<&Path>) -> Result<(Config, Arc<Host>), String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::new());
    let host = Host::new(&config, ledger).await.map_err(|e| e.to_string())?;
    Ok((config, host))
}

async fn validate(config: Option<&Path>) -> Result<ExitCode, String> {
    let (config, host) = load(config).await?;
    println!("{}: ok", config.source);
    for (name, plugin) in &host.registry().plugins {
        println!("  plugin   {name:<20} {}", plugin.world());
    }
    for (name, pipeline) in &host.registry().pipelines {
        let steps: Vec<_> = pipeline.steps.iter().map(|s| s.id.to_string()).collect();
        println!("  pipeline {name:<20} steps: {}  hold: {}", steps.join(", "), pipeline.hold().unwrap_or(u64::MAX));
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(
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

    let stream = async {
        let mut seen = 0;
        let mut printed_text = false;
        let mut stdout = std::io::stdout();
        loop {
            let events = run.next_events(seen).await;
            let Some(last) = events.last() else {
                if printed_text {
                    println!();
                }
                break;
            };
            seen = last.seq;
            for event in events {
                match event.kind {
                    EventKind::Text { chunk, .. } => {
                        printed_text = true;
                        let _ = write!(stdout, "{chunk}");
                        let _ = stdout.flush();
                    }
                    EventKind::Progress { step, stage, progress, message } if stage != Stage::Generating || progress >= 1.0 => {
                        eprintln!("[{step}] {stage} {:.0}% {message}", progress * 100.0);
                    }
                    EventKind::StepEnded { step, status, error, .. } => {
                        eprintln!("[{step}] {status}{}", error.map(|e| format!(": {e}")).unwrap_or_default());
                    }
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

    std::fs::create_dir_all(out).map_err(|e| format!("cannot create the output folder '{}': {e}", out.display()))?;
    eprintln!("run {} {} in {} ms", snapshot.id, snapshot.status, snapshot.duration_ms.unwrap_or(0));
    for step in &snapshot.steps {
        let written = match run.output(&step.id).as_deref() {
            Some(StepOutput::Text { text, .. }) => Some(write_output(out, &step.id, "txt", text.as_bytes())?),
            Some(StepOutput::Image { bytes, .. }) => Some(write_output(out, &step.id, "png", bytes)?),
            None => None,
        };
        let written = written.map(|p| format!("  -> {}", p.display())).unwrap_or_default();
        eprintln!(
            "  {:<10} {:<18} {:<10} charged {:>6}{written}",
            step.id,
            step.plugin,
            format!("{:?}", step.status),
            step.charged
        );
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

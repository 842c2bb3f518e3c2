//! The `genpipe` command line: one file per command family.

mod credits;
mod display;
mod plugin;
mod run;
mod serve;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, World};
use crate::state::ledger;
use crate::{Host, RunInput};
use plugin::new;

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
    /// Serves the HTTP API until SIGTERM or SIGINT, then drains the runs in flight.
    Serve {
        /// The configuration file (default: the built-in one, with a demo account).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on (default: [server] listen, 127.0.0.1:8080).
        #[arg(long, short)]
        listen: Option<String>,
        /// Reload when the configuration file or a plugin file changes (for development).
        #[arg(long)]
        watch: bool,
    },
    /// Tools for plugin authors and operators: check, new, precompile.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Reads and changes the credit ledger: grant, balance, history, verify.
    Credits(credits::CreditsArgs),
    /// Checks a configuration and loads every plugin in it, without running anything.
    Validate {
        /// The configuration file (default: the built-in one).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Checks a plugin component: its world, WIT version, imports and exports, then runs one
    /// `generate` in an in-process host and shows what it did. Exits 1 on any problem.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
        /// The world it must implement (default: whichever it implements).
        #[arg(long, value_parser = parse_world)]
        world: Option<World>,
        /// A setting the plugin reads through `config`, as KEY=VALUE.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_param)]
        config: Vec<(String, String)>,
        /// A request parameter (max_tokens, temperature, seed, width, height, or the plugin's own).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// The prompt.
        #[arg(long, short, default_value = "A short test of the plugin")]
        prompt: String,
        /// The credits the step may charge.
        #[arg(long, default_value_t = 1000)]
        budget: u64,
        /// A host the plugin may call over HTTP (as in allowed_hosts); repeat for more.
        #[arg(long, value_name = "HOST")]
        allow: Vec<String>,
        /// Where an image output is saved.
        #[arg(long, default_value = "check-output.png")]
        out: PathBuf,
    },
    /// Creates a working plugin project in a new folder NAME, with its build command and a README.
    New {
        /// The plugin's name (letters, digits, `-`), also the project's folder.
        name: String,
        /// Its language.
        #[arg(long, value_enum)]
        lang: new::Language,
        /// Its world.
        #[arg(long, value_parser = parse_world)]
        world: World,
    },
    /// Compiles every plugin of a configuration into the compile cache, so that the next start,
    /// `validate`, `run` or reload loads them without compiling.
    Precompile {
        /// The configuration file (default: the built-in one).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn parse_world(text: &str) -> Result<World, String> {
    match text {
        "llm-step" => Ok(World::LlmStep),
        "image-step" => Ok(World::ImageStep),
        other => Err(format!("'{other}' is not a world; give llm-step or image-step")),
    }
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
    // SAFETY: no other thread exists yet.
    unsafe { crate::runtime::skip_library_backtraces() };
    let cli = Cli::parse();
    // A server reports what it does; a one-shot command only what went wrong; a plugin check
    // shows the plugin's log lines too.
    let default_filter = match cli.command {
        Command::Serve { .. } => "info",
        Command::Plugin(PluginCommand::Check { .. }) => "warn,genpipe::plugin=trace",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
                run::run(&pipeline, input, config.as_deref(), &out, account).await
            }
            Command::Serve { config, listen, watch } => serve::serve(config.as_deref(), listen, watch).await,
            Command::Plugin(PluginCommand::Precompile { config }) => plugin::precompile(config.as_deref()),
            Command::Plugin(PluginCommand::Check { file, world, config, params, prompt, budget, allow, out }) => {
                plugin::check(plugin::CheckArgs { file, world, config, params, prompt, budget, allow, out }).await
            }
            Command::Plugin(PluginCommand::New { name, lang, world }) => new::scaffold(&name, lang, world),
            Command::Credits(args) => credits::credits(args).await,
            Command::Validate { config } => run::validate(config.as_deref()).await,
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

/// Loads a configuration and starts a host on its `[ledger]`.
async fn load(config: Option<&Path>) -> Result<(Config, Arc<Host>), String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let ledger =
        ledger::open(&config.ledger, &config.base_dir).await.map_err(|e| format!("{}: ledger.path: {e}", config.source))?;
    let host = Host::new(&config, ledger).await.map_err(|e| e.to_string())?;
    Ok((config, host))
}

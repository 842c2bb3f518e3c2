//! `genpipe plugin check FILE.wasm`: what an author needs to know about a component, without a
//! server.
//!
//! 1. Inspect: is it a component, which world and WIT version it targets, what it imports
//!    (each import marked provided, provided with a caveat, or not provided with what to do
//!    instead) and exports.
//! 2. Run one `generate` in an in-process host (memory ledger, the test budget) and print what
//!    happened, as it happens: streamed chunks, status reports, log lines (on stderr); then the
//!    charges, the output (an image is saved to a file), the time and the peak memory.
//!
//! Exit status: 0 when everything is fine, 1 on any problem (each is named), 2 for a usage
//! error.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use wasmtime::component::types::ComponentItem;

use crate::config::{Config, RuntimeConfig, World};
use crate::runtime::bindings::VERSIONS;
use crate::runtime::{Digest, Runtime};
use crate::state::ledger::{EntryKind, HistoryQuery, MemoryLedger};
use crate::state::runs::{EventKind, RunStatus, StepOutput};
use crate::{Host, RunInput};

/// What `plugin check` was asked.
#[derive(Debug)]
pub(crate) struct CheckArgs {
    pub file: PathBuf,
    pub world: Option<World>,
    pub config: Vec<(String, String)>,
    pub params: Vec<(String, String)>,
    pub prompt: String,
    pub budget: u64,
    pub allow: Vec<String>,
    pub out: PathBuf,
}

/// The WIT packages genpipe provides, and what a plugin should know about each.
fn provided(import: &str) -> Result<Option<&'static str>, String> {
    let (name, version) = import.split_once('@').unwrap_or((import, ""));
    let major_minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    let genpipe = ["types", "status", "credits", "output", "log", "config"];
    if let Some(interface) = name.strip_prefix("genpipe:plugin/") {
        return if !genpipe.contains(&interface) {
            Err(format!("genpipe:plugin has no interface `{interface}`; the worlds import {}", genpipe.join(", ")))
        } else if VERSIONS.contains(&version) {
            Ok(None)
        } else {
            Err(format!(
                "genpipe:plugin@{version} is not a version this host supports (it supports {}); build against wit/",
                VERSIONS.join(", ")
            ))
        };
    }
    if let Some(rest) = name.strip_prefix("wasi:") {
        let package = rest.split('/').next().unwrap_or_default();
        if major_minor(version) != "0.2" {
            return Err(format!("WASI {version} is not supported: genpipe provides WASI 0.2; target wasm32-wasip2"));
        }
        return match package {
            "io" | "clocks" | "random" | "cli" => Ok(None),
            "http" => Ok(Some("only to the hosts in the plugin's allowed_hosts (check: --allow HOST)")),
            "filesystem" => Ok(Some("plugins have no files: read settings through `config`, embed data in the component")),
            "sockets" => Ok(Some("plugins have no sockets: reach servers through wasi:http and allowed_hosts")),
            other => Err(format!(
                "wasi:{other} is not provided; plugins reach models and services through wasi:http \
                 (outgoing-handler) to the hosts the operator allows"
            )),
        };
    }
    Err("genpipe does not provide this interface; a plugin may import only genpipe:plugin and WASI 0.2 \
         (see PLUGINS.md)"
        .into())
}

/// Inspects the component and prints what it targets; returns its world (or the problems).
fn inspect(runtime: &Runtime, bytes: &[u8], wanted: Option<World>, problems: &mut Vec<String>) -> Option<World> {
    let digest = Digest::of(bytes);
    let component = match runtime.component(&digest, bytes) {
        Ok((component, _)) => component,
        Err(e) => {
            problems.push(format!("it is not a valid component: {e:#}"));
            return None;
        }
    };
    let engine = runtime.engine();
    let ty = component.component_type();
    let mut version = None;
    println!("imports:");
    for (name, _) in ty.imports(engine) {
        if name.starts_with("genpipe:plugin/") {
            version = name.split_once('@').map(|(_, v)| v.to_string());
        }
        match provided(name) {
            Ok(None) => println!("  {name:<44} provided"),
            Ok(Some(caveat)) => println!("  {name:<44} provided: {caveat}"),
            Err(fix) => {
                println!("  {name:<44} NOT PROVIDED: {fix}");
                problems.push(format!("it imports {name}, which the host does not provide"));
            }
        }
    }
    println!("exports:");
    for (name, item) in ty.exports(engine) {
        let what = match item.ty {
            ComponentItem::ComponentFunc(_) => "function",
            ComponentItem::ComponentInstance(_) => "instance",
            _ => "other",
        };
        println!("  {name:<44} {what}");
    }
    let Ok(pre) = runtime.linker().instantiate_pre(&component) else {
        problems.push("it cannot be linked against the host functions (see the imports above)".into());
        return None;
    };
    let newest = VERSIONS[VERSIONS.len() - 1];
    let Some(world) = [World::LlmStep, World::ImageStep]
        .into_iter()
        .find(|world| crate::runtime::typed_as(&pre, *world, version.as_deref().unwrap_or(newest)))
    else {
        problems
            .push("it exports no `generate` function of world llm-step or image-step; implement one of them from wit/".into());
        return None;
    };
    match &version {
        Some(version) => println!("targets: world {world} of genpipe:plugin@{version}"),
        None => println!("targets: world {world} (it imports no genpipe interface; its export matches genpipe:plugin@{newest})"),
    }
    if let Some(wanted) = wanted.filter(|w| *w != world) {
        problems.push(format!("--world {wanted} was asked, but the component implements {world}"));
        return None;
    }
    Some(world)
}

/// The author's compile cache: `$XDG_CACHE_HOME/genpipe/compiled`, or `~/.cache/genpipe/compiled`,
/// so that checking the same build again does not compile it again.
fn user_cache() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("genpipe/compiled"))
}

/// A TOML string literal.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// The configuration of the in-process host that runs the check.
fn check_config(args: &CheckArgs, world: World) -> Result<Config, String> {
    let settings: Vec<String> = args.config.iter().map(|(k, v)| format!("{} = {}", quoted(k), quoted(v))).collect();
    let params: Vec<String> = args.params.iter().map(|(k, v)| format!("{} = {}", quoted(k), quoted(v))).collect();
    let allowed: Vec<String> = args.allow.iter().map(|h| quoted(h)).collect();
    let text = format!(
        "[runtime]\ncompile_cache_dir = {cache}\n[ledger]\nkind = \"memory\"\n\
         [[accounts]]\nid = \"check\"\ncredits = {budget}\n\
         [plugins.plugin]\npath = {path}\nworld = \"{world}\"\nallowed_hosts = [{allowed}]\nconfig = {{ {settings} }}\n\
         [pipelines.check]\n[[pipelines.check.steps]]\nid = \"generate\"\nplugin = \"plugin\"\nmax_cost = {budget}\nparams = {{ {params} }}\n",
        budget = args.budget.max(1),
        cache = quoted(&user_cache().map(|dir| dir.display().to_string()).unwrap_or_default()),
        path = quoted(&args.file.display().to_string()),
        allowed = allowed.join(", "),
        settings = settings.join(", "),
        params = params.join(", "),
    );
    Config::parse(&text, "<plugin check>", Path::new(".")).map_err(|e| e.message)
}

pub(crate) async fn check(args: CheckArgs) -> Result<ExitCode, String> {
    let bytes = std::fs::read(&args.file).map_err(|e| format!("cannot read '{}': {e}", args.file.display()))?;
    println!("plugin: {} ({}, {:.1} MB)", args.file.display(), Digest::of(&bytes), bytes.len() as f64 / 1e6);
    let mut problems = Vec::new();
    let runtime = Runtime::new(&RuntimeConfig { compile_cache_dir: user_cache(), ..RuntimeConfig::default() })
        .map_err(|e| format!("creating the wasm engine: {e}"))?;
    let world = inspect(&runtime, &bytes, args.world, &mut problems);
    if let Some(world) = world {
        let absolute = std::path::absolute(&args.file).unwrap_or(args.file.clone());
        let args = CheckArgs { file: absolute, ..args };
        run_once(&args, world, &mut problems).await?;
    }
    if problems.is_empty() {
        println!("ok: the plugin loads and runs");
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &problems {
        eprintln!("problem: {problem}");
    }
    Ok(ExitCode::from(1))
}

async fn run_once(args: &CheckArgs, world: World, problems: &mut Vec<String>) -> Result<(), String> {
    let config = check_config(args, world)?;
    let host = Host::new(&config, Arc::new(MemoryLedger::new())).await.map_err(|e| e.to_string())?;
    let input = RunInput { prompt: args.prompt.clone(), params: BTreeMap::new() };
    let run = host.start_run("check", "check", input).await.map_err(|e| e.to_string())?;
    println!("running generate (budget {} credits, prompt {:?}):", args.budget, args.prompt);
    let mut seen = 0;
    let mut stdout = std::io::stdout();
    loop {
        let events = run.next_events(seen).await;
        let Some(last) = events.last() else { break };
        seen = last.seq;
        for event in events {
            match event.kind {
                EventKind::Text { chunk, .. } => println!("  chunk    {chunk:?}"),
                EventKind::Progress { stage, progress, message, .. } => {
                    println!("  status   {stage} {:.0}% {message}", progress * 100.0);
                }
                _ => {}
            }
        }
        let _ = stdout.flush();
    }
    let snapshot = run.wait().await;
    let history = HistoryQuery { run: Some(snapshot.id.clone()), after: 0, limit: 1000 };
    for entry in host.ledger().history("check", &history).await.map_err(|e| e.to_string())? {
        if entry.kind == EntryKind::Charge {
            println!("  charge   {} credits: {}", entry.amount, entry.reason);
        }
    }
    let step = &snapshot.steps[0];
    match run.output("generate").as_deref() {
        Some(StepOutput::Text { text, prompt_tokens, completion_tokens }) => {
            println!("output: text, {} bytes, {prompt_tokens} prompt + {completion_tokens} completion tokens:", text.len());
            println!("{text}");
        }
        Some(StepOutput::Image { bytes, width, height, .. }) => {
            std::fs::write(&args.out, bytes).map_err(|e| format!("cannot write '{}': {e}", args.out.display()))?;
            println!("output: a {width}x{height} PNG of {} bytes, saved to {}", bytes.len(), args.out.display());
        }
        None => {}
    }
    println!(
        "{}: in {} ms, charged {} of {} credits, peak memory {:.1} MiB",
        snapshot.status,
        snapshot.duration_ms.unwrap_or(0),
        snapshot.charged,
        args.budget,
        step.memory_peak_bytes as f64 / f64::from(1 << 20)
    );
    if snapshot.status != RunStatus::Completed {
        let kind = step.error_kind.map(|k| format!(" ({k})")).unwrap_or_default();
        problems.push(format!("generate did not complete{kind}: {}", snapshot.error.unwrap_or_default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_marked_provided_with_caveats_or_not_with_the_fix() {
        assert_eq!(provided("genpipe:plugin/credits@0.1.0"), Ok(None));
        assert_eq!(provided("wasi:io/streams@0.2.6"), Ok(None));
        assert!(provided("wasi:http/outgoing-handler@0.2.0").unwrap().unwrap().contains("allowed_hosts"));
        assert!(provided("wasi:filesystem/types@0.2.0").unwrap().unwrap().contains("no files"));
        assert!(provided("wasi:nn/graph@0.2.0").unwrap_err().contains("through wasi:http"));
        assert!(provided("wasi:http/types@0.3.0").unwrap_err().contains("WASI 0.2"));
        assert!(provided("genpipe:plugin/credits@9.0.0").unwrap_err().contains("supports 0.1.0"));
        assert!(provided("acme:vault/open").unwrap_err().contains("does not provide"));
    }
}

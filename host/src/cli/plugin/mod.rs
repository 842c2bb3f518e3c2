//! `genpipe plugin`: tooling for plugins. `check` inspects and runs a component, `new`
//! scaffolds a project, `precompile` fills the compile cache ahead of time.

mod check;
pub(super) mod new;

pub(super) use check::{CheckArgs, check};

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::runtime::{Digest, Origin, Runtime};

/// Compiles every plugin of the configuration into the compile cache.
pub(super) fn precompile(config: Option<&Path>) -> Result<ExitCode, String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let Some(dir) = &config.runtime.compile_cache_dir else {
        return Err(format!("{}: runtime.compile_cache_dir is empty: the compile cache is off; set a folder", config.source));
    };
    let runtime = Runtime::new(&config.runtime).map_err(|e| format!("creating the wasm engine: {e}"))?;
    println!("compile cache: {}", dir.display());
    for name in config.plugins.keys() {
        let bytes = config.plugin_bytes(name).map_err(|e| e.to_string())?;
        let digest = Digest::of(&bytes);
        let started = std::time::Instant::now();
        let (_, origin) = runtime
            .component(&digest, &bytes)
            .map_err(|e| format!("{}: plugins.{name}: does not compile: {e}", config.source))?;
        let how = match origin {
            Origin::Compiled => "compiled",
            Origin::Cached | Origin::Reused => "already cached",
        };
        println!("  {name:<24} {digest}  {how} in {} ms", started.elapsed().as_millis());
    }
    Ok(ExitCode::SUCCESS)
}

//! Every configuration mistake is refused with the file, the key and the fix.

mod common;

use std::path::Path;
use std::sync::Arc;

use genpipe::state::ledger::MemoryLedger;
use genpipe::{Config, Host};

const PLUGIN: &str = "[plugins.echo]\npath = \"builtin:test-llm\"\nworld = \"llm-step\"\n";

fn parse_error(toml: &str) -> String {
    Config::parse(toml, "bad.toml", Path::new(".")).expect_err("the config must be refused").to_string()
}

fn step(extra: &str) -> String {
    format!("{PLUGIN}[pipelines.p]\n[[pipelines.p.steps]]\nid = \"a\"\nplugin = \"echo\"\nmax_cost = 1\n{extra}\n")
}

async fn load_error(toml: &str, dir: &Path) -> String {
    let config = Config::parse(toml, "bad.toml", dir).unwrap_or_else(|e| panic!("{e}"));
    match Host::with_runtime(common::runtime(), &config, Arc::new(MemoryLedger::new())).await {
        Ok(_) => panic!("the plugins must be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn syntax_and_unknown_keys_name_the_file_and_the_key() {
    let e = parse_error("[plugins.echo]\npath = \"builtin:test-llm\"\nworld = \"llm-step\"\nmemroy_mb = 3\n");
    assert!(e.starts_with("bad.toml: (syntax): ") && e.contains("unknown field `memroy_mb`") && e.contains("memory_mb"), "{e}");
    let e = parse_error("[runtime]\nmax_concurrent_steps = \"lots\"\n");
    assert!(e.contains("bad.toml") && e.contains("max_concurrent_steps") && e.contains("line 2"), "{e}");
    let e = parse_error("[plugins.echo]\npath = \"builtin:test-llm\"\nworld = \"text\"\n");
    assert!(e.contains("unknown variant `text`") && e.contains("llm-step"), "{e}");
}

#[test]
fn missing_files_and_unknown_builtins_say_where_paths_are_resolved() {
    let e = parse_error("[plugins.gone]\npath = \"plugins/gone.wasm\"\nworld = \"llm-step\"\n");
    assert!(e.starts_with("bad.toml: plugins.gone.path: cannot read './plugins/gone.wasm'"), "{e}");
    assert!(e.contains("relative to the config file's folder"), "{e}");
    let e = parse_error("[plugins.x]\npath = \"builtin:nope\"\nworld = \"llm-step\"\n");
    assert!(e.contains("plugins.x.path: no bundled plugin named 'nope'; bundled: llm-markov"), "{e}");
}

#[test]
fn pipeline_mistakes_name_the_step_and_the_fix() {
    let e = parse_error(&format!("{PLUGIN}[pipelines.p]\n[[pipelines.p.steps]]\nid = \"a\"\nplugin = \"ghost\"\nmax_cost = 1\n"));
    assert_eq!(e, "bad.toml: pipelines.p.steps[0].plugin: no plugin named 'ghost'; declare [plugins.ghost] or use one of: echo");
    let e = parse_error(&step("").replace("max_cost = 1", "max_cost = 0"));
    assert_eq!(e, "bad.toml: pipelines.p.steps[0].max_cost: must be at least 1 (the credits the step may spend)");
    let e = parse_error(&step("").replace("id = \"a\"", "id = \"a#1\""));
    assert_eq!(
        e,
        "bad.toml: pipelines.p.steps[0].id: step id 'a#1' may hold only letters, digits, '-' and '_', at most 64 of them \
         (it names the step in URLs and in the credit journal)"
    );
    let e = parse_error(&step("after = [\"nobody\"]"));
    assert_eq!(e, "bad.toml: pipelines.p.steps[0].after: no step with id 'nobody' in this pipeline");
    let e = parse_error(&step("prompt = \"{steps.b.output}\""));
    assert!(e.contains("steps[0].prompt: uses the output of step 'b', which is not in `after`"), "{e}");
    let image = "[plugins.pic]\npath = \"builtin:test-image\"\nworld = \"image-step\"\n\
                 [pipelines.p]\n[[pipelines.p.steps]]\nid = \"a\"\nplugin = \"pic\"\nmax_cost = 1\nparams = { height = 99999 }\n";
    let e = parse_error(image);
    assert!(e.contains("steps[0].params: height must be a whole number from 1 to 4096, got '99999'"), "{e}");
}

#[test]
fn a_cycle_in_after_is_shown_along_its_path() {
    let mut toml = String::from(PLUGIN);
    toml.push_str("[pipelines.p]\n");
    for (id, after) in [("a", "c"), ("b", "a"), ("c", "b")] {
        toml.push_str(&format!("[[pipelines.p.steps]]\nid = \"{id}\"\nplugin = \"echo\"\nmax_cost = 1\nafter = [\"{after}\"]\n"));
    }
    let e = parse_error(&toml);
    assert_eq!(e, "bad.toml: pipelines.p.steps: `after` forms a cycle: a -> c -> b -> a; remove one of these dependencies");
}

#[tokio::test]
async fn plugins_of_the_wrong_world_or_shape_are_refused_at_load() {
    let e = load_error("[plugins.pic]\npath = \"builtin:test-image\"\nworld = \"llm-step\"\n", Path::new(".")).await;
    assert_eq!(
        e,
        "bad.toml: plugins.pic: declared world = \"llm-step\" but the component implements image-step; set world = \"image-step\""
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.wasm"), wat::parse_str("(component)").unwrap()).unwrap();
    std::fs::write(dir.path().join("core.wasm"), wat::parse_str("(module)").unwrap()).unwrap();
    std::fs::write(dir.path().join("junk.wasm"), b"hello").unwrap();
    let e = load_error("[plugins.empty]\npath = \"empty.wasm\"\nworld = \"llm-step\"\n", dir.path()).await;
    assert!(e.contains("plugins.empty: the component does not export the `generate` function of world llm-step"), "{e}");
    let e = load_error("[plugins.core]\npath = \"core.wasm\"\nworld = \"llm-step\"\n", dir.path()).await;
    assert!(e.contains("plugins.core: this is a core wasm module, not a component; build it for wasm32-wasip2"), "{e}");
    let e = load_error("[plugins.junk]\npath = \"junk.wasm\"\nworld = \"llm-step\"\n", dir.path()).await;
    assert!(e.contains("plugins.junk: this is not a WebAssembly component"), "{e}");
}

#[test]
fn the_built_in_config_is_valid() {
    let config = Config::load(None).unwrap();
    assert!(config.pipelines.contains_key("story") && config.pipelines.contains_key("illustrated-story"));
}

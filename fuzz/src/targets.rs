//! The fuzz targets: each feeds one input that strangers control to the code that reads it, and
//! checks what must hold whatever the bytes. A panic is a failure; libFuzzer's limits (time per
//! input, memory) catch hangs and unbounded allocation.
//!
//! Shared by the fuzz binaries (`fuzz/fuzz_targets/`) and by the test that replays every corpus
//! and regression file (`host/tests/fuzz_corpus.rs`).

use std::path::Path;
use std::sync::LazyLock;

use genpipe::Config;
use genpipe::runtime::{Digest, Plugin, Runtime};
use http::{HeaderValue, Uri};

/// A fuzz target: takes any bytes, panics when what must hold does not.
pub type Target = fn(&[u8]);

/// Every target, by the name of its binary and of its corpus folders.
pub const TARGETS: [(&str, Target); 4] =
    [("config", config), ("run_body", run_body), ("resume_after", resume_after), ("plugin", plugin)];

/// `genpipe.toml` as `genpipe validate` loads it: parsed and checked, or refused with an error
/// that names the file, the key and the fix. An accepted configuration is what a reload to itself
/// would keep.
pub fn config(data: &[u8]) {
    // `Config::load` refuses a file that is not UTF-8 before parsing it.
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, "fuzz.toml", Path::new("/nonexistent/genpipe-fuzz")) {
        Ok(config) => assert_eq!(config.restart_changes(&config), Vec::<String>::new()),
        Err(e) => assert!(e.file == "fuzz.toml" && !e.key.is_empty() && !e.message.is_empty(), "{e:?}"),
    }
}

/// The body of `POST /v1/runs`: accepted, or refused with a 400 problem. An accepted body keeps
/// its meaning when re-sent in another formatting: the same pipeline, prompt and parameters, and
/// the same idempotency hash. Except for numbers with a fraction or an exponent: serde_json reads
/// those to within a bit of the nearest float, so they may come back as another one.
pub fn run_body(data: &[u8]) {
    match genpipe::server::parse_start_run(data) {
        Ok((pipeline, input, hash)) => {
            assert!(input.params.keys().all(|key| genpipe::server::openapi::is_id(key)), "{:?}", input.params);
            let value: serde_json::Value = serde_json::from_slice(data).expect("an accepted body is JSON");
            let (pipeline2, input2, hash2) = genpipe::server::parse_start_run(value.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("the body re-serialized is refused: {e:?}"));
            assert_eq!((&pipeline, &input.prompt), (&pipeline2, &input2.prompt));
            assert!(input.params.keys().eq(input2.params.keys()), "{:?} {:?}", input.params, input2.params);
            if !holds_float(&value) {
                assert_eq!((input.params, hash), (input2.params, hash2));
            }
        }
        Err(problem) => assert!(problem.status == 400 && !problem.detail.is_empty(), "{problem:?}"),
    }
}

/// Whether `value` holds a number that serde_json keeps as a float.
fn holds_float(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(items) => items.iter().any(holds_float),
        serde_json::Value::Object(fields) => fields.values().any(holds_float),
        _ => false,
    }
}

/// `Last-Event-ID` and `?after=` of the event stream. The input is the header's value, a newline,
/// then the query string; without a newline there is no header. Bytes that HTTP would not deliver
/// (an invalid header value or URI) are skipped.
pub fn resume_after(data: &[u8]) {
    let (header, query) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (Some(&data[..at]), &data[at + 1..]),
        None => (None, data),
    };
    let Ok(header) = header.map(HeaderValue::from_bytes).transpose() else { return };
    let Ok(uri) = Uri::try_from([&b"/v1/runs/r/events?"[..], query].concat()) else { return };
    match genpipe::server::resume_after(header.as_ref(), &uri) {
        Ok(after) => {
            if let Some(header) = &header {
                let text = header.to_str().expect("an accepted Last-Event-ID is text");
                assert!(text.bytes().all(|b| b.is_ascii_digit()) && text.parse() == Ok(after), "{text:?} -> {after}");
            }
        }
        Err(problem) => assert!(problem.status == 400 && !problem.detail.is_empty(), "{problem:?}"),
    }
}

/// A plugin declared in genpipe.toml, with its limits and a runtime configured as the host's
/// (one instance slot, no compile cache).
static PLUGIN_CONFIG: LazyLock<Config> = LazyLock::new(|| {
    let toml = "[runtime]\nmax_concurrent_steps = 1\ncompile_cache_dir = \"\"\n\
                [plugins.fuzzed]\npath = \"builtin:test-llm\"\nworld = \"llm-step\"\n";
    Config::parse(toml, "fuzz.toml", Path::new(".")).expect("the fuzz target's configuration loads")
});

/// Arbitrary bytes loaded as a plugin, as at startup and by `genpipe plugin check`: compiled,
/// linked against the host functions and checked against the declared world; loaded, or refused
/// with a message. Each input gets a runtime of its own, so that no compiled component outlives it.
pub fn plugin(data: &[u8]) {
    let runtime = Runtime::new(&PLUGIN_CONFIG.runtime).expect("the engine starts");
    match Plugin::load(&runtime, "fuzzed", &PLUGIN_CONFIG.plugins["fuzzed"], data, None) {
        Ok(plugin) => assert_eq!(plugin.digest(), &Digest::of(data)),
        Err(e) => assert!(e.name == "fuzzed" && !e.message.is_empty(), "{e:?}"),
    }
}

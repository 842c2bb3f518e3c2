//! End-to-end: the built `genpipe` binary, run as a user would.

use std::path::Path;
use std::process::{Command, Output};

fn genpipe(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_genpipe")).args(args).current_dir(dir).output().expect("running genpipe")
}

fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).expect("the PNG decodes");
    (frame.width, frame.height)
}

#[test]
fn run_story_streams_text_writes_a_png_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let out = genpipe(&["run", "story", "--prompt", "The queen of hearts", "--out", "result"], dir.path());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);

    let text = std::fs::read_to_string(dir.path().join("result/text.txt")).unwrap();
    assert!(text.split_whitespace().count() > 20, "{text}");
    assert_eq!(stdout.trim(), text.trim(), "the streamed text is the step's output");
    assert_eq!(png_size(&dir.path().join("result/image.png")), (512, 384));

    assert!(stderr.contains("completed"), "{stderr}");
    let summary = stderr.lines().find(|l| l.starts_with("credits: ")).expect("a credits line");
    let posted: u64 = summary.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(posted > 0);
    assert!(summary.contains(&format!("{} left (account demo)", 100_000 - posted)), "{summary}");
}

#[test]
fn illustrated_story_feeds_the_text_into_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["run", "illustrated-story", "-p", "A storm at sea", "--param", "width=96", "--param", "height=64"];
    let out = genpipe(&args, dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(png_size(&dir.path().join("out/image.png")), (96, 64));
}

#[test]
fn validate_lists_plugins_and_pipelines() {
    let dir = tempfile::tempdir().unwrap();
    let out = genpipe(&["validate"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("llm-markov") && stdout.contains("illustrated-story"), "{stdout}");
}

#[test]
fn bad_input_exits_non_zero_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[plugins.x]\npath = \"x.wasm\"\nworld = \"llm-step\"\n").unwrap();
    let out = genpipe(&["validate", "--config", "bad.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml: plugins.x.path: cannot read"));

    let out = genpipe(&["run", "nope", "-p", "x"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pipeline named 'nope'; available: illustrated-story, story"));

    let out = genpipe(&["run", "story", "-p", "x", "--param", "width=0"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("step 'image': width must be a whole number from 1 to 4096, got '0'"));
}

#[test]
fn precompile_fills_the_cache_that_validate_then_loads_from() {
    let dir = tempfile::tempdir().unwrap();
    let out = genpipe(&["plugin", "precompile"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("llm-markov") && stdout.contains("compiled in"), "{stdout}");
    assert!(dir.path().join("data/compiled").read_dir().unwrap().count() >= 2, "the cache folder holds the plugins");

    let out = genpipe(&["validate"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    let plugins: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with("plugin ")).collect();
    assert_eq!(plugins.len(), 2, "{stdout}");
    for line in plugins {
        assert!(line.contains("sha256:") && line.ends_with("from the compile cache"), "{line}");
    }
}

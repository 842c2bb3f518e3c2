//! End-to-end: the plugin author's tools. `genpipe plugin check` passes on every example plugin
//! and fails, naming the problem, on broken components; every `genpipe plugin new` scaffold
//! builds and passes `check`.
//!
//! The Python and JavaScript examples and scaffolds need componentize-py and componentize-js,
//! which `scripts/test.sh` installs and uses to build the examples into
//! `GENPIPE_GUEST_EXAMPLES`. Without that variable those cases are skipped with a note, unless
//! `GENPIPE_REQUIRE_GUEST_EXAMPLES=1` (set by the test command) makes their absence a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn genpipe(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_genpipe")).args(args).current_dir(dir).output().expect("running genpipe")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The folder of the built Python and JavaScript examples, if the test command built them.
fn guest_examples() -> Option<PathBuf> {
    match std::env::var_os("GENPIPE_GUEST_EXAMPLES") {
        Some(dir) => Some(PathBuf::from(dir)),
        None if std::env::var_os("GENPIPE_REQUIRE_GUEST_EXAMPLES").is_some() => {
            panic!("GENPIPE_GUEST_EXAMPLES is not set: scripts/build-guest-examples.sh must run first")
        }
        None => {
            eprintln!("note: the Python and JavaScript examples are not built (run ./scripts/test.sh); skipping them");
            None
        }
    }
}

/// Where the test command installed componentize-py and componentize-js.
fn tools() -> PathBuf {
    std::env::var_os("GENPIPE_TOOLS").map_or_else(|| PathBuf::from("/var/cache/genpipe-tools"), PathBuf::from)
}

#[test]
fn check_passes_on_every_example_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let mut examples: Vec<(PathBuf, Vec<&str>, &str)> = Vec::new();
    for (name, args, version) in [
        ("llm-markov", vec![], "0.1.0"),
        ("image-procedural", vec!["--param", "width=32", "--param", "height=24"], "0.1.0"),
        ("test-llm", vec![], "0.1.0"),
        ("test-image", vec![], "0.1.0"),
        ("test-v2", vec![], "0.2.0"),
    ] {
        let file = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&file, genpipe::builtin::plugin(name).unwrap()).unwrap();
        examples.push((file, args, version));
    }
    if let Some(guests) = guest_examples() {
        examples.push((guests.join("python_llm.wasm"), vec!["--prompt", "the old lighthouse and the quiet sea"], "0.1.0"));
        examples.push((guests.join("js_image.wasm"), vec!["--param", "width=40", "--param", "height=30"], "0.1.0"));
    }
    for (file, extra, version) in examples {
        let mut args = vec!["plugin", "check", file.to_str().unwrap()];
        args.extend(extra);
        let out = genpipe(&args, dir.path());
        let shown = text(&out);
        assert!(out.status.success(), "{}: {shown}", file.display());
        assert!(shown.contains("targets: world") && shown.contains(&format!("genpipe:plugin@{version}")), "{shown}");
        assert!(shown.contains("completed: in") && shown.contains("ok: the plugin loads and runs"), "{shown}");
    }
    assert!(dir.path().join("check-output.png").exists(), "an image output is saved");
}

#[test]
fn check_fails_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        file.to_str().unwrap().to_string()
    };
    let test_llm = genpipe::builtin::plugin("test-llm").unwrap();
    let cases = [
        (
            write(
                "other-world.wasm",
                &wat::parse_str(
                    r#"(component
                         (core module $m (func (export "f")))
                         (core instance $i (instantiate $m))
                         (func $run (canon lift (core func $i "f")))
                         (export "run" (func $run)))"#,
                )
                .unwrap(),
            ),
            vec![],
            "exports no `generate` function of world llm-step or image-step",
        ),
        (
            write(
                "vault.wasm",
                &wat::parse_str(r#"(component (import "acme:secret/vault" (instance (export "open" (func)))))"#).unwrap(),
            ),
            vec![],
            "acme:secret/vault                            NOT PROVIDED",
        ),
        (write("core.wasm", &wat::parse_str("(module)").unwrap()), vec![], "it is not a valid component"),
        (write("truncated.wasm", &test_llm[..test_llm.len() / 2]), vec![], "it is not a valid component"),
        (
            write("hostile.wasm", genpipe::builtin::plugin("test-hostile").unwrap()),
            vec!["--param", "behaviour=trap"],
            "generate did not complete (trap): step 'generate' (plugin plugin) failed: the plugin trapped",
        ),
        (
            write("wrong.wasm", test_llm),
            vec!["--world", "image-step"],
            "--world image-step was asked, but the component implements llm-step",
        ),
    ];
    for (file, extra, problem) in cases {
        let mut args = vec!["plugin", "check", file.as_str()];
        args.extend(extra);
        let out = genpipe(&args, dir.path());
        let shown = text(&out);
        assert_eq!(out.status.code(), Some(1), "{file}: {shown}");
        assert!(shown.contains(problem), "{file}: expected '{problem}' in:\n{shown}");
    }
}

/// Builds the scaffold in `dir` with `command`, which writes `component`.
fn build(dir: &Path, command: &mut Command, component: PathBuf) -> PathBuf {
    let out = command.current_dir(dir).output().expect("running the build");
    assert!(out.status.success(), "building {}: {}", dir.display(), text(&out));
    assert!(component.exists(), "{} was built", component.display());
    component
}

#[test]
fn every_scaffold_builds_and_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut languages = vec!["rust"];
    if guest_examples().is_some() {
        languages.extend(["python", "js"]);
    }
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| dir.path().join("target"), |t| PathBuf::from(t).join("scaffolds"));
    for lang in languages {
        for world in ["llm-step", "image-step"] {
            let name = format!("my-{lang}-{}", &world[..world.len() - 5]);
            let out = genpipe(&["plugin", "new", "--lang", lang, "--world", world, &name], dir.path());
            assert!(out.status.success(), "{}", text(&out));
            let project = dir.path().join(&name);
            let component = match lang {
                "rust" => build(
                    &project,
                    Command::new(env!("CARGO"))
                        .args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"])
                        .arg(&target),
                    target.join(format!("wasm32-wasip2/release/{}.wasm", name.replace('-', "_"))),
                ),
                "python" => build(
                    &project,
                    Command::new("sh").arg("build.sh").env("PATH", path_with(&tools().join("venv/bin"))),
                    project.join(format!("{name}.wasm")),
                ),
                _ => {
                    std::os::unix::fs::symlink(tools().join("node/node_modules"), project.join("node_modules")).unwrap();
                    build(&project, Command::new("node").arg("build.mjs"), project.join(format!("{name}.wasm")))
                }
            };
            let out = genpipe(&["plugin", "check", component.to_str().unwrap(), "--prompt", "one two three"], &project);
            let shown = text(&out);
            assert!(out.status.success(), "{name}: {shown}");
            assert!(shown.contains(&format!("targets: world {world} of genpipe:plugin@0.1.0")), "{name}: {shown}");
        }
    }
}

/// `PATH` with `folder` first.
fn path_with(folder: &Path) -> std::ffi::OsString {
    let mut paths = vec![folder.to_path_buf()];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(paths).unwrap()
}

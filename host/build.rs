//! Builds the bundled plugins (`plugins/`) for `wasm32-wasip2` and embeds them in the host, so
//! the binary, its tests and an installed copy always carry the example plugins.
//!
//! The guest workspace gets its own target directory next to the host's (`target/wasm-plugins`),
//! shared by every host profile, so it is built once and then only when its sources change.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest crates embedded in the host, by package name.
const BUNDLED: &[&str] =
    &["llm-markov", "image-procedural", "llm-openai", "image-openai", "test-llm", "test-image", "test-hostile", "test-v2"];
const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let plugins = root.join("plugins");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());

    for watched in ["Cargo.toml", "Cargo.lock", "sdk"].iter().chain(BUNDLED) {
        println!("cargo:rerun-if-changed={}", plugins.join(watched).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    let target_dir = guest_target_dir(&out_dir);
    build_guests(&plugins, &target_dir);

    let mut generated = String::from("/// The plugins bundled into this binary: (name, component bytes).\n");
    generated.push_str("pub const BUNDLED: &[(&str, &[u8])] = &[\n");
    for name in BUNDLED {
        let file = format!("{}.wasm", name.replace('-', "_"));
        let built = target_dir.join(TARGET).join("release").join(&file);
        let embedded = out_dir.join(&file);
        std::fs::copy(&built, &embedded).unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), embedded.display()));
        writeln!(generated, "    ({name:?}, include_bytes!({:?})),", embedded.display().to_string()).unwrap();
    }
    generated.push_str("];\n");
    std::fs::write(out_dir.join("bundled_plugins.rs"), generated).unwrap();
}

/// `target/wasm-plugins` when OUT_DIR has cargo's usual shape (`target/<profile>/build/<pkg>/out`),
/// so every profile shares one guest build; OUT_DIR itself otherwise.
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    let build_dir = out_dir.ancestors().nth(2);
    match (build_dir, out_dir.ancestors().nth(4)) {
        (Some(build), Some(target)) if build.file_name() == Some("build".as_ref()) => target.join("wasm-plugins"),
        _ => out_dir.join("wasm-plugins"),
    }
}

fn build_guests(plugins: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(plugins).args(["build", "--release", "--locked", "--target", TARGET, "--target-dir"]).arg(target_dir);
    for name in BUNDLED {
        command.args(["-p", name]);
    }
    // The host's own flags and wrappers (clippy, coverage) must not leak into the guest build.
    for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "RUSTC_WORKSPACE_WRAPPER", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"] {
        command.env_remove(var);
    }
    let status = command.status().expect("running cargo to build the bundled plugins");
    if !status.success() {
        panic!(
            "building the bundled plugins in {} failed (see the errors above). If the error is about a \
             missing target, install it with `rustup target add {TARGET}`.",
            plugins.display()
        );
    }
}

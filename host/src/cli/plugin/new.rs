//! `genpipe plugin new`: a working plugin project, with its build command and a README.
//!
//! Every project carries the WIT contract it is built against (`wit/`, or the vendored SDK's
//! `wit/` in Rust), so it builds anywhere, without this repository. As generated, it builds and
//! passes `genpipe plugin check`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::World;

/// The languages `plugin new` scaffolds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    /// Rust, with the genpipe SDK (cargo, the wasm32-wasip2 target).
    Rust,
    /// Python, with componentize-py.
    Python,
    /// JavaScript, with componentize-js.
    Js,
}

/// The WIT contract, as `wit/` holds it.
const WIT: &[(&str, &str)] = &[
    ("types.wit", include_str!("../../../../wit/0.1.0/types.wit")),
    ("worlds.wit", include_str!("../../../../wit/0.1.0/worlds.wit")),
    ("deps/http.wit", include_str!("../../../../wit/0.1.0/deps/http.wit")),
    ("deps/io.wit", include_str!("../../../../wit/0.1.0/deps/io.wit")),
    ("deps/clocks.wit", include_str!("../../../../wit/0.1.0/deps/clocks.wit")),
];

/// The Rust SDK's sources.
const SDK: &[(&str, &str)] = &[
    ("src/lib.rs", include_str!("../../../../plugins/sdk/src/lib.rs")),
    ("src/http.rs", include_str!("../../../../plugins/sdk/src/http.rs")),
    ("src/progress.rs", include_str!("../../../../plugins/sdk/src/progress.rs")),
    ("src/settings.rs", include_str!("../../../../plugins/sdk/src/settings.rs")),
    ("src/stream.rs", include_str!("../../../../plugins/sdk/src/stream.rs")),
    ("src/worlds.rs", include_str!("../../../../plugins/sdk/src/worlds.rs")),
];

/// The files of a project in `lang` for `world`, as (path, template).
fn files(lang: Language, world: World) -> Vec<(String, &'static str)> {
    let llm = world == World::LlmStep;
    let mut files: Vec<(String, &'static str)> = match lang {
        Language::Rust => {
            let mut files = vec![
                ("Cargo.toml".to_string(), include_str!("../../../templates/rust/Cargo.toml")),
                (
                    "src/lib.rs".into(),
                    if llm {
                        include_str!("../../../templates/rust/llm.rs")
                    } else {
                        include_str!("../../../templates/rust/image.rs")
                    },
                ),
                ("README.md".into(), include_str!("../../../templates/rust/README.md")),
                ("genpipe-plugin-sdk/Cargo.toml".into(), include_str!("../../../templates/rust/sdk-Cargo.toml")),
            ];
            files.extend(SDK.iter().map(|(path, text)| (format!("genpipe-plugin-sdk/{path}"), *text)));
            files.extend(WIT.iter().map(|(path, text)| (format!("genpipe-plugin-sdk/wit/{path}"), *text)));
            files.push((".gitignore".into(), "/target\n"));
            return files;
        }
        Language::Python => vec![
            (
                "app.py".to_string(),
                if llm {
                    include_str!("../../../templates/python/llm.py")
                } else {
                    include_str!("../../../templates/python/image.py")
                },
            ),
            ("build.sh".into(), include_str!("../../../templates/python/build.sh")),
            ("README.md".into(), include_str!("../../../templates/python/README.md")),
            (".gitignore".into(), "*.wasm\n__pycache__/\n"),
        ],
        Language::Js => vec![
            (
                "plugin.js".to_string(),
                if llm { include_str!("../../../templates/js/llm.js") } else { include_str!("../../../templates/js/image.js") },
            ),
            ("build.mjs".into(), include_str!("../../../templates/js/build.mjs")),
            ("package.json".into(), include_str!("../../../templates/js/package.json")),
            ("README.md".into(), include_str!("../../../templates/js/README.md")),
            (".gitignore".into(), "*.wasm\nnode_modules/\n"),
        ],
    };
    files.extend(WIT.iter().map(|(path, text)| (format!("wit/{path}"), *text)));
    files
}

/// Fills a template's placeholders; the vendored SDK reads its WIT from its own `wit/`.
fn render(path: &str, template: &str, name: &str, world: World) -> String {
    let text =
        template.replace("{{name}}", name).replace("{{crate}}", &name.replace('-', "_")).replace("{{world}}", &world.to_string());
    if path == "genpipe-plugin-sdk/src/lib.rs" { text.replace("\"../../wit/0.1.0\"", "\"wit\"") } else { text }
}

/// Writes a new project `name` for `world` in `lang` into the folder `name`.
pub(in crate::cli) fn scaffold(name: &str, lang: Language, world: World) -> Result<ExitCode, String> {
    if name.is_empty()
        || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.starts_with('-')
    {
        return Err(format!("'{name}' is not a plugin name; use lower-case letters, digits and '-', such as my-plugin"));
    }
    let root = PathBuf::from(name);
    if root.exists() {
        return Err(format!("'{}' already exists; pick another name or remove it", root.display()));
    }
    for (path, template) in files(lang, world) {
        let file = root.join(&path);
        write(&file, &render(&path, template, name, world))?;
    }
    #[cfg(unix)]
    if lang == Language::Python {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(root.join("build.sh"), std::fs::Permissions::from_mode(0o755));
    }
    let build = match lang {
        Language::Rust => "cargo build --release --target wasm32-wasip2".to_string(),
        Language::Python => "./build.sh".into(),
        Language::Js => "npm install && npm run build".into(),
    };
    println!("created {name}/, a {world} plugin in {lang:?}; build it with `cd {name} && {build}` (see its README)");
    Ok(ExitCode::SUCCESS)
}

fn write(file: &Path, text: &str) -> Result<(), String> {
    if let Some(folder) = file.parent() {
        std::fs::create_dir_all(folder).map_err(|e| format!("cannot create '{}': {e}", folder.display()))?;
    }
    std::fs::write(file, text).map_err(|e| format!("cannot write '{}': {e}", file.display()))
}

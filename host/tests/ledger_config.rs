//! The `[ledger]` section: defaults, checks with clear errors, and where the SQLite file goes.

use std::path::Path;
use std::process::Command;

use genpipe::Config;
use genpipe::config::{DEFAULT_LEDGER_PATH, LedgerKind};
use genpipe::state::ledger;

fn error(toml: &str) -> String {
    Config::parse(toml, "bad.toml", Path::new(".")).unwrap_err().to_string()
}

#[test]
fn defaults_to_sqlite_under_data() {
    let config = Config::parse("", "empty.toml", Path::new(".")).unwrap();
    assert_eq!(config.ledger.kind, LedgerKind::Sqlite);
    assert_eq!(config.ledger.path(), Path::new(DEFAULT_LEDGER_PATH));
    assert_eq!(config.ledger.hold_ttl().as_secs(), 3600);
}

#[test]
fn bad_ledger_sections_name_the_key_and_the_fix() {
    let kind = error("[ledger]\nkind = \"mysql\"\n");
    assert!(
        kind.starts_with("bad.toml: (syntax):")
            && kind.contains("unknown variant `mysql`, expected one of `sqlite`, `memory`, `postgres`")
    );
    assert!(error("[ledger]\nfile = \"x.db\"\n").contains("unknown field `file`"));
    assert_eq!(
        error("[ledger]\nkind = \"memory\"\npath = \"x.db\"\n"),
        "bad.toml: ledger.path: is only used with kind = \"sqlite\"; remove it, or set kind = \"sqlite\""
    );
    assert_eq!(error("[ledger]\npath = \"\"\n"), "bad.toml: ledger.path: must name a file, such as \"data/genpipe.db\"");
    assert_eq!(
        error("[ledger]\nhold_ttl_secs = 0\n"),
        "bad.toml: ledger.hold_ttl_secs: 0 is out of range; give 1 to 2592000 (longer than your longest run)"
    );
}

#[tokio::test]
async fn a_relative_path_is_relative_to_the_config_files_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("genpipe.toml"), "[ledger]\npath = \"state/credits.db\"\n").unwrap();
    let config = Config::load(Some(&dir.path().join("genpipe.toml"))).unwrap();
    let opened = ledger::open(&config.ledger, &config.base_dir).await.unwrap();
    opened.grant("g", "acme", 3).await.unwrap();
    assert!(dir.path().join("state/credits.db").is_file());
}

#[test]
fn the_credits_commands_refuse_a_memory_ledger() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("genpipe.toml"), "[ledger]\nkind = \"memory\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_genpipe"))
        .args(["credits", "verify", "--config", "genpipe.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("genpipe.toml: ledger.kind: credits are kept in memory"), "{stderr}");
}

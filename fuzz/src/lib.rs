//! Fuzz targets of the inputs of genpipe that strangers control: `genpipe.toml`, the body of
//! `POST /v1/runs`, `Last-Event-ID` and `?after=`, and a plugin's bytes. Run them with
//! `scripts/fuzz.sh`; `host/tests/fuzz_corpus.rs` replays their corpus and regressions.

mod targets;

pub use targets::{TARGETS, config, plugin, resume_after, run_body};

//! A plugin's `log` calls land in the host's tracing, inside the run and step spans, tagged with
//! the plugin, run and step.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use genpipe::RunInput;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_log_lines_carry_plugin_run_and_step() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt().with_ansi(false).with_max_level(tracing::Level::INFO).with_writer(move || writer.clone()).init();

    let host = common::host(
        r#"
        [[accounts]]
        id = "acme"
        credits = 10

        [pipelines.p]
        [[pipelines.p.steps]]
        id = "talker"
        plugin = "test-llm"
        max_cost = 1
        params = { log = "hello from the plugin" }
        "#,
    )
    .await;
    let run = host.start_run("acme", "p", RunInput::default()).await.unwrap();
    run.wait().await;

    let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line =
        output.lines().find(|l| l.contains("hello from the plugin")).unwrap_or_else(|| panic!("no plugin line in:\n{output}"));
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains(&format!("run{{run={} pipeline=p account=acme}}", run.id())), "inside the run span: {line}");
    assert!(line.contains("step{step=talker plugin=test-llm}"), "inside the step span: {line}");
    assert!(line.contains("genpipe::plugin"), "{line}");
    assert!(line.contains(&format!("run={}", run.id())) && line.contains("step=talker"), "{line}");
}

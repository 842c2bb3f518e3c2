//! How `genpipe run` shows a run while it happens.
//!
//! - The streamed text goes to stdout, as it arrives.
//! - On a terminal (stderr is one), each step has a live progress bar on stderr (its stage,
//!   progress and message, then how it ended). When stdout is the same terminal, the text's
//!   finished lines are printed above the bars and the line being written is shown below them,
//!   so that the two never run into each other.
//! - Without a terminal, step progress is plain lines on stderr: a step's stage changes and its
//!   end, never escape codes.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::state::runs::{Stage, StepStatus};

/// Where a run's progress and text go.
pub(super) enum RunDisplay {
    /// Live bars on a terminal.
    Bars {
        bars: MultiProgress,
        steps: HashMap<String, ProgressBar>,
        /// The line being written, when stdout shares the terminal.
        line: Option<(ProgressBar, String)>,
    },
    /// Plain lines.
    Lines {
        /// The last stage shown for each step.
        stages: HashMap<String, Stage>,
        wrote_text: bool,
    },
}

impl RunDisplay {
    /// A display for a run of `steps`: bars when stderr is a terminal, lines otherwise.
    pub fn new(steps: &[String]) -> RunDisplay {
        if !std::io::stderr().is_terminal() {
            return RunDisplay::Lines { stages: HashMap::new(), wrote_text: false };
        }
        let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos:>3}% {msg}")
            .expect("a valid template")
            .progress_chars("=> ");
        let width = steps.iter().map(String::len).max().unwrap_or(0);
        let steps = steps
            .iter()
            .map(|id| {
                let bar = bars.add(ProgressBar::new(100).with_style(style.clone()).with_prefix(format!("{id:>width$}")));
                bar.set_message("waiting");
                (id.clone(), bar)
            })
            .collect();
        let line = std::io::stdout().is_terminal().then(|| {
            let bar =
                bars.add(ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{msg}").expect("a valid template")));
            (bar, String::new())
        });
        RunDisplay::Bars { bars, steps, line }
    }

    /// A chunk of streamed text.
    pub fn text(&mut self, chunk: &str) {
        match self {
            RunDisplay::Bars { bars, line: Some((bar, current)), .. } => {
                current.push_str(chunk);
                while let Some(end) = current.find('\n') {
                    let finished: String = current.drain(..=end).collect();
                    let _ = bars.println(finished.trim_end_matches('\n'));
                }
                bar.set_message(current.clone());
            }
            RunDisplay::Bars { line: None, .. } => print_raw(chunk),
            RunDisplay::Lines { wrote_text, .. } => {
                *wrote_text = true;
                print_raw(chunk);
            }
        }
    }

    /// A step's progress report.
    pub fn progress(&mut self, step: &str, stage: Stage, progress: f32, message: &str) {
        match self {
            RunDisplay::Bars { steps, .. } => {
                if let Some(bar) = steps.get(step) {
                    bar.set_position((progress * 100.0).round() as u64);
                    bar.set_message(format!("{stage}: {message}"));
                }
            }
            RunDisplay::Lines { stages, wrote_text } => {
                if stages.insert(step.to_string(), stage) != Some(stage) {
                    line_break(wrote_text);
                    eprintln!("[{step}] {stage} {:.0}% {message}", progress * 100.0);
                }
            }
        }
    }

    /// A step ended.
    pub fn step_ended(&mut self, step: &str, status: StepStatus, error: Option<&str>) {
        let error = error.map(|e| format!(": {e}")).unwrap_or_default();
        match self {
            RunDisplay::Bars { steps, .. } => {
                if let Some(bar) = steps.get(step) {
                    if status == StepStatus::Completed {
                        bar.set_position(100);
                    }
                    bar.finish_with_message(format!("{status}{error}"));
                }
            }
            RunDisplay::Lines { wrote_text, .. } => {
                line_break(wrote_text);
                eprintln!("[{step}] {status}{error}");
            }
        }
    }

    /// The run ended: the line being written is printed, the bars stay as they ended.
    pub fn finish(self) {
        match self {
            RunDisplay::Bars { bars, line, .. } => {
                if let Some((bar, current)) = line {
                    bar.finish_and_clear();
                    if !current.is_empty() {
                        let _ = bars.println(&current);
                    }
                }
            }
            RunDisplay::Lines { wrote_text: true, .. } => println!(),
            RunDisplay::Lines { .. } => {}
        }
    }
}

fn print_raw(chunk: &str) {
    let mut stdout = std::io::stdout();
    let _ = write!(stdout, "{chunk}");
    let _ = stdout.flush();
}

/// Ends the text's current line before a progress line, when stdout and stderr share a file.
fn line_break(wrote_text: &mut bool) {
    if *wrote_text && std::io::stdout().is_terminal() {
        println!();
        *wrote_text = false;
    }
}

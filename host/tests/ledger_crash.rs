//! Crash: `genpipe run` charges against the SQLite ledger and is killed with SIGKILL at a random
//! moment (while starting, or after a random number of charges), ten times in a row; after each
//! kill a restart (another `genpipe run`, which recovers at startup) must leave no hold pending,
//! `genpipe credits verify` must pass, and every charge the killed process had acknowledged
//! must be in the journal, its hold resolved as the charging policy says.
//!
//! The pipeline's steps charge 1 credit per word, then print the word: each word on the child's
//! stdout is a charge the ledger had acknowledged.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const WORDS: usize = 250;
const STEPS: u64 = 3;

fn config(policy: &str) -> String {
    format!(
        r#"
[ledger]
kind = "sqlite"
path = "state/ledger.db"

[credits]
on_failure = "{policy}"

[[accounts]]
id = "crash"
credits = 100000000

[plugins.test-llm]
path = "builtin:test-llm"
world = "llm-step"
timeout_ms = 60000

[pipelines.chatter]
steps = [
    {{ id = "a", plugin = "test-llm", max_cost = {WORDS}, params = {{ behaviour = "chunks" }} }},
    {{ id = "b", plugin = "test-llm", max_cost = {WORDS}, params = {{ behaviour = "chunks" }} }},
    {{ id = "c", plugin = "test-llm", max_cost = {WORDS}, params = {{ behaviour = "chunks" }} }},
]

[pipelines.ping]
steps = [{{ id = "p", plugin = "test-llm", max_cost = 1, params = {{ amount = 1 }} }}]
"#
    )
}

fn genpipe(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_genpipe")).args(args).current_dir(dir).output().expect("running genpipe")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `genpipe run chatter` child and what it printed so far.
struct Victim {
    child: Child,
    words: Arc<AtomicU64>,
    run_id: Arc<Mutex<Option<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Victim {
    fn spawn(dir: &Path) -> Victim {
        let prompt = "w ".repeat(WORDS);
        let mut child = Command::new(env!("CARGO_BIN_EXE_genpipe"))
            .args(["run", "chatter", "--config", "genpipe.toml", "--prompt", &prompt])
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting genpipe run");
        let words = Arc::new(AtomicU64::new(0));
        let run_id = Arc::new(Mutex::new(None));
        let mut stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let counted = Arc::clone(&words);
        let stdout_reader = std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buffer) {
                let spaces = buffer[..n].iter().filter(|&&b| b == b' ').count() as u64;
                counted.fetch_add(spaces, Ordering::SeqCst);
            }
        });
        let found = Arc::clone(&run_id);
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(id) = line.strip_prefix("run ").and_then(|rest| rest.split_whitespace().next())
                    && line.contains("started")
                {
                    *found.lock().unwrap() = Some(id.to_string());
                }
            }
        });
        Victim { child, words, run_id, readers: vec![stdout_reader, stderr_reader] }
    }

    /// SIGKILLs the child; returns the words it printed (its acknowledged charges) and its run.
    fn kill(mut self) -> (u64, Option<String>) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
        for reader in self.readers {
            reader.join().unwrap();
        }
        let run_id = self.run_id.lock().unwrap().clone();
        (self.words.load(Ordering::SeqCst), run_id)
    }
}

/// Runs `credits verify`, asserting it passes; returns the number of open holds.
fn verify(dir: &Path) -> u64 {
    let out = genpipe(dir, &["credits", "verify", "--config", "genpipe.toml"]);
    let report = text(&out.stdout);
    assert!(out.status.success(), "credits verify failed:\n{report}{}", text(&out.stderr));
    let open = report.lines().find_map(|l| l.trim().strip_prefix("holds: ")).expect("a holds line");
    open.split(['(', ' ']).nth(2).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("open holds in '{open}'"))
}

/// The journal entries of `run`: (kind, amount).
fn history(dir: &Path, run: &str) -> Vec<(String, u64)> {
    let out = genpipe(dir, &["credits", "history", "crash", "--run", run, "--config", "genpipe.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<_> = line.split_whitespace().collect();
            (fields[2].to_string(), fields[3].parse().unwrap())
        })
        .collect()
}

#[test]
fn killed_runs_leave_no_pending_hold_and_lose_no_acknowledged_charge() {
    let seed = std::env::var("GENPIPE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed} (set GENPIPE_CRASH_SEED to replay)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut mid_run_kills = 0;
    for round in 0..10 {
        let policy = if round % 2 == 0 { "release" } else { "post-charged" };
        std::fs::write(dir.join("genpipe.toml"), config(policy)).unwrap();

        let victim = Victim::spawn(dir);
        let started = Instant::now();
        if rng.u8(..10) < 3 {
            // While it starts: loading plugins, recovering, reserving.
            std::thread::sleep(Duration::from_millis(rng.u64(0..400)));
        } else {
            let target = rng.u64(1..STEPS * WORDS as u64);
            while victim.words.load(Ordering::SeqCst) < target && started.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let (words, run) = victim.kill();
        mid_run_kills += u64::from(words > 0 && words < STEPS * WORDS as u64);
        println!("round {round} ({policy}): killed after {:?}, {words} words printed, run {run:?}", started.elapsed());
        verify(dir);

        // The restart: another process on the same ledger, which recovers at startup.
        let restart = genpipe(dir, &["run", "ping", "--prompt", "x", "--config", "genpipe.toml", "--out", "out"]);
        assert!(restart.status.success(), "the restart failed: {}", text(&restart.stderr));
        assert_eq!(verify(dir), 0, "round {round}: no hold stays pending after recovery");
        let balance = text(&genpipe(dir, &["credits", "balance", "crash", "--config", "genpipe.toml"]).stdout);
        assert!(balance.contains(", held 0,"), "{balance}");

        let Some(run) = run else {
            assert_eq!(words, 0, "nothing is charged before the run started");
            continue;
        };
        let entries = history(dir, &run);
        let sum = |kind: &str| entries.iter().filter(|(k, _)| k == kind).map(|(_, a)| a).sum::<u64>();
        let charges = entries.iter().filter(|(k, _)| k == "charge").count() as u64;
        assert!(charges >= words, "round {round}: {words} acknowledged charges, {charges} in the journal: {entries:?}");
        assert_eq!(sum("hold"), STEPS * WORDS as u64, "{entries:?}");
        let completed = charges == STEPS * WORDS as u64 && sum("post") == charges;
        let posted = if policy == "post-charged" || completed { charges } else { 0 };
        assert_eq!(sum("post"), posted, "round {round}: the hold is resolved as the policy says: {entries:?}");
        assert_eq!(sum("release"), STEPS * WORDS as u64 - posted, "{entries:?}");
    }
    assert!(mid_run_kills > 0, "at least one kill landed in the middle of a run");
}

//! Ledger throughput: cycles of reserve + 3 charges + settle per second, on one hot account and
//! on 1,000 accounts, from 1 and 64 concurrent tasks, for the memory ledger, the SQLite ledger
//! with group commit, and the SQLite ledger with one transaction per operation (the naive
//! baseline), all in one run; then single-threaded charges per second on the memory ledger.
//! SQLite files are on the temp folder's file system, with an fsync on every commit. The
//! backends take turns at each case, three times, and the table shows each one's median run.
//!
//! `cargo bench --bench ledger`; `cargo bench --bench ledger -- group` runs only the backends
//! whose name contains "group". With `GENPIPE_BENCH_QUICK=1` (CI runs every bench once through
//! `cargo test --all-targets`) each case runs two cycles a task, on 10 accounts instead of 1,000,
//! and the figures mean nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use genpipe::state::ledger::{Commit, Ledger, MAX_CREDITS, MemoryLedger, SqliteLedger, SqliteOptions};

/// What each hold reserves, and what its three charges take.
const HOLD: u64 = 10;
const CHARGES: [u64; 3] = [1, 2, 3];
const TTL: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Memory,
    GroupCommit,
    Naive,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::GroupCommit => "sqlite, group commit",
            Backend::Naive => "sqlite, 1 transaction per op",
        }
    }

    async fn open(self, dir: &std::path::Path, case: usize) -> Arc<dyn Ledger> {
        let path = dir.join(format!("case{case}.db"));
        match self {
            Backend::Memory => Arc::new(MemoryLedger::new()),
            Backend::GroupCommit => Arc::new(SqliteLedger::open(path, SqliteOptions::default()).await.unwrap()),
            Backend::Naive => Arc::new(SqliteLedger::open(path, SqliteOptions { commit: Commit::EachOperation }).await.unwrap()),
        }
    }
}

/// How long a case runs, or how many cycles each task does in quick mode.
enum Budget {
    For(Duration),
    Cycles(u64),
}

/// One cycle: reserve, three charges, settle.
async fn cycle(ledger: &dyn Ledger, account: &str, hold: &str) {
    ledger.reserve(hold, account, HOLD, TTL).await.unwrap();
    for (n, amount) in CHARGES.iter().enumerate() {
        ledger.charge(hold, &format!("step#{n}"), *amount, "token").await.unwrap();
    }
    let settled = ledger.settle(hold).await.unwrap();
    assert_eq!(settled.posted, CHARGES.iter().sum::<u64>());
}

/// CPU time the process used so far, user and system, on every thread.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Runs `tasks` tasks doing cycles on `accounts` accounts; returns cycles per second and the
/// CPU time (all threads) per cycle.
async fn run_case(ledger: Arc<dyn Ledger>, accounts: usize, tasks: usize, budget: &Budget) -> (f64, Duration) {
    // All at once, so that group commit takes them together (the naive ledger commits each).
    let grants = (0..accounts).map(|a| {
        let ledger = Arc::clone(&ledger);
        async move { ledger.grant(&format!("g{a}"), &format!("acct{a}"), MAX_CREDITS / accounts as u64).await }
    });
    futures::future::try_join_all(grants).await.unwrap();
    let (start, cpu) = (Instant::now(), cpu_time());
    let deadline = match budget {
        Budget::For(d) => Some(start + *d),
        Budget::Cycles(_) => None,
    };
    let limit = match budget {
        Budget::Cycles(n) => *n,
        Budget::For(_) => u64::MAX,
    };
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move {
                let mut done = 0u64;
                while done < limit && deadline.is_none_or(|d| Instant::now() < d) {
                    let account = format!("acct{}", (task + done as usize * tasks) % accounts);
                    // Named like the host names runs: time-ordered ids.
                    cycle(&*ledger, &account, &format!("run_{}", uuid::Uuid::now_v7().simple())).await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut cycles = 0;
    for handle in handles {
        cycles += handle.await.unwrap();
    }
    let (elapsed, cpu) = (start.elapsed(), cpu_time() - cpu);
    let totals = ledger.totals().await.unwrap();
    assert_eq!(totals.balances + totals.posted, totals.granted);
    assert_eq!(totals.settled_holds, cycles);
    (cycles as f64 / elapsed.as_secs_f64(), cpu / cycles.max(1) as u32)
}

/// Runs of each case; the table shows their median.
const ROUNDS: usize = 3;

/// The run with the median rate: (cycles per second, CPU time per cycle).
fn median(mut runs: Vec<(f64, Duration)>) -> (f64, Duration) {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[runs.len() / 2]
}

/// Charges per hold in the single-threaded charge measurement.
const CHARGES_PER_HOLD: u64 = 100;

/// Single-threaded charges per second on the memory ledger: `holds` holds of
/// [`CHARGES_PER_HOLD`] charges each, their reserves and settlements counted in the time.
async fn memory_charges(holds: u64) -> f64 {
    let ledger = MemoryLedger::new();
    ledger.grant("g", "acct", MAX_CREDITS).await.unwrap();
    let start = Instant::now();
    for h in 0..holds {
        let hold = format!("h{h}");
        ledger.reserve(&hold, "acct", CHARGES_PER_HOLD, TTL).await.unwrap();
        for i in 0..CHARGES_PER_HOLD {
            ledger.charge(&hold, &format!("step#{i}"), 1, "token").await.unwrap();
        }
        ledger.settle(&hold).await.unwrap();
    }
    (holds * CHARGES_PER_HOLD) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::var_os("GENPIPE_BENCH_QUICK").is_some();
    // cargo passes `--bench`; any other argument picks the backends to run.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let budget = if quick { Budget::Cycles(2) } else { Budget::For(Duration::from_secs(2)) };
    let rounds = if quick { 1 } else { ROUNDS };
    let many = if quick { 10 } else { 1000 };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "ledger benchmark: reserve + {} charges + settle per cycle; SQLite files in {}",
        CHARGES.len(),
        dir.path().display()
    );
    println!();
    println!("| backend | accounts | tasks | cycles/s | ledger ops/s | CPU µs/op |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut figures = Vec::new();
    let mut case = 0;
    let backends = [Backend::Memory, Backend::GroupCommit, Backend::Naive];
    let backends: Vec<Backend> =
        backends.into_iter().filter(|b| only.is_empty() || only.iter().any(|o| b.name().contains(o.as_str()))).collect();
    for accounts in [1, many] {
        for tasks in [1, 64] {
            // The backends take turns, `rounds` times: a spell of machine noise hits them alike.
            let mut runs: Vec<Vec<(f64, Duration)>> = vec![Vec::new(); backends.len()];
            for _ in 0..rounds {
                for (backend, runs) in backends.iter().zip(&mut runs) {
                    case += 1;
                    runs.push(runtime.block_on(async {
                        let ledger = backend.open(dir.path(), case).await;
                        run_case(ledger, accounts, tasks, &budget).await
                    }));
                }
            }
            for (backend, runs) in backends.iter().zip(runs) {
                let (rate, cpu) = median(runs);
                let ops = rate * (CHARGES.len() + 2) as f64;
                let cpu = cpu.as_secs_f64() * 1e6 / (CHARGES.len() + 2) as f64;
                figures.push((*backend, accounts, tasks, rate, ops, cpu));
            }
        }
    }
    for backend in &backends {
        for (_, accounts, tasks, rate, ops, cpu) in figures.iter().filter(|f| f.0 == *backend) {
            println!("| {} | {accounts} | {tasks} | {rate:.0} | {ops:.0} | {cpu:.1} |", backend.name());
        }
    }
    println!();
    let rate = |b: Backend, a: usize, t: usize| figures.iter().find(|f| (f.0, f.1, f.2) == (b, a, t)).map_or(0.0, |f| f.3);
    for accounts in [1, many] {
        let ratio = rate(Backend::GroupCommit, accounts, 64) / rate(Backend::Naive, accounts, 64);
        if !ratio.is_finite() || ratio == 0.0 {
            continue;
        }
        println!("group commit / one transaction per op, 64 tasks, {accounts} account(s): {ratio:.1}x");
    }
    if !only.is_empty() {
        return;
    }
    let charges = runtime.block_on(memory_charges(if quick { 2 } else { 20_000 }));
    println!("memory ledger, single-threaded charges ({CHARGES_PER_HOLD} per hold): {charges:.0} per second");
}

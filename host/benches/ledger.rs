//! Ledger throughput: cycles of reserve + 3 charges + settle (settled holds) per second, on one
//! hot account and on 1,000 accounts, from 1 and 64 concurrent tasks, for the memory ledger, the
//! SQLite ledger with group commit, the SQLite ledger with one transaction per operation (the
//! naive baseline), and the PostgreSQL ledger: one process with group commit, three processes
//! (three ledgers with their own connections and leases, the tasks spread over them) on one
//! database, and one transaction per operation (its naive baseline), all in one run; then
//! single-threaded charges per second on the memory ledger. SQLite files are on the temp
//! folder's file system, with an fsync on every commit; PostgreSQL is a real local server with
//! its defaults (fsync and synchronous_commit on), a fresh database per case, and its CPU time
//! (every `postgres` process) is counted with the benchmark's. The backends take turns at each
//! case, three times, and the table shows each one's median run.
//!
//! PostgreSQL: the server in `GENPIPE_TEST_POSTGRES_URL`, or the one `scripts/postgres.sh start`
//! starts. `cargo bench --bench ledger`; `cargo bench --bench ledger -- group` runs only the
//! backends whose name contains "group". With `GENPIPE_BENCH_QUICK=1` (CI runs every bench once
//! through `cargo test --all-targets`) each case runs two cycles a task, on 10 accounts instead
//! of 1,000, and the figures mean nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use genpipe::state::ledger::{
    Commit, Ledger, MAX_CREDITS, MemoryLedger, PostgresLedger, PostgresOptions, SqliteLedger, SqliteOptions,
};

#[path = "../tests/common/postgres.rs"]
mod postgres;

/// What each hold reserves, and what its three charges take.
const HOLD: u64 = 10;
const CHARGES: [u64; 3] = [1, 2, 3];
const TTL: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Memory,
    GroupCommit,
    Naive,
    Postgres,
    Postgres3,
    PostgresNaive,
}

/// A backend's ledgers for one case: one per process, sharing one store.
struct Opened {
    ledgers: Vec<Arc<dyn Ledger>>,
    /// The case's PostgreSQL database, dropped after its ledgers.
    _database: Option<postgres::TestDatabase>,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::GroupCommit => "sqlite, group commit",
            Backend::Naive => "sqlite, 1 transaction per op",
            Backend::Postgres => "postgres, group commit, 1 process",
            Backend::Postgres3 => "postgres, group commit, 3 processes",
            Backend::PostgresNaive => "postgres, 1 transaction per op",
        }
    }

    /// Processes sharing the store: a case with fewer tasks leaves this backend out.
    fn processes(self) -> usize {
        if self == Backend::Postgres3 { 3 } else { 1 }
    }

    fn is_postgres(self) -> bool {
        matches!(self, Backend::Postgres | Backend::Postgres3 | Backend::PostgresNaive)
    }

    async fn open(self, dir: &std::path::Path, case: usize) -> Opened {
        let path = dir.join(format!("case{case}.db"));
        let one = |ledger: Arc<dyn Ledger>| Opened { ledgers: vec![ledger], _database: None };
        let max_batch = match self {
            Backend::Memory => return one(Arc::new(MemoryLedger::new())),
            Backend::GroupCommit => return one(Arc::new(SqliteLedger::open(path, SqliteOptions::default()).await.unwrap())),
            Backend::Naive => {
                let options = SqliteOptions { commit: Commit::EachOperation };
                return one(Arc::new(SqliteLedger::open(path, options).await.unwrap()));
            }
            Backend::Postgres | Backend::Postgres3 => PostgresOptions::default().max_batch,
            Backend::PostgresNaive => 1,
        };
        let database = postgres::TestDatabase::create().await;
        let mut ledgers: Vec<Arc<dyn Ledger>> = Vec::new();
        for _ in 0..self.processes() {
            let options = PostgresOptions { max_batch, ..PostgresOptions::default() };
            ledgers.push(Arc::new(PostgresLedger::open(&database.url, options).await.unwrap()));
        }
        Opened { ledgers, _database: Some(database) }
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

/// CPU time the process used so far, user and system, on every thread; with `server`, plus that
/// of every `postgres` process running now.
fn cpu_time(server: bool) -> Duration {
    own_cpu_time() + if server { postgres_cpu_time() } else { Duration::ZERO }
}

/// CPU time of the processes named `postgres` on this machine, from /proc.
fn postgres_cpu_time() -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "PID (COMM) STATE ..." where utime and stime are the 12th and 13th fields after COMM.
        let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
        if !head.ends_with("(postgres") {
            continue;
        }
        let fields: Vec<&str> = rest.split(' ').collect();
        let time = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        total += time(11) + time(12);
    }
    Duration::from_nanos(total * 1_000_000_000 / ticks)
}

fn own_cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Runs `tasks` tasks doing cycles on `accounts` accounts, task `n` on `ledgers[n % len]`;
/// returns cycles per second and the CPU time (all threads, and the server's with `server`) per
/// cycle.
async fn run_case(ledgers: &[Arc<dyn Ledger>], accounts: usize, tasks: usize, budget: &Budget, server: bool) -> (f64, Duration) {
    let ledger = Arc::clone(&ledgers[0]);
    // All at once, so that group commit takes them together (the naive ledger commits each).
    let grants = (0..accounts).map(|a| {
        let ledger = Arc::clone(&ledger);
        async move { ledger.grant(&format!("g{a}"), &format!("acct{a}"), MAX_CREDITS / accounts as u64).await }
    });
    futures::future::try_join_all(grants).await.unwrap();
    let (start, cpu) = (Instant::now(), cpu_time(server));
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
            let ledger = Arc::clone(&ledgers[task % ledgers.len()]);
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
    let (elapsed, cpu) = (start.elapsed(), cpu_time(server) - cpu);
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
        "ledger benchmark: reserve + {} charges + settle per cycle; SQLite files in {}; CPU per op counts the \
         PostgreSQL server's",
        CHARGES.len(),
        dir.path().display()
    );
    println!();
    println!("| backend | accounts | tasks | cycles/s | ledger ops/s | CPU µs/op |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut figures = Vec::new();
    let mut case = 0;
    let backends =
        [Backend::Memory, Backend::GroupCommit, Backend::Naive, Backend::Postgres, Backend::Postgres3, Backend::PostgresNaive];
    let backends: Vec<Backend> =
        backends.into_iter().filter(|b| only.is_empty() || only.iter().any(|o| b.name().contains(o.as_str()))).collect();
    for accounts in [1, many] {
        for tasks in [1, 64] {
            let backends: Vec<Backend> = backends.iter().copied().filter(|b| b.processes() <= tasks).collect();
            // The backends take turns, `rounds` times: a spell of machine noise hits them alike.
            let mut runs: Vec<Vec<(f64, Duration)>> = vec![Vec::new(); backends.len()];
            for _ in 0..rounds {
                for (backend, runs) in backends.iter().zip(&mut runs) {
                    case += 1;
                    runs.push(runtime.block_on(async {
                        let opened = backend.open(dir.path(), case).await;
                        run_case(&opened.ledgers, accounts, tasks, &budget, backend.is_postgres()).await
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
    for (better, baseline) in [
        (Backend::GroupCommit, Backend::Naive),
        (Backend::Postgres, Backend::PostgresNaive),
        (Backend::Postgres3, Backend::PostgresNaive),
    ] {
        for accounts in [1, many] {
            let ratio = rate(better, accounts, 64) / rate(baseline, accounts, 64);
            if !ratio.is_finite() || ratio == 0.0 {
                continue;
            }
            println!("{} / {}, 64 tasks, {accounts} account(s): {ratio:.1}x", better.name(), baseline.name());
        }
    }
    if !only.is_empty() {
        return;
    }
    let charges = runtime.block_on(memory_charges(if quick { 2 } else { 20_000 }));
    println!("memory ledger, single-threaded charges ({CHARGES_PER_HOLD} per hold): {charges:.0} per second");
}

//! Concurrency, every backend: 64 tasks x 10,000 ledger operations (3,000 with PostgreSQL, whose
//! every batch waits for a durable commit) on three hot accounts (one of them nearly empty, so
//! reserves race for the last credits), with retries, while a reader watches. Checked: conservation and no negative or over-held balance at every read, no hold
//! charged beyond its amount, every hold resolved exactly once, and a clean audit at the end.
//! With PostgreSQL, the tasks are spread over three ledgers on one database, as three replicas
//! would be (one of them with two writer lanes), on a real server (see `common/postgres.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use genpipe::state::ledger::{
    Ledger, LedgerError, MemoryLedger, PostgresLedger, PostgresOptions, Settlement, SqliteLedger, SqliteOptions,
};

#[path = "common/postgres.rs"]
mod postgres;

const TASKS: u64 = 64;
const ACCOUNTS: [(&str, u64); 3] = [("hot-a", 1_000_000_000), ("hot-b", 1_000_000_000), ("tight", 1_000)];
const TTL: Duration = Duration::from_secs(3600);

/// What one task did.
#[derive(Debug, Default)]
struct Tally {
    holds: u64,
    settled: u64,
    released: u64,
    posted: u64,
    granted: u64,
    insufficient: u64,
}

/// One task: cycles of reserve, charges (some retried, some too big), settle or release
/// (sometimes repeated), and now and then a grant, until it made `ops_per_task` calls.
async fn worker(ledger: Arc<dyn Ledger>, task: u64, ops_per_task: u64) -> Tally {
    let mut rng = fastrand::Rng::with_seed(task);
    let mut tally = Tally::default();
    let mut ops = 0;
    let mut cycle = 0;
    while ops < ops_per_task {
        cycle += 1;
        let account = ACCOUNTS[rng.usize(..ACCOUNTS.len())].0;
        if rng.u8(..20) == 0 {
            let key = format!("t{task}-g{cycle}");
            ledger.grant(&key, "tight", 7).await.unwrap();
            assert_eq!(ledger.grant(&key, "tight", 7).await.map(drop), Ok(()), "a repeated grant is accepted");
            assert_eq!(ledger.grant(&key, "tight", 8).await, Err(LedgerError::Conflict(key)));
            tally.granted += 7;
            ops += 3;
            continue;
        }
        let hold = format!("t{task}-h{cycle}");
        let amount = rng.u64(1..=40);
        ops += 1;
        match ledger.reserve(&hold, account, amount, TTL).await {
            Ok(()) => {}
            Err(LedgerError::Insufficient { needed, available }) => {
                assert!(needed == amount && available < amount);
                tally.insufficient += 1;
                continue;
            }
            Err(e) => panic!("reserve {hold}: {e}"),
        }
        tally.holds += 1;
        let mut charged = 0;
        for charge in 0..rng.u64(0..=4) {
            let op = format!("step#{charge}");
            let price = rng.u64(1..=15);
            ops += 1;
            match ledger.charge(&hold, &op, price, "token").await {
                Ok(remaining) => {
                    charged += price;
                    assert_eq!(remaining, amount - charged);
                    if rng.bool() {
                        ops += 1;
                        assert_eq!(ledger.charge(&hold, &op, price, "token").await, Ok(remaining), "a retry is charged once");
                    }
                }
                Err(LedgerError::ExceedsHold { amount: asked, remaining }) => {
                    assert_eq!((asked, remaining), (price, amount - charged));
                }
                Err(e) => panic!("charge {hold}: {e}"),
            }
        }
        let settle = rng.u8(..10) < 7;
        let expected = if settle {
            Settlement { posted: charged, released: amount - charged }
        } else {
            Settlement { posted: 0, released: amount }
        };
        ops += 1;
        let closed = if settle { ledger.settle(&hold).await } else { ledger.release(&hold).await };
        assert_eq!(closed, Ok(expected));
        if rng.bool() {
            ops += 2;
            let again = if settle { ledger.settle(&hold).await } else { ledger.release(&hold).await };
            assert_eq!(again, Ok(expected), "closing twice returns the first outcome");
            let other = if settle { ledger.release(&hold).await } else { ledger.settle(&hold).await };
            assert_eq!(other, Err(LedgerError::HoldClosed(hold.clone())));
        }
        if settle {
            tally.settled += 1;
        } else {
            tally.released += 1;
        }
        tally.posted += expected.posted;
    }
    tally
}

/// Reads balances and totals until `done`, checking every read; returns how many it made.
async fn watcher(ledger: Arc<dyn Ledger>, done: Arc<AtomicBool>) -> u64 {
    let mut reads = 0;
    while !done.load(Ordering::Relaxed) {
        for (account, _) in ACCOUNTS {
            let credits = ledger.balance(account).await.unwrap();
            assert!(credits.held <= credits.balance, "{account} holds more than it has: {credits:?}");
        }
        let totals = ledger.totals().await.unwrap();
        assert_eq!(totals.balances + totals.posted, totals.granted, "conservation at every read: {totals:?}");
        assert!(totals.held <= totals.balances, "{totals:?}");
        reads += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    reads
}

/// Runs the workers, `ops_per_task` calls each, task `n` on `ledgers[n % ledgers.len()]`
/// (ledgers sharing one store, as processes would), while the first ledger's reads are watched.
async fn hammer(ledgers: &[Arc<dyn Ledger>], ops_per_task: u64) {
    let ledger = Arc::clone(&ledgers[0]);
    let mut granted = 0;
    for (account, credits) in ACCOUNTS {
        ledger.grant(&format!("initial-{account}"), account, credits).await.unwrap();
        granted += credits;
    }
    let done = Arc::new(AtomicBool::new(false));
    let watch = tokio::spawn(watcher(Arc::clone(&ledger), Arc::clone(&done)));
    let workers: Vec<_> = (0..TASKS)
        .map(|task| tokio::spawn(worker(Arc::clone(&ledgers[task as usize % ledgers.len()]), task, ops_per_task)))
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        let tally = worker.await.unwrap();
        total.holds += tally.holds;
        total.settled += tally.settled;
        total.released += tally.released;
        total.posted += tally.posted;
        total.granted += tally.granted;
        total.insufficient += tally.insufficient;
    }
    done.store(true, Ordering::Relaxed);
    assert!(watch.await.unwrap() > 0, "the watcher read at least once");
    assert!(total.insufficient > 0, "the tight account ran short: reserves raced for its last credits");

    let totals = ledger.totals().await.unwrap();
    assert_eq!(totals.granted, granted + total.granted);
    assert_eq!(totals.posted, total.posted, "every acknowledged charge of a settled hold was posted, nothing else");
    assert_eq!(totals.balances + totals.posted, totals.granted);
    assert_eq!((totals.held, totals.open_holds), (0, 0));
    assert_eq!((totals.settled_holds, totals.released_holds), (total.settled, total.released));
    assert_eq!(total.settled + total.released, total.holds, "every hold resolved exactly once");
    let audit = ledger.verify().await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.problems);
    assert_eq!(audit.holds, total.holds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_ledger_under_contention() {
    hammer(&[Arc::new(MemoryLedger::new())], 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger_under_contention() {
    // In memory-backed /dev/shm where there is one: this test is about concurrency, and every
    // commit's fsync would only make it slower (the crash test holds durability).
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
    let ledger = SqliteLedger::open(dir.path().join("ledger.db"), SqliteOptions::default()).await.unwrap();
    hammer(&[Arc::new(ledger)], 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ledgers_of_three_processes_under_contention() {
    let database = postgres::TestDatabase::create().await;
    let mut ledgers: Vec<Arc<dyn Ledger>> = Vec::new();
    for lanes in [1, 1, 2] {
        let options = PostgresOptions { lanes, ..PostgresOptions::default() };
        ledgers.push(Arc::new(PostgresLedger::open(&database.url, options).await.unwrap()));
    }
    hammer(&ledgers, 3_000).await;
}

//! Recovery with several processes on one SQLite ledger (here, several ledgers opened on the same
//! file): a live owner's holds are left alone, an ended owner's holds are resolved once, as the
//! charging policy says, and the ledger stays sound.

use std::time::Duration;

use genpipe::config::FailurePolicy;
use genpipe::state::ledger::{Balance, Ledger, LedgerError, Recovery, Settlement, SqliteLedger, SqliteOptions};

const HOUR: Duration = Duration::from_secs(3600);

async fn open(path: &std::path::Path) -> SqliteLedger {
    SqliteLedger::open(path, SqliteOptions::default()).await.unwrap()
}

#[tokio::test]
async fn only_the_holds_of_ended_owners_are_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("genpipe.db");
    let first = open(&path).await;
    let second = open(&path).await;
    first.grant("g", "acme", 100).await.unwrap();
    first.reserve("run-1", "acme", 30, HOUR).await.unwrap();
    first.charge("run-1", "text#1", 12, "token").await.unwrap();
    second.reserve("run-2", "acme", 20, HOUR).await.unwrap();

    assert_eq!(second.recover(FailurePolicy::PostCharged).await, Ok(Recovery::default()), "the first owner is alive");
    assert_eq!(first.charge("run-1", "text#2", 3, "token").await, Ok(15));

    drop(first);
    let recovered = second.recover(FailurePolicy::PostCharged).await.unwrap();
    assert_eq!(recovered, Recovery { holds: 1, posted: 15, released: 15 });
    assert_eq!(second.recover(FailurePolicy::PostCharged).await, Ok(Recovery::default()), "resolved once");
    assert_eq!(second.balance("acme").await, Ok(Balance { balance: 85, held: 20 }), "run-2 is still open");
    assert_eq!(second.charge("run-1", "text#3", 1, "late").await, Err(LedgerError::HoldClosed("run-1".into())));
    assert_eq!(second.settle("run-1").await, Ok(Settlement { posted: 15, released: 15 }), "the outcome stands for a retry");

    // A third process starting now recovers nothing more: the second is alive.
    let third = open(&path).await;
    assert_eq!(third.recover(FailurePolicy::Release).await, Ok(Recovery::default()));
    assert_eq!(second.settle("run-2").await, Ok(Settlement { posted: 0, released: 20 }));
    let audit = third.verify().await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.problems);
    assert_eq!((audit.holds, audit.open_holds, audit.posted), (2, 0, 15));
}

#[tokio::test]
async fn under_the_release_policy_an_ended_owners_charges_are_not_posted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("genpipe.db");
    let first = open(&path).await;
    first.grant("g", "acme", 100).await.unwrap();
    first.reserve("run-1", "acme", 30, HOUR).await.unwrap();
    first.charge("run-1", "text#1", 12, "token").await.unwrap();
    drop(first);

    let restarted = open(&path).await;
    assert_eq!(restarted.recover(FailurePolicy::Release).await, Ok(Recovery { holds: 1, posted: 0, released: 30 }));
    assert_eq!(restarted.balance("acme").await, Ok(Balance { balance: 100, held: 0 }));
    assert_eq!(restarted.settle("run-1").await, Err(LedgerError::HoldClosed("run-1".into())));
    assert!(restarted.verify().await.unwrap().is_ok());
    let owners = std::fs::read_dir(dir.path().join("genpipe.db-owners")).unwrap().count();
    assert_eq!(owners, 1, "only the live owner's lock file is left");
}

/// Each ledger's writer keeps the rows it wrote in memory; it still sees what the others commit.
#[tokio::test]
async fn each_process_sees_what_the_others_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("genpipe.db");
    let first = open(&path).await;
    let second = open(&path).await;
    first.grant("g1", "acme", 10).await.unwrap();
    first.reserve("run-1", "acme", 10, HOUR).await.unwrap();
    second.grant("g2", "acme", 50).await.unwrap();
    assert_eq!(first.reserve("run-2", "acme", 45, HOUR).await, Ok(()), "the first sees the second's grant");
    first.reserve("run-3", "acme", 5, Duration::from_millis(1)).await.unwrap();
    first.charge("run-2", "text#1", 4, "token").await.unwrap();

    // The second's sweep closes the first's expired hold: the first takes no charge on it.
    let expired = std::time::Instant::now() + Duration::from_millis(5);
    while std::time::Instant::now() < expired {
        tokio::task::yield_now().await;
    }
    assert_eq!(second.recover(FailurePolicy::Release).await, Ok(Recovery { holds: 1, posted: 0, released: 5 }));
    assert_eq!(first.charge("run-3", "text#1", 1, "token").await, Err(LedgerError::HoldClosed("run-3".into())));
    assert_eq!(first.settle("run-3").await, Err(LedgerError::HoldClosed("run-3".into())));
    assert_eq!(first.release("run-3").await, Ok(Settlement { posted: 0, released: 5 }), "the sweep's outcome");
    assert_eq!(first.settle("run-2").await, Ok(Settlement { posted: 4, released: 41 }));
    assert_eq!(second.balance("acme").await, Ok(Balance { balance: 56, held: 10 }));
    let audit = second.verify().await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.problems);
}

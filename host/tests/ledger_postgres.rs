//! The PostgreSQL ledger with several processes on one database (here, several ledgers with
//! their own connections and leases): the holds of a process whose lease lapsed are resolved by
//! the others, once; a process that lost its lease learns it and reserves nothing more; two
//! processes racing on one id count it once. Also: the schema's versions, the `[ledger]` keys
//! and the errors that name them. A real server (see `common/postgres.rs`), a database per test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use genpipe::Config;
use genpipe::config::FailurePolicy;
use genpipe::state::ledger::{self, Balance, Ledger, LedgerError, PostgresLedger, PostgresOptions, Recovery, Settlement};

#[path = "common/postgres.rs"]
mod postgres;
use postgres::{TestDatabase, connect};

const HOUR: Duration = Duration::from_secs(3600);

async fn open(url: &str, lease_ttl: Duration) -> PostgresLedger {
    PostgresLedger::open(url, PostgresOptions { lease_ttl, ..PostgresOptions::default() }).await.unwrap()
}

/// Calls `recover` until it resolves something, for at most `within`.
async fn recover_once_lapsed(ledger: &PostgresLedger, policy: FailurePolicy, within: Duration) -> Recovery {
    let deadline = Instant::now() + within;
    loop {
        let recovery = ledger.recover(policy).await.unwrap();
        if recovery.holds > 0 {
            return recovery;
        }
        assert!(Instant::now() < deadline, "nothing was recovered within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_second_process_resolves_the_holds_of_one_whose_lease_lapsed() {
    let database = TestDatabase::create().await;
    let first = open(&database.url, Duration::from_millis(600)).await;
    let second = open(&database.url, HOUR).await;
    first.grant("g", "acme", 100).await.unwrap();
    first.reserve("run-1", "acme", 30, HOUR).await.unwrap();
    first.charge("run-1", "text#1", 12, "token").await.unwrap();
    second.reserve("run-2", "acme", 20, HOUR).await.unwrap();

    assert_eq!(second.recover(FailurePolicy::PostCharged).await, Ok(Recovery::default()), "the first is alive");
    assert_eq!(first.charge("run-1", "text#2", 3, "token").await, Ok(15));
    let first_lease = first.lease_id().to_string();
    assert_ne!(first_lease, second.lease_id());

    // The first process ends without a word: its lease is no longer renewed, and lapses.
    let ended = Instant::now();
    drop(first);
    let recovered = recover_once_lapsed(&second, FailurePolicy::PostCharged, Duration::from_secs(10)).await;
    assert!(ended.elapsed() >= Duration::from_millis(400), "not before the lease lapsed: {:?}", ended.elapsed());
    assert_eq!(recovered, Recovery { holds: 1, posted: 15, released: 15 });
    assert_eq!(second.recover(FailurePolicy::PostCharged).await, Ok(Recovery::default()), "resolved once");
    assert_eq!(second.balance("acme").await, Ok(Balance { balance: 85, held: 20 }), "run-2 is still open");
    assert_eq!(second.charge("run-1", "text#3", 1, "late").await, Err(LedgerError::HoldClosed("run-1".into())));
    assert_eq!(second.settle("run-1").await, Ok(Settlement { posted: 15, released: 15 }), "the outcome stands for a retry");

    // A third process starting now recovers nothing more: the second is alive.
    let third = open(&database.url, HOUR).await;
    assert_eq!(third.recover(FailurePolicy::Release).await, Ok(Recovery::default()));
    assert_eq!(second.settle("run-2").await, Ok(Settlement { posted: 0, released: 20 }));
    let audit = third.verify().await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.problems);
    assert_eq!((audit.holds, audit.open_holds, audit.posted), (2, 0, 15));

    // The lapsed lease is forgotten, and its writer's totals folded into the shared row.
    let admin = connect(&database.url).await;
    let leases: Vec<String> = admin.query("SELECT id FROM ledger.leases", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert!(!leases.contains(&first_lease) && leases.len() == 2, "{leases:?}");
    let rows: i64 = admin.query_one("SELECT COUNT(*) FROM ledger.totals WHERE owner = $1", &[&first_lease]).await.unwrap().get(0);
    assert_eq!(rows, 0);
    let totals = third.totals().await.unwrap();
    assert_eq!((totals.granted, totals.posted, totals.balances), (100, 15, 85));
}

#[tokio::test]
async fn a_process_that_lost_its_lease_learns_it_and_reserves_nothing_more() {
    let database = TestDatabase::create().await;
    let first = open(&database.url, Duration::from_millis(900)).await;
    let second = open(&database.url, HOUR).await;
    first.grant("g", "acme", 100).await.unwrap();
    first.reserve("run-1", "acme", 30, HOUR).await.unwrap();
    first.charge("run-1", "text#1", 12, "token").await.unwrap();
    assert!(first.lease_ok());

    // The first process stalls past its lease (here: the lease is made to lapse).
    let admin = connect(&database.url).await;
    let lapsed = admin
        .execute("UPDATE ledger.leases SET expires_at = now() - interval '1 second' WHERE id = $1", &[&first.lease_id()])
        .await
        .unwrap();
    assert_eq!(lapsed, 1);
    assert_eq!(second.recover(FailurePolicy::Release).await, Ok(Recovery { holds: 1, posted: 0, released: 30 }));

    let mut watch = first.lease_watch();
    tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|held| !held))
        .await
        .expect("the first process learns within a renewal period that its lease is lost")
        .unwrap();
    assert!(!first.lease_ok());
    let refused = first.reserve("run-2", "acme", 10, HOUR).await.unwrap_err();
    assert!(matches!(&refused, LedgerError::Backend(m) if m.contains("lost its ledger lease")), "{refused}");
    assert_eq!(first.charge("run-1", "text#2", 1, "token").await, Err(LedgerError::HoldClosed("run-1".into())));
    assert_eq!(first.balance("acme").await, Ok(Balance { balance: 100, held: 0 }));
    assert!(second.verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_recovering_at_once_resolve_each_hold_once() {
    let database = TestDatabase::create().await;
    let dead = open(&database.url, Duration::from_millis(300)).await;
    dead.grant("g", "acme", 1000).await.unwrap();
    for n in 0..20 {
        dead.reserve(&format!("run-{n}"), "acme", 10, HOUR).await.unwrap();
        dead.charge(&format!("run-{n}"), "text#1", 4, "token").await.unwrap();
    }
    drop(dead);
    let survivors: Vec<Arc<PostgresLedger>> = vec![
        Arc::new(open(&database.url, HOUR).await),
        Arc::new(open(&database.url, HOUR).await),
        Arc::new(open(&database.url, HOUR).await),
    ];
    // Wait until the lease has lapsed, as the survivors see it, without resolving anything.
    let admin = connect(&database.url).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin.query_one("SELECT COUNT(*) FROM ledger.leases WHERE expires_at <= now()", &[]).await.unwrap().get::<_, i64>(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the lease never lapsed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recoveries = futures::future::join_all(
        survivors.iter().map(|ledger| async move { ledger.recover(FailurePolicy::PostCharged).await.unwrap() }),
    )
    .await;
    let holds: u64 = recoveries.iter().map(|r| r.holds).sum();
    let posted: u64 = recoveries.iter().map(|r| r.posted).sum();
    assert_eq!((holds, posted), (20, 80), "{recoveries:?}");
    let totals = survivors[0].totals().await.unwrap();
    assert_eq!((totals.open_holds, totals.settled_holds, totals.posted, totals.held), (0, 20, 80, 0));
    assert!(survivors[1].verify().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_racing_on_one_id_count_it_once() {
    let database = TestDatabase::create().await;
    let (a, b) = (open(&database.url, HOUR).await, open(&database.url, HOUR).await);
    a.grant("g", "acme", 1_000_000).await.unwrap();
    for n in 0..50 {
        let (hold, grant) = (format!("run-{n}"), format!("grant-{n}"));
        let (first, second) = tokio::join!(a.reserve(&hold, "acme", 10, HOUR), b.reserve(&hold, "acme", 10, HOUR));
        assert_eq!((first, second), (Ok(()), Ok(())), "the same reservation twice: the second is a repeat");
        let (first, second) = tokio::join!(a.charge(&hold, "s#1", 3, "token"), b.charge(&hold, "s#1", 3, "token"));
        assert_eq!((first, second), (Ok(7), Ok(7)));
        let (first, second) = tokio::join!(a.settle(&hold), b.settle(&hold));
        assert_eq!((first, second), (Ok(Settlement { posted: 3, released: 7 }), Ok(Settlement { posted: 3, released: 7 })));
        let (first, second) = tokio::join!(a.grant(&grant, "other", 5), b.grant(&grant, "other", 5));
        assert_eq!(first.map(|b| b.balance), second.map(|b| b.balance));
    }
    assert_eq!(a.balance("acme").await, Ok(Balance { balance: 1_000_000 - 150, held: 0 }));
    assert_eq!(b.balance("other").await, Ok(Balance { balance: 250, held: 0 }));
    let audit = b.verify().await.unwrap();
    assert!(audit.is_ok(), "{:?}", audit.problems);
    assert_eq!((audit.holds, audit.posted, audit.granted), (50, 150, 1_000_250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_starting_together_migrate_once() {
    let database = TestDatabase::create().await;
    let opened = futures::future::join_all((0..4).map(|_| open(&database.url, HOUR))).await;
    opened[0].grant("g", "acme", 5).await.unwrap();
    assert_eq!(opened[3].balance("acme").await, Ok(Balance { balance: 5, held: 0 }));
}

#[tokio::test]
async fn a_schema_this_genpipe_cannot_write_is_refused_with_the_fix() {
    let database = TestDatabase::create().await;
    drop(open(&database.url, HOUR).await);
    let admin = connect(&database.url).await;
    admin.batch_execute("UPDATE ledger.version SET version = 99").await.unwrap();
    let error = PostgresLedger::open(&database.url, PostgresOptions::default()).await.unwrap_err().to_string();
    assert!(error.contains("has ledger schema version 99, written by a newer genpipe"), "{error}");
    assert!(error.contains("Upgrade genpipe, or point [ledger] url at another database"), "{error}");

    let other = TestDatabase::create().await;
    connect(&other.url).await.batch_execute("CREATE SCHEMA ledger; CREATE TABLE ledger.accounts (id text)").await.unwrap();
    let error = PostgresLedger::open(&other.url, PostgresOptions::default()).await.unwrap_err().to_string();
    assert!(error.contains("has a schema 'ledger' that genpipe did not make"), "{error}");
    assert!(error.contains("Point [ledger] url at a database of its own"), "{error}");
}

#[tokio::test]
async fn connection_errors_name_the_server_and_never_the_password() {
    let options = PostgresOptions { password: Some("s3cret-pw".into()), ..PostgresOptions::default() };
    let error = PostgresLedger::open("postgres://genpipe@127.0.0.1:1/genpipe", options).await.unwrap_err().to_string();
    assert!(error.starts_with("the ledger database 'postgres://genpipe@127.0.0.1:1/genpipe' cannot be reached"), "{error}");
    assert!(error.contains("check that PostgreSQL runs there") && !error.contains("s3cret-pw"), "{error}");

    let error =
        PostgresLedger::open("postgres://genpipe:s3cret-pw@127.0.0.1/genpipe", PostgresOptions::default()).await.unwrap_err();
    let error = error.to_string();
    assert!(error.contains("'postgres://genpipe:***@127.0.0.1/genpipe' holds a password"), "{error}");
    assert!(!error.contains("s3cret-pw"), "{error}");
}

fn config_error(toml: &str) -> String {
    Config::parse(toml, "bad.toml", std::path::Path::new(".")).unwrap_err().to_string()
}

#[test]
fn the_postgres_keys_name_what_is_wrong_and_the_fix() {
    let error = config_error("[ledger]\nkind = \"postgres\"\n");
    assert!(error.starts_with("bad.toml: ledger.url: is required with kind = \"postgres\""), "{error}");
    assert_eq!(
        config_error("[ledger]\nurl = \"postgres://genpipe@localhost/genpipe\"\n"),
        "bad.toml: ledger.url: is only used with kind = \"postgres\"; remove it, or set kind = \"postgres\""
    );
    assert_eq!(
        config_error("[ledger]\nkind = \"memory\"\npassword_env = \"PW\"\n"),
        "bad.toml: ledger.password_env: is only used with kind = \"postgres\"; remove it, or set kind = \"postgres\""
    );
    assert_eq!(
        config_error("[ledger]\nkind = \"postgres\"\nurl = \"postgres://g@h/d\"\npath = \"x.db\"\n"),
        "bad.toml: ledger.path: is only used with kind = \"sqlite\"; remove it, or set kind = \"sqlite\""
    );
    let error = config_error("[ledger]\nkind = \"postgres\"\nurl = \"postgres://genpipe@localhost:port/genpipe\"\n");
    assert!(error.starts_with("bad.toml: ledger.url: is not a PostgreSQL URL"), "{error}");
    assert!(error.contains("postgres://USER@HOST:PORT/DATABASE"), "{error}");
    let error = config_error("[ledger]\nkind = \"postgres\"\nurl = \"postgres://genpipe:hunter2@localhost/genpipe\"\n");
    assert!(error.starts_with("bad.toml: ledger.url: holds a password;") && !error.contains("hunter2"), "{error}");
    let error = config_error("[ledger]\nkind = \"postgres\"\nurl = \"postgres://g@h/d\"\npassword_env = \"\"\n");
    assert!(error.starts_with("bad.toml: ledger.password_env: must name an environment variable"), "{error}");
}

#[tokio::test]
async fn the_configured_postgres_ledger_opens_through_the_config() {
    let database = TestDatabase::create().await;
    let toml = format!("[ledger]\nkind = \"postgres\"\nurl = \"{}\"\nhold_ttl_secs = 60\n", database.url);
    let config = Config::parse(&toml, "genpipe.toml", std::path::Path::new(".")).unwrap();
    let opened = ledger::open(&config.ledger, &config.base_dir).await.unwrap();
    opened.grant("g", "acme", 3).await.unwrap();
    assert_eq!(opened.balance("acme").await, Ok(Balance { balance: 3, held: 0 }));

    let missing = "GENPIPE_TEST_UNSET_PASSWORD_VARIABLE";
    let toml = format!("{toml}password_env = \"{missing}\"\n");
    let config = Config::parse(&toml, "genpipe.toml", std::path::Path::new(".")).unwrap();
    let Err(error) = ledger::open(&config.ledger, &config.base_dir).await else { panic!("opened without its password") };
    let error = error.to_string();
    assert!(error.contains(&format!("password_env names the environment variable {missing}, which is not set")), "{error}");
}

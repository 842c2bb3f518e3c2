//! Bad input for the SQLite ledger: a corrupt file, another application's database, a schema
//! from a newer genpipe, a read-only data folder, a full disk. Each is a clear error (at startup,
//! or of the one operation that failed), never a panic and never a silent loss.
//!
//! The read-only folder and the full disk are real: a tmpfs mounted read-only, and a tiny tmpfs
//! (this needs root, as in CI). Where mounting is refused, the same checks run through the
//! `genpipe` binary in a child process that cannot write the folder (an unprivileged user) or
//! whose file size is limited (RLIMIT_FSIZE).

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use genpipe::state::ledger::{HistoryQuery, Ledger, LedgerError, SqliteLedger, SqliteOptions};

async fn open(path: &Path) -> Result<SqliteLedger, String> {
    SqliteLedger::open(path, SqliteOptions::default()).await.map_err(|e| e.to_string())
}

fn genpipe(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_genpipe"));
    command.args(args).current_dir(dir);
    command
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A config whose SQLite ledger is `path`.
fn write_config(dir: &Path, path: &Path) -> PathBuf {
    let config = dir.join("genpipe.toml");
    std::fs::write(&config, format!("[ledger]\nkind = \"sqlite\"\npath = \"{}\"\n", path.display())).unwrap();
    config
}

#[tokio::test]
async fn a_corrupt_file_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("genpipe.db");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let error = open(&path).await.unwrap_err();
    assert!(error.contains(&format!("'{}' is not a SQLite database", path.display())), "{error}");
    assert!(error.contains("Move it away to start an empty ledger"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage, "the file is left as it was");

    let config = write_config(dir.path(), &path);
    let out = genpipe(dir.path(), &["credits", "balance", "demo", "--config", config.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("ledger.path: the ledger database") && stderr(&out).contains("is not a SQLite database"));
}

#[tokio::test]
async fn damage_inside_a_ledger_fails_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("genpipe.db");
    {
        let ledger = open(&path).await.unwrap();
        for i in 0..300 {
            ledger.grant(&format!("g{i}"), &format!("account-{i}"), 10).await.unwrap();
        }
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let page = 4096;
    assert!(bytes.len() > 6 * page, "the ledger spans several pages");
    let end = bytes.len() - page;
    bytes[2 * page..end].fill(0xA5);
    std::fs::write(&path, &bytes).unwrap();
    match open(&path).await {
        Err(error) => assert!(error.contains("is damaged") || error.contains("is not a SQLite database"), "{error}"),
        Ok(ledger) => match ledger.verify().await {
            Err(LedgerError::Backend(message)) => assert!(message.contains("malformed"), "{message}"),
            Err(other) => panic!("unexpected error: {other}"),
            Ok(audit) => assert!(!audit.is_ok(), "the damage is reported"),
        },
    }
}

#[tokio::test]
async fn another_applications_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.db");
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT); INSERT INTO notes (text) VALUES ('hi');")
        .unwrap();
    drop(other);
    let error = open(&path).await.unwrap_err();
    assert!(error.contains("is the SQLite database of another application"), "{error}");
    assert!(error.contains("Set [ledger] path to a new file"), "{error}");
    let other = rusqlite::Connection::open(&path).unwrap();
    let notes: i64 = other.query_row("SELECT COUNT(*) FROM notes", [], |r| r.get(0)).unwrap();
    let tables: i64 = other.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| r.get(0)).unwrap();
    assert_eq!((notes, tables), (1, 1), "genpipe wrote nothing into it");
}

#[tokio::test]
async fn a_schema_from_a_newer_genpipe_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("genpipe.db");
    open(&path).await.unwrap().grant("g", "acme", 5).await.unwrap();
    let db = rusqlite::Connection::open(&path).unwrap();
    db.pragma_update(None, "user_version", 99).unwrap();
    drop(db);
    let error = open(&path).await.unwrap_err();
    assert!(error.contains("has schema version 99, written by a newer genpipe; this one knows versions up to 5"), "{error}");
    assert!(error.contains("Upgrade genpipe"), "{error}");
}

#[tokio::test]
async fn a_fresh_file_is_created_with_its_folder_and_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/nested/genpipe.db");
    open(&path).await.unwrap().grant("g", "acme", 5).await.unwrap();
    let ledger = open(&path).await.unwrap();
    assert_eq!(ledger.balance("acme").await.unwrap().balance, 5);
    assert!(ledger.verify().await.unwrap().is_ok());
    let error = open(dir.path()).await.unwrap_err();
    assert!(error.contains("is a folder; set [ledger] path to a file inside it"), "{error}");
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs with `options` on `dir`; `None` if mounting is not allowed here.
    fn mount(dir: &Path, options: &str) -> Option<Tmpfs> {
        match Command::new("mount").args(["-t", "tmpfs", "-o", options, "genpipe-test"]).arg(dir).output() {
            Ok(out) if out.status.success() => Some(Tmpfs(dir.to_path_buf())),
            Ok(out) => {
                println!("cannot mount a tmpfs ({}): using the fallback", stderr(&out).trim());
                None
            }
            Err(e) => {
                println!("cannot run mount ({e}): using the fallback");
                None
            }
        }
    }

    fn remount(&self, options: &str) {
        let out = Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.0).output().unwrap();
        assert!(out.status.success(), "remount: {}", stderr(&out));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_read_only_data_folder_is_a_clear_error_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let config = write_config(dir.path(), &data.join("genpipe.db"));
    let config = config.to_str().unwrap();
    let grant = ["credits", "grant", "acme", "5", "--key", "k", "--config", config];

    let expect_refused = |out: Output| {
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let message = stderr(&out);
        assert!(message.contains(&format!("the ledger database '{}/genpipe.db'", data.display())), "{message}");
        assert!(message.contains("cannot be written") && message.contains("read-only"), "{message}");
        assert!(!message.contains("panicked"), "{message}");
    };
    if let Some(tmpfs) = Tmpfs::mount(&data, "size=4m") {
        // An existing ledger on a file system that became read-only.
        assert!(genpipe(dir.path(), &grant).output().unwrap().status.success());
        tmpfs.remount("ro");
        expect_refused(genpipe(dir.path(), &["credits", "balance", "acme", "--config", config]).output().unwrap());
        expect_refused(genpipe(dir.path(), &grant).output().unwrap());
        drop(tmpfs);
        // An empty read-only file system.
        let _tmpfs = Tmpfs::mount(&data, "ro,size=1m").expect("mounting worked a moment ago");
        expect_refused(genpipe(dir.path(), &grant).output().unwrap());
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut command = genpipe(dir.path(), &grant);
        if is_root() {
            // Root writes anywhere: run as nobody, for whom the folder is read-only.
            command.uid(65534).gid(65534);
        }
        expect_refused(command.output().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_operations_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let Some(tmpfs) = Tmpfs::mount(&data, "size=256k") else {
        return full_disk_through_a_file_size_limit(dir.path());
    };
    let path = data.join("genpipe.db");
    let ledger = Arc::new(open(&path).await.unwrap());
    // Concurrent grants, so that batches share commits, until the disk is full.
    let mut acknowledged = BTreeSet::new();
    let mut failure = None;
    'fill: for round in 0..2_000 {
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let ledger = Arc::clone(&ledger);
                let key = format!("r{round}-t{t}-{}", "x".repeat(200));
                tokio::spawn(async move { (ledger.grant(&key, "acme", 1).await, key) })
            })
            .collect();
        for task in tasks {
            match task.await.unwrap() {
                (Ok(_), key) => {
                    acknowledged.insert(key);
                }
                (Err(LedgerError::Backend(message)), _) => failure = Some(message),
                (Err(other), _) => panic!("unexpected error: {other}"),
            }
        }
        if failure.is_some() {
            break 'fill;
        }
    }
    let failure = failure.expect("the disk filled up");
    assert!(failure.contains("database or disk is full"), "{failure}");
    assert!(!acknowledged.is_empty());

    // A ledger opened on the full disk fails at startup, clearly.
    let filler = data.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    while std::io::Write::write_all(&mut file, &[0u8; 4096]).is_ok() {}
    drop(file);
    let error = open(&data.join("other.db")).await.unwrap_err();
    assert!(error.contains("the disk is full") || error.contains("cannot be written"), "{error}");

    // Room again: the ledger works, and holds exactly what was acknowledged.
    std::fs::remove_file(filler).unwrap();
    tmpfs.remount("size=16m");
    ledger.grant("after", "acme", 1).await.unwrap();
    drop(ledger);
    let ledger = open(&path).await.unwrap();
    let query = HistoryQuery { limit: 100_000, ..HistoryQuery::default() };
    let mut granted: BTreeSet<String> = ledger.history("acme", &query).await.unwrap().into_iter().filter_map(|e| e.op).collect();
    assert!(granted.remove("after"));
    assert_eq!(granted, acknowledged, "every acknowledged grant, and only those, is in the journal");
    assert_eq!(ledger.balance("acme").await.unwrap().balance, acknowledged.len() as u64 + 1);
    assert!(ledger.verify().await.unwrap().is_ok());
}

/// The full-disk check through the binary, with the child's file size limited.
fn full_disk_through_a_file_size_limit(dir: &Path) {
    let config = write_config(dir, &dir.join("limited/genpipe.db"));
    let config = config.to_str().unwrap();
    let mut acknowledged = 0;
    let mut failed = None;
    for i in 0..2_000 {
        let key = format!("k{i}-{}", "x".repeat(200));
        let mut command = genpipe(dir, &["credits", "grant", "acme", "1", "--key", &key, "--config", config]);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit { rlim_cur: 192 * 1024, rlim_max: 192 * 1024 };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
            });
        }
        let out = command.output().unwrap();
        if out.status.success() {
            acknowledged += 1;
        } else {
            failed = Some(out);
            break;
        }
    }
    let out = failed.expect("the file size limit was reached");
    assert_eq!(out.status.code(), Some(2));
    let message = stderr(&out);
    assert!(!message.contains("panicked") && (message.contains("full") || message.contains("I/O error")), "{message}");
    let balance = genpipe(dir, &["credits", "balance", "acme", "--config", config]).output().unwrap();
    let balance = String::from_utf8_lossy(&balance.stdout).into_owned();
    assert!(balance.starts_with(&format!("acme: balance {acknowledged},")), "{balance}");
    let verify = genpipe(dir, &["credits", "verify", "--config", config]).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

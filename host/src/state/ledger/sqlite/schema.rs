//! The SQLite file: opening it, recognising it as a genpipe ledger, and migrating its schema.
//!
//! A genpipe ledger has `PRAGMA application_id` = [`APPLICATION_ID`] and `PRAGMA user_version` =
//! its schema version. An empty file becomes a new ledger; a file that is not SQLite, the
//! database of another application, or one from a newer genpipe is refused with the reason and
//! the fix, and so is a file that cannot be written. Migrations run in order, each in its own
//! transaction, so a crash leaves the schema at one version or the next.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

/// `PRAGMA application_id` of a genpipe ledger ("gpip").
pub(super) const APPLICATION_ID: i32 = 0x6770_6970;

/// The schema, one migration per version: `MIGRATIONS[n]` takes version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // Version 1. `accounts`, `holds` and `totals` are the fold of `journal`, kept for speed;
    // `grants` remembers each grant's outcome for its repeats. The checks make the database
    // itself refuse a negative balance or an overcharged hold.
    "CREATE TABLE accounts (
        id TEXT PRIMARY KEY NOT NULL,
        balance INTEGER NOT NULL CHECK (balance >= 0),
        held INTEGER NOT NULL CHECK (held >= 0 AND held <= balance)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE holds (
        id TEXT PRIMARY KEY NOT NULL,
        account TEXT NOT NULL REFERENCES accounts (id),
        amount INTEGER NOT NULL CHECK (amount > 0),
        charged INTEGER NOT NULL CHECK (charged >= 0 AND charged <= amount),
        ttl_ms INTEGER NOT NULL CHECK (ttl_ms >= 0),
        expires_ms INTEGER NOT NULL,
        owner TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'settled', 'released')),
        posted INTEGER NOT NULL CHECK (posted >= 0 AND posted <= charged)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX holds_open_by_owner ON holds (owner) WHERE state = 'open';
    CREATE INDEX holds_open_by_expiry ON holds (expires_ms) WHERE state = 'open';
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY,
        time_ms INTEGER NOT NULL,
        account TEXT NOT NULL,
        run TEXT,
        op TEXT,
        kind TEXT NOT NULL CHECK (kind IN ('grant', 'hold', 'charge', 'post', 'release')),
        amount INTEGER NOT NULL CHECK (amount > 0 OR (kind = 'post' AND amount = 0)),
        reason TEXT NOT NULL
    ) STRICT;
    CREATE INDEX journal_by_account ON journal (account, id);
    CREATE UNIQUE INDEX journal_charges ON journal (run, op) WHERE kind = 'charge';
    CREATE TABLE grants (
        id TEXT PRIMARY KEY NOT NULL,
        account TEXT NOT NULL REFERENCES accounts (id),
        amount INTEGER NOT NULL CHECK (amount > 0),
        balance INTEGER NOT NULL,
        held INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE totals (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        granted INTEGER NOT NULL CHECK (granted >= 0),
        posted INTEGER NOT NULL CHECK (posted >= 0),
        settled INTEGER NOT NULL CHECK (settled >= 0),
        released INTEGER NOT NULL CHECK (released >= 0)
    ) STRICT;
    INSERT INTO totals (id, granted, posted, settled, released) VALUES (1, 0, 0, 0, 0);
    CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
        BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;
    CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
        BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;",
    // Version 2: each charge's step in a column of its own, filled in from its op id (`STEP#N`)
    // for the charges already recorded; the append-only trigger steps aside for that one update.
    // Open holds are few (runs in flight): recovery finds their owners through the expiry index,
    // so the owner index goes, and with it two index writes per run.
    "DROP INDEX holds_open_by_owner;
    DROP TRIGGER journal_no_update;
    ALTER TABLE journal ADD COLUMN step TEXT;
    UPDATE journal SET step = substr(op, 1, instr(op, '#') - 1)
        WHERE kind = 'charge' AND instr(op, '#') > 1 AND substr(op, instr(op, '#') + 1) <> ''
            AND substr(op, instr(op, '#') + 1) NOT GLOB '*[^0-9]*';
    CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
        BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;",
    // Version 3: the same rules for `kind` and `state` as comparisons. SQLite checks a value
    // against a list of more than two with `IN` by building a temporary B-tree, on every insert
    // into the journal and every reservation and closing of a hold: an eighth of the writer's
    // time. A CHECK cannot be altered, but its text may be edited in place when the rows already
    // obey the new one (SQLite's "ALTER TABLE", section "other kinds of table schema changes");
    // `open_writer` bumps the schema version after every migration, as that procedure requires.
    "PRAGMA writable_schema = ON;
    UPDATE sqlite_schema SET sql = replace(sql,
        'CHECK (kind IN (''grant'', ''hold'', ''charge'', ''post'', ''release''))',
        'CHECK (kind = ''grant'' OR kind = ''hold'' OR kind = ''charge'' OR kind = ''post'' OR kind = ''release'')')
        WHERE type = 'table' AND name = 'journal';
    UPDATE sqlite_schema SET sql = replace(sql,
        'CHECK (state IN (''open'', ''settled'', ''released''))',
        'CHECK (state = ''open'' OR state = ''settled'' OR state = ''released'')')
        WHERE type = 'table' AND name = 'holds';
    PRAGMA writable_schema = OFF;",
    // Version 4: the journal's entries by account move from an index on the journal to a table
    // the ledger fills a chunk of entries at a time (see `listing`), keyed by the chunk
    // (the entry's id >> 13) first. An index on (account, id) takes each entry as it is written,
    // into its account's last page: with many accounts, a page of the log per entry. Keyed by
    // chunk, a chunk's entries go in sorted at the end of the table. `listed_upto` is the last
    // entry listed; reads scan the journal after it.
    "CREATE TABLE account_entries (
        chunk INTEGER NOT NULL,
        account TEXT NOT NULL,
        id INTEGER NOT NULL,
        PRIMARY KEY (chunk, account, id)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO account_entries (chunk, account, id) SELECT id >> 13, account, id FROM journal ORDER BY 1, 2, 3;
    ALTER TABLE totals ADD COLUMN listed_upto INTEGER NOT NULL DEFAULT 0;
    UPDATE totals SET listed_upto = (SELECT COALESCE(MAX(id), 0) FROM journal);
    DROP INDEX journal_by_account;",
    // Version 5: a hold's `charged` is written when it closes; while it is open its charges are
    // only in the journal (found through `journal_charges`), which saves an update of the hold
    // per charge. An older genpipe would trust the column, hence the new version.
    "UPDATE holds SET charged = 0 WHERE state = 'open';",
];

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Page cache of the writer, in KiB as `PRAGMA cache_size` takes it (negative): 2 MiB, SQLite's
/// default. At the end of every write transaction SQLite trims the cache
/// (`pcache1TruncateUnsafe`), walking its whole hash table when it cannot tell where the pages to
/// drop are: with a 32 MiB cache that took an eighth of the writer's time, with 2 MiB none.
const WRITER_CACHE_KIB: i64 = -2 * 1024;

/// Page cache of the reader (journal listings, audits): 32 MiB.
const READER_CACHE_KIB: i64 = -32 * 1024;

/// How long a connection waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the ledger's database could not be opened: the file, what is wrong, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the ledger database '{}' {problem}", path.display())]
pub struct OpenError {
    /// The database file.
    pub path: PathBuf,
    /// What is wrong and what to do, as a sentence that follows the path.
    pub problem: String,
}

/// What is wrong with the file, and the fix, as a sentence that follows its path.
pub(super) fn describe(error: &rusqlite::Error) -> String {
    match error.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => format!(
            "is not a SQLite database ({error}): it is damaged, or another kind of file. Move it away to start an \
             empty ledger, or set [ledger] path to the right file"
        ),
        Some(ErrorCode::DatabaseCorrupt) => {
            format!("is damaged ({error}). Restore it from a backup, or move it away to start an empty ledger")
        }
        Some(
            ErrorCode::ReadOnly
            | ErrorCode::CannotOpen
            | ErrorCode::PermissionDenied
            | ErrorCode::AuthorizationForStatementDenied,
        ) => {
            format!(
                "cannot be written ({error}): check the permissions of the file and of its folder, and that the file \
                 system is not mounted read-only; or set [ledger] path to a writable place"
            )
        }
        Some(ErrorCode::DiskFull) => format!("cannot be written: the disk is full ({error}). Free some space"),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            format!("is locked by another process ({error}); retry once it is done")
        }
        _ => format!("cannot be used: {error}"),
    }
}

/// Opens the database for writing, creating the file and its folder if needed, and brings its
/// schema to [`SCHEMA_VERSION`].
pub(super) fn open_writer(path: &Path) -> Result<Connection, OpenError> {
    let fail = |problem: String| OpenError { path: path.to_path_buf(), problem };
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            fail(format!(
                "cannot be created: its folder '{}' cannot be made ({e}); create it, or set [ledger] path to a \
                 writable place",
                dir.display()
            ))
        })?;
    }
    if path.is_dir() {
        return Err(fail(format!(
            "is a folder; set [ledger] path to a file inside it, such as '{}'",
            path.join("genpipe.db").display()
        )));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| fail(describe(&e)))?;
    prepare(&mut conn).map_err(fail)?;
    Ok(conn)
}

/// Opens a second connection that only reads (journal listings, audits).
pub(super) fn open_reader(path: &Path) -> Result<Connection, OpenError> {
    let fail = |e: rusqlite::Error| OpenError { path: path.to_path_buf(), problem: describe(&e) };
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(fail)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
    conn.pragma_update(None, "query_only", true).map_err(fail)?;
    conn.pragma_update(None, "cache_size", READER_CACHE_KIB).map_err(fail)?;
    Ok(conn)
}

fn prepare(conn: &mut Connection) -> Result<(), String> {
    let sql = |e: rusqlite::Error| describe(&e);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
    // Reading the header fails here if the file is not a database.
    check(conn)?;
    if conn.is_readonly(rusqlite::MAIN_DB).map_err(sql)? {
        return Err("cannot be written: it opens read-only. Check the permissions of the file and of its folder, and \
                    that the file system is not mounted read-only; or set [ledger] path to a writable place"
            .into());
    }
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("cannot use write-ahead logging (the journal mode stays '{mode}'); put it on a local file system"));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
    conn.pragma_update(None, "foreign_keys", true).map_err(sql)?;
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB).map_err(sql)?;
    conn.set_prepared_statement_cache_capacity(64);
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
        let Some(version) = check(&tx)? else {
            return Ok(());
        };
        tx.execute_batch(MIGRATIONS[version]).map_err(sql)?;
        // Other connections reload the schema when this changes; DDL bumps it anyway.
        let schema_version: i64 = tx.pragma_query_value(None, "schema_version", |r| r.get(0)).map_err(sql)?;
        tx.pragma_update(None, "schema_version", schema_version + 1).map_err(sql)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID).map_err(sql)?;
        tx.pragma_update(None, "user_version", version as i64 + 1).map_err(sql)?;
        tx.commit().map_err(sql)?;
    }
}

/// Checks that the database is a genpipe ledger this build can use (or empty); returns the
/// version to migrate from, or `None` when the schema is current.
fn check(conn: &Connection) -> Result<Option<usize>, String> {
    let sql = |e: rusqlite::Error| describe(&e);
    let application: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0)).map_err(sql)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sql)?;
    let tables: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| r.get(0)).map_err(sql)?;
    if application != APPLICATION_ID && (application != 0 || tables > 0) {
        return Err(format!(
            "is the SQLite database of another application (application_id {application:#x}, {tables} schema objects); \
             genpipe will not write into it. Set [ledger] path to a new file"
        ));
    }
    if version < 0 {
        return Err(format!("has schema version {version}, which genpipe never writes. Set [ledger] path to a new file"));
    }
    if version > SCHEMA_VERSION {
        return Err(format!(
            "has schema version {version}, written by a newer genpipe; this one knows versions up to {SCHEMA_VERSION}. \
             Upgrade genpipe, or set [ledger] path to another file"
        ));
    }
    Ok((version < SCHEMA_VERSION).then_some(version as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ledger::EntryKind;
    use crate::state::ledger::journal::entry_step;

    #[test]
    fn version_2_fills_in_the_step_of_the_charges_version_1_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "application_id", APPLICATION_ID).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute_batch(
                "INSERT INTO journal (time_ms, account, run, op, kind, amount, reason) VALUES
                    (1, 'a', NULL, 'g#1', 'grant', 10, 'grant'),
                    (2, 'a', 'r1', NULL, 'hold', 5, 'reserve'),
                    (3, 'a', 'r1', 'text#1', 'charge', 1, 'token'),
                    (4, 'a', 'r1', 'image#12', 'charge', 1, 'token'),
                    (5, 'a', 'r1', 'plain', 'charge', 1, 'token'),
                    (6, 'a', 'r1', 'x#y', 'charge', 1, 'token'),
                    (7, 'a', 'r1', '#3', 'charge', 1, 'token');",
            )
            .unwrap();
        }
        let conn = open_writer(&path).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mut statement = conn.prepare("SELECT op, step FROM journal WHERE op IS NOT NULL ORDER BY id").unwrap();
        let steps: Vec<(String, Option<String>)> =
            statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap();
        let expected =
            [("g#1", None), ("text#1", Some("text")), ("image#12", Some("image")), ("plain", None), ("x#y", None), ("#3", None)];
        let expected: Vec<_> = expected.iter().map(|(op, step)| (op.to_string(), step.map(str::to_string))).collect();
        assert_eq!(steps, expected);
        // The same rule as the ledger's own for new entries.
        for (op, step) in &expected {
            let kind = if op == "g#1" { EntryKind::Grant } else { EntryKind::Charge };
            assert_eq!(step.as_deref(), entry_step(kind, Some(op)), "{op}");
        }
        let error = conn.execute("UPDATE journal SET amount = 2 WHERE id = 3", []).unwrap_err();
        assert!(error.to_string().contains("append-only"), "the journal stays append-only: {error}");
        assert_checks_without_temporary_trees(&conn);
    }

    #[test]
    fn version_5_leaves_what_open_holds_were_charged_to_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v4.db");
        {
            let conn = Connection::open(&path).unwrap();
            MIGRATIONS[..4].iter().for_each(|migration| conn.execute_batch(migration).unwrap());
            conn.pragma_update(None, "application_id", APPLICATION_ID).unwrap();
            conn.pragma_update(None, "user_version", 4).unwrap();
            conn.execute_batch(
                "INSERT INTO accounts (id, balance, held) VALUES ('a', 10, 5);
                INSERT INTO holds (id, account, amount, charged, ttl_ms, expires_ms, owner, state, posted) VALUES
                    ('open', 'a', 5, 2, 1, 1, 'o', 'open', 0), ('settled', 'a', 5, 3, 1, 1, 'o', 'settled', 3);",
            )
            .unwrap();
        }
        let conn = open_writer(&path).unwrap();
        let mut statement = conn.prepare("SELECT id, charged FROM holds ORDER BY id").unwrap();
        let charged: Vec<(String, i64)> =
            statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(charged, [("open".to_string(), 0), ("settled".to_string(), 3)]);
    }

    #[test]
    fn a_new_ledger_checks_kinds_and_states_without_temporary_trees() {
        let dir = tempfile::tempdir().unwrap();
        assert_checks_without_temporary_trees(&open_writer(&dir.path().join("new.db")).unwrap());
    }

    /// The CHECKs on `kind` and `state` still refuse other values, and writing a row no longer
    /// builds a temporary B-tree (`OpenEphemeral`) to check them.
    fn assert_checks_without_temporary_trees(conn: &Connection) {
        let writes = [
            "INSERT INTO journal (time_ms, account, run, op, step, kind, amount, reason) VALUES (1, 'a', 'r', 'o', 's', ?1, 1, 'x')",
            "INSERT INTO holds (id, account, amount, charged, ttl_ms, expires_ms, owner, state, posted) \
             VALUES ('h', 'a', 1, 0, 1, 1, 'o', ?1, 0)",
        ];
        for sql in writes {
            let mut explain = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
            let opcodes: Vec<String> = explain.query_map(["x"], |r| r.get(1)).unwrap().collect::<Result<_, _>>().unwrap();
            assert!(opcodes.iter().any(|op| op == "Insert" || op == "IdxInsert"), "{opcodes:?}");
            assert!(!opcodes.iter().any(|op| op == "OpenEphemeral"), "{sql}: {opcodes:?}");
            let error = conn.execute(sql, ["unknown"]).unwrap_err().to_string();
            assert!(error.contains("CHECK constraint failed"), "{sql}: {error}");
        }
    }
}

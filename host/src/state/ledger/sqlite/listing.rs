//! The journal's entries by account: `account_entries`, filled a chunk at a time, and the
//! history reads that use it (schema version 4).

use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::ops::{credits, stored};
use crate::state::ledger::{Entry, EntryKind, HistoryQuery, LedgerError};

/// `account_entries` groups entries in chunks of `1 << CHUNK_BITS` ids (schema version 4); this
/// module's SQL writes the chunk of an id as `id >> 13`.
const CHUNK_BITS: u32 = 13;

/// Keeps `account_entries`, the journal's entries by account, listed up to the last complete
/// chunk of ids: keyed by (chunk, account, id), a chunk listed whole goes in sorted after
/// every row already there, filling pages at the end of the table, where an index on
/// (account, id) would write a page per account. Reads seek each chunk for the account's entries
/// up to `totals.listed_upto`, then scan the journal after it (less than two chunks).
pub(super) struct Listing {
    /// The last entry listed, as far as this writer knows.
    listed: i64,
}

impl Listing {
    pub(super) fn new(conn: &Connection) -> rusqlite::Result<Listing> {
        Ok(Listing { listed: conn.query_row("SELECT listed_upto FROM totals", [], |r| r.get(0))? })
    }

    /// Lists the chunks completed since the last listing, in a transaction of its own. A
    /// failure is logged and tried again at the next chunk: reads find the entries all the
    /// same, only by scanning more.
    pub(super) fn after_commit(&mut self, conn: &Connection) {
        // The journal is the one table with row ids that the ledger inserts into.
        let complete = last_of_complete_chunks(conn.last_insert_rowid());
        if complete <= self.listed {
            return;
        }
        match list_entries(conn) {
            Ok(listed) => self.listed = listed,
            Err(e) => {
                tracing::warn!("listing the ledger's journal entries by account failed ({e}); it is tried again later");
                self.listed = complete;
            }
        }
    }
}

/// The last id of the chunks of ids wholly at or before `id`.
fn last_of_complete_chunks(id: i64) -> i64 {
    ((id + 1) >> CHUNK_BITS << CHUNK_BITS) - 1
}

pub(super) fn listed_upto(conn: &Connection) -> Result<i64, LedgerError> {
    Ok(conn.prepare_cached("SELECT listed_upto FROM totals")?.query_row([], |r| r.get(0))?)
}

/// Lists every entry after `listed_upto` up to the last complete chunk, in one transaction;
/// returns the last one listed.
fn list_entries(conn: &Connection) -> Result<i64, LedgerError> {
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let listed = listed_upto(&tx)?;
    let last: i64 = tx.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM journal")?.query_row([], |r| r.get(0))?;
    let upto = last_of_complete_chunks(last).max(listed);
    tx.prepare_cached(
        "INSERT INTO account_entries (chunk, account, id) SELECT id >> 13, account, id FROM journal \
         WHERE id > ?1 AND id <= ?2 ORDER BY 1, 2, 3",
    )?
    .execute([listed, upto])?;
    tx.prepare_cached("UPDATE totals SET listed_upto = ?1")?.execute([upto])?;
    tx.commit()?;
    Ok(upto)
}

/// What is wrong with the listing, against the journal: for `credits verify`, which runs it in
/// its read transaction.
pub(super) fn check(conn: &Connection) -> Result<Option<String>, LedgerError> {
    let listed = listed_upto(conn)?;
    let unlisted: i64 = conn.query_row(
        "SELECT COUNT(*) FROM journal AS j WHERE j.id <= ?1 \
         AND NOT EXISTS (SELECT 1 FROM account_entries AS a WHERE a.chunk = j.id >> 13 AND a.account = j.account AND a.id = j.id)",
        [listed],
        |r| r.get(0),
    )?;
    let strays: i64 = conn.query_row(
        "SELECT COUNT(*) FROM account_entries AS a \
         WHERE NOT EXISTS (SELECT 1 FROM journal AS j \
             WHERE j.id = a.id AND j.account = a.account AND a.chunk = j.id >> 13 AND j.id <= ?1)",
        [listed],
        |r| r.get(0),
    )?;
    if unlisted == 0 && strays == 0 {
        return Ok(None);
    }
    Ok(Some(format!(
        "the listing of entries by account up to entry {listed} misses {unlisted} of them and lists {strays} that \
         are not the journal's"
    )))
}

/// The caller runs this in one read transaction.
pub(super) fn history(conn: &Connection, account: &str, query: &HistoryQuery) -> Result<Vec<Entry>, LedgerError> {
    const COLUMNS: &str = "j.id, j.time_ms, j.account, j.run, j.op, j.step, j.kind, j.amount, j.reason";
    let listed = listed_upto(conn)?;
    let after = stored(query.after);
    let mut left = i64::try_from(query.limit).unwrap_or(i64::MAX);
    let mut entries = Vec::new();
    let in_chunk = format!(
        "SELECT {COLUMNS} FROM account_entries AS a CROSS JOIN journal AS j ON j.id = a.id \
         WHERE a.chunk = ?1 AND a.account = ?2 AND a.id > ?3 AND (?4 IS NULL OR j.run = ?4) ORDER BY a.id LIMIT ?5"
    );
    // The chunks that may hold listed entries after `after`.
    let mut chunk = after.saturating_add(1) >> CHUNK_BITS;
    while left > 0 && chunk <= listed >> CHUNK_BITS {
        left -= read_entries(conn, &in_chunk, params![chunk, account, after, query.run, left], &mut entries)?;
        chunk += 1;
    }
    if left > 0 {
        let unlisted = format!(
            "SELECT {COLUMNS} FROM journal AS j WHERE j.id > max(?1, ?2) AND j.account = ?3 AND (?4 IS NULL OR j.run = ?4) \
             ORDER BY j.id LIMIT ?5"
        );
        read_entries(conn, &unlisted, params![after, listed, account, query.run, left], &mut entries)?;
    }
    Ok(entries)
}

/// Reads the entries `sql` selects (the columns of [`history`]) into `entries`; returns how many.
fn read_entries(
    conn: &Connection,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
    entries: &mut Vec<Entry>,
) -> Result<i64, LedgerError> {
    let before = entries.len();
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    while let Some(row) = rows.next()? {
        let (id, kind): (i64, String) = (row.get(0)?, row.get(6)?);
        let kind = EntryKind::parse(&kind)
            .ok_or_else(|| LedgerError::Backend(format!("journal entry {id} has the unknown kind '{kind}'")))?;
        entries.push(Entry {
            id: credits(id)?,
            time_ms: credits(row.get(1)?)?,
            account: row.get(2)?,
            run: row.get(3)?,
            op: row.get(4)?,
            step: row.get(5)?,
            kind,
            amount: credits(row.get(7)?)?,
            reason: row.get(8)?,
        });
    }
    Ok((entries.len() - before) as i64)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::known::Known;
    use super::super::ops::{grant, verify};
    use super::super::prepared::Prepared;
    use super::super::schema;
    use super::*;

    /// Entries `account` has, read a page of `limit` at a time.
    fn paged(conn: &Connection, account: &str, run: Option<&str>, limit: usize) -> Vec<u64> {
        let mut query = HistoryQuery { run: run.map(str::to_string), after: 0, limit };
        let mut ids = Vec::new();
        loop {
            let page = history(conn, account, &query).unwrap();
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { return ids };
            assert!(page.iter().all(|e| e.account == account && (run.is_none() || e.run.as_deref() == run)));
            query.after = last.id;
            ids.extend(page.iter().map(|e| e.id));
        }
    }

    #[test]
    fn history_reads_listed_and_unlisted_entries_alike_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let conn = schema::open_writer(&dir.path().join("ledger.db")).unwrap();
        let mut known = Known::default();
        let mut listing = Listing::new(&conn).unwrap();
        let accounts = ["a", "b", "c"];
        let mut expected: HashMap<&str, Vec<u64>> = HashMap::new();
        let mut grant_one = |n: usize| {
            let account = accounts[n % 3];
            grant(&Prepared::new(&conn), &mut known, 0, &format!("g{n}"), account, 1).unwrap();
            expected.entry(account).or_default().push(conn.last_insert_rowid() as u64);
            listing.after_commit(&conn);
        };
        // Entries in three chunks of ids (1 << CHUNK_BITS each): the first two listed, the last
        // not yet.
        for n in 0..10 {
            grant_one(n);
        }
        for chunk in 1..=2_i64 {
            // Skips to the end of the chunk: the next entries get the ids after it.
            conn.execute(
                "INSERT INTO journal (id, time_ms, account, kind, amount, reason) VALUES (?1, 0, 'skip', 'grant', 1, 'skip')",
                [(chunk << CHUNK_BITS) - 1],
            )
            .unwrap();
            for n in 0..10 {
                grant_one(chunk as usize * 10 + n);
            }
        }
        let listed = listed_upto(&conn).unwrap();
        assert_eq!(listed, (2 << CHUNK_BITS) - 1);
        for account in accounts {
            for limit in [1, 2, 3, 7, 100] {
                assert_eq!(paged(&conn, account, None, limit), expected[account], "{account}, {limit} a page");
            }
            assert_eq!(paged(&conn, account, Some("run"), 5), Vec::<u64>::new());
        }
    }

    #[test]
    fn verify_finds_an_entry_missing_from_the_listing() {
        let dir = tempfile::tempdir().unwrap();
        let conn = schema::open_writer(&dir.path().join("ledger.db")).unwrap();
        let (mut known, mut listing) = (Known::default(), Listing::new(&conn).unwrap());
        // A chunk and a bit.
        conn.execute_batch("BEGIN").unwrap();
        for n in 0..(1 << CHUNK_BITS) + 10 {
            grant(&Prepared::new(&conn), &mut known, 0, &format!("g{n}"), "acme", 1).unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        listing.after_commit(&conn);
        let listed = (1 << CHUNK_BITS) - 1;
        assert_eq!(listed_upto(&conn).unwrap(), listed);
        let audit = verify(&conn).unwrap();
        assert!(audit.is_ok(), "{:?}", audit.problems);
        conn.execute("DELETE FROM account_entries WHERE id = 3", []).unwrap();
        let audit = verify(&conn).unwrap();
        let problem = format!(
            "the listing of entries by account up to entry {listed} misses 1 of them and lists 0 that are not the journal's"
        );
        assert_eq!(audit.problems, [problem]);
    }
}

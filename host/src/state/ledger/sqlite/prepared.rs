//! The writer's statements, each prepared once and found by the address of its SQL text.
//!
//! `Connection::prepare_cached` hashes the whole text of a statement and copies it on every
//! use: a tenth of the writer's time, which runs some fifteen statements per reserve, three
//! charges and a settlement. The writer's statements are `&'static str`s, so their address
//! names them.

use std::cell::{RefCell, RefMut};
use std::collections::hash_map::Entry;
use std::ops::Deref;

use foldhash::HashMap;
use rusqlite::{Connection, Statement};

/// A connection and the statements prepared on it so far.
pub(super) struct Prepared<'c> {
    conn: &'c Connection,
    statements: RefCell<HashMap<usize, Statement<'c>>>,
}

impl<'c> Prepared<'c> {
    pub(super) fn new(conn: &'c Connection) -> Prepared<'c> {
        Prepared { conn, statements: RefCell::default() }
    }

    /// The statement of `sql`, prepared at its first use. One at a time: the caller drops it
    /// before it asks for the next (a statement's rows, read to the end or dropped, end its use).
    pub(super) fn get(&self, sql: &'static str) -> rusqlite::Result<RefMut<'_, Statement<'c>>> {
        let key = sql.as_ptr() as usize;
        let mut statements = self.statements.try_borrow_mut().map_err(|_| rusqlite::Error::InvalidQuery)?;
        if let Entry::Vacant(slot) = statements.entry(key) {
            slot.insert(self.conn.prepare(sql)?);
        }
        RefMut::filter_map(statements, |statements| statements.get_mut(&key)).map_err(|_| rusqlite::Error::InvalidQuery)
    }
}

impl Deref for Prepared<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_prepared_once_and_reused() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER)").unwrap();
        let prepared = Prepared::new(&conn);
        const INSERT: &str = "INSERT INTO t (n) VALUES (?1)";
        for n in 0..3 {
            prepared.get(INSERT).unwrap().execute([n]).unwrap();
        }
        assert_eq!(prepared.statements.borrow().len(), 1);
        let sum: i64 = prepared.get("SELECT SUM(n) FROM t").unwrap().query_row([], |r| r.get(0)).unwrap();
        assert_eq!(sum, 3);
        // Asking for a second while holding one is an error, not a panic.
        let held = prepared.get(INSERT).unwrap();
        assert!(prepared.get("SELECT 1").is_err());
        drop(held);
        assert!(prepared.get("SELECT 1").is_ok());
    }
}

//! Group commit: every write operation of the process goes through a queue; a writer lane takes
//! everything queued (up to `max_batch` operations) and runs it as one transaction, so that
//! concurrent operations share a commit and its WAL flush. An operation is answered once its
//! transaction has committed (`synchronous_commit` as the server has it: on by default, so
//! committed means flushed to disk).
//!
//! A batch is two round trips, each a pipeline of statements sent together:
//! 1. `BEGIN`, then the locks and reads. The holds the batch names are locked (`SELECT ... FOR
//!    NO KEY UPDATE`, sorted by id), then their accounts and the accounts the batch names are
//!    read, sorted by id. The reads after the locks see every commit made before them (READ
//!    COMMITTED takes a snapshot per statement), and no hold they read can change until the
//!    batch commits: a hold's charges only change under the hold's lock.
//! 2. The operations apply in order to those rows in memory, by the shared rules (see `book`).
//! 3. The writes, in bulk (`unnest` of arrays): new and changed holds (new ones in id order);
//!    the accounts, locked now (sorted by id), each changed by the difference the batch made to
//!    it; new grants; the journal entries in order; this writer's row of `totals`; then
//!    `COMMIT`.
//!
//! Accounts are locked late, so that a hot account, which every replica's batches change, is
//! locked only from the third step to the commit, not across a round trip and the batch's
//! work: batches of several replicas on one account then overlap instead of queueing. Their
//! reads in step 1 may be out of date by step 3, which stays exact because:
//! - a hold's settlement or release only adds to the available credits, and is checked against
//!   the hold alone (locked since step 1);
//! - the reserves of a batch are accepted only if the account, locked in step 3, still has at
//!   least what the batch needed from what it read (`need` in `book`): the update of an account
//!   that has less fails the batch, which is run again with its accounts locked in step 1;
//! - a batch whose reserves found too few credits, or no account, in what it read, or that has
//!   grants (which answer with the balance after them), is run again, or first, with its
//!   accounts locked in step 1 (`Mode::Locking`), so that what it answers is the database's
//!   state, not a stale read.
//!
//! Lock order: the grants lock (a transaction-level advisory lock, only for batches with grants)
//! first, then holds (locked, or created, in id order), then accounts in id order; once a batch
//! has an account's lock, it waits for nothing but other accounts. So two batches, of this
//! process or another, never wait for each other in a cycle. The sum of grants only changes
//! under the grants lock.
//!
//! Rows created by the batch are new ids whose unique constraints keep two batches from creating
//! the same one: the second waits for the first, fails with a unique violation, and the batch
//! is run again, now finding the row. A deadlock or serialization failure (which the lock order
//! rules out, but a database may still report) also runs the batch again. Any other database
//! error runs each of the batch's operations alone, so that only the one at fault fails. A
//! failed batch is rolled back and changes nothing.
//!
//! Journal ids: every entry is written by a batch that holds its account's lock, so an
//! account's entries are numbered in the order they commit, and reading an account's history
//! page after page never skips an entry that commits later.
//!
//! Every statement of a batch finds its rows by key. Without statistics (young tables have none)
//! the planner reads whole tables instead (sequential scans, hash and merge joins) for every
//! batch, which grows with the table; and a plan that has to scan a table then looks costly
//! enough to be compiled (JIT), which takes milliseconds. The writer's connections turn those
//! off ([`session`]), so batches use the indexes whatever the statistics say; and since their
//! plans do not depend on the keys, each statement is planned once per connection (a generic
//! plan) rather than for every batch (planning took about a third of a batch's CPU).

use std::sync::Arc;

use deadpool_postgres::{Object, Pool};
use futures::future::OptionFuture;
use futures::{FutureExt, TryFutureExt};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::super::journal::HoldState;
use super::super::{Balance, LedgerError, now_ms};
use super::book::{Account, Book, Charge, Grant, Hold, Op, Outcome, TotalsDelta};
use super::{credits, describe, describe_pool, stored as stored_value};

/// Advisory lock key that serializes batches with grants ("gpig"): the sum of grants stays under
/// [`super::super::MAX_CREDITS`].
const GRANTS_LOCK: i64 = 0x6770_6967;

/// How many times a batch runs when the database reports a conflict it may not report again.
const ATTEMPTS: usize = 5;

/// One queued operation and whom to answer.
struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Outcome, LedgerError>>,
}

/// The queue to the writer lanes; dropping it lets them finish what is queued and stop.
#[derive(Debug)]
pub(super) struct Writer {
    queue: mpsc::UnboundedSender<Job>,
}

/// Settings of the writer's connections (see the module's documentation).
const SESSION_SETTINGS: &str =
    "-c enable_seqscan=off -c enable_hashjoin=off -c enable_mergejoin=off -c jit=off -c plan_cache_mode=force_generic_plan";

/// `config` with the writer's settings added to the options it may have.
pub(super) fn session(config: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut config = config.clone();
    let options = match config.get_options() {
        Some(options) => format!("{options} {SESSION_SETTINGS}"),
        None => SESSION_SETTINGS.to_string(),
    };
    config.options(&options);
    config
}

impl Writer {
    /// Starts `lanes` writer tasks, each running one batch of up to `max_batch` operations at a
    /// time on a connection of `pool` (configured by [`session`]), with `owner` (the lease id)
    /// recorded on new holds and on the writers' `totals` rows.
    pub(super) fn start(pool: Pool, owner: Arc<str>, lanes: usize, max_batch: usize) -> Writer {
        let (queue, jobs) = mpsc::unbounded_channel();
        let jobs = Arc::new(Mutex::new(jobs));
        for lane in 0..lanes.max(1) {
            let writer = Lane { pool: pool.clone(), owner: Arc::clone(&owner), lane: lane as i32, max_batch: max_batch.max(1) };
            tokio::spawn(writer.run(Arc::clone(&jobs)));
        }
        Writer { queue }
    }

    /// Queues `op` and waits for its outcome, once committed.
    pub(super) async fn call(&self, op: Op) -> Result<Outcome, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Job { op, reply }).map_err(|_| LedgerError::Backend("the ledger's writer has stopped".into()))?;
        answer.await.map_err(|_| LedgerError::Backend("the ledger's writer stopped before answering".into()))?
    }
}

/// Why a batch did not commit.
enum Failure {
    /// The database refused a statement or could not be reached.
    Database(tokio_postgres::Error),
    /// No connection could be had.
    Pool(String),
    /// The database holds a value the ledger never writes.
    Damaged(LedgerError),
    /// What the batch read of its accounts without locking them was out of date, or may have
    /// been: it must run with its accounts locked from the start.
    Stale,
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Self {
        // The guard of `UPDATE_ACCOUNTS` writes no `held` for an account with too little left.
        let stale = error.as_db_error().is_some_and(|db| {
            db.code() == &SqlState::NOT_NULL_VIOLATION && db.table() == Some("accounts") && db.column() == Some("held")
        });
        if stale { Failure::Stale } else { Failure::Database(error) }
    }
}

impl From<LedgerError> for Failure {
    fn from(error: LedgerError) -> Self {
        Failure::Damaged(error)
    }
}

impl Failure {
    fn retryable(&self) -> bool {
        let Failure::Database(e) = self else { return false };
        [SqlState::T_R_SERIALIZATION_FAILURE, SqlState::T_R_DEADLOCK_DETECTED, SqlState::UNIQUE_VIOLATION]
            .iter()
            .any(|code| e.code() == Some(code))
    }

    /// Whether the server refused something in the batch (rather than being out of reach).
    fn refused(&self) -> bool {
        matches!(self, Failure::Database(e) if e.as_db_error().is_some())
    }

    fn error(&self) -> LedgerError {
        match self {
            Failure::Database(e) => LedgerError::Backend(format!("PostgreSQL: {}", describe(e))),
            Failure::Pool(problem) => LedgerError::Backend(format!("PostgreSQL: {problem}")),
            Failure::Damaged(error) => error.clone(),
            Failure::Stale => LedgerError::Backend("PostgreSQL: an account changed during every try of a batch".into()),
        }
    }
}

/// When a batch locks its accounts (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reads them unlocked, locks them to write them, checks that they still have what it needs.
    Late,
    /// Locks them before reading them.
    Locking,
}

impl Mode {
    /// How a batch starts: locking if it has grants, whose answer is the balance after them.
    fn first(ops: &[&Op]) -> Mode {
        if ops.iter().any(|op| matches!(op, Op::Grant { .. })) { Mode::Locking } else { Mode::Late }
    }
}

/// One writer task.
struct Lane {
    pool: Pool,
    owner: Arc<str>,
    lane: i32,
    max_batch: usize,
}

impl Lane {
    async fn run(self, jobs: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) {
        loop {
            let batch = {
                let mut jobs = jobs.lock().await;
                let Some(first) = jobs.recv().await else { return };
                let mut batch = vec![first];
                while batch.len() < self.max_batch {
                    match jobs.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                batch
            };
            self.answer(batch).await;
        }
    }

    /// Runs `batch` and answers its callers.
    async fn answer(&self, batch: Vec<Job>) {
        let ops: Vec<&Op> = batch.iter().map(|job| &job.op).collect();
        match self.commit(&ops).await {
            Ok(outcomes) => {
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    // The caller may have stopped waiting; the operation stands all the same.
                    let _ = job.reply.send(outcome);
                }
            }
            Err(failure) if failure.refused() && batch.len() > 1 => {
                tracing::warn!(
                    "a ledger batch of {} operations failed ({}); running them one by one",
                    batch.len(),
                    failure.error()
                );
                for job in batch {
                    let outcome = self.commit(&[&job.op]).await.map_err(|f| f.error()).and_then(|mut o| o.remove(0));
                    let _ = job.reply.send(outcome);
                }
            }
            Err(failure) => {
                let error = failure.error();
                for job in batch {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// Runs `ops` in one transaction, again if the database reports a conflict.
    async fn commit(&self, ops: &[&Op]) -> Result<Vec<Result<Outcome, LedgerError>>, Failure> {
        let mut mode = Mode::first(ops);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = self.pool.get().await.map_err(|e| Failure::Pool(describe_pool(&e)))?;
            let result = self.transaction(&client, ops, mode).await;
            if result.is_err() && !client.is_closed() && client.batch_execute("ROLLBACK").await.is_err() {
                // Not known to be usable: the pool must not hand it out again.
                let _ = Object::take(client);
            }
            match result {
                Err(Failure::Stale) if mode == Mode::Late => mode = Mode::Locking,
                Err(failure) if failure.retryable() && attempt < ATTEMPTS => continue,
                result => return result,
            }
        }
    }

    async fn transaction(&self, client: &Object, ops: &[&Op], mode: Mode) -> Result<Vec<Result<Outcome, LedgerError>>, Failure> {
        let mut book = Book { owner: self.owner.to_string(), ..Book::default() };
        read(client, ops, &mut book, mode).await?;
        book.now = now_ms();
        let outcomes: Vec<_> = ops.iter().map(|op| book.apply(op)).collect();
        let read_matters = |outcome: &Result<Outcome, LedgerError>| {
            matches!(outcome, Err(LedgerError::Insufficient { .. } | LedgerError::UnknownAccount(_)))
        };
        if mode == Mode::Late && outcomes.iter().any(read_matters) {
            return Err(Failure::Stale);
        }
        write(client, &book, (&self.owner, self.lane), mode).await?;
        Ok(outcomes)
    }
}

/// The ids a batch names.
#[derive(Default)]
struct Keys<'a> {
    holds: Vec<&'a str>,
    accounts: Vec<&'a str>,
    charge_holds: Vec<&'a str>,
    charge_ops: Vec<&'a str>,
    grants: Vec<&'a str>,
}

impl<'a> Keys<'a> {
    fn of(ops: &[&'a Op]) -> Keys<'a> {
        let mut keys = Keys::default();
        for op in ops {
            match op {
                Op::Grant { id, account, .. } => {
                    keys.grants.push(id);
                    keys.accounts.push(account);
                }
                Op::Reserve { hold, account, .. } => {
                    keys.holds.push(hold);
                    keys.accounts.push(account);
                }
                Op::Charge { hold, op, .. } => {
                    keys.holds.push(hold);
                    keys.charge_holds.push(hold);
                    keys.charge_ops.push(op);
                }
                Op::Close { hold, .. } => keys.holds.push(hold),
                Op::Recover { holds, .. } => keys.holds.extend(holds.iter().map(|(hold, _)| hold.as_str())),
            }
        }
        keys
    }
}

const LOCK_GRANTS: &str = "SELECT pg_advisory_xact_lock($1)";
const LOCK_HOLDS: &str = "SELECT id, account, amount, charged, ttl_ms, expires_ms, owner, state, posted \
     FROM ledger.holds WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";
/// The accounts named ($1) and those of the holds named ($2), sorted by id, with `$lock`. The
/// keys are one array, computed once: a locking read that finds a row changed by another
/// transaction checks its condition again on the new version, which a join would not survive.
macro_rules! accounts_of {
    ($lock:literal) => {
        concat!(
            "SELECT id, balance, held FROM ledger.accounts ",
            "WHERE id = ANY($1::text[] || ARRAY(SELECT account FROM ledger.holds WHERE id = ANY($2))) ORDER BY id",
            $lock
        )
    };
}
const READ_ACCOUNTS: &str = accounts_of!("");
const LOCK_ACCOUNTS: &str = accounts_of!(" FOR NO KEY UPDATE");
const READ_CHARGES: &str = "SELECT k.run, k.op, j.amount, j.reason, j.upto \
     FROM unnest($1::text[], $2::text[]) AS k (run, op), \
     LATERAL (SELECT j.amount, j.reason, (SELECT SUM(c.amount) FROM ledger.journal AS c \
             WHERE c.kind = 'charge' AND c.run = j.run AND c.id <= j.id)::bigint AS upto \
         FROM ledger.journal AS j WHERE j.kind = 'charge' AND j.run = k.run AND j.op = k.op LIMIT 1) AS j";
const READ_GRANTS: &str = "SELECT id, account, amount, balance, held FROM ledger.grants WHERE id = ANY($1)";
const READ_GRANTED: &str = "SELECT COALESCE(SUM(granted), 0)::bigint FROM ledger.totals";

/// Step 1: begins the transaction, locks and reads every row the batch may change into `book`
/// (its accounts locked only in [`Mode::Locking`]).
async fn read(client: &Object, ops: &[&Op], book: &mut Book, mode: Mode) -> Result<(), Failure> {
    let keys = Keys::of(ops);
    let has_grants = !keys.grants.is_empty();
    let lock_grants = client.prepare_cached(LOCK_GRANTS).await?;
    let lock_holds = client.prepare_cached(LOCK_HOLDS).await?;
    let read_accounts = client.prepare_cached(if mode == Mode::Locking { LOCK_ACCOUNTS } else { READ_ACCOUNTS }).await?;
    let read_charges = client.prepare_cached(READ_CHARGES).await?;
    let read_grants = client.prepare_cached(READ_GRANTS).await?;
    let read_granted = client.prepare_cached(READ_GRANTED).await?;
    let lock_grants_params: [&(dyn ToSql + Sync); 1] = [&GRANTS_LOCK];
    let lock_holds_params: [&(dyn ToSql + Sync); 1] = [&keys.holds];
    let read_accounts_params: [&(dyn ToSql + Sync); 2] = [&keys.accounts, &keys.holds];
    let read_charges_params: [&(dyn ToSql + Sync); 2] = [&keys.charge_holds, &keys.charge_ops];
    let read_grants_params: [&(dyn ToSql + Sync); 1] = [&keys.grants];
    // Sent in this order on the connection, without waiting for each other's answers.
    let (_, _, holds, accounts, charges, grants, granted) = futures::try_join!(
        client.batch_execute("BEGIN"),
        OptionFuture::from(has_grants.then(|| client.execute(&lock_grants, &lock_grants_params))).map(Option::transpose),
        client.query(&lock_holds, &lock_holds_params),
        client.query(&read_accounts, &read_accounts_params),
        client.query(&read_charges, &read_charges_params),
        OptionFuture::from(has_grants.then(|| client.query(&read_grants, &read_grants_params))).map(Option::transpose),
        OptionFuture::from(has_grants.then(|| client.query_one(&read_granted, &[]))).map(Option::transpose),
    )?;
    for row in holds {
        let state = match (row.get::<_, &str>(7), credits(row.get(8))?) {
            ("open", _) => HoldState::Open,
            ("settled", posted) => HoldState::Settled { posted },
            ("released", _) => HoldState::Released,
            (other, _) => return Err(LedgerError::Backend(format!("a hold has the unknown state '{other}'")).into()),
        };
        let hold = Hold {
            account: row.get(1),
            amount: credits(row.get(2))?,
            charged: credits(row.get(3))?,
            ttl_ms: credits(row.get(4))?,
            expires_ms: credits(row.get(5))?,
            owner: row.get(6),
            state,
            stored: true,
            changed: false,
        };
        book.holds.insert(row.get(0), hold);
    }
    for row in accounts {
        let credits = Balance { balance: credits(row.get(1))?, held: credits(row.get(2))? };
        book.accounts.insert(row.get(0), Account { credits, read: credits, need: 0, stored: true, changed: false });
    }
    for row in charges {
        let (hold, op): (String, String) = (row.get(0), row.get(1));
        let upto = credits(row.get(4))?;
        let Some(remaining) = book.holds.get(&hold).and_then(|h| h.amount.checked_sub(upto)) else {
            return Err(LedgerError::Backend(format!("the charges of hold '{hold}' exceed it, or it is missing")).into());
        };
        book.charges.insert((hold, op), Charge { amount: credits(row.get(2))?, reason: row.get(3), remaining });
    }
    for row in grants.unwrap_or_default() {
        let after = Balance { balance: credits(row.get(3))?, held: credits(row.get(4))? };
        book.grants.insert(row.get(0), Grant { account: row.get(1), amount: credits(row.get(2))?, after, stored: true });
    }
    book.granted = granted.map(|row| credits(row.get(0))).transpose()?;
    Ok(())
}

const INSERT_ACCOUNTS: &str =
    "INSERT INTO ledger.accounts (id, balance, held) SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])";
const LOCK_ACCOUNTS_TO_WRITE: &str = "SELECT FROM ledger.accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";
/// Adds each account's differences; an account with less available than the batch needs gets no
/// `held` (NULL), which the NOT NULL constraint refuses: [`Failure::Stale`].
const UPDATE_ACCOUNTS: &str = "UPDATE ledger.accounts AS a SET balance = a.balance + v.balance, \
         held = CASE WHEN a.balance - a.held >= v.need THEN a.held + v.held END \
     FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS v (id, balance, held, need) WHERE a.id = v.id";
const INSERT_GRANTS: &str = "INSERT INTO ledger.grants (id, account, amount, balance, held) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])";
const INSERT_HOLDS: &str = "INSERT INTO ledger.holds (id, account, amount, charged, ttl_ms, expires_ms, owner, state, posted) \
     SELECT id, account, amount, charged, ttl_ms, expires_ms, owner, state, posted \
     FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::text[], \
         $8::text[], $9::bigint[]) WITH ORDINALITY AS h (id, account, amount, charged, ttl_ms, expires_ms, owner, state, \
             posted, n) \
     ORDER BY n";
const UPDATE_HOLDS: &str = "UPDATE ledger.holds AS h SET charged = v.charged, state = v.state, posted = v.posted \
     FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[]) AS v (id, charged, state, posted) WHERE h.id = v.id";
const INSERT_ENTRIES: &str = "INSERT INTO ledger.journal (time_ms, account, run, op, step, kind, amount, reason) \
     SELECT $1, account, run, op, step, kind, amount, reason \
     FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[]) \
         WITH ORDINALITY AS e (account, run, op, step, kind, amount, reason, n) \
     ORDER BY n";
const ADD_TOTALS: &str = "INSERT INTO ledger.totals AS t (owner, lane, granted, posted, settled, released) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (owner, lane) DO UPDATE SET \
         granted = t.granted + excluded.granted, posted = t.posted + excluded.posted, \
         settled = t.settled + excluded.settled, released = t.released + excluded.released";

/// Columns of rows, as statement parameters.
type Params<'a> = Vec<Box<dyn ToSql + Sync + Send + 'a>>;

/// One write: a statement and its parameters.
type Write<'a> = (&'static str, Params<'a>);

/// Step 3: writes what `book` changed, and commits. Holds come before accounts: once a batch has
/// locked an account (here in [`Mode::Late`]), it waits only for other accounts, in id order.
async fn write(client: &Object, book: &Book, (owner, lane): (&str, i32), mode: Mode) -> Result<(), Failure> {
    let mut writes = created_accounts(book);
    writes.extend(hold_writes(book));
    writes.extend(totals_write(book, owner, lane));
    writes.extend(account_writes(book, mode));
    writes.extend(grant_writes(book));
    writes.extend(journal_writes(book));
    let mut statements = Vec::with_capacity(writes.len());
    for (sql, params) in writes {
        statements.push((client.prepare_cached(sql).await?, params));
    }
    // Sent together with the COMMIT after them. The batch counts as committed only if every
    // write and the COMMIT succeeded: after a failed write, the server answers COMMIT by
    // rolling back.
    let writes = statements.iter().map(|(statement, params)| {
        let params = params.iter().map(|p| &**p as &(dyn ToSql + Sync));
        client.execute_raw(statement, params).map_ok(drop)
    });
    let (written, committed) = futures::join!(futures::future::join_all(writes), client.batch_execute("COMMIT"));
    written.into_iter().collect::<Result<Vec<()>, _>>()?;
    committed?;
    Ok(())
}

/// Accounts the batch's grants create (only batches in [`Mode::Locking`] have grants).
fn created_accounts(book: &Book) -> Vec<Write<'_>> {
    let created: Vec<_> = book.accounts.iter().filter(|(_, a)| !a.stored).collect();
    if created.is_empty() {
        return Vec::new();
    }
    vec![(
        INSERT_ACCOUNTS,
        vec![
            Box::new(created.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>()),
            Box::new(created.iter().map(|(_, a)| stored_value(a.credits.balance)).collect::<Vec<_>>()),
            Box::new(created.iter().map(|(_, a)| stored_value(a.credits.held)).collect::<Vec<_>>()),
        ],
    )]
}

/// New holds, created in id order, and changed ones (locked in step 1).
fn hold_writes(book: &Book) -> Vec<Write<'_>> {
    let mut writes = Vec::new();
    let mut created: Vec<_> = book.holds.iter().filter(|(_, h)| !h.stored).collect();
    created.sort_unstable_by_key(|(id, _)| id.as_str());
    if !created.is_empty() {
        writes.push((
            INSERT_HOLDS,
            vec![
                Box::new(created.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>()) as Box<dyn ToSql + Sync + Send>,
                Box::new(created.iter().map(|(_, h)| h.account.as_str()).collect::<Vec<_>>()),
                Box::new(created.iter().map(|(_, h)| stored_value(h.amount)).collect::<Vec<_>>()),
                Box::new(created.iter().map(|(_, h)| stored_value(h.charged)).collect::<Vec<_>>()),
                Box::new(created.iter().map(|(_, h)| stored_value(h.ttl_ms)).collect::<Vec<_>>()),
                Box::new(created.iter().map(|(_, h)| stored_value(h.expires_ms)).collect::<Vec<_>>()),
                Box::new(created.iter().map(|(_, h)| h.owner.as_str()).collect::<Vec<_>>()),
                Box::new(created.iter().map(|(_, h)| state_name(h.state)).collect::<Vec<_>>()),
                Box::new(created.iter().map(|(_, h)| stored_value(posted(h.state))).collect::<Vec<_>>()),
            ],
        ));
    }
    let changed: Vec<_> = book.holds.iter().filter(|(_, h)| h.stored && h.changed).collect();
    if !changed.is_empty() {
        writes.push((
            UPDATE_HOLDS,
            vec![
                Box::new(changed.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>()),
                Box::new(changed.iter().map(|(_, h)| stored_value(h.charged)).collect::<Vec<_>>()),
                Box::new(changed.iter().map(|(_, h)| state_name(h.state)).collect::<Vec<_>>()),
                Box::new(changed.iter().map(|(_, h)| stored_value(posted(h.state))).collect::<Vec<_>>()),
            ],
        ));
    }
    writes
}

/// The lock of the batch's stored accounts (in [`Mode::Late`]), then the differences it made to
/// them, guarded by what it needs (see [`UPDATE_ACCOUNTS`]).
fn account_writes(book: &Book, mode: Mode) -> Vec<Write<'_>> {
    let mut writes = Vec::new();
    let stored: Vec<_> = book.accounts.iter().filter(|(_, a)| a.stored).collect();
    let changed: Vec<_> = stored.iter().filter(|(_, a)| a.changed).collect();
    // The update locks one account by itself; several must be locked in order first.
    if mode == Mode::Late && (stored.len() > 1 || (stored.len() == 1 && changed.is_empty())) {
        writes.push((
            LOCK_ACCOUNTS_TO_WRITE,
            vec![Box::new(stored.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>()) as Box<dyn ToSql + Sync + Send>],
        ));
    }
    if !changed.is_empty() {
        let difference = |now: u64, read: u64| stored_value(now) - stored_value(read);
        writes.push((
            UPDATE_ACCOUNTS,
            vec![
                Box::new(changed.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>()),
                Box::new(changed.iter().map(|(_, a)| difference(a.credits.balance, a.read.balance)).collect::<Vec<_>>()),
                Box::new(changed.iter().map(|(_, a)| difference(a.credits.held, a.read.held)).collect::<Vec<_>>()),
                Box::new(changed.iter().map(|(_, a)| stored_value(a.need)).collect::<Vec<_>>()),
            ],
        ));
    }
    writes
}

/// What the batch adds to this writer's row of `totals` (no other writer's batches change it).
fn totals_write<'a>(book: &Book, owner: &'a str, lane: i32) -> Option<Write<'a>> {
    let t = book.totals;
    if t == TotalsDelta::default() {
        return None;
    }
    let params: Params<'a> = vec![
        Box::new(owner),
        Box::new(lane),
        Box::new(stored_value(t.granted)),
        Box::new(stored_value(t.posted)),
        Box::new(stored_value(t.settled)),
        Box::new(stored_value(t.released)),
    ];
    Some((ADD_TOTALS, params))
}

fn grant_writes(book: &Book) -> Vec<Write<'_>> {
    let grants: Vec<_> = book.grants.iter().filter(|(_, g)| !g.stored).collect();
    if grants.is_empty() {
        return Vec::new();
    }
    vec![(
        INSERT_GRANTS,
        vec![
            Box::new(grants.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>()),
            Box::new(grants.iter().map(|(_, g)| g.account.as_str()).collect::<Vec<_>>()),
            Box::new(grants.iter().map(|(_, g)| stored_value(g.amount)).collect::<Vec<_>>()),
            Box::new(grants.iter().map(|(_, g)| stored_value(g.after.balance)).collect::<Vec<_>>()),
            Box::new(grants.iter().map(|(_, g)| stored_value(g.after.held)).collect::<Vec<_>>()),
        ],
    )]
}

fn journal_writes(book: &Book) -> Vec<Write<'_>> {
    let entries = &book.journal;
    if entries.is_empty() {
        return Vec::new();
    }
    vec![(
        INSERT_ENTRIES,
        vec![
            Box::new(stored_value(book.now)),
            Box::new(entries.iter().map(|e| e.account.as_str()).collect::<Vec<_>>()),
            Box::new(entries.iter().map(|e| e.run.as_deref()).collect::<Vec<_>>()),
            Box::new(entries.iter().map(|e| e.op.as_deref()).collect::<Vec<_>>()),
            Box::new(entries.iter().map(|e| e.step()).collect::<Vec<_>>()),
            Box::new(entries.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>()),
            Box::new(entries.iter().map(|e| stored_value(e.amount)).collect::<Vec<_>>()),
            Box::new(entries.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>()),
        ],
    )]
}

fn state_name(state: HoldState) -> &'static str {
    match state {
        HoldState::Open => "open",
        HoldState::Settled { .. } => "settled",
        HoldState::Released => "released",
    }
}

fn posted(state: HoldState) -> u64 {
    match state {
        HoldState::Settled { posted } => posted,
        HoldState::Open | HoldState::Released => 0,
    }
}

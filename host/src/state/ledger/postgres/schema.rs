//! The ledger's tables in PostgreSQL, in the schema `ledger` of the database, and their
//! migrations.
//!
//! `ledger.version` holds the schema version. At startup every process takes a transaction-level
//! advisory lock, so that replicas starting together migrate once, and applies the migrations
//! after the stored version in that one transaction (DDL is transactional in PostgreSQL): a
//! failure leaves the schema as it was. A schema `ledger` without the version table (another
//! application's), or a version from a newer genpipe, is refused with the reason and the fix.

use tokio_postgres::Client;

/// Advisory lock key of migrations ("gpim").
const MIGRATION_LOCK: i64 = 0x6770_696d;

/// The schema, one migration per version: `MIGRATIONS[n]` takes version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // Version 1. `accounts`, `holds`, `grants` and `totals` are the fold of `journal`, kept for
    // speed; the checks make the database itself refuse a negative balance or an overcharged
    // hold. Ids compare byte by byte (COLLATE "C"): the order in which rows are locked and holds
    // recovered is the same on every server. `totals` has a row per writer (a process's lease
    // and lane, see `writer`), so that writers never wait for each other on it; `totals()` adds
    // them up, and recovery folds the rows of lapsed leases into the row ('', 0).
    r#"CREATE TABLE ledger.accounts (
        id text COLLATE "C" PRIMARY KEY,
        balance bigint NOT NULL CHECK (balance >= 0),
        held bigint NOT NULL CHECK (held >= 0 AND held <= balance)
    );
    CREATE TABLE ledger.holds (
        id text COLLATE "C" PRIMARY KEY,
        account text COLLATE "C" NOT NULL REFERENCES ledger.accounts (id),
        amount bigint NOT NULL CHECK (amount > 0),
        charged bigint NOT NULL CHECK (charged >= 0 AND charged <= amount),
        ttl_ms bigint NOT NULL CHECK (ttl_ms >= 0),
        expires_ms bigint NOT NULL,
        owner text COLLATE "C" NOT NULL,
        state text NOT NULL CHECK (state IN ('open', 'settled', 'released')),
        posted bigint NOT NULL CHECK (posted >= 0 AND posted <= charged)
    );
    CREATE INDEX holds_open ON ledger.holds (owner, expires_ms) WHERE state = 'open';
    CREATE TABLE ledger.journal (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        time_ms bigint NOT NULL,
        account text COLLATE "C" NOT NULL,
        run text COLLATE "C",
        op text COLLATE "C",
        step text COLLATE "C",
        kind text NOT NULL CHECK (kind IN ('grant', 'hold', 'charge', 'post', 'release')),
        amount bigint NOT NULL CHECK (amount > 0 OR (kind = 'post' AND amount = 0)),
        reason text NOT NULL
    );
    CREATE INDEX journal_by_account ON ledger.journal (account, id);
    CREATE UNIQUE INDEX journal_charges ON ledger.journal (run, op) WHERE kind = 'charge';
    CREATE FUNCTION ledger.journal_is_append_only() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'the journal is append-only'; END $$;
    CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON ledger.journal
        FOR EACH ROW EXECUTE FUNCTION ledger.journal_is_append_only();
    CREATE TABLE ledger.grants (
        id text COLLATE "C" PRIMARY KEY,
        account text COLLATE "C" NOT NULL REFERENCES ledger.accounts (id),
        amount bigint NOT NULL CHECK (amount > 0),
        balance bigint NOT NULL,
        held bigint NOT NULL
    );
    CREATE TABLE ledger.totals (
        owner text COLLATE "C" NOT NULL,
        lane integer NOT NULL,
        granted bigint NOT NULL CHECK (granted >= 0),
        posted bigint NOT NULL CHECK (posted >= 0),
        settled bigint NOT NULL CHECK (settled >= 0),
        released bigint NOT NULL CHECK (released >= 0),
        PRIMARY KEY (owner, lane)
    );
    INSERT INTO ledger.totals VALUES ('', 0, 0, 0, 0, 0);
    CREATE TABLE ledger.leases (
        id text COLLATE "C" PRIMARY KEY,
        expires_at timestamptz NOT NULL
    );"#,
    // Version 2. The runs replicas share (see `state::shared`): each run's snapshot as clients
    // read it, its events, its outputs, and the idempotency keys of run requests. `lease` is the
    // lease of the replica executing the run.
    r#"CREATE TABLE ledger.runs (
        id text COLLATE "C" PRIMARY KEY,
        account text COLLATE "C" NOT NULL,
        lease text COLLATE "C" NOT NULL,
        status text NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
        snapshot jsonb NOT NULL,
        last_seq bigint NOT NULL DEFAULT 0,
        ended_at timestamptz
    );
    CREATE INDEX runs_running ON ledger.runs (lease) WHERE status = 'running';
    CREATE INDEX runs_ended ON ledger.runs (ended_at) WHERE ended_at IS NOT NULL;
    CREATE TABLE ledger.run_events (
        run text COLLATE "C" NOT NULL REFERENCES ledger.runs (id) ON DELETE CASCADE,
        seq bigint NOT NULL,
        progress_of text COLLATE "C",
        body text NOT NULL,
        PRIMARY KEY (run, seq)
    );
    CREATE TABLE ledger.run_outputs (
        run text COLLATE "C" NOT NULL REFERENCES ledger.runs (id) ON DELETE CASCADE,
        step text COLLATE "C" NOT NULL,
        mime_type text NOT NULL,
        body bytea NOT NULL,
        PRIMARY KEY (run, step)
    );
    CREATE TABLE ledger.idempotency (
        scope text COLLATE "C" NOT NULL,
        key text COLLATE "C" NOT NULL,
        body_hash bytea NOT NULL,
        outcome jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (scope, key)
    );"#,
];

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Brings the schema to [`SCHEMA_VERSION`]; the error says what is wrong and the fix.
pub(super) async fn migrate(client: &mut Client) -> Result<(), String> {
    let sql = |e: tokio_postgres::Error| super::describe(&e);
    let tx = client.transaction().await.map_err(sql)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(sql)?;
    let schema: bool = tx.query_one("SELECT to_regnamespace('ledger') IS NOT NULL", &[]).await.map_err(sql)?.get(0);
    let versioned: bool = tx.query_one("SELECT to_regclass('ledger.version') IS NOT NULL", &[]).await.map_err(sql)?.get(0);
    let version: i32 = match (schema, versioned) {
        (false, _) => {
            tx.batch_execute(
                "CREATE SCHEMA ledger; CREATE TABLE ledger.version (version integer NOT NULL); \
                              INSERT INTO ledger.version VALUES (0);",
            )
            .await
            .map_err(sql)?;
            0
        }
        (true, false) => {
            return Err("has a schema 'ledger' that genpipe did not make (it has no table ledger.version); genpipe will \
                        not write into it. Point [ledger] url at a database of its own"
                .into());
        }
        (true, true) => tx.query_one("SELECT version FROM ledger.version", &[]).await.map_err(sql)?.get(0),
    };
    if version > SCHEMA_VERSION {
        return Err(format!(
            "has ledger schema version {version}, written by a newer genpipe; this one knows versions up to \
             {SCHEMA_VERSION}. Upgrade genpipe, or point [ledger] url at another database"
        ));
    }
    if version < 0 {
        return Err(format!(
            "has ledger schema version {version}, which genpipe never writes. Point [ledger] url at another database"
        ));
    }
    for (from, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(migration).await.map_err(|e| format!("could not be migrated to version {}: {}", from + 1, sql(e)))?;
    }
    tx.execute("UPDATE ledger.version SET version = $1", &[&SCHEMA_VERSION]).await.map_err(sql)?;
    tx.commit().await.map_err(sql)
}

//! A real PostgreSQL for the tests, never a mock: the server whose URL is in
//! `GENPIPE_TEST_POSTGRES_URL` (scripts/test.sh starts one and sets it), or else the one
//! `scripts/postgres.sh start` starts (installing the Debian package if needed) and leaves
//! running (`scripts/postgres.sh stop` stops it). When neither works the test fails, with the
//! reason: it is never skipped. Each test gets a database of its own, so tests run
//! concurrently, and the database is dropped when the test is done with it.

#![allow(dead_code)] // each test binary uses its own subset

use std::sync::OnceLock;

/// The URL of the test server, found or started once per test binary.
pub fn server_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("GENPIPE_TEST_POSTGRES_URL")
            && !url.is_empty()
        {
            return url;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres.sh");
        let out = std::process::Command::new("bash")
            .args([script, "start"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
        assert!(
            out.status.success(),
            "these tests need PostgreSQL: set GENPIPE_TEST_POSTGRES_URL, or let {script} start one; it failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

/// `url` with its database replaced by `database` (a query parameter overrides the path).
pub fn with_database(url: &str, database: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}dbname={database}")
}

/// A connection to `url`, its connection driven by a task of the current runtime.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of one test's own, dropped (with whatever is still connected to it) when this is.
pub struct TestDatabase {
    /// Its URL.
    pub url: String,
    name: String,
}

impl TestDatabase {
    /// Creates an empty database on the test server.
    pub async fn create() -> TestDatabase {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(server_url()).await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap_or_else(|e| panic!("CREATE DATABASE: {e:?}"));
        TestDatabase { url: with_database(server_url(), &name), name }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let drop_it = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // On a thread of its own: this may run inside a runtime, or after it ended.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let admin = connect(server_url()).await;
                // FORCE ends the tests' connections, but not an autovacuum worker's (the test
                // role may not): that one finishes soon, so try again for a while.
                let mut tries = 0;
                loop {
                    tries += 1;
                    match admin.batch_execute(&drop_it).await {
                        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) && tries < 50 => {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        result => return result.map_err(|e| format!("{e:?}")),
                    }
                }
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the thread dropping it panicked".into()));
        if let Err(e) = dropped {
            eprintln!("dropping test database {}: {e}", self.name);
        }
    }
}

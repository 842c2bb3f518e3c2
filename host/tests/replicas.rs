//! Three `genpipe serve` processes (replicas) on loopback over one PostgreSQL database, as
//! operators run them behind a load balancer: a thousand concurrent runs add up to the credit;
//! `kill -9` of a replica mid-load, ten times over, loses no acknowledged charge and leaves
//! nothing held once the survivors resolved its holds; one Idempotency-Key sent to two replicas
//! at once starts one run; any replica serves any run (its status, outputs and live events,
//! resumed with `Last-Event-ID`), and a dead replica's run ends `failed`; PostgreSQL stopped and
//! started again under load answers 503 while down, loses nothing and resumes by itself.
//!
//! Real processes (the `genpipe` binary), a real server (see `common/postgres.rs`), a database
//! per test (and a server of its own for the test that stops it). Waits poll with deadlines.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use genpipe::state::ledger::{Ledger, PostgresLedger, PostgresOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[path = "common/postgres.rs"]
mod postgres;
use postgres::TestDatabase;

const ACCOUNT: &str = "acme";
const API_KEY: &str = "acme-key";
const GRANTED: u64 = 1_000_000_000;
const REPLICAS: usize = 3;
/// Added to every deadline derived from the lease, for a loaded machine.
const MARGIN: Duration = Duration::from_secs(5);

/// The configuration every replica of a test shares; `{URL}`, `{HOLD_TTL}` and `{CACHE}` are
/// filled in.
const CONFIG: &str = r#"
[server]
admin_key = "admin-key"
max_runs_in_flight = 2000
shutdown_grace_secs = 1
rate_limit_per_sec = 1000000
rate_limit_burst = 1000000

[runtime]
compile_cache_dir = "{CACHE}"

[credits]
on_failure = "release"

[ledger]
kind = "postgres"
url = "{URL}"
hold_ttl_secs = {HOLD_TTL}

[[accounts]]
id = "acme"
api_key = "acme-key"
credits = 1000000000

[plugins.test-llm]
path = "builtin:test-llm"
world = "llm-step"
timeout_ms = 60000

[plugins.test-llm-patient]
path = "builtin:test-llm"
world = "llm-step"
timeout_ms = 600000

[plugins.test-image]
path = "builtin:test-image"
world = "image-step"

# Charges the run's `amount` param, then 1 credit a word of the prompt; and draws a picture.
[pipelines.charged]
[[pipelines.charged.steps]]
id = "text"
plugin = "test-llm"
max_cost = 20
params = { amount = 1, behaviour = "chunks" }

[[pipelines.charged.steps]]
id = "image"
plugin = "test-image"
max_cost = 1
params = { width = 8, height = 8 }

# The same after a second: runs that are in flight when a replica is killed.
[pipelines.slow]
[[pipelines.slow.steps]]
id = "text"
plugin = "test-llm"
max_cost = 20
params = { delay_ms = 1000, amount = 1, behaviour = "chunks" }

# Five steps one after the other, each 150 ms then a text chunk a word: a run whose events
# arrive over a second or so.
[pipelines.chain]
[[pipelines.chain.steps]]
id = "s1"
plugin = "test-llm"
max_cost = 10
params = { delay_ms = 150, behaviour = "chunks" }

[[pipelines.chain.steps]]
id = "s2"
plugin = "test-llm"
after = ["s1"]
max_cost = 10
params = { delay_ms = 150, behaviour = "chunks" }

[[pipelines.chain.steps]]
id = "s3"
plugin = "test-llm"
after = ["s2"]
max_cost = 10
params = { delay_ms = 150, behaviour = "chunks" }

[[pipelines.chain.steps]]
id = "s4"
plugin = "test-llm"
after = ["s3"]
max_cost = 10
params = { delay_ms = 150, behaviour = "chunks" }

[[pipelines.chain.steps]]
id = "s5"
plugin = "test-llm"
after = ["s4"]
max_cost = 10
params = { delay_ms = 150, behaviour = "chunks" }

# Sleeps for ten minutes: a run that is in flight for as long as the test needs.
[pipelines.stuck]
[[pipelines.stuck.steps]]
id = "wait"
plugin = "test-llm-patient"
max_cost = 5
params = { delay_ms = 600000 }
"#;

/// How long a replica's lease lives and how often each replica sweeps dead replicas' holds and
/// runs, for `hold_ttl_secs`: the lease is renewed every third of the hold's time to live (at
/// most every 10 s) and lapses after three renewal periods; replicas sweep every renewal period
/// (as `PostgresOptions::from_config` and the host derive them).
fn lease_and_sweep(hold_ttl_secs: u64) -> (Duration, Duration) {
    let renew = (Duration::from_secs(hold_ttl_secs) / 3).min(Duration::from_secs(10));
    (renew * 3, renew)
}

/// The longest the survivors may take to resolve a dead replica's holds: its lease lapses, then
/// a survivor's next sweep resolves them.
fn resolution_deadline(hold_ttl_secs: u64) -> Duration {
    let (lease, sweep) = lease_and_sweep(hold_ttl_secs);
    lease + sweep + MARGIN
}

/// Polls `check` every `every` until it gives `Some`, for at most `within`; panics with `what`.
async fn poll<T, F, Fut>(within: Duration, every: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(every).await;
    }
}

/// One `genpipe serve` process.
struct Replica {
    child: Child,
    base: String,
    /// Its ledger lease (the owner its holds record).
    lease: String,
    /// Its stderr.
    log: PathBuf,
}

impl Replica {
    /// `kill -9`.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of the file at `path`.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Three replicas sharing one configuration and one database, and a connection to it.
struct Cluster {
    url: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    replicas: Vec<Replica>,
    /// Logs of the replicas killed and replaced.
    old_logs: Vec<PathBuf>,
    started: usize,
    db: tokio_postgres::Client,
    http: reqwest::Client,
}

impl Cluster {
    /// Starts three replicas, one after the other, on the database at `url`.
    async fn start(url: &str, hold_ttl_secs: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("replicas-compiled");
        let text = CONFIG
            .replace("{URL}", url)
            .replace("{HOLD_TTL}", &hold_ttl_secs.to_string())
            .replace("{CACHE}", &cache.display().to_string());
        let config = dir.path().join("genpipe.toml");
        std::fs::write(&config, text).unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        let db = postgres::connect(url).await;
        let mut cluster =
            Cluster { url: url.to_string(), dir, config, replicas: Vec::new(), old_logs: Vec::new(), started: 0, db, http };
        for _ in 0..REPLICAS {
            let replica = cluster.spawn().await;
            cluster.replicas.push(replica);
        }
        cluster
    }

    /// The lease ids in the database (none before the first replica created the schema).
    async fn leases(&self) -> BTreeSet<String> {
        match self.db.query("SELECT id FROM ledger.leases", &[]).await {
            Ok(rows) => rows.iter().map(|row| row.get(0)).collect(),
            Err(_) => BTreeSet::new(),
        }
    }

    /// Starts a replica and waits until it listens; its lease is the one it added.
    async fn spawn(&mut self) -> Replica {
        self.started += 1;
        let log = self.dir.path().join(format!("replica-{}.log", self.started));
        let before = self.leases().await;
        let mut child = Command::new(env!("CARGO_BIN_EXE_genpipe"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .args(["--listen", "127.0.0.1:0"])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The first line names the address; the rest of stdout is drained until the process ends.
        let stdout = child.stdout.take().unwrap();
        let (tell, first_line) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tell.send(line);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = tokio::task::spawn_blocking(move || first_line.recv_timeout(Duration::from_secs(120)))
            .await
            .unwrap()
            .unwrap_or_default();
        let Some(base) = line.trim().strip_prefix("genpipe listening on ") else {
            let _ = child.kill();
            panic!("replica {} did not start (stdout {line:?}); its log:\n{}", self.started, tail(&log, 40));
        };
        let base = base.to_string();
        let added: Vec<String> = self.leases().await.difference(&before).cloned().collect();
        assert_eq!(added.len(), 1, "replica {} should have added one lease: {added:?}", self.started);
        Replica { child, base, lease: added[0].clone(), log }
    }

    /// Kills replica `i` with SIGKILL.
    fn kill(&mut self, i: usize) {
        self.replicas[i].kill();
    }

    /// Starts a fresh replica in place of replica `i` (killed).
    async fn replace(&mut self, i: usize) {
        let fresh = self.spawn().await;
        let old = std::mem::replace(&mut self.replicas[i], fresh);
        self.old_logs.push(old.log.clone());
    }

    fn base(&self, i: usize) -> String {
        self.replicas[i].base.clone()
    }

    /// Reconnects to the database (after it restarted).
    async fn reconnect(&mut self) {
        self.db = postgres::connect(&self.url).await;
    }

    /// Open holds whose owner is `lease`.
    async fn open_holds_of(&self, lease: &str) -> i64 {
        let row =
            self.db.query_one("SELECT count(*) FROM ledger.holds WHERE owner = $1 AND state = 'open'", &[&lease]).await.unwrap();
        row.get(0)
    }

    /// `(state, posted)` of the holds of `runs`, by run id.
    async fn holds(&self, runs: &[String]) -> BTreeMap<String, (String, u64)> {
        let rows = self.db.query("SELECT id, state, posted FROM ledger.holds WHERE id = ANY($1)", &[&runs]).await.unwrap();
        rows.iter().map(|row| (row.get(0), (row.get(1), row.get::<_, i64>(2) as u64))).collect()
    }

    /// `genpipe credits verify --config FILE`: its exit status and stdout.
    fn credits_verify(&self) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_genpipe"))
            .args(["credits", "verify", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for path in self.old_logs.iter().chain(self.replicas.iter().map(|r| &r.log)) {
                eprintln!("--- the end of {} ---\n{}", path.display(), tail(path, 30));
            }
        }
    }
}

/// A request to `base` as the test account.
fn request(http: &reqwest::Client, method: reqwest::Method, base: &str, path: &str) -> reqwest::RequestBuilder {
    http.request(method, format!("{base}{path}")).bearer_auth(API_KEY)
}

/// `POST /v1/runs` with `headers`: the status and the JSON answer, or the transport error.
async fn post_run(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Value), String> {
    let mut request = request(http, reqwest::Method::POST, base, "/v1/runs").json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| format!("{e:?}"))?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// `GET path` from `base`: the status and the JSON answer.
async fn get_json(http: &reqwest::Client, base: &str, path: &str) -> (StatusCode, Value) {
    let response = request(http, reqwest::Method::GET, base, path).send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A run of `charged` that charges `amount` and one credit for each of `words` words.
fn charged_run(pipeline: &str, amount: u64, words: usize) -> Value {
    let prompt = vec!["w"; words].join(" ");
    json!({ "pipeline": pipeline, "input": { "prompt": prompt }, "params": { "amount": amount } })
}

/// The account as `base` reports it: (balance, held).
async fn account(http: &reqwest::Client, base: &str) -> (u64, u64) {
    let (status, account) = get_json(http, base, "/v1/account").await;
    assert_eq!(status, StatusCode::OK, "{account}");
    (account["balance"].as_u64().unwrap(), account["held"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_runs_over_three_replicas_add_up_to_the_credit() {
    let database = TestDatabase::create().await;
    let cluster = Cluster::start(&database.url, 600).await;
    let bases: Vec<String> = (0..REPLICAS).map(|i| cluster.base(i)).collect();
    let expected = |i: usize| (1 + i % 7) as u64 + (1 + i % 5) as u64;

    let started = Instant::now();
    let answers =
        futures::future::join_all(
            (0..1000).map(|i| {
                let (http, base) = (&cluster.http, &bases[i % REPLICAS]);
                async move {
                    post_run(http, base, &charged_run("charged", 1 + (i % 7) as u64, 1 + i % 5), &[("Prefer", "wait=60")]).await
                }
            }),
        )
        .await;
    let elapsed = started.elapsed();
    let mut spent = 0;
    let mut ids = Vec::new();
    for (i, answer) in answers.iter().enumerate() {
        let (status, run) = answer.as_ref().unwrap_or_else(|e| panic!("run {i}: {e}"));
        assert_eq!(*status, StatusCode::OK, "run {i}: {run}");
        assert_eq!(run["status"], "completed", "run {i}: {run}");
        assert_eq!(run["posted"], expected(i), "run {i}: {run}");
        spent += expected(i);
        ids.push(run["id"].as_str().unwrap().to_string());
    }
    eprintln!("1,000 runs over {REPLICAS} replicas in {elapsed:?}; {spent} credits posted");

    // Every replica reads the same account: every run's charges, nothing held.
    for base in &bases {
        assert_eq!(account(&cluster.http, base).await, (GRANTED - spent, 0), "as {base} reports it");
    }
    // One hold per run, each settled with what its run reported.
    let holds = cluster.holds(&ids).await;
    assert_eq!(holds.len(), 1000);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(holds[id], ("settled".to_string(), expected(i)), "hold of run {i} ({id})");
    }
    let (clean, report) = cluster.credits_verify();
    assert!(clean, "genpipe credits verify failed:\n{report}");
    assert!(report.contains(": ok"), "{report}");
    assert!(report.contains(&format!("balances {} + posted {spent} = granted {GRANTED} (held 0)", GRANTED - spent)), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_replica_mid_load_ten_times_loses_no_acknowledged_charge() {
    const HOLD_TTL: u64 = 3;
    const ROUNDS: usize = 10;
    const RUNS_PER_ROUND: usize = 45;
    let database = TestDatabase::create().await;
    let mut cluster = Cluster::start(&database.url, HOLD_TTL).await;
    let ledger = PostgresLedger::open(&database.url, PostgresOptions::default()).await.unwrap();
    let deadline = resolution_deadline(HOLD_TTL);
    let words = |i: usize| 1 + i % 4;
    let mut resolved_after = Vec::new();
    let mut acknowledged = 0;

    for round in 0..ROUNDS {
        let victim = round % REPLICAS;
        let victim_lease = cluster.replicas[victim].lease.clone();
        // Load on every replica: runs that charge after a second.
        let load: Vec<_> = (0..RUNS_PER_ROUND)
            .map(|i| {
                let (http, base) = (cluster.http.clone(), cluster.base(i % REPLICAS));
                let body = charged_run("slow", 2, words(i));
                tokio::spawn(async move { post_run(&http, &base, &body, &[("Prefer", "wait=30")]).await })
            })
            .collect();
        // Mid-load: the victim holds credits for most of its runs, in flight.
        let (db, lease) = (&cluster, victim_lease.as_str());
        let most = (RUNS_PER_ROUND / REPLICAS * 2 / 3) as i64;
        poll(Duration::from_secs(30), Duration::from_millis(10), "the victim reserving holds", move || async move {
            (db.open_holds_of(lease).await >= most).then_some(())
        })
        .await;
        let in_flight = cluster.open_holds_of(&victim_lease).await;
        cluster.kill(victim);
        let killed = Instant::now();
        // The survivors resolve its holds once its lease lapsed.
        let (db, lease) = (&cluster, victim_lease.as_str());
        let what = format!("round {round}: the survivors resolving the dead replica's holds");
        poll(
            deadline,
            Duration::from_millis(20),
            &what,
            move || async move { (db.open_holds_of(lease).await == 0).then_some(()) },
        )
        .await;
        resolved_after.push(killed.elapsed());

        // Every answer: the survivors' runs completed; the victim's completed, or never answered.
        let mut completed = BTreeMap::new();
        for (i, answer) in load.into_iter().enumerate() {
            match answer.await.unwrap() {
                Ok((StatusCode::OK, run)) if run["status"] == "completed" => {
                    assert_eq!(run["posted"], 2 + words(i) as u64, "{run}");
                    completed.insert(run["id"].as_str().unwrap().to_string(), 2 + words(i) as u64);
                }
                Err(e) if i % REPLICAS == victim => eprintln!("round {round}: run {i} on the killed replica: {e}"),
                other => panic!("round {round}: run {i} on replica {}: {other:?}", i % REPLICAS),
            }
        }
        let survivors = (0..RUNS_PER_ROUND).filter(|i| i % REPLICAS != victim).count();
        assert!(completed.len() >= survivors, "round {round}: {} completed", completed.len());
        acknowledged += completed.len();

        // No acknowledged charge is lost: each completed run's hold is settled with its charges.
        let ids: Vec<String> = completed.keys().cloned().collect();
        let holds = cluster.holds(&ids).await;
        for (id, posted) in &completed {
            assert_eq!(holds.get(id), Some(&("settled".to_string(), *posted)), "round {round}: the hold of run {id}");
        }
        // Nothing stays held; conservation holds.
        let balance = ledger.balance(ACCOUNT).await.unwrap();
        assert_eq!(balance.held, 0, "round {round}: {balance:?}");
        let totals = ledger.totals().await.unwrap();
        assert_eq!(totals.open_holds, 0, "round {round}: {totals:?}");
        assert_eq!(totals.balances + totals.posted, totals.granted, "round {round}: conservation: {totals:?}");
        assert_eq!(totals.held, 0, "round {round}: {totals:?}");
        eprintln!(
            "round {round}: killed replica {victim} with {in_flight} holds open; resolved after {:?}; {} runs acknowledged",
            resolved_after[round],
            completed.len()
        );
        cluster.replace(victim).await;
    }

    let audit = ledger.verify().await.unwrap();
    assert!(audit.is_ok(), "{audit:?}");
    assert_eq!(audit.open_holds, 0, "{audit:?}");
    let slowest = resolved_after.iter().max().unwrap();
    let mean = resolved_after.iter().sum::<Duration>() / ROUNDS as u32;
    let (lease, sweep) = lease_and_sweep(HOLD_TTL);
    eprintln!(
        "{ROUNDS} kills: holds resolved after {mean:?} on average, {slowest:?} at most (lease {lease:?}, sweep every \
         {sweep:?}); {acknowledged} runs acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_sent_to_two_replicas_at_once_starts_one_run() {
    const KEYS: usize = 10;
    let database = TestDatabase::create().await;
    let cluster = Cluster::start(&database.url, 600).await;
    let body = charged_run("charged", 2, 2);
    let mut runs = Vec::new();
    for k in 0..KEYS {
        let key = format!("order-{k}");
        let headers = [("Idempotency-Key", key.as_str()), ("Prefer", "wait=30")];
        let (first, second) = (cluster.base(k % REPLICAS), cluster.base((k + 1) % REPLICAS));
        let (a, b) =
            tokio::join!(post_run(&cluster.http, &first, &body, &headers), post_run(&cluster.http, &second, &body, &headers));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a.0.is_success() && b.0.is_success(), "key {key}: {a:?} and {b:?}");
        assert_eq!(a.1["id"], b.1["id"], "key {key}: both answers name the same run: {a:?} and {b:?}");
        runs.push(a.1["id"].as_str().unwrap().to_string());
    }
    assert_eq!(runs.iter().collect::<BTreeSet<_>>().len(), KEYS, "one run per key");

    // One hold per run in the account's journal, as any replica reads it.
    for (k, run) in runs.iter().enumerate() {
        let (status, page) =
            get_json(&cluster.http, &cluster.base((k + 2) % REPLICAS), &format!("/v1/account/ledger?run={run}")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let holds = page["entries"].as_array().unwrap().iter().filter(|e| e["kind"] == "hold").count();
        assert_eq!(holds, 1, "run {run}: {page}");
    }
    let row = cluster.db.query_one("SELECT count(*) FROM ledger.journal WHERE kind = 'hold'", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), KEYS as i64, "one hold per key in the whole journal");
    // Each run completes once: its charges are posted once.
    let (http, base) = (&cluster.http, cluster.base(0));
    let base = base.as_str();
    poll(Duration::from_secs(30), Duration::from_millis(50), "every run settling", move || async move {
        let (balance, held) = account(http, base).await;
        (held == 0).then_some(balance)
    })
    .await;
    assert_eq!(account(&cluster.http, &cluster.base(1)).await, (GRANTED - KEYS as u64 * 4, 0));
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: u64,
    event: String,
    data: Value,
}

/// An event stream, read one event at a time.
struct EventStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl EventStream {
    /// Opens the events of `run` on `base`, after `last_event_id` if given.
    async fn open(http: &reqwest::Client, base: &str, run: &str, last_event_id: Option<u64>) -> EventStream {
        let mut request = request(http, reqwest::Method::GET, base, &format!("/v1/runs/{run}/events"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.unwrap();
        if response.status() != StatusCode::OK {
            let status = response.status();
            panic!("the events of run {run} on {base}: {status} {}", response.text().await.unwrap_or_default());
        }
        EventStream { response, buffer: Vec::new() }
    }

    /// The next event, or `None` once the stream ended.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(at) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..at + 2).collect();
                if let Some(event) = parse_event(&String::from_utf8(block).unwrap()) {
                    return Some(event);
                }
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(30), self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Ok(None)) => return None,
                Ok(Err(e)) => panic!("reading the event stream: {e:?}"),
                Err(_) => panic!("no event for 30 s"),
            }
        }
    }

    /// Every event to the end of the stream.
    async fn rest(mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// An SSE block's event (comments and keep-alives are none).
fn parse_event(block: &str) -> Option<SseEvent> {
    let (mut id, mut event, mut data) = (None, None, None);
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            data = serde_json::from_str(v.trim()).ok();
        }
    }
    Some(SseEvent { id: id?, event: event?, data: data? })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_on_one_replica_follows_a_run_on_another_and_resumes_after_a_disconnect() {
    let database = TestDatabase::create().await;
    let cluster = Cluster::start(&database.url, 600).await;
    let (a, b, c) = (cluster.base(0), cluster.base(1), cluster.base(2));
    let body = json!({ "pipeline": "chain", "input": { "prompt": "one two three" } });
    let (status, run) = post_run(&cluster.http, &a, &body, &[]).await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    let id = run["id"].as_str().unwrap().to_string();

    // On B, from the start until the second step ended; then the client goes away.
    let started = Instant::now();
    let mut stream = EventStream::open(&cluster.http, &b, &id, None).await;
    let mut first = Vec::new();
    while let Some(event) = stream.next().await {
        let second_ended = event.event == "step_ended" && event.data["step"] == "s2";
        first.push(event);
        if second_ended {
            break;
        }
    }
    drop(stream);
    let last = first.last().expect("events before the disconnect").clone();
    assert_eq!((last.event.as_str(), &last.data["step"]), ("step_ended", &json!("s2")), "{first:?}");
    // Resumed on B after the last event received, to the end.
    let second = EventStream::open(&cluster.http, &b, &id, Some(last.id)).await.rest().await;
    let followed = started.elapsed();
    let end = second.last().expect("events after the resumption");
    assert_eq!(end.event, "run_ended", "{second:?}");
    assert_eq!(end.data["status"], "completed", "{end:?}");

    // The whole stream read afterwards, from every replica: what B delivered, without a gap or a
    // duplicate.
    let whole: Vec<SseEvent> = first.iter().chain(&second).cloned().collect();
    let ids: Vec<u64> = whole.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    for base in [&a, &b, &c] {
        let full = EventStream::open(&cluster.http, base, &id, None).await.rest().await;
        assert_eq!(full, whole, "the events as {base} tells them, against what B delivered around the disconnect");
    }
    let texts: Vec<&str> = whole.iter().filter(|e| e.event == "text").filter_map(|e| e.data["chunk"].as_str()).collect();
    assert_eq!(texts.concat(), "one two three".repeat(5), "{whole:?}");
    eprintln!("followed a run on replica A from replica B in {followed:?}: {} events", whole.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_serves_a_run_and_a_dead_replicas_run_ends_failed() {
    const HOLD_TTL: u64 = 3;
    let database = TestDatabase::create().await;
    let mut cluster = Cluster::start(&database.url, HOLD_TTL).await;
    let (a, b, c) = (cluster.base(0), cluster.base(1), cluster.base(2));

    // A run on A, read from B and C: its status and its outputs.
    let (status, run) = post_run(&cluster.http, &a, &charged_run("charged", 3, 4), &[("Prefer", "wait=30")]).await.unwrap();
    assert_eq!((status, &run["status"]), (StatusCode::OK, &json!("completed")), "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    let output = |base: String, step: &'static str| {
        let (http, id) = (cluster.http.clone(), id.clone());
        async move {
            let response =
                request(&http, reqwest::Method::GET, &base, &format!("/v1/runs/{id}/outputs/{step}")).send().await.unwrap();
            let status = response.status();
            let kind = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
            (status, kind, response.bytes().await.unwrap().to_vec())
        }
    };
    let text_on_a = output(a.clone(), "text").await;
    let image_on_a = output(a.clone(), "image").await;
    assert_eq!(text_on_a.0, StatusCode::OK);
    assert_eq!(text_on_a.2, b"w w w w");
    assert!(image_on_a.2.starts_with(b"\x89PNG"), "{:?}", image_on_a.1);
    for base in [&b, &c] {
        let (status, seen) = get_json(&cluster.http, base, &format!("/v1/runs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{base}: {seen}");
        assert_eq!(seen, run, "the run as {base} reads it right after replica A answered that it ended");
        assert_eq!(output(base.clone(), "text").await, text_on_a, "the text output on {base}");
        assert_eq!(output(base.clone(), "image").await, image_on_a, "the image output on {base}");
    }

    // Runs in flight on A, as B sees them.
    let stuck_on_a = || async {
        let body = json!({ "pipeline": "stuck", "input": { "prompt": "wait" } });
        let (status, stuck) = post_run(&cluster.http, &a, &body, &[]).await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{stuck}");
        let stuck = stuck["id"].as_str().unwrap().to_string();
        let (http, path, on_b) = (&cluster.http, format!("/v1/runs/{stuck}"), b.as_str());
        poll(Duration::from_secs(30), Duration::from_millis(20), "B seeing the run on A running", || async {
            let (status, run) = get_json(http, on_b, &path).await;
            (status == StatusCode::OK && run["status"] == "running").then_some(())
        })
        .await;
        stuck
    };

    // Cancelled from B: it ends cancelled on A, and every replica reads it so, its hold released.
    let cancelled = stuck_on_a().await;
    let path = format!("/v1/runs/{cancelled}");
    let response = request(&cluster.http, reqwest::Method::POST, &b, &format!("{path}/cancel")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let ended: Value = response.json().await.unwrap();
    assert_eq!((&ended["status"], &ended["posted"]), (&json!("cancelled"), &json!(0)), "{ended}");
    for base in [&a, &b, &c] {
        let (status, seen) = get_json(&cluster.http, base, &path).await;
        assert_eq!((status, &seen["status"]), (StatusCode::OK, &json!("cancelled")), "{base}: {seen}");
    }
    let holds = cluster.holds(std::slice::from_ref(&cancelled)).await;
    assert_eq!(holds[&cancelled], ("released".to_string(), 0));

    // Deleted from C: it ends cancelled, the answer says so, and then no replica has it.
    let deleted = stuck_on_a().await;
    let path = format!("/v1/runs/{deleted}");
    let response = request(&cluster.http, reqwest::Method::DELETE, &c, &path).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let ended: Value = response.json().await.unwrap();
    assert_eq!(ended["status"], "cancelled", "{ended}");
    for base in [&a, &b, &c] {
        let (http, path) = (&cluster.http, &path);
        poll(Duration::from_secs(10), Duration::from_millis(20), "the deleted run gone", || async move {
            (get_json(http, base, path).await.0 == StatusCode::NOT_FOUND).then_some(())
        })
        .await;
    }

    // A run in flight on A when A is killed: failed, with the reason, as B and C read it.
    let stuck = stuck_on_a().await;
    let (http, path) = (cluster.http.clone(), format!("/v1/runs/{stuck}"));
    let (http, path, on_b) = (&http, path.as_str(), b.as_str());
    cluster.kill(0);
    let killed = Instant::now();
    let ended =
        poll(resolution_deadline(HOLD_TTL), Duration::from_millis(50), "the dead replica's run ending", move || async move {
            let (status, run) = get_json(http, on_b, path).await;
            assert_eq!(status, StatusCode::OK, "{run}");
            (run["status"] != "running").then_some(run)
        })
        .await;
    let took = killed.elapsed();
    assert_eq!(ended["status"], "failed", "{ended}");
    let error = ended["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "a failed run says why: {ended}");
    let (_, on_c) = get_json(&cluster.http, &c, &format!("/v1/runs/{stuck}")).await;
    assert_eq!(on_c["status"], "failed", "{on_c}");
    assert_eq!(on_c["error"], ended["error"], "{on_c}");
    // Its hold is released (on_failure = "release"), and nothing is held.
    let holds = cluster.holds(std::slice::from_ref(&stuck)).await;
    assert_eq!(holds[&stuck], ("released".to_string(), 0));
    assert_eq!(account(&cluster.http, &b).await, (GRANTED - run["posted"].as_u64().unwrap(), 0));
    eprintln!("the run on the killed replica read as failed {took:?} after the kill: {error}");
}

/// A PostgreSQL server of one test's own (the test stops it), removed when this is dropped.
struct OwnServer {
    dir: PathBuf,
    port: String,
    url: String,
}

impl OwnServer {
    fn script() -> &'static str {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres.sh")
    }

    fn run(&self, command: &str) -> String {
        let out = Command::new("bash")
            .args([OwnServer::script(), command])
            .env("GENPIPE_PG_DIR", &self.dir)
            .env("GENPIPE_PG_PORT", &self.port)
            .output()
            .unwrap();
        assert!(out.status.success(), "scripts/postgres.sh {command}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn start() -> OwnServer {
        let dir = std::env::temp_dir().join(format!("genpipe-replicas-test-pg-{}", std::process::id()));
        let mut server = OwnServer { dir, port: "54331".into(), url: String::new() };
        server.run("stop");
        server.url = server.run("start");
        server
    }

    /// Stops the server (a fast shutdown: its connections are closed) and waits until it ended.
    fn stop(&self) {
        let pid_file = self.dir.join("data/postmaster.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().lines().next().unwrap().trim().parse().unwrap();
        // SAFETY: kill only sends a signal.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0, "signalling PostgreSQL ({pid})");
        let deadline = Instant::now() + Duration::from_secs(30);
        // SAFETY: as above; signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "PostgreSQL did not stop within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .args([OwnServer::script(), "stop"])
            .env("GENPIPE_PG_DIR", &self.dir)
            .env("GENPIPE_PG_PORT", &self.port)
            .output();
        let _ = std::fs::remove_file(format!("{}.lock", self.dir.display()));
    }
}

/// What the load of the PostgreSQL test saw.
#[derive(Default)]
struct Seen {
    /// Runs answered completed: (id, posted).
    completed: Vec<(String, u64)>,
    /// Other answers: status and body.
    other: Vec<(StatusCode, Value)>,
    errors: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_load_answers_503_then_resumes_and_loses_nothing() {
    const HOLD_TTL: u64 = 10;
    const WORKERS: usize = 6;
    let server = tokio::task::spawn_blocking(OwnServer::start).await.unwrap();
    let mut cluster = Cluster::start(&server.url, HOLD_TTL).await;
    let bases: Vec<String> = (0..REPLICAS).map(|i| cluster.base(i)).collect();

    // Load: workers post runs round-robin, each as soon as the last answered.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (http, bases, stop, seen) = (cluster.http.clone(), bases.clone(), Arc::clone(&stop), Arc::clone(&seen));
            tokio::spawn(async move {
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    let answer =
                        post_run(&http, &bases[n % REPLICAS], &charged_run("charged", 1, 1 + n % 3), &[("Prefer", "wait=30")])
                            .await;
                    let pause = {
                        let mut seen = seen.lock().unwrap();
                        match answer {
                            Ok((StatusCode::OK, run)) if run["status"] == "completed" => {
                                seen.completed.push((run["id"].as_str().unwrap().to_string(), run["posted"].as_u64().unwrap()));
                                Duration::from_millis(5)
                            }
                            Ok((status, body)) => {
                                seen.other.push((status, body));
                                Duration::from_millis(50)
                            }
                            Err(e) => {
                                seen.errors.push(e);
                                Duration::from_millis(50)
                            }
                        }
                    };
                    n += WORKERS;
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect();
    let seen_ref = &seen;
    let completed = move || seen_ref.lock().unwrap().completed.len();
    poll(Duration::from_secs(60), Duration::from_millis(20), "30 runs before the outage", move || async move {
        (completed() >= 30).then_some(())
    })
    .await;
    let before: Vec<(String, u64)> = seen.lock().unwrap().completed.clone();

    // Down: every replica answers 503 with a problem naming the database, promptly.
    let down = Instant::now();
    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    let stopped = down.elapsed();
    for base in &bases {
        let asked = Instant::now();
        let response = request(&cluster.http, reqwest::Method::POST, base, "/v1/runs")
            .json(&charged_run("charged", 1, 1))
            .send()
            .await
            .unwrap();
        let (status, kind) = (response.status(), response.headers().get("content-type").cloned());
        let problem: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "POST /v1/runs on {base} while PostgreSQL is down: {problem}");
        assert_eq!(kind.unwrap(), "application/problem+json");
        assert!(problem["detail"].as_str().unwrap().contains("PostgreSQL"), "the problem names the database: {problem}");
        assert!(asked.elapsed() < Duration::from_secs(10), "answered after {:?}", asked.elapsed());
        let (status, problem) = get_json(&cluster.http, base, "/v1/account").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "GET /v1/account on {base} while PostgreSQL is down: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains("PostgreSQL"), "{problem}");
    }

    // Up again: every replica admits runs again by itself.
    let server = tokio::task::spawn_blocking(move || {
        server.run("start");
        server
    })
    .await
    .unwrap();
    let outage = down.elapsed();
    cluster.reconnect().await;
    let http = &cluster.http;
    for base in &bases {
        poll(Duration::from_secs(30), Duration::from_millis(50), &format!("{base} admitting runs again"), move || async move {
            let answer = post_run(http, base, &charged_run("charged", 1, 1), &[("Prefer", "wait=30")]).await;
            match answer {
                Ok((StatusCode::OK, run)) if run["status"] == "completed" => {
                    let id = run["id"].as_str().unwrap().to_string();
                    seen_ref.lock().unwrap().completed.push((id, run["posted"].as_u64().unwrap()));
                    Some(())
                }
                _ => None,
            }
        })
        .await;
    }
    let resumed = down.elapsed();
    let after_resume = completed();
    poll(Duration::from_secs(60), Duration::from_millis(20), "30 runs after the outage", move || async move {
        (completed() >= after_resume + 30).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }

    // Nothing is lost: every run acknowledged (before, during and after) is settled with its
    // charges; what runs in flight at the outage held is resolved; the journal adds up.
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let ids: Vec<String> = seen.completed.iter().map(|(id, _)| id.clone()).collect();
    let holds = cluster.holds(&ids).await;
    for (id, posted) in &seen.completed {
        assert_eq!(holds.get(id), Some(&("settled".to_string(), *posted)), "the hold of acknowledged run {id}");
    }
    assert!(before.iter().all(|(id, _)| holds.contains_key(id)));
    // (The holds of runs in flight when it stopped are resolved once past their time to live.)
    let ledger = PostgresLedger::open(&server.url, PostgresOptions::default()).await.unwrap();
    let ledger_ref = &ledger;
    poll(
        resolution_deadline(HOLD_TTL) + Duration::from_secs(HOLD_TTL),
        Duration::from_millis(100),
        "nothing held",
        move || async move {
            let totals = ledger_ref.totals().await.unwrap();
            (totals.open_holds == 0).then_some(())
        },
    )
    .await;
    let audit = ledger.verify().await.unwrap();
    assert!(audit.is_ok(), "{audit:?}");
    let balance = ledger.balance(ACCOUNT).await.unwrap();
    assert_eq!(balance.held, 0, "{balance:?}");
    let spent = GRANTED - balance.balance;
    let acknowledged: u64 = seen.completed.iter().map(|(_, posted)| posted).sum();
    assert!(spent >= acknowledged, "posted {spent} < acknowledged {acknowledged}");
    let refused = seen.other.iter().filter(|(status, _)| *status == StatusCode::SERVICE_UNAVAILABLE).count();
    let failed = seen.other.iter().filter(|(_, run)| run["status"] == "failed").count();
    for (status, body) in &seen.other {
        let fine = *status == StatusCode::SERVICE_UNAVAILABLE || (*status == StatusCode::OK && body["status"] == "failed");
        assert!(fine, "an answer during the outage: {status} {body}");
    }
    assert!(seen.errors.is_empty(), "transport errors: {:?}", seen.errors);
    eprintln!(
        "PostgreSQL stopped in {stopped:?}, back after {outage:?}, every replica admitting again after {resumed:?}; \
         {} runs acknowledged, {refused} refused with 503, {failed} failed in flight",
        seen.completed.len()
    );
    drop(cluster);
    drop(server);
}

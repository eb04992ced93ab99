//! `batchscore audit sink` against the real broker and PostgreSQL, each test on a stream and a
//! database of its own: the sink killed with SIGKILL in the middle of the stream and started
//! again stores every record exactly once and resumes past the last message; a job's record is
//! found by its id; the sink's role can add records but neither change nor remove them.
//!
//! PostgreSQL: `BATCHSCORE_TEST_POSTGRES` (a URL of a user that may create databases and roles),
//! else postgres@127.0.0.1:5432 without a password.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use batchscore::auditor::database::{Database, Message};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use common::BROKER_PATIENCE;

/// Records the kill-and-restart test publishes.
const RECORDS: usize = 10_000;

/// Chains they belong to, across two workers.
const CHAINS: usize = 8;

/// Longest the sink is given to store what the stream holds.
const SINK_PATIENCE: Duration = Duration::from_secs(120);

fn server_url() -> String {
    std::env::var("BATCHSCORE_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database replaced by `database`.
fn url_of(database: &str) -> String {
    let server = server_url();
    let (base, _) = server.rsplit_once('/').expect("the test URL names a database");
    format!("{base}/{database}")
}

async fn client(url: &str) -> Client {
    let (client, connection) = tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls))
        .await
        .unwrap_or_else(|_| panic!("PostgreSQL at {url} did not answer within 10 s"))
        .unwrap_or_else(|error| {
            panic!("PostgreSQL does not answer at {url} ({error}): start it, or set BATCHSCORE_TEST_POSTGRES")
        });
    tokio::spawn(connection);
    client
}

/// A database of the test's own, dropped when the test ends (passed or not).
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> TestDatabase {
        let name = format!("batchscore_test_{}", uuid::Uuid::new_v4().simple());
        client(&server_url()).await.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        TestDatabase { url: url_of(&name), name }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // On a thread and runtime of its own: drop may run inside the test's runtime, which
        // cannot be blocked on.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let admin = client(&server_url()).await;
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}: {dropped:?}", self.name);
        }
    }
}

/// A stream of the test's own, deleted when the test ends (passed or not).
struct TestStream {
    name: String,
    _connection: lapin::Connection,
    channel: lapin::Channel,
}

impl TestStream {
    async fn declare() -> TestStream {
        let name = format!("test.sink.{}.audit", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let connection = common::connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(name.as_str().into(), durable, arguments).await.expect("declare the stream");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
        TestStream { name, _connection: connection, channel }
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let name = self.name.clone();
        // On a thread and runtime of its own, as for the database.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let connection = common::connect().await;
                let channel = connection.create_channel().await.expect("channel");
                let _ = channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
                let _ = connection.close(200, "done".into()).await;
            })
        })
        .join();
    }
}

/// Publishes `body` to `stream` with `type` = `kind`, waiting for the broker's confirm.
async fn publish(channel: &lapin::Channel, stream: &str, kind: &str, body: &[u8]) {
    let properties = BasicProperties::default().with_type(kind.into());
    let confirm =
        channel.basic_publish("".into(), stream.into(), Default::default(), body, properties).await.expect("publish");
    let confirmation =
        tokio::time::timeout(BROKER_PATIENCE, confirm).await.expect("confirmed in time").expect("confirm");
    assert!(confirmation.is_ack(), "the stream {stream} stored the message");
}

/// The record `seq` of a chain, as one compact JSON line (without its line break).
fn record(worker: &str, chain: &str, seq: usize, previous: Option<&[u8]>) -> Vec<u8> {
    let ok = seq % 7 != 3;
    let value = json!({
        "worker_id": worker, "chain_id": chain, "seq": seq,
        "prev_sha256": previous.map(|line| hex(&Sha256::digest(line))),
        "job_id": format!("job-{chain}-{seq}"), "correlation_id": null, "user_id": "guest", "app_id": "sink-test",
        "queue": "scoring.jobs", "lane": if seq.is_multiple_of(5) { "bulk" } else { "online" },
        "model": "credit", "version": 1 + seq % 3,
        "model_sha256": hex(&Sha256::digest(b"model")),
        "inputs_sha256": hex(&Sha256::digest(seq.to_le_bytes())),
        "outputs_sha256": if ok { Some(hex(&Sha256::digest(b"outputs"))) } else { None },
        "encrypted": false, "status": if ok { "ok" } else { "error" },
        "error_code": if ok { None } else { Some("invalid_input") },
        "received_ms": 1_764_650_000_000u64 + seq as u64, "scored_ms": 1_764_650_000_005u64 + seq as u64,
        "batch_id": 1 + seq / 10,
    });
    serde_json::to_vec(&value).expect("a record encodes")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What the test published: each record line by its key, and how many messages.
struct Published {
    lines: HashMap<(String, String, i64), Vec<u8>>,
    messages: u64,
}

/// Publishes `RECORDS` records of `CHAINS` chains in messages of 1 to 50 consecutive records of
/// one chain (JSON Lines), the chains interleaved; plus one message of another type and one
/// audit message whose line is not JSON, which the sink must pass over and keep aside.
async fn publish_records(channel: &lapin::Channel, stream: &str) -> Published {
    let chains: Vec<(String, String)> =
        (0..CHAINS).map(|at| (format!("worker-{}", at % 2), uuid::Uuid::new_v4().to_string())).collect();
    let mut next_seq = [0usize; CHAINS];
    let mut previous: Vec<Option<Vec<u8>>> = vec![None; CHAINS];
    let mut lines = HashMap::new();
    let mut messages = 0u64;
    // A fixed pseudo-random sequence of message sizes: the same layout on every run.
    let mut state = 0x2545_f491_u64;
    let mut published = 0;
    let mut chain = 0;
    while published < RECORDS {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let size = (1 + (state >> 33) as usize % 50).min(RECORDS - published);
        let (worker, chain_id) = &chains[chain];
        let mut body = Vec::new();
        for _ in 0..size {
            let seq = next_seq[chain];
            let line = record(worker, chain_id, seq, previous[chain].as_deref());
            body.extend_from_slice(&line);
            body.push(b'\n');
            lines.insert((worker.clone(), chain_id.clone(), seq as i64), line.clone());
            previous[chain] = Some(line);
            next_seq[chain] += 1;
        }
        publish(channel, stream, "scoring.audit", &body).await;
        messages += 1;
        published += size;
        chain = (chain + 1) % CHAINS;
        if messages == 40 {
            publish(channel, stream, "test.other", b"not a record, and not for the sink").await;
            publish(channel, stream, "scoring.audit", b"{\"worker_id\": truncated\n").await;
            messages += 2;
        }
    }
    Published { lines, messages }
}

/// `batchscore audit sink` on the test's stream and database, logging to a file.
fn spawn_sink(database: &str, stream: &str, run: usize) -> Child {
    let log = std::env::temp_dir().join(format!("{stream}.sink{run}.log"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    command
        .args(["audit", "sink", "--database", database, "--stream", stream])
        .current_dir(common::root())
        // RUST_LOG of the person running the tests would win over the level set here.
        .env_remove("RUST_LOG")
        .env("BATCHSCORE__LOGGING__LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    command.spawn().expect("the sink starts")
}

/// Kills a sink that is still running when dropped, so a failing test leaves none behind.
struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

async fn stored_offset(client: &Client, stream: &str) -> Option<i64> {
    let row = client
        .query_opt("SELECT next_offset FROM audit_sink_offset WHERE stream = $1", &[&stream])
        .await
        .expect("audit_sink_offset");
    row.map(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_killed_mid_stream_and_restarted_stores_every_record_once_and_resumes_past_the_end() {
    let database = TestDatabase::create().await;
    let test_stream = TestStream::declare().await;
    let stream = test_stream.name.clone();
    let published = publish_records(&test_stream.channel, &stream).await;
    assert_eq!(published.lines.len(), RECORDS);

    let mut first = Sink(spawn_sink(&database.url, &stream, 0));
    // The sink creates the tables; until then the count cannot be read.
    let db = client(&database.url).await;
    // Polled every few milliseconds: the sink stores a batch of up to 500 records at a time.
    let started = Instant::now();
    let at_kill = loop {
        if let Ok(row) = db.query_one("SELECT count(*) FROM audit_record", &[]).await {
            let stored: i64 = row.get(0);
            if stored > 0 {
                break stored;
            }
        }
        assert!(started.elapsed() < SINK_PATIENCE, "no record stored within {SINK_PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    first.0.kill().expect("SIGKILL to the sink");
    first.0.wait().expect("the sink ends");
    let after_kill = count(&db, "SELECT count(*) FROM audit_record").await;
    println!("killed the sink with {at_kill} records seen stored, {after_kill} once it was gone");
    assert!(
        (after_kill as usize) < RECORDS,
        "the sink stored all {RECORDS} records before it was killed: the test could not kill it mid-stream"
    );
    let offset_at_kill = stored_offset(&db, &stream).await.expect("an offset stored with the first rows");
    assert!((offset_at_kill as u64) < published.messages, "offset {offset_at_kill} at the kill");

    let mut second = Sink(spawn_sink(&database.url, &stream, 1));
    let expected_offset = published.messages as i64;
    let started = Instant::now();
    while stored_offset(&db, &stream).await != Some(expected_offset) {
        let stored = count(&db, "SELECT count(*) FROM audit_record").await;
        assert!(
            started.elapsed() < SINK_PATIENCE,
            "the stored offset is not past the last message ({expected_offset}) within {SINK_PATIENCE:?}: {:?}, \
             {stored} records stored",
            stored_offset(&db, &stream).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let signalled = Command::new("kill").args(["-TERM", &second.0.id().to_string()]).status().expect("kill runs");
    assert!(signalled.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = second.0.try_wait().expect("sink status") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the sink did not stop within 20 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "the sink stops cleanly on SIGTERM: {status:?}");

    let rows = db
        .query("SELECT worker_id, chain_id, seq, body, body_sha256 FROM audit_record", &[])
        .await
        .expect("stored records");
    assert_eq!(rows.len(), RECORDS, "each record stored exactly once");
    let mut seen = HashMap::new();
    for row in &rows {
        let key: (String, String, i64) = (row.get(0), row.get(1), row.get(2));
        let body: String = row.get(3);
        let line = published.lines.get(&key).unwrap_or_else(|| panic!("{key:?} was never published"));
        assert_eq!(body.as_bytes(), line.as_slice(), "{key:?} stored byte for byte");
        assert_eq!(row.get::<_, String>(4), hex(&Sha256::digest(line)));
        assert!(seen.insert(key.clone(), ()).is_none(), "{key:?} stored twice");
    }
    let rejected =
        db.query("SELECT \"offset\", line_no, problem FROM audit_rejected_line", &[]).await.expect("rejects");
    assert_eq!(rejected.len(), 1, "the line that is not JSON is kept aside");
    let problem: String = rejected[0].get(2);
    assert!(problem.contains("not JSON"), "{problem}");

    // The time a job's record takes to find, through the job_id index: printed, not asserted.
    let (key, line) = published.lines.iter().next().expect("a record");
    let job_id = format!("job-{}-{}", key.1, key.2);
    let found_in = Database::connect(&database.url).await.expect("connect");
    let started = Instant::now();
    let found = found_in.find_by_job_id(&job_id).await.expect("find");
    println!("found the record of {job_id} among {RECORDS} in {:?}", started.elapsed());
    assert_eq!(found, vec![String::from_utf8(line.clone()).expect("UTF-8")]);
    assert!(found_in.find_by_job_id("no-such-job").await.expect("find").is_empty());
    drop(found_in);

    // The commands answer from the database when audit.database is set: the stream they would
    // otherwise read does not even exist.
    let started = Instant::now();
    let found = audit_command(&database.url, &["find", "--job-id", &job_id, "--format", "jsonl"]);
    println!("audit find --job-id answered from the database in {:?}, start-up included", started.elapsed());
    assert_eq!(found.status.code(), Some(0), "{}", String::from_utf8_lossy(&found.stderr));
    assert_eq!(found.stdout, [line.as_slice(), b"\n"].concat(), "the record exactly as stored");
    let verified = audit_command(&database.url, &["verify-chain"]);
    let report = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(0), "{report}{}", String::from_utf8_lossy(&verified.stderr));
    assert!(report.contains(&format!("8 chains, {RECORDS} records")), "{report}");
}

/// `batchscore audit COMMAND…` with `audit.database` set and a stream that does not exist.
fn audit_command(database: &str, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    command
        .arg("audit")
        .args(args)
        .args(["--stream", "no.such.stream"])
        .current_dir(common::root())
        .env_remove("RUST_LOG")
        .env("BATCHSCORE__AUDIT__DATABASE", database);
    common::run_bounded(command, Duration::from_secs(60)).expect("the audit command runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_role_appends_but_cannot_change_or_remove_a_record() {
    let database = TestDatabase::create().await;
    let mut store = Database::connect(&database.url).await.expect("connect");
    assert_eq!(store.migrate().await.expect("migrations"), ["0001_audit"]);
    assert!(store.migrate().await.expect("migrations again").is_empty(), "each migration applies once");
    let line = record("worker-0", &uuid::Uuid::new_v4().to_string(), 0, None);
    let body = [line.as_slice(), b"\n"].concat();
    let stored = store.store("test.roles", &[Message { offset: 0, body: &body }], 1).await.expect("a record stored");
    assert_eq!((stored.records, stored.duplicates), (1, 0));
    let again = store.store("test.roles", &[Message { offset: 0, body: &body }], 1).await.expect("read again");
    assert_eq!((again.records, again.duplicates), (0, 1), "a record read again is not stored twice");

    let db = client(&database.url).await;
    db.batch_execute("SET ROLE batchscore_audit_sink").await.expect("become the sink's role");
    assert_eq!(count(&db, "SELECT count(*) FROM audit_record").await, 1, "the sink's role reads records");
    db.batch_execute("UPDATE audit_sink_offset SET next_offset = next_offset WHERE stream = 'test.roles'")
        .await
        .expect("the sink's role moves its offset");
    let refused = |statement: &'static str| {
        let db = &db;
        async move {
            let error = db.batch_execute(statement).await.expect_err(statement);
            assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{statement}: {error}");
        }
    };
    refused("UPDATE audit_record SET status = 'ok'").await;
    refused("DELETE FROM audit_record").await;
    refused("TRUNCATE audit_record").await;
    refused("DROP TABLE audit_record").await;

    db.batch_execute("RESET ROLE; SET ROLE batchscore_audit_reader").await.expect("become the auditors' role");
    assert_eq!(count(&db, "SELECT count(*) FROM audit_record").await, 1, "auditors read records");
    refused("INSERT INTO audit_sink_offset VALUES ('other', 0)").await;
    refused("DELETE FROM audit_record").await;
    db.batch_execute("RESET ROLE").await.expect("back");
    drop(store);
}

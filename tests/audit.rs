//! The audit trail against the real broker and ONNX Runtime, each test on queues and a stream of
//! its own: every answered job, ok or error, has exactly one record, whose inputs digest the test
//! recomputes from the rows it sent; the chain read back from the stream is intact, and the
//! test's check of it catches a removed and an altered record; deleting the stream under a
//! running worker stops acknowledgements until the stream is back, and every job is then answered
//! and recorded; `include_outputs: false` and `include_inputs: true` do what they say. Every
//! record is checked against schemas/audit-record.schema.json.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use batchscore::settings::Settings;
use common::stream::{by_job, hex, next_message, read_stream, record_lines, subscribe_at, verify_chains, Record};
use common::{TestWorker, BROKER_PATIENCE};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// Values per row of the linear fixture model.
const FEATURES: usize = 62;

/// Settings with the trail on, on the test's queues and a stream of its own, scoring with
/// version 1 of the linear fixture model.
fn audited(test: &str) -> Settings {
    let repository = common::private_repository("linear", "linear", 1);
    let mut settings = common::settings(test, &repository);
    settings.audit.enabled = true;
    settings.audit.stream = format!("{}.audit", settings.amqp.jobs_queue.trim_end_matches(".jobs"));
    settings.audit.max_bytes = 100_000_000;
    settings.audit.worker_id = format!("test-{test}");
    settings
}

/// Removes what a test made besides the queues [`TestWorker::stop`] deletes.
async fn clean_up(settings: &Settings) {
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let _ = channel.queue_delete(settings.audit.stream.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = std::fs::remove_dir_all(&settings.models.repository);
}

/// A job the test sends, and what its answer must say.
struct Job {
    id: String,
    body: Vec<u8>,
    /// The rows as the worker scores them; `None` for a job refused before its rows are read.
    rows: Option<Vec<Vec<f32>>>,
    /// The error code of its answer; `None`: scored.
    error: Option<&'static str>,
}

impl Job {
    /// An ok job of `rows` rows, its values drawn from `seed`.
    fn scored(id: String, rows: usize, seed: u64) -> Job {
        let rows: Vec<Vec<f32>> = (0..rows).map(|r| (0..FEATURES).map(|f| value(seed, r, f)).collect()).collect();
        let body = serde_json::to_vec(&json!({"job_id": id, "model": "linear", "rows": rows})).expect("JSON");
        Job { id, body, rows: Some(rows), error: None }
    }

    /// A job of one of the kinds the worker refuses, by `kind`.
    fn refused(id: String, kind: u64) -> Job {
        let (body, error) = match kind % 3 {
            0 => (json!({"job_id": id, "model": "linear", "rows": [[1.0, 2.0]]}).to_string(), "invalid_input"),
            1 => (json!({"job_id": id, "model": "no_such_model", "rows": [[1.0]]}).to_string(), "unknown_model"),
            // The job id of an unreadable body is its message_id.
            _ => (format!("{{\"job_id\": \"{id}\", not json"), "invalid_json"),
        };
        Job { id, body: body.into_bytes(), rows: None, error: Some(error) }
    }

    /// The mix of a run: most jobs one row, some several, some refused.
    fn mix(run: &str, n: usize) -> Vec<Job> {
        (0..n as u64)
            .map(|i| {
                let id = format!("{run}-{i:05}");
                match i % 20 {
                    0 | 1 => Job::refused(id, i / 20),
                    2..=5 => Job::scored(id, 2 + (i as usize % 7), i),
                    _ => Job::scored(id, 1, i),
                }
            })
            .collect()
    }

    /// sha256 of the rows as little-endian float32, row-major: the record's `inputs_sha256`.
    fn digest(&self) -> Option<String> {
        let rows = self.rows.as_ref()?;
        let bytes: Vec<u8> = rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
        Some(hex(&bytes))
    }
}

/// A value of row `row`, feature `feature`, that float32 holds exactly or not, by `seed`.
fn value(seed: u64, row: usize, feature: usize) -> f32 {
    let x = (seed as f64 * 0.618_033_988_75 + row as f64 * 1.7 + feature as f64 * 0.31).sin();
    (x * 10f64.powi(feature as i32 % 4)) as f32
}

/// Sends jobs to a worker and keeps every result body, raw, by job id.
struct Sender {
    _connection: Connection,
    channel: Channel,
    jobs_queue: String,
    reply_queue: String,
    replies: lapin::Consumer,
    results: HashMap<String, Vec<Vec<u8>>>,
}

impl Sender {
    async fn new(settings: &Settings) -> Sender {
        let connection = common::connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(Default::default()).await.expect("confirms");
        let reply_queue = format!("{}.replies", settings.amqp.jobs_queue);
        let private = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        channel.queue_declare(reply_queue.as_str().into(), private, FieldTable::default()).await.expect("reply queue");
        let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let replies = channel
            .basic_consume(reply_queue.as_str().into(), "".into(), no_ack, FieldTable::default())
            .await
            .expect("consume replies");
        let jobs_queue = settings.amqp.jobs_queue.clone();
        Sender { _connection: connection, channel, jobs_queue, reply_queue, replies, results: HashMap::new() }
    }

    /// Publishes `jobs` and waits for the broker to confirm them all.
    async fn send(&self, jobs: &[Job]) {
        let mut confirms = Vec::with_capacity(jobs.len());
        for job in jobs {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(job.id.as_str().into())
                .with_correlation_id(format!("corr-{}", job.id).into())
                .with_app_id("audit-test".into())
                .with_reply_to(self.reply_queue.as_str().into());
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.jobs_queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &job.body,
                    properties,
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = tokio::time::timeout(BROKER_PATIENCE, confirm).await.expect("confirmed in time");
            assert!(confirmation.expect("confirm").is_ack(), "the broker refused a job");
        }
    }

    /// Receives results until every job of `jobs` has one.
    async fn answers(&mut self, jobs: &[Job]) {
        let started = Instant::now();
        let mut missing: HashSet<&str> =
            jobs.iter().map(|j| j.id.as_str()).filter(|id| !self.results.contains_key(*id)).collect();
        while !missing.is_empty() {
            let left = BROKER_PATIENCE.saturating_sub(started.elapsed());
            let delivery = tokio::time::timeout(left, self.replies.next())
                .await
                .unwrap_or_else(|_| panic!("{} jobs without a result after {BROKER_PATIENCE:?}", missing.len()))
                .expect("reply stream open")
                .expect("delivery");
            let result: Value = serde_json::from_slice(&delivery.data).expect("a result is JSON");
            let id = result["job_id"].as_str().expect("every job of these tests has a job id").to_string();
            missing.remove(id.as_str());
            self.results.entry(id).or_default().push(delivery.data);
        }
    }

    /// The first result of job `id`.
    fn result(&self, id: &str) -> &[u8] {
        &self.results[id][0]
    }
}

/// The jobs ready in the test's jobs queue: neither acknowledged nor held by a worker.
async fn ready_jobs(channel: &Channel, settings: &Settings) -> usize {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let queue = settings.amqp.jobs_queue.as_str();
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("jobs queue").message_count()
        as usize
}

/// Consumes `stream` from its first record until records of all jobs `ids` are in it.
async fn wait_for_records(stream: &str, mut ids: HashSet<&str>) {
    let (_connection, mut deliveries) = subscribe_at(&common::default_url(), stream).await;
    let started = Instant::now();
    while !ids.is_empty() {
        let left = BROKER_PATIENCE.saturating_sub(started.elapsed());
        let delivery =
            next_message(&mut deliveries, left, || format!("{} jobs without a record in {stream}", ids.len())).await;
        for line in record_lines(&delivery.data) {
            let record: Value = serde_json::from_slice(line).expect("a record is JSON");
            ids.remove(record["job_id"].as_str().unwrap_or_default());
        }
    }
}

/// The `outputs` member of a result body, exactly as the body holds it.
fn raw_outputs(result: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        outputs: &'a RawValue,
    }
    serde_json::from_slice::<Body>(result).expect("an ok result has outputs").outputs.get().to_string()
}

/// Checks `record` says what `job` and its `result` say, outputs aside: a job answered twice may
/// differ in the last bits of its scores, batched with other jobs.
fn check_record(record: &Record, job: &Job, result: &[u8], settings: &Settings) {
    let r = &record.json;
    assert_eq!(r["worker_id"], settings.audit.worker_id.as_str());
    assert_eq!((r["queue"].as_str(), r["lane"].as_str()), (Some(settings.amqp.jobs_queue.as_str()), Some("online")));
    assert_eq!(r["correlation_id"], format!("corr-{}", job.id));
    assert_eq!(r["app_id"], "audit-test");
    assert_eq!(r["inputs_sha256"].as_str().map(str::to_string), job.digest(), "{}: inputs digest", job.id);
    assert!(r["received_ms"].as_u64() <= r["scored_ms"].as_u64(), "{r}");
    match job.error {
        None => {
            assert_eq!((r["status"].as_str(), r["error_code"].as_str()), (Some("ok"), None), "{r}");
            assert_eq!((r["model"].as_str(), r["version"].as_u64()), (Some("linear"), Some(1)));
            let parsed: Value = serde_json::from_slice(result).expect("JSON");
            assert_eq!(r["model_sha256"], parsed["model_sha256"]);
            assert!(r["batch_id"].as_u64().is_some(), "a scored job names its run: {r}");
        }
        Some(code) => {
            assert_eq!((r["status"].as_str(), r["error_code"].as_str()), (Some("error"), Some(code)), "{r}");
            assert!(r["outputs_sha256"].is_null() && r["batch_id"].is_null(), "{r}");
        }
    }
}

/// Runs a worker on `settings` until it has answered `jobs`, stops it (every job acknowledged),
/// and returns the results and the records.
async fn answer_and_record(settings: &Settings, jobs: &[Job]) -> (Sender, Vec<Record>) {
    let worker = TestWorker::start(settings.clone()).await;
    let mut sender = Sender::new(settings).await;
    sender.send(jobs).await;
    sender.answers(jobs).await;
    assert_eq!(worker.stop().await, 0, "every job acknowledged");
    (sender, read_stream(&settings.audit.stream).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_job_has_exactly_one_record_with_its_inputs_digest() {
    let settings = audited("audit-every");
    let jobs = Job::mix("every", 10_000);
    let (sender, records) = answer_and_record(&settings, &jobs).await;
    let recorded = by_job(&records);
    assert_eq!(records.len(), jobs.len(), "one record per job");
    for job in &jobs {
        let records = &recorded.get(job.id.as_str()).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(records.len(), 1, "{}: {} records", job.id, records.len());
        let result = sender.result(&job.id);
        check_record(records[0], job, result, &settings);
        if job.error.is_none() {
            // The default keeps the outputs, exactly as the result has them.
            assert_eq!(records[0].json["outputs_sha256"], hex(raw_outputs(result).as_bytes()), "{}", job.id);
            let outputs = records[0].json["outputs"].to_string();
            let from_result: Value = serde_json::from_str(&raw_outputs(result)).expect("outputs");
            assert_eq!(outputs, from_result.to_string(), "{}", job.id);
            assert!(records[0].json.get("inputs").is_none(), "inputs are off by default");
        }
    }
    let errors = jobs.iter().filter(|j| j.error.is_some()).count();
    assert!(errors >= 100 && jobs.iter().any(|j| j.rows.as_ref().is_some_and(|r| r.len() > 1)), "a real mix");
    clean_up(&settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_read_back_is_intact_and_its_check_catches_tampering() {
    let settings = audited("audit-chain");
    let jobs = Job::mix("chain", 300);
    let (_, mut records) = answer_and_record(&settings, &jobs).await;
    assert_eq!(records.len(), jobs.len());
    assert_eq!(verify_chains(&records), Ok(1), "one worker session, one chain");
    assert_eq!(records[0].json["seq"], 0);
    assert_eq!(records.last().map(|r| r.json["seq"].clone()), Some(json!(jobs.len() - 1)));

    // The check can fail: a removed record, and an altered one.
    let removed = records.remove(150);
    let error = verify_chains(&records).expect_err("a removed record breaks the chain");
    assert!(error.contains("seq 151 follows seq 149"), "{error}");
    records.insert(150, removed);
    let altered = String::from_utf8(records[42].body.clone()).expect("UTF-8").replacen("\"seq\":42", "\"seq\":42 ", 1);
    records[42].body = altered.into_bytes();
    let error = verify_chains(&records).expect_err("an altered record breaks the chain");
    assert!(error.contains("seq 43 names"), "{error}");
    clean_up(&settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_stream_no_job_is_acknowledged_until_the_stream_is_back() {
    let mut settings = audited("audit-outage");
    settings.amqp.reconnect_max_backoff_ms = 500;
    // The test owns the topology, so the worker cannot declare the stream back itself.
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    batchscore::amqp::declare_topology(&channel, &settings.amqp).await.expect("topology");
    batchscore::amqp::declare_audit_stream(&channel, &settings.amqp, &settings.audit).await.expect("stream");
    let owner = settings.amqp.clone();
    settings.amqp.declare_queues = false;
    let worker = TestWorker::start(settings.clone()).await;
    let mut sender = Sender::new(&settings).await;
    let before = Job::mix("before", 50);
    sender.send(&before).await;
    sender.answers(&before).await;

    channel.queue_delete(settings.audit.stream.as_str().into(), QueueDeleteOptions::default()).await.expect("deleted");
    let during = Job::mix("during", 100);
    sender.send(&during).await;
    // Every job comes back to the queue, none acknowledged without its record (a job of before
    // whose record was still on its way may come back too).
    let waiting = || ready_jobs(&channel, &settings);
    let started = Instant::now();
    while waiting().await < during.len() {
        assert!(started.elapsed() < BROKER_PATIENCE, "{} of {} jobs back in the queue", waiting().await, during.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!common::is_ready(worker.metrics).await, "a worker that cannot record is not ready");

    batchscore::amqp::declare_audit_stream(&channel, &owner, &settings.audit).await.expect("stream again");
    let ids: HashSet<&str> = during.iter().map(|job| job.id.as_str()).collect();
    wait_for_records(&settings.audit.stream, ids).await;
    let started = Instant::now();
    while waiting().await > 0 {
        assert!(started.elapsed() < BROKER_PATIENCE, "{} jobs still waiting in the queue", waiting().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sender.answers(&during).await;
    assert_eq!(worker.stop().await, 0, "every job acknowledged once recorded");
    let records = read_stream(&settings.audit.stream).await;
    let recorded = by_job(&records);
    for job in &during {
        let records = recorded.get(job.id.as_str()).unwrap_or_else(|| panic!("{} answered without a record", job.id));
        for record in records {
            check_record(record, job, sender.result(&job.id), &settings);
        }
    }
    // A result of a job whose record failed may have gone out before; none without a record now.
    assert!(sender.results.keys().all(|id| id.starts_with("before") || recorded.contains_key(id.as_str())));
    verify_chains(&records).expect("the chains in the new stream are intact");
    drop(connection);
    clean_up(&settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_hold_the_inputs_and_only_the_outputs_digest_when_set_so() {
    let mut settings = audited("audit-privacy");
    settings.audit.include_outputs = false;
    settings.audit.include_inputs = true;
    let jobs: Vec<Job> = (0..20).map(|i| Job::scored(format!("privacy-{i:02}"), 1 + i % 4, i as u64)).collect();
    let (sender, records) = answer_and_record(&settings, &jobs).await;
    let recorded = by_job(&records);
    for job in &jobs {
        let record = &recorded[job.id.as_str()][0].json;
        assert!(record.get("outputs").is_none(), "{record}");
        let result = sender.result(&job.id);
        assert_eq!(record["outputs_sha256"], hex(raw_outputs(result).as_bytes()), "{}", job.id);
        let inputs: Vec<Vec<f32>> = serde_json::from_value(record["inputs"].clone()).expect("rows of numbers");
        assert_eq!(Some(&inputs), job.rows.as_ref(), "{}: the rows as scored", job.id);
    }
    clean_up(&settings).await;
}

/// Longest a `batchscore audit` command may run: it reads a small stream and stops once nothing
/// more arrives for its idle period.
const AUDIT_COMMAND_PATIENCE: Duration = Duration::from_secs(120);

/// Runs `batchscore audit <args>` on the shipped settings (the test broker) to its end, off the
/// async runtime.
async fn audit_command(args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_batchscore"));
    // RUST_LOG of the person running the tests would change what the command logs.
    command.arg("audit").args(args).current_dir(common::root()).env_remove("RUST_LOG");
    let shown = args.join(" ");
    tokio::task::spawn_blocking(move || common::run_bounded(command, AUDIT_COMMAND_PATIENCE))
        .await
        .expect("the command ran")
        .unwrap_or_else(|error| panic!("batchscore audit {shown}: {error}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Appends `bodies` to `stream` as a worker does: records as JSON Lines, several to a message.
async fn append_records(stream: &str, bodies: &[Vec<u8>], per_message: usize) {
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(Default::default()).await.expect("confirms");
    let mut confirms = Vec::new();
    for group in bodies.chunks(per_message) {
        let message: Vec<u8> = group.iter().flat_map(|body| body.iter().copied().chain([b'\n'])).collect();
        let properties = BasicProperties::default()
            .with_content_type("application/x-ndjson".into())
            .with_type("scoring.audit".into());
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm =
            channel.basic_publish("".into(), stream.into(), options, &message, properties).await.expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        let confirmation =
            tokio::time::timeout(BROKER_PATIENCE, confirm).await.expect("confirmed in time").expect("confirm");
        assert!(matches!(confirmation, lapin::Confirmation::Ack(None)), "the stream {stream} took the records");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_chain_passes_a_workers_stream_and_fails_a_tampered_copy() {
    let settings = audited("audit-verify");
    let jobs = Job::mix("verify", 200);
    let (_, records) = answer_and_record(&settings, &jobs).await;
    assert_eq!(records.len(), jobs.len());

    let stream = settings.audit.stream.as_str();
    let honest = audit_command(&["verify-chain", "--stream", stream, "--idle-ms", "1000"]).await;
    let report = text(&honest.stdout);
    assert_eq!(honest.status.code(), Some(0), "{report}{}", text(&honest.stderr));
    let chain = records[0].str("chain_id").expect("chain_id");
    let line = format!("{} {chain} seq 0-199 200 records OK", settings.audit.worker_id);
    assert!(report.contains(&line), "{line:?} missing from:\n{report}");
    assert!(report.contains("total: 1 chains, 200 records: all chains whole"), "{report}");

    // The same records in another stream, one removed and one altered.
    let mut copy = settings.audit.clone();
    copy.stream = format!("{stream}.tampered");
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    batchscore::amqp::declare_audit_stream(&channel, &settings.amqp, &copy).await.expect("the copy's stream");
    let mut bodies: Vec<Vec<u8>> = records.iter().map(|record| record.body.clone()).collect();
    bodies.remove(120);
    bodies[42] = text(&bodies[42]).replacen("\"seq\":42", "\"seq\":42 ", 1).into_bytes();
    append_records(&copy.stream, &bodies, 7).await;

    let tampered = audit_command(&["verify-chain", "--stream", &copy.stream, "--idle-ms", "1000"]).await;
    let report = text(&tampered.stdout);
    assert_eq!(tampered.status.code(), Some(1), "{report}{}", text(&tampered.stderr));
    for needle in ["gap: seq 120 missing", "prev_sha256 of seq 43 is not the sha256 of seq 42", "BROKEN", "2 problems"]
    {
        assert!(report.contains(needle), "{needle:?} missing from:\n{report}");
    }
    let _ = channel.queue_delete(copy.stream.as_str().into(), QueueDeleteOptions::default()).await;
    clean_up(&settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_by_job_id_returns_exactly_that_jobs_record() {
    let settings = audited("audit-find");
    let jobs = Job::mix("find", 100);
    let (_, records) = answer_and_record(&settings, &jobs).await;
    let stream = settings.audit.stream.as_str();
    let wanted = &jobs[37];
    let record = &by_job(&records)[wanted.id.as_str()][0];

    let found =
        audit_command(&["find", "--stream", stream, "--idle-ms", "1000", "--job-id", &wanted.id, "--format", "jsonl"])
            .await;
    assert_eq!(found.status.code(), Some(0), "{}", text(&found.stderr));
    assert_eq!(found.stdout, [record.body.as_slice(), b"\n".as_slice()].concat(), "the record's bytes as stored, once");

    let table = audit_command(&["find", "--stream", stream, "--idle-ms", "1000", "--job-id", &wanted.id]).await;
    let shown = text(&table.stdout);
    assert_eq!(table.status.code(), Some(0), "{}", text(&table.stderr));
    assert_eq!(shown.lines().count(), 2, "a header and one row:\n{shown}");
    let digest = wanted.digest().expect("a scored job");
    let chain_seq = format!("{}:{}", record.str("chain_id").expect("chain_id"), record.json["seq"]);
    for needle in [wanted.id.as_str(), "linear", digest.as_str(), chain_seq.as_str(), settings.audit.worker_id.as_str()]
    {
        assert!(shown.contains(needle), "{needle:?} missing from:\n{shown}");
    }

    let none = audit_command(&["find", "--stream", stream, "--idle-ms", "1000", "--job-id", "find-no-such-job"]).await;
    assert_eq!(none.status.code(), Some(1), "{}", text(&none.stderr));
    assert!(none.stdout.is_empty() && text(&none.stderr).contains("no record"), "{}", text(&none.stderr));
    clean_up(&settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_stream_that_does_not_exist_exits_2_naming_it() {
    let stream = format!("test.audit-missing.{}", uuid::Uuid::new_v4().simple());
    let output = audit_command(&["verify-chain", "--stream", &stream]).await;
    let message = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains(&stream) && message.contains("audit.stream"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_workers_first_chain_names_the_last_record_of_its_chain_before() {
    let settings = audited("audit-link");
    let (mut sender, before) = answer_and_record(&settings, &Job::mix("link-first", 60)).await;
    let first_chain = before[0].str("chain_id").expect("chain_id").to_string();
    assert_eq!(before[0].json["previous_chain"], Value::Null, "no earlier record of this worker in the stream");
    let last = before.last().expect("records");

    // A new worker process on the same stream.
    let worker = TestWorker::start(settings.clone()).await;
    let second = Job::mix("link-second", 60);
    sender.send(&second).await;
    sender.answers(&second).await;
    assert_eq!(worker.stop().await, 0, "every job acknowledged");

    let stream = settings.audit.stream.as_str();
    let all = audit_command(&["find", "--stream", stream, "--idle-ms", "1000", "--format", "jsonl"]).await;
    assert_eq!(all.status.code(), Some(0), "{}", text(&all.stderr));
    let records: Vec<Value> =
        text(&all.stdout).lines().map(|line| serde_json::from_str(line).expect("a record is JSON")).collect();
    assert_eq!(records.len(), 120, "both workers' records");
    let start = records
        .iter()
        .find(|record| record["seq"] == 0 && record["chain_id"].as_str() != Some(first_chain.as_str()))
        .expect("the second worker's chain");
    let named = json!({"chain_id": first_chain, "seq": last.json["seq"], "sha256": hex(&last.body)});
    assert_eq!(start["previous_chain"], named, "the link to the last record of the chain before");
    assert!(records.iter().filter(|r| r["seq"] != 0).all(|r| r["previous_chain"].is_null()));

    let verified = audit_command(&["verify-chain", "--stream", stream, "--idle-ms", "1000"]).await;
    let report = text(&verified.stdout);
    assert_eq!(verified.status.code(), Some(0), "{report}{}", text(&verified.stderr));
    assert!(report.contains("total: 2 chains, 120 records: all chains whole"), "{report}");
    clean_up(&settings).await;
}

//! Payload encryption end to end, through `batchscore worker` and `batchscore submit` processes
//! on the shared broker (each test on queues of its own), with keys given to the worker through
//! the environment (`BATCHSCORE__SECURITY__PAYLOAD_KEYS__<ID>`) as a deployment would: encrypted
//! jobs under either of two keys are scored and answered under their own key; `submit
//! --key-file` round trips; an unknown key, an altered body or another scheme is `forbidden`,
//! dead-lettered as it came and never scored; `security.require_encryption` refuses plaintext;
//! bad key files stop start-up with exit 2; and the broker, read with `basic.get` as an
//! administrator reads it, holds none of the feature values sent.
//!
//! Jobs are encrypted here as the contract tells clients to (headers written out, body `nonce ‖
//! ciphertext ‖ tag`) with the library's key type, whose output the unit tests of
//! src/payload.rs check byte for byte against Python's `cryptography`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use batchscore::payload::{PayloadKey, ENCRYPTION_HEADER, KEY_BYTES, KEY_ID_HEADER, NONCE_BYTES, SCHEME};
use batchscore::settings::Settings;
use common::{expected, expected_slice, WorkerProcess, BROKER_PATIENCE};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};

/// Longest a worker may take to become ready, or to refuse start-up.
const START_UP_PATIENCE: Duration = Duration::from_secs(120);

/// A test's key files: `test-k1` as 32 raw bytes, `test-k2` as 64 hex digits.
struct KeyFiles {
    dir: PathBuf,
}

const K1: &str = "test-k1";
const K2: &str = "test-k2";

fn key_bytes(seed: u8) -> [u8; KEY_BYTES] {
    // 0x80 and up: never mistaken for text.
    std::array::from_fn(|i| 0x80 | seed.wrapping_mul(31).wrapping_add(i as u8 * 7))
}

impl KeyFiles {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("batchscore-keys-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("key folder");
        std::fs::write(dir.join("k1.key"), key_bytes(1)).expect("raw key file");
        let hex: String = key_bytes(2).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.join("k2.hex"), format!("{hex}\n")).expect("hex key file");
        Self { dir }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(match id {
            K1 => "k1.key",
            K2 => "k2.hex",
            other => panic!("no key file for {other}"),
        })
    }

    fn key(&self, id: &str) -> PayloadKey {
        let seed = match id {
            K1 => 1,
            K2 => 2,
            other => panic!("no key {other}"),
        };
        PayloadKey::new("test", id, &key_bytes(seed)).expect("key")
    }
}

impl Drop for KeyFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `batchscore worker` process on the test's queues and a repository holding version 1 of the
/// linear fixture model, with the keys `keys` (ids of `files`).
struct Worker {
    settings: Settings,
    metrics: SocketAddr,
    process: WorkerProcess,
    repository: PathBuf,
    log: PathBuf,
}

impl Worker {
    /// Settings for a test: its queues, and a repository of its own.
    fn settings(test: &str) -> Settings {
        let repository = common::private_repository("linear", "linear", 1);
        common::settings(test, &repository)
    }

    async fn start(settings: Settings, files: &KeyFiles, keys: &[&str], require_encryption: bool) -> Worker {
        let metrics = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
        let log = std::env::temp_dir().join(format!("{}.worker.log", settings.amqp.jobs_queue));
        let mut command = common::worker_command(&settings, &metrics.to_string());
        for id in keys {
            command.env(format!("BATCHSCORE__SECURITY__PAYLOAD_KEYS__{id}"), files.path(id));
        }
        command.env("BATCHSCORE__SECURITY__REQUIRE_ENCRYPTION", require_encryption.to_string());
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).expect("log file"));
        let mut process = WorkerProcess(command.spawn().expect("worker starts"));
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        let started = Instant::now();
        while !common::is_ready(metrics).await {
            if let Some(status) = process.0.try_wait().expect("worker status") {
                panic!("the worker exited with {status} before it was ready:\n{}", log_text());
            }
            assert!(started.elapsed() < START_UP_PATIENCE, "not ready in time:\n{}", log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let repository = settings.models.repository.clone();
        Worker { settings, metrics, process, repository, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics` now.
    fn scrape(&self) -> String {
        common::get(self.metrics, "/metrics").map(|(_, body)| body).unwrap_or_default()
    }

    /// Stops the worker with SIGTERM (it drains what it holds) and returns its log.
    async fn stop(mut self) -> String {
        let _ = Command::new("kill").args(["-TERM", &self.process.0.id().to_string()]).status();
        let stopped = Instant::now();
        while self.process.0.try_wait().expect("worker status").is_none() {
            assert!(stopped.elapsed() < Duration::from_secs(60), "the worker did not stop within 60 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = self.log_text();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_dir_all(&self.repository);
        log
    }
}

/// Properties of an encrypted job, as the contract describes them.
fn sealed_properties(scheme: &str, key_id: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(ENCRYPTION_HEADER.into(), AMQPValue::LongString(scheme.into()));
    if let Some(key_id) = key_id {
        headers.insert(KEY_ID_HEADER.into(), AMQPValue::LongString(key_id.into()));
    }
    plain_properties().with_headers(headers)
}

fn plain_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2)
}

/// A result or dead letter as the broker holds it.
struct Message {
    body: Vec<u8>,
    properties: BasicProperties,
}

impl Message {
    fn header(&self, name: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            AMQPValue::ShortString(value) => Some(value.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    /// Every byte a broker administrator sees of the message: its body, and its properties with
    /// each header's text.
    fn everything(&self) -> Vec<u8> {
        let mut bytes = self.body.clone();
        bytes.extend_from_slice(format!("{:?}", self.properties).as_bytes());
        for value in self.properties.headers().iter().flat_map(|h| h.inner().values()) {
            match value {
                AMQPValue::LongString(text) => bytes.extend_from_slice(text.as_bytes()),
                AMQPValue::ShortString(text) => bytes.extend_from_slice(text.as_str().as_bytes()),
                _ => {}
            }
        }
        bytes
    }

    /// The result's body as JSON, decrypted with the key its `x-key-id` names when it is
    /// encrypted; checked against the result schema.
    fn result(&self, keys: &KeyFiles) -> Value {
        let body = match self.header(ENCRYPTION_HEADER) {
            Some(scheme) => {
                assert_eq!(scheme, SCHEME);
                let id = self.header(KEY_ID_HEADER).expect("an encrypted result names its key");
                assert!(serde_json::from_slice::<Value>(&self.body).is_err(), "an encrypted body is not JSON");
                keys.key(&id).open(&self.body).expect("the result decrypts with its job's key")
            }
            None => self.body.clone(),
        };
        let result: Value = serde_json::from_slice(&body).expect("the (decrypted) result is JSON");
        if let Err(error) = result_schema().validate(&result) {
            panic!("result does not match schemas/result.schema.json: {error}\n{result}");
        }
        result
    }
}

fn result_schema() -> jsonschema::Validator {
    let text = std::fs::read(common::root().join("schemas/result.schema.json")).expect("result schema");
    jsonschema::validator_for(&serde_json::from_slice(&text).expect("schema is JSON")).expect("schema compiles")
}

/// A publisher with a reply queue of its own, which sees results as the broker delivers them.
struct Publisher {
    _connection: Connection,
    channel: Channel,
    jobs_queue: String,
    reply_queue: String,
    replies: lapin::Consumer,
}

impl Publisher {
    async fn new(settings: &Settings) -> Publisher {
        let connection = common::connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(Default::default()).await.expect("confirms");
        let reply_queue = format!("{}.replies", settings.amqp.jobs_queue);
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        channel.queue_declare(reply_queue.as_str().into(), options, FieldTable::default()).await.expect("reply queue");
        let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let replies = channel
            .basic_consume(reply_queue.as_str().into(), "".into(), no_ack, FieldTable::default())
            .await
            .expect("consume replies");
        Publisher {
            _connection: connection,
            channel,
            jobs_queue: settings.amqp.jobs_queue.clone(),
            reply_queue,
            replies,
        }
    }

    /// Publishes `body` as job `tag` (its correlation id) replying here; waits for the confirm.
    async fn send(&self, tag: &str, body: &[u8], properties: BasicProperties) {
        let properties = properties.with_correlation_id(tag.into()).with_reply_to(self.reply_queue.as_str().into());
        publish(&self.channel, &self.jobs_queue, body, properties).await;
    }

    /// The next `n` results, by correlation id.
    async fn results(&mut self, n: usize) -> HashMap<String, Message> {
        let mut results = HashMap::new();
        while results.len() < n {
            let delivery = tokio::time::timeout(Duration::from_secs(60), self.replies.next())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} results arrived within 60 s", results.len()))
                .expect("reply stream open")
                .expect("delivery");
            let tag = delivery.properties.correlation_id().as_ref().map(|c| c.to_string()).expect("correlation id");
            results.insert(tag, Message { body: delivery.data, properties: delivery.properties });
        }
        results
    }
}

async fn publish(channel: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    let confirmation = tokio::time::timeout(BROKER_PATIENCE, async {
        let options = BasicPublishOptions::default();
        let confirm = channel.basic_publish("".into(), queue.into(), options, body, properties).await.expect("publish");
        confirm.await.expect("confirm")
    })
    .await
    .expect("the broker confirms a job in time");
    assert!(confirmation.is_ack(), "the broker refused a job");
}

/// Takes every message of `queue` with `basic.get`.
async fn drain(channel: &Channel, queue: &str) -> Vec<Message> {
    let mut messages = Vec::new();
    while let Some(message) =
        channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("the queue exists")
    {
        messages.push(Message { body: message.delivery.data, properties: message.delivery.properties });
    }
    messages
}

/// Messages in `queue` now.
async fn depth(channel: &Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("the queue exists").message_count()
}

/// A native job for the linear model, version 1.
fn job(job_id: &str, rows: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({"job_id": job_id, "model": "linear", "model_version": 1, "rows": rows}))
        .expect("job serialises")
}

fn fixture_rows(range: std::ops::Range<usize>) -> Vec<Value> {
    expected("linear_v1")["rows"].as_array().expect("rows")[range].to_vec()
}

fn assert_scores(result: &Value, range: std::ops::Range<usize>) {
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["rows"], range.len(), "{result}");
    let outputs = expected_slice(&expected("linear_v1")["outputs"], range);
    common::assert_close(&result["outputs"], &outputs, "outputs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_jobs_under_either_key_are_scored_and_answered_under_their_own_key() {
    let keys = KeyFiles::new();
    let worker = Worker::start(Worker::settings("enc-rotation"), &keys, &[K1, K2], false).await;
    let mut publisher = Publisher::new(&worker.settings).await;
    let k1_job = job("rot-k1", &fixture_rows(0..5));
    publisher
        .send("k1", &keys.key(K1).seal(&k1_job), sealed_properties(SCHEME, Some(K1)).with_message_id("m-k1".into()))
        .await;
    // Under the second key, with neither message_id nor a scheme in the usual letter case.
    let k2_job = job("rot-k2", &fixture_rows(5..9));
    publisher.send("k2", &keys.key(K2).seal(&k2_job), sealed_properties("AES-256-GCM", Some(K2))).await;
    publisher.send("plain", &job("rot-plain", &fixture_rows(9..12)), plain_properties()).await;
    let results = publisher.results(3).await;

    let k1 = &results["k1"];
    assert_eq!(
        (k1.header(ENCRYPTION_HEADER).as_deref(), k1.header(KEY_ID_HEADER).as_deref()),
        (Some(SCHEME), Some(K1))
    );
    assert!(keys.key(K2).open(&k1.body).is_none(), "the result is under the job's key, not another");
    assert!(!k1.everything().windows(6).any(|w| w == b"rot-k1"), "the job id stays inside the encrypted body");
    assert_eq!(k1.properties.message_id().as_ref().map(|m| m.as_str()), Some("m-k1"), "the job's own message_id");
    let result = k1.result(&keys);
    assert_eq!(result["job_id"], "rot-k1");
    assert_scores(&result, 0..5);

    let k2 = &results["k2"];
    assert_eq!(k2.header(KEY_ID_HEADER).as_deref(), Some(K2));
    assert_eq!(*k2.properties.message_id(), None, "no message_id from the encrypted body");
    let result = k2.result(&keys);
    assert_eq!(result["job_id"], "rot-k2");
    assert_scores(&result, 5..9);

    // Plaintext is still served when encryption is not required, and answered in plaintext.
    let plain = &results["plain"];
    assert_eq!(plain.header(ENCRYPTION_HEADER), None);
    assert_eq!(plain.properties.message_id().as_ref().map(|m| m.as_str()), Some("rot-plain"));
    assert_scores(&plain.result(&keys), 9..12);

    let settings = worker.settings.clone();
    let log = worker.stop().await;
    assert!(log.contains("payload keys loaded") && log.contains(K1) && log.contains(K2), "{log}");
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    assert_eq!(depth(&channel, &settings.amqp.jobs_queue).await, 0, "every job answered");
    assert_eq!(depth(&channel, &settings.amqp.dead_letter_queue).await, 0, "nothing dead-lettered");
    common::delete_topology(&settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_encrypted_jobs_are_forbidden_dead_lettered_and_never_scored() {
    let keys = KeyFiles::new();
    // The worker has the first key only.
    let worker = Worker::start(Worker::settings("enc-forbidden"), &keys, &[K1], false).await;
    let mut publisher = Publisher::new(&worker.settings).await;
    let secret_row = {
        let mut row = fixture_rows(0..1);
        row[0][4] = json!(424242.4242);
        row
    };
    let body = job("secret", &secret_row);
    let mut tampered = keys.key(K1).seal(&body);
    *tampered.last_mut().expect("a tag") ^= 0x01;
    let mut flipped = keys.key(K1).seal(&body);
    flipped[NONCE_BYTES + 3] ^= 0x40;
    let sent: Vec<(&str, Vec<u8>, BasicProperties)> = vec![
        // A key id the worker does not have.
        ("unknown-key", keys.key(K2).seal(&body), sealed_properties(SCHEME, Some(K2))),
        // The worker's key, an altered tag, and an altered ciphertext byte.
        ("tampered-tag", tampered, sealed_properties(SCHEME, Some(K1))),
        ("tampered-body", flipped, sealed_properties(SCHEME, Some(K1))),
        // Shorter than a nonce and a tag.
        ("truncated", keys.key(K1).seal(&body)[..20].to_vec(), sealed_properties(SCHEME, Some(K1))),
        ("other-scheme", keys.key(K1).seal(&body), sealed_properties("aes-128-cbc", Some(K1))),
        ("no-key-id", keys.key(K1).seal(&body), sealed_properties(SCHEME, None)),
    ];
    for (tag, body, properties) in &sent {
        publisher.send(tag, body, properties.clone().with_message_id(format!("msg-{tag}").as_str().into())).await;
    }
    // A protocol request under an unknown key: answered in the protocol's error form.
    let mut headers = FieldTable::default();
    headers.insert(ENCRYPTION_HEADER.into(), AMQPValue::LongString(SCHEME.into()));
    headers.insert(KEY_ID_HEADER.into(), AMQPValue::LongString("test-k9".into()));
    headers.insert("x-model".into(), AMQPValue::LongString("linear".into()));
    let oip_properties = plain_properties().with_headers(headers).with_message_id("msg-oip".into());
    publisher.send("oip", &keys.key(K2).seal(b"{\"id\":\"x\",\"inputs\":[]}"), oip_properties).await;
    let results = publisher.results(sent.len() + 1).await;

    let cannot = |id: &str| format!("the job cannot be decrypted with key id \"{id}\"");
    let expected_messages = [
        ("unknown-key", cannot(K2)),
        ("tampered-tag", cannot(K1)),
        ("tampered-body", cannot(K1)),
        ("truncated", cannot(K1)),
        (
            "other-scheme",
            "header x-encryption \"aes-128-cbc\" is not supported; the worker decrypts aes-256-gcm".into(),
        ),
        ("no-key-id", "an encrypted job (header x-encryption) needs a x-key-id header naming its key".into()),
    ];
    let mut messages = HashMap::new();
    for (tag, message) in &expected_messages {
        let reply = &results[*tag];
        assert_eq!(reply.header(ENCRYPTION_HEADER), None, "{tag}: a refusal goes in plaintext");
        let result = reply.result(&keys);
        assert_eq!(result["status"], "error", "{tag}: {result}");
        assert_eq!(result["error"]["code"], "forbidden", "{tag}: {result}");
        assert_eq!(result["error"]["message"], message.as_str(), "{tag}: nothing but the key id");
        assert_eq!(result["job_id"], format!("msg-{tag}"), "{tag}: the message_id is the job id");
        assert!(result.get("model").is_none(), "{tag}: the body was not read: {result}");
        messages.insert(format!("msg-{tag}"), message.clone());
    }
    let oip = results["oip"].result(&keys);
    assert_eq!(
        oip,
        json!({"id": "msg-oip", "model_name": "linear", "error": cannot("test-k9"),
            "parameters": {"status": "error", "code": "forbidden"}})
    );

    let scrape = worker.scrape();
    assert_eq!(common::sample(&scrape, "batchscore_job_errors_total", &[("code", "forbidden")]), 7.0, "{scrape}");
    assert_eq!(common::sample(&scrape, "batchscore_rows_scored_total", &[]), 0.0, "nothing scored:\n{scrape}");
    let settings = worker.settings.clone();
    let log = worker.stop().await;
    // The operator is told which check failed; the publisher was not.
    for cause in ["cause=\"unknown key id\"", "cause=\"the body does not authenticate under the key\""] {
        assert!(log.contains(cause), "{cause} missing from the log:\n{log}");
    }
    assert!(!log.contains("424242"), "a value in the log:\n{log}");

    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    assert_eq!(depth(&channel, &settings.amqp.jobs_queue).await, 0);
    let dead = drain(&channel, &settings.amqp.dead_letter_queue).await;
    assert_eq!(dead.len(), sent.len() + 1, "every refused job dead-lettered");
    for copy in &dead {
        let id = copy.properties.message_id().as_ref().map(|m| m.to_string()).expect("message_id kept");
        if let Some((_, body, _)) = sent.iter().find(|(tag, ..)| format!("msg-{tag}") == id) {
            assert_eq!(&copy.body, body, "{id}: the copy is the job as it came, ciphertext");
        }
        assert_eq!(copy.header("x-error-code").as_deref(), Some("forbidden"), "{id}");
        assert!(copy.header(ENCRYPTION_HEADER).is_some(), "{id}: the job's headers are kept");
        if let Some(message) = messages.get(&id) {
            assert_eq!(copy.header("x-error-message").as_deref(), Some(message.as_str()), "{id}");
        }
        assert!(!copy.everything().windows(6).any(|w| w == b"424242"), "{id}: plaintext on the broker");
    }
    common::delete_topology(&settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encryption_refuses_plaintext_jobs_and_scores_encrypted_ones() {
    let keys = KeyFiles::new();
    let worker = Worker::start(Worker::settings("enc-required"), &keys, &[K1], true).await;
    let mut publisher = Publisher::new(&worker.settings).await;
    let plain = job("plain-job", &fixture_rows(0..2));
    publisher.send("plain", &plain, plain_properties().with_message_id("plain-job".into())).await;
    publisher
        .send(
            "sealed",
            &keys.key(K1).seal(&job("sealed-job", &fixture_rows(2..4))),
            sealed_properties(SCHEME, Some(K1)),
        )
        .await;
    let results = publisher.results(2).await;

    let refused = results["plain"].result(&keys);
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    assert_eq!(refused["job_id"], "plain-job");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("encrypted jobs only") && message.contains("x-key-id"), "{message}");
    assert_scores(&results["sealed"].result(&keys), 2..4);

    let scrape = worker.scrape();
    assert_eq!(common::sample(&scrape, "batchscore_rows_scored_total", &[]), 2.0, "only the encrypted job:\n{scrape}");
    let settings = worker.settings.clone();
    worker.stop().await;
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let dead = drain(&channel, &settings.amqp.dead_letter_queue).await;
    assert_eq!(dead.len(), 1, "the plaintext job is dead-lettered");
    assert_eq!(dead[0].body, plain);
    assert_eq!(dead[0].header("x-error-code").as_deref(), Some("forbidden"));
    common::delete_topology(&settings).await;
}

/// Runs `batchscore` with `args` and `env` to its end.
fn batchscore(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    command.args(args).current_dir(common::root()).env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    common::run_bounded(command, Duration::from_secs(180)).unwrap_or_else(|e| panic!("batchscore {args:?}: {e}"))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_with_a_key_file_encrypts_its_jobs_and_decrypts_their_results() {
    let keys = KeyFiles::new();
    let worker = Worker::start(Worker::settings("enc-submit"), &keys, &[K1, K2], false).await;
    let fixture = expected("linear_v1");
    let (input, output) = (keys.dir.join("rows.jsonl"), keys.dir.join("scores.jsonl"));
    let lines: Vec<String> = fixture["rows"].as_array().expect("rows").iter().map(Value::to_string).collect();
    std::fs::write(&input, lines.join("\n")).expect("input written");
    let submit = |key_file: &Path, key_id: &str| {
        let args: Vec<String> =
            ["submit", "--model", "linear", "--model-version", "1", "--chunk-rows", "16", "--timeout-s", "120"]
                .into_iter()
                .map(String::from)
                .chain(["--input".into(), input.display().to_string(), "--output".into(), output.display().to_string()])
                .chain(["--key-file".into(), key_file.display().to_string(), "--key-id".into(), key_id.to_string()])
                .collect();
        let queue = worker.settings.amqp.jobs_queue.clone();
        tokio::task::spawn_blocking(move || batchscore(&args, &[("BATCHSCORE__AMQP__JOBS_QUEUE", queue.as_str())]))
    };

    // The hex key file, as the worker has it under the same id.
    let done = submit(&keys.path(K2), K2).await.expect("submit ran");
    assert!(done.status.success(), "{}", stderr(&done));
    assert!(String::from_utf8_lossy(&done.stdout).contains("scored 64 rows in 4 jobs"), "{}", stderr(&done));
    let scored: Vec<Value> = std::fs::read_to_string(&output)
        .expect("output written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(scored.len(), 64);
    for (i, row) in scored.iter().enumerate() {
        common::assert_close(&row["probabilities"], &fixture["outputs"]["probabilities"][i], &format!("row {i}"));
        assert_eq!(row["label"], fixture["outputs"]["label"][i], "row {i}");
    }

    // Another key under the worker's id: every job is refused, and submit says so.
    let wrong = keys.dir.join("wrong.key");
    std::fs::write(&wrong, key_bytes(9)).expect("key file");
    let refused = submit(&wrong, K1).await.expect("submit ran");
    let text = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{text}");
    assert!(text.contains("4 of 4 jobs failed") && text.contains("forbidden"), "{text}");
    assert!(text.contains(&format!("key id \\\"{K1}\\\"")), "names the key id: {text}");

    // A key file that is not a 256-bit key stops submit before it connects.
    let short = keys.dir.join("short.hex");
    std::fs::write(&short, "00112233445566778899aabbccddeeff\n").expect("key file");
    let bad = submit(&short, K1).await.expect("submit ran");
    let text = stderr(&bad);
    assert_eq!(bad.status.code(), Some(2), "{text}");
    for needle in ["--key-file", short.to_str().expect("UTF-8 path"), "128 bits", "openssl rand"] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    assert!(!text.contains("00112233"), "the key's content leaked: {text}");

    let settings = worker.settings.clone();
    worker.stop().await;
    common::delete_topology(&settings).await;
}

#[test]
fn a_key_file_that_is_missing_or_short_stops_the_worker_with_exit_2() {
    let keys = KeyFiles::new();
    let short = keys.dir.join("short.key");
    std::fs::write(&short, [0x9c_u8; 16]).expect("key file");
    let missing = keys.dir.join("absent.key");
    for (path, cause) in [(&short, "16 bytes"), (&missing, "No such file")] {
        // The broker URL points at a closed port: the keys are read before anything connects.
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let queue = format!("test.enc-keys.{}.jobs", &unique[..8]);
        let repository = common::fixtures_repository();
        let env = [
            ("BATCHSCORE__AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
            ("BATCHSCORE__AMQP__JOBS_QUEUE", queue.as_str()),
            ("BATCHSCORE__MODELS__REPOSITORY", repository.to_str().expect("UTF-8 path")),
            ("BATCHSCORE__METRICS__LISTEN", "127.0.0.1:0"),
            ("BATCHSCORE__SECURITY__PAYLOAD_KEYS__TEST-K1", path.to_str().expect("UTF-8 path")),
        ];
        let mut command = Command::new(env!("CARGO_BIN_EXE_batchscore"));
        command.arg("worker").current_dir(common::root()).env_remove("RUST_LOG");
        for (key, value) in env {
            command.env(key, value);
        }
        let output = common::run_bounded(command, START_UP_PATIENCE).expect("the worker exits");
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{text}");
        let line =
            text.lines().find(|l| l.starts_with("batchscore: ")).unwrap_or_else(|| panic!("no error line:\n{text}"));
        for needle in ["security.payload_keys.test-k1", path.to_str().expect("UTF-8 path"), cause] {
            assert!(line.contains(needle), "{needle:?} missing from: {line}");
        }
        assert!(line.contains("openssl rand") || line.contains("mount the key"), "names the fix: {line}");
        assert!(!text.contains("9c9c") && !text.contains("156, 156"), "the key's content leaked: {text}");
        assert!(!text.contains("model loaded"), "keys are read before the models load:\n{text}");
    }
}

/// The proof. Jobs with distinctive feature values are published while no worker runs,
/// and the jobs queue is read with `basic.get` as a broker administrator reads it (the
/// management UI's *Get messages* does the same); then a worker answers them (an ok result, an
/// error result that quotes the value to its publisher, a job under an unknown key), and the
/// results and dead-letter queues are read the same way. No value appears in any body or header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_never_holds_a_feature_value_in_plaintext() {
    let keys = KeyFiles::new();
    let settings = Worker::settings("enc-proof");
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(Default::default()).await.expect("confirms");
    batchscore::amqp::declare_topology(&channel, &settings.amqp).await.expect("topology declared");

    let needles: [&[u8]; 4] = [b"271828", b"314159", b"87654321", b"141421"];
    let with = |values: &[(usize, Value)]| {
        let mut rows = fixture_rows(0..1);
        for (feature, value) in values {
            rows[0][*feature] = value.clone();
        }
        rows
    };
    // Scored: an ok result.
    let ok = job("proof-ok", &with(&[(4, json!(271828.1828)), (5, json!(314159.2653))]));
    // Beyond float32: an error result whose message quotes the value, and a dead letter.
    let mut invalid = String::from_utf8(job("proof-invalid", &with(&[(5, json!(314159.2653))]))).expect("UTF-8");
    invalid = invalid.replacen("314159.2653", "9.87654321e300", 1);
    // Under a key the worker does not have: forbidden, dead-lettered as it came.
    let unknown = job("proof-unknown", &with(&[(6, json!(141421.3562))]));
    let found = |bytes: &[u8]| needles.iter().any(|n| bytes.windows(n.len()).any(|w| w == *n));
    for body in [&ok, invalid.as_bytes(), &unknown] {
        assert!(found(body), "the search finds the values in the plaintext: {}", String::from_utf8_lossy(body));
    }
    let jobs_queue = settings.amqp.jobs_queue.as_str();
    let sealed = |id: &str| sealed_properties(SCHEME, Some(id));
    publish(&channel, jobs_queue, &keys.key(K1).seal(&ok), sealed(K1).with_message_id("proof-ok".into())).await;
    let invalid_properties = sealed(K1).with_message_id("proof-invalid".into());
    publish(&channel, jobs_queue, &keys.key(K1).seal(invalid.as_bytes()), invalid_properties).await;
    publish(&channel, jobs_queue, &keys.key(K2).seal(&unknown), sealed(K2).with_message_id("proof-unknown".into()))
        .await;

    // The jobs queue as an administrator sees it, before any worker: taken, then returned.
    let mut seen = Vec::new();
    let mut last_tag = None;
    while let Some(message) =
        channel.basic_get(jobs_queue.into(), BasicGetOptions { no_ack: false }).await.expect("jobs queue")
    {
        last_tag = Some(message.delivery.acker.clone());
        seen.push(Message { body: message.delivery.data.clone(), properties: message.delivery.properties.clone() });
    }
    assert_eq!(seen.len(), 3, "every job waits in the queue");
    let requeue = BasicNackOptions { multiple: true, requeue: true };
    last_tag.expect("a delivery").nack(requeue).await.expect("jobs returned to the queue");
    for message in &seen {
        assert!(!found(&message.everything()), "a value in a queued job: {:?}", message.properties);
    }

    let worker = Worker::start(settings.clone(), &keys, &[K1], false).await;
    let (results_queue, dead_letter_queue) = (&settings.amqp.results_queue, &settings.amqp.dead_letter_queue);
    let started = Instant::now();
    while depth(&channel, results_queue).await < 3 || depth(&channel, dead_letter_queue).await < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the worker did not answer every job:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = worker.stop().await;
    assert!(!found(log.as_bytes()), "a value in the worker's log:\n{log}");

    let results = drain(&channel, results_queue).await;
    let dead = drain(&channel, dead_letter_queue).await;
    assert_eq!((results.len(), dead.len()), (3, 2));
    for message in results.iter().chain(&dead) {
        assert!(!found(&message.everything()), "a value on the broker: {:?}", message.properties);
    }
    // What the publishers read, once decrypted: the scores, and the value quoted to its sender.
    let by_id: HashMap<String, Value> = results
        .iter()
        .map(|m| {
            let result = m.result(&keys);
            (m.properties.message_id().as_ref().map(|i| i.to_string()).expect("message_id"), result)
        })
        .collect();
    assert_eq!(by_id["proof-ok"]["status"], "ok", "{}", by_id["proof-ok"]);
    let invalid_result = &by_id["proof-invalid"];
    assert_eq!(invalid_result["error"]["code"], "invalid_input", "{invalid_result}");
    let quoted = invalid_result["error"]["message"].as_str().unwrap_or_default();
    assert!(quoted.contains("87654321"), "the publisher is told its value, encrypted: {quoted}");
    assert_eq!(by_id["proof-unknown"]["error"]["code"], "forbidden");
    let copy = dead.iter().find(|m| m.header("x-error-code").as_deref() == Some("invalid_input")).expect("copy");
    let problem = copy.header("x-error-message").unwrap_or_default();
    assert!(problem.contains("rows[0][5]") && problem.contains('…'), "the dead letter says where, not what: {problem}");
    common::delete_topology(&settings).await;
}

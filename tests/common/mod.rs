//! Test harness: an in-process worker on uniquely named queues of the real broker, and a client
//! that sends jobs and collects results, checking every result against the JSON Schema.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use batchscore::settings::Settings;
use batchscore::worker::Worker;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod certificates;
pub mod load;
pub mod private_broker;
mod process;
pub mod stream;

pub use process::run_bounded;

pub const TOLERANCE: f64 = 1e-6;

/// Longest a test waits for the broker to confirm or answer, so a broken broker fails the test
/// instead of hanging it.
pub const BROKER_PATIENCE: Duration = Duration::from_secs(60);

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures_repository() -> PathBuf {
    root().join("tests/fixtures/models")
}

/// A repository of its own in the temporary directory, holding version `version` of fixture model
/// `model` (file and config.yaml) under the name `name`. The metrics recorder is shared by every
/// test of a binary; series labelled `model="<name>"` come from the one test that uses `name`.
/// Remove it with `std::fs::remove_dir_all` when done.
pub fn private_repository(name: &str, model: &str, version: u64) -> PathBuf {
    let root = std::env::temp_dir().join(format!("batchscore-{name}-{}", uuid::Uuid::new_v4().simple()));
    add_to_repository(&root, name, model, version);
    root
}

/// Adds version `version` of fixture model `model` (file and config.yaml) to the repository at
/// `root` under the name `name`.
pub fn add_to_repository(root: &Path, name: &str, model: &str, version: u64) {
    let folder = root.join(name).join(version.to_string());
    std::fs::create_dir_all(&folder).expect("private repository");
    let fixture = fixtures_repository().join(model);
    std::fs::copy(fixture.join("config.yaml"), root.join(name).join("config.yaml")).expect("fixture config");
    std::fs::copy(fixture.join(format!("{version}/model.onnx")), folder.join("model.onnx")).expect("fixture model");
}

/// `tests/fixtures/expected/<name>.json`.
pub fn expected(name: &str) -> Value {
    let path = root().join(format!("tests/fixtures/expected/{name}.json"));
    serde_json::from_slice(&std::fs::read(&path).expect("expected outputs exist")).expect("expected outputs are JSON")
}

/// The shipped settings.yaml, pointed at per-test queues and a free metrics port.
pub fn settings(test: &str, repository: &Path) -> Settings {
    let mut settings = Settings::load(&root().join("settings.yaml"), true).expect("settings.yaml loads");
    let unique = uuid::Uuid::new_v4().simple().to_string();
    settings.amqp.jobs_queue = format!("test.{test}.{}.jobs", &unique[..8]);
    settings.amqp.results_queue = format!("test.{test}.{}.results", &unique[..8]);
    settings.amqp.dead_letter_exchange = format!("test.{test}.{}.dlx", &unique[..8]);
    settings.amqp.dead_letter_queue = format!("test.{test}.{}.dlq", &unique[..8]);
    settings.amqp.connection_name = format!("batchscore-test-{test}");
    settings.models.repository = repository.to_path_buf();
    settings.metrics.listen = "127.0.0.1:0".into();
    settings.onnxruntime.library_path = None;
    // Tests provoke errors on purpose; RUST_LOG (which wins) shows the logs when wanted.
    settings.logging.level = "off".into();
    settings
}

pub struct TestWorker {
    pub settings: Settings,
    pub metrics: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), batchscore::amqp::AmqpError>>,
}

impl TestWorker {
    pub async fn start(settings: Settings) -> TestWorker {
        batchscore::telemetry::init_logging(&settings.logging);
        let worker = Worker::start(settings.clone()).await.expect("worker starts");
        let metrics = worker.metrics_addr;
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        wait_until_ready(metrics, Duration::from_secs(5)).await;
        TestWorker { settings, metrics, shutdown, handle }
    }

    /// Stops the worker (draining in-flight jobs) and returns how many jobs are left in its queue.
    pub async fn stop(self) -> u32 {
        self.stop_with_dead_letters().await.0
    }

    /// Stops the worker, then returns the jobs left in its queue and the dead-lettered messages,
    /// and deletes the test's queues and exchange.
    pub async fn stop_with_dead_letters(self) -> (u32, Vec<lapin::message::BasicGetMessage>) {
        let url = self.settings.amqp.url.clone();
        self.stop_with_dead_letters_via(&url).await
    }

    /// Like [`TestWorker::stop`], looking at the queues through `url`: another listener of the
    /// worker's broker (the worker's own URL may need TLS settings that `connect_to` lacks).
    pub async fn stop_via(self, url: &str) -> u32 {
        self.stop_with_dead_letters_via(url).await.0
    }

    async fn stop_with_dead_letters_via(self, url: &str) -> (u32, Vec<lapin::message::BasicGetMessage>) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("the broker took the worker's credentials");
        tokio::time::timeout(BROKER_PATIENCE, Self::leftovers(&self.settings, url))
            .await
            .expect("the broker answers in time")
    }

    async fn leftovers(settings: &Settings, url: &str) -> (u32, Vec<lapin::message::BasicGetMessage>) {
        let connection = connect_to(url).await;
        let channel = connection.create_channel().await.expect("channel");
        let amqp = &settings.amqp;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let left = channel
            .queue_declare(amqp.jobs_queue.as_str().into(), passive, FieldTable::default())
            .await
            .expect("jobs queue exists")
            .message_count();
        let dead_letters = take_all(&channel, &amqp.dead_letter_queue).await;
        delete_topology_at(url, settings).await;
        (left, dead_letters)
    }
}

/// Every message waiting in `queue`, taken off it.
pub async fn take_all(channel: &Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let mut messages = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap_or_else(|e| panic!("queue {queue} exists: {e}"))
    {
        messages.push(message);
    }
    messages
}

/// Waits until `GET /readyz` answers 200: connected, with queues declared (jobs sent before could
/// be unroutable).
pub async fn wait_until_ready(metrics: SocketAddr, patience: Duration) {
    let started = std::time::Instant::now();
    while !is_ready(metrics).await {
        assert!(started.elapsed() < patience, "worker at {metrics} did not become ready within {patience:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `GET /readyz` answers 200.
pub async fn is_ready(metrics: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(metrics).await else { return false };
    let mut response = String::new();
    stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").await.is_ok()
        && stream.read_to_string(&mut response).await.is_ok()
        && response.split_whitespace().nth(1) == Some("200")
}

/// Removes a test's queues and dead-letter exchange.
pub async fn delete_topology(settings: &Settings) {
    delete_topology_at(&settings.amqp.url, settings).await;
}

/// Removes a test's queues and dead-letter exchange, through `url`.
pub async fn delete_topology_at(url: &str, settings: &Settings) {
    let connection = connect_to(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let amqp = &settings.amqp;
    // An empty name means "the last queue declared on this channel" to the broker: skip it.
    for queue in [&amqp.jobs_queue, &amqp.bulk_queue, &amqp.results_queue, &amqp.dead_letter_queue] {
        if queue.is_empty() {
            continue;
        }
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    }
    let _ = channel.exchange_delete(amqp.dead_letter_exchange.as_str().into(), Default::default()).await;
}

/// The shared broker: `BATCHSCORE__AMQP__URL`, else the local RabbitMQ (what `settings()` gives).
pub fn default_url() -> String {
    std::env::var("BATCHSCORE__AMQP__URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn connect() -> Connection {
    connect_to(&default_url()).await
}

pub async fn connect_to(url: &str) -> Connection {
    tokio::time::timeout(BROKER_PATIENCE, Connection::connect(url, ConnectionProperties::default()))
        .await
        .unwrap_or_else(|_| panic!("RabbitMQ at {url} did not open a connection within {BROKER_PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("RabbitMQ does not answer at {url} ({e}): start it with scripts/setup.sh"))
}

/// Sends jobs to a worker and receives their results on a private reply queue.
pub struct Client {
    _connection: Connection,
    channel: Channel,
    jobs_queue: String,
    pub reply_queue: String,
    replies: lapin::Consumer,
    schema: jsonschema::Validator,
}

impl Client {
    pub async fn new(settings: &Settings) -> Client {
        Self::with_reply_queue_arguments(settings, FieldTable::default()).await
    }

    pub async fn with_reply_queue_arguments(settings: &Settings, arguments: FieldTable) -> Client {
        Self::connected(connect().await, settings, arguments).await
    }

    /// A client of the broker at `url` (a private node's).
    pub async fn at(url: &str, settings: &Settings) -> Client {
        Self::connected(connect_to(url).await, settings, FieldTable::default()).await
    }

    /// A client of the broker at `url` whose reply queue is `reply_queue` (a name a
    /// `security.reply_to` pattern must match), declared like the others.
    pub async fn at_replying_to(url: &str, settings: &Settings, reply_queue: &str) -> Client {
        let declared = Some((private_queue(), FieldTable::default()));
        Self::listening(connect_to(url).await, settings, reply_queue.to_string(), declared).await
    }

    /// A client of the broker at `url` that receives the messages of `queue`, which exists (the
    /// worker's results queue); its own jobs reply there too.
    pub async fn on_queue(url: &str, settings: &Settings, queue: &str) -> Client {
        Self::listening(connect_to(url).await, settings, queue.to_string(), None).await
    }

    async fn connected(connection: Connection, settings: &Settings, arguments: FieldTable) -> Client {
        let reply_queue =
            format!("{}.replies.{}", settings.amqp.jobs_queue, &uuid::Uuid::new_v4().simple().to_string()[..6]);
        Self::listening(connection, settings, reply_queue, Some((private_queue(), arguments))).await
    }

    /// A client receiving on `reply_queue`, which it declares first when `declared` says how.
    async fn listening(
        connection: Connection,
        settings: &Settings,
        reply_queue: String,
        declared: Option<(QueueDeclareOptions, FieldTable)>,
    ) -> Client {
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(Default::default()).await.expect("confirms");
        if let Some((options, arguments)) = declared {
            channel.queue_declare(reply_queue.as_str().into(), options, arguments).await.expect("reply queue");
        }
        let replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("consume replies");
        let schema_text = std::fs::read(root().join("schemas/result.schema.json")).expect("result schema exists");
        let schema = jsonschema::validator_for(&serde_json::from_slice(&schema_text).expect("schema is JSON"))
            .expect("schema compiles");
        Client {
            _connection: connection,
            channel,
            jobs_queue: settings.amqp.jobs_queue.clone(),
            reply_queue,
            replies,
            schema,
        }
    }

    /// Publishes raw bytes as a job replying to this client; waits for the broker's confirm.
    pub async fn send_raw(&self, body: &[u8], properties: BasicProperties) {
        self.publish(body, properties.with_reply_to(self.reply_queue.as_str().into())).await;
    }

    /// Publishes raw bytes as a job with exactly `properties` (a `reply_to` of its own, or none);
    /// waits for the broker's confirm.
    pub async fn publish(&self, body: &[u8], properties: BasicProperties) {
        let publish = async {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.jobs_queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .expect("publish");
            confirm.await.expect("confirm")
        };
        let confirmation =
            tokio::time::timeout(BROKER_PATIENCE, publish).await.expect("the broker confirms a job in time");
        assert!(confirmation.is_ack(), "broker refused a job");
    }

    pub async fn send(&self, job: &Value) {
        let properties = BasicProperties::default().with_content_type("application/json".into());
        self.send_raw(&serde_json::to_vec(job).expect("job serialises"), properties).await;
    }

    /// The next `n` results (with their correlation ids), each checked against the result schema.
    pub async fn results(&mut self, n: usize) -> Vec<(Value, Option<String>)> {
        let mut results = Vec::with_capacity(n);
        while results.len() < n {
            let delivery = tokio::time::timeout(Duration::from_secs(30), self.replies.next())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} results arrived within 30 s", results.len()))
                .expect("reply stream open")
                .expect("delivery");
            let body: Value = serde_json::from_slice(&delivery.data).expect("result is JSON");
            if let Err(error) = self.schema.validate(&body) {
                panic!("result does not match schemas/result.schema.json: {error}\n{body}");
            }
            assert_eq!(delivery.properties.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
            assert_eq!(*delivery.properties.delivery_mode(), Some(2), "results are persistent");
            results.push((body, delivery.properties.correlation_id().as_ref().map(|c| c.to_string())));
        }
        results
    }

    pub async fn result(&mut self) -> Value {
        self.results(1).await.remove(0).0
    }
}

/// How a client declares its own reply queue: it goes when the client does.
fn private_queue() -> QueueDeclareOptions {
    QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }
}

/// Asserts `actual` equals `expected`, numbers within `TOLERANCE`; `path` names the spot on failure.
pub fn assert_close(actual: &Value, expected: &Value, path: &str) {
    match (actual, expected) {
        (Value::Number(a), Value::Number(e)) => {
            let (a, e) = (a.as_f64().expect("number"), e.as_f64().expect("number"));
            assert!((a - e).abs() <= TOLERANCE, "{path}: {a} differs from {e} by more than {TOLERANCE}");
        }
        (Value::Array(a), Value::Array(e)) => {
            assert_eq!(a.len(), e.len(), "{path}: length");
            for (i, (a, e)) in a.iter().zip(e).enumerate() {
                assert_close(a, e, &format!("{path}[{i}]"));
            }
        }
        (Value::Object(a), Value::Object(e)) => {
            let mut keys_a: Vec<_> = a.keys().collect();
            let mut keys_e: Vec<_> = e.keys().collect();
            keys_a.sort();
            keys_e.sort();
            assert_eq!(keys_a, keys_e, "{path}: keys");
            for (k, e) in e {
                assert_close(&a[k], e, &format!("{path}.{k}"));
            }
        }
        (a, e) => assert_eq!(a, e, "{path}"),
    }
}

/// Rows `range` of each expected output.
pub fn expected_slice(outputs: &Value, range: std::ops::Range<usize>) -> Value {
    let sliced = outputs
        .as_object()
        .expect("outputs object")
        .iter()
        .map(|(name, values)| (name.clone(), Value::Array(values.as_array().expect("array")[range.clone()].to_vec())))
        .collect();
    Value::Object(sliced)
}

/// A worker process that is killed when dropped, so a failing test leaves none behind.
pub struct WorkerProcess(pub std::process::Child);

impl WorkerProcess {
    /// SIGTERM, then waits (60 s at most) for the worker to finish what it holds and exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let signalled = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().expect("kill runs");
        assert!(signalled.success(), "SIGTERM to worker {}", self.0.id());
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("worker status") {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the worker did not stop within 60 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // Already gone when the test stopped it: both calls then fail harmlessly.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A worker process on the test's queues and the fixture models; its log goes to a file in the
/// temporary directory named after the jobs queue.
pub fn spawn_worker_process(settings: &Settings, metrics_listen: &str) -> WorkerProcess {
    spawn_logged(worker_command(settings, metrics_listen), settings)
}

/// `command`, a [`worker_command`] on `settings`' queues, started with its log in a file of the
/// temporary directory named after the jobs queue.
pub fn spawn_logged(mut command: Command, settings: &Settings) -> WorkerProcess {
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{}.worker{n}.log", settings.amqp.jobs_queue)))
        .expect("log file");
    command.stdout(std::process::Stdio::null()).stderr(log).spawn().map(WorkerProcess).expect("worker process starts")
}

/// `batchscore worker` on the test's queues and models, logging at info, for a test to add its
/// settings (environment variables) and streams to. The broker is the settings file's (or that
/// of an inherited BATCHSCORE__AMQP__URL), unless the test sets one.
pub fn worker_command(settings: &Settings, metrics_listen: &str) -> Command {
    let amqp = &settings.amqp;
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    command
        .arg("worker")
        .current_dir(root())
        // RUST_LOG of the person running the tests would win over the level set here.
        .env_remove("RUST_LOG")
        .env("BATCHSCORE__AMQP__JOBS_QUEUE", &amqp.jobs_queue)
        .env("BATCHSCORE__AMQP__RESULTS_QUEUE", &amqp.results_queue)
        .env("BATCHSCORE__AMQP__DEAD_LETTER_EXCHANGE", &amqp.dead_letter_exchange)
        .env("BATCHSCORE__AMQP__DEAD_LETTER_QUEUE", &amqp.dead_letter_queue)
        .env("BATCHSCORE__MODELS__REPOSITORY", &settings.models.repository)
        .env("BATCHSCORE__MODELS__POLL_INTERVAL_MS", settings.models.poll_interval_ms.to_string())
        .env("BATCHSCORE__METRICS__LISTEN", metrics_listen)
        .env("BATCHSCORE__LOGGING__LEVEL", "info");
    command
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = StdTcpStream::connect(addr).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()))
}

/// Sum of the samples of `name` whose labels include every `label="value"` in `labels`.
pub fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
            let wanted = metric == name && labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

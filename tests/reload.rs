//! Model versions added, replaced, broken and removed while jobs stream in: no job fails, and
//! every result names the version and file digest that scored it.
//!
//! Each test serves the `linear` fixture under a model name of its own: the metrics recorder is
//! one per process, so two tests serving the same model, version and file would write the same
//! `batchscore_model_info` series and read each other's values.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_close, expected, fixtures_repository, free_port, get, sample, Client, TestWorker};
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Longest a step of a test waits for the worker to show the step took effect.
const STEP_PATIENCE: Duration = Duration::from_secs(30);

/// Jobs the stream keeps ahead of the results read: enough to keep batches forming, bounded so
/// the worker never falls far behind a change.
const JOBS_AHEAD: usize = 16;

/// A private repository holding the `linear` fixture's config and version 1 as model
/// `linear_<test>`.
struct Scratch {
    root: PathBuf,
    model: String,
}

impl Scratch {
    fn new(test: &str) -> Self {
        let root = std::env::temp_dir().join(format!("batchscore-{test}-{}", uuid::Uuid::new_v4().simple()));
        let scratch = Scratch { root, model: format!("linear_{test}") };
        std::fs::create_dir_all(scratch.model_dir()).expect("scratch repository");
        std::fs::copy(fixtures_repository().join("linear/config.yaml"), scratch.model_dir().join("config.yaml"))
            .expect("config");
        scratch.install(1, &fixture_file("linear", 1));
        scratch
    }

    fn model_dir(&self) -> PathBuf {
        self.root.join(&self.model)
    }

    /// Puts `source` in place as `<model>/<version>/model.onnx` the way operators are told to:
    /// written beside it, then renamed, so the worker never reads half a file.
    fn install(&self, version: u64, source: &Path) {
        let dir = self.model_dir().join(version.to_string());
        std::fs::create_dir_all(&dir).expect("version folder");
        let partial = dir.join("model.onnx.partial");
        std::fs::copy(source, &partial).expect("copy model");
        std::fs::rename(&partial, dir.join("model.onnx")).expect("rename model");
    }

    fn install_bytes(&self, version: u64, bytes: &[u8]) {
        let scratch = self.root.join(format!("garbage-{version}.onnx"));
        std::fs::write(&scratch, bytes).expect("write");
        self.install(version, &scratch);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn fixture_file(model: &str, version: u64) -> PathBuf {
    fixtures_repository().join(format!("{model}/{version}/model.onnx"))
}

fn faulty_file() -> PathBuf {
    common::root().join("tests/fixtures/faulty/reducer/1/model.onnx")
}

fn digest(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).expect("model file")))
}

/// The outputs onnxruntime gives for fixture row `row`, by the digest of the file that scored.
fn expected_row(by_digest: &HashMap<String, Value>, digest: &str, row: usize) -> Value {
    let outputs = by_digest.get(digest).unwrap_or_else(|| panic!("a result names an unknown file {digest}"));
    common::expected_slice(outputs, row..row + 1)
}

/// Publishes one-row jobs `r0`, `r1`, … for `model` replying to `reply_queue`, each waiting for a
/// permit from `ahead` (the reader returns one per result), until `stop` fires; returns how many
/// it sent.
fn stream_jobs(
    jobs_queue: String,
    reply_queue: String,
    model: String,
    rows: Vec<Value>,
    ahead: Arc<Semaphore>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let connection = common::connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(Default::default()).await.expect("confirms");
        let mut sent = 0;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return sent,
                permit = ahead.acquire() => permit.expect("the semaphore stays open").forget(),
            }
            let job = json!({"job_id": format!("r{sent}"), "model": model, "rows": [rows[sent % rows.len()]]});
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_reply_to(reply_queue.as_str().into());
            let publish = async {
                let body = serde_json::to_vec(&job).expect("job serialises");
                let options = BasicPublishOptions::default();
                let confirm = channel
                    .basic_publish("".into(), jobs_queue.as_str().into(), options, &body, properties)
                    .await
                    .expect("publish");
                confirm.await.expect("confirm")
            };
            let confirmation = tokio::time::timeout(common::BROKER_PATIENCE, publish)
                .await
                .expect("the broker confirms a job in time");
            assert!(confirmation.is_ack(), "broker refused a job");
            sent += 1;
        }
    })
}

/// Reads the stream's results, checks each one, and counts them by (version, file digest).
struct Tally {
    client: Client,
    ahead: Arc<Semaphore>,
    by_digest: HashMap<String, Value>,
    rows: usize,
    received: usize,
    seen: HashMap<(String, String), usize>,
}

impl Tally {
    async fn read(&mut self, n: usize) {
        for (result, _) in self.client.results(n).await {
            self.ahead.add_permits(1);
            self.received += 1;
            assert_eq!(result["status"], "ok", "no job fails while versions change: {result}");
            let job: usize = result["job_id"].as_str().and_then(|id| id[1..].parse().ok()).expect("job id");
            let (version, sha) = (result["model_version"].as_str().expect("version"), result["model_sha256"].as_str());
            let sha = sha.expect("every result names the file that scored it");
            let path = format!("{}", result["job_id"]);
            assert_close(&result["outputs"], &expected_row(&self.by_digest, sha, job % self.rows), &path);
            *self.seen.entry((version.to_string(), sha.to_string())).or_default() += 1;
        }
    }

    fn count(&self, version: &str, file: &Path) -> usize {
        self.seen.get(&(version.to_string(), digest(file))).copied().unwrap_or(0)
    }

    /// Reads results until `done` holds; fails after `STEP_PATIENCE`.
    async fn until(&mut self, step: &str, done: impl Fn(&Tally) -> bool) {
        let started = Instant::now();
        while !done(self) {
            assert!(started.elapsed() < STEP_PATIENCE, "{step}: not seen within {STEP_PATIENCE:?}: {:?}", self.seen);
            self.read(1).await;
        }
    }
}

/// Scrapes `/metrics` until `done` holds for the scrape; fails after `STEP_PATIENCE`.
async fn until_scraped(metrics: SocketAddr, step: &str, done: impl Fn(&str) -> bool) {
    let started = Instant::now();
    loop {
        let scrape = get(metrics, "/metrics").map(|(_, body)| body).unwrap_or_default();
        if done(&scrape) {
            return;
        }
        assert!(started.elapsed() < STEP_PATIENCE, "{step}: not seen within {STEP_PATIENCE:?}:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_change_under_a_stream_of_jobs_and_none_fails() {
    let repository = Scratch::new("reload");
    let model = repository.model.clone();
    let mut settings = common::settings("reload", &repository.root);
    settings.models.poll_interval_ms = 100;
    let worker = TestWorker::start(settings).await;
    let client = Client::new(&worker.settings).await;
    let (v1, v2) = (fixture_file("linear", 1), fixture_file("linear", 2));
    let by_digest: HashMap<String, Value> = [
        (digest(&v1), expected("linear_v1")["outputs"].clone()),
        (digest(&v2), expected("linear_v2")["outputs"].clone()),
    ]
    .into();
    let rows = expected("linear_v1")["rows"].as_array().expect("rows").clone();

    // Jobs stream in while the repository changes; each change waits until the worker shows it
    // took effect.
    let (ahead, stop) = (Arc::new(Semaphore::new(JOBS_AHEAD)), CancellationToken::new());
    let reply_queue = client.reply_queue.clone();
    let jobs_queue = worker.settings.amqp.jobs_queue.clone();
    let stream = stream_jobs(jobs_queue, reply_queue, model.clone(), rows.clone(), ahead.clone(), stop.clone());
    let mut tally = Tally { client, ahead, by_digest, rows: rows.len(), received: 0, seen: HashMap::new() };

    tally.until("version 1 serves", |t| t.count("1", &v1) > 0).await;
    repository.install(2, &v2);
    tally.until("the added version 2 serves", |t| t.count("2", &v2) > 0).await;
    // Replaced in place under the same version number.
    repository.install(2, &v1);
    tally.until("the replaced file of version 2 serves", |t| t.count("2", &v1) > 0).await;
    repository.install_bytes(3, b"not an onnx model");
    // Loads, but its 3-feature input contradicts the 62 features of config.yaml.
    repository.install(4, &faulty_file());
    until_scraped(worker.metrics, "versions 3 and 4 refused", |scrape| {
        sample(scrape, "batchscore_model_load_failures_total", &[("model", &model)]) >= 2.0
    })
    .await;
    let served = tally.count("2", &v1);
    tally.until("version 2 serves on after the refusals", |t| t.count("2", &v1) > served).await;
    std::fs::rename(repository.model_dir().join("2"), repository.model_dir().join("retired-2")).expect("retire v2");
    let served = tally.count("1", &v1);
    tally.until("version 1 serves again once version 2 is gone", |t| t.count("1", &v1) > served).await;
    stop.cancel();
    let sent = stream.await.expect("job stream");
    tally.read(sent - tally.received).await;

    let seen = &tally.seen;
    assert!(tally.count("1", &v1) > 0, "version 1 served before version 2 arrived: {seen:?}");
    assert!(tally.count("2", &v2) > 0, "the added version 2 took traffic: {seen:?}");
    assert!(tally.count("2", &v1) > 0, "the replaced file of version 2 took traffic: {seen:?}");
    assert_eq!(seen.len(), 3, "only versions 1 and 2 scored, refused ones never did: {seen:?}");

    let (status, scrape) = get(worker.metrics, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    let failures = sample(&scrape, "batchscore_model_load_failures_total", &[("model", &model)]);
    assert_eq!(failures, 2.0, "the broken and the mismatched version were each refused once");
    assert_eq!(sample(&scrape, "batchscore_model_info", &[("model", &model), ("version", "1")]), 1.0);
    assert_eq!(sample(&scrape, "batchscore_model_info", &[("model", &model), ("version", "2")]), 0.0);
    assert_eq!(worker.stop().await, 0, "every job acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_loads_a_new_version_at_once() {
    let repository = Scratch::new("sighup");
    let model = repository.model.clone();
    let mut settings = common::settings("sighup", &repository.root);
    settings.models.poll_interval_ms = 0;
    let addr = format!("127.0.0.1:{}", free_port());
    let worker = common::spawn_worker_process(&settings, &addr);
    let metrics = addr.parse().expect("address");
    let started = Instant::now();
    common::wait_until_ready(metrics, Duration::from_secs(30)).await;
    let mut client = Client::new(&settings).await;
    let row = expected("linear_v2")["rows"][0].clone();
    let pinned = |id: &str| json!({"job_id": id, "model": model, "model_version": "2", "rows": [row]});
    client.send(&pinned("before")).await;
    assert_eq!(client.result().await["error"]["code"], "unknown_model", "no version 2 yet");

    repository.install(2, &fixture_file("linear", 2));
    let hangup =
        std::process::Command::new("kill").args(["-HUP", &worker.0.id().to_string()]).status().expect("kill runs");
    assert!(hangup.success());
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        client.send(&pinned(&format!("after-{attempt}"))).await;
        let result = client.result().await;
        if result["status"] == "ok" || started.elapsed() > Duration::from_secs(60) {
            break result;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(result["status"], "ok", "SIGHUP loaded version 2: {result}");
    assert_eq!(result["model_sha256"], digest(&fixture_file("linear", 2)));
    assert_close(&result["outputs"], &common::expected_slice(&expected("linear_v2")["outputs"], 0..1), "outputs");
    drop(worker);
    common::delete_topology(&settings).await;
}

/// The version policy decides what serves, and editing it in config.yaml takes effect on reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_policy_selects_the_served_versions() {
    let repository = Scratch::new("policy");
    let model = repository.model.clone();
    repository.install(2, &fixture_file("linear", 2));
    let config = repository.model_dir().join("config.yaml");
    let original = std::fs::read_to_string(&config).expect("config");
    let set_policy = |policy: &str| {
        let partial = repository.root.join("config.partial");
        std::fs::write(&partial, format!("{original}\nversion_policy: {policy}\n")).expect("write config");
        std::fs::rename(&partial, &config).expect("replace config");
    };
    set_policy("{specific: [1]}");
    let mut settings = common::settings("policy", &repository.root);
    settings.models.poll_interval_ms = 100;
    let worker = TestWorker::start(settings).await;
    let mut client = Client::new(&worker.settings).await;
    let row = expected("linear_v1")["rows"][0].clone();
    client.send(&json!({"job_id": "latest", "model": model, "rows": [row]})).await;
    assert_eq!(client.result().await["model_version"], "1", "version 2 is outside the policy");
    client.send(&json!({"job_id": "pinned", "model": model, "model_version": "2", "rows": [row]})).await;
    assert_eq!(client.result().await["error"]["code"], "unknown_model");

    set_policy("{latest: 1}");
    let started = Instant::now();
    let result = loop {
        client.send(&json!({"job_id": "after", "model": model, "rows": [row]})).await;
        let result = client.result().await;
        if result["model_version"] == "2" || started.elapsed() > Duration::from_secs(30) {
            break result;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(result["model_version"], "2", "the edited policy serves the latest version: {result}");
    client.send(&json!({"job_id": "retired", "model": model, "model_version": "1", "rows": [row]})).await;
    assert_eq!(client.result().await["error"]["code"], "unknown_model", "version 1 retired by the policy");
    assert_eq!(worker.stop().await, 0);
}

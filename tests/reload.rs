//! Model versions added, replaced, broken and removed while jobs stream in: no job fails, and
//! every result names the version and file digest that scored it.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{assert_close, expected, fixtures_repository, free_port, get, sample, Client, TestWorker};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A private repository holding the `linear` fixture's config and version 1.
fn scratch_repository(test: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("batchscore-{test}-{}", uuid::Uuid::new_v4().simple()));
    let model = root.join("linear");
    std::fs::create_dir_all(&model).expect("scratch repository");
    std::fs::copy(fixtures_repository().join("linear/config.yaml"), model.join("config.yaml")).expect("config");
    install(&root, 1, &fixture_file("linear", 1));
    root
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

/// Puts `source` in place as `linear/<version>/model.onnx` the way operators are told to: written
/// beside it, then renamed, so the worker never reads half a file.
fn install(repository: &Path, version: u64, source: &Path) {
    let dir = repository.join(format!("linear/{version}"));
    std::fs::create_dir_all(&dir).expect("version folder");
    let partial = dir.join("model.onnx.partial");
    std::fs::copy(source, &partial).expect("copy model");
    std::fs::rename(&partial, dir.join("model.onnx")).expect("rename model");
}

fn install_bytes(repository: &Path, version: u64, bytes: &[u8]) {
    let scratch = repository.join(format!("garbage-{version}.onnx"));
    std::fs::write(&scratch, bytes).expect("write");
    install(repository, version, &scratch);
}

/// The outputs onnxruntime gives for fixture row `row`, by the digest of the file that scored.
fn expected_row(by_digest: &HashMap<String, Value>, digest: &str, row: usize) -> Value {
    let outputs = by_digest.get(digest).unwrap_or_else(|| panic!("a result names an unknown file {digest}"));
    common::expected_slice(outputs, row..row + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_change_under_a_stream_of_jobs_and_none_fails() {
    let repository = scratch_repository("reload");
    let mut settings = common::settings("reload", &repository);
    settings.models.poll_interval_ms = 100;
    let worker = TestWorker::start(settings).await;
    let mut client = Client::new(&worker.settings).await;
    let (v1, v2) = (fixture_file("linear", 1), fixture_file("linear", 2));
    let by_digest: HashMap<String, Value> = [
        (digest(&v1), expected("linear_v1")["outputs"].clone()),
        (digest(&v2), expected("linear_v2")["outputs"].clone()),
    ]
    .into();
    let rows = expected("linear_v1")["rows"].as_array().expect("rows").clone();

    // The repository changes on a timeline while the jobs below stream in.
    let changes = {
        let (repository, v1, v2) = (repository.clone(), v1.clone(), v2.clone());
        tokio::spawn(async move {
            let at = |ms| tokio::time::sleep(Duration::from_millis(ms));
            at(400).await;
            install(&repository, 2, &v2);
            at(800).await;
            // Replaced in place under the same version number.
            install(&repository, 2, &v1);
            at(600).await;
            install_bytes(&repository, 3, b"not an onnx model");
            // Loads, but its 3-feature input contradicts the 62 features of config.yaml.
            install(&repository, 4, &faulty_file());
            at(800).await;
            std::fs::rename(repository.join("linear/2"), repository.join("linear/retired-2")).expect("retire v2");
        })
    };
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_millis(3400) {
        let row = sent % rows.len();
        client.send(&json!({"job_id": format!("r{sent}"), "model": "linear", "rows": [rows[row]]})).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    changes.await.expect("repository changes");

    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for (result, _) in client.results(sent).await {
        assert_eq!(result["status"], "ok", "no job fails while versions change: {result}");
        let job: usize = result["job_id"].as_str().and_then(|id| id[1..].parse().ok()).expect("job id");
        let (version, sha) = (result["model_version"].as_str().expect("version"), result["model_sha256"].as_str());
        let sha = sha.expect("every result names the file that scored it");
        let path = format!("{}", result["job_id"]);
        assert_close(&result["outputs"], &expected_row(&by_digest, sha, job % rows.len()), &path);
        *seen.entry((version.to_string(), sha.to_string())).or_default() += 1;
    }
    let count = |version: &str, file: &Path| seen.get(&(version.to_string(), digest(file))).copied().unwrap_or(0);
    assert!(count("1", &v1) > 0, "version 1 served before version 2 arrived: {seen:?}");
    assert!(count("2", &v2) > 0, "the added version 2 took traffic: {seen:?}");
    assert!(count("2", &v1) > 0, "the replaced file of version 2 took traffic: {seen:?}");
    assert_eq!(seen.len(), 3, "only versions 1 and 2 scored, refused ones never did: {seen:?}");

    let (status, scrape) = get(worker.metrics, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    let failures = sample(&scrape, "batchscore_model_load_failures_total", &[("model", "linear")]);
    assert_eq!(failures, 2.0, "the broken and the mismatched version were each refused once");
    assert_eq!(sample(&scrape, "batchscore_model_info", &[("model", "linear"), ("version", "1")]), 1.0);
    assert_eq!(sample(&scrape, "batchscore_model_info", &[("model", "linear"), ("version", "2")]), 0.0);
    assert_eq!(worker.stop().await, 0, "every job acknowledged");
    let _ = std::fs::remove_dir_all(&repository);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_loads_a_new_version_at_once() {
    let repository = scratch_repository("sighup");
    let mut settings = common::settings("sighup", &repository);
    settings.models.poll_interval_ms = 0;
    let addr = format!("127.0.0.1:{}", free_port());
    let worker = common::spawn_worker_process(&settings, &addr);
    let metrics = addr.parse().expect("address");
    let started = Instant::now();
    common::wait_until_ready(metrics, Duration::from_secs(30)).await;
    let mut client = Client::new(&settings).await;
    let row = expected("linear_v2")["rows"][0].clone();
    let pinned = |id: &str| json!({"job_id": id, "model": "linear", "model_version": "2", "rows": [row]});
    client.send(&pinned("before")).await;
    assert_eq!(client.result().await["error"]["code"], "unknown_model", "no version 2 yet");

    install(&repository, 2, &fixture_file("linear", 2));
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
    let _ = std::fs::remove_dir_all(&repository);
}

/// The version policy decides what serves, and editing it in config.yaml takes effect on reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_policy_selects_the_served_versions() {
    let repository = scratch_repository("policy");
    install(&repository, 2, &fixture_file("linear", 2));
    let config = repository.join("linear/config.yaml");
    let original = std::fs::read_to_string(&config).expect("config");
    let set_policy = |policy: &str| {
        let partial = repository.join("config.partial");
        std::fs::write(&partial, format!("{original}\nversion_policy: {policy}\n")).expect("write config");
        std::fs::rename(&partial, &config).expect("replace config");
    };
    set_policy("{specific: [1]}");
    let mut settings = common::settings("policy", &repository);
    settings.models.poll_interval_ms = 100;
    let worker = TestWorker::start(settings).await;
    let mut client = Client::new(&worker.settings).await;
    let row = expected("linear_v1")["rows"][0].clone();
    client.send(&json!({"job_id": "latest", "model": "linear", "rows": [row]})).await;
    assert_eq!(client.result().await["model_version"], "1", "version 2 is outside the policy");
    client.send(&json!({"job_id": "pinned", "model": "linear", "model_version": "2", "rows": [row]})).await;
    assert_eq!(client.result().await["error"]["code"], "unknown_model");

    set_policy("{latest: 1}");
    let started = Instant::now();
    let result = loop {
        client.send(&json!({"job_id": "after", "model": "linear", "rows": [row]})).await;
        let result = client.result().await;
        if result["model_version"] == "2" || started.elapsed() > Duration::from_secs(30) {
            break result;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(result["model_version"], "2", "the edited policy serves the latest version: {result}");
    client.send(&json!({"job_id": "retired", "model": "linear", "model_version": "1", "rows": [row]})).await;
    assert_eq!(client.result().await["error"]["code"], "unknown_model", "version 1 retired by the policy");
    assert_eq!(worker.stop().await, 0);
    let _ = std::fs::remove_dir_all(&repository);
}

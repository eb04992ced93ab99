//! `batchscore audit reproduce` against a real worker, broker and ONNX Runtime: a worker with the
//! audit trail and the model archive on scores jobs of a version in each job form; the version is
//! then retired from the repository, and each job is still reproduced from its record and input,
//! from the archive, whose copy of the file has the recorded sha256. A job with one value changed
//! is refused as not the recorded job, without the archive the file is found nowhere, and once
//! the version is back in the repository it is found there.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use batchscore::engine::model::ModelConfig;
use batchscore::settings::Settings;
use batchscore::worker::Worker;
use common::stream::{read_stream, Record};
use common::{Client, TestWorker, BROKER_PATIENCE};
use lapin::options::QueueDeleteOptions;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Values per row of the linear fixture model.
const FEATURES: usize = 62;

/// Longest `audit reproduce` may run: loading ONNX Runtime and the model on a busy machine.
const COMMAND_PATIENCE: Duration = Duration::from_secs(120);

/// A value of row `row`, feature `feature`, by `seed`: most not exactly a float32.
fn value(seed: usize, row: usize, feature: usize) -> f64 {
    ((seed * 7 + row * 3 + feature) as f64 * 0.37).sin() * 3.0
}

fn rows(seed: usize, n: usize) -> Vec<Vec<f64>> {
    (0..n).map(|r| (0..FEATURES).map(|f| value(seed, r, f)).collect()).collect()
}

/// The linear fixture's feature names, in input order.
fn feature_names() -> Vec<String> {
    let text = std::fs::read_to_string(common::fixtures_repository().join("linear/config.yaml")).expect("config");
    ModelConfig::from_yaml(&text).expect("config parses").features.expect("the linear fixture names its features")
}

/// One job of each form, pinned to version 1: rows, records and an Open Inference Protocol tensor.
fn jobs() -> Vec<(String, Value)> {
    let names = feature_names();
    let records: Vec<Value> = rows(2, 2)
        .into_iter()
        .map(|row| Value::Object(names.iter().cloned().zip(row.into_iter().map(Value::from)).collect()))
        .collect();
    let tensor: Vec<f64> = rows(3, 2).into_iter().flatten().collect();
    vec![
        ("rows-job".into(), json!({"job_id": "rows-job", "model": "linear", "model_version": 1, "rows": rows(1, 3)})),
        (
            "records-job".into(),
            json!({"job_id": "records-job", "model": "linear", "model_version": 1, "records": records}),
        ),
        (
            "protocol-job".into(),
            json!({"id": "protocol-job", "model_name": "linear", "model_version": "1",
                   "inputs": [{"name": "input", "shape": [2, FEATURES], "datatype": "FP64", "data": tensor}]}),
        ),
    ]
}

/// A folder of its own in the temporary directory.
fn scratch(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("batchscore-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&path).expect("scratch folder");
    path
}

/// Settings with the audit trail (outputs included) and the model archive on, serving versions 1
/// and 2 of the linear fixture from a repository of the test's own.
fn audited(test: &str) -> Settings {
    let repository = common::private_repository("linear", "linear", 1);
    common::add_to_repository(&repository, "linear", "linear", 2);
    let mut settings = common::settings(test, &repository);
    settings.models.poll_interval_ms = 100;
    settings.models.archive = Some(scratch(&format!("{test}-archive")));
    settings.audit.enabled = true;
    settings.audit.include_outputs = true;
    settings.audit.stream = format!("{}.audit", settings.amqp.jobs_queue.trim_end_matches(".jobs"));
    settings.audit.max_bytes = 100_000_000;
    settings.audit.worker_id = format!("test-{test}");
    settings
}

/// Sends jobs pinned to version 1 until one is answered `unknown_model`: the worker has reloaded
/// the repository without it. Fails after [`BROKER_PATIENCE`].
async fn until_version_1_is_retired(client: &mut Client) {
    let started = Instant::now();
    for probe in 0.. {
        let job =
            json!({"job_id": format!("probe-{probe}"), "model": "linear", "model_version": 1, "rows": rows(0, 1)});
        client.send(&job).await;
        let result = client.result().await;
        if result["error"]["code"] == "unknown_model" {
            return;
        }
        assert_eq!(result["status"], "ok", "{result}");
        assert!(started.elapsed() < BROKER_PATIENCE, "version 1 still served {BROKER_PATIENCE:?} after its removal");
    }
}

/// Where `audit reproduce` takes the record from.
enum RecordFrom<'a> {
    /// A file holding the record's body as the stream holds it.
    File(&'a Record),
    /// The test's audit stream, by job id.
    Stream(&'a str),
}

/// `batchscore audit reproduce` of the record `from` names and the job body `input`, with the
/// test's repository and `archive` (`None`: no archive).
fn reproduce(settings: &Settings, archive: Option<&Path>, from: RecordFrom, input: &[u8]) -> Output {
    let folder = scratch("reproduce-files");
    let (record_file, input_file) = (folder.join("record.json"), folder.join("job.json"));
    std::fs::write(&input_file, input).expect("job file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    command.args(["audit", "reproduce"]);
    match from {
        RecordFrom::File(record) => {
            std::fs::write(&record_file, &record.body).expect("record file");
            command.arg("--record").arg(&record_file)
        }
        RecordFrom::Stream(job_id) => command.args(["--job-id", job_id, "--stream", &settings.audit.stream]),
    };
    command
        .arg("--input")
        .arg(&input_file)
        .current_dir(common::root())
        .env_remove("RUST_LOG")
        .env_remove("BATCHSCORE__MODELS__ARCHIVE")
        .env("BATCHSCORE__MODELS__REPOSITORY", &settings.models.repository);
    if let Some(archive) = archive {
        command.env("BATCHSCORE__MODELS__ARCHIVE", archive);
    }
    let output = common::run_bounded(command, COMMAND_PATIENCE).expect("audit reproduce runs");
    let _ = std::fs::remove_dir_all(&folder);
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256_of(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).expect("readable")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_versions_scores_are_reproduced_from_the_archive() {
    let settings = audited("reproduce");
    let archive = settings.models.archive().expect("an archive").to_path_buf();
    let worker = TestWorker::start(settings.clone()).await;
    let mut client = Client::new(&settings).await;
    let jobs = jobs();
    for (_, job) in &jobs {
        client.send(job).await;
    }
    for (result, _) in client.results(jobs.len()).await {
        assert!(result["status"] == "ok" || result["parameters"]["status"] == "ok", "{result}");
    }

    // Version 1 leaves the repository; the worker serves version 2 alone.
    std::fs::remove_dir_all(settings.models.repository.join("linear/1")).expect("version 1 retired");
    until_version_1_is_retired(&mut client).await;
    assert_eq!(worker.stop().await, 0, "every job acknowledged");
    let records = read_stream(&settings.audit.stream).await;

    for (id, job) in &jobs {
        let record = records.iter().find(|r| r.str("job_id") == Some(id.as_str())).expect("each job has a record");
        assert_eq!((record.json["version"].as_u64(), record.json["status"].as_str()), (Some(1), Some("ok")));
        assert!(record.json.get("outputs").is_some(), "outputs are recorded: {}", record.json);
        let sha256 = record.str("model_sha256").expect("a scored job names its model file");
        let archived = archive.join(sha256);
        assert_eq!(sha256_of(&archived.join("model.onnx")), sha256, "the archived file is the one that scored");
        let config = std::fs::read(common::fixtures_repository().join("linear/config.yaml")).expect("config");
        let config_name = format!("config-{}.yaml", &format!("{:x}", Sha256::digest(&config))[..16]);
        assert_eq!(std::fs::read(archived.join(&config_name)).expect("config archived"), config);

        let body = serde_json::to_vec(job).expect("JSON");
        let output = reproduce(&settings, Some(&archive), RecordFrom::File(record), &body);
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        assert_eq!(output.status.code(), Some(0), "{id}:\n{stdout}\n{stderr}");
        assert!(stdout.contains("(in the model archive)") && stdout.contains("verdict:  reproduced"), "{stdout}");
        assert!(stdout.contains(&format!("sha256:   {sha256}")), "{stdout}");
        for output_name in ["label", "probabilities"] {
            assert!(stdout.contains(&format!("output {output_name}: equal")), "{stdout}");
        }
    }

    // One value changed: not the job that was recorded.
    let (id, job) = &jobs[0];
    let record = records.iter().find(|r| r.str("job_id") == Some(id.as_str())).expect("record");
    let mut changed = job.clone();
    changed["rows"][1][5] = json!(value(1, 1, 5) + 0.5);
    let output =
        reproduce(&settings, Some(&archive), RecordFrom::File(record), &serde_json::to_vec(&changed).expect("JSON"));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not the job that was recorded") && stderr.contains("inputs_sha256"), "{stderr}");

    // Without the archive, the retired version's file is found nowhere.
    let output = reproduce(&settings, None, RecordFrom::File(record), &serde_json::to_vec(job).expect("JSON"));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no model file with sha256") && stderr.contains("models.archive"), "{stderr}");

    // The record looked up in the stream by the job's id.
    let output = reproduce(&settings, Some(&archive), RecordFrom::Stream(id), &serde_json::to_vec(job).expect("JSON"));
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{}", text(&output.stderr));
    assert!(stdout.contains("verdict:  reproduced"), "{stdout}");
    let output = reproduce(&settings, Some(&archive), RecordFrom::Stream("no-such-job"), b"{}");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no record of job \"no-such-job\""), "{stderr}");

    // Back in the repository, the file is found there first.
    common::add_to_repository(&settings.models.repository, "linear", "linear", 1);
    let output =
        reproduce(&settings, Some(&archive), RecordFrom::File(record), &serde_json::to_vec(job).expect("JSON"));
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{}", text(&output.stderr));
    assert!(stdout.contains("(in the repository, version 1)"), "{stdout}");

    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let _ = channel.queue_delete(settings.audit.stream.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = std::fs::remove_dir_all(&settings.models.repository);
    let _ = std::fs::remove_dir_all(&archive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_archive_cannot_be_written_does_not_start() {
    let folder = scratch("unusable-archive");
    let file = folder.join("a-file");
    std::fs::write(&file, b"").expect("file");
    let mut settings = common::settings("reproduce-unusable", &common::fixtures_repository());
    // A folder cannot be made under a file.
    settings.models.archive = Some(file.join("archive"));
    let error = Worker::start(settings).await.err().expect("the worker refuses to start");
    let message = error.to_string();
    assert!(message.contains("models.archive") && message.contains(&file.display().to_string()), "{message}");
    let _ = std::fs::remove_dir_all(&folder);
}

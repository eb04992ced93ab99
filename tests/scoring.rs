//! Scores through the broker equal onnxruntime's for the same rows (expected outputs from
//! scripts/build_models.py), however the rows are batched, split or named.

mod common;

use common::{assert_close, expected, expected_slice, fixtures_repository, get, root, sample, Client, TestWorker};
use serde_json::{json, Value};
use sha2::Digest;

async fn score_fixture(test: &str, repository: std::path::PathBuf, model: &str, version: &str) {
    let worker = TestWorker::start(common::settings(test, &repository)).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected(&format!("{model}_v{version}"));
    client.send(&json!({"job_id": test, "model": model, "model_version": version, "rows": fixture["rows"]})).await;
    let result = client.result().await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["job_id"], test);
    assert_eq!(result["model"], model);
    assert_eq!(result["model_version"], version);
    let file = std::fs::read(repository.join(model).join(version).join("model.onnx")).expect("model file");
    assert_eq!(
        result["model_sha256"],
        format!("{:x}", sha2::Sha256::digest(&file)),
        "the digest of the file that scored"
    );
    assert_eq!(result["rows"], fixture["rows"].as_array().map(Vec::len).unwrap_or(0));
    assert_close(&result["outputs"], &fixture["outputs"], "outputs");
    assert_eq!(worker.stop().await, 0, "every job acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear_model_scores_match_onnxruntime() {
    score_fixture("linear", fixtures_repository(), "linear", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlp_scores_match_onnxruntime() {
    score_fixture("mlp", fixtures_repository(), "mlp", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_ensemble_zipmap_scores_match_onnxruntime() {
    score_fixture("trees", fixtures_repository(), "trees", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_model_scores_match_onnxruntime() {
    score_fixture("demo", root().join("models"), "credit_default", "1").await;
}

/// INT8 in QDQ format: QuantizeLinear/DequantizeLinear around float MatMuls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_qdq_model_scores_match_onnxruntime() {
    score_fixture("int8-qdq", fixtures_repository(), "mlp_int8_qdq", "1").await;
}

/// INT8 in QOperator format: QLinearMatMul, QLinearAdd, QLinearSigmoid, QLinearConcat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_qoperator_model_scores_match_onnxruntime() {
    score_fixture("int8-qoperator", fixtures_repository(), "mlp_int8_qoperator", "1").await;
}

/// float16 weights and activations behind a float32 input and float32 outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp16_model_scores_match_onnxruntime() {
    score_fixture("fp16", fixtures_repository(), "mlp_fp16", "1").await;
}

/// The multi-layer perceptron (256, 256) the benchmarks measure ONNX Runtime's spin policy on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn larger_mlp_demo_model_scores_match_onnxruntime() {
    score_fixture("demo-mlp", root().join("models"), "credit_default_mlp", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_demo_model_scores_match_onnxruntime() {
    score_fixture("demo-int8", root().join("models"), "credit_default_int8", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_version_serves_unless_pinned() {
    let worker = TestWorker::start(common::settings("versions", &fixtures_repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let (v1, v2) = (expected("linear_v1"), expected("linear_v2"));
    client.send(&json!({"job_id": "latest", "model": "linear", "rows": v2["rows"]})).await;
    let latest = client.result().await;
    assert_eq!(latest["model_version"], "2");
    assert_close(&latest["outputs"], &v2["outputs"], "latest");
    client.send(&json!({"job_id": "pinned", "model": "linear", "model_version": 1, "rows": v1["rows"]})).await;
    let pinned = client.result().await;
    assert_eq!(pinned["model_version"], "1");
    assert_close(&pinned["outputs"], &v1["outputs"], "pinned");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_records_score_like_positional_rows() {
    let worker = TestWorker::start(common::settings("records", &fixtures_repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("mlp_v1");
    let names: Vec<&str> = fixture["feature_names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    // Reversed key order: records are matched by name, not position.
    let records: Vec<Value> = fixture["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let pairs = names.iter().zip(row.as_array().unwrap()).rev();
            Value::Object(pairs.map(|(n, v)| (n.to_string(), v.clone())).collect())
        })
        .collect();
    client.send(&json!({"job_id": "named", "model": "mlp", "records": records})).await;
    let result = client.result().await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_close(&result["outputs"], &fixture["outputs"], "outputs");
    worker.stop().await;
}

/// 120 jobs of 1 to 9 rows sent at once, batches of at most 16 rows: jobs share batches and
/// are split across them, and every job still gets exactly its rows, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_keep_their_rows_and_order() {
    let mut settings = common::settings("concurrent", &fixtures_repository());
    settings.batching.max_batch_rows = 16;
    let worker = TestWorker::start(settings).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("trees_v1");
    let rows = fixture["rows"].as_array().unwrap();
    let mut sent = Vec::new();
    for job in 0..120usize {
        let count = 1 + job % 9;
        let start = (job * 7) % (rows.len() - count);
        let id = format!("job-{job}");
        client.send(&json!({"job_id": id, "model": "trees", "rows": rows[start..start + count]})).await;
        sent.push((id, start..start + count));
    }
    let results = client.results(sent.len()).await;
    let mut seen = std::collections::HashSet::new();
    for (result, _) in &results {
        let id = result["job_id"].as_str().unwrap();
        assert!(seen.insert(id.to_string()), "one result per job: {id} twice");
        let (_, range) = sent.iter().find(|(sent_id, _)| sent_id == id).expect("result for a sent job");
        assert_eq!(result["status"], "ok", "{result}");
        assert_close(&result["outputs"], &expected_slice(&fixture["outputs"], range.clone()), id);
    }
    assert_eq!(worker.stop().await, 0);
}

/// 64 rows in batches of at most 10: six full runs and a last one of 4, each carrying a part of
/// the one job, whose result still has every row in order. The model is served under a name of its
/// own, so the batch metrics read here count this test's runs only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_larger_than_a_batch_is_split_and_reassembled_in_order() {
    let repository = common::private_repository("split", "linear", 1);
    let mut settings = common::settings("split", &repository);
    settings.batching.max_batch_rows = 10;
    let worker = TestWorker::start(settings).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("linear_v1");
    client.send(&json!({"job_id": "big", "model": "split", "model_version": "1", "rows": fixture["rows"]})).await;
    let result = client.result().await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["rows"], 64);
    assert_close(&result["outputs"], &fixture["outputs"], "outputs");

    // Every run is recorded before its rows reach the result stage, so all are counted by now.
    let (_, scrape) = get(worker.metrics, "/metrics").expect("scrape");
    let split = [("model", "split"), ("version", "1")];
    let runs = sample(&scrape, "batchscore_batch_rows_count", &split);
    assert_eq!(runs, 7.0, "64 rows in runs of at most 10\n{scrape}");
    assert_eq!(sample(&scrape, "batchscore_batches_total", &split), 7.0);
    assert_eq!(sample(&scrape, "batchscore_batch_rows_sum", &split), 64.0, "every row scored once");
    assert_eq!(
        sample(&scrape, "batchscore_batch_rows_bucket", &[("model", "split"), ("le", "8")]),
        1.0,
        "one short run"
    );
    assert_eq!(sample(&scrape, "batchscore_batch_rows_bucket", &[("model", "split"), ("le", "16")]), 7.0);
    assert_eq!(sample(&scrape, "batchscore_batch_jobs_sum", &split), 7.0, "each run carries a part of the job");
    assert_eq!(sample(&scrape, "batchscore_batch_wait_seconds_count", &[("model", "split")]), 1.0, "one job");
    assert_eq!(worker.stop().await, 0);
    let _ = std::fs::remove_dir_all(&repository);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_id_is_echoed_and_message_id_names_the_job() {
    let worker = TestWorker::start(common::settings("correlation", &fixtures_repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("linear_v1");
    let body = json!({"model": "linear", "rows": [fixture["rows"][0]]});
    let properties = lapin::BasicProperties::default()
        .with_message_id("from-message-id".into())
        .with_correlation_id("corr-42".into());
    client.send_raw(&serde_json::to_vec(&body).unwrap(), properties).await;
    let (result, correlation) = client.results(1).await.remove(0);
    assert_eq!(result["job_id"], "from-message-id");
    assert_eq!(correlation.as_deref(), Some("corr-42"));
    worker.stop().await;
}

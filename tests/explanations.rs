//! Explanations through the broker: each method's contributions against exact Shapley values
//! computed by brute force with onnxruntime (`scripts/build_explain_fixtures.py`), reasons and
//! their codes, the protocol form, and jobs that cannot be explained.

mod common;

use std::path::PathBuf;

use common::{root, Client, TestWorker};
use serde_json::{json, Value};

/// Linear and tree contributions are exact: only float32 scoring separates them from brute force.
const EXACT: f64 = 1e-3;

/// The sampling method's largest error against exact values at `samples: 64`, on the fixture
/// rows (up to 12 features differing from the baseline) it is 7.4e-4; docs/EXPLANATIONS.md reports it.
const SAMPLING_BOUND: f64 = 2e-3;

fn repository() -> PathBuf {
    root().join("tests/fixtures/explain/models")
}

fn expected(model: &str) -> Value {
    let path = root().join(format!("tests/fixtures/explain/expected/{model}.json"));
    serde_json::from_slice(&std::fs::read(path).expect("expected explanations")).expect("JSON")
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("{value} is not a number"))
}

/// The fixture rows a job can carry (rows with missing values cannot be sent), with their index.
fn sendable_rows(fixture: &Value) -> Vec<(usize, Value)> {
    let rows = fixture["rows"].as_array().expect("rows");
    rows.iter()
        .enumerate()
        .filter(|(_, row)| row.as_array().is_some_and(|r| r.iter().all(Value::is_number)))
        .map(|(i, r)| (i, r.clone()))
        .collect()
}

/// Sends the fixture rows of `model` with `explain: true` and checks every explanation against
/// the brute-force values within `tolerance`; returns the largest difference seen.
async fn check_model(client: &mut Client, model: &str, tolerance: f64) -> f64 {
    let fixture = expected(model);
    let rows = sendable_rows(&fixture);
    let job_rows: Vec<Value> = rows.iter().map(|(_, r)| r.clone()).collect();
    client.send(&json!({"job_id": model, "model": model, "rows": job_rows, "explain": true})).await;
    let result = client.result().await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["rows"], rows.len(), "the result answers the job's own rows");
    let explanations = result["explanations"].as_array().expect("explanations");
    assert_eq!(explanations.len(), rows.len(), "one explanation per row");
    let base_value = number(&fixture["base_value"]);
    let mut largest: f64 = 0.0;
    for (explanation, (i, _)) in explanations.iter().zip(&rows) {
        let value = number(&explanation["value"]);
        assert!((value - number(&fixture["value"][*i])).abs() < EXACT, "{model} row {i}: value {value}");
        assert!((number(&explanation["base_value"]) - base_value).abs() < EXACT, "{model}: base value");
        let contributions = explanation["contributions"].as_array().expect("contributions");
        for (j, phi) in contributions.iter().enumerate() {
            let error = (number(phi) - number(&fixture["contributions"][*i][j])).abs();
            largest = largest.max(error);
            assert!(error < tolerance, "{model} row {i} feature {j}: off by {error}");
        }
        let sum: f64 = contributions.iter().map(number).sum();
        let gap = sum - (value - number(&explanation["base_value"]));
        assert!(gap.abs() < EXACT, "{model} row {i}: local accuracy off by {gap}");
    }
    largest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_matches_brute_force_shapley_values() {
    let worker = TestWorker::start(common::settings("explain", &repository())).await;
    let mut client = Client::new(&worker.settings).await;
    for model in ["linear", "linear_standard", "gbt_sklearn", "gbt_lightgbm"] {
        let largest = check_model(&mut client, model, EXACT).await;
        println!("{model}: largest difference from brute force {largest:.2e}");
    }
    let largest = check_model(&mut client, "mlp", SAMPLING_BOUND).await;
    println!("mlp (sampling, 64 permutations): largest difference from brute force {largest:.2e}");
    assert_eq!(worker.stop().await, 0, "every job acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasons_are_the_top_positive_contributions_with_their_codes() {
    let worker = TestWorker::start(common::settings("reasons", &repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("gbt_lightgbm");
    let rows: Vec<Value> = sendable_rows(&fixture).into_iter().map(|(_, r)| r).collect();
    client.send(&json!({"job_id": "top2", "model": "gbt_lightgbm", "rows": rows, "explain": {"top_k": 2}})).await;
    let result = client.result().await;
    let names: Vec<&str> =
        fixture["feature_names"].as_array().expect("names").iter().filter_map(Value::as_str).collect();
    let codes = reason_codes(&root().join("tests/fixtures/explain/models/gbt_lightgbm/config.yaml"));
    for (r, explanation) in result["explanations"].as_array().expect("explanations").iter().enumerate() {
        let contributions: Vec<f64> =
            explanation["contributions"].as_array().expect("contributions").iter().map(number).collect();
        let positive = principal_reasons(&contributions, 0.0, &names, &codes, 2);
        let reasons = explanation["reasons"].as_array().expect("reasons");
        assert_eq!(reasons.len(), positive.len(), "row {r}: top_k 2, fewer when fewer are positive");
        for (reason, &feature) in reasons.iter().zip(&positive) {
            assert_eq!(reason["feature"], names[feature], "row {r}");
            assert_eq!(number(&reason["value"]), number(&rows[r][feature]), "row {r}: the row's value");
            assert_eq!(number(&reason["contribution"]), contributions[feature], "row {r}");
        }
    }
    // A reason with a code in config.yaml carries it: duration_months is R07.
    let mut long_loan = rows[0].clone();
    let duration = names.iter().position(|n| *n == "duration_months").expect("duration_months");
    long_loan[duration] = json!(72.0);
    client.send(&json!({"job_id": "long", "model": "gbt_lightgbm", "rows": [long_loan], "explain": true})).await;
    let result = client.result().await;
    let reasons = result["explanations"][0]["reasons"].as_array().expect("reasons").clone();
    let reason = reasons.iter().find(|r| r["feature"] == "duration_months").unwrap_or_else(|| panic!("{reasons:?}"));
    assert_eq!(reason["code"], "R07");
    assert_eq!(reason["text"], "Length of the requested loan");
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_requests_get_contributions_and_reasons_tensors() {
    let worker = TestWorker::start(common::settings("explain-oip", &repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("linear");
    let rows: Vec<Value> = sendable_rows(&fixture).into_iter().take(3).map(|(_, r)| r).collect();
    let data: Vec<Value> = rows.iter().flat_map(|r| r.as_array().expect("row").clone()).collect();
    client
        .send(&json!({"id": "oip", "model_name": "linear", "parameters": {"explain": true},
            "inputs": [{"name": "input", "shape": [3, 62], "datatype": "FP32", "data": data}]}))
        .await;
    let result = client.result().await;
    let outputs = result["outputs"].as_array().expect("outputs");
    let tensor =
        |name: &str| outputs.iter().find(|o| o["name"] == name).unwrap_or_else(|| panic!("no {name}: {result}"));
    let contributions = tensor("contributions");
    assert_eq!(contributions["datatype"], "FP32");
    assert_eq!(contributions["shape"], json!([3, 62]));
    for (i, phi) in contributions["data"].as_array().expect("data").iter().enumerate() {
        let want = number(&fixture["contributions"][i / 62][i % 62]);
        assert!((number(phi) - want).abs() < EXACT, "element {i}");
    }
    let reasons = tensor("reasons");
    assert_eq!((reasons["datatype"].as_str(), &reasons["shape"]), (Some("BYTES"), &json!([3])));
    for text in reasons["data"].as_array().expect("data") {
        let parsed: Value = serde_json::from_str(text.as_str().expect("a JSON text")).expect("reasons are JSON");
        assert!(parsed.as_array().is_some_and(|r| r.len() <= 4), "{parsed}");
    }
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_cannot_be_explained_get_a_clear_error_and_are_dead_lettered() {
    // The main fixtures have no explain settings.
    let settings = common::settings("no-explain", &common::fixtures_repository());
    let worker = TestWorker::start(settings).await;
    let mut client = Client::new(&worker.settings).await;
    let row = common::expected("linear_v1")["rows"][0].clone();
    client.send(&json!({"job_id": "no-explain", "model": "linear", "rows": [row], "explain": true})).await;
    let result = client.result().await;
    assert_eq!(result["error"]["code"], "invalid_input", "{result}");
    let message = result["error"]["message"].as_str().expect("message");
    assert!(message.contains("explain") && message.contains("config.yaml"), "{message}");
    client.send(&json!({"job_id": "bad-top-k", "model": "linear", "rows": [row], "explain": {"top_k": 0}})).await;
    let result = client.result().await;
    assert_eq!(result["error"]["code"], "invalid_input", "{result}");
    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!((left, dead_letters.len()), (0, 2), "both jobs answered and dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_that_would_score_too_many_rows_is_refused_naming_the_limits() {
    let mut settings = common::settings("explain-limit", &repository());
    settings.limits.max_rows_per_job = 1_000;
    let worker = TestWorker::start(settings).await;
    let mut client = Client::new(&worker.settings).await;
    // A row far from the baseline in every feature: 64 walks of 61 points each.
    let row: Vec<f64> = (0..62).map(|i| 100.0 + i as f64).collect();
    client.send(&json!({"job_id": "many", "model": "mlp", "rows": [row], "explain": true})).await;
    let result = client.result().await;
    assert_eq!(result["error"]["code"], "too_large", "{result}");
    let message = result["error"]["message"].as_str().expect("message");
    assert!(message.contains("explain.samples") && message.contains("limits.max_rows_per_job"), "{message}");
    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!((left, dead_letters.len()), (0, 1));
}

/// `batchscore submit --explain`: CSV output gains reason columns (code, or feature without one),
/// JSONL output each row's explanation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_with_explain_writes_reasons() {
    let worker = TestWorker::start(common::settings("submit-explain", &repository())).await;
    let fixture = expected("linear");
    let names: Vec<&str> =
        fixture["feature_names"].as_array().expect("names").iter().filter_map(Value::as_str).collect();
    let rows = sendable_rows(&fixture);
    let dir = std::env::temp_dir().join(format!("batchscore-submit-explain-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input = dir.join("rows.csv");
    let lines = rows
        .iter()
        .map(|(_, row)| row.as_array().expect("row").iter().map(Value::to_string).collect::<Vec<_>>().join(","));
    let text = std::iter::once(names.join(",")).chain(lines).collect::<Vec<_>>().join("\n");
    std::fs::write(&input, text).expect("input written");
    let config = root().join("tests/fixtures/explain/models/linear/config.yaml");
    let codes = reason_codes(&config);
    for output in ["scores.csv", "scores.jsonl"] {
        let output = dir.join(output);
        let mut submit = std::process::Command::new(env!("CARGO_BIN_EXE_batchscore"));
        submit
            .args(["submit", "--model", "linear", "--explain", "--timeout-s", "120", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .current_dir(root())
            .env_remove("RUST_LOG")
            .env("BATCHSCORE__AMQP__JOBS_QUEUE", &worker.settings.amqp.jobs_queue);
        let ran = tokio::task::spawn_blocking(move || common::run_bounded(submit, std::time::Duration::from_secs(180)))
            .await
            .expect("the submit thread does not panic")
            .unwrap_or_else(|e| panic!("batchscore submit: {e}"));
        assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
        let written = std::fs::read_to_string(&output).expect("output written");
        for (line, (i, _)) in
            written.lines().skip(usize::from(output.extension().is_some_and(|e| e == "csv"))).zip(&rows)
        {
            let contributions: Vec<f64> =
                fixture["contributions"][*i].as_array().expect("contributions").iter().map(number).collect();
            let top = principal_reasons(&contributions, 1e-6, &names, &codes, 4);
            let wanted: Vec<String> =
                top.iter().map(|&j| codes.get(names[j]).cloned().unwrap_or(names[j].to_string())).collect();
            if output.extension().is_some_and(|e| e == "csv") {
                let cells: Vec<&str> = line.split(',').collect();
                let reasons: Vec<&str> = cells[cells.len() - 4..].iter().copied().filter(|c| !c.is_empty()).collect();
                assert_eq!(reasons, wanted, "row {i}: {line}");
            } else {
                let parsed: Value = serde_json::from_str(line).expect("JSON line");
                let features: Vec<&str> = parsed["explanation"]["reasons"]
                    .as_array()
                    .expect("reasons")
                    .iter()
                    .filter_map(|r| r["feature"].as_str())
                    .collect();
                let wanted_features: Vec<&str> = top.iter().map(|&j| names[j]).collect();
                assert_eq!(features, wanted_features, "row {i}: {line}");
            }
        }
        if output.extension().is_some_and(|e| e == "csv") {
            let header = written.lines().next().expect("header");
            assert!(header.ends_with("reason_1,reason_2,reason_3,reason_4"), "{header}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(worker.stop().await, 0);
}

/// The features a row's reasons should name: those contributing more than `above`, largest
/// first, skipping any whose reason code an earlier one already gave, at most `k`.
fn principal_reasons(
    contributions: &[f64],
    above: f64,
    names: &[&str],
    codes: &std::collections::HashMap<String, String>,
    k: usize,
) -> Vec<usize> {
    let mut ranked: Vec<usize> = (0..contributions.len()).filter(|&i| contributions[i] > above).collect();
    ranked.sort_by(|&a, &b| contributions[b].total_cmp(&contributions[a]));
    let mut given = std::collections::HashSet::new();
    ranked.retain(|&i| codes.get(names[i]).is_none_or(|code| given.insert(code.clone())));
    ranked.truncate(k);
    ranked
}

/// Feature → reason code, from a config.yaml's `explain.reasons`.
fn reason_codes(config: &std::path::Path) -> std::collections::HashMap<String, String> {
    let reasons: std::collections::HashMap<String, std::collections::HashMap<String, String>> =
        config::Config::builder()
            .add_source(config::File::from(config))
            .build()
            .and_then(|c| c.get("explain.reasons"))
            .expect("explain.reasons in config.yaml");
    reasons.into_iter().filter_map(|(feature, reason)| Some((feature, reason.get("code")?.clone()))).collect()
}

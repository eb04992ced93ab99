//! Open Inference Protocol (KServe V2) jobs through the broker: their scores equal onnxruntime's,
//! inputs sent per feature score like positional rows, the `x-model` header names the model, and
//! bad requests are answered in the protocol's error form. Every result is checked against the
//! result schema by the client, every good request against the job schema here.

mod common;

use common::{assert_close, expected, expected_slice, fixtures_repository, root, Client, TestWorker};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::{json, Value};
use sha2::Digest;

fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into())
}

fn with_model_header(model: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    // As most clients send string headers: a long string.
    headers.insert("x-model".into(), AMQPValue::LongString(model.into()));
    json_properties().with_headers(headers)
}

/// Fails unless `job` follows schemas/job.schema.json.
fn assert_valid_job(job: &Value) {
    let text = std::fs::read(root().join("schemas/job.schema.json")).expect("job schema exists");
    let schema =
        jsonschema::validator_for(&serde_json::from_slice(&text).expect("schema is JSON")).expect("schema compiles");
    if let Err(error) = schema.validate(job) {
        panic!("request does not match schemas/job.schema.json: {error}");
    }
}

fn tensor(name: &str, shape: Value, datatype: &str, data: Value) -> Value {
    json!({"name": name, "shape": shape, "datatype": datatype, "data": data})
}

/// Positional rows as one FP32 tensor `[rows, features]` with flat data.
fn matrix_input(rows: &Value) -> Value {
    let rows = rows.as_array().expect("rows");
    let width = rows[0].as_array().expect("row").len();
    let flat: Vec<Value> = rows.iter().flat_map(|row| row.as_array().expect("row").clone()).collect();
    tensor("input", json!([rows.len(), width]), "FP32", Value::Array(flat))
}

/// Response tensors turned back into the native `{"name": [one entry per row]}` form of the
/// expected outputs; JSON texts (class-score maps) are parsed.
fn per_row(outputs: &Value) -> Value {
    let mut by_name = serde_json::Map::new();
    for tensor in outputs.as_array().expect("outputs is an array of tensors") {
        let shape: Vec<usize> =
            tensor["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
        let data = tensor["data"].as_array().expect("data");
        let row_len: usize = shape[1..].iter().product();
        assert_eq!(data.len(), shape[0] * row_len, "{}: data length", tensor["name"]);
        let rows = data
            .chunks(row_len.max(1))
            .map(|row| match (&shape[1..], row) {
                ([], [Value::String(text)]) if tensor["datatype"] == "BYTES" => {
                    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
                }
                ([], [value]) => value.clone(),
                ([_], values) => Value::Array(values.to_vec()),
                (shape, _) => panic!("no fixture output has row shape {shape:?}"),
            })
            .collect();
        by_name.insert(tensor["name"].as_str().expect("name").to_string(), Value::Array(rows));
    }
    Value::Object(by_name)
}

fn datatypes(outputs: &Value) -> Vec<(String, String, Value)> {
    let tensors = outputs.as_array().expect("outputs");
    tensors.iter().map(|t| (t["name"].to_string(), t["datatype"].to_string(), t["shape"].clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_request_scores_match_onnxruntime() {
    let worker = TestWorker::start(common::settings("oip_linear", &fixtures_repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("linear_v1");
    let request = json!({
        "id": "oip-linear",
        "model_name": "linear",
        "model_version": "1",
        "parameters": {"content_type": "np"},
        "inputs": [matrix_input(&fixture["rows"])],
    });
    assert_valid_job(&request);
    client.send(&request).await;
    let response = client.result().await;
    assert_eq!(response["id"], "oip-linear", "{response}");
    assert_eq!(response["model_name"], "linear");
    assert_eq!(response["model_version"], "1");
    assert!(response.get("status").is_none(), "no native members in a protocol response: {response}");
    let file = std::fs::read(fixtures_repository().join("linear/1/model.onnx")).expect("model file");
    assert_eq!(response["parameters"]["model_sha256"], format!("{:x}", sha2::Sha256::digest(&file)));
    assert_eq!(response["parameters"]["status"], "ok");
    assert_eq!(
        datatypes(&response["outputs"]),
        [
            ("\"label\"".to_string(), "\"INT64\"".to_string(), json!([64])),
            ("\"probabilities\"".to_string(), "\"FP32\"".to_string(), json!([64, 2])),
        ]
    );
    assert_close(&per_row(&response["outputs"]), &fixture["outputs"], "outputs");
    assert_eq!(worker.stop().await, 0, "every job acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_score_maps_are_answered_as_json_texts() {
    let worker = TestWorker::start(common::settings("oip_trees", &fixtures_repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("trees_v1");
    let rows = fixture["rows"].as_array().unwrap();
    // Nested data and FP64, as numpy-based clients often send them.
    let request = json!({
        "id": "oip-trees",
        "model_name": "trees",
        "inputs": [{
            "name": "input",
            "shape": [rows.len(), rows[0].as_array().unwrap().len()],
            "datatype": "FP64",
            "data": rows,
        }],
    });
    assert_valid_job(&request);
    client.send(&request).await;
    let response = client.result().await;
    assert_eq!(response["model_version"], "1", "{response}");
    assert_eq!(
        datatypes(&response["outputs"]),
        [
            ("\"output_label\"".to_string(), "\"INT64\"".to_string(), json!([64])),
            ("\"output_probability\"".to_string(), "\"BYTES\"".to_string(), json!([64])),
        ]
    );
    assert_close(&per_row(&response["outputs"]), &fixture["outputs"], "outputs");
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_feature_inputs_score_like_positional_rows() {
    let worker = TestWorker::start(common::settings("oip_features", &root().join("models"))).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("credit_default_v1");
    let rows = fixture["rows"].as_array().unwrap();
    let names = fixture["feature_names"].as_array().unwrap();
    // Reversed, and alternating [rows] and [rows, 1]: inputs are matched by name, not position.
    let inputs: Vec<Value> = names
        .iter()
        .enumerate()
        .rev()
        .map(|(column, name)| {
            let values: Vec<Value> = rows.iter().map(|row| row[column].clone()).collect();
            let shape = if column % 2 == 0 { json!([rows.len()]) } else { json!([rows.len(), 1]) };
            json!({"name": name, "shape": shape, "datatype": "FP32", "data": values})
        })
        .collect();
    let request = json!({"id": "per-feature", "model_name": "credit_default", "inputs": inputs});
    assert_valid_job(&request);
    client.send(&request).await;
    let by_feature = client.result().await;
    client.send(&json!({"job_id": "positional", "model": "credit_default", "rows": rows})).await;
    let positional = client.result().await;
    assert_eq!(positional["status"], "ok", "{positional}");
    assert_eq!(by_feature["id"], "per-feature", "{by_feature}");
    assert_close(&per_row(&by_feature["outputs"]), &positional["outputs"], "per-feature vs positional");
    assert_close(&per_row(&by_feature["outputs"]), &fixture["outputs"], "outputs");
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_header_and_message_properties_identify_the_job() {
    let worker = TestWorker::start(common::settings("oip_header", &fixtures_repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("linear_v2");
    let rows = json!(fixture["rows"].as_array().unwrap()[..3]);
    // No id and no model_name: the message id and the x-model header stand in.
    let request = json!({"inputs": [matrix_input(&rows)]});
    assert_valid_job(&request);
    let properties =
        with_model_header("linear").with_message_id("from-message-id".into()).with_correlation_id("corr-7".into());
    client.send_raw(&serde_json::to_vec(&request).unwrap(), properties).await;
    let (response, correlation) = client.results(1).await.remove(0);
    assert_eq!(correlation.as_deref(), Some("corr-7"));
    assert_eq!(response["id"], "from-message-id", "{response}");
    assert_eq!((&response["model_name"], &response["model_version"]), (&json!("linear"), &json!("2")), "latest");
    assert_close(&per_row(&response["outputs"]), &expected_slice(&fixture["outputs"], 0..3), "outputs");
    assert_eq!(worker.stop().await, 0);
}

/// A bad request and what its error response must say.
struct Bad {
    body: Vec<u8>,
    properties: BasicProperties,
    id: &'static str,
    code: &'static str,
    needle: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_answered_in_the_protocol_error_form() {
    let worker = TestWorker::start(common::settings("oip_errors", &fixtures_repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let row = expected("linear_v1")["rows"][0].clone();
    let features: Vec<String> = expected("linear_v1")["feature_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let request = |id: &str, model: &str, inputs: Value| {
        serde_json::to_vec(&json!({"id": id, "model_name": model, "inputs": inputs})).unwrap()
    };
    let one_feature = |name: &str| tensor(name, json!([1]), "FP32", json!([0.5]));
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut late = FieldTable::default();
    late.insert("x-deadline".into(), AMQPValue::LongLongInt(now_ms - 1_000));
    let bad = vec![
        Bad {
            body: request("unknown", "fraud", json!([matrix_input(&json!([row]))])),
            properties: json_properties(),
            id: "unknown",
            code: "unknown_model",
            needle: r#"model "fraud" is not in the repository"#.into(),
        },
        Bad {
            body: request("width", "linear", json!([tensor("input", json!([1, 2]), "FP32", json!([1, 2]))])),
            properties: json_properties(),
            id: "width",
            code: "invalid_input",
            needle: r#"input "input" has shape [1, 2]; model linear takes one input of shape [rows, 62]"#.into(),
        },
        Bad {
            body: request("stranger", "linear", json!([one_feature(&features[0]), one_feature("nope")])),
            properties: json_properties(),
            id: "stranger",
            code: "invalid_input",
            needle: r#"input "nope" is not a feature of model linear"#.into(),
        },
        Bad {
            body: request("missing", "linear", json!(features[1..].iter().map(|f| one_feature(f)).collect::<Vec<_>>())),
            properties: json_properties(),
            id: "missing",
            code: "invalid_input",
            needle: format!("model linear needs one input per feature; {:?} is missing", features[0]),
        },
        Bad {
            body: request("bytes", "linear", json!([tensor("input", json!([1]), "BYTES", json!(["a"]))])),
            properties: json_properties(),
            id: "bytes",
            code: "invalid_input",
            needle: "batchscore accepts FP32, FP64, INT32 or INT64".into(),
        },
        Bad {
            body: request("short", "linear", json!([tensor("input", json!([2, 62]), "FP32", row.clone())])),
            properties: json_properties(),
            id: "short",
            code: "invalid_input",
            needle: "has shape [2, 62], which holds 124 values, but data has 62".into(),
        },
        Bad {
            body: serde_json::to_vec(&json!({"id": "nameless", "inputs": [matrix_input(&json!([row]))]})).unwrap(),
            properties: json_properties(),
            id: "nameless",
            code: "invalid_input",
            needle: "no model_name and the message has no x-model header".into(),
        },
        Bad {
            body: serde_json::to_vec(&json!({
                "id": "v9",
                "model_name": "linear",
                "model_version": "9",
                "inputs": [matrix_input(&json!([row]))],
            }))
            .unwrap(),
            properties: json_properties(),
            id: "v9",
            code: "unknown_model",
            needle: "has no version 9 (available: 1, 2)".into(),
        },
        Bad {
            body: b"{\"inputs\": [".to_vec(),
            properties: with_model_header("linear").with_message_id("cut".into()),
            id: "cut",
            code: "invalid_json",
            needle: "EOF".into(),
        },
        Bad {
            body: request("late", "linear", json!([matrix_input(&json!([row]))])),
            properties: json_properties().with_headers(late),
            id: "late",
            code: "expired",
            needle: "deadline".into(),
        },
    ];
    for case in &bad {
        client.send_raw(&case.body, case.properties.clone()).await;
    }
    for (response, _) in client.results(bad.len()).await {
        let Bad { id, code, needle, .. } = bad
            .iter()
            .find(|case| response["id"].as_str() == Some(case.id))
            .unwrap_or_else(|| panic!("unexpected response {response}"));
        assert!(response.get("status").is_none() && response.get("outputs").is_none(), "{response}");
        assert_eq!(response["parameters"]["status"], "error", "{response}");
        assert_eq!(response["parameters"]["code"], *code, "{id:?}: {response}");
        let message = response["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle.as_str()), "{id:?}: {message:?} should contain {needle:?}");
    }
    // A native job in the same stream is still answered in the native form.
    client.send(&json!({"job_id": "native", "model": "fraud", "rows": [row]})).await;
    let native = client.result().await;
    assert_eq!((&native["status"], &native["error"]["code"]), (&json!("error"), &json!("unknown_model")));
    client.send_raw(&request("good", "linear", json!([matrix_input(&json!([row]))])), json_properties()).await;
    assert_eq!(client.result().await["parameters"]["status"], "ok");
    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!(left, 0, "every job acknowledged");
    // Expired jobs are not dead-lettered; the native bad job is.
    let failed = bad.iter().filter(|case| case.code != "expired").count() + 1;
    assert_eq!(dead_letters.len(), failed, "every failed job dead-lettered");
}

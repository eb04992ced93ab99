//! The shipped examples and sample jobs follow the published JSON Schemas.

mod common;

use std::path::Path;

fn validator(schema: &str) -> jsonschema::Validator {
    let text = std::fs::read(common::root().join("schemas").join(schema)).expect("schema exists");
    jsonschema::validator_for(&serde_json::from_slice(&text).expect("schema is JSON")).expect("schema compiles")
}

fn check(validator: &jsonschema::Validator, path: &Path) {
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).expect("readable")).expect("JSON");
    if let Err(error) = validator.validate(&value) {
        panic!("{} does not match its schema: {error}", path.display());
    }
}

#[test]
fn examples_and_samples_match_the_schemas() {
    let (jobs, results) = (validator("job.schema.json"), validator("result.schema.json"));
    let records = validator("audit-record.schema.json");
    let mut checked = 0;
    for entry in std::fs::read_dir(common::root().join("schemas/examples")).expect("examples exist") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        match name.split('-').next() {
            Some("job") => check(&jobs, &path),
            Some("result") => check(&results, &path),
            Some("audit") => check(&records, &path),
            _ => panic!("{name}: examples are named job-*, result-* or audit-record-*"),
        }
        checked += 1;
    }
    for sample in ["job_rows.json", "job_records.json"] {
        check(&jobs, &common::root().join("models/credit_default/samples").join(sample));
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} files checked");
}

#[test]
fn schemas_reject_what_the_worker_rejects() {
    let jobs = validator("job.schema.json");
    assert!(!jobs.is_valid(&serde_json::json!({"job_id": "a", "model": "m"})), "neither rows nor records");
    assert!(!jobs.is_valid(&serde_json::json!({"job_id": "a", "model": "m", "rows": []})), "empty rows");
    let tensor = serde_json::json!({"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]});
    assert!(jobs.is_valid(&serde_json::json!({"id": "a", "model_name": "m", "inputs": [tensor]})));
    assert!(!jobs.is_valid(&serde_json::json!({"id": "a", "model_name": "m", "inputs": []})), "no inputs");
    let bytes = serde_json::json!({"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]});
    assert!(!jobs.is_valid(&serde_json::json!({"id": "a", "inputs": [bytes]})), "unsupported datatype");
    let both = serde_json::json!({"job_id": "a", "model": "m", "rows": [[1]], "inputs": [tensor]});
    assert!(!jobs.is_valid(&both), "native and protocol input together");
    let explain = |explain: serde_json::Value| serde_json::json!({"model": "m", "rows": [[1]], "explain": explain});
    assert!(jobs.is_valid(&explain(serde_json::json!({"top_k": 2}))) && jobs.is_valid(&explain(true.into())));
    assert!(!jobs.is_valid(&explain(serde_json::json!({"top_k": 0}))), "no reasons asked for");
    assert!(!jobs.is_valid(&explain("yes".into())), "explain is true, false or {{top_k}}");
    let results = validator("result.schema.json");
    assert!(!results
        .is_valid(&serde_json::json!({"job_id": "a", "status": "error", "error": {"code": "nope", "message": "x"}})));
    let protocol_error = serde_json::json!({"error": "x", "parameters": {"status": "error", "code": "nope"}});
    assert!(!results.is_valid(&protocol_error), "unknown code in a protocol error response");
    let parameters = serde_json::json!({"status": "error", "code": "internal"});
    let mixed = serde_json::json!({"id": "a", "status": "error", "error": "x", "parameters": parameters});
    assert!(!results.is_valid(&mixed), "native status in a protocol error response");
}

#[test]
fn the_record_schema_rejects_records_that_break_its_rules() {
    let records = validator("audit-record.schema.json");
    let text = std::fs::read(common::root().join("schemas/examples/audit-record-ok.json")).expect("example");
    let ok: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
    assert!(records.is_valid(&ok));
    let changed = |member: &str, value: serde_json::Value| {
        let mut record = ok.clone();
        record[member] = value;
        record
    };
    assert!(!records.is_valid(&changed("prev_sha256", serde_json::Value::Null)), "only seq 0 starts a chain");
    let link = serde_json::json!({"chain_id": ok["chain_id"], "seq": 3, "sha256": ok["prev_sha256"]});
    assert!(!records.is_valid(&changed("previous_chain", link)), "only a chain's first record names the chain before");
    assert!(!records.is_valid(&changed("encrypted", true.into())), "an encrypted job's record holds digests only");
    assert!(!records.is_valid(&changed("status", "error".into())), "an error record has an error code");
    assert!(!records.is_valid(&changed("inputs_sha256", "ABC".into())), "digests are 64 hex digits");
    let mut absent = ok.clone();
    absent.as_object_mut().expect("object").remove("batch_id");
    assert!(!records.is_valid(&absent), "facts that do not apply are null, not absent");
}

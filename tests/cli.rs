//! The `batchscore` binary as a user runs it: set-up errors, `inspect`, and `submit` through a
//! worker on the real broker.

mod common;

use std::process::{Command, Output};

use common::{expected, fixtures_repository, TestWorker};

fn batchscore(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    command.args(args).current_dir(common::root()).env_remove("ORT_DYLIB_PATH");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("batchscore runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn missing_onnxruntime_library_exits_2_with_the_fix() {
    let output = batchscore(
        &["inspect", "models/credit_default/1/model.onnx"],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("ONNX Runtime library not found") && message.contains("scripts/setup.sh"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn a_library_that_is_not_onnxruntime_exits_2() {
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libc present");
    let output = batchscore(
        &["inspect", "models/credit_default/1/model.onnx"],
        &[("BATCHSCORE__ONNXRUNTIME__LIBRARY_PATH", libc)],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("OrtGetApiBase"), "{}", stderr(&output));
}

#[test]
fn invalid_setting_exits_2_naming_the_key() {
    let output = batchscore(
        &["inspect", "models/credit_default/1/model.onnx"],
        &[("BATCHSCORE__BATCHING__MAX_BATCH_ROWS", "0")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("batching.max_batch_rows"), "{}", stderr(&output));
}

#[test]
fn inspect_lists_inputs_and_outputs() {
    let output = batchscore(&["inspect", "tests/fixtures/models/trees/1/model.onnx"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    for needle in ["input", "[?, 62]", "output_label", "output_probability", "servable: yes (62 features per row)"] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[test]
fn models_lists_every_version_and_the_serving_one() {
    let repository = fixtures_repository();
    let output = batchscore(&["models"], &[("BATCHSCORE__MODELS__REPOSITORY", repository.to_str().unwrap())]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    let line = |model: &str, version: &str| {
        text.lines()
            .find(|l| l.split_whitespace().take(2).eq([model, version]))
            .unwrap_or_else(|| panic!("no line for {model} v{version} in:\n{text}"))
            .to_string()
    };
    assert!(line("linear", "1").contains(" no "), "{text}");
    assert!(line("linear", "2").contains(" yes "), "{text}");
    assert!(line("trees", "1").contains("output_probability map<i64,f32>"), "{text}");
    assert!(line("mlp", "1").contains("probabilities f32[2]"), "{text}");
}

/// 64 rows in jobs of 5 rows through a real worker: outputs come back in input order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_writes_results_in_input_order() {
    let worker = TestWorker::start(common::settings("submit", &fixtures_repository())).await;
    let fixture = expected("linear_v1");
    let dir = std::env::temp_dir().join(format!("batchscore-submit-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (input, output) = (dir.join("rows.csv"), dir.join("scores.jsonl"));
    let header =
        fixture["feature_names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect::<Vec<_>>().join(",");
    let rows = fixture["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","));
    std::fs::write(&input, std::iter::once(header).chain(rows).collect::<Vec<_>>().join("\n")).expect("input written");

    let args: Vec<String> = ["submit", "--model", "linear", "--model-version", "1", "--chunk-rows", "5", "--input"]
        .into_iter()
        .map(String::from)
        .chain([input.display().to_string(), "--output".into(), output.display().to_string()])
        .collect();
    let queue = worker.settings.amqp.jobs_queue.clone();
    let run = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        batchscore(&args, &[("BATCHSCORE__AMQP__JOBS_QUEUE", queue.as_str())])
    });
    let result = run.await.expect("submit ran");
    assert!(result.status.success(), "{}", stderr(&result));
    let summary = String::from_utf8_lossy(&result.stdout);
    assert!(summary.contains("scored 64 rows in 13 jobs"), "{summary}");

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .expect("output written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 64);
    for (i, line) in lines.iter().enumerate() {
        common::assert_close(&line["probabilities"], &fixture["outputs"]["probabilities"][i], &format!("row {i}"));
        assert_eq!(line["label"], fixture["outputs"]["label"][i], "row {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(worker.stop().await, 0);
}

//! The `batchscore` binary as a user runs it: set-up errors and their exit codes, logs written
//! to pipes, `inspect`, `models`, and `submit` through a worker on the real broker.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{expected, fixtures_repository, run_bounded, TestWorker};

/// Longest a `worker` that is expected to refuse start-up may run: loading the fixture models
/// takes a few seconds on a busy machine.
const START_UP_PATIENCE: Duration = Duration::from_secs(120);

/// Longest any other command may run, `submit` included: a hung command fails its test instead
/// of stalling the suite.
const COMMAND_PATIENCE: Duration = Duration::from_secs(180);

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    // RUST_LOG of the person running the tests would change what the commands log.
    command.args(args).current_dir(common::root()).env_remove("ORT_DYLIB_PATH").env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Runs `batchscore` to its end; one still running after `patience` is killed and fails the test.
fn batchscore_within(args: &[&str], env: &[(&str, &str)], patience: Duration) -> Output {
    run_bounded(command(args, env), patience).unwrap_or_else(|error| panic!("batchscore {}: {error}", args.join(" ")))
}

fn batchscore(args: &[&str], env: &[(&str, &str)]) -> Output {
    batchscore_within(args, env, COMMAND_PATIENCE)
}

/// Runs `batchscore worker` expecting it to refuse start-up and exit on its own. It never reaches
/// the shared broker: its AMQP URL points at a closed port and its queue names are unique.
fn worker_expected_to_exit(env: &[(&str, &str)]) -> Output {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("test.cli.{}.jobs", &unique[..8]);
    let repository = fixtures_repository();
    let mut full_env = vec![
        ("BATCHSCORE__AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ("BATCHSCORE__AMQP__JOBS_QUEUE", queue.as_str()),
        ("BATCHSCORE__MODELS__REPOSITORY", repository.to_str().expect("UTF-8 path")),
        ("BATCHSCORE__MODELS__POLL_INTERVAL_MS", "0"),
        ("BATCHSCORE__METRICS__LISTEN", "127.0.0.1:0"),
    ];
    full_env.extend_from_slice(env);
    batchscore_within(&["worker"], &full_env, START_UP_PATIENCE)
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
fn an_unusable_audit_setting_exits_2_naming_the_key_and_the_fix() {
    let output =
        worker_expected_to_exit(&[("BATCHSCORE__AUDIT__ENABLED", "true"), ("BATCHSCORE__AUDIT__MAX_AGE", "7years")]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains("audit.max_age") && text.contains("2555D"), "{text}");
}

#[test]
fn a_refused_password_exits_2_naming_user_host_and_vhost_but_not_the_password() {
    let output =
        worker_expected_to_exit(&[("BATCHSCORE__AMQP__URL", "amqp://guest:Not-The-Password@127.0.0.1:5672/%2f")]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    for needle in ["refused user \"guest\"", "127.0.0.1:5672", "vhost \"/\"", "ACCESS_REFUSED", "BATCHSCORE__AMQP__URL"]
    {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(!text.contains("Not-The-Password"), "the password leaked:\n{text}");
    assert_eq!(text.matches("refused user").count(), 1, "said once:\n{text}");
}

#[test]
fn an_unknown_vhost_exits_2_naming_it() {
    let output =
        worker_expected_to_exit(&[("BATCHSCORE__AMQP__URL", "amqp://guest:guest@127.0.0.1:5672/no-such-vhost")]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("vhost \"no-such-vhost\"") && text.contains("NOT_ALLOWED"), "{text}");
}

#[test]
fn an_unreachable_broker_is_retried_with_one_line_per_attempt() {
    let repository = fixtures_repository();
    let mut child = command(
        &["worker"],
        &[
            ("BATCHSCORE__AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
            ("BATCHSCORE__AMQP__RECONNECT_MAX_BACKOFF_MS", "200"),
            ("BATCHSCORE__MODELS__REPOSITORY", repository.to_str().expect("UTF-8 path")),
            ("BATCHSCORE__MODELS__POLL_INTERVAL_MS", "0"),
            ("BATCHSCORE__METRICS__LISTEN", "127.0.0.1:0"),
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("batchscore worker starts");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + START_UP_PATIENCE;
    let mut seen = Vec::new();
    let mut attempts = 0;
    while attempts < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            let _ = child.kill();
            panic!("fewer than 3 retry lines within {START_UP_PATIENCE:?}:\n{}", seen.join("\n"));
        };
        if line.contains("no broker session; retrying") {
            attempts += 1;
            assert!(line.contains("retry_in_ms="), "the line names the next delay: {line}");
            assert!(line.contains("Connection refused"), "the line names the cause: {line}");
        }
        seen.push(line);
    }
    let still_running = child.try_wait().expect("worker status").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still_running, "a worker keeps retrying a broker that is down");
    let text = seen.join("\n");
    assert!(!text.contains("ERROR"), "a broker that is down is retried, not an error of ours:\n{text}");
    assert!(!text.contains("lapin"), "the AMQP client's own lines stay quiet:\n{text}");
}

#[test]
fn metrics_port_in_use_exits_2_naming_the_setting_once() {
    // Held until the worker has exited: its port is the one the worker must fail to bind.
    let holder = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = holder.local_addr().expect("bound address").to_string();
    let output = worker_expected_to_exit(&[("BATCHSCORE__METRICS__LISTEN", addr.as_str())]);
    drop(holder);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert_eq!(message.matches(&format!("cannot listen on {addr}")).count(), 1, "said once:\n{message}");
    assert_eq!(message.matches("in use").count(), 1, "the cause said once:\n{message}");
    let line = message.lines().find(|l| l.contains("cannot listen on")).expect("the message line");
    assert!(line.starts_with("batchscore: "), "{line}");
    for key in ["metrics.listen", "BATCHSCORE__METRICS__LISTEN"] {
        assert!(line.contains(key), "{key} missing from: {line}");
    }
    assert!(!message.contains("panicked"), "{message}");
    // The worker logs while loading models; written to a pipe, those lines carry no colour codes.
    assert!(message.contains("model loaded"), "the worker logged its start-up:\n{message}");
    assert!(!message.contains("\x1b["), "no ANSI escape codes in piped logs:\n{message:?}");
}

/// The CPU build of ONNX Runtime has no CUDA provider: with `on_provider_unavailable: fail`
/// neither the worker nor `models` can load the repository.
#[test]
fn unavailable_cuda_exits_2_with_one_message() {
    let cuda = [
        ("BATCHSCORE__INFERENCE__EXECUTION_PROVIDER", "cuda"),
        ("BATCHSCORE__INFERENCE__ON_PROVIDER_UNAVAILABLE", "fail"),
    ];
    let output = worker_expected_to_exit(&cuda);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert_eq!(message.matches("CUDA execution provider is unavailable").count(), 1, "said once:\n{message}");
    assert!(message.contains("inference.on_provider_unavailable: cpu"), "names the alternative: {message}");

    let repository = fixtures_repository();
    let mut env = cuda.to_vec();
    env.push(("BATCHSCORE__MODELS__REPOSITORY", repository.to_str().expect("UTF-8 path")));
    let output = batchscore(&["models"], &env);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert_eq!(message.matches("CUDA execution provider is unavailable").count(), 1, "said once:\n{message}");
}

#[test]
fn client_commands_print_their_output_without_info_logs() {
    let repository = fixtures_repository();
    let env = [("BATCHSCORE__MODELS__REPOSITORY", repository.to_str().expect("UTF-8 path"))];
    for args in [&["models"][..], &["inspect", "tests/fixtures/models/trees/1/model.onnx"]] {
        let output = batchscore(args, &env);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), stderr(&output));
        assert!(!stdout.is_empty(), "{args:?} printed its output");
        // Matched without the spaces around it: with colour codes, "INFO" sits between escapes.
        for (stream, text) in [("stdout", &*stdout), ("stderr", &*stderr)] {
            assert!(!text.contains("INFO"), "{args:?} logged INFO lines to {stream}:\n{text}");
        }
        assert!(!stderr.contains("model loaded"), "{args:?} logged the repository's progress:\n{stderr}");
    }
}

#[test]
fn piped_logs_carry_no_colour_codes() {
    let repository = fixtures_repository();
    let env = [("BATCHSCORE__MODELS__REPOSITORY", repository.to_str().expect("UTF-8 path")), ("RUST_LOG", "info")];
    let output = batchscore(&["models"], &env);
    assert!(output.status.success(), "{}", stderr(&output));
    let logs = stderr(&output);
    // RUST_LOG wins over the client commands' default, so there are log lines to check.
    assert!(logs.lines().any(|l| l.contains(" INFO ") && l.contains("model loaded")), "no INFO lines:\n{logs}");
    for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        assert!(!bytes.windows(2).any(|w| w == b"\x1b["), "ANSI escape codes in {stream}: {logs:?}");
    }
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
fn inspect_of_a_file_that_is_no_model_exits_2_naming_it() {
    let output = batchscore(&["inspect", "settings.yaml"], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("cannot load settings.yaml") && message.contains("ONNX model file"), "{message}");
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

    let args: Vec<String> =
        ["submit", "--model", "linear", "--model-version", "1", "--chunk-rows", "5", "--timeout-s", "120", "--input"]
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

/// Jobs published to an exchange that routes them nowhere come back (they are published
/// mandatory): submit stops at once, naming the exchange and the routing key, instead of waiting
/// out its timeout for results that cannot come.
#[test]
fn submit_says_when_its_jobs_reach_no_queue() {
    let dir = std::env::temp_dir().join(format!("batchscore-unroutable-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (input, output) = (dir.join("rows.jsonl"), dir.join("scores.jsonl"));
    std::fs::write(&input, "[1.0, 2.0]\n").expect("input written");
    let queue = format!("test.cli.unbound.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (input, output) = (input.to_str().expect("UTF-8 path"), output.to_str().expect("UTF-8 path"));
    let args = ["submit", "--model", "linear", "--exchange", "amq.direct", "--input", input, "--output", output];
    let result = batchscore(&args, &[("BATCHSCORE__AMQP__JOBS_QUEUE", queue.as_str())]);
    let text = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{text}");
    for needle in ["amq.direct", queue.as_str(), "reached no queue"] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A job with a distinctive bad value and a job with a distinctive good one, through a worker
/// logging at debug level: the error result quotes the bad value to its sender, the log says what
/// was wrong and where, and neither value appears in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_values_stay_out_of_the_log_at_debug_level() {
    let settings = common::settings("log-values", &fixtures_repository());
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let log = std::env::temp_dir().join(format!("{}.log", settings.amqp.jobs_queue));
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut command = common::worker_command(&settings, &metrics.to_string());
    command.env("BATCHSCORE__LOGGING__LEVEL", "debug").stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
    let mut worker = common::WorkerProcess(command.spawn().expect("worker starts"));
    common::wait_until_ready(metrics, START_UP_PATIENCE).await;

    let mut client = common::Client::new(&settings).await;
    let row: Vec<serde_json::Value> = expected("linear_v1")["rows"][0].as_array().expect("a row").clone();
    // 123456.789e300 is beyond float32; the message writes it out in full, 123456789000…
    let mut bad = serde_json::to_string(&serde_json::json!({"job_id": "bad", "model": "linear", "rows": [row]}))
        .expect("job serialises");
    let first_value = row[0].to_string();
    bad = bad.replacen(&format!("[[{first_value},"), "[[123456.789e300,", 1);
    client.send_raw(bad.as_bytes(), Default::default()).await;
    let mut good_row = row.clone();
    good_row[1] = serde_json::json!(0.7654321);
    client.send(&serde_json::json!({"job_id": "good", "model": "linear", "rows": [good_row]})).await;
    let results = client.results(2).await;
    let result = |id: &str| results.iter().map(|(r, _)| r).find(|r| r["job_id"] == id).expect("a result").clone();
    let (bad_result, good_result) = (result("bad"), result("good"));
    assert_eq!(good_result["status"], "ok", "{good_result}");
    let answer = bad_result["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(answer.contains("rows[0][0]") && answer.contains("123456789"), "the sender is told the value: {answer}");

    let _ = Command::new("kill").args(["-TERM", &worker.0.id().to_string()]).status();
    let stopped = Instant::now();
    while worker.0.try_wait().expect("worker status").is_none() {
        assert!(stopped.elapsed() < Duration::from_secs(60), "the worker did not stop within 60 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logged = std::fs::read_to_string(&log).expect("the worker's log");
    let _ = std::fs::remove_file(&log);
    common::delete_topology(&settings).await;
    let rejected =
        logged.lines().find(|l| l.contains("job rejected")).unwrap_or_else(|| panic!("no rejection:\n{logged}"));
    for needle in ["code=\"invalid_input\"", "rows[0][0]", "outside the float32 range"] {
        assert!(rejected.contains(needle), "{needle:?} missing from: {rejected}");
    }
    assert!(
        logged.lines().any(|l| l.contains("DEBUG") && l.contains("job accepted") && l.contains("job_id=good")),
        "the log is at debug level, with a line for the good job:\n{logged}"
    );
    for value in ["123456.789e300", "123456789", "1.23456789e305", "7654321"] {
        assert!(!logged.contains(value), "{value} in the log:\n{logged}");
    }
}

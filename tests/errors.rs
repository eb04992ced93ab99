//! Every error code is answered with a result naming the problem, the job is acknowledged and
//! never retried, and the worker keeps scoring the jobs that follow.

mod common;

use batchscore::amqp::publisher::{ERROR_CODE_HEADER, ERROR_MESSAGE_HEADER, ORIGINAL_QUEUE_HEADER};
use common::{expected, fixtures_repository, Client, TestWorker};
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde_json::{json, Value};

fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into())
}

/// Sends `body`, returns the result and checks it is an error with `code` whose message has `needle`.
async fn expect_error(
    client: &mut Client,
    body: &[u8],
    properties: BasicProperties,
    code: &str,
    needle: &str,
) -> Value {
    client.send_raw(body, properties).await;
    let result = client.result().await;
    assert_eq!(result["status"], "error", "{result}");
    assert_eq!(result["error"]["code"], code, "{result}");
    let message = result["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "message {message:?} should contain {needle:?}");
    result
}

/// Bad jobs sent, each with its error result, to check the dead-lettered copies against.
#[derive(Default)]
struct Answered(Vec<(Vec<u8>, Value)>);

impl Answered {
    /// [`expect_error`], remembering the body and its result.
    async fn expect_error(
        &mut self,
        client: &mut Client,
        body: &[u8],
        properties: BasicProperties,
        code: &str,
        needle: &str,
    ) -> Value {
        let result = expect_error(client, body, properties, code, needle).await;
        assert!(self.0.iter().all(|(sent, _)| sent != body), "bad job bodies are distinct, so dead letters match one");
        self.0.push((body.to_vec(), result.clone()));
        result
    }
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(text.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_code_is_answered_and_the_worker_keeps_scoring() {
    let mut settings = common::settings("errors", &fixtures_repository());
    settings.limits.max_rows_per_job = 100;
    settings.limits.max_job_bytes = 64 * 1024;
    let worker = TestWorker::start(settings).await;
    let jobs_queue = worker.settings.amqp.jobs_queue.clone();
    let mut answered = Answered::default();
    let mut client = Client::new(&worker.settings).await;
    let row: Vec<Value> = expected("linear_v1")["rows"][0].as_array().unwrap().clone();
    let short_row = &row[..61];
    let job =
        |id: &str, rows: Value| serde_json::to_vec(&json!({"job_id": id, "model": "linear", "rows": rows})).unwrap();

    let not_json = answered
        .expect_error(&mut client, b"{not json", json_properties(), "invalid_json", "key must be a string")
        .await;
    assert_eq!(not_json["job_id"], Value::Null, "neither the body nor message_id gives an id");
    answered
        .expect_error(
            &mut client,
            b"[1, 2, 3]",
            json_properties(),
            "invalid_json",
            "must be a JSON object, found an array",
        )
        .await;
    answered
        .expect_error(&mut client, b"{\"job_id\": \"\xff\xfe\"}", json_properties(), "invalid_json", "not UTF-8")
        .await;
    let result = answered
        .expect_error(
            &mut client,
            &job("short", json!([row, row, short_row])),
            json_properties(),
            "invalid_input",
            "row 2 has 61 values; model linear expects 62",
        )
        .await;
    assert_eq!(result["job_id"], "short");
    assert_eq!(result["model"], "linear");
    answered
        .expect_error(&mut client, &job("text", json!([["a"]])), json_properties(), "invalid_input", "rows[0][0]")
        .await;
    answered.expect_error(&mut client, &job("empty", json!([])), json_properties(), "invalid_input", "no rows").await;
    answered
        .expect_error(
            &mut client,
            &job("huge", json!([[1e39]])),
            json_properties(),
            "invalid_input",
            "outside the float32 range",
        )
        .await;
    answered
        .expect_error(
            &mut client,
            br#"{"model": "linear", "rows": [[1]]}"#,
            json_properties(),
            "invalid_input",
            "no job_id",
        )
        .await;
    answered
        .expect_error(
            &mut client,
            br#"{"job_id": "nomodel", "rows": [[1]]}"#,
            json_properties(),
            "invalid_input",
            "no model",
        )
        .await;
    answered
        .expect_error(
            &mut client,
            &job("ct", json!([row])),
            BasicProperties::default().with_content_type("text/csv".into()),
            "invalid_input",
            "content_type",
        )
        .await;
    let records =
        serde_json::to_vec(&json!({"job_id": "rec", "model": "linear", "records": [{"duration_months": 1}]})).unwrap();
    answered
        .expect_error(&mut client, &records, json_properties(), "invalid_input", "records[0] has no value for feature")
        .await;
    let unknown = serde_json::to_vec(&json!({"job_id": "u", "model": "fraud", "rows": [row]})).unwrap();
    let result = answered
        .expect_error(
            &mut client,
            &unknown,
            json_properties(),
            "unknown_model",
            "model \"fraud\" is not in the repository",
        )
        .await;
    assert_eq!(result["job_id"], "u");
    let version =
        serde_json::to_vec(&json!({"job_id": "v", "model": "linear", "model_version": "9", "rows": [row]})).unwrap();
    answered
        .expect_error(&mut client, &version, json_properties(), "unknown_model", "has no version 9 (available: 1, 2)")
        .await;
    let many = vec![Value::Array(row.clone()); 101];
    answered
        .expect_error(
            &mut client,
            &job("many", json!(many)),
            json_properties(),
            "too_large",
            "limit is 100 (limits.max_rows_per_job)",
        )
        .await;
    let padding = " ".repeat(70 * 1024);
    let big = format!(r#"{{"job_id": "big", "model": "linear", "rows": [[1]]}}{padding}"#);
    answered.expect_error(&mut client, big.as_bytes(), json_properties(), "too_large", "limits.max_job_bytes").await;

    // After all of that, a good job is still scored.
    client.send_raw(&job("good", json!([row])), json_properties()).await;
    let result = client.result().await;
    assert_eq!(result["status"], "ok", "{result}");
    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!(left, 0, "every job, good or bad, was acknowledged");
    assert_eq!(answered.0.len(), 15);
    assert_eq!(dead_letters.len(), 15, "every bad job was dead-lettered");
    // Each copy is the job as sent, and its headers say what its result said.
    let mut unmatched = answered.0;
    for message in &dead_letters {
        let body = &message.delivery.data;
        let at = unmatched.iter().position(|(sent, _)| sent == body).unwrap_or_else(|| {
            panic!("dead letter {:?} is no bad job sent, or a second copy", String::from_utf8_lossy(body))
        });
        let (_, result) = unmatched.swap_remove(at);
        let headers = message.delivery.properties.headers().clone().unwrap_or_default();
        let header = |name: &str| headers.inner().get(name).cloned();
        let (code, text) = (result["error"]["code"].as_str(), result["error"]["message"].as_str());
        assert_eq!(header(ERROR_CODE_HEADER), code.map(long_string), "{result}");
        assert_eq!(header(ERROR_MESSAGE_HEADER), text.map(long_string), "{result}");
        assert_eq!(header(ORIGINAL_QUEUE_HEADER), Some(long_string(&jobs_queue)), "{result}");
    }
    // A body that is not JSON: serde_json's account of the syntax error, behind the worker's prefix.
    assert_eq!(not_json["error"]["message"], "body is not valid JSON: key must be a string at line 1 column 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_failure_is_answered_as_internal() {
    let repository = common::root().join("tests/fixtures/faulty");
    let worker = TestWorker::start(common::settings("internal", &repository)).await;
    let mut client = Client::new(&worker.settings).await;
    // The reducer model returns one row whatever the batch: two rows cannot be scored.
    let body =
        serde_json::to_vec(&json!({"job_id": "two", "model": "reducer", "rows": [[1, 2, 3], [4, 5, 6]]})).unwrap();
    let result =
        expect_error(&mut client, &body, json_properties(), "internal", "output total has 1 rows for a batch of 2")
            .await;
    assert_eq!(result["model_version"], "1");
    let one = serde_json::to_vec(&json!({"job_id": "one", "model": "reducer", "rows": [[1, 2, 3]]})).unwrap();
    client.send_raw(&one, json_properties()).await;
    let result = client.result().await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["outputs"]["total"], json!([[1.0, 2.0, 3.0]]));
    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!(left, 0);
    let dead: Value =
        serde_json::from_slice(&dead_letters.first().expect("the failed job was dead-lettered").delivery.data).unwrap();
    assert_eq!(dead["job_id"], "two", "the original job, unchanged");
}

/// A result the broker refuses (its reply queue rejects publishes) is never confirmed, so its job
/// is never acknowledged and stays in the queue; a confirmed result's job is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_is_acknowledged_only_after_its_result_is_confirmed() {
    let worker = TestWorker::start(common::settings("ackorder", &fixtures_repository())).await;
    let mut refusing_args = lapin::types::FieldTable::default();
    refusing_args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(0));
    refusing_args.insert("x-overflow".into(), lapin::types::AMQPValue::LongString("reject-publish".into()));
    let refusing = Client::with_reply_queue_arguments(&worker.settings, refusing_args).await;
    let mut accepting = Client::new(&worker.settings).await;
    let row = expected("linear_v1")["rows"][0].clone();
    let job = |id: &str| serde_json::to_vec(&json!({"job_id": id, "model": "linear", "rows": [row]})).unwrap();

    refusing.send_raw(&job("refused"), json_properties()).await;
    accepting.send_raw(&job("accepted"), json_properties()).await;
    let result = accepting.result().await;
    assert_eq!(result["job_id"], "accepted");
    // Never acknowledged: the refused job is back in the queue, or, past the delivery limit,
    // dead-lettered by the broker; the accepted one is gone.
    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!(left as usize + dead_letters.len(), 1, "{left} left, {} dead-lettered", dead_letters.len());
}

/// A failing batch is re-run in parts: the job that breaks the model fails alone and the jobs
/// that shared its batch are still scored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_does_not_fail_the_jobs_batched_with_it() {
    let settings = common::settings("isolate", &common::root().join("tests/fixtures/faulty"));
    // Jobs queued before the worker starts arrive together and share batches.
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    batchscore::amqp::declare_topology(&channel, &settings.amqp).await.expect("topology");
    let mut client = Client::new(&settings).await;
    for i in 0..20 {
        let rows = if i == 7 { json!([[1, 2, 3], [4, 5, 6]]) } else { json!([[i, 1, 2]]) };
        client.send(&json!({"job_id": format!("j{i}"), "model": "reducer", "rows": rows})).await;
    }
    let worker = TestWorker::start(settings).await;
    for (result, _) in client.results(20).await {
        if result["job_id"] == "j7" {
            assert_eq!(result["error"]["code"], "internal", "{result}");
        } else {
            assert_eq!(result["status"], "ok", "{result}");
        }
    }
    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!((left, dead_letters.len()), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_past_their_deadline_are_answered_expired() {
    let worker = TestWorker::start(common::settings("deadline", &fixtures_repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let row = expected("linear_v1")["rows"][0].clone();
    let body = |id: &str| serde_json::to_vec(&json!({"job_id": id, "model": "linear", "rows": [row]})).unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let with_deadline = |deadline: i64| {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert("x-deadline".into(), lapin::types::AMQPValue::LongLongInt(deadline));
        json_properties().with_headers(headers)
    };
    client.send_raw(&body("late"), with_deadline(now_ms - 1_000)).await;
    let result = client.result().await;
    assert_eq!(
        (result["job_id"].as_str(), result["error"]["code"].as_str()),
        (Some("late"), Some("expired")),
        "{result}"
    );
    client.send_raw(&body("in-time"), with_deadline(now_ms + 60_000)).await;
    assert_eq!(client.result().await["status"], "ok");
    // An hour-old message whose one-second TTL lapsed long ago.
    let old = json_properties().with_timestamp((now_ms / 1000 - 3600) as u64).with_expiration("1000".into());
    client.send_raw(&body("stale"), old).await;
    let result = client.result().await;
    assert_eq!(result["error"]["code"], "expired", "{result}");
    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!((left, dead_letters.len()), (0, 0), "expired jobs are acknowledged, not dead-lettered");
}

/// A stream of garbage interleaved with good jobs: every good job is scored, every bad one is
/// answered with its error and dead-lettered, and the worker stays up throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_stream_interleaved_with_good_jobs() {
    let worker = TestWorker::start(common::settings("garbage", &fixtures_repository())).await;
    let mut client = Client::new(&worker.settings).await;
    let row = expected("linear_v1")["rows"][0].clone();
    let mut huge_row: Vec<String> = row.as_array().unwrap().iter().map(|v| v.to_string()).collect();
    huge_row[3] = "1e400".into();
    let ten_mb =
        format!(r#"{{"job_id": "pad", "model": "linear", "rows": [[1]], "padding": "{}"}}"#, "x".repeat(10 << 20));
    // (body, job id: from the body where it can be read, else from message_id, expected code)
    let garbage: Vec<(Vec<u8>, &str, &str)> = vec![
        (br#"{"job_id": "cut", "model": "#.to_vec(), "cut", "invalid_json"),
        (br#"{"job_id": "types", "model": "linear", "rows": "many"}"#.to_vec(), "types", "invalid_input"),
        (br#"{"job_id": "nan", "model": "linear", "rows": [[NaN]]}"#.to_vec(), "nan", "invalid_json"),
        (
            format!(r#"{{"job_id": "huge", "model": "linear", "rows": [[{}]]}}"#, huge_row.join(",")).into_bytes(),
            "huge",
            "invalid_input",
        ),
        (ten_mb.into_bytes(), "pad", "invalid_input"),
        (br#"{"job_id": "fields"}"#.to_vec(), "fields", "invalid_input"),
        (br#"{"job_id": "who", "model": "no_such_model", "rows": [[1]]}"#.to_vec(), "who", "unknown_model"),
        (br#"{"job_id": "empty", "model": "linear", "rows": []}"#.to_vec(), "empty", "invalid_input"),
        (b"[1, 2, 3]".to_vec(), "array", "invalid_json"),
        (b"\xc3\x28\xff{}".to_vec(), "bytes", "invalid_json"),
    ];
    let good = |i: usize| {
        serde_json::to_vec(&json!({"job_id": format!("good-{i}"), "model": "linear", "rows": [row]})).unwrap()
    };
    for (i, (bad, id, _)) in garbage.iter().enumerate() {
        client.send_raw(&good(i), json_properties()).await;
        client.send_raw(bad, json_properties().with_message_id((*id).into())).await;
    }
    client.send_raw(&good(garbage.len()), json_properties()).await;
    let results = client.results(2 * garbage.len() + 1).await;
    for (result, _) in &results {
        let id = result["job_id"].as_str().unwrap_or_default();
        if id.starts_with("good-") {
            assert_eq!(result["status"], "ok", "{result}");
        } else {
            let (_, _, code) =
                garbage.iter().find(|(_, bad_id, _)| *bad_id == id).unwrap_or_else(|| panic!("unexpected {result}"));
            assert_eq!(result["error"]["code"], *code, "{id}: {result}");
        }
    }
    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!((left as usize, dead_letters.len()), (0, garbage.len()), "every bad job dead-lettered, none left");
}

/// The broker cancels the subscription (here: the jobs queue is deleted under the worker); the
/// worker notices the consumer ending, declares its topology again and resumes consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_subscription_is_renewed() {
    let worker = TestWorker::start(common::settings("cancelled", &fixtures_repository())).await;
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let jobs_queue = worker.settings.amqp.jobs_queue.clone();
    channel.queue_delete(jobs_queue.as_str().into(), Default::default()).await.expect("queue deleted");
    let started = std::time::Instant::now();
    loop {
        let probe = connection.create_channel().await.expect("channel");
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        if let Ok(queue) = probe.queue_declare(jobs_queue.as_str().into(), passive, Default::default()).await {
            if queue.consumer_count() > 0 {
                break;
            }
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "worker did not subscribe again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut client = Client::new(&worker.settings).await;
    let row = expected("linear_v1")["rows"][0].clone();
    client.send(&json!({"job_id": "after", "model": "linear", "rows": [row]})).await;
    assert_eq!(client.result().await["status"], "ok");
    assert_eq!(worker.stop().await, 0);
}

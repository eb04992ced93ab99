//! The bulk lane: its jobs are scored like online ones, its bad jobs are dead-lettered naming
//! the bulk queue, and a small row budget throttles consumption without stalling it.

mod common;

use batchscore::amqp::publisher::ORIGINAL_QUEUE_HEADER;
use common::{assert_close, expected, expected_slice, fixtures_repository, get, sample, Client, TestWorker};
use lapin::types::AMQPValue;
use serde_json::json;

fn with_bulk_lane(test: &str) -> batchscore::settings::Settings {
    let mut settings = common::settings(test, &fixtures_repository());
    settings.amqp.bulk_queue = format!("{}.bulk", settings.amqp.jobs_queue);
    settings
}

/// A client whose jobs go to the bulk queue instead of the online one.
async fn bulk_client(settings: &batchscore::settings::Settings) -> Client {
    let mut bulk = settings.clone();
    bulk.amqp.jobs_queue = settings.amqp.bulk_queue.clone();
    Client::new(&bulk).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_lanes_score_and_bad_bulk_jobs_name_their_queue() {
    let settings = with_bulk_lane("lanes");
    let worker = TestWorker::start(settings.clone()).await;
    let mut online = Client::new(&settings).await;
    let mut bulk = bulk_client(&settings).await;
    let fixture = expected("linear_v1");
    bulk.send(&json!({"job_id": "bulk", "model": "linear", "model_version": "1", "rows": fixture["rows"]})).await;
    online
        .send(&json!({"job_id": "online", "model": "linear", "model_version": "1", "rows": [fixture["rows"][3]]}))
        .await;
    bulk.send(&json!({"job_id": "bad", "model": "linear", "rows": [[1.0, 2.0]]})).await;

    let result = online.result().await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_close(&result["outputs"], &expected_slice(&fixture["outputs"], 3..4), "online outputs");
    let mut results = bulk.results(2).await;
    results.sort_by_key(|(result, _)| result["job_id"].as_str().map(str::to_string));
    let (bad, scored) = (&results[0].0, &results[1].0);
    assert_eq!(scored["status"], "ok", "{scored}");
    assert_close(&scored["outputs"], &fixture["outputs"], "bulk outputs");
    assert_eq!(bad["error"]["code"], "invalid_input", "{bad}");

    let (left, dead_letters) = worker.stop_with_dead_letters().await;
    assert_eq!(left, 0);
    assert_eq!(dead_letters.len(), 1, "the bad bulk job is dead-lettered");
    let headers = dead_letters[0].delivery.properties.headers().clone().unwrap_or_default();
    let original_queue = headers.inner().get(ORIGINAL_QUEUE_HEADER).cloned();
    assert_eq!(original_queue, Some(AMQPValue::LongString(settings.amqp.bulk_queue.as_str().into())));
}

/// With room for 10 rows in flight, every job of 12 rows spends a lane's budget on its own: the
/// consumer pauses after taking one and resumes when that one is answered, so a lane never holds
/// two jobs at once, although 13 wait in each queue from the start. Seen from outside: no ONNX
/// Runtime run carries rows of two jobs (a batch takes rows of one lane only). All jobs are still
/// scored. The model is served under a name of its own, so the batch metrics are this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_row_budget_pauses_a_lane_without_stalling_it() {
    let repository = common::private_repository("paced", "linear", 1);
    let mut settings = with_bulk_lane("budget");
    settings.models.repository = repository.clone();
    settings.limits.max_inflight_rows = 10;
    // The bulk lane also holds back while online jobs arrive; off, only the budget paces it.
    settings.amqp.bulk_yield_ms = 0;
    // Queued before the worker starts: without the pause, the consumer would take many of them at
    // once and the batcher would put several in one run.
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    batchscore::amqp::declare_topology(&channel, &settings.amqp).await.expect("topology");
    let mut online = Client::new(&settings).await;
    let mut bulk = bulk_client(&settings).await;
    let fixture = expected("linear_v1");
    for i in 0..13 {
        let rows = &fixture["rows"].as_array().expect("rows")[i * 4..i * 4 + 12];
        let job = json!({"job_id": format!("j{i}"), "model": "paced", "model_version": "1", "rows": rows});
        online.send(&job).await;
        bulk.send(&job).await;
    }
    let worker = TestWorker::start(settings.clone()).await;
    for (client, lane) in [(&mut online, "online"), (&mut bulk, "bulk")] {
        for (result, _) in client.results(13).await {
            let i: usize = result["job_id"].as_str().and_then(|id| id[1..].parse().ok()).expect("job id");
            assert_eq!(result["status"], "ok", "{lane}: {result}");
            assert_close(&result["outputs"], &expected_slice(&fixture["outputs"], i * 4..i * 4 + 12), lane);
        }
    }
    // Every run is recorded before its rows reach the result stage, so all are counted by now.
    let (_, scrape) = get(worker.metrics, "/metrics").expect("scrape");
    let paced = [("model", "paced"), ("version", "1")];
    let runs = sample(&scrape, "batchscore_batch_jobs_count", &paced);
    assert!(runs >= 26.0, "at least one run per job, {runs} counted\n{scrape}");
    let single = sample(&scrape, "batchscore_batch_jobs_bucket", &[("model", "paced"), ("le", "1")]);
    assert_eq!(single, runs, "runs carrying rows of more than one job: the lane took a job past its budget");
    assert_eq!(sample(&scrape, "batchscore_batch_rows_sum", &paced), 26.0 * 12.0, "every row scored once");
    assert_eq!(worker.stop().await, 0);
    let _ = std::fs::remove_dir_all(&repository);
}

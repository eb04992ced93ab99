//! Metrics as Prometheus sees them: after a known set of jobs, a scrape of a worker process's
//! `/metrics` shows the matching counters and histogram counts.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{delete_topology, expected, fixtures_repository, free_port, get, sample, Client};
use serde_json::json;
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_matches_the_jobs_scored() {
    let settings = common::settings("metrics", &fixtures_repository());
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut worker = common::spawn_worker_process(&settings, &addr.to_string());
    let started = Instant::now();
    common::wait_until_ready(addr, Duration::from_secs(30)).await;
    assert_eq!(get(addr, "/healthz").map(|(status, _)| status), Some(200));

    let mut client = Client::new(&settings).await;
    let rows = expected("linear_v1")["rows"].as_array().unwrap().clone();
    let sizes = [1usize, 3, 5, 8, 13];
    for (i, n) in sizes.iter().enumerate() {
        client
            .send(&json!({"job_id": format!("m{i}"), "model": "linear", "model_version": "2", "rows": rows[..*n]}))
            .await;
    }
    client.send(&json!({"job_id": "bad-model", "model": "nope", "rows": [rows[0]]})).await;
    client.send_raw(b"not json", Default::default()).await;
    client.results(sizes.len() + 2).await;
    let total_rows: usize = sizes.iter().sum();

    // Gauges and counters settle once the last job is acknowledged and counted as completed (a
    // job whose dead-letter copy the broker refused goes back to the queue and completes later).
    // A scrape reads the series one after the other while jobs may still be settling, so it can
    // show the last job completed and nothing in flight, yet a counter read before it was bumped:
    // the figures are taken from a scrape after the one that shows everything settled.
    let jobs = (sizes.len() + 2) as f64;
    loop {
        let (_, scrape) = get(addr, "/metrics").expect("scrape");
        let settled = sample(&scrape, "batchscore_inflight_jobs", &[]) == 0.0
            && sample(&scrape, "batchscore_jobs_completed_total", &[]) >= jobs;
        if settled || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, scrape) = get(addr, "/metrics").expect("scrape");
    let linear = [("model", "linear"), ("lane", "online")];
    assert_eq!(sample(&scrape, "batchscore_jobs_received_total", &linear), sizes.len() as f64, "{scrape}");
    assert_eq!(
        sample(&scrape, "batchscore_jobs_completed_total", &[("model", "linear"), ("status", "ok")]),
        sizes.len() as f64
    );
    assert_eq!(sample(&scrape, "batchscore_jobs_completed_total", &[("model", "unknown"), ("status", "error")]), 2.0);
    // Every job counts as received before it can complete, rejected ones included.
    assert!(sample(&scrape, "batchscore_jobs_received_total", &[("model", "unknown")]) >= 2.0, "{scrape}");
    let (received, completed) = (
        sample(&scrape, "batchscore_jobs_received_total", &[]),
        sample(&scrape, "batchscore_jobs_completed_total", &[]),
    );
    assert_eq!(completed, jobs, "{scrape}");
    assert!(received >= completed, "received {received} < completed {completed}");
    assert_eq!(sample(&scrape, "batchscore_rows_scored_total", &[("model", "linear")]), total_rows as f64);
    assert_eq!(sample(&scrape, "batchscore_job_duration_seconds_count", &linear), sizes.len() as f64);
    assert_eq!(sample(&scrape, "batchscore_batch_wait_seconds_count", &[("model", "linear")]), sizes.len() as f64);
    assert_eq!(
        sample(&scrape, "batchscore_batch_rows_sum", &[("model", "linear"), ("version", "2")]),
        total_rows as f64
    );
    let batches = sample(&scrape, "batchscore_batch_rows_count", &[("model", "linear"), ("version", "2")]);
    assert_eq!(sample(&scrape, "batchscore_batches_total", &[("model", "linear"), ("version", "2")]), batches);
    assert_eq!(sample(&scrape, "batchscore_inference_duration_seconds_count", &[("version", "2")]), batches);
    assert_eq!(sample(&scrape, "batchscore_job_errors_total", &[("code", "unknown_model")]), 1.0);
    assert_eq!(sample(&scrape, "batchscore_job_errors_total", &[("code", "invalid_json")]), 1.0);
    assert_eq!(sample(&scrape, "batchscore_dead_lettered_total", &[]), 2.0);
    assert_eq!(sample(&scrape, "batchscore_publish_duration_seconds_count", &[]), (sizes.len() + 2) as f64);
    assert_eq!(sample(&scrape, "batchscore_inflight_jobs", &[]), 0.0);
    assert_eq!(sample(&scrape, "batchscore_inflight_rows", &[]), 0.0);
    assert_eq!(sample(&scrape, "batchscore_broker_connected", &[]), 1.0);
    assert_eq!(sample(&scrape, "batchscore_ready", &[]), 1.0);
    assert_eq!(sample(&scrape, "batchscore_sessions_idle", &[("model", "linear"), ("version", "2")]), 1.0);
    let file = std::fs::read(fixtures_repository().join("linear/2/model.onnx")).unwrap();
    let sha256 = format!("{:x}", Sha256::digest(&file));
    assert_eq!(
        sample(&scrape, "batchscore_model_info", &[("model", "linear"), ("version", "2"), ("sha256", &sha256)]),
        1.0
    );
    assert!(
        !scrape.contains("m0") && !scrape.contains("\"nope\""),
        "no job ids or unknown model names as label values"
    );

    Command::new("kill").args(["-TERM", &worker.0.id().to_string()]).status().expect("kill");
    let _ = worker.0.wait();
    delete_topology(&settings).await;
}

//! Fault test: RabbitMQ restarts (`rabbitmqctl stop_app` / `start_app`) during a run of a worker
//! with the audit trail on: 10,000 jobs are published before and 2,000 after the restart, so the
//! worker records both before and after it. Every job is answered and acknowledged, and every job has
//! a record in the stream: a job whose record was lost with the broker was not acknowledged, so
//! it came back and was recorded again. Every chain read back is intact (a chain of the session
//! the restart ended stops at its last stored record), and the restart started a new one. The
//! broker restarted is a private node of this test's own (`common::private_broker`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::load::{collect_at, declare_reply_queue_at, publish_job_range_at, verify, wait_for_depth_at};
use common::private_broker::PrivateBroker;
use common::stream::{by_job, read_stream_at, verify_chains};
use common::TestWorker;

/// Jobs published before the restart, and in all.
const BEFORE: usize = 10_000;
const JOBS: usize = 12_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_loses_no_record_and_acks_no_job_without_one() {
    let broker = PrivateBroker::start().await;
    let url = broker.url();
    let mut settings = common::settings("audit-restart", &common::fixtures_repository());
    settings.amqp.url = url.clone();
    settings.amqp.reconnect_max_backoff_ms = 1_000;
    // Few jobs in flight, so the run is still going when the broker stops: the restart catches
    // jobs between their result and their acknowledgement.
    settings.amqp.prefetch = 16;
    settings.audit.enabled = true;
    settings.audit.stream = format!("{}.audit", settings.amqp.jobs_queue);
    settings.audit.max_bytes = 100_000_000;
    settings.audit.worker_id = "test-audit-restart".into();
    let reply_queue = format!("{}.replies", settings.amqp.jobs_queue);
    declare_reply_queue_at(&url, &reply_queue).await;
    let worker = TestWorker::start(settings.clone()).await;
    publish_job_range_at(&url, &settings.amqp.jobs_queue, &reply_queue, 0..BEFORE).await;
    wait_for_depth_at(&url, &reply_queue, 1_000, Duration::from_secs(120)).await;

    let answered_before_stop = common::load::depth_at(&url, &reply_queue).await;
    broker.stop_app().await;
    broker.start_app().await;
    publish_job_range_at(&url, &settings.amqp.jobs_queue, &reply_queue, BEFORE..JOBS).await;

    let results = collect_at(&url, &reply_queue, JOBS, Duration::from_secs(300)).await;
    let (received, duplicates, _) = verify(&results, JOBS);
    assert_eq!(worker.stop().await, 0, "every job acknowledged");

    let records = read_stream_at(&url, &settings.audit.stream).await;
    let recorded = by_job(&records);
    let missing: Vec<String> =
        (0..JOBS).map(|i| format!("job-{i}")).filter(|id| !recorded.contains_key(id.as_str())).collect();
    assert!(missing.is_empty(), "{} acknowledged jobs without a record, e.g. {:?}", missing.len(), &missing[..1]);
    let chains = verify_chains(&records).expect("every chain read back is intact");
    let workers: HashSet<&str> = records.iter().filter_map(|r| r.str("worker_id")).collect();
    assert!(chains >= 2, "the restart ended the first chain and started another; {chains} chain(s)");
    assert_eq!(workers, HashSet::from(["test-audit-restart"]));
    let record_bytes: usize = records.iter().map(|r| r.body.len() + 1).sum();
    println!(
        "audit across a broker restart: {JOBS} jobs, {answered_before_stop} answered when the broker stopped, \
         {received} answered in all ({duplicates} twice), {} records in {chains} chains, 0 jobs without a record; \
         {} bytes per record, {} bytes per record on the broker's disk",
        records.len(),
        record_bytes / records.len(),
        segment_bytes(broker.dir()) / records.len() as u64,
    );
    // The queues and the stream go with the private node when `broker` is dropped.
}

/// The bytes of the stream segment files under `dir`: what the records take on the broker's disk.
fn segment_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => segment_bytes(&path),
                _ if path.extension().is_some_and(|e| e == "segment") => entry.metadata().map_or(0, |m| m.len()),
                _ => 0,
            }
        })
        .sum()
}

//! Fault test: RabbitMQ restarts (`rabbitmqctl stop_app` / `start_app`) during a 20,000-job run.
//! Every job still gets a result, and any duplicate carries the same scores. Also checks that
//! `/readyz` follows the broker connection. The broker restarted is a private node this test
//! starts on its own ports and data directory (`common::private_broker`), never the shared one.

mod common;

use std::time::{Duration, Instant};

use common::load::{collect_at, declare_reply_queue_at, publish_jobs_at, verify, wait_for_depth_at};
use common::private_broker::PrivateBroker;
use common::{fixtures_repository, is_ready, TestWorker};

const JOBS: usize = 20_000;

/// Polls `/readyz` every 50 ms until it answers `ready` (200) or not; panics after `patience`.
async fn wait_for_readiness(worker: &TestWorker, ready: bool, patience: Duration, failure: &str) -> Duration {
    let started = Instant::now();
    while is_ready(worker.metrics).await != ready {
        assert!(started.elapsed() < patience, "{failure} (waited {patience:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_loses_no_job() {
    let broker = PrivateBroker::start().await;
    let url = broker.url();
    let mut settings = common::settings("restart", &fixtures_repository());
    settings.amqp.url = url.clone();
    settings.amqp.reconnect_max_backoff_ms = 1_000;
    let reply_queue = format!("{}.replies", settings.amqp.jobs_queue);
    declare_reply_queue_at(&url, &reply_queue).await;
    let worker = TestWorker::start(settings.clone()).await;
    let started = Instant::now();
    publish_jobs_at(&url, &settings.amqp.jobs_queue, &reply_queue, JOBS).await;
    wait_for_depth_at(&url, &reply_queue, 2_000, Duration::from_secs(120)).await;

    let stopping = Instant::now();
    broker.stop_app().await;
    // Readiness follows the broker: false while it is away, true once the worker is back. The
    // broker comes back once the worker has noticed it left, so the worker reconnects against a
    // broker that is still starting (start_app takes seconds).
    wait_for_readiness(&worker, false, Duration::from_secs(30), "/readyz still answers 200 without a broker").await;
    let not_ready_after = stopping.elapsed();
    broker.start_app().await;
    let broker_back = Instant::now();
    let reconnected =
        wait_for_readiness(&worker, true, Duration::from_secs(60), "the worker did not reconnect to the broker").await;

    let results = collect_at(&url, &reply_queue, JOBS, Duration::from_secs(300)).await;
    let (received, duplicates, identical) = verify(&results, JOBS);
    println!(
        "broker restart: {JOBS} jobs sent, {received} results, 0 missing, {duplicates} duplicates ({identical} bit-identical, all within 1e-6); \
         /readyz false {:.2} s after stop_app; broker down {:.1} s; worker ready {:.2} s after the broker; run {:.1} s",
        not_ready_after.as_secs_f64(),
        (broker_back - stopping).as_secs_f64(),
        reconnected.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(worker.stop().await, 0);
    // The reply queue goes with the private node when `broker` is dropped.
}

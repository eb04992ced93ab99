//! Fault test: RabbitMQ restarts (`rabbitmqctl stop_app` / `start_app`) during a 20,000-job run.
//! Every job still gets a result, and any duplicate carries the same scores. Alone in its test
//! binary because it takes the broker away from everything else. Also checks that `/readyz`
//! follows the broker connection.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::load::{collect, declare_reply_queue, delete_queue, publish_jobs, verify, wait_for_depth};
use common::{fixtures_repository, is_ready, TestWorker};

const JOBS: usize = 20_000;

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl").args(args).status().expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_run_loses_no_job() {
    let mut settings = common::settings("restart", &fixtures_repository());
    settings.amqp.reconnect_max_backoff_ms = 1_000;
    let reply_queue = format!("{}.replies", settings.amqp.jobs_queue);
    declare_reply_queue(&reply_queue).await;
    let worker = TestWorker::start(settings.clone()).await;
    let started = Instant::now();
    publish_jobs(&settings.amqp.jobs_queue, &reply_queue, JOBS).await;
    wait_for_depth(&reply_queue, 2_000, Duration::from_secs(120)).await;

    let stopping = Instant::now();
    rabbitmqctl(&["stop_app"]);
    // Readiness follows the broker: false while it is away, true once the worker is back.
    while is_ready(worker.metrics).await {
        assert!(stopping.elapsed() < Duration::from_secs(30), "/readyz still answers 200 without a broker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let not_ready_after = stopping.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let broker_back = Instant::now();
    while !is_ready(worker.metrics).await {
        assert!(broker_back.elapsed() < Duration::from_secs(60), "worker did not reconnect within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reconnected = broker_back.elapsed();

    let results = collect(&reply_queue, JOBS, Duration::from_secs(300)).await;
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
    delete_queue(&reply_queue).await;
}

//! Supervision: a stage that panics (the result stage, an inference run) tears the connection's
//! pipeline down and the worker rebuilds it. Every job is still answered, readiness drops while
//! the pipeline is rebuilt and comes back, and the failure is counted by stage. Alone in its test
//! binary because the fault points are process-wide.

mod common;

use std::time::Duration;

use batchscore::faults::{self, FaultPoint};
use common::load::{collect, declare_reply_queue, delete_queue, publish_jobs, verify};
use common::{fixtures_repository, get, sample, wait_until_ready, TestWorker};

const JOBS: usize = 300;
const PATIENCE: Duration = Duration::from_secs(120);

fn scrape(worker: &TestWorker) -> String {
    get(worker.metrics, "/metrics").expect("metrics answer").1
}

/// Arms `point` once, sends `JOBS` jobs and checks that every one is answered, that the stage
/// failed once, and that the worker went through a reconnection and is ready again.
async fn survives(worker: &TestWorker, point: &FaultPoint, stage: &str, round: usize) {
    let reply_queue = format!("{}.replies.{round}", worker.settings.amqp.jobs_queue);
    declare_reply_queue(&reply_queue).await;
    let before = scrape(worker);
    let reconnects_before = sample(&before, "batchscore_broker_reconnects_total", &[]);
    point.arm(1);
    publish_jobs(&worker.settings.amqp.jobs_queue, &reply_queue, JOBS).await;
    let results = collect(&reply_queue, JOBS, PATIENCE).await;
    let (received, duplicates, _) = verify(&results, JOBS);
    assert_eq!(point.armed(), 0, "the {stage} fault fired");
    wait_until_ready(worker.metrics, PATIENCE).await;
    let after = scrape(worker);
    let failures = sample(&after, "batchscore_stage_failures_total", &[("stage", stage)]);
    assert_eq!(failures, 1.0, "one {stage} failure counted:\n{after}");
    // The pipeline was rebuilt on a new connection: the worker was not ready in between.
    let reconnects = sample(&after, "batchscore_broker_reconnects_total", &[]) - reconnects_before;
    assert!(reconnects >= 1.0, "the pipeline was rebuilt after the {stage} failure");
    println!(
        "{stage} panic: {JOBS} jobs, {received} results, 0 missing, {duplicates} duplicates; reconnects {reconnects}"
    );
    delete_queue(&reply_queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_stage_is_rebuilt_and_no_job_is_lost() {
    let mut settings = common::settings("supervision", &fixtures_repository());
    settings.amqp.reconnect_max_backoff_ms = 500;
    let worker = TestWorker::start(settings).await;
    survives(&worker, &faults::RESULT_STAGE, "result", 1).await;
    survives(&worker, &faults::INFER_RUN, "inference", 2).await;
    assert_eq!(worker.stop().await, 0, "no job left in the queue");
}

//! Fault tests with worker processes: one of two workers killed (SIGKILL) mid-run, and a worker
//! stopped with SIGTERM that drains what it holds before exiting.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use batchscore::settings::Settings;
use common::load::{collect, declare_reply_queue, delete_queue, depth, publish_jobs, verify, wait_for_depth};
use common::{delete_topology, fixtures_repository, WorkerProcess};

/// Declares the topology the workers will use, so jobs can be queued before any worker is up.
async fn declare(settings: &Settings) {
    let connection = common::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    batchscore::amqp::declare_topology(&channel, &settings.amqp).await.expect("topology");
}

fn spawn_worker(settings: &Settings) -> WorkerProcess {
    common::spawn_worker_process(settings, "127.0.0.1:0")
}

async fn wait_for_exit(mut child: WorkerProcess, timeout: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().expect("worker status") {
            return status;
        }
        assert!(started.elapsed() < timeout, "worker did not exit within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_of_two_workers_loses_no_job() {
    const JOBS: usize = 20_000;
    let settings = common::settings("sigkill", &fixtures_repository());
    let reply_queue = format!("{}.replies", settings.amqp.jobs_queue);
    declare_reply_queue(&reply_queue).await;
    declare(&settings).await;
    let (mut victim, survivor) = (spawn_worker(&settings), spawn_worker(&settings));
    let started = Instant::now();
    publish_jobs(&settings.amqp.jobs_queue, &reply_queue, JOBS).await;
    wait_for_depth(&reply_queue, 2_000, Duration::from_secs(120)).await;
    victim.0.kill().expect("SIGKILL");
    let killed_at = started.elapsed();
    let _ = victim.0.wait();

    let results = collect(&reply_queue, JOBS, Duration::from_secs(300)).await;
    let (received, duplicates, identical) = verify(&results, JOBS);
    println!(
        "sigkill: {JOBS} jobs sent, {received} results, 0 missing, {duplicates} duplicates ({identical} bit-identical, all within 1e-6); \
         one worker killed at {:.1} s; all answered at {:.1} s",
        killed_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let status = wait_for_exit_after_term(survivor).await;
    assert!(status.success(), "surviving worker exits cleanly: {status}");
    delete_queue(&reply_queue).await;
    delete_topology(&settings).await;
}

async fn wait_for_exit_after_term(child: WorkerProcess) -> std::process::ExitStatus {
    let status = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().expect("kill runs");
    assert!(status.success());
    wait_for_exit(child, Duration::from_secs(40)).await
}

/// SIGTERM: the worker stops taking jobs, answers every job it received, acknowledges them and
/// exits 0. What it never received stays queued for the next worker, which answers the rest:
/// no job is answered twice, so none needed redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_received_job_then_exits_0() {
    const JOBS: usize = 5_000;
    let settings = common::settings("sigterm", &fixtures_repository());
    let reply_queue = format!("{}.replies", settings.amqp.jobs_queue);
    declare_reply_queue(&reply_queue).await;
    declare(&settings).await;
    let first = spawn_worker(&settings);
    publish_jobs(&settings.amqp.jobs_queue, &reply_queue, JOBS).await;
    wait_for_depth(&reply_queue, 500, Duration::from_secs(120)).await;
    let terminated = Instant::now();
    let status = wait_for_exit_after_term(first).await;
    let drain_time = terminated.elapsed();
    assert!(status.success(), "worker exits 0 after SIGTERM: {status}");
    let (answered, left) = (depth(&reply_queue).await as usize, depth(&settings.amqp.jobs_queue).await as usize);
    assert_eq!(answered + left, JOBS, "{answered} answered + {left} still queued = every job, none lost or doubled");

    let second = spawn_worker(&settings);
    let results = collect(&reply_queue, JOBS, Duration::from_secs(300)).await;
    let (received, duplicates, _) = verify(&results, JOBS);
    assert_eq!(duplicates, 0, "no job was answered twice, so none was redelivered");
    println!(
        "sigterm: {JOBS} jobs sent; first worker answered {answered} and exited 0 in {:.2} s with {left} left queued; \
         second worker answered the rest; {received} results, 0 missing, {duplicates} duplicates",
        drain_time.as_secs_f64()
    );
    let status = wait_for_exit_after_term(second).await;
    assert!(status.success());
    delete_queue(&reply_queue).await;
    delete_topology(&settings).await;
}

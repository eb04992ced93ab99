//! Fault test: a broker short of disk or memory raises a resource alarm and blocks every
//! publishing connection until it clears. `batchscore submit` then fails within its
//! `--timeout-s`, naming the alarm and the fix, instead of waiting for confirms forever. The
//! broker is a private node this test starts on its own ports (`common::private_broker`).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::private_broker::PrivateBroker;
use common::run_bounded;

/// Longest `submit` may run: its own `--timeout-s` plus start-up and close.
const SUBMIT_PATIENCE: Duration = Duration::from_secs(120);

/// Longest the node may take to raise the alarm once its disk limit is out of reach.
const ALARM_PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_to_a_broker_that_blocks_publishing_fails_within_its_timeout_naming_the_alarm() {
    let broker = PrivateBroker::start().await;
    // No disk has a petabyte free: the disk alarm goes up and publishers are blocked.
    broker.rabbitmqctl(&["set_disk_free_limit", "1000000GB"]).await;
    let started = Instant::now();
    while !broker.rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).await.contains("disk") {
        assert!(started.elapsed() < ALARM_PATIENCE, "the disk alarm was not raised within {ALARM_PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let dir = std::env::temp_dir().join(format!("batchscore-alarm-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input = dir.join("rows.csv");
    std::fs::write(&input, "1,2,3\n4,5,6\n").expect("input written");
    let mut submit = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    submit
        .args(["submit", "--model", "linear", "--timeout-s", "5", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.join("scores.jsonl"))
        .current_dir(common::root())
        .env_remove("RUST_LOG")
        .env("BATCHSCORE__AMQP__URL", broker.url())
        .env("BATCHSCORE__AMQP__JOBS_QUEUE", "test.alarm.jobs");
    let output = tokio::task::spawn_blocking(move || run_bounded(submit, SUBMIT_PATIENCE))
        .await
        .expect("the submit thread does not panic")
        .unwrap_or_else(|error| panic!("batchscore submit hung on a blocked broker: {error}"));
    let _ = std::fs::remove_dir_all(&dir);

    let message = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{message}");
    for said in ["blocked publishing", "resource alarm", "--timeout-s", "Free memory or disk"] {
        assert!(message.contains(said), "`{said}` missing from:\n{message}");
    }
    assert!(!message.contains("panicked"), "{message}");
}

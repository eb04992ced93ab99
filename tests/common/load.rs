//! Load for fault tests: many single-row jobs published with confirms to a durable reply queue,
//! and a collector that keeps every result (duplicates included) across broker restarts. Each
//! helper talks to the shared broker; its `_at` twin takes the URL of another (a private node).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::{json, Value};

use super::{connect_to, default_url, expected};

/// A durable quorum reply queue that outlives broker restarts and client connections.
pub async fn declare_reply_queue(name: &str) {
    declare_reply_queue_at(&default_url(), name).await;
}

pub async fn declare_reply_queue_at(url: &str, name: &str) {
    let connection = connect_to(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(name.into(), options, arguments).await.expect("reply queue");
}

pub async fn delete_queue(name: &str) {
    delete_queue_at(&default_url(), name).await;
}

pub async fn delete_queue_at(url: &str, name: &str) {
    let connection = connect_to(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let _ = channel.queue_delete(name.into(), QueueDeleteOptions::default()).await;
}

/// Publishes jobs `0..n` (persistent, confirmed) to `jobs_queue`, replying to `reply_queue`.
/// Job `i` scores fixture row `i % 64` of `linear` v1, so every result can be checked.
pub async fn publish_jobs(jobs_queue: &str, reply_queue: &str, n: usize) {
    publish_jobs_at(&default_url(), jobs_queue, reply_queue, n).await;
}

pub async fn publish_jobs_at(url: &str, jobs_queue: &str, reply_queue: &str, n: usize) {
    publish_job_range_at(url, jobs_queue, reply_queue, 0..n).await;
}

/// Publishes jobs `range` like [`publish_jobs_at`]: a later part of the same run.
pub async fn publish_job_range_at(url: &str, jobs_queue: &str, reply_queue: &str, range: std::ops::Range<usize>) {
    let n = range.len();
    let rows = expected("linear_v1")["rows"].clone();
    let connection = connect_to(url).await;
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(Default::default()).await.expect("confirms");
    let published = async {
        let mut confirms = Vec::with_capacity(n);
        for i in range {
            let body = serde_json::to_vec(
                &json!({"job_id": format!("job-{i}"), "model": "linear", "model_version": "1", "rows": [rows[i % 64]]}),
            )
            .expect("job serialises");
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_reply_to(reply_queue.into());
            let confirm = channel
                .basic_publish("".into(), jobs_queue.into(), BasicPublishOptions::default(), &body, properties)
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack(), "broker refused a job");
        }
    };
    // A broker that blocks publishers (a resource alarm) never confirms: fail instead of hanging.
    tokio::time::timeout(CONFIRM_PATIENCE, published)
        .await
        .unwrap_or_else(|_| panic!("the broker did not confirm {n} jobs within {CONFIRM_PATIENCE:?}"));
}

/// Longest the broker may take to confirm a whole load, 20,000 persistent jobs on a busy machine.
const CONFIRM_PATIENCE: Duration = Duration::from_secs(300);

/// Messages waiting in `queue` (0 when it cannot be asked, e.g. while the broker restarts).
pub async fn depth(queue: &str) -> u32 {
    depth_at(&default_url(), queue).await
}

pub async fn depth_at(url: &str, queue: &str) -> u32 {
    let Ok(connection) = lapin::Connection::connect(url, Default::default()).await else {
        return 0;
    };
    let Ok(channel) = connection.create_channel().await else { return 0 };
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.map(|q| q.message_count()).unwrap_or(0)
}

/// Waits until `queue` holds at least `n` messages.
pub async fn wait_for_depth(queue: &str, n: u32, timeout: Duration) {
    wait_for_depth_at(&default_url(), queue, n, timeout).await;
}

pub async fn wait_for_depth_at(url: &str, queue: &str, n: u32, timeout: Duration) {
    let started = Instant::now();
    while depth_at(url, queue).await < n {
        assert!(started.elapsed() < timeout, "{queue} did not reach {n} messages in {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every result received per job id, until each of `0..n` has one; reconnects when the broker
/// goes away. Results are acknowledged only after they are recorded.
pub async fn collect(reply_queue: &str, n: usize, timeout: Duration) -> HashMap<String, Vec<Value>> {
    collect_at(&default_url(), reply_queue, n, timeout).await
}

pub async fn collect_at(url: &str, reply_queue: &str, n: usize, timeout: Duration) -> HashMap<String, Vec<Value>> {
    let started = Instant::now();
    let mut results: HashMap<String, Vec<Value>> = HashMap::new();
    while results.len() < n {
        if started.elapsed() > timeout {
            let missing: Vec<String> =
                (0..n).map(|i| format!("job-{i}")).filter(|id| !results.contains_key(id)).take(10).collect();
            panic!("only {} of {n} jobs answered within {timeout:?}; missing include {missing:?}", results.len());
        }
        let Ok(connection) = lapin::Connection::connect(url, Default::default()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(channel) = connection.create_channel().await else { continue };
        let _ = channel.basic_qos(1000, Default::default()).await;
        let Ok(mut consumer) = channel
            .basic_consume(reply_queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while results.len() < n && started.elapsed() < timeout {
            let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await else {
                break;
            };
            let body: Value = serde_json::from_slice(&delivery.data).expect("result is JSON");
            let id = body["job_id"].as_str().expect("job id").to_string();
            results.entry(id).or_default().push(body);
            let _ = delivery.ack(Default::default()).await;
        }
    }
    results
}

/// Checks every job `0..n` was answered correctly and duplicates agree: same labels and model
/// version, scores within float32 rounding (a row's last bits can depend on the rows it was
/// batched with). Returns (results received, duplicates, duplicates that are bit-identical).
pub fn verify(results: &HashMap<String, Vec<Value>>, n: usize) -> (usize, usize, usize) {
    let fixture = expected("linear_v1");
    let (mut received, mut identical) = (0, 0);
    for i in 0..n {
        let id = format!("job-{i}");
        let answers = results.get(&id).unwrap_or_else(|| panic!("{id} has no result"));
        received += answers.len();
        let first = &answers[0];
        assert_eq!(first["status"], "ok", "{first}");
        super::assert_close(&first["outputs"], &super::expected_slice(&fixture["outputs"], i % 64..i % 64 + 1), &id);
        for duplicate in &answers[1..] {
            assert_eq!(
                duplicate["outputs"]["label"], first["outputs"]["label"],
                "{id}: duplicates carry the same labels"
            );
            super::assert_close(&duplicate["outputs"], &first["outputs"], &format!("{id} duplicate"));
            assert_eq!(duplicate["model_version"], first["model_version"], "{id}");
            identical += usize::from(duplicate["outputs"] == first["outputs"]);
        }
    }
    (received, received - n, identical)
}

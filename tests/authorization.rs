//! Authenticated publishers, per-model authorization and reply_to rules (docs/SECURITY.md),
//! against a private RabbitMQ node (`common::private_broker`) with two publisher users,
//! `core-banking` and `risk-nightly`, next to `guest`. RabbitMQ refuses a message whose `user_id`
//! is not the user its connection logged in as, so `user_id` names the publisher. Each test runs
//! a worker process on the node's plaintext loopback listener, with its `security` settings in a
//! settings file (or the environment), and a repository of two copies of the `linear` fixture:
//! `guarded`, whose config.yaml lists `allowed_publishers: [core-banking]`, and `open`, which
//! lists none. The node is booted once for every test of this file.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use batchscore::amqp::publisher::ERROR_CODE_HEADER;
use batchscore::settings::Settings;
use common::private_broker::{self, PrivateBroker};
use common::{expected, get, sample, Client, WorkerProcess};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::{json, Value};

const CORE: &str = "core-banking";
const RISK: &str = "risk-nightly";

/// Longest a worker may take to start: loading the fixture models takes a few seconds on a busy
/// machine.
const START_UP_PATIENCE: Duration = Duration::from_secs(120);

/// The node every test here shares, and its publishers' passwords.
struct Node {
    broker: PrivateBroker,
    passwords: Vec<(&'static str, String)>,
}

impl Node {
    /// The node's plaintext URL, logged in as `user` (a publisher, or `guest`).
    fn url_as(&self, user: &str) -> String {
        match self.passwords.iter().find(|(name, _)| *name == user) {
            Some((_, password)) => self.broker.url_as(user, password),
            None => self.broker.url(),
        }
    }
}

/// The shared node, booted by the first test that needs it.
fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    private_broker::shared(&NODE, boot)
}

async fn boot() -> Node {
    let broker = PrivateBroker::start().await;
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let passwords = vec![(CORE, format!("Core-{}", &unique[..12])), (RISK, format!("Risk-{}", &unique[12..24]))];
    for (user, password) in &passwords {
        broker.add_user(user, password).await;
    }
    Node { broker, passwords }
}

/// `guarded` (only core-banking may score it) and `open`, both version 1 of `linear`.
fn repository() -> PathBuf {
    let root = common::private_repository("guarded", "linear", 1);
    let config = root.join("guarded/config.yaml");
    let text = std::fs::read_to_string(&config).expect("fixture config");
    std::fs::write(&config, format!("{text}allowed_publishers: [{CORE}]\n")).expect("allowed_publishers");
    common::add_to_repository(&root, "open", "linear", 1);
    root
}

/// A worker process on the node, with `security` (YAML) in its settings file and `env` on top.
struct Worker {
    settings: Settings,
    metrics: SocketAddr,
    repository: PathBuf,
    _process: WorkerProcess,
}

impl Worker {
    async fn start(test: &str, security: &str, env: &[(&str, &str)]) -> Worker {
        let node = node();
        let repository = repository();
        let mut settings = common::settings(test, &repository);
        settings.amqp.url = node.broker.url();
        let file = node.broker.dir().join(format!("{test}-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&file, security).expect("settings file");
        let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().expect("an address");
        let mut command = common::worker_command(&settings, &metrics.to_string());
        command.arg("--config").arg(&file).env("BATCHSCORE__AMQP__URL", &settings.amqp.url);
        for (key, value) in env {
            command.env(key, value);
        }
        let process = common::spawn_logged(command, &settings);
        common::wait_until_ready(metrics, START_UP_PATIENCE).await;
        Worker { settings, metrics, repository, _process: process }
    }

    /// A client logged in as `user` (a publisher, or `guest`) whose reply queue is `reply_queue`.
    async fn client(&self, user: &str, reply_queue: &str) -> Client {
        Client::at_replying_to(&node().url_as(user), &self.settings, reply_queue).await
    }

    /// A client reading the worker's results queue, where the results of jobs without
    /// `reply_to` go.
    async fn results_queue(&self) -> Client {
        Client::on_queue(&node().broker.url(), &self.settings, &self.settings.amqp.results_queue).await
    }

    /// A scrape taken once every job received is answered and acknowledged, `jobs` of them at
    /// least. Not the scrape that shows it: a scrape reads the series one after the other, so it
    /// can show the last job settled yet a counter read before the job bumped it.
    async fn settled_scrape(&self, jobs: f64) -> String {
        let started = Instant::now();
        loop {
            let (_, scrape) = get(self.metrics, "/metrics").expect("scrape");
            let settled = sample(&scrape, "batchscore_inflight_jobs", &[]) == 0.0
                && sample(&scrape, "batchscore_jobs_completed_total", &[]) >= jobs;
            if settled {
                return get(self.metrics, "/metrics").expect("scrape").1;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "jobs not settled within 60 s:\n{scrape}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `n` dead-lettered jobs, once all of them have arrived, by job id.
    async fn dead_letters(&self, n: usize) -> Vec<(String, String)> {
        let connection = common::connect_to(&node().broker.url()).await;
        let channel = connection.create_channel().await.expect("channel");
        let (started, mut found) = (Instant::now(), Vec::new());
        while found.len() < n {
            for message in common::take_all(&channel, &self.settings.amqp.dead_letter_queue).await {
                let body: Value = serde_json::from_slice(&message.delivery.data).expect("dead letters are the jobs");
                let headers = message.delivery.properties.headers().clone().unwrap_or_default();
                let code = match headers.inner().get(ERROR_CODE_HEADER) {
                    Some(AMQPValue::LongString(code)) => code.to_string(),
                    other => panic!("dead letter without {ERROR_CODE_HEADER}: {other:?}"),
                };
                found.push((body["job_id"].as_str().unwrap_or_default().to_string(), code));
            }
            assert!(started.elapsed() < Duration::from_secs(30), "only {found:?} of {n} dead letters arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        found.sort();
        found
    }

    /// Kills the worker, then removes its queues and repository.
    async fn stop(self) {
        let Worker { settings, repository, _process: process, .. } = self;
        drop(process);
        common::delete_topology_at(&node().broker.url(), &settings).await;
        let _ = std::fs::remove_dir_all(&repository);
    }
}

/// A job of the fixture's first `rows` rows for `model`.
fn job(id: &str, model: &str, rows: usize) -> Vec<u8> {
    let fixture = expected("linear_v1");
    let rows = &fixture["rows"].as_array().expect("rows")[..rows];
    serde_json::to_vec(&json!({"job_id": id, "model": model, "rows": rows})).expect("a job serialises")
}

/// JSON, published as `user_id` when there is one.
fn properties(user_id: Option<&str>) -> BasicProperties {
    let properties = BasicProperties::default().with_content_type("application/json".into());
    match user_id {
        Some(user) => properties.with_user_id(user.into()),
        None => properties,
    }
}

fn assert_forbidden(result: &Value, job_id: &str, needle: &str) {
    assert_eq!((&result["job_id"], &result["status"]), (&json!(job_id), &json!("error")), "{result}");
    assert_eq!(result["error"]["code"], "forbidden", "{result}");
    let message = result["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{needle:?} missing from {message:?}");
}

/// Messages waiting in `queue`, which nobody consumes.
async fn waiting(url: &str, queue: &str) -> u32 {
    let connection = common::connect_to(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("the queue exists").message_count()
}

/// With `allowed_publishers` on a model and reply_to patterns (`{user}.results*` by default,
/// `risk.*` for risk-nightly): the broker refuses a spoofed user_id before any worker sees it;
/// the allowed publisher is scored and named; a job without user_id and one from a publisher the
/// model does not list are `forbidden`, dead-lettered and not scored; a reply_to outside the
/// publisher's pattern is `forbidden`, answered in the results queue and never written to; a
/// misspelt model's answer lists only the models the publisher may score; and
/// `batchscore_jobs_received_total` counts every job by publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_are_authenticated_and_authorized_per_model_and_reply_queue() {
    let security = format!(
        "security:\n  reply_to:\n    default: \"{{user}}.results*\"\n    publishers:\n      {RISK}: \"risk.*\"\n"
    );
    let worker = Worker::start("authz", &security, &[]).await;
    let node = node();
    let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let jobs_queue = worker.settings.amqp.jobs_queue.clone();

    // risk-nightly claims to be core-banking: the broker closes its channel and drops the job.
    let spoofer = common::connect_to(&node.url_as(RISK)).await;
    let channel = spoofer.create_channel().await.expect("channel");
    channel.confirm_select(Default::default()).await.expect("confirms");
    let spoofed = async {
        let confirm = channel
            .basic_publish(
                "".into(),
                jobs_queue.as_str().into(),
                BasicPublishOptions::default(),
                &job("spoofed", "guarded", 1),
                properties(Some(CORE)),
            )
            .await?;
        confirm.await
    };
    let refusal = tokio::time::timeout(common::BROKER_PATIENCE, spoofed)
        .await
        .expect("the broker answers in time")
        .expect_err("the broker refuses a user_id that is not the connection's user");
    match refusal.kind() {
        lapin::ErrorKind::ProtocolError(error) => {
            assert_eq!(error.get_id(), 406, "PRECONDITION_FAILED: {error}");
            assert!(error.get_message().as_str().contains("user_id"), "{error}");
        }
        other => panic!("expected the channel closed with PRECONDITION_FAILED, got {other:?}"),
    }
    assert!(!channel.status().connected(), "the spoofer's channel is closed");

    // core-banking may score `guarded`; its result names it, in its own reply queue.
    let mut core = worker.client(CORE, &format!("{CORE}.results.{unique}")).await;
    core.send_raw(&job("allowed", "guarded", 3), properties(Some(CORE))).await;
    let allowed = core.result().await;
    assert_eq!((&allowed["status"], &allowed["publisher"]), (&json!("ok"), &json!(CORE)), "{allowed}");
    let fixture = expected("linear_v1");
    common::assert_close(
        &allowed["outputs"]["probabilities"],
        &json!(fixture["outputs"]["probabilities"].as_array().unwrap()[..3]),
        "probabilities",
    );

    // A job without user_id, on a model that lists its publishers; without reply_to, answered in
    // the results queue.
    let mut results_queue = worker.results_queue().await;
    let guest = worker.client("guest", &format!("guest.results.{unique}")).await;
    guest.publish(&job("anonymous", "guarded", 1), properties(None)).await;
    let anonymous = results_queue.result().await;
    assert_forbidden(&anonymous, "anonymous", "no user_id");
    assert!(anonymous.get("publisher").is_none(), "{anonymous}");

    // risk-nightly is not among guarded's publishers; its reply queue matches its own pattern.
    let mut risk = worker.client(RISK, &format!("risk.{unique}")).await;
    risk.send_raw(&job("not-allowed", "guarded", 2), properties(Some(RISK))).await;
    let not_allowed = risk.result().await;
    assert_forbidden(&not_allowed, "not-allowed", "may not score model guarded");
    assert_eq!(not_allowed["publisher"], RISK, "{not_allowed}");
    // ...and may score `open`.
    risk.send_raw(&job("risk-open", "open", 1), properties(Some(RISK))).await;
    let risk_open = risk.result().await;
    assert_eq!((&risk_open["status"], &risk_open["publisher"]), (&json!("ok"), &json!(RISK)), "{risk_open}");

    // core-banking names risk-nightly's reply queue: forbidden, and answered in the results queue.
    let stolen = format!("risk.stolen.{unique}");
    let declare = QueueDeclareOptions { durable: true, ..Default::default() };
    let admin = common::connect_to(&node.broker.url()).await;
    let admin_channel = admin.create_channel().await.expect("channel");
    admin_channel.queue_declare(stolen.as_str().into(), declare, FieldTable::default()).await.expect("queue");
    core.publish(&job("wrong-reply", "open", 1), properties(Some(CORE)).with_reply_to(stolen.as_str().into())).await;
    let wrong_reply = results_queue.result().await;
    assert_forbidden(&wrong_reply, "wrong-reply", &format!("reply_to \"{stolen}\""));
    assert_eq!(wrong_reply["publisher"], CORE, "{wrong_reply}");

    // A user no setting names counts as `other`.
    guest.publish(&job("other", "open", 1), properties(Some("guest"))).await;
    let other = results_queue.result().await;
    assert_eq!((&other["status"], &other["publisher"]), (&json!("ok"), &json!("guest")), "{other}");

    // A misspelt model: the answer lists the models risk-nightly may score, not `guarded`.
    risk.send_raw(&job("misspelt", "gaurded", 1), properties(Some(RISK))).await;
    let misspelt = risk.result().await;
    assert_eq!(misspelt["error"]["code"], "unknown_model", "{misspelt}");
    let message = misspelt["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("(available: open)"), "{message}");

    let scrape = worker.settled_scrape(7.0).await;
    assert_eq!(waiting(&node.broker.url(), &stolen).await, 0, "the disallowed reply queue received nothing");
    admin_channel.queue_delete(stolen.as_str().into(), Default::default()).await.expect("queue deleted");
    let received = |labels: &[(&str, &str)]| sample(&scrape, "batchscore_jobs_received_total", labels);
    assert_eq!(received(&[]), 7.0, "the spoofed job never reached the worker:\n{scrape}");
    assert_eq!(received(&[("publisher", CORE)]), 2.0, "{scrape}");
    assert_eq!(received(&[("publisher", RISK)]), 3.0, "named by security.reply_to.publishers:\n{scrape}");
    assert_eq!(received(&[("publisher", "none")]), 1.0, "{scrape}");
    assert_eq!(received(&[("publisher", "other")]), 1.0, "{scrape}");
    assert_eq!(received(&[("model", "guarded"), ("publisher", CORE)]), 1.0, "{scrape}");
    // Only core-banking's 3 rows of `guarded` were scored.
    assert_eq!(sample(&scrape, "batchscore_rows_scored_total", &[("model", "guarded")]), 3.0, "{scrape}");
    assert_eq!(sample(&scrape, "batchscore_batch_rows_sum", &[("model", "guarded")]), 3.0, "{scrape}");
    assert_eq!(sample(&scrape, "batchscore_job_errors_total", &[("code", "forbidden")]), 3.0, "{scrape}");

    let dead = worker.dead_letters(4).await;
    let forbidden = |id: &str| (id.to_string(), "forbidden".to_string());
    let unknown = ("misspelt".to_string(), "unknown_model".to_string());
    assert_eq!(dead, vec![forbidden("anonymous"), unknown, forbidden("not-allowed"), forbidden("wrong-reply")]);
    worker.stop().await;
}

/// `security.require_user_id` (here from the environment): a job without user_id is `forbidden`
/// and dead-lettered whatever model it names; one with user_id is scored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_user_id_refuses_jobs_without_one() {
    let worker = Worker::start(
        "authz-required",
        "security:\n  require_user_id: false\n",
        &[("BATCHSCORE__SECURITY__REQUIRE_USER_ID", "true")],
    )
    .await;
    let mut results_queue = worker.results_queue().await;
    let guest =
        worker.client("guest", &format!("guest.results.{}", &uuid::Uuid::new_v4().simple().to_string()[..8])).await;
    guest.publish(&job("anonymous", "open", 1), properties(None)).await;
    assert_forbidden(&results_queue.result().await, "anonymous", "security.require_user_id");
    guest.publish(&job("identified", "open", 1), properties(Some("guest"))).await;
    let identified = results_queue.result().await;
    assert_eq!((&identified["status"], &identified["publisher"]), (&json!("ok"), &json!("guest")), "{identified}");
    assert_eq!(worker.dead_letters(1).await, vec![("anonymous".to_string(), "forbidden".to_string())]);
    worker.stop().await;
}

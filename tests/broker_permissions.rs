//! The broker side of least privilege, as shipped in `deploy/rabbitmq/`: a private RabbitMQ node
//! booted from that directory's own `rabbitmq.conf`, `enabled_plugins` and `definitions.json`
//! (`PrivateBroker::start_deployed`: only paths and ports change), with certificates made at test
//! time for the definitions' users, who log in by certificate as in production. Booted once for
//! every test of this file. The tests prove what the files promise: TLS only, certificate login
//! only, exactly the shipped users; each user may do what its permissions allow and nothing
//! else; the queues are declared as the worker would declare them; and the worker, logged in as
//! `worker` and enforcing the publisher rules, scores jobs from both publishers end to end with
//! those permissions alone, including `batchscore submit` run as a publisher.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use batchscore::amqp::declare_topology;
use batchscore::settings::{AmqpSettings, Settings};
use common::certificates::Authority;
use common::private_broker::PrivateBroker;
use common::{expected, fixtures_repository, run_bounded, WorkerProcess};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};

/// The shipped broker configuration.
const DEPLOYMENT: &str = "deploy/rabbitmq";
/// The vhost of the definitions.
const VHOST: &str = "batchscore";
const WORKER: &str = "worker";
const CORE_BANKING: &str = "core-banking";
const RISK_NIGHTLY: &str = "risk-nightly";
const AUDITOR: &str = "auditor";
const OPERATIONS: &str = "operations";
const USERS: [&str; 5] = [WORKER, CORE_BANKING, RISK_NIGHTLY, AUDITOR, OPERATIONS];
/// The exchange publishers send jobs to (the definitions bind it to the jobs queues).
const SUBMIT: &str = "scoring.submit";
/// The bulk lane's queue in the definitions (settings.yaml has no bulk lane by default).
const BULK_QUEUE: &str = "scoring.bulk";
/// The audit stream of the definitions and of settings.yaml.
const AUDIT_STREAM: &str = "scoring.audit";
/// A client certificate from the deployment's CA whose common name is no user.
const STRANGER: &str = "mallory";

/// Longest a worker expected to stop on its own may run (it loads models first).
const START_UP_PATIENCE: Duration = Duration::from_secs(120);

/// The node every test here shares, and the certificates of its users.
struct Node {
    broker: PrivateBroker,
    /// CA and certificates, under the node's directory.
    pki: PathBuf,
}

impl Node {
    fn ca_file(&self) -> PathBuf {
        self.pki.join("deployment-ca.pem")
    }

    /// Settings that log `user` in by its certificate (SASL EXTERNAL) on the shipped vhost.
    fn login(&self, user: &str) -> AmqpSettings {
        let mut amqp = shipped_amqp();
        amqp.url = self.broker.amqps_url_to(VHOST, "", "localhost", "?auth_mechanism=external");
        amqp.tls.ca_file = Some(self.ca_file());
        amqp.tls.cert_file = Some(self.pki.join(format!("{user}.pem")));
        amqp.tls.key_file = Some(self.pki.join(format!("{user}.key")));
        amqp.connection_name = format!("batchscore-permissions-{user}");
        amqp
    }

    async fn connect(&self, user: &str) -> Connection {
        let settings = self.login(user);
        tokio::time::timeout(common::BROKER_PATIENCE, batchscore::amqp::connect(&settings))
            .await
            .unwrap_or_else(|_| panic!("no connection for {user} within {:?}", common::BROKER_PATIENCE))
            .unwrap_or_else(|error| panic!("{user} cannot log in by certificate: {error}"))
    }

    async fn ctl(&self, args: &[&str]) -> String {
        self.broker.rabbitmqctl(args).await
    }
}

/// The shared node, booted by the first test that needs it. It is never dropped: its watchdog
/// stops it and removes its directory when the test process exits.
fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| std::thread::spawn(boot).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
}

fn boot() -> Node {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let made = std::env::temp_dir().join(format!("batchscore-pki-{}", uuid::Uuid::new_v4().simple()));
        let authority = Authority::new(&made, "deployment");
        for user in USERS.into_iter().chain([STRANGER]) {
            authority.client(user, user);
        }
        let tls = authority.listener(true);
        let broker = PrivateBroker::start_deployed(&common::root().join(DEPLOYMENT), &tls).await;
        let pki = broker.keep(&made, "pki");
        Node { broker, pki }
    })
}

/// Points a `batchscore` command at the node with `amqp`'s URL and certificate login.
fn log_in<'a>(command: &'a mut std::process::Command, amqp: &AmqpSettings) -> &'a mut std::process::Command {
    command
        .env("BATCHSCORE__AMQP__URL", &amqp.url)
        .env("BATCHSCORE__AMQP__TLS__CA_FILE", amqp.tls.ca_file.as_ref().expect("a CA"))
        .env("BATCHSCORE__AMQP__TLS__CERT_FILE", amqp.tls.cert_file.as_ref().expect("a certificate"))
        .env("BATCHSCORE__AMQP__TLS__KEY_FILE", amqp.tls.key_file.as_ref().expect("a key"))
}

/// The queue and exchange names of the shipped settings.yaml, with the definitions' bulk lane.
fn shipped_amqp() -> AmqpSettings {
    let settings = Settings::load(&common::root().join("settings.yaml"), true).expect("settings.yaml loads");
    AmqpSettings { bulk_queue: BULK_QUEUE.into(), ..settings.amqp }
}

/// The queues of the definitions, as settings.yaml names them (the audit stream included), and
/// the publishers' results queues.
fn shipped_queues() -> Vec<String> {
    let amqp = shipped_amqp();
    let audit = Settings::load(&common::root().join("settings.yaml"), true).expect("settings.yaml loads").audit;
    let mut queues = vec![amqp.jobs_queue, amqp.bulk_queue, amqp.results_queue, amqp.dead_letter_queue, audit.stream];
    queues.extend([CORE_BANKING, RISK_NIGHTLY].map(results_queue));
    queues
}

/// A publisher's own results queue.
fn results_queue(publisher: &str) -> String {
    format!("{publisher}.results")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_files_make_a_tls_only_node_with_certificate_login_and_only_the_shipped_users() {
    let node = node();
    // No plaintext AMQP listener: only AMQP over TLS (and clustering, and Prometheus metrics).
    let status = node.ctl(&["status"]).await;
    let listeners: Vec<&str> = status.lines().filter(|line| line.contains("protocol:")).collect();
    assert!(listeners.iter().any(|l| l.contains("protocol: amqp/ssl")), "no TLS listener:\n{status}");
    assert!(!listeners.iter().any(|l| l.contains("protocol: amqp,")), "a plaintext listener:\n{status}");

    // The definitions replace the default data: no guest, no "/" vhost, no password.
    let users = node.ctl(&["list_users", "-q", "--no-table-headers"]).await;
    let mut names: Vec<&str> = users.lines().filter_map(|line| line.split('\t').next()).collect();
    names.sort_unstable();
    let mut shipped = USERS.to_vec();
    shipped.sort_unstable();
    assert_eq!(names, shipped, "{users}");
    assert_eq!(node.ctl(&["list_vhosts", "-q", "--no-table-headers"]).await.trim(), VHOST);
    let exported: Value =
        serde_json::from_str(&node.ctl(&["export_definitions", "-", "--format", "json"]).await).expect("definitions");
    for user in exported["users"].as_array().expect("users") {
        assert_eq!(user["password_hash"], "", "a user with a password: {user}");
    }

    // Every user logs in by its certificate.
    for user in USERS {
        let connection = node.connect(user).await;
        node.broker.wait_for_connection(user, "EXTERNAL", true).await;
        let _ = connection.close(200, "logged in".into()).await;
    }

    // A certificate of the right CA for a name that is no user is refused at login.
    let Err(error) = batchscore::amqp::connect(&node.login(STRANGER)).await else { panic!("{STRANGER} logged in") };
    let message = error.to_string();
    assert!(message.contains("refused the certificate login"), "{message}");

    // PLAIN is not offered, whatever the password.
    let mut plain = node.login(WORKER);
    plain.url = node.broker.amqps_url_to(VHOST, "worker:guessed", "localhost", "");
    // The broker offers EXTERNAL only: it drops the connection rather than judge the password.
    match batchscore::amqp::connect(&plain).await {
        Err(batchscore::amqp::AmqpError::Connect { .. }) => {}
        Err(other) => panic!("a password login got as far as the password: {other}"),
        Ok(_) => panic!("a password login was accepted"),
    }

    // No client certificate, no TLS session (ssl_options.fail_if_no_peer_cert).
    let mut anonymous = node.login(WORKER);
    anonymous.url = node.broker.amqps_url_to(VHOST, "worker:guessed", "localhost", "");
    (anonymous.tls.cert_file, anonymous.tls.key_file) = (None, None);
    // (Which error reaches the client, the broker's alert or the reset of the connection, is a
    // race under TLS 1.3: `a_worker_without_a_client_certificate_exits_2_naming_the_settings`
    // checks the message the worker makes of it.)
    assert!(batchscore::amqp::connect(&anonymous).await.is_err(), "a client without a certificate was accepted");
}

/// What the broker said to one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Allowed,
    /// 403 ACCESS_REFUSED: the user lacks the permission.
    Refused,
    /// Any other error: the test's own mistake, or the definitions disagree with the worker.
    Failed(String),
}

fn outcome<T>(result: Result<T, lapin::Error>) -> Outcome {
    match result {
        Ok(_) => Outcome::Allowed,
        Err(error) => match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 403 => Outcome::Refused,
            _ => Outcome::Failed(error.to_string()),
        },
    }
}

/// One AMQP operation, on a fresh channel (a refused operation closes its channel).
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `basic.publish` to `exchange` ("" is the default exchange) with `key`, confirmed.
    Publish { exchange: &'static str, key: &'static str },
    /// `basic.consume` (then closing the channel, which returns anything delivered).
    Consume(&'static str),
    /// `queue.purge`.
    Purge(&'static str),
    /// `queue.delete`.
    Delete(&'static str),
    /// `queue.bind` of a queue to an exchange.
    Bind { queue: &'static str, exchange: &'static str, key: &'static str },
    /// The worker's declarations of the shipped topology: passive (`amqp.declare_queues: false`)
    /// or not (`true`, the default).
    Topology { declare: bool },
    /// A declaration of the jobs queue with another delivery limit.
    RedeclareJobsQueue,
    /// Declaring a new queue and deleting it again.
    CreateAndDelete(&'static str),
}

impl Op {
    async fn run(self, connection: &Connection) -> Outcome {
        let channel = connection.create_channel().await.expect("a channel");
        let ran = tokio::time::timeout(common::BROKER_PATIENCE, self.run_on(&channel)).await;
        let outcome = ran.unwrap_or_else(|_| panic!("{self:?}: no answer within {:?}", common::BROKER_PATIENCE));
        let _ = channel.close(200, "checked".into()).await;
        outcome
    }

    async fn run_on(self, channel: &Channel) -> Outcome {
        match self {
            Op::Publish { exchange, key } => {
                if let Err(error) = channel.confirm_select(Default::default()).await {
                    return outcome::<()>(Err(error));
                }
                let properties = BasicProperties::default().with_message_id("permission-probe".into());
                let published = channel
                    .basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), b"probe", properties)
                    .await;
                match published {
                    Ok(confirm) => match confirm.await {
                        Ok(confirmation) if confirmation.is_ack() => Outcome::Allowed,
                        Ok(confirmation) => Outcome::Failed(format!("not confirmed: {confirmation:?}")),
                        Err(error) => outcome::<()>(Err(error)),
                    },
                    Err(error) => outcome::<()>(Err(error)),
                }
            }
            Op::Consume(queue) => {
                let consume = async {
                    channel.basic_qos(1, Default::default()).await?;
                    channel
                        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                        .await
                };
                outcome(consume.await)
            }
            Op::Purge(queue) => outcome(channel.queue_purge(queue.into(), QueuePurgeOptions::default()).await),
            Op::Delete(queue) => outcome(channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await),
            Op::Bind { queue, exchange, key } => outcome(
                channel
                    .queue_bind(
                        queue.into(),
                        exchange.into(),
                        key.into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await,
            ),
            Op::Topology { declare } => {
                let amqp = AmqpSettings { declare_queues: declare, ..shipped_amqp() };
                match declare_topology(channel, &amqp).await {
                    Ok(()) => Outcome::Allowed,
                    Err(batchscore::amqp::AmqpError::AccessRefused { .. }) => Outcome::Refused,
                    Err(batchscore::amqp::AmqpError::Queue { source, .. }) => outcome::<()>(Err(source)),
                    Err(other) => Outcome::Failed(other.to_string()),
                }
            }
            Op::RedeclareJobsQueue => {
                let amqp = shipped_amqp();
                let mut arguments = FieldTable::default();
                arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
                arguments.insert("x-delivery-limit".into(), AMQPValue::LongUInt(amqp.delivery_limit + 50));
                let durable = QueueDeclareOptions { durable: true, ..Default::default() };
                outcome(channel.queue_declare(amqp.jobs_queue.as_str().into(), durable, arguments).await)
            }
            Op::CreateAndDelete(queue) => {
                let create = async {
                    channel.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await?;
                    channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await
                };
                outcome(create.await)
            }
        }
    }
}

/// One rule of the definitions: an operation, the users it is allowed to, and the users it is not
/// tried with (it would destroy what other tests use); everyone else is refused.
struct Rule {
    what: &'static str,
    op: Op,
    allowed: &'static [&'static str],
    untried: &'static [&'static str],
}

/// Every rule the definitions make, as the shipped names spell them (checked against
/// settings.yaml by `the_rules_name_the_shipped_queues`).
const RULES: &[Rule] = &[
    // Jobs go in through the submit exchange; results and dead letters only from the worker.
    Rule {
        what: "publish a job (the submit exchange)",
        op: Op::Publish { exchange: SUBMIT, key: "scoring.jobs" },
        allowed: &[CORE_BANKING, RISK_NIGHTLY, OPERATIONS],
        untried: &[],
    },
    Rule {
        what: "publish a bulk job (the submit exchange)",
        op: Op::Publish { exchange: SUBMIT, key: "scoring.bulk" },
        allowed: &[CORE_BANKING, RISK_NIGHTLY, OPERATIONS],
        untried: &[],
    },
    Rule {
        what: "write a result into core-banking.results (the default exchange)",
        op: Op::Publish { exchange: "", key: "core-banking.results" },
        allowed: &[WORKER, OPERATIONS],
        untried: &[],
    },
    Rule {
        what: "write a result into risk-nightly.results (the default exchange)",
        op: Op::Publish { exchange: "", key: "risk-nightly.results" },
        allowed: &[WORKER, OPERATIONS],
        untried: &[],
    },
    Rule {
        what: "append to the audit trail (the default exchange, into the stream)",
        op: Op::Publish { exchange: "", key: AUDIT_STREAM },
        allowed: &[WORKER, OPERATIONS],
        untried: &[],
    },
    Rule {
        what: "dead-letter a job (the dead-letter exchange)",
        op: Op::Publish { exchange: "scoring.dlx", key: "scoring.jobs" },
        allowed: &[WORKER, OPERATIONS],
        untried: &[],
    },
    // Reading: the worker the jobs, each publisher its own results, operations everything.
    Rule { what: "consume jobs", op: Op::Consume("scoring.jobs"), allowed: &[WORKER, OPERATIONS], untried: &[] },
    Rule { what: "consume bulk jobs", op: Op::Consume("scoring.bulk"), allowed: &[WORKER, OPERATIONS], untried: &[] },
    Rule {
        what: "consume core-banking's results",
        op: Op::Consume("core-banking.results"),
        allowed: &[CORE_BANKING, OPERATIONS],
        untried: &[],
    },
    Rule {
        what: "consume risk-nightly's results",
        op: Op::Consume("risk-nightly.results"),
        allowed: &[RISK_NIGHTLY, OPERATIONS],
        untried: &[],
    },
    Rule {
        what: "consume the results of jobs without reply_to",
        op: Op::Consume("scoring.results"),
        allowed: &[OPERATIONS],
        untried: &[],
    },
    Rule { what: "consume dead letters", op: Op::Consume("scoring.dlq"), allowed: &[OPERATIONS], untried: &[] },
    Rule {
        what: "read the audit trail (the worker: its own last record, at start-up)",
        op: Op::Consume(AUDIT_STREAM),
        allowed: &[WORKER, AUDITOR, OPERATIONS],
        untried: &[],
    },
    // Read permission includes purging: the worker and operations may (not tried here, as it would
    // empty the queue under the other tests).
    Rule { what: "purge the jobs queue", op: Op::Purge("scoring.jobs"), allowed: &[], untried: &[WORKER, OPERATIONS] },
    Rule {
        what: "bind one's results queue to the submit exchange (a copy of every job)",
        op: Op::Bind { queue: "core-banking.results", exchange: SUBMIT, key: "scoring.jobs" },
        allowed: &[],
        untried: &[OPERATIONS],
    },
    // Configuring: operations only.
    Rule {
        what: "check the topology passively (amqp.declare_queues: false)",
        op: Op::Topology { declare: false },
        allowed: &[WORKER, CORE_BANKING, RISK_NIGHTLY, AUDITOR, OPERATIONS],
        untried: &[],
    },
    Rule {
        what: "declare the topology (amqp.declare_queues: true)",
        op: Op::Topology { declare: true },
        allowed: &[OPERATIONS],
        untried: &[],
    },
    Rule {
        what: "declare the jobs queue with another delivery limit",
        op: Op::RedeclareJobsQueue,
        allowed: &[],
        // Operations may, and is answered 406 PRECONDITION_FAILED: the queue exists otherwise.
        untried: &[OPERATIONS],
    },
    Rule {
        what: "create a queue and delete it",
        op: Op::CreateAndDelete("permissions.scratch"),
        allowed: &[OPERATIONS],
        untried: &[],
    },
    Rule { what: "delete the jobs queue", op: Op::Delete("scoring.jobs"), allowed: &[], untried: &[OPERATIONS] },
    Rule { what: "delete the bulk queue", op: Op::Delete("scoring.bulk"), allowed: &[], untried: &[OPERATIONS] },
    Rule { what: "delete the results queue", op: Op::Delete("scoring.results"), allowed: &[], untried: &[OPERATIONS] },
    Rule { what: "delete the dead-letter queue", op: Op::Delete("scoring.dlq"), allowed: &[], untried: &[OPERATIONS] },
    Rule {
        what: "delete core-banking's results queue",
        op: Op::Delete("core-banking.results"),
        allowed: &[],
        untried: &[OPERATIONS],
    },
    Rule {
        what: "delete risk-nightly's results queue",
        op: Op::Delete("risk-nightly.results"),
        allowed: &[],
        untried: &[OPERATIONS],
    },
    Rule { what: "delete the audit stream", op: Op::Delete(AUDIT_STREAM), allowed: &[], untried: &[OPERATIONS] },
];

#[test]
fn the_rules_name_the_shipped_queues() {
    let amqp = shipped_amqp();
    let named = |op: &Op| match *op {
        Op::Consume(queue) | Op::Purge(queue) | Op::Delete(queue) | Op::Bind { queue, .. } => Some(queue),
        _ => None,
    };
    let queues = shipped_queues();
    for rule in RULES {
        if let Some(queue) = named(&rule.op).filter(|q| !q.ends_with(".scratch")) {
            assert!(queues.iter().any(|q| q == queue), "{}: {queue} is not among {queues:?}", rule.what);
        }
        if let Op::Publish { exchange, .. } = rule.op {
            assert!(["", SUBMIT, amqp.dead_letter_exchange.as_str()].contains(&exchange), "{}: {exchange}", rule.what);
        }
    }
    // The definitions declare exactly these queues and exchanges.
    let definitions: Value = serde_json::from_slice(
        &std::fs::read(common::root().join(DEPLOYMENT).join("definitions.json")).expect("definitions.json"),
    )
    .expect("definitions.json is JSON");
    let names = |kind: &str| -> Vec<String> {
        let mut names: Vec<String> = definitions[kind]
            .as_array()
            .unwrap_or_else(|| panic!("definitions.json has {kind}"))
            .iter()
            .map(|item| item["name"].as_str().expect("a name").to_string())
            .collect();
        names.sort_unstable();
        names
    };
    let mut queues = queues;
    queues.sort_unstable();
    assert_eq!(names("queues"), queues);
    let mut exchanges = vec![SUBMIT.to_string(), amqp.dead_letter_exchange.clone()];
    exchanges.sort_unstable();
    assert_eq!(names("exchanges"), exchanges);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_may_do_what_its_permissions_allow_and_nothing_else() {
    let node = node();
    let mut connections = Vec::new();
    for user in USERS {
        connections.push((user, node.connect(user).await));
    }
    let mut report = Vec::new();
    let mut wrong = 0;
    for rule in RULES {
        for (user, connection) in &connections {
            if rule.untried.contains(user) {
                continue;
            }
            let expected = if rule.allowed.contains(user) { Outcome::Allowed } else { Outcome::Refused };
            let got = rule.op.run(connection).await;
            let verdict = if got == expected { "ok" } else { "WRONG" };
            wrong += usize::from(got != expected);
            report.push(format!("{verdict:5} {user:13} {}: {got:?} (expected {expected:?})", rule.what));
        }
    }
    for (_, connection) in connections {
        let _ = connection.close(200, "checked".into()).await;
    }
    // Shown with --nocapture: the whole table of what the broker answered.
    println!("{}", report.join("\n"));
    assert_eq!(wrong, 0, "the broker's answers differ from the rules:\n{}", report.join("\n"));
}

/// Operations, the only user that may configure, is answered PRECONDITION_FAILED for the jobs
/// queue with another delivery limit: the definitions' queue is the worker's, argument for argument
/// (declaring the topology as the worker does succeeded in the rules above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_definitions_declare_the_jobs_queue_with_the_workers_arguments() {
    let node = node();
    let connection = node.connect(OPERATIONS).await;
    match Op::RedeclareJobsQueue.run(&connection).await {
        Outcome::Failed(error) => assert!(error.contains("PRECONDITION_FAILED"), "{error}"),
        other => panic!("operations redeclared the jobs queue with another delivery limit: {other:?}"),
    }
    assert_eq!(Op::Topology { declare: true }.run(&connection).await, Outcome::Allowed);
    let _ = connection.close(200, "checked".into()).await;
}

/// A job as a publisher sends it: to the submit exchange, replying to its own results queue,
/// under the user it logged in as.
async fn submit(connection: &Connection, user: &str, lane_queue: &str, reply_to: &str, job: &Value) {
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(Default::default()).await.expect("confirms");
    let job_id = job["job_id"].as_str().expect("a job id");
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(job_id.into())
        .with_correlation_id(job_id.into())
        .with_reply_to(reply_to.into())
        .with_user_id(user.into());
    let body = serde_json::to_vec(job).expect("job serialises");
    // Mandatory: a job the exchange cannot route comes back rather than vanishing.
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    let confirm = channel.basic_publish(SUBMIT.into(), lane_queue.into(), options, &body, properties).await;
    let confirmation = confirm.expect("publish").await.expect("confirm");
    assert!(confirmation.is_ack() && confirmation.take_message().is_none(), "job {job_id} was not routed");
    let _ = channel.close(200, "submitted".into()).await;
}

/// The results of jobs `job_ids` in `queue`, by job id, consumed as `connection`'s user; other
/// messages (the probes of the other tests) are taken and skipped.
async fn results_of(connection: &Connection, queue: &str, job_ids: &[&str]) -> HashMap<String, Value> {
    let channel = connection.create_channel().await.expect("channel");
    let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut deliveries = channel
        .basic_consume(queue.into(), "".into(), no_ack, FieldTable::default())
        .await
        .unwrap_or_else(|error| panic!("consuming {queue}: {error}"));
    let started = Instant::now();
    let mut results = HashMap::new();
    while results.len() < job_ids.len() {
        let left = Duration::from_secs(60).saturating_sub(started.elapsed());
        let delivery = tokio::time::timeout(left, deliveries.next())
            .await
            .unwrap_or_else(|_| panic!("only {results:?} of {job_ids:?} arrived in {queue} within 60 s"))
            .expect("consumer open")
            .expect("delivery");
        let id = delivery.properties.correlation_id().as_ref().map(|id| id.to_string()).unwrap_or_default();
        if job_ids.contains(&id.as_str()) {
            results.insert(id, serde_json::from_slice(&delivery.data).expect("a result is JSON"));
        }
    }
    let _ = channel.close(200, "received".into()).await;
    results
}

/// The worker as shipped, logged in as `worker` with the definitions' permissions alone and
/// `amqp.declare_queues: false`, demanding a user_id and replies to `{user}.results`, scores an
/// online job of core-banking and a bulk job of risk-nightly, each answered in the publisher's own
/// results queue, and dead-letters a job for a model it does not serve, which operations finds in
/// the dead-letter queue. `batchscore submit`, logged in as core-banking, sends a file through the
/// submit exchange and reads its results from core-banking's queue. With the audit trail on, the
/// worker records each job in the shipped stream, where the auditor reads the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_scores_end_to_end_with_the_shipped_permissions_alone() {
    let node = node();
    let amqp = node.login(WORKER);
    let mut settings = common::settings("permissions", &fixtures_repository());
    settings.amqp.jobs_queue = amqp.jobs_queue.clone();
    settings.amqp.results_queue = amqp.results_queue.clone();
    settings.amqp.dead_letter_exchange = amqp.dead_letter_exchange.clone();
    settings.amqp.dead_letter_queue = amqp.dead_letter_queue.clone();
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().expect("an address");
    let log = node.broker.dir().join(format!("worker-{}.log", uuid::Uuid::new_v4().simple()));
    let mut command = common::worker_command(&settings, &metrics.to_string());
    log_in(&mut command, &amqp)
        .env("BATCHSCORE__AMQP__BULK_QUEUE", BULK_QUEUE)
        .env("BATCHSCORE__AMQP__DECLARE_QUEUES", "false")
        .env("BATCHSCORE__SECURITY__REQUIRE_USER_ID", "true")
        .env("BATCHSCORE__SECURITY__REPLY_TO__DEFAULT", "{user}.results")
        .env("BATCHSCORE__AUDIT__ENABLED", "true");
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut worker = WorkerProcess(
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file).spawn().expect("the worker starts"),
    );
    let ready = tokio::time::timeout(START_UP_PATIENCE, common::wait_until_ready(metrics, START_UP_PATIENCE));
    if ready.await.is_err() {
        panic!("the worker did not become ready; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    node.broker.wait_for_connection(WORKER, "EXTERNAL", true).await;

    let fixture = expected("linear_v1");
    let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (online, bulk, unknown) = (format!("online-{unique}"), format!("bulk-{unique}"), format!("unknown-{unique}"));
    let core = node.connect(CORE_BANKING).await;
    let risk = node.connect(RISK_NIGHTLY).await;
    let core_results = results_queue(CORE_BANKING);
    let risk_results = results_queue(RISK_NIGHTLY);
    let rows = |n: usize| Value::Array(fixture["rows"].as_array().expect("rows")[..n].to_vec());
    submit(
        &core,
        CORE_BANKING,
        &amqp.jobs_queue,
        &core_results,
        &json!({"job_id": online, "model": "linear", "model_version": "1", "rows": rows(1)}),
    )
    .await;
    submit(
        &risk,
        RISK_NIGHTLY,
        BULK_QUEUE,
        &risk_results,
        &json!({"job_id": bulk, "model": "linear", "model_version": "1", "rows": rows(3)}),
    )
    .await;
    submit(
        &core,
        CORE_BANKING,
        &amqp.jobs_queue,
        &core_results,
        &json!({"job_id": unknown, "model": "no-such-model", "rows": rows(1)}),
    )
    .await;

    let core_answers = results_of(&core, &core_results, &[&online, &unknown]).await;
    let scored = &core_answers[&online];
    assert_eq!(scored["status"], "ok", "{scored}");
    common::assert_close(
        &scored["outputs"]["probabilities"][0],
        &fixture["outputs"]["probabilities"][0],
        "probabilities[0]",
    );
    let scored = &results_of(&risk, &risk_results, &[&bulk]).await[&bulk];
    assert_eq!(scored["status"], "ok", "{scored}");
    common::assert_close(
        &scored["outputs"]["probabilities"],
        &common::expected_slice(&fixture["outputs"], 0..3)["probabilities"],
        "probabilities",
    );
    let refused = &core_answers[&unknown];
    assert_eq!(refused["error"]["code"], "unknown_model", "{refused}");

    // The dead-letter copy, which only operations may read.
    let operations = node.connect(OPERATIONS).await;
    let channel = operations.create_channel().await.expect("channel");
    let started = Instant::now();
    let dead_letter = loop {
        let got = channel
            .basic_get(amqp.dead_letter_queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("operations reads the dead-letter queue");
        match got {
            Some(message) if message.properties.message_id().as_ref().is_some_and(|id| id.as_str() == unknown) => {
                break message
            }
            Some(_) => {}
            None => {
                assert!(started.elapsed() < Duration::from_secs(30), "{unknown} was not dead-lettered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let headers = dead_letter.properties.headers().clone().unwrap_or_default();
    let code = headers.inner().get("x-error-code").cloned();
    assert_eq!(code, Some(AMQPValue::LongString("unknown_model".into())), "{headers:?}");

    // The audit trail, which only the auditor (and operations) may read, has a record of each.
    let auditor = node.connect(AUDITOR).await;
    let recorded = records_of(&auditor, &[&online, &bulk, &unknown]).await;
    assert_eq!(
        (recorded[&online]["user_id"].as_str(), recorded[&online]["status"].as_str()),
        (Some(CORE_BANKING), Some("ok"))
    );
    assert_eq!(
        (recorded[&bulk]["user_id"].as_str(), recorded[&bulk]["lane"].as_str()),
        (Some(RISK_NIGHTLY), Some("bulk"))
    );
    assert_eq!(recorded[&unknown]["error_code"], "unknown_model", "{}", recorded[&unknown]);

    submit_file_as_core_banking(node, &fixture).await;

    let status = worker.terminate().await;
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}; its log:\n{logged}");
    assert!(!logged.contains("ACCESS_REFUSED"), "the worker was refused something:\n{logged}");
}

/// The audit records of jobs `job_ids` in the shipped stream, read as `connection`'s user; other
/// messages (the rules' probes) are skipped.
async fn records_of(connection: &Connection, job_ids: &[&str]) -> HashMap<String, Value> {
    let mut deliveries = common::stream::subscribe(connection, AUDIT_STREAM).await;
    let mut records = HashMap::new();
    while records.len() < job_ids.len() {
        let waiting = || format!("records of only {:?} of {job_ids:?} in {AUDIT_STREAM}", records.keys());
        let delivery = common::stream::next_message(&mut deliveries, common::BROKER_PATIENCE, waiting).await;
        if delivery.properties.kind().as_ref().is_none_or(|kind| kind.as_str() != "scoring.audit") {
            continue;
        }
        for line in common::stream::record_lines(&delivery.data) {
            let record: Value = serde_json::from_slice(line).expect("a record is JSON");
            let id = record["job_id"].as_str().unwrap_or_default().to_string();
            if job_ids.contains(&id.as_str()) {
                records.insert(id, record);
            }
        }
    }
    records
}

/// `batchscore submit` with core-banking's certificate and rights alone: it cannot declare a reply
/// queue nor write to the default exchange, so it publishes to the submit exchange, reads
/// core-banking's results queue, and names its user_id, which the worker demands.
async fn submit_file_as_core_banking(node: &Node, fixture: &Value) {
    let dir = node.broker.dir().join(format!("submit-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("a folder for submit's files");
    let (input, output) = (dir.join("rows.jsonl"), dir.join("scores.jsonl"));
    let rows = &fixture["rows"].as_array().expect("rows")[..20];
    let lines: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(&input, lines.join("\n")).expect("input written");
    let amqp = node.login(CORE_BANKING);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_batchscore"));
    command
        .current_dir(common::root())
        .args(["submit", "--model", "linear", "--model-version", "1", "--chunk-rows", "8", "--timeout-s", "60"])
        .args(["--exchange", SUBMIT, "--reply-queue", &results_queue(CORE_BANKING), "--user-id", CORE_BANKING])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output);
    log_in(&mut command, &amqp);
    let done = tokio::task::spawn_blocking(move || run_bounded(command, START_UP_PATIENCE))
        .await
        .expect("submit ran")
        .unwrap_or_else(|error| panic!("batchscore submit: {error}"));
    let said = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "submit as core-banking failed: {said}");
    assert!(String::from_utf8_lossy(&done.stdout).contains("scored 20 rows in 3 jobs"), "{said}");
    let scored: Vec<Value> = std::fs::read_to_string(&output)
        .expect("output written")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(scored.len(), rows.len());
    for (i, row) in scored.iter().enumerate() {
        common::assert_close(&row["probabilities"], &fixture["outputs"]["probabilities"][i], &format!("row {i}"));
    }
}

/// ssl_options.fail_if_no_peer_cert: a worker without a client certificate never gets a TLS
/// session, and stops with exit 2 saying which settings it lacks, instead of retrying.
#[test]
fn a_worker_without_a_client_certificate_exits_2_naming_the_settings() {
    let node = node();
    let settings = common::settings("no-client-certificate", &fixtures_repository());
    let mut command = common::worker_command(&settings, "127.0.0.1:0");
    command
        .env("BATCHSCORE__AMQP__URL", node.broker.amqps_url_to(VHOST, "worker:guessed", "localhost", ""))
        .env("BATCHSCORE__AMQP__TLS__CA_FILE", node.ca_file())
        .env("BATCHSCORE__AMQP__RECONNECT_MAX_BACKOFF_MS", "200");
    let text = exit_2_at_start_up(command);
    for needle in ["the broker requires a client certificate", "amqp.tls.cert_file", "amqp.tls.key_file"] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(!text.contains("guessed"), "{text}");
}

/// What a worker expected to refuse start-up said, once it stopped on its own with exit 2 and
/// without panicking.
fn exit_2_at_start_up(command: std::process::Command) -> String {
    let output = run_bounded(command, START_UP_PATIENCE).unwrap_or_else(|error| panic!("batchscore worker: {error}"));
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    text
}

/// The worker's user may not configure queues: a worker left at `amqp.declare_queues: true` is
/// refused its first declaration and stops with exit 2 naming the setting, instead of retrying
/// and never becoming ready.
#[test]
fn a_worker_that_would_declare_its_queues_exits_2_naming_declare_queues() {
    let node = node();
    let amqp = node.login(WORKER);
    let settings = common::settings("declaring-worker", &fixtures_repository());
    let mut command = common::worker_command(&settings, "127.0.0.1:0");
    log_in(&mut command, &amqp)
        .env("BATCHSCORE__AMQP__DECLARE_QUEUES", "true")
        .env("BATCHSCORE__AMQP__RECONNECT_MAX_BACKOFF_MS", "200");
    let text = exit_2_at_start_up(command);
    for needle in ["ACCESS_REFUSED", "amqp.declare_queues: false", "BATCHSCORE__AMQP__DECLARE_QUEUES=false"] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(!text.contains("retrying"), "{text}");
}

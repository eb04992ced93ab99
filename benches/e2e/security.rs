//! What security costs in throughput: the worker draining pre-filled queues over `amqps://`
//! against `amqp://`, on one private RabbitMQ node with both listeners (the test suite's
//! `tests/common/private_broker.rs`, with a CA and certificates made for the run by
//! `tests/common/certificates.rs`). The TLS listener requires a client certificate and the worker
//! logs in with one (SASL EXTERNAL), as with `deploy/rabbitmq/rabbitmq.conf`.
//!
//! For 1-row and 100-row jobs of the demo model, the same number of jobs is drained once per
//! variant in each of [`ROUNDS`] rounds, the variants alternating (amqp, amqps, amqp, amqps, …),
//! each drain by a fresh worker, timed from its readiness to the last result
//! (`benches/e2e/variants.rs`). The driver publishes jobs and reads results over the node's
//! plaintext listener in every variant, so that only the worker's connection differs. The report
//! gives each variant's median with its min–max spread, and its ratio to the first variant, the
//! baseline.
//!
//! A variant is one [`Variant`]: a key, a label, its goal against the baseline, and its [`Setup`]:
//! the worker settings it takes on the node, and whether its jobs travel sealed. Payload encryption is the
//! plaintext connection with `security.payload_keys` set: the driver seals each job (AES-256-GCM,
//! with the `x-encryption` and `x-key-id` headers, as `submit --key-file` does) before the
//! pre-fill, and opens each result before checking it, so the worker opens every job and seals
//! every result.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use batchscore::payload::PayloadKey;

use crate::broker::{Broker, Topology};
use crate::certificates::Authority;
use crate::jobs;
use crate::private_broker::{BrokerOptions, PrivateBroker};
use crate::report::not_done;
use crate::scenarios::{self, Measured};
use crate::variants::{self, Comparison, Plan, Run, ROUNDS};
use crate::{Bench, Skip};

/// The broker user of the TLS worker's client certificate.
const CERTIFICATE_USER: &str = "bench-worker";

/// How a variant runs the worker against the node.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// The worker's `BATCHSCORE__…` settings for this variant, besides its queues.
    worker_env: fn(&Node) -> Vec<(&'static str, String)>,
    /// Jobs and results travel sealed with the node's payload key.
    sealed: bool,
}

/// One way of running the worker against the node.
pub type Variant = variants::Variant<Setup>;

pub const PLAINTEXT: Variant = Variant {
    key: "amqp",
    label: "amqp:// (plaintext, loopback)",
    goal: None,
    setup: Setup { worker_env: Node::plaintext_env, sealed: false },
};
pub const TLS: Variant = Variant {
    key: "amqps",
    label: "amqps:// (TLS, certificate login)",
    goal: Some(0.8),
    setup: Setup { worker_env: Node::tls_env, sealed: false },
};
pub const SEALED: Variant = Variant {
    key: "sealed",
    label: "amqp://, payloads sealed (AES-256-GCM)",
    goal: Some(0.8),
    setup: Setup { worker_env: Node::sealed_env, sealed: true },
};
/// In the order they alternate; the first is the baseline.
pub const VARIANTS: [Variant; 3] = [PLAINTEXT, TLS, SEALED];
/// The id of the payload key, in `security.payload_keys` and the jobs' `x-key-id` header.
const PAYLOAD_KEY_ID: &str = "bench";
/// The payload key's file in the node's certificate folder.
const PAYLOAD_KEY_FILE: &str = "payload.key";

pub struct SecurityReport {
    /// The node, or why there is none.
    pub node: Measured<()>,
    /// The TLS session the worker had (protocol and cipher, as the node lists them).
    pub session: Option<String>,
    pub comparisons: Vec<Comparison<Setup>>,
}

impl SecurityReport {
    pub fn has_failures(&self) -> bool {
        self.node.is_failed() || self.comparisons.iter().any(Comparison::has_failures)
    }
}

/// The private node, the certificates, and the driver's connections to the node.
pub struct Node {
    broker: PrivateBroker,
    /// The CA, the worker's certificate and key, and the payload key's file.
    pki: PathBuf,
    /// The key sealed jobs and their results travel with.
    payload_key: PayloadKey,
    driver: Broker,
}

impl Node {
    async fn start() -> Result<Node> {
        let made = std::env::temp_dir().join(format!("batchscore-bench-pki-{}", uuid::Uuid::new_v4().simple()));
        let authority = Authority::new(&made, "bench");
        authority.client("worker", CERTIFICATE_USER);
        let tls = authority.listener(true);
        // The harness panics with its reason when the node cannot start: a failed measurement
        // (or a skipped one, where RabbitMQ or the rights to run a node are missing).
        let started = tokio::spawn(PrivateBroker::start_with(BrokerOptions { tls: Some(tls) })).await;
        let broker = match started {
            Ok(broker) => broker,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&made);
                let why = match error.try_into_panic() {
                    Ok(panic) => panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "the private node's start panicked".into()),
                    Err(error) => error.to_string(),
                };
                if why.contains("install RabbitMQ") || why.contains("as root or as user rabbitmq") {
                    return Err(anyhow::Error::new(Skip(format!("no private RabbitMQ node: {why}"))));
                }
                return Err(anyhow!("starting a private RabbitMQ node: {why}"));
            }
        };
        let pki = broker.keep(&made, "pki");
        broker.add_user(CERTIFICATE_USER, &uuid::Uuid::new_v4().simple().to_string()).await;
        let payload_key = make_payload_key(&pki)?;
        let driver = Broker::connect(&broker.url()).await?;
        Ok(Node { broker, pki, payload_key, driver })
    }

    fn plaintext_env(&self) -> Vec<(&'static str, String)> {
        vec![("BATCHSCORE__AMQP__URL", self.broker.url())]
    }

    fn tls_env(&self) -> Vec<(&'static str, String)> {
        let file = |name: &str| self.pki.join(name).display().to_string();
        vec![
            ("BATCHSCORE__AMQP__URL", self.broker.amqps_url("", "localhost", "?auth_mechanism=external")),
            ("BATCHSCORE__AMQP__TLS__CA_FILE", file("bench-ca.pem")),
            ("BATCHSCORE__AMQP__TLS__CERT_FILE", file("worker.pem")),
            ("BATCHSCORE__AMQP__TLS__KEY_FILE", file("worker.key")),
        ]
    }

    fn sealed_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.plaintext_env();
        let file = self.pki.join(PAYLOAD_KEY_FILE).display().to_string();
        env.push(("BATCHSCORE__SECURITY__PAYLOAD_KEYS__BENCH", file));
        env
    }

    /// The node's Erlang VM.
    fn beam_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.broker.dir().join("pid")).ok()?.trim().parse().ok()
    }

    /// Protocol and cipher of the node's TLS connections.
    async fn tls_sessions(&self) -> String {
        let args = ["list_connections", "-q", "--no-table-headers", "ssl", "ssl_protocol", "ssl_cipher"];
        let listed = self.broker.rabbitmqctl(&args).await;
        let sessions: Vec<String> = listed
            .lines()
            .filter(|line| line.starts_with("true"))
            .map(|line| line.split('\t').skip(1).collect::<Vec<_>>().join(", "))
            .collect();
        sessions.join("; ")
    }

    async fn stop(self) {
        self.driver.close().await;
        // Stopping the node waits for it: blocking work.
        let _ = tokio::task::spawn_blocking(move || drop(self.broker)).await;
    }
}

/// Writes a fresh random 256-bit key (64 hex digits; two v4 UUIDs, 244 random bits, are random
/// enough for a benchmark's key) into `folder` and reads it back as the worker will.
fn make_payload_key(folder: &Path) -> Result<PayloadKey> {
    let hex = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let path = folder.join(PAYLOAD_KEY_FILE);
    std::fs::write(&path, hex).with_context(|| format!("writing {}", path.display()))?;
    Ok(PayloadKey::load("the benchmark's payload key", PAYLOAD_KEY_ID, &path)?)
}

/// Runs the phase: for each job size, [`ROUNDS`] rounds of one drain per variant.
pub async fn compare(bench: &Bench) -> SecurityReport {
    let mut report = SecurityReport { node: Measured::Done(()), session: None, comparisons: Vec::new() };
    let node = match scenarios::measure("security: a private RabbitMQ node with a TLS listener", Node::start()).await {
        Measured::Done(node) => node,
        Measured::Skipped(why) => {
            report.node = Measured::Skipped(why);
            return report;
        }
        Measured::Failed(why) => {
            report.node = Measured::Failed(why);
            return report;
        }
    };
    let session = Mutex::new(None);
    report.comparisons = variants::compare(bench, "security", &VARIANTS, |variant, jobs, rows_per_job, round| {
        drain(bench, &node, variant, jobs, rows_per_job, round, &session)
    })
    .await;
    report.session = session.into_inner().ok().flatten();
    node.stop().await;
    report
}

/// Pre-fills a queue of the node, starts a worker with `variant`'s settings and times it from
/// readiness to the last result. The first TLS session seen is recorded in `session`.
async fn drain(
    bench: &Bench,
    node: &Node,
    variant: Variant,
    jobs: usize,
    rows_per_job: usize,
    round: usize,
    session: &Mutex<Option<String>>,
) -> Result<Run> {
    let name = format!("s-{rows_per_job}rows-{}-{round}", variant.key);
    let topology = Topology::new(&bench.settings.amqp, &format!("bench.security.{name}"), false);
    let unseen = session.lock().is_ok_and(|seen| seen.is_none());
    let plan = Plan {
        name,
        driver: &node.driver,
        topology: &topology,
        jobs,
        rows_per_job,
        model: jobs::MODEL,
        reference: Arc::clone(&bench.reference),
        key: variant.setup.sealed.then(|| node.payload_key.clone()),
        worker_env: (variant.setup.worker_env)(node),
        broker_pid: node.beam_pid(),
    };
    let look = (unseen && variant.key == TLS.key).then(|| node.tls_sessions());
    let drained = plan.drain(bench, look).await;
    node.driver.delete(&topology).await;
    let (run, seen) = drained?;
    if let (Some(seen), Ok(mut session)) = (seen.filter(|s| !s.is_empty()), session.lock()) {
        session.get_or_insert(seen);
    }
    Ok(run)
}

impl SecurityReport {
    pub fn render(&self, out: &mut String) {
        out.push_str("\n## Security: TLS to the broker and payload encryption\n\n");
        if !matches!(self.node, Measured::Done(())) {
            let _ = writeln!(out, "{}", not_done(&self.node));
            return;
        }
        let baseline = VARIANTS[0];
        let session = self.session.as_deref().map_or(String::new(), |s| format!(" (the node saw: {s})"));
        let _ = write!(
            out,
            "(c) batchscore drains pre-filled queues of a private RabbitMQ node that has a plaintext and a TLS \
             listener; the TLS listener requires a client certificate, and the worker logs in with one (SASL \
             EXTERNAL){session}. For each job size, the same number of jobs is drained by a fresh worker once per \
             variant in each of {ROUNDS} rounds, the variants alternating; time runs from the worker's readiness to \
             the last result. The benchmark itself publishes and reads results over the plaintext listener in every \
             variant, so only the worker's side differs. The sealed variant is the plaintext connection with \
             `security.payload_keys` set: the benchmark seals every job (AES-256-GCM) before the pre-fill and opens \
             every result, so the worker opens each job and seals each result. Rows/s: the median of the {ROUNDS} drains, min–max in \
             brackets; the ratio is of the medians, against {}. CPU: user + system time per 1,000 rows over the \
             drain, medians.\n\n",
            baseline.key,
        );
        variants::render_table(out, baseline.key, &self.comparisons);
    }
}

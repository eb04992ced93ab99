//! What security costs in throughput: the worker draining pre-filled queues over `amqps://`
//! against `amqp://`, on one private RabbitMQ node with both listeners (the test suite's
//! `tests/common/private_broker.rs`, with a CA and certificates made for the run by
//! `tests/common/certificates.rs`). The TLS listener requires a client certificate and the worker
//! logs in with one (SASL EXTERNAL), as with `deploy/rabbitmq/rabbitmq.conf`.
//!
//! For 1-row and 100-row jobs of the demo model, the same number of jobs is drained once per
//! variant in each of [`ROUNDS`] rounds, the variants alternating (amqp, amqps, amqp, amqps, …),
//! each drain by a fresh worker, timed from its readiness to the last result. The driver publishes
//! jobs and reads results over the node's plaintext listener in every variant, so that only the
//! worker's connection differs. The report gives each variant's median with its min–max spread,
//! and its ratio to the first variant, the baseline.
//!
//! A variant is one [`Variant`]: a key, a label, its goal against the baseline, the worker
//! settings it takes on the node, and whether its jobs travel sealed. Payload encryption is the
//! plaintext connection with `security.payload_keys` set: the driver seals each job (AES-256-GCM,
//! with the `x-encryption` and `x-key-id` headers, as `submit --key-file` does) before the
//! pre-fill, and opens each result before checking it, so the worker opens every job and seals
//! every result.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use batchscore::payload::PayloadKey;

use crate::broker::{Broker, Expectation, Topology};
use crate::certificates::Authority;
use crate::private_broker::{BrokerOptions, PrivateBroker};
use crate::report::{goal_cell, not_done, spread_cell, thousands, two_places, Spread};
use crate::scenarios::{self, cpu_seconds, Drain, Measured};
use crate::workers::{Kind, Worker};
use crate::{jobs, progress, Bench, Skip, PHASE_TIMEOUT};

/// Drains per variant and job size.
pub const ROUNDS: usize = 3;
/// Jobs per drain at `BENCH_SCALE=1`, and their rows: as the pre-filled scenarios.
const SIZES: [(usize, usize); 2] = [(20_000, 1), (2_000, 100)];
/// The broker user of the TLS worker's client certificate.
const CERTIFICATE_USER: &str = "bench-worker";

/// One way of running the worker against the node.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub key: &'static str,
    pub label: &'static str,
    /// Rows/s ÷ the baseline's (the first variant) the spec asks for; `None` for the baseline.
    pub goal: Option<f64>,
    /// The worker's `BATCHSCORE__…` settings for this variant, besides its queues.
    worker_env: fn(&Node) -> Vec<(&'static str, String)>,
    /// Jobs and results travel sealed with the node's payload key.
    sealed: bool,
}

pub const PLAINTEXT: Variant = Variant {
    key: "amqp",
    label: "amqp:// (plaintext, loopback)",
    goal: None,
    worker_env: Node::plaintext_env,
    sealed: false,
};
pub const TLS: Variant = Variant {
    key: "amqps",
    label: "amqps:// (TLS, certificate login)",
    goal: Some(0.8),
    worker_env: Node::tls_env,
    sealed: false,
};
pub const SEALED: Variant = Variant {
    key: "sealed",
    label: "amqp://, payloads sealed (AES-256-GCM)",
    goal: Some(0.8),
    worker_env: Node::sealed_env,
    sealed: true,
};
/// In the order they alternate; the first is the baseline.
pub const VARIANTS: [Variant; 3] = [PLAINTEXT, TLS, SEALED];
/// The id of the payload key, in `security.payload_keys` and the jobs' `x-key-id` header.
const PAYLOAD_KEY_ID: &str = "bench";
/// The payload key's file in the node's certificate folder.
const PAYLOAD_KEY_FILE: &str = "payload.key";

/// One drain and the CPU time the worker and the node used meanwhile.
pub struct Run {
    pub drain: Drain,
    /// CPU seconds (user + system) of the worker, then of the node, over the drain.
    cpu: [Option<f64>; 2],
}

impl Run {
    /// CPU milliseconds of process `p` per 1,000 rows.
    fn cpu_ms_per_1k_rows(&self, p: usize) -> Option<f64> {
        self.cpu[p].map(|s| s * 1e6 / self.drain.rows.max(1) as f64)
    }
}

/// One job size: every variant's drains, in the order they ran.
pub struct Comparison {
    pub jobs: usize,
    pub rows_per_job: usize,
    /// Per variant, in [`VARIANTS`] order.
    pub runs: Vec<(Variant, Vec<Measured<Run>>)>,
}

impl Comparison {
    fn spread(runs: &[Measured<Run>], figure: impl Fn(&Run) -> Option<f64>) -> Option<Spread> {
        Spread::of(runs.iter().filter_map(Measured::done).filter_map(figure).collect())
    }

    pub fn rows_per_s(&self, variant: usize) -> Option<Spread> {
        Self::spread(&self.runs[variant].1, |r| Some(r.drain.rows_per_s()))
    }

    /// Variant `variant` ÷ the baseline, of the medians of rows/s.
    pub fn ratio(&self, variant: usize) -> Option<f64> {
        let (this, baseline) = (self.rows_per_s(variant)?, self.rows_per_s(0)?);
        (baseline.median > 0.0).then(|| this.median / baseline.median)
    }

    fn has_failures(&self) -> bool {
        self.runs.iter().flat_map(|(_, runs)| runs).any(Measured::is_failed)
    }

    fn title(&self) -> String {
        let plural = if self.rows_per_job == 1 { "" } else { "s" };
        format!("{} jobs × {} row{plural}", thousands(self.jobs as f64), self.rows_per_job)
    }
}

pub struct SecurityReport {
    /// The node, or why there is none.
    pub node: Measured<()>,
    /// The TLS session the worker had (protocol and cipher, as the node lists them).
    pub session: Option<String>,
    pub comparisons: Vec<Comparison>,
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
    for (jobs, rows_per_job) in SIZES {
        let jobs = bench.count(jobs);
        let mut comparison =
            Comparison { jobs, rows_per_job, runs: VARIANTS.iter().map(|variant| (*variant, Vec::new())).collect() };
        for round in 1..=ROUNDS {
            for (v, variant) in VARIANTS.iter().enumerate() {
                let what = format!("security, {}, {} {round} of {ROUNDS}", comparison.title(), variant.key);
                let drain = drain(bench, &node, variant, jobs, rows_per_job, round, &mut report.session);
                comparison.runs[v].1.push(scenarios::measure(&what, drain).await);
            }
        }
        for (v, variant) in VARIANTS.iter().enumerate().skip(1) {
            if let Some(ratio) = comparison.ratio(v) {
                progress(&format!(
                    "security, {}: {} ÷ {} {ratio:.2}",
                    comparison.title(),
                    variant.key,
                    VARIANTS[0].key
                ));
            }
        }
        report.comparisons.push(comparison);
    }
    node.stop().await;
    report
}

/// Pre-fills a queue of the node, starts a worker with `variant`'s settings and times it from
/// readiness to the last result. The first TLS session seen is recorded in `session`.
async fn drain(
    bench: &Bench,
    node: &Node,
    variant: &Variant,
    jobs: usize,
    rows_per_job: usize,
    round: usize,
    session: &mut Option<String>,
) -> Result<Run> {
    let name = format!("s-{rows_per_job}rows-{}-{round}", variant.key);
    let topology = Topology::new(&bench.settings.amqp, &format!("bench.security.{name}"), false);
    node.driver.declare(&topology).await?;
    let mut replies = node.driver.replies(&topology.name("replies")).await?;
    let collector = replies.collect(Expectation {
        label: name.clone(),
        jobs,
        rows_per_job,
        reference: Some(bench.reference.clone()),
        key: variant.sealed.then(|| node.payload_key.clone()),
        deadline: Instant::now() + PHASE_TIMEOUT,
    })?;
    let mut batch = jobs::build(&bench.samples, jobs::MODEL, "job", jobs, rows_per_job);
    if variant.sealed {
        batch = jobs::seal(batch, &node.payload_key);
    }
    let publisher = node.driver.publisher().await?;
    let prefill = publisher.prefill(topology.jobs_queue(), &replies.name, &batch).await?;
    publisher.close().await;
    drop(batch);
    progress(&format!("{name}: {jobs} jobs pre-filled in {:.1} s", prefill.as_secs_f64()));

    let env = (variant.worker_env)(node);
    let (mut worker, ready_at) = Worker::start_with_env(bench, Kind::Batchscore, &topology, &name, &env).await?;
    let pids = [Some(worker.pid()), node.beam_pid()];
    let cpu_before = pids.map(|pid| pid.and_then(cpu_seconds));
    let collected = worker.guard(collector.finish()).await?;
    let cpu_after = pids.map(|pid| pid.and_then(cpu_seconds));
    if session.is_none() && variant.key == TLS.key {
        *session = Some(node.tls_sessions().await).filter(|s| !s.is_empty());
    }
    let drain = scenarios::drained(&name, worker, ready_at, &collected, rows_per_job).await;
    replies.close().await;
    node.driver.delete(&topology).await;
    let cpu = [0, 1].map(|p| Some(cpu_after[p]? - cpu_before[p]?));
    Ok(Run { drain, cpu })
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
             drain, medians.\n\n\
             | Jobs × rows | Variant | Jobs/s | Rows/s | ÷ {} | Worker CPU ms per 1,000 rows | RabbitMQ CPU ms per \
             1,000 rows | Target |\n|---|---|---:|---:|---:|---:|---:|---|\n",
            baseline.key, baseline.key,
        );
        let mut notes = Vec::new();
        for c in &self.comparisons {
            for (v, (variant, runs)) in c.runs.iter().enumerate() {
                let jobs_per_s = Comparison::spread(runs, |r| Some(r.drain.jobs_per_s()));
                let cpu = |p: usize| {
                    Comparison::spread(runs, |r| r.cpu_ms_per_1k_rows(p))
                        .map_or("—".into(), |s| format!("{:.1}", s.median))
                };
                let ratio = if v == 0 { "—".to_string() } else { c.ratio(v).map_or("—".into(), two_places) };
                let target = goal_cell(variant.goal, c.ratio(v), "baseline");
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {ratio} | {} | {} | {target} |",
                    c.title(),
                    variant.label,
                    spread_cell(jobs_per_s, ROUNDS),
                    spread_cell(c.rows_per_s(v), ROUNDS),
                    cpu(0),
                    cpu(1),
                );
                for (round, measured) in runs.iter().enumerate() {
                    let what = format!("{}, {}, round {}", c.title(), variant.key, round + 1);
                    match measured {
                        Measured::Done(r) => notes.extend(r.drain.notes.iter().map(|n| format!("{what}: {n}"))),
                        other => notes.push(format!("{what}: {}", not_done(other))),
                    }
                }
            }
        }
        if !notes.is_empty() {
            let _ = writeln!(out, "\nNotes: {}", notes.join("; "));
        }
    }
}

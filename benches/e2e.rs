//! End-to-end benchmark: the batchscore worker against the local RabbitMQ, next to what bounds it
//! and to two Python workers.
//!
//! `scripts/bench.sh` prepares everything and runs it; `cargo bench --bench e2e` runs it alone
//! (ONNX Runtime in `.onnxruntime/` and a broker at `BATCHSCORE__AMQP__URL`, default the local
//! one). `BENCH_SCALE=0.1` shrinks job counts and durations for a quick check. The report goes to
//! `target/bench/e2e.md` (or `BENCH_REPORT`) and to stdout; worker logs to `target/bench/logs/`.
//! `BENCH_ONLY=lanes` (a comma list of drains, open-loop, lanes, quantised, explain, security,
//! audit, spin) runs only those phases.
//! `BATCHSCORE__<SECTION>__<KEY>` variables reach every worker and the in-process model, and the
//! Python workers get the same prefetch, batching and thread settings, so one can compare, say,
//! `BATCHSCORE__INFERENCE__INTRA_THREADS=1` runs.
//!
//! Systems, all serving the demo model `models/credit_default` (the worker serves every model of
//! `models/`):
//! - (a) broker ceiling: the worker process with `BATCHSCORE__INFERENCE__ENGINE=noop`;
//! - (b) engine ceiling: the model in this process, no broker, at the batch size (c) formed;
//! - (c) batchscore: the worker process as shipped;
//! - (d) and (e): `benches/python/batching_worker.py` and `per_message_worker.py`.
//!
//! Scenarios: pre-filled queues of 1-row, 100-row and 10,000-row jobs drained from the worker's
//! readiness to the last result; an open loop of single-row jobs at a fixed rate; and the bulk
//! lane draining a million rows while online jobs keep arriving. Then float32 against INT8: 100-row
//! jobs for `credit_default` and for its quantised variant `credit_default_int8` drained by (c), each
//! model's engine ceiling (b) at the batch size (c) formed, and the variant's held-out figures from
//! its `quantisation.json`. Then explanations: (c) serving `tests/fixtures/explain/models`, rows/s
//! with and without `"explain": true` per method in alternating pairs, and the worker's own p99 of
//! single-row explained jobs at a fixed rate (`benches/e2e/explained.rs`). Then security: (c)
//! draining 1-row and 100-row jobs over `amqps://` and over `amqp://` of one private RabbitMQ node,
//! in alternating rounds (`benches/e2e/security.rs`; the node and its certificates come from the
//! test suite's harness, so this phase needs root or user rabbitmq, like the tests). Then the
//! audit trail: (c) draining 1-row and 100-row jobs with `audit.enabled` off and on, in alternating
//! rounds, each audit-on drain recording to a stream of its own (`benches/e2e/audit.rs`). Last,
//! ONNX Runtime's spin policies against each other: drains and open loops of (c) in alternating
//! rounds (`benches/e2e/spin.rs`). Every
//! measurement runs on its own uniquely named queues, which are deleted at the end.

#[path = "e2e/audit.rs"]
mod audit;
#[path = "e2e/broker.rs"]
mod broker;
#[path = "e2e/engine.rs"]
mod engine;
#[path = "e2e/explained.rs"]
mod explained;
#[path = "e2e/jobs.rs"]
mod jobs;
#[path = "e2e/quantised.rs"]
mod quantised;
#[path = "e2e/report.rs"]
mod report;
#[path = "e2e/scenarios.rs"]
mod scenarios;
#[path = "e2e/security.rs"]
mod security;
#[path = "e2e/spin.rs"]
mod spin;
#[path = "e2e/variants.rs"]
mod variants;
#[path = "e2e/workers.rs"]
mod workers;

// The test suite's private RabbitMQ node and its test-time certificates, for the security phase.
#[allow(dead_code)]
#[path = "../tests/common/certificates.rs"]
mod certificates;
#[allow(dead_code)]
#[path = "../tests/common/private_broker.rs"]
mod private_broker;
#[path = "../tests/common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use batchscore::settings::Settings;

use crate::broker::{Broker, Topology};
use crate::engine::{Engine, Reference};
use crate::jobs::Samples;
// `private_broker` calls it as `super::run_bounded`, as it does in tests/common.
use crate::process::run_bounded;
use crate::report::Report;

/// Longest one measurement may take, pre-fill and worker start-up included.
pub const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    // More threads than a small machine has cores: a large result being parsed must not delay the
    // receipt time of the next one, nor the open-loop publisher.
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("e2e: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("e2e: some measurements failed; see the report");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("e2e: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every measurement and writes the report; false when one of them failed.
async fn run() -> Result<bool> {
    let bench = Bench::prepare().await?;
    let mut report = Report::new(&bench).await;
    if phase_wanted("drains") {
        for scenario in &scenarios::DRAINS {
            report.drains.push(scenarios::drain_all(&bench, scenario).await);
        }
    }
    if phase_wanted("open-loop") {
        report.open_loops = scenarios::open_loop_all(&bench).await;
    }
    if phase_wanted("lanes") {
        report.lanes = scenarios::lanes(&bench).await;
    }
    if phase_wanted("quantised") {
        report.quantised = Some(quantised::compare(&bench).await);
    }
    if phase_wanted("explain") {
        report.explain = Some(explained::compare(&bench).await);
    }
    if phase_wanted("security") {
        report.security = Some(security::compare(&bench).await);
    }
    if phase_wanted("audit") {
        report.audit = Some(audit::compare(&bench).await);
    }
    if phase_wanted("spin") {
        report.spin = Some(spin::compare(&bench).await);
    }
    bench.cleanup().await;
    let text = report.render();
    let path = bench.report_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    println!("{text}");
    eprintln!("e2e: report written to {}", path.display());
    Ok(!report.has_failures())
}

/// What every measurement shares: settings, sample rows, the in-process demo model, the broker.
pub struct Bench {
    pub root: PathBuf,
    pub settings: Settings,
    /// `BENCH_SCALE`: factor on job counts and open-loop durations.
    pub scale: f64,
    pub samples: Samples,
    pub engine: Engine,
    /// The in-process model's scores of the sample rows, to check results against.
    pub reference: Arc<Reference>,
    pub broker: Broker,
    pub logs: PathBuf,
    pub python: String,
    /// Unique to this run, in every queue name.
    run_id: String,
    topologies: Mutex<Vec<Topology>>,
}

impl Bench {
    async fn prepare() -> Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let settings = Settings::load(&root.join("settings.yaml"), true).context("loading settings.yaml")?;
        let scale = scale_from_env()?;
        let samples = Samples::load(&root)?;
        let engine = Engine::load(&root, &settings, jobs::MODEL)?;
        let reference = Arc::new(engine.reference(&samples).await?);
        let broker = Broker::connect(&settings.amqp.url).await?;
        let logs = target_dir(&root).join("bench/logs");
        if logs.exists() {
            std::fs::remove_dir_all(&logs).with_context(|| format!("clearing {}", logs.display()))?;
        }
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let python = std::env::var("BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        progress(&format!("run {run_id}, BENCH_SCALE={scale}, logs in {}", logs.display()));
        Ok(Self {
            root,
            settings,
            scale,
            samples,
            engine,
            reference,
            broker,
            logs,
            python,
            run_id,
            topologies: Mutex::new(Vec::new()),
        })
    }

    /// `n` scaled by `BENCH_SCALE`, at least 1.
    pub fn count(&self, n: usize) -> usize {
        ((n as f64 * self.scale).round() as usize).max(1)
    }

    /// `seconds` scaled by `BENCH_SCALE`, at least one second.
    pub fn duration(&self, seconds: f64) -> Duration {
        Duration::from_secs_f64((seconds * self.scale).max(1.0))
    }

    /// Fresh queue names for one measurement, remembered for the final clean-up.
    pub fn topology(&self, tag: &str, bulk_lane: bool) -> Topology {
        self.remember(Topology::new(&self.settings.amqp, &format!("bench.e2e.{}.{tag}", self.run_id), bulk_lane))
    }

    /// [`Bench::topology`] without a bulk lane, with an audit stream of its own.
    pub fn audited_topology(&self, tag: &str) -> Topology {
        let topology = Topology::new(&self.settings.amqp, &format!("bench.e2e.{}.{tag}", self.run_id), false);
        self.remember(topology.with_audit_stream())
    }

    fn remember(&self, topology: Topology) -> Topology {
        if let Ok(mut all) = self.topologies.lock() {
            all.push(topology.clone());
        }
        topology
    }

    /// Deletes every queue, stream and exchange this run declared.
    async fn cleanup(&self) {
        let all = self.topologies.lock().map(|all| all.clone()).unwrap_or_default();
        for topology in &all {
            self.broker.delete(topology).await;
        }
        self.broker.close().await;
    }

    fn report_path(&self) -> PathBuf {
        match std::env::var_os("BENCH_REPORT") {
            Some(path) => self.root.join(path),
            None => target_dir(&self.root).join("bench/e2e.md"),
        }
    }
}

fn scale_from_env() -> Result<f64> {
    match std::env::var("BENCH_SCALE") {
        Err(_) => Ok(1.0),
        Ok(text) => {
            let scale: f64 = text.trim().parse().with_context(|| format!("BENCH_SCALE={text} is not a number"))?;
            anyhow::ensure!(scale > 0.0 && scale.is_finite(), "BENCH_SCALE={text} must be a positive number");
            Ok(scale)
        }
    }
}

/// `BENCH_ONLY=lanes,quantised` runs only the named phases (drains, open-loop, lanes, quantised,
/// explain, security, audit, spin).
fn phase_wanted(phase: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|p| p.trim() == phase))
}

/// `CARGO_TARGET_DIR` when exported (relative to the project), else `target/`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

/// One line of progress on stderr; the report itself goes to stdout.
pub fn progress(line: &str) {
    eprintln!("[e2e] {line}");
}

/// Why a measurement could not run on this build or machine (reported as skipped, not failed).
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

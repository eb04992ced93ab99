//! What the audit trail costs in throughput: the worker draining pre-filled queues of the local
//! RabbitMQ with `audit.enabled` off against on (docs/AUDIT.md). On, the worker publishes a record
//! per answered job to a stream, the records of each confirm round as one message, and
//! acknowledges the job only once the broker confirmed both its result and its record.
//!
//! For 1-row and 100-row jobs of the demo model, the same number of jobs is drained once per
//! variant in each of [`ROUNDS`] rounds, the variants alternating (off, on, off, on, …), each
//! drain by a fresh worker, timed from its readiness to the last result
//! (`benches/e2e/variants.rs`). Each audit-on drain has a stream of its own, `<queues' prefix>.audit`,
//! which its worker declares; once the worker has stopped, the stream must hold exactly one
//! record per job, else the drain counts as failed. The stream goes with the drain's queues.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::variants::{self, Comparison, Plan, Run, ROUNDS};
use crate::Bench;
use crate::{jobs, scenarios};

/// The longest wait for each read of the stream while its records are counted.
const READ_PATIENCE: Duration = Duration::from_secs(30);

/// One state of the audit trail; `setup` is whether it is on.
pub type Variant = variants::Variant<bool>;

pub const OFF: Variant = Variant { key: "off", label: "audit trail off", goal: None, setup: false };
pub const ON: Variant =
    Variant { key: "on", label: "audit trail on (a record per job, to a stream)", goal: Some(0.8), setup: true };
/// In the order they alternate; the first is the baseline.
pub const VARIANTS: [Variant; 2] = [OFF, ON];

pub struct AuditReport {
    pub comparisons: Vec<Comparison<bool>>,
}

impl AuditReport {
    pub fn has_failures(&self) -> bool {
        self.comparisons.iter().any(Comparison::has_failures)
    }
}

/// Runs the phase: for each job size, [`ROUNDS`] rounds of one drain per variant.
pub async fn compare(bench: &Bench) -> AuditReport {
    let comparisons = variants::compare(bench, "audit", &VARIANTS, |variant, jobs, rows_per_job, round| {
        drain(bench, variant, jobs, rows_per_job, round)
    })
    .await;
    AuditReport { comparisons }
}

/// Pre-fills a queue, starts a worker with the audit trail off or on and times it from readiness
/// to the last result; with the trail on, then checks that its stream holds one record per job.
async fn drain(bench: &Bench, variant: Variant, jobs: usize, rows_per_job: usize, round: usize) -> Result<Run> {
    let name = format!("a-{rows_per_job}rows-{}-{round}", variant.key);
    let topology = if variant.setup { bench.audited_topology(&name) } else { bench.topology(&name, false) };
    let mut worker_env = vec![("BATCHSCORE__AUDIT__ENABLED", variant.setup.to_string())];
    worker_env.extend(topology.audit_stream.iter().map(|stream| ("BATCHSCORE__AUDIT__STREAM", stream.clone())));
    let plan = Plan {
        name,
        driver: &bench.broker,
        topology: &topology,
        jobs,
        rows_per_job,
        model: jobs::MODEL,
        reference: Arc::clone(&bench.reference),
        key: None,
        worker_env,
        broker_pid: scenarios::broker_pid(),
    };
    let drained = plan.drain(bench, None::<std::future::Ready<()>>).await;
    let recorded = match (&drained, &topology.audit_stream) {
        (Ok(_), Some(stream)) => {
            Some(bench.broker.count_records(stream, READ_PATIENCE).await.map(|count| (stream, count)))
        }
        _ => None,
    };
    bench.broker.delete(&topology).await;
    let (run, _) = drained?;
    if let Some(recorded) = recorded {
        let (stream, count) = recorded?;
        ensure!(count == jobs, "the audit stream {stream} holds {count} records for {jobs} jobs");
    }
    Ok(run)
}

impl AuditReport {
    pub fn render(&self, out: &mut String) {
        out.push_str("\n## Audit trail\n\n");
        let baseline = VARIANTS[0];
        let _ = write!(
            out,
            "(c) batchscore drains pre-filled queues of the local RabbitMQ with `audit.enabled` off and on. On, the \
             worker publishes one record per answered job to a stream of the drain's own and acknowledges each job \
             only once the broker has confirmed both its result and its record; after each such drain, the benchmark \
             checks that the stream holds exactly one record per job (a drain where it does not counts as failed). For each job size, the same \
             number of jobs is drained by a fresh worker once per variant in each of {ROUNDS} rounds, the variants \
             alternating; time runs from the worker's readiness to the last result. Rows/s: the median of the \
             {ROUNDS} drains, min–max in brackets; the ratio is of the medians, against {}. CPU: user + system time \
             per 1,000 rows over the drain, medians.\n\n",
            baseline.key,
        );
        variants::render_table(out, baseline.key, &self.comparisons);
    }
}

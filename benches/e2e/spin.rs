//! ONNX Runtime's spin policy (`inference.intra_op_spinning`) compared where the worker shares its
//! cores with the broker and the benchmark: its threads spin-waiting for work (ONNX Runtime's own
//! default) against sleeping at once (the worker's default).
//!
//! All on [`MODEL`], a multi-layer perceptron (62 → 256 → 256 → 2) whose runs take long enough
//! for the policy to matter; the demo model's logistic regression runs in microseconds.
//! Throughput: 1-row and 100-row jobs drained by a fresh worker once per policy in each of
//! [`ROUNDS`] rounds, the policies alternating (`benches/e2e/variants.rs`). Latency: then, in
//! [`ROUNDS`] rounds of the policies alternating, a fresh worker per open loop of single-row jobs
//! at the open-loop rate; each policy's p50 and p99 are the medians over its rounds, with their
//! min–max.

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{anyhow, Result};

use crate::engine::{Engine, Reference};
use crate::report::latency_rounds_table;
use crate::scenarios::{self, Latency, Measured, OPEN_LOOP_RATE, OPEN_LOOP_SECONDS};
use crate::variants::{self, Comparison, Plan, Run, ROUNDS};
use crate::Bench;

/// The model of `models/` every worker of the phase is measured on (scripts/build_bench_models.py).
pub const MODEL: &str = "credit_default_mlp";

/// A spin policy: `intra_op_spinning`.
pub type Variant = variants::Variant<bool>;

pub const ON: Variant = Variant { key: "on", label: "spinning, ONNX Runtime's default", goal: None, setup: true };
pub const OFF: Variant = Variant { key: "off", label: "no spinning, the worker's default", goal: None, setup: false };
/// In the order they alternate; the first is the baseline.
pub const VARIANTS: [Variant; 2] = [ON, OFF];

pub struct SpinReport {
    pub comparisons: Vec<Comparison<bool>>,
    /// Per policy, in the order of [`VARIANTS`], its open loops in the order they ran.
    pub open_loops: Vec<Vec<Measured<Latency>>>,
}

impl SpinReport {
    pub fn has_failures(&self) -> bool {
        self.comparisons.iter().any(Comparison::has_failures)
            || self.open_loops.iter().flatten().any(Measured::is_failed)
    }
}

/// Runs the phase: the drains of every policy, then their open loops.
pub async fn compare(bench: &Bench) -> SpinReport {
    // Every measurement fails with the reason when the model cannot be scored in this process.
    let reference = reference(bench).await.map_err(|error| format!("{error:#}"));
    let comparisons = variants::compare(bench, "spin", &VARIANTS, |variant, jobs, rows_per_job, round| {
        let reference = reference.clone();
        async move { drain(bench, variant, jobs, rows_per_job, round, reference.map_err(|e| anyhow!(e))?).await }
    })
    .await;
    let mut open_loops: Vec<Vec<Measured<Latency>>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    for round in 1..=ROUNDS {
        for (v, variant) in VARIANTS.iter().enumerate() {
            let name = format!("s-open-{}-{round}", variant.key);
            let what = format!("spin, open loop at {OPEN_LOOP_RATE:.0} jobs/s, {} {round} of {ROUNDS}", variant.key);
            let env = worker_env(*variant);
            let run = async {
                let reference = reference.clone().map_err(|e| anyhow!(e))?;
                scenarios::open_loop_with_env(bench, &name, MODEL, reference, &env).await
            };
            open_loops[v].push(scenarios::measure(&what, run).await);
        }
    }
    SpinReport { comparisons, open_loops }
}

fn worker_env(variant: Variant) -> Vec<(&'static str, String)> {
    vec![("BATCHSCORE__INFERENCE__INTRA_OP_SPINNING", variant.setup.to_string())]
}

/// [`MODEL`]'s scores of the sample rows, from this process.
async fn reference(bench: &Bench) -> Result<Arc<Reference>> {
    let engine = Engine::load(&bench.root, &bench.settings, MODEL)?;
    Ok(Arc::new(engine.reference(&bench.samples).await?))
}

async fn drain(
    bench: &Bench,
    variant: Variant,
    jobs: usize,
    rows_per_job: usize,
    round: usize,
    reference: Arc<Reference>,
) -> Result<Run> {
    let name = format!("s-{rows_per_job}rows-{}-{round}", variant.key);
    let topology = bench.topology(&name, false);
    let plan = Plan {
        name,
        driver: &bench.broker,
        topology: &topology,
        jobs,
        rows_per_job,
        model: MODEL,
        reference,
        key: None,
        worker_env: worker_env(variant),
        broker_pid: scenarios::broker_pid(),
    };
    let drained = plan.drain(bench, None::<std::future::Ready<()>>).await;
    bench.broker.delete(&topology).await;
    Ok(drained?.0)
}

impl SpinReport {
    pub fn render(&self, out: &mut String) {
        out.push_str("\n## Spin policy\n\n");
        let baseline = VARIANTS[0];
        let _ = write!(
            out,
            "(c) batchscore serving `{MODEL}` (62 → 256 → 256 → 2) with each of ONNX Runtime's spin policies: \
             {}. Drains: for each job size, the same number of jobs drained by a fresh worker once per policy in each of {ROUNDS} rounds, the policies \
             alternating; rows/s is the median of the {ROUNDS} drains, min–max in brackets, and the ratio is of \
             the medians, against {}.\n\n",
            VARIANTS.iter().map(|v| format!("`{}` ({})", v.key, v.label)).collect::<Vec<_>>().join(", "),
            baseline.key,
        );
        variants::render_table(out, baseline.key, &self.comparisons);
        let _ = write!(
            out,
            "\nOpen loop: single-row jobs at {OPEN_LOOP_RATE:.0} jobs/s for {OPEN_LOOP_SECONDS:.0} s (scaled), a \
             fresh worker per loop, {ROUNDS} rounds with the policies alternating; publish to receipt, the \
             median over the rounds with min–max; max, publisher lag and peak RSS are the highest.\n\n",
        );
        let rows = VARIANTS.iter().zip(&self.open_loops).map(|(variant, loops)| (variant.key, loops.as_slice()));
        latency_rounds_table(out, "Policy", rows);
    }
}

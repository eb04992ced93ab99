//! Ways of running the worker compared in alternating rounds, as the security and audit phases
//! do: for 1-row and 100-row jobs of the demo model, the same number of jobs is drained once per
//! variant in each of [`ROUNDS`] rounds, the variants alternating (first, second, …, first,
//! second, …), each drain by a fresh worker, timed from its readiness to the last result, with the
//! CPU time the worker and the broker used meanwhile. The report gives each variant's median with
//! its min–max spread, and its ratio to the first variant, the baseline.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use batchscore::payload::PayloadKey;

use crate::broker::{Broker, Expectation, Topology};
use crate::engine::Reference;
use crate::report::{goal_cell, not_done, spread_cell, thousands, two_places, Spread};
use crate::scenarios::{self, cpu_seconds, Drain, Measured};
use crate::workers::{Kind, Worker};
use crate::{jobs, progress, Bench, PHASE_TIMEOUT};

/// Drains per variant and job size.
pub const ROUNDS: usize = 3;
/// Jobs per drain at `BENCH_SCALE=1`, and their rows: as the pre-filled scenarios.
const SIZES: [(usize, usize); 2] = [(20_000, 1), (2_000, 100)];

/// One way of running the worker; `S` is what the phase does differently for it.
#[derive(Debug, Clone, Copy)]
pub struct Variant<S> {
    pub key: &'static str,
    pub label: &'static str,
    /// Rows/s ÷ the baseline's (the first variant) the spec asks for; `None` for the baseline.
    pub goal: Option<f64>,
    pub setup: S,
}

/// One drain and the CPU time the worker and the broker used meanwhile.
pub struct Run {
    pub drain: Drain,
    /// CPU seconds (user + system) of the worker, then of the broker, over the drain.
    cpu: [Option<f64>; 2],
}

impl Run {
    /// CPU milliseconds of process `p` per 1,000 rows.
    fn cpu_ms_per_1k_rows(&self, p: usize) -> Option<f64> {
        self.cpu[p].map(|s| s * 1e6 / self.drain.rows.max(1) as f64)
    }
}

/// One job size: every variant's drains, in the order they ran.
pub struct Comparison<S> {
    pub jobs: usize,
    pub rows_per_job: usize,
    /// Per variant, in the order they alternate.
    pub runs: Vec<(Variant<S>, Vec<Measured<Run>>)>,
}

impl<S> Comparison<S> {
    fn spread(runs: &[Measured<Run>], figure: impl Fn(&Run) -> Option<f64>) -> Option<Spread> {
        Spread::over(runs, figure)
    }

    pub fn rows_per_s(&self, variant: usize) -> Option<Spread> {
        Self::spread(&self.runs[variant].1, |r| Some(r.drain.rows_per_s()))
    }

    /// Variant `variant` ÷ the baseline, of the medians of rows/s.
    pub fn ratio(&self, variant: usize) -> Option<f64> {
        let (this, baseline) = (self.rows_per_s(variant)?, self.rows_per_s(0)?);
        (baseline.median > 0.0).then(|| this.median / baseline.median)
    }

    pub fn has_failures(&self) -> bool {
        self.runs.iter().flat_map(|(_, runs)| runs).any(Measured::is_failed)
    }

    fn title(&self) -> String {
        let plural = if self.rows_per_job == 1 { "" } else { "s" };
        format!("{} jobs × {} row{plural}", thousands(self.jobs as f64), self.rows_per_job)
    }
}

/// For each job size, [`ROUNDS`] rounds of one drain per variant: `drain(variant, jobs,
/// rows_per_job, round)`. `phase` names the phase in progress lines.
pub async fn compare<S: Copy, F, Fut>(
    bench: &Bench,
    phase: &str,
    variants: &[Variant<S>],
    mut drain: F,
) -> Vec<Comparison<S>>
where
    F: FnMut(Variant<S>, usize, usize, usize) -> Fut,
    Fut: Future<Output = Result<Run>>,
{
    let mut comparisons = Vec::new();
    for (jobs, rows_per_job) in SIZES {
        let jobs = bench.count(jobs);
        let runs = variants.iter().map(|variant| (*variant, Vec::new())).collect();
        let mut comparison = Comparison { jobs, rows_per_job, runs };
        for round in 1..=ROUNDS {
            for (v, variant) in variants.iter().enumerate() {
                let what = format!("{phase}, {}, {} {round} of {ROUNDS}", comparison.title(), variant.key);
                let measured = scenarios::measure(&what, drain(*variant, jobs, rows_per_job, round)).await;
                comparison.runs[v].1.push(measured);
            }
        }
        for (v, variant) in variants.iter().enumerate().skip(1) {
            if let Some(ratio) = comparison.ratio(v) {
                let baseline = variants[0].key;
                progress(&format!("{phase}, {}: {} ÷ {baseline} {ratio:.2}", comparison.title(), variant.key));
            }
        }
        comparisons.push(comparison);
    }
    comparisons
}

/// One drain: the jobs queue, results and workers of `topology` on the broker `driver` reaches.
pub struct Plan<'a> {
    pub name: String,
    pub driver: &'a Broker,
    pub topology: &'a Topology,
    pub jobs: usize,
    pub rows_per_job: usize,
    /// The model the jobs are for, and its scores of the sample rows, which results are checked
    /// against.
    pub model: &'a str,
    pub reference: Arc<Reference>,
    /// Jobs go sealed with this key, and results come back sealed with it.
    pub key: Option<PayloadKey>,
    /// The worker's `BATCHSCORE__…` settings, besides its queues.
    pub worker_env: Vec<(&'static str, String)>,
    /// The broker's process, for its CPU time.
    pub broker_pid: Option<u32>,
}

impl Plan<'_> {
    /// Declares the topology, pre-fills its jobs queue, starts a worker and times it from
    /// readiness to the last result; `before_stop` runs once the results are in, while the worker
    /// still runs, and its outcome comes back with the run. The topology stays for the caller to
    /// inspect and delete.
    pub async fn drain<T>(
        self,
        bench: &Bench,
        before_stop: Option<impl Future<Output = T>>,
    ) -> Result<(Run, Option<T>)> {
        let Plan { name, driver, topology, jobs, rows_per_job, model, reference, key, worker_env, broker_pid } = self;
        driver.declare(topology).await?;
        let mut replies = driver.replies(&topology.name("replies")).await?;
        let collector = replies.collect(Expectation {
            label: name.clone(),
            jobs,
            rows_per_job,
            reference: Some(reference),
            key: key.clone(),
            deadline: Instant::now() + PHASE_TIMEOUT,
        })?;
        let mut batch = jobs::build(&bench.samples, model, "job", jobs, rows_per_job);
        if let Some(key) = &key {
            batch = jobs::seal(batch, key);
        }
        let publisher = driver.publisher().await?;
        let prefill = publisher.prefill(topology.jobs_queue(), &replies.name, &batch).await?;
        publisher.close().await;
        drop(batch);
        progress(&format!("{name}: {jobs} jobs pre-filled in {:.1} s", prefill.as_secs_f64()));

        let (mut worker, ready_at) =
            Worker::start_with_env(bench, Kind::Batchscore, topology, &name, &worker_env).await?;
        let pids = [Some(worker.pid()), broker_pid];
        let cpu_before = pids.map(|pid| pid.and_then(cpu_seconds));
        let collected = worker.guard(collector.finish()).await?;
        let cpu_after = pids.map(|pid| pid.and_then(cpu_seconds));
        let observed = match before_stop {
            Some(work) => Some(work.await),
            None => None,
        };
        let drain = scenarios::drained(&name, worker, ready_at, &collected, rows_per_job).await;
        replies.close().await;
        let cpu = [0, 1].map(|p| Some(cpu_after[p]? - cpu_before[p]?));
        Ok((Run { drain, cpu }, observed))
    }
}

/// The table of every variant's figures per job size, then notes on the drains: the rows/s and
/// jobs/s (median, min–max), the ratio to the baseline's median against the variant's goal, and
/// the worker's and the broker's CPU per 1,000 rows (medians).
pub fn render_table<S>(out: &mut String, baseline: &str, comparisons: &[Comparison<S>]) {
    let _ = write!(
        out,
        "| Jobs × rows | Variant | Jobs/s | Rows/s | ÷ {baseline} | Worker CPU ms per 1,000 rows | RabbitMQ CPU ms per \
         1,000 rows | Target |\n|---|---|---:|---:|---:|---:|---:|---|\n",
    );
    let mut notes = Vec::new();
    for c in comparisons {
        for (v, (variant, runs)) in c.runs.iter().enumerate() {
            let jobs_per_s = Comparison::<S>::spread(runs, |r| Some(r.drain.jobs_per_s()));
            let cpu = |p: usize| {
                Comparison::<S>::spread(runs, |r| r.cpu_ms_per_1k_rows(p))
                    .map_or("—".into(), |s| format!("{:.1}", s.median))
            };
            let ratio = if v == 0 { "—".to_string() } else { c.ratio(v).map_or("—".into(), two_places) };
            let target = if v == 0 { "baseline".to_string() } else { goal_cell(variant.goal, c.ratio(v), "—") };
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

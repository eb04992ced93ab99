//! The measurements: pre-filled queues drained by each system, open loops at a fixed rate, and
//! the online lane under a bulk drain. Drains and open loops run in [`ROUNDS`] rounds, the
//! systems alternating within each (a, c, d, e, a, c, d, e, …), so that each system's figures
//! come with their spread and a drift of the machine during the run touches every system alike.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::broker::{Collected, Expectation, Schedule, Topology};
use crate::engine::{Engine, EngineRun, Reference};
use crate::workers::{Kind, Worker};
use crate::{jobs, progress, Bench, Skip, PHASE_TIMEOUT};

/// Rows of one bulk-lane job, and jobs in the full-scale bulk drain (a million rows).
const BULK_ROWS_PER_JOB: usize = 10_000;
const BULK_JOBS: usize = 100;
pub const OPEN_LOOP_RATE: f64 = 1_000.0;
pub const OPEN_LOOP_SECONDS: f64 = 10.0;
pub const LANES_RATE: f64 = 200.0;
pub const LANES_SECONDS: f64 = 5.0;
/// Drains per system and scenario, and open loops per system.
pub const ROUNDS: usize = 3;
/// The systems of the drains and open loops, in the order they alternate.
const SYSTEMS: [Kind; 4] = [Kind::NoopEngine, Kind::Batchscore, Kind::PythonBatching, Kind::PythonPerMessage];
/// Beyond [`PHASE_TIMEOUT`] for the steps around the collection (starting and stopping workers).
const PHASE_SLACK: Duration = Duration::from_secs(60);

/// A pre-filled queue of equal jobs.
#[derive(Debug, Clone, Copy)]
pub struct DrainScenario {
    pub key: &'static str,
    pub jobs: usize,
    pub rows_per_job: usize,
}

impl DrainScenario {
    /// `2,000 jobs × 100 rows`.
    pub fn title(&self) -> String {
        let plural = |n: usize, word: &str| {
            format!("{} {word}{}", crate::report::thousands(n as f64), if n == 1 { "" } else { "s" })
        };
        format!("{} × {}", plural(self.jobs, "job"), plural(self.rows_per_job, "row"))
    }
}

pub const DRAINS: [DrainScenario; 3] = [
    DrainScenario { key: "1row", jobs: 20_000, rows_per_job: 1 },
    DrainScenario { key: "100rows", jobs: 2_000, rows_per_job: 100 },
    DrainScenario { key: "10krows", jobs: 20, rows_per_job: 10_000 },
];

/// The outcome of one measurement.
pub enum Measured<T> {
    Done(T),
    /// The build or machine lacks what it needs; not an error of the worker.
    Skipped(String),
    Failed(String),
}

impl<T> Measured<T> {
    pub fn done(&self) -> Option<&T> {
        match self {
            Measured::Done(value) => Some(value),
            _ => None,
        }
    }

    pub fn is_failed(&self) -> bool {
        matches!(self, Measured::Failed(_))
    }
}

impl<T> From<Result<T>> for Measured<T> {
    fn from(outcome: Result<T>) -> Self {
        match outcome {
            Ok(value) => Measured::Done(value),
            Err(error) => match error.chain().find_map(|cause| cause.downcast_ref::<Skip>()) {
                Some(skip) => Measured::Skipped(skip.0.clone()),
                None => Measured::Failed(format!("{error:#}")),
            },
        }
    }
}

/// One system draining one pre-filled queue.
pub struct Drain {
    pub jobs: usize,
    pub rows: usize,
    /// From the worker's readiness (or its first result, if earlier) to the last result.
    pub seconds: f64,
    pub mean_batch: Option<f64>,
    pub peak_rss: Option<u64>,
    /// Results compared with the in-process scores of the model.
    pub spot_checked: usize,
    pub notes: Vec<String>,
}

impl Drain {
    pub fn jobs_per_s(&self) -> f64 {
        self.jobs as f64 / self.seconds
    }

    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.seconds
    }
}

/// Every system on one scenario: each worker's drains in the order they ran.
pub struct DrainReport {
    pub scenario: DrainScenario,
    pub broker: Vec<Measured<Drain>>,
    pub engine: Measured<EngineRun>,
    pub batchscore: Vec<Measured<Drain>>,
    pub python_batching: Vec<Measured<Drain>>,
    pub python_per_message: Vec<Measured<Drain>>,
}

/// The drain with the median rows/s of `runs` (the upper one of an even count).
pub fn median_drain(runs: &[Measured<Drain>]) -> Option<&Drain> {
    let mut done: Vec<&Drain> = runs.iter().filter_map(Measured::done).collect();
    done.sort_by(|a, b| a.rows_per_s().total_cmp(&b.rows_per_s()));
    done.get(done.len() / 2).copied()
}

/// Open-loop latency, publish to result receipt.
pub struct Latency {
    pub jobs: usize,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// p99 of the time the worker held a job (receipt to encoded result), when it says.
    pub worker_p99: Option<Duration>,
    /// How far the publisher fell behind its schedule at worst.
    pub publish_lag: Duration,
    pub mean_batch: Option<f64>,
    pub peak_rss: Option<u64>,
    pub notes: Vec<String>,
}

/// The online lane with the bulk lane idle, then during a bulk drain.
pub struct Lanes {
    pub idle: Latency,
    pub during: Latency,
    pub bulk_jobs: usize,
    pub bulk_rows: usize,
    pub drain_seconds: f64,
    pub peak_rss: Option<u64>,
    /// Cores each process kept busy while the bulk lane drained: (process, cores).
    pub cpu: Vec<(&'static str, f64)>,
    pub notes: Vec<String>,
}

impl Lanes {
    /// Online p99 during the bulk drain ÷ with the bulk lane idle.
    pub fn p99_ratio(&self) -> Option<f64> {
        let idle = self.idle.p99.as_secs_f64();
        (idle > 0.0).then(|| self.during.p99.as_secs_f64() / idle)
    }

    pub fn bulk_rows_per_s(&self) -> f64 {
        self.bulk_rows as f64 / self.drain_seconds
    }
}

pub fn label(kind: Kind) -> &'static str {
    match kind {
        Kind::NoopEngine => "(a) broker ceiling",
        Kind::Batchscore => "(c) batchscore",
        Kind::PythonBatching => "(d) Python batching",
        Kind::PythonPerMessage => "(e) Python per-message",
    }
}

fn tag(kind: Kind) -> &'static str {
    match kind {
        Kind::NoopEngine => "a",
        Kind::Batchscore => "c",
        Kind::PythonBatching => "d",
        Kind::PythonPerMessage => "e",
    }
}

/// Runs `work` under the phase time limit and reports how it went.
pub async fn measure<T>(what: &str, work: impl Future<Output = Result<T>>) -> Measured<T> {
    progress(&format!("{what}: running"));
    let started = Instant::now();
    let limit = PHASE_TIMEOUT + PHASE_SLACK;
    let outcome = tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(anyhow!("{what}: did not finish within {} s", limit.as_secs())));
    let measured = Measured::from(outcome);
    let elapsed = started.elapsed().as_secs_f64();
    match &measured {
        Measured::Done(_) => progress(&format!("{what}: done in {elapsed:.1} s")),
        Measured::Skipped(why) => progress(&format!("{what}: skipped: {why}")),
        Measured::Failed(why) => progress(&format!("{what}: FAILED: {why}")),
    }
    measured
}

/// Scenario `scenario` on every system in [`ROUNDS`] rounds of (a), (c), (d), (e); then (b) at the
/// batch size (c) formed in its median drain.
pub async fn drain_all(bench: &Bench, scenario: &DrainScenario) -> DrainReport {
    let scenario = DrainScenario { jobs: bench.count(scenario.jobs), ..*scenario };
    let mut runs: [Vec<Measured<Drain>>; 4] = Default::default();
    for round in 1..=ROUNDS {
        for (s, kind) in SYSTEMS.into_iter().enumerate() {
            let what = format!("{}, {}, {round} of {ROUNDS}", scenario.title(), label(kind));
            let reference = reference_for(bench, kind);
            runs[s].push(measure(&what, drain_model(bench, kind, &scenario, round, jobs::MODEL, reference)).await);
        }
    }
    let [broker, batchscore, python_batching, python_per_message] = runs;
    let engine = engine_ceiling(bench, &bench.engine, median_drain(&batchscore), "(b) engine ceiling").await;
    DrainReport { scenario, broker, engine, batchscore, python_batching, python_per_message }
}

/// `engine` run in this process at the mean batch size the worker formed in `batchscore`.
pub async fn engine_ceiling(
    bench: &Bench,
    engine: &Engine,
    batchscore: Option<&Drain>,
    system: &str,
) -> Measured<EngineRun> {
    match batchscore.map(|d| d.mean_batch) {
        Some(Some(rows)) => {
            let what = format!("batches of {rows:.0} rows, {system}");
            measure(&what, engine.throughput(&bench.samples, rows.round() as usize)).await
        }
        Some(None) => Measured::Failed("the worker's /metrics had no batchscore_batch_rows".into()),
        None => Measured::Skipped("needs the mean batch size of (c)".into()),
    }
}

fn reference_for(bench: &Bench, kind: Kind) -> Option<Arc<Reference>> {
    (kind != Kind::NoopEngine).then(|| Arc::clone(&bench.reference))
}

/// Pre-fills a queue with jobs for `model`, starts the worker, and times it from readiness to the
/// last result; a few results are checked against `reference` (scores of `model`). `round` tells
/// the queues of repeated drains apart.
pub async fn drain_model(
    bench: &Bench,
    kind: Kind,
    scenario: &DrainScenario,
    round: usize,
    model: &str,
    reference: Option<Arc<Reference>>,
) -> Result<Drain> {
    let name = format!("{}-{}-{round}", tag(kind), scenario.key);
    let topology = bench.topology(&name, false);
    bench.broker.declare(&topology).await?;
    let mut replies = bench.broker.replies(&topology.name("replies")).await?;
    let collector = replies.collect(Expectation {
        label: name.clone(),
        jobs: scenario.jobs,
        rows_per_job: scenario.rows_per_job,
        reference,
        key: None,
        deadline: Instant::now() + PHASE_TIMEOUT,
    })?;
    let jobs = jobs::build(&bench.samples, model, "job", scenario.jobs, scenario.rows_per_job);
    let publisher = bench.broker.publisher().await?;
    let prefill = publisher.prefill(topology.jobs_queue(), &replies.name, &jobs).await?;
    publisher.close().await;
    drop(jobs);
    progress(&format!("{name}: {} jobs pre-filled in {:.1} s", scenario.jobs, prefill.as_secs_f64()));

    let (mut worker, ready_at) = Worker::start(bench, kind, &topology, &name).await?;
    let collected = worker.guard(collector.finish()).await?;
    let drain = drained(&name, worker, ready_at, &collected, scenario.rows_per_job).await;
    replies.close().await;
    bench.broker.delete(&topology).await;
    Ok(drain)
}

/// The figures of a drain whose results are all in: the worker's mean batch and peak memory, the
/// time from its readiness (or the first result, if sooner) to the last result; the worker is
/// stopped, and a failure to stop cleanly becomes a note.
pub async fn drained(
    name: &str,
    worker: Worker,
    ready_at: Instant,
    collected: &Collected,
    rows_per_job: usize,
) -> Drain {
    let mean_batch = worker.mean_batch_rows().await;
    let peak_rss = worker.peak_rss_bytes();
    let notes = stop(worker).await.into_iter().chain(duplicates(collected)).collect();
    let seconds = collected.last.duration_since(started(ready_at, collected)).as_secs_f64().max(1e-6);
    let jobs = collected.received_at.len();
    let drain = Drain {
        jobs,
        rows: jobs * rows_per_job,
        seconds,
        mean_batch,
        peak_rss,
        spot_checked: collected.spot_checked,
        notes,
    };
    progress(&format!("{name}: {:.0} jobs/s, {:.0} rows/s", drain.jobs_per_s(), drain.rows_per_s()));
    drain
}

/// When draining began: readiness as polled, or the first result if that came sooner.
fn started(ready_at: Instant, collected: &Collected) -> Instant {
    collected.received_at.iter().flatten().copied().fold(ready_at, Instant::min)
}

/// Stops the worker; a failure to stop cleanly becomes a note, the figures stand.
async fn stop(worker: Worker) -> Option<String> {
    worker.stop().await.err().map(|error| format!("{error:#}"))
}

fn duplicates(collected: &Collected) -> Option<String> {
    (collected.duplicates > 0).then(|| format!("{} duplicate results", collected.duplicates))
}

/// The open loop on every system, in [`ROUNDS`] rounds of (a), (c), (d), (e); each system's loops
/// in the order they ran.
pub async fn open_loop_all(bench: &Bench) -> Vec<(Kind, Vec<Measured<Latency>>)> {
    let mut all: Vec<(Kind, Vec<Measured<Latency>>)> = SYSTEMS.iter().map(|kind| (*kind, Vec::new())).collect();
    for round in 1..=ROUNDS {
        for (kind, loops) in &mut all {
            let what = format!("open loop at {OPEN_LOOP_RATE:.0} jobs/s, {}, {round} of {ROUNDS}", label(*kind));
            loops.push(measure(&what, open_loop_on(bench, *kind, round)).await);
        }
    }
    all
}

async fn open_loop_on(bench: &Bench, kind: Kind, round: usize) -> Result<Latency> {
    let name = format!("{}-open-{round}", tag(kind));
    open_loop_of(bench, kind, &name, jobs::MODEL, reference_for(bench, kind), &[]).await
}

/// The open loop of jobs for `model`, a few results checked against `reference`, on a batchscore
/// worker started with `worker_env`, on queues of its own.
pub async fn open_loop_with_env(
    bench: &Bench,
    name: &str,
    model: &str,
    reference: Arc<Reference>,
    worker_env: &[(&str, String)],
) -> Result<Latency> {
    open_loop_of(bench, Kind::Batchscore, name, model, Some(reference), worker_env).await
}

async fn open_loop_of(
    bench: &Bench,
    kind: Kind,
    name: &str,
    model: &str,
    reference: Option<Arc<Reference>>,
    worker_env: &[(&str, String)],
) -> Result<Latency> {
    let topology = bench.topology(name, false);
    bench.broker.declare(&topology).await?;
    let (mut worker, _) = Worker::start_with_env(bench, kind, &topology, name, worker_env).await?;
    let run = open_loop(bench, &topology, "open", model, reference, OPEN_LOOP_RATE, OPEN_LOOP_SECONDS);
    let run = worker.guard(run).await?;
    let mut latency = latency(&run, None)?;
    latency.mean_batch = worker.mean_batch_rows().await;
    latency.peak_rss = worker.peak_rss_bytes();
    latency.notes.extend(stop(worker).await);
    bench.broker.delete(&topology).await;
    progress(&format!("{name}: p50 {:?}, p99 {:?}, max {:?}", latency.p50, latency.p99, latency.max));
    Ok(latency)
}

/// An open loop's publish and receipt times.
struct OpenLoop {
    schedule: Schedule,
    collected: Collected,
}

/// Publishes single-row jobs for `model` to the online queue at `rate` for `seconds` (scaled) and
/// collects their results.
async fn open_loop(
    bench: &Bench,
    topology: &Topology,
    tag: &str,
    model: &str,
    reference: Option<Arc<Reference>>,
    rate: f64,
    seconds: f64,
) -> Result<OpenLoop> {
    let count = ((rate * bench.duration(seconds).as_secs_f64()).round() as usize).max(1);
    let jobs = jobs::build(&bench.samples, model, tag, count, 1);
    let mut replies = bench.broker.replies(&topology.name(&format!("replies.{tag}"))).await?;
    let collector = replies.collect(Expectation {
        label: format!("open loop {tag}"),
        jobs: count,
        rows_per_job: 1,
        reference,
        key: None,
        deadline: Instant::now() + PHASE_TIMEOUT,
    })?;
    let publisher = bench.broker.publisher().await?;
    let schedule = publisher.on_schedule(topology.jobs_queue(), &replies.name, &jobs, rate).await?;
    publisher.close().await;
    let collected = collector.finish().await?;
    replies.close().await;
    Ok(OpenLoop { schedule, collected })
}

/// Latency percentiles, publish to receipt, of the jobs published before `until` (all if `None`).
fn latency(run: &OpenLoop, until: Option<Instant>) -> Result<Latency> {
    let in_window = |i: &usize| until.is_none_or(|until| run.schedule.published_at[*i] <= until);
    let jobs = 0..run.schedule.published_at.len().min(run.collected.received_at.len());
    let mut latencies: Vec<Duration> = jobs
        .clone()
        .filter(in_window)
        .filter_map(|i| run.collected.received_at[i].map(|r| r.saturating_duration_since(run.schedule.published_at[i])))
        .collect();
    latencies.sort_unstable();
    let mut held: Vec<f64> =
        jobs.filter(in_window).filter_map(|i| run.collected.worker_ms.get(i).copied().flatten()).collect();
    held.sort_unstable_by(f64::total_cmp);
    let worker_p99 = (!held.is_empty()).then(|| {
        let rank = ((0.99 * held.len() as f64).ceil() as usize).clamp(1, held.len());
        Duration::from_secs_f64(held[rank - 1] / 1e3)
    });
    let percentile = |p: f64| -> Result<Duration> {
        let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len().max(1));
        latencies.get(rank - 1).copied().context("no job of the open loop was published in the window measured")
    };
    Ok(Latency {
        jobs: latencies.len(),
        p50: percentile(0.50)?,
        p95: percentile(0.95)?,
        p99: percentile(0.99)?,
        max: percentile(1.0)?,
        worker_p99,
        publish_lag: run.schedule.max_lag,
        mean_batch: None,
        peak_rss: None,
        notes: duplicates(&run.collected).into_iter().collect(),
    })
}

/// The online lane's p99 with the bulk lane idle, then while the bulk lane drains a million rows.
/// [`ROUNDS`] measurements of the lanes, each with fresh queues and workers.
pub async fn lanes(bench: &Bench) -> Vec<Measured<Lanes>> {
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let what = format!("priority lanes, (c) batchscore, {round} of {ROUNDS}");
        rounds.push(measure(&what, lanes_run(bench, round)).await);
    }
    rounds
}

async fn lanes_run(bench: &Bench, round: usize) -> Result<Lanes> {
    let topology = bench.topology(&format!("c-lanes-{round}"), true);
    let reference = Some(Arc::clone(&bench.reference));
    let mut notes = Vec::new();

    // The first worker declares both lanes, exactly as it wants them, and serves the online lane
    // with nothing in the bulk lane.
    let (mut worker, _) = Worker::start(bench, Kind::Batchscore, &topology, &format!("c-lanes-idle-{round}")).await?;
    let run = open_loop(bench, &topology, "idle", jobs::MODEL, reference.clone(), LANES_RATE, LANES_SECONDS);
    let run = worker.guard(run).await?;
    let mut idle = latency(&run, None)?;
    idle.mean_batch = worker.mean_batch_rows().await;
    idle.peak_rss = worker.peak_rss_bytes();
    notes.extend(stop(worker).await);
    progress(&format!("lanes: online p99 {:?} with the bulk lane idle", idle.p99));

    let bulk_jobs = bench.count(BULK_JOBS);
    let mut bulk_replies = bench.broker.replies(&topology.name("replies.bulk")).await?;
    let bulk = bulk_replies.collect(Expectation {
        label: "bulk lane".into(),
        jobs: bulk_jobs,
        rows_per_job: BULK_ROWS_PER_JOB,
        reference: reference.clone(),
        key: None,
        deadline: Instant::now() + PHASE_TIMEOUT,
    })?;
    prefill_bulk(bench, &topology, &bulk_replies.name, bulk_jobs).await?;

    // The second worker finds the bulk queue full; the online open loop starts with it.
    let (mut worker, ready_at) =
        Worker::start(bench, Kind::Batchscore, &topology, &format!("c-lanes-drain-{round}")).await?;
    let processes =
        [("worker", Some(worker.pid())), ("RabbitMQ", broker_pid()), ("benchmark", Some(std::process::id()))];
    let cpu_before: Vec<Option<f64>> = processes.iter().map(|(_, pid)| pid.and_then(cpu_seconds)).collect();
    let online = open_loop(bench, &topology, "during", jobs::MODEL, reference, LANES_RATE, LANES_SECONDS);
    let bulk = async {
        let drained = bulk.finish().await?;
        let cpu_after: Vec<Option<f64>> = processes.iter().map(|(_, pid)| pid.and_then(cpu_seconds)).collect();
        Ok::<_, anyhow::Error>((drained, cpu_after))
    };
    let (run, (drained, cpu_after)) = worker.guard(async { tokio::try_join!(online, bulk) }).await?;
    let mut during = match latency(&run, Some(drained.last)) {
        Ok(during) => during,
        Err(_) => {
            notes.push("the bulk drain ended before the first online job; all online jobs are counted".into());
            latency(&run, None)?
        }
    };
    during.mean_batch = worker.mean_batch_rows().await;
    let peak_rss = worker.peak_rss_bytes();
    during.peak_rss = peak_rss;
    notes.extend(stop(worker).await);
    notes.extend(duplicates(&drained));
    bulk_replies.close().await;
    bench.broker.delete(&topology).await;

    let drain_seconds = drained.last.duration_since(started(ready_at, &drained)).as_secs_f64().max(1e-6);
    let cpu = processes
        .iter()
        .zip(cpu_before.iter().zip(&cpu_after))
        .filter_map(|((name, _), (before, after))| Some((*name, (after.as_ref()? - before.as_ref()?) / drain_seconds)))
        .collect();
    if during.jobs < run.schedule.published_at.len() {
        notes.push(format!(
            "the bulk drain took {drain_seconds:.2} s, so the during-drain figures cover the {} online jobs \
             published before it ended",
            during.jobs
        ));
    }
    Ok(Lanes { idle, during, bulk_jobs, bulk_rows: bulk_jobs * BULK_ROWS_PER_JOB, drain_seconds, peak_rss, cpu, notes })
}

/// Fills the bulk lane's queue with `count` jobs of [`BULK_ROWS_PER_JOB`] rows.
async fn prefill_bulk(bench: &Bench, topology: &Topology, reply_to: &str, count: usize) -> Result<()> {
    let queue = topology.bulk_queue.as_deref().context("the lanes measurement has a bulk queue")?;
    let jobs = jobs::build(&bench.samples, jobs::MODEL, "bulk", count, BULK_ROWS_PER_JOB);
    let publisher = bench.broker.publisher().await?;
    let took = publisher.prefill(queue, reply_to, &jobs).await?;
    publisher.close().await;
    progress(&format!("lanes: {count} bulk jobs pre-filled in {:.1} s", took.as_secs_f64()));
    Ok(())
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux for every architecture the worker targets.
    Some(ticks / 100.0)
}

/// The local RabbitMQ node's Erlang VM, for its CPU use: not the node of a test running beside
/// the benchmark, which the test harness starts with `RABBITMQ_NODENAME=batchscore-test-…`.
pub fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let private = environ.split(|byte| *byte == 0).any(|v| v.starts_with(b"RABBITMQ_NODENAME=batchscore-test-"));
        (comm.trim() == "beam.smp" && !private).then_some(pid)
    })
}

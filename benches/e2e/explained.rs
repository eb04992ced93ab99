//! Explanations through the worker: the worker process serving the explanation fixtures of
//! `tests/fixtures/explain/models`, with and without `"explain": true`.
//!
//! Throughput: for each method (linear: model `linear`; tree: `gbt_lightgbm`; sampling: `mlp`) and
//! job size (1 and 100 rows), the same number of jobs is drained from a pre-filled queue without
//! and with explanations, in alternating pairs (plain, explained, plain, explained, plain,
//! explained), each by a fresh worker; the report gives each side's median rows/s with its spread
//! and the ratio of the medians. The rows are the held-out applicants of
//! `tests/fixtures/expected/linear_v1.json` (same features, same order), which differ from the
//! baselines in nearly every feature, as real applicants do. The sampling method scores
//! `samples · (d − 1)` further rows for a row that differs from the baseline in `d` features, so
//! its worker runs with a raised `limits.max_rows_per_job` and its job counts are far smaller.
//!
//! Latency: one worker, single-row jobs published at 1,000 jobs/s, plain then explained, for the
//! linear and tree models; each result's `timing_ms.total` is the worker's own time for the job.
//!
//! Every result is checked: status `ok`, its row count, and one explanation per row when asked and
//! none otherwise. Every [`FULL_CHECK_EVERY`]-th job's result is parsed whole: one probability row
//! per job row and one contribution per feature in each explanation, and on a few results per
//! measurement that the contributions add up to `value − base_value`. The others are read from
//! their opening and closing members and their explanations counted, without parsing the some
//! 135 KB of an explained 100-row job: the driver shares the cores with the worker it measures,
//! and parsing every result took it 5.6 ms of CPU per 1,000 explained rows, two thirds of what
//! the worker itself spends on plain rows.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use batchscore::engine::model::ModelConfig;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::broker::{Collector, Topology};
use crate::jobs::{self, Job};
use crate::report::{goal_cell, not_done, spread_cell, thousands, two_places, Spread};
use crate::scenarios::{self, broker_pid, cpu_seconds, Drain, Measured, OPEN_LOOP_RATE, OPEN_LOOP_SECONDS};
use crate::workers::{Kind, Worker};
use crate::{progress, Bench, PHASE_TIMEOUT};

/// The model repository the worker serves in this phase.
pub const REPOSITORY: &str = "tests/fixtures/explain/models";
/// Real applicant rows, in the fixtures' feature order.
const ROWS: &str = "tests/fixtures/expected/linear_v1.json";
/// Plain/explained pairs per method and job size.
pub const PAIRS: usize = 3;
/// `limits.max_rows_per_job` and `limits.max_inflight_rows` of the sampling worker: a 100-row job
/// of rows that differ from the baseline in 61 features scores 100 · (1 + 64 · 60) = 384,100 rows,
/// and a prefetch of 256 single-row jobs holds 256 · 3,841 = 983,296 rows.
pub const SAMPLING_MAX_ROWS: usize = 1_000_000;
/// A collection that sees no result for this long after an earlier one fails at once: the worker
/// stopped answering (the longest job here, 384,100 rows, takes well under a second).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Target for the p99 of `timing_ms.total` of 1-row explained jobs (linear and tree).
pub const LATENCY_TARGET_MS: f64 = 5.0;
/// Jobs of each open loop's unmeasured warm-up.
const WARM_UP_JOBS: usize = 250;
/// Results per measurement whose contributions are checked to add up to `value − base_value`.
const SPOT_JOBS: usize = 10;
/// What the test suite allows for float32 scoring (tests/explanations.rs).
const SUM_TOLERANCE: f64 = 1e-3;
/// Jobs whose results are parsed whole: every this-many-th by job index.
const FULL_CHECK_EVERY: usize = 10;
/// What opens each row's explanation in a result, counted in results not parsed whole.
const EXPLANATION_MARK: &[u8] = br#""contributions":["#;

/// An explanation method and the fixture model it is measured on.
#[derive(Debug, Clone, Copy)]
pub struct Method {
    pub name: &'static str,
    pub model: &'static str,
    /// Explained ÷ plain rows/s the product spec asks for; `None`: documented only.
    pub goal: Option<f64>,
    /// Jobs drained per measurement at `BENCH_SCALE=1`, for 1-row and for 100-row jobs.
    jobs: [usize; 2],
}

impl Method {
    fn is_sampling(&self) -> bool {
        self.name == SAMPLING.name
    }
}

pub const LINEAR: Method = Method { name: "linear", model: "linear", goal: Some(0.5), jobs: [20_000, 2_000] };
pub const TREE: Method = Method { name: "tree", model: "gbt_lightgbm", goal: Some(0.2), jobs: [20_000, 2_000] };
/// About 15 s per explained drain on 2 cores.
pub const SAMPLING: Method = Method { name: "sampling", model: "mlp", goal: None, jobs: [5_000, 40] };
const METHODS: [Method; 3] = [LINEAR, TREE, SAMPLING];
const JOB_ROWS: [usize; 2] = [1, 100];

/// Processes whose CPU time is read over each drain.
pub const PROCESSES: [&str; 3] = ["worker", "RabbitMQ", "driver"];

/// One drain, what its results weighed, and the CPU time each of [`PROCESSES`] used meanwhile.
pub struct Run {
    pub drain: Drain,
    /// Bytes of all its results.
    pub result_bytes: u64,
    /// CPU seconds (user + system) per process, from the worker's readiness to the last result.
    pub cpu: [Option<f64>; 3],
}

impl Run {
    fn rows_per_s(&self) -> f64 {
        self.drain.rows_per_s()
    }

    /// CPU milliseconds of process `p` per 1,000 of the jobs' own rows.
    fn cpu_ms_per_1k_rows(&self, p: usize) -> Option<f64> {
        self.cpu[p].map(|s| s * 1e6 / self.drain.rows.max(1) as f64)
    }
}

/// One method on one job size: the plain and the explained drains, in the order they ran.
pub struct Comparison {
    pub method: Method,
    pub jobs: usize,
    pub rows_per_job: usize,
    /// Rows the worker scores per explained job, on average: the job's own and the sampling
    /// method's walk points.
    pub scored_per_job: f64,
    pub plain: Vec<Measured<Run>>,
    pub explained: Vec<Measured<Run>>,
}

impl Comparison {
    fn spread(runs: &[Measured<Run>], figure: impl Fn(&Run) -> Option<f64>) -> Option<Spread> {
        Spread::over(runs, figure)
    }

    pub fn plain_rows_per_s(&self) -> Option<Spread> {
        Self::spread(&self.plain, |r| Some(r.rows_per_s()))
    }

    pub fn explained_rows_per_s(&self) -> Option<Spread> {
        Self::spread(&self.explained, |r| Some(r.rows_per_s()))
    }

    /// Explained ÷ plain, of the medians.
    pub fn ratio(&self) -> Option<f64> {
        let (explained, plain) = (self.explained_rows_per_s()?, self.plain_rows_per_s()?);
        (plain.median > 0.0).then(|| explained.median / plain.median)
    }

    fn has_failures(&self) -> bool {
        self.plain.iter().chain(&self.explained).any(Measured::is_failed)
    }

    /// `plain / explained`: the median of `figure` on each side, written by `text`.
    fn both(&self, figure: impl Fn(&Run) -> Option<f64> + Copy, text: impl Fn(f64) -> String) -> String {
        let side = |runs: &[Measured<Run>]| Self::spread(runs, figure).map_or("—".into(), |s| text(s.median));
        format!("{} / {}", side(&self.plain), side(&self.explained))
    }

    fn title(&self) -> String {
        let plural = if self.rows_per_job == 1 { "" } else { "s" };
        format!("{} jobs × {} row{plural}", thousands(self.jobs as f64), self.rows_per_job)
    }
}

/// Open-loop latency of single-row jobs, as the worker measured it and as the driver saw it.
pub struct OpenLoopLatency {
    pub jobs: usize,
    /// Percentiles of `timing_ms.total`.
    pub worker_p50: Duration,
    pub worker_p99: Duration,
    /// Percentiles of publish to result receipt.
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub publish_lag: Duration,
    pub notes: Vec<String>,
}

/// One model at the open-loop rate, plain then explained, on the same worker.
pub struct LatencyCase {
    pub method: Method,
    pub plain: Measured<OpenLoopLatency>,
    pub explained: Measured<OpenLoopLatency>,
}

/// What the rows are and how far they are from each model's baseline.
pub struct RowsInfo {
    pub rows: usize,
    pub features: usize,
    /// Per method: the fewest and the most features in which a row differs from the baseline.
    pub differing: Vec<(Method, usize, usize)>,
    /// The sampling method's permutations per row.
    pub samples: usize,
}

pub struct ExplainReport {
    pub scale: f64,
    pub info: Measured<RowsInfo>,
    pub throughput: Vec<Comparison>,
    pub latency: Vec<LatencyCase>,
}

/// The rows jobs are built from.
struct Rows {
    /// Each row as compact JSON text.
    json: Vec<String>,
    values: Vec<Vec<f32>>,
    features: Vec<String>,
}

/// A fixture model as the driver needs it: its baseline and its sampling settings.
struct Model {
    baseline: Vec<f32>,
    samples: usize,
}

/// What every measurement of the phase shares.
struct Phase {
    rows: Rows,
    /// Per method, in [`METHODS`] order.
    models: Vec<Model>,
    /// Where results are received: a connection of this phase's own, as results are read in full.
    replies: Connection,
    repository: String,
    /// The local RabbitMQ node, for its CPU time.
    broker: Option<u32>,
}

/// Runs the phase: the throughput pairs of every method and job size, then the open loops.
pub async fn compare(bench: &Bench) -> ExplainReport {
    let mut report = ExplainReport {
        scale: bench.scale,
        info: Measured::Skipped(String::new()),
        throughput: Vec::new(),
        latency: Vec::new(),
    };
    let phase = match Phase::prepare(bench).await {
        Ok(phase) => phase,
        Err(error) => {
            progress(&format!("explanations: FAILED: {error:#}"));
            report.info = Measured::Failed(format!("{error:#}"));
            return report;
        }
    };
    report.info = Measured::Done(phase.info());
    for (m, method) in METHODS.iter().enumerate() {
        for (size, &rows_per_job) in JOB_ROWS.iter().enumerate() {
            let jobs = bench.count(method.jobs[size]);
            let mut comparison = Comparison {
                method: *method,
                jobs,
                rows_per_job,
                scored_per_job: phase.scored_per_job(m, jobs, rows_per_job),
                plain: Vec::new(),
                explained: Vec::new(),
            };
            for pair in 1..=PAIRS {
                for explained in [false, true] {
                    let side = if explained { "explained" } else { "plain" };
                    let what = format!(
                        "explanations, {} ({}), {}, {side} {pair} of {PAIRS}",
                        method.name,
                        method.model,
                        comparison.title()
                    );
                    let drain = phase.drain(bench, m, jobs, rows_per_job, explained, pair);
                    let measured = scenarios::measure(&what, drain).await;
                    if explained {
                        comparison.explained.push(measured);
                    } else {
                        comparison.plain.push(measured);
                    }
                }
            }
            if let Some(ratio) = comparison.ratio() {
                progress(&format!(
                    "explanations, {}, {}: explained ÷ plain {ratio:.2}",
                    method.name,
                    comparison.title()
                ));
            }
            report.throughput.push(comparison);
        }
    }
    report.latency = phase.open_loops(bench).await;
    phase.replies.close(200, "benchmark done".into()).await.ok();
    report
}

impl Phase {
    async fn prepare(bench: &Bench) -> Result<Self> {
        let rows = Rows::load(&bench.root)?;
        let mut models = Vec::new();
        for method in METHODS {
            models.push(Model::load(&bench.root.join(REPOSITORY).join(method.model), &rows.features)?);
        }
        let properties = ConnectionProperties::default().with_connection_name("batchscore-bench-explanations".into());
        let replies = Connection::connect(&bench.settings.amqp.url, properties).await.with_context(|| {
            format!("connecting to RabbitMQ at {}", batchscore::amqp::redact(&bench.settings.amqp.url))
        })?;
        let repository = bench.root.join(REPOSITORY).to_string_lossy().into_owned();
        Ok(Self { rows, models, replies, repository, broker: broker_pid() })
    }

    fn info(&self) -> RowsInfo {
        let differing = METHODS
            .iter()
            .zip(&self.models)
            .map(|(method, model)| {
                let counts = self.rows.values.iter().map(|row| model.differing(row));
                let (min, max) = counts.fold((usize::MAX, 0), |(lo, hi), d| (lo.min(d), hi.max(d)));
                (*method, min, max)
            })
            .collect();
        let samples = self.models[2].samples;
        RowsInfo { rows: self.rows.values.len(), features: self.rows.features.len(), differing, samples }
    }

    /// Mean rows scored per explained job of `rows_per_job` rows, over the `jobs` jobs drained.
    fn scored_per_job(&self, m: usize, jobs: usize, rows_per_job: usize) -> f64 {
        if !METHODS[m].is_sampling() {
            return rows_per_job as f64;
        }
        let model = &self.models[m];
        let n = self.rows.values.len();
        let total: usize = (0..jobs * rows_per_job)
            .map(|i| 1 + model.samples * model.differing(&self.rows.values[i % n]).saturating_sub(1))
            .sum();
        total as f64 / jobs.max(1) as f64
    }

    /// The variables that point a worker at the fixture repository, with the sampling method's
    /// limit raised for its model.
    fn worker_env(&self, method: Option<&Method>) -> Vec<(&'static str, String)> {
        let mut env = vec![("BATCHSCORE__MODELS__REPOSITORY", self.repository.clone())];
        if method.is_some_and(Method::is_sampling) {
            env.push(("BATCHSCORE__LIMITS__MAX_ROWS_PER_JOB", SAMPLING_MAX_ROWS.to_string()));
            env.push(("BATCHSCORE__LIMITS__MAX_INFLIGHT_ROWS", SAMPLING_MAX_ROWS.to_string()));
        }
        env
    }

    /// `count` jobs of `rows_per_job` rows for `model`, ids `<prefix>-<i>`, rows cycled.
    fn jobs(&self, model: &str, prefix: &str, count: usize, rows_per_job: usize, explained: bool) -> Vec<Job> {
        let explain = if explained { r#","explain":true"# } else { "" };
        jobs::build_from(&self.rows.json, model, prefix, count, rows_per_job, explain)
    }

    /// An exclusive reply queue named `name` on the phase's connection, consumed without
    /// acknowledgements.
    async fn reply_queue(&self, name: &str) -> Result<(Channel, lapin::Consumer)> {
        let channel = self.replies.create_channel().await.context("opening a results channel")?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        channel.queue_declare(name.into(), options, FieldTable::default()).await.context("declaring a reply queue")?;
        let consumer = channel
            .basic_consume(
                name.into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .context("consuming the reply queue")?;
        Ok((channel, consumer))
    }

    /// Pre-fills a queue with `jobs` jobs of `rows_per_job` rows for method `m`'s model, with or
    /// without explanations, starts a worker and times it from readiness to the last result.
    async fn drain(
        &self,
        bench: &Bench,
        m: usize,
        jobs: usize,
        rows_per_job: usize,
        explained: bool,
        pair: usize,
    ) -> Result<Run> {
        let method = METHODS[m];
        let side = if explained { "explained" } else { "plain" };
        let name = format!("x-{}-{rows_per_job}rows-{side}-{pair}", method.name);
        let topology = bench.topology(&name, false);
        bench.broker.declare(&topology).await?;
        let reply_name = topology.name("replies");
        let (channel, consumer) = self.reply_queue(&reply_name).await?;
        let expect = Expectation {
            label: name.clone(),
            jobs,
            rows_per_job,
            explained,
            features: self.rows.features.len(),
            deadline: Instant::now() + PHASE_TIMEOUT,
        };
        let collector = Collector::spawn(collect(consumer, expect));
        let batch = self.jobs(method.model, "job", jobs, rows_per_job, explained);
        let publisher = bench.broker.publisher().await?;
        let prefill = publisher.prefill(topology.jobs_queue(), &reply_name, &batch).await?;
        publisher.close().await;
        drop(batch);
        progress(&format!("{name}: {jobs} jobs pre-filled in {:.1} s", prefill.as_secs_f64()));

        let env = self.worker_env(Some(&method));
        let (mut worker, ready_at) = Worker::start_with_env(bench, Kind::Batchscore, &topology, &name, &env).await?;
        let pids = [Some(worker.pid()), self.broker, Some(std::process::id())];
        let cpu_before = pids.map(|pid| pid.and_then(cpu_seconds));
        let received = worker.guard(collector.finish()).await?;
        let cpu_after = pids.map(|pid| pid.and_then(cpu_seconds));
        let mean_batch = worker.mean_batch_rows().await;
        let peak_rss = worker.peak_rss_bytes();
        let mut notes: Vec<String> = worker.stop().await.err().map(|e| format!("{e:#}")).into_iter().collect();
        notes.extend(received.duplicates());
        close_reply_queue(channel, &reply_name).await;
        bench.broker.delete(&topology).await;

        let started = received.first.map_or(ready_at, |first| first.min(ready_at));
        let seconds = received.last.duration_since(started).as_secs_f64().max(1e-6);
        let drain = Drain {
            jobs,
            rows: jobs * rows_per_job,
            seconds,
            mean_batch,
            peak_rss,
            spot_checked: received.spot_checked,
            notes,
        };
        progress(&format!("{name}: {:.0} rows/s in {seconds:.2} s", drain.rows_per_s()));
        let cpu = [0, 1, 2].map(|p| Some(cpu_after[p]? - cpu_before[p]?));
        Ok(Run { drain, result_bytes: received.bytes, cpu })
    }

    /// One worker; for the linear and the tree model, an open loop of plain single-row jobs, then
    /// one of explained ones.
    async fn open_loops(&self, bench: &Bench) -> Vec<LatencyCase> {
        let topology = bench.topology("x-open", false);
        let started = async {
            bench.broker.declare(&topology).await?;
            let (mut worker, _) =
                Worker::start_with_env(bench, Kind::Batchscore, &topology, "x-open", &self.worker_env(None)).await?;
            // Not measured: so that the first loop does not pay for the fresh worker's first runs.
            for method in [LINEAR, TREE] {
                for explained in [false, true] {
                    self.open_loop(bench, &topology, &mut worker, &method, explained, WARM_UP_JOBS).await?;
                }
            }
            Ok::<_, anyhow::Error>(worker)
        };
        let what = format!("explanations, open loops: worker start and {WARM_UP_JOBS} warm-up jobs per loop");
        let mut worker = match scenarios::measure(&what, started).await {
            Measured::Done(worker) => Ok(worker),
            other => Err(format!("the worker did not start and warm up: {}", not_done(&other))),
        };
        let mut cases = Vec::new();
        for method in [LINEAR, TREE] {
            let mut sides = Vec::new();
            for explained in [false, true] {
                let side = if explained { "explained" } else { "plain" };
                let what = format!(
                    "explanations, open loop at {OPEN_LOOP_RATE:.0} jobs/s, {} ({}), {side}",
                    method.name, method.model
                );
                sides.push(match &mut worker {
                    Ok(worker) => {
                        let count = (OPEN_LOOP_RATE * bench.duration(OPEN_LOOP_SECONDS).as_secs_f64()).round() as usize;
                        let run = self.open_loop(bench, &topology, worker, &method, explained, count.max(1));
                        scenarios::measure(&what, run).await
                    }
                    Err(why) => Measured::Failed(why.clone()),
                });
            }
            let explained = sides.pop().unwrap_or(Measured::Skipped(String::new()));
            let plain = sides.pop().unwrap_or(Measured::Skipped(String::new()));
            cases.push(LatencyCase { method, plain, explained });
        }
        if let Ok(worker) = worker {
            if let Err(error) = worker.stop().await {
                let note = format!("{error:#}");
                for case in &mut cases {
                    if let Measured::Done(latency) = &mut case.explained {
                        latency.notes.push(note.clone());
                    }
                }
            }
        }
        bench.broker.delete(&topology).await;
        cases
    }

    /// Publishes `count` single-row jobs for `method`'s model at [`OPEN_LOOP_RATE`] and collects
    /// their results.
    async fn open_loop(
        &self,
        bench: &Bench,
        topology: &Topology,
        worker: &mut Worker,
        method: &Method,
        explained: bool,
        count: usize,
    ) -> Result<OpenLoopLatency> {
        let side = if explained { "explained" } else { "plain" };
        let tag = format!("open-{}-{side}-{count}", method.name);
        let batch = self.jobs(method.model, &tag, count, 1, explained);
        let reply_name = topology.name(&format!("replies.{tag}"));
        let (channel, consumer) = self.reply_queue(&reply_name).await?;
        let expect = Expectation {
            label: tag.clone(),
            jobs: count,
            rows_per_job: 1,
            explained,
            features: self.rows.features.len(),
            deadline: Instant::now() + PHASE_TIMEOUT,
        };
        let collector = Collector::spawn(collect(consumer, expect));
        let run = async {
            let publisher = bench.broker.publisher().await?;
            let schedule = publisher.on_schedule(topology.jobs_queue(), &reply_name, &batch, OPEN_LOOP_RATE).await?;
            publisher.close().await;
            Ok::<_, anyhow::Error>((schedule, collector.finish().await?))
        };
        let (schedule, received) = worker.guard(run).await?;
        close_reply_queue(channel, &reply_name).await;

        let mut latencies: Vec<Duration> = schedule
            .published_at
            .iter()
            .zip(&received.received_at)
            .filter_map(|(published, received)| Some(received.as_ref()?.saturating_duration_since(*published)))
            .collect();
        latencies.sort_unstable();
        let mut held: Vec<f64> = received.worker_ms.iter().flatten().copied().collect();
        held.sort_unstable_by(f64::total_cmp);
        ensure!(!latencies.is_empty(), "{tag}: no result came back");
        ensure!(
            held.len() == latencies.len(),
            "{tag}: {} of {} results carry timing_ms.total",
            held.len(),
            latencies.len()
        );
        let worker_ms = |p: f64| Duration::from_secs_f64(percentile(&held, p) / 1e3);
        let latency = OpenLoopLatency {
            jobs: latencies.len(),
            worker_p50: worker_ms(0.50),
            worker_p99: worker_ms(0.99),
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            max: percentile(&latencies, 1.0),
            publish_lag: schedule.max_lag,
            notes: received.duplicates().into_iter().collect(),
        };
        progress(&format!(
            "{tag}: p99 in worker {:.2} ms, publish to result p99 {:.2} ms",
            millis(latency.worker_p99),
            millis(latency.p99)
        ));
        Ok(latency)
    }
}

/// The nearest-rank percentile `p` of sorted values.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn close_reply_queue(channel: Channel, name: &str) {
    let _ = channel.queue_delete(name.into(), QueueDeleteOptions::default()).await;
    let _ = channel.close(200, "collected".into()).await;
}

impl Rows {
    fn load(root: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Fixture {
            feature_names: Vec<String>,
            rows: Vec<Vec<serde_json::Value>>,
        }
        let path = root.join(ROWS);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let fixture: Fixture = serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        let features = fixture.feature_names;
        let (mut json, mut values) = (Vec::new(), Vec::new());
        for (i, row) in fixture.rows.iter().enumerate() {
            ensure!(
                row.len() == features.len(),
                "{}: row {i} has {} values, not {}",
                path.display(),
                row.len(),
                features.len()
            );
            let numbers = row
                .iter()
                .map(|v| v.as_f64().map(|v| v as f32).filter(|v| v.is_finite()))
                .collect::<Option<Vec<f32>>>()
                .with_context(|| format!("{}: row {i} has a value that is not a finite number", path.display()))?;
            json.push(serde_json::to_string(row).context("writing a row as JSON")?);
            values.push(numbers);
        }
        ensure!(!values.is_empty(), "{} has no rows", path.display());
        Ok(Self { json, values, features })
    }
}

impl Model {
    /// Reads `folder/config.yaml` and its baseline; the model's features must be `features`.
    fn load(folder: &Path, features: &[String]) -> Result<Self> {
        let path = folder.join("config.yaml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let config = ModelConfig::from_yaml(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            config.features.as_deref() == Some(features),
            "{}: its features are not those of {ROWS}, in the same order",
            path.display()
        );
        let explain = config.explain.with_context(|| format!("{} has no explain section", path.display()))?;
        let baseline = match (&explain.baseline, &explain.baseline_file) {
            (Some(values), _) => values.clone(),
            (None, Some(file)) => {
                let file = folder.join(file);
                let text = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                serde_json::from_slice::<Vec<f64>>(&text).with_context(|| format!("parsing {}", file.display()))?
            }
            (None, None) => bail!("{}: explain has no baseline", path.display()),
        };
        ensure!(baseline.len() == features.len(), "{}: the baseline has {} values", path.display(), baseline.len());
        Ok(Self { baseline: baseline.iter().map(|&v| v as f32).collect(), samples: explain.samples })
    }

    /// Features in which `row` differs from the baseline, compared as the worker does.
    fn differing(&self, row: &[f32]) -> usize {
        row.iter().zip(&self.baseline).filter(|(x, b)| x.to_bits() != b.to_bits()).count()
    }
}

/// What a measurement expects back on its reply queue.
struct Expectation {
    label: String,
    jobs: usize,
    rows_per_job: usize,
    explained: bool,
    features: usize,
    deadline: Instant,
}

/// The first result of every job, as received.
struct Received {
    received_at: Vec<Option<Instant>>,
    /// Per job, `timing_ms.total`.
    worker_ms: Vec<Option<f64>>,
    first: Option<Instant>,
    last: Instant,
    duplicates: usize,
    spot_checked: usize,
    /// Bytes of the first result of every job.
    bytes: u64,
}

impl Received {
    fn duplicates(&self) -> Option<String> {
        (self.duplicates > 0).then(|| format!("{} duplicate results", self.duplicates))
    }
}

/// The fields of a result the phase checks; contributions are only counted.
#[derive(Deserialize)]
struct ResultBody {
    status: String,
    rows: Option<usize>,
    outputs: Option<OutputsBody>,
    explanations: Option<Vec<ExplanationBody>>,
    error: Option<serde_json::Value>,
    timing_ms: Option<TimingBody>,
}

#[derive(Deserialize)]
struct OutputsBody {
    probabilities: Option<Vec<IgnoredAny>>,
}

#[derive(Deserialize)]
struct ExplanationBody {
    contributions: Vec<IgnoredAny>,
}

#[derive(Deserialize)]
struct TimingBody {
    total: f64,
}

/// The members before a result's `outputs` and after its `explanations`: enough to name its job
/// and count it without parsing the rest.
#[derive(Deserialize)]
struct Ends {
    job_id: Option<String>,
    status: String,
    rows: Option<usize>,
    timing_ms: Option<TimingBody>,
}

impl Ends {
    /// From an ok result, the object of the members before `"outputs"` and the one of the members
    /// from `"timing_ms"` on; any other result (an error is short) is parsed whole.
    fn read(data: &[u8]) -> serde_json::Result<Self> {
        let head = memchr::memmem::find(data, br#","outputs":"#);
        let tail = memchr::memmem::rfind(data, br#","timing_ms":"#);
        let (Some(head), Some(tail)) = (head, tail) else { return serde_json::from_slice(data) };
        let mut ends = Vec::with_capacity(head + data.len() - tail + 2);
        ends.extend_from_slice(&data[..head]);
        ends.extend_from_slice(&data[tail..]);
        serde_json::from_slice(&ends)
    }
}

/// A result's explanations in full, for the spot checks.
#[derive(Deserialize)]
struct SpotBody {
    explanations: Vec<SpotExplanation>,
}

#[derive(Deserialize)]
struct SpotExplanation {
    value: f64,
    base_value: f64,
    contributions: Vec<f64>,
}

async fn collect(mut consumer: lapin::Consumer, expect: Expectation) -> Result<Received> {
    let Expectation { label, jobs, deadline, .. } = &expect;
    let mut received_at = vec![None; *jobs];
    let mut worker_ms = vec![None; *jobs];
    let (mut answered, mut duplicates, mut first, mut last, mut bytes) = (0, 0, None, Instant::now(), 0);
    let mut checks = Checks::default();
    while answered < *jobs {
        // Before the first result the worker may still be starting; after it, a pause this long
        // means it stopped answering.
        let until = if answered > 0 { (*deadline).min(last + STALL_TIMEOUT) } else { *deadline };
        let next = tokio::time::timeout_at(until.into(), consumer.next()).await;
        let delivery = match next {
            Err(_) if until < *deadline => bail!(
                "{label}: no result for {} s after {answered} of {jobs}: the worker stopped answering",
                STALL_TIMEOUT.as_secs()
            ),
            Err(_) => bail!("{label}: only {answered} of {jobs} jobs were answered in time"),
            Ok(None) => bail!("{label}: the reply queue closed after {answered} of {jobs} results"),
            Ok(Some(delivery)) => delivery.with_context(|| format!("{label}: receiving results"))?,
        };
        let now = Instant::now();
        let (index, held_ms) = checks.check(&expect, &delivery)?;
        match &mut received_at[index] {
            Some(_) => duplicates += 1,
            slot => {
                *slot = Some(now);
                worker_ms[index] = held_ms;
                answered += 1;
                first.get_or_insert(now);
                last = now;
                bytes += delivery.data.len() as u64;
            }
        }
    }
    if checks.wrong > 0 {
        bail!("{label}: {} problems in {jobs} results, e.g. {}", checks.wrong, checks.examples.join("; "));
    }
    Ok(Received { received_at, worker_ms, first, last, duplicates, spot_checked: checks.spot_checked, bytes })
}

/// Problems found in results: counted, the first few kept for the message.
#[derive(Default)]
struct Checks {
    wrong: usize,
    examples: Vec<String>,
    spot_checked: usize,
}

impl Checks {
    /// Checks one result; returns its job index and `timing_ms.total`. A result for no job of
    /// this measurement is an error at once.
    fn check(&mut self, expect: &Expectation, delivery: &lapin::message::Delivery) -> Result<(usize, Option<f64>)> {
        let data = &delivery.data;
        let excerpt = || String::from_utf8_lossy(&data[..data.len().min(300)]).into_owned();
        let not_json = || format!("{}: a result is not the expected JSON: {}", expect.label, excerpt());
        let ends = Ends::read(data).with_context(not_json)?;
        let id = ends.job_id.as_deref().unwrap_or_default();
        let index = jobs::job_index(id)
            .filter(|i| *i < expect.jobs)
            .with_context(|| format!("{}: a result for an unknown job: {}", expect.label, excerpt()))?;
        let correlation = delivery.properties.correlation_id().as_ref().map(|c| c.as_str());
        if correlation != Some(id) {
            self.problem(format!("{id}: correlation_id {correlation:?} is not the job id"));
        }
        if ends.status == "ok" && index % FULL_CHECK_EVERY != 0 {
            self.count_explanations(expect, id, &ends, data);
            return Ok((index, ends.timing_ms.map(|t| t.total)));
        }
        let body: ResultBody = serde_json::from_slice(data).with_context(not_json)?;
        if body.status != "ok" {
            let error = body.error.map(|e| e.to_string()).unwrap_or_default();
            self.problem(format!("{id}: status {} {error}", body.status));
            return Ok((index, None));
        }
        let rows = expect.rows_per_job;
        if body.rows != Some(rows) {
            self.problem(format!("{id}: rows {:?}, expected {rows}", body.rows));
        }
        let probabilities = body.outputs.and_then(|o| o.probabilities).map_or(0, |p| p.len());
        if probabilities != rows {
            self.problem(format!("{id}: {probabilities} probabilities for {rows} rows"));
        }
        match (&body.explanations, expect.explained) {
            (None, false) => {}
            (Some(_), false) => self.problem(format!("{id}: explanations in the result of a job that asked for none")),
            (None, true) => self.problem(format!("{id}: no explanations, though the job asked for them")),
            (Some(explanations), true) => {
                if explanations.len() != rows {
                    self.problem(format!("{id}: {} explanations for {rows} rows", explanations.len()));
                } else if let Some(e) = explanations.iter().find(|e| e.contributions.len() != expect.features) {
                    let n = e.contributions.len();
                    self.problem(format!(
                        "{id}: an explanation has {n} contributions for {} features",
                        expect.features
                    ));
                } else if self.spot_checked < SPOT_JOBS {
                    self.spot_checked += 1;
                    self.spot_check(id, data);
                }
            }
        }
        Ok((index, body.timing_ms.map(|t| t.total)))
    }

    /// The row count of an ok result not parsed whole, and its explanations, counted.
    fn count_explanations(&mut self, expect: &Expectation, id: &str, ends: &Ends, data: &[u8]) {
        let rows = expect.rows_per_job;
        if ends.rows != Some(rows) {
            self.problem(format!("{id}: rows {:?}, expected {rows}", ends.rows));
        }
        let explanations = memchr::memmem::find_iter(data, EXPLANATION_MARK).count();
        let expected = if expect.explained { rows } else { 0 };
        if explanations != expected {
            self.problem(format!("{id}: {explanations} explanations for {rows} rows, expected {expected}"));
        }
    }

    /// The contributions of each row add up to `value − base_value`.
    fn spot_check(&mut self, id: &str, data: &[u8]) {
        let body: SpotBody = match serde_json::from_slice(data) {
            Ok(body) => body,
            Err(error) => return self.problem(format!("{id}: explanations are not numbers: {error}")),
        };
        for (row, e) in body.explanations.iter().enumerate() {
            let gap = e.contributions.iter().sum::<f64>() - (e.value - e.base_value);
            if gap.abs() > SUM_TOLERANCE {
                self.problem(format!("{id} row {row}: contributions add up to value − base_value ± {gap:.2e}"));
                return;
            }
        }
    }

    fn problem(&mut self, text: String) {
        self.wrong += 1;
        if self.examples.len() < 3 {
            self.examples.push(text);
        }
    }
}

impl ExplainReport {
    pub fn has_failures(&self) -> bool {
        self.info.is_failed()
            || self.throughput.iter().any(Comparison::has_failures)
            || self.latency.iter().any(|c| c.plain.is_failed() || c.explained.is_failed())
    }

    pub fn render(&self, out: &mut String) {
        out.push_str("\n## Explanations through the worker\n\n");
        let info = match &self.info {
            Measured::Done(info) => info,
            other => {
                let _ = writeln!(out, "{}", not_done(other));
                return;
            }
        };
        let differing: Vec<String> = info
            .differing
            .iter()
            .map(|(method, lo, hi)| {
                let range = if lo == hi { lo.to_string() } else { format!("{lo}–{hi}") };
                format!("{range} for `{}`", method.model)
            })
            .collect();
        let _ = write!(
            out,
            "(c) batchscore serving the model repository `{REPOSITORY}` drains pre-filled queues of jobs for each \
             method's fixture model, the same number of jobs without and with `\"explain\": true`, in {PAIRS} \
             alternating pairs (plain, explained, plain, …), a fresh worker for each drain; time runs from its \
             readiness to the last result. Rows/s counts the jobs' own rows: the median of the {PAIRS} drains, \
             min–max in brackets; the ratio is of the medians. The rows are the {} held-out applicants of \
             `{ROWS}`, cycled; of their {} features they differ from the baseline in {}. Every result was \
             checked: its job, status ok, its row count, and one explanation per row when asked, none otherwise; \
             every {FULL_CHECK_EVERY}th job's result was parsed whole: one probability and one explanation of {} \
             contributions per row, and on up to {SPOT_JOBS} results per drain the contributions add up to \
             value − base_value.\n\n",
            info.rows,
            info.features,
            differing.join(", "),
            info.features,
        );
        out.push_str(
            "| Method (model) | Jobs × rows | Plain rows/s | Explained rows/s | Explained ÷ plain | Drain (s), plain / \
             explained | Target |\n|---|---|---:|---:|---:|---:|---|\n",
        );
        let mut notes = Vec::new();
        for c in &self.throughput {
            let spread = |s: Option<Spread>| spread_cell(s, PAIRS);
            let ratio = c.ratio();
            let target = goal_cell(c.method.goal, ratio, "documented (no target)");
            let _ = writeln!(
                out,
                "| {} (`{}`) | {} × {} | {} | {} | {} | {} | {target} |",
                c.method.name,
                c.method.model,
                thousands(c.jobs as f64),
                c.rows_per_job,
                spread(c.plain_rows_per_s()),
                spread(c.explained_rows_per_s()),
                ratio.map_or("—".into(), two_places),
                c.both(|r| Some(r.drain.seconds), |s| format!("{s:.2}")),
            );
            for (side, runs) in [("plain", &c.plain), ("explained", &c.explained)] {
                for (pair, measured) in runs.iter().enumerate() {
                    let what = format!("{}, {}, {side} {}", c.method.name, c.title(), pair + 1);
                    match measured {
                        Measured::Done(r) => notes.extend(r.drain.notes.iter().map(|n| format!("{what}: {n}"))),
                        other => notes.push(format!("{what}: {}", not_done(other))),
                    }
                }
            }
        }
        let _ = write!(
            out,
            "\nWhere the time goes: medians over the same drains, plain / explained. CPU is user + system time of \
             each process from the worker's readiness to the last result, per 1,000 of the jobs' own rows (the \
             driver publishes nothing meanwhile: it receives and checks results). Rows scored per explained job \
             count the sampling method's walk points.\n\n\
             | Method (model) | Jobs × rows | Result bytes per row | Rows scored per explained job | Scored rows/s, \
             explained | Mean batch (rows) | {} CPU ms per 1,000 rows | {} CPU ms per 1,000 rows | {} CPU ms per \
             1,000 rows | Peak RSS (MB) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            PROCESSES[0], PROCESSES[1], PROCESSES[2],
        );
        for c in &self.throughput {
            let rows = c.jobs * c.rows_per_job;
            let scored = c
                .explained_rows_per_s()
                .map_or("—".into(), |s| thousands(s.median * c.scored_per_job / c.rows_per_job as f64));
            let cpu = |p: usize| c.both(move |r| r.cpu_ms_per_1k_rows(p), |ms| format!("{ms:.1}"));
            let _ = writeln!(
                out,
                "| {} (`{}`) | {} × {} | {} | {} | {scored} | {} | {} | {} | {} | {} |",
                c.method.name,
                c.method.model,
                thousands(c.jobs as f64),
                c.rows_per_job,
                c.both(|r| Some(r.result_bytes as f64 / rows.max(1) as f64), thousands),
                thousands(c.scored_per_job),
                c.both(|r| r.drain.mean_batch, |b| format!("{b:.0}")),
                cpu(0),
                cpu(1),
                cpu(2),
                c.both(|r| r.drain.peak_rss.map(|b| b as f64 / 1e6), |mb| format!("{mb:.0}")),
            );
        }
        let sampling: Vec<&Comparison> = self.throughput.iter().filter(|c| c.method.is_sampling()).collect();
        if !sampling.is_empty() {
            let counts: Vec<String> = sampling.iter().map(|c| c.title()).collect();
            let _ = write!(
                out,
                "\nThe sampling method walks {} permutations per row (antithetic pairs): a row differing from the \
                 baseline in d features adds {}·(d − 1) rows to its job, scored in the same batches. Its workers run \
                 with `BATCHSCORE__LIMITS__MAX_ROWS_PER_JOB={SAMPLING_MAX_ROWS}` (default 100,000, which a single \
                 100-row job here exceeds) and `BATCHSCORE__LIMITS__MAX_INFLIGHT_ROWS={SAMPLING_MAX_ROWS}` (default \
                 100,000, which holds 26 explained 1-row jobs; this admits the whole prefetch of 256), and its \
                 drains are of far fewer jobs ({}) so that an explained drain takes seconds, not minutes; its plain \
                 drains of the same jobs are correspondingly short, so its plain figures are indicative only.",
                info.samples,
                info.samples,
                counts.join("; "),
            );
            if self.scale != 1.0 {
                out.push_str(" Job counts are scaled by BENCH_SCALE.");
            }
            out.push('\n');
        }
        if !notes.is_empty() {
            let _ = writeln!(out, "\nNotes: {}", notes.join("; "));
        }
        self.render_latency(out);
    }

    fn render_latency(&self, out: &mut String) {
        let seconds = (OPEN_LOOP_SECONDS * self.scale).max(1.0);
        let _ = write!(
            out,
            "\n### 1-row explained jobs at {} jobs/s\n\nOne worker serving `{REPOSITORY}`; for each model, single-row \
             jobs published at {} jobs/s for {seconds:.0} s on a fixed schedule, first plain, then explained, after \
             an unmeasured warm-up of {WARM_UP_JOBS} jobs per model, plain and explained. \
             \"In worker\" is each result's `timing_ms.total`: the worker's time from receiving the job until its \
             rows are scored and explained; publish → result is the driver's view and includes everything. Target: explained p99 in the worker ≤ {LATENCY_TARGET_MS} ms.\n\n\
             | Method (model) | Jobs | p50 in worker (ms) | p99 in worker (ms) | Publish → result p50 (ms) \
             | p99 (ms) | Max (ms) | Publisher lag, max (ms) | Target | Notes |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---|---|\n",
            thousands(OPEN_LOOP_RATE),
            thousands(OPEN_LOOP_RATE),
        );
        for case in &self.latency {
            for (side, measured) in [("plain", &case.plain), ("explained", &case.explained)] {
                let system = format!("{} (`{}`), {side}", case.method.name, case.method.model);
                let _ = match measured {
                    Measured::Done(l) => {
                        let target = match side {
                            "explained" if millis(l.worker_p99) <= LATENCY_TARGET_MS => "met",
                            "explained" => "**not met**",
                            _ => "—",
                        };
                        writeln!(
                            out,
                            "| {system} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {target} | {} |",
                            thousands(l.jobs as f64),
                            millis(l.worker_p50),
                            millis(l.worker_p99),
                            millis(l.p50),
                            millis(l.p99),
                            millis(l.max),
                            millis(l.publish_lag),
                            l.notes.join("; ")
                        )
                    }
                    other => writeln!(out, "| {system} | — | — | — | — | — | — | — | — | {} |", not_done(other)),
                };
            }
        }
    }
}

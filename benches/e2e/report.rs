//! The Markdown report: the machine, every measurement, and the targets met or not.

use std::fmt::Write as _;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::audit::AuditReport;
use crate::engine::EngineRun;
use crate::explained::{self, ExplainReport};
use crate::quantised::QuantisedReport;
use crate::scenarios::{
    self, Drain, DrainReport, Lanes, Latency, Measured, LANES_RATE, LANES_SECONDS, OPEN_LOOP_RATE, OPEN_LOOP_SECONDS,
};
use crate::security::SecurityReport;
use crate::spin::SpinReport;
use crate::variants::Comparison;
use crate::workers::Kind;
use crate::Bench;

const BYTES_PER_MB: f64 = 1e6;

pub struct Report {
    machine: Vec<(&'static str, String)>,
    scale: f64,
    max_delay_ms: u64,
    pub drains: Vec<DrainReport>,
    /// Per system, its open loops in the order they ran.
    pub open_loops: Vec<(Kind, Vec<Measured<Latency>>)>,
    /// The lanes measured in rounds; empty when the phase did not run.
    pub lanes: Vec<Measured<Lanes>>,
    pub quantised: Option<QuantisedReport>,
    pub explain: Option<ExplainReport>,
    pub security: Option<SecurityReport>,
    pub audit: Option<AuditReport>,
    pub spin: Option<SpinReport>,
}

impl Report {
    /// Describes the machine, the command and the worker settings; measurements are added after.
    pub async fn new(bench: &Bench) -> Self {
        let mut machine = tokio::task::spawn_blocking(describe_machine).await.unwrap_or_default();
        let command = std::env::var("BENCH_COMMAND").unwrap_or_else(|_| "cargo bench --bench e2e".into());
        let scale = if bench.scale == 1.0 {
            String::new()
        } else {
            format!(" with BENCH_SCALE={} (shortened run: figures are indicative only)", bench.scale)
        };
        machine.insert(0, ("Command", format!("`{command}`{scale}")));
        let s = &bench.settings;
        machine.push((
            "Worker settings",
            format!(
                "settings.yaml: prefetch {}, max_batch_rows {}, max_delay_ms {}, sessions {}, intra_threads {}, \
                 intra_op_spinning {}",
                s.amqp.prefetch,
                s.batching.max_batch_rows,
                s.batching.max_delay_ms,
                s.inference.sessions,
                s.inference.intra_threads,
                s.inference.intra_op_spinning,
            ),
        ));
        Self {
            machine,
            scale: bench.scale,
            max_delay_ms: s.batching.max_delay_ms,
            drains: Vec::new(),
            open_loops: Vec::new(),
            lanes: Vec::new(),
            quantised: None,
            explain: None,
            security: None,
            audit: None,
            spin: None,
        }
    }

    pub fn has_failures(&self) -> bool {
        self.drains.iter().any(|d| {
            any_failed(&d.broker)
                || d.engine.is_failed()
                || any_failed(&d.batchscore)
                || any_failed(&d.python_batching)
                || any_failed(&d.python_per_message)
        }) || self.open_loops.iter().any(|(_, loops)| any_failed(loops))
            || any_failed(&self.lanes)
            || self.quantised.as_ref().is_some_and(QuantisedReport::has_failures)
            || self.explain.as_ref().is_some_and(ExplainReport::has_failures)
            || self.security.as_ref().is_some_and(SecurityReport::has_failures)
            || self.audit.as_ref().is_some_and(AuditReport::has_failures)
            || self.spin.as_ref().is_some_and(SpinReport::has_failures)
    }

    pub fn render(&self) -> String {
        let mut out = String::from("# batchscore end-to-end benchmark\n\n| | |\n|---|---|\n");
        for (key, value) in &self.machine {
            let _ = writeln!(out, "| {key} | {value} |");
        }
        out.push_str("\n## Targets\n\n| Check | Measured | Target | Verdict |\n|---|---|---|---|\n");
        for target in self.targets() {
            target.render(&mut out);
        }
        if !self.drains.is_empty() {
            self.render_drains(&mut out);
        }
        if !self.open_loops.is_empty() {
            self.render_open_loops(&mut out);
        }
        if !self.lanes.is_empty() {
            self.render_lanes(&mut out);
        }
        if let Some(quantised) = &self.quantised {
            quantised.render(&mut out);
        }
        if let Some(explain) = &self.explain {
            explain.render(&mut out);
        }
        if let Some(security) = &self.security {
            security.render(&mut out);
        }
        if let Some(audit) = &self.audit {
            audit.render(&mut out);
        }
        if let Some(spin) = &self.spin {
            spin.render(&mut out);
        }
        out
    }

    /// The median over `kind`'s open loops of `figure`, in ms.
    fn open_loop_median(&self, kind: Kind, figure: fn(&Latency) -> Duration) -> Option<f64> {
        let (_, loops) = self.open_loops.iter().find(|(k, _)| *k == kind)?;
        Spread::over(loops, |l| Some(millis(figure(l)))).map(|s| s.median)
    }

    fn drain(&self, rows_per_job: usize) -> Option<&DrainReport> {
        self.drains.iter().find(|d| d.scenario.rows_per_job == rows_per_job)
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        let single = self.drain(1);
        let jobs_per_s = |runs: &[Measured<Drain>]| Spread::over(runs, |d| Some(d.jobs_per_s())).map(|s| s.median);
        let e2e = single.and_then(|d| jobs_per_s(&d.batchscore));
        targets.push(Target::ratio(
            "1-row jobs: batchscore ÷ broker ceiling (jobs/s)",
            e2e,
            single.and_then(|d| jobs_per_s(&d.broker)),
            Goal::AtLeast(0.85),
        ));
        targets.push(Target::ratio(
            "1-row jobs: batchscore ÷ Python batching (jobs/s)",
            e2e,
            single.and_then(|d| jobs_per_s(&d.python_batching)),
            Goal::AtLeast(1.2),
        ));
        let hundred = self.drain(100);
        let rows_per_s = |runs: &[Measured<Drain>]| Spread::over(runs, |d| Some(d.rows_per_s())).map(|s| s.median);
        let e2e = hundred.and_then(|d| rows_per_s(&d.batchscore));
        let combined = hundred.and_then(|d| {
            let broker = rows_per_s(&d.broker)?;
            let engine = d.engine.done()?.rows_per_s;
            Some(1.0 / (1.0 / broker + 1.0 / engine))
        });
        targets.push(Target::ratio(
            "100-row jobs: batchscore ÷ combined ceiling 1/(1/broker + 1/engine) (rows/s)",
            e2e,
            combined,
            Goal::AtLeast(0.70),
        ));
        targets.push(Target::ratio(
            "100-row jobs: batchscore ÷ Python batching (rows/s)",
            e2e,
            hundred.and_then(|d| rows_per_s(&d.python_batching)),
            Goal::AtLeast(4.0),
        ));
        let p99_goal = Goal::AtMost(self.max_delay_ms as f64 + 5.0);
        for (kind, _) in &self.open_loops {
            let check = format!("Open loop p99, {} (vs max_delay_ms + 5 ms, median)", scenarios::label(*kind));
            targets.push(Target::value(&check, self.open_loop_median(*kind, latency_p99), " ms", p99_goal));
        }
        for (figure, name) in [(latency_p50 as fn(&Latency) -> Duration, "p50"), (latency_p99, "p99")] {
            targets.push(Target::ratio(
                &format!("Open loop {name}: batchscore ÷ Python per-message (medians)"),
                self.open_loop_median(Kind::Batchscore, figure),
                self.open_loop_median(Kind::PythonPerMessage, figure),
                Goal::AtMost(1.0),
            ));
        }
        if !self.lanes.is_empty() {
            targets.push(Target::value(
                "Lanes: online p99 during the bulk drain ÷ with the bulk lane idle (median of the rounds)",
                Spread::over(&self.lanes, Lanes::p99_ratio).map(|s| s.median),
                "",
                Goal::AtMost(2.0),
            ));
            targets.push(Target::value(
                "Lanes: worker peak RSS during the bulk drain (highest of the rounds)",
                Spread::over(&self.lanes, |l| l.peak_rss.map(|b| b as f64 / BYTES_PER_MB)).map(|s| s.max),
                " MB",
                Goal::AtMost(300.0),
            ));
        }
        if let Some(explain) = &self.explain {
            explain_targets(explain, &mut targets);
        }
        if let Some(security) = &self.security {
            variant_targets("Security", &security.comparisons, &mut targets);
        }
        if let Some(audit) = &self.audit {
            variant_targets("Audit trail", &audit.comparisons, &mut targets);
        }
        targets
    }

    fn render_drains(&self, out: &mut String) {
        out.push_str(
            "\n## Pre-filled queues\n\nEach system drains a queue filled beforehand (persistent jobs); time runs from the \
             worker's readiness to the last result on the driver's reply queue. Every worker drains each scenario once \
             per round, in rounds of (a), (c), (d), (e); figures are the median over the rounds, min–max in brackets, \
             and the peak RSS the highest. (b) is the model alone in the benchmark process at the mean batch size \
             (c) formed in its median drain; its jobs/s is rows/s ÷ rows per job.\n",
        );
        for drain in &self.drains {
            let s = drain.scenario;
            let _ = write!(
                out,
                "\n### {}\n\n| System | Jobs/s | Rows/s | Drain (s) | Mean batch (rows) | Peak RSS (MB) | Notes |\n\
                 |---|---:|---:|---:|---:|---:|---|\n",
                s.title()
            );
            drain_row(out, "(a) broker ceiling (noop engine)", &drain.broker);
            engine_row(out, &drain.engine, s.rows_per_job);
            drain_row(out, "(c) batchscore", &drain.batchscore);
            drain_row(out, "(d) Python batching", &drain.python_batching);
            drain_row(out, "(e) Python per-message", &drain.python_per_message);
        }
    }

    fn render_open_loops(&self, out: &mut String) {
        let seconds = OPEN_LOOP_SECONDS * self.scale;
        let _ = write!(
            out,
            "\n## Open loop\n\nSingle-row jobs published at {} jobs/s for {:.0} s on a fixed schedule; latency from \
             publishing a job to receiving its result. Each system runs one loop per round, in rounds of (a), (c), (d), \
             (e); figures are the median over the rounds, min–max in brackets; max, publisher lag and peak RSS are the \
             highest. Targets: p99 ≤ max_delay_ms + 5 ms = {} ms, and batchscore's p50 and p99 at most the Python \
             per-message worker's.\n\n",
            thousands(OPEN_LOOP_RATE),
            seconds.max(1.0),
            self.max_delay_ms + 5
        );
        let rows = self.open_loops.iter().map(|(kind, loops)| (scenarios::label(*kind), loops.as_slice()));
        latency_rounds_table(out, "System", rows);
    }

    fn render_lanes(&self, out: &mut String) {
        let _ = write!(
            out,
            "\n## Priority lanes (batchscore)\n\nOnline single-row jobs at {} jobs/s for {:.0} s, first with the bulk \
             lane idle, then while the bulk lane drains a pre-filled queue of 10,000-row jobs; {} rounds, each with \
             fresh queues and workers.\n\n",
            thousands(LANES_RATE),
            (LANES_SECONDS * self.scale).max(1.0),
            self.lanes.len(),
        );
        out.push_str("| Round, online lane | Jobs | p50 (ms) | p95 (ms) | p99 (ms) | Max (ms) | p99 in worker (ms) | ");
        out.push_str("Publisher lag, max (ms) | Mean batch (rows) | Peak RSS (MB) | Notes |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        let mut notes = Vec::new();
        for (i, measured) in self.lanes.iter().enumerate() {
            let round = i + 1;
            match measured {
                Measured::Done(lanes) => {
                    latency_figures(out, &format!("{round}, bulk lane idle"), &lanes.idle);
                    latency_figures(out, &format!("{round}, during the bulk drain"), &lanes.during);
                    notes.extend(lanes.notes.iter().map(|n| format!("round {round}: {n}")));
                }
                other => notes.push(format!("round {round}: {}", not_done(other))),
            }
        }
        let done: Vec<(usize, &Lanes)> =
            self.lanes.iter().enumerate().filter_map(|(i, m)| m.done().map(|l| (i + 1, l))).collect();
        out.push_str("\n| Bulk drain |");
        done.iter().for_each(|(round, _)| out.push_str(&format!(" round {round} |")));
        out.push_str("\n|---|");
        done.iter().for_each(|_| out.push_str("---:|"));
        let mut row = |label: &str, cell: &dyn Fn(&Lanes) -> String| {
            let cells: String = done.iter().map(|(_, l)| format!(" {} |", cell(l))).collect();
            let _ = write!(out, "\n| {label} |{cells}");
        };
        row("Jobs × rows", &|l| {
            format!("{} × {}", thousands(l.bulk_jobs as f64), thousands((l.bulk_rows / l.bulk_jobs.max(1)) as f64))
        });
        row("Drain time (s)", &|l| format!("{:.2}", l.drain_seconds));
        row("Rows/s", &|l| thousands(l.bulk_rows_per_s()));
        row("Worker peak RSS (MB)", &|l| l.peak_rss.map_or("—".into(), megabytes));
        row("Online p99 during ÷ idle", &|l| l.p99_ratio().map_or("—".into(), two_places));
        for process in ["worker", "RabbitMQ", "benchmark"] {
            row(&format!("CPU during the drain, {process} (cores)"), &|l| {
                l.cpu.iter().find(|(p, _)| *p == process).map_or("—".into(), |(_, cores)| format!("{cores:.2}"))
            });
        }
        out.push('\n');
        if !notes.is_empty() {
            let _ = writeln!(out, "\nNotes: {}", notes.join("; "));
        }
    }
}

fn any_failed<T>(runs: &[Measured<T>]) -> bool {
    runs.iter().any(Measured::is_failed)
}

fn latency_p50(l: &Latency) -> Duration {
    l.p50
}

fn latency_p99(l: &Latency) -> Duration {
    l.p99
}

/// The notes of each round, and why a round did not run, as `round N: …`.
fn round_notes<T>(runs: &[Measured<T>], notes: impl Fn(&T) -> &[String]) -> String {
    let mut all = Vec::new();
    for (i, measured) in runs.iter().enumerate() {
        match measured {
            Measured::Done(value) => all.extend(notes(value).iter().map(|n| format!("round {}: {n}", i + 1))),
            other => all.push(format!("round {}: {}", i + 1, not_done(other))),
        }
    }
    all.join("; ")
}

fn drain_row(out: &mut String, system: &str, runs: &[Measured<Drain>]) {
    let spread = |figure: fn(&Drain) -> Option<f64>| Spread::over(runs, figure);
    let median = |figure: fn(&Drain) -> Option<f64>, decimals: usize| {
        spread(figure).map_or("—".into(), |s| format!("{:.decimals$}", s.median))
    };
    let _ = writeln!(
        out,
        "| {system} | {} | {} | {} | {} | {} | {} |",
        spread_cell(spread(|d| Some(d.jobs_per_s())), runs.len()),
        spread_cell(spread(|d| Some(d.rows_per_s())), runs.len()),
        median(|d| Some(d.seconds), 2),
        median(|d| d.mean_batch, 1),
        spread(|d| d.peak_rss.map(|b| b as f64)).map_or("—".into(), |s| megabytes(s.max as u64)),
        round_notes(runs, |d| &d.notes),
    );
}

fn engine_row(out: &mut String, measured: &Measured<EngineRun>, rows_per_job: usize) {
    let system = "(b) engine ceiling (in-process)";
    let _ = match measured {
        Measured::Done(e) => writeln!(
            out,
            "| {system} | {} | {} | — | {} | — | {} runs in {:.2} s |",
            thousands(e.rows_per_s / rows_per_job as f64),
            thousands(e.rows_per_s),
            e.batch_rows,
            thousands(e.runs as f64),
            e.seconds
        ),
        other => writeln!(out, "| {system} | — | — | — | — | — | {} |", not_done(other)),
    };
}

/// A table of open loops repeated in rounds, a row per system (or variant, named in the first
/// column `first`): percentiles as `median (min–max)` over the rounds.
pub fn latency_rounds_table<'a>(
    out: &mut String,
    first: &str,
    rows: impl Iterator<Item = (&'a str, &'a [Measured<Latency>])>,
) {
    let _ = writeln!(
        out,
        "| {first} | Loops | p50 (ms) | p95 (ms) | p99 (ms) | Max (ms) | p99 in worker (ms) | Publisher lag, max (ms) \
         | Mean batch (rows) | Peak RSS (MB) | Notes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    );
    for (system, loops) in rows {
        latency_rounds_row(out, system, loops);
    }
}

/// One system's open loops: percentiles as `median (min–max)` over the rounds.
fn latency_rounds_row(out: &mut String, system: &str, loops: &[Measured<Latency>]) {
    let ms = |figure: fn(&Latency) -> Duration| Spread::over(loops, |l| Some(millis(figure(l))));
    let cell = |s: Option<Spread>| s.map_or("—".into(), |s| format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max));
    let highest = |s: Option<Spread>| s.map_or("—".into(), |s| format!("{:.1}", s.max));
    let _ = writeln!(
        out,
        "| {system} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        loops.iter().filter_map(Measured::done).count(),
        cell(ms(|l| l.p50)),
        cell(ms(|l| l.p95)),
        cell(ms(|l| l.p99)),
        highest(ms(|l| l.max)),
        Spread::over(loops, |l| l.worker_p99.map(millis)).map_or("—".into(), |s| format!("{:.1}", s.median)),
        highest(ms(|l| l.publish_lag)),
        Spread::over(loops, |l| l.mean_batch).map_or("—".into(), |s| format!("{:.1}", s.median)),
        Spread::over(loops, |l| l.peak_rss.map(|b| b as f64)).map_or("—".into(), |s| megabytes(s.max as u64)),
        round_notes(loops, |l| &l.notes),
    );
}

fn latency_figures(out: &mut String, system: &str, l: &Latency) {
    let _ = writeln!(
        out,
        "| {system} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {} | {} | {} |",
        thousands(l.jobs as f64),
        millis(l.p50),
        millis(l.p95),
        millis(l.p99),
        millis(l.max),
        l.worker_p99.map_or("—".into(), |d| format!("{:.1}", millis(d))),
        millis(l.publish_lag),
        l.mean_batch.map_or("—".into(), |b| format!("{b:.1}")),
        l.peak_rss.map_or("—".into(), megabytes),
        l.notes.join("; ")
    );
}

pub fn not_done<T>(measured: &Measured<T>) -> String {
    match measured {
        Measured::Done(_) => String::new(),
        Measured::Skipped(why) => format!("skipped: {}", table_safe(why)),
        Measured::Failed(why) => format!("**failed**: {}", table_safe(why)),
    }
}

fn table_safe(text: &str) -> String {
    text.replace('|', "/").replace('\n', " ")
}

#[derive(Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
    /// Reported for the record; the spec sets no target.
    Documented,
}

/// One target: a measured figure (or why there is none) against its goal.
struct Target {
    check: String,
    measured: Option<f64>,
    unit: &'static str,
    goal: Goal,
}

impl Target {
    fn ratio(check: &str, numerator: Option<f64>, denominator: Option<f64>, goal: Goal) -> Self {
        let measured = numerator.zip(denominator).filter(|(_, d)| *d > 0.0).map(|(n, d)| n / d);
        Self { check: check.to_string(), measured, unit: "", goal }
    }

    fn value(check: &str, measured: Option<f64>, unit: &'static str, goal: Goal) -> Self {
        Self { check: check.to_string(), measured, unit, goal }
    }

    fn render(&self, out: &mut String) {
        let (goal, met) = match (self.goal, self.measured) {
            (Goal::AtLeast(g), m) => (format!("≥ {g}{}", self.unit), m.map(|m| m >= g)),
            (Goal::AtMost(g), m) => (format!("≤ {g}{}", self.unit), m.map(|m| m <= g)),
            (Goal::Documented, _) => ("none".to_string(), None),
        };
        let measured = self.measured.map_or("—".into(), |m| format!("{}{}", two_places(m), self.unit));
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None if matches!(self.goal, Goal::Documented) => "documented",
            None => "n/a (a measurement was skipped or failed)",
        };
        let _ = writeln!(out, "| {} | {measured} | {goal} | {verdict} |", self.check);
    }
}

/// Explained ÷ plain rows/s per method and job size, and the explained p99 inside the worker.
fn explain_targets(explain: &ExplainReport, targets: &mut Vec<Target>) {
    for c in &explain.throughput {
        let plural = if c.rows_per_job == 1 { "" } else { "s" };
        let check = format!(
            "Explanations, {} (`{}`), {}-row job{plural}: explained ÷ plain (rows/s, medians)",
            c.method.name, c.method.model, c.rows_per_job
        );
        let goal = c.method.goal.map_or(Goal::Documented, Goal::AtLeast);
        targets.push(Target::value(&check, c.ratio(), "", goal));
    }
    for case in &explain.latency {
        let check = format!(
            "Explanations, {} (`{}`): 1-row explained p99 in the worker at {} jobs/s",
            case.method.name,
            case.method.model,
            thousands(OPEN_LOOP_RATE)
        );
        let p99 = case.explained.done().map(|l| millis(l.worker_p99));
        targets.push(Target::value(&check, p99, " ms", Goal::AtMost(explained::LATENCY_TARGET_MS)));
    }
}

/// Each variant's rows/s ÷ the baseline's, per job size, of a phase of variants (`phase` names it).
fn variant_targets<S>(phase: &str, comparisons: &[Comparison<S>], targets: &mut Vec<Target>) {
    for c in comparisons {
        let baseline = &c.runs[0].0;
        for (v, (variant, _)) in c.runs.iter().enumerate().skip(1) {
            let plural = if c.rows_per_job == 1 { "" } else { "s" };
            let check = format!(
                "{phase}, {}-row job{plural}: {} ÷ {} (rows/s, medians)",
                c.rows_per_job, variant.key, baseline.key
            );
            let goal = variant.goal.map_or(Goal::Documented, Goal::AtLeast);
            targets.push(Target::value(&check, c.ratio(v), "", goal));
        }
    }
}

/// The median of some figures and their spread, for measurements repeated in alternating pairs.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Spread {
    /// `figure` of each measurement of `runs` that was done and has it.
    pub fn over<T>(runs: &[Measured<T>], figure: impl Fn(&T) -> Option<f64>) -> Option<Spread> {
        Spread::of(runs.iter().filter_map(Measured::done).filter_map(figure).collect())
    }

    /// `None` when there are no figures.
    pub fn of(mut values: Vec<f64>) -> Option<Spread> {
        values.sort_unstable_by(f64::total_cmp);
        let count = values.len();
        let median = match count {
            0 => return None,
            n if n % 2 == 1 => values[n / 2],
            n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        };
        Some(Spread { median, min: values[0], max: values[count - 1], count })
    }
}

/// A table cell `median (min–max)`, saying how many of `expected` runs it covers when some
/// failed; `—` when none succeeded.
pub fn spread_cell(spread: Option<Spread>, expected: usize) -> String {
    spread.map_or("—".into(), |s| {
        let missing = if s.count < expected { format!(", {} of {expected}", s.count) } else { String::new() };
        format!("{} ({}–{}{missing})", thousands(s.median), thousands(s.min), thousands(s.max))
    })
}

/// A table cell judging `ratio` against an at-least `goal`: `≥ 0.8: met`, `**not met**` or `n/a`
/// (no ratio); `without_goal` when there is no goal.
pub fn goal_cell(goal: Option<f64>, ratio: Option<f64>, without_goal: &str) -> String {
    match (goal, ratio) {
        (None, _) => without_goal.to_string(),
        (Some(goal), Some(r)) if r >= goal => format!("≥ {goal}: met"),
        (Some(goal), Some(_)) => format!("≥ {goal}: **not met**"),
        (Some(goal), None) => format!("≥ {goal}: n/a"),
    }
}

/// Two decimal places, or two significant digits for a figure too small to show in them.
pub fn two_places(value: f64) -> String {
    if value != 0.0 && value.abs() < 0.005 {
        format!("{value:.1e}")
    } else {
        format!("{value:.2}")
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn megabytes(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / BYTES_PER_MB)
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if value < 0.0 {
        grouped.insert(0, '-');
    }
    grouped
}

/// CPUs, CPU model, memory, RabbitMQ and rustc versions, and the date.
fn describe_machine() -> Vec<(&'static str, String)> {
    let unknown = || "unknown".to_string();
    let cpus = output("nproc", &[]).unwrap_or_else(unknown);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("model name"))?.to_string();
            Some(line.split_once(':')?.1.trim().to_string())
        })
        .unwrap_or_else(unknown);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let kib: f64 =
                info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kib / (1024.0 * 1024.0)))
        })
        .unwrap_or_else(unknown);
    let rabbitmq = output("rabbitmqctl", &["version"])
        .map(|v| format!("{v} (rabbitmqctl version)"))
        .unwrap_or_else(|| "unknown (rabbitmqctl not available)".into());
    vec![
        ("CPUs (nproc)", format!("{cpus} × {model}")),
        ("Memory", memory),
        ("RabbitMQ", rabbitmq),
        ("rustc", output("rustc", &["--version"]).unwrap_or_else(unknown)),
        ("Date", output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_else(unknown)),
    ]
}

/// The trimmed stdout of a short command, or `None` if it fails or takes over 20 s.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let mut text = String::new();
    child.stdout.take()?.read_to_string(&mut text).ok()?;
    let text = text.trim().to_string();
    (status.success() && !text.is_empty()).then_some(text)
}

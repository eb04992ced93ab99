//! Float32 against INT8 through the worker: the demo model and its quantised variant, each drained
//! from a pre-filled queue by the worker as shipped (system (c)), which serves both from `models/`,
//! and each run in this process at the batch size the worker formed (system (b)). The results of
//! each are checked against the in-process scores of the same model; file sizes and held-out
//! accuracy come from the variant's `quantisation.json`.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::engine::{Engine, EngineRun, Reference};
use crate::report::{not_done, thousands};
use crate::scenarios::{self, Drain, DrainScenario, Measured};
use crate::workers::Kind;
use crate::{jobs, Bench};

/// The INT8 (QDQ, static) variant of [`jobs::MODEL`].
pub const INT8_MODEL: &str = "credit_default_int8";
const QUANTISATION: &str = "models/credit_default_int8/quantisation.json";
const JOBS: usize = 2_000;
const ROWS_PER_JOB: usize = 100;

/// A model of the comparison: its name, its precision, and its measurement's queue tag.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub model: &'static str,
    pub precision: &'static str,
    key: &'static str,
}

const FP32: Variant = Variant { model: jobs::MODEL, precision: "float32", key: "fp32-100rows" };
const INT8: Variant = Variant { model: INT8_MODEL, precision: "INT8", key: "int8-100rows" };

/// The held-out figures of `quantisation.json`.
#[derive(Debug, Deserialize)]
pub struct Quantisation {
    pub max_abs_diff_probability_default: f64,
    pub auc_fp32: f64,
    pub auc_int8: f64,
    pub size_bytes_fp32: u64,
    pub size_bytes_int8: u64,
    pub held_out_rows: usize,
}

impl Quantisation {
    fn load(root: &Path) -> Result<Self> {
        let path = root.join(QUANTISATION);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// One model through the worker and in this process.
pub struct ModelRun {
    pub variant: Variant,
    pub worker: Measured<Drain>,
    pub engine: Measured<EngineRun>,
    /// Size of `models/<model>/1/model.onnx` as it is now.
    pub file_bytes: Option<u64>,
}

/// The float32 model and its INT8 variant side by side.
pub struct QuantisedReport {
    pub scenario: DrainScenario,
    pub fp32: ModelRun,
    pub int8: ModelRun,
    pub quantisation: Measured<Quantisation>,
    /// Largest difference in probability of default between the two models over the sample rows
    /// (the held-out rows), scored in this process.
    pub in_process_diff: Option<f64>,
    pub sample_rows: usize,
}

/// Drains the float32 model's queue, then the INT8 variant's, each followed by its engine ceiling.
pub async fn compare(bench: &Bench) -> QuantisedReport {
    let scenario = DrainScenario { key: "", jobs: bench.count(JOBS), rows_per_job: ROWS_PER_JOB };
    let quantisation = Measured::from(Quantisation::load(&bench.root));
    let fp32 = model_run(bench, &scenario, FP32, Ok((&bench.engine, &bench.reference))).await;
    let int8_engine = load(bench, INT8_MODEL).await;
    let int8 = match &int8_engine {
        Ok((engine, reference)) => model_run(bench, &scenario, INT8, Ok((engine, reference))).await,
        Err(error) => model_run(bench, &scenario, INT8, Err(format!("{error:#}"))).await,
    };
    let in_process_diff = int8_engine.ok().map(|(_, int8)| max_abs_diff(&bench.reference, &int8));
    QuantisedReport { scenario, fp32, int8, quantisation, in_process_diff, sample_rows: bench.samples.len() }
}

/// `model` loaded in this process, and its scores of the sample rows.
async fn load(bench: &Bench, model: &str) -> Result<(Engine, Arc<Reference>)> {
    let engine = Engine::load(&bench.root, &bench.settings, model)?;
    let reference = Arc::new(engine.reference(&bench.samples).await?);
    Ok((engine, reference))
}

async fn model_run(
    bench: &Bench,
    scenario: &DrainScenario,
    variant: Variant,
    loaded: Result<(&Engine, &Arc<Reference>), String>,
) -> ModelRun {
    let model = variant.model;
    let file_bytes =
        std::fs::metadata(bench.root.join("models").join(model).join("1/model.onnx")).ok().map(|m| m.len());
    let (worker, engine) = match loaded {
        Ok((engine, reference)) => {
            let scenario = DrainScenario { key: variant.key, ..*scenario };
            let what = format!("{}, {} serving {model}", scenario.title(), scenarios::label(Kind::Batchscore));
            let drain =
                scenarios::drain_model(bench, Kind::Batchscore, &scenario, 1, model, Some(Arc::clone(reference)));
            let worker = scenarios::measure(&what, drain).await;
            let system = format!("(b) engine ceiling, {model}");
            let ceiling = scenarios::engine_ceiling(bench, engine, worker.done(), &system).await;
            (worker, ceiling)
        }
        Err(why) => {
            crate::progress(&format!("{model}: FAILED: {why}"));
            let why = format!("needs {model} in this process, to check results against: {why}");
            (Measured::Failed(why), Measured::Skipped(format!("{model} did not load in this process")))
        }
    };
    ModelRun { variant, worker, engine, file_bytes }
}

fn max_abs_diff(a: &Reference, b: &Reference) -> f64 {
    (0..a.len().max(b.len())).map(|i| f64::from((a.p_default(i) - b.p_default(i)).abs())).fold(0.0, f64::max)
}

impl QuantisedReport {
    pub fn has_failures(&self) -> bool {
        [&self.fp32, &self.int8].iter().any(|run| run.worker.is_failed() || run.engine.is_failed())
            || self.quantisation.is_failed()
    }

    pub fn render(&self, out: &mut String) {
        let q = self.quantisation.done();
        let held_out = q.map_or(String::new(), |q| format!(" {}", q.held_out_rows));
        let _ = write!(
            out,
            "\n## Float32 vs INT8 through the worker\n\n`{}` and its INT8 variant `{}` (QDQ, static quantisation), \
             each drained from a pre-filled queue of {} by (c) batchscore as shipped, which serves both from \
             `models/`, then run in this process at the mean batch size the worker formed ((b), batch in \
             brackets). File size, difference and AUC: `{QUANTISATION}`, on the{held_out} held-out rows.\n\n\
             | Model | Worker rows/s | Engine rows/s (batch) | File size | Max abs diff vs fp32 (held-out) \
             | AUC (held-out) |\n|---|---:|---:|---:|---:|---:|\n",
            FP32.model,
            INT8.model,
            self.scenario.title(),
        );
        let mut notes = Vec::new();
        for run in [&self.fp32, &self.int8] {
            let int8 = run.variant.model == INT8.model;
            let size = q.map(|q| if int8 { q.size_bytes_int8 } else { q.size_bytes_fp32 });
            let diff = match q {
                Some(q) if int8 => format!("{:.4}", q.max_abs_diff_probability_default),
                Some(_) => "— (reference)".into(),
                None => "—".into(),
            };
            let auc = q.map_or("—".into(), |q| format!("{:.4}", if int8 { q.auc_int8 } else { q.auc_fp32 }));
            let _ = writeln!(
                out,
                "| {} ({}) | {} | {} | {} | {diff} | {auc} |",
                run.variant.model,
                run.variant.precision,
                run.worker.done().map_or("—".into(), |d| thousands(d.rows_per_s())),
                run.engine.done().map_or("—".into(), |e| format!("{} ({})", thousands(e.rows_per_s), e.batch_rows)),
                size.map_or("—".into(), |b| format!("{} B", thousands(b as f64))),
            );
            notes.extend(run.notes(size));
        }
        let ratio = |figure: fn(&ModelRun) -> Option<f64>| {
            let (int8, fp32) = (figure(&self.int8), figure(&self.fp32));
            int8.zip(fp32).filter(|(_, d)| *d > 0.0).map_or("n/a".into(), |(n, d)| format!("{:.2}", n / d))
        };
        let _ = writeln!(
            out,
            "\nINT8 ÷ float32: worker rows/s {}, engine rows/s {}.",
            ratio(|run| run.worker.done().map(Drain::rows_per_s)),
            ratio(|run| run.engine.done().map(|e| e.rows_per_s)),
        );
        let checked: Vec<String> = [&self.fp32, &self.int8]
            .iter()
            .filter_map(|run| Some(format!("{} of {}", run.worker.done()?.spot_checked, run.variant.model)))
            .collect();
        if !checked.is_empty() {
            let _ = writeln!(
                out,
                "\nResults checked against the in-process scores of the same model: {}.",
                checked.join(", ")
            );
        }
        if let Some(diff) = self.in_process_diff {
            let _ = write!(
                out,
                "\nIn this process, over the {} sample rows (the held-out rows), the two models' probabilities of \
                 default differ by at most {diff:.4}",
                self.sample_rows
            );
            let _ = match q {
                Some(q) => writeln!(out, " (quantisation.json: {:.4}).", q.max_abs_diff_probability_default),
                None => writeln!(out, "."),
            };
        }
        if !matches!(self.quantisation, Measured::Done(_)) {
            notes.push(format!("quantisation.json: {}", not_done(&self.quantisation)));
        }
        if !notes.is_empty() {
            let _ = writeln!(out, "\nNotes: {}", notes.join("; "));
        }
    }
}

impl ModelRun {
    /// Why a figure is missing, what went wrong around the worker, and a model file that is not
    /// the one `quantisation.json` describes.
    fn notes(&self, described_bytes: Option<u64>) -> Vec<String> {
        let model = self.variant.model;
        let mut notes = Vec::new();
        match &self.worker {
            Measured::Done(drain) => notes.extend(drain.notes.iter().map(|note| format!("{model}: {note}"))),
            other => notes.push(format!("{model}, worker: {}", not_done(other))),
        }
        if !matches!(self.engine, Measured::Done(_)) {
            notes.push(format!("{model}, engine: {}", not_done(&self.engine)));
        }
        if let (Some(actual), Some(described)) = (self.file_bytes, described_bytes) {
            if actual != described {
                notes.push(format!("{model}: model.onnx is {actual} B now, quantisation.json says {described} B"));
            }
        }
        notes
    }
}

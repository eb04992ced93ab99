//! System (b), the engine ceiling: a model of `models/` in this process, no broker, run back to back
//! at a given batch size. Also scores the sample rows once, as the reference results are checked
//! against.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use batchscore::engine::model::ModelConfig;
use batchscore::engine::outputs::ColumnData;
use batchscore::engine::{runtime, ModelVersion};
use batchscore::settings::Settings;

use crate::jobs::Samples;

/// Shortest stretch of back-to-back runs behind one figure.
const MIN_RUN_TIME: Duration = Duration::from_secs(1);
const PROBABILITIES: &str = "probabilities";

pub struct Engine {
    name: String,
    model: ModelVersion,
}

/// Rows per second of back-to-back runs at one batch size.
#[derive(Debug, Clone)]
pub struct EngineRun {
    pub batch_rows: usize,
    pub runs: usize,
    pub seconds: f64,
    pub rows_per_s: f64,
}

/// The probability of default of every sample row, scored in this process by one model.
pub struct Reference {
    p_default: Vec<f32>,
}

impl Reference {
    pub fn len(&self) -> usize {
        self.p_default.len()
    }

    pub fn p_default(&self, sample: usize) -> f32 {
        self.p_default[sample % self.p_default.len()]
    }
}

impl Engine {
    /// Loads version 1 of model `name` with the worker's inference and batching settings.
    pub fn load(root: &Path, settings: &Settings, name: &str) -> Result<Self> {
        let env = runtime::environment(settings.onnxruntime.library_path.as_deref())
            .context("loading ONNX Runtime (scripts/setup.sh puts it in .onnxruntime/)")?;
        let dir = root.join("models").join(name);
        let config_path = dir.join("config.yaml");
        let text =
            std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
        let config = ModelConfig::from_yaml(&text).with_context(|| format!("parsing {}", config_path.display()))?;
        let model =
            ModelVersion::load(env, name, 1, &dir.join("1/model.onnx"), &config, settings.inference, settings.batching)
                .with_context(|| format!("loading {name} in this process"))?;
        Ok(Self { name: name.to_string(), model })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Scores every sample row in one run.
    pub async fn reference(&self, samples: &Samples) -> Result<Reference> {
        let inputs = samples.matrix(samples.len());
        let mut session = self.model.session().await?;
        let columns = self.model.run(&mut session, &inputs, samples.len())?;
        let column = columns
            .iter()
            .find(|c| c.name == PROBABILITIES)
            .with_context(|| format!("{} publishes no `{PROBABILITIES}` output", self.name))?;
        let ColumnData::F32(values) = &column.data else {
            bail!("`{PROBABILITIES}` of {} is not a float tensor", self.name);
        };
        let width = column.row_len;
        if width < 2 || values.len() != width * samples.len() {
            bail!("`{PROBABILITIES}` of {} is not [rows, 2]", self.name);
        }
        Ok(Reference { p_default: values.chunks(width).map(|row| row[1]).collect() })
    }

    /// Runs batches of `batch_rows` sample rows back to back for at least a second, taking a
    /// session from the pool for every run as the worker does.
    pub async fn throughput(&self, samples: &Samples, batch_rows: usize) -> Result<EngineRun> {
        let batch_rows = batch_rows.max(1);
        let inputs = samples.matrix(batch_rows);
        let started = Instant::now();
        let mut runs = 0;
        while started.elapsed() < MIN_RUN_TIME {
            let mut session = self.model.session().await?;
            self.model.run(&mut session, &inputs, batch_rows)?;
            runs += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        Ok(EngineRun { batch_rows, runs, seconds, rows_per_s: (runs * batch_rows) as f64 / seconds })
    }
}

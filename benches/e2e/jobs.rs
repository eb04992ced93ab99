//! The demo model's sample rows and the job messages built from them.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use batchscore::payload::PayloadKey;
use lapin::types::FieldTable;

/// The demo model, float32.
pub const MODEL: &str = "credit_default";
const SAMPLES: &str = "models/credit_default/samples/applicants.csv";

/// The held-out applicants of the demo model, cycled to fill jobs of any size.
pub struct Samples {
    /// Each row as compact JSON text, `[0,1,0,...]`, exactly as written in the CSV.
    json: Vec<String>,
    /// The same rows as the model reads them.
    values: Vec<Vec<f32>>,
}

impl Samples {
    pub fn load(root: &Path) -> Result<Self> {
        let path = root.join(SAMPLES);
        let mut reader = csv::Reader::from_path(&path).with_context(|| format!("reading {}", path.display()))?;
        let (mut json, mut values) = (Vec::new(), Vec::new());
        for (i, record) in reader.records().enumerate() {
            let record = record.with_context(|| format!("{}: row {i}", path.display()))?;
            let row = record
                .iter()
                .map(|v| v.trim().parse::<f32>().ok().filter(|v| v.is_finite()))
                .collect::<Option<Vec<f32>>>()
                .with_context(|| format!("{}: row {i} has a value that is not a number", path.display()))?;
            json.push(format!("[{}]", record.iter().map(str::trim).collect::<Vec<_>>().join(",")));
            values.push(row);
        }
        ensure!(!values.is_empty(), "{} has no rows", path.display());
        Ok(Self { json, values })
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// `rows` sample rows in order, cycled, row-major.
    pub fn matrix(&self, rows: usize) -> Vec<f32> {
        self.values.iter().cycle().take(rows).flatten().copied().collect()
    }
}

/// A job ready to publish: its id, its serialised body and the headers it goes with.
pub struct Job {
    pub id: String,
    pub body: Vec<u8>,
    /// The encryption headers of a sealed body; `None` for a plaintext job.
    pub headers: Option<FieldTable>,
}

/// `jobs` sealed with `key`, as a publisher with `submit --key-file` sends them.
pub fn seal(jobs: Vec<Job>, key: &PayloadKey) -> Vec<Job> {
    let headers = batchscore::amqp::sealing_headers(key);
    jobs.into_iter().map(|job| Job { body: key.seal(&job.body), headers: Some(headers.clone()), ..job }).collect()
}

/// `count` jobs of `rows_per_job` rows for `model`, ids `<prefix>-<i>`; row `r` of job `i` is
/// sample row [`sample_index`]`(i, rows_per_job, r)`.
pub fn build(samples: &Samples, model: &str, prefix: &str, count: usize, rows_per_job: usize) -> Vec<Job> {
    build_from(&samples.json, model, prefix, count, rows_per_job, "")
}

/// [`build`] from rows given as JSON texts, each body ending with `members` (`,"name":value…`,
/// or empty).
pub fn build_from(
    rows: &[String],
    model: &str,
    prefix: &str,
    count: usize,
    rows_per_job: usize,
    members: &str,
) -> Vec<Job> {
    (0..count)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let mut body = format!(r#"{{"job_id":"{id}","model":"{model}","rows":["#);
            for r in 0..rows_per_job {
                if r > 0 {
                    body.push(',');
                }
                body.push_str(&rows[sample_index(rows.len(), i, rows_per_job, r)]);
            }
            body.push(']');
            body.push_str(members);
            body.push('}');
            Job { id, body: body.into_bytes(), headers: None }
        })
        .collect()
}

/// Which sample row is row `row` of job `job` when every job has `rows_per_job` rows.
pub fn sample_index(samples: usize, job: usize, rows_per_job: usize, row: usize) -> usize {
    (job * rows_per_job + row) % samples
}

/// The `i` of a job id `<prefix>-<i>`.
pub fn job_index(id: &str) -> Option<usize> {
    id.rsplit_once('-').and_then(|(_, i)| i.parse().ok())
}

//! Property tests of batch split and reassembly: however jobs are cut into batches, every row is
//! scored exactly once and comes back to its own job, in order, with the scores it gets alone.
//! Batches are cut by the batcher's own `Pending` and put back together by the result stage's own
//! `Reassembly`, into the result message each job would be sent.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use batchscore::batcher::Pending;
use batchscore::budget::RowBudget;
use batchscore::encode::{encode_ok, Timing};
use batchscore::engine::model::ModelConfig;
use batchscore::engine::outputs::Column;
use batchscore::engine::ModelVersion;
use batchscore::flow::{CloseReason, Delivery, Job, JobMeta, Lane, Protocol, ScoredBatch};
use batchscore::result::Reassembly;
use batchscore::settings::{BatchingSettings, InferenceSettings};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

/// Batch size changes the order of floating-point sums inside ONNX Runtime, not the result.
const TOLERANCE: f32 = 1e-6;

/// The fixture model, its fixture rows, and a runtime to wait for its session pool.
struct Fixture {
    model: Arc<ModelVersion>,
    rows: Vec<Vec<f32>>,
    runtime: tokio::runtime::Runtime,
}

impl Fixture {
    /// Scores `rows` rows (row-major) in one run on the model's pooled session.
    fn score(&self, inputs: &[f32], rows: usize) -> Vec<Column> {
        let mut session = self.runtime.block_on(self.model.session()).expect("the session pool is open");
        self.model.run(&mut session, inputs, rows).expect("the fixture model scores fixture rows")
    }
}

/// Loading sessions is the slow part, so every case shares one model.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let models = root.join("tests/fixtures/models/linear");
        let config_text = std::fs::read_to_string(models.join("config.yaml")).expect("linear config.yaml is readable");
        let config = ModelConfig::from_yaml(&config_text).expect("linear config.yaml is a model config");
        let env = batchscore::engine::runtime::environment(None).expect("ONNX Runtime is in .onnxruntime/");
        let model = ModelVersion::load(
            env,
            "linear",
            1,
            &models.join("1/model.onnx"),
            &config,
            InferenceSettings::default(),
            BatchingSettings::default(),
        )
        .expect("the linear fixture model loads");

        let expected_path = root.join("tests/fixtures/expected/linear_v1.json");
        let expected_text = std::fs::read(expected_path).expect("linear_v1.json is readable");
        #[derive(serde::Deserialize)]
        struct Expected {
            rows: Vec<Vec<f32>>,
        }
        let Expected { rows } = serde_json::from_slice(&expected_text).expect("linear_v1.json has rows of numbers");
        assert!(!rows.is_empty(), "linear_v1.json has rows to sample from");
        let n_features = model.signature.n_features;
        assert!(rows.iter().all(|row| row.len() == n_features), "every fixture row has {n_features} features");

        // Without both outputs the comparisons below could pass vacuously.
        let published: Vec<_> = model.published.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(published, ["label", "probabilities"], "the fixture publishes label and probabilities");

        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime builds");
        Fixture { model: Arc::new(model), rows, runtime }
    })
}

/// Per job, which fixture rows it sends (repeats allowed); plus the batch size limit.
fn jobs_and_batch_size() -> impl Strategy<Value = (Vec<Vec<Index>>, usize)> {
    (prop::collection::vec(prop::collection::vec(any::<Index>(), 1..=40), 1..=30), 1..=64usize)
}

fn job(seq: u64, model: &Arc<ModelVersion>, rows: usize, inputs: Vec<f32>) -> Job {
    let meta = JobMeta {
        seq,
        job_id: format!("job-{seq}"),
        model: Arc::clone(model),
        rows,
        lane: Lane::Online,
        received_at: Instant::now(),
        queued_for: std::time::Duration::ZERO,
        deadline_ms: None,
        protocol: Protocol::Native,
        publisher: None,
        delivery: Delivery::new(()),
        charge: RowBudget::new(usize::MAX).charge(rows),
        explain: None,
        key: None,
        audit: None,
    };
    Job { meta: Arc::new(meta), inputs }
}

/// The `outputs` of an encoded result.
fn outputs(body: &[u8]) -> Value {
    let result: Value = serde_json::from_slice(body).expect("an encoded result is JSON");
    assert_eq!(result["status"], "ok", "{result}");
    result["outputs"].clone()
}

/// Labels are decisions and must match exactly; scores may differ by rounding.
fn assert_same_outputs(job: usize, got: &Value, alone: &Value) -> Result<(), TestCaseError> {
    prop_assert_eq!(&got["label"], &alone["label"], "job {} labels", job);
    let flat = |v: &Value| -> Vec<f64> {
        v["probabilities"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|row| row.as_array().cloned().unwrap_or_default())
            .filter_map(|x| x.as_f64())
            .collect()
    };
    let (got_values, alone_values) = (flat(got), flat(alone));
    prop_assert!(!alone_values.is_empty(), "job {} has probabilities", job);
    prop_assert_eq!(got_values.len(), alone_values.len(), "job {} probabilities length", job);
    for (i, (g, a)) in got_values.iter().zip(&alone_values).enumerate() {
        prop_assert!((g - a).abs() <= f64::from(TOLERANCE), "job {} value {}: batched {} vs alone {}", job, i, g, a);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn split_batches_reassemble_to_each_jobs_own_scores((picks, max_rows) in jobs_and_batch_size()) {
        let fixture = fixture();
        let n_features = fixture.model.signature.n_features;
        let job_inputs: Vec<Vec<f32>> = picks
            .iter()
            .map(|rows| rows.iter().flat_map(|pick| fixture.rows[pick.index(fixture.rows.len())].iter().copied()).collect())
            .collect();

        let mut pending = Pending::default();
        let mut metas = Vec::new();
        for (seq, (rows, inputs)) in picks.iter().zip(&job_inputs).enumerate() {
            let job = job(seq as u64, &fixture.model, rows.len(), inputs.clone());
            metas.push(Arc::clone(&job.meta));
            pending.push(job);
        }

        // Rows of each job reassembled so far; they must arrive as one unbroken, ordered run.
        let mut next_row = vec![0usize; picks.len()];
        let mut reassembly = Reassembly::default();
        let mut results: Vec<Option<Vec<u8>>> = vec![None; picks.len()];
        while !pending.is_empty() {
            let batch = pending.take(max_rows, n_features, CloseReason::Size);
            prop_assert!(batch.rows >= 1, "a batch taken from non-empty pending rows has rows");
            prop_assert!(batch.rows <= max_rows, "batch of {} rows exceeds max_batch_rows {}", batch.rows, max_rows);
            prop_assert_eq!(batch.inputs.len(), batch.rows * n_features);

            let mut batch_row = 0;
            for segment in &batch.segments {
                let seq = segment.job.seq as usize;
                prop_assert!(segment.rows >= 1, "segment of job {} is empty", seq);
                prop_assert_eq!(segment.batch_offset, batch_row, "segments tile the batch without gaps");
                prop_assert_eq!(segment.job_offset, next_row[seq], "job {} rows skipped, repeated or reordered", seq);
                prop_assert!(segment.job_offset + segment.rows <= picks[seq].len(), "segment runs past job {}", seq);
                let in_batch = &batch.inputs[segment.batch_offset * n_features..][..segment.rows * n_features];
                let in_job = &job_inputs[seq][segment.job_offset * n_features..][..segment.rows * n_features];
                prop_assert!(in_batch == in_job, "batch rows of job {} are not that job's rows", seq);
                next_row[seq] += segment.rows;
                batch_row += segment.rows;
            }
            prop_assert_eq!(batch_row, batch.rows, "segments cover the whole batch");

            let columns = fixture.score(&batch.inputs, batch.rows);
            let scored = Arc::new(ScoredBatch {
                batch_id: None,
                segments: batch.segments,
                outcome: Ok(columns),
                started_at: Instant::now(),
                inference_time: std::time::Duration::ZERO,
            });
            for segment in &scored.segments {
                let seq = segment.job.seq as usize;
                if let Some(finished) = reassembly.add(segment, &scored) {
                    let encoded = finished.encode(&segment.job);
                    prop_assert!(results[seq].is_none(), "job {} answered twice", seq);
                    prop_assert_eq!(next_row[seq], picks[seq].len(), "job {} answered before its last rows", seq);
                    results[seq] = Some(encoded.expect("a scored job encodes"));
                }
            }
        }
        prop_assert_eq!(reassembly.pending(), 0, "no job is left half assembled");

        for (seq, rows) in picks.iter().enumerate() {
            prop_assert_eq!(next_row[seq], rows.len(), "job {} rows covered", seq);
            let Some(got) = &results[seq] else {
                return Err(TestCaseError::fail(format!("job {seq} got no result")));
            };
            let alone = fixture.score(&job_inputs[seq], rows.len());
            let timing = Timing { batching: 0.0, inference: 0.0, total: 0.0 };
            let alone = encode_ok(&metas[seq], &alone, 0, timing, None).expect("a scored job encodes");
            assert_same_outputs(seq, &outputs(got), &outputs(&alone))?;
        }
    }
}

//! Fixtures for the stages' unit tests: a real model version on the real ONNX Runtime (the
//! `linear` test model), and jobs built as the consumer builds them, with a delivery handle that
//! names the job so a test can tell which delivery an answer is for.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::RowBudget;
use crate::engine::model::ModelConfig;
use crate::engine::{runtime, ModelVersion};
use crate::flow::{Delivery, Job, JobMeta, Lane, Protocol};
use crate::settings::{BatchingSettings, InferenceSettings};

/// The linear fixture model (62 features) with `sessions` sessions and `batching`.
pub fn linear_model(sessions: usize, batching: BatchingSettings) -> Arc<ModelVersion> {
    let env = runtime::environment(None).expect("ONNX Runtime is in .onnxruntime/ (scripts/setup.sh)");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/linear/1/model.onnx");
    let inference = InferenceSettings { sessions, intra_threads: 1, ..InferenceSettings::default() };
    let model = ModelVersion::load(env, "linear", 1, &path, &ModelConfig::default(), inference, batching)
        .expect("the linear fixture model loads");
    Arc::new(model)
}

/// A job of `rows` rows (every value `seq`) whose delivery handle is its sequence number.
pub fn job(model: &Arc<ModelVersion>, seq: u64, rows: usize, lane: Lane) -> Job {
    let meta = JobMeta {
        seq,
        job_id: format!("job-{seq}"),
        model: Arc::clone(model),
        rows,
        lane,
        received_at: Instant::now(),
        queued_for: Duration::ZERO,
        deadline_ms: None,
        protocol: Protocol::Native,
        publisher: None,
        delivery: Delivery::new(seq),
        charge: RowBudget::new(usize::MAX).charge(rows),
        explain: None,
        key: None,
        audit: None,
    };
    Job { meta: Arc::new(meta), inputs: vec![seq as f32; rows * model.signature.n_features] }
}

//! Runs one batch on a pooled ONNX Runtime session, on a blocking thread so the async stages
//! keep moving, and hands the outcome to the result stage. A batch that fails is re-run in
//! halves until the failure is narrowed to the jobs that cause it, so the others still score.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ort::session::Session;
use tokio::sync::mpsc;

use crate::engine::{Column, InferenceError, ModelVersion, PooledSession};
use crate::faults;
use crate::flow::{self, Batch, Rejection, ScoredBatch, Segment};
use crate::supervisor::{Gone, Supervisor};
use crate::telemetry;

/// The number of the next run in this worker process: the `batch_id` of audit records.
static NEXT_RUN: AtomicU64 = AtomicU64::new(1);

/// Starts the run as a stage of `runs`; the session returns to the pool when the run ends.
pub fn spawn(
    runs: &Supervisor,
    model: Arc<ModelVersion>,
    session: PooledSession,
    batch: Batch,
    scored: mpsc::Sender<ScoredBatch>,
) {
    runs.spawn("inference", run(model, session, batch, scored));
}

async fn run(
    model: Arc<ModelVersion>,
    mut session: PooledSession,
    batch: Batch,
    scored: mpsc::Sender<ScoredBatch>,
) -> Result<(), Gone> {
    let started_at = Instant::now();
    let batch_id = Some(NEXT_RUN.fetch_add(1, Ordering::Relaxed));
    let (name, version, rows, jobs, closed_by) =
        (model.name.clone(), model.version, batch.rows, batch.segments.len(), batch.closed_by);
    let (busy, idle) = model.session_usage();
    telemetry::record_sessions(&name, version, busy, idle);
    let usage = Arc::clone(&model);
    let run = tokio::task::spawn_blocking(move || run_isolating(&model, &mut session, batch)).await;
    // The session went back to the pool when the blocking task dropped it.
    let (busy, idle) = usage.session_usage();
    telemetry::record_sessions(&name, version, busy, idle);
    let inference_time = started_at.elapsed();
    let parts = match run {
        Ok(parts) => parts,
        Err(join_error) if join_error.is_panic() => std::panic::resume_unwind(join_error.into_panic()),
        Err(join_error) => {
            // Only a runtime shutdown cancels a blocking task; its jobs stay unacknowledged and
            // the broker redelivers them.
            tracing::warn!(model = %name, version, error = %join_error, "inference cancelled");
            return Ok(());
        }
    };
    if faults::INFER_RUN.trip() {
        panic!("fault injected into an inference run");
    }
    telemetry::record_batch(&name, version, rows, jobs, closed_by.as_str(), inference_time);
    for (segments, outcome) in parts {
        let scored_batch = ScoredBatch { batch_id, segments, outcome, started_at, inference_time };
        scored.send(scored_batch).await.map_err(|_| Gone)?;
    }
    Ok(())
}

type Part = (Vec<Segment>, Result<Vec<Column>, Rejection>);

/// Runs `batch`; on failure re-runs each half, down to single jobs, and returns every part.
fn run_isolating(model: &ModelVersion, session: &mut Session, batch: Batch) -> Vec<Part> {
    // A panic inside the run must not take the batch with it: its jobs still need answers.
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| model.run(session, &batch.inputs, batch.rows)))
        .unwrap_or(Err(InferenceError::Panicked));
    match outcome {
        Ok(columns) => vec![(batch.segments, Ok(columns))],
        Err(error) if batch.segments.len() > 1 => {
            // Without values: ONNX Runtime's message might quote an input (see Rejection::without_values).
            let problem = flow::without_values(&error.to_string());
            tracing::warn!(model = %model.name, version = model.version, jobs = batch.segments.len(), problem,
                "batch failed; re-running it in parts to isolate the failing jobs");
            let (first, second) = halve(batch, model.signature.n_features);
            let mut parts = run_isolating(model, session, first);
            parts.extend(run_isolating(model, session, second));
            parts
        }
        Err(error) => vec![(batch.segments, Err(error.into()))],
    }
}

/// Splits a batch of two or more segments into two batches at a segment boundary.
fn halve(mut batch: Batch, n_features: usize) -> (Batch, Batch) {
    let second_segments = batch.segments.split_off(batch.segments.len() / 2);
    let first_rows: usize = batch.segments.iter().map(|s| s.rows).sum();
    let second_inputs = batch.inputs.split_off(first_rows * n_features);
    let rebased =
        second_segments.into_iter().map(|s| Segment { batch_offset: s.batch_offset - first_rows, ..s }).collect();
    let second =
        Batch { inputs: second_inputs, rows: batch.rows - first_rows, segments: rebased, closed_by: batch.closed_by };
    let first = Batch { inputs: batch.inputs, rows: first_rows, segments: batch.segments, closed_by: batch.closed_by };
    (first, second)
}

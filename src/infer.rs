//! Runs one batch on a pooled ONNX Runtime session, on a blocking thread so the async
//! stages keep moving, and hands the outcome to the result stage.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::batcher::Batch;
use crate::engine::{InferenceError, ModelVersion, PooledSession};
use crate::pipeline::ScoredBatch;
use crate::telemetry;

/// Starts the run; the session returns to the pool when the run ends.
pub fn spawn(model: Arc<ModelVersion>, mut session: PooledSession, batch: Batch, scored: mpsc::Sender<ScoredBatch>) {
    tokio::spawn(async move {
        let started_at = Instant::now();
        let labels = (model.name.clone(), model.version);
        let run = tokio::task::spawn_blocking(move || {
            // A panic inside the run must not take the batch with it: its jobs still need answers.
            let outcome =
                std::panic::catch_unwind(AssertUnwindSafe(|| model.run(&mut session, &batch.inputs, batch.rows)))
                    .unwrap_or(Err(InferenceError::Panicked));
            (batch, outcome)
        })
        .await;
        let inference_time = started_at.elapsed();
        let scored_batch = match run {
            Ok((batch, outcome)) => {
                telemetry::record_batch(
                    &labels.0,
                    labels.1,
                    batch.rows,
                    batch.segments.len(),
                    batch.closed_by,
                    inference_time,
                );
                ScoredBatch { segments: batch.segments, outcome, started_at, inference_time }
            }
            Err(join_error) => {
                // Only a runtime shutdown cancels a blocking task; its jobs stay unacknowledged and
                // the broker redelivers them.
                tracing::warn!(model = %labels.0, version = labels.1, error = %join_error, "inference cancelled");
                return;
            }
        };
        // The result stage outlives every run; a closed channel means the worker is stopping.
        let _ = scored.send(scored_batch).await;
    });
}

impl ScoredBatch {
    pub fn failed(batch: Batch, error: InferenceError) -> Self {
        ScoredBatch {
            segments: batch.segments,
            outcome: Err(error),
            started_at: Instant::now(),
            inference_time: Default::default(),
        }
    }
}

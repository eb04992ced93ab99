//! The result stage: scatters each scored batch back to its jobs, reassembles jobs that were
//! split across batches, and encodes one result message per job (ok or error).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::engine::Column;
use crate::job::{ErrorCode, JobError};
use crate::pipeline::{DeadLetter, JobFailure, JobMeta, Outgoing, ScoredBatch};
use crate::telemetry;

/// A split job whose rows are still arriving.
struct Assembly {
    columns: Vec<Column>,
    filled: usize,
    inference: Duration,
    last_batch_at: Instant,
    failure: Option<JobFailure>,
}

/// Consumes scored batches until every batcher and run has finished.
pub async fn run(mut scored: mpsc::Receiver<ScoredBatch>, publish: mpsc::Sender<Outgoing>) {
    let mut partial: HashMap<u64, Assembly> = HashMap::new();
    while let Some(batch) = scored.recv().await {
        for segment in &batch.segments {
            let job = &segment.job;
            let ready = match &batch.outcome {
                Ok(columns) if segment.is_whole_job() => {
                    let timing = Timing::of(job, batch.started_at, batch.inference_time);
                    Some(encode_ok(job, columns, segment.batch_offset, timing))
                }
                outcome => {
                    let assembly = partial.entry(job.seq).or_insert_with(|| Assembly {
                        // Shaped by the first part that scores (an earlier part may have failed).
                        columns: Vec::new(),
                        filled: 0,
                        inference: Duration::ZERO,
                        last_batch_at: batch.started_at,
                        failure: None,
                    });
                    match outcome {
                        Ok(columns) if assembly.failure.is_none() => {
                            if assembly.columns.is_empty() {
                                assembly.columns = columns.iter().map(|c| c.empty_like(job.rows)).collect();
                            }
                            for (whole, part) in assembly.columns.iter_mut().zip(columns) {
                                whole.copy_rows(segment.job_offset, part, segment.batch_offset, segment.rows);
                            }
                        }
                        Ok(_) => {}
                        Err(failure) => assembly.failure = Some(failure.clone()),
                    }
                    assembly.filled += segment.rows;
                    assembly.inference += batch.inference_time;
                    assembly.last_batch_at = assembly.last_batch_at.max(batch.started_at);
                    if assembly.filled < job.rows {
                        None
                    } else {
                        let assembly = partial.remove(&job.seq).expect("entry inserted above");
                        Some(match assembly.failure {
                            Some(failure) => Err(failure),
                            None => {
                                let timing = Timing::of(job, assembly.last_batch_at, assembly.inference);
                                encode_ok(job, &assembly.columns, 0, timing)
                            }
                        })
                    }
                }
            };
            let Some(encoded) = ready else { continue };
            let (body, status, dead_letter) = match encoded {
                Ok(body) => (body, "ok", None),
                Err(failure) => failed(job, failure),
            };
            telemetry::record_job_done(&job.model.name, status, job.rows, job.queued_for + job.received_at.elapsed());
            let outgoing = Outgoing {
                reply: job.reply.clone(),
                job_id: Some(job.job_id.clone()),
                rows: job.rows,
                body,
                dead_letter,
            };
            if publish.send(outgoing).await.is_err() {
                return;
            }
        }
    }
}

/// The error result of a job that was not scored; jobs that failed (not expired) are dead-lettered.
fn failed(job: &JobMeta, failure: JobFailure) -> (Vec<u8>, &'static str, Option<DeadLetter>) {
    let expired = failure.code == ErrorCode::Expired;
    if expired {
        tracing::info!(job_id = %job.job_id, model = %job.model.name, error = %failure.message, "job expired");
    } else {
        tracing::error!(job_id = %job.job_id, model = %job.model.name, error = %failure.message, "job not scored");
    }
    telemetry::record_job_error(failure.code);
    let error = JobError {
        job_id: Some(job.job_id.clone()),
        model: Some(job.model.name.clone()),
        model_version: Some(job.model.version),
        code: failure.code,
        message: failure.message.clone(),
    };
    let dead_letter = (!expired).then(|| DeadLetter { original: job.original.clone(), failure });
    (encode_error(&error), if expired { "expired" } else { "error" }, dead_letter)
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    pub batching: f64,
    pub inference: f64,
    pub total: f64,
}

impl Timing {
    fn of(job: &JobMeta, last_batch_at: Instant, inference: Duration) -> Self {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let batching = last_batch_at.saturating_duration_since(job.received_at);
        telemetry::record_batch_wait(&job.model.name, batching);
        Timing { batching: ms(batching), inference: ms(inference), total: ms(job.received_at.elapsed()) }
    }
}

#[derive(Serialize)]
struct OkBody<'a> {
    job_id: &'a str,
    status: &'static str,
    model: &'a str,
    model_version: String,
    model_sha256: &'a str,
    rows: usize,
    outputs: Outputs<'a>,
    timing_ms: Timing,
}

/// The job's rows of every published output, as `{"name": [per-row values], …}`.
struct Outputs<'a> {
    columns: &'a [Column],
    start: usize,
    rows: usize,
}

impl Serialize for Outputs<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.columns.len()))?;
        for column in self.columns {
            map.serialize_entry(&column.name, &column.view(self.start, self.rows))?;
        }
        map.end()
    }
}

/// The ok result of `job`, whose rows start at `start` in `columns`.
pub fn encode_ok(job: &Arc<JobMeta>, columns: &[Column], start: usize, timing: Timing) -> Result<Vec<u8>, JobFailure> {
    let body = OkBody {
        job_id: &job.job_id,
        status: "ok",
        model: &job.model.name,
        model_version: job.model.version.to_string(),
        model_sha256: &job.model.sha256,
        rows: job.rows,
        outputs: Outputs { columns, start, rows: job.rows },
        timing_ms: timing,
    };
    serde_json::to_vec(&body)
        .map_err(|e| JobFailure { code: ErrorCode::Internal, message: format!("cannot encode the result: {e}") })
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    job_id: Option<&'a str>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<String>,
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: ErrorCode,
    message: &'a str,
}

pub fn encode_error(error: &JobError) -> Vec<u8> {
    let body = ErrorBody {
        job_id: error.job_id.as_deref(),
        status: "error",
        model: error.model.as_deref(),
        model_version: error.model_version.map(|v| v.to_string()),
        error: ErrorDetail { code: error.code, message: &error.message },
    };
    // Invariant: the body holds only strings and integers, which always serialise.
    serde_json::to_vec(&body).expect("error result serialises")
}

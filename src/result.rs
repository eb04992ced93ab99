//! The result stage: scatters each scored batch back to its jobs, reassembles jobs that were
//! split across batches ([`Reassembly`]), explains the rows of jobs that asked, and turns each
//! finished job into one [`Outgoing`] result for the publisher, ok or error; jobs that cannot be
//! scored are marked for dead-lettering.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::audit;
use crate::encode::{encode_error, encode_ok, Timing};
use crate::engine::Column;
use crate::explain::Explanation;
use crate::faults;
use crate::flow::{Completion, JobMeta, Outgoing, Rejected, Rejection, ScoredBatch, Segment};
use crate::supervisor::Gone;
use crate::telemetry;

/// Consumes scored batches until every batcher and run has finished.
pub async fn run(mut scored: mpsc::Receiver<ScoredBatch>, publish: mpsc::Sender<Outgoing>) -> Result<(), Gone> {
    let mut reassembly = Reassembly::default();
    let mut apart = Apart::new();
    let mut open = true;
    while open || !apart.is_empty() {
        tokio::select! {
            answered = apart.next(), if !apart.is_empty() => {
                publish.send(answered).await.map_err(|_| Gone)?;
            }
            batch = scored.recv(), if open && apart.has_room() => {
                let Some(batch) = batch else {
                    open = false;
                    continue;
                };
                if faults::RESULT_STAGE.trip() {
                    panic!("fault injected into the result stage");
                }
                let batch = Arc::new(batch);
                for segment in &batch.segments {
                    let Some(finished) = reassembly.add(segment, &batch) else { continue };
                    let job = Arc::clone(&segment.job);
                    // The run that brought the job's last rows.
                    let batch_id = batch.batch_id;
                    if finished.is_heavy(&job) {
                        apart.spawn(move || answer(&job, finished.encode(&job), batch_id));
                    } else {
                        publish.send(answer(&job, finished.encode(&job), batch_id)).await.map_err(|_| Gone)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Explained jobs from this many rows up are explained and encoded apart ([`Apart`]).
const EXPLAINED_APART_ROWS: usize = 16;

/// Results encoded on blocking threads, at most one per core: larger explained jobs, whose explanations
/// (a tree ensemble walked per row) and larger bodies would otherwise hold up every other job in
/// this one task, and would use one core of several.
struct Apart {
    tasks: JoinSet<Outgoing>,
    limit: usize,
}

impl Apart {
    fn new() -> Self {
        let limit = std::thread::available_parallelism().map_or(2, |n| n.get());
        Apart { tasks: JoinSet::new(), limit }
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn has_room(&self) -> bool {
        self.tasks.len() < self.limit
    }

    fn spawn(&mut self, encode: impl FnOnce() -> Outgoing + Send + 'static) {
        self.tasks.spawn_blocking(encode);
    }

    /// The next result encoded apart. Call only when some are pending.
    async fn next(&mut self) -> Outgoing {
        match self.tasks.join_next().await {
            Some(Ok(outgoing)) => outgoing,
            // An encoding that panicked fails the stage as if it had panicked here: the
            // pipeline is rebuilt and the job redelivered.
            Some(Err(error)) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Cancelled only when the runtime shuts down, which ends this task too.
            Some(Err(_)) | None => std::future::pending().await,
        }
    }
}

/// A job whose rows are all in: scored, or failed.
pub enum Finished {
    /// The job's rows start at `start` in the columns; its last batch started at
    /// `last_batch_at`, and its batches ran for `inference`.
    Scored {
        scores: Scores,
        start: usize,
        last_batch_at: Instant,
        inference: Duration,
    },
    Failed(Rejection),
}

/// Where a finished job's scores are: in the one batch that scored it whole, or reassembled.
pub enum Scores {
    Batch(Arc<ScoredBatch>),
    Reassembled(Vec<Column>),
}

impl Scores {
    fn columns(&self) -> &[Column] {
        match self {
            // Made only from a batch that scored (`Reassembly::add`); a failed one has no rows.
            Scores::Batch(batch) => batch.outcome.as_deref().unwrap_or_default(),
            Scores::Reassembled(columns) => columns,
        }
    }
}

impl Finished {
    /// Whether encoding this job's result is worth a blocking thread of its own: a few rows
    /// are explained and encoded in microseconds, less than the hand-over would add.
    fn is_heavy(&self, job: &JobMeta) -> bool {
        matches!(self, Finished::Scored { .. }) && job.explain.is_some() && job.rows >= EXPLAINED_APART_ROWS
    }

    /// The job's result body, explained where it asked.
    pub fn encode(self, job: &Arc<JobMeta>) -> Result<Vec<u8>, Rejection> {
        match self {
            Finished::Scored { scores, start, last_batch_at, inference } => {
                encode(job, scores.columns(), start, last_batch_at, inference)
            }
            Finished::Failed(rejection) => Err(rejection),
        }
    }
}

/// Jobs split across batches whose rows are still arriving, by job sequence number.
#[derive(Default)]
pub struct Reassembly {
    partial: HashMap<u64, Assembly>,
}

/// A split job whose rows are still arriving.
struct Assembly {
    columns: Vec<Column>,
    filled: usize,
    inference: Duration,
    last_batch_at: Instant,
    rejection: Option<Rejection>,
}

impl Reassembly {
    /// Takes one segment of `batch`; returns the job once all its rows are in.
    pub fn add(&mut self, segment: &Segment, batch: &Arc<ScoredBatch>) -> Option<Finished> {
        let job = &segment.job;
        if let (Ok(_), true) = (&batch.outcome, segment.is_whole_job()) {
            return Some(Finished::Scored {
                scores: Scores::Batch(Arc::clone(batch)),
                start: segment.batch_offset,
                last_batch_at: batch.started_at,
                inference: batch.inference_time,
            });
        }
        let assembly = self.partial.entry(job.seq).or_insert_with(|| Assembly {
            // Shaped by the first part that scores (an earlier part may have failed).
            columns: Vec::new(),
            filled: 0,
            inference: Duration::ZERO,
            last_batch_at: batch.started_at,
            rejection: None,
        });
        match &batch.outcome {
            Ok(columns) if assembly.rejection.is_none() => {
                if assembly.columns.is_empty() {
                    assembly.columns = columns.iter().map(|c| c.empty_like(job.rows)).collect();
                }
                for (whole, part) in assembly.columns.iter_mut().zip(columns) {
                    whole.copy_rows(segment.job_offset, part, segment.batch_offset, segment.rows);
                }
            }
            Ok(_) => {}
            Err(rejection) => assembly.rejection = Some(rejection.clone()),
        }
        assembly.filled += segment.rows;
        assembly.inference += batch.inference_time;
        assembly.last_batch_at = assembly.last_batch_at.max(batch.started_at);
        if assembly.filled < job.rows {
            return None;
        }
        let assembly = self.partial.remove(&job.seq)?;
        Some(match assembly.rejection {
            Some(rejection) => Finished::Failed(rejection),
            None => Finished::Scored {
                scores: Scores::Reassembled(assembly.columns),
                start: 0,
                last_batch_at: assembly.last_batch_at,
                inference: assembly.inference,
            },
        })
    }

    /// Jobs with some rows still to come.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// The explanations of the job's rows, where it asked for them, from its scored rows (all of
/// them, starting at `start` in `columns`).
fn explain(job: &JobMeta, columns: &[Column], start: usize) -> Result<Option<Vec<Explanation>>, Rejection> {
    let (Some(request), Some(explainer)) = (job.explain.as_ref(), job.model.explainer.as_ref()) else {
        return Ok(None);
    };
    if !explainer.reads_scores() {
        return Ok(Some(explainer.explain(request, None)));
    }
    let column = columns.iter().find(|c| c.name == explainer.output).ok_or_else(|| {
        Rejection::Internal(format!("the explained output {} is not among the scored outputs", explainer.output))
    })?;
    let g = (start..start + job.rows)
        .map(|row| explainer.g(&column.numbers(row)))
        .collect::<Result<Vec<f64>, _>>()
        .map_err(|e| Rejection::Internal(e.to_string()))?;
    Ok(Some(explainer.explain(request, Some(&g))))
}

/// The ok result of `job`, whose scored rows start at `start` in `columns`; its last batch
/// started at `last_batch_at`, and its batches ran for `inference`.
fn encode(
    job: &Arc<JobMeta>,
    columns: &[Column],
    start: usize,
    last_batch_at: Instant,
    inference: Duration,
) -> Result<Vec<u8>, Rejection> {
    let explanations = explain(job, columns, start)?;
    // After the explanations: the job's total time includes them.
    let timing = Timing::of(job, last_batch_at, inference);
    encode_ok(job, columns, start, timing, explanations.as_deref())
}

/// The result message of a finished job: its scores, or its error (dead-lettered unless the job
/// merely expired). `batch_id` names the run that brought its last rows.
fn answer(job: &JobMeta, outcome: Result<Vec<u8>, Rejection>, batch_id: Option<u64>) -> Outgoing {
    let error_code = outcome.as_ref().err().map(Rejection::code);
    let (body, status, dead_letter) = match outcome {
        Ok(body) => (body, "ok", None),
        Err(rejection) => {
            log_rejection(job, &rejection);
            telemetry::record_job_error(rejection.code().as_str());
            let error = Rejected {
                job_id: Some(job.job_id.clone()),
                model: Some(job.model.name.clone()),
                model_version: Some(job.model.version),
                protocol: job.protocol,
                publisher: job.publisher.clone(),
                reason: rejection,
            };
            let status = if error.reason.dead_letters() { "error" } else { "expired" };
            (encode_error(&error), status, error.reason.dead_letters().then_some(error.reason))
        }
    };
    Outgoing {
        delivery: job.delivery.clone(),
        job_id: Some(job.job_id.clone()),
        body,
        dead_letter,
        completion: Completion {
            model: job.model.name.clone(),
            lane: job.lane,
            status,
            rows: job.rows,
            since: Completion::published_at(job.received_at, job.queued_for),
        },
        key: job.key.clone(),
        audit: audit::scored(job, error_code, batch_id),
    }
}

/// Logs why a job got an error result. The worker writes these messages itself, but one can carry
/// ONNX Runtime's words about the run, which might quote an input: the log gets them without
/// values (`Rejection::without_values`), trace level the full message.
fn log_rejection(job: &JobMeta, rejection: &Rejection) {
    let (job_id, model, code) = (&job.job_id, &job.model.name, rejection.code().as_str());
    let problem = rejection.without_values();
    if rejection.dead_letters() {
        tracing::error!(job_id, model, code, problem, "job not scored");
    } else {
        tracing::info!(job_id, model, code, problem, "job expired");
    }
    tracing::trace!(job_id, model, code, error = rejection.message(), "job answered with an error: the full message");
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::flow::{Lane, Segment};
    use crate::settings::BatchingSettings;
    use crate::testing::{job, linear_model};

    /// The job's rows `from..from + rows`, scored alone, as a part placed at `batch_offset`.
    fn part(job: &crate::flow::Job, from: usize, rows: usize) -> Arc<ScoredBatch> {
        let n = job.meta.model.signature.n_features;
        let inputs = &job.inputs[from * n..(from + rows) * n];
        let model = &job.meta.model;
        let columns = futures_util::FutureExt::now_or_never(model.session())
            .expect("a free session")
            .map(|mut session| model.run(&mut session, inputs, rows))
            .expect("the session pool is open")
            .expect("the fixture scores");
        let segment = Segment { job: Arc::clone(&job.meta), job_offset: from, batch_offset: 0, rows };
        Arc::new(ScoredBatch {
            batch_id: Some(1),
            segments: vec![segment],
            outcome: Ok(columns),
            started_at: Instant::now(),
            inference_time: Duration::ZERO,
        })
    }

    fn outputs(body: &[u8]) -> serde_json::Value {
        let result: serde_json::Value = serde_json::from_slice(body).expect("JSON");
        result["outputs"].clone()
    }

    #[test]
    fn parts_arriving_out_of_order_make_the_result_of_the_whole_job() {
        let model = linear_model(1, BatchingSettings::default());
        let split = job(&model, 7, 5, Lane::Online);
        let whole = part(&split, 0, 5);
        let mut reassembly = Reassembly::default();
        let (tail, head) = (part(&split, 3, 2), part(&split, 0, 3));
        assert!(reassembly.add(&tail.segments[0], &tail).is_none(), "rows 0..3 still missing");
        assert_eq!(reassembly.pending(), 1);
        let body = reassembly.add(&head.segments[0], &head).expect("all rows in").encode(&split.meta).expect("encodes");
        assert_eq!(reassembly.pending(), 0);
        let alone = Reassembly::default().add(&whole.segments[0], &whole).expect("whole").encode(&split.meta);
        let alone = alone.expect("encodes");
        let (got, alone) = (outputs(&body), outputs(&alone));
        assert_eq!(got["label"], alone["label"]);
        let probabilities = |v: &serde_json::Value| -> Vec<f64> {
            let rows = v["probabilities"].as_array().cloned().unwrap_or_default();
            rows.iter().flat_map(|row| row.as_array().cloned().unwrap_or_default()).filter_map(|p| p.as_f64()).collect()
        };
        let (got, alone) = (probabilities(&got), probabilities(&alone));
        assert_eq!(got.len(), 10, "two probabilities for each of 5 rows");
        // Batch size may change the order of floating-point sums, not the result.
        assert!(got.iter().zip(&alone).all(|(g, a)| (g - a).abs() <= 1e-6), "{got:?} vs {alone:?}");
    }

    #[test]
    fn a_failed_part_fails_the_job_once_all_parts_are_in() {
        let model = linear_model(1, BatchingSettings::default());
        let split = job(&model, 8, 4, Lane::Bulk);
        let mut reassembly = Reassembly::default();
        let failed = Arc::new(ScoredBatch::failed(
            vec![Segment { job: Arc::clone(&split.meta), job_offset: 0, batch_offset: 0, rows: 2 }],
            Rejection::Internal("inference failed: boom".into()),
        ));
        assert!(reassembly.add(&failed.segments[0], &failed).is_none());
        let rest = part(&split, 2, 2);
        let outcome = reassembly.add(&rest.segments[0], &rest).expect("all rows in").encode(&split.meta);
        assert_eq!(outcome, Err(Rejection::Internal("inference failed: boom".into())));

        let answer = answer(&split.meta, outcome, None);
        assert_eq!(answer.delivery.open::<u64>(), Some(&8), "the job's own delivery");
        assert_eq!((answer.completion.status, answer.completion.lane), ("error", Lane::Bulk));
        assert!(answer.dead_letter.is_some(), "a failed job is dead-lettered");
        let body: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON");
        assert_eq!(body["error"]["code"], "internal");
    }

    #[test]
    fn an_expired_job_is_answered_but_not_dead_lettered() {
        let model = linear_model(1, BatchingSettings::default());
        let late = job(&model, 9, 1, Lane::Online);
        let answer = answer(&late.meta, Err(Rejection::Expired("deadline passed".into())), None);
        assert_eq!(answer.completion.status, "expired");
        assert!(answer.dead_letter.is_none());
    }
}

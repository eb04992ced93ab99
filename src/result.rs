//! The result stage: scatters each scored batch back to its jobs, reassembles jobs that were
//! split across batches ([`Reassembly`]), explains the rows of jobs that asked, and turns each
//! finished job into one [`Outgoing`] result for the publisher, ok or error; jobs that cannot be
//! scored are marked for dead-lettering.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

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
    while let Some(batch) = scored.recv().await {
        if faults::RESULT_STAGE.trip() {
            panic!("fault injected into the result stage");
        }
        for segment in &batch.segments {
            let Some(outcome) = reassembly.add(segment, &batch) else { continue };
            publish.send(answer(&segment.job, outcome)).await.map_err(|_| Gone)?;
        }
    }
    Ok(())
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
    /// Takes one segment of `batch`; returns the job's encoded result once all its rows are in.
    pub fn add(&mut self, segment: &Segment, batch: &ScoredBatch) -> Option<Result<Vec<u8>, Rejection>> {
        let job = &segment.job;
        if let (Ok(columns), true) = (&batch.outcome, segment.is_whole_job()) {
            return Some(encode(job, columns, segment.batch_offset, batch.started_at, batch.inference_time));
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
            Some(rejection) => Err(rejection),
            None => encode(job, &assembly.columns, 0, assembly.last_batch_at, assembly.inference),
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
/// merely expired).
fn answer(job: &JobMeta, outcome: Result<Vec<u8>, Rejection>) -> Outgoing {
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
    fn part(job: &crate::flow::Job, from: usize, rows: usize) -> ScoredBatch {
        let n = job.meta.model.signature.n_features;
        let inputs = &job.inputs[from * n..(from + rows) * n];
        let model = &job.meta.model;
        let columns = futures_util::FutureExt::now_or_never(model.session())
            .expect("a free session")
            .map(|mut session| model.run(&mut session, inputs, rows))
            .expect("the session pool is open")
            .expect("the fixture scores");
        let segment = Segment { job: Arc::clone(&job.meta), job_offset: from, batch_offset: 0, rows };
        ScoredBatch {
            segments: vec![segment],
            outcome: Ok(columns),
            started_at: Instant::now(),
            inference_time: Duration::ZERO,
        }
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
        let body = reassembly.add(&head.segments[0], &head).expect("all rows in").expect("encodes");
        assert_eq!(reassembly.pending(), 0);
        let alone = Reassembly::default().add(&whole.segments[0], &whole).expect("whole").expect("encodes");
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
        let failed = ScoredBatch::failed(
            vec![Segment { job: Arc::clone(&split.meta), job_offset: 0, batch_offset: 0, rows: 2 }],
            Rejection::Internal("inference failed: boom".into()),
        );
        assert!(reassembly.add(&failed.segments[0], &failed).is_none());
        let rest = part(&split, 2, 2);
        let outcome = reassembly.add(&rest.segments[0], &rest).expect("all rows in");
        assert_eq!(outcome, Err(Rejection::Internal("inference failed: boom".into())));

        let answer = answer(&split.meta, outcome);
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
        let answer = answer(&late.meta, Err(Rejection::Expired("deadline passed".into())));
        assert_eq!(answer.completion.status, "expired");
        assert!(answer.dead_letter.is_none());
    }
}

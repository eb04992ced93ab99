//! The job consumer: takes deliveries from the jobs queue, decodes and validates them, and
//! routes each job to its model's batcher, or answers it at once with an error result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{AmqpError, Reply};
use crate::engine::{ModelVersion, Repository};
use crate::job::{self, Envelope, ErrorCode, JobError, JobRequest};
use crate::pipeline::{epoch_ms, DeadLetter, Job, JobFailure, JobMeta, Original, Outgoing};
use crate::result::encode_error;
use crate::settings::Settings;
use crate::telemetry;

/// Header carrying a job's deadline in epoch milliseconds.
pub const DEADLINE_HEADER: &str = "x-deadline";

/// Senders to every model version's batcher.
pub type Routes = HashMap<(String, u64), mpsc::Sender<Job>>;

pub struct Consumer<'a> {
    settings: &'a Settings,
    repository: &'a Repository,
    routes: Routes,
    publish: mpsc::Sender<Outgoing>,
    next_seq: u64,
}

impl<'a> Consumer<'a> {
    pub fn new(
        settings: &'a Settings,
        repository: &'a Repository,
        routes: Routes,
        publish: mpsc::Sender<Outgoing>,
    ) -> Self {
        Self { settings, repository, routes, publish, next_seq: 0 }
    }

    /// Consumes until `shutdown` fires or the channel fails. On shutdown the subscription is
    /// cancelled and the deliveries already handed to this worker are still processed, so none
    /// of them needs redelivery.
    pub async fn run(mut self, channel: &Channel, shutdown: &CancellationToken) -> Result<(), AmqpError> {
        let queue = self.settings.amqp.jobs_queue.as_str();
        let mut deliveries = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(|source| AmqpError::Queue { queue: queue.to_string(), source })?;
        tracing::info!(queue, prefetch = self.settings.amqp.prefetch, "consuming jobs");
        let mut cancelled = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled(), if !cancelled => {
                    tracing::info!(queue, "stopping consumption; finishing jobs already received");
                    channel.basic_cancel(deliveries.tag(), BasicCancelOptions::default()).await?;
                    cancelled = true;
                }
                delivery = deliveries.next() => match delivery {
                    Some(Ok(delivery)) => {
                        if !self.accept(delivery).await {
                            return Ok(());
                        }
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None if cancelled => return Ok(()),
                    None => {
                        tracing::warn!(queue, "the broker cancelled the subscription; subscribing again");
                        return Err(AmqpError::ConsumerEnded(queue.to_string()));
                    }
                },
            }
        }
    }

    /// Routes one delivery; false when the pipeline behind has stopped.
    async fn accept(&mut self, delivery: Delivery) -> bool {
        let received_at = Instant::now();
        let Delivery { data, properties, acker, .. } = delivery;
        let queue_wait = properties
            .timestamp()
            .map(|seconds| Duration::from_millis(epoch_ms().saturating_sub(seconds.saturating_mul(1000))));
        let reply = Reply {
            acker,
            routing_key: properties
                .reply_to()
                .clone()
                .filter(|q| !q.as_str().is_empty())
                .unwrap_or_else(|| ShortString::from(self.settings.amqp.results_queue.as_str())),
            correlation_id: properties.correlation_id().clone(),
        };
        match self.prepare(&data, &properties, received_at) {
            Ok(Prepared { job_id, rows, model, inputs, deadline_ms }) => {
                let key = (model.name.clone(), model.version);
                telemetry::record_job_received(&key.0, queue_wait);
                telemetry::record_inflight(1.0, rows as f64);
                self.next_seq += 1;
                let meta = JobMeta {
                    seq: self.next_seq,
                    job_id,
                    rows,
                    model,
                    received_at,
                    queued_for: queue_wait.unwrap_or_default(),
                    deadline_ms,
                    reply,
                    original: Original { body: data, properties },
                };
                let job = Job { meta: Arc::new(meta), inputs };
                match self.routes.get(&key) {
                    Some(route) => route.send(job).await.is_ok(),
                    // Invariant: routes hold every version of the repository the job was resolved in.
                    None => unreachable!("no batcher for {} v{}", key.0, key.1),
                }
            }
            Err(error) => {
                tracing::warn!(
                    job_id = error.job_id.as_deref().unwrap_or("-"),
                    model = error.model.as_deref().unwrap_or("-"),
                    code = error.code.as_str(),
                    error = %error.message,
                    "job rejected"
                );
                telemetry::record_job_error(error.code);
                telemetry::record_inflight(1.0, 0.0);
                let model = match error.model.as_deref() {
                    Some(name) if self.repository.names().contains(&name) => name,
                    _ => telemetry::UNKNOWN_MODEL_LABEL,
                };
                telemetry::record_job_done(model, "error", 0, queue_wait.unwrap_or_default() + received_at.elapsed());
                let outgoing = Outgoing {
                    reply,
                    job_id: error.job_id.clone(),
                    rows: 0,
                    body: encode_error(&error),
                    dead_letter: Some(DeadLetter {
                        original: Original { body: data, properties },
                        failure: JobFailure { code: error.code, message: error.message },
                    }),
                };
                self.publish.send(outgoing).await.is_ok()
            }
        }
    }

    fn prepare(&self, body: &[u8], properties: &BasicProperties, received_at: Instant) -> Result<Prepared, JobError> {
        let envelope = Envelope {
            body,
            message_id: properties.message_id().as_ref().map(ShortString::as_str),
            content_type: properties.content_type().as_ref().map(ShortString::as_str),
        };
        let JobRequest { job_id, model: model_name, model_version, features } =
            job::decode(envelope, &self.settings.limits)?;
        let reject = |code, model_version, message: String| JobError {
            job_id: Some(job_id.clone()),
            model: Some(model_name.clone()),
            model_version,
            code,
            message,
        };
        let deadline_ms =
            deadline(properties, received_at).map_err(|m| reject(ErrorCode::InvalidInput, model_version, m))?;
        let model = self
            .repository
            .resolve(&model_name, model_version)
            .map_err(|e| reject(ErrorCode::UnknownModel, model_version, e.to_string()))?;
        let rows = features.row_count();
        let inputs = job::bind(features, model)
            .map_err(|message| reject(ErrorCode::InvalidInput, Some(model.version), message))?;
        Ok(Prepared { job_id, rows, model: Arc::clone(model), inputs, deadline_ms })
    }
}

/// A job that passed every check that does not need the engine.
struct Prepared {
    job_id: String,
    rows: usize,
    model: Arc<ModelVersion>,
    inputs: Vec<f32>,
    deadline_ms: Option<u64>,
}

/// The job's deadline in epoch milliseconds: header `x-deadline`, else the AMQP `expiration`
/// counted from the message's `timestamp` (or from its receipt when it has none).
fn deadline(properties: &BasicProperties, received_at: Instant) -> Result<Option<u64>, String> {
    let received_ms = epoch_ms().saturating_sub(received_at.elapsed().as_millis() as u64);
    if let Some(value) = properties.headers().as_ref().and_then(|h| h.inner().get(DEADLINE_HEADER)) {
        let millis = match value {
            AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
            AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
            AMQPValue::LongUInt(v) => Some(u64::from(*v)),
            AMQPValue::Timestamp(v) => Some(*v),
            AMQPValue::ShortString(v) => v.as_str().trim().parse().ok(),
            AMQPValue::LongString(v) => std::str::from_utf8(v.as_bytes()).ok().and_then(|s| s.trim().parse().ok()),
            _ => None,
        };
        return millis.map(Some).ok_or_else(|| {
            format!("header {DEADLINE_HEADER} must be epoch milliseconds as an integer, got {value:?}")
        });
    }
    let Some(expiration) = properties.expiration().as_ref().and_then(|e| e.as_str().parse::<u64>().ok()) else {
        return Ok(None);
    };
    let published_ms = properties.timestamp().map(|seconds| seconds * 1000).unwrap_or(received_ms);
    Ok(Some(published_ms + expiration))
}

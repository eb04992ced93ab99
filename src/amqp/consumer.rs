//! The job consumer: takes deliveries from the jobs queue, decodes and validates them, and
//! routes each job to its model's batcher, or answers it at once with an error result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{AmqpError, Reply};
use crate::engine::Repository;
use crate::job::{self, Envelope, ErrorCode, JobError, JobRequest};
use crate::pipeline::{Job, JobMeta, Outgoing};
use crate::result::encode_error;
use crate::settings::Settings;
use crate::telemetry;

/// Senders to every model version's batcher.
pub type Routes = HashMap<(String, u64), mpsc::Sender<Job>>;

pub struct Consumer<'a> {
    pub settings: &'a Settings,
    pub repository: &'a Repository,
    pub routes: Routes,
    pub publish: mpsc::Sender<Outgoing>,
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

    /// Consumes until `shutdown` fires (then cancels the subscription) or the channel fails.
    pub async fn run(mut self, channel: &Channel, shutdown: &CancellationToken) -> Result<(), AmqpError> {
        let queue = self.settings.amqp.jobs_queue.as_str();
        let mut deliveries = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(|source| AmqpError::Queue { queue: queue.to_string(), source })?;
        tracing::info!(queue, prefetch = self.settings.amqp.prefetch, "consuming jobs");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Deliveries already prefetched but not taken stay unacked and return to the queue.
                    tracing::debug!(queue, "shutdown: cancelling the subscription");
                    channel.basic_cancel(deliveries.tag(), BasicCancelOptions::default()).await?;
                    return Ok(());
                }
                delivery = deliveries.next() => match delivery {
                    Some(Ok(delivery)) => {
                        if !self.accept(delivery).await {
                            return Ok(());
                        }
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => return Err(AmqpError::ConsumerEnded(queue.to_string())),
                },
            }
        }
    }

    /// Routes one delivery; false when the pipeline behind has stopped.
    async fn accept(&mut self, delivery: Delivery) -> bool {
        let received_at = Instant::now();
        let properties = &delivery.properties;
        let reply = Reply {
            acker: delivery.acker.clone(),
            routing_key: properties
                .reply_to()
                .clone()
                .filter(|q| !q.as_str().is_empty())
                .unwrap_or_else(|| ShortString::from(self.settings.amqp.results_queue.as_str())),
            correlation_id: properties.correlation_id().clone(),
        };
        let envelope = Envelope {
            body: &delivery.data,
            message_id: properties.message_id().as_ref().map(ShortString::as_str),
            content_type: properties.content_type().as_ref().map(ShortString::as_str),
        };
        match self.prepare(envelope, received_at, reply.clone()) {
            Ok(job) => {
                let key = (job.meta.model.name.clone(), job.meta.model.version);
                telemetry::record_job_received(&key.0);
                match self.routes.get(&key) {
                    Some(route) => route.send(job).await.is_ok(),
                    // Invariant: routes hold every version of the repository the job was resolved in.
                    None => unreachable!("no batcher for {} v{}", key.0, key.1),
                }
            }
            Err(error) => {
                tracing::warn!(job_id = error.job_id.as_deref().unwrap_or("-"), model = error.model.as_deref().unwrap_or("-"),
                    code = error.code.as_str(), error = %error.message, "job rejected");
                telemetry::record_job_error(error.code);
                let outgoing = Outgoing { reply, job_id: error.job_id.clone(), body: encode_error(&error) };
                self.publish.send(outgoing).await.is_ok()
            }
        }
    }

    fn prepare(&mut self, envelope: Envelope<'_>, received_at: Instant, reply: Reply) -> Result<Job, JobError> {
        let JobRequest { job_id, model: model_name, model_version, features } =
            job::decode(envelope, &self.settings.limits)?;
        let reject = |code, model_version, message: String| JobError {
            job_id: Some(job_id.clone()),
            model: Some(model_name.clone()),
            model_version,
            code,
            message,
        };
        let model = self
            .repository
            .resolve(&model_name, model_version)
            .map_err(|e| reject(ErrorCode::UnknownModel, model_version, e.to_string()))?;
        let rows = features.row_count();
        let inputs = job::bind(features, model)
            .map_err(|message| reject(ErrorCode::InvalidInput, Some(model.version), message))?;
        self.next_seq += 1;
        let meta = JobMeta { seq: self.next_seq, job_id, model: Arc::clone(model), rows, received_at, reply };
        Ok(Job { meta: Arc::new(meta), inputs })
    }
}

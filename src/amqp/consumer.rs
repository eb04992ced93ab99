//! The job consumer: takes deliveries from the online and bulk lanes' queues, decodes and
//! validates them, and routes each job to its model version's batcher, or answers it at once
//! with an error result. Online deliveries are taken first; a lane whose row budget is spent
//! takes none until rows are answered. It follows the served repository snapshot, so a job is
//! always resolved against the versions that have batchers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{AmqpError, Reply};
use crate::batcher::Batchers;
use crate::budget::RowBudget;
use crate::engine::{ModelVersion, Repository};
use crate::job::{self, Envelope, ErrorCode, JobError, JobRequest};
use crate::pipeline::{epoch_ms, DeadLetter, Job, JobFailure, JobMeta, Lane, Original, Outgoing};
use crate::result::encode_error;
use crate::settings::{LimitSettings, Settings};
use crate::telemetry;

/// Header carrying a job's deadline in epoch milliseconds.
pub const DEADLINE_HEADER: &str = "x-deadline";

/// Bodies from this size up are decoded on a blocking thread: a large job must not hold up the
/// small ones behind it, nor the async threads that publish results.
const DECODE_APART_BYTES: usize = 64 * 1024;

pub struct Consumer<'a> {
    settings: &'a Settings,
    snapshots: watch::Receiver<Arc<Repository>>,
    repository: Arc<Repository>,
    batchers: Batchers,
    publish: mpsc::Sender<Outgoing>,
    /// Large bodies being decoded, at most one per lane.
    decoding: JoinSet<Decoded>,
    next_seq: u64,
}

impl<'a> Consumer<'a> {
    pub fn new(
        settings: &'a Settings,
        mut snapshots: watch::Receiver<Arc<Repository>>,
        scored: mpsc::Sender<crate::pipeline::ScoredBatch>,
        publish: mpsc::Sender<Outgoing>,
    ) -> Self {
        let repository = Arc::clone(&snapshots.borrow_and_update());
        let capacity = usize::from(settings.amqp.prefetch.max(settings.amqp.bulk_prefetch));
        let batchers = Batchers::new(&repository, settings.bulk_batching, scored, capacity);
        Self { settings, snapshots, repository, batchers, publish, decoding: JoinSet::new(), next_seq: 0 }
    }

    /// Consumes until `shutdown` fires or the channel fails, and hands back the batchers to drain.
    /// On shutdown the subscriptions are cancelled and the deliveries already handed to this
    /// worker are still processed, so none of them needs redelivery.
    pub async fn run(mut self, channel: &Channel, shutdown: &CancellationToken) -> Result<Batchers, AmqpError> {
        let amqp = &self.settings.amqp;
        let mut online = Feed::subscribe(channel, Lane::Online, &amqp.jobs_queue, amqp.prefetch, self.budget()).await?;
        let mut bulk = match amqp.bulk_queue.as_str() {
            "" => Feed::absent(Lane::Bulk),
            queue => Feed::subscribe(channel, Lane::Bulk, queue, amqp.bulk_prefetch, self.budget()).await?,
        };
        // Held apart from the feeds, whose subscriptions are borrowed while the select waits.
        let (online_budget, bulk_budget) = (Arc::clone(&online.budget), Arc::clone(&bulk.budget));
        let mut cancelled = false;
        let mut following = true;
        let yield_window = Duration::from_millis(self.settings.amqp.bulk_yield_ms);
        let mut online_seen: Option<tokio::time::Instant> = None;
        while online.is_open() || bulk.is_open() || !self.decoding.is_empty() {
            // While online jobs keep coming, the bulk lane holds one job at a time: the machine's
            // cores then go to online work first, not only the engine's runs.
            let yield_until =
                online_seen.map(|seen| seen + yield_window).filter(|until| *until > tokio::time::Instant::now());
            let bulk_held_back = yield_until.is_some() && (!bulk_budget.is_idle() || bulk.decoding);
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !cancelled => {
                    tracing::info!("stopping consumption; finishing jobs already received");
                    online.cancel(channel).await?;
                    bulk.cancel(channel).await?;
                    cancelled = true;
                }
                changed = self.snapshots.changed(), if following => match changed {
                    Ok(()) => {
                        self.repository = Arc::clone(&self.snapshots.borrow_and_update());
                        self.batchers.sync(&self.repository);
                    }
                    // The worker no longer reloads models; the current versions serve on.
                    Err(_) => following = false,
                },
                Some(decoded) = self.decoding.join_next(), if !self.decoding.is_empty() => {
                    // Only a runtime shutdown cancels a blocking task; its job is then redelivered.
                    let Ok(decoded) = decoded else { continue };
                    match decoded.lane {
                        Lane::Online => online.decoding = false,
                        Lane::Bulk => bulk.decoding = false,
                    }
                    if !self.dispatch(decoded).await {
                        break;
                    }
                }
                delivery = online.next(), if online.can_take() => {
                    online_seen = Some(tokio::time::Instant::now());
                    if !self.take(&mut online, delivery, cancelled).await? {
                        break;
                    }
                }
                delivery = bulk.next(), if bulk.can_take() && !bulk_held_back => {
                    if !self.take(&mut bulk, delivery, cancelled).await? {
                        break;
                    }
                }
                _ = online_budget.returned(), if online.is_open() && online_budget.is_spent() => {}
                _ = bulk_budget.returned(), if bulk.is_open() && (bulk_budget.is_spent() || bulk_held_back) => {}
                _ = tokio::time::sleep_until(yield_until.unwrap_or_else(tokio::time::Instant::now)), if bulk_held_back => {}
            }
        }
        Ok(self.batchers)
    }

    fn budget(&self) -> Arc<RowBudget> {
        RowBudget::new(self.settings.limits.max_inflight_rows)
    }

    /// Handles what a lane's subscription yielded; false when the pipeline behind has stopped.
    async fn take(
        &mut self,
        feed: &mut Feed,
        delivery: Option<Result<Delivery, lapin::Error>>,
        cancelled: bool,
    ) -> Result<bool, AmqpError> {
        match delivery {
            Some(Ok(delivery)) => Ok(self.accept(delivery, feed).await),
            Some(Err(error)) => Err(error.into()),
            None if cancelled => {
                feed.deliveries = None;
                Ok(true)
            }
            None => {
                tracing::warn!(queue = %feed.queue, "the broker cancelled the subscription; subscribing again");
                Err(AmqpError::ConsumerEnded(feed.queue.clone()))
            }
        }
    }

    /// Decodes one delivery, here or (a large body) on a blocking thread, and routes it; false when
    /// the pipeline behind has stopped.
    async fn accept(&mut self, delivery: Delivery, feed: &mut Feed) -> bool {
        let received_at = Instant::now();
        let Delivery { data, properties, acker, .. } = delivery;
        let reply = Reply {
            acker,
            routing_key: properties
                .reply_to()
                .clone()
                .filter(|q| !q.as_str().is_empty())
                .unwrap_or_else(|| ShortString::from(self.settings.amqp.results_queue.as_str())),
            correlation_id: properties.correlation_id().clone(),
        };
        let large = data.len() >= DECODE_APART_BYTES;
        let (limits, repository) = (self.settings.limits, Arc::clone(&self.repository));
        let (lane, budget) = (feed.lane, Arc::clone(&feed.budget));
        let decode = move || {
            let outcome = prepare(&data, &properties, received_at, &limits, &repository);
            Decoded { lane, budget, received_at, data, properties, reply, outcome }
        };
        if large {
            feed.decoding = true;
            self.decoding.spawn_blocking(decode);
            true
        } else {
            self.dispatch(decode()).await
        }
    }

    /// Routes a decoded job to its batcher, or answers it with its error; false when the pipeline
    /// behind has stopped.
    async fn dispatch(&mut self, decoded: Decoded) -> bool {
        let Decoded { lane, budget, received_at, data, properties, reply, outcome } = decoded;
        let queue_wait = properties
            .timestamp()
            .map(|seconds| Duration::from_millis(epoch_ms().saturating_sub(seconds.saturating_mul(1000))));
        match outcome {
            Ok(Prepared { job_id, rows, model, inputs, deadline_ms, protocol }) => {
                telemetry::record_job_received(&model.name, lane, queue_wait);
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
                    protocol,
                    reply,
                    original: Original { body: data, properties, lane },
                    charge: budget.charge(rows),
                };
                let job = Job { meta: Arc::new(meta), inputs };
                let model = Arc::clone(&job.meta.model);
                self.batchers.route(&model).send(job).await.is_ok()
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
                telemetry::record_job_done(
                    model,
                    lane,
                    "error",
                    0,
                    queue_wait.unwrap_or_default() + received_at.elapsed(),
                );
                let outgoing = Outgoing {
                    reply,
                    job_id: error.job_id.clone(),
                    rows: 0,
                    body: encode_error(&error),
                    dead_letter: Some(DeadLetter {
                        original: Original { body: data, properties, lane },
                        failure: JobFailure { code: error.code, message: error.message },
                    }),
                };
                self.publish.send(outgoing).await.is_ok()
            }
        }
    }
}

/// Decodes, validates and binds a job to the version of `repository` that scores it. Pure.
fn prepare(
    body: &[u8],
    properties: &BasicProperties,
    received_at: Instant,
    limits: &LimitSettings,
    repository: &Repository,
) -> Result<Prepared, JobError> {
    let envelope = Envelope {
        body,
        message_id: properties.message_id().as_ref().map(ShortString::as_str),
        content_type: properties.content_type().as_ref().map(ShortString::as_str),
        model_header: crate::oip::model_header(properties),
    };
    let JobRequest { job_id, model: model_name, model_version, features, protocol } = job::decode(envelope, limits)?;
    let reject = |code, model_version, message: String| JobError {
        job_id: Some(job_id.clone()),
        model: Some(model_name.clone()),
        model_version,
        code,
        message,
        protocol,
    };
    let deadline_ms =
        deadline(properties, received_at).map_err(|m| reject(ErrorCode::InvalidInput, model_version, m))?;
    let model = repository
        .resolve(&model_name, model_version)
        .map_err(|e| reject(ErrorCode::UnknownModel, model_version, e.to_string()))?;
    let rows = features.row_count();
    let inputs =
        job::bind(features, model).map_err(|message| reject(ErrorCode::InvalidInput, Some(model.version), message))?;
    Ok(Prepared { job_id, rows, model: Arc::clone(model), inputs, deadline_ms, protocol })
}

/// A delivery with the outcome of its decoding, on its way to [`Consumer::dispatch`].
struct Decoded {
    lane: Lane,
    budget: Arc<RowBudget>,
    received_at: Instant,
    data: Vec<u8>,
    properties: BasicProperties,
    reply: Reply,
    outcome: Result<Prepared, JobError>,
}

/// A job that passed every check that does not need the engine.
struct Prepared {
    job_id: String,
    rows: usize,
    model: Arc<ModelVersion>,
    inputs: Vec<f32>,
    deadline_ms: Option<u64>,
    protocol: job::Protocol,
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

/// One lane's subscription and row budget.
struct Feed {
    lane: Lane,
    queue: String,
    /// None when the lane is not configured, or once its cancelled subscription has ended.
    deliveries: Option<lapin::Consumer>,
    budget: Arc<RowBudget>,
    /// A large body of this lane is being decoded: the lane takes no other delivery meanwhile,
    /// so decoded rows stay within the budget.
    decoding: bool,
}

impl Feed {
    /// Subscribes with a prefetch of its own: `basic.qos` applies to the consumers started after it.
    async fn subscribe(
        channel: &Channel,
        lane: Lane,
        queue: &str,
        prefetch: u16,
        budget: Arc<RowBudget>,
    ) -> Result<Self, AmqpError> {
        let queue_error = |source| AmqpError::Queue { queue: queue.to_string(), source };
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(queue_error)?;
        let deliveries = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(queue_error)?;
        tracing::info!(queue, lane = lane.as_str(), prefetch, "consuming jobs");
        Ok(Self { lane, queue: queue.to_string(), deliveries: Some(deliveries), budget, decoding: false })
    }

    fn absent(lane: Lane) -> Self {
        Self { lane, queue: String::new(), deliveries: None, budget: RowBudget::new(usize::MAX), decoding: false }
    }

    fn is_open(&self) -> bool {
        self.deliveries.is_some()
    }

    fn can_take(&self) -> bool {
        self.is_open() && !self.budget.is_spent() && !self.decoding
    }

    async fn next(&mut self) -> Option<Result<Delivery, lapin::Error>> {
        match &mut self.deliveries {
            Some(deliveries) => deliveries.next().await,
            None => std::future::pending().await,
        }
    }

    async fn cancel(&self, channel: &Channel) -> Result<(), AmqpError> {
        if let Some(deliveries) = &self.deliveries {
            tracing::info!(queue = %self.queue, "cancelling the subscription");
            channel.basic_cancel(deliveries.tag(), BasicCancelOptions::default()).await?;
        }
        Ok(())
    }
}

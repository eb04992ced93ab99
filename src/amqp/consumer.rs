//! The job consumer: takes deliveries from the online and bulk lanes' queues, decodes and
//! validates them, has [`crate::authz`] judge who sent them and where their results may go, and
//! routes each job to its model version's batcher, or answers it at once with an error result.
//! Which lane may take the next delivery is the [`LanePolicy`]'s call. It follows the served
//! repository snapshot, so a job is always resolved against the versions that have batchers. An
//! encrypted job is decrypted here, before decoding, with the worker's [`Keyring`]; its key
//! travels with the job so that the publisher encrypts its result. Each delivery travels on as an
//! opaque [`flow::Delivery`] holding its [`Inbound`] handle (the body as it arrived, ciphertext
//! for an encrypted job), which only the publisher opens.

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

use super::{AmqpError, Inbound};
use crate::audit;
use crate::authz::{Policy, PublisherLabels};
use crate::batcher::Batchers;
use crate::encode::encode_error;
use crate::engine::{ModelVersion, Repository};
use crate::explain;
use crate::flow::{self, epoch_ms, Completion, Job, JobMeta, Lane, Origin, Outgoing, Protocol, Rejected, Rejection};
use crate::job::{self, Envelope, JobRequest};
use crate::lanes::LanePolicy;
use crate::payload::{Keyring, Opened, PayloadKey};
use crate::settings::{LimitSettings, Settings};
use crate::telemetry;

/// Header carrying a job's deadline in epoch milliseconds.
pub const DEADLINE_HEADER: &str = "x-deadline";

/// Bodies from this size up are decoded on a blocking thread: a large job must not hold up the
/// small ones behind it, nor the async threads that publish results.
const DECODE_APART_BYTES: usize = 64 * 1024;

pub struct Consumer {
    settings: Settings,
    keyring: Keyring,
    snapshots: watch::Receiver<Arc<Repository>>,
    repository: Arc<Repository>,
    batchers: Batchers,
    publish: mpsc::Sender<Outgoing>,
    lanes: LanePolicy,
    /// The `security` settings, shared with the threads that decode large bodies.
    policy: Arc<Policy>,
    /// The `publisher` label of each job, from the settings and the served models.
    labels: PublisherLabels,
    /// Large bodies being decoded, at most one per lane.
    decoding: JoinSet<Decoded>,
    next_seq: u64,
}

impl Consumer {
    pub fn new(
        settings: Settings,
        keyring: Keyring,
        mut snapshots: watch::Receiver<Arc<Repository>>,
        batchers: Batchers,
        publish: mpsc::Sender<Outgoing>,
    ) -> Self {
        let repository = Arc::clone(&snapshots.borrow_and_update());
        let lanes =
            LanePolicy::new(settings.limits.max_inflight_rows, Duration::from_millis(settings.amqp.bulk_yield_ms));
        let policy = Arc::new(Policy::new(&settings.security));
        let labels = publisher_labels(&policy, &repository);
        Self {
            settings,
            keyring,
            snapshots,
            repository,
            batchers,
            publish,
            lanes,
            policy,
            labels,
            decoding: JoinSet::new(),
            next_seq: 0,
        }
    }

    /// Consumes until `shutdown` fires or the channel fails. On shutdown the subscriptions are
    /// cancelled and the deliveries already handed to this worker are still processed, so none
    /// of them needs redelivery; then the batchers close and drain behind it.
    pub async fn run(mut self, channel: Channel, shutdown: CancellationToken) -> Result<(), AmqpError> {
        let amqp = &self.settings.amqp;
        let mut online = Feed::subscribe(&channel, Lane::Online, &amqp.jobs_queue, amqp.prefetch).await?;
        let mut bulk = match amqp.bulk_queue.as_str() {
            "" => Feed::absent(Lane::Bulk),
            queue => Feed::subscribe(&channel, Lane::Bulk, queue, amqp.bulk_prefetch).await?,
        };
        let mut cancelled = false;
        let mut following = true;
        while online.is_open() || bulk.is_open() || !self.decoding.is_empty() {
            let (online_decoding, bulk_decoding) = (online.decoding, bulk.decoding);
            // Before the branches below decide which lanes to take from: a row budget that comes
            // free after this look still wakes `reopened`.
            let held = self.lanes.held_back(bulk_decoding);
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !cancelled => {
                    tracing::info!("stopping consumption; finishing jobs already received");
                    online.cancel(&channel).await?;
                    bulk.cancel(&channel).await?;
                    cancelled = true;
                }
                changed = self.snapshots.changed(), if following => match changed {
                    Ok(()) => {
                        self.repository = Arc::clone(&self.snapshots.borrow_and_update());
                        self.batchers.sync(&self.repository);
                        self.labels = publisher_labels(&self.policy, &self.repository);
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
                delivery = online.next(), if online.is_open() && self.lanes.admits(Lane::Online, online_decoding) => {
                    self.lanes.saw_online();
                    if !self.take(&mut online, delivery, cancelled).await? {
                        break;
                    }
                }
                delivery = bulk.next(), if bulk.is_open() && self.lanes.admits(Lane::Bulk, bulk_decoding) => {
                    if !self.take(&mut bulk, delivery, cancelled).await? {
                        break;
                    }
                }
                () = self.lanes.reopened(held) => {}
            }
        }
        Ok(())
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

    /// Decrypts and decodes one delivery, here or (a large body) on a blocking thread, and routes
    /// it; false when the pipeline behind has stopped.
    async fn accept(&mut self, delivery: Delivery, feed: &mut Feed) -> bool {
        let received_at = Instant::now();
        let Delivery { data, properties, acker, .. } = delivery;
        let large = data.len() >= DECODE_APART_BYTES;
        let (limits, repository, keyring, policy) =
            (self.settings.limits, Arc::clone(&self.repository), self.keyring.clone(), Arc::clone(&self.policy));
        let origin = origin(&properties);
        // A reply queue the publisher may not name receives nothing: the job is answered
        // `forbidden`, in the results queue.
        let reply_to = match &origin.reply_to {
            Some(queue) if policy.may_reply_to(&origin) => ShortString::from(queue.as_str()),
            _ => ShortString::from(self.settings.amqp.results_queue.as_str()),
        };
        let lane = feed.lane;
        // With the trail on, whether records keep the rows besides their digest.
        let audit = &self.settings.audit;
        let audited = audit.enabled.then_some(audit.include_inputs);
        // Measured at receipt: a large body's decoding is the worker's time, not the queue's.
        let queued_for = queue_wait(&properties);
        let decode = move || {
            let (key, outcome) = match open(&keyring, &data, &properties, &origin) {
                Ok(opened) => {
                    let outcome =
                        prepare(opened.body(), &properties, &origin, received_at, &limits, &policy, &repository)
                            .map(|prepared| prepared.audited(audited));
                    (opened.key().cloned(), outcome)
                }
                Err(rejected) => (None, Err(rejected)),
            };
            let correlation_id = properties.correlation_id().clone();
            let inbound = Inbound { acker, reply_to, correlation_id, properties, body: data };
            Decoded { lane, received_at, queued_for, delivery: flow::Delivery::new(inbound), key, outcome }
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
        let Decoded { lane, received_at, queued_for, delivery, key, outcome } = decoded;
        match outcome {
            Ok(Prepared { job_id, rows, model, inputs, deadline_ms, protocol, publisher, explain, audit }) => {
                let label = self.labels.label(publisher.as_deref());
                telemetry::record_job_received(&model.name, lane.as_str(), label, queued_for);
                telemetry::record_inflight(1.0, rows as f64);
                self.next_seq += 1;
                let meta = JobMeta {
                    seq: self.next_seq,
                    job_id,
                    rows,
                    model,
                    lane,
                    received_at,
                    queued_for: queued_for.unwrap_or_default(),
                    deadline_ms,
                    protocol,
                    publisher,
                    delivery,
                    charge: self.lanes.budget(lane).charge(rows),
                    explain,
                    key,
                    audit,
                };
                let job = Job { meta: Arc::new(meta), inputs };
                let model = Arc::clone(&job.meta.model);
                tracing::debug!(job_id = %job.meta.job_id, model = %model.name, version = model.version, rows,
                    lane = lane.as_str(), "job accepted");
                self.batchers.route(&model).send(job).await.is_ok()
            }
            Err(error) => {
                let (job_id, model) = (error.job_id.as_deref().unwrap_or("-"), error.model.as_deref().unwrap_or("-"));
                let (code, publisher) = (error.reason.code().as_str(), error.publisher.as_deref().unwrap_or("-"));
                // The message can quote the job's values (`rows[0][3] = 1e39 is outside the float32
                // range`): the error result gives it to the publisher who sent them; the log says
                // what is wrong and where, and the full message only at trace level.
                tracing::warn!(job_id, model, code, publisher, problem = %error.reason.without_values(), "job rejected");
                tracing::trace!(job_id, model, code, publisher, error = %error.reason, "job rejected: the full message");
                let model = match error.model.as_deref() {
                    Some(name) if self.repository.names().contains(&name) => name,
                    _ => telemetry::UNKNOWN_MODEL_LABEL,
                };
                let label = self.labels.label(error.publisher.as_deref());
                telemetry::record_job_received(model, lane.as_str(), label, queued_for);
                telemetry::record_job_error(error.reason.code().as_str());
                telemetry::record_inflight(1.0, 0.0);
                let since = Completion::published_at(received_at, queued_for.unwrap_or_default());
                let audit = self.settings.audit.enabled.then(|| audit::refused(&error, received_at));
                let outgoing = Outgoing {
                    delivery,
                    job_id: error.job_id.clone(),
                    body: encode_error(&error),
                    completion: Completion { model: model.to_string(), lane, status: "error", rows: 0, since },
                    dead_letter: Some(error.reason),
                    key,
                    audit,
                };
                self.publish.send(outgoing).await.is_ok()
            }
        }
    }
}

/// How long the message waited in the broker, from its AMQP `timestamp` (whole seconds).
fn queue_wait(properties: &BasicProperties) -> Option<Duration> {
    properties.timestamp().map(|seconds| Duration::from_millis(epoch_ms().saturating_sub(seconds.saturating_mul(1000))))
}

/// Opens the job's body with `keyring`: its plaintext, when it came encrypted, with the key that
/// must encrypt its result. A body that cannot be opened is `forbidden`, answered in plaintext:
/// the publisher is told the key id it named and nothing more, the log says which check failed.
fn open<'a>(
    keyring: &Keyring,
    body: &'a [u8],
    properties: &BasicProperties,
    origin: &Origin,
) -> Result<Opened<'a>, Rejected> {
    keyring.open(super::sealing(properties), body).map_err(|refusal| {
        let job_id = properties.message_id().as_ref().map(ShortString::as_str);
        tracing::warn!(job_id, key_id = refusal.key_id(), cause = refusal.cause(), "job refused before decoding");
        let model = super::model_header(properties);
        Rejected {
            job_id: job_id.filter(|id| !id.is_empty()).map(str::to_string),
            model: model.map(str::to_string),
            model_version: None,
            protocol: if model.is_some() { Protocol::OpenInference } else { Protocol::Native },
            publisher: origin.publisher.clone(),
            reason: Rejection::Forbidden(refusal.to_string()),
        }
    })
}

/// Who sent the message (its `user_id`, which the broker checked) and where it asks its result to
/// go (`reply_to`); empty values count as absent.
fn origin(properties: &BasicProperties) -> Origin {
    fn text(value: &Option<ShortString>) -> Option<&str> {
        value.as_ref().map(ShortString::as_str).filter(|v| !v.is_empty())
    }
    Origin {
        publisher: text(properties.user_id()).map(Arc::from),
        reply_to: text(properties.reply_to()).map(str::to_string),
    }
}

/// The `publisher` labels of the settings' and the served models' publishers.
fn publisher_labels(policy: &Policy, repository: &Repository) -> PublisherLabels {
    PublisherLabels::new(policy, repository.versions().map(|version| version.allowed_publishers.as_deref()))
}

/// Decodes, validates, authorizes and binds a job to the version of `repository` that scores it.
/// Pure.
fn prepare(
    body: &[u8],
    properties: &BasicProperties,
    origin: &Origin,
    received_at: Instant,
    limits: &LimitSettings,
    policy: &Policy,
    repository: &Repository,
) -> Result<Prepared, Rejected> {
    let envelope = Envelope {
        body,
        message_id: properties.message_id().as_ref().map(ShortString::as_str),
        content_type: properties.content_type().as_ref().map(ShortString::as_str),
        model_header: super::model_header(properties),
    };
    let publisher = || origin.publisher.clone();
    // A job the message alone rules out (no identity where one is required, a reply queue its
    // publisher may not name) is `forbidden` whatever its body holds; the body is still read for
    // the id, model and form its answer names.
    let JobRequest { job_id, model: model_name, model_version, features, protocol, explain } =
        match (policy.admit(origin), job::decode(envelope, limits)) {
            (Ok(()), Ok(request)) => request,
            (Ok(()), Err(error)) => return Err(Rejected { publisher: publisher(), ..error }),
            (Err(reason), Ok(request)) => {
                return Err(Rejected {
                    job_id: Some(request.job_id),
                    model: Some(request.model),
                    model_version: request.model_version,
                    protocol: request.protocol,
                    publisher: publisher(),
                    reason,
                })
            }
            (Err(reason), Err(error)) => return Err(Rejected { publisher: publisher(), reason, ..error }),
        };
    let rejected = |model_version, reason| Rejected {
        job_id: Some(job_id.clone()),
        model: Some(model_name.clone()),
        model_version,
        protocol,
        publisher: publisher(),
        reason,
    };
    let visible =
        |model: &ModelVersion| policy.permit(origin, &model.name, model.allowed_publishers.as_deref()).is_ok();
    let model = repository
        .resolve_visible(&model_name, model_version, visible)
        .map_err(|e| rejected(model_version, Rejection::UnknownModel(e.to_string())))?;
    // Before anything else of the job is checked: a publisher the model does not allow learns
    // nothing of its inputs.
    policy
        .permit(origin, &model.name, model.allowed_publishers.as_deref())
        .map_err(|reason| rejected(model_version, reason))?;
    let deadline_ms = deadline(properties, received_at).map_err(|reason| rejected(model_version, reason))?;
    let rows = features.row_count();
    let mut inputs = job::bind(features, model).map_err(|reason| rejected(Some(model.version), reason))?;
    let explain = job::explain(explain, model, &mut inputs, rows, limits.max_rows_per_job)
        .map_err(|reason| rejected(Some(model.version), reason))?;
    // Explaining by sampling scores more rows than the job sent.
    let rows = inputs.len() / model.signature.n_features.max(1);
    Ok(Prepared {
        job_id,
        rows,
        model: Arc::clone(model),
        inputs,
        deadline_ms,
        protocol,
        publisher: publisher(),
        explain,
        audit: None,
    })
}

/// A delivery with the outcome of its decoding, on its way to [`Consumer::dispatch`].
struct Decoded {
    lane: Lane,
    received_at: Instant,
    queued_for: Option<Duration>,
    delivery: flow::Delivery,
    /// The key the job came encrypted with, also when it failed after decryption.
    key: Option<PayloadKey>,
    outcome: Result<Prepared, Rejected>,
}

/// A job that passed every check that does not need the engine.
struct Prepared {
    job_id: String,
    rows: usize,
    model: Arc<ModelVersion>,
    inputs: Vec<f32>,
    deadline_ms: Option<u64>,
    protocol: Protocol,
    publisher: Option<Arc<str>>,
    explain: Option<explain::Request>,
    /// Set by [`Prepared::audited`] when the audit trail is on.
    audit: Option<Arc<flow::AuditedInputs>>,
}

impl Prepared {
    /// With the trail on (`Some(keep)`), the job with the digest of the rows it sent as they are
    /// scored, and the rows themselves when `keep`: rows a sampling explanation adds are not the
    /// job's.
    fn audited(mut self, keep: Option<bool>) -> Self {
        if let Some(keep) = keep {
            let features = self.model.signature.n_features;
            let sent = self.explain.as_ref().map_or(self.rows, |request| request.rows);
            let values = &self.inputs[..(sent * features).min(self.inputs.len())];
            self.audit = Some(Arc::new(audit::inputs(values, features, keep)));
        }
        self
    }
}

/// The job's deadline in epoch milliseconds: header `x-deadline`, else the AMQP `expiration`
/// counted from the message's `timestamp` (or from its receipt when it has none).
fn deadline(properties: &BasicProperties, received_at: Instant) -> Result<Option<u64>, Rejection> {
    let received_ms = flow::epoch_ms_at(received_at);
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
            Rejection::InvalidInput(format!(
                "header {DEADLINE_HEADER} must be epoch milliseconds as an integer, got {value:?}"
            ))
        });
    }
    let Some(expiration) = properties.expiration().as_ref().and_then(|e| e.as_str().parse::<u64>().ok()) else {
        return Ok(None);
    };
    let published_ms = properties.timestamp().map(|seconds| seconds * 1000).unwrap_or(received_ms);
    Ok(Some(published_ms + expiration))
}

/// One lane's subscription.
struct Feed {
    lane: Lane,
    queue: String,
    /// None when the lane is not configured, or once its cancelled subscription has ended.
    deliveries: Option<lapin::Consumer>,
    /// A large body of this lane is being decoded (see [`LanePolicy::admits`]).
    decoding: bool,
}

impl Feed {
    /// Subscribes with a prefetch of its own: `basic.qos` applies to the consumers started after it.
    async fn subscribe(channel: &Channel, lane: Lane, queue: &str, prefetch: u16) -> Result<Self, AmqpError> {
        let queue_error = |source| super::queue_error(queue.to_string(), false, source);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(queue_error)?;
        let deliveries = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(queue_error)?;
        tracing::info!(queue, lane = lane.as_str(), prefetch, "consuming jobs");
        Ok(Self { lane, queue: queue.to_string(), deliveries: Some(deliveries), decoding: false })
    }

    fn absent(lane: Lane) -> Self {
        Self { lane, queue: String::new(), deliveries: None, decoding: false }
    }

    fn is_open(&self) -> bool {
        self.deliveries.is_some()
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

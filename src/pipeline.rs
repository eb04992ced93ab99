//! Wires the stages together — consume → decode/validate → batch → infer → encode → publish →
//! ack — and keeps the worker connected: a lost connection tears the stages down and they are
//! rebuilt on a new one, with backoff. Nothing else knows all the stages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, consumer::Consumer, AmqpError, Reply};
use crate::batcher::Segment;
use crate::budget::Charge;
use crate::engine::{Column, InferenceError, ModelVersion, Repository};
use crate::job::{ErrorCode, Protocol};
use crate::result;
use crate::settings::Settings;
use crate::telemetry::{self, Health};

/// A validated job on its way to its batcher.
#[derive(Debug)]
pub struct Job {
    pub meta: Arc<JobMeta>,
    /// `meta.rows × n_features` values, row-major.
    pub inputs: Vec<f32>,
}

/// What every stage after decoding needs to know about a job.
#[derive(Debug)]
pub struct JobMeta {
    /// Unique per connection; keys the reassembly of split jobs.
    pub seq: u64,
    pub job_id: String,
    pub model: Arc<ModelVersion>,
    pub rows: usize,
    pub received_at: Instant,
    /// How long the job waited in the broker (from its AMQP timestamp), for end-to-end latency.
    pub queued_for: Duration,
    /// Epoch milliseconds after which the job is answered `expired` instead of scored.
    pub deadline_ms: Option<u64>,
    /// The wire form the job came in; its result answers in the same form.
    pub protocol: Protocol,
    pub reply: Reply,
    /// The message as it arrived, dead-lettered if the job cannot be scored.
    pub original: Original,
    /// The job's rows in its lane's budget, returned when the job is answered.
    pub charge: Charge,
}

/// Where a job came from: the online lane's rows are batched before the bulk lane's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Online,
    Bulk,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Online => "online",
            Lane::Bulk => "bulk",
        }
    }
}

/// Now in epoch milliseconds, the unit of job deadlines.
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A delivery's body and properties, kept to dead-letter it unchanged.
#[derive(Debug, Clone)]
pub struct Original {
    pub body: Vec<u8>,
    pub properties: lapin::BasicProperties,
    pub lane: Lane,
}

/// Why rows were not scored.
#[derive(Debug, Clone)]
pub struct JobFailure {
    pub code: ErrorCode,
    pub message: String,
}

impl From<InferenceError> for JobFailure {
    fn from(error: InferenceError) -> Self {
        JobFailure { code: ErrorCode::Internal, message: format!("inference failed: {error}") }
    }
}

/// The outcome of one run (or of jobs that expired before one), on its way to the result stage.
pub struct ScoredBatch {
    pub segments: Vec<Segment>,
    pub outcome: Result<Vec<Column>, JobFailure>,
    pub started_at: Instant,
    pub inference_time: Duration,
}

/// An encoded result on its way to the publisher.
#[derive(Debug)]
pub struct Outgoing {
    pub reply: Reply,
    pub job_id: Option<String>,
    /// Rows of the job, for the in-flight gauges.
    pub rows: usize,
    pub body: Vec<u8>,
    /// Set for jobs that cannot be scored: the original goes to the dead-letter exchange.
    pub dead_letter: Option<DeadLetter>,
}

#[derive(Debug)]
pub struct DeadLetter {
    pub original: Original,
    pub failure: JobFailure,
}

/// Pause between the last acknowledgement and closing the channel at shutdown.
const SETTLE_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("a pipeline stage stopped unexpectedly: {0}")]
    Stage(String),
}

/// Runs until `shutdown` fires, reconnecting whenever the broker connection is lost. Jobs are
/// scored by the versions of the latest `repository` snapshot.
pub async fn run(
    settings: &Settings,
    repository: watch::Receiver<Arc<Repository>>,
    health: Health,
    shutdown: CancellationToken,
) {
    let max_backoff = Duration::from_millis(settings.amqp.reconnect_max_backoff_ms.max(100));
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let outcome = serve(settings, repository.clone(), &health, &shutdown).await;
        health.set_broker_connected(false);
        match outcome {
            Ok(()) if shutdown.is_cancelled() => return,
            Ok(()) => tracing::warn!("broker session ended; reconnecting"),
            Err(error) => tracing::error!(%error, "broker session failed; reconnecting"),
        }
        if started.elapsed() > max_backoff {
            backoff = Duration::from_millis(100);
        }
        let pause = with_jitter(backoff);
        telemetry::record_reconnect();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// One connection's worth of pipeline; returns when shutdown drained it or the broker failed.
async fn serve(
    settings: &Settings,
    repository: watch::Receiver<Arc<Repository>>,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let connection = amqp::connect(&settings.amqp).await?;
    let consume_channel = amqp::consumer_channel(&connection, settings.amqp.prefetch).await?;
    amqp::declare_topology(&consume_channel, &settings.amqp).await?;
    let publish_channel = amqp::confirming_channel(&connection).await?;
    health.set_broker_connected(true);
    telemetry::reset_inflight();
    tracing::info!(url = %amqp::redact(&settings.amqp.url), "connected to RabbitMQ");

    let capacity = usize::from(settings.amqp.prefetch);
    let (publish_tx, publish_rx) = mpsc::channel(capacity);
    let (scored_tx, scored_rx) = mpsc::channel(settings.inference.sessions.max(2));
    // In a JoinSet so that leaving early (a broker failure) stops the stage.
    let mut results = JoinSet::new();
    results.spawn(result::run(scored_rx, publish_tx.clone()));
    let mut publisher = tokio::spawn(amqp::publisher::run(publish_channel, settings.amqp.clone(), publish_rx));

    let consumer = Consumer::new(settings, repository, scored_tx, publish_tx);
    let consumed = tokio::select! {
        consumed = consumer.run(&consume_channel, shutdown) => consumed,
        published = &mut publisher => {
            return Err(match published {
                Ok(Ok(())) => WorkerError::Stage("publisher".into()),
                Ok(Err(error)) => error.into(),
                Err(join) => WorkerError::Stage(join.to_string()),
            });
        }
    };
    let batchers = consumed?;
    // The consumer stopped: batchers flush, runs finish, results publish, jobs ack.
    tracing::debug!("consumer stopped; draining");
    let drain = async {
        batchers.drain().await;
        // Runs in flight hold the last senders to the result stage; it ends after them.
        while results.join_next().await.is_some() {}
        tracing::debug!("batchers and result stage stopped");
        publisher.await
    };
    let timeout = Duration::from_millis(settings.shutdown.timeout_ms);
    match tokio::time::timeout(timeout, drain).await {
        Ok(Ok(published)) => published?,
        Ok(Err(join)) => return Err(WorkerError::Stage(join.to_string())),
        Err(_) => tracing::warn!(
            timeout_ms = settings.shutdown.timeout_ms,
            "in-flight jobs did not finish in time; they stay unacknowledged and will be redelivered"
        ),
    }
    tracing::debug!("publisher stopped; closing the connection");
    // A quorum queue applies acknowledgements asynchronously, and may handle the consumer's
    // channel going away before the last of them: those jobs would be redelivered although
    // answered. A short pause lets the queue settle them first.
    tokio::time::sleep(SETTLE_GRACE).await;
    // The broker answers channel.close only after it has processed every earlier frame on the
    // channel, acknowledgements included: waiting for it makes the acks of drained jobs stick.
    // Closing also returns deliveries not yet processed (after a drain timeout) to the queue.
    let grace = Duration::from_secs(5);
    let _ = tokio::time::timeout(grace, consume_channel.close(200, "worker stopping".into())).await;
    let _ = tokio::time::timeout(grace, connection.close(200, "worker stopping".into())).await;
    Ok(())
}

/// Up to a quarter more or less, so a fleet of workers does not reconnect in lockstep.
fn with_jitter(base: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
    base.mul_f64(factor)
}

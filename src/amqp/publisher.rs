//! The result publisher: publishes each result (and, for a job that cannot be scored, a copy
//! of the job to the dead-letter exchange) with publisher confirms, and acknowledges the job
//! only once the broker has confirmed everything published for it. Every job's publish, confirm
//! and acknowledgement run concurrently with the others', so neither a slow confirm nor the
//! round trip of one frame holds back the jobs behind it.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::mpsc;

use super::AmqpError;
use crate::pipeline::{DeadLetter, Outgoing};
use crate::settings::AmqpSettings;
use crate::telemetry;

/// Times a result is published again after the broker refused it before the job is requeued.
const MAX_PUBLISH_ATTEMPTS: u32 = 3;
/// Headers on a dead-lettered job saying why it was not scored.
pub const ERROR_CODE_HEADER: &str = "x-error-code";
pub const ERROR_MESSAGE_HEADER: &str = "x-error-message";
pub const ORIGINAL_QUEUE_HEADER: &str = "x-original-queue";

/// What the broker said about everything published for one job.
struct Settled {
    result: Confirmation,
    dead_letter: Option<Confirmation>,
    outgoing: Outgoing,
    attempt: u32,
}

/// Publishes until `results` closes and every job is settled. At most one job per unacknowledged
/// delivery is in flight, so the prefetch bounds the jobs in here.
pub async fn run(
    channel: Channel,
    settings: AmqpSettings,
    mut results: mpsc::Receiver<Outgoing>,
) -> Result<(), AmqpError> {
    let fallback = ShortString::from(settings.results_queue.as_str());
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            outgoing = results.recv(), if open => match outgoing {
                Some(outgoing) => in_flight.push(deliver(&channel, &settings, &fallback, outgoing)),
                None => open = false,
            },
            Some(delivered) = in_flight.next() => delivered?,
            else => return Ok(()),
        }
    }
}

/// Publishes one job's result until the broker settles it, then acknowledges (or returns) the job.
async fn deliver(
    channel: &Channel,
    settings: &AmqpSettings,
    fallback: &ShortString,
    mut outgoing: Outgoing,
) -> Result<(), AmqpError> {
    let mut attempt = 1;
    loop {
        let settled = publish(channel, settings, outgoing, attempt).await?.await?;
        match settle(settled, fallback).await? {
            Some((retry, next_attempt)) => (outgoing, attempt) = (retry, next_attempt),
            None => return Ok(()),
        }
    }
}

async fn publish(
    channel: &Channel,
    settings: &AmqpSettings,
    outgoing: Outgoing,
    attempt: u32,
) -> Result<impl Future<Output = Result<Settled, AmqpError>>, AmqpError> {
    let dead_letter = match &outgoing.dead_letter {
        Some(dead_letter) if attempt == 1 => Some(publish_dead_letter(channel, settings, dead_letter).await?),
        _ => None,
    };
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type("scoring.result".into());
    if let Some(correlation_id) = &outgoing.reply.correlation_id {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    // AMQP short strings hold 255 bytes; a longer job id is still in the body.
    if let Some(job_id) = outgoing.job_id.as_ref().filter(|id| id.len() <= 255) {
        properties = properties.with_message_id(job_id.as_str().into());
    }
    // Mandatory: a result for a reply queue that no longer exists comes back instead of vanishing.
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    let started = Instant::now();
    let result = channel
        .basic_publish("".into(), outgoing.reply.routing_key.clone(), options, &outgoing.body, properties)
        .await?;
    let timeout = Duration::from_millis(settings.confirm_timeout_ms);
    Ok(async move {
        let result = confirmed(result, timeout).await?;
        let dead_letter = match dead_letter {
            Some(confirm) => Some(confirmed(confirm, timeout).await?),
            None => None,
        };
        telemetry::record_publish(started.elapsed());
        Ok(Settled { result, dead_letter, outgoing, attempt })
    })
}

/// The job as it arrived, to the dead-letter exchange, with why it was not scored.
async fn publish_dead_letter(
    channel: &Channel,
    settings: &AmqpSettings,
    dead_letter: &DeadLetter,
) -> Result<PublisherConfirm, AmqpError> {
    let mut headers = dead_letter.original.properties.headers().clone().unwrap_or_default();
    headers.insert(ERROR_CODE_HEADER.into(), AMQPValue::LongString(dead_letter.failure.code.as_str().into()));
    headers.insert(ERROR_MESSAGE_HEADER.into(), AMQPValue::LongString(dead_letter.failure.message.as_str().into()));
    headers.insert(
        ORIGINAL_QUEUE_HEADER.into(),
        AMQPValue::LongString(super::lane_queue(settings, dead_letter.original.lane).into()),
    );
    // A fresh set of properties: the original's expiration would let the copy expire in the queue.
    let original = &dead_letter.original.properties;
    let mut properties = BasicProperties::default().with_headers(headers).with_delivery_mode(2);
    if let Some(v) = original.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        properties = properties.with_reply_to(v.clone());
    }
    if let Some(v) = original.timestamp() {
        properties = properties.with_timestamp(*v);
    }
    Ok(channel
        .basic_publish(
            settings.dead_letter_exchange.as_str().into(),
            super::lane_queue(settings, dead_letter.original.lane).into(),
            BasicPublishOptions::default(),
            &dead_letter.original.body,
            properties,
        )
        .await?)
}

async fn confirmed(confirm: PublisherConfirm, timeout: Duration) -> Result<Confirmation, AmqpError> {
    match tokio::time::timeout(timeout, confirm).await {
        Ok(confirmation) => Ok(confirmation?),
        Err(_) => Err(AmqpError::ConfirmTimeout(timeout.as_millis() as u64)),
    }
}

/// What happens to the job behind a settled publish.
enum Verdict {
    Ack,
    /// Back to the queue, for another delivery.
    Requeue,
    /// Out of the queue without an answer (the broker dead-letters it).
    Reject,
    /// Publish the result again (to `routing_key`, possibly changed).
    Retry,
}

/// Acks or requeues the job behind a settled publish; returns a result to publish again.
async fn settle(settled: Settled, fallback: &ShortString) -> Result<Option<(Outgoing, u32)>, AmqpError> {
    let Settled { result, dead_letter, mut outgoing, attempt } = settled;
    let job_id = outgoing.job_id.clone().unwrap_or_default();
    let verdict = match (&result, &dead_letter) {
        (_, Some(Confirmation::Nack(_))) => {
            tracing::error!(job_id, "the broker refused the dead-letter copy; the job returns to the queue");
            Verdict::Requeue
        }
        (Confirmation::Ack(None) | Confirmation::NotRequested, _) => Verdict::Ack,
        (Confirmation::Ack(Some(_)), _) if outgoing.reply.routing_key != *fallback => {
            tracing::warn!(
                job_id,
                reply_to = outgoing.reply.routing_key.as_str(),
                results_queue = fallback.as_str(),
                "reply queue does not exist; sending the result to the results queue"
            );
            outgoing.reply.routing_key = fallback.clone();
            Verdict::Retry
        }
        (Confirmation::Ack(Some(_)), _) => {
            tracing::error!(
                job_id,
                queue = fallback.as_str(),
                "results queue does not exist; the job is rejected (declare the queue or set amqp.declare_queues)"
            );
            Verdict::Reject
        }
        (Confirmation::Nack(_), _) if attempt < MAX_PUBLISH_ATTEMPTS => {
            tracing::warn!(job_id, attempt, "broker refused the result; publishing it again");
            Verdict::Retry
        }
        (Confirmation::Nack(_), _) => {
            tracing::error!(job_id, attempt, "broker refused the result repeatedly; the job returns to the queue");
            Verdict::Requeue
        }
    };
    // Counted once the copy is confirmed, whatever becomes of the result.
    if let (Some(copy), Some(confirmation)) = (&outgoing.dead_letter, &dead_letter) {
        if !matches!(confirmation, Confirmation::Nack(_)) {
            telemetry::record_dead_lettered(copy.failure.code);
        }
    }
    let acker = &outgoing.reply.acker;
    match verdict {
        Verdict::Retry => return Ok(Some((outgoing, attempt + 1))),
        Verdict::Ack => acker.ack(BasicAckOptions::default()).await?,
        Verdict::Requeue => acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?,
        Verdict::Reject => acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await?,
    };
    telemetry::record_inflight(-1.0, -(outgoing.rows as f64));
    Ok(None)
}

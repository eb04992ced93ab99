//! The result publisher: publishes each result (and, for a job that cannot be scored, a copy
//! of the job to the dead-letter exchange; with the audit trail on, its record, through the
//! [`Recorder`], batched per confirm round) with publisher confirms, and acknowledges the job only
//! once the broker has confirmed everything published for it. Every job's publish, confirm and acknowledgement run
//! concurrently with the others', so neither a slow confirm nor the round trip of one frame holds
//! back the jobs behind it. The result of a job that came encrypted is encrypted here, once, with
//! the job's key, and marked with its headers.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::mpsc;

use super::confirm::{confirmed, Confirmed};
use super::recorder::{Recorder, Recording, Trail};
use super::{AmqpError, Inbound};
use crate::flow::{Completion, Lane, Outgoing, Rejection};
use crate::settings::AmqpSettings;
use crate::telemetry;

/// Publishes of one result before the job is returned to the queue, when the broker keeps
/// refusing it.
const MAX_PUBLISH_ATTEMPTS: u32 = 3;
/// Headers on a dead-lettered job saying why it was not scored.
pub const ERROR_CODE_HEADER: &str = "x-error-code";
pub const ERROR_MESSAGE_HEADER: &str = "x-error-message";
pub const ORIGINAL_QUEUE_HEADER: &str = "x-original-queue";

/// One job's result on its way out, with where it goes now.
struct Publication {
    outgoing: Outgoing,
    routing_key: ShortString,
    attempt: u32,
}

/// What the broker said about everything published for one job.
struct Settled {
    result: Confirmation,
    dead_letter: Option<Confirmation>,
    publication: Publication,
}

/// Publishes until `results` closes and every job is settled. At most one job per unacknowledged
/// delivery is in flight, so the prefetch bounds the jobs in here. With `audit` (the trail on),
/// the records go to the stream in the order the results come, one message per confirm round:
/// the records of the results that came while the previous message awaited its confirm. Each job
/// waits for its record's confirm with its result's: a message the stream does not store fails
/// the stage, so its jobs are never acknowledged and the next session starts a new chain.
pub async fn run(
    channel: Channel,
    settings: AmqpSettings,
    audit: Option<Trail>,
    mut results: mpsc::Receiver<Outgoing>,
) -> Result<(), AmqpError> {
    let fallback = ShortString::from(settings.results_queue.as_str());
    let timeout = Duration::from_millis(settings.confirm_timeout_ms);
    let mut recorder = audit.map(|trail| Recorder::new(channel.clone(), &settings, &trail));
    let mut in_flight = FuturesUnordered::new();
    let mut recordings = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            outgoing = results.recv(), if open => match outgoing {
                Some(outgoing) => {
                    let mut next = Some(outgoing);
                    while let Some(outgoing) = next.take() {
                        let recording = recorder.as_mut().map(|recorder| recorder.add(&outgoing)).transpose()?;
                        in_flight.push(deliver(&channel, &settings, &fallback, outgoing, recording));
                        // The results already waiting share this round's message of records.
                        if recorder.as_ref().is_some_and(|recorder| !recorder.is_full()) {
                            next = results.try_recv().ok();
                        }
                    }
                    // One message of records awaits its confirm at a time: the records of results
                    // that come meanwhile go together in the next, unless they fill a message.
                    if let Some(recorder) = recorder.as_mut().filter(|r| recordings.is_empty() || r.is_full()) {
                        recordings.extend(recorder.publish(timeout).await?);
                    }
                }
                None => open = false,
            },
            Some(delivered) = in_flight.next() => delivered?,
            Some(recorded) = recordings.next() => {
                recorded?;
                if let Some(recorder) = recorder.as_mut().filter(|_| recordings.is_empty()) {
                    recordings.extend(recorder.publish(timeout).await?);
                }
            }
            else => return Ok(()),
        }
    }
}

/// The transport's handle of a result's job.
fn inbound(outgoing: &Outgoing) -> Result<&Inbound, AmqpError> {
    outgoing.delivery.open::<Inbound>().ok_or(AmqpError::ForeignDelivery)
}

/// Publishes one job's result until the broker settles it, then acknowledges (or returns) the job;
/// with its `recording`, only once the record is stored too.
async fn deliver(
    channel: &Channel,
    settings: &AmqpSettings,
    fallback: &ShortString,
    mut outgoing: Outgoing,
    recording: Option<Recording>,
) -> Result<(), AmqpError> {
    let routing_key = inbound(&outgoing)?.reply_to.clone();
    // Once, before the first attempt: a retried publish sends the same ciphertext.
    if let Some(key) = &outgoing.key {
        outgoing.body = key.seal(&outgoing.body);
    }
    let publication = Publication { outgoing, routing_key, attempt: 1 };
    let recorded = async move {
        match recording {
            Some(recording) => recording.stored().await,
            None => Ok(()),
        }
    };
    let result = async { publish(channel, settings, publication).await?.await };
    let (mut settled, recorded) = tokio::join!(result, recorded);
    recorded?;
    loop {
        match settle(settled?, fallback).await? {
            Some(again) => settled = publish(channel, settings, again).await?.await,
            None => return Ok(()),
        }
    }
}

async fn publish(
    channel: &Channel,
    settings: &AmqpSettings,
    publication: Publication,
) -> Result<impl Future<Output = Result<Settled, AmqpError>>, AmqpError> {
    let outgoing = &publication.outgoing;
    let job = inbound(outgoing)?;
    let sealed = outgoing.key.is_some();
    let dead_letter = match &outgoing.dead_letter {
        Some(rejection) if publication.attempt == 1 => {
            Some(publish_dead_letter(channel, settings, job, outgoing.completion.lane, rejection, sealed).await?)
        }
        _ => None,
    };
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type("scoring.result".into());
    if let Some(correlation_id) = &job.correlation_id {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    if let Some(key) = &outgoing.key {
        properties = properties.with_headers(super::sealing_headers(key));
        // The job id of an encrypted job is in its encrypted body: the result shows only the
        // message_id the job itself showed.
        if let Some(message_id) = job.properties.message_id() {
            properties = properties.with_message_id(message_id.clone());
        }
    } else if let Some(job_id) = outgoing.job_id.as_ref().filter(|id| id.len() <= 255) {
        // AMQP short strings hold 255 bytes; a longer job id is still in the body.
        properties = properties.with_message_id(job_id.as_str().into());
    }
    // Mandatory: a result for a reply queue that no longer exists comes back instead of vanishing.
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    let started = Instant::now();
    let result =
        channel.basic_publish("".into(), publication.routing_key.clone(), options, &outgoing.body, properties).await?;
    let timeout = Duration::from_millis(settings.confirm_timeout_ms);
    Ok(async move {
        let result = confirmed(result, timeout).await?;
        let dead_letter = match dead_letter {
            Some(confirm) => Some(confirmed(confirm, timeout).await?),
            None => None,
        };
        telemetry::record_publish(started.elapsed());
        Ok(Settled { result, dead_letter, publication })
    })
}

/// The job as it arrived (ciphertext, for a job that came encrypted), to the dead-letter
/// exchange, with why it was not scored. The message of a job that came encrypted (`sealed`) goes
/// without the values it may quote, which must not reach the broker in plaintext.
async fn publish_dead_letter(
    channel: &Channel,
    settings: &AmqpSettings,
    job: &Inbound,
    lane: Lane,
    rejection: &Rejection,
    sealed: bool,
) -> Result<PublisherConfirm, AmqpError> {
    let mut headers = job.properties.headers().clone().unwrap_or_default();
    let message = if sealed { rejection.without_values() } else { rejection.message().to_string() };
    headers.insert(ERROR_CODE_HEADER.into(), AMQPValue::LongString(rejection.code().as_str().into()));
    headers.insert(ERROR_MESSAGE_HEADER.into(), AMQPValue::LongString(message.into()));
    headers.insert(ORIGINAL_QUEUE_HEADER.into(), AMQPValue::LongString(super::lane_queue(settings, lane).into()));
    // A fresh set of properties: the original's expiration would let the copy expire in the queue.
    let original = &job.properties;
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
            super::lane_queue(settings, lane).into(),
            BasicPublishOptions::default(),
            &job.body,
            properties,
        )
        .await?)
}

/// What happens to the job behind a settled publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ack,
    /// Back to the queue, for another delivery.
    Requeue,
    /// Out of the queue without an answer (the broker dead-letters it).
    Reject,
    /// Publish the result again, to the same queue.
    Retry,
    /// Publish the result again, to the results queue: the reply queue does not exist.
    Redirect,
}

/// The verdict on a job from the broker's confirms of its result (sent to the results queue or
/// not) and of its dead-letter copy, at the given publish attempt.
fn verdict(result: Confirmed, dead_letter: Option<Confirmed>, to_results_queue: bool, attempt: u32) -> Verdict {
    match (result, dead_letter) {
        (_, Some(Confirmed::Refused)) => Verdict::Requeue,
        (Confirmed::Stored, _) => Verdict::Ack,
        (Confirmed::Returned, _) if !to_results_queue => Verdict::Redirect,
        (Confirmed::Returned, _) => Verdict::Reject,
        (Confirmed::Refused, _) if attempt < MAX_PUBLISH_ATTEMPTS => Verdict::Retry,
        (Confirmed::Refused, _) => Verdict::Requeue,
    }
}

/// Acks or returns the job behind a settled publish; returns the result to publish again.
async fn settle(settled: Settled, fallback: &ShortString) -> Result<Option<Publication>, AmqpError> {
    let Settled { result, dead_letter, mut publication } = settled;
    let to_results_queue = publication.routing_key == *fallback;
    let dead_letter = dead_letter.as_ref().map(Confirmed::from);
    let verdict = verdict(Confirmed::from(&result), dead_letter, to_results_queue, publication.attempt);
    let outgoing = &publication.outgoing;
    let (job_id, attempt) = (outgoing.job_id.as_deref().unwrap_or_default(), publication.attempt);
    let dead_letter_refused = dead_letter == Some(Confirmed::Refused);
    match verdict {
        Verdict::Requeue if dead_letter_refused => {
            tracing::error!(job_id, "the broker refused the dead-letter copy; the job returns to the queue")
        }
        Verdict::Requeue => {
            tracing::error!(job_id, attempt, "broker refused the result repeatedly; the job returns to the queue")
        }
        Verdict::Redirect => tracing::warn!(
            job_id,
            reply_to = publication.routing_key.as_str(),
            results_queue = fallback.as_str(),
            "reply queue does not exist; sending the result to the results queue"
        ),
        Verdict::Reject => tracing::error!(
            job_id,
            queue = fallback.as_str(),
            "results queue does not exist; the job is rejected (declare the queue or set amqp.declare_queues)"
        ),
        Verdict::Retry => tracing::warn!(job_id, attempt, "broker refused the result; publishing it again"),
        Verdict::Ack => {}
    }
    // Counted once the copy is confirmed, whatever becomes of the result.
    if let (Some(rejection), Some(_)) = (&outgoing.dead_letter, &dead_letter) {
        if !dead_letter_refused {
            telemetry::record_dead_lettered(rejection.code().as_str());
        }
    }
    let acker = &inbound(outgoing)?.acker;
    match verdict {
        Verdict::Retry | Verdict::Redirect => {
            if verdict == Verdict::Redirect {
                publication.routing_key = fallback.clone();
            }
            publication.attempt += 1;
            return Ok(Some(publication));
        }
        Verdict::Ack => {
            acker.ack(BasicAckOptions::default()).await?;
            record_completed(&outgoing.completion);
        }
        Verdict::Requeue => {
            acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
        }
        Verdict::Reject => {
            acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await?;
        }
    }
    telemetry::record_inflight(-1.0, -(outgoing.completion.rows as f64));
    Ok(None)
}

/// The job is answered and acknowledged: it counts as completed.
fn record_completed(job: &Completion) {
    telemetry::record_job_done(&job.model, job.lane.as_str(), job.status, job.rows, job.since.elapsed());
}

#[cfg(test)]
mod tests {
    use super::super::confirm::Confirmed::{Refused, Returned, Stored};
    use super::*;

    #[test]
    fn a_confirmed_result_acknowledges_the_job() {
        assert_eq!(verdict(Stored, None, false, 1), Verdict::Ack);
        assert_eq!(verdict(Stored, Some(Stored), true, 1), Verdict::Ack);
    }

    #[test]
    fn a_refused_dead_letter_copy_returns_the_job_whatever_the_result() {
        assert_eq!(verdict(Stored, Some(Refused), false, 1), Verdict::Requeue);
        assert_eq!(verdict(Refused, Some(Refused), false, 1), Verdict::Requeue);
    }

    #[test]
    fn a_missing_reply_queue_redirects_to_the_results_queue_once() {
        assert_eq!(verdict(Returned, None, false, 1), Verdict::Redirect);
        // The results queue itself is missing: nothing to send the result to.
        assert_eq!(verdict(Returned, None, true, 2), Verdict::Reject);
    }

    #[test]
    fn a_refused_result_is_retried_then_returned_to_the_queue() {
        for attempt in 1..MAX_PUBLISH_ATTEMPTS {
            assert_eq!(verdict(Refused, None, false, attempt), Verdict::Retry, "attempt {attempt}");
        }
        assert_eq!(verdict(Refused, None, false, MAX_PUBLISH_ATTEMPTS), Verdict::Requeue);
    }
}

//! The result publisher: publishes each result with publisher confirms and acknowledges the
//! job only once the broker has confirmed its result. Confirms are awaited concurrently so
//! one slow confirm does not hold back the others.

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::ShortString;
use lapin::Confirmation;
use lapin::{BasicProperties, Channel};
use tokio::sync::mpsc;

use super::AmqpError;
use crate::pipeline::Outgoing;

/// Times a result is published again after the broker refused it before the job is requeued.
const MAX_PUBLISH_ATTEMPTS: u32 = 3;

/// Publishes until `results` closes and every confirm is settled.
pub async fn run(
    channel: Channel,
    fallback_queue: String,
    mut results: mpsc::Receiver<Outgoing>,
) -> Result<(), AmqpError> {
    let fallback = ShortString::from(fallback_queue);
    let mut confirms = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            outgoing = results.recv(), if open => match outgoing {
                Some(outgoing) => confirms.push(publish(&channel, outgoing, 1).await?),
                None => open = false,
            },
            Some((confirmation, outgoing, attempt)) = confirms.next() => {
                if let Some(retry) = settle(confirmation?, outgoing, attempt, &fallback).await? {
                    confirms.push(publish(&channel, retry, attempt + 1).await?);
                }
            }
            else => return Ok(()),
        }
    }
}

async fn publish(
    channel: &Channel,
    outgoing: Outgoing,
    attempt: u32,
) -> Result<impl std::future::Future<Output = (lapin::Result<Confirmation>, Outgoing, u32)>, AmqpError> {
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
    let confirm = channel
        .basic_publish("".into(), outgoing.reply.routing_key.clone(), options, &outgoing.body, properties)
        .await?;
    Ok(async move { (confirm.await, outgoing, attempt) })
}

/// Acks or requeues the job behind a settled confirm; returns a result to publish again.
async fn settle(
    confirmation: Confirmation,
    mut outgoing: Outgoing,
    attempt: u32,
    fallback: &ShortString,
) -> Result<Option<Outgoing>, AmqpError> {
    let job_id = outgoing.job_id.clone().unwrap_or_default();
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => {
            outgoing.reply.acker.ack(BasicAckOptions::default()).await?;
            Ok(None)
        }
        Confirmation::Ack(Some(_)) if outgoing.reply.routing_key != *fallback => {
            tracing::warn!(
                job_id,
                reply_to = outgoing.reply.routing_key.as_str(),
                results_queue = fallback.as_str(),
                "reply queue does not exist; sending the result to the results queue"
            );
            outgoing.reply.routing_key = fallback.clone();
            Ok(Some(outgoing))
        }
        Confirmation::Ack(Some(_)) => {
            tracing::error!(
                job_id,
                queue = fallback.as_str(),
                "results queue does not exist; the job is rejected (declare the queue or set amqp.declare_queues)"
            );
            outgoing.reply.acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await?;
            Ok(None)
        }
        Confirmation::Nack(_) if attempt < MAX_PUBLISH_ATTEMPTS => {
            tracing::warn!(job_id, attempt, "broker refused the result; publishing it again");
            Ok(Some(outgoing))
        }
        Confirmation::Nack(_) => {
            tracing::error!(job_id, attempt, "broker refused the result repeatedly; the job returns to the queue");
            outgoing.reply.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
            Ok(None)
        }
    }
}

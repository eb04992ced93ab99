//! A client's side of the job queue, for `batchscore submit`: publishes jobs with confirms on a
//! private, exclusive reply queue and hands back the results as they arrive, with their
//! encryption headers (the jobs' encryption is [`crate::payload`]'s, done by the caller).

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::AmqpError;
use crate::flow::epoch_ms;
use crate::payload::{PayloadKey, Sealing};
use crate::settings::AmqpSettings;

/// Longest `close` waits for the broker to acknowledge it.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);

/// A connection with a reply queue of its own; the queue goes when the client does.
pub struct JobClient {
    connection: Connection,
    channel: Channel,
    reply_queue: ShortString,
    replies: lapin::Consumer,
    jobs_queue: String,
}

impl JobClient {
    pub async fn connect(settings: &AmqpSettings) -> Result<Self, AmqpError> {
        let connection = super::connect(settings).await?;
        let channel = super::confirming_channel(&connection).await?;
        let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let reply_queue = channel.queue_declare("".into(), exclusive, FieldTable::default()).await?.name().clone();
        let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let replies = channel.basic_consume(reply_queue.clone(), "".into(), no_ack, FieldTable::default()).await?;
        Ok(Self { connection, channel, reply_queue, replies, jobs_queue: settings.jobs_queue.clone() })
    }

    /// Publishes every `(job_id, body)` to the jobs queue and waits until the broker confirmed
    /// them all; false when it refused any. `sealed_with`: the bodies are encrypted with that key,
    /// which the jobs' headers then name.
    pub async fn publish_all(
        &self,
        jobs: impl Iterator<Item = (String, Vec<u8>)>,
        sealed_with: Option<&PayloadKey>,
    ) -> Result<bool, AmqpError> {
        let mut confirms = Vec::new();
        for (job_id, body) in jobs {
            let mut properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(job_id.as_str().into())
                .with_correlation_id(job_id.as_str().into())
                .with_reply_to(self.reply_queue.clone())
                .with_timestamp(epoch_ms() / 1000);
            if let Some(key) = sealed_with {
                properties = properties.with_headers(super::sealing_headers(key));
            }
            let queue = self.jobs_queue.as_str().into();
            let publish = BasicPublishOptions::default();
            confirms.push(self.channel.basic_publish("".into(), queue, publish, &body, properties).await?);
        }
        let mut all_stored = true;
        for confirm in confirms {
            all_stored &= confirm.await?.is_ack();
        }
        Ok(all_stored)
    }

    /// The next result; `None` when the reply queue was closed.
    pub async fn next_result(&mut self) -> Result<Option<Reply>, AmqpError> {
        let Some(delivery) = self.replies.next().await else { return Ok(None) };
        let delivery = delivery?;
        let sealing = super::sealing(&delivery.properties);
        Ok(Some(Reply::new(delivery.data, sealing)))
    }

    /// The broker has blocked this connection's publishing: it raised a memory or disk alarm.
    pub fn blocked(&self) -> bool {
        self.connection.status().blocked()
    }

    /// Closes the connection; the reply queue goes with it. A blocked connection cannot send
    /// its close, so the wait is bounded and the socket simply dropped after it.
    pub async fn close(self) {
        let closing = self.connection.close(200, "submit done".into());
        let _ = tokio::time::timeout(CLOSE_PATIENCE, closing).await;
    }
}

/// A result as it arrived: its body, and its encryption headers.
#[derive(Debug)]
pub struct Reply {
    pub body: Vec<u8>,
    /// The result has an `x-encryption` header.
    marked: bool,
    scheme: Option<String>,
    key_id: Option<String>,
}

impl Reply {
    /// A result with `body` and, when it has them, these encryption headers.
    pub fn new(body: Vec<u8>, sealing: Option<Sealing<'_>>) -> Self {
        let marked = sealing.is_some();
        let (scheme, key_id) =
            sealing.map_or((None, None), |s| (s.scheme.map(String::from), s.key_id.map(String::from)));
        Self { body, marked, scheme, key_id }
    }

    /// The result's encryption headers, when it has them.
    pub fn sealing(&self) -> Option<Sealing<'_>> {
        self.marked.then_some(Sealing { scheme: self.scheme.as_deref(), key_id: self.key_id.as_deref() })
    }
}

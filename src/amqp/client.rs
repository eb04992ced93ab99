//! A client's side of the job queue, for `batchscore submit`: publishes jobs with confirms (to the
//! jobs queue directly, or through an exchange) and hands back the results as they arrive on a
//! private, exclusive reply queue or on a named one the client may only read, with their
//! encryption headers (the jobs' encryption is [`crate::payload`]'s, done by the caller).

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use super::AmqpError;
use crate::flow::epoch_ms;
use crate::payload::{PayloadKey, Sealing};
use crate::settings::AmqpSettings;

/// Longest `close` waits for the broker to acknowledge it.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);

/// Where a client publishes, who it says it is, and where its results come back.
#[derive(Debug, Clone, Default)]
pub struct Addressing {
    /// The exchange jobs are published to, routed by the jobs queue's name; `None`: the default
    /// exchange, straight to the queue.
    pub exchange: Option<String>,
    /// An existing queue to read results from, instead of a private one the client declares
    /// (which needs the right to configure queues).
    pub reply_queue: Option<String>,
    /// The jobs' `user_id` property: the broker refuses it unless it is the user logged in.
    pub user_id: Option<String>,
}

/// Whether all jobs reached the jobs queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Every job is stored in a queue.
    Stored,
    /// The broker refused to store a job (a negative confirm).
    Refused,
    /// A job reached no queue: the exchange has no binding for the routing key.
    Unroutable,
}

/// A connection with a reply queue: a private one goes when the client does; results of other
/// clients in a named one are left there.
pub struct JobClient {
    connection: Connection,
    channel: Channel,
    reply_queue: ShortString,
    /// Results are acknowledged one by one: the reply queue is a named, shared one.
    acknowledging: bool,
    replies: lapin::Consumer,
    exchange: ShortString,
    routing_key: ShortString,
    user_id: Option<ShortString>,
}

impl JobClient {
    pub async fn connect(settings: &AmqpSettings, addressing: &Addressing) -> Result<Self, AmqpError> {
        let connection = super::connect(settings).await?;
        let channel = super::confirming_channel(&connection).await?;
        let reply_queue = match &addressing.reply_queue {
            Some(name) => ShortString::from(name.as_str()),
            None => {
                let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
                channel.queue_declare("".into(), exclusive, FieldTable::default()).await?.name().clone()
            }
        };
        // A private queue holds only this client's results; a named one may hold others', which
        // stay unacknowledged and go back to the queue when the client closes.
        let acknowledging = addressing.reply_queue.is_some();
        let consume = BasicConsumeOptions { no_ack: !acknowledging, ..Default::default() };
        let replies = channel.basic_consume(reply_queue.clone(), "".into(), consume, FieldTable::default()).await?;
        Ok(Self {
            connection,
            channel,
            reply_queue,
            acknowledging,
            replies,
            exchange: addressing.exchange.as_deref().unwrap_or_default().into(),
            routing_key: settings.jobs_queue.as_str().into(),
            user_id: addressing.user_id.as_deref().map(ShortString::from),
        })
    }

    /// Publishes every `(job_id, body)` to the jobs queue and waits until the broker confirmed
    /// them all. `sealed_with`: the bodies are encrypted with that key, which the jobs' headers
    /// then name. Jobs are published mandatory, so one that reaches no queue comes back.
    pub async fn publish_all(
        &self,
        jobs: impl Iterator<Item = (String, Vec<u8>)>,
        sealed_with: Option<&PayloadKey>,
    ) -> Result<Published, AmqpError> {
        let mut confirms = Vec::new();
        for (job_id, body) in jobs {
            let mut properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(job_id.as_str().into())
                .with_correlation_id(job_id.as_str().into())
                .with_reply_to(self.reply_queue.clone())
                .with_timestamp(epoch_ms() / 1000);
            if let Some(user_id) = &self.user_id {
                properties = properties.with_user_id(user_id.clone());
            }
            if let Some(key) = sealed_with {
                properties = properties.with_headers(super::sealing_headers(key));
            }
            let publish = BasicPublishOptions { mandatory: true, ..Default::default() };
            let (exchange, routing_key) = (self.exchange.clone(), self.routing_key.clone());
            confirms.push(self.channel.basic_publish(exchange, routing_key, publish, &body, properties).await?);
        }
        let mut published = Published::Stored;
        for confirm in confirms {
            match confirm.await? {
                Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => published = Published::Unroutable,
                Confirmation::Nack(None) if published == Published::Stored => published = Published::Refused,
                Confirmation::Ack(None) | Confirmation::Nack(None) | Confirmation::NotRequested => {}
            }
        }
        Ok(published)
    }

    /// Where jobs go: the exchange (empty for the default one) and the routing key.
    pub fn route(&self) -> (&str, &str) {
        (self.exchange.as_str(), self.routing_key.as_str())
    }

    /// The next result; `None` when the reply queue was closed. Call [`JobClient::accept`] for
    /// each result of this client's jobs.
    pub async fn next_result(&mut self) -> Result<Option<Reply>, AmqpError> {
        let Some(delivery) = self.replies.next().await else { return Ok(None) };
        let delivery = delivery?;
        let sealing = super::sealing(&delivery.properties);
        let correlation_id = delivery.properties.correlation_id().as_ref().map(|c| c.to_string());
        let mut reply = Reply::new(delivery.data, sealing);
        reply.correlation_id = correlation_id;
        reply.delivery_tag = delivery.delivery_tag;
        Ok(Some(reply))
    }

    /// Takes `reply` off a named reply queue, once it is this client's and recorded; results left
    /// unaccepted go back to the queue when the client closes.
    pub async fn accept(&self, reply: &Reply) -> Result<(), AmqpError> {
        if self.acknowledging {
            self.channel.basic_ack(reply.delivery_tag, BasicAckOptions::default()).await?;
        }
        Ok(())
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
    /// The result's `correlation_id`: its job's id, when the job had one.
    pub correlation_id: Option<String>,
    delivery_tag: u64,
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
        Self { body, correlation_id: None, delivery_tag: 0, marked, scheme, key_id }
    }

    /// The result's encryption headers, when it has them.
    pub fn sealing(&self) -> Option<Sealing<'_>> {
        self.marked.then_some(Sealing { scheme: self.scheme.as_deref(), key_id: self.key_id.as_deref() })
    }
}

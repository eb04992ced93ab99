//! RabbitMQ, and the only module that names it: the connection (TLS, certificate login and the
//! plaintext rule in [`endpoint`]), queue declarations (the audit stream among them), the job
//! consumer, the confirming publisher and the audit stream's [`recorder`], the job client of
//! `batchscore submit`, and the stream readers of `batchscore audit` ([`stream`]) and of its sink
//! ([`tail`]).

pub mod client;
mod confirm;
pub mod consumer;
pub mod endpoint;
pub mod error;
pub mod publisher;
pub mod recorder;
pub mod stream;
pub mod tail;

use std::time::Duration;

use lapin::options::{BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

pub use self::endpoint::Endpoint;
pub use self::error::AmqpError;
use crate::flow::Lane;
use crate::payload::{self, Sealing};
pub use crate::settings::redact;
use crate::settings::{AmqpSettings, AuditSettings};

/// What the publisher needs of a delivery, carried through the pipeline as an opaque
/// [`crate::flow::Delivery`]: where the result goes, how to acknowledge the job once the result is
/// confirmed, and the message as it arrived, to dead-letter it unchanged.
#[derive(Debug)]
pub struct Inbound {
    pub acker: Acker,
    /// The job's `reply_to`, else the results queue.
    pub reply_to: ShortString,
    pub correlation_id: Option<ShortString>,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

/// The `x-model` header of a message; absent when missing, empty or not a string.
pub fn model_header(properties: &BasicProperties) -> Option<&str> {
    text_header(properties, crate::oip::MODEL_HEADER).filter(|m| !m.is_empty())
}

/// The encryption headers of a message (`x-encryption`, `x-key-id`), present when it has
/// `x-encryption`, whatever its value.
pub fn sealing(properties: &BasicProperties) -> Option<Sealing<'_>> {
    let headers = properties.headers().as_ref()?.inner();
    headers.get(payload::ENCRYPTION_HEADER)?;
    Some(Sealing {
        scheme: text_header(properties, payload::ENCRYPTION_HEADER),
        key_id: text_header(properties, payload::KEY_ID_HEADER),
    })
}

/// Header `name` of a message, when it is a string (short or long, UTF-8).
fn text_header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::ShortString(value) => Some(value.as_str()),
        AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
        _ => None,
    }
}

/// The headers that mark a body sealed with `key`: a message's `headers` table.
pub fn sealing_headers(key: &payload::PayloadKey) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(payload::ENCRYPTION_HEADER.into(), AMQPValue::LongString(payload::SCHEME.into()));
    headers.insert(payload::KEY_ID_HEADER.into(), AMQPValue::LongString(key.id().into()));
    headers
}

/// Opens a connection, TLS and certificate login as the settings say; the URI's password is not
/// echoed in errors. The TLS files are read again for each connection.
pub async fn connect(settings: &AmqpSettings) -> Result<Connection, AmqpError> {
    let endpoint = Endpoint::resolve(settings)?;
    let properties = ConnectionProperties::default().with_connection_name(settings.connection_name.as_str().into());
    let failed = |source| AmqpError::Connect { url: endpoint.shown.clone(), source };
    let runtime = lapin::runtime::default_runtime().map_err(failed)?;
    let connecting =
        Connection::connect_uri_with_config(endpoint.uri.clone(), properties, endpoint.tls.clone(), runtime);
    connecting.await.map_err(|source| match refusal(&source) {
        Some(reason) => refused(&endpoint, reason),
        None => endpoint.tls_failure(&source).unwrap_or_else(|| failed(source)),
    })
}

/// The broker's reason when it refused the login (403 ACCESS_REFUSED) or the vhost (530
/// NOT_ALLOWED).
fn refusal(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 530) => {
            Some(amqp.get_message().to_string())
        }
        _ => None,
    }
}

fn refused(endpoint: &Endpoint, reason: String) -> AmqpError {
    let uri = &endpoint.uri;
    let (host, port, vhost) = (uri.authority.host.clone(), uri.authority.port, uri.vhost.clone());
    if endpoint.certificate_login() {
        return AmqpError::RefusedCertificate { host, port, vhost, reason };
    }
    AmqpError::Refused { user: uri.authority.userinfo.username.clone(), host, port, vhost, reason }
}

/// Longest a channel or connection close waits for the broker's answer.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// One connection to the broker and the pipeline's two channels on it: the consumer's, with its
/// prefetch, and the publisher's, with confirms. The topology is declared when it opens.
pub struct Link {
    connection: Connection,
    consume: Channel,
    publish: Channel,
}

impl Link {
    /// Connects and declares the topology, and the audit stream when the trail is on. When a
    /// step after connecting fails (a queue missing with `declare_queues: false`), the connection
    /// is closed before the error returns: a worker waiting for its queues retries without
    /// leaving the broker a dropped connection each time.
    pub async fn open(settings: &AmqpSettings, audit: &AuditSettings) -> Result<Self, AmqpError> {
        let connection = connect(settings).await?;
        match Self::prepare(&connection, settings, audit).await {
            Ok((consume, publish)) => {
                tracing::info!(url = %redact(&settings.url), "connected to RabbitMQ");
                Ok(Self { connection, consume, publish })
            }
            Err(error) => {
                let _ = tokio::time::timeout(CLOSE_GRACE, connection.close(200, "topology not ready".into())).await;
                Err(error)
            }
        }
    }

    /// The consumer's channel, the topology on it, and the publisher's channel.
    async fn prepare(
        connection: &Connection,
        settings: &AmqpSettings,
        audit: &AuditSettings,
    ) -> Result<(Channel, Channel), AmqpError> {
        let consume = consumer_channel(connection, settings.prefetch).await?;
        declare_topology(&consume, settings).await?;
        if audit.enabled {
            declare_audit_stream(&consume, settings, audit).await?;
        }
        Ok((consume, confirming_channel(connection).await?))
    }

    pub fn consume_channel(&self) -> Channel {
        self.consume.clone()
    }

    pub fn publish_channel(&self) -> Channel {
        self.publish.clone()
    }

    /// Closes the consumer's channel, then the connection, each waiting at most a few seconds.
    pub async fn close(self) {
        // The broker answers channel.close only after it has processed every earlier frame on
        // the channel, acknowledgements included: waiting for it makes the acks of drained jobs
        // stick. Closing also returns deliveries not yet processed (after a failure or a drain
        // timeout) to the queue.
        let _ = tokio::time::timeout(CLOSE_GRACE, self.consume.close(200, "worker stopping".into())).await;
        let _ = tokio::time::timeout(CLOSE_GRACE, self.connection.close(200, "worker stopping".into())).await;
    }
}

/// Declares (or, with `declare_queues: false`, checks) the topology: the jobs queue (quorum, with a
/// delivery limit and at-least-once dead-lettering), the dead-letter exchange and queue, and the
/// results queue. Works on RabbitMQ 3.10 and later.
pub async fn declare_topology(channel: &Channel, settings: &AmqpSettings) -> Result<(), AmqpError> {
    let passive = !settings.declare_queues;
    let durable = QueueDeclareOptions { durable: true, passive, ..Default::default() };
    let quorum = |extra: &[(&str, AMQPValue)]| {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        for (key, value) in extra {
            arguments.insert((*key).into(), value.clone());
        }
        arguments
    };
    let failed = |queue: &str| {
        let queue = queue.to_string();
        move |source| queue_error(queue, settings.declare_queues, source)
    };
    channel
        .exchange_declare(
            settings.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, passive, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(failed(&settings.dead_letter_exchange))?;
    let dlq = settings.dead_letter_queue.as_str();
    channel.queue_declare(dlq.into(), durable, quorum(&[])).await.map_err(failed(dlq))?;
    if !passive {
        channel
            .queue_bind(
                dlq.into(),
                settings.dead_letter_exchange.as_str().into(),
                "".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed(dlq))?;
    }
    let jobs = quorum(&[
        ("x-delivery-limit", AMQPValue::LongUInt(settings.delivery_limit)),
        ("x-dead-letter-exchange", AMQPValue::LongString(settings.dead_letter_exchange.as_str().into())),
        // At-least-once dead-lettering needs publishers to be refused, not messages dropped, when full.
        ("x-dead-letter-strategy", AMQPValue::LongString("at-least-once".into())),
        ("x-overflow", AMQPValue::LongString("reject-publish".into())),
    ]);
    for lane in [settings.jobs_queue.as_str(), settings.bulk_queue.as_str()] {
        if !lane.is_empty() {
            channel.queue_declare(lane.into(), durable, jobs.clone()).await.map_err(failed(lane))?;
        }
    }
    let results = settings.results_queue.as_str();
    channel.queue_declare(results.into(), durable, quorum(&[])).await.map_err(failed(results))?;
    Ok(())
}

/// What went wrong with `queue`: a refused permission (retrying cannot help: the user's rights
/// or `amqp.declare_queues` must change), or another failure. `declaring`: the worker was
/// declaring the queue rather than only checking or consuming it.
pub(crate) fn queue_error(queue: String, declaring: bool, source: lapin::Error) -> AmqpError {
    match &source.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == ACCESS_REFUSED => {
            AmqpError::AccessRefused { queue, reason: amqp.get_message().to_string(), declaring }
        }
        _ => AmqpError::Queue { queue, source },
    }
}

/// AMQP's reply code for a refused permission.
const ACCESS_REFUSED: u16 = 403;

/// Declares (or, with `amqp.declare_queues: false`, checks) the audit stream: a durable stream
/// keeping records for `audit.max_age`, at most `audit.max_bytes`.
pub async fn declare_audit_stream(
    channel: &Channel,
    amqp: &AmqpSettings,
    audit: &AuditSettings,
) -> Result<(), AmqpError> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
    arguments.insert("x-max-age".into(), AMQPValue::LongString(audit.max_age.as_str().into()));
    // The broker takes any integer type; a signed 64-bit one holds every sensible size.
    let max_bytes = i64::try_from(audit.max_bytes).unwrap_or(i64::MAX);
    arguments.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(max_bytes));
    let options = QueueDeclareOptions { durable: true, passive: !amqp.declare_queues, ..Default::default() };
    channel.queue_declare(audit.stream.as_str().into(), options, arguments).await.map_err(
        |source| match queue_error(audit.stream.clone(), amqp.declare_queues, source) {
            AmqpError::Queue { queue, source } => AmqpError::AuditStream { stream: queue, source },
            refused => refused,
        },
    )?;
    Ok(())
}

/// The queue a lane consumes.
pub fn lane_queue(settings: &AmqpSettings, lane: Lane) -> &str {
    match lane {
        Lane::Online => &settings.jobs_queue,
        Lane::Bulk => &settings.bulk_queue,
    }
}

pub async fn consumer_channel(connection: &Connection, prefetch: u16) -> Result<Channel, AmqpError> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(channel)
}

pub async fn confirming_channel(connection: &Connection) -> Result<Channel, AmqpError> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

//! Reading a RabbitMQ stream from a chosen offset, for the clients of the audit trail: a
//! consumer with `x-stream-offset` (the first message, a numeric offset, or a point in time),
//! a prefetch and manual acknowledgements (a stream takes consumers only so), handing back each
//! message's stream offset with its body split into lines (one record a line: JSON Lines). A
//! stream has no end: reading stops when nothing arrives for an idle period, or when the caller
//! stops asking. Messages of another `type` than the one asked for are skipped.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

use super::AmqpError;
use crate::settings::AmqpSettings;

/// Messages the broker may send ahead of the acknowledgements.
const PREFETCH: u16 = 1000;
/// Acknowledge after this many messages at once: a stream needs acknowledgements to send more,
/// and one per message would double the frames.
const ACK_EVERY: u64 = 100;
/// Longest closing the channel and connection may take.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);
/// The header a stream puts on each delivery: the message's offset in the stream.
const OFFSET_HEADER: &str = "x-stream-offset";

/// Where reading starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The first message the stream still holds.
    First,
    /// The message at this offset (or the first after it the stream still holds).
    Offset(u64),
    /// The first chunk of messages the broker stored at or after this time, in seconds since
    /// the Unix epoch by the broker's clock. Chunks hold many messages: a few stored just
    /// before may come too.
    Timestamp(u64),
}

impl StartAt {
    fn argument(self) -> AMQPValue {
        match self {
            StartAt::First => AMQPValue::LongString("first".into()),
            // The broker takes any integer type; a signed 64-bit one holds every offset.
            StartAt::Offset(offset) => AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX)),
            StartAt::Timestamp(seconds) => AMQPValue::Timestamp(seconds),
        }
    }
}

/// How to read a stream.
#[derive(Debug, Clone)]
pub struct StreamReading {
    pub stream: String,
    pub start: StartAt,
    /// Stop when no message arrives for this long: the reader has caught up with the stream.
    pub idle: Duration,
    /// Only messages with this `type` property are handed back.
    pub kind: String,
}

/// One message of the stream: its offset, and its body's lines without their `\n` (a final
/// empty piece, after the last `\n`, is not a line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMessage {
    pub offset: u64,
    pub lines: Vec<Vec<u8>>,
}

/// What can go wrong reading a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Connect(AmqpError),
    #[error(
        "the stream {stream} does not exist on the broker ({reason}); check its name (setting audit.stream, or \
         --stream) and the vhost in amqp.url"
    )]
    Missing { stream: String, reason: String },
    #[error(
        "RabbitMQ refused reading the stream {stream}: {reason}; the user of amqp.url needs read permission on it \
         (deploy/rabbitmq/definitions.json)"
    )]
    Refused { stream: String, reason: String },
    #[error(
        "{stream} is a queue but not a stream (its messages carry no stream offset); nothing was taken from it. \
         Name the audit stream in audit.stream or --stream"
    )]
    NotAStream { stream: String },
    #[error("reading the stream {stream} failed: {source}")]
    Read { stream: String, source: lapin::Error },
}

impl StreamError {
    /// True when the settings or the broker's configuration must change before reading can work.
    pub fn is_setup(&self) -> bool {
        match self {
            StreamError::Connect(error) => error.is_refusal(),
            StreamError::Missing { .. } | StreamError::Refused { .. } | StreamError::NotAStream { .. } => true,
            StreamError::Read { .. } => false,
        }
    }
}

/// A subscription to a stream on a connection of its own.
pub struct StreamReader {
    connection: Connection,
    channel: Channel,
    deliveries: lapin::Consumer,
    reading: StreamReading,
    /// Deliveries since the last acknowledgement, and the acker of the latest, which acknowledges
    /// them all.
    unacknowledged: u64,
    latest: Option<lapin::Acker>,
}

impl StreamReader {
    /// Connects and subscribes to `reading.stream` from `reading.start`.
    pub async fn open(settings: &AmqpSettings, reading: StreamReading) -> Result<Self, StreamError> {
        let connection = super::connect(settings).await.map_err(StreamError::Connect)?;
        let failed = |source| refusal(&reading.stream, source);
        let channel = connection.create_channel().await.map_err(failed)?;
        channel.basic_qos(PREFETCH, BasicQosOptions::default()).await.map_err(failed)?;
        let mut arguments = FieldTable::default();
        arguments.insert(OFFSET_HEADER.into(), reading.start.argument());
        let deliveries = channel
            .basic_consume(reading.stream.as_str().into(), "".into(), BasicConsumeOptions::default(), arguments)
            .await
            .map_err(failed)?;
        Ok(StreamReader { connection, channel, deliveries, reading, unacknowledged: 0, latest: None })
    }

    /// The next message of the asked-for type; `None` once nothing arrived for the idle period.
    pub async fn next(&mut self) -> Result<Option<StreamMessage>, StreamError> {
        loop {
            let Ok(delivery) = tokio::time::timeout(self.reading.idle, self.deliveries.next()).await else {
                return Ok(None);
            };
            let delivery = match delivery {
                Some(delivery) => delivery.map_err(|source| refusal(&self.reading.stream, source))?,
                None => return Ok(None),
            };
            let Some(offset) = offset_of(&delivery.properties) else {
                // Acknowledging would delete it from a queue that is not a stream: give it back.
                let _ = delivery.acker.nack(BasicNackOptions { requeue: true, multiple: true }).await;
                return Err(StreamError::NotAStream { stream: self.reading.stream.clone() });
            };
            let wanted = delivery.properties.kind().as_ref().is_some_and(|kind| kind.as_str() == self.reading.kind);
            let lines = wanted.then(|| lines(&delivery.data));
            self.acknowledge(delivery.acker).await?;
            if let Some(lines) = lines {
                return Ok(Some(StreamMessage { offset, lines }));
            }
        }
    }

    /// Acknowledges in groups: a delivery counts now, the group goes when full.
    async fn acknowledge(&mut self, acker: lapin::Acker) -> Result<(), StreamError> {
        self.unacknowledged += 1;
        self.latest = Some(acker);
        if self.unacknowledged >= ACK_EVERY {
            self.flush_acks().await?;
        }
        Ok(())
    }

    async fn flush_acks(&mut self) -> Result<(), StreamError> {
        if let Some(acker) = self.latest.take() {
            self.unacknowledged = 0;
            acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .map_err(|source| StreamError::Read { stream: self.reading.stream.clone(), source })?;
        }
        Ok(())
    }

    /// Ends the subscription and the connection, each waiting at most a few seconds.
    pub async fn close(mut self) {
        let _ = self.flush_acks().await;
        let _ = tokio::time::timeout(CLOSE_PATIENCE, self.channel.close(200, "done reading".into())).await;
        let _ = tokio::time::timeout(CLOSE_PATIENCE, self.connection.close(200, "done reading".into())).await;
    }
}

/// The typed error of a failed subscription: the broker's 404 (no such queue) and 403 (access
/// refused) say what to fix.
fn refusal(stream: &str, source: lapin::Error) -> StreamError {
    let stream = stream.to_string();
    match source.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404 => {
            StreamError::Missing { stream, reason: amqp.get_message().to_string() }
        }
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == super::ACCESS_REFUSED => {
            StreamError::Refused { stream, reason: amqp.get_message().to_string() }
        }
        _ => StreamError::Read { stream, source },
    }
}

/// The `x-stream-offset` header of a delivery, of whichever integer type the broker sent.
fn offset_of(properties: &lapin::BasicProperties) -> Option<u64> {
    match properties.headers().as_ref()?.inner().get(OFFSET_HEADER)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        _ => None,
    }
}

/// A body's lines, each without its `\n`; a final empty piece is not a line.
pub fn lines(body: &[u8]) -> Vec<Vec<u8>> {
    let mut pieces: Vec<Vec<u8>> = body.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    if pieces.last().is_some_and(Vec::is_empty) {
        pieces.pop();
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_split_into_its_lines_without_a_final_empty_one() {
        assert_eq!(lines(b"{\"a\":1}\n{\"b\":2}\n"), vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        assert_eq!(lines(b"{\"a\":1}"), vec![b"{\"a\":1}".to_vec()], "a body without a newline is one line");
        assert_eq!(lines(b"x\n\ny\n"), vec![b"x".to_vec(), Vec::new(), b"y".to_vec()], "an inner empty line stays");
        assert!(lines(b"").is_empty());
    }

    #[test]
    fn the_offset_header_is_read_whatever_its_integer_type() {
        let with = |value| {
            let mut headers = FieldTable::default();
            headers.insert(OFFSET_HEADER.into(), value);
            lapin::BasicProperties::default().with_headers(headers)
        };
        assert_eq!(offset_of(&with(AMQPValue::LongLongInt(42))), Some(42));
        assert_eq!(offset_of(&with(AMQPValue::LongUInt(7))), Some(7));
        assert_eq!(offset_of(&with(AMQPValue::LongString("7".into()))), None);
        assert_eq!(offset_of(&lapin::BasicProperties::default()), None);
    }
}

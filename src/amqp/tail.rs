//! A reader of a RabbitMQ stream from a given offset, for `batchscore audit sink`: it hands out
//! each message with its offset (the `x-stream-offset` delivery header) and whether it is an
//! audit message (`type` = [`AUDIT_TYPE`]), and acknowledges what was read only when the caller
//! says its messages are safe elsewhere. A stream subscription needs a prefetch and manual
//! acknowledgements: the acknowledgements are the broker's credit to send more.

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, Channel, Connection};

use crate::settings::{redact, AmqpSettings};

/// The `type` property of the audit stream's messages.
pub const AUDIT_TYPE: &str = "scoring.audit";

/// Longest the broker is given to answer `close`.
const CLOSE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// What can go wrong reading a stream.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Connect(#[from] super::AmqpError),
    #[error(
        "cannot read the stream {stream} at {url}: {source} (it must exist as a stream, x-queue-type: stream, and \
         the user needs read permission on it; the workers declare it when audit.enabled is true)"
    )]
    Subscribe { stream: String, url: String, source: lapin::Error },
    #[error("reading the stream {stream} failed: {source}; the sink resumes from its stored offset when restarted")]
    Read { stream: String, source: lapin::Error },
    #[error("the broker ended the subscription to the stream {stream} (was it deleted?)")]
    Ended { stream: String },
    #[error(
        "a message of the stream {stream} has no usable x-stream-offset header ({found}); is {stream} a stream \
         (x-queue-type: stream) rather than a classic or quorum queue?"
    )]
    NoOffset { stream: String, found: String },
    #[error(
        "the stream {stream} delivered offset {offset} when the sink asked to start at {start}: was the stream \
         deleted and declared again? Its offsets then start over: set next_offset of {stream} in \
         audit_sink_offset to 0 to read the new stream from its start"
    )]
    Rewound { stream: String, offset: u64, start: u64 },
    #[error("cannot acknowledge messages of the stream {stream}: {source}")]
    Ack { stream: String, source: lapin::Error },
}

/// One message of the stream.
pub struct StreamMessage {
    /// Its offset in the stream.
    pub offset: u64,
    /// Its `type` is [`AUDIT_TYPE`]: the body holds audit records; other messages (markers,
    /// messages of other tools) are to be passed over.
    pub audit: bool,
    pub body: Vec<u8>,
    receipt: Receipt,
}

impl StreamMessage {
    /// What acknowledges this message and every one read before it, once they are stored.
    pub fn receipt(&self) -> Receipt {
        self.receipt.clone()
    }
}

/// Acknowledges a message and those before it on the same subscription ([`Tail::acknowledge`]).
#[derive(Clone)]
pub struct Receipt(Acker);

/// A subscription to one stream, from an offset on.
pub struct Tail {
    connection: Connection,
    channel: Channel,
    deliveries: lapin::Consumer,
    stream: String,
    start: u64,
}

impl Tail {
    /// Connects with the broker settings and subscribes to `stream` from offset `start` (an
    /// offset past the stream's end waits for the next message). `prefetch`: how many messages
    /// may be read ahead of their acknowledgement.
    pub async fn open(settings: &AmqpSettings, stream: &str, start: u64, prefetch: u16) -> Result<Self, TailError> {
        let connection = super::connect(settings).await?;
        let subscribe =
            |source| TailError::Subscribe { stream: stream.to_string(), url: redact(&settings.url), source };
        let channel = connection.create_channel().await.map_err(subscribe)?;
        channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await.map_err(subscribe)?;
        let mut arguments = FieldTable::default();
        // A signed 64-bit offset: what the broker sends back in the header, and wide enough for
        // any stream.
        let from = i64::try_from(start).unwrap_or(i64::MAX);
        arguments.insert("x-stream-offset".into(), AMQPValue::LongLongInt(from));
        let options = BasicConsumeOptions { no_ack: false, ..Default::default() };
        let deliveries =
            channel.basic_consume(stream.into(), "".into(), options, arguments).await.map_err(subscribe)?;
        tracing::info!(stream, offset = start, url = %redact(&settings.url), "reading the stream");
        Ok(Self { connection, channel, deliveries, stream: stream.to_string(), start })
    }

    /// The next message; waits for one as long as it takes (cancel the future to stop waiting).
    pub async fn next(&mut self) -> Result<StreamMessage, TailError> {
        let delivery = match self.deliveries.next().await {
            Some(Ok(delivery)) => delivery,
            Some(Err(source)) => return Err(TailError::Read { stream: self.stream.clone(), source }),
            None => return Err(TailError::Ended { stream: self.stream.clone() }),
        };
        let headers = delivery.properties.headers().as_ref().map(FieldTable::inner);
        let offset = match headers.and_then(|headers| headers.get("x-stream-offset")) {
            Some(value) => offset_of(value)
                .ok_or_else(|| TailError::NoOffset { stream: self.stream.clone(), found: format!("{value:?}") })?,
            None => return Err(TailError::NoOffset { stream: self.stream.clone(), found: "none".into() }),
        };
        if offset < self.start {
            // The broker itself leaves out the messages before the offset asked for, so an
            // earlier one means the stream's offsets started over.
            return Err(TailError::Rewound { stream: self.stream.clone(), offset, start: self.start });
        }
        let audit = delivery.properties.kind().as_ref().is_some_and(|kind| kind.as_str() == AUDIT_TYPE);
        Ok(StreamMessage { offset, audit, body: delivery.data, receipt: Receipt(delivery.acker) })
    }

    /// Acknowledges the message of `receipt` and every message read before it.
    pub async fn acknowledge(&self, receipt: &Receipt) -> Result<(), TailError> {
        receipt
            .0
            .ack(BasicAckOptions { multiple: true })
            .await
            .map(drop)
            .map_err(|source| TailError::Ack { stream: self.stream.clone(), source })
    }

    /// Closes the channel and the connection, each waiting a few seconds at most.
    pub async fn close(self) {
        let _ = tokio::time::timeout(CLOSE_PATIENCE, self.channel.close(200, "sink stopping".into())).await;
        let _ = tokio::time::timeout(CLOSE_PATIENCE, self.connection.close(200, "sink stopping".into())).await;
    }
}

/// An `x-stream-offset` header value as an offset: any non-negative integer type.
fn offset_of(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_of_every_integer_type_and_nothing_else() {
        assert_eq!(offset_of(&AMQPValue::LongLongInt(42)), Some(42));
        assert_eq!(offset_of(&AMQPValue::LongUInt(7)), Some(7));
        assert_eq!(offset_of(&AMQPValue::LongLongInt(-1)), None);
        assert_eq!(offset_of(&AMQPValue::LongString("42".into())), None);
    }
}

//! Where records come from. The commands' logic ([`super::find`], [`super::verify`]) takes
//! records one by one, in the order they were appended, from any [`RecordSource`]; the audit
//! stream on the broker is one ([`StreamSource`]), and an in-memory list another.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use serde::Deserialize;

use super::error::AuditorError;
use super::record::StoredRecord;
use crate::amqp::recorder::RECORD_TYPE;
use crate::amqp::stream::{StartAt, StreamReader, StreamReading};
use crate::settings::AmqpSettings;

/// Records in the order they were appended; `None` when there are no more.
pub trait RecordSource {
    fn next_record(&mut self) -> impl Future<Output = Result<Option<StoredRecord>, AuditorError>>;
}

/// Records held in memory, in order.
pub struct InMemory(VecDeque<StoredRecord>);

impl InMemory {
    pub fn new(records: impl IntoIterator<Item = StoredRecord>) -> Self {
        InMemory(records.into_iter().collect())
    }
}

impl RecordSource for InMemory {
    async fn next_record(&mut self) -> Result<Option<StoredRecord>, AuditorError> {
        Ok(self.0.pop_front())
    }
}

/// How much earlier than `--since` reading starts: the stream places messages in time by the
/// broker's clock when it stored them, the records by the worker's when it answered.
pub const SINCE_SLACK_MS: u64 = 60_000;
/// How far past `--until` records are read before stopping: records of several workers are
/// interleaved, each in the order its worker published them, not strictly by `scored_ms`.
pub const UNTIL_SLACK_MS: u64 = 60_000;

/// Which part of the audit stream to read.
#[derive(Debug, Clone)]
pub struct Window {
    pub stream: String,
    /// Epoch milliseconds: read from a little before (else from the first record).
    pub since_ms: Option<u64>,
    /// Epoch milliseconds: stop once records are well past it (else at the end).
    pub until_ms: Option<u64>,
    /// The end of the stream: nothing more arrived for this long.
    pub idle: Duration,
}

impl Window {
    fn start(&self) -> StartAt {
        match self.since_ms {
            Some(since) => StartAt::Timestamp(since.saturating_sub(SINCE_SLACK_MS) / 1000),
            None => StartAt::First,
        }
    }
}

/// The records of the audit stream, from the window's start until it ends.
pub struct StreamSource {
    reader: Option<StreamReader>,
    pending: VecDeque<StoredRecord>,
    until_ms: Option<u64>,
}

impl StreamSource {
    pub async fn open(amqp: &AmqpSettings, window: &Window) -> Result<Self, AuditorError> {
        let reading = StreamReading {
            stream: window.stream.clone(),
            start: window.start(),
            idle: window.idle,
            kind: RECORD_TYPE.to_string(),
        };
        let reader = StreamReader::open(amqp, reading).await?;
        Ok(StreamSource { reader: Some(reader), pending: VecDeque::new(), until_ms: window.until_ms })
    }

    /// Whether `record` was answered so long after `until` that reading can stop.
    fn past_until(&self, record: &StoredRecord) -> bool {
        #[derive(Deserialize)]
        struct When {
            scored_ms: Option<u64>,
        }
        let Some(until) = self.until_ms else { return false };
        let scored = serde_json::from_slice::<When>(&record.bytes).ok().and_then(|w| w.scored_ms);
        scored.is_some_and(|ms| ms > until.saturating_add(UNTIL_SLACK_MS))
    }

    async fn stop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.close().await;
        }
    }
}

impl RecordSource for StreamSource {
    async fn next_record(&mut self) -> Result<Option<StoredRecord>, AuditorError> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                if self.past_until(&record) {
                    self.pending.clear();
                    self.stop().await;
                    return Ok(None);
                }
                return Ok(Some(record));
            }
            let Some(reader) = self.reader.as_mut() else { return Ok(None) };
            match reader.next().await {
                Ok(Some(message)) => {
                    let offset = message.offset;
                    self.pending.extend(message.lines.into_iter().map(|bytes| StoredRecord { offset, bytes }));
                }
                Ok(None) => {
                    self.stop().await;
                    return Ok(None);
                }
                Err(error) => {
                    self.stop().await;
                    return Err(error.into());
                }
            }
        }
    }
}

//! The audit stream's writer: appends each answered job's record to this session's
//! [`audit::Chain`] and publishes the records to the stream in batches, one message of JSON Lines
//! per confirm round (the publisher says when), in chain order, so the order of `seq` is the
//! order of the records in the stream.
//! It then judges the broker's confirm of each message. A message goes mandatory: a stream that
//! does not exist sends it back instead of dropping it. The publisher acknowledges a job only
//! once its record is [`Recording::stored`]. Each confirmed message moves the worker's
//! [`audit::ChainEnds`] on, which the first record of the next session's chain names.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use tokio::sync::watch;

use super::confirm::{confirmed, Confirmed};
use super::{AmqpError, Inbound};
use crate::audit::{self, Answer, AuditError};
use crate::flow::Outgoing;
use crate::settings::{AmqpSettings, AuditSettings};

/// The `type` property of a message of audit records.
pub const RECORD_TYPE: &str = "scoring.audit";
/// The content type of a message of audit records: one JSON record per line.
pub const RECORDS_CONTENT_TYPE: &str = "application/x-ndjson";
/// Most records in one message: a message is confirmed whole, so this bounds the jobs one
/// refused message sends back to their queues.
const MAX_RECORDS_PER_MESSAGE: usize = 512;
/// Most bytes of records in one message, for records that hold inputs and outputs.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// The audit trail's settings and the last confirmed record of the worker's chains, which
/// outlives each session's [`Recorder`].
#[derive(Debug, Clone)]
pub struct Trail {
    pub settings: AuditSettings,
    pub ends: audit::ChainEnds,
}

/// Publishes the records of one broker session's chain.
pub struct Recorder {
    channel: Channel,
    stream: Arc<str>,
    chain: audit::Chain,
    amqp: AmqpSettings,
    pending: Pending,
    ends: audit::ChainEnds,
}

/// The records waiting for the next message.
struct Pending {
    body: Vec<u8>,
    records: usize,
    /// The first record's `seq`.
    first_seq: u64,
    /// The first record's job, as messages show it, to name in an error.
    first_job_id: String,
    stored: watch::Sender<bool>,
}

impl Pending {
    fn new() -> Self {
        Pending {
            body: Vec::new(),
            records: 0,
            first_seq: 0,
            first_job_id: String::new(),
            stored: watch::channel(false).0,
        }
    }
}

/// A job's record in a message on its way to the broker's confirm.
pub struct Recording(watch::Receiver<bool>);

impl Recorder {
    /// A recorder starting a new chain on `channel`, which has publisher confirms.
    /// Its first record names the last confirmed record of the chains before (`trail.ends`).
    pub fn new(channel: Channel, amqp: &AmqpSettings, trail: &Trail) -> Self {
        let audit = &trail.settings;
        let previous = trail.ends.last();
        tracing::info!(stream = %audit.stream, worker_id = %audit.worker_id,
            previous_chain = previous.as_ref().map_or("none", |end| end.chain_id.as_str()),
            previous_seq = previous.as_ref().map(|end| end.seq),
            "recording every answered job in the audit stream");
        let chain = audit::Chain::start(audit, previous);
        tracing::info!(chain_id = chain.id(), "audit chain started");
        let stream = Arc::from(audit.stream.as_str());
        let ends = trail.ends.clone();
        Recorder { channel, stream, chain, amqp: amqp.clone(), pending: Pending::new(), ends }
    }

    /// Appends the record of `outgoing`, whose body is still plaintext, to the next message. The
    /// order of the calls is the order of the chain.
    pub fn add(&mut self, outgoing: &Outgoing) -> Result<Recording, AmqpError> {
        let job = outgoing.delivery.open::<Inbound>().ok_or(AmqpError::ForeignDelivery)?;
        let job_id = outgoing.job_id.as_deref();
        let provenance =
            outgoing.audit.as_deref().ok_or_else(|| AuditError::Unaudited { job_id: audit::shown(job_id) })?;
        let properties = &job.properties;
        let answer = Answer {
            job_id,
            correlation_id: text(properties.correlation_id()),
            user_id: text(properties.user_id()),
            app_id: text(properties.app_id()),
            queue: super::lane_queue(&self.amqp, outgoing.completion.lane),
            lane: outgoing.completion.lane,
            status: outgoing.completion.status,
            result: &outgoing.body,
            encrypted: outgoing.key.is_some(),
            provenance,
        };
        let seq = self.chain.next_seq();
        let record = self.chain.append(&answer)?;
        let pending = &mut self.pending;
        if pending.records == 0 {
            pending.first_job_id = audit::shown(job_id);
            pending.first_seq = seq;
        }
        pending.body.extend_from_slice(&record);
        pending.body.push(b'\n');
        pending.records += 1;
        Ok(Recording(pending.stored.subscribe()))
    }

    /// Whether the next message is as large as one may be: publish it before adding more.
    pub fn is_full(&self) -> bool {
        self.pending.records >= MAX_RECORDS_PER_MESSAGE || self.pending.body.len() >= MAX_MESSAGE_BYTES
    }

    /// Publishes the records added since the last call as one message; returns the wait for its
    /// confirm, which marks each of its records stored, or fails the session when the stream did
    /// not store them. `None` when no record was added.
    pub async fn publish(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<impl Future<Output = Result<(), AmqpError>>>, AmqpError> {
        if self.pending.records == 0 {
            return Ok(None);
        }
        let Pending { body, first_seq, first_job_id, stored, .. } =
            std::mem::replace(&mut self.pending, Pending::new());
        // The message ends with the last record appended.
        let end = self.chain.end();
        let ends = self.ends.clone();
        let properties = BasicProperties::default()
            .with_content_type(RECORDS_CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_type(RECORD_TYPE.into());
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let stream = ShortString::from(&*self.stream);
        let confirm = self.channel.basic_publish("".into(), stream, options, &body, properties).await?;
        let stream = self.stream.to_string();
        Ok(Some(async move {
            match Confirmed::from(&confirmed(confirm, timeout).await?) {
                Confirmed::Stored => {
                    if let Some(end) = end {
                        ends.confirmed(first_seq, end);
                    }
                    // Ignored error: no job waits on these records any more (the session ends).
                    let _ = stored.send(true);
                    Ok(())
                }
                Confirmed::Returned => Err(AmqpError::AuditStreamMissing { stream, job_id: first_job_id }),
                Confirmed::Refused => Err(AmqpError::AuditRecordRefused { stream, job_id: first_job_id }),
            }
        }))
    }
}

/// A message property's text; empty counts as absent.
fn text(value: &Option<ShortString>) -> Option<&str> {
    value.as_ref().map(ShortString::as_str).filter(|v| !v.is_empty())
}

impl Recording {
    /// Waits until the broker has stored the record. The wait for the message's confirm, not
    /// this, fails when the record is not stored; this one ends with an error only when that wait
    /// is gone, with the session.
    pub async fn stored(mut self) -> Result<(), AmqpError> {
        match self.0.wait_for(|stored| *stored).await {
            Ok(_) => Ok(()),
            Err(_) => Err(AmqpError::AuditUnconfirmed),
        }
    }
}

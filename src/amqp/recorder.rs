//! The audit stream's writer: appends each answered job's record to this session's
//! [`audit::Chain`] and publishes it to the stream, one record at a time, so the order of `seq`
//! is the order of the records on the channel; then judges the broker's confirm of each. A
//! record goes as a mandatory message: a stream that does not exist sends it back instead of
//! dropping it. The publisher acknowledges a job only once its record is [`Recording::stored`].

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, PublisherConfirm};

use super::confirm::{confirmed, Confirmed};
use super::{AmqpError, Inbound};
use crate::audit::{self, Answer, AuditError};
use crate::flow::Outgoing;
use crate::settings::{AmqpSettings, AuditSettings};

/// The `type` property of an audit record.
pub const RECORD_TYPE: &str = "scoring.audit";

/// Publishes the records of one broker session's chain.
pub struct Recorder {
    channel: Channel,
    stream: Arc<str>,
    chain: audit::Chain,
    amqp: AmqpSettings,
}

/// A published record on its way to the broker's confirm.
pub struct Recording {
    confirm: PublisherConfirm,
    stream: Arc<str>,
    /// The job's id as messages show it.
    job_id: String,
}

impl Recorder {
    /// A recorder starting a new chain on `channel`, which has publisher confirms.
    pub fn new(channel: Channel, amqp: &AmqpSettings, audit: &AuditSettings) -> Self {
        let chain = audit::Chain::start(audit);
        tracing::info!(stream = %audit.stream, worker_id = %audit.worker_id, chain_id = chain.id(),
            "recording every answered job in the audit stream");
        Recorder { channel, stream: Arc::from(audit.stream.as_str()), chain, amqp: amqp.clone() }
    }

    /// Publishes the record of `outgoing`, whose body is still plaintext. Await each call before
    /// the next: the order of the calls is the order of the chain.
    pub async fn record(&mut self, outgoing: &Outgoing) -> Result<Recording, AmqpError> {
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
        let record = self.chain.append(&answer)?;
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type(RECORD_TYPE.into());
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let stream = ShortString::from(&*self.stream);
        let confirm = self.channel.basic_publish("".into(), stream, options, &record, properties).await?;
        Ok(Recording { confirm, stream: Arc::clone(&self.stream), job_id: audit::shown(job_id) })
    }
}

/// A message property's text; empty counts as absent.
fn text(value: &Option<ShortString>) -> Option<&str> {
    value.as_ref().map(ShortString::as_str).filter(|v| !v.is_empty())
}

impl Recording {
    /// Waits for the broker's confirm: `Ok` once the stream stored the record.
    pub async fn stored(self, timeout: Duration) -> Result<(), AmqpError> {
        let Recording { confirm, stream, job_id } = self;
        let stream = stream.to_string();
        match Confirmed::from(&confirmed(confirm, timeout).await?) {
            Confirmed::Stored => Ok(()),
            Confirmed::Returned => Err(AmqpError::AuditStreamMissing { stream, job_id }),
            Confirmed::Refused => Err(AmqpError::AuditRecordRefused { stream, job_id }),
        }
    }
}

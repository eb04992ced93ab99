//! RabbitMQ: connection, queue declarations, the job consumer and the confirming publisher.

pub mod consumer;
pub mod publisher;

use lapin::options::{BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::settings::AmqpSettings;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error("queue {queue}: {source}")]
    Queue { queue: String, source: lapin::Error },
    #[error("broker channel failed: {0}")]
    Channel(#[from] lapin::Error),
    #[error("the broker ended the consumer on {0}")]
    ConsumerEnded(String),
}

/// Where a job's result goes, and the handle that acknowledges the job once it is confirmed.
#[derive(Debug, Clone)]
pub struct Reply {
    pub acker: lapin::Acker,
    pub routing_key: ShortString,
    pub correlation_id: Option<ShortString>,
}

/// Opens a connection; the URL's password is not echoed in errors.
pub async fn connect(settings: &AmqpSettings) -> Result<Connection, AmqpError> {
    let properties = ConnectionProperties::default().with_connection_name(settings.connection_name.as_str().into());
    Connection::connect(&settings.url, properties)
        .await
        .map_err(|source| AmqpError::Connect { url: redact(&settings.url), source })
}

/// Declares (or, with `declare_queues: false`, checks) the jobs and results queues.
pub async fn declare_queues(channel: &Channel, settings: &AmqpSettings) -> Result<(), AmqpError> {
    let options = QueueDeclareOptions { durable: true, passive: !settings.declare_queues, ..Default::default() };
    for queue in [&settings.jobs_queue, &settings.results_queue] {
        channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
            .map_err(|source| AmqpError::Queue { queue: queue.clone(), source })?;
    }
    Ok(())
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

/// `amqp://user:secret@host` → `amqp://user:***@host`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &credentials[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_password_only() {
        assert_eq!(super::redact("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(super::redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}

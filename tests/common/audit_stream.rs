//! The audit stream as the tests read it: every record from the first, checked against
//! schemas/audit-record.schema.json.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde_json::Value;

use super::BROKER_PATIENCE;

/// An audit record as the stream holds it.
pub struct Record {
    pub body: Vec<u8>,
    pub json: Value,
}

impl Record {
    pub fn str(&self, member: &str) -> Option<&str> {
        self.json[member].as_str()
    }
}

/// A consumer of `stream` from its first record, on a connection of its own. A stream is read
/// with a prefetch, manual acknowledgements and an offset.
pub async fn subscribe(stream: &str) -> (Connection, lapin::Consumer) {
    let connection = super::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel.basic_qos(1000, BasicQosOptions::default()).await.expect("qos");
    let mut arguments = FieldTable::default();
    arguments.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
    let deliveries = channel
        .basic_consume(stream.into(), "".into(), BasicConsumeOptions::default(), arguments)
        .await
        .expect("consume the stream");
    (connection, deliveries)
}

/// The next message of a stream subscription, acknowledged; `waiting` says what the test waited
/// for when none comes within `patience`.
pub async fn next_message(
    deliveries: &mut lapin::Consumer,
    patience: Duration,
    waiting: impl FnOnce() -> String,
) -> lapin::message::Delivery {
    let delivery = tokio::time::timeout(patience, deliveries.next())
        .await
        .unwrap_or_else(|_| panic!("{}", waiting()))
        .expect("stream open")
        .expect("delivery");
    delivery.acker.ack(BasicAckOptions::default()).await.expect("ack");
    delivery
}

/// Every record of `stream`, first to last, each checked against the record schema. The worker
/// has stopped, so nothing follows the marker the test appends to find the end.
pub async fn read_stream(stream: &str) -> Vec<Record> {
    let schema_text = std::fs::read(super::root().join("schemas/audit-record.schema.json")).expect("record schema");
    let schema = jsonschema::validator_for(&serde_json::from_slice(&schema_text).expect("schema is JSON"))
        .expect("schema compiles");
    let connection = super::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(Default::default()).await.expect("confirms");
    let end = uuid::Uuid::new_v4().to_string();
    let marker = BasicProperties::default().with_type("test.end".into()).with_message_id(end.as_str().into());
    let confirm = channel
        .basic_publish(
            "".into(),
            stream.into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"{}",
            marker,
        )
        .await
        .expect("publish the end marker");
    let confirmation =
        tokio::time::timeout(BROKER_PATIENCE, confirm).await.expect("confirmed in time").expect("confirm");
    assert!(matches!(confirmation, lapin::Confirmation::Ack(None)), "the stream {stream} takes the end marker");
    let (_subscription, mut deliveries) = subscribe(stream).await;
    let mut records = Vec::new();
    loop {
        let end_not_reached = || format!("the end of {stream} not reached after {} records", records.len());
        let delivery = next_message(&mut deliveries, BROKER_PATIENCE, end_not_reached).await;
        if delivery.properties.message_id().as_ref().map(|m| m.as_str()) == Some(end.as_str()) {
            return records;
        }
        assert_eq!(delivery.properties.kind().as_ref().map(|t| t.as_str()), Some("scoring.audit"));
        let json: Value = serde_json::from_slice(&delivery.data).expect("a record is JSON");
        if let Err(error) = schema.validate(&json) {
            panic!("record does not match schemas/audit-record.schema.json: {error}\n{json}");
        }
        records.push(Record { body: delivery.data, json });
    }
}

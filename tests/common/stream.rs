//! Reading an audit stream back: its records, each checked against
//! schemas/audit-record.schema.json, and the check of its chains.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::BROKER_PATIENCE;

/// An audit record as the stream holds it: its line, without the newline.
pub struct Record {
    pub body: Vec<u8>,
    pub json: Value,
}

impl Record {
    pub fn str(&self, member: &str) -> Option<&str> {
        self.json[member].as_str()
    }
}

/// sha256 of `bytes`, in hex.
pub fn hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A consumer of `stream` at `url` from its first record, on a connection of its own. A stream
/// is read with a prefetch, manual acknowledgements and an offset.
pub async fn subscribe_at(url: &str, stream: &str) -> (Connection, lapin::Consumer) {
    let connection = super::connect_to(url).await;
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

/// The records of one stream message: JSON Lines, each record followed by a newline.
pub fn record_lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    assert_eq!(body.last(), Some(&b'\n'), "a message of records ends with a newline");
    body[..body.len() - 1].split(|byte| *byte == b'\n')
}

/// Every record of `stream` at `url`, first to last, each checked against the record schema.
/// Nothing may be writing to the stream: the end is found by a marker appended first.
pub async fn read_stream_at(url: &str, stream: &str) -> Vec<Record> {
    let schema_text = std::fs::read(super::root().join("schemas/audit-record.schema.json")).expect("record schema");
    let schema = jsonschema::validator_for(&serde_json::from_slice(&schema_text).expect("schema is JSON"))
        .expect("schema compiles");
    let connection = super::connect_to(url).await;
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
    let (_subscription, mut deliveries) = subscribe_at(url, stream).await;
    let mut records = Vec::new();
    loop {
        let end_not_reached = || format!("the end of {stream} not reached after {} records", records.len());
        let delivery = next_message(&mut deliveries, BROKER_PATIENCE, end_not_reached).await;
        if delivery.properties.message_id().as_ref().map(|m| m.as_str()) == Some(end.as_str()) {
            return records;
        }
        assert_eq!(delivery.properties.kind().as_ref().map(|t| t.as_str()), Some("scoring.audit"));
        for line in record_lines(&delivery.data) {
            let json: Value = serde_json::from_slice(line).expect("a record is JSON");
            if let Err(error) = schema.validate(&json) {
                panic!("record does not match schemas/audit-record.schema.json: {error}\n{json}");
            }
            records.push(Record { body: line.to_vec(), json });
        }
    }
}

/// Checks every chain in `records` (stream order): each starts at seq 0 without a previous
/// record, and each next record has the next seq and the sha256 of the previous body. Returns the
/// number of chains, or what breaks one.
pub fn verify_chains(records: &[Record]) -> Result<usize, String> {
    let mut last: HashMap<&str, (u64, String)> = HashMap::new();
    for record in records {
        let chain = record.str("chain_id").ok_or("a record without chain_id")?;
        let seq = record.json["seq"].as_u64().ok_or("a record without seq")?;
        let prev = record.str("prev_sha256");
        match last.get(chain) {
            None if seq == 0 && prev.is_none() => {}
            None => return Err(format!("chain {chain} starts at seq {seq} (prev {prev:?}), not at 0")),
            Some((before, _)) if seq != before + 1 => {
                return Err(format!("chain {chain}: seq {seq} follows seq {before}"));
            }
            Some((_, digest)) if prev != Some(digest.as_str()) => {
                return Err(format!("chain {chain}: seq {seq} names {prev:?}, the previous record is {digest}"));
            }
            Some(_) => {}
        }
        last.insert(chain, (seq, hex(&record.body)));
    }
    Ok(last.len())
}

/// The records by job id.
pub fn by_job(records: &[Record]) -> HashMap<&str, Vec<&Record>> {
    let mut jobs: HashMap<&str, Vec<&Record>> = HashMap::new();
    for record in records {
        jobs.entry(record.str("job_id").expect("these tests' jobs all have ids")).or_default().push(record);
    }
    jobs
}

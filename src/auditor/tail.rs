//! The end of a worker's last chain in the audit stream's tail: what the first chain of a
//! worker process names as `previous_chain` when it starts, before any of its own records are
//! confirmed.

use std::time::Duration;

use super::error::AuditorError;
use super::record::{digest, Fields};
use super::source::{RecordSource, StreamSource, Window};
use crate::audit::ChainEnd;
use crate::flow::epoch_ms;
use crate::settings::{AmqpSettings, AuditSettings};

/// The end of the stream while a worker starts: nothing more arrived for this long.
const IDLE: Duration = Duration::from_secs(1);

/// The last record of `audit.worker_id` in the last `audit.previous_chain_lookback_ms` of the
/// stream; `None` when there is none (or the lookback is 0).
pub async fn last_chain_end(amqp: &AmqpSettings, audit: &AuditSettings) -> Result<Option<ChainEnd>, AuditorError> {
    if audit.previous_chain_lookback_ms == 0 {
        return Ok(None);
    }
    let window = Window {
        stream: audit.stream.clone(),
        since_ms: Some(epoch_ms().saturating_sub(audit.previous_chain_lookback_ms)),
        until_ms: None,
        idle: IDLE,
    };
    let mut source = StreamSource::open(amqp, &window).await?;
    last_of_worker(&mut source, &audit.worker_id).await
}

/// The last record of `worker_id` in `source`, as a later chain names it.
pub async fn last_of_worker(source: &mut impl RecordSource, worker_id: &str) -> Result<Option<ChainEnd>, AuditorError> {
    let mut last = None;
    while let Some(record) = source.next_record().await? {
        let Ok(fields) = Fields::read(&record.bytes) else { continue };
        if fields.worker_id.as_deref() != Some(worker_id) {
            continue;
        }
        if let (Some(chain_id), Some(seq)) = (fields.chain_id, fields.seq) {
            last = Some(ChainEnd { chain_id, seq, sha256: digest(&record.bytes) });
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auditor::record::StoredRecord;
    use crate::auditor::source::InMemory;

    #[tokio::test]
    async fn the_last_record_of_the_worker_is_its_chain_end() {
        let record = |worker: &str, chain: &str, seq: u64| StoredRecord {
            offset: seq,
            bytes: serde_json::to_vec(&serde_json::json!({"worker_id": worker, "chain_id": chain, "seq": seq}))
                .expect("JSON"),
        };
        let records = [record("w-1", "a", 0), record("w-1", "a", 1), record("w-2", "b", 0)];
        let expected = ChainEnd { chain_id: "a".into(), seq: 1, sha256: digest(&records[1].bytes) };
        let mut source = InMemory::new(records.clone());
        assert_eq!(last_of_worker(&mut source, "w-1").await.expect("read"), Some(expected));
        assert_eq!(last_of_worker(&mut InMemory::new(records), "w-3").await.expect("read"), None);
    }
}
